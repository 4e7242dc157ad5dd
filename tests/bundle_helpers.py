"""Test-only views of a bundle (the library never needs them)."""

from __future__ import annotations

from pathlib import Path

from exportline.exporters.core.bundle import Bundle


def mismatched(root: Path | Bundle) -> list[str]:
    """Listed paths whose bytes differ from the manifest (missing, resized or re-hashed)."""
    bundle = root if isinstance(root, Bundle) else Bundle(root)
    return [c.path for c in bundle.check() if not c.ok]


def rerecord(root: Path) -> dict:
    """Record the files as they are now, as a stage would after writing them (used by tests
    that edit an artifact on purpose to exercise a numerical or content check)."""
    bundle = Bundle(root)
    with bundle.lock():
        return bundle.write_manifest(bundle.read_manifest())

"""Make a bundle ready to publish: card settings, hubconf.py, README.md and a fresh manifest.json.

Files are rewritten only when their content changes and the manifest only when its content
changes, so preparing an unchanged bundle twice gives byte-identical files: a re-push of an
unchanged bundle then finds nothing to commit.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exportline.deploy.card import README, load_inputs, render_card
from exportline.deploy.torchhub import hubconf_text
from exportline.exporters.core.bundle import Bundle, manifest_text, stamped, write_text_atomic
from exportline.exporters.core.errors import ArtifactError
from exportline.exporters.core.layout import HUBCONF


def stale_stage_outputs(bundle: Bundle, manifest: dict[str, Any], *, fast: bool = True) -> list[tuple[str, str]]:
    """(stage, path) of stage outputs whose bytes differ from what the stage recorded."""
    outputs = {rel: stage for stage, record in manifest.get("stages", {}).items()
               if record.get("status") == "done" for rel in record.get("outputs", [])}
    return [(outputs[c.path], c.path) for c in bundle.check(outputs, fast=fast, manifest=manifest) if not c.ok]


def prepare_bundle(root: Path, **settings: Any) -> dict[str, Any]:
    """`prepare_locked` under the bundle lock."""
    bundle = Bundle(root)
    if not bundle.manifest_path.is_file():
        raise ArtifactError(f"{root} has no manifest.json; export it first: exportline export SOURCE --out {root}")
    with bundle.lock():
        return prepare_locked(bundle, **settings)


def prepare_locked(
    bundle: Bundle, *, repo_id: str | None = None, datasets: list[str] | tuple[str, ...] = (),
    license: str | None = None, base_model: str | None = None,
) -> dict[str, Any]:
    """Record card settings, write hubconf.py and README.md, refresh manifest.json; returns the
    manifest. The caller holds the bundle lock. Refuses a bundle whose stage outputs were modified."""
    plan = plan_prepared(bundle, repo_id=repo_id, datasets=datasets, license=license, base_model=base_model)
    for rel, text in plan.texts.items():
        path = bundle.root / rel
        if not path.is_file() or path.read_text() != text:  # untouched files keep their mtime
            write_text_atomic(path, text)
    return _refresh(bundle, plan.manifest)


@dataclass
class Prepared:
    """What preparing would leave in the bundle, computed without writing anything."""

    manifest: dict[str, Any]  # its "files" list the generated files as they would be
    texts: dict[str, str]  # generated file → content (README.md, hubconf.py)

    def manifest_bytes(self, bundle: Bundle) -> bytes:
        """manifest.json as a prepare would leave it: the file on disk when only its "updated"
        stamp would change (then it is not rewritten), else the new content (as Bundle writes it)."""
        on_disk = bundle.read_manifest() if bundle.manifest_path.is_file() else {}
        if _same_but_stamp(on_disk, self.manifest, mtimes=False):
            return bundle.manifest_path.read_bytes()
        return manifest_text(stamped(self.manifest)).encode()


def plan_prepared(
    bundle: Bundle, *, repo_id: str | None = None, datasets: list[str] | tuple[str, ...] = (),
    license: str | None = None, base_model: str | None = None,
) -> Prepared:
    """The card, hubconf.py and manifest a prepare would write; reads the bundle, writes nothing
    (so `push --dry-run` can list exactly what a push would send)."""
    if not bundle.manifest_path.is_file():
        raise ArtifactError(f"{bundle.root} has no manifest.json; export it first: exportline export SOURCE --out {bundle.root}")
    manifest = bundle.read_manifest()
    stale = stale_stage_outputs(bundle, manifest)
    if stale:
        stage, rel = stale[0]
        raise ArtifactError(
            f"{rel} differs from what the {stage} stage recorded in manifest.json (modified or missing); "
            f"restore it or re-run the stage: exportline export SOURCE --out {bundle.root} --stages {stage} --force"
        )
    manifest = _with_settings(manifest, datasets=datasets, license=license, base_model=base_model)
    texts = {HUBCONF: hubconf_text(manifest)}
    files = _with_texts(bundle.list_files(manifest), texts)
    texts[README] = render_card(load_inputs(bundle.root, manifest={**manifest, "files": files}, repo_id=repo_id))
    return Prepared({**manifest, "files": _with_texts(files, texts)}, texts)


def _with_texts(files: list[dict[str, Any]], texts: dict[str, str]) -> list[dict[str, Any]]:
    """The file list with the generated files as they will be."""
    entries = {f["path"]: f for f in files}
    for rel, text in texts.items():
        data = text.encode()
        # mtime_ns: when it would be written (now); it only tells a later refresh to re-hash it
        entries[rel] = {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                        "mtime_ns": time.time_ns()}
    return sorted(entries.values(), key=lambda f: f["path"])


def _with_settings(manifest: dict, *, datasets, license, base_model) -> dict:
    manifest = dict(manifest)
    if datasets:
        known = list(manifest.get("datasets") or [])
        manifest["datasets"] = known + [d for d in datasets if d not in known]
    settings = dict(manifest.get("card") or {})
    settings.update({k: v for k, v in (("license", license), ("base_model", base_model)) if v})
    if settings:
        manifest["card"] = settings
    return manifest


def _refresh(bundle: Bundle, manifest: dict) -> dict:
    """Write manifest.json only when something in it changes (its "updated" stamp aside)."""
    files = bundle.list_files(manifest)
    on_disk = bundle.read_manifest() if bundle.manifest_path.is_file() else {}
    wanted = {**manifest, "files": files}
    if _same_but_stamp(on_disk, wanted):
        return on_disk
    return bundle.write_manifest(wanted)


def _same_but_stamp(a: dict, b: dict, *, mtimes: bool = True) -> bool:
    """Equal apart from the "updated" stamp (and, with mtimes=False, the files' mtimes, which
    say when a checksum was taken, not what the file holds)."""
    def strip(m: dict) -> dict:
        files = [{k: v for k, v in f.items() if mtimes or k != "mtime_ns"} for f in m.get("files", [])]
        return {**{k: v for k, v in m.items() if k != "updated"}, "files": files}

    return strip(a) == strip(b)

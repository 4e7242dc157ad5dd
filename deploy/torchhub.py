"""hubconf.py in the bundle, so `torch.hub.load(DIR, "model", source="local")` returns the model."""

from __future__ import annotations

from pathlib import Path

from exportline.exporters.core.bundle import write_text_atomic

HUBCONF = "hubconf.py"
TEMPLATE = Path(__file__).with_name("hubconf_template.py")


def write_hubconf(root: Path) -> bool:
    """Copy the template into the bundle root; True when the file changed."""
    text = TEMPLATE.read_text()
    manifest = Path(root) / "manifest.json"
    if manifest.is_file():
        import json

        from exportline.deploy.card_custom import hubconf_text, is_custom

        recorded = json.loads(manifest.read_text())
        if is_custom(recorded):  # its code ships in the folder; one entry per variant
            text = hubconf_text(recorded)
    dest = Path(root) / HUBCONF
    if dest.is_file() and dest.read_text() == text:
        return False  # untouched files keep their mtime, so the manifest keeps its checksum
    write_text_atomic(dest, text)
    return True

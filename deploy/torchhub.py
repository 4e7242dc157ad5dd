"""hubconf.py in the bundle, so `torch.hub.load(DIR, "model", source="local")` returns the model."""

from __future__ import annotations

from pathlib import Path

from exportline.exporters.core.bundle import write_text_atomic

HUBCONF = "hubconf.py"
TEMPLATE = Path(__file__).with_name("hubconf_template.py")


def write_hubconf(root: Path) -> bool:
    """Copy the template into the bundle root; True when the file changed."""
    text = TEMPLATE.read_text()
    dest = Path(root) / HUBCONF
    if dest.is_file() and dest.read_text() == text:
        return False  # untouched files keep their mtime, so the manifest keeps its checksum
    write_text_atomic(dest, text)
    return True

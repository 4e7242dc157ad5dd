"""hubconf.py in the bundle, so `torch.hub.load(DIR, "model", source="local")` returns the model."""

from __future__ import annotations

from pathlib import Path

from exportline.exporters.core.layout import HUBCONF

TEMPLATE = Path(__file__).with_name("hubconf_template.py")


def hubconf_text() -> str:
    """The bundle's hubconf.py (deploy/prepare.py writes it when it differs)."""
    return TEMPLATE.read_text()

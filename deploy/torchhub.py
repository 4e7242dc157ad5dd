"""hubconf.py in the bundle, so `torch.hub.load(DIR, "model", source="local")` returns the model."""

from __future__ import annotations

from pathlib import Path

TEMPLATE = Path(__file__).with_name("hubconf_template.py")


def hubconf_text(manifest: dict | None = None) -> str:
    """The bundle's hubconf.py (deploy/prepare.py writes it when it differs). A custom
    module's bundle gets its own (trust_remote_code, one entry per variant)."""
    from exportline.deploy.card_custom import hubconf_text as custom_hubconf
    from exportline.deploy.card_custom import is_custom

    if manifest is not None and is_custom(manifest):
        return custom_hubconf(manifest)
    return TEMPLATE.read_text()

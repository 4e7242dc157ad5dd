"""Make a bundle ready to publish: card settings, hubconf.py, README.md and a fresh manifest.json.

Files are rewritten only when their content changes and the manifest only when its content
changes, so preparing an unchanged bundle twice gives byte-identical files: a re-push of an
unchanged bundle then finds nothing to commit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exportline.deploy.card import README, load_inputs, render_card
from exportline.deploy.torchhub import write_hubconf
from exportline.exporters.core.bundle import Bundle, sha256_file, write_text_atomic
from exportline.exporters.core.errors import ArtifactError


def stale_stage_outputs(bundle: Bundle, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(stage, path) of stage outputs whose bytes differ from what the stage recorded."""
    known = {f["path"]: f for f in manifest.get("files", [])}
    stale = []
    for stage, record in manifest.get("stages", {}).items():
        for rel in record.get("outputs", []) if record.get("status") == "done" else []:
            old, path = known.get(rel), bundle.root / rel
            if old is None:
                continue
            if not path.is_file():
                stale.append((stage, rel))
                continue
            st = path.stat()
            if st.st_size == old["bytes"] and st.st_mtime_ns == old.get("mtime_ns"):
                continue  # same size and mtime: the recorded checksum still holds
            if st.st_size != old["bytes"] or sha256_file(path) != old["sha256"]:
                stale.append((stage, rel))
    return stale


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
    write_hubconf(bundle.root)
    manifest = _refresh(bundle, manifest)
    text = render_card(load_inputs(bundle.root, manifest=manifest, repo_id=repo_id))
    readme = bundle.root / README
    if not readme.is_file() or readme.read_text() != text:
        write_text_atomic(readme, text)
    return _refresh(bundle, manifest)


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
    files = bundle.list_files(previous=manifest.get("files", []))
    on_disk = bundle.read_manifest() if bundle.manifest_path.is_file() else {}
    wanted = {**manifest, "files": files}
    if {k: v for k, v in on_disk.items() if k != "updated"} == {k: v for k, v in wanted.items() if k != "updated"}:
        return on_disk
    return bundle.write_manifest(wanted)

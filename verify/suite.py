"""`verify_bundle`: run the checks of every exported stage and write reports/verify.*."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from exportline.exporters.core.bundle import Bundle
from exportline.exporters.core.errors import ArtifactError, ConfigError
from exportline.exporters.core.presets import effective_thresholds
from exportline.verify.checks import CHECKS
from exportline.verify.checks.context import CheckContext
from exportline.verify.report import StageReport, VerifyReport

OWN_REPORTS = ("reports/verify.json", "reports/verify.md")
ISOLATE_ENV = "EXPORTLINE_VERIFY_ISOLATE"
ISOLATE_FROM_BYTES = 1 << 30  # of HF weights (the 1b preset has 3.8 GiB)


def verify_bundle(
    root: Path,
    *,
    stages: list[str] | None = None,
    options: dict | None = None,
    progress: Callable[[str], None] = lambda m: None,
    isolate: bool | None = None,
) -> VerifyReport:
    """Check `stages` (default: every stage the manifest records), write reports/verify.*.

    `isolate`: torch work in child processes, so this process never imports torch (None:
    `wants_isolation` decides).

    Holds the bundle lock throughout, so an export cannot change files under the checks;
    afterwards the manifest's entries for reports/ are refreshed (the others are left as
    the stages recorded them: verifying must not bless a changed artifact).
    """
    bundle = Bundle(root)
    if not bundle.manifest_path.is_file():
        raise ArtifactError(f"{root} has no manifest.json; export it first: exportline export SOURCE --out {root}")
    with bundle.lock():
        manifest = bundle.read_manifest()
        records = manifest.get("stages", {})
        unknown = [n for n in stages or [] if n not in CHECKS]
        if unknown:
            raise ConfigError(f"unknown stage {unknown[0]!r}; stages with checks: {', '.join(CHECKS)}")
        files = check_files_table(bundle, manifest, progress)
        thresholds = effective_thresholds(manifest)
        isolate = wants_isolation(manifest) if isolate is None else isolate
        ctx = CheckContext(bundle.root, manifest, thresholds, progress=progress, options=dict(options or {}),
                           isolate=isolate)
        names = stages if stages is not None else list(records)
        reports = []
        for name in [n for n in CHECKS if n in names]:
            record = records.get(name, {})
            if record.get("status") == "skipped":
                reports.append(StageReport(name, "skipped", reason=record.get("reason", "")))
                continue
            if record.get("status") != "done":
                raise ArtifactError(
                    f"{root} has no finished {name} stage to verify; run: exportline export SOURCE --out {root} --stages {name}"
                )
            progress(f"verify: {name}")
            reports.append(CHECKS[name](ctx))
        report = VerifyReport(reports, _environment(isolate), files=files)
        report.write(bundle.root / "reports")
        bundle.write_manifest(bundle.read_manifest(), only_under="reports/")
    return report


def wants_isolation(manifest: dict) -> bool:
    """EXPORTLINE_VERIFY_ISOLATE=1 / 0 forces it; `auto` (the default) isolates when the
    bundle's HF weights are ≥ ISOLATE_FROM_BYTES and this process has not imported torch.

    A child costs a torch import (~2.5 s on a 2-core machine) and saves what torch holds for
    good (~0.36 GiB), which matters only beside an ORT session of gigabytes; a process that
    already imported torch (export with verify) saves nothing by isolating. 1b, hf+onnx:
    isolated 3.89 GiB peak summed over the process tree vs 4.21 GiB in one process (same code)."""
    value = os.environ.get(ISOLATE_ENV, "auto").strip().lower()
    if value not in ("1", "0", "auto"):
        raise ConfigError(f"{ISOLATE_ENV}={value!r}: use 1 (torch in child processes), 0 (in this process) or auto")
    if value != "auto":
        return value == "1"
    weights = sum(int(f.get("bytes", 0)) for f in manifest.get("files", [])
                  if "/" not in f["path"] and f["path"].endswith(".safetensors"))
    return weights >= ISOLATE_FROM_BYTES and "torch" not in sys.modules


def _environment(isolate: bool) -> dict[str, str]:
    from exportline.exporters.core.doctor import environment_report

    if not isolate:
        return environment_report()
    from exportline.verify.runtime.isolated import run_isolated

    return run_isolated("the environment report", environment_report)  # it asks torch for the GPU


def check_files_table(bundle: Bundle, manifest: dict, progress: Callable[[str], None]) -> list[dict]:
    """Every file the manifest lists, hashed (verify vouches for the bundle, so no size+mtime
    shortcut), reported as a table before any check runs; a mismatch stops verify. The
    reports verify is about to rewrite are left out."""
    mine = [f["path"] for f in manifest.get("files", []) if f["path"] not in OWN_REPORTS]
    checks = bundle.check(mine, fast=False, manifest=manifest)
    width = max((len(c.path) for c in checks), default=4)
    progress(f"files: {len(checks)} listed in manifest.json, sha256 checked")
    for c in checks:
        progress(f"  {c.path:<{width}}  {c.bytes:>14,}  {'ok' if c.ok else c.status + ' mismatch: ' + c.detail}")
    bad = [c for c in checks if not c.ok]
    if bad:
        bundle.require_intact([bad[0].path])  # raises the one-line IntegrityError with the rebuild command
    return [{"path": c.path, "bytes": c.bytes, "status": "ok" if c.ok else c.status} for c in checks]


"""`verify_bundle`: run the checks of every exported stage and write reports/verify.*."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from ..exporters.bundle import Bundle
from ..exporters.errors import ArtifactError, ConfigError
from ..exporters.presets import effective_thresholds, is_random_init
from .report import StageReport, VerifyReport

# Stage name → "module:function"; each function is `check(ctx: CheckContext) -> StageReport`.
STAGE_CHECKS: dict[str, str] = {
    "hf": "exportline.verify.hf_check:check",
    "onnx": "exportline.verify.onnx_check:check",
    "fp16": "exportline.verify.quant_check:check_fp16",
    "int8": "exportline.verify.quant_check:check_int8",
    "trt": "exportline.verify.trt_check:check",
}


class CheckContext:
    """What a stage check gets: the bundle, its manifest, the thresholds, a progress callback,
    and check options (e.g. {"long": 64}: the long prefill / past length of the cases)."""

    def __init__(
        self, root: Path, manifest: dict, thresholds: dict, progress: Callable[[str], None],
        options: dict | None = None,
    ):
        self.root = Path(root)
        self.manifest = manifest
        self.thresholds = thresholds
        self.progress = progress
        self.options = dict(options or {})

    @property
    def random_init(self) -> bool:
        """The bundle's weights are a seeded random init (recorded when it was made)."""
        return is_random_init(self.manifest)


def verify_bundle(
    root: Path,
    *,
    stages: list[str] | None = None,
    options: dict | None = None,
    progress: Callable[[str], None] = lambda m: None,
) -> VerifyReport:
    """Check `stages` (default: every stage the manifest records), write reports/verify.*.

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
        unknown = [n for n in stages or [] if n not in STAGE_CHECKS]
        if unknown:
            raise ConfigError(f"unknown stage {unknown[0]!r}; stages with checks: {', '.join(STAGE_CHECKS)}")
        thresholds = effective_thresholds(manifest)
        ctx = CheckContext(bundle.root, manifest, thresholds, progress, options)
        names = stages if stages is not None else list(records)
        reports = []
        for name in [n for n in STAGE_CHECKS if n in names]:
            record = records.get(name, {})
            if record.get("status") == "skipped":
                reports.append(StageReport(name, "skipped", reason=record.get("reason", "")))
                continue
            if record.get("status") != "done":
                raise ArtifactError(
                    f"{root} has no finished {name} stage to verify; run: exportline export SOURCE --out {root} --stages {name}"
                )
            module, func = STAGE_CHECKS[name].split(":")
            progress(f"verify: {name}")
            reports.append(getattr(importlib.import_module(module), func)(ctx))
        from ..exporters.doctor import environment_report

        report = VerifyReport(reports, environment_report())
        report.write(bundle.root / "reports")
        bundle.write_manifest(bundle.read_manifest(), only_under="reports/")
    return report


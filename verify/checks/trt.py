"""Check of the trt stage: each TensorRT engine against the float64 reference.

The cases, the reference and the thresholds are those of the fp16 and int8 checks
(verify/cases.py, configs/thresholds.yaml): the fp16 engine is held to fp16's logits
bounds (relative L2, top-1), the int8 engine to int8's top-1; present.* and greedy tokens
are reported, not judged. Perplexity, int8's other bound, is judged on the Q/DQ graph the
engine is built from (the int8 check); it is not re-measured here.

Without TensorRT or a CUDA GPU, or with engines built for another GPU or TensorRT, the
report says "not available" with the reason: nothing is made up for an engine that cannot
run here (DESIGN.md §5).
"""

from __future__ import annotations

import numpy as np

from exportline.exporters.core.errors import ArtifactError, ConfigError, NotAvailable
from exportline.exporters.tensorrt.engines import (
    ENGINE_SOURCES,
    check_engine_compatible,
    local_target,
    metadata_path,
    read_metadata,
    select_profile,
)
from exportline.verify.cases import Case
from exportline.verify.checks.context import CheckContext
from exportline.verify.checks.onnx import compare_case, float64_expectations, greedy_row, greedy_tokens
from exportline.verify.report import CheckRow, StageReport, judge
from exportline.verify.runtime.backends import make_runner

STAGE = "trt"


def logits_bounds(thresholds: dict, precision: str) -> dict[str, float]:
    t = thresholds[precision]
    return {"rel_l2": float(t["rel_l2"]), "top1": float(t["top1"])} if precision == "fp16" else {"top1": float(t["top1"])}


def check(ctx: CheckContext) -> StageReport:
    try:
        target = local_target()
        engines = _recorded_engines(ctx, target)
    except NotAvailable as exc:
        return StageReport(STAGE, "not available", reason=str(exc))
    except ArtifactError as exc:
        return StageReport(STAGE, "failed", reason=str(exc))
    runners = {p: make_runner(ctx.root, f"trt-{p}") for p in engines}
    expectations = float64_expectations(ctx, STAGE, greedy=True)
    layout, cases, expected, prompt, reference_tokens = (
        expectations.layout, expectations.cases, expectations.outputs, expectations.prompt, expectations.tokens)
    rows: list[CheckRow] = []
    greedy = {"prompt": prompt, "torch float64": reference_tokens}
    for precision, runner in runners.items():
        ctx.progress(f"{STAGE}: {precision} engine over {len(cases)} cases")
        bounds = logits_bounds(ctx.thresholds, precision)
        with runner:
            engine_rows = [r for case, feed, ref in expected for r in _engine_rows(runner, precision, case, feed=feed, ref=ref, bounds=bounds)]
            greedy[runner.name] = greedy_tokens(runner, layout, prompt)
        if not any(r.bounds for r in engine_rows):  # every case was outside the engine's profiles
            engine_rows.append(judge(STAGE, f"{precision} engine", "logits", shape=[], metrics={}, bounds=bounds, note="no case fits its profiles"))
        rows += engine_rows
        rows.append(greedy_row(STAGE, reference_tokens, greedy[runner.name], required=False))
        rows[-1].case = f"{precision} engine, {rows[-1].case}"
    return StageReport.from_rows(
        STAGE, rows, "HF transformers in torch float64 on CPU; logits judged, present.* and greedy tokens reported",
        target=target.describe(), engines=[engines[p] for p in engines], greedy=greedy,
    )


def _recorded_engines(ctx: CheckContext, target) -> dict[str, str]:
    """Precision → engine file the trt stage recorded. An engine for another GPU or TensorRT
    raises NotAvailable (it cannot run here, which says nothing about its accuracy); a
    missing or unreadable one raises ArtifactError."""
    built = ctx.manifest.get("stages", {}).get(STAGE, {}).get("info", {}).get("engines") or {}
    if not built:
        raise ArtifactError(f"no engine recorded in the manifest; build them: exportline export {ctx.root} --stages trt")
    for name in built.values():
        meta = read_metadata(metadata_path(ctx.root / "trt" / name))
        try:
            check_engine_compatible(meta, target, bundle=ctx.root)
        except ArtifactError as exc:
            raise NotAvailable(str(exc)) from None
    return {p: built[p] for p in ENGINE_SOURCES if p in built}


def _engine_rows(runner, precision: str, case: Case, *, feed, ref, bounds: dict) -> list[CheckRow]:
    label = f"{precision} engine, {case.name}"
    try:
        select_profile(runner.meta["profiles"], {k: np.shape(v) for k, v in feed.items()})
    except ConfigError as exc:  # the engine was built with smaller limits than this case
        return [judge(STAGE, label, "logits", shape=np.shape(ref["logits"]), metrics={}, bounds={}, note=f"not run: {exc}")]
    return compare_case(STAGE, case, runner.infer(feed), ref=ref, bounds=bounds, label=label, logits_only=True)

"""Checks of the fp16 and int8 stages (DESIGN.md §6), on ONNX Runtime CPU.

fp16: onnx/model_fp16.onnx against the float64 reference over every case of verify/cases.py;
pass when logits have relative L2 ≤ thresholds.fp16.rel_l2 and top-1 ≥ thresholds.fp16.top1.
present.* are reported with their metrics but not judged (DESIGN.md bounds the logits);
greedy tokens against the float64 reference are reported, not judged.

int8: perplexity on held-out text for the fp32, fp16 and int8 graphs side by side; pass when
int8 perplexity ≤ thresholds.int8.perplexity_ratio × fp32 perplexity and the int8 argmax
agrees with fp32 on ≥ thresholds.int8.top1 of the positions. The held-out text is the part
of the calibration text the int8 stage set aside (exporters/calibration.py), so it is
never the text the ranges were calibrated on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from exportline.exporters.core.errors import ConfigError
from exportline.exporters.precision.calibration import (
    HELDOUT_EVERY,
    calibration_path,
    file_sha256,
    load_tokenizer,
    split_text,
    spread,
)
from exportline.verify.cases import Case
from exportline.verify.checks.context import CheckContext
from exportline.verify.checks.onnx import compare_case, float64_expectations, greedy_row, greedy_tokens
from exportline.verify.report import CheckRow, StageReport, judge
from exportline.verify.runtime.backends import make_runner

HELDOUT_CHUNKS = 16  # held-out sequences scored for perplexity (16 × 128 tokens)
PPL_BATCH = 4
GRAPHS = (("fp32", "onnx", "onnx"), ("fp16", "onnx-fp16", "fp16"), ("int8", "onnx-int8", "int8"))  # label, backend, stage


# -- fp16 ---------------------------------------------------------------------------------------
def check_fp16(ctx: CheckContext) -> StageReport:
    t = ctx.thresholds["fp16"]
    logits_bounds = {"rel_l2": float(t["rel_l2"]), "top1": float(t["top1"])}
    candidate = make_runner(ctx.root, "onnx-fp16")
    expectations = float64_expectations(ctx, "fp16", greedy=True)
    layout, cases, expected, prompt, reference_tokens = (
        expectations.layout, expectations.cases, expectations.outputs, expectations.prompt, expectations.tokens)
    ctx.progress(f"fp16: onnx-fp16 over {len(cases)} cases")
    rows: list[CheckRow] = []
    with candidate:
        for case, feed, ref in expected:
            rows += _fp16_rows(case, candidate.infer(feed), ref, logits_bounds=logits_bounds)
        tokens = greedy_tokens(candidate, layout, prompt)
    rows.append(greedy_row("fp16", reference_tokens, tokens, required=False))
    return StageReport.from_rows(
        "fp16", rows, "HF transformers in torch float64 on CPU; logits judged, present.* and greedy tokens reported",
        greedy={"prompt": prompt, "torch float64": reference_tokens, "onnx-fp16": tokens},
        cases=[c.name for c in cases],
    )


def _fp16_rows(case: Case, out: dict[str, np.ndarray], ref: dict[str, np.ndarray], *, logits_bounds: dict) -> list[CheckRow]:
    return compare_case("fp16", case, out, ref=ref, bounds=logits_bounds, logits_only=True)


# -- int8 ---------------------------------------------------------------------------------------
def check_int8(ctx: CheckContext) -> StageReport:
    t = ctx.thresholds["int8"]
    try:
        heldout, text, layout = _heldout(ctx)
    except ConfigError as exc:
        return StageReport("int8", "failed", reason=str(exc))
    scored: dict[str, dict[str, Any]] = {}
    for label, backend, stage in GRAPHS:
        if ctx.manifest.get("stages", {}).get(stage, {}).get("status") != "done":
            continue
        ctx.progress(f"int8: perplexity of the {label} graph on {len(heldout)} held-out sequences")
        with make_runner(ctx.root, backend) as runner:
            scored[label] = score(runner, heldout, layout)
    if "fp32" not in scored:
        return StageReport("int8", "failed", reason="int8 is judged against the fp32 graph; run the onnx stage: --stages onnx")
    rows = _int8_rows(scored, bounds_ratio=float(t["perplexity_ratio"]), bound_top1=float(t["top1"]),
                      shape=[len(heldout), len(heldout[0])])
    extra = {
        "perplexity": {label: round(s["perplexity"], 4) for label, s in scored.items()},
        "heldout": f"{len(heldout)} × {len(heldout[0])} tokens of {text.name}, every {HELDOUT_EVERY}th chunk (never calibrated on)",
    }
    if ctx.manifest.get("source", {}).get("random_init"):  # DESIGN.md §8
        extra["note"] = ("random-init weights: perplexity is about the vocabulary size, so these bounds say little "
                         "about int8 on a trained model (tests/test_int8.py measures one)")
    return StageReport.from_rows("int8", rows, "onnx/model.onnx (fp32) on ONNX Runtime CPU, held-out text", **extra)


def _heldout(ctx: CheckContext):
    """The held-out chunks of the int8 stage's own calibration text (same file, same split)."""
    from exportline.exporters.core.shapes import KVLayout
    from exportline.exporters.sources.hf_writer import load_config

    options = ctx.manifest.get("stages", {}).get("int8", {}).get("options", {})
    text = calibration_path(options.get("calibration_data"))
    if options.get("calibration_sha256") and file_sha256(text) != options["calibration_sha256"]:
        raise ConfigError(
            f"{text} changed since the int8 stage calibrated on it, so its held-out part is unknown; "
            "restore it or re-run: exportline export SOURCE --stages int8 --force"
        )
    config = load_config(ctx.root)
    split = split_text(text, load_tokenizer(ctx.root), max_positions=config.max_position_embeddings)
    return spread(split.heldout, HELDOUT_CHUNKS), text, KVLayout.from_config(config)


def score(runner, chunks: list[list[int]], layout) -> dict[str, Any]:
    """Perplexity of next-token prediction over `chunks` (prefill, empty past), computed in
    float64, and the argmax at every position (kept for agreement, not the logits)."""
    nll, count, argmax = 0.0, 0, []
    for start in range(0, len(chunks), PPL_BATCH):
        ids = np.asarray(chunks[start : start + PPL_BATCH], dtype=np.int64)
        batch, length = ids.shape
        case = Case("heldout", ids, np.ones((batch, length), np.int64), np.tile(np.arange(length, dtype=np.int64), (batch, 1)))
        logits = runner.infer(case.feed(layout))["logits"].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logprobs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        picked = np.take_along_axis(logprobs[:, :-1], ids[:, 1:, None], axis=-1)
        nll -= float(picked.sum())
        count += picked.size
        argmax.append(logits.argmax(-1))
    return {"perplexity": float(np.exp(nll / count)), "tokens": count, "argmax": np.concatenate(argmax)}


def _int8_rows(scored: dict, *, bounds_ratio: float, bound_top1: float, shape: list[int]) -> list[CheckRow]:
    base = scored["fp32"]["perplexity"]
    rows = []
    for label, s in scored.items():
        metrics = {"perplexity": s["perplexity"], "perplexity_ratio": s["perplexity"] / base}
        bounds = {"perplexity_ratio": bounds_ratio} if label == "int8" else {}
        rows.append(judge("int8", f"held-out text, {label} graph", "perplexity", shape=shape, metrics=metrics, bounds=bounds))
    for label in ("fp16", "int8"):
        if label in scored:
            agree = float((scored[label]["argmax"] == scored["fp32"]["argmax"]).mean())
            bounds = {"top1": bound_top1} if label == "int8" else {}
            rows.append(judge("int8", f"held-out text, {label} vs fp32", "logits argmax", shape=shape, metrics={"top1": agree}, bounds=bounds))
    if "int8" not in scored:
        rows.append(judge("int8", "held-out text", "perplexity", shape=shape, metrics={}, bounds={"perplexity_ratio": bounds_ratio},
                          note="no int8 graph to score"))
    return rows

"""Checks of the fp16 and int8 stages (DESIGN.md §6), on ONNX Runtime CPU.

fp16: onnx/model_fp16.onnx against the float64 reference over every case of verify/cases.py;
pass when logits have relative L2 ≤ thresholds.fp16.rel_l2 in every case and top-1 ≥
thresholds.fp16.top1 over the positions of all cases together.
present.* are reported with their metrics but not judged (DESIGN.md bounds the logits);
greedy tokens against the float64 reference are reported, not judged.

int8: perplexity on held-out text for the fp32, fp16 and int8 graphs side by side; pass when
int8 perplexity ≤ thresholds.int8.perplexity_ratio × fp32 perplexity and the int8 argmax
agrees with fp32 on ≥ thresholds.int8.top1 of the positions. On random-init weights
(recorded in the manifest when the bundle was made) those two are reported, not gated: the
gate is the int8 logits against the fp32 graph's (thresholds.int8_random_init: rel_l2,
cosine, top-1 over the positions fp32 has decided, see metrics.LogitAgreement). The
held-out text is the part of the calibration text the int8 stage set aside
(exporters/calibration.py), so it is never the text the ranges were calibrated on.
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
from exportline.verify.cases import Case, output_mask
from exportline.verify.checks.context import CheckContext, torch_side
from exportline.verify.checks.onnx import compare_case, float64_expectations, greedy_row, greedy_tokens
from exportline.verify.metrics import LogitAgreement
from exportline.verify.report import CheckRow, StageReport, judge
from exportline.verify.runtime.backends import make_runner

HELDOUT_CHUNKS = 16  # held-out sequences scored for perplexity (16 × 128 tokens)
PPL_BATCH = 4
NOT_GATED = "not gated: random-init weights"
RANDOM_INIT_RULE = (
    "random-init weights: perplexity is about the vocabulary size and most top-1 choices are near ties, so both "
    "are reported, not gated; the gate is int8 vs fp32 logits (rel_l2, cosine, top-1 over positions whose fp32 "
    "margin exceeds the quantization noise); tests/test_int8.py judges perplexity on a trained model"
)
FP16_RULE = (
    "logits: rel_l2 against float64 on every case; top-1 pooled over every case's positions (one case of "
    "64 positions cannot show 99 %: a single flip at a near tie is 98.4 %)"
)
FP16_RANDOM_INIT_RULE = (
    "random-init weights: logits rel_l2 on every case, and top-1 over the positions whose float64 margin exceeds "
    "the fp16 noise (plain top-1 on near-flat logits mostly counts ties: reported, not gated)"
)
TRAINED_RULE = "trained weights: int8 perplexity within the ratio of fp32 and top-1 agreement with fp32 on held-out text"
_FP16_MARGIN_Z = 3.0  # trained weights: decided top-1 is reported beside the gated plain top-1
GRAPHS = (("fp32", "onnx", "onnx"), ("fp16", "onnx-fp16", "fp16"), ("int8", "onnx-int8", "int8"))  # label, backend, stage


# -- fp16 ---------------------------------------------------------------------------------------
def check_fp16(ctx: CheckContext) -> StageReport:
    t = ctx.thresholds["fp16"]
    # Random-init logits are near-flat: plain top-1 mostly counts near ties, so it is reported and
    # the gate is top-1 over the positions float64 has decided (thresholds.fp16_random_init).
    r = ctx.thresholds["fp16_random_init"] if ctx.random_init else None
    logits_bounds = {"rel_l2": float((r or t)["rel_l2"])}
    agreement = LogitAgreement()
    candidate = make_runner(ctx.root, "onnx-fp16")
    expectations = float64_expectations(ctx, "fp16", greedy=True)
    layout, cases, expected, prompt, reference_tokens = (
        expectations.layout, expectations.cases, expectations.outputs, expectations.prompt, expectations.tokens)
    ctx.progress(f"fp16: onnx-fp16 over {len(cases)} cases")
    rows: list[CheckRow] = []
    with candidate:
        for case, feed, ref in expected:
            out = candidate.infer(feed)
            rows += _fp16_rows(case, out, ref, logits_bounds=logits_bounds)
            if np.shape(out.get("logits")) == np.shape(ref["logits"]):
                keep = output_mask(case, "logits").astype(bool)
                agreement.add(out["logits"][keep], ref["logits"][keep])
        tokens = greedy_tokens(candidate, layout, prompt)
    rows.append(greedy_row("fp16", reference_tokens, tokens, required=False))
    if r:
        rows.append(agreement_row("fp16", "every case, positions float64 has decided", agreement, bounds=r,
                                  gated=("decided_top1", "decided_positions")))
    else:
        rows.append(agreement_row("fp16", "every case, pooled", agreement, gated=("top1",),
                                  bounds={"rel_l2": t["rel_l2"], "top1": t["top1"], "margin_z": _FP16_MARGIN_Z}))
    return StageReport.from_rows(
        "fp16", rows, "HF transformers in torch float64 on CPU; logits judged, present.* and greedy tokens reported",
        greedy={"prompt": prompt, "torch float64": reference_tokens, "onnx-fp16": tokens},
        cases=[c.name for c in cases], rule=FP16_RANDOM_INIT_RULE if r else FP16_RULE,
    )


def agreement_row(stage: str, case: str, agreement: LogitAgreement, *, bounds: dict, gated: tuple[str, ...],
                  note: str = "") -> CheckRow:
    """One row from accumulated logits; `bounds` holds rel_l2 (which also sets the noise a
    decided position must beat), margin_z and the bounds named in `gated`."""
    metrics = agreement.metrics(rel_l2_bound=float(bounds["rel_l2"]), z=float(bounds["margin_z"]))
    return judge(stage, case, "logits", shape=agreement.shape, metrics=metrics,
                 bounds={k: float(bounds[k]) for k in gated}, note=note)


def _fp16_rows(case: Case, out: dict[str, np.ndarray], ref: dict[str, np.ndarray], *, logits_bounds: dict) -> list[CheckRow]:
    return compare_case("fp16", case, out, ref=ref, bounds=logits_bounds, logits_only=True)


# -- int8 ---------------------------------------------------------------------------------------
def check_int8(ctx: CheckContext) -> StageReport:
    try:
        heldout, text, layout = torch_side(ctx, "the int8 held-out text", _heldout)  # transformers' tokenizer imports torch
    except ConfigError as exc:
        return StageReport("int8", "failed", reason=str(exc))
    scored: dict[str, dict[str, Any]] = {}
    agreement = LogitAgreement()
    for label, backend, stage in GRAPHS:
        if ctx.manifest.get("stages", {}).get(stage, {}).get("status") != "done":
            continue
        ctx.progress(f"int8: perplexity of the {label} graph on {len(heldout)} held-out sequences")
        against = (scored["fp32"]["logits"], agreement) if label == "int8" and "fp32" in scored else None
        with make_runner(ctx.root, backend) as runner:
            scored[label] = score(runner, heldout, layout, keep_logits=label == "fp32", against=against)
    if "fp32" not in scored:
        return StageReport("int8", "failed", reason="int8 is judged against the fp32 graph; run the onnx stage: --stages onnx")
    del scored["fp32"]["logits"]
    shape = [len(heldout), len(heldout[0])]
    rows = _int8_rows(scored, ctx.thresholds, random_init=ctx.random_init, shape=shape)
    if "int8" in scored:
        rows.append(_logits_row(agreement, ctx.thresholds, random_init=ctx.random_init))
    extra = {
        "perplexity": {label: round(s["perplexity"], 4) for label, s in scored.items()},
        "heldout": f"{len(heldout)} × {len(heldout[0])} tokens of {text.name}, every {HELDOUT_EVERY}th chunk (never calibrated on)",
        "perplexity_summary": _perplexity_summary(scored, ctx),
        "rule": RANDOM_INIT_RULE if ctx.random_init else TRAINED_RULE,
    }
    return StageReport.from_rows("int8", rows, "onnx/model.onnx (fp32) on ONNX Runtime CPU, held-out text", **extra)


def _perplexity_summary(scored: dict, ctx: CheckContext) -> str:
    """One line for verify.md and the model card, saying whether perplexity was a gate."""
    values = ", ".join(f"{label} {s['perplexity']:.4g}" for label, s in scored.items())
    if ctx.random_init:
        return f"{values} (reported, {NOT_GATED})"
    return f"{values} (gate: int8/fp32 ≤ {float(ctx.thresholds['int8']['perplexity_ratio']):g})"


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


def score(runner, chunks: list[list[int]], layout, *, keep_logits: bool = False, against=None) -> dict[str, Any]:
    """Perplexity of next-token prediction over `chunks` (prefill, empty past), computed in
    float64, and the argmax at every position. `keep_logits` keeps the float32 logits (the
    fp32 graph's, the reference of the int8 logits check); `against` = (reference logits,
    LogitAgreement) accumulates this graph's logits against them batch by batch."""
    nll, count, argmax, kept = 0.0, 0, [], []
    for start in range(0, len(chunks), PPL_BATCH):
        ids = np.asarray(chunks[start : start + PPL_BATCH], dtype=np.int64)
        batch, length = ids.shape
        case = Case("heldout", ids, np.ones((batch, length), np.int64), np.tile(np.arange(length, dtype=np.int64), (batch, 1)))
        raw = runner.infer(case.feed(layout))["logits"]
        if keep_logits:
            kept.append(np.asarray(raw, dtype=np.float32))
        if against is not None:
            against[1].add(raw, against[0][start : start + batch])
        logits = raw.astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logprobs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        picked = np.take_along_axis(logprobs[:, :-1], ids[:, 1:, None], axis=-1)
        nll -= float(picked.sum())
        count += picked.size
        argmax.append(logits.argmax(-1))
    out = {"perplexity": float(np.exp(nll / count)), "tokens": count, "argmax": np.concatenate(argmax)}
    if keep_logits:
        out["logits"] = np.concatenate(kept)
    return out


def _int8_rows(scored: dict, thresholds: dict, *, random_init: bool, shape: list[int]) -> list[CheckRow]:
    """Perplexity and held-out argmax agreement: the pass rule for trained weights; on
    random-init weights reported, not gated (their perplexity is about the vocabulary size)."""
    t = thresholds["int8"]
    gate = not random_init
    note = NOT_GATED if random_init else ""
    base = scored["fp32"]["perplexity"]
    rows = []
    for label, s in scored.items():
        metrics = {"perplexity": s["perplexity"], "perplexity_ratio": s["perplexity"] / base}
        bounds = {"perplexity_ratio": float(t["perplexity_ratio"])} if label == "int8" and gate else {}
        rows.append(judge("int8", f"held-out text, {label} graph", "perplexity", shape=shape, metrics=metrics, bounds=bounds,
                          note=note if label == "int8" else ""))
    for label in ("fp16", "int8"):
        if label in scored:
            agree = float((scored[label]["argmax"] == scored["fp32"]["argmax"]).mean())
            bounds = {"top1": float(t["top1"])} if label == "int8" and gate else {}
            rows.append(judge("int8", f"held-out text, {label} vs fp32", "logits argmax", shape=shape, metrics={"top1": agree},
                              bounds=bounds, note=note if label == "int8" else ""))
    if "int8" not in scored:
        rows.append(judge("int8", "held-out text", "perplexity", shape=shape, metrics={},
                          bounds={"perplexity_ratio": float(t["perplexity_ratio"])},
                          note="no int8 graph to score"))
    return rows


def _logits_row(agreement: LogitAgreement, thresholds: dict, *, random_init: bool) -> CheckRow:
    """int8 logits against the fp32 graph's: the gate on random-init weights (bounds in
    configs/thresholds.yaml `int8_random_init`, measured on every preset), reported otherwise."""
    gated = ("rel_l2", "cosine", "decided_top1", "decided_positions") if random_init else ()
    note = "" if random_init else "trained weights are judged on perplexity"
    return agreement_row("int8", "held-out text, int8 vs fp32", agreement, bounds=thresholds["int8_random_init"],
                         gated=gated, note=note)

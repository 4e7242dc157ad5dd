"""Check of the onnx stage: onnx/model.onnx in ONNX Runtime against the float64 reference.

Every output (logits and every present.*) over every case of verify/cases.py, judged by
the fp32 thresholds; plus greedy decoding that must be token-identical to HF torch fp32.

The float64 reference and torch fp32 run streamed (verify/runtime/streamed.py: each
module's weights are read from the bundle's safetensors as it runs), so neither holds a
whole model (1b: 1.7 GiB peak RSS in these phases, measured). They run first and
are freed before the ORT session opens, so the session is the largest thing held; with
`ctx.isolate` they run in child processes that have exited by then, and the reference data
waits on disk while the session runs (verify/spill.py).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np

from exportline.exporters.core.shapes import KVLayout
from exportline.verify.cases import Case, Materialized, build_cases, output_mask, positions_first
from exportline.verify.checks.context import CheckContext
from exportline.verify.generate import Sampling, generate
from exportline.verify.report import CheckRow, StageReport, judge, tensor_row
from exportline.verify.runtime.backends import make_runner
from exportline.verify.runtime.base import Runner
from exportline.verify.spill import Spill

STAGE = "onnx"
GREEDY_TOKENS = 32


def describe_reference(rebound: list[str]) -> str:
    exact = f" with {' and '.join(rebound)} rebound to float64 (transformers computes them in float32)" if rebound else ""
    return f"the bundle's HF model in torch float64 on CPU{exact}; greedy tokens: HF model in torch float32"


@dataclass
class Expected:
    """The float64 reference's outputs for every case (and, if asked, its greedy tokens)."""

    layout: KVLayout
    cases: list[Case]
    outputs: list[tuple[Case, dict, dict]]  # (case, feed, reference outputs)
    prompt: list[int]
    tokens: list[int] | None
    described: str


def float64_expectations(ctx: CheckContext, stage: str, *, greedy: bool) -> Expected:
    """Run the float64 reference (streamed: one module's weights at a time) once over every
    case, before the candidate loads."""
    ctx.progress(f"{stage}: float64 reference")
    with make_runner(ctx.root, "torch", dtype="float64", streamed=True, isolated=ctx.isolate) as reference:
        layout = reference.layout
        cases = build_cases(layout, long=ctx.options.get("long", 64))
        runs = Materialized(reference, layout)
        outputs = [(case, *runs.run(case)) for case in cases]
        prompt = greedy_prompt(layout.vocab_size)
        tokens = greedy_tokens(reference, layout, prompt) if greedy else None
        described = describe_reference(reference.float64_rebound)
    del runs, reference
    gc.collect()
    return Expected(layout, cases, outputs, prompt, tokens, described)


def fp32_bounds(thresholds: dict) -> dict[str, float]:
    t = thresholds["fp32"]
    return {"rel_l2": float(t["rel_l2"]), "max_abs_over_max_ref": float(t["max_abs_over_max_ref"])}


def check(ctx: CheckContext) -> StageReport:
    return check_graph(ctx, backend="onnx", stage=STAGE, bounds=fp32_bounds(ctx.thresholds),
                       greedy_required=bool(ctx.thresholds["fp32"].get("greedy_identical", True)))


def check_graph(ctx: CheckContext, *, backend: str, stage: str, bounds: dict, greedy_required: bool) -> StageReport:
    """Reference outputs first (then freed), torch fp32 greedy tokens, then the graph."""
    candidate = make_runner(ctx.root, backend)  # fails fast on a missing / truncated file
    expectations = float64_expectations(ctx, stage, greedy=False)
    layout, cases, expected, prompt = (
        expectations.layout, expectations.cases, expectations.outputs, expectations.prompt)
    ctx.progress(f"{stage}: torch float32 greedy ({GREEDY_TOKENS} tokens)")
    with make_runner(ctx.root, "torch", dtype="float32", streamed=True, isolated=ctx.isolate) as torch32:
        torch_tokens = greedy_tokens(torch32, layout, prompt)
    del torch32
    gc.collect()

    # The graph's session is the largest thing verify holds (1b: ~3.85 GiB): the reference's
    # feeds and outputs wait on disk, the graph's outputs go there, and the comparisons (with
    # their float64 temporaries) run once the session is closed. Same numbers, in another order.
    with Spill() as spill:
        parked = [(case, spill.put(feed), spill.put(ref)) for case, feed, ref in expected]
        del expected
        expectations.outputs = []
        ctx.progress(f"{stage}: {backend} over {len(cases)} cases")
        with candidate:
            got = [spill.put(candidate.infer(spill.get(feed))) for _, feed, _ in parked]
            graph_tokens = greedy_tokens(candidate, layout, prompt)
        rows: list[CheckRow] = []
        for (case, _, ref), out in zip(parked, got):
            rows += compare_case(stage, case, spill.get(out), ref=spill.get(ref), bounds=bounds)
    rows.append(greedy_row(stage, torch_tokens, graph_tokens, required=greedy_required))
    return StageReport.from_rows(
        stage, rows, expectations.described,
        greedy={"prompt": prompt, "torch float32": torch_tokens, backend: graph_tokens},
        cases=[c.name for c in cases],
    )


def compare_case(
    stage: str, case: Case, out: dict[str, np.ndarray], *, ref: dict[str, np.ndarray], bounds: dict,
    label: str | None = None, logits_only: bool = False,
) -> list[CheckRow]:
    """One row per reference output; an output the graph lacks or shapes wrongly fails its row.
    `logits_only`: `bounds` judge the logits; the other outputs (the KV cache) are reported."""
    rows = []
    for name, expected in ref.items():
        judged = bounds if name == "logits" or not logits_only else {}
        if name not in out or np.shape(out[name]) != np.shape(expected):
            got = "missing" if name not in out else f"shape {list(np.shape(out[name]))}"
            rows.append(judge(stage, label or case.name, name, shape=np.shape(expected), metrics={},
                              bounds=judged or {"rel_l2": 0.0}, note=f"output {got}"))
            continue
        rows.append(tensor_row(
            stage, label or case.name, name,
            out=positions_first(name, out[name]), ref=positions_first(name, expected),
            bounds=judged, mask=output_mask(case, name), top1=name == "logits", shape=np.shape(expected),
        ))
    return rows


def greedy_prompt(vocab_size: int, length: int = 8, seed: int = 1) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab_size, size=length)]


def greedy_tokens(runner: Runner, layout, prompt: list[int], *, n: int = GREEDY_TOKENS) -> list[int]:
    """`n` argmax tokens (fewer if the model's positions end first: the last new token is
    never fed); EOS does not stop it, so both sides always produce as many to compare."""
    n = max(1, layout.fit(n, used=len(prompt) - 1))
    return generate(runner, [prompt], layout=layout, max_new_tokens=n, sampling=Sampling(greedy=True)).tokens[0]


def greedy_row(stage: str, reference: list[int], tokens: list[int], *, required: bool) -> CheckRow:
    same = sum(a == b for a, b in zip(reference, tokens)) / max(len(reference), 1)
    first = next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), None)
    note = "" if first is None else f"first difference at new token {first}"
    return judge(
        stage, f"batch1 greedy {len(reference)} tokens", "greedy tokens", shape=[1, len(reference)],
        metrics={"identical_fraction": same}, bounds={"identical_fraction": 1.0} if required else {}, note=note,
    )

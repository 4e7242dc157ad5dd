"""Checks of a custom module's bundle (source kind `custom`, DESIGN.md §6 semantics).

Inputs: the declared I/O's cases (shapes.DeclaredIO.case_sizes: every dynamic dim at its
min, max and a middle size other than the traced one), sampled with seeds other than the
trace's. Reference: the module in float64 on CPU.
- hf: the user's own module file (from --model-class, if still on this machine and
  unchanged) with the checkpoint's weights, float64, against the bundle's remote-code
  model in float64 (float64 bounds) and float32 (fp32 bounds); causal-lm: generate()
  greedy tokens against an argmax loop of the reference.
- onnx / fp16 / int8: the graph on ONNX Runtime CPU against the bundle's module in float64;
  fp32 bounds on every output; fp16 bounds (rel_l2, top-1 on logits) on every float output;
  int8: against the fp32 graph, rel_l2 ≤ int8.rel_l2 per non-logits output, logits top-1 ≥ int8.top1 pooled.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

import numpy as np

from exportline.exporters.core.bundle import sha256_file
from exportline.exporters.core.errors import NotAvailable
from exportline.exporters.sources.custom.model import bundle_io, load_bundle_module, run_module
from exportline.verify.checks.context import CheckContext, torch_side
from exportline.verify.report import CheckRow, StageReport, judge, tensor_row
from exportline.verify.runtime.backends import make_runner

GREEDY_STEPS = 8


def is_custom(ctx: CheckContext) -> bool:
    return ctx.manifest.get("source", {}).get("kind") == "custom"


def either(builtin: Callable[[CheckContext], StageReport], custom: Callable[[CheckContext], StageReport]):
    """The stage's check: the built-in LM check, or the custom-module one for such bundles."""
    def check(ctx: CheckContext) -> StageReport:
        return (custom if is_custom(ctx) else builtin)(ctx)

    check.__doc__ = builtin.__doc__
    return check


def cases(ctx: CheckContext):
    """(name, feed) for every declared case; seeds 1.. (the trace used seed 0)."""
    io, _ = bundle_io(ctx.root)
    out = []
    for i, sizes in enumerate(io.case_sizes(), 1):
        name = " ".join(f"{k}={v}" for k, v in sizes.items())
        out.append((name, io.sample(sizes, seed=i)))
    return io, out


def reference_outputs(ctx: CheckContext, stage: str):
    io, feeds = cases(ctx)
    ctx.progress(f"{stage}: the module in float64 over {len(feeds)} cases")
    module = load_bundle_module(ctx.root, "float64")
    expected = [(name, feed, run_module(module, io, feed)) for name, feed in feeds]
    del module
    gc.collect()
    return io, expected


def _bounds(ctx: CheckContext, key: str, names: tuple[str, ...]) -> dict[str, float]:
    return {m: float(ctx.thresholds[key][m]) for m in names if m in ctx.thresholds[key]}


def _rows(stage, case, *, out, ref, bounds_of) -> list[CheckRow]:
    rows = []
    for name, want in ref.items():
        bounds, top1 = bounds_of(name)
        got = out.get(name)
        if got is None or np.shape(got) != np.shape(want):
            note = "output missing" if got is None else f"output shape {list(np.shape(got))}"
            rows.append(judge(stage, case, name, shape=np.shape(want), metrics={}, bounds=bounds or {"rel_l2": 0.0}, note=note))
        else:
            rows.append(tensor_row(stage, case, name, out=np.asarray(got, np.float64), ref=want, bounds=bounds, top1=top1))
    return rows


def check_graph(ctx: CheckContext, *, stage: str, backend: str, bounds_of) -> StageReport:
    candidate = make_runner(ctx.root, backend)
    io, expected = torch_side(ctx, f"the {stage} reference", reference_outputs, stage)
    rows: list[CheckRow] = []
    with candidate:
        for name, feed, ref in expected:
            rows += _rows(stage, name, out=candidate.infer(feed), ref=ref, bounds_of=bounds_of)
    return StageReport.from_rows(stage, rows, "the module (the bundle's remote code) in torch float64 on CPU",
                                 cases=[name for name, _, _ in expected], traced=io.trace_sizes())


def check_onnx(ctx: CheckContext) -> StageReport:
    bounds = _bounds(ctx, "fp32", ("rel_l2", "max_abs_over_max_ref"))
    return check_graph(ctx, stage="onnx", backend="onnx", bounds_of=lambda name: (bounds, name == "logits"))


def check_fp16(ctx: CheckContext) -> StageReport:
    bounds = _bounds(ctx, "fp16", ("rel_l2",))
    top1 = float(ctx.thresholds["fp16"]["top1"])
    return check_graph(ctx, stage="fp16", backend="onnx-fp16",
                       bounds_of=lambda name: ({**bounds, "top1": top1} if name == "logits" else bounds, name == "logits"))


def check_int8(ctx: CheckContext) -> StageReport:
    """int8 against the fp32 graph on the same declared cases: rel_l2 ≤ int8.rel_l2 on every
    output but logits, per case; logits: top-1 ≥ int8.top1 pooled over every position of
    every case (a 16-position case moves 6 % per flipped token: too coarse to judge alone)."""
    t = ctx.thresholds["int8"]
    io, feeds = cases(ctx)
    with make_runner(ctx.root, "onnx") as fp32:
        wants = [(name, feed, {k: np.asarray(v, np.float64) for k, v in fp32.infer(feed).items()}) for name, feed in feeds]
    rows: list[CheckRow] = []
    agree, positions = 0, 0
    with make_runner(ctx.root, "onnx-int8") as int8:
        for name, feed, want in wants:
            got = int8.infer(feed)
            # logits: judged by top-1 (DESIGN.md §6), rel_l2 reported; a routed module (MoE
            # top-k) may flip a token's experts under int8 noise, a jump rel_l2 would punish
            rows += _rows("int8", f"{name}, int8 vs fp32 graph", out=got, ref=want,
                          bounds_of=lambda out: ({} if out == "logits" else {"rel_l2": float(t["rel_l2"])}, out == "logits"))
            if "logits" in want and "logits" in got and np.shape(got["logits"]) == np.shape(want["logits"]):
                agree += int((got["logits"].argmax(-1) == want["logits"].argmax(-1)).sum())
                positions += int(want["logits"][..., 0].size)
    if positions:
        rows.append(judge("int8", "all cases pooled, int8 vs fp32 graph", "logits argmax", shape=(positions,),
                          metrics={"top1": agree / positions}, bounds={"top1": float(t["top1"])}))
    return StageReport.from_rows("int8", rows, "onnx/model.onnx (fp32) on ONNX Runtime CPU, declared cases",
                                 cases=[name for name, _ in feeds])


def check_hf(ctx: CheckContext) -> StageReport:
    source = ctx.manifest.get("source", {})
    try:
        original = _original_module(source, ctx.root)
    except NotAvailable as exc:
        return StageReport("hf", "not available", reason=str(exc))
    io, feeds = cases(ctx)
    wants = [(name, feed, run_module(original, io, feed)) for name, feed in feeds]
    rows: list[CheckRow] = []
    for dtype, key in (("float64", "float64"), ("float32", "fp32")):
        ctx.progress(f"verify hf: remote-code model in {dtype} vs the module file in float64")
        bundle = load_bundle_module(ctx.root, dtype)
        bounds = _bounds(ctx, key, ("rel_l2", "max_abs_over_max_ref"))
        for name, feed, want in wants:
            rows += _rows("hf", f"{name}, AutoModel {dtype}", out=run_module(bundle, io, feed), ref=want,
                          bounds_of=lambda out, bounds=bounds: (bounds, out == "logits"))
    if source.get("task") == "causal-lm":
        rows.append(_generate_row(ctx.root, original, io))
    adapter = source.get("adapter") or {}
    if adapter and not adapter.get("merged"):
        rows += _adapter_rows(ctx, original, wants=[(name, feed) for name, feed, _ in wants], io=io)
    return StageReport.from_rows("hf", rows, f"{source.get('model_class')} (the user's file) with the checkpoint's "
                                 "weights, torch float64 on CPU", cases=[name for name, _ in feeds])


def _original_module(source: dict, root: Path):
    """The user's module from its file, with the checkpoint's tensors, in float64."""
    from exportline.exporters.sources.custom.source import CustomSource

    path, file = Path(source.get("path", "")), Path(str(source.get("model_class", "")).rpartition(":")[0])
    for p, what in ((path, "checkpoint"), (file, "module file")):
        if not p.is_file():
            raise NotAvailable(f"the {what} {p} is not on this machine; verify where the export ran")
    if sha256_file(path) != source.get("sha256"):
        raise NotAvailable(f"the checkpoint {path} changed since the export; re-export it to verify")
    adapter = source.get("adapter") or {}
    if adapter and not Path(adapter["path"]).exists():
        raise NotAvailable(f"the adapter {adapter['path']} is not on this machine; verify where the export ran")
    src = CustomSource(path, model_class=source["model_class"], model_args=source.get("model_args"),
                       inputs=source.get("io"), task=source.get("task", "forward"),
                       adapter=Path(adapter["path"]) if adapter else None, lora_alpha=adapter.get("alpha"),
                       lora_rank=adapter.get("rank"), merge_adapter=bool(adapter.get("merged")))
    if adapter and src.adapter.sha256() != adapter.get("sha256"):
        raise NotAvailable(f"the adapter {adapter['path']} changed since the export; re-export it to verify")
    if src.module_file.sha256() != source.get("module_sha256"):
        raise NotAvailable(f"{file} changed since the export; re-export it to verify")
    return src.model.double()


def _adapter_rows(ctx: CheckContext, original, *, wants, io) -> list[CheckRow]:
    """peft.PeftModel.from_pretrained(the bundle's model, BUNDLE/adapter) against the user's
    module with the adapter merged in float64 (W + scale·B@A)."""
    import copy

    from peft import PeftModel
    from transformers import AutoModel

    from exportline.exporters.sources.custom.adapter import ADAPTER_DIR, merge_into, quiet_peft, read_adapter
    from exportline.exporters.sources.hf_writer import quiet_transformers

    adapter = ctx.manifest["source"]["adapter"]
    merged = copy.deepcopy(original)
    merge_into(merged, read_adapter(Path(adapter["path"]), alpha=adapter["alpha"], rank=adapter["rank"]))
    ctx.progress("verify hf: PeftModel (adapter/) vs the module with the adapter merged in float64")
    with quiet_transformers(), quiet_peft():
        peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(ctx.root), trust_remote_code=True),
                                               str(ctx.root / ADAPTER_DIR)).eval()
    inner = peft_model.base_model.model.model  # the user's module with LoRA layers injected
    bounds = _bounds(ctx, "fp32", ("rel_l2", "max_abs_over_max_ref"))
    rows = []
    for name, feed in wants:
        rows += _rows("hf", f"{name}, PeftModel float32 vs merged", out=run_module(inner, io, feed),
                      ref=run_module(merged, io, feed), bounds_of=lambda out: (bounds, out == "logits"))
    return rows


def _generate_row(root: Path, original, io) -> CheckRow:
    """transformers' generate() on the remote-code model (float32, greedy) against an argmax
    loop of the float64 module over the whole sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    from exportline.exporters.sources.hf_writer import quiet_transformers

    ids = io.sample({**io.trace_sizes(), io.inputs()[0].dims[0]: 1}, seed=7)["input_ids"][:, :4]
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(root), trust_remote_code=True)
    with torch.no_grad():
        got = model.generate(torch.from_numpy(ids), max_new_tokens=GREEDY_STEPS, do_sample=False)[0, ids.shape[1]:].tolist()
    seq = ids.copy()
    for _ in range(GREEDY_STEPS):
        logits = run_module(original, io, {"input_ids": seq})["logits"]
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
    want = seq[0, ids.shape[1]:].tolist()
    same = sum(a == b for a, b in zip(got, want)) / GREEDY_STEPS
    return judge("hf", f"generate() greedy {GREEDY_STEPS} tokens, AutoModelForCausalLM float32", "greedy tokens",
                 shape=(1, GREEDY_STEPS), metrics={"identical_fraction": same}, bounds={"identical_fraction": 1.0},
                 note="" if same == 1 else f"generate {got} vs reference {want}")

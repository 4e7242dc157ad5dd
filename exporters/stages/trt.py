"""trt stage: onnx/model_fp16.onnx and onnx/model_int8.onnx → trt/<precision>.sm<cc>.trt<ver>.plan.

Strongly typed networks only (DESIGN.md §5): the ONNX graph decides every tensor's
precision, so TensorRT 10 and 11 take the same code path and no FP16/INT8 builder flag or
calibrator is used. Two optimization profiles (prefill, decode) come from shapes.py, the
declaration that also names the ONNX axes. The profile logic, names and JSON live in
trt_meta.py and are tested on CPU; this module is the thin layer over the TensorRT API.
Without TensorRT or a CUDA GPU the stage raises NotAvailable and is recorded as skipped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from exportline.exporters.core.bundle import sha256_file
from exportline.exporters.core.errors import ConfigError, NotAvailable, StageError
from exportline.exporters.core.layout import cache_root
from exportline.exporters.core.pipeline import ExportOptions, Stage, StageContext
from exportline.exporters.core.shapes import KVLayout, optimization_profiles
from exportline.exporters.tensorrt.engines import (
    ENGINE_SOURCES,
    Target,
    build_metadata,
    collecting_logger,
    default_max_sequence,
    engine_filename,
    engine_profiles,
    load_tensorrt,
    local_target,
    metadata_path,
    set_shape_calls,
    write_metadata,
)

DEFAULT_MAX_BATCH = 8
DEFAULT_WORKSPACE_GIB = 4.0


def _source_files(precision: str) -> list[str]:
    onnx = ENGINE_SOURCES[precision]
    return [onnx, onnx + "_data"]  # the graph and its one external data file (DESIGN.md §4)


def _inputs(ctx: StageContext) -> list[str]:
    """config.json and whichever fp16/int8 graphs exist: the stage builds what is there."""
    rels = ["config.json"] + [rel for p in ENGINE_SOURCES for rel in _source_files(p)]
    return [rel for rel in rels if ctx.bundle_file(rel).is_file()]


def _target_label() -> str:
    # In the fingerprint: an engine for another GPU or TensorRT is not "unchanged".
    try:
        return local_target().describe()
    except NotAvailable as exc:
        return f"not available: {exc}"


def _options(opts: ExportOptions) -> dict[str, Any]:
    max_batch = opts.trt_max_batch or DEFAULT_MAX_BATCH
    max_sequence = opts.trt_max_sequence  # None: from config.json, capped
    workspace = opts.trt_workspace_gib or DEFAULT_WORKSPACE_GIB
    if int(max_batch) < 1 or (max_sequence is not None and int(max_sequence) < 1) or float(workspace) <= 0:
        raise ConfigError(
            f"TensorRT limits must be positive: --trt-max-batch {max_batch}, "
            f"--trt-max-sequence {max_sequence}, --trt-workspace-gib {workspace}"
        )
    return {
        "max_batch": int(max_batch), "max_sequence": None if max_sequence is None else int(max_sequence),
        "workspace_gib": float(workspace), "target": _target_label(),
    }


def timing_cache_path(opts: ExportOptions, target: Target) -> Path:
    """Outside the bundle: tactic timings belong to this GPU, not to the model (a bundle
    is pushed to the Hub), and one cache serves every model built here."""
    if opts.trt_timing_cache:
        return Path(opts.trt_timing_cache)
    return cache_root() / "tensorrt" / f"timing.{target.sm}.trt{target.tensorrt}.cache"


def _parse(trt, builder, logger, *, onnx_path: Path):
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file, not parse(bytes): the parser then resolves model.onnx_data beside it.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = (
            f"{errors[0].desc()} (node {errors[0].node_name() or errors[0].node()}, op {errors[0].node_operator()})"
            if errors else (logger.errors[-1] if logger.errors else "no error reported")
        )
        first = " ".join(first.split())  # TensorRT's descriptions span lines; the message is one
        raise StageError(
            f"TensorRT cannot parse {onnx_path.name}: {first} ({len(errors)} parser errors); "
            "re-export the ONNX with --force or report the operator"
        )
    return network, parser


def _use_timing_cache(trt, config, path: Path, *, progress) -> None:
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
        usable = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    except Exception as exc:  # a truncated cache file must not stop a build
        progress(f"trt: ignoring unreadable timing cache {path} ({type(exc).__name__})")
        usable = False
    if not usable:
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(config, path: Path, progress) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(config.get_timing_cache().serialize())
        os.replace(tmp, path)  # another build reading the cache sees the old or the new one
    except OSError as exc:  # the cache only saves time: the engine is still good
        tmp.unlink(missing_ok=True)
        progress(f"trt: timing cache not saved to {path} ({exc.strerror}); point EXPORTLINE_CACHE at a writable folder")


def build_engine(trt, *, onnx_path: Path, profiles, workspace_bytes: int, timing_cache: Path, progress):
    """Serialized engine and its I/O names for one strongly typed ONNX graph."""
    logger = collecting_logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path=onnx_path)
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    declared = list(profiles[0].shapes)
    if sorted(inputs) != sorted(declared):
        raise StageError(
            f"{onnx_path.name} has inputs {inputs}, shapes.py declares {declared}; "
            "re-export it: exportline export SOURCE --stages onnx,fp16,int8 --force"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, lo, opt, hi in set_shape_calls(profile):
            trt_profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(trt_profile) < 0:
            reason = logger.errors[-1] if logger.errors else "invalid shapes"
            raise StageError(f"TensorRT refused the {profile.name} profile of {onnx_path.name}: {reason}")
    _use_timing_cache(trt, config, timing_cache, progress=progress)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        reason = logger.errors[-1] if logger.errors else "no error reported"
        raise StageError(
            f"TensorRT could not build an engine from {onnx_path.name}: {reason}; "
            "try a larger --trt-workspace-gib or smaller --trt-max-batch/--trt-max-sequence"
        )
    _save_timing_cache(config, timing_cache, progress)
    return plan, {"inputs": inputs, "outputs": outputs}


def _profiles(ctx: StageContext, opts: dict[str, Any]):
    """(profiles, max past + sequence): a built-in LM's prefill/decode profiles, or a custom
    module's one profile from its declared dim ranges (shapes.DeclaredIO; --trt-max-* do not apply)."""
    from exportline.exporters.sources.custom.model import bundle_io, is_custom

    if is_custom(ctx.bundle.root):
        io, _ = bundle_io(ctx.bundle.root)
        return optimization_profiles(io), None
    from exportline.exporters.sources.hf_writer import load_config

    config = load_config(ctx.bundle.root)  # config.json only; no weights are read
    max_sequence = opts["max_sequence"] or default_max_sequence(config)
    if max_sequence > config.max_position_embeddings:
        raise ConfigError(
            f"--trt-max-sequence {max_sequence} exceeds the model's max_position_embeddings "
            f"{config.max_position_embeddings}; pass at most that"
        )
    layout = KVLayout.from_config(config)
    return engine_profiles(layout, max_batch=opts["max_batch"], max_sequence=max_sequence), max_sequence


def _run(ctx: StageContext) -> dict[str, Any]:
    target = local_target()  # NotAvailable("TensorRT not installed" | "no CUDA GPU") → skipped
    trt = load_tensorrt()
    opts = _options(ctx.options)
    if not ctx.bundle_file("config.json").is_file():
        raise StageError(f"{ctx.bundle.root} has no config.json; run the hf stage first (--stages hf,onnx,fp16,int8,trt)")
    precisions = [p for p in ENGINE_SOURCES if ctx.bundle_file(ENGINE_SOURCES[p]).is_file()]
    if not precisions:
        raise StageError(
            f"trt builds from {' or '.join(ENGINE_SOURCES.values())}, and {ctx.bundle.root} has neither; "
            f"make them first: exportline export SOURCE --out {ctx.bundle.root} --stages fp16,int8"
        )
    profiles, max_sequence = _profiles(ctx, opts)
    cache = timing_cache_path(ctx.options, target)
    workspace = int(opts["workspace_gib"] * 2**30)
    (ctx.tmp / "trt").mkdir(parents=True, exist_ok=True)
    engines, build_s = {}, {}
    for precision in precisions:
        onnx_path = ctx.bundle_file(ENGINE_SOURCES[precision])
        ctx.progress(f"trt: building {precision} engine for {target.describe()} (batch ≤ {opts['max_batch']}, "
                     f"past+sequence ≤ {max_sequence})")
        start = time.perf_counter()
        plan, io = build_engine(
            trt, onnx_path=onnx_path, profiles=profiles, workspace_bytes=workspace, timing_cache=cache,
            progress=ctx.progress,
        )
        build_s[precision] = round(time.perf_counter() - start, 3)
        dest = ctx.tmp / "trt" / engine_filename(precision, target)
        with open(dest, "wb") as f:
            f.write(plan)
        del plan
        source = {rel: sha256_file(ctx.bundle_file(rel)) for rel in _source_files(precision)
                  if ctx.bundle_file(rel).is_file()}
        meta = build_metadata(
            precision=precision, target=target, profiles=profiles, source=source, max_batch=opts["max_batch"],
            max_sequence=max_sequence, workspace_bytes=workspace, io=io,
        )
        write_metadata(metadata_path(dest), {**meta, "build_s": build_s[precision]})
        engines[precision] = dest.name
    return {"target": target.describe(), "engines": engines, "build_s": build_s,
            "max_batch": opts["max_batch"], "max_sequence": max_sequence}


STAGE = Stage(
    name="trt",
    run=_run,
    inputs=_inputs,
    versions=("tensorrt",),
    options=_options,
)

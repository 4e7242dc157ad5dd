"""A custom module (exporters/sources/custom) → onnx/model.onnx + model.onnx_data.

The graph's inputs, outputs and dynamic axes come from the bundle's declared I/O
(shapes.DeclaredIO, config.json `exportline_io`): each named dim becomes one
torch.export.Dim with the declared min/max, shared by every input that uses it. The module
is the bundle's own remote code (the user's file as the hf stage copied it). No KV cache:
the graph is the module's forward.

A forward torch.export cannot capture (data-dependent control flow, custom autograd
functions, unsupported ops) is refused in one line with the exporter's reason and where in
the user's code it happened (module class, file, line).
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from pathlib import Path
from typing import Any, Callable

from exportline.exporters.core.errors import StageError
from exportline.exporters.core.shapes import DeclaredIO, resolve_dims

EXPORTER = "torch.export (non-strict, declared dynamic dims) + torch.onnx"


def export_declared(root: Path, out_dir: Path, *, opset: int, source: dict[str, Any],
                    progress: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from exportline.exporters.onnx.export import _quiet
    from exportline.exporters.onnx.external_data import check_graph, save_graph
    from exportline.exporters.onnx.metadata import exportline_version, graph_metadata, stamp
    from exportline.exporters.sources.custom.model import bundle_io, flat_module, load_bundle_module

    io, task = bundle_io(root)
    module = load_bundle_module(root, "float32")
    flat = flat_module(module, io)
    sizes = io.trace_sizes()
    args = tuple(torch.from_numpy(v) for v in io.sample(sizes, seed=0).values())
    # DYNAMIC, not a named Dim: torch may narrow the range (e.g. a slice guard at the max),
    # which would be an error with a named Dim; the verifier then runs min and max anyway.
    dims = {d.name: torch.export.Dim.DYNAMIC(min=d.min, max=d.max) for d in io.dims}
    dynamic = tuple({i: dims[d] for i, d in enumerate(s.dims) if isinstance(d, str)} or None for s in io.inputs())
    progress(f"onnx: tracing {type(module).__name__} with {', '.join(f'{k}={v}' for k, v in sizes.items())}")
    with _quiet(), _silent_torch(), torch.no_grad():
        try:
            program = torch.export.export(flat, args, dynamic_shapes=(dynamic,), strict=False)
            onnx_program = torch.onnx.export(
                program, args, dynamo=True, opset_version=opset, optimize=True, verbose=False,
                input_names=[s.name for s in io.inputs()], output_names=[s.name for s in io.outputs()],
            )
        except StageError:
            raise
        except Exception as exc:  # torch raises many types; say what and where in the user's code
            raise StageError(f"onnx: cannot export {type(module).__name__}.forward: {_reason(exc)}{_where(exc, root)}; "
                             "make the forward traceable (no data-dependent Python control flow or custom "
                             "autograd functions)") from None
    model = onnx_program.model_proto
    _name_dims(model.graph, io)
    stamp(model, graph_metadata(source=source, precision="fp32", layout=io,
                                made_by=[f"exportline {exportline_version()} onnx stage ({EXPORTER}, torch {torch.__version__})"]))
    target = out_dir / "model.onnx"
    files = save_graph(model, target)
    check_graph(target)
    return {"opset": opset, "exporter": EXPORTER, "architecture": type(module).__name__, "task": task,
            "kv_cache": False, "nodes": len(model.graph.node), "initializers": len(model.graph.initializer),
            "traced_sizes": sizes, "dynamic_axes": io.dynamic_axes(), "files": files}


def _name_dims(graph, io: DeclaredIO) -> None:
    """Graph inputs/outputs carry the declared dim names (or sizes), whatever torch chose."""
    for values, specs in ((graph.input, io.inputs()), (graph.output, io.outputs())):
        for value, spec in zip(values, specs):
            dims = value.type.tensor_type.shape.dim
            if len(dims) != len(spec.dims):
                raise StageError(f"onnx: output {spec.name} has rank {len(dims)} but --inputs declares {list(spec.dims)}; "
                                 "fix the outputs: section of the spec")
            for dim, want in zip(dims, spec.dims):
                if isinstance(want, str):
                    dim.dim_param = want
                elif dim.HasField("dim_value") and dim.dim_value != want:
                    raise StageError(f"onnx: output {spec.name} has size {dim.dim_value} where --inputs declares {want}")
                else:
                    dim.dim_value = want


@contextlib.contextmanager
def _silent_torch():
    """torch.export logs a user module's failure (fake-tensor stacks) at ERROR and prints the
    partial graph before raising; the exception is what the user sees, once, in one line."""
    import io

    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _reason(exc: BaseException) -> str:
    """The exporter's own reason: the first line that says something (torch prefixes some
    messages with a blank line or a generic header)."""
    lines = [line.strip(" -") for line in str(exc).strip().splitlines()]
    said = [line for line in lines if line and not line.startswith(
        ("Failed to export", "torch._dynamo", "The above exception", "For more information", "from user code",
         "Set TORCH_LOGS", "User Stack", "File ", "Explanation", "Hint"))]
    return " ".join(said[:2])[:400] if said else type(exc).__name__


def _where(exc: BaseException, root: Path) -> str:
    """ ' (in Block.forward, modeling_x.py:42)': the innermost frame in the bundle's remote code."""
    found = ""
    while exc is not None:
        for frame, line in traceback.walk_tb(exc.__traceback__):
            name = Path(frame.f_code.co_filename).name
            if frame.f_code.co_filename.endswith(".py") and _is_user_file(name, root):
                owner = frame.f_locals.get("self")
                qual = f"{type(owner).__name__}.{frame.f_code.co_name}" if owner is not None else frame.f_code.co_name
                found = f" (in {qual}, {name}:{line})"
        exc = exc.__cause__ or exc.__context__
    return found


def _is_user_file(name: str, root: Path) -> bool:
    return (Path(root) / name).is_file() and not name.startswith("configuration_")


__all__ = ["export_declared", "resolve_dims"]

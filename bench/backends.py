"""Which backends a run benchmarks, and opening each through the runner registry.

A backend that cannot be opened (library not installed, artifact missing, no GPU) becomes a
"not available" entry with the registry's one-line reason; it is never dropped.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from exportline.exporters.core.errors import ExportlineError, IntegrityError
from exportline.exporters.core.measure import current_rss_bytes
from exportline.verify.runtime.backends import BACKENDS

REFERENCE = "torch"  # speedups are over torch eager fp32 on the same device, same run

RunnerFactory = Callable[..., Any]


def runner_options(backend: str, *, device: str, threads: int, registry=BACKENDS) -> dict[str, Any]:
    return registry[backend].bench_options(device, threads)


@dataclass
class Opened:
    """A backend's runner, activated, or the reason it is not available."""

    backend: str
    runner: Any = None
    reason: str = ""
    rss_before_bytes: int = 0
    rss_after_activate_bytes: int = 0
    session: dict | None = None  # e.g. ONNX Runtime session options, as the runner reports them


def open_backend(root: Path, backend: str, *, device: str, threads: int, factory: RunnerFactory,
                 registry=BACKENDS) -> Opened:
    release_memory()
    opened = Opened(backend, rss_before_bytes=current_rss_bytes())
    options = runner_options(backend, device=device, threads=threads, registry=registry)
    try:
        runner = factory(root, backend, **options)
        runner.activate()
    except IntegrityError:
        raise  # files the manifest lists are broken: an error, not an absent backend
    except ExportlineError as exc:  # NotAvailable, ArtifactError, …: the registry says why
        opened.reason = str(exc)
        return opened
    except ImportError as exc:
        opened.reason = f"{backend}: {exc.name or exc} not installed"
        return opened
    opened.runner = runner
    opened.rss_after_activate_bytes = current_rss_bytes()
    opened.session = _describe_session(backend, options)
    return opened


def _describe_session(backend: str, options: dict[str, Any]) -> dict[str, Any]:
    """What the report records of how the backend was configured: the options passed to
    its runner, plus torch's own thread count for torch (it ignores our options there)."""
    described = {k: v for k, v in options.items() if k != "session_options"}
    described.update(options.get("session_options", {}))
    if backend == "torch":
        import torch

        described["intra_op_threads"] = torch.get_num_threads()
    return described


def close_backend(opened: Opened) -> None:
    if opened.runner is not None:
        opened.runner.deactivate()
        opened.runner = None
    release_memory()


def release_memory() -> None:
    """Hand freed memory back to the OS between backends, so that the next backend's peak
    RSS is not inflated by pages the previous one freed but glibc kept."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure is an upper bound then
        pass

"""Torch work in a child process, so the process that runs ONNX Runtime never imports torch.

Why: `import torch, transformers` adds ~360 MB of RSS that a process never gives back, and
the ORT session of a 1B fp32 graph needs ~3.8 GiB on its own (its weights, prepacked). With
torch in the same process verify on 1b peaked at 4.5 GiB; with the torch side in a child
that has exited before the graph's session opens, the two never add up.

`TorchChild` is one fresh interpreter (not a fork: nothing of the parent's thread pools or
torch state is copied, and a parent that already imported torch works the same; started with
subprocess rather than multiprocessing, whose spawn also starts a resource-tracker process
that would stay for the whole verify) serving calls of module-level functions over a pipe; arguments and results are pickled
(numpy arrays, dataclasses). An exception raised in the child is raised again in the
parent with its own type and message, so a user sees the one-line error the in-process
code would give; a child that dies is a ChildProcessDied naming its exit status, never a
hang. `IsolatedRunner` is the Runner contract over such a child: activate() starts it and
builds the real runner there, deactivate() ends the process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection, Pipe
from typing import Any, Callable

import numpy as np

from exportline.exporters.core.errors import ChildProcessDied
from exportline.verify.runtime.base import Runner

_CONN: Any = None  # in the child: its end of the pipe
_RUNNER: Any = None  # in the child: the real runner an IsolatedRunner drives


def to_parent(message: str) -> None:
    """A progress callback usable in the child: the parent's `progress` prints it."""
    _CONN.send(("progress", message))


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when the parent can unpickle it without importing anything new
    (builtins, exportline's own); otherwise a RuntimeError naming the type (a torch error
    unpickled in the parent would import torch there)."""
    module = type(exc).__module__
    if module == "builtins" or module.startswith("exportline."):
        return exc
    return RuntimeError(f"{module}.{type(exc).__qualname__}: {exc}")


def child_main(fd: int) -> None:
    """The child's entry point: its end of the pipe is `fd`; the parent's sys.path comes first."""
    global _CONN
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends this process
    _CONN = Connection(fd)
    sys.path[:], threads = _CONN.recv()  # the parent's modules (tests/ too) import the same here
    import torch
    from transformers.utils import logging

    if threads:  # torch as the parent runs it, so isolated and in-process results are the same numbers
        torch.set_num_threads(threads)
    logging.disable_progress_bar()  # progress goes through `progress`, as in verify's own process
    _serve(_CONN)


def _serve(conn) -> None:
    """The child's loop: (function, args, kwargs) in, ("ok", result) or ("error", …) out."""
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent is gone
            return
        if request is None:
            return
        func, args, kwargs = request
        try:
            reply = ("ok", func(*args, **kwargs))
        except BaseException as exc:  # every failure goes back to the parent, which raises it
            reply = ("error", _portable(exc), "".join(traceback.format_exception(exc)))
        try:
            conn.send(reply)
        except Exception as exc:  # the result does not pickle: say so instead of dying silently
            conn.send(("error", _portable(exc), "".join(traceback.format_exception(exc))))


class TorchChild:
    """`with TorchChild("the float64 reference", progress) as child: child.call(f, x)`."""

    def __init__(self, what: str, progress: Callable[[str], None] | None = None) -> None:
        self.what = what
        self.progress = progress or (lambda message: None)
        self._process: Any = None
        self._conn: Any = None
        self.broken = False  # a call ended without its reply (child died, or Ctrl-C in the parent)

    def __enter__(self) -> "TorchChild":
        ours, theirs = Pipe()
        code = f"from {__name__} import child_main; child_main({theirs.fileno()})"
        self._process = subprocess.Popen([sys.executable, "-c", code], pass_fds=[theirs.fileno()])
        theirs.close()  # so a dead child reads as EOF here
        self._conn = ours
        torch = sys.modules.get("torch")  # only if already imported: never import it here
        ours.send((list(sys.path), torch.get_num_threads() if torch is not None else None))
        return self

    def call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            self._conn.send((func, args, kwargs))
            while True:
                kind, *rest = self._conn.recv()
                if kind == "progress":
                    self.progress(rest[0])
                elif kind == "ok":
                    return rest[0]
                else:
                    break
        except (EOFError, OSError):
            self.broken = True
            raise self._died() from None
        except BaseException:  # interrupted while waiting: the reply will never be read
            self.broken = True
            raise
        exc, trace = rest
        if not getattr(exc, "__notes__", None):  # shown with a traceback (errors outside exportline's)
            exc.add_note(f"raised in the torch child process ({self.what}):\n{trace.rstrip()}")
        raise exc

    def _died(self) -> ChildProcessDied:
        try:
            code = self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # alive but its pipe is closed: end it
            self._process.kill()
            code = self._process.wait()
        if code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
            if -code == signal.SIGKILL:
                how += " (usually the out-of-memory killer: free memory)"
        else:
            how = f"exited with status {code}"
        return ChildProcessDied(f"verify: the torch process running {self.what} {how} before answering; "
                                "EXPORTLINE_VERIFY_ISOLATE=0 runs it inside verify's own process")

    def __exit__(self, *exc: Any) -> None:
        if (self.broken or (exc and exc[0] is not None)) and self._process is not None:
            self._process.kill()  # mid-call or failing: it may be busy for minutes, and nobody waits for it
        if self._conn is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._conn.close()
            self._conn = None
        if self._process is not None:
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # stuck: do not leave a process holding gigabytes behind
                self._process.kill()
                self._process.wait()
            self._process = None


def run_isolated(what: str, func: Callable[..., Any], *args: Any, progress: Callable[[str], None] | None = None,
                 **kwargs: Any) -> Any:
    """`func(*args, **kwargs)` in a fresh torch child, which has exited when this returns."""
    with TorchChild(what, progress) as child:
        return child.call(func, *args, **kwargs)


# -- the runner contract over a child ----------------------------------------------------------
def _open(backend: str, root: str, options: dict[str, Any]) -> dict[str, Any]:
    global _RUNNER
    from exportline.verify.runtime.backends import make_runner

    _RUNNER = make_runner(root, backend, **options)
    _RUNNER.activate()
    return {k: getattr(_RUNNER, k) for k in IsolatedRunner.MIRRORED if hasattr(_RUNNER, k)}


def _infer(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _RUNNER.infer(feed)


def _close() -> None:
    global _RUNNER
    _RUNNER.deactivate()
    _RUNNER = None


class IsolatedRunner(Runner):
    """`make_runner(root, backend, **options)` built and run in a TorchChild; `infer` feeds go
    over the pipe and outputs come back as numpy arrays."""

    MIRRORED = ("name", "layout", "float64_rebound", "dtype", "device")  # plain attributes callers read

    def __init__(self, root: str, backend: str, **options: Any) -> None:
        super().__init__()
        self.root, self.backend, self.options = str(root), backend, options
        self.name = f"{backend} (isolated)"
        self._child: TorchChild | None = None

    def activate_impl(self) -> None:
        child = TorchChild(f"the {self.backend} runner ({self.options.get('dtype', 'default dtype')})").__enter__()
        try:
            mirrored = child.call(_open, self.backend, self.root, self.options)
        except BaseException as exc:
            child.__exit__(type(exc), exc, None)
            raise
        self._child = child
        for key, value in mirrored.items():
            setattr(self, key, value)

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._child.call(_infer, feed)

    def deactivate_impl(self) -> None:
        child, self._child = self._child, None
        try:
            if not child.broken:
                child.call(_close)
        finally:
            child.__exit__()

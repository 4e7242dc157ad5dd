"""Isolated verify (verify/runtime/isolated.py): torch work in child processes, so the process
that opens ONNX Runtime never imports torch; same numbers as in-process; child failures
surface as the error the in-process code gives, a dead child as ChildProcessDied."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from exportline.exporters.core.errors import ChildProcessDied, ConfigError
from exportline.verify.metrics import compare
from exportline.verify.runtime.backends import make_runner
from exportline.verify.runtime.isolated import TorchChild, run_isolated
from exportline.verify.suite import ISOLATE_ENV, verify_bundle, wants_isolation

from verify_helpers import copy_bundle, shared_bundle

STAGES = ["hf", "onnx"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


@pytest.mark.slow
def test_isolated_cli_verify_passes_without_importing_torch(bundle, tmp_path):
    """`exportline verify` with isolation forced: the verify process ends with neither torch
    nor transformers imported, and the checks pass."""
    root = copy_bundle(bundle, tmp_path / "b")
    script = textwrap.dedent(f"""
        import atexit, json, sys
        atexit.register(lambda: print("MODULES " + json.dumps({{m: m in sys.modules for m in ("torch", "transformers")}})))
        from exportline.exporters.cli.app import main
        sys.argv = ["exportline", "verify", {str(root)!r}, "--stage", "hf", "--stage", "onnx"]
        main()
    """)
    env = {**os.environ, ISOLATE_ENV: "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = json.loads(proc.stdout.split("MODULES ")[1])
    assert modules == {"torch": False, "transformers": False}
    assert "hf passed (5/5 checks), onnx passed" in proc.stdout
    report = json.loads((root / "reports" / "verify.json").read_text())
    assert report["passed"] and report["environment"]["torch"][0].isdigit()  # asked in a child


@pytest.mark.slow
def test_isolated_report_has_the_in_process_numbers(bundle, tmp_path):
    here = verify_bundle(copy_bundle(bundle, tmp_path / "here"), stages=STAGES, isolate=False)
    isolated = verify_bundle(copy_bundle(bundle, tmp_path / "isolated"), stages=STAGES, isolate=True)
    assert here.passed and isolated.passed
    for a, b in zip(here.stages, isolated.stages, strict=True):
        assert (a.stage, a.status, a.reference) == (b.stage, b.status, b.reference)
        assert [(r.case, r.output, r.shape, r.metrics) for r in a.rows] == [(r.case, r.output, r.shape, r.metrics) for r in b.rows]
        assert a.extra == b.extra  # greedy tokens, cases
    assert here.environment == isolated.environment


def test_a_child_error_is_the_in_process_error(bundle):
    """The runner's own ConfigError, raised in the child at infer() and at construction."""
    with make_runner(bundle, "torch", dtype="float32", streamed=True) as here:
        with pytest.raises(ConfigError) as local:
            here.infer({})
    with make_runner(bundle, "torch", dtype="float32", streamed=True, isolated=True) as isolated:
        with pytest.raises(ConfigError) as remote:
            isolated.infer({})
        assert isolated.layout == here.layout  # attributes the checks read come back
        assert isolated.infer(_prefill(here.layout))["logits"].shape == (1, 3, here.layout.vocab_size)
    assert str(remote.value) == str(local.value) and "the feed has no" in str(local.value)
    with pytest.raises(ConfigError) as local:
        make_runner(bundle, "torch", dtype="int3")
    with pytest.raises(ConfigError) as remote:
        make_runner(bundle, "torch", dtype="int3", isolated=True).activate()
    assert str(remote.value) == str(local.value)


def test_an_error_outside_exportline_keeps_its_type_and_the_childs_traceback():
    with pytest.raises(ZeroDivisionError) as caught:
        run_isolated("a division", divmod, 1, 0)
    assert "raised in the torch child process (a division)" in "".join(caught.value.__notes__)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("func", "args", "says"), [
    (os._exit, (7,), "exited with status 7"),
    (signal.raise_signal, (signal.SIGKILL,), "was killed by SIGKILL (usually the out-of-memory killer"),
])
def test_a_dead_child_is_a_one_line_error_not_a_hang(func, args, says):
    with TorchChild("a doomed call") as child:
        with pytest.raises(ChildProcessDied) as caught:
            child.call(func, *args)
    message = str(caught.value)
    assert says in message and "a doomed call" in message and "\n" not in message


def test_when_verify_isolates(monkeypatch):
    big = {"files": [{"path": "model.safetensors", "bytes": 3 << 30}, {"path": "onnx/model.onnx_data", "bytes": 1}]}
    small = {"files": [{"path": "model.safetensors", "bytes": 1 << 20}]}
    monkeypatch.setenv(ISOLATE_ENV, "auto")
    assert not wants_isolation(small)
    assert not wants_isolation(big)  # this process already imported torch: nothing to save
    monkeypatch.delitem(sys.modules, "torch")
    assert wants_isolation(big) and not wants_isolation(small)
    monkeypatch.setenv(ISOLATE_ENV, "1")
    assert wants_isolation(small)
    monkeypatch.setenv(ISOLATE_ENV, "0")
    assert not wants_isolation(big)
    monkeypatch.setenv(ISOLATE_ENV, "yes")
    with pytest.raises(ConfigError, match="EXPORTLINE_VERIFY_ISOLATE='yes'"):
        wants_isolation(big)


def test_compare_leaves_the_callers_arrays_alone():
    """compare() writes the difference into its own copy, never into an array it was given."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 5, 11))
    out = ref + 1e-3 * rng.standard_normal(ref.shape)
    before = out.copy(), ref.copy()
    metrics = compare(out, ref, top1=True)
    assert (out == before[0]).all() and (ref == before[1]).all()
    diff = out - ref
    assert metrics.max_abs == np.abs(diff).max() and metrics.rel_l2 == np.linalg.norm(diff) / np.linalg.norm(ref)
    masked = compare(out.astype(np.float32), ref, mask=np.array([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]]))
    assert masked.max_abs <= metrics.max_abs * 1.01 and (ref == before[1]).all()


def _prefill(layout):
    from exportline.verify.cases import Case

    ids = np.array([[1, 2, 3]], np.int64)
    return Case("p", ids, np.ones_like(ids), np.arange(3, dtype=np.int64)[None]).feed(layout)


@pytest.mark.timeout(120)
def test_an_interrupted_call_ends_the_child_at_once():
    """Ctrl-C in the parent (here: an alarm) while the child computes: the child is killed,
    not waited for (it ignores SIGINT and may be busy for minutes)."""
    import time

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    previous = signal.signal(signal.SIGALRM, stop)
    started = time.monotonic()
    try:
        with pytest.raises(Stop):
            with TorchChild("a long sleep") as child:
                process = child._process
                signal.alarm(5)  # after the child's torch import, during the sleep
                child.call(time.sleep, 300)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert process.poll() is not None and time.monotonic() - started < 60

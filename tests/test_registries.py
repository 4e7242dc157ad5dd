"""Every registered stage, backend and source kind is whole and tested (optimum's
`test_all_models_tested` habit): a record without its check, its stage or a test fails here."""

from __future__ import annotations

import ast
from pathlib import Path

from exportline.exporters.core.pipeline import Stage
from exportline.exporters.sources import SOURCE_KINDS
from exportline.exporters.stages import STAGES
from exportline.verify.checks import CHECKS
from exportline.verify.runtime import BACKENDS

TESTS = Path(__file__).resolve().parent


def covered(folder: Path = TESTS) -> set[str]:
    """Items named by `@pytest.mark.covers("stage:onnx", …)` anywhere in the tests."""
    items = set()
    for path in folder.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "pytest.mark.covers":
                items |= {arg.value for arg in node.args if isinstance(arg, ast.Constant)}
    return items


def registered() -> set[str]:
    return ({f"stage:{n}" for n in STAGES} | {f"backend:{n}" for n in BACKENDS}
            | {f"source:{n}" for n in SOURCE_KINDS})


def test_every_registered_item_has_a_test():
    assert sorted(registered() - covered()) == []


def test_covers_names_only_registered_items():
    assert sorted(covered() - registered()) == []


def test_an_untested_item_is_caught(tmp_path):
    (tmp_path / "test_x.py").write_text('import pytest\n\n@pytest.mark.covers("stage:hf")\ndef test_a():\n    pass\n')
    assert covered(tmp_path) == {"stage:hf"}
    assert "stage:onnx" in registered() - covered(tmp_path)


def test_every_stage_has_a_check_and_every_check_a_stage():
    assert list(CHECKS) == list(STAGES)
    assert all(isinstance(s, Stage) and s.name == n for n, s in STAGES.items())


def test_every_backend_names_a_stage_and_a_precision():
    for backend in BACKENDS.values():
        assert backend.stage in STAGES, backend.name
        assert backend.precision in ("fp32", "fp16", "int8"), backend.name


def test_every_source_kind_reads_something():
    suffixes = [s for kind in SOURCE_KINDS.values() for s in kind.suffixes]
    assert len(suffixes) == len(set(suffixes)), "two source kinds claim one suffix"
    for kind in SOURCE_KINDS.values():
        assert callable(getattr(kind.source, "write_hf", None)), kind.name


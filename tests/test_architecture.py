"""The folder tree is the architecture: which package may import which, checked on the source.

Data flows one way (DESIGN.md §1): core ← sources ← onnx/precision/tensorrt ← stages, and
verify, bench and deploy read artifacts through the core, the sources' public API and the
artifact formats; only the CLI wires everything together, and nothing imports the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("exporters", "verify", "bench", "deploy")
FORMATS = ("exportline.exporters.onnx", "exportline.exporters.precision", "exportline.exporters.tensorrt")
CORE = ("exportline.exporters.core",)
SOURCES = ("exportline.exporters.sources",)

# package (longest prefix wins) → the exportline packages it may import, besides itself
ALLOWED: dict[str, tuple[str, ...]] = {
    "exportline.exporters": (),  # the package docstring only
    "exportline.exporters.core": (),
    "exportline.exporters.sources": CORE,
    "exportline.exporters.onnx": CORE + SOURCES + FORMATS,
    "exportline.exporters.precision": CORE + SOURCES + FORMATS,
    "exportline.exporters.tensorrt": CORE + SOURCES + FORMATS,
    "exportline.exporters.stages": CORE + SOURCES + FORMATS,
    "exportline.exporters.cli": ("exportline",),
    "exportline.verify": CORE + SOURCES + FORMATS,
    "exportline.bench": CORE + SOURCES + ("exportline.exporters.stages", "exportline.verify.runtime",
                                          "exportline.verify.generate"),
    "exportline.deploy": CORE + SOURCES + FORMATS,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return "exportline." + ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; write exportline.… in full"
            found.append((node.lineno, node.module or ""))
    return [(line, name) for line, name in found if name.startswith("exportline")]


def _owner(module: str) -> str:
    return max((p for p in ALLOWED if module == p or module.startswith(p + ".")), key=len)


def violations(files: list[Path]) -> list[str]:
    bad = []
    for path in files:
        me = module_name(path)
        owner = _owner(me)
        allowed = (owner, *ALLOWED[owner])
        for line, target in imports_of(path):
            if target.startswith("exportline.exporters.cli") and owner != "exportline.exporters.cli":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the CLI ({target})")
            elif not any(target == a or target.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(ROOT)}:{line} {owner} may not import {target}")
    return bad


def package_files() -> list[Path]:
    return sorted(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py"))


def test_every_package_imports_only_what_its_layer_allows():
    assert package_files(), "no sources found"
    assert violations(package_files()) == []


def test_a_violation_is_caught(tmp_path, monkeypatch):
    """The check itself can fail: a verify module importing a stage, a bench module importing the CLI."""
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    (tmp_path / "verify").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "verify" / "x.py").write_text("from exportline.exporters.stages import STAGES\n")
    (tmp_path / "bench" / "y.py").write_text("import exportline.exporters.cli.app\n")
    found = violations([tmp_path / "verify" / "x.py", tmp_path / "bench" / "y.py"])
    assert len(found) == 2 and "may not import exportline.exporters.stages" in found[0] and "imports the CLI" in found[1]


@pytest.mark.parametrize("path", package_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_modules_stay_small(path):
    """House rule 9: modules under ~600 lines; split by concept."""
    assert len(path.read_text().splitlines()) <= 650


def test_every_module_imports_first():
    """Each module imported first, on its own (an import cycle shows only for some entry
    points): one subprocess, exportline's modules dropped from sys.modules between imports."""
    import subprocess
    import sys

    names = [module_name(p) for p in package_files()]
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m.startswith('exportline')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        print(f'{name}: {type(exc).__name__}: {exc}')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == ""

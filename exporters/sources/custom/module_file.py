"""The user's module file: found, its sibling files gathered, imported — the one place
exportline runs code the user wrote (only with `--model-class FILE.py:Class`).

Relative imports (`from .layers import Block`) of files beside FILE.py are resolved: those
files are imported with it and copied into the HF folder, where transformers' remote-code
loader resolves them the same way. Anything else relative (a parent package, a folder, a
missing file) is refused in one line before anything runs.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from exportline.exporters.core.errors import SourceError


@dataclass(frozen=True)
class ModuleFile:
    path: Path  # FILE.py, resolved
    class_name: str
    siblings: tuple[Path, ...]  # files FILE.py reaches through relative imports, in import order

    @classmethod
    def parse(cls, spec: str) -> "ModuleFile":
        """`path/to/model.py:ClassName` → the file and its relative imports, checked."""
        file, sep, class_name = spec.rpartition(":")
        if not sep or not file.endswith(".py") or not class_name.isidentifier():
            raise SourceError(f"--model-class {spec!r}: expected path/to/model.py:ClassName")
        path = Path(file).expanduser().resolve()
        if not path.is_file():
            raise SourceError(f"--model-class {spec!r}: {path} does not exist")
        if not _defines(path, class_name):
            raise SourceError(f"--model-class {spec!r}: {path.name} defines no class {class_name}")
        return cls(path, class_name, tuple(relative_files(path)))

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.path, *self.siblings)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for p in self.files:
            h.update(p.name.encode() + b"\0" + p.read_bytes())
        return h.hexdigest()

    def load_class(self) -> type:
        """Import FILE.py as a module of a private package (so its relative imports work)."""
        package = f"exportline_user_{self.sha256()[:16]}"
        if package not in sys.modules:
            spec = importlib.util.spec_from_loader(package, loader=None, is_package=True)
            pkg = importlib.util.module_from_spec(spec)
            pkg.__path__ = [str(self.path.parent)]
            sys.modules[package] = pkg
        name = f"{package}.{self.path.stem}"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, self.path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[name]
                raise SourceError(f"importing {self.path.name} failed: {type(exc).__name__}: {_first(exc)}") from exc
        return getattr(module, self.class_name)


def _defines(path: Path, class_name: str) -> bool:
    tree = _parse(path)
    return any(isinstance(n, ast.ClassDef) and n.name == class_name for n in tree.body)


def _parse(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as exc:
        raise SourceError(f"{path.name}:{exc.lineno}: syntax error ({exc.msg}); fix the module file") from None


def relative_files(path: Path, seen: set[Path] | None = None) -> list[Path]:
    """Files beside `path` that it imports relatively, recursively; one-line refusal for a
    relative import exportline cannot carry into a flat HF folder."""
    seen = seen if seen is not None else {path}
    found = []
    for node in ast.walk(_parse(path)):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        names = [node.module] if node.module else [a.name for a in node.names]
        for name in names:
            target = path.parent / f"{name}.py"
            if node.level > 1 or "." in name or not target.is_file():
                dots = "." * node.level
                raise SourceError(
                    f"{path.name}:{node.lineno}: relative import `from {dots}{node.module or ''}` cannot be carried "
                    f"into the HF folder (only files beside {path.name}, one level); make it absolute or inline it")
            target = target.resolve()
            if target not in seen:
                seen.add(target)
                found += [target, *relative_files(target, seen)]
    return found


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"

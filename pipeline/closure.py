"""The import closure of a project module, read from the sources with `ast` (nothing is imported).

    closure("train.pretrain")      # {Path(".../train/pretrain.py"), Path(".../train/model.py"), ...}

One walker for two users: the stamps of the resumable stages (pre-training's checkpoint, the
proposals' parts, the shard set) hold the code version of the stage's closure (`code_version`), and
the dvc.yaml check (tests/test_dvc_deps.py) requires every stage to list its closure in `deps`.

The code version hashes each file's syntax tree less its docstrings, so an edit to a comment, a
docstring or the layout changes no stamp: DVC reruns the stage (its code dependency changed) and the
stage reuses every finished part, checkpoint or shard, so the outputs and everything downstream stay
as they were. Any other edit starts the stage clean, and so does another Python minor version
(`ast.dump` is not the same text across them): every rank of a run must use the same Python. What counts as an import:

- every `import` / `from ... import` anywhere in a file (function-level and
  `if __name__ == "__main__"` imports included), `from . import x` resolved against the file's
  package, `from pkg import name` counted as the module `pkg.name` when that is a module file;
- every string that is exactly a project module's dotted name (a launcher's `-m train.pretrain`:
  the module runs in a child process, so its closure is the caller's too);
- importing `a.b.c` runs the packages `a` and `a.b` first: their `__init__.py` files count, unless
  one holds nothing but a docstring (it changes no result).

Only modules of the project packages (`PACKAGES`) under the root are followed.
"""
from __future__ import annotations

import ast
import hashlib
import re
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "train", "eval", "benchmarks")


def module_file(name: str, root: Path = REPO) -> Path | None:
    """The file of project module `name` under `root` (a .py or a package's __init__.py), else None."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


@cache
def imported_names(path: Path, root: Path = REPO) -> frozenset[str]:
    """Dotted names of every module `path` imports, anywhere in the file (cached per file: call
    `imported_names.cache_clear()` after editing a file in the same process)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _dotted_module(node.value, root):
            names.add(node.value)     # run in a subprocess: [sys.executable, "-m", "train.pretrain", ...]
    return frozenset(n for n in names if n)


def _dotted_module(text: str, root: Path) -> bool:
    """`text` is exactly the dotted name of a project module, as a launcher passes it to `-m`."""
    return re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", text) is not None and module_file(text, root) is not None


def _with_parents(name: str) -> list[str]:
    """`a.b.c` -> a, a.b, a.b.c: importing a module runs its packages' __init__ first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def trivial_init(path: Path) -> bool:
    """An __init__.py with nothing but (at most) a docstring."""
    body = ast.parse(path.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return path.name == "__init__.py" and not body


def closure(module: str, root: Path = REPO) -> set[Path]:
    """Project module files `module` runs when imported or run with `-m` (trivial __init__s left out)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        for name in _with_parents(todo.pop()):
            f = module_file(name, root)
            if f is None or f in seen:
                continue
            seen.add(f)
            todo.extend(imported_names(f, root))
    return {f for f in seen if not trivial_init(f)}


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def code_tree(path: Path) -> str:
    """The syntax tree of the file `path` as text, docstrings removed (comments and layout are not
    in a tree): what a code version hashes."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        body = node.body if isinstance(node, _DOCUMENTED) else None
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def code_version(module: str, root: Path = REPO) -> str:
    """sha256 over the syntax trees (`code_tree`) of `module`'s closure, with their paths relative to
    `root`: the code part of a stage's stamp."""
    h = hashlib.sha256()
    for f in sorted(closure(module, root)):
        h.update(str(f.relative_to(root)).encode() + b"\0" + code_tree(f).encode() + b"\0")
    return h.hexdigest()

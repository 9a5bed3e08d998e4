"""pipeline.closure: the import closure seen from the sources, every way a module can be imported."""
from __future__ import annotations

from pipeline.closure import REPO, closure, imported_names


def test_closure_sees_function_level_submodule_relative_and_launched_imports(tmp_path):
    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""docstring only."""\n')
    (pkg / "top.py").write_text("from pipeline import sub\nfrom . import rel\n"
                                "def f():\n    import pipeline.late\n    from .deep import thing\n"
                                "CMD = ['python', '-m', 'pipeline.child']   # a launcher\n")
    for name in ("sub", "rel", "late", "deep", "unused", "child"):
        (pkg / f"{name}.py").write_text("import os\n")
    try:
        got = {p.name for p in closure("pipeline.top", tmp_path)}
        assert got == {"top.py", "sub.py", "rel.py", "late.py", "deep.py", "child.py"}
        (pkg / "__init__.py").write_text("from pipeline import unused\n")   # code in __init__: it counts
        imported_names.cache_clear()
        assert {p.name for p in closure("pipeline.top", tmp_path)} == got | {"__init__.py", "unused.py"}
    finally:
        imported_names.cache_clear()


def test_the_pretraining_closure_holds_what_it_imports_and_nothing_else():
    files = {str(p.relative_to(REPO)) for p in closure("train.pretrain")}
    assert {"train/pretrain.py", "train/checkpoint.py", "train/methods.py", "pipeline/params.py"} <= files
    assert not any(f.startswith(("eval/", "benchmarks/", "tests/")) for f in files)

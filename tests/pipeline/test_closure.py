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


def test_code_version_ignores_comments_docstrings_and_layout_but_no_code_edit(tmp_path):
    """The stamps of the resumable stages hold `code_version`: a docstring or comment edit must
    keep it (the stage reuses its outputs), any edit of code in the closure must change it."""
    from pipeline.closure import code_version

    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    top = pkg / "top.py"
    top.write_text('"""Top."""\nfrom pipeline import sub\n\ndef f(x):\n    """Double."""\n    return 2 * x\n')
    sub = pkg / "sub.py"
    sub.write_text("class C:\n    'C.'\n    K = 'a string that is no docstring'\n")
    try:
        base = code_version("pipeline.top", tmp_path)
        same = [
            (top, '"""Top, reworded."""\nfrom pipeline import sub  # a comment\n\n\n'
                  'def f(x):\n    """Twice x."""\n\n    return 2 * x\n'),
            (sub, "class C:\n    '''C, a class.'''\n    K = 'a string that is no docstring'\n"),
        ]
        for path, text in same:
            old = path.read_text()
            path.write_text(text)
            assert code_version("pipeline.top", tmp_path) == base, text
            path.write_text(old)
        changed = [
            (top, '"""Top."""\nfrom pipeline import sub\n\ndef f(x):\n    """Double."""\n    return 3 * x\n'),
            (sub, "class C:\n    'C.'\n    K = 'another string'\n"),     # a constant, not a docstring
            (sub, "class C:\n    K = 'a string that is no docstring'\n    'C.'\n"),   # no longer first
        ]
        for path, text in changed:
            old = path.read_text()
            path.write_text(text)
            imported_names.cache_clear()
            assert code_version("pipeline.top", tmp_path) != base, text
            path.write_text(old)
        (tmp_path / "pipeline" / "unused.py").write_text("X = 1\n")     # outside the closure: no change
        assert code_version("pipeline.top", tmp_path) == base
    finally:
        imported_names.cache_clear()

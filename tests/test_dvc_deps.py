"""dvc.yaml's `deps` are complete by construction: what a stage runs and reads is listed.

DVC reruns a stage only when one of its listed deps changes, so a project module a stage imports
but does not list leaves `dvc status` clean and the results stale after an edit. For every stage
(matrix stages once, as their template), these tests

- find the project module(s) its `cmd` runs (`python -m X`, `torchrun ... -m X`,
  `python -m torch.distributed.run ... -m X`, or `python path/to/file.py`),
- compute their import closure inside the project (`pipeline.closure`; packages `pipeline`, `train`, `eval`,
  `benchmarks`) from the source with `ast`: every `import`/`from ... import` anywhere in a file
  (function-level and `if __name__ == "__main__"` imports included, `from . import x` resolved,
  `from pkg import name` counted as the module `pkg.name` when that is a module file), and every
  string that is exactly a project module's dotted name (a launcher's `-m train.pretrain`: the
  module runs in a child process, and its closure is the stage's too),
- and fail, naming the stage and the files, if `deps` omit any module file of the closure.

Package `__init__.py` files run on every import of their package; one that holds nothing but a
docstring (all of ours today) changes no result and need not be listed, one with any other
statement is part of the closure like any module.

The data side: every path the `cmd` passes (an option's value with a `/` in it, `--params`
aside: `params:` track that) must be a dep, lie under a dep, or be an output (or the folder of
one). Some arguments read more than their own path, and those reads must be deps too:
`--coco-root R` reads R's train/val annotation files and its `train2017/`, `val2017/` image
folders; an images table `data/<set>/images.parquet` reads the image folder its rows point into.

`${...}` templates are resolved against params.yaml (e.g. `${data.coco_root}`); `${item.*}` of a
matrix stays as written, the same text in `cmd`, `deps` and `outs`.
"""
from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
import yaml

from pipeline import manifest
from pipeline.categories import MANIFESTS
from pipeline.closure import PACKAGES, closure, module_file

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ dvc.yaml, resolved


def _lookup(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        node = node[part]
    return node


def resolve(text: str, params: dict) -> str:
    """`${a.b}` replaced by params.yaml's value; `${item.*}` (matrix) left as written."""
    def sub(m: re.Match) -> str:
        key = m.group(1).strip()
        return m.group(0) if key.startswith("item.") or key == "item" else str(_lookup(params, key))
    return re.sub(r"\$\{([^}]+)\}", sub, text)


def _entries(items) -> list[str]:
    """Paths of a deps / outs / metrics / plots list (an entry is a path or {path: options})."""
    out = []
    for it in items or []:
        out.extend(it.keys() if isinstance(it, dict) else [it])
    return out


@cache
def stages() -> dict[str, dict]:
    """name -> {"cmd": [str], "deps": [path], "outs": [path]}, templates resolved."""
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    found = {}
    for name, st in doc["stages"].items():
        st = st.get("do", st)               # a foreach stage: its template
        cmds = st["cmd"] if isinstance(st["cmd"], list) else [st["cmd"]]
        outs = [p for key in ("outs", "metrics", "plots") for p in _entries(st.get(key))]
        found[name] = {
            "cmd": [resolve(c, params) for c in cmds],
            "deps": [norm(resolve(d, params)) for d in _entries(st.get("deps"))],
            "outs": [norm(resolve(o, params)) for o in outs],
        }
    return found


def norm(path: str) -> str:
    return str(PurePosixPath(path.strip()))


def covered(path: str, by: list[str]) -> bool:
    """`path` is one of `by` or lies under one of them."""
    p = PurePosixPath(norm(path))
    return any(p == PurePosixPath(b) or PurePosixPath(b) in p.parents for b in by)


# ------------------------------------------------------------------------------- import closure


def cmd_modules(cmd: str) -> list[str]:
    """Project modules a command runs: every `-m X` (python, torchrun) or `*.py` file argument."""
    tokens = shlex.split(cmd)
    found = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "-m"]
    found += [".".join(PurePosixPath(t).with_suffix("").parts) for t in tokens
              if t.endswith(".py") and (REPO / t).is_file()]
    return [m for m in found if module_file(m) is not None]


# ------------------------------------------------------------------------------------ data reads


# options naming a root folder the command reads only in parts: those parts (implied_reads) are
# deps, not the whole root
ROOT_OPTIONS = ("--coco-root",)


def implied_reads(option: str, value: str, params: dict) -> list[str]:
    """Paths an argument makes the command read besides its own path."""
    data = params["data"]
    if option == "--coco-root":
        return [f"{value}/annotations/instances_train2017.json", f"{value}/annotations/instances_val2017.json",
                f"{value}/train2017", f"{value}/val2017"]
    if value.endswith("images.parquet"):     # an images table: its rows point into an image folder
        folder = PurePosixPath(value).parent.name
        return {"openimage_mini": [f"{data['openimages_root']}/train"],
                "coco_train2017": [f"{data['coco_root']}/train2017"]}.get(folder, [])
    return []


def read_is_dep(path: str, deps: list[str], params: dict) -> bool:
    """A read is covered by a dep; an image folder only by its manifest (pipeline/manifest.py), never
    by the folder itself, which DVC would hash file by file (hundreds of GB on real data)."""
    data = params["data"]
    folders = {norm(f"{data[key]}/{sub}"): norm(f"{data['manifests']}/{name}{manifest.SUFFIX}")
               for name, (key, sub) in manifest.FOLDERS.items()}
    if norm(path) in folders:
        return folders[norm(path)] in deps and not any(norm(path) == d or norm(path).startswith(d + "/")
                                                       for d in deps)
    return covered(path, deps)


def path_args(cmd: str) -> list[tuple[str, str]]:
    """(option, value) of every option whose value is a path (holds a '/'), `--params` aside."""
    tokens = shlex.split(cmd)
    return [(t, v) for t, v in zip(tokens, tokens[1:])
            if t.startswith("--") and not v.startswith("-") and "/" in v and t != "--params"]


# --------------------------------------------------------------- manifests read through a constant


def _manifest_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level `NAME = MANIFESTS / "a" / "b.csv"` -> {NAME: "data_manifests/a/b.csv"}."""
    def parts(node) -> list[str] | None:
        if isinstance(node, ast.Name) and node.id == "MANIFESTS":
            return [MANIFESTS.name]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
            left = parts(node.left)
            return None if left is None else left + [str(node.right.value)]
        return None
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            p = parts(node.value)
            if p and len(p) > 1:
                found[node.targets[0].id] = "/".join(p)
    return found


def _calls(node) -> list[ast.Call]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Call)]


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def manifest_reads(files: set[Path]) -> set[str]:
    """The `data_manifests/` files the modules `files` read through a module constant, by their
    code (no import): a function of a module that defines such constants reads the constants its
    body names, what its calls of such functions read, and those of its defaults a call leaves
    out; the modules read what their calls of those functions read, and the constants they import
    by name. Over-approximates only where a call sits in code a stage never runs. Functions are
    matched by name (the modules that define such constants, `pipeline/categories.py` and
    `pipeline/synth.py` today, share none)."""
    trees = {f: ast.parse(f.read_text()) for f in files}
    consts = {name: path for t in trees.values() for name, path in _manifest_constants(t).items()}
    # the functions of the modules that define such constants (where a read can hide in a default)
    funcs = {n.name: n for t in trees.values() if _manifest_constants(t)
             for n in t.body if isinstance(n, ast.FunctionDef)}
    visiting: set[str] = set()

    def named(node) -> set[str]:
        return {consts[n.id] for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in consts} | \
               {consts[n.attr] for n in ast.walk(node) if isinstance(n, ast.Attribute) and n.attr in consts}

    @cache
    def body_reads(name: str) -> frozenset[str]:
        fn = funcs[name]
        reads = set().union(*(named(stmt) for stmt in fn.body))
        visiting.add(name)                          # recursion (direct or mutual) adds nothing new
        for call in _calls(fn):
            if _callee(call) in funcs and _callee(call) not in visiting:
                reads |= call_reads(call)
        visiting.discard(name)
        return frozenset(reads)

    def call_reads(call: ast.Call) -> set[str]:
        fn = funcs[_callee(call)]
        params = fn.args.args[-len(fn.args.defaults):] if fn.args.defaults else []
        passed = {kw.arg for kw in call.keywords}
        first_default = len(fn.args.args) - len(fn.args.defaults)
        left_out = [d for i, (a, d) in enumerate(zip(params, fn.args.defaults))
                    if first_default + i >= len(call.args) and a.arg not in passed]
        return set(body_reads(fn.name)).union(*(named(d) for d in left_out))

    reads: set[str] = set()
    for tree in trees.values():
        defined = set(_manifest_constants(tree))
        for node in ast.walk(tree):                 # constants named outside their own module
            if isinstance(node, ast.Name) and node.id in consts and node.id not in defined:
                reads.add(consts[node.id])
            elif isinstance(node, ast.Attribute) and node.attr in consts and node.attr not in defined:
                reads.add(consts[node.attr])
        # a provider's functions read only when called: their own calls count through body_reads
        scope = [n for n in tree.body if not isinstance(n, ast.FunctionDef)] if defined else [tree]
        reads |= set().union(*(call_reads(c) for node in scope for c in _calls(node) if _callee(c) in funcs))
    return reads


# ---------------------------------------------------------------------------------------- tests


def test_cmd_modules_reads_torchrun_and_python():
    assert cmd_modules("torchrun --nproc_per_node 2 -m train.pretrain --x 1") == ["train.pretrain"]
    assert cmd_modules("python -m pipeline.synth --out data/synth") == ["pipeline.synth"]


def test_every_stage_runs_a_project_module():
    """A command form this file cannot read (no `-m X` of ours) must not silently pass."""
    for name, st in stages().items():
        assert any(cmd_modules(c) for c in st["cmd"]), f"stage {name}: no project module found in {st['cmd']}"


@pytest.mark.parametrize("stage", list(stages()))
def test_deps_list_every_module_the_stage_imports(stage):
    st = stages()[stage]
    needed = set().union(*(closure(m) for c in st["cmd"] for m in cmd_modules(c)))
    missing = sorted(str(f.relative_to(REPO)) for f in needed if not covered(str(f.relative_to(REPO)), st["deps"]))
    assert not missing, (f"dvc.yaml stage {stage!r} imports these project modules but does not list them "
                         f"in its deps: {missing} (add them, or an edit there leaves the stage stale)")


@pytest.mark.parametrize("stage", list(stages()))
def test_deps_list_no_module_the_stage_does_not_import(stage):
    """The converse: a listed project module outside the closure reruns the stage (and everything
    downstream) for an edit that cannot change its result."""
    st = stages()[stage]
    needed = {str(f.relative_to(REPO)) for f in
              set().union(*(closure(m) for c in st["cmd"] for m in cmd_modules(c)))}
    extra = sorted(d for d in st["deps"] if d.endswith(".py") and d.split("/")[0] in PACKAGES and d not in needed)
    assert not extra, (f"dvc.yaml stage {stage!r} lists project modules it does not import: {extra} (remove "
                       "them, or an edit there reruns the stage for nothing)")


def test_the_lock_records_only_stages_of_dvc_yaml():
    """dvc.lock keeps the entries of stages removed from dvc.yaml (a matrix item dropped from
    params.yaml, a renamed stage): they record runs of nothing that exists and must go."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    listed = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    names = set(listed.split())
    assert not set(lock) - names, f"dvc.lock holds stages dvc.yaml does not define: {sorted(set(lock) - names)}"
    assert not names - set(lock), f"stages of dvc.yaml never run (no dvc.lock entry): {sorted(names - set(lock))}"


def test_manifest_reads_follow_calls_and_defaults(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("MANIFESTS = 0\nA = MANIFESTS / 'a.csv'\nB = MANIFESTS / 'sub' / 'b.csv'\n"
                   "def read_a(path=A):\n    return path\n"
                   "def read_both(x, classes=None):\n    return read_a(), classes or B\n")
    user = tmp_path / "u.py"
    assert manifest_reads({mod}) == set()                       # nothing calls them
    user.write_text("def f():\n    return read_both(1)\n")
    assert manifest_reads({user, mod}) == {"data_manifests/a.csv", "data_manifests/sub/b.csv"}
    user.write_text("def f():\n    return read_a('mine.csv'), B\n")
    assert manifest_reads({user, mod}) == {"data_manifests/sub/b.csv"}     # read_a's default passed; B named
    mod.write_text("MANIFESTS = 0\nA = MANIFESTS / 'a.csv'\ndef read_a(path=A):\n    return path\n")
    assert manifest_reads({user, mod}) == set()                 # the default is passed: not read
    user.write_text("def f():\n    return read_a()\n")
    assert manifest_reads({user, mod}) == {"data_manifests/a.csv"}
    user.write_text("import m\ndef f():\n    return open(m.A)\n")
    assert manifest_reads({user, mod}) == {"data_manifests/a.csv"}      # named through its module


@pytest.mark.parametrize("stage", list(stages()))
def test_deps_list_every_manifest_the_stage_reads(stage):
    """A table of data_manifests/ read through a module constant (COCO's categories, the class
    mapping) shapes the outputs as much as a file on the command line."""
    st = stages()[stage]
    needed = set().union(*(closure(m) for c in st["cmd"] for m in cmd_modules(c)))
    missing = sorted(r for r in manifest_reads(needed) if not covered(r, st["deps"]))
    assert not missing, (f"dvc.yaml stage {stage!r} reads these data_manifests files through its code but does "
                         f"not list them in its deps: {missing}")


@pytest.mark.parametrize("stage", list(stages()))
def test_deps_list_every_path_the_command_reads(stage):
    st = stages()[stage]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    outs = st["outs"]
    missing = []
    for cmd in st["cmd"]:
        for option, value in path_args(cmd):
            implied = implied_reads(option, value, params)
            # an output: one of the outs, or their folder, or the stem they share (`--out reports/results`)
            is_out = covered(value, outs) or any(o.startswith(value) for o in outs)
            if not (is_out or option in ROOT_OPTIONS or read_is_dep(value, st["deps"], params)):
                missing.append(f"{option} {value}")
            missing += [f"{r} (read through {option})" for r in implied if not read_is_dep(r, st["deps"], params)]
    assert not missing, f"dvc.yaml stage {stage!r} reads these paths but does not list them in its deps: {missing}"

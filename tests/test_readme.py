"""Every command in the README runs as written (after `dvc repro`), and its stage examples are
the commands `dvc.yaml` runs.

- Every line of a fenced code block that starts with `python -m` (continuation lines joined) names
  a module whose `--help` exits 0, fast; every such command, and every inline `python -m ...` span,
  parses with its module's own argument parser (an unknown or misspelt flag fails), nothing run.
- The block under "Run one stage alone" holds only stage commands, each exactly one of dvc.yaml's
  (matrix and foreach expanded, `${...}` resolved against params.yaml), so none runs code defaults
  instead of the stage's settings.
- The cheap ones run for real: the report command in a scratch folder that links the committed
  inputs (`reports/models`, `runs`, `data`), and the export snippet (the ```python block) loads
  the embedded run's backbone into the architecture the README names.
"""
from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
HELP_LIMIT_S = 20.0            # per module, measured on 2 busy cores; torch at module top costs 5-10 s
RUN_FOR_REAL = ("eval.report",)  # cheap enough to run as written, in a scratch folder
# `python -m MODULE --help`, timed from the interpreter's start of the module to its exit
TIMED_HELP = """
import runpy, sys, time
module = sys.argv[1]
sys.argv = [module, "--help"]
t = time.perf_counter()
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    sys.stderr.write(f"\\nhelp took {time.perf_counter() - t:.2f} s, torch {'torch' in sys.modules}\\n")
"""


# `python -m MODULE ARGS...` up to its argument parsing, then exit 0 ("parsed"): the module's own
# parser judges the README's flags, and nothing of the command runs. The outermost parse stops it
# (parse_args, or parse_known_args when a launcher forwards the rest); a subcommand's inner parse
# does not.
PARSE_ONLY = """
import argparse, runpy, sys
module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
parse_args, parse_known_args = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
depth = [0]
def stop():
    sys.stderr.write("\\nparsed\\n")
    sys.exit(0)
def known(self, args=None, namespace=None):
    depth[0] += 1
    try:
        result = parse_known_args(self, args, namespace)
    finally:
        depth[0] -= 1
    if depth[0] == 0:
        stop()
    return result
def parse(self, args=None, namespace=None):
    depth[0] += 1                   # parse_args's own parse_known_args is not the outermost
    parse_args(self, args, namespace)
    stop()
argparse.ArgumentParser.parse_known_args, argparse.ArgumentParser.parse_args = known, parse
runpy.run_module(module, run_name="__main__", alter_sys=True)
sys.stderr.write("\\nthe module ended without parsing its arguments\\n")
sys.exit(3)
"""


def blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, offset) of every ``` fenced block."""
    return [(m.group(1), m.group(2), m.start()) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def commands(body: str) -> list[str]:
    """The `python -m` lines of a block, continuation lines (ending in a backslash) joined."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip().startswith("python -m ")]


def readme_commands() -> list[str]:
    return [c for _, body, _ in blocks(README.read_text()) for c in commands(body)]


def inline_spans() -> list[str]:
    """The README's inline `python -m ...` spans, whitespace normalised."""
    return [" ".join(m.split()) for m in re.findall(r"`(python -m [^`]+)`", README.read_text())]


def inline_commands() -> list[str]:
    """The spans with arguments (a bare `python -m MODULE` names the module, it is no command: its
    `--help` is checked)."""
    return [s for s in inline_spans() if len(s.split()) > 3]


def inline_modules() -> list[str]:
    return [s.split()[2] for s in inline_spans()]


def stage_block() -> list[str]:
    """The commands of the first block after the words "Run one stage alone"."""
    text = README.read_text()
    at = text.index("Run one stage alone")
    body = next(b for _, b, off in blocks(text) if off > at)
    return commands(body)


def _resolve(text: str, params: dict, item) -> str:
    def sub(m: re.Match) -> str:
        key = m.group(1).strip()
        node = item if key.startswith("item") else params
        for part in key.split(".")[1:] if key.startswith("item") else key.split("."):
            node = node[part]
        return str(node)
    return re.sub(r"\$\{([^}]+)\}", sub, text)


def dvc_commands() -> set[str]:
    """Every command dvc.yaml runs, matrix and foreach stages expanded, whitespace normalised."""
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    out = set()
    for st in doc["stages"].values():
        if "foreach" in st:
            items, body = _values(st["foreach"], params), st["do"]
        elif "matrix" in st:
            keys = list(st["matrix"])
            items = [dict(zip(keys, combo)) for combo in
                     itertools.product(*(_values(st["matrix"][k], params) for k in keys))]
            body = st
        else:
            items, body = [None], st
        cmds = body["cmd"] if isinstance(body["cmd"], list) else [body["cmd"]]
        out |= {" ".join(_resolve(c, params, it).split()) for c in cmds for it in items}
    return out


def _values(spec, params) -> list:
    return yaml.safe_load(_resolve(spec, params, None)) if isinstance(spec, str) else list(spec)


def test_readme_stage_examples_are_the_commands_dvc_runs():
    examples = stage_block()
    assert len(examples) >= 4, "the 'Run one stage alone' block lost its commands"
    known = dvc_commands()
    wrong = [c for c in examples if c not in known]
    assert not wrong, ("README's 'Run one stage alone' commands differ from dvc.yaml's (copy the stage's "
                       f"`cmd`, with `--params params.yaml`): {wrong}")


def test_every_readme_module_answers_help_fast():
    modules = sorted(({shlex.split(c)[2] for c in readme_commands()} | set(inline_modules())) - {"pytest"})
    assert {"pipeline.browse", "eval.oknn", "eval.report"} <= set(modules), modules
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # As many interpreters at a time as there are cores: all ~20 at once on 2 slow cores made each
    # take 28 s (a CI run), which timed the contention, not the module.
    at_once = max(1, os.cpu_count() or 1)
    runs = {}
    for start in range(0, len(modules), at_once):
        procs = {m: subprocess.Popen([sys.executable, "-c", TIMED_HELP, m], cwd=REPO, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for m in modules[start:start + at_once]}
        runs.update({m: (p, *p.communicate(timeout=120)) for m, p in procs.items()})
    failures = []
    for m, (p, out, err) in runs.items():
        found = re.search(r"help took ([\d.]+) s", err)
        seconds = float(found.group(1)) if found else None
        if p.returncode != 0 or "usage:" not in out:
            failures.append(f"{m}: exit {p.returncode}: {err[-500:]}")
        elif seconds is None or seconds > HELP_LIMIT_S:
            failures.append(f"{m}: --help took {seconds} s (import torch inside main())")
        elif m.startswith("pipeline.") and "torch True" in err:
            failures.append(f"{m}: --help imports torch (a pipeline stage imports it inside main(), if at all)")
    assert not failures, failures


def test_every_readme_command_parses_with_its_module_parser():
    cmds = sorted({c for c in readme_commands() + inline_commands() if shlex.split(c)[2] != "pytest"})
    assert any("pipeline.readers rebase" in c for c in cmds) and any("--ray-address" in c for c in cmds), cmds
    env = dict(os.environ, PYTHONPATH=str(REPO))
    failures = []
    for chunk in range(0, len(cmds), 4):                       # 4 interpreters at a time
        procs = {c: subprocess.Popen([sys.executable, "-c", PARSE_ONLY, *shlex.split(c, comments=True)[2:]],
                                     cwd=REPO, env=env,
                                     text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for c in cmds[chunk:chunk + 4]}
        for c, p in procs.items():
            _, err = p.communicate(timeout=180)
            if p.returncode != 0 or not err.rstrip().endswith("parsed"):
                failures.append(f"{c}\n    exit {p.returncode}: {err.strip()[-400:]}")
    assert not failures, "README commands its module's parser refuses:\n" + "\n".join(failures)


def _committed(*paths: str) -> None:
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"{missing} missing: the README's commands run after `dvc repro` (run it first)"


def test_the_cheap_readme_commands_run_for_real(tmp_path):
    runnable = [c for c in readme_commands() if shlex.split(c)[2] in RUN_FOR_REAL]
    assert runnable, f"the README has no command of {RUN_FOR_REAL} any more"
    _committed("reports/models", "runs", "data/openimage_mini/stats.json", "data/proposals/summary.json")
    for name in ("reports/models", "runs", "data", "params.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(REPO / name)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for c in runnable:
        r = subprocess.run(shlex.split(c.replace("python", sys.executable, 1)), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{c}\n{r.stderr[-2000:]}"
    md = (tmp_path / "reports" / "results.md").read_text()
    for png in ("results_loss.png", "oknn_curve.png"):
        assert f"]({png})" in md and (tmp_path / "reports" / png).stat().st_size > 1000
    assert "## Selective-search proposals" in md


def test_the_export_snippet_loads_the_embedded_backbone():
    snippet = [b for lang, b, _ in blocks(README.read_text()) if lang == "python" and "backbone.pth" in b]
    assert len(snippet) == 1, "the README's export snippet (```python ... backbone.pth) went missing"
    path = re.search(r'torch\.load\("([^"]+)"', snippet[0]).group(1)
    _committed(path)
    r = subprocess.run([sys.executable, "-c", snippet[0]], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]

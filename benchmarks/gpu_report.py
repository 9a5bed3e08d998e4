"""The report of `benchmarks.gpu_check`: the machine, the loader against the trainer, the figures
of each check in words, and the markdown summary beside gpu_check.json."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from benchmarks.gpu_check import METHOD_NAMES, REPO


def machine(smoke: bool) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "host": platform.node(), "mode": "cpu-smoke" if smoke else "gpu"}
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()  # noqa: E731
        info["git"] = {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except Exception:             # noqa: BLE001 - a copy without git
        pass
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return info


def add_loader_vs_trainer(checks: list[dict]) -> None:
    """Loader samples/s against what each method consumes (images/s, eager, same run)."""
    eager = {c["figures"]["method"]: c["figures"]["images_per_s"] for c in checks
             if c["name"].startswith("throughput.eager.") and c["status"] == "pass" and "method" in c["figures"]}
    for c in checks:
        if c["name"].startswith("loader.") and c["status"] == "pass":
            sps = c["figures"]["samples_per_s"]
            c["figures"]["trainer_images_per_s"] = eager
            c["figures"]["loader_over_trainer"] = {m: round(sps / v, 3) for m, v in eager.items() if v}
            c["figures"]["keeps_up"] = {m: sps >= v for m, v in eager.items()}


def loader_summary(checks: list[dict]) -> dict:
    """Per method: the fewest loader workers measured whose samples/s reach its images/s (None: none did)."""
    rows = sorted((c["figures"]["workers"], c["figures"]) for c in checks
                  if c["name"].startswith("loader.") and c["status"] == "pass")
    out = {}
    for m in METHOD_NAMES:
        enough = [w for w, f in rows if f.get("keeps_up", {}).get(m)]
        if rows and m in rows[0][1].get("keeps_up", {}):
            out[m] = enough[0] if enough else None
    return out


def fmt_figures(c: dict) -> str:
    f = c.get("figures") or {}
    if c["name"] == "cuda_tests":
        if "tests" not in f:
            return ""
        return f"{f.get('passed')} passed, {f.get('failed')} failed, {f.get('skipped')} skipped of {f.get('tests')}"
    if c["name"].startswith("throughput."):
        if "images_per_s" not in f:
            return ""
        parts = [f"{f['images_per_s']} img/s"]
        if "ratio_to_baseline" in f:
            parts.append(f"{f['ratio_to_baseline']:.2f}x baseline")
        if f.get("peak_gib") is not None:
            parts.append(f"peak {f['peak_gib']} GiB")
        return ", ".join(parts)
    if c["name"].startswith("loader."):
        if "samples_per_s" not in f:
            return ""
        over = f.get("loader_over_trainer") or {}
        return f"{f['samples_per_s']} samples/s" + (
            "; vs trainer " + ", ".join(f"{m} {r:.2f}x" for m, r in over.items()) if over else "")
    return ""


def write_markdown(path: Path, report: dict) -> None:
    m = report["machine"]
    lines = [f"# GPU check ({m['mode']}), {report['started']}", "",
             f"Machine: {m.get('gpu', 'no GPU')}, {m['cpu_count']} CPU cores, torch {m['torch']}"
             f"{', CUDA ' + m['cuda'] if m.get('cuda') else ''}. Total {report['elapsed_s']} s of a "
             f"{report['budget_s']} s budget; {report['counts']['pass']} pass, {report['counts']['fail']} fail, "
             f"{report['counts']['skipped']} skipped.", "",
             "| check | status | figures | s |", "|---|---|---|---|"]
    tail = []
    if report.get("loader_workers_to_keep_up"):
        tail = ["", "Loader workers that keep one process's trainer fed (fewest measured; none: no count did): "
                + ", ".join(f"{m} {w if w is not None else 'none'}" for m, w in report["loader_workers_to_keep_up"].items())
                + f" (of {', '.join(map(str, report['settings']['loader_workers']))} measured)."]
    for c in report["checks"]:
        status = c["status"] + (f" ({c['error'][:120]})" if c.get("error") else "")
        lines.append(f"| `{c['name']}` | {status.replace('|', '/')} | {fmt_figures(c).replace('|', '/')} | {c['seconds']} |")
    path.write_text("\n".join(lines + tail) + "\n")


def build_report(checks: list[dict], groups_s: dict, s: dict, budget: float, t_start: float,
                 planned: list[str]) -> dict:
    """gpu_check.json: the machine, settings, counts, loader-vs-trainer figures and every check."""
    import time

    add_loader_vs_trainer(checks)
    counts = {"pass": sum(c["status"] == "pass" for c in checks), "fail": sum(c["status"] == "fail" for c in checks),
              "skipped": sum(c["status"].startswith("skipped") for c in checks),
              "out_of_budget": sum(c["status"] == "skipped: budget" for c in checks)}
    return {"issue": 17, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t_start)),
            "elapsed_s": round(time.time() - t_start, 1), "budget_s": budget, "machine": machine(s["smoke"]),
            "settings": {k: v for k, v in s.items() if k != "deadline"}, "planned": planned,
            "counts": counts, "passed": counts["fail"] == counts["out_of_budget"] == 0,
            "loader_workers_to_keep_up": loader_summary(checks), "groups_s": groups_s, "checks": checks}

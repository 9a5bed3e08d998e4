"""Experiment harness: train one method for N steps on the shards and measure O-KNN on
checkpoints along the way, so that a setting is judged in minutes, not by a whole `dvc repro`.

    python -m benchmarks.harness --name d3ssl_base --method d3ssl --steps 240 --eval-at 60 120 240 \
        [--params params.yaml] [--set pretrain.base_lr=0.3 --set loader.views.size=96 ...] \
        [--shards data/shards] [--coco-root data/synth/coco] [--seed 0] [--out reports/experiments]
    python -m benchmarks.harness --plot reports/experiments/d3ssl_base reports/experiments/soco_base \
        --out reports/experiments/compare.png
    python -m benchmarks.harness --seed-summary reports/experiments/r4_d3ssl_s450 \
        reports/experiments/r5_d3ssl_s450_seed1 reports/experiments/r5_d3ssl_s450_seed2 \
        --out reports/experiments/seeds.json      # a setting's runs on several seeds, against random
                                                  # (the runs' own step 0 over their seeds)

Each run writes `OUT/NAME/`: `params.yaml` (the params file with the `--set` overrides and the
values the harness sets itself, `pretrain.epochs` from `--steps`, `pretrain.seed` from `--seed` and
`pretrain.checkpoint_every`: the file the run read, what ran),
`curve.json` (settings, per evaluated step: O-KNN top-1/top-5 and disturbed, the training health
of `summary.json`, wall seconds of training and of evaluation; step 0 is the run's initial
network, seeded by `--seed`) and `curve.png`. The schedule is that of `--steps` (warm-up and
cosine decay end there); evaluations resume the same run, so the curve is one training run seen
at several steps. The run folder
(`OUT/NAME/run`, checkpoints) is left out of git by `.gitignore`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import yaml

from benchmarks import save_png
from eval.report_checks import RANDOM_MARGIN, clear_gap
from eval.report_plots import pyplot
from pipeline import cli
from pipeline.files import write_text

log = logging.getLogger("benchmarks.harness")


def set_key(doc: dict, dotted: str, value) -> None:
    """doc[a][b][c] = value for 'a.b.c'; every key but the last must exist (a typo is an error)."""
    *path, last = dotted.split(".")
    node = doc
    for i, k in enumerate(path):
        if not isinstance(node, dict) or k not in node:
            raise KeyError(f"--set {dotted}: no key {'.'.join(path[:i + 1])!r} in the params file")
        node = node[k]
    if not isinstance(node, dict) or last not in node:
        raise KeyError(f"--set {dotted}: no key {dotted!r} in the params file")
    node[last] = value


def write_params(base: Path, overrides: list[str], path: Path) -> dict:
    doc = yaml.safe_load(base.read_text())
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: write KEY=VALUE, e.g. pretrain.base_lr=0.3")
        set_key(doc, key, yaml.safe_load(raw))
    write_text(path, yaml.safe_dump(doc, sort_keys=False))
    return doc


def finalise_params(path: Path, doc: dict, **pretrain_values) -> None:
    """Write `pretrain_values` into the `pretrain` section of the params file at `path` (`doc`, what
    `write_params` wrote), so that the folder's params.yaml is the file the run reads: before, the
    harness set epochs and seed on the loaded config after copying, and a folder's params.yaml said
    the base file's epochs (12) while its run used another (65, recorded only in curve.json)."""
    doc["pretrain"] = {**(doc.get("pretrain") or {}), **pretrain_values}
    write_text(path, yaml.safe_dump(doc, sort_keys=False))


def evaluate(backbone: str, arch: str, params: Path, coco_root: Path, out: Path) -> dict:
    from eval.oknn import main as oknn_main

    oknn_main(["--backbone", backbone, "--arch", arch, "--coco-root", str(coco_root), "--out", str(out),
               "--params", str(params), "--device", "cpu"])
    r = json.loads(out.read_text())
    return {k: r[k] for k in ("top1", "top5", "disturbed_top1", "disturbed_top5", "prior_top1")}


def run(args) -> dict:
    from dataclasses import replace

    from train.export import export
    from train.pretrain import load_config, method_config, train
    from pipeline.shardset import shards as read_index
    from train.stream import batches_per_worker

    out = args.out / args.name
    params = out / "params.yaml"
    doc = write_params(args.params, args.set, params)
    loader = load_config(params).loader
    _, total = read_index(args.shards)
    steps_per_epoch = max(loader.workers, 1) * batches_per_worker(loader, total, 1)
    epochs = math.ceil(args.steps / steps_per_epoch)
    finalise_params(params, doc, epochs=epochs, seed=args.seed, checkpoint_every=10 ** 9)
    cfg = load_config(params)
    mcfg = method_config(args.method, params)
    run_dir = out / "run"
    points = []
    t = time.perf_counter()
    # step 0: the run's own initial network (the trainer seeds torch with the run's seed before it
    # builds the student, as `train.export --random --seed` does), not O-KNN's "random", whose seed
    # is the protocol's (the bank choice), the same for every run
    export(None, run_dir / "init", cfg.arch, args.seed)
    points.append({"step": 0, **evaluate(str(run_dir / "init" / "backbone.pth"), cfg.arch, params, args.coco_root,
                                         out / "oknn_step0.json"),
                   "eval_s": time.perf_counter() - t, "train_s": 0.0})
    log.info("step 0: O-KNN top-1 %.2f", points[-1]["top1"])
    for step in sorted(set(args.eval_at) | {args.steps}):
        if step > epochs * steps_per_epoch:
            break
        t = time.perf_counter()
        summary = train(args.shards, run_dir, args.method, replace(cfg, max_steps=step), mcfg,
                        resume=(run_dir / "checkpoint.pt").is_file(), device="cpu", progress=False)
        train_s = time.perf_counter() - t
        export(run_dir / "checkpoint.pt", run_dir / "export")
        t = time.perf_counter()
        res = evaluate(str(run_dir / "export" / "backbone.pth"), cfg.arch, params, args.coco_root,
                       out / f"oknn_step{step}.json")
        points.append({"step": summary["steps"], **res, "health": summary["health"], "train_s": train_s,
                       "eval_s": time.perf_counter() - t})
        log.info("step %d: O-KNN top-1 %.2f (train %.0f s); health %s", summary["steps"], res["top1"], train_s,
                 {k: summary["health"].get(k) for k in ("loss_over_chance", "top1", "key_std")})
    result = {"name": args.name, "method": args.method, "steps": args.steps, "seed": args.seed,
              "overrides": args.set, "steps_per_epoch": steps_per_epoch, "epochs": epochs, "points": points}
    write_text(out / "curve.json", json.dumps(result, indent=2) + "\n")
    plot([result], out / "curve.png")
    return result


def plot(results: list[dict], path: Path) -> None:
    """One line per run: the colour names the method, the line style the seed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    methods = sorted({r["method"] for r in results})
    styles = ("-", "--", ":", "-.")
    for r in results:
        steps = [p["step"] for p in r["points"]]
        ax.plot(steps, [p["top1"] for p in r["points"]], marker="o", label=r["name"],
                color=f"C{methods.index(r['method']) % 10}", ls=styles[r.get("seed", 0) % len(styles)])
    if results:
        ax.axhline(results[0]["points"][0]["prior_top1"], color="grey", ls=":", lw=0.8, label="label prior")
    ax.set_xlabel("pre-training step")
    ax.set_ylabel("O-KNN top-1 (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_png(fig, path)


def _five_points_clear(seeds: int, mean: float, std: float, floor: dict) -> bool:
    """The issue's test of a setting against random, the report's own (eval.report_checks.clear_gap
    with its 5-point margin): at least MIN_RUNS distinct seeds on each side, a mean more than 5
    points above random's, and above it by more than the sum of the two standard deviations."""
    return clear_gap({"mean": mean, "std": std, "n": seeds}, floor, margin=RANDOM_MARGIN)


def _floor(results: Path) -> dict:
    """The random row of the report, {"mean", "std", "n"}: clear_gap needs the run count of both
    sides, which eval.report records (`n`); a results file without it is an error naming it."""
    floor = dict(json.loads(results.read_text())["results"]["random"]["oknn_top1"])
    if floor.get("n") is None:
        raise ValueError(f"{results}: results.random.oknn_top1 has no run count 'n' (an eval.report older than "
                         "the run counts): rerun the report stage (dvc repro report)")
    return floor


def _init_floor(runs: list[tuple[Path, dict]]) -> dict:
    """The random floor from the runs themselves: the step-0 point of each seed (the run's network
    before training, seeded by its seed, evaluated with the run's own O-KNN settings), one per seed,
    {"mean", "std", "n"} over the seeds. This is the `random` model of the pipeline for those seeds
    (the same seeded initialisation and protocol), measured beside the runs it is compared with, so
    the summary is regenerated from the folders alone. Two runs of one seed with different step-0
    values were measured with different settings: an error naming both folders."""
    import statistics

    by_seed: dict[int, tuple[Path, float]] = {}
    for folder, r in runs:
        first = r["points"][0]
        if first["step"] != 0:
            raise ValueError(f"{folder / 'curve.json'}: its first point is step {first['step']}, not the untrained "
                             "step 0; pass --results reports/results.json for the report's random floor")
        seen = by_seed.setdefault(r["seed"], (folder, first["top1"]))
        if seen[1] != first["top1"]:
            raise ValueError(f"seed {r['seed']}: step 0 is {seen[1]} in {seen[0]} and {first['top1']} in {folder}: "
                             "their O-KNN settings differ; summarise runs of one protocol")
    values = [v for _, v in by_seed.values()]
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def seed_summary(folders: list[Path], results: Path | None = None) -> dict:
    """Runs of one setting on several seeds, grouped by (method, schedule, overrides): the end of
    each schedule, its mean and sample std over the runs, and the issue's test against random
    (`_five_points_clear`). Random is the runs' own step 0 over their seeds (`_init_floor`), or,
    with `results` (reports/results.json), the report's `random` row, whose seeds are the
    report's and may not be the runs'.

    `by_step` applies the same test at every step all runs of a group evaluated, so one long
    schedule also says where the gap appears; a point inside a schedule is the run before its
    cosine decay ends (a higher learning rate than at the end of a schedule of that length), and
    `first_clear_step` is the first such step (null: none)."""
    import statistics

    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    curves = [(d, json.loads((d / "curve.json").read_text())) for d in folders]
    floor = _floor(results) if results is not None else _init_floor(curves)
    source = str(results) if results is not None else \
        f"step 0 (the untrained network) of these runs, one per seed: {floor['n']} seeds"
    groups: dict[tuple, list[dict]] = {}
    for d, r in curves:
        first, last = r["points"][0], r["points"][-1]
        row = {"name": r["name"], "seed": r["seed"], "init": first["top1"], "step": last["step"], "end": last["top1"],
               "gain": last["top1"] - first["top1"], "by_step": {p["step"]: p["top1"] for p in r["points"]}}
        groups.setdefault((r["method"], r["steps"], tuple(r["overrides"])), []).append(row)
    out = []
    for (method, steps, overrides), rows in sorted(groups.items()):
        mean, std = stats([x["end"] for x in rows])
        gap = mean - floor["mean"]
        seeds = len({x["seed"] for x in rows})       # repeats of one seed are not more seeds
        by_step = []
        for step in sorted(set.intersection(*(set(x["by_step"]) for x in rows))):
            m, s = stats([x["by_step"][step] for x in rows])
            by_step.append({"step": step, "mean": m, "std": s, "gap_over_random": m - floor["mean"],
                            "five_points_clear": _five_points_clear(seeds, m, s, floor)})
        runs = [{k: v for k, v in x.items() if k != "by_step"} for x in sorted(rows, key=lambda x: x["seed"])]
        out.append({"method": method, "steps": steps, "overrides": list(overrides), "n": len(rows), "seeds": seeds,
                    "runs": runs, "mean": mean, "std": std,
                    "mean_gain_over_init": statistics.mean(x["gain"] for x in rows), "gap_over_random": gap,
                    "five_points_clear": _five_points_clear(seeds, mean, std, floor), "by_step": by_step,
                    "first_clear_step": next((b["step"] for b in by_step if b["five_points_clear"]), None)})
    return {"random": {"mean": floor["mean"], "std": floor["std"], "n": floor["n"], "from": source}, "settings": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.harness", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", help="experiment name (a folder under --out)")
    p.add_argument("--method", default="d3ssl", help="d3ssl, d3ssl_dc, soco, mocov2 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=240, help="schedule length in steps (default: %(default)s)")
    p.add_argument("--eval-at", type=int, nargs="*", default=[], help="also evaluate after these steps")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="base params (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params key, e.g. pretrain.base_lr=0.3 (repeatable)")
    p.add_argument("--shards", type=Path, default=Path("data/shards"), help="default: %(default)s")
    p.add_argument("--coco-root", type=Path, default=Path("data/synth/coco"), help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="pre-training seed (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("reports/experiments"), help="default: %(default)s")
    p.add_argument("--plot", type=Path, nargs="*", help="instead of a run: overlay the curves of these folders into --out (a .png)")
    p.add_argument("--seed-summary", type=Path, nargs="*",
                   help="instead of a run: group these folders' runs by setting, mean and std over seeds against "
                        "random (the runs' step 0, or --results), into --out (a .json)")
    p.add_argument("--results", type=Path, default=None,
                   help="with --seed-summary: take the random floor from this report's random row (e.g. "
                        "reports/results.json) instead of the runs' own step 0, one per seed (the default)")
    args = p.parse_args(argv)
    cli.setup_logging()
    if args.plot:
        plot([json.loads((d / "curve.json").read_text()) for d in args.plot], args.out)
        return 0
    if args.seed_summary:
        summary = seed_summary(args.seed_summary, args.results)
        write_text(args.out, json.dumps(summary, indent=2) + "\n")
        for g in summary["settings"]:
            log.info("%s, %d steps %s: %.2f +- %.2f over %d seeds (random %.2f): gap %+.2f, 5 points clear: %s "
                     "(first at step %s)", g["method"], g["steps"], " ".join(g["overrides"]), g["mean"], g["std"],
                     g["seeds"], summary["random"]["mean"], g["gap_over_random"], g["five_points_clear"],
                     "none" if g["first_clear_step"] is None else g["first_clear_step"])
        return 0
    if not args.name:
        p.error("--name is required for a run")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

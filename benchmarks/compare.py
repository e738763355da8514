"""Comparisons and ablations: one config names the runs, this script runs and tabulates.

    python benchmarks/compare.py configs/pretrain/compare_20m.yaml        # the comparison
    python benchmarks/compare.py configs/pretrain/ablation_rank.yaml --jobs 2
    python benchmarks/compare.py configs/pretrain/compare_20m.yaml --only adamw grass
    python benchmarks/compare.py configs/finetune/tuned_default.yaml      # finetuning

A config holds ``script`` (``pretrain``, the default, or ``finetune``: which of ``scripts/`` each
run is), ``flags`` (that script's flags shared by every run), ``seeds`` and ``runs`` (name -> the
flags that make that run different), or, for a tuned comparison, ``methods`` in place of
``runs``::

    methods:
      grass:
        flags: {optim: grass, grass_rank: 32}
        grid: {learning_rate: [3.0e-3, 1.0e-2], grass_scale: [0.25, 1.0]}
      galore:
        flags: {optim: galore_adamw, optim_args: {rank: 32, update_proj_gap: 200}}
        grid: {learning_rate: [3.0e-3, 1.0e-2], optim_args.scale: [0.25, 1.0]}

Each method's grid (every combination; ``optim_args.<key>`` sets one key of its ``optim_args``)
runs on the first seed; the point with the best final validation metric (pretraining: the lowest
perplexity; finetuning: the highest accuracy, then the lowest loss) is chosen and run on the
other seeds. With ``hold_out_test: true`` among the flags every run also reports the test split
that neither training nor tuning saw: the tuned table reports the test metric (mean, min-max over
seeds) and, per seed, the difference from the ``reference`` method. Grids of unequal size are
named in a warning line (equal tuning budgets are the point). Each run and seed is the script in
its own process with the same model, data and budget, so memory and timing are the run's own. A
run whose output folder already holds ``eval_results.json`` is read back, not rerun (delete the
folder to rerun it).

Writes to ``--out`` (default ``benchmarks/results/<script>/<config name>``; a tuned comparison
also writes ``tuning.md``, every grid point's validation metric): ``summary.json`` (every run's
final validation loss and metric, the test metric, optimizer-state and peak-gradient bytes,
tokens/s, wall time, and the validation curve where the run evaluated during training),
``table.md`` (the Markdown table it prints: the metric as the mean over seeds with the spread
min-max) and ``val_loss.png`` (validation loss against tokens, one line per run, averaged over
seeds; pretraining). With ``--jobs 2`` two runs share the machine (one thread each): losses are
the same as alone (same seeds, deterministic CPU kernels) but the timings are not comparable;
time methods with ``--jobs 1`` and nothing else running.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Task:
    """What a comparison runs (one of ``scripts/``) and the metric it ranks runs by."""

    script: str
    metric: str  # the key of eval_results.json; test_results.json prefixes it with "test_"
    eval_key: str
    higher_is_better: bool
    digits: int

    def score(self, run: dict[str, Any]) -> tuple[float, float]:
        """A key whose minimum is the best run: its metric, then its validation loss."""
        sign = -1.0 if self.higher_is_better else 1.0
        return sign * run[self.metric], run["eval_loss"]

    def format(self, value: float) -> str:
        return f"{value:.{self.digits}f}"


TASKS = {
    "pretrain": Task("pretrain", "perplexity", "perplexity", False, 2),
    "finetune": Task("finetune", "accuracy", "eval_accuracy", True, 4),
}


def load_spec(path: str) -> dict[str, Any]:
    spec = yaml.safe_load(Path(path).read_text())
    key = "methods" if "methods" in spec else "runs"
    for needed in ("flags", key):
        if not isinstance(spec.get(needed), dict):
            raise SystemExit(f"{path}: needs a '{needed}' mapping (see benchmarks/compare.py)")
    spec.setdefault("seeds", [42])
    spec.setdefault("script", "pretrain")
    if spec["script"] not in TASKS:
        raise SystemExit(f"{path}: script {spec['script']!r} is not one of {', '.join(TASKS)}")
    return spec


def grid_points(method: str, entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run name -> flags for every combination of a method's grid."""
    return {name: flags for name, flags, _ in _grid(method, entry)}


def grid_edges(method: str, entry: dict[str, Any], name: str) -> list[str]:
    """The knobs at which the grid point ``name`` sits at the low or high end of a knob's
    several numeric values: where a chosen point does, the optimum may lie outside the grid."""
    grid = entry.get("grid") or {}
    values = next((v for n, _, v in _grid(method, entry) if n == name), None)
    if values is None:
        return []
    edges = []
    for key, value in zip(grid, values, strict=True):
        numbers = [v for v in grid[key] if isinstance(v, int | float)]
        if len(numbers) < 2 or value not in (min(numbers), max(numbers)):
            continue
        edges.append(f"{key} {value:g} is the {'lowest' if value == min(numbers) else 'highest'}")
    return edges


def _grid(method: str, entry: dict[str, Any]) -> list[tuple[str, dict[str, Any], tuple]]:
    """(run name, flags, the grid's values) for every combination of a method's grid."""
    grid = entry.get("grid") or {}
    points = []
    for values in itertools.product(*grid.values()):
        flags = {**(entry.get("flags") or {})}
        args = flags.get("optim_args") or {}
        if isinstance(args, str):  # "rank=32,scale=0.25" as HF's --optim_args writes it
            args = dict(pair.split("=", 1) for pair in args.split(","))
        args = dict(args)
        label = [method]
        for key, value in zip(grid, values, strict=True):
            if key.startswith("optim_args."):
                args[key.removeprefix("optim_args.")] = value
            else:
                flags[key] = value
            short = key.split(".")[-1].removeprefix("grass_").replace("learning_rate", "lr")
            label.append(f"{short}{value:g}" if isinstance(value, float) else f"{short}{value}")
        if args:
            flags["optim_args"] = ",".join(f"{k}={v}" for k, v in args.items())
        points.append(("-".join(label), flags, values))
    return points


def as_flags(mapping: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for key, value in mapping.items():
        values = value if isinstance(value, list) else [value]
        flags += [f"--{key}", *(str(v) for v in values)]
    return flags


def run_one(
    task: Task, name: str, seed: int, flags: list[str], out: Path, threads: int, read_only: bool
) -> dict[str, Any]:
    """The task's script in its own process; its results read back from ``out``. With
    ``read_only``, a run not finished before is not started and counts as missing."""
    if not (out / "eval_results.json").is_file():
        if read_only:
            return {"name": name, "seed": seed, "failed": True, "missing": True}
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        script = REPO / "scripts" / f"{task.script}.py"
        cmd = [sys.executable, str(script), *flags, "--seed", str(seed)]
        cmd += ["--output_dir", str(out), "--disable_tqdm", "true"]
        t0 = time.time()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            print(f"  {name} seed {seed}: FAILED ({' '.join(tail)})", flush=True)
            return {"name": name, "seed": seed, "failed": True}
        print(f"  {name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return read_run(task, name, seed, out)


def read_run(task: Task, name: str, seed: int, out: Path) -> dict[str, Any]:
    final = json.loads((out / "eval_results.json").read_text())
    report = json.loads((out / "resource_report.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    tokens_per_step = report["train_tokens"] / max(report["steps"], 1)
    curve = [
        (e["step"] * tokens_per_step, e["eval_loss"])
        for e in state["log_history"]
        if "eval_loss" in e
    ]
    test_file = out / "test_results.json"
    test = json.loads(test_file.read_text()) if test_file.is_file() else {}
    return {
        "name": name,
        "seed": seed,
        "eval_loss": final["eval_loss"],
        task.metric: final[task.eval_key],
        "test_loss": test.get("test_loss"),
        f"test_{task.metric}": test.get(f"test_{task.metric}"),
        "optimizer_state_bytes": report["optimizer_state_bytes"],
        "peak_grad_bytes": report["peak_grad_bytes"],
        "tokens_per_s": report["tokens_per_s"],
        "s_per_step": report["s_per_step"],
        "train_wall_s": report["train_wall_s"],
        "train_tokens": report["train_tokens"],
        "curve": curve,
    }


def table(task: Task, results: list[dict[str, Any]], runs: list[str], jobs: int) -> str:
    timing = "" if jobs == 1 else f" (timings under --jobs {jobs}: not comparable)"
    lines = [
        f"| run | val {task.metric} | spread | state MiB | peak grad MiB | tokens/s{timing} "
        "| s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in runs:
        ok = [r for r in results if r["name"] == name and not r.get("failed")]
        if not ok:
            lines.append(f"| {name} | failed | | | | | |")
            continue
        values = [r[task.metric] for r in ok]
        spread = (
            f"{task.format(min(values))}-{task.format(max(values))} ({len(ok)} seeds)"
            if len(ok) > 1
            else "1 seed"
        )
        first = ok[0]
        lines.append(
            f"| {name} | {task.format(statistics.mean(values))} | {spread} | "
            f"{first['optimizer_state_bytes'] / 2**20:.1f} | {first['peak_grad_bytes'] / 2**20:.1f} "
            f"| {statistics.mean(r['tokens_per_s'] for r in ok):,.0f} "
            f"| {statistics.mean(r['s_per_step'] for r in ok):.3f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], runs: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(r.get("curve") for r in results):
        return  # no evaluation during training (finetuning evaluates once, at the end)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in runs:
        curves = [r["curve"] for r in results if r["name"] == name and not r.get("failed")]
        if not curves or not all(curves):
            continue
        n = min(len(c) for c in curves)
        tokens = [curves[0][i][0] for i in range(n)]
        loss = [statistics.mean(c[i][1] for c in curves) for i in range(n)]
        ax.plot([t / 1e6 for t in tokens], loss, marker=".", label=name)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tuned_table(
    task: Task,
    results: list[dict[str, Any]],
    chosen: dict[str, str],
    reference: str | None,
    jobs: int,
) -> str:
    """One row per method at its chosen point: the test (or validation) metric over seeds, and
    the per-seed difference from the reference method's."""
    ok_runs = [r for r in results if not r.get("failed")]
    test_metric = f"test_{task.metric}"
    tested = all(r.get(test_metric) is not None for r in ok_runs)
    metric = test_metric if tested else task.metric
    split = "test" if tested else "val"
    timing = "" if jobs == 1 else f" (under --jobs {jobs}: not comparable)"
    by_seed = {(r["name"], r["seed"]): r[metric] for r in ok_runs if r["name"] in chosen.values()}
    lines = [
        f"| method | chosen | {split} {task.metric} | min-max | vs {reference} per seed "
        f"| val {task.metric} | state MiB | tokens/s{timing} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, name in chosen.items():
        ok = [r for r in results if r["name"] == name and not r.get("failed")]
        values = [r[metric] for r in ok]
        diffs = [
            by_seed[(name, r["seed"])] - by_seed[(chosen[reference], r["seed"])]
            for r in ok
            if reference and (chosen[reference], r["seed"]) in by_seed
        ]
        d = task.digits
        paired = (
            ""
            if method == reference or not diffs
            else f"{statistics.mean(diffs):+.{d}f} ({min(diffs):+.{d}f} to {max(diffs):+.{d}f})"
        )
        lines.append(
            f"| {method} | {name} | {task.format(statistics.mean(values))} | "
            f"{task.format(min(values))}-{task.format(max(values))} ({len(ok)} seeds) | {paired} | "
            f"{task.format(statistics.mean(r[task.metric] for r in ok))} | "
            f"{ok[0]['optimizer_state_bytes'] / 2**20:.1f} | "
            f"{statistics.mean(r['tokens_per_s'] for r in ok):,.0f} |"
        )
    return "\n".join(lines)


def tuning_table(
    task: Task, results: list[dict[str, Any]], grids: dict[str, list[str]], seed: int
) -> str:
    lines = [
        f"| method | grid point | val {task.metric} (seed {seed}) | chosen |",
        "|---|---|---|---|",
    ]
    for method, names in grids.items():
        scored = {r["name"]: r for r in results if r["name"] in names and r["seed"] == seed}
        best = _best(task, scored.values())
        for name in names:
            r = scored.get(name)
            value = (
                "not run" if r is None or r.get("missing")
                else "failed" if r.get("failed")
                else task.format(r[task.metric])
            )  # fmt: skip
            lines.append(f"| {method} | {name} | {value} | {'yes' if r is best else ''} |")
    return "\n".join(lines)


def _best(task: Task, results) -> dict[str, Any] | None:
    return min((r for r in results if not r.get("failed")), key=task.score, default=None)


def run_all(
    task: Task, jobs: list[tuple], workers: int, read_only: bool = False
) -> list[dict[str, Any]]:
    threads = max(1, (os.cpu_count() or 1) // workers)
    print(f"{len(jobs)} runs, {workers} at a time, {threads} thread(s) each", flush=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(
            pool.map(lambda job: run_one(task, *job, threads=threads, read_only=read_only), jobs)
        )


def _versions() -> dict[str, str | None]:
    """The versions of Python and of the packages a run's numbers depend on."""
    import importlib.metadata
    import platform

    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "galore-torch", "apollo-torch"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "config", help="a YAML of flags, seeds and runs (configs/pretrain/, configs/finetune/)"
    )
    parser.add_argument("--only", nargs="+", help="run only these runs (or methods) of the config")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    parser.add_argument("--out", help="output folder (default benchmarks/results/SCRIPT/NAME)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    parser.add_argument(
        "--read-only",
        action="store_true",
        help="start no run: tabulate the runs finished before (the others count as not run)",
    )
    args = parser.parse_args()
    spec = load_spec(args.config)
    task = TASKS[spec["script"]]
    name = Path(args.config).stem
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / task.script / name
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or spec["seeds"]
    title = spec.get("title", name)
    summary: dict[str, Any] = {
        "config": str(args.config),
        "title": title,
        "script": task.script,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "flags": spec["flags"],
    }

    def job(run: str, seed: int, flags: dict[str, Any]) -> tuple:
        return (run, seed, as_flags({**spec["flags"], **flags}), out / f"{run}-s{seed}")

    if "methods" in spec:
        methods = {m: e for m, e in spec["methods"].items() if not args.only or m in args.only}
        points = {m: grid_points(m, entry) for m, entry in methods.items()}
        sizes = {m: len(p) for m, p in points.items()}
        if len(set(sizes.values())) > 1:
            print(f"warning: unequal tuning budgets (grid points per method: {sizes})", flush=True)
        print(f"{name}: tuning on seed {seeds[0]}", flush=True)
        every = {run: flags for p in points.values() for run, flags in p.items()}
        results = run_all(
            task,
            [job(run, seeds[0], flags) for run, flags in every.items()],
            args.jobs,
            args.read_only,
        )
        chosen = {}
        for method, p in points.items():
            best = _best(task, (r for r in results if r["name"] in p))
            if best is not None:
                chosen[method] = best["name"]
        print(f"{name}: chosen {chosen}; seeds {seeds[1:]}", flush=True)
        results += run_all(
            task,
            [job(run, seed, every[run]) for seed in seeds[1:] for run in chosen.values()],
            args.jobs,
            args.read_only,
        )
        reference = spec.get("reference")
        reference = reference if reference in chosen else None
        text = tuned_table(task, results, chosen, reference, args.jobs)
        grids = {m: list(p) for m, p in points.items()}
        tuning = tuning_table(task, results, grids, seeds[0])
        edges = {m: grid_edges(m, methods[m], name) for m, name in chosen.items()}
        tuning += "".join(
            f"\n\n{m} is chosen at an edge of its grid ({'; '.join(e)}): its optimum may lie "
            "outside the grid."
            for m, e in edges.items()
            if e
        )
        (out / "tuning.md").write_text(f"{title}: tuning\n\n{tuning}\n")
        summary |= {"methods": methods, "grids": grids, "chosen": chosen, "reference": reference}
        summary["chosen_at_grid_edge"] = {m: e for m, e in edges.items() if e}
        runs = list(chosen.values())
        print(f"\n{tuning}\n", flush=True)
    else:
        runs = [r for r in spec["runs"] if not args.only or r in args.only]
        jobs = [job(run, seed, spec["runs"][run] or {}) for seed in seeds for run in runs]
        results = run_all(task, jobs, args.jobs, args.read_only)
        text = table(task, results, runs, args.jobs)
        summary["runs"] = {r: spec["runs"][r] for r in runs}
    summary |= {
        "seeds": seeds,
        "jobs": args.jobs,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores",
        "versions": _versions(),
        "load_average_at_end": os.getloadavg(),
        "not_run": [[r["name"], r["seed"]] for r in results if r.get("missing")],
        "results": [r for r in results if not r.get("missing")],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(f"{title}\n\n{text}\n")
    plot(results, runs, title, out / "val_loss.png")
    best = _best(task, results)
    print(f"\n{title}\n\n{text}\n")
    if best is not None:
        print(
            f"best on validation: {best['name']} ({task.metric} {task.format(best[task.metric])})"
        )
    print(f"written to {out}")


if __name__ == "__main__":
    main()

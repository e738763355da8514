"""Pretraining comparisons and ablations: one config names the runs, this script runs and tabulates.

    python benchmarks/compare_pretrain.py configs/pretrain/compare_20m.yaml        # the comparison
    python benchmarks/compare_pretrain.py configs/pretrain/ablation_rank.yaml --jobs 2
    python benchmarks/compare_pretrain.py configs/pretrain/compare_20m.yaml --only adamw grass

A config holds ``flags`` (``scripts/pretrain.py`` flags shared by every run), ``seeds`` and
``runs`` (name -> the flags that make that run different). Each run and seed is
``python scripts/pretrain.py`` in its own process with the same model, data and token budget, so
memory and timing are the run's own. A run whose output folder already holds
``eval_results.json`` is read back, not rerun (delete the folder to rerun it).

Writes to ``--out`` (default ``benchmarks/results/pretrain/<config name>``): ``summary.json`` (every
run's final validation loss/perplexity, optimizer-state and peak-gradient bytes, tokens/s, wall
time, and the validation curve), ``table.md`` (the Markdown table it prints: perplexity as the
mean over seeds with the spread min-max) and ``val_loss.png`` (validation loss against tokens,
one line per run, averaged over seeds). With ``--jobs 2`` two runs share the machine (one thread
each): losses are the same as alone (same seeds, deterministic CPU kernels) but the timings are
not comparable; time methods with ``--jobs 1`` and nothing else running.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "pretrain.py"


def load_spec(path: str) -> dict[str, Any]:
    spec = yaml.safe_load(Path(path).read_text())
    for key in ("flags", "runs"):
        if not isinstance(spec.get(key), dict):
            raise SystemExit(
                f"{path}: needs a '{key}' mapping (see benchmarks/compare_pretrain.py)"
            )
    spec.setdefault("seeds", [42])
    return spec


def as_flags(mapping: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for key, value in mapping.items():
        values = value if isinstance(value, list) else [value]
        flags += [f"--{key}", *(str(v) for v in values)]
    return flags


def run_one(name: str, seed: int, flags: list[str], out: Path, threads: int) -> dict[str, Any]:
    """``scripts/pretrain.py`` in its own process; its results read back from ``out``."""
    if not (out / "eval_results.json").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, str(SCRIPT), *flags, "--seed", str(seed)]
        cmd += ["--output_dir", str(out), "--disable_tqdm", "true"]
        t0 = time.time()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            print(f"  {name} seed {seed}: FAILED ({' '.join(tail)})", flush=True)
            return {"name": name, "seed": seed, "failed": True}
        print(f"  {name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return read_run(name, seed, out)


def read_run(name: str, seed: int, out: Path) -> dict[str, Any]:
    final = json.loads((out / "eval_results.json").read_text())
    report = json.loads((out / "resource_report.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    tokens_per_step = report["train_tokens"] / max(report["steps"], 1)
    curve = [
        (e["step"] * tokens_per_step, e["eval_loss"])
        for e in state["log_history"]
        if "eval_loss" in e
    ]
    return {
        "name": name,
        "seed": seed,
        "eval_loss": final["eval_loss"],
        "perplexity": final["perplexity"],
        "optimizer_state_bytes": report["optimizer_state_bytes"],
        "peak_grad_bytes": report["peak_grad_bytes"],
        "tokens_per_s": report["tokens_per_s"],
        "s_per_step": report["s_per_step"],
        "train_wall_s": report["train_wall_s"],
        "train_tokens": report["train_tokens"],
        "curve": curve,
    }


def table(results: list[dict[str, Any]], runs: list[str], jobs: int) -> str:
    timing = "" if jobs == 1 else f" (timings under --jobs {jobs}: not comparable)"
    lines = [
        f"| run | val perplexity | spread | state MiB | peak grad MiB | tokens/s{timing} | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in runs:
        ok = [r for r in results if r["name"] == name and not r.get("failed")]
        if not ok:
            lines.append(f"| {name} | failed | | | | | |")
            continue
        ppl = [r["perplexity"] for r in ok]
        spread = f"{min(ppl):.2f}-{max(ppl):.2f} ({len(ok)} seeds)" if len(ok) > 1 else "1 seed"
        first = ok[0]
        lines.append(
            f"| {name} | {statistics.mean(ppl):.2f} | {spread} | "
            f"{first['optimizer_state_bytes'] / 2**20:.1f} | {first['peak_grad_bytes'] / 2**20:.1f} "
            f"| {statistics.mean(r['tokens_per_s'] for r in ok):,.0f} "
            f"| {statistics.mean(r['s_per_step'] for r in ok):.3f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], runs: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in runs:
        curves = [r["curve"] for r in results if r["name"] == name and not r.get("failed")]
        if not curves:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a YAML of flags, seeds and runs (configs/pretrain/)")
    parser.add_argument("--only", nargs="+", help="run only these runs of the config")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    parser.add_argument("--out", help="output folder (default benchmarks/results/pretrain/NAME)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    args = parser.parse_args()
    spec = load_spec(args.config)
    name = Path(args.config).stem
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / "pretrain" / name
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in spec["runs"] if not args.only or r in args.only]
    seeds = args.seeds or spec["seeds"]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [
        (
            run,
            seed,
            as_flags({**spec["flags"], **(spec["runs"][run] or {})}),
            out / f"{run}-s{seed}",
        )
        for seed in seeds
        for run in runs
    ]
    print(f"{name}: {len(jobs)} runs, {args.jobs} at a time, {threads} thread(s) each", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(*job, threads=threads), jobs))
    text = table(results, runs, args.jobs)
    title = spec.get("title", name)
    summary = {
        "config": str(args.config),
        "title": title,
        "flags": spec["flags"],
        "runs": {r: spec["runs"][r] for r in runs},
        "seeds": seeds,
        "jobs": args.jobs,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores",
        "results": results,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(f"{title}\n\n{text}\n")
    plot(results, runs, title, out / "val_loss.png")
    best = min(
        (r for r in results if not r.get("failed")), key=lambda r: r["eval_loss"], default=None
    )
    print(f"\n{title}\n\n{text}\n")
    if best is not None:
        print(
            f"lowest validation loss: {best['name']} (perplexity {math.exp(best['eval_loss']):.2f})"
        )
    print(f"written to {out}")


if __name__ == "__main__":
    main()

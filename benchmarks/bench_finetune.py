"""Default finetune, side by side: Grass, AdamW, LoRA and GaLore (or any method of the registry,
``hf_grass.methods``: 8-bit AdamW, Muon, Adam-mini, Fira, BAdam, ...) on the same data and budget.

Runs ``scripts/finetune.py`` once per method (BENCHMARKS.md, Protocol 1: SmolLM2-135M-Instruct,
Rotten Tomatoes, fp32, batch 16, 64 steps, max length 64), one after the other in this process's
machine, then prints validation accuracy, optimizer-state bytes, peak gradient bytes, peak memory,
tokens/s and wall time of each, with ratios to AdamW. Raw numbers: benchmarks/results/finetune.json.

    python benchmarks/bench_finetune.py [--methods grass adamw lora galore muon grass-embeddings]
        [--seeds 42 43 44] [--out FILE] [-- extra finetune flags]

With several seeds the methods run interleaved (every method for one seed, then the next seed),
so a drift in the machine's speed touches all of them alike; the table then gives each
method's mean and the spread (min-max) over the seeds. AdamW (full and LoRA's) is torch's fused
implementation, the fastest standard one on a CPU. GaLore projects Grass's targets (the
finetune script gives it them), not HF's "all-linear", which includes the classifier head.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # hf_grass from this checkout
from hf_grass import methods  # noqa: E402  (torch only)

METHODS = {
    # every method of the registry that finetunes, by the flags that select it
    **{m.name: list(m.flags) for m in methods.REGISTRY if m.finetune_lr is not None},
    # Grass on the input embedding as well (rows of the vocabulary; issue: embedding state)
    "grass-embeddings": ["--optim", "grass", "--grass_embeddings", "true"],
    # what users do today to save the embedding's state: freeze it
    "grass-frozen-embeddings": ["--optim", "grass", "--freeze_embeddings", "true"],
    # grass-embeddings keeping what the recomputation saves (the cost and gain of recomputing)
    "grass-embeddings-kept": [
        "--optim",
        "grass",
        "--grass_embeddings",
        "true",
        "--grass_recompute_selection",
        "false",
        "--grass_recompute_norms",
        "false",
    ],
}


def run_once(name: str, extra: list[str], seed: int | None) -> dict:
    """One ``scripts/finetune.py`` run of a method; its command, wall time, metrics and report."""
    out_dir = ROOT / "outputs" / (f"bench-{name}" if seed is None else f"bench-{name}-{seed}")
    seed_flags = [] if seed is None else ["--seed", str(seed)]
    cmd = [
        sys.executable,
        str(ROOT / "scripts/finetune.py"),
        *METHODS[name],
        *seed_flags,
        "--output_dir",
        str(out_dir),
        *extra,
    ]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    return {
        "command": " ".join(cmd[1:]),
        "seed": seed,
        "wall_s": wall,
        "load_average": os.getloadavg(),
        "eval": json.loads((out_dir / "eval_results.json").read_text()),
        "report": json.loads((out_dir / "resource_report.json").read_text()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", nargs="+", default=["grass", "adamw", "lora", "galore"], choices=list(METHODS)
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="run every method once per seed")
    parser.add_argument("--out", help="default: benchmarks/results/finetune[_seeds].json")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    name = "finetune_seeds.json" if args.seeds else "finetune.json"
    out = Path(args.out or ROOT / "benchmarks/results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.seeds:
        results = {}
        for method in args.methods:
            results[method] = run_once(method, extra, None)
            out.write_text(json.dumps(results, indent=2))
        print_table(results)
        return
    header = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    versions = {m: importlib.metadata.version(m) for m in ("torch", "transformers", "peft")}
    runs: dict[str, list[dict]] = {method: [] for method in args.methods}
    for seed in args.seeds:  # interleaved: every method for one seed, then the next seed
        for method in args.methods:
            runs[method].append(run_once(method, extra, seed))
            record = {"date": time.strftime("%Y-%m-%d"), **header, "versions": versions}
            out.write_text(json.dumps({**record, "seeds": args.seeds, "runs": runs}, indent=2))
    print_seed_table(runs)


def print_table(results: dict[str, dict]) -> None:
    base = results.get("adamw")
    print(
        "\n| method | val acc | optimizer state MB | peak grad MB | peak RSS MiB | s/step | tokens/s | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        rep = r["report"]
        acc = r["eval"].get("eval_accuracy", float("nan"))
        print(
            f"| {name} | {acc:.4f} | {rep['optimizer_state_bytes'] / 1e6:,.1f} | {rep['peak_grad_bytes'] / 1e6:,.1f} | "
            f"{rep['peak_memory_bytes'] / 2**20:,.0f} | {rep['s_per_step']:.2f} | {rep['tokens_per_s']:.1f} | {r['wall_s']:.0f} |"
        )
    if base:
        b = base["report"]
        print("\nratios to AdamW (state, peak grad, s/step):")
        for name, r in results.items():
            rep = r["report"]
            print(
                f"  {name}: {rep['optimizer_state_bytes'] / b['optimizer_state_bytes']:.3f}, "
                f"{rep['peak_grad_bytes'] / b['peak_grad_bytes']:.3f}, {rep['s_per_step'] / b['s_per_step']:.3f}"
            )


def _mean_and_range(values: list[float], fmt: str) -> str:
    mean = sum(values) / len(values)
    return f"{mean:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def print_seed_table(runs: dict[str, list[dict]]) -> None:
    """Mean and (min-max) over the seeds of each method's runs."""
    print("\n| method | seeds | val acc | optimizer state MB | peak RSS MiB | s/step |")
    print("|---|---|---|---|---|---|")
    for name, method_runs in runs.items():
        acc = [r["eval"]["eval_accuracy"] for r in method_runs]
        state = [r["report"]["optimizer_state_bytes"] / 1e6 for r in method_runs]
        peak = [r["report"]["peak_memory_bytes"] / 2**20 for r in method_runs]
        step = [r["report"]["s_per_step"] for r in method_runs]
        print(
            f"| {name} | {len(method_runs)} | {_mean_and_range(acc, '.4f')} | "
            f"{_mean_and_range(state, ',.1f')} | {_mean_and_range(peak, ',.0f')} | "
            f"{_mean_and_range(step, '.2f')} |"
        )


if __name__ == "__main__":
    main()

"""Default finetune, side by side: Grass, AdamW, LoRA and GaLore on the same data and budget.

Runs ``scripts/finetune.py`` once per method (BENCHMARKS.md, Protocol 1: SmolLM2-135M-Instruct,
Rotten Tomatoes, fp32, batch 16, 64 steps, max length 64), one after the other in this process's
machine, then prints validation accuracy, optimizer-state bytes, peak gradient bytes, peak memory,
tokens/s and wall time of each, with ratios to AdamW. Raw numbers: benchmarks/results/finetune.json.

    python benchmarks/bench_finetune.py [--methods grass adamw lora galore grass-embeddings]
        [--out FILE] [-- extra finetune flags]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "grass": ["--optim", "grass"],
    "adamw": ["--optim", "adamw_torch"],
    "lora": ["--optim", "adamw_torch", "--use_lora"],
    "galore": ["--optim", "galore_adamw"],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", nargs="+", default=["grass", "adamw", "lora", "galore"], choices=list(METHODS)
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/finetune.json"))
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    results = {}
    for name in args.methods:
        out_dir = ROOT / "outputs" / f"bench-{name}"
        cmd = [
            sys.executable,
            str(ROOT / "scripts/finetune.py"),
            *METHODS[name],
            "--output_dir",
            str(out_dir),
            *extra,
        ]
        print("$", " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        wall = time.perf_counter() - start
        metrics = json.loads((out_dir / "eval_results.json").read_text())
        report = json.loads((out_dir / "resource_report.json").read_text())
        results[name] = {
            "command": " ".join(cmd[1:]),
            "wall_s": wall,
            "eval": metrics,
            "report": report,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
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


if __name__ == "__main__":
    main()

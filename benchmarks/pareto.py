"""Quality against optimizer-state memory: the Pareto front of a comparison, as a plot and a table.

    python benchmarks/pareto.py --tuned benchmarks/results/pretrain/tuned_demo
    python benchmarks/pareto.py --tuned benchmarks/results/finetune/tuned_default
    python benchmarks/pareto.py --finetune benchmarks/results/finetune_seeds.json

``--tuned`` reads a tuned comparison of ``compare.py`` (``summary.json``: each method at its
chosen point, the test metric over seeds: perplexity, lower is better, or accuracy, higher is
better); ``--finetune`` reads ``bench_finetune.py --seeds`` (validation accuracy over seeds,
higher is better). Each method is a
point: mean quality (bars: min-max over seeds) against optimizer-state MiB, labelled with its
seconds per step. A method is on the front when no other is at least as good in both quality and
state and better in one. Writes ``pareto.png`` and ``pareto.md`` (the same as a table) next to
the input, or to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def points_from_tuned(folder: Path) -> tuple[list[dict[str, Any]], str, bool]:
    summary = json.loads((folder / "summary.json").read_text())
    if "chosen" not in summary:
        raise SystemExit(f"{folder}: not a tuned comparison (no 'chosen' in summary.json)")
    metric = summary.get("metric", "perplexity")  # comparisons before finetuning: perplexity
    results = [r for r in summary["results"] if not r.get("failed")]
    split = "test" if all(r.get(f"test_{metric}") is not None for r in results) else "val"
    key = f"test_{metric}" if split == "test" else metric
    points = []
    for method, name in summary["chosen"].items():
        runs = [r for r in results if r["name"] == name]
        points.append(
            _point(method, [r[key] for r in runs], runs[0]["optimizer_state_bytes"], runs)
        )
    return points, f"{split} {metric}", summary.get("higher_is_better", False)


def points_from_finetune(path: Path) -> tuple[list[dict[str, Any]], str, bool]:
    data = json.loads(path.read_text())
    points = []
    for method, runs in data["runs"].items():
        values = [r["eval"]["eval_accuracy"] for r in runs]
        reports = [r["report"] for r in runs]
        points.append(_point(method, values, reports[0]["optimizer_state_bytes"], reports))
    return points, "validation accuracy (finetuning)", True


def _point(method: str, values: list[float], state_bytes: int, runs: list[dict]) -> dict:
    return {
        "method": method,
        "mean": statistics.mean(values),
        "min": min(values),
        "max": max(values),
        "seeds": len(values),
        "state_mib": state_bytes / 2**20,
        "s_per_step": statistics.mean(r["s_per_step"] for r in runs),
    }


def dominated_by(points: list[dict], higher_is_better: bool) -> dict[str, list[str]]:
    """For each method, the methods at least as good in quality and state and better in one."""
    sign = 1 if higher_is_better else -1

    def dominates(a: dict, b: dict) -> bool:
        better_or_equal = sign * a["mean"] >= sign * b["mean"] and a["state_mib"] <= b["state_mib"]
        strictly = sign * a["mean"] > sign * b["mean"] or a["state_mib"] < b["state_mib"]
        return better_or_equal and strictly

    return {
        b["method"]: [a["method"] for a in points if a is not b and dominates(a, b)] for b in points
    }


def table(points: list[dict], quality: str, higher_is_better: bool) -> str:
    beaten = dominated_by(points, higher_is_better)
    lines = [
        f"| method | {quality} | min-max | state MiB | s/step | on the front |",
        "|---|---|---|---|---|---|",
    ]
    for p in sorted(points, key=lambda p: p["state_mib"]):
        front = "yes" if not beaten[p["method"]] else "no (" + ", ".join(beaten[p["method"]]) + ")"
        lines.append(
            f"| {p['method']} | {p['mean']:.4g} | {p['min']:.4g}-{p['max']:.4g} ({p['seeds']} "
            f"seeds) | {p['state_mib']:.1f} | {p['s_per_step']:.3f} | {front} |"
        )
    return "\n".join(lines)


def plot(points: list[dict], quality: str, higher_is_better: bool, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    beaten = dominated_by(points, higher_is_better)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in points:
        on_front = not beaten[p["method"]]
        ax.errorbar(
            p["state_mib"],
            p["mean"],
            yerr=[[p["mean"] - p["min"]], [p["max"] - p["mean"]]],
            fmt="o" if on_front else "x",
            capsize=3,
        )
        ax.annotate(
            f"{p['method']} ({p['s_per_step']:.2f} s/step)",
            (p["state_mib"], p["mean"]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    front = sorted((p for p in points if not beaten[p["method"]]), key=lambda p: p["state_mib"])
    ax.plot([p["state_mib"] for p in front], [p["mean"] for p in front], "--", alpha=0.5)
    ax.set_xlabel("optimizer state (MiB)")
    ax.set_ylabel(quality)
    ax.set_title("Pareto front (o: on the front, x: dominated)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--tuned", "--pretrain", dest="tuned", help="a tuned comparison's folder (compare.py)"
    )
    source.add_argument("--finetune", help="a bench_finetune.py --seeds JSON file")
    parser.add_argument("--out", help="output folder (default: next to the input)")
    args = parser.parse_args()
    if args.tuned:
        points, quality, higher = points_from_tuned(Path(args.tuned))
        out = Path(args.out or args.tuned)
        stem = "pareto"
    else:
        points, quality, higher = points_from_finetune(Path(args.finetune))
        out = Path(args.out or Path(args.finetune).parent)
        stem = f"pareto_{Path(args.finetune).stem}"
    out.mkdir(parents=True, exist_ok=True)
    text = table(points, quality, higher)
    (out / f"{stem}.md").write_text(f"{quality}\n\n{text}\n")
    plot(points, quality, higher, out / f"{stem}.png")
    print(f"{quality}\n\n{text}\n\nwritten to {out / stem}.md and .png")


if __name__ == "__main__":
    main()

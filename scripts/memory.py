#!/usr/bin/env python
"""Plan the memory of training a LLaMA model with Grass or a baseline (no model is built).

    python scripts/memory.py --preset llama-13b --method grass --rank 256 --dtype bf16 \\
        --layerwise --activation_checkpointing --batch_size 1 --seq_len 256 --json
    python scripts/memory.py --preset 1b --method adamw --dtype bf16 --batch_size 8
    python scripts/memory.py --config path/to/config.json --method grass --budget 40GiB

Prints a table of the parts (weights, gradients, optimizer state, indices, activations,
temporaries; see ``hf_grass.memory``) and the total, or with ``--json`` one JSON object with
``total_bytes`` (the parts summed), ``peak_bytes`` (the step's peak, activations and gradients
in turn) and one ``<part>_bytes`` key per part. ``--budget`` adds whether the plan fits,
the largest batch size that fits and the smallest and largest ranks that fit.

A flag left out takes ``plan_memory``'s default (its rank, method, dtype, ...). Grass plans model
GrassTrainer's defaults (``scripts/finetune.py``, ``scripts/pretrain.py``:
selection steps and norms recomputed); ``--no_recompute`` models a plain training loop instead.

A bad flag value prints one line ``memory.py: error: <problem and fix>`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import hf_grass  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_grass import cli
from hf_grass.errors import UsageError
from hf_grass.memory import ATTENTIONS, DTYPES, fit_budget, parse_size, plan_memory
from hf_grass.methods import planner_methods


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line usage errors (no usage banner)."""

    def error(self, message: str):
        raise UsageError(message)


# The flags that are plan_memory's arguments: left out, they take its defaults (one home).
PLAN_ARGUMENTS = (
    "method",
    "rank",
    "dtype",
    "attention",
    "layerwise",
    "activation_checkpointing",
    "batch_size",
    "seq_len",
    "embeddings",
    "lm_head",
    "recompute",
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memory.py", description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", help="LLaMA preset: 60m, 130m, 350m, 1b, 7b, 13b (or llama-13b)")
    model.add_argument("--config", help="a model config JSON file instead of a preset")
    plan = parser.add_argument_group(
        "plan", "plan_memory's arguments; a flag left out takes plan_memory's default"
    )
    unset = argparse.SUPPRESS
    plan.add_argument("--method", default=unset, help=f"one of {', '.join(planner_methods())}")
    plan.add_argument("--rank", type=int, default=unset, help="Grass/GaLore/LoRA rank")
    plan.add_argument("--dtype", default=unset, help=f"one of {', '.join(DTYPES)}")
    plan.add_argument("--attention", default=unset, help=f"one of {', '.join(ATTENTIONS)}")
    plan.add_argument(
        "--layerwise", action="store_true", default=unset, help="update inside the backward"
    )
    plan.add_argument("--activation_checkpointing", action="store_true", default=unset)
    plan.add_argument("--batch_size", type=int, default=unset)
    plan.add_argument("--seq_len", type=int, default=unset)
    plan.add_argument(
        "--embeddings", action="store_true", default=unset, help="Grass on the embedding too"
    )
    plan.add_argument(
        "--lm_head", action="store_true", default=unset, help="Grass on the output head too"
    )
    plan.add_argument(
        "--no_recompute",
        dest="recompute",
        action="store_false",
        default=unset,
        help="Grass: model a plain training loop without GrassTrainer (selection steps keep "
        "every linear's whole input, norms their full set). By default the plan models "
        "GrassTrainer's --grass_recompute_selection and --grass_recompute_norms (on by "
        "default): ordinary steps set the peak, cols-side layers keep X[:, cols] and norms "
        "only their input",
    )
    parser.add_argument("--budget", help="memory budget, e.g. 40GiB or 80GB")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.preset is None and args.config is None:
        raise UsageError("Pass --preset (e.g. --preset llama-1b) or --config path/to/config.json.")
    budget = parse_size(args.budget) if args.budget is not None else None
    given = {name: getattr(args, name) for name in PLAN_ARGUMENTS if hasattr(args, name)}
    kwargs = dict(model=args.preset or args.config, **given)
    plan = plan_memory(**kwargs)
    result = plan.as_dict()
    if budget is not None:
        answers = fit_budget(budget, **kwargs)
        answers.pop("total_bytes")
        answers.pop("peak_bytes")
        result.update(answers)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(plan.parts, result))
    return result


def format_table(parts: dict[str, int], result: dict) -> str:
    """The parts in GiB with their shares, the total, and the budget answers if any."""
    total = sum(parts.values())
    gib = 2**30
    lines = [
        f"{result['model']}: {result['method']}, {result['dtype']}, "
        f"{result['num_parameters'] / 1e9:.3f}B parameters",
        f"{'part':<17}{'GiB':>10}{'share':>9}",
    ]
    for name, value in parts.items():
        share = value / total if total else 0.0
        lines.append(f"{name:<17}{value / gib:>10.3f}{share:>9.1%}")
    lines.append(f"{'total':<17}{total / gib:>10.3f}{1:>9.1%}")
    peak = result["peak_bytes"]
    lines.append(f"{'peak (by phase)':<17}{peak / gib:>10.3f}{peak / total:>9.1%}")
    if "budget_bytes" in result:
        lines.append(
            f"budget {result['budget_bytes'] / gib:.3f} GiB: "
            f"{'fits' if result['fits'] else 'does not fit'}; largest batch size "
            f"{result['max_batch_size']}; ranks that fit {result['min_rank']}..{result['max_rank']}"
        )
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    """`main` as a command: a usage error prints one line and returns status 2."""
    return cli.run(main, argv, "memory.py")


if __name__ == "__main__":
    sys.exit(run())

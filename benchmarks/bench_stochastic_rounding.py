"""Does stochastic rounding matter in pure-bf16 Grass training? Loss after N steps, with and without.

A student MLP (bf16 weights, no fp32 master copy, grassified: compressed-gradient backward) learns
a random teacher MLP by regression with GrassAdamW at a small learning rate. A bf16 weight of
magnitude |w| moves only by updates above half its unit in the last place (|w| * 2^-8), so with
round-to-nearest most updates of size ~lr vanish; stochastic rounding keeps them in expectation.
Same seed, data and initial weights for every run, next to a float32 reference. CPU, one
thread, about a minute and a half.

    python benchmarks/bench_stochastic_rounding.py [--steps 600] [--lr 1e-4] [--rank 32]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import add_repo_to_path, env_info, fmt_table, write_json
from torch import nn

add_repo_to_path()
from hf_grass import GrassAdamW, grassify  # noqa: E402

RUNS = {
    # name: (weight dtype, state dtype or None for the weight's, stochastic rounding)
    "fp32": (torch.float32, None, False),
    "bf16": (torch.bfloat16, None, False),
    "bf16 + SR": (torch.bfloat16, None, True),
    "bf16, fp32 states": (torch.bfloat16, torch.float32, False),
    "bf16 + SR, fp32 states": (torch.bfloat16, torch.float32, True),
}


def mlp(width: int, depth: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, width))


def batches(args):
    """The same regression data for every run: inputs and a fixed random teacher's outputs."""
    teacher = mlp(args.width, args.depth, seed=1)
    g = torch.Generator().manual_seed(2)
    for _ in range(args.steps):
        x = torch.randn(args.batch, args.width, generator=g)
        with torch.no_grad():  # not around the yield: grad mode would leak into the caller
            y = teacher(x)
        yield x, y


def train(name: str, args) -> dict:
    dtype, state_dtype, stochastic = RUNS[name]
    model = mlp(args.width, args.depth, seed=0).to(dtype)
    groups = grassify(model, rank=args.rank, update_proj_gap=args.gap)
    opt = GrassAdamW(groups, lr=args.lr, state_dtype=state_dtype, stochastic_rounding=stochastic)
    torch.manual_seed(3)  # the stochastic rounding noise
    initial = [p.detach().float().clone() for p in model.parameters()]
    curve = []
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches(args)):
        loss = (model(x.to(dtype)).float() - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % args.log_every == 0 or step == args.steps - 1:
            curve.append((step, loss.item()))
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        moved = sum(
            (p.float() != q).sum().item() for p, q in zip(model.parameters(), initial, strict=True)
        )
        total = sum(q.numel() for q in initial)
    return {
        "run": name,
        "weight_dtype": str(dtype),
        "state_dtype": str(state_dtype or dtype),
        "stochastic_rounding": stochastic,
        "initial_loss": curve[0][1],
        "final_loss": sum(loss for _, loss in curve[-5:]) / len(curve[-5:]),
        "fraction_of_weights_changed": moved / total,
        "seconds": elapsed,
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--gap", type=int, default=100)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these matrices are too small to gain from more, and "
        "one thread does not stall when other processes load the machine)",
    )
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results (or $OUT)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = [train(name, args) for name in RUNS]
    reference = results[0]["final_loss"]
    print(
        f"MLP {args.depth} x {args.width}, grassified rank {args.rank}, lr {args.lr}, "
        f"{args.steps} steps, batch {args.batch}; final loss = mean of the last 5 logged losses"
    )
    rows = [
        [
            r["run"],
            f"{r['initial_loss']:.4f}",
            f"{r['final_loss']:.4f}",
            f"{r['final_loss'] / reference:.3f}",
            f"{r['fraction_of_weights_changed']:.3f}",
            f"{r['seconds']:.1f}",
        ]
        for r in results
    ]
    headers = ["run", "initial loss", "final loss", "/ fp32", "weights changed", "s"]
    print(fmt_table(headers, rows))
    path = write_json(
        "stochastic_rounding.json",
        {"args": vars(args), "env": env_info(), "results": results},
        args.out_dir,
    )
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()

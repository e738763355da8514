"""Bytes sent per optimizer step under data parallelism: plain DDP (AdamW), GaLore + DDP, Grass.

Three parts, one run:

1. ``analytic``: all-reduce payload per optimizer step (bytes handed to the collectives; bf16
   gradients, 2 bytes per element, unless ``--dtype``) for GaLore's LLaMA configs at GaLore's
   ranks (60m r=128, 350m r=256, 1b r=512, 7b r=1024), K = ``update_proj_gap`` = 200,
   ``target_modules="all-linear"`` (every ``nn.Linear`` in the decoder layers; embeddings, norms
   and ``lm_head`` stay dense), ``proj_side="auto"`` (the larger of (m, n) is selected, so a
   compressed gradient is r x min(m, n)). Shapes come from a model built on the ``meta`` device;
   the projected list is ``hf_grass.match_target_modules(model, "all-linear")``.
   - DDP (AdamW): every trainable parameter's gradient, every step.
   - GaLore under DDP: the same. GaLore projects inside the optimizer, after DDP has all-reduced
     the full gradients.
   - Grass: the dense parameters in full + r x min(m, n) per projected weight every step
     (``ordinary`` step) + each projected weight's full m x n gradient once every K steps (the
     selection statistics); ``amortized`` = ordinary + sum(m x n) / K.
2. ``validation``: 2 CPU processes (``torch.distributed.run``, gloo, fp32) train the "tiny" and
   "20m" presets with ``grassify`` + ``GrassAdamW`` + ``GrassDataParallel`` + DDP (K = 2), and
   plain DDP with a byte-counting comm hook; the library's meter (``grass_dp.meter.total``, by
   kind) must equal the analytic formula for the same model and number of steps.
3. ``cpu_step``: in the same 20m launch, two phases: Grass compressed DDP (r = 64, K = 200) and
   plain DDP + ``torch.optim.AdamW``, batch 4 x 64 tokens per rank, OMP_NUM_THREADS=1; mean time
   of the timed steps after 1 warm-up step. Their meters are checked against the formula too.

Plus an 8-GPU PROJECTION (a model, not a measurement): ring all-reduce time per step =
2 (N - 1) / N x bytes / bus bandwidth, N = 8, at 300 GB/s (NVLink-class) and 12.5 GB/s
(100 Gb/s Ethernet), no overlap with compute.

Run (about 1-2 minutes on 2 CPU cores; every launch is bounded by ``--timeout``):

    .venv/bin/python benchmarks/bench_comm.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

import _common as C
import torch
from torch import nn

C.add_repo_to_path()

COMMAND = ".venv/bin/python benchmarks/bench_comm.py"
GALORE_RANKS = {"60m": 128, "350m": 256, "1b": 512, "7b": 1024}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
BANDWIDTHS = {"NVLink-class 300 GB/s": 300e9, "Ethernet 100 Gb/s (12.5 GB/s)": 12.5e9}
N_GPUS = 8


# ------------------------------------------------------------------------------------- analytic
def meta_model(preset: str) -> nn.Module:
    """``LlamaForCausalLM`` of ``preset`` on the meta device: shapes only, no memory."""
    from transformers import LlamaForCausalLM

    from hf_grass.models import llama_config

    with torch.device("meta"):
        return LlamaForCausalLM(llama_config(preset))


def shapes(model: nn.Module) -> tuple[list[tuple[int, int]], int]:
    """(shape of every projected weight, element count of every other trainable parameter)."""
    from hf_grass.targets import match_target_modules

    modules = dict(model.named_modules())
    names = match_target_modules(model, "all-linear")
    in_layers = sorted(
        n for n, m in modules.items() if isinstance(m, nn.Linear) and n.startswith("model.layers.")
    )
    if sorted(names) != in_layers:  # all-linear == every nn.Linear inside the decoder layers
        raise AssertionError(f"all-linear {sorted(names)[:4]} != decoder linears {in_layers[:4]}")
    projected = [tuple(modules[n].weight.shape) for n in names]
    ids = {id(modules[n].weight) for n in names}
    seen: set[int] = set()
    dense = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in ids and id(p) not in seen:
            seen.add(id(p))
            dense += p.numel()
    return projected, dense


def analytic_bytes(model: nn.Module, rank: int, gap: int, element: int) -> dict:
    """Payload bytes per optimizer step, by method (see the module docstring)."""
    projected, dense_numel = shapes(model)
    dense = dense_numel * element
    full = sum(m * n for m, n in projected) * element
    compressed = sum(rank * min(m, n) for m, n in projected) * element
    return {
        "rank": rank,
        "gap": gap,
        "bytes_per_element": element,
        "n_projected_weights": len(projected),
        "params_total": dense_numel + sum(m * n for m, n in projected),
        "params_dense": dense_numel,
        "ddp": dense + full,
        "galore_ddp": dense + full,
        "grass_ordinary": dense + compressed,
        "grass_amortized": dense + compressed + full / gap,
        "grass_dense_part": dense,
        "grass_compressed_part": compressed,
        "grass_selection_bytes_per_selection": full,
    }


def expected_meter(counts: dict, steps: int, gap: int) -> dict:
    """What the meter must total after ``steps`` optimizer steps (selection at steps 0, K, 2K...)."""
    return {
        "ddp": steps * counts["grass_dense_part"],
        "compressed": steps * counts["grass_compressed_part"],
        "selection": -(-steps // gap) * counts["grass_selection_bytes_per_selection"],
    }


def ring_ms(nbytes: float, bus_bandwidth: float, n: int = N_GPUS) -> float:
    return 2 * (n - 1) / n * nbytes / bus_bandwidth * 1e3


# --------------------------------------------------------------------------------------- worker
def worker(args) -> None:
    """Runs under torch.distributed.run (2 CPU processes, gloo, fp32)."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from hf_grass import GrassAdamW, grassify
    from hf_grass.distributed import GrassDataParallel
    from hf_grass.models import build_llama, llama_config

    dist.init_process_group("gloo")
    me, world = dist.get_rank(), dist.get_world_size()
    vocab = llama_config(args.worker).vocab_size
    gen = torch.Generator().manual_seed(1000 + me)  # each rank its own data
    n_batches = max(args.val_steps, args.time_steps + 1)
    batches = [
        torch.randint(0, vocab, (args.batch, args.seq), generator=gen) for _ in range(n_batches)
    ]

    def new_model():
        torch.manual_seed(0)  # same weights on every rank (DDP skips the Grass weights)
        return build_llama(args.worker)

    def grass(rank: int, gap: int):
        model = new_model()
        opt = GrassAdamW(grassify(model, rank=rank, update_proj_gap=gap), lr=1e-4)
        grass_dp = GrassDataParallel(model, opt)
        ddp = DistributedDataParallel(model)
        grass_dp.attach(ddp)
        return ddp, opt, grass_dp.meter

    def plain(count: bool):
        model = new_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ddp = DistributedDataParallel(model)
        sent = {"ddp": 0}
        if count:  # only when validating: the timed phase keeps DDP's built-in all-reduce

            def counting_allreduce(state, bucket):
                sent["ddp"] += bucket.buffer().numel() * bucket.buffer().element_size()
                return allreduce_hook(None, bucket)

            ddp.register_comm_hook(None, counting_allreduce)
        return ddp, opt, sent

    def step(ddp, opt, ids) -> None:
        ddp(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()

    def timed(ddp, opt) -> list[float]:
        step(ddp, opt, batches[0])  # warm-up (Grass: step 0, the first selection)
        times = []
        for ids in batches[1 : args.time_steps + 1]:
            dist.barrier()
            t0 = time.perf_counter()
            step(ddp, opt, ids)
            times.append(time.perf_counter() - t0)
        return times

    result: dict = {"world_size": world, "preset": args.worker}
    # Validation: Grass with K = val_gap, and plain DDP, val_steps steps each, bytes counted.
    ddp, opt, meter = grass(args.val_rank, args.val_gap)
    for ids in batches[: args.val_steps]:
        step(ddp, opt, ids)
    result["validation"] = {
        "rank": args.val_rank, "gap": args.val_gap, "steps": meter.steps,
        "meter_total": dict(meter.total), "meter_bytes_per_step": meter.bytes_per_step(),
    }  # fmt: skip
    ddp, opt, sent = plain(count=True)
    for ids in batches[: args.val_steps]:
        step(ddp, opt, ids)
    result["validation"]["plain_ddp_total"] = sent["ddp"]
    del ddp, opt

    if args.time_steps:
        ddp, opt, meter = grass(args.time_rank, args.time_gap)
        grass_times = timed(ddp, opt)
        result["timing_grass_meter"] = {
            "rank": args.time_rank, "gap": args.time_gap, "steps": meter.steps,
            "meter_total": dict(meter.total),
        }  # fmt: skip
        del ddp, opt
        ddp, opt, _ = plain(count=False)
        adamw_times = timed(ddp, opt)
        del ddp, opt
        # Each rank's step time; the slower rank sets the pace, report the mean over ranks.
        mine = torch.tensor([grass_times, adamw_times], dtype=torch.float64)
        dist.all_reduce(mine)
        mine /= world
        result["timing"] = {"grass_s": mine[0].tolist(), "adamw_s": mine[1].tolist()}
    if me == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def launch(args, preset: str, val_rank: int, time_steps: int) -> dict:
    """One bounded ``torch.distributed.run`` job of this file in worker mode."""
    worker_args = [
        "--worker", preset, "--val-rank", str(val_rank), "--val-gap", str(args.val_gap),
        "--val-steps", str(args.val_steps), "--time-steps", str(time_steps),
        "--time-rank", str(args.time_rank), "--time-gap", str(args.gap),
        "--batch", str(args.batch), "--seq", str(args.seq),
    ]  # fmt: skip
    return C.run_two_processes(__file__, worker_args, args.timeout, preset)


# ----------------------------------------------------------------------------------------- main
def machine_info() -> dict:
    info = C.env_info()
    info["date"] = datetime.date.today().isoformat()
    model = None
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in lscpu.splitlines()
                if ln.startswith("Model name")
            ),
            None,
        )
    except (OSError, subprocess.SubprocessError):
        pass
    info["lscpu_model_name"] = model or info["cpu"]
    info["machine"] = f"{os.cpu_count()}-core CPU ({info['lscpu_model_name']}), no GPU"
    info["uptime_at_start"] = uptime()
    return info


def uptime() -> str | None:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16",
                        help="gradient dtype of the analytic table (default bf16: 2 bytes)")  # fmt: skip
    parser.add_argument("--gap", type=int, default=200, help="update_proj_gap K (analytic, timing)")
    parser.add_argument("--val-gap", type=int, default=2, help="K of the meter validation runs")
    parser.add_argument("--val-steps", type=int, default=6, help="steps of each validation run")
    parser.add_argument("--time-steps", type=int, default=15, help="timed steps after 1 warm-up")
    parser.add_argument("--time-rank", type=int, default=64, help="Grass rank of the 20m runs")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per 2-process launch")
    parser.add_argument("--analytic-only", action="store_true", help="skip the 2-process runs")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--val-rank", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--time-gap", type=int, default=200, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    t_start = time.perf_counter()
    element = DTYPE_BYTES[args.dtype]
    command = COMMAND + "".join(f" {a}" for a in sys.argv[1:])
    payload: dict = {"command": command, "env": machine_info(), "dtype": args.dtype}

    # 1. analytic ----------------------------------------------------------------------------
    payload["analytic"] = {}
    rows, projection_rows, projection = [], [], {}
    for preset, rank in GALORE_RANKS.items():
        counts = analytic_bytes(meta_model(preset), rank, args.gap, element)
        counts["ratio_grass_amortized_over_ddp"] = counts["grass_amortized"] / counts["ddp"]
        counts["ratio_grass_ordinary_over_ddp"] = counts["grass_ordinary"] / counts["ddp"]
        payload["analytic"][preset] = counts
        rows.append([
            preset, rank, C.mb(counts["ddp"]), C.mb(counts["galore_ddp"]),
            C.mb(counts["grass_ordinary"]), C.mb(counts["grass_amortized"]),
            f"{counts['ratio_grass_amortized_over_ddp']:.2f}x",
        ])  # fmt: skip
        projection[preset] = {}
        for label, bandwidth in BANDWIDTHS.items():
            ddp_ms = ring_ms(counts["ddp"], bandwidth)
            grass_ms = ring_ms(counts["grass_amortized"], bandwidth)
            projection[preset][label] = {
                "bus_bandwidth_bytes_per_s": bandwidth, "ddp_ms": ddp_ms,
                "grass_amortized_ms": grass_ms, "ddp_over_grass": ddp_ms / grass_ms,
            }  # fmt: skip
            projection_rows.append([
                preset, label, f"{ddp_ms:,.1f}", f"{grass_ms:,.1f}", f"{ddp_ms / grass_ms:.1f}x",
            ])  # fmt: skip
    payload["projection_8gpu"] = {
        "model": "ring all-reduce, t = 2 (N-1)/N x payload / bus bandwidth, N = 8, "
        "payload = analytic bytes per step (Grass amortized over K), no overlap with compute, "
        "no latency term. A projection, not a measurement.",
        "n_gpus": N_GPUS,
        "ms": projection,
    }
    print(
        f"All-reduce payload per optimizer step, {args.dtype} gradients, MB (analytic, K={args.gap}):"
    )
    print(C.fmt_table(
        ["model", "r", "DDP (AdamW)", "GaLore + DDP", "Grass ordinary", "Grass amortized",
         "Grass amortized / DDP"],
        rows,
    ))  # fmt: skip
    print(f"\n{N_GPUS}-GPU PROJECTION (ring all-reduce model, not a measurement), ms per step:")
    print(
        C.fmt_table(["model", "link", "DDP", "Grass (amortized)", "DDP / Grass"], projection_rows)
    )

    # 2 + 3. 2-process runs ------------------------------------------------------------------------
    if not args.analytic_only:
        payload["validation"] = {}
        for preset, time_steps in (("tiny", 0), ("20m", args.time_steps)):
            val_rank = min(args.time_rank, C.llama_config(preset).hidden_size // 2)
            t0 = time.perf_counter()
            measured = launch(args, preset, val_rank, time_steps)
            wall = time.perf_counter() - t0
            counts = analytic_bytes(meta_model(preset), val_rank, args.val_gap, element=4)
            val = measured["validation"]
            expected = expected_meter(counts, val["steps"], args.val_gap)
            equal = all(val["meter_total"].get(k, 0) == v for k, v in expected.items())
            ddp_equal = val["plain_ddp_total"] == val["steps"] * counts["ddp"]
            mean_equal = math.isclose(
                val["meter_bytes_per_step"]["all"], counts["grass_amortized"], rel_tol=1e-12
            )
            entry = {
                "rank": val_rank, "gap": args.val_gap, "steps": val["steps"], "dtype": "fp32",
                "meter_total": val["meter_total"], "analytic_total": expected,
                "meter_equals_analytic": equal,
                "meter_mean_bytes_per_step": val["meter_bytes_per_step"]["all"],
                "analytic_grass_amortized_bytes_per_step": counts["grass_amortized"],
                "plain_ddp_metered_total": val["plain_ddp_total"],
                "plain_ddp_analytic_total": val["steps"] * counts["ddp"],
                "plain_ddp_equal": ddp_equal, "launch_wall_s": wall,
            }  # fmt: skip
            payload["validation"][preset] = entry
            print(
                f"\nmeter vs analytic, {preset} (fp32, r={val_rank}, K={args.val_gap}, "
                f"{val['steps']} steps, 2 processes): {'EQUAL' if equal else 'DIFFERENT'}"
            )
            for kind in ("compressed", "selection", "ddp"):
                print(f"  {kind:10s} meter {val['meter_total'].get(kind, 0):>12,d} B   "
                      f"analytic {expected[kind]:>12,d} B")  # fmt: skip
            print(f"  mean/step  meter {val['meter_bytes_per_step']['all']:>14,.0f} B "
                  f"analytic amortized {counts['grass_amortized']:>14,.0f} B "
                  f"({'equal' if mean_equal else 'different'})")  # fmt: skip
            print(f"  plain DDP  hook  {val['plain_ddp_total']:>12,d} B   analytic "
                  f"{val['steps'] * counts['ddp']:>12,d} B ({'equal' if ddp_equal else 'DIFFERENT'})")  # fmt: skip
            if preset != "20m":
                continue
            tm = measured["timing_grass_meter"]
            t_counts = analytic_bytes(meta_model(preset), tm["rank"], tm["gap"], element=4)
            t_expected = expected_meter(t_counts, tm["steps"], tm["gap"])
            t_equal = all(tm["meter_total"].get(k, 0) == v for k, v in t_expected.items())
            grass_s, adamw_s = measured["timing"]["grass_s"], measured["timing"]["adamw_s"]
            cpu = {
                "preset": preset, "grass_rank": tm["rank"], "grass_gap": tm["gap"],
                "batch_per_rank": [args.batch, args.seq], "world_size": measured["world_size"],
                "omp_num_threads": 1, "warmup_steps": 1, "timed_steps": len(grass_s),
                "grass_step_s": grass_s, "adamw_step_s": adamw_s,
                "grass_mean_s": statistics.mean(grass_s), "adamw_mean_s": statistics.mean(adamw_s),
                "grass_median_s": statistics.median(grass_s),
                "adamw_median_s": statistics.median(adamw_s),
                "grass_phase_meter_total": tm["meter_total"],
                "grass_phase_analytic_total": t_expected,
                "grass_phase_meter_equals_analytic": t_equal,
                "grass_phase_bytes_per_step_fp32": {
                    "ddp": t_counts["ddp"], "grass_ordinary": t_counts["grass_ordinary"],
                    "grass_amortized": t_counts["grass_amortized"],
                },
            }  # fmt: skip
            cpu["ratio_grass_over_adamw_mean"] = cpu["grass_mean_s"] / cpu["adamw_mean_s"]
            cpu["ratio_grass_over_adamw_median"] = cpu["grass_median_s"] / cpu["adamw_median_s"]
            payload["cpu_step"] = cpu
            print(f"  timing phase (r={tm['rank']}, K={tm['gap']}, {tm['steps']} steps): meter "
                  f"{'EQUAL' if t_equal else 'DIFFERENT'} to analytic {tm['meter_total']}")  # fmt: skip
            print(
                f"\nCPU step time, 20m, 2 processes x 1 thread, batch {args.batch}x{args.seq} per "
                f"rank, mean of {len(grass_s)} steps after 1 warm-up: Grass (r={tm['rank']}, "
                f"K={tm['gap']}) {cpu['grass_mean_s']:.3f} s, DDP + AdamW "
                f"{cpu['adamw_mean_s']:.3f} s, Grass / DDP = "
                f"{cpu['ratio_grass_over_adamw_mean']:.2f}x (medians: "
                f"{cpu['ratio_grass_over_adamw_median']:.2f}x)"
            )
    payload["env"]["uptime_at_end"] = uptime()
    payload["wall_s"] = time.perf_counter() - t_start
    print("\nwrote", C.write_json("comm.json", payload), f"({payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()

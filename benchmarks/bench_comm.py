"""Bytes sent per optimizer step under data parallelism: Grass vs plain DDP (AdamW) vs GaLore.

Three parts, one run:

1. ``analytic``: all-reduce payload per optimizer step for GaLore's LLaMA configs at GaLore's
   ranks (60M r=128, 350M r=256, 1B r=512, 7B r=1024; K=200; bf16 gradients), from the shapes:
   - DDP (AdamW): every trainable parameter's gradient, every step.
   - GaLore under DDP: the same. GaLore projects inside the optimizer, after DDP has all-reduced
     the full gradients.
   - Grass: the plain parameters (embeddings, norms, lm_head) in full, r x min(m, n) per
     projected weight, and, every K steps, each projected weight's full gradient (the selection
     statistics): ``ordinary`` is a step between selections, ``amortized`` the mean over K.
2. ``validated``: 2 CPU processes (torchrun, gloo) train the "tiny" and "20m" presets with
   ``GrassDataParallel`` + DDP; the library's meter (bytes handed to the collectives actually
   issued) must equal the same formulas for those models.
3. ``cpu_step``: on the 20m preset, the median step time of Grass (compressed DDP, K=200) and
   of plain DDP with ``torch.optim.AdamW``, 2 processes, one thread each, in the same launch
   (each method twice, interleaved; the better median counts).

Plus an 8-GPU projection (labelled as such): ring all-reduce time = 2 (N-1)/N x bytes / bus
bandwidth, N = 8, at 300 GB/s (NVLink-class) and 12.5 GB/s (100 Gb/s Ethernet).

Run: ``.venv/bin/python benchmarks/bench_comm.py`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _common as C
import torch

C.add_repo_to_path()

PRESETS = {"60m": 128, "350m": 256, "1b": 512, "7b": 1024}
GAP = 200
BANDWIDTHS = {"NVLink-class 300 GB/s": 300e9, "Ethernet 100 Gb/s": 12.5e9}


def analytic_bytes(model, rank: int, gap: int, element: int) -> dict[str, float]:
    """Payload bytes per optimizer step (see the module docstring)."""
    projected, other = C.split_params(model)
    dense = sum(p.numel() for p in other) * element
    full_projected = sum(p.numel() for p in projected) * element
    compressed = sum(rank * min(p.shape) for p in projected) * element
    return {
        "ddp": dense + full_projected,
        "galore_ddp": dense + full_projected,
        "grass_ordinary": dense + compressed,
        "grass_amortized": dense + compressed + full_projected / gap,
        "grass_dense_part": dense,
        "grass_compressed_part": compressed,
        "grass_selection_part_per_selection": full_projected,
    }


def ring_ms(nbytes: float, bandwidth: float, n: int = 8) -> float:
    return 2 * (n - 1) / n * nbytes / bandwidth * 1e3


# ---------------------------------------------------------------------------------- worker
def worker(preset: str, rank: int, steps: int, gap: int, batch: int, seq: int, out: str) -> None:
    """Runs under torchrun: meter validation (fp32) and step times, Grass vs DDP + AdamW."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from hf_grass import GrassAdamW, GrassDataParallel, grassify

    dist.init_process_group("gloo")
    me, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(me)
    vocab = C.llama_config(preset).vocab_size
    batches = [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(steps + 1)]

    def run(step) -> float:
        step(batches[0])  # warm-up (and step 0's selection for Grass)
        times = []
        for ids in batches[1:]:
            t0 = time.perf_counter()
            step(ids)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    results = {}
    # Each method twice, interleaved; the faster median of the two counts (warm caches alike).
    for method in ("grass", "adamw", "grass", "adamw"):
        model = C.build_llama(preset, seed=0)
        if method == "grass":
            opt = GrassAdamW(grassify(model, rank=rank, update_proj_gap=gap), lr=1e-4)
            grass_dp = GrassDataParallel(model, opt)
            ddp = DistributedDataParallel(model)
            grass_dp.attach(ddp)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            ddp = DistributedDataParallel(model)

        def step(ids, ddp=ddp, opt=opt):
            ddp(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()

        key = f"{method}_s_per_step"
        results[key] = min(run(step), results.get(key, float("inf")))
        if method == "grass":
            results["meter_total"] = dict(grass_dp.meter.total)
            results["meter_steps"] = grass_dp.meter.steps
        del model, opt, ddp
    if me == 0:
        results["world_size"] = world
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def launch(preset: str, rank: int, steps: int, gap: int, batch: int, seq: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
            __file__, "--worker", preset, "--rank", str(rank), "--steps", str(steps),
            "--gap", str(gap), "--batch", str(batch), "--seq", str(seq), "--out", out,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, env=env, check=True, timeout=900, capture_output=True)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--gap", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.rank, args.steps, args.gap, args.batch, args.seq, args.out)
        return

    payload: dict = {"env": C.env_info(), "command": "python benchmarks/bench_comm.py"}
    rows, projection_rows = [], []
    payload["analytic"] = {}
    for preset, rank in PRESETS.items():
        model = C.build_llama(preset, device="meta")
        counts = analytic_bytes(model, rank, GAP, element=2)
        payload["analytic"][preset] = {"rank": rank, "gap": GAP, **counts}
        rows.append([
            preset, rank, C.mb(counts["ddp"]), C.mb(counts["galore_ddp"]),
            C.mb(counts["grass_ordinary"]), C.mb(counts["grass_amortized"]),
            f"{counts['grass_amortized'] / counts['ddp']:.2f}x",
        ])  # fmt: skip
        for label, bandwidth in BANDWIDTHS.items():
            ddp_ms, grass_ms = (ring_ms(counts[k], bandwidth) for k in ("ddp", "grass_amortized"))
            projection_rows.append(
                [preset, label, f"{ddp_ms:.1f}", f"{grass_ms:.1f}", f"{ddp_ms / grass_ms:.1f}x"]
            )
    print("All-reduce payload per optimizer step, bf16 gradients, MB (analytic):")
    print(C.fmt_table(
        ["model", "r", "DDP (AdamW)", "GaLore + DDP", "Grass ordinary", "Grass amortized", "Grass / DDP"],
        rows,
    ))  # fmt: skip
    print("\n8-GPU PROJECTION (ring all-reduce model, not a measurement), ms per step:")
    print(C.fmt_table(["model", "link", "DDP", "Grass", "DDP / Grass"], projection_rows))
    payload["projection_8gpu_ms"] = projection_rows

    payload["validated"] = {}
    # tiny: re-selection every other step (exercises the selection traffic); 20m: K=200, as in
    # training, for the step times (only the warm-up step selects).
    for preset, gap in (("tiny", args.gap), ("20m", GAP)):
        rank = min(args.rank, C.llama_config(preset).hidden_size // 2)
        measured = launch(preset, rank, args.steps, gap, args.batch, args.seq)
        model = C.build_llama(preset, device="meta")
        counts = analytic_bytes(model, rank, gap, element=4)
        steps = measured["meter_steps"]  # the warm-up step included
        selections = -(-steps // gap)
        expected = {
            "ddp": steps * counts["grass_dense_part"],
            "compressed": steps * counts["grass_compressed_part"],
            "selection": selections * counts["grass_selection_part_per_selection"],
        }
        payload["validated"][preset] = {"rank": rank, "meter": measured["meter_total"],
                                        "analytic": expected, "steps": steps}  # fmt: skip
        equal = all(measured["meter_total"].get(k) == v for k, v in expected.items())
        print(f"\nmeter vs analytic, {preset} (r={rank}, {steps} steps, K={gap}): "
              f"{'equal' if equal else 'DIFFERENT'} {measured['meter_total']}")  # fmt: skip
        if preset == "20m":
            payload["cpu_step"] = {
                k: measured[k] for k in ("grass_s_per_step", "adamw_s_per_step", "world_size")
            }
            payload["cpu_step"]["ratio_grass_over_adamw"] = (
                measured["grass_s_per_step"] / measured["adamw_s_per_step"]
            )
            print(
                f"CPU, 2 processes x 1 thread, 20m, batch {args.batch}x{args.seq} per rank: Grass "
                f"{measured['grass_s_per_step']:.3f} s/step, DDP + AdamW "
                f"{measured['adamw_s_per_step']:.3f} s/step "
                f"({payload['cpu_step']['ratio_grass_over_adamw']:.2f}x)"
            )
    print("\nwrote", C.write_json("comm.json", payload))


if __name__ == "__main__":
    main()

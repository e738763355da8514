"""Step time on the CPU: GrassAdamW vs torch.optim.AdamW vs GaLore, measured side by side in one run.

Part A, optimizer ``step()`` only (issue 2): fixed random gradients on every parameter, the same
tensors for every optimizer; each optimizer owns a copy of the model. Steps are interleaved
(one step of each optimizer per round, medians over the rounds) so that load on a shared machine
hits all of them alike. A refresh step (every K-th: Grass re-selects rows from the gradient's row
norms, GaLore runs one SVD per matrix) is timed separately and amortized over K = 200:
``amortized = regular + (refresh - regular) / K``. Grass's refresh is forced (step counters set
to the next multiple of K); GaLore's is its step 0 (an SVD step; a throw-away SVD at start-up
keeps LAPACK's first-call cost out of it), so that the slow SVD runs once per rank only.
"Grass, dense path" is GrassAdamW with no projected group: its plain-AdamW code on every
parameter, which is what embeddings and lm_head cost inside Grass. "Grass, full grad, foreach
step" is Grass with ``batched=False`` (the per-tensor ``torch._foreach_*`` step instead of the
default batched one, :mod:`hf_grass.functional`).

Part B, the whole training step, forward + backward + step (issue 3): AdamW, GaLore, Grass on
full gradients (``.grad``, compressed by the optimizer) and Grass with the compressed-gradient
backward (``hf_grass.grassify``: the full weight gradient is never formed), at two ranks. Also:

- bytes of gradients alive right before ``optimizer.step()`` (``.grad`` + ``.compressed_grad``
  of every parameter), where the gradient memory peaks;
- backward FLOPs (``torch.utils.flop_counter.FlopCounterMode``, eager attention so that its
  matmuls are counted), total and the weight-gradient part of the projected layers, obtained as
  the difference with a backward in which the projected weights are frozen (the same backward
  without their weight-gradient matmuls).

Model: "20m-wide" (hidden 384, FFN 1024, 6 heads, 8 layers, vocab 8000: 20.3M parameters, 70% in
the projected matrices); r = hidden/8 = 48 and hidden/4 = 96, K = 200, fp32, batch 4 x 128
tokens. ``--extra-model 20m`` also runs part A on the package's "20m" preset (84% embeddings).

Threads: one by default. On a machine shared with other jobs, torch's two OpenMP threads stall at
every barrier whenever the other core is busy, and steps of 0.6 s became 5-10 s at random, which
interleaving cannot average out; one thread is slowed at most by the share of its core. Pass
``--threads 2`` on a quiet machine.

Run: ``.venv/bin/python benchmarks/bench_step_time.py`` (about 4 minutes on a quiet 2-core CPU).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time

import _common as C
import torch
from torch.utils.flop_counter import FlopCounterMode

C.add_repo_to_path()
from hf_grass import GrassAdamW, grass_param_groups  # noqa: E402

try:
    from hf_grass import grassify  # noqa: E402
except ImportError:
    try:
        from hf_grass import grassify  # noqa: E402
    except ImportError:
        grassify = None

K = 200


# ----------------------------------------------------------------------------------- optimizers
def make_optimizer(method: str, model, rank: int | None, gap: int = K, lr: float = 1e-4):
    """``adamw``, ``adamw_fused``, ``galore``, ``grass`` (full gradients) or ``grassify``."""
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if method == "adamw_fused":
        return torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    if method == "galore":
        projected, other = C.split_params(model)
        return C.new_galore(C.galore_groups(projected, other, rank, update_proj_gap=gap), lr=lr)
    if method == "grass":
        return GrassAdamW(grass_param_groups(model, rank=rank, update_proj_gap=gap), lr=lr)
    if method == "grass_foreach":  # the per-tensor foreach step, for comparison
        return GrassAdamW(
            grass_param_groups(model, rank=rank, update_proj_gap=gap), lr=lr, batched=False
        )
    if method == "grass_dense":
        return GrassAdamW(model.parameters(), lr=lr)
    if method == "grassify":
        return GrassAdamW(grassify(model, rank=rank, update_proj_gap=gap), lr=lr)
    raise ValueError(method)


def label(method: str, rank: int | None) -> str:
    names = {
        "adamw": "AdamW",
        "adamw_fused": "AdamW (fused)",
        "galore": "GaLore",
        "grass": "Grass, full grad",
        "grass_foreach": "Grass, full grad, foreach step",
        "grass_dense": "Grass, dense path (no projection)",
        "grassify": "Grass, compressed bwd",
    }
    return names[method] + (f" r={rank}" if rank else "")


def interleaved(fns: dict[str, callable], reps: int) -> dict[str, list[float]]:
    """Run one call of each function per round, ``reps`` rounds; wall times per function."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


# -------------------------------------------------------------------------- part A: step() only
def bench_optimizer_step(model_name: str, ranks: list[int], reps: int, refresh_reps: int) -> dict:
    base = C.build_llama(model_name)
    gen = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(p.shape, generator=gen) * 1e-2 for n, p in base.named_parameters()}

    def with_grads():
        m = copy.deepcopy(base)
        for n, p in m.named_parameters():
            p.grad = grads[n]
        return m

    runs = [("adamw", None), ("adamw_fused", None), ("grass_dense", None)]
    runs += [
        (m, r)
        for r in ranks
        for m in ("galore", "grass", "grass_foreach")
        if m != "galore" or C.import_galore()
    ]
    opts = {(m, r): make_optimizer(m, with_grads(), r) for m, r in runs}
    t_first = {}
    for key, opt in opts.items():  # warm-up: step 0 (state creation, first refresh), step 1
        t0 = time.perf_counter()
        opt.step()
        t_first[key] = time.perf_counter() - t0
        opt.step()
    t_reg = interleaved({k: o.step for k, o in opts.items()}, reps)

    def forced(key):
        def run():
            C.force_refresh(opts[key], galore=key[0] == "galore")
            opts[key].step()

        return run

    t_ref = interleaved(
        {k: forced(k) for k in opts if k[0] in ("grass", "grass_foreach")}, refresh_reps
    )
    t_ref.update({k: [t_first[k]] for k in opts if k[0] == "galore"})

    out = {}
    for key in opts:
        reg = statistics.median(t_reg[key])
        ref = statistics.median(t_ref[key]) if key in t_ref else None
        amort = reg + max(ref - reg, 0.0) / K if ref is not None else reg
        out[label(*key)] = {
            "method": key[0],
            "rank": key[1],
            "step_s": reg,
            "min_step_s": min(t_reg[key]),
            "refresh_step_s": ref,
            "amortized_s": amort,
            "raw_step_s": t_reg[key],
            "raw_refresh_s": t_ref.get(key),
        }
    return {"model": model_name, "params": sum(g.numel() for g in grads.values()), "results": out}


# ---------------------------------------------------------------------- part B: training step
def grad_bytes(model) -> int:
    n = 0
    for p in model.parameters():
        for g in (p.grad, getattr(p, "compressed_grad", None)):
            if g is not None:
                n += g.numel() * g.element_size()
    return n


class Trainer:
    def __init__(self, method, rank, base, tokens):
        self.method, self.rank = method, rank
        self.model = copy.deepcopy(base)
        self.opt = make_optimizer(method, self.model, rank)
        self.tokens = tokens
        self.grad_bytes: list[int] = []
        self.phases: list[tuple[float, float, float]] = []  # forward, backward, step (s)

    def step(self) -> None:
        t0 = time.perf_counter()
        loss = self.model(input_ids=self.tokens, labels=self.tokens).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.grad_bytes.append(grad_bytes(self.model))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.phases.append((t1 - t0, t2 - t1, time.perf_counter() - t2))

    def refresh_step(self) -> None:
        C.force_refresh(self.opt, galore=self.method == "galore")
        self.step()


def backward_flops(model, tokens) -> int:
    model.set_attn_implementation("eager")
    try:
        loss = model(input_ids=tokens, labels=tokens).loss
        with FlopCounterMode(display=False) as counter:
            loss.backward()
    finally:
        model.set_attn_implementation("sdpa")
    return counter.get_total_flops()


def bench_train_step(
    model_name: str, ranks: list[int], reps: int, refresh_reps: int, batch: int, seq: int
) -> dict:
    base = C.build_llama(model_name)
    tokens = torch.randint(
        0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(2)
    )
    runs = [("adamw", None)]
    notes = []
    for r in ranks:
        if C.import_galore():
            runs.append(("galore", r))
        runs.append(("grass", r))
        if grassify is not None:
            runs.append(("grassify", r))
    if C.import_galore() is None:
        notes.append("GaLore skipped: galore-torch is not installed.")
    if grassify is None:
        notes.append("Grass compressed backward skipped: hf_grass.grassify does not exist yet.")

    trainers = {(m, r): Trainer(m, r, base, tokens) for m, r in runs}
    t_first = {}
    for key, t in trainers.items():  # warm-up: step 0 selects rows / runs the SVD
        t0 = time.perf_counter()
        t.step()
        t_first[key] = time.perf_counter() - t0
    t_reg = interleaved({k: t.step for k, t in trainers.items()}, reps)
    phases = {
        k: [statistics.median(x) for x in zip(*t.phases[1:], strict=True)]
        for k, t in trainers.items()
    }
    regular_grad_bytes = {k: t.grad_bytes[-1] for k, t in trainers.items()}
    # Refresh: forced for Grass (cheap); GaLore's step 0 (its SVD) stands for its refresh step.
    grass_runs = {k: t for k, t in trainers.items() if k[0] in ("grass", "grassify")}
    t_ref = interleaved({k: t.refresh_step for k, t in grass_runs.items()}, refresh_reps)
    t_ref.update({k: [t_first[k]] for k in trainers if k[0] == "galore"})
    refresh_grad_bytes = {k: t.grad_bytes[-1] for k, t in grass_runs.items()}

    # FLOPs: one backward of each distinct kind, on a regular (non-refresh) step.
    frozen = copy.deepcopy(base)
    projected, _ = C.split_params(frozen)
    for p in projected:
        p.requires_grad_(False)
    flops_frozen = backward_flops(frozen, tokens)
    del frozen
    dense_model = copy.deepcopy(base)
    flops_dense = backward_flops(dense_model, tokens)
    del dense_model
    flops = {}
    for (m, r), t in trainers.items():
        if m == "grassify":
            f = backward_flops(t.model, tokens)
            t.model.zero_grad(set_to_none=True)
            t.opt.zero_grad(set_to_none=True)
        else:
            f = flops_dense
        flops[(m, r)] = f
    projected_shapes = [tuple(p.shape) for p in C.split_params(base)[0]]
    dense_w = sum(a * b for a, b in projected_shapes)

    out = {}
    for key in trainers:
        m, r = key
        reg = statistics.median(t_reg[key])
        ref = statistics.median(t_ref[key]) if key in t_ref else None
        amort = reg + max(ref - reg, 0.0) / K if ref is not None else reg
        f = flops[key]
        out[label(m, r)] = {
            "method": m,
            "rank": r,
            "step_s": reg,
            "min_step_s": min(t_reg[key]),
            "forward_s": phases[key][0],
            "backward_s": phases[key][1],
            "optimizer_s": phases[key][2],
            "refresh_step_s": ref,
            "amortized_s": amort,
            "grad_bytes_before_step": regular_grad_bytes[key],
            "grad_bytes_before_refresh_step": refresh_grad_bytes.get(key),
            "backward_flops": f,
            "weight_grad_flops_projected": f - flops_frozen,
            "expected_weight_grad_ratio": (
                sum(r * min(a, b) for a, b in projected_shapes) / dense_w
                if m == "grassify"
                else 1.0
            ),
            "raw_step_s": t_reg[key],
            "raw_refresh_s": t_ref.get(key),
        }
    del trainers, base
    gc.collect()
    return {
        "model": model_name,
        "batch": batch,
        "seq": seq,
        "reps": reps,
        "backward_flops_dense": flops_dense,
        "backward_flops_frozen_projected": flops_frozen,
        "notes": notes,
        "results": out,
    }


# --------------------------------------------------------------------------------------- tables
def print_step_table(res: dict, title: str) -> None:
    rows = []
    base = res["results"]["AdamW"]["amortized_s"]
    for name, e in res["results"].items():
        rows.append(
            [
                name,
                f"{e['step_s'] * 1e3:.1f}",
                f"{e['refresh_step_s'] * 1e3:.1f}" if e["refresh_step_s"] is not None else "-",
                f"{e['amortized_s'] * 1e3:.1f}",
                f"{e['step_s'] / res['results']['AdamW']['step_s']:.2f}",
                f"{e['amortized_s'] / base:.2f}",
            ]
        )
    print(f"\n{title}")
    print(
        C.fmt_table(
            [
                "method",
                "step ms",
                "refresh step ms",
                f"amortized ms (K={K})",
                "step / AdamW",
                "amortized / AdamW",
            ],
            rows,
        )
    )


def print_train_table(res: dict) -> None:
    rows = []
    a = res["results"]["AdamW"]
    for name, e in res["results"].items():
        rows.append(
            [
                name,
                f"{e['step_s']:.3f}",
                f"{e['forward_s']:.3f} / {e['backward_s']:.3f} / {e['optimizer_s']:.3f}",
                f"{e['refresh_step_s']:.2f}" if e["refresh_step_s"] is not None else "-",
                f"{e['amortized_s']:.3f}",
                f"{e['amortized_s'] / a['amortized_s']:.2f}",
                f"{e['backward_s'] / a['backward_s']:.2f}",
                C.mb(e["grad_bytes_before_step"]),
                f"{e['grad_bytes_before_step'] / a['grad_bytes_before_step']:.3f}",
                f"{e['backward_flops'] / 1e9:.2f}",
                f"{e['backward_flops'] / a['backward_flops']:.3f}",
                f"{e['weight_grad_flops_projected'] / a['weight_grad_flops_projected']:.4f}"
                f" ({e['expected_weight_grad_ratio']:.4f})",
            ]
        )
    print(
        f"\nPart B: training step (forward + backward + step), {res['model']}, fp32, batch "
        f"{res['batch']} x {res['seq']} tokens, medians of {res['reps']} interleaved rounds; "
        "grad MB = .grad + .compressed_grad right before step(); W-grad = weight-gradient "
        "FLOPs of the projected layers (expected r-ratio in brackets)"
    )
    headers = [
        "method",
        "s/step",
        "fwd / bwd / opt s",
        "refresh s",
        f"amortized s (K={K})",
        "vs AdamW",
        "bwd time vs AdamW",
        "grad MB",
        "vs AdamW",
        "bwd GFLOP",
        "vs AdamW",
        "W-grad FLOP ratio",
    ]
    print(C.fmt_table(headers, rows))
    for note in res["notes"]:
        print("NOTE:", note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="20m-wide")
    ap.add_argument(
        "--extra-model", default="", help="also run part A on this model, e.g. the '20m' preset"
    )
    ap.add_argument(
        "--ranks", default="", help="comma-separated ranks (default hidden/8, hidden/4)"
    )
    ap.add_argument("--reps", type=int, default=7, help="timed rounds of part A")
    ap.add_argument("--train-reps", type=int, default=5, help="timed rounds of part B")
    ap.add_argument("--refresh-reps", type=int, default=2, help="timed refresh steps of part A")
    ap.add_argument(
        "--train-refresh-reps", type=int, default=1, help="timed refresh steps of part B"
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--parts", default="A,B", help="A: optimizer step() only, B: training step")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: see the module docstring)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.linalg.svd(torch.randn(256, 128))  # LAPACK's first-call set-up, not GaLore's refresh
    torch.manual_seed(0)
    hidden = C.LLAMA_CONFIGS[args.model]["hidden_size"]
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else [hidden // 8, hidden // 4]

    results = {
        "env": C.env_info(),
        "K": K,
        "ranks": ranks,
        "optimizer_step": {},
        "train_step": None,
    }
    parts = set(args.parts.upper().split(","))
    for name in (
        [args.model, *([args.extra_model] if args.extra_model else [])] if "A" in parts else []
    ):
        h = C.LLAMA_CONFIGS[name]["hidden_size"]
        rk = ranks if name == args.model else [h // 8, h // 4]
        results["optimizer_step"][name] = bench_optimizer_step(
            name, rk, args.reps, args.refresh_reps
        )
        print(f"part A done on {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "B" in parts:
        results["train_step"] = bench_train_step(
            args.model, ranks, args.train_reps, args.train_refresh_reps, args.batch, args.seq
        )
        print(f"part B done ({time.perf_counter() - t0:.0f} s)", flush=True)
    results["wall_s"] = time.perf_counter() - t0
    results["env"]["torch_threads"] = torch.get_num_threads()
    results["env"]["loadavg_at_end"] = os.getloadavg()

    for name, res in results["optimizer_step"].items():
        print_step_table(
            res,
            f"Part A: optimizer step() only, {name} ({res['params'] / 1e6:.1f}M params), fp32, medians of {args.reps} interleaved rounds",
        )
    if results["train_step"]:
        print_train_table(results["train_step"])
    path = C.write_json(f"step_time_{args.model}.json", results, args.out)
    print(f"\nwrote {path} (total {results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()

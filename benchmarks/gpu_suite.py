"""GPU suite: LLaMA-1B, pure bf16 — AdamW vs GaLore vs Grass vs Grass layer-wise, in a few minutes.

Protocol (BENCHMARKS.md, Protocol 2): GaLore's LLaMA-1B config (hidden 2048, FFN 5461, 32
heads, 24 layers, vocab 32000), random init, pure bf16 weights built directly on the GPU (optimizer
states in bf16 too: no fp32 master copy), batch 8 x 256 tokens, no activation checkpointing,
1 warm-up step + 5 timed steps (CUDA events, synchronized). Methods, each in a fresh subprocess
(so that memory is freed and peaks are not shared):

- ``adamw``: ``torch.optim.AdamW(fused=True)``;
- ``galore``: galore-torch ``GaLoreAdamW``, r=512, K=200, scale 0.25 (GaLore's 1B setting);
- ``grass``: ``GrassAdamW(grassify(model, rank=512, update_proj_gap=200))``, compressed backward;
- ``grass_layerwise``: the same plus ``hf_grass.layerwise.enable_layerwise`` (update in backward).

Refresh steps (GaLore's SVD, Grass's re-selection, every K steps) are timed separately: the step is
forced with the optimizers' step counters set to the next multiple of K, then amortized:
``amortized = regular + (refresh - regular) / K``. When the warm-up step (step 0, itself a
refresh) took longer than ``--reuse-warmup-s`` (GaLore's SVD: ~40 s on an H200), it stands in for
the refresh step instead of running a second one; the JSON says so (``refresh_from_warmup``).

Reported per method: peak ``torch.cuda.max_memory_allocated`` (whole run, and over the timed
steps only), s/step, tokens/s (regular and amortized), ratios vs AdamW. JSON goes to ``$OUT``
(default ``benchmarks/results``), a table is printed last.

GaLore is optional: the GPU image has no galore-torch. It is imported from the environment, or
from ``--galore-dir`` (a folder holding the ``galore_torch`` package, e.g. a carried copy of
``.venv/lib/python3.11/site-packages``), or found in a carried ``.venv`` of the repo; only its
``adamw.py`` and ``galore_projector.py`` are loaded (its ``__init__`` imports bitsandbytes). If it
is not found, the other methods run and GaLore is reported missing.

Commands:
    python3 benchmarks/gpu_suite.py                      # on the GPU machine (< 6 minutes)
    .venv/bin/python benchmarks/gpu_suite.py --tiny      # CPU self-check, tiny model, < 1 minute
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # _common
METHODS = ("adamw", "galore", "grass", "grass_layerwise")
RUN_ORDER = ("adamw", "grass", "grass_layerwise", "galore")  # GaLore (slowest, optional) last
LABELS = {
    "adamw": "AdamW (fused)",
    "galore": "GaLore",
    "grass": "Grass (compressed bwd)",
    "grass_layerwise": "Grass layer-wise",
}


# ------------------------------------------------------------------------------------- GaLore
def _galore_candidates(galore_dir: str | None) -> list[Path]:
    dirs = [Path(galore_dir)] if galore_dir else []
    dirs += [
        Path(p)
        for p in sorted(glob.glob(str(REPO / ".venv" / "lib" / "python*" / "site-packages")))
    ]
    return [d for d in dirs if (d / "galore_torch" / "adamw.py").exists()]


def galore_available(galore_dir: str | None) -> bool:
    """Whether GaLore can be loaded, without importing it (nor torch)."""
    import importlib.util

    return importlib.util.find_spec("galore_torch") is not None or bool(
        _galore_candidates(galore_dir)
    )


def load_galore_adamw(galore_dir: str | None):
    """galore-torch's ``AdamW`` (GaLoreAdamW), or ``None``.

    ``galore_torch/__init__.py`` also imports its 8-bit optimizer, which needs bitsandbytes; when
    that import fails, the package is set up without its ``__init__`` and only ``adamw`` (and the
    projector it imports) is loaded.
    """
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW
    except ImportError:
        pass
    for d in _galore_candidates(galore_dir):
        for name in [
            m for m in sys.modules if m == "galore_torch" or m.startswith("galore_torch.")
        ]:
            del sys.modules[name]
        package = types.ModuleType("galore_torch")
        package.__path__ = [str(d / "galore_torch")]
        sys.modules["galore_torch"] = package
        try:
            return importlib.import_module("galore_torch.adamw").AdamW
        except ImportError:
            del sys.modules["galore_torch"]
    return None


# ------------------------------------------------------------------------------------- worker
def worker(args) -> dict:
    import _common as C
    import torch

    C.add_repo_to_path()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16
    if args.model == "tiny" and not cuda:
        # Self-check only: one thread per process makes tiny ops immune to a busy machine.
        torch.set_num_threads(1)
    torch.manual_seed(0)
    result: dict = {"method": args.worker, "device": str(device), "env": C.env_info()}

    galore_cls = None
    if args.worker == "galore":
        galore_cls = load_galore_adamw(args.galore_dir)
        if galore_cls is None:
            return {**result, "status": "missing", "note": "galore-torch not importable here"}

    t_build = time.perf_counter()
    model = C.build_llama(args.model, device=device, dtype=dtype)
    model.config.use_cache = False
    model.train()
    if cuda:
        torch.cuda.synchronize()
    result["build_s"] = time.perf_counter() - t_build
    result["params"] = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.seq), device=device)

    layerwise = None
    if args.worker == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    elif args.worker == "galore":
        projected, other = C.split_params(model)
        groups = C.galore_groups(projected, other, args.rank, update_proj_gap=args.K, scale=0.25)
        opt = galore_cls(groups, lr=args.lr, no_deprecation_warning=True)
    else:
        from hf_grass import GrassAdamW

        try:
            from hf_grass import grassify
        except ImportError:
            from hf_grass.linear import grassify
        groups = grassify(model, rank=args.rank, update_proj_gap=args.K)
        opt = GrassAdamW(groups, lr=args.lr, stochastic_rounding=args.stochastic_rounding)
        if args.worker == "grass_layerwise":
            try:
                from hf_grass.layerwise import enable_layerwise
            except ImportError:
                return {**result, "status": "missing", "note": "hf_grass.layerwise not present"}
            layerwise = enable_layerwise(opt, model)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    losses = []

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()  # layer-wise: a no-op for parameters already updated in the backward
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    def timed(fn) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        result["weights_gib"] = torch.cuda.memory_allocated() / 2**30
    sync()
    result["warmup_s"] = timed(step)  # step 0: state creation + SVD / row selection
    peak_warmup = torch.cuda.max_memory_allocated() if cuda else 0
    if cuda:
        result["after_warmup_gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()

    times = [timed(step) for _ in range(args.steps)]
    peak_steady = torch.cuda.max_memory_allocated() if cuda else 0

    refresh_s = None
    if args.worker != "adamw":
        if result["warmup_s"] > args.reuse_warmup_s:
            refresh_s = result["warmup_s"]
            result["refresh_from_warmup"] = True
        else:
            C.force_refresh(opt, galore=args.worker == "galore")
            refresh_s = timed(step)
            result["refresh_from_warmup"] = False
    peak_all = max(peak_warmup, torch.cuda.max_memory_allocated() if cuda else 0)
    if layerwise is not None:
        layerwise.remove()

    s_step = sorted(times)[len(times) // 2]
    amort = s_step + (max(refresh_s - s_step, 0.0) / args.K if refresh_s is not None else 0.0)
    tok = args.batch * args.seq
    losses_f = [float(x) for x in losses]
    result.update(
        status="ok",
        step_s=s_step,
        step_times_s=times,
        refresh_s=refresh_s,
        amortized_s=amort,
        tokens_per_s=tok / s_step,
        amortized_tokens_per_s=tok / amort,
        peak_gib=peak_all / 2**30 if cuda else None,
        peak_steady_gib=peak_steady / 2**30 if cuda else None,
        losses=losses_f,
        finite=all(x == x and abs(x) != float("inf") for x in losses_f),
    )
    if not cuda:
        import resource

        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ------------------------------------------------------------------------------- orchestrator
def run_method(method: str, args, timeout: float) -> dict:
    """Run one method's worker in a child process; its result, or why there is none.

    ``spawn`` (the default where a GPU is present): a fresh interpreter per method, the safest:
    its own CUDA context and allocator, everything freed when it exits. ``fork`` (the default
    without a GPU, e.g. ``--tiny`` on a CPU): a forked child of this process, which has imported
    torch and transformers already, so that the self-check does not pay the imports four times.
    """
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        t0 = time.perf_counter()
        if args.isolation == "spawn":
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                method,
                "--result",
                str(result_file),
            ]
            cmd += _forward_args(args)
            try:
                proc = subprocess.run(cmd, timeout=timeout, cwd=REPO)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
        else:
            child_args = argparse.Namespace(
                **{**vars(args), "worker": method, "result": str(result_file)}
            )
            child = multiprocessing.get_context("fork").Process(target=_child, args=(child_args,))
            child.start()
            child.join(timeout)
            if child.is_alive():
                child.kill()
                child.join()
                rc = None
            else:
                rc = child.exitcode
        if rc is None:
            return {"method": method, "status": "timeout", "note": f"killed after {timeout:.0f} s"}
        if rc != 0 or not result_file.exists():
            return {"method": method, "status": "failed", "rc": rc, "note": "see the log above"}
        result = json.loads(result_file.read_text())
        result["process_wall_s"] = time.perf_counter() - t0
        return result


def _child(args) -> None:
    sys.stdout.flush()
    Path(args.result).write_text(json.dumps(worker(args), default=str))
    sys.stdout.flush()


def _forward_args(args) -> list[str]:
    out = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq)]
    out += [
        "--rank",
        str(args.rank),
        "--K",
        str(args.K),
        "--steps",
        str(args.steps),
        "--lr",
        str(args.lr),
    ]
    out += ["--reuse-warmup-s", str(args.reuse_warmup_s)]
    if args.device:
        out += ["--device", args.device]
    if args.galore_dir:
        out += ["--galore-dir", args.galore_dir]
    if args.stochastic_rounding:
        out.append("--stochastic-rounding")
    return out


def print_table(results: dict, args) -> None:
    base = results.get("adamw", {})
    ok_base = base.get("status") == "ok"
    headers = [
        "method",
        "peak GiB",
        "vs AdamW",
        "s/step",
        "refresh s",
        f"amort. s/step (K={args.K})",
        "tok/s",
        "amort. tok/s",
        "amort. tok/s vs AdamW",
    ]
    rows = []
    for m in METHODS:
        if m not in results:
            continue
        e = results[m]
        if e.get("status") != "ok":
            rows.append([LABELS[m], e.get("status"), e.get("note", ""), "", "", "", "", "", ""])
            continue
        peak = e.get("peak_gib")
        rows.append(
            [
                LABELS[m] + ("" if m == "adamw" else f" r={args.rank}"),
                f"{peak:.2f}" if peak is not None else f"{e.get('peak_rss_mib', 0):.0f} MiB RSS",
                f"{peak / base['peak_gib']:.2f}"
                if ok_base and peak and base.get("peak_gib")
                else "-",
                f"{e['step_s']:.4f}",
                f"{e['refresh_s']:.3f}" + ("*" if e.get("refresh_from_warmup") else "")
                if e["refresh_s"] is not None
                else "-",
                f"{e['amortized_s']:.4f}",
                f"{e['tokens_per_s']:,.0f}",
                f"{e['amortized_tokens_per_s']:,.0f}",
                f"{e['amortized_tokens_per_s'] / base['amortized_tokens_per_s']:.2f}"
                if ok_base
                else "-",
            ]
        )
    import _common as C

    print(C.fmt_table(headers, rows))
    if any(
        results[m].get("refresh_from_warmup") for m in results if results[m].get("status") == "ok"
    ):
        print("* refresh time taken from the warm-up step (step 0, which refreshes too)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--tiny", action="store_true", help="self-check: tiny model, small batch, any device"
    )
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--model", default="1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--K", type=int, default=200)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--galore-dir", default=None, help="folder that holds a galore_torch package")
    ap.add_argument(
        "--stochastic-rounding",
        action="store_true",
        help="Grass: stochastic rounding of bf16 updates",
    )
    ap.add_argument("--reuse-warmup-s", type=float, default=20.0)
    ap.add_argument(
        "--budget-s", type=float, default=330.0, help="stop starting methods after this"
    )
    ap.add_argument("--method-timeout-s", type=float, default=200.0)
    ap.add_argument(
        "--isolation",
        choices=("auto", "spawn", "fork"),
        default="auto",
        help="one fresh interpreter per method (spawn) or a fork of this process; auto: spawn "
        "where a GPU is present, else fork",
    )
    ap.add_argument(
        "--out", default=None, help="output folder (default $OUT or benchmarks/results)"
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.model, args.batch, args.seq, args.rank = "tiny", 2, 32, 8
        args.budget_s = min(args.budget_s, 240.0)
        args.method_timeout_s = min(args.method_timeout_s, 90.0)

    if args.worker:
        result = worker(args)
        Path(args.result).write_text(json.dumps(result, default=str))
        return

    t0 = time.perf_counter()
    if args.isolation == "auto":
        gpu = any(Path(d).exists() for d in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))
        args.isolation = "spawn" if gpu else "fork"
    if args.isolation == "fork":
        # Imported once here, inherited by every forked worker. Nothing here may initialise CUDA.
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        import _common as C
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import LlamaForCausalLM  # noqa: F401

        C.add_repo_to_path()
        import hf_grass  # noqa: F401

        if torch.cuda.is_initialized():
            args.isolation = "spawn"  # a forked child could not use CUDA
    wanted = [m for m in args.methods.split(",") if m]
    unknown = set(wanted) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    results: dict = {}
    for method in [m for m in RUN_ORDER if m in wanted]:
        left = args.budget_s - (time.perf_counter() - t0)
        if method == "galore" and not galore_available(args.galore_dir):
            results[method] = {
                "method": method,
                "status": "missing",
                "note": "galore-torch not installed",
            }
            print(f"{method}: missing (galore-torch not installed; see --galore-dir)", flush=True)
            continue
        if left < 15:
            results[method] = {"method": method, "status": "skipped", "note": "time budget spent"}
            continue
        print(f"{method}: running ({time.perf_counter() - t0:.0f} s elapsed)", flush=True)
        r = run_method(method, args, timeout=min(args.method_timeout_s, left))
        results[method] = r
        if r.get("status") == "ok":
            peak = r.get("peak_gib")
            extra = f", {r['step_s']:.4f} s/step" + (
                f", peak {peak:.2f} GiB" if peak is not None else ""
            )
        else:
            extra = f": {r.get('note', '')}"
        print(
            f"{method}: {r.get('status')}{extra} ({time.perf_counter() - t0:.0f} s elapsed)",
            flush=True,
        )

    env = next((r["env"] for r in results.values() if "env" in r), {})
    payload = {
        "protocol": "BENCHMARKS.md, Protocol 2",
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "K": args.K,
        "timed_steps": args.steps,
        "dtype": "bfloat16 (weights and states)",
        "env": env,
        "wall_s": time.perf_counter() - t0,
        "results": results,
    }
    import _common as C

    path = C.write_json("gpu_suite_tiny.json" if args.tiny else "gpu_suite.json", payload, args.out)
    print(f"\nwrote {path} (total {payload['wall_s']:.0f} s)")
    print(
        f"\nLLaMA-{args.model}, bf16, batch {args.batch} x {args.seq}, r={args.rank}, K={args.K}, "
        f"device: {env.get('gpu') or env.get('cpu')}"
    )
    print_table(results, args)


if __name__ == "__main__":
    main()

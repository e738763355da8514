"""GPU suite: LLaMA-1B speed (AdamW vs GaLore vs Grass) and LLaMA-13B/30B memory, in < 6 minutes.

Part ``1b`` (BENCHMARKS.md, Protocol 2): GaLore's LLaMA-1B config (hidden 2048, FFN 5461, 32
heads, 24 layers, vocab 32000), random init, pure bf16 weights built directly on the GPU (optimizer
states in bf16 too: no fp32 master copy), batch 8 x 256 tokens, no activation checkpointing,
1 warm-up step + 5 timed steps (CUDA events, synchronized). Methods:

- ``adamw``: ``torch.optim.AdamW(fused=True)``;
- ``galore``: galore-torch ``GaLoreAdamW``, r=512, K=200, scale 0.25 (GaLore's 1B setting);
- ``grass``: ``GrassAdamW(grassify(model, rank=512, update_proj_gap=200))``, compressed backward,
  default step (the batched fast path: weights of equal compressed shape stepped as one batch);
- ``grass_foreach``: the same with ``batched=False`` (the per-tensor ``torch._foreach_*`` step);
- ``grass_compiled``: the same with ``compiled=True`` (the batch's Adam arithmetic fused by
  ``torch.compile``; its compile time is in the warm-up step);
- ``grass_layerwise``: ``grass`` plus ``hf_grass.layerwise.enable_layerwise`` (update in backward,
  one parameter at a time);
- ``grass_layerwise_bucket``: layer-wise with ``bucket_mb=--bucket-mb`` (ready parameters updated
  together, one batched step per bucket);
- ``grass_recompute``: ``grass`` as GrassTrainer runs it by default: norms recomputed
  (``hf_grass.recompute.recompute_norms``) and selection steps under ``layers_recomputed``, so
  ordinary steps keep ``X[:, cols]`` of cols-side layers and set the peak.

Refresh steps (GaLore's SVD, Grass's re-selection, every K steps) are timed separately: the step is
forced with the optimizers' step counters set to the next multiple of K, then amortized:
``amortized = regular + (refresh - regular) / K``. When the warm-up step (step 0, itself a
refresh) took longer than ``--reuse-warmup-s`` (GaLore's SVD: ~40 s on an H200), it stands in for
the refresh step instead of running a second one; the JSON says so (``refresh_from_warmup``).

Parts ``13b`` and ``30b`` (memory): LLaMA-13B (hidden 5120, FFN 13824, 40 heads, 40 layers) and
LLaMA-30B (hidden 6656, FFN 17920, 52 heads, 60 layers), vocab 32000, pure bf16, built directly
on the GPU, batch 1 x 256 tokens, activation checkpointing (``gradient_checkpointing_enable``),
``--mem-steps`` real steps (the first one selects rows), peak ``torch.cuda.max_memory_allocated``:

- ``13b:grass_layerwise``: Grass layer-wise, r=``--mem-rank``, on the whole card;
- ``13b:adamw`` and ``13b:galore``: AdamW (fused) and GaLore under
  ``torch.cuda.set_per_process_memory_fraction`` equal to ``--cap-gib`` (40 GiB): an
  out-of-memory error is a result ("OOM at 40 GiB", with the stage it happened in);
- ``30b:grass_layerwise``: Grass layer-wise on the whole card.

Every run is a fresh subprocess (so that memory is freed and peaks are not shared). Where
``hf_grass.memory.plan_memory`` exists, its prediction for each run's setting is recorded beside
the measured peak (``planned_gib``, ``peak_over_planned``; ``recompute=False``: these runs are
plain training loops, without GrassTrainer's recomputation, except ``grass_recompute``). JSON goes to ``$OUT`` (default
``benchmarks/results``; ``gpu_suite.json``, or ``gpu_suite_<parts>.json`` with ``--only``), tables
are printed last.

GaLore is optional: the GPU image has no galore-torch. It is imported from the environment, or
from ``--galore-dir`` (a folder holding the ``galore_torch`` package, e.g. a carried copy of
``.venv/lib/python3.11/site-packages``), or found in a carried ``.venv`` of the repo; only its
``adamw.py`` and ``galore_projector.py`` are loaded (its ``__init__`` imports bitsandbytes). If it
is not found, the other methods run and GaLore is reported missing.

Commands:
    python3 benchmarks/gpu_suite.py                      # everything, on the GPU machine (< 6 min)
    python3 benchmarks/gpu_suite.py --only 1b            # speed only (~3 min with GaLore)
    python3 benchmarks/gpu_suite.py --only 13b,30b       # memory only (~3 min)
    python3 benchmarks/gpu_suite.py --only 1b --methods adamw,grass,grass_layerwise_bucket
    .venv/bin/python benchmarks/gpu_suite.py --tiny      # CPU self-check, tiny models, < 1 minute

The suite stops starting runs after ``--budget-s`` (340 s) and records the rest as skipped; the
order puts the issue's measurements first (1B AdamW, Grass, layer-wise; 13B; 30B) and the
comparisons (foreach, compiled, GaLore 1B with its 40 s SVD) last.
"""

from __future__ import annotations

import argparse
import contextlib
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
METHODS = (
    "adamw",
    "galore",
    "grass",
    "grass_foreach",
    "grass_compiled",
    "grass_layerwise",
    "grass_layerwise_bucket",
    "grass_recompute",
)
MEMORY_METHODS = {"13b": ("grass_layerwise", "adamw", "galore"), "30b": ("grass_layerwise",)}
PARTS = ("1b", "13b", "30b")
# The measurements first; comparisons, and GaLore 1B (a 40 s SVD warm-up), last.
RUN_ORDER = (
    "1b:adamw",
    "1b:grass",
    "1b:grass_layerwise",
    "1b:grass_layerwise_bucket",
    "1b:grass_recompute",
    "13b:grass_layerwise",
    "13b:adamw",
    "13b:galore",
    "30b:grass_layerwise",
    "1b:grass_foreach",
    "1b:grass_compiled",
    "1b:galore",
)
LABELS = {
    "adamw": "AdamW (fused)",
    "galore": "GaLore",
    "grass": "Grass (compressed bwd)",
    "grass_foreach": "Grass, foreach step",
    "grass_compiled": "Grass, compiled step",
    "grass_layerwise": "Grass layer-wise",
    "grass_layerwise_bucket": "Grass layer-wise, buckets",
    "grass_recompute": "Grass, GrassTrainer's recompute",
}
# LLaMA-30B (LLaMA-1's 32.5B): the 13B preset with these overrides.
LLAMA_30B = dict(
    hidden_size=6656, intermediate_size=17920, num_attention_heads=52, num_hidden_layers=60
)


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
        variant = {"grass_foreach": dict(batched=False), "grass_compiled": dict(compiled=True)}
        opt = GrassAdamW(
            groups,
            lr=args.lr,
            stochastic_rounding=args.stochastic_rounding,
            **variant.get(args.worker, {}),
        )
        if args.worker == "grass_recompute":
            from hf_grass.recompute import recompute_norms

            recompute_norms(model)
        if args.worker.startswith("grass_layerwise"):
            from hf_grass.layerwise import enable_layerwise

            bucket = args.bucket_mb if args.worker == "grass_layerwise_bucket" else 0.0
            layerwise = enable_layerwise(opt, model, bucket_mb=bucket)
            result["bucket_mb"] = bucket

    def sync():
        if cuda:
            torch.cuda.synchronize()

    losses = []

    def recomputed():
        if args.worker == "grass_recompute" and opt.selection_pending():
            from hf_grass.recompute import layers_recomputed

            return layers_recomputed(model)
        return contextlib.nullcontext()

    def step():
        with recomputed():
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


# ----------------------------------------------------------------------------- memory worker
def big_config(part: str, tiny: bool):
    """The ``LlamaConfig`` of a memory part: LLaMA-13B, or 30B (tiny stand-ins for ``--tiny``)."""
    import _common as C

    C.add_repo_to_path()
    from hf_grass.models import llama_config

    if tiny:
        return llama_config("tiny", **({"num_hidden_layers": 3} if part == "30b" else {}))
    return llama_config("13b", **(LLAMA_30B if part == "30b" else {}))


def memory_worker(args, part: str, method: str) -> dict:
    """A few real steps of one method on a big model, built on the GPU in bf16; its peak memory.

    AdamW and GaLore run under a memory cap (``--cap-gib``); an out-of-memory error anywhere is a
    result, with the stage it happened in.
    """
    import _common as C
    import torch

    C.add_repo_to_path()
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    tiny = args.model == "tiny"
    if tiny and not cuda:
        torch.set_num_threads(1)
    torch.manual_seed(0)
    result: dict = {
        "part": part,
        "method": method,
        "device": str(device),
        "env": C.env_info(),
        "rank": args.mem_rank if method != "adamw" else None,
        "batch": args.mem_batch,
        "seq": args.mem_seq,
        "activation_checkpointing": True,
        "layerwise": method == "grass_layerwise",
    }
    galore_cls = None
    if method == "galore":
        galore_cls = load_galore_adamw(args.galore_dir)
        if galore_cls is None:
            return {**result, "status": "missing", "note": "galore-torch not importable here"}
    cap = args.cap_gib if method in ("adamw", "galore") else None
    if cap is not None:
        result["cap_gib"] = cap
        if cuda:
            index = torch.cuda.current_device()  # the cap wants an index, not "cuda"
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total), index)
        else:
            result["cap_note"] = "not capped: no GPU"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t_start = time.perf_counter()
    stage = "build"
    try:
        config = big_config(part, tiny)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.config.use_cache = False
        model.train()
        model.gradient_checkpointing_enable()
        sync()
        result["build_s"] = time.perf_counter() - t_start
        result["params"] = sum(p.numel() for p in model.parameters())
        if cuda:
            result["weights_gib"] = torch.cuda.memory_allocated() / 2**30
        stage = "optimizer"
        if method == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
        elif method == "galore":
            projected, other = C.split_params(model)
            groups = C.galore_groups(projected, other, args.mem_rank, args.K, scale=0.25)
            opt = galore_cls(groups, lr=args.lr, no_deprecation_warning=True)
        else:
            from hf_grass import GrassAdamW
            from hf_grass.layerwise import enable_layerwise
            from hf_grass.linear import grassify

            opt = GrassAdamW(
                grassify(model, rank=args.mem_rank, update_proj_gap=args.K), lr=args.lr
            )
            enable_layerwise(opt, model)
        tokens = torch.randint(0, config.vocab_size, (args.mem_batch, args.mem_seq), device=device)
        times, losses = [], []
        for i in range(args.mem_steps):
            stage = f"step {i} (forward)"
            t0 = time.perf_counter()
            loss = model(input_ids=tokens, labels=tokens).loss
            stage = f"step {i} (backward)"
            loss.backward()
            stage = f"step {i} (optimizer)"
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            sync()
            times.append(time.perf_counter() - t0)
        result.update(status="ok", step_times_s=times, losses=losses)
        result["finite"] = all(x == x and abs(x) != float("inf") for x in losses)
    except torch.OutOfMemoryError as error:
        where = f"{cap:g} GiB" if cap is not None else "the whole card"
        result.update(
            status="oom", stage=stage, note=f"OOM at {where} ({stage})", error=str(error)[:300]
        )
    finally:
        if cuda:
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        else:
            import resource

            result["peak_gib"] = None
            result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["wall_s"] = time.perf_counter() - t_start
    return result


def dispatch(args) -> dict:
    """Run the worker of ``args.worker`` (``part:method``; a bare method is part 1b)."""
    part, _, method = args.worker.rpartition(":")
    if part in ("", "1b"):
        return worker(argparse.Namespace(**{**vars(args), "worker": method}))
    return memory_worker(args, part, method)


def attach_plan(result: dict, part: str, method: str, args) -> None:
    """Record ``hf_grass.memory.plan_memory``'s prediction for this run (where it exists)."""
    try:
        import _common as C

        C.add_repo_to_path()
        from hf_grass.memory import plan_memory
    except ImportError:
        return
    tiny = args.model == "tiny"
    if part == "1b":
        model, batch, seq, rank, ckpt = args.model, args.batch, args.seq, args.rank, False
    else:
        model = big_config(part, tiny) if part == "30b" or tiny else part
        batch, seq, rank, ckpt = args.mem_batch, args.mem_seq, args.mem_rank, True
    try:
        plan = plan_memory(
            model,
            method=method.split("_")[0],  # adamw, galore, grass
            rank=rank,
            dtype="bf16",
            layerwise=method.startswith("grass_layerwise"),
            activation_checkpointing=ckpt,
            batch_size=batch,
            seq_len=seq,
            # A plain loop, not GrassTrainer: its selection steps keep every linear's whole
            # input and the norms keep their full set (but grass_recompute recomputes both).
            recompute=method == "grass_recompute",
        )
        # The peak (activations and gradients in turn) is what max_memory_allocated measures;
        # the total (everything at once) is kept beside it.
        result["planned_gib"] = plan.peak_bytes / 2**30
        result["planned_total_gib"] = plan.total_bytes / 2**30
    except Exception as error:  # a planner that refuses a setting must not stop the suite
        result["plan_error"] = f"{type(error).__name__}: {error}"[:300]
        return
    peak = result.get("peak_gib")
    if result.get("status") == "ok" and peak:
        result["peak_over_planned"] = peak / result["planned_gib"]


# ------------------------------------------------------------------------------- orchestrator
def run_method(method: str, args, timeout: float) -> dict:
    """Run one run's worker (``method`` is ``part:method``) in a child process; its result, or
    why there is none.

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
    Path(args.result).write_text(json.dumps(dispatch(args), default=str))
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
    out += ["--reuse-warmup-s", str(args.reuse_warmup_s), "--bucket-mb", str(args.bucket_mb)]
    out += ["--cap-gib", str(args.cap_gib), "--mem-rank", str(args.mem_rank)]
    out += ["--mem-steps", str(args.mem_steps), "--mem-batch", str(args.mem_batch)]
    out += ["--mem-seq", str(args.mem_seq)]
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
        "planned GiB (peak/planned)",
    ]
    rows = []
    for m in METHODS:
        if m not in results:
            continue
        e = results[m]
        if e.get("status") != "ok":
            rows.append([LABELS[m], e.get("status"), e.get("note", ""), *[""] * 7])
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
                (f"{e['planned_gib']:.3g}" if e.get("planned_gib") is not None else "-")
                + (f" ({e['peak_over_planned']:.2f})" if e.get("peak_over_planned") else ""),
            ]
        )
    import _common as C

    print(C.fmt_table(headers, rows))
    if any(
        results[m].get("refresh_from_warmup") for m in results if results[m].get("status") == "ok"
    ):
        print("* refresh time taken from the warm-up step (step 0, which refreshes too)")


def print_memory_table(memory: dict) -> None:
    headers = [
        "run",
        "status",
        "params (M)",
        "weights GiB",
        "peak GiB",
        "planned GiB",
        "peak / planned",
        "s/step",
    ]
    rows = []
    for run, e in memory.items():
        part, method = run.split(":")
        label = f"LLaMA-{part} {LABELS[method]}" + (
            f" r={e['rank']}" if e.get("rank") is not None else ""
        )
        if e.get("cap_gib") is not None:
            label += f", cap {e['cap_gib']:g} GiB"
        steps = e.get("step_times_s") or []
        peak, planned = e.get("peak_gib"), e.get("planned_gib")
        rows.append(
            [
                label,
                e.get("note", e.get("status", "")) if e.get("status") != "ok" else "ok",
                f"{e['params'] / 1e6:,.1f}" if e.get("params") else "-",
                f"{e['weights_gib']:.2f}" if e.get("weights_gib") is not None else "-",
                f"{peak:.2f}" if peak is not None else f"{e.get('peak_rss_mib', 0):.0f} MiB RSS",
                f"{planned:.3g}" if planned is not None else "-",
                f"{e['peak_over_planned']:.2f}" if e.get("peak_over_planned") else "-",
                f"{sorted(steps[1:])[len(steps[1:]) // 2]:.3f}" if len(steps) > 1 else "-",
            ]
        )
    import _common as C

    print(C.fmt_table(headers, rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--tiny", action="store_true", help="self-check: tiny models, small batches, any device"
    )
    ap.add_argument("--only", default=",".join(PARTS), help="parts to run: 1b, 13b, 30b")
    ap.add_argument(
        "--methods",
        default=None,
        help=f"methods to run (default: all); 1b: {', '.join(METHODS)}; 13b: "
        f"{', '.join(MEMORY_METHODS['13b'])}; 30b: {', '.join(MEMORY_METHODS['30b'])}",
    )
    ap.add_argument("--model", default="1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--K", type=int, default=200)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="grass_layerwise_bucket's size")
    ap.add_argument("--cap-gib", type=float, default=40.0, help="13B AdamW/GaLore memory cap")
    ap.add_argument("--mem-rank", type=int, default=1024, help="rank of the 13B/30B runs")
    ap.add_argument("--mem-steps", type=int, default=3, help="steps of the 13B/30B runs")
    ap.add_argument("--mem-batch", type=int, default=1)
    ap.add_argument("--mem-seq", type=int, default=256)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--galore-dir", default=None, help="folder that holds a galore_torch package")
    ap.add_argument(
        "--stochastic-rounding",
        action="store_true",
        help="Grass: stochastic rounding of bf16 updates",
    )
    ap.add_argument("--reuse-warmup-s", type=float, default=20.0)
    ap.add_argument("--budget-s", type=float, default=340.0, help="stop starting runs after this")
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
        args.mem_rank, args.mem_seq, args.mem_steps = 8, 32, 2
        args.budget_s = min(args.budget_s, 240.0)
        args.method_timeout_s = min(args.method_timeout_s, 90.0)

    if args.worker:
        result = dispatch(args)
        Path(args.result).write_text(json.dumps(result, default=str))
        return

    parts = [p for p in args.only.split(",") if p]
    if set(parts) - set(PARTS):
        ap.error(f"unknown parts {sorted(set(parts) - set(PARTS))}; choose from {', '.join(PARTS)}")
    known = set(METHODS) | {m for ms in MEMORY_METHODS.values() for m in ms}
    methods = known if args.methods is None else {m for m in args.methods.split(",") if m}
    if methods - known:
        ap.error(
            f"unknown methods {sorted(methods - known)}; choose from {', '.join(sorted(known))}"
        )
    runs = [r for r in RUN_ORDER if r.split(":")[0] in parts and r.split(":")[1] in methods]

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
    results: dict = {}
    memory: dict = {}
    for run in runs:
        part, method = run.split(":")
        into, key = (results, method) if part == "1b" else (memory, run)
        left = args.budget_s - (time.perf_counter() - t0)
        if method == "galore" and not galore_available(args.galore_dir):
            into[key] = {
                "method": method,
                "status": "missing",
                "note": "galore-torch not installed",
            }
            print(f"{run}: missing (galore-torch not installed; see --galore-dir)", flush=True)
            continue
        if left < 15:
            into[key] = {"method": method, "status": "skipped", "note": "time budget spent"}
            print(f"{run}: skipped (time budget spent)", flush=True)
            continue
        print(f"{run}: running ({time.perf_counter() - t0:.0f} s elapsed)", flush=True)
        r = run_method(run, args, timeout=min(args.method_timeout_s, left))
        attach_plan(r, part, method, args)
        into[key] = r
        if r.get("status") == "ok":
            peak = r.get("peak_gib")
            extra = (f", {r['step_s']:.4f} s/step" if "step_s" in r else "") + (
                f", peak {peak:.2f} GiB" if peak is not None else ""
            )
        else:
            extra = f": {r.get('note', '')}"
        print(
            f"{run}: {r.get('status')}{extra} ({time.perf_counter() - t0:.0f} s elapsed)",
            flush=True,
        )

    every = [*results.values(), *memory.values()]
    env = next((r["env"] for r in every if "env" in r), {})
    payload = {
        "protocol": "BENCHMARKS.md, Protocol 2 (1b); memory runs (13b, 30b): see gpu_suite.py",
        "parts": parts,
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "K": args.K,
        "timed_steps": args.steps,
        "bucket_mb": args.bucket_mb,
        "memory_runs": {
            "batch": args.mem_batch,
            "seq": args.mem_seq,
            "rank": args.mem_rank,
            "steps": args.mem_steps,
            "cap_gib": args.cap_gib,
            "activation_checkpointing": True,
        },
        "dtype": "bfloat16 (weights and states)",
        "env": env,
        "wall_s": time.perf_counter() - t0,
        "results": results,
        "memory": memory,
    }
    import _common as C

    name = "gpu_suite" + ("_tiny" if args.tiny else "")
    if set(parts) != set(PARTS):
        name += "_" + "_".join(parts)
    path = C.write_json(name + ".json", payload, args.out)
    print(f"\nwrote {path} (total {payload['wall_s']:.0f} s)")
    device = env.get("gpu") or env.get("cpu")
    if results:
        print(
            f"\nLLaMA-{args.model}, bf16, batch {args.batch} x {args.seq}, r={args.rank}, "
            f"K={args.K}, device: {device}"
        )
        print_table(results, args)
    if memory:
        print(
            f"\nMemory: bf16, batch {args.mem_batch} x {args.mem_seq}, activation checkpointing, "
            f"{args.mem_steps} steps, device: {device}"
        )
        print_memory_table(memory)


if __name__ == "__main__":
    main()

"""GPU suite: LLaMA-1B speed, LLaMA-13B/30B memory, LLaMA-7B in 16 GiB; one invocation, < 6 minutes.

Timing protocol (every speed number; BENCHMARKS.md, Protocol 2): ``--warmup`` (3) warm-up steps,
then ``--steps`` (10) timed steps, each step on a different random batch (all batches are drawn on
the GPU before the first step, so no host-to-device copy is timed). Each step is timed alone (CUDA
events, synchronized) and the JSON keeps every time. Per method: median, mean, min and max of
s/step, and the tokens/s they give (``tokens_per_s`` from the median, ``tokens_per_s_min`` and
``tokens_per_s_max`` from the slowest and the fastest step). Ratios between methods (Grass vs fused
AdamW, vs GaLore) are computed only from numbers of the same invocation (``ratios`` in the JSON and
the line under the table; the ratio's range divides the extremes: slowest Grass step by fastest
AdamW step and the other way round): numbers of two invocations are never divided.

Refresh steps (GaLore's SVD, Grass's re-selection, every K steps) are timed separately: the step is
forced with the optimizers' step counters set to the next multiple of K, then amortized:
``amortized = median + (refresh - median) / K``. When the first warm-up step (step 0, itself a
refresh) took longer than ``--reuse-warmup-s`` (GaLore's SVD: ~40 s on an H200), it stands in for
the refresh step instead of running a second one; the JSON says so (``refresh_from_warmup``).

Part ``1b`` (speed): GaLore's LLaMA-1B config (hidden 2048, FFN 5461, 32 heads, 24 layers, vocab
32000), random init, pure bf16 weights built directly on the GPU (optimizer states in bf16 too: no
fp32 master copy), batch 8 x 256 tokens, no activation checkpointing. Methods:

- ``adamw``: ``torch.optim.AdamW(fused=True)``;
- ``galore``: galore-torch ``GaLoreAdamW``, r=512, K=200, scale 0.25 (GaLore's 1B setting);
- ``grass``: ``GrassAdamW(grassify(model, rank=512, update_proj_gap=200))``, compressed backward,
  default step (the batched fast path: weights of equal compressed shape stepped as one batch);
- ``grass_recompute``: ``grass`` as GrassTrainer runs it by default: norms recomputed
  (``hf_grass.recompute.recompute_norms``) and selection steps under ``layers_recomputed``, so
  ordinary steps keep ``X[:, cols]`` of cols-side layers and set the peak;
- ``grass_layerwise``: ``grass`` plus ``hf_grass.layerwise.enable_layerwise`` (update in backward,
  one parameter at a time);
- ``grass_layerwise_bucket``: layer-wise with ``bucket_mb=--bucket-mb`` (ready parameters updated
  together, one batched step per bucket);
- ``grass_foreach``: ``grass`` with ``implementation="foreach"`` (the per-tensor
  ``torch._foreach_*`` step);
- ``grass_compiled``: ``grass`` with ``implementation="compiled"`` (the batch's Adam arithmetic
  fused by ``torch.compile``; its compile time is in the first warm-up step);
- ``grass_triton``: ``grass`` with ``implementation="triton"`` (``hf_grass.triton_step``: one
  launch per batch of weights of equal compressed shape, reading and writing the selected rows
  in place; its compile time is in the first warm-up step). Missing without Triton. Time it
  beside the default step and
  fused AdamW with ``--only 1b --methods adamw,grass,grass_triton``.

Memory parts: pure bf16 models built directly on the GPU, activation checkpointing
(``gradient_checkpointing_enable``), ``--mem-steps`` (3) real steps on different batches (the first
one creates the state and selects rows / computes projections), peak
``torch.cuda.max_memory_allocated``. Runs under a cap use
``torch.cuda.set_per_process_memory_fraction(cap / total, device_index)``; an out-of-memory error
is a result ("OOM at 16 GiB (step 0 (backward))", with the stage it happened in).

- ``13b``: LLaMA-13B (hidden 5120, FFN 13824, 40 heads, 40 layers), batch 1 x 256,
  r=``--mem-rank`` (1024) for every projection method: ``grass_layerwise`` on the whole card;
  ``adamw`` (fused), ``galore``, ``galore_layerwise`` and ``adamw8bit`` under ``--cap-gib`` (40).
- ``7b16``: LLaMA-7B (hidden 4096, FFN 11008, 32 heads, 32 layers), batch 1 x ``--seq-7b`` (512),
  every method under ``--cap-7b-gib`` (16): ``grass_layerwise`` r=``--rank-7b`` (256);
  ``galore_layerwise`` at GaLore's own 7B setting, r=``--galore-rank-7b`` (1024, the rank of
  GaLore's single-GPU LLaMA-7B script), and ``galore_layerwise@256`` (Grass's rank) when time
  remains; ``adamw8bit``.
- ``30b``: LLaMA-30B (hidden 6656, FFN 17920, 52 heads, 60 layers), batch 1 x 256,
  ``grass_layerwise`` r=``--mem-rank`` on the whole card.

The strongest alternatives, as their users run them:

- ``galore_layerwise``: Hugging Face's layer-wise GaLore (the pattern behind transformers'
  ``galore_adamw_layerwise``): one ``GaLoreAdamW`` per parameter (a GaLore group for the projected
  attention/MLP weights, a plain one for the rest), stepped and zeroed from that parameter's
  ``register_post_accumulate_grad_hook``; the training loop's ``step()`` and ``zero_grad()`` do
  nothing. Written here in a few lines (:class:`PerParameterOptimizers`).
- ``adamw8bit``: 8-bit AdamW, ``torchao.optim.AdamW8bit`` (block-wise 8-bit moments, block 256,
  its step compiled by ``torch.compile``) or, without torchao, bitsandbytes' ``AdamW8bit``
  (``--adamw8bit-impl``). Without a GPU the torchao step runs eagerly
  (``torch.compiler.set_stance("force_eager")``), so that the self-check compiles nothing.
- GaLore in the memory runs: its SVD is replaced by a stand-in that returns orthonormal factors
  of the same shapes and dtype at once (``--galore-mem-svd identity``, the default; ``exact`` keeps
  ``torch.linalg.svd``). Every tensor GaLore keeps or allocates is the same; only cuSOLVER's
  workspace and the SVD's time are left out, which can only lower GaLore's measured peak. At 7B
  and 13B the exact SVDs (224 and 280 matrices of 4096 to 13824 rows; LLaMA-1B's 168 smaller ones
  take 42 s on an H200) would take longer than the whole suite. The speed part keeps the exact SVD.

Every run is a fresh subprocess (so that memory is freed and peaks are not shared) with its own
timeout (``TIMEOUT_S``, at most ``--method-timeout-s``); the suite starts a run only while the time
it is expected to take (``EXPECTED_S``, from the H200 runs of 2026-11-27) fits in what is left of
``--budget-s``, and records the others as skipped. A run also ends itself a few seconds before its
timeout (checked between steps and, in memory runs, at every parameter's gradient), keeping what it
measured so far (``status: time_limit``); a run killed at its timeout keeps what it wrote after its
last completed step. The JSON is rewritten after every run (``complete: false`` until the end), so a
killed suite still leaves its results.

Where ``hf_grass.memory.plan_memory`` models a run's setting (``adamw``, ``adamw-8bit``,
``galore`` with or without ``layerwise``, ``grass``), its prediction is recorded beside the measured
peak (``planned_gib``, ``peak_over_planned``; ``recompute=False``: these runs are plain training
loops, without GrassTrainer's recomputation, except ``grass_recompute``). The planner's
``adamw-8bit`` is bitsandbytes' layout; torchao's adds a 2 KiB quantization map per tensor and
keeps tensors under 4096 elements in the parameter's dtype (under 1 MB on a 7B model).

GaLore and torchao are optional: the GPU image has neither. They come as wheels in the repo's
``.whl/`` folder (carried to the GPU machine; ``benchmarks/gpu_run.sh`` installs them into
``/tmp/site`` and passes ``--site /tmp/site``, which only the GaLore and 8-bit AdamW runs add to
``sys.path``: transformers imports torchao at import time whenever it finds it). GaLore is imported
from the environment, from ``--galore-dir`` (a folder holding the ``galore_torch`` package), from
``--site``, any ``sys.path`` entry or a ``.venv`` of the repo; only its ``adamw.py`` and ``galore_projector.py`` are loaded when its
``__init__`` fails (it imports bitsandbytes). A method whose package is missing is reported
missing, and the others run.

JSON goes to ``$OUT`` (default ``benchmarks/results``; ``gpu_suite.json``, or
``gpu_suite_<parts>.json`` with ``--only``; ``_tiny`` with ``--tiny``); tables are printed last.

Commands:
    bash benchmarks/gpu_run.sh                           # the GPU machine: wheels, suite, < 6 min
    python3 benchmarks/gpu_suite.py --only 1b            # speed only (~2.5 min with GaLore)
    python3 benchmarks/gpu_suite.py --only 13b,7b16      # memory only (~2.5 min)
    python3 benchmarks/gpu_suite.py --only 1b --methods adamw,grass,grass_layerwise_bucket
    python3 benchmarks/gpu_suite.py --only 1b --methods adamw,grass,grass_triton  # Triton step
    .venv/bin/python benchmarks/gpu_suite.py --tiny      # CPU self-check, tiny models, < 2 min

The default order puts the most wanted measurements first: 1B AdamW, Grass, Grass with
GrassTrainer's recomputation, Grass layer-wise, GaLore (its 40 s SVD); 13B Grass layer-wise, then
AdamW, GaLore, layer-wise GaLore and 8-bit AdamW under the cap; 7B in 16 GiB; then what time
allows (GaLore layer-wise at Grass's rank on 7B, 30B, the other Grass step variants).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import importlib.util
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # _common
METHODS = (
    "adamw",
    "galore",
    "grass",
    "grass_recompute",
    "grass_layerwise",
    "grass_layerwise_bucket",
    "grass_foreach",
    "grass_compiled",
    "grass_triton",
)
MEMORY_METHODS = {
    "13b": ("grass_layerwise", "adamw", "galore", "galore_layerwise", "adamw8bit"),
    "7b16": ("grass_layerwise", "galore_layerwise", "adamw8bit", "galore_layerwise@256"),
    "30b": ("grass_layerwise",),
}
PARTS = ("1b", "13b", "7b16", "30b")
RUN_ORDER = (
    "1b:adamw",
    "1b:grass",
    "1b:grass_recompute",
    "1b:grass_layerwise",
    "1b:galore",
    "13b:grass_layerwise",
    "13b:adamw",
    "13b:galore",
    "13b:galore_layerwise",
    "13b:adamw8bit",
    "7b16:grass_layerwise",
    "7b16:galore_layerwise",
    "7b16:adamw8bit",
    # what time allows
    "7b16:galore_layerwise@256",
    "30b:grass_layerwise",
    "1b:grass_layerwise_bucket",
    "1b:grass_foreach",
    "1b:grass_compiled",
    "1b:grass_triton",
)
# Seconds a run takes on an H200, process start (imports, CUDA context) included: the 1B runs of
# 2026-11-27 took 14-23 s each (GaLore 56 s, its SVD 42 s; compiled 28 s), the 13B and 30B runs
# 15-18 s (a capped run ends at its OOM in step 0). Keys: "part:method", else "part".
EXPECTED_S = {
    "1b": 20.0,
    "1b:galore": 62.0,
    "1b:grass_compiled": 30.0,
    "1b:grass_triton": 25.0,
    "13b": 18.0,
    "13b:galore_layerwise": 25.0,
    "13b:adamw8bit": 22.0,
    "7b16": 20.0,
    "7b16:galore_layerwise": 22.0,
    "7b16:galore_layerwise@256": 25.0,
    "7b16:adamw8bit": 22.0,
    "30b": 20.0,
}
# A run's timeout (seconds): about three times what it is expected to take.
TIMEOUT_S = {"1b": 70.0, "1b:galore": 150.0, "1b:grass_compiled": 100.0,
             "1b:grass_triton": 90.0, "13b": 80.0, "7b16": 80.0, "30b": 80.0}  # fmt: skip
LABELS = {
    "adamw": "AdamW (fused)",
    "galore": "GaLore",
    "grass": "Grass (compressed bwd)",
    "grass_recompute": "Grass, GrassTrainer's recompute",
    "grass_layerwise": "Grass layer-wise",
    "grass_layerwise_bucket": "Grass layer-wise, buckets",
    "grass_foreach": "Grass, foreach step",
    "grass_compiled": "Grass, compiled step",
    "grass_triton": "Grass, Triton step",
    "galore_layerwise": "GaLore layer-wise (HF)",
    "adamw8bit": "8-bit AdamW",
}
MEMORY_MODELS = {"13b": "13b", "7b16": "7b", "30b": "13b"}
# LLaMA-30B (LLaMA-1's 32.5B): the 13B preset with these overrides.
LLAMA_30B = dict(
    hidden_size=6656, intermediate_size=17920, num_attention_heads=52, num_hidden_layers=60
)


def lookup(table: dict, run: str, default: float) -> float:
    """``table[run]``, else ``table[part]`` (``run`` is ``part:method``), else ``default``."""
    return table.get(run, table.get(run.split(":")[0], default))


def split_method(method: str) -> tuple[str, int | None]:
    """``"galore_layerwise@256"`` -> ``("galore_layerwise", 256)``; no ``@``: rank ``None``."""
    base, _, rank = method.partition("@")
    return base, int(rank) if rank else None


class TimeLimit(Exception):
    """A run reached its own time limit; what it measured so far is kept."""


# ------------------------------------------------------------------------------------- GaLore
def add_site(site: str | None) -> None:
    """Put ``--site`` (where ``gpu_run.sh`` installs the carried wheels) last on ``sys.path``.

    Only the workers that need it do so, after transformers is imported: transformers imports
    torchao at import time whenever it can find it, which every other run must not pay for (nor
    risk)."""
    if site and site not in sys.path:
        sys.path.append(site)
        importlib.invalidate_caches()


def _galore_candidates(galore_dir: str | None, site: str | None = None) -> list[Path]:
    dirs = [Path(d) for d in (galore_dir, site) if d]
    dirs += [Path(p) for p in sys.path if p]
    dirs += [
        Path(p)
        for p in sorted(glob.glob(str(REPO / ".venv" / "lib" / "python*" / "site-packages")))
    ]
    return [d for d in dirs if (d / "galore_torch" / "adamw.py").exists()]


def galore_available(galore_dir: str | None, site: str | None = None) -> bool:
    """Whether GaLore can be loaded, without importing it (nor torch)."""
    return importlib.util.find_spec("galore_torch") is not None or bool(
        _galore_candidates(galore_dir, site)
    )


def load_galore_adamw(galore_dir: str | None):
    """galore-torch's ``AdamW`` (GaLoreAdamW), or ``None``.

    ``galore_torch/__init__.py`` also imports its 8-bit optimizer, which needs bitsandbytes; when
    that import fails, the package is set up without its ``__init__`` and only ``adamw`` (and the
    projector it imports) is loaded.
    """
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


def identity_svd(matrix, full_matrices: bool = False):
    """A stand-in for ``torch.linalg.svd`` in GaLore's memory runs: ``U``, ``S``, ``Vh`` of the
    shapes and dtype the real one returns (``full_matrices=False``), orthonormal (identity
    columns), at once. GaLore keeps the first ``r`` of them as its projection."""
    import torch

    m, n = matrix.shape[-2:]
    k = min(m, n)
    like = dict(dtype=matrix.dtype, device=matrix.device)
    u = torch.zeros(m, k, **like)
    u.diagonal().fill_(1)
    vh = torch.zeros(k, n, **like)
    vh.diagonal().fill_(1)
    return u, torch.ones(k, **like), vh


class PerParameterOptimizers:
    """Hugging Face's layer-wise pattern (``galore_adamw_layerwise``), written out: one optimizer
    per trainable parameter, stepped and zeroed from the parameter's post-accumulate-grad hook as
    soon as its gradient is complete; ``step()`` and ``zero_grad()`` of the whole do nothing."""

    def __init__(self, model, make):
        self.optimizers: dict = {}
        for p in model.parameters():
            if p.requires_grad and p not in self.optimizers:
                self.optimizers[p] = make(p)
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.optimizers]

    def _hook(self, p) -> None:
        if p.grad is not None:
            optimizer = self.optimizers[p]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    @property
    def state(self) -> dict:
        return {p: o.state[p] for p, o in self.optimizers.items() if p in o.state}


# ---------------------------------------------------------------------------------- 8-bit AdamW
def adamw8bit_available(impl: str, site: str | None = None) -> bool:
    """Whether an 8-bit AdamW can be loaded, without importing it (nor torch)."""
    names = {"auto": ("torchao", "bitsandbytes"), "torchao": ("torchao",)}
    return any(
        importlib.util.find_spec(n) is not None or bool(site and (Path(site) / n).is_dir())
        for n in names.get(impl, ("bitsandbytes",))
    )


def load_adamw8bit(impl: str):
    """``(optimizer class, "torchao 0.17.0")`` for ``impl`` (``auto``: torchao, else
    bitsandbytes), or ``(None, why)``.

    torchao's C++/CUDA extensions are not loaded (``TORCHAO_FORCE_SKIP_LOADING_SO_FILES``): its
    8-bit optimizer is Python and ``torch.compile``, and the extensions of a wheel built for
    another CUDA would only warn.
    """
    from importlib.metadata import version

    errors = []
    if impl in ("auto", "torchao"):
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
        try:
            from torchao.optim import AdamW8bit

            return AdamW8bit, f"torchao {version('torchao')}"
        except Exception as error:
            errors.append(f"torchao: {type(error).__name__}: {error}"[:200])
        # torchao's __init__ imports all of torchao; its optimizers need only torchao.utils.
        for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("torchao")
        if spec is not None and spec.submodule_search_locations:
            package = types.ModuleType("torchao")
            package.__path__ = list(spec.submodule_search_locations)
            sys.modules["torchao"] = package
            try:
                optim = importlib.import_module("torchao.optim")
                return optim.AdamW8bit, f"torchao {version('torchao')} (torchao.optim alone)"
            except Exception as error:
                del sys.modules["torchao"]
                errors.append(f"torchao.optim: {type(error).__name__}: {error}"[:200])
    if impl in ("auto", "bitsandbytes"):
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit, f"bitsandbytes {version('bitsandbytes')}"
        except Exception as error:
            errors.append(f"bitsandbytes: {type(error).__name__}: {error}"[:200])
    return None, "; ".join(errors) or f"unknown implementation {impl!r}"


# ------------------------------------------------------------------------------- measurement
def spread(times: list[float], tokens: int) -> dict:
    """Median, mean, min, max (and standard deviation) of per-step times, and the tokens/s they
    give: ``tokens_per_s`` from the median, ``_mean`` from the mean, ``_min`` from the slowest
    step, ``_max`` from the fastest."""
    median, mean = statistics.median(times), statistics.fmean(times)
    return dict(
        step_s=median,
        step_mean_s=mean,
        step_min_s=min(times),
        step_max_s=max(times),
        step_std_s=statistics.pstdev(times),
        tokens_per_s=tokens / median,
        tokens_per_s_mean=tokens / mean,
        tokens_per_s_min=tokens / max(times),
        tokens_per_s_max=tokens / min(times),
    )


def save_partial(args, result: dict) -> None:
    """Write what a worker has measured so far where its final result will go: a run killed at
    its timeout keeps it."""
    if not getattr(args, "result", None):
        return
    path = Path(args.result)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps({**result, "status": "partial"}, default=str))
    tmp.replace(path)


def is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


# ------------------------------------------------------------------------------- speed worker
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
    deadline = args.deadline or None  # time.time() at which the run ends itself

    if args.worker == "grass_triton" and importlib.util.find_spec("triton") is None:
        return {**result, "status": "missing", "note": "triton not importable here"}
    galore_cls = None
    if args.worker == "galore":
        add_site(args.site)
        galore_cls = load_galore_adamw(args.galore_dir)
        if galore_cls is None:
            return {**result, "status": "missing", "note": "galore-torch not importable here"}

    result["stage"] = "build"
    try:
        return _speed_run(args, result, device, dtype, galore_cls, deadline, C, torch)
    except TimeLimit as error:
        result.update(status="time_limit", note=f"time limit ({error})")
    except Exception as error:
        if not is_oom(error):
            raise
        result.update(status="oom", note=f"OOM ({result['stage']})", error=str(error)[:300])
    if result.get("step_times_s"):  # the timed steps done before the time ran out
        result.update(spread(result["step_times_s"], args.batch * args.seq))
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def _speed_run(args, result, device, dtype, galore_cls, deadline, C, torch) -> dict:
    cuda = device.type == "cuda"
    t_build = time.perf_counter()
    model = C.build_llama(args.model, device=device, dtype=dtype)
    model.config.use_cache = False
    model.train()
    if cuda:
        torch.cuda.synchronize()
    result["build_s"] = time.perf_counter() - t_build
    result["params"] = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    # One batch per step, drawn before the first: warm-ups, timed steps, the refresh step.
    n_batches = args.warmup + args.steps + 1
    batches = torch.randint(0, vocab, (n_batches, args.batch, args.seq), device=device)

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
            from hf_grass import grassify
        groups = grassify(model, rank=args.rank, update_proj_gap=args.K)
        variant = {
            "grass_foreach": dict(implementation="foreach"),
            "grass_compiled": dict(implementation="compiled"),
            "grass_triton": dict(implementation="triton"),
        }
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

    losses = []

    def recomputed():
        if args.worker == "grass_recompute" and opt.selection_pending():
            from hf_grass.recompute import layers_recomputed

            return layers_recomputed(model)
        return contextlib.nullcontext()

    def step(i: int) -> None:
        tokens = batches[i]
        with recomputed():
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
        opt.step()  # layer-wise: a no-op for parameters already updated in the backward
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    def timed(i: int) -> float:
        if deadline is not None and time.time() > deadline:
            raise TimeLimit(f"before step {i}")
        result["stage"] = f"step {i}"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        step(i)
        return time.perf_counter() - t0

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        result["weights_gib"] = torch.cuda.memory_allocated() / 2**30
    # Step 0: state creation + SVD / row selection; then the other warm-up steps.
    warmup = result["warmup_times_s"] = []
    for i in range(args.warmup):
        warmup.append(timed(i))
    result["warmup_s"] = warmup[0]
    peak_warmup = torch.cuda.max_memory_allocated() if cuda else 0
    if cuda:
        result["after_warmup_gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    save_partial(args, result)

    times = result["step_times_s"] = []  # kept, with their statistics, if the time runs out
    for i in range(args.warmup, args.warmup + args.steps):
        times.append(timed(i))
    peak_steady = torch.cuda.max_memory_allocated() if cuda else 0
    tok = args.batch * args.seq
    stats = spread(times, tok)
    result.update(stats)
    save_partial(args, result)

    refresh_s = None
    if args.worker != "adamw":
        if result["warmup_s"] > args.reuse_warmup_s:
            refresh_s = result["warmup_s"]
            result["refresh_from_warmup"] = True
        else:
            C.force_refresh(opt, galore=args.worker == "galore")
            refresh_s = timed(n_batches - 1)
            result["refresh_from_warmup"] = False
    peak_all = max(peak_warmup, torch.cuda.max_memory_allocated() if cuda else 0)
    if layerwise is not None:
        layerwise.remove()

    s_step = stats["step_s"]
    amort = s_step + (max(refresh_s - s_step, 0.0) / args.K if refresh_s is not None else 0.0)
    losses_f = [float(x) for x in losses]
    result.update(
        status="ok",
        warmup_steps=args.warmup,
        timed_steps=args.steps,
        distinct_batches=n_batches,
        refresh_s=refresh_s,
        amortized_s=amort,
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
    """The ``LlamaConfig`` of a memory part: LLaMA-13B, 7B or 30B (tiny stand-ins for ``--tiny``)."""
    import _common as C

    C.add_repo_to_path()
    from hf_grass.models import llama_config

    if tiny:
        return llama_config("tiny", **({"num_hidden_layers": 3} if part == "30b" else {}))
    return llama_config(MEMORY_MODELS[part], **(LLAMA_30B if part == "30b" else {}))


def memory_setting(part: str, method: str, args) -> dict:
    """Batch, sequence, rank and memory cap (GiB, ``None``: the whole card) of a memory run."""
    base, rank_override = split_method(method)
    if part == "7b16":
        seq, cap = args.seq_7b, args.cap_7b_gib
        rank = args.rank_7b if base.startswith("grass") else args.galore_rank_7b
    else:
        seq = args.mem_seq
        cap = None if base.startswith("grass") else args.cap_gib
        rank = args.mem_rank
    rank = rank_override or rank
    if base in ("adamw", "adamw8bit"):
        rank = None
    if args.model == "tiny":  # tiny stand-ins: the tiny rank and sequence
        seq = args.mem_seq
        rank = min(rank, args.mem_rank) if rank else None
    return dict(batch=args.mem_batch, seq=seq, rank=rank, cap_gib=cap)


def memory_worker(args, part: str, method: str) -> dict:
    """A few real steps of one method on a big model, built on the GPU in bf16; its peak memory.

    Under a cap (``memory_setting``) an out-of-memory error anywhere is a result, with the stage
    it happened in; so is reaching the run's own time limit.
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
    base, _ = split_method(method)
    setting = memory_setting(part, method, args)
    cap = setting["cap_gib"]
    result: dict = {
        "part": part,
        "method": method,
        "device": str(device),
        "env": C.env_info(),
        **setting,
        "activation_checkpointing": True,
        "layerwise": "layerwise" in base,
    }
    deadline = args.deadline or None  # time.time() at which the run ends itself

    galore_cls = adamw8bit_cls = None
    if base.startswith("galore"):
        add_site(args.site)
        galore_cls = load_galore_adamw(args.galore_dir)
        if galore_cls is None:
            return {**result, "status": "missing", "note": "galore-torch not importable here"}
        result["galore_svd"] = args.galore_mem_svd
        if args.galore_mem_svd == "identity":
            torch.linalg.svd = identity_svd  # this process only: GaLore calls torch.linalg.svd
    if base == "adamw8bit":
        add_site(args.site)
        adamw8bit_cls, impl = load_adamw8bit(args.adamw8bit_impl)
        if adamw8bit_cls is None:
            return {**result, "status": "missing", "note": f"no 8-bit AdamW here ({impl})"}
        result["impl"] = impl
        if impl.startswith("torchao") and not cuda:
            torch.compiler.set_stance("force_eager")  # the CPU self-check compiles nothing
        result["compiled"] = impl.startswith("torchao") and cuda
    if cap is not None:
        if cuda:
            index = torch.cuda.current_device()  # the cap wants an index, not "cuda"
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total), index)
            result["card_gib"] = total / 2**30
        else:
            result["cap_note"] = "not capped: no GPU"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t_start = time.perf_counter()
    stage = "build"

    def check_time(_=None) -> None:
        if deadline is not None and time.time() > deadline:
            raise TimeLimit(f"{stage}, after {time.perf_counter() - t_start:.0f} s")

    try:
        config = big_config(part, tiny)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.config.use_cache = False
        model.train()
        with warnings.catch_warnings():  # renamed in newer transformers; same behaviour
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable()
        sync()
        result["build_s"] = time.perf_counter() - t_start
        result["params"] = sum(p.numel() for p in model.parameters())
        if cuda:
            result["weights_gib"] = torch.cuda.memory_allocated() / 2**30
        save_partial(args, result)
        stage = "optimizer"
        if deadline is not None:  # checked at every gradient, before any layer-wise update
            for p in model.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(check_time)
        rank = setting["rank"]
        if base == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
        elif base == "adamw8bit":
            opt = adamw8bit_cls(model.parameters(), lr=args.lr)
        elif base == "galore":
            projected, other = C.split_params(model)
            groups = C.galore_groups(projected, other, rank, args.K, scale=0.25)
            opt = galore_cls(groups, lr=args.lr, no_deprecation_warning=True)
        elif base == "galore_layerwise":
            projected_ids = {id(p) for p in C.split_params(model)[0]}
            galore = dict(rank=rank, update_proj_gap=args.K, scale=0.25, proj_type="std")

            def make(p):
                group = {"params": [p], **(galore if id(p) in projected_ids else {})}
                return galore_cls([group], lr=args.lr, no_deprecation_warning=True)

            opt = PerParameterOptimizers(model, make)
        else:
            from hf_grass import GrassAdamW, grassify
            from hf_grass.layerwise import enable_layerwise

            opt = GrassAdamW(grassify(model, rank=rank, update_proj_gap=args.K), lr=args.lr)
            enable_layerwise(opt, model)
        batches = torch.randint(
            0, config.vocab_size, (args.mem_steps, setting["batch"], setting["seq"]), device=device
        )
        times, losses = [], []
        for i in range(args.mem_steps):
            stage = f"step {i} (forward)"
            check_time()
            t0 = time.perf_counter()
            tokens = batches[i]
            loss = model(input_ids=tokens, labels=tokens).loss
            stage = f"step {i} (backward)"
            loss.backward()
            stage = f"step {i} (optimizer)"
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            sync()
            times.append(time.perf_counter() - t0)
            if cuda:
                result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result.update(step_times_s=times, losses=losses, stage=stage)
            save_partial(args, result)
        result.update(status="ok", stage=None)
        result["finite"] = all(x == x and abs(x) != float("inf") for x in losses)
    except TimeLimit as error:
        result.update(status="time_limit", stage=stage, note=f"time limit ({error})")
    except Exception as error:
        if not is_oom(error):
            raise
        where = f"{cap:g} GiB" if cap is not None else "the whole card"
        result.update(
            status="oom", stage=stage, note=f"OOM at {where} ({stage})", error=str(error)[:300]
        )
    finally:
        if cuda:
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            if cap is not None:  # the allocator kept to the cap (what makes an OOM a result)
                result["cap_respected"] = result["peak_reserved_gib"] <= cap + 1e-3
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


PLANNED_METHODS = {"adamw8bit": "adamw-8bit", "galore_layerwise": "galore"}


def attach_plan(result: dict, part: str, method: str, args) -> None:
    """Record ``hf_grass.memory.plan_memory``'s prediction for this run (where it exists)."""
    try:
        import _common as C

        C.add_repo_to_path()
        from hf_grass.memory import plan_memory
    except ImportError:
        return
    tiny = args.model == "tiny"
    base, _ = split_method(method)
    if part == "1b":
        model, batch, seq, rank, ckpt = args.model, args.batch, args.seq, args.rank, False
    else:
        model = big_config(part, tiny) if part == "30b" or tiny else MEMORY_MODELS[part]
        setting = memory_setting(part, method, args)
        batch, seq, ckpt = setting["batch"], setting["seq"], True
        rank = setting["rank"] or 1
    try:
        plan = plan_memory(
            model,
            method=PLANNED_METHODS.get(base, base.split("_")[0]),  # adamw, galore, grass, ...
            rank=rank,
            dtype="bf16",
            layerwise="layerwise" in base,
            activation_checkpointing=ckpt,
            batch_size=batch,
            seq_len=seq,
            # A plain loop, not GrassTrainer: its selection steps keep every linear's whole
            # input and the norms keep their full set (but grass_recompute recomputes both).
            recompute=base == "grass_recompute",
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
def run_method(run: str, args, timeout: float) -> dict:
    """Run one run's worker (``run`` is ``part:method``) in a child process; its result, or why
    there is none (with what it measured before a timeout or a crash, if anything).

    ``spawn`` (the default where a GPU is present): a fresh interpreter per run, the safest: its
    own CUDA context and allocator, everything freed when it exits. ``fork`` (the default without
    a GPU, e.g. ``--tiny`` on a CPU): a forked child of this process, which has imported torch and
    transformers already, so that the self-check does not pay the imports for every run.
    """
    # The run ends itself a little before its timeout, keeping what it measured.
    deadline = time.time() + max(timeout - min(10.0, timeout / 5), 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        t0 = time.perf_counter()
        if args.isolation == "spawn":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", run]
            cmd += ["--result", str(result_file), "--deadline", f"{deadline:.1f}"]
            cmd += _forward_args(args)
            try:
                proc = subprocess.run(cmd, timeout=timeout, cwd=REPO)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
        else:
            child_args = argparse.Namespace(
                **{**vars(args), "worker": run, "result": str(result_file), "deadline": deadline}
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
        measured = json.loads(result_file.read_text()) if result_file.exists() else {}
        wall = time.perf_counter() - t0
        if rc is None:
            note = f"killed after {timeout:.0f} s"
            return {**measured, "method": run, "status": "timeout", "note": note}
        if rc != 0 or not measured or measured.get("status") == "partial":
            note = f"exit code {rc}, see the log above"
            return {**measured, "method": run, "status": "failed", "rc": rc, "note": note}
        measured["process_wall_s"] = wall
        return measured


def _child(args) -> None:
    sys.stdout.flush()
    Path(args.result).write_text(json.dumps(dispatch(args), default=str))
    sys.stdout.flush()


def _forward_args(args) -> list[str]:
    keys = (
        "model", "batch", "seq", "rank", "K", "steps", "warmup", "lr", "reuse_warmup_s",
        "bucket_mb", "cap_gib", "mem_rank", "mem_steps", "mem_batch", "mem_seq", "seq_7b",
        "cap_7b_gib", "rank_7b", "galore_rank_7b", "galore_mem_svd", "adamw8bit_impl",
    )  # fmt: skip
    out = []
    for key in keys:
        out += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    if args.device:
        out += ["--device", args.device]
    for key in ("galore_dir", "site"):
        if getattr(args, key):
            out += ["--" + key.replace("_", "-"), getattr(args, key)]
    if args.stochastic_rounding:
        out.append("--stochastic-rounding")
    return out


def ratios(results: dict) -> dict:
    """Ratios between the speed runs of this invocation: tokens/s (median; range from the
    extreme steps), amortized tokens/s and peak memory, each against fused AdamW; the other Grass
    steps' tokens/s against the default step's; and Grass's amortized tokens/s against GaLore's."""
    ok = {m: e for m, e in results.items() if e.get("status") == "ok"}
    out: dict = {}
    base = ok.get("adamw")
    for m, e in ok.items():
        if m == "adamw" or base is None:
            continue
        r = {
            "tokens_per_s_vs_adamw": e["tokens_per_s"] / base["tokens_per_s"],
            "tokens_per_s_vs_adamw_range": [
                e["tokens_per_s_min"] / base["tokens_per_s_max"],
                e["tokens_per_s_max"] / base["tokens_per_s_min"],
            ],
            "amortized_tokens_per_s_vs_adamw": e["amortized_tokens_per_s"]
            / base["amortized_tokens_per_s"],
        }
        if e.get("peak_gib") and base.get("peak_gib"):
            r["peak_vs_adamw"] = e["peak_gib"] / base["peak_gib"]
        out[m] = r
    if "grass" in ok:  # the other Grass steps against the default one
        for m in ("grass_foreach", "grass_compiled", "grass_triton"):
            if m in ok:
                out.setdefault(m, {})["tokens_per_s_vs_grass"] = (
                    ok[m]["tokens_per_s"] / ok["grass"]["tokens_per_s"]
                )
    if "galore" in ok:
        for m, e in ok.items():
            if m.startswith("grass"):
                out.setdefault(m, {})["amortized_tokens_per_s_vs_galore"] = (
                    e["amortized_tokens_per_s"] / ok["galore"]["amortized_tokens_per_s"]
                )
    return out


def print_table(results: dict, args) -> None:
    base = results.get("adamw", {})
    ok_base = base.get("status") == "ok"
    headers = [
        "method",
        "peak GiB",
        "vs AdamW",
        "s/step median",
        "mean",
        "min-max",
        "refresh s",
        f"amort. s/step (K={args.K})",
        "tok/s median (min-max)",
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
            rows.append([LABELS[m], e.get("status"), e.get("note", ""), *[""] * 9])
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
                f"{e['step_mean_s']:.4f}",
                f"{e['step_min_s']:.4f}-{e['step_max_s']:.4f}",
                f"{e['refresh_s']:.3f}" + ("*" if e.get("refresh_from_warmup") else "")
                if e["refresh_s"] is not None
                else "-",
                f"{e['amortized_s']:.4f}",
                f"{e['tokens_per_s']:,.0f} ({e['tokens_per_s_min']:,.0f}-"
                f"{e['tokens_per_s_max']:,.0f})",
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
    for m, r in ratios(results).items():
        if "tokens_per_s_vs_adamw" not in r:
            continue
        low, high = r["tokens_per_s_vs_adamw_range"]
        line = (
            f"{LABELS[m]}: {r['tokens_per_s_vs_adamw']:.2f}x fused AdamW's tokens/s (median; "
            f"{low:.2f}-{high:.2f} from the extreme steps), amortized "
            f"{r['amortized_tokens_per_s_vs_adamw']:.2f}x"
        )
        if "tokens_per_s_vs_grass" in r:
            line += f", {r['tokens_per_s_vs_grass']:.2f}x the default Grass step's tokens/s"
        if "amortized_tokens_per_s_vs_galore" in r:
            line += f", {r['amortized_tokens_per_s_vs_galore']:.2f}x GaLore's amortized"
        print(line)


def memory_label(run: str, e: dict) -> str:
    part, method = run.split(":")
    base, _ = split_method(method)
    label = f"LLaMA-{part.removesuffix('16')} {LABELS[base]}"
    if e.get("impl"):
        label += f" ({e['impl']})"
    if e.get("rank") is not None:
        label += f" r={e['rank']}"
    if e.get("cap_gib") is not None:
        label += f", cap {e['cap_gib']:g} GiB"
    return label


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
        steps = e.get("step_times_s") or []
        peak, planned = e.get("peak_gib"), e.get("planned_gib")
        rows.append(
            [
                memory_label(run, e),
                (e.get("note", e.get("status", "")) if e.get("status") != "ok" else "ok")
                + (" (allocator went past the cap)" if e.get("cap_respected") is False else ""),
                f"{e['params'] / 1e6:,.1f}" if e.get("params") else "-",
                f"{e['weights_gib']:.2f}" if e.get("weights_gib") is not None else "-",
                f"{peak:.2f}"
                if peak is not None
                else (f"{e['peak_rss_mib']:.0f} MiB RSS" if e.get("peak_rss_mib") else "-"),
                f"{planned:.3g}" if planned is not None else "-",
                f"{e['peak_over_planned']:.2f}" if e.get("peak_over_planned") else "-",
                f"{statistics.median(steps[1:]):.3f}" if len(steps) > 1 else "-",
            ]
        )
    import _common as C

    print(C.fmt_table(headers, rows))
    if any(e.get("galore_svd") == "identity" for e in memory.values()):
        print(
            "GaLore memory runs: SVD replaced by a same-shape stand-in (every tensor GaLore keeps "
            "is the same; cuSOLVER's workspace and the SVD's time left out)"
        )


def all_memory_methods() -> set[str]:
    return {m for ms in MEMORY_METHODS.values() for m in ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--tiny", action="store_true", help="self-check: tiny models, small batches, any device"
    )
    ap.add_argument("--only", default=",".join(PARTS), help=f"parts to run: {', '.join(PARTS)}")
    ap.add_argument(
        "--methods",
        default=None,
        help=f"methods to run (default: all); 1b: {', '.join(METHODS)}; "
        + "; ".join(f"{p}: {', '.join(ms)}" for p, ms in MEMORY_METHODS.items()),
    )
    ap.add_argument("--model", default="1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--K", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps (the first refreshes)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps, each on its own batch")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="grass_layerwise_bucket's size")
    ap.add_argument("--cap-gib", type=float, default=40.0, help="the 13B baselines' memory cap")
    ap.add_argument("--mem-rank", type=int, default=1024, help="rank of the 13B/30B runs")
    ap.add_argument("--mem-steps", type=int, default=3, help="steps of every memory run")
    ap.add_argument("--mem-batch", type=int, default=1)
    ap.add_argument("--mem-seq", type=int, default=256, help="sequence of the 13B/30B runs")
    ap.add_argument("--seq-7b", type=int, default=512, help="sequence of the 7b16 runs")
    ap.add_argument("--cap-7b-gib", type=float, default=16.0, help="memory cap of the 7b16 runs")
    ap.add_argument("--rank-7b", type=int, default=256, help="Grass's rank in the 7b16 runs")
    ap.add_argument(
        "--galore-rank-7b", type=int, default=1024, help="GaLore's rank in the 7b16 runs"
    )
    ap.add_argument(
        "--galore-mem-svd",
        choices=("identity", "exact"),
        default="identity",
        help="GaLore's SVD in the memory runs: a same-shape stand-in, or torch.linalg.svd",
    )
    ap.add_argument("--adamw8bit-impl", choices=("auto", "torchao", "bitsandbytes"), default="auto")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--galore-dir", default=None, help="folder that holds a galore_torch package")
    ap.add_argument(
        "--site",
        default=None,
        help="folder of optional packages (galore_torch, torchao), added to sys.path only in "
        "the runs that need them (gpu_run.sh installs the carried wheels there)",
    )
    ap.add_argument(
        "--stochastic-rounding",
        action="store_true",
        help="Grass: stochastic rounding of bf16 updates",
    )
    ap.add_argument("--reuse-warmup-s", type=float, default=20.0)
    ap.add_argument("--budget-s", type=float, default=330.0, help="no run ends after this")
    ap.add_argument(
        "--method-timeout-s", type=float, default=200.0, help="upper bound of every run's timeout"
    )
    ap.add_argument(
        "--isolation",
        choices=("auto", "spawn", "fork"),
        default="auto",
        help="one fresh interpreter per run (spawn) or a fork of this process; auto: spawn "
        "where a GPU is present, else fork",
    )
    ap.add_argument(
        "--out", default=None, help="output folder (default $OUT or benchmarks/results)"
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.model, args.batch, args.seq, args.rank = "tiny", 2, 32, 8
        args.mem_rank, args.mem_seq, args.mem_steps = 8, 32, 2
        args.budget_s = min(args.budget_s, 240.0)
        args.method_timeout_s = min(args.method_timeout_s, 90.0)
    if args.warmup < 1 or args.steps < 1 or args.mem_steps < 1:
        ap.error("--warmup, --steps and --mem-steps must be at least 1")

    if args.worker:
        result = dispatch(args)
        Path(args.result).write_text(json.dumps(result, default=str))
        return

    parts = [p for p in args.only.split(",") if p]
    if set(parts) - set(PARTS):
        ap.error(f"unknown parts {sorted(set(parts) - set(PARTS))}; choose from {', '.join(PARTS)}")
    known = set(METHODS) | all_memory_methods()
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
    import _common as C

    name = "gpu_suite" + ("_tiny" if args.tiny else "")
    if set(parts) != set(PARTS):
        name += "_" + "_".join(parts)
    results: dict = {}
    memory: dict = {}

    def write(complete: bool) -> Path:
        every = [*results.values(), *memory.values()]
        payload = {
            "protocol": "BENCHMARKS.md, Protocol 2 (1b); memory parts (13b, 7b16, 30b): see "
            "benchmarks/gpu_suite.py",
            "complete": complete,
            "parts": parts,
            "model": args.model,
            "batch": args.batch,
            "seq": args.seq,
            "rank": args.rank,
            "K": args.K,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "bucket_mb": args.bucket_mb,
            "memory_runs": {
                "batch": args.mem_batch,
                "seq": args.mem_seq,
                "rank": args.mem_rank,
                "steps": args.mem_steps,
                "cap_gib": args.cap_gib,
                "seq_7b": args.seq_7b,
                "cap_7b_gib": args.cap_7b_gib,
                "rank_7b": args.rank_7b,
                "galore_rank_7b": args.galore_rank_7b,
                "galore_svd": args.galore_mem_svd,
                "activation_checkpointing": True,
            },
            "dtype": "bfloat16 (weights and states)",
            "budget_s": args.budget_s,
            "env": next((r["env"] for r in every if "env" in r), {}),
            "wall_s": time.perf_counter() - t0,
            "ratios": ratios(results),
            "results": results,
            "memory": memory,
        }
        return C.write_json(name + ".json", payload, args.out)

    for run in runs:
        part, method = run.split(":")
        base, _ = split_method(method)
        into, key = (results, method) if part == "1b" else (memory, run)
        left = args.budget_s - (time.perf_counter() - t0)
        missing = None
        if base.startswith("galore") and not galore_available(args.galore_dir, args.site):
            missing = "galore-torch not installed"
        if base == "adamw8bit" and not adamw8bit_available(args.adamw8bit_impl, args.site):
            missing = f"no 8-bit AdamW installed ({args.adamw8bit_impl}: torchao, bitsandbytes)"
        if missing:
            into[key] = {"method": method, "status": "missing", "note": missing}
            print(f"{run}: missing ({missing})", flush=True)
            continue
        expected = 5.0 if args.tiny else lookup(EXPECTED_S, run, 25.0)
        if left < expected:
            note = f"time budget: ~{expected:.0f} s needed, {max(left, 0):.0f} s left"
            into[key] = {"method": method, "status": "skipped", "note": note}
            print(f"{run}: skipped ({note})", flush=True)
            continue
        timeout = min(args.method_timeout_s, lookup(TIMEOUT_S, run, 80.0), left)
        if args.tiny:
            timeout = min(args.method_timeout_s, left)
        print(
            f"{run}: running ({time.perf_counter() - t0:.0f} s elapsed, timeout {timeout:.0f} s)",
            flush=True,
        )
        r = run_method(run, args, timeout=timeout)
        attach_plan(r, part, method, args)
        into[key] = r
        peak = r.get("peak_gib")
        extra = (f", {r['step_s']:.4f} s/step" if "step_s" in r else "") + (
            f", peak {peak:.2f} GiB" if peak is not None else ""
        )
        if r.get("status") != "ok":
            extra = f": {r.get('note', '')}{extra}"
        print(
            f"{run}: {r.get('status')}{extra} ({time.perf_counter() - t0:.0f} s elapsed)",
            flush=True,
        )
        write(complete=False)

    path = write(complete=True)
    print(f"\nwrote {path} (total {time.perf_counter() - t0:.0f} s)")
    env = next((r["env"] for r in [*results.values(), *memory.values()] if "env" in r), {})
    device = env.get("gpu") or env.get("cpu")
    if results:
        print(
            f"\nLLaMA-{args.model}, bf16, batch {args.batch} x {args.seq}, r={args.rank}, "
            f"K={args.K}, {args.warmup} warm-up + {args.steps} timed steps (each its own batch), "
            f"device: {device}"
        )
        print_table(results, args)
    if memory:
        seq = f"{args.mem_seq}" + ("" if args.tiny else f" (7b16: x {args.seq_7b})")
        print(
            f"\nMemory: bf16, batch {args.mem_batch} x {seq}, activation checkpointing, "
            f"{args.mem_steps} steps, device: {device}"
        )
        print_memory_table(memory)


if __name__ == "__main__":
    main()

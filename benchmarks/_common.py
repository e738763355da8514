"""Shared pieces of the benchmarks: LLaMA configs, optimizer-state accounting, machine info, output.

The benchmarks are scripts (``python benchmarks/bench_*.py``); this module sits beside them and is
imported by name. It needs only torch and transformers (and the repo root on ``sys.path`` for
``hf_grass``, which :func:`add_repo_to_path` takes care of when the package is not installed).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # import hf_grass from a bare checkout (the GPU machine)

from hf_grass import models  # noqa: E402
from hf_grass.models import LLAMA_PRESETS  # noqa: E402
from hf_grass.report import tensor_bytes  # noqa: E402

# GaLore's LLaMA configs and the package's presets (hf_grass.models): "20m" holds 84% of its
# parameters in the embedding and output matrices; "20m-wide" (20.3M parameters, 70% of them in the
# projected attention/MLP matrices) is for CPU timing, so that the optimizers' and the backward's
# differences show rather than the embeddings' plain AdamW.
LLAMA_CONFIGS = dict(LLAMA_PRESETS)
GALORE_RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}


def add_repo_to_path() -> None:
    """Make ``import hf_grass`` work from a bare checkout (the GPU machine has no install)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def llama_config(name: str, **overrides):
    """``hf_grass.models.llama_config`` with the benchmarks' 1024 positions (GaLore's setting)."""
    return models.llama_config(name, **{"max_position_embeddings": 1024, **overrides})


def build_llama(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attn: str = "sdpa",
    **overrides,
):
    """``hf_grass.models.build_llama`` (random weights, built directly on ``device`` in ``dtype``;
    ``meta`` costs no memory) seeded by ``seed``, with attention implementation ``attn``."""
    torch.manual_seed(seed)
    overrides = {"max_position_embeddings": 1024, "attn_implementation": attn, **overrides}
    return models.build_llama(name, device=device, dtype=dtype, **overrides)


def projected_names(model) -> list[str]:
    """Names of the modules Grass and GaLore project: every attention/MLP linear (not lm_head)."""
    add_repo_to_path()
    from hf_grass import match_target_modules

    return match_target_modules(model, "all-linear")


def split_params(model) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(projected weights, every other trainable parameter), each parameter once."""
    modules = dict(model.named_modules())
    projected = [modules[n].weight for n in projected_names(model)]
    ids = {id(p) for p in projected}
    seen: set[int] = set()
    other = []
    for p in model.parameters():
        if id(p) in ids or id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        other.append(p)
    return projected, other


def galore_groups(
    projected, other, rank: int, update_proj_gap: int = 200, scale: float = 0.25
) -> list[dict]:
    """Param groups as GaLore's own training script builds them (``proj_type="std"``)."""
    return [
        {"params": list(other)},
        {
            "params": list(projected),
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "proj_type": "std",
        },
    ]


def import_galore():
    """``galore_torch.GaLoreAdamW``, or ``None`` when galore-torch is not installed."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from galore_torch import GaLoreAdamW
    except ImportError:
        return None
    return GaLoreAdamW


def new_galore(groups, lr: float = 1e-3):
    """A GaLoreAdamW without its deprecation warning (it subclasses the old transformers AdamW)."""
    import warnings

    GaLoreAdamW = import_galore()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GaLoreAdamW(groups, lr=lr, no_deprecation_warning=True)


# --------------------------------------------------------------------------- optimizer state bytes
def state_bytes(optimizer: torch.optim.Optimizer, projected_ids: set[int]) -> dict:
    """Bytes of the optimizer's state, counted as ``hf_grass.report.optimizer_state_bytes`` counts
    them (tensors once per storage, objects' tensor attributes such as GaLore's projector, and
    ``bytes`` such as Grass's RNG state): total, projected weights only, and by key."""
    total = projected = 0
    by_key: dict[str, int] = {}
    seen: set = set()
    for p, st in optimizer.state.items():
        for key, value in st.items():
            n = tensor_bytes(value, seen, host_bytes=True)
            total += n
            projected += n if id(p) in projected_ids else 0
            by_key[key] = by_key.get(key, 0) + n
    return {"total": total, "projected": projected, "by_key": dict(sorted(by_key.items()))}


def rng_state_bytes() -> int:
    """Bytes of a CPU ``torch.Generator`` state (GrassAdamW keeps one per projected weight)."""
    return torch.Generator().get_state().numel()


def analytic_state_bytes(
    method: str,
    projected_shapes: list[tuple[int, int]],
    other_numels: list[int],
    rank: int,
    bytes_per_el: int = 4,
) -> dict:
    """Optimizer-state bytes from shapes alone (fp32 moments by default).

    - ``adamw``: two moments per parameter + a float32 ``step``.
    - ``galore``: per projected (m, n): the projection matrix r x min(m, n) plus two moments of the
      projected gradient r x max(m, n) (GaLore reduces the smaller dimension); other parameters
      as AdamW (its ``step`` is a Python int).
    - ``grass``: per projected (m, n): two moments r x min(m, n) (the larger dimension is selected),
      int64 ``rows``, ``unique_rows`` and ``inverse`` (r each for ``top_r``), float32 ``rho`` and
      per-row step counts, two float32 step scalars and a CPU generator state; others as AdamW.
    """
    b = bytes_per_el
    proj = 0
    for m, n in projected_shapes:
        lo, hi = min(m, n), max(m, n)
        if method == "adamw":
            proj += 2 * m * n * b + 4
        elif method == "galore":
            proj += rank * lo * b + 2 * rank * hi * b
        elif method == "grass":
            proj += 2 * rank * lo * b + rank * (8 + 8 + 8 + 4 + 4) + 4 + 4 + rng_state_bytes()
        else:
            raise ValueError(f"Unknown method {method!r}: use adamw, galore or grass.")
    step = 0 if method == "galore" else 4
    other = sum(2 * k * b + step for k in other_numels)
    return {"total": proj + other, "projected": proj}


# ------------------------------------------------------------------------------------ measurement
def median_time(fn, reps: int, warmup: int = 1, sync=None) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def env_info() -> dict:
    import transformers

    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        # Other jobs on a shared machine slow every method alike only if they run throughout:
        # keep the load average beside the numbers.
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        from importlib.metadata import version

        import galore_torch  # noqa: F401

        info["galore_torch"] = version("galore-torch")
    except Exception:
        info["galore_torch"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(name: str, payload: dict, out_dir: str | Path | None = None) -> Path:
    out = Path(out_dir or os.environ.get("OUT") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def fmt_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (pastes straight into BENCHMARKS.md)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]

    def line(r: list[str]) -> str:
        padded = (
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def force_refresh(opt, galore: bool) -> None:
    """Make the next step a refresh step (Grass re-selection / GaLore SVD), as every K-th step is:
    set each projected parameter's step counter to the next multiple of K."""
    for group in opt.param_groups:
        if "rank" not in group:
            continue
        gap = group["update_proj_gap"]
        for p in group["params"]:
            st = opt.state.get(p)
            if not st or "step" not in st:
                continue
            if galore:
                st["step"] = gap * (st["step"] // gap + 1)
            else:
                st["step"].fill_(gap * (int(st["step"]) // gap + 1))


def run_two_processes(script: str, worker_args: list[str], timeout: float, label: str) -> dict:
    """``script --out FILE worker_args`` on 2 CPU processes under ``torch.distributed.run``
    (one thread each), killed with all its workers after ``timeout`` seconds; returns the JSON
    the workers wrote to FILE. Exits with one line when the job fails or runs too long."""
    import signal
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
            os.path.abspath(script), "--out", out, *worker_args,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )  # fmt: skip
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers
            proc.communicate()
            raise SystemExit(f"{label}: the 2-process run did not finish in {timeout} s") from None
        if proc.returncode != 0:
            raise SystemExit(f"{label}: the 2-process run failed:\n{stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)

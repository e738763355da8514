#!/usr/bin/env python
"""Where the CPU memory of a finetune goes: the RSS timeline of ``scripts/finetune.py``, by phase.

    python benchmarks/memory_timeline.py --label grass_emb -- --optim grass --grass_embeddings \\
        --max_steps 4 --max_eval_samples 256

Runs finetune.py's ``main`` in this process with a sampler thread that reads ``/proc/self/status``
every ``--interval_ms`` (default 50) and at every phase change. Phases are marked by wrapping the
script's steps (dataset load, tokenizer, tokenization, model load, LoRA, Trainer setup, training
set-up, first step, later steps, evaluation, ...). Prints one row per phase: RSS at its start, its
peak (split into anonymous memory and file pages such as a mmap'd checkpoint), at its end, and the
change, then the phase of the run's peak. Writes ``benchmarks/results/memory_timeline_<label>.json``
(phases, samples, the peak RSS as ``getrusage`` reports it at the end of training, which is what
``resource_report.json`` records, and at the end of the run, and the run's metrics, so that runs
before and after a change can be checked for identical results).

Every argument after ``--`` (or every one this script does not know) goes to finetune.py; without
``--output_dir`` the run writes to a temporary folder. Set allocator variables (``MALLOC_ARENA_MAX``,
``MALLOC_TRIM_THRESHOLD_``) in the environment: glibc reads them at process start.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MIB = 2**20
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def read_status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and RssShmem of this process, in bytes (Linux ``/proc``)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_KEYS:
                out[key] = int(value.split()[0]) * 1024
    return out


def ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class Timeline:
    """A sampler thread plus phase marks; ``phase`` is the name samples are filed under."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, str, dict[str, int]]] = []
        self.phases: list[str] = []
        self.marks: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.phase = ""
        self.mark("start (python, stdlib)")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        status = read_status()
        with self._lock:
            self.samples.append((time.perf_counter() - self.t0, self.phase, status))

    def mark(self, phase: str) -> None:
        """End the current phase (with a sample) and start ``phase``."""
        if self.phase:
            self.sample()
        if phase in self.phases:  # a phase met twice (two evaluations): file it apart
            phase = f"{phase} #{sum(p.startswith(phase) for p in self.phases) + 1}"
        self.phase = phase
        self.phases.append(phase)
        self.marks[phase] = ru_maxrss_bytes()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def table(self) -> list[dict]:
        rows = []
        for phase in self.phases:
            mine = [s for s in self.samples if s[1] == phase]
            if not mine:
                continue
            peak = max(mine, key=lambda s: s[2]["VmRSS"])
            rows.append(
                {
                    "phase": phase,
                    "start_s": round(mine[0][0], 2),
                    "seconds": round(mine[-1][0] - mine[0][0], 2),
                    "rss_start": mine[0][2]["VmRSS"],
                    "rss_peak": peak[2]["VmRSS"],
                    "anon_at_peak": peak[2].get("RssAnon", 0),
                    "file_at_peak": peak[2].get("RssFile", 0),
                    "rss_end": mine[-1][2]["VmRSS"],
                    "samples": len(mine),
                }
            )
        return rows


def thin(samples, count: int = 400) -> list[dict]:
    """About ``count`` samples: the highest VmRSS of each phase in each of ``count`` time slices."""
    if not samples:
        return []
    width = (samples[-1][0] - samples[0][0]) / count or 1.0
    best: dict[tuple[str, int], tuple] = {}
    for sample in samples:
        key = (sample[1], int((sample[0] - samples[0][0]) / width))
        if key not in best or sample[2]["VmRSS"] > best[key][2]["VmRSS"]:
            best[key] = sample
    return [
        {"t": round(t, 3), "phase": phase, **{k.lower(): v for k, v in status.items()}}
        for t, phase, status in sorted(best.values(), key=lambda s: s[0])
    ]


def dumps(record: dict) -> str:
    """JSON of ``record``, indented, with one line per sample."""
    samples = "[\n" + ",\n".join(json.dumps(s) for s in record["samples"]) + "\n ]"
    return json.dumps({**record, "samples": "@samples"}, indent=1).replace('"@samples"', samples)


def _wrap(timeline: Timeline, phase: str, fn, after: str | None = None):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        timeline.mark(phase)
        try:
            return fn(*args, **kwargs)
        finally:
            timeline.mark(after or f"after {phase}")

    return wrapped


def load_finetune():
    spec = importlib.util.spec_from_file_location("finetune", REPO / "scripts" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune"] = module
    spec.loader.exec_module(module)
    return module


def instrument(
    timeline: Timeline, finetune, gc_each_step: bool = False, trim_each_step: bool = False
) -> None:
    """Wrap finetune.py's steps so that each marks its phase (this process only)."""
    import transformers

    from hf_grass import data as grass_data

    for name, phase in (
        ("resolve_model_path", "resolve model path"),
        ("load_raw_data", "load dataset"),
        ("apply_lora", "apply LoRA"),
        ("_sort_by_length", "sort eval set"),
    ):
        setattr(finetune, name, _wrap(timeline, phase, getattr(finetune, name)))
    for name in ("tokenize_classification", "tokenize_instruction"):
        setattr(grass_data, name, _wrap(timeline, "tokenize", getattr(grass_data, name)))
    for name in ("AutoTokenizer", "AutoModelForSequenceClassification", "AutoModelForCausalLM"):
        cls = getattr(finetune, name)
        phase = "load tokenizer" if name == "AutoTokenizer" else "load model"
        shim = type(
            name, (), {"from_pretrained": staticmethod(_wrap(timeline, phase, cls.from_pretrained))}
        )
        setattr(finetune, name, shim)

    class Marks(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            timeline.mark("train: set-up before step 1")

        def on_step_begin(self, args, state, control, **kwargs):
            if gc_each_step:
                gc.collect()
            if trim_each_step:
                import ctypes

                ctypes.CDLL("libc.so.6").malloc_trim(0)
            if state.global_step == 0:
                timeline.mark("train: step 1 (optimizer state)")
            elif state.global_step == 1:
                timeline.mark("train: steps 2..N")

        def on_train_end(self, args, state, control, **kwargs):
            timeline.maxrss_train_end = ru_maxrss_bytes()
            timeline.mark("train: end (report, save)")

    base = finetune.GrassTrainer

    class Trainer(base):
        def __init__(self, *args, **kwargs):
            timeline.mark("trainer set-up")
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), Marks()]
            super().__init__(*args, **kwargs)
            timeline.mark("after trainer set-up")

        def train(self, *args, **kwargs):
            timeline.mark("train: start")
            try:
                return super().train(*args, **kwargs)
            finally:
                timeline.mark("after train")

        def evaluate(self, *args, **kwargs):
            timeline.mark("evaluate")
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                timeline.mark("after evaluate")

    Trainer.__name__ = Trainer.__qualname__ = base.__name__
    finetune.GrassTrainer = Trainer


def default_label(argv: list[str]) -> str:
    words = [a.lstrip("-") for a in argv if a.startswith("--")]
    return "_".join(words) or "default"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", help="names the result file (default: from the flags)")
    parser.add_argument("--interval_ms", type=float, default=50.0)
    parser.add_argument("--no_save", action="store_true", help="print only")
    parser.add_argument(
        "--trim_each_step",
        action="store_true",
        help="malloc_trim(0) before every training step (experiment)",
    )
    parser.add_argument(
        "--gc_each_step",
        action="store_true",
        help="gc.collect() before every training step (tests for reference cycles that keep "
        "a step's tensors alive)",
    )
    own, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    rest = [a for a in rest if a != "--"]
    label = own.label or default_label(rest)

    timeline = Timeline(own.interval_ms / 1000)
    timeline.maxrss_train_end = None
    timeline.mark("import torch, transformers, hf_grass, finetune.py")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    finetune = load_finetune()
    instrument(timeline, finetune, own.gc_each_step, own.trim_each_step)
    tmp = None
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in rest):
        tmp = tempfile.TemporaryDirectory(prefix="memory_timeline-")
        rest = [*rest, "--output_dir", tmp.name]
    timeline.mark("parse args, checks")
    results = finetune.main(rest)
    timeline.mark("end")
    timeline.stop()

    out_dir = rest[rest.index("--output_dir") + 1] if "--output_dir" in rest else None
    train_metrics = {}
    if out_dir and (Path(out_dir) / "train_results.json").is_file():
        train_metrics = json.loads((Path(out_dir) / "train_results.json").read_text())
    usage = resource.getrusage(resource.RUSAGE_SELF)  # CPU time: steadier than wall time
    rows = timeline.table()
    peak = max(rows, key=lambda r: r["rss_peak"])
    record = {
        "label": label,
        "finetune_args": rest if tmp is None else rest[:-2],
        "env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_"))},
        "interval_ms": own.interval_ms,
        "peak_rss": peak["rss_peak"],
        "peak_phase": peak["phase"],
        "ru_maxrss_train_end": timeline.maxrss_train_end,
        "ru_maxrss_end": ru_maxrss_bytes(),
        "cpu_user_s": round(usage.ru_utime, 1),
        "cpu_system_s": round(usage.ru_stime, 1),
        "minor_page_faults": usage.ru_minflt,
        "resource_report_peak_memory_bytes": results.get("resources", {}).get("peak_memory_bytes"),
        "train_loss": train_metrics.get("train_loss"),
        "eval": {
            k: v
            for k, v in results.get("eval", {}).items()
            if not k.endswith(("runtime", "per_second"))
        },
        "phases": rows,
        "samples": thin(timeline.samples),
    }
    print(f"\n== memory timeline: {label} ==")
    print(
        f"{'phase':40s} {'start':>8s} {'peak':>8s} {'anon':>8s} {'file':>8s} {'end':>8s} {'delta':>8s}"
    )
    for r in rows:
        print(
            f"{r['phase'][:40]:40s} {r['rss_start'] / MIB:8.0f} {r['rss_peak'] / MIB:8.0f} "
            f"{r['anon_at_peak'] / MIB:8.0f} {r['file_at_peak'] / MIB:8.0f} "
            f"{r['rss_end'] / MIB:8.0f} {(r['rss_end'] - r['rss_start']) / MIB:+8.0f}"
        )
    print("(MiB; anon/file: anonymous memory and file pages at the phase's peak)")
    train_end = record["ru_maxrss_train_end"]
    print(
        f"peak RSS {record['peak_rss'] / MIB:,.0f} MiB in '{record['peak_phase']}'; ru_maxrss at "
        f"train end {'n/a' if train_end is None else f'{train_end / MIB:,.0f} MiB'} (resource "
        f"report), at the end {record['ru_maxrss_end'] / MIB:,.0f} MiB"
    )
    print(
        f"CPU {record['cpu_user_s']} s user + {record['cpu_system_s']} s system, "
        f"{record['minor_page_faults']:,} minor page faults"
    )
    print(f"train_loss {record['train_loss']!r}, eval {record['eval']}")
    if not own.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"memory_timeline_{label}.json"
        path.write_text(dumps(record) + "\n")
        print(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return record


if __name__ == "__main__":
    main()

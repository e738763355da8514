#!/usr/bin/env python
"""Run one documented command and keep what it measured, with where and when it ran.

    .venv/bin/python benchmarks/record_run.py --out benchmarks/results/pretrain_default.json \\
        --collect outputs/pretrain-demo-grass -- .venv/bin/python scripts/pretrain.py

Writes one JSON: the command, its wall time and exit status, the date, torch/transformers/Python
versions, the CPU, ``uptime`` (load average) before and after, the last lines of its output and
the JSON files it left in each ``--collect`` folder (``eval_results.json``,
``resource_report.json``, ``train_results.json``, ...). The command's own environment variables
(``OMP_NUM_THREADS``, ...) are recorded as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def versions() -> dict:
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    parser.add_argument("--collect", type=Path, action="append", default=[])
    parser.add_argument("--tail", type=int, default=40, help="output lines to keep")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    record = {
        "command": shlex.join(command),
        "cwd": str(ROOT),
        "env_vars": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "HF_GRASS_CACHE") if k in os.environ
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        **versions(),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs",
        "git_commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "uptime_before": uptime(),
    }
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    record["wall_s"] = round(time.perf_counter() - start, 1)
    record["returncode"] = done.returncode
    record["uptime_after"] = uptime()
    record["date_end"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    lines = (done.stdout + done.stderr).splitlines()
    record["output_tail"] = [line for line in lines if "gemm_4bit" not in line][-args.tail :]
    for folder in args.collect:
        folder = folder if folder.is_absolute() else ROOT / folder
        record.setdefault("collected", {})[str(folder.relative_to(ROOT))] = {
            p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))
        }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}: rc {done.returncode}, {record['wall_s']} s")


if __name__ == "__main__":
    main()

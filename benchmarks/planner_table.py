#!/usr/bin/env python
"""The memory planner's outputs quoted in BENCHMARKS.md (sections 4 and 10) and the README.

    .venv/bin/python benchmarks/planner_table.py                 # runs scripts/memory.py, writes the JSON
    .venv/bin/python benchmarks/planner_table.py --table         # prints the tables from the JSON
    .venv/bin/python benchmarks/planner_table.py --moe           # plans MoE models, writes planner_moe.json
    .venv/bin/python benchmarks/planner_table.py --moe --table   # prints the MoE table from that JSON

Each row runs ``scripts/memory.py ... --json`` in its own process, exactly as written in the
JSON's ``command`` field, and records what it printed. The 30B row plans the GPU suite's LLaMA-30B
(``benchmarks/llama_30b_config.json``: the 13B preset with ``gpu_suite.LLAMA_30B``'s overrides).
``--table`` prints the Markdown tables of BENCHMARKS.md section 10 from the JSON, with the peaks
measured on the H200 (``benchmarks/results/gpu_h200_20261127/``) beside the plans.

``--moe`` plans Mixtral-8x7B and Qwen3-30B-A3B (:data:`MOE_MODELS`, configs built from
transformers' config classes with explicit arguments, nothing downloaded) in pure bf16 at
1 x 512 tokens, with and without activation checkpointing, for every method, in this process
(``plan_memory`` and ``fit_budget`` against an 80 GiB card), and writes
``benchmarks/results/planner_moe.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs are built here: nothing to download

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "planner.json"
MOE_OUT = ROOT / "benchmarks" / "results" / "planner_moe.json"
GPU = ROOT / "benchmarks" / "results" / "gpu_h200_20261127"
CONFIG_30B = "benchmarks/llama_30b_config.json"
BF16_1B = "--preset 1b --dtype bf16 --batch_size 8 --seq_len 256"
BIG = "--dtype bf16 --activation_checkpointing --batch_size 1 --seq_len 256"

# name -> flags of scripts/memory.py (the suite's settings; a plain loop: --no_recompute).
ROWS = {
    "1b_adamw": f"{BF16_1B} --method adamw",
    "1b_galore_r512": f"{BF16_1B} --method galore --rank 512",
    "1b_grass_r512_plain": f"{BF16_1B} --method grass --rank 512 --no_recompute",
    "1b_grass_r512_layerwise_plain": f"{BF16_1B} --method grass --rank 512 --layerwise --no_recompute",
    "1b_grass_r512_recompute": f"{BF16_1B} --method grass --rank 512",
    "13b_grass_r1024_layerwise_plain": f"--preset llama-13b {BIG} --method grass --rank 1024 --layerwise --no_recompute",
    "30b_grass_r1024_layerwise_plain": f"--config {CONFIG_30B} {BIG} --method grass --rank 1024 --layerwise --no_recompute",
    "13b_adamw": f"--preset llama-13b {BIG} --method adamw",
    "13b_galore_r1024": f"--preset llama-13b {BIG} --method galore --rank 1024",
    "13b_grass_r256_layerwise": f"--preset llama-13b {BIG} --method grass --rank 256 --layerwise",
    "13b_grass_r256_layerwise_plain": f"--preset llama-13b {BIG} --method grass --rank 256 --layerwise --no_recompute",
    "13b_galore_r256": f"--preset llama-13b {BIG} --method galore --rank 256",
}  # fmt: skip

# Section 10's first table: planner row -> (label, suite JSON, run key, "results" or "memory").
MEASURED = {
    "1b_adamw": ("1B AdamW, 8 x 256", "suite_run1.json", "adamw", "results"),
    "1b_galore_r512": ("1B GaLore r=512", "suite_run1.json", "galore", "results"),
    "1b_grass_r512_plain": ("1B Grass r=512", "suite_run1.json", "grass", "results"),
    "1b_grass_r512_layerwise_plain": (
        "1B Grass r=512 layer-wise",
        "suite_run1.json",
        "grass_layerwise",
        "results",
    ),
    "13b_grass_r1024_layerwise_plain": (
        "13B Grass r=1024 layer-wise, checkpointing, 1 x 256",
        "suite_run1.json",
        "13b:grass_layerwise",
        "memory",
    ),
    "30b_grass_r1024_layerwise_plain": (
        "30B Grass r=1024 layer-wise, checkpointing, 1 x 256",
        "suite_run1.json",
        "30b:grass_layerwise",
        "memory",
    ),
    "13b_adamw": (
        "13B AdamW, same, 40 GiB cap",
        "suite_run2_13b_capped.json",
        "13b:adamw",
        "memory",
    ),
    "13b_galore_r1024": (
        "13B GaLore r=1024, same, 40 GiB cap",
        "suite_run2_13b_capped.json",
        "13b:galore",
        "memory",
    ),
}
# The other rows: planner row -> label.
PLANNED = {
    "13b_grass_r256_layerwise": "LLaMA-13B, Grass r=256 layer-wise, pure bf16, checkpointing, 1 x 256",
    "13b_grass_r256_layerwise_plain": "the same, `--no_recompute` (a plain loop)",
    "13b_adamw": "LLaMA-13B, AdamW, same",
    "13b_galore_r256": "LLaMA-13B, GaLore r=256, same",
    "1b_grass_r512_recompute": "1B Grass r=512, 8 x 256, GrassTrainer's recomputation (the default)",
    "1b_grass_r512_plain": "the same, `--no_recompute` (the suite's plain loop)",
}
GIB = 2**30


def environment() -> dict:
    import torch
    import transformers

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{cpu}, {os.cpu_count()} CPUs",
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "loadavg": list(os.getloadavg()),
    }


def run_rows() -> dict:
    rows = {}
    start = time.perf_counter()
    env = environment()
    for name, flags in ROWS.items():
        command = f".venv/bin/python scripts/memory.py {flags} --json"
        argv = [sys.executable, "scripts/memory.py", *shlex.split(flags), "--json"]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True)
        plan = json.loads(done.stdout.strip().splitlines()[-1])
        rows[name] = {"command": command, "plan": plan}
        print(f"{name}: peak {plan['peak_bytes'] / GIB:.2f} GiB", flush=True)
    env["uptime_at_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {
        "what": "hf_grass.memory.plan_memory through scripts/memory.py --json, one process a row",
        "command": ".venv/bin/python benchmarks/planner_table.py",
        "env": env,
        "wall_s": time.perf_counter() - start,
        "rows": rows,
    }


def measured(name: str) -> dict | None:
    if name not in MEASURED:
        return None
    _, file, key, part = MEASURED[name]
    return {"file": file, **json.loads((GPU / file).read_text())[part][key]}


def table(data: dict) -> str:
    """Section 10's two tables, from the planner JSON and the suite's JSON."""
    rows = data["rows"]

    def gib(name: str, part: str = "peak") -> str:
        return f"{rows[name]['plan'][part + '_bytes'] / GIB:.2f} GiB"

    lines = [
        "| run (`planner.json` row; measured in) | planner peak | planned at the run"
        " | measured peak | measured / planned |",
        "|---|---|---|---|---|",
    ]
    for name, (label, *_) in MEASURED.items():
        m = measured(name)
        plan = rows[name]["plan"]["peak_bytes"] / GIB
        then = f"{m['planned_gib']:.2f} GiB" if m.get("planned_gib") else "-"
        change = rows[name]["plan"]["peak_bytes"] - m["planned_gib"] * GIB
        if change:
            then += f" ({change / 1e6:+.2f} MB since)"
        if m["status"] == "ok":
            seen, ratio = f"{m['peak_gib']:.2f} GiB", f"{m['peak_gib'] / plan:.3f}"
        else:
            seen, ratio = f"{m['status']} at {m['peak_gib']:.2f} GiB", "-"
        fits = "" if m["status"] == "ok" else ": does not fit"
        lines.append(
            f"| {label} (`{name}`; `{m['file']}`) | {plan:.2f} GiB{fits} | {then} | {seen} | {ratio} |"
        )
    lines += ["", "| run (`planner.json` row) | planner peak | weights | activations |"]
    lines.append("|---|---|---|---|")
    for name, label in PLANNED.items():
        lines.append(
            f"| {label} (`{name}`) | {gib(name)} | {gib(name, 'weights')} | {gib(name, 'activations')} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ MoE plans
# name -> (label, config class, explicit arguments). Both untied; Qwen3-30B-A3B's dense MLP
# size (6144) is unused (every layer is sparse) and its router renormalizes the top-k weights,
# as in its published config.
MOE_MODELS = {
    "mixtral-8x7b": (
        "Mixtral-8x7B",
        "MixtralConfig",
        dict(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
            num_experts_per_tok=2, vocab_size=32000, tie_word_embeddings=False,
        ),
    ),
    "qwen3-30b-a3b": (
        "Qwen3-30B-A3B",
        "Qwen3MoeConfig",
        dict(
            hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
            num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
            num_experts=128, num_experts_per_tok=8, vocab_size=151936, norm_topk_prob=True,
            decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        ),
    ),
}  # fmt: skip
LORA_RANK = 8  # scripts/finetune.py's --lora_r default
MOE_BUDGET = "80GiB"
MOE_SHAPE = dict(dtype="bf16", batch_size=1, seq_len=512)


def moe_methods(rank: int) -> dict[str, dict]:
    """Row name -> plan_memory's method arguments; GaLore and Grass at Grass's default rank."""
    return {
        "adamw": dict(method="adamw"),
        "adamw-8bit": dict(method="adamw-8bit"),
        "galore": dict(method="galore", rank=rank),
        "lora": dict(method="lora", rank=LORA_RANK),
        "grass": dict(method="grass", rank=rank),
        "grass-layerwise": dict(method="grass", rank=rank, layerwise=True),
    }


def moe_config(name: str):
    import transformers

    _, cls, arguments = MOE_MODELS[name]
    config = getattr(transformers, cls)(**arguments)
    config.name_or_path = name
    return config


def run_moe() -> dict:
    from hf_grass.memory import DEFAULT_RANK, fit_budget, parse_size, plan_memory

    start = time.perf_counter()
    env = environment()
    budget = parse_size(MOE_BUDGET)
    models, rows = {}, {}
    for name, (label, cls, arguments) in MOE_MODELS.items():
        config = moe_config(name)
        for method, kwargs in moe_methods(DEFAULT_RANK).items():
            for ckpt in (False, True):
                args = dict(model=config, **kwargs, **MOE_SHAPE, activation_checkpointing=ckpt)
                plan = plan_memory(**args).as_dict()
                fit = fit_budget(budget, **args)
                row = f"{name}_{method}" + ("_ckpt" if ckpt else "")
                rows[row] = {"model": name, "row_method": method, "plan": plan, "fit": fit}
                print(f"{row}: peak {plan['peak_bytes'] / GIB:.2f} GiB", flush=True)
        models[name] = {
            "label": label,
            "config_class": f"transformers.{cls}",
            "arguments": arguments,
            "num_parameters": plan["num_parameters"],
        }
    env["uptime_at_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {
        "what": "hf_grass.memory.plan_memory and fit_budget (budget "
        f"{MOE_BUDGET}) on MoE configs built in process; planned, not measured",
        "command": ".venv/bin/python benchmarks/planner_table.py --moe",
        "grass_default_rank": DEFAULT_RANK,
        "lora_rank": LORA_RANK,
        "shape": MOE_SHAPE,
        "env": env,
        "wall_s": time.perf_counter() - start,
        "models": models,
        "rows": rows,
    }


def moe_table(data: dict) -> str:
    """The MoE table of BENCHMARKS.md section 10, from ``planner_moe.json``."""
    labels = {
        "adamw": "AdamW",
        "adamw-8bit": "8-bit AdamW",
        "galore": "GaLore r={rank}",
        "lora": "LoRA r={rank} (q, v)",
        "grass": "Grass r={rank}",
        "grass-layerwise": "Grass r={rank} layer-wise",
    }

    def cell(row: dict) -> str:
        fit = row["fit"]
        batch = fit["max_batch_size"]
        verdict = f"fits, batch <= {batch}" if fit["fits"] else "does not fit"
        return f"{row['plan']['peak_bytes'] / GIB:.2f} GiB ({verdict})"

    lines = [
        "| model (parameters) | method | peak, 1 x 512 | peak, 1 x 512, checkpointing |",
        "|---|---|---|---|",
    ]
    for name, model in data["models"].items():
        for method, label in labels.items():
            plain, ckpt = (data["rows"][f"{name}_{method}{s}"] for s in ("", "_ckpt"))
            rank = plain["plan"]["rank"]
            who = f"{model['label']} ({model['num_parameters'] / 1e9:.2f}B)"
            lines.append(f"| {who} | {label.format(rank=rank)} | {cell(plain)} | {cell(ckpt)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true", help="print the tables from the JSON")
    parser.add_argument("--moe", action="store_true", help="the MoE plans (planner_moe.json)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or (MOE_OUT if args.moe else OUT)
    run, show = (run_moe, moe_table) if args.moe else (run_rows, table)
    if not args.table:
        data = run()
        out.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {out} ({data['wall_s']:.0f} s)")
    print(show(json.loads(out.read_text())))


if __name__ == "__main__":
    main()

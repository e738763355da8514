"""GrassTrainer under the Trainer's FSDP2 path (``--fsdp full_shard``, ``fsdp_version: 2``), on a GPU.

The stock Trainer runs FSDP only on GPUs, so this check needs one (world size 1 is enough: the
Trainer's whole FSDP2 path runs, with every weight a DTensor). Each part is a fresh
``torchrun --nproc_per_node 1`` process training a tiny random LLaMA in float32 on synthetic
tokens (6 steps, Grass r=8, K=3, checkpoints every 3 steps):

- ``plain``: GrassTrainer without FSDP and without the compressed backward, selecting columns
  (the reference: FSDP2 delivers full gradients, which Grass compresses in the optimizer, and
  selects the columns of weights it shards by rows);
- ``fsdp``: the same under FSDP2 with sharded checkpoints (``torch.distributed.checkpoint``);
- ``resume``: FSDP2 again, resumed from the ``fsdp`` run's step-3 checkpoint.

It prints, and writes to ``$OUT/gpu_fsdp2_trainer.json``: the largest weight difference between
``fsdp`` and ``plain`` and between ``resume`` and ``fsdp``, the losses, and whether the weights
were DTensors with Grass state on them. Pass: both differences below 1e-5 (float32 on a GPU).

    python3 benchmarks/gpu_fsdp2_trainer.py          # on the GPU machine, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 6, 3


def _train(part: str, out: Path) -> None:
    import torch
    from torch.utils.data import Dataset

    sys.path.insert(0, str(REPO))
    from transformers import LlamaForCausalLM

    from hf_grass import GrassTrainer, GrassTrainingArguments
    from hf_grass.models import llama_config

    class Tokens(Dataset):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(0, 512, (64, 32), generator=g)

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config("tiny"))
    fsdp = part != "plain"
    args = GrassTrainingArguments(
        output_dir=str(out / ("plain" if part == "plain" else "fsdp")),
        optim="grass",
        grass_rank=8,
        grass_update_proj_gap=3,
        grass_compressed_backward=False,
        grass_proj_side="cols",  # what Grass selects of a weight FSDP2 shards by rows
        learning_rate=1e-2,
        per_device_train_batch_size=8,
        max_steps=STEPS,
        save_steps=SAVE_EVERY,
        logging_steps=1,
        report_to="none",
        seed=7,
        data_seed=7,
        fsdp="full_shard" if fsdp else "",
        fsdp_config={"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT"} if fsdp else None,
    )
    trainer = GrassTrainer(model=model, args=args, train_dataset=Tokens())
    resume = str(out / "fsdp" / f"checkpoint-{SAVE_EVERY}") if part == "resume" else None
    trainer.train(resume_from_checkpoint=resume)
    optimizer = trainer.optimizer
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    weight = trainer.model.model.layers[0].mlp.up_proj.weight
    state = optimizer.state.get(weight, {})
    weights = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.accelerator.is_main_process:
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in weights.items()}
        torch.save({k: v.detach().float().cpu() for k, v in full.items()}, out / f"{part}.pt")
        report = {
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "dtensor_weights": type(weight).__name__ == "DTensor",
            "grass_state": sorted(state),
            "rows": state["rows"].tolist() if "rows" in state else None,
            "optimizer": type(optimizer).__name__,
        }
        (out / f"{part}.json").write_text(json.dumps(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("plain", "fsdp", "resume"), help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.environ.get("OUT", str(REPO / "benchmarks" / "results")))
    args = ap.parse_args()
    if args.part:
        _train(args.part, Path(args.dir))
        return

    import torch

    work = Path(tempfile.mkdtemp(prefix="fsdp2-trainer-"))
    results: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for part in ("plain", "fsdp", "resume"):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
            "--standalone", __file__, "--part", part, "--dir", str(work),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        if proc.returncode != 0:
            results[part] = {"status": "failed", "log": proc.stderr[-3000:]}
            print(f"{part}: failed\n{proc.stderr[-3000:]}", flush=True)
            continue
        results[part] = {"status": "ok", **json.loads((work / f"{part}.json").read_text())}
        print(f"{part}: ok, losses {results[part]['losses']}", flush=True)

    def max_diff(a: str, b: str) -> float | None:
        if not ((work / f"{a}.pt").exists() and (work / f"{b}.pt").exists()):
            return None
        wa, wb = torch.load(work / f"{a}.pt"), torch.load(work / f"{b}.pt")
        return max(float((wa[k] - wb[k]).abs().max()) for k in wa)

    results["fsdp_vs_plain"] = max_diff("fsdp", "plain")
    results["resume_vs_fsdp"] = max_diff("resume", "fsdp")
    passed = all(
        d is not None and d < 1e-5 for d in (results["fsdp_vs_plain"], results["resume_vs_fsdp"])
    )
    results["passed"] = passed
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_fsdp2_trainer.json").write_text(json.dumps(results, indent=2))
    print(
        f"FSDP2 vs plain: {results['fsdp_vs_plain']}; resumed vs uninterrupted: "
        f"{results['resume_vs_fsdp']}; {'PASS' if passed else 'FAIL'}"
    )


if __name__ == "__main__":
    main()

"""2-process data-parallel training through GrassTrainer (torchrun, gloo, CPU).

The test launches this file under ``torch.distributed.run``; each worker trains a tiny LLaMA
with ``optim="grass"`` on its own shard of the data, then checks that every parameter is
bit-identical across ranks (DDP averaged the gradients, and both ranks chose the same rows).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _worker(out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from conftest import tiny_llama  # this folder is sys.path[0] of a script run from it
    from datasets import Dataset

    from hf_grass.trainer import GrassTrainer, GrassTrainingArguments

    def initial_model():  # seeded: the same model on both ranks (DDP also broadcasts it)
        return tiny_llama(seed=0, vocab_size=128, num_key_value_heads=2, pad_token_id=0)

    model = initial_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (64, 12), generator=g)
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * 12] * 64, "labels": ids.tolist()}
    )
    args = GrassTrainingArguments(
        output_dir=out_dir,
        optim="grass",
        grass_rank=8,
        grass_update_proj_gap=2,
        grass_selection="multinomial",  # sampled rows: the ranks must draw the same ones
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        seed=3,
    )
    trainer = GrassTrainer(model=model, args=args, train_dataset=data)
    trainer.train()

    rank, world = dist.get_rank(), dist.get_world_size()
    flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    initial = torch.cat([p.detach().reshape(-1) for p in initial_model().parameters()])
    if rank == 0:
        result = {
            "world_size": world,
            "identical": all(torch.equal(gathered[0], t) for t in gathered[1:]),
            "changed": not torch.equal(flat, initial),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "optimizer": type(trainer.optimizer.optimizer).__name__,
        }
        Path(out_dir, "ddp_result.json").write_text(json.dumps(result))
    dist.barrier()


@pytest.mark.slow
def test_two_process_grass_training_keeps_ranks_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--standalone", __file__, str(tmp_path),
    ]  # fmt: skip
    # Own session: on a timeout the launcher and both workers are killed together.
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("torchrun timed out:\n" + stdout[-2000:] + stderr[-2000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    result = json.loads((tmp_path / "ddp_result.json").read_text())
    assert result["world_size"] == 2 and result["optimizer"] == "GrassAdamW"
    assert result["identical"] and result["changed"]
    assert len(result["losses"]) == 4
    # The compressed backward falls back to full gradients under DDP, and says so once per rank.
    assert "keep full gradients for DDP" in stderr


if __name__ == "__main__":
    _worker(sys.argv[1])

"""2-process data-parallel training through GrassTrainer (torchrun, gloo, CPU).

The test launches this file under ``torch.distributed.run``; each worker trains a tiny LLaMA
with ``optim="grass"`` on its own shard of the data; the same file run as a plain script trains
one process on the same global batches, and the test compares the two.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _worker(out_dir: str, mode: str) -> None:
    import torch
    import torch.distributed as dist
    from conftest import tiny_llama  # this folder is sys.path[0] of a script run from it
    from datasets import Dataset

    from hf_grass.report import ResourceReportCallback
    from hf_grass.trainer import GrassTrainer, GrassTrainingArguments

    def initial_model():  # seeded: the same model as one process (rank 0's is broadcast)
        return tiny_llama(seed=0, vocab_size=128, num_key_value_heads=2, pad_token_id=0)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = initial_model()
    # "short_window": one epoch of 12 samples in windows of 2 micro-batches of 4 // world: the
    # last window of the epoch has one micro-batch (layer-wise updates never run in it).
    samples, steps = (12, -1) if mode == "short_window" else (64, 4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (samples, 12), generator=g)
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * 12] * samples, "labels": ids.tolist()}
    )
    layerwise = mode in ("layerwise", "short_window")
    accumulation = 2 if layerwise else 1
    batch = 4 // world if mode == "short_window" else 8 // world // accumulation
    args = GrassTrainingArguments(
        output_dir=out_dir,
        optim="grass",
        grass_rank=8,
        grass_update_proj_gap=2,
        grass_selection="top_r",
        grass_layerwise=layerwise,
        learning_rate=1e-2,
        # The same global batch on one process or two.
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        num_train_epochs=1,
        max_grad_norm=0.0 if layerwise else 1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        ddp_find_unused_parameters=False,
        seed=3,
    )
    report = ResourceReportCallback("grass")
    trainer = GrassTrainer(model=model, args=args, train_dataset=data, callbacks=[report])
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = {
        "world_size": world,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "optimizer": type(trainer.optimizer.optimizer).__name__,
        "changed": any(
            not torch.equal(p, q)
            for p, q in zip(params.values(), initial_model().parameters(), strict=True)
        ),
        "report": report.report,
    }
    if world > 1:
        flat = torch.cat([p.reshape(-1) for p in params.values()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        result["identical"] = all(torch.equal(gathered[0], t) for t in gathered[1:])
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out_dir, f"{mode}-{world}.json").write_text(json.dumps(result))
        torch.save(params, Path(out_dir, f"{mode}-{world}.pt"))
    if world > 1:
        from conftest import end_worker

        end_worker()


def _run(cmd: list[str], timeout: float = 240) -> None:
    from conftest import run_bounded

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = run_bounded(cmd, env, timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["compressed", "layerwise", "short_window"])
def test_two_process_trainer_matches_one_process_with_compressed_communication(tmp_path, mode):
    """GrassTrainer under torchrun: compressed gradients averaged across 2 ranks give the run of
    1 process on the same global batch (fp32 tolerance), with identical ranks and less traffic
    than DDP. Layer-wise mode runs with gradient accumulation 2."""
    import torch

    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
    ]
    _run([*torchrun, __file__, str(tmp_path), mode])
    _run([sys.executable, __file__, str(tmp_path), mode])
    two = json.loads((tmp_path / f"{mode}-2.json").read_text())
    one = json.loads((tmp_path / f"{mode}-1.json").read_text())
    assert two["world_size"] == 2 and two["optimizer"] == "GrassAdamW"
    assert two["identical"] and two["changed"]
    assert len(two["losses"]) == len(one["losses"]) == (2 if mode == "short_window" else 4)
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-4, atol=1e-5)
    params_two = torch.load(tmp_path / f"{mode}-2.pt", weights_only=True)
    params_one = torch.load(tmp_path / f"{mode}-1.pt", weights_only=True)
    for name, value in params_one.items():
        torch.testing.assert_close(params_two[name], value, rtol=1e-4, atol=1e-5, msg=name)
    report = two["report"]
    assert 0 < report["comm_bytes_per_step"] < report["dense_ddp_comm_bytes_per_step"]
    assert {"compressed", "selection", "ddp"} <= report["comm_bytes_per_step_by_kind"].keys()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])

"""GrassAdamW on FSDP2 (``fully_shard``) weights: 2 sharded processes == 1 process.

The test launches this file under ``torch.distributed.run`` (2 CPU processes, gloo). Each rank
shards a float64 MLP with ``fully_shard`` (weights become DTensors split by rows), trains it with
GrassAdamW on its half of every global batch, and compares the gathered weights with a
single-process run on the whole batch. Grass selects columns of row-sharded weights from the
all-reduced column norms, so every rank picks the same ones and keeps moments only for its rows.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS, GAP, RANK = 5, 2, 3


def _model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 4)
    ).double()


def _optimizer(model, selection):
    from hf_grass import GrassAdamW, grass_param_groups

    groups = grass_param_groups(
        model, rank=RANK, target_modules=["0", "2", "4"], update_proj_gap=GAP, selection=selection,
        proj_side="cols", weight_decay=0.01, seed=3,
    )  # fmt: skip
    return GrassAdamW(groups, lr=1e-2, weight_decay=0.01)


def _batches():
    import torch

    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8, 8, generator=g, dtype=torch.float64),
            torch.randn(8, 4, generator=g, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def _train(model, opt, batches, clip: bool):
    import torch.nn.functional as F

    from hf_grass import clip_grad_norm_

    norms = []
    for x, y in batches:
        F.mse_loss(model(x), y).backward()
        if clip:
            norms.append(float(clip_grad_norm_(model.parameters(), 0.05)))
        opt.step()
        opt.zero_grad()
    return norms


def _sharded(model):
    import torch
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _resume_worker(out: str) -> None:
    """Train 3 of 5 steps sharded, save the full state; resume it on 2 processes and on 1."""
    import torch.distributed as dist

    from hf_grass.distributed import full_optimizer_state_dict, load_full_optimizer_state_dict

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = _batches()
    local = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in batches]
    model = _sharded(_model())
    opt = _optimizer(model, "multinomial")
    _train(model, opt, local[:3], clip=True)
    weights = {n: p.full_tensor() for n, p in model.state_dict().items()}
    state = full_optimizer_state_dict(opt)

    plain = _model()
    plain.load_state_dict(weights)
    resumed = _sharded(plain)
    resumed_opt = _optimizer(resumed, "multinomial")
    load_full_optimizer_state_dict(resumed_opt, state)
    _train(resumed, resumed_opt, local[3:], clip=True)
    on_two = {n: p.full_tensor() for n, p in resumed.named_parameters()}

    reference = _model()
    ref_opt = _optimizer(reference, "multinomial")
    _train(reference, ref_opt, batches, clip=True)
    one = _model()
    one.load_state_dict(weights)
    one_opt = _optimizer(one, "multinomial")
    one_opt.load_state_dict(state)  # a single process resumes the same state
    _train(one, one_opt, batches[3:], clip=True)
    if rank == 0:
        ref = dict(reference.named_parameters())
        result = {
            name: [float((on_two[name] - p).abs().max()), float((p - ref[name]).abs().max())]
            for name, p in one.named_parameters()
        }
        Path(out, "resume.json").write_text(json.dumps(result))
    end_worker()


def _worker(out: str, selection: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _sharded(_model())
    opt = _optimizer(model, selection)
    batches = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in _batches()]
    norms = _train(model, opt, batches, clip=True)
    sharded = {n: p.full_tensor() for n, p in model.named_parameters()}
    state_rows = opt.state[model[0].weight]["exp_avg"].shape

    reference = _model()
    ref_opt = _optimizer(reference, selection)
    ref_norms = _train(reference, ref_opt, _batches(), clip=True)
    max_diff = max(
        float((sharded[n] - p.detach()).abs().max()) for n, p in reference.named_parameters()
    )
    if rank == 0:
        Path(out, f"{selection}.json").write_text(
            json.dumps(
                {
                    "max_diff": max_diff,
                    "norms": norms,
                    "ref_norms": ref_norms,
                    "local_state": list(state_rows),
                    "full_state": list(ref_opt.state[reference[0].weight]["exp_avg"].shape),
                    "rows_equal": torch.equal(
                        opt.state[model[0].weight]["rows"],
                        ref_opt.state[reference[0].weight]["rows"],
                    ),
                }
            )
        )
    end_worker()


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["top_r", "multinomial"])
def test_fully_shard_two_processes_equal_one_process(tmp_path, selection):
    from conftest import run_bounded

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        __file__, str(tmp_path), selection,
    ]  # fmt: skip
    proc = run_bounded(cmd, env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / f"{selection}.json").read_text())
    assert result["rows_equal"]
    assert result["max_diff"] < 1e-10
    # every rank clipped by the global norm of the whole (compressed) gradient
    assert result["norms"] == pytest.approx(result["ref_norms"], rel=1e-6)
    # moments: r x (this rank's rows), half of the single-process r x m
    assert result["local_state"] == [RANK, result["full_state"][1] // 2]


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_two_processes_and_on_one(tmp_path):
    """The gathered state resumes exactly: sharded again on 2 ranks, or on a single process."""
    from conftest import run_bounded

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        __file__, str(tmp_path), "resume",
    ]  # fmt: skip
    proc = run_bounded(cmd, env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name, (two_vs_one, one_vs_uninterrupted) in json.loads(
        (tmp_path / "resume.json").read_text()
    ).items():
        assert two_vs_one < 1e-12 and one_vs_uninterrupted < 1e-12, name


if __name__ == "__main__":
    from conftest import end_worker

    if sys.argv[2] == "resume":
        _resume_worker(sys.argv[1])
    else:
        _worker(sys.argv[1], sys.argv[2])

"""GrassAdamW on FSDP2 (``fully_shard``) weights: 2 sharded processes == 1 process.

The test launches this file under ``torch.distributed.run`` (2 CPU processes, gloo). Each rank
shards a float64 MLP with ``fully_shard`` (weights become DTensors split by rows), trains it with
GrassAdamW on its half of every global batch, and compares the gathered weights with a
single-process run on the whole batch. Grass selects columns of row-sharded weights from the
all-reduced column norms, so every rank picks the same ones and keeps moments only for its rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS, GAP, RANK = 5, 2, 3


def _model(widths=(8, 12, 10, 4)):
    import torch
    from torch import nn

    torch.manual_seed(0)
    a, b, c, d = widths
    return nn.Sequential(
        nn.Linear(a, b), nn.Tanh(), nn.Linear(b, c), nn.Tanh(), nn.Linear(c, d)
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


def _sharded(model, mesh=None):
    import torch
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
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


def _dcp_worker(out: str) -> None:
    """Train 3 of 5 steps sharded; checkpoint through torch.distributed.checkpoint, gathered
    (``full_state_dict``) and sharded (``dcp.save``); resume each on 2 processes."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in _batches()]
    model = _sharded(_model())
    opt = _optimizer(model, "multinomial")
    _train(model, opt, local[:3], clip=True)
    full = StateDictOptions(full_state_dict=True)
    gathered = (
        get_model_state_dict(model, options=full),
        get_optimizer_state_dict(model, opt, options=full),
    )
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=str(Path(out, "dcp")),
    )  # fmt: skip

    finals = {}
    for kind in ("full", "sharded"):
        resumed = _sharded(_model())
        resumed_opt = _optimizer(resumed, "multinomial")
        if kind == "full":
            model_sd, optim_sd, options = *gathered, full
        else:
            loaded = {
                "model": get_model_state_dict(resumed),
                "optim": get_optimizer_state_dict(resumed, resumed_opt),
            }
            dcp.load(loaded, checkpoint_id=str(Path(out, "dcp")))
            model_sd, optim_sd, options = loaded["model"], loaded["optim"], None
        set_model_state_dict(resumed, model_sd, options=options)
        set_optimizer_state_dict(resumed, resumed_opt, optim_sd, options=options)
        _train(resumed, resumed_opt, local[3:], clip=True)
        finals[kind] = {n: p.full_tensor() for n, p in resumed.named_parameters()}

    # The sharded optimizer's own state_dict (DTensor moments) into a single-process optimizer.
    plain = _model()
    plain.load_state_dict({n: p.full_tensor() for n, p in model.state_dict().items()})
    plain_opt = _optimizer(plain, "multinomial")
    plain_opt.load_state_dict(opt.state_dict())
    _train(plain, plain_opt, _batches()[3:], clip=True)
    finals["into one process"] = {n: p.detach() for n, p in plain.named_parameters()}

    reference = _model()
    _train(reference, _optimizer(reference, "multinomial"), _batches(), clip=True)
    if rank == 0:
        ref = dict(reference.named_parameters())
        result = {
            kind: max(float((w[n] - ref[n]).abs().max()) for n in ref) for kind, w in finals.items()
        }
        Path(out, "dcp.json").write_text(json.dumps(result))
    end_worker()


def _hsdp_mesh(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))


def _compressed_worker(out: str) -> None:
    """Grass layers installed before sharding: on ordinary steps their compressed gradients are
    averaged by one reduce-scatter of r x m each and FSDP2 gets no weight gradient; selection
    steps take FSDP2's full gradient. Uneven shards (11 and 9 rows on 2 ranks), and gradient
    accumulation without FSDP2's gradient sync on the first of two micro-batches; and HSDP's
    2-D mesh (a replicated dimension of 1 here) with its all-reduce."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from hf_grass import clip_grad_norm_, grassify

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    widths = (8, 11, 9, 4)
    result = {}
    for case, micro in (("fsdp", 1), ("fsdp", 2), ("hsdp", 1)):
        # each step: `micro` global micro-batches of 8 // micro rows, each rank half of each
        steps = [[(x[i::micro], y[i::micro]) for i in range(micro)] for x, y in _batches()]
        model = _model(widths)
        grassify(model, rank=RANK, target_modules=["0", "2", "4"], proj_side="cols")
        _sharded(model, _hsdp_mesh(world) if case == "hsdp" else None)
        opt = _optimizer(model, "multinomial")
        full_grads, norms = [], []
        for batches in steps:
            for i, (x, y) in enumerate(batches):
                model.set_requires_gradient_sync(i == micro - 1)
                local = x.chunk(world)[rank], y.chunk(world)[rank]
                F.mse_loss(model(local[0]), local[1]).backward()
            full_grads.append([model[i].weight.grad is not None for i in (0, 2, 4)])
            norms.append(float(clip_grad_norm_(model.parameters(), 0.05)))
            opt.step()
            opt.zero_grad()
        sharded = {n: p.full_tensor().detach() for n, p in model.named_parameters()}

        reference = _model(widths)
        ref_opt = _optimizer(reference, "multinomial")
        ref_norms = []
        for batches in steps:
            for x, y in batches:
                F.mse_loss(reference(x), y).backward()
            ref_norms.append(float(clip_grad_norm_(reference.parameters(), 0.05)))
            ref_opt.step()
            ref_opt.zero_grad()
        result[f"{case}, {micro} micro-batches"] = {
            "max_diff": max(
                float((sharded[n] - p.detach()).abs().max())
                for n, p in reference.named_parameters()
            ),
            "full_grads": full_grads,
            "norms": norms,
            "ref_norms": ref_norms,
        }
    if rank == 0:
        Path(out, "compressed.json").write_text(json.dumps(result))
    end_worker()


def _worker(out: str, selection: str) -> None:
    import torch
    import torch.distributed as dist

    from hf_grass.report import tensor_bytes

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _sharded(_model())
    opt = _optimizer(model, selection)
    batches = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in _batches()]
    norms = _train(model, opt, batches, clip=True)
    sharded = {n: p.full_tensor() for n, p in model.named_parameters()}
    state_rows = opt.state[model[0].weight]["exp_avg"].shape
    bias = model[0].bias  # a DTensor with plain AdamW moments: the report counts this rank's
    # Both moments of this rank's 6 of 12 entries: counted once each (a DTensor's data_ptr is 0),
    # and only the local part.
    moments = [opt.state[bias]["exp_avg"], opt.state[bias]["exp_avg_sq"]]
    bias_state_bytes = [
        [tensor_bytes(moments[0]), tensor_bytes(moments)],
        bias.to_local().numel() * 8,
    ]

    # The optimizer built on the plain weights, which sharding then replaces in its groups (what
    # accelerate's FSDP2 preparation does for the Trainer's --fsdp): the same training.
    late = _model()
    late_opt = _optimizer(late, selection)
    names = {id(p): n for n, p in late.named_parameters()}
    old_groups = [[names[id(p)] for p in g["params"]] for g in late_opt.param_groups]
    _sharded(late)
    new_params = dict(late.named_parameters())
    for group, group_names in zip(late_opt.param_groups, old_groups, strict=True):
        group["params"] = [new_params[n] for n in group_names]
    late_opt.follow_replaced_params()  # before clipping reads the projections
    _train(late, late_opt, batches, clip=True)
    late_diff = max(
        float((p.full_tensor() - sharded[n]).abs().max()) for n, p in new_params.items()
    )

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
                    "late_diff": late_diff,
                    "bias_state_bytes": bias_state_bytes,
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


def _two_processes(tmp_path, mode: str) -> None:
    """Run this file's ``mode`` worker on 2 CPU processes (gloo), bounded in time."""
    from conftest import run_two_processes

    proc = run_two_processes(__file__, str(tmp_path), mode)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["top_r", "multinomial"])
def test_fully_shard_two_processes_equal_one_process(tmp_path, selection):
    _two_processes(tmp_path, selection)
    result = json.loads((tmp_path / f"{selection}.json").read_text())
    assert result["rows_equal"]
    assert result["max_diff"] < 1e-10
    assert result["late_diff"] == 0.0
    (one, both), local_bytes = result["bias_state_bytes"]
    assert one == local_bytes and both == 2 * local_bytes
    # every rank clipped by the global norm of the whole (compressed) gradient
    assert result["norms"] == pytest.approx(result["ref_norms"], rel=1e-6)
    # moments: r x (this rank's rows), half of the single-process r x m
    assert result["local_state"] == [RANK, result["full_state"][1] // 2]


@pytest.mark.slow
def test_compressed_backward_under_fully_shard_equals_one_process(tmp_path):
    _two_processes(tmp_path, "compressed")
    results = json.loads((tmp_path / "compressed.json").read_text())
    assert len(results) == 3
    for case, result in results.items():
        # selection steps (0, 2, 4: K = 2) take FSDP2's full gradients; the others none
        assert result["full_grads"] == [[step % GAP == 0] * 3 for step in range(STEPS)], case
        assert result["max_diff"] < 1e-10, case
        assert result["norms"] == pytest.approx(result["ref_norms"], rel=1e-9), case


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_two_processes_and_on_one(tmp_path):
    """The gathered state resumes exactly: sharded again on 2 ranks, or on a single process."""

    _two_processes(tmp_path, "resume")
    for name, (two_vs_one, one_vs_uninterrupted) in json.loads(
        (tmp_path / "resume.json").read_text()
    ).items():
        assert two_vs_one < 1e-12 and one_vs_uninterrupted < 1e-12, name


@pytest.mark.slow
def test_distributed_checkpoint_resumes_sharded_and_on_one_process(tmp_path):
    """torch.distributed.checkpoint saves Grass's sharded moments: gathered or sharded, the
    checkpoint resumes exactly on 2 processes, and the sharded one on a single process."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    _two_processes(tmp_path, "dcp")
    for kind, diff in json.loads((tmp_path / "dcp.json").read_text()).items():
        assert diff < 1e-12, kind

    # The sharded checkpoint, loaded by one process without any process group.
    model = _model()
    opt = _optimizer(model, "multinomial")
    loaded = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(loaded, checkpoint_id=str(tmp_path / "dcp"))
    model.load_state_dict(loaded["model"])
    set_optimizer_state_dict(model, opt, loaded["optim"])
    batches = _batches()
    _train(model, opt, batches[3:], clip=True)
    reference = _model()
    _train(reference, _optimizer(reference, "multinomial"), batches, clip=True)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)


if __name__ == "__main__":
    from conftest import end_worker

    if sys.argv[2] == "resume":
        _resume_worker(sys.argv[1])
    elif sys.argv[2] == "dcp":
        _dcp_worker(sys.argv[1])
    elif sys.argv[2] == "compressed":
        _compressed_worker(sys.argv[1])
    else:
        _worker(sys.argv[1], sys.argv[2])

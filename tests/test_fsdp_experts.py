"""GrassAdamW on a MoE model under FSDP2 (``fully_shard``): 2 sharded processes == 1 process.

FSDP2 shards an experts' weight (E, m, n) on dim 0, so each of the 2 ranks holds 4 whole
experts of the tiny Mixtral's 8 and selects their rows from their own (reduce-scattered)
gradients, while the attention matrices are sharded by rows (Grass selects their columns). The
test launches this file under ``torch.distributed.run`` (2 CPU processes, gloo) and compares the
gathered weights with a single-process run on the whole batch; then a state gathered from the
sharded run resumes on 2 processes and on 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS, GAP, RANK = 4, 2, 3


def _model():
    from conftest import tiny_moe

    from hf_grass import grassify

    model = tiny_moe("mixtral").double()
    grassify(model, rank=RANK)  # the Grass layers; groups are built on the final parameters
    return model


def _sharded(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _optimizer(model, selection: str):
    from hf_grass import GrassAdamW, grass_param_groups

    # proj_side="cols": the side FSDP2 forces on the row-sharded attention matrices, so that
    # the single-process reference selects the same side (the experts take any side).
    groups = grass_param_groups(
        model, rank=RANK, update_proj_gap=GAP, selection=selection, proj_side="cols",
        weight_decay=0.01, seed=3,
    )  # fmt: skip
    return GrassAdamW(groups, lr=1e-2, weight_decay=0.01)


def _batches():
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (4, 6), generator=g) for _ in range(STEPS)]


def _train(model, opt, batches) -> list[float]:
    from hf_grass import clip_grad_norm_

    norms = []
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        norms.append(float(clip_grad_norm_(model.parameters(), 0.5)))
        opt.step()
        opt.zero_grad()
    return norms


def _full(model) -> dict:
    return {
        n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        for n, p in model.named_parameters()
    }


def _refuses_experts_sharded_within_matrices() -> str:
    """Experts' weights sharded inside each matrix (dim 1), not by whole experts: GrassAdamW
    stops with the fix."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from hf_grass import GrassAdamW

    mesh = init_device_mesh("cpu", (2,))
    weight = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 6, 8), mesh, [Shard(1)]))
    try:
        GrassAdamW([{"params": [weight], "rank": 2}])
    except ValueError as error:
        return str(error)
    return ""


def _resume_from_distributed_checkpoint(out, model_at, state, selection, batches) -> dict:
    """Save the halfway run sharded with torch.distributed.checkpoint, load it into a fresh
    sharded run and train it on: its final weights."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from hf_grass.distributed import load_full_optimizer_state_dict

    def halfway_run():
        model = _model()
        model.load_state_dict(model_at)
        model = _sharded(model)
        opt = _optimizer(model, selection)
        load_full_optimizer_state_dict(opt, state)
        return model, opt

    model, opt = halfway_run()
    path = str(Path(out, f"dcp-{selection}"))
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=path,
    )
    fresh = _sharded(_model())
    fresh_opt = _optimizer(fresh, selection)
    loaded = {
        "model": get_model_state_dict(fresh),
        "optim": get_optimizer_state_dict(fresh, fresh_opt),
    }
    dcp.load(loaded, checkpoint_id=path)
    set_model_state_dict(fresh, loaded["model"])
    set_optimizer_state_dict(fresh, fresh_opt, loaded["optim"])
    _train(fresh, fresh_opt, batches[STEPS // 2 :])
    return _full(fresh)


def _worker(out: str, selection: str) -> None:
    import copy

    import torch.distributed as dist

    from hf_grass.distributed import full_optimizer_state_dict, load_full_optimizer_state_dict

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = _batches()
    local = [ids.chunk(world)[rank] for ids in batches]
    model = _sharded(_model())
    opt = _optimizer(model, selection)
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    norms = _train(model, opt, local[: STEPS // 2])
    halfway = _full(model)
    state = copy.deepcopy(full_optimizer_state_dict(opt))  # what torch.save would keep
    norms += _train(model, opt, local[STEPS // 2 :])
    sharded = _full(model)
    local_rows = opt.state[experts]["exp_avg"].shape[0]

    resumed = _model()
    resumed.load_state_dict(halfway)
    resumed = _sharded(resumed)
    resumed_opt = _optimizer(resumed, selection)
    load_full_optimizer_state_dict(resumed_opt, state)
    _train(resumed, resumed_opt, local[STEPS // 2 :])
    on_two = _full(resumed)

    on_two_from_dcp = _resume_from_distributed_checkpoint(out, model_at=halfway, state=state,
                                                          selection=selection, batches=local)  # fmt: skip

    reference = _model()
    ref_opt = _optimizer(reference, selection)
    ref_norms = _train(reference, ref_opt, batches)
    one = _model()
    one.load_state_dict(halfway)
    one_opt = _optimizer(one, selection)
    one_opt.load_state_dict(state)
    _train(one, one_opt, batches[STEPS // 2 :])
    refused = _refuses_experts_sharded_within_matrices()
    if rank == 0:
        ref = _full(reference)
        result = {
            "sharded_vs_one_process": max(
                float((sharded[n] - p).abs().max()) for n, p in ref.items()
            ),
            "resumed_on_two": max(float((on_two[n] - p).abs().max()) for n, p in ref.items()),
            "resumed_from_dcp": max(
                float((on_two_from_dcp[n] - p).abs().max()) for n, p in ref.items()
            ),
            "resumed_on_one": max(float((w - ref[n]).abs().max()) for n, w in _full(one).items()),
            "norms": norms,
            "ref_norms": ref_norms,
            "local_rows": local_rows,
            "refused": refused,
            "full_rows": ref_opt.state[reference.model.layers[0].mlp.experts.gate_up_proj][
                "exp_avg"
            ].shape[0],
        }
        Path(out, f"{selection}.json").write_text(json.dumps(result))
    from conftest import end_worker

    end_worker()


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["top_r", "multinomial"])
def test_sharded_experts_train_and_resume_as_one_process(tmp_path, selection):
    from conftest import run_two_processes

    proc = run_two_processes(__file__, str(tmp_path), selection, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / f"{selection}.json").read_text())
    assert result["sharded_vs_one_process"] < 1e-10
    assert result["resumed_on_two"] < 1e-10 and result["resumed_on_one"] < 1e-10
    assert result["resumed_from_dcp"] < 1e-10
    # every rank clipped by the global norm of the whole (compressed) gradient
    assert result["norms"] == pytest.approx(result["ref_norms"], rel=1e-6)
    # each rank keeps the rows of its own 4 experts of 8: half of the single process's E * r
    assert result["local_rows"] * 2 == result["full_rows"] == 8 * RANK
    assert "needs it sharded by whole experts" in result["refused"]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])

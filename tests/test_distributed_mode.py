"""A distributed mode written in this file alone, as README's recipe says: it sets each
projection's ``reduce_full`` (the full gradient averaged before rows are selected from it) and
averages its compressed gradient when the grad-ready hook fires. Trained on 2 processes (gloo,
no DDP), it matches one process on the global batch, and the ranks select the same rows.

The test launches this file under ``torch.distributed.run``; every rank writes what it saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

STEPS, BATCH, SEQ = 4, 8, 8


class AllReduceEachWeight:
    """The toy mode: one all-reduce per projected weight's gradient (no buckets, no DDP); the
    training loop averages the plain parameters' ``.grad`` itself after the backward."""

    def __init__(self, model):
        import torch.distributed as dist

        from hf_grass import projection_of

        self.world = dist.get_world_size()
        self.handles = []
        for weight in model.parameters():
            projection = projection_of(weight)
            if projection is None:
                continue
            projection.reduce_full = self.mean_  # every rank selects from the same gradient
            hook = self._averages(projection)
            self.handles.append(projection.register_grad_ready_hook(hook))

    def mean_(self, tensor):
        import torch.distributed as dist

        dist.all_reduce(tensor)
        return tensor.div_(self.world)

    def _averages(self, projection):
        return lambda: self.mean_(projection.grad)


def _batches():
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _worker(out: str) -> None:
    import torch.distributed as dist
    from conftest import end_worker
    from test_accelerate_loop import _model, _optimizer  # float64 tiny LLaMA, GrassAdamW

    from hf_grass import projection_of

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model()
    opt = _optimizer(model)
    mode = AllReduceEachWeight(model)
    projected = [p for p in model.parameters() if projection_of(p) is not None]
    rows_seen = []
    for ids in _batches():
        _loss(model, ids.chunk(world)[rank]).backward()
        for p in model.parameters():
            if p.grad is not None:
                mode.mean_(p.grad)
        rows_seen.append([projection_of(p).rows.tolist() for p in projected])
        opt.step()
        opt.zero_grad()

    reference = _model()
    ref_opt = _optimizer(reference)
    for ids in _batches():
        _loss(reference, ids).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    ref_params = dict(reference.named_parameters())
    all_rows = [None] * world
    dist.all_gather_object(all_rows, rows_seen)
    result = {
        "projected": len(projected),
        "max_diff_vs_one_process": max(
            float((p - ref_params[n]).detach().abs().max()) for n, p in model.named_parameters()
        ),
        "rows_identical_across_ranks": all(r == all_rows[0] for r in all_rows),
        "rows_match_reference": rows_seen[-1]
        == [ref_opt.projection(ref_params[n]).rows.tolist() for n, p in model.named_parameters()
            if projection_of(p) is not None],
    }  # fmt: skip
    if rank == 0:
        Path(out, "result.json").write_text(json.dumps(result))
    end_worker()


@pytest.mark.slow
def test_a_distributed_mode_of_this_file_matches_one_process(tmp_path):
    from conftest import run_two_processes

    proc = run_two_processes(__file__, str(tmp_path), timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["projected"] == 2 * 7
    assert result["max_diff_vs_one_process"] < 1e-10
    assert result["rows_identical_across_ranks"] and result["rows_match_reference"]


if __name__ == "__main__":
    _worker(sys.argv[1])

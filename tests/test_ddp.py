"""Compressed data parallelism (hf_grass.distributed): 2 processes == 1 process on the global batch.

Each test launches this file under ``torch.distributed.run`` (2 CPU processes, gloo). Every rank
trains a float64 tiny LLaMA on its half of each global batch through DDP + GrassDataParallel, and
also trains a single-process reference on the whole global batch; it writes what it saw to a
JSON file that the test reads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS, GAP, RANK, BATCH, SEQ = 5, 2, 8, 8, 8


def _model(mode: str = ""):
    from conftest import tiny_llama

    # "embeddings": the tied embedding and head are projected too (one weight, two uses)
    return tiny_llama(seed=0, vocab_size=64, tie_word_embeddings=mode == "embeddings").double()


def _grassify(model, mode: str, rank: int = RANK):
    from hf_grass import grassify

    tied = mode == "embeddings"
    return grassify(model, rank=rank, update_proj_gap=GAP, selection="multinomial", seed=3,
                    embeddings=tied, lm_head=tied)  # fmt: skip


def _batches():
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def _train_reference(mode: str):
    """One process, the global batch, no DDP: what the 2-process run must reproduce."""
    import torch

    from hf_grass import GrassAdamW

    model = _model(mode)
    opt = GrassAdamW(
        _grassify(model, mode),
        lr=1e-2,
        foreach=False,
    )
    for ids in _batches():
        if mode == "accumulate":
            # The same two micro-batches as the ranks' together: rows are selected from the
            # first micro-batch of a window (hf_grass.linear), so the windows must match.
            first = torch.cat([half.chunk(2)[0] for half in ids.chunk(2)])
            second = torch.cat([half.chunk(2)[1] for half in ids.chunk(2)])
            for micro in (first, second):
                (model(input_ids=micro, labels=micro).loss / 2).backward()
        else:
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _worker(out: str, mode: str) -> None:
    import torch
    import torch.distributed as dist
    from conftest import end_worker
    from torch.nn.parallel import DistributedDataParallel

    from hf_grass import GrassAdamW, enable_layerwise, projection_of
    from hf_grass.distributed import GrassDataParallel, dense_ddp_bytes

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = _model(mode)
    grass_rank = RANK + (1 if mode == "mismatch" and rank == 1 else 0)
    groups = _grassify(model, mode, grass_rank)
    opt = GrassAdamW(groups, lr=1e-2, foreach=mode != "foreach")
    grass_dp = GrassDataParallel(model, opt, layerwise=mode == "layerwise", bucket_cap_mb=0.01)
    ddp = DistributedDataParallel(model)
    grass_dp.attach(ddp)
    if mode == "layerwise":
        enable_layerwise(
            opt, list(grass_dp.projected.values()), reduce_gradient=grass_dp.reduce_now
        )
    weights = list(grass_dp.projected.values())
    rows_seen = []
    for step, ids in enumerate(_batches()):
        if mode == "dies" and rank == 1 and step == 2:
            os._exit(3)
        mine = ids.chunk(world)[rank]
        if mode == "accumulate":  # two micro-batches; only the second synchronises
            halves = mine.chunk(2)
            with ddp.no_sync():
                (ddp(input_ids=halves[0], labels=halves[0]).loss / 2).backward()
            (ddp(input_ids=halves[1], labels=halves[1]).loss / 2).backward()
        else:
            ddp(input_ids=mine, labels=mine).loss.backward()
        rows_seen.append([projection_of(w).rows.tolist() for w in weights])
        opt.step()
        opt.zero_grad()

    reference, ref_opt = _train_reference(mode)
    ref_params = dict(reference.named_parameters())
    max_diff = max(
        float((p - ref_params[n]).detach().abs().max()) for n, p in model.named_parameters()
    )
    ref_rows = [ref_opt.projection(ref_params[n]).rows.tolist() for n in grass_dp.projected]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    everyone = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    all_rows = [None] * world
    dist.all_gather_object(all_rows, rows_seen)
    sent = grass_dp.meter.total
    result = {
        "max_diff_vs_one_process": max_diff,
        "identical_across_ranks": all(torch.equal(everyone[0], f) for f in everyone),
        "rows_identical_across_ranks": all(r == all_rows[0] for r in all_rows),
        "rows_match_reference": rows_seen[-1] == ref_rows,
        "steps": grass_dp.meter.steps,
        "sent": dict(sent),
        "expected_compressed": STEPS * sum(opt.state[w]["exp_avg"].numel() * 8 for w in weights),
        "expected_selection": -(-STEPS // GAP) * sum(w.numel() * 8 for w in weights),
        "expected_ddp": STEPS * (dense_ddp_bytes(model) - sum(w.numel() * 8 for w in weights)),
    }
    if rank == 0:
        Path(out, f"{mode}.json").write_text(json.dumps(result))
    end_worker()


def _launch(tmp_path: Path, mode: str, timeout: float = 180):
    from conftest import run_bounded

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        __file__, str(tmp_path), mode,
    ]  # fmt: skip
    return run_bounded(cmd, env, timeout)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["foreach", "reference", "accumulate", "layerwise", "embeddings"])
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path, mode):
    proc = _launch(tmp_path, mode)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / f"{mode}.json").read_text())
    assert result["max_diff_vs_one_process"] < 1e-10
    assert result["identical_across_ranks"]
    assert result["rows_identical_across_ranks"] and result["rows_match_reference"]
    assert result["steps"] == STEPS
    # The meter counts what was actually sent: r x k per projected weight per step, the full
    # layer gradient at selection steps, and DDP's buckets of the other parameters.
    sent = result["sent"]
    assert sent["compressed"] == result["expected_compressed"]
    assert sent["selection"] == result["expected_selection"]
    assert sent["ddp"] == result["expected_ddp"]


@pytest.mark.slow
def test_mismatched_grass_settings_fail_fast_with_a_clear_error(tmp_path):
    proc = _launch(tmp_path, "mismatch", timeout=120)
    assert proc.returncode != 0
    assert "Grass settings differ between ranks" in proc.stderr


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_job_instead_of_hanging(tmp_path):
    proc = _launch(tmp_path, "dies", timeout=150)
    assert proc.returncode != 0
    assert not (tmp_path / "dies.json").exists()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])

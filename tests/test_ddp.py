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

from hf_grass.optim import CLIPPED_ELSEWHERE_WARNING

ROOT = Path(__file__).resolve().parents[1]
STEPS, GAP, RANK, BATCH, SEQ = 5, 2, 8, 8, 8


def _features(mode: str) -> set[str]:
    """A mode names features joined by "+": accumulate (2 micro-batches a window), short (the last
    window has one), penalty (an L2 penalty on a projected weight: a second use outside its
    layer), seeds (ranks build their models from different seeds), unused (rank 1 skips layer
    1's MLP at ordinary steps), unused_at_selection (and at a selection step), layerwise,
    reentrant (decoder layers checkpointed with use_reentrant=True), ..."""
    return set(mode.split("+"))


def _model(mode: str = "", seed: int = 0):
    from conftest import tiny_gpt2, tiny_llama, tiny_moe

    if "gpt2" in _features(mode):  # Conv1D layers (transposed weights)
        return tiny_gpt2(seed=seed).double()
    if "moe" in _features(mode):  # 3-D expert weights, top-1 of 8 experts
        return tiny_moe("mixtral", seed=seed).double()
    # "embeddings": the tied embedding and head are projected too (one weight, two uses)
    tied = "embeddings" in _features(mode)
    model = tiny_llama(seed=seed, vocab_size=64, tie_word_embeddings=tied).double()
    if "reentrant" in _features(mode):  # each decoder layer recomputed in a nested backward
        model.gradient_checkpointing_enable({"use_reentrant": True})
        model.train()
    return model


def _grassify(model, mode: str, rank: int = RANK):
    from hf_grass import grassify

    tied = "embeddings" in _features(mode)
    return grassify(model, rank=rank, update_proj_gap=GAP, selection="multinomial", seed=3,
                    embeddings=tied, lm_head=tied)  # fmt: skip


def _batches():
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def _micro_batches(mode: str, step: int, ids):
    """Each rank's micro-batches of a step: a list (one per micro-batch) of per-rank slices."""
    features = _features(mode)
    halves = ids.chunk(2)  # the ranks' shares of the global batch
    if "accumulate" not in features:
        return [list(halves)]
    micros = [[half.chunk(2)[j] for half in halves] for j in range(2)]
    return micros[:1] if "short" in features and step == STEPS - 1 else micros


def _skips_mlp(mode: str, step: int, rank: int) -> bool:
    """Whether ``rank`` leaves layer 1's MLP (three projected weights) out of this step."""
    features = _features(mode)
    unused_steps = {1, 3} | ({2} if "unused_at_selection" in features else set())
    return rank == 1 and step in unused_steps and bool(features & {"unused", "unused_at_selection"})


def _loss(forward, model, mode: str, ids, skip_mlp, n_micro: int):
    """The LM loss of a micro-batch through ``forward`` (``model`` or its DDP wrapper), plus the
    penalty; layer 1's MLP is left out for the sequences where ``skip_mlp`` (a bool per
    sequence) is True, and not called at all where it is True for all."""
    import torch

    layers = model.transformer.h if "gpt2" in _features(mode) else model.model.layers
    mlp = layers[1].mlp
    mlp_forward = mlp.forward

    def partial_mlp(x):
        out = torch.zeros_like(x)
        keep = ~skip_mlp
        if keep.any():
            out[keep] = mlp_forward(x[keep])
        return out

    mlp.forward = partial_mlp
    try:
        loss = forward(input_ids=ids, labels=ids).loss
    finally:
        del mlp.forward
    if "penalty" in _features(mode):
        loss = loss + 0.1 * model.model.layers[0].self_attn.q_proj.weight.square().sum()
    return loss / n_micro


def _skip_mask(mode: str, step: int, shares):
    import torch

    return torch.cat(
        [
            torch.full((len(share),), _skips_mlp(mode, step, rank))
            for rank, share in enumerate(shares)
        ]
    )


def _train_reference(mode: str):
    """One process, the global batch, no DDP: what the 2-process run must reproduce."""
    import torch

    from hf_grass import GrassAdamW

    model = _model(mode)
    opt = GrassAdamW(_grassify(model, mode), lr=1e-2, foreach=False)
    for step, ids in enumerate(_batches()):
        micros = _micro_batches(mode, step, ids)
        for micro in micros:
            # One forward of the ranks' shares together: the mean of their losses, which DDP's
            # averaged gradients follow, and rows selected from the whole micro-batch's gradient.
            skip = _skip_mask(mode, step, micro)
            _loss(model, model, mode, torch.cat(micro), skip, len(micros)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _worker(out: str, mode: str) -> None:
    import contextlib

    import torch
    import torch.distributed as dist
    from conftest import end_worker
    from torch.nn.parallel import DistributedDataParallel

    from hf_grass import GrassAdamW, enable_layerwise, projection_of
    from hf_grass.distributed import GrassDataParallel, dense_ddp_bytes

    features = _features(mode)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(mode, seed=rank if "seeds" in features else 0)
    grass_rank = RANK + (1 if "mismatch" in features and rank == 1 else 0)
    groups = _grassify(model, mode, grass_rank)
    opt = GrassAdamW(groups, lr=1e-2, foreach="foreach" not in features)
    layerwise = "layerwise" in features
    grass_dp = GrassDataParallel(model, opt, layerwise=layerwise, bucket_cap_mb=0.01)
    unused = bool(features & {"unused", "unused_at_selection"})
    ddp = DistributedDataParallel(model, find_unused_parameters=unused)
    grass_dp.attach(ddp)
    if layerwise:
        enable_layerwise(
            opt,
            list(grass_dp.projected.values()),
            gradient_accumulation_steps=2 if "accumulate" in features else 1,
            reduce_gradient=grass_dp.reduce_now,
        )
    weights = list(grass_dp.projected.values())
    rows_seen = []
    for step, ids in enumerate(_batches()):
        if "dies" in features and rank == 1 and step == 2:
            os._exit(3)
        micros = _micro_batches(mode, step, ids)
        for j, micro in enumerate(micros):
            last = j == len(micros) - 1  # only the last micro-batch of a window synchronises
            with contextlib.nullcontext() if last else ddp.no_sync():
                skip = _skip_mask(mode, step, micro).chunk(world)[rank]
                _loss(ddp, model, mode, micro[rank], skip, len(micros)).backward()
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
    flags = 0 if layerwise else len(weights) * 8  # a bucket's "had a gradient" flags
    result = {
        "max_diff_vs_one_process": max_diff,
        "identical_across_ranks": all(torch.equal(everyone[0], f) for f in everyone),
        "rows_identical_across_ranks": all(r == all_rows[0] for r in all_rows),
        "rows_match_reference": rows_seen[-1] == ref_rows,
        "steps": grass_dp.meter.steps,
        "sent": dict(sent),
        "expected_compressed": STEPS
        * (sum(opt.state[w]["exp_avg"].numel() * 8 for w in weights) + flags),
        "expected_selection": -(-STEPS // GAP) * sum(w.numel() * 8 for w in weights),
        "expected_ddp": STEPS * (dense_ddp_bytes(model) - sum(w.numel() * 8 for w in weights)),
    }
    if rank == 0:
        Path(out, f"{mode}.json").write_text(json.dumps(result))
    end_worker()


def _launch(tmp_path: Path, mode: str, timeout: float = 180):
    from conftest import run_two_processes

    return run_two_processes(__file__, str(tmp_path), mode, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [
        "foreach",
        "reference",
        "accumulate",
        "layerwise",
        "embeddings",
        # GPT-2's Conv1D layers, whose weights are stored transposed.
        "gpt2+unused",
        # MoE experts (3-D weights): experts that get tokens on one rank only, or on none.
        "moe+unused",
        # Projected weights are broadcast from rank 0 like DDP's own.
        "seeds",
        # A second use of a projected weight outside its layer is averaged too, and counted
        # once per backward in layer-wise mode.
        "penalty",
        "layerwise+accumulate+penalty",
        # A window cut short (one micro-batch of two) is averaged before optimizer.step().
        "layerwise+accumulate+short",
        # A layer that one rank leaves out of an ordinary step: zeros in a fixed bucket.
        "unused",
        # Reentrant checkpointing: each layer's backward is nested in the outer one, and the
        # buckets are still sent once, at the end of the outer one.
        "reentrant",
    ],
)
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path, mode):
    proc = _launch(tmp_path, mode)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # DDP's and Grass's averaging change gradients in place; that is not an outside clip.
    assert CLIPPED_ELSEWHERE_WARNING not in proc.stderr
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
@pytest.mark.parametrize("mode", ["unused_at_selection", "layerwise+unused"])
def test_a_weight_unused_on_one_rank_where_it_must_be_averaged_stops_with_its_name(tmp_path, mode):
    """At a selection step (and in layer-wise mode) averages are synchronous, in backward order:
    a weight one rank did not use stops the job with one line naming it, instead of pairing
    unrelated gradients or hanging."""
    proc = _launch(tmp_path, mode, timeout=120)
    assert proc.returncode != 0
    assert "Ranks disagree on the projected weight to average" in proc.stderr
    assert "model.layers.1.mlp." in proc.stderr


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_job_instead_of_hanging(tmp_path):
    proc = _launch(tmp_path, "dies", timeout=150)
    assert proc.returncode != 0
    assert not (tmp_path / "dies.json").exists()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])

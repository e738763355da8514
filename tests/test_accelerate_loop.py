"""An own accelerate loop (README, "An accelerate loop"): 2 processes == 1 process on the global
batch, and the order that would let ranks drift stops instead.

Each test runs this file as a script: under ``torch.distributed.run`` for 2 processes (CPU, gloo:
``Accelerator(cpu=True)`` makes accelerate's MULTI_CPU data parallelism, which wraps the model in
DDP), or plainly for 1. A worker writes what it saw to a JSON file, and rank 0 its trained weights
to a ``.pt`` file; the test compares them with a float64 single-process run on the global batches,
made here without accelerate.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS, GAP, RANK, BATCH, SEQ, MAX_NORM = 4, 2, 8, 8, 8, 0.5


def _model():
    from conftest import tiny_llama

    return tiny_llama(seed=0, vocab_size=64).double()


def _optimizer(model):
    from hf_grass import GrassAdamW, grassify

    groups = grassify(model, rank=RANK, update_proj_gap=GAP, selection="multinomial", seed=3)
    return GrassAdamW(groups, lr=1e-2)


def _batches():
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (STEPS * BATCH, SEQ), generator=g)


def _reference():
    """One process, no accelerate, the global batches; also the total gradient norm of each step
    computed here from every plain ``.grad`` and every compressed gradient."""
    import torch

    from hf_grass import clip_grad_norm_, projection_of

    model = _model()
    opt = _optimizer(model)
    norms, clipped = [], []
    for ids in _batches().split(BATCH):
        model(input_ids=ids, labels=ids).loss.backward()
        squares = torch.zeros((), dtype=torch.float64)
        for p in model.parameters():
            projection = projection_of(p)
            grad = p.grad if projection is None else projection.grad
            squares += grad.double().square().sum()
        norms.append(float(squares.sqrt()))
        clipped.append(float(clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
        opt.zero_grad()
    return model, norms, clipped


def _recipe(out: Path) -> None:
    """The README's accelerate loop, with what the test checks recorded."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from conftest import end_worker

    from hf_grass import clip_grad_norm_, prepare_data_parallel
    from hf_grass.distributed import dense_ddp_bytes

    # split_batches: each loader batch is the global batch, split across the processes.
    accelerator = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True)
    )
    model = raw = _model()
    opt = _optimizer(model)
    loader = torch.utils.data.DataLoader(_batches(), batch_size=BATCH)
    # The recipe: before prepare, then attach the wrapped model.
    grass_dp = prepare_data_parallel(model, opt)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    if grass_dp is not None:
        grass_dp.attach(model)
    norms = []
    for ids in loader:
        accelerator.backward(model(input_ids=ids, labels=ids).loss)
        norms.append(float(clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
        opt.zero_grad()

    result = {"world": accelerator.num_processes, "norms": norms, "wrapped": type(model).__name__}
    if grass_dp is not None:
        weights = list(grass_dp.projected.values())
        projected_bytes = sum(w.numel() * 8 for w in weights)
        state = opt.optimizer.state
        flat = torch.cat([p.detach().flatten() for p in raw.parameters()])
        everyone = accelerator.gather(flat[None])
        result |= {
            "identical_across_ranks": all(torch.equal(everyone[0], f) for f in everyone),
            "sent": dict(grass_dp.meter.total),
            # r x k per projected weight and its "had a gradient" flag, every step
            "expected_compressed": STEPS
            * sum(state[w]["exp_avg"].numel() * 8 + 8 for w in weights),
            "expected_selection": math.ceil(STEPS / GAP) * projected_bytes,
            "expected_ddp": STEPS * (dense_ddp_bytes(raw) - projected_bytes),
        }
    if accelerator.is_main_process:
        torch.save({n: p.detach() for n, p in raw.named_parameters()}, out / "recipe.pt")
        (out / "recipe.json").write_text(json.dumps(result))
    end_worker()


def _wrong_orders(out: Path) -> None:
    """Orders that would let ranks drift (or send dense zeros): each must be refused."""
    import torch
    from accelerate import Accelerator
    from conftest import end_worker
    from torch.nn.parallel import DistributedDataParallel

    from hf_grass.distributed import GrassDataParallel

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    ids = _batches()[:BATCH].chunk(2)[rank]
    result = {}

    def one_step(model, opt):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    # DDP that would leave .grad at None (find_unused_parameters, static_graph): stops in the
    # first forward, before any backward.
    for option in ("find_unused_parameters", "static_graph"):
        model = _model()
        opt = _optimizer(model)
        try:
            one_step(DistributedDataParallel(model, **{option: True}), opt)
        except RuntimeError as e:
            result[option] = str(e)
            result[option + "_no_gradient"] = all(p.grad is None for p in model.parameters())

    # GrassDataParallel after accelerator.prepare: on the wrapped model, or on the inner one.
    model = _model()
    opt = _optimizer(model)
    wrapped, opt = accelerator.prepare(model, opt)
    try:
        GrassDataParallel(wrapped, opt)
    except ValueError as e:
        result["on_wrapped"] = str(e)
    late = GrassDataParallel(model, opt)
    try:
        late.attach(wrapped)
    except ValueError as e:
        result["attach"] = str(e)
    try:
        one_step(wrapped, opt)
    except RuntimeError as e:
        result["late_step"] = str(e)
    late.remove()

    # The natural order without GrassDataParallel: stops in the first forward.
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = _optimizer(model)
    wrapped, opt = accelerator.prepare(model, opt)
    try:
        one_step(wrapped, opt)
    except RuntimeError as e:
        unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        result |= {"naive": str(e), "unchanged": unchanged}
        everyone = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(everyone, result)
        if rank == 0:
            (out / "wrong_orders.json").write_text(json.dumps(everyone))
        raise
    end_worker()


def _launch(tmp_path: Path, mode: str, processes: int, timeout: float = 120):
    from conftest import run_bounded

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    script = [__file__, str(tmp_path), mode]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes), *script]  # fmt: skip
    return run_bounded(cmd, env, timeout)


@pytest.fixture(scope="module")
def reference():
    model, norms, clipped = _reference()
    assert max(norms) > MAX_NORM  # the clip is active
    return {n: p.detach() for n, p in model.named_parameters()}, norms, clipped


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 1])
def test_accelerate_loop_equals_one_process_on_the_global_batch(tmp_path, reference, processes):
    """The README's loop on 1 and 2 processes: ranks identical, weights and clipped gradient
    norms those of one process on the global batches (float64), compressed traffic only."""
    import torch

    proc = _launch(tmp_path, "recipe", processes)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "own gradient" not in proc.stderr  # no warning about unaveraged selections
    result = json.loads((tmp_path / "recipe.json").read_text())
    ref_params, ref_norms, ref_clipped = reference
    assert result["world"] == processes
    # hf_grass.clip_grad_norm_ measured every plain and every compressed gradient, averaged.
    assert ref_clipped == pytest.approx(ref_norms, rel=1e-12)
    assert result["norms"] == pytest.approx(ref_norms, rel=1e-10)
    params = torch.load(tmp_path / "recipe.pt", weights_only=True)
    assert max(float((params[n] - p).abs().max()) for n, p in ref_params.items()) < 1e-10
    if processes == 2:
        assert result["wrapped"] == "DistributedDataParallel"
        assert result["identical_across_ranks"]
        sent = result["sent"]
        assert sent["compressed"] == result["expected_compressed"]
        assert sent["selection"] == result["expected_selection"]
        assert sent["ddp"] == result["expected_ddp"]  # DDP skipped the projected weights


@pytest.mark.slow
def test_accelerate_loop_without_grass_data_parallel_stops_before_ranks_drift(tmp_path):
    proc = _launch(tmp_path, "wrong_orders", 2)
    assert proc.returncode != 0
    refusal = "DistributedDataParallel runs a Grass layer (weight of shape"
    assert refusal in proc.stderr
    assert "prepare_data_parallel(model, optimizer) before wrapping the model" in proc.stderr
    for rank in json.loads((tmp_path / "wrong_orders.json").read_text()):
        assert rank["unchanged"]  # refused before the first update
        assert "whose compressed gradient it cannot average" in rank["naive"]
        for option in ("find_unused_parameters", "static_graph"):
            assert rank[option].startswith(refusal)
            assert rank[option + "_no_gradient"]  # refused in the forward, before a backward
        assert "already wrapped in DistributedDataParallel" in rank["on_wrapped"]
        assert "all-reduces the projected weight" in rank["attach"]
        assert "DDP built before GrassDataParallel" in rank["late_step"]


def test_readme_accelerate_recipe_builds_grass_data_parallel_before_prepare():
    """The README's recipe is the loop tested above: prepare_data_parallel before
    accelerator.prepare, attach after, and Grass's clip."""
    import re

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    recipe = next(b for b in blocks if "accelerator.prepare(" in b)
    order = ["prepare_data_parallel(model, opt)", "accelerator.prepare(", ".attach(model)",
             "clip_grad_norm_(model.parameters()", "opt.step()"]  # fmt: skip
    positions = [recipe.find(call) for call in order]
    assert -1 not in positions and positions == sorted(positions), recipe
    assert "accelerator.clip_grad_norm_(" not in recipe


if __name__ == "__main__":
    {"recipe": _recipe, "wrong_orders": _wrong_orders}[sys.argv[2]](Path(sys.argv[1]))

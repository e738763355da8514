"""The bucket shared by data parallelism and layer-wise updates: where it splits, when it ends."""

from __future__ import annotations

import bisect
import itertools

import pytest
import torch
import torch.distributed as dist
from conftest import FailingBackward, failing_backward
from torch import nn

from hf_grass.bucket import Bucket


def _random_sizes(seed: int, n: int = 40) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 100, (n,), generator=gen).tolist()


def _split(sizes: list[int], cap: int) -> list[list[int]]:
    """Indices of the buckets of ``sizes``, the bucket's way: items in order, flushed when full."""
    flushed: list[list[int]] = []
    bucket = Bucket(cap, flushed.append)
    for i, nbytes in enumerate(sizes):
        bucket.add(i, nbytes)
    bucket.flush()
    return flushed


def _split_by_prefix_sums(sizes: list[int], cap: int) -> list[list[int]]:
    """The same from prefix sums: a bucket starting at ``i`` ends at the first ``j`` where
    ``sizes[i] + ... + sizes[j] >= cap`` (or at the last item)."""
    prefix = list(itertools.accumulate(sizes, initial=0))
    buckets, start = [], 0
    while start < len(sizes):
        end = min(bisect.bisect_left(prefix, prefix[start] + cap, lo=start + 1), len(sizes))
        buckets.append(list(range(start, end)))
        start = end
    return buckets


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cap", [0, 1, 50, 150, 1000, 10**6])
def test_flush_boundaries_equal_the_prefix_sum_split(seed, cap):
    sizes = _random_sizes(seed)
    assert _split(sizes, cap) == _split_by_prefix_sums(sizes, cap)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cap", [1, 50, 150, 1000])
def test_flush_boundaries_equal_ddps_bucket_assignment(seed, cap):
    assign = getattr(dist, "_compute_bucket_assignment_by_size", None)
    if assign is None:
        pytest.skip("this torch has no DDP bucket assignment to compare with")
    sizes = _random_sizes(seed)
    tensors = [torch.empty(n, dtype=torch.uint8) for n in sizes]  # n bytes each
    ddp, _ = assign(tensors, [cap], [False] * len(sizes), list(range(len(sizes))))
    assert _split(sizes, cap) == ddp


def test_an_item_of_the_cap_or_more_goes_alone_into_an_empty_bucket():
    flushed = []
    bucket = Bucket(50, flushed.append)
    bucket.add("big", 60)
    assert flushed == [["big"]] and bucket.items == []  # at once, not at the next add
    for item, nbytes in [("a", 20), ("b", 30), ("exact", 50), ("c", 10)]:
        bucket.add(item, nbytes)
    assert flushed == [["big"], ["a", "b"], ["exact"]] and bucket.items == ["c"]
    bucket.add("big2", 70)  # a bucket holding less than the cap takes it, and closes (DDP's rule)
    assert flushed[-1] == ["c", "big2"] and bucket.nbytes == 0


def test_cap_zero_flushes_every_item_alone():
    assert _split([5, 1, 7], 0) == [[0], [1], [2]]


def test_flush_of_an_empty_bucket_calls_nothing():
    flushed = []
    Bucket(10, flushed.append).flush()
    assert flushed == []


@pytest.mark.parametrize("adds_per_backward", [0, 1, 5])
def test_end_of_backward_runs_once_per_backward_and_flushes_the_rest(adds_per_backward):
    """Every parameter's hook asks for the end-of-backward flush and (but for 0) adds items;
    the end runs once per backward, after every hook, and hands on the items left."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    flushed: list[list[str]] = []
    ends: list[int] = []
    hooks_run: list[str] = []
    bucket = Bucket(4 * 4, flushed.append, lambda: ends.append(len(hooks_run)))  # 4 items

    def hook(name: str):
        def run(p: torch.Tensor) -> None:
            hooks_run.append(name)
            for i in range(adds_per_backward):
                bucket.add(f"{name}/{i}", 4)
            bucket.flush_after_backward()

        return run

    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(hook(name))
    n_params = len(list(model.parameters()))
    for backward in range(1, 4):
        flushed.clear()
        model(torch.randn(5, 4)).square().sum().backward()
        assert len(ends) == backward  # once per backward, also when nothing was added
        assert ends[-1] == backward * n_params  # after every hook of the backward
        added = [f"{name}/{i}" for name in hooks_run[-n_params:] for i in range(adds_per_backward)]
        assert [item for b in flushed for item in b] == added  # each once, the rest at the end
        assert all(b for b in flushed) and bucket.items == [] and bucket.nbytes == 0
        # 6 or 30 items: full buckets of 4 during the backward, the 2 left at its end
        assert [len(b) for b in flushed] == [4] * (len(added) // 4) + [2] * (len(added) > 0)


def _hooked_blocks(bucket: Bucket, checkpointing: bool):
    """Three blocks, each optionally checkpointed with reentrant recomputation; every weight's
    hook adds it to ``bucket`` (4 bytes) and asks for the end-of-backward flush. The middle of
    the chain is a :class:`FailingBackward`, so that an armed backward fails after some hooks ran."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3))
    hooks_run: list[str] = []
    for name, p in blocks.named_parameters():

        def run(p: torch.Tensor, name: str = name) -> None:
            hooks_run.append(name)
            bucket.add(name, 4)
            bucket.flush_after_backward()

        p.register_post_accumulate_grad_hook(run)

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.requires_grad_()
        for i, block in enumerate(blocks):
            x = checkpoint(block, x, use_reentrant=True) if checkpointing else block(x)
            if i == 0:
                x = FailingBackward.apply(x)
        return x.square().sum()

    return forward, hooks_run


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_end_runs_once_after_every_nested_backward_of_reentrant_checkpointing(checkpointing):
    """Reentrant checkpointing runs each block's backward as a backward of its own inside the
    outer one: the end must wait for the outer one (it would otherwise run after the first
    block, before the other blocks' hooks)."""
    flushed: list[list[str]] = []
    ends: list[int] = []
    hooks_run: list[str] = []
    bucket = Bucket(10**6, flushed.append, lambda: ends.append(len(hooks_run)))
    forward, hooks_run = _hooked_blocks(bucket, checkpointing)
    for backward in range(1, 3):
        flushed.clear()
        forward(torch.randn(2, 4)).backward()
        assert len(hooks_run) == 6 * backward
        assert ends == [6 * b for b in range(1, backward + 1)]  # once, after all 6 hooks
        assert flushed == [hooks_run[-6:]]  # everything at the end, in one bucket


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_backward_that_raises_midway_is_dropped_and_the_next_one_ends_normally(checkpointing):
    """A backward that raises after some hooks ran (the training loop catches an out-of-memory
    error and retries) never reaches its end: its items are dropped, ``on_backward_failed`` is
    told, and the next backward is flushed and ended as if the failed one never happened."""
    flushed: list[list[str]] = []
    ends, failures = [], []
    bucket = Bucket(10**6, flushed.append, lambda: ends.append(1), lambda: failures.append(1))
    forward, hooks_run = _hooked_blocks(bucket, checkpointing)
    with failing_backward(), pytest.raises(RuntimeError, match="simulated"):
        forward(torch.randn(2, 4)).backward()
    assert len(hooks_run) == 4 and flushed == [] and ends == []  # blocks 2 and 1 ran their hooks
    assert failures == [1] and bucket.items == [] and bucket.nbytes == 0
    forward(torch.randn(2, 4)).backward()
    assert flushed == [hooks_run[4:]] and len(flushed[0]) == 6 and ends == [1]

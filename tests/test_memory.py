"""The memory planner: its byte counts equal what a real CPU step allocates; the CLI."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import method_optimizer, tiny_llama

from hf_grass import enable_layerwise, projection_of
from hf_grass.errors import UsageError
from hf_grass.memory import (
    METHODS,
    PRECISIONS,
    RNG_STATE_BYTES,
    architecture,
    fit_budget,
    layer_linears,
    linear_input_bytes,
    parse_size,
    plan_memory,
)
from hf_grass.models import llama_config
from hf_grass.recompute import is_norm, recompute_norms
from hf_grass.report import gradient_bytes, optimizer_state_bytes, tensor_bytes

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "memory.py"
RANK = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.float32}


def _optimizer(model, method: str, **grass):
    return method_optimizer(model, method, RANK, **grass)


def _model(method: str, dtype: str, **overrides):
    model = tiny_llama(**overrides).to(DTYPES[dtype])
    if method == "lora":
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(
            r=RANK, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]
        )
        model = peft.get_peft_model(model, config)
    return model


def _measure(model, optimizer, dtype: str, layerwise: bool = False, steps: int = 1):
    """(weights, peak live gradients, optimizer state) bytes of ``steps`` training steps.

    Layer-wise: the gradients are measured in every grad-ready hook, before the update frees
    them (the probes are registered first, so they run first)."""
    params = list(model.parameters())
    peak = 0

    def probe(_):
        nonlocal peak
        peak = max(peak, gradient_bytes(params))

    if layerwise:
        for p in params:
            p.register_post_accumulate_grad_hook(probe)
            projection = projection_of(p)
            if projection is not None:
                projection.grad_ready_anchor().register_post_accumulate_grad_hook(probe)
        enable_layerwise(optimizer, model)
    autocast = (
        torch.autocast("cpu", torch.bfloat16) if dtype == "bf16-mixed" else contextlib.nullcontext()
    )
    torch.manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 512, (2, 16))
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        probe(None)
        optimizer.step()
        optimizer.zero_grad()
    return tensor_bytes(params), peak, optimizer_state_bytes(optimizer)


def _planned(method: str, dtype: str, **kwargs) -> tuple[int, int, int]:
    overrides = kwargs.pop("overrides", {})
    parts = plan_memory(llama_config("tiny", **overrides), method, RANK, dtype, **kwargs).parts
    return parts["weights"], parts["gradients"], parts["optimizer_state"] + parts["indices"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["adamw", "adamw-8bit", "galore", "lora", "grass"])
def test_tensor_bytes_equal_a_real_step(method, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _model(method, dtype)
        real = _measure(model, _optimizer(model, method), dtype)
    assert real == _planned(method, dtype)


@pytest.mark.parametrize(
    "rule, state_format",
    [
        ("lion", "plain"),
        ("sign", "plain"),
        ("adam", "stochastic_bf16"),
        ("lion", "stochastic_bf16"),
    ],
)
def test_the_plan_counts_the_state_of_the_update_rule_in_its_format(rule, state_format):
    """Grass with another rule or state format: the planned optimizer state (and indices) equal
    the bytes the optimizer holds after a real step."""
    from hf_grass import GrassOptimizer, grassify

    model = _model("grass", "fp32")
    groups = grassify(model, rank=RANK)
    optimizer = GrassOptimizer(groups, lr=1e-3, update_rule=rule, state_format=state_format)
    real = _measure(model, optimizer, "fp32")
    plan = _planned("grass", "fp32", update_rule=rule, state_format=state_format)
    assert real == plan


def _walk_state(state: dict) -> tuple[int, int]:
    """(tensor bytes, ``bytes`` lengths) of an optimizer's per-parameter state, by a plain walk
    of its values (GrassAdamW keeps flat dicts of tensors, scalars and bytes)."""
    tensors = host = 0
    for per_param in state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                tensors += value.nbytes
            elif isinstance(value, bytes):
                host += len(value)
    return tensors, host


def test_grass_state_bytes_count_the_rng_state():
    """GrassAdamW keeps each projected weight's selection RNG state as ``bytes`` (about 5 KB):
    ``optimizer_state_bytes`` counts it with the tensors, and the planner plans it."""
    model = _model("grass", "fp32")
    optimizer = _optimizer(model, "grass")
    _measure(model, optimizer, "fp32")
    tensors, host = _walk_state(optimizer.state)
    projected = [p for p in model.parameters() if projection_of(p) is not None]
    rng = [optimizer.state[p]["rng"] for p in projected]
    assert all(isinstance(r, bytes) for r in rng)
    assert host == sum(len(r) for r in rng) == len(projected) * RNG_STATE_BYTES > 0
    assert optimizer_state_bytes(optimizer) == tensors + host
    # the plan's share of the RNG states: the same plan less RNG_STATE_BYTES per matrix is
    # what the tensors alone come to
    assert _planned("grass", "fp32")[2] - len(projected) * RNG_STATE_BYTES == tensors


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_galore_layerwise_per_parameter_optimizers_match_the_plan(dtype):
    """Hugging Face's layer-wise GaLore (one GaLoreAdamW per parameter, stepped and zeroed from
    its grad-ready hook) keeps what ``plan_memory("galore", layerwise=True)`` counts: GaLore's
    state, and one parameter's dense gradient alive at a time."""
    galore = pytest.importorskip("galore_torch")
    model = _model("galore", dtype)
    linear = {
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n != "lm_head"
    }
    projected = dict(rank=RANK, update_proj_gap=200, scale=0.25, proj_type="std")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizers = {
            p: galore.GaLoreAdamW([{"params": [p], **(projected if n in linear else {})}])
            for n, p in model.named_parameters()
        }
    params = list(model.parameters())
    peak = 0

    def hook(p):
        nonlocal peak
        peak = max(peak, gradient_bytes(params))
        optimizers[p].step()
        optimizers[p].zero_grad(set_to_none=True)

    for p in params:
        p.register_post_accumulate_grad_hook(hook)
    torch.manual_seed(1)
    for _ in range(2):
        ids = torch.randint(0, 512, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        assert gradient_bytes(params) == 0
    state = sum(optimizer_state_bytes(o) for o in optimizers.values())
    assert (tensor_bytes(params), peak, state) == _planned("galore", dtype, layerwise=True)


@pytest.mark.parametrize("method", ["adamw", "grass"])
def test_bf16_mixed_keeps_fp32_weights_gradients_and_state(method):
    model = _model(method, "bf16-mixed")
    real = _measure(model, _optimizer(model, method), "bf16-mixed")
    assert real == _planned(method, "bf16-mixed")
    assert real == _planned(method, "fp32")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "tied, embeddings, lm_head",
    [(False, False, False), (False, True, False), (False, False, True), (True, True, True)],
)
def test_grass_layerwise_peak_gradient_and_targets(dtype, tied, embeddings, lm_head):
    overrides = {"tie_word_embeddings": True} if tied else {}
    for layerwise in (False, True):
        model = _model("grass", dtype, **overrides)
        optimizer = _optimizer(model, "grass", embeddings=embeddings, lm_head=lm_head)
        real = _measure(model, optimizer, dtype, layerwise=layerwise, steps=2)
        planned = _planned(
            "grass", dtype, layerwise=layerwise, embeddings=embeddings, lm_head=lm_head,
            overrides=overrides,
        )  # fmt: skip
        assert real == planned, (layerwise, real, planned)


def test_activations_scale_with_batch_and_shrink_with_checkpointing():
    def activations(**kwargs):
        return plan_memory("1b", "adamw", dtype="bf16", **kwargs).parts["activations"]

    one, two = activations(batch_size=1), activations(batch_size=2)
    assert two == 2 * one
    assert activations(activation_checkpointing=True) < one / 4
    assert activations(attention="eager", seq_len=2048) > activations(seq_len=2048)
    assert activations(seq_len=512) == 2 * activations(seq_len=256)


def test_plan_relations():
    grass = plan_memory("llama-13b", "grass", 256, "bf16", layerwise=True)
    adamw = plan_memory("13b", "adamw", dtype="bf16")
    assert grass.parts["weights"] == adamw.parts["weights"] == 2 * grass.num_parameters
    assert grass.parts["optimizer_state"] < adamw.parts["optimizer_state"] / 8
    assert grass.total_bytes == sum(grass.parts.values()) == grass.as_dict()["total_bytes"]
    mixed = plan_memory("1b", "adamw", dtype="bf16-mixed").parts
    assert mixed["temporaries"] > plan_memory("1b", "adamw", dtype="fp32").parts["temporaries"]


def test_fit_budget_answers_are_consistent():
    kwargs = dict(model="1b", method="grass", rank=512, dtype="bf16", seq_len=256)
    budget = parse_size("12GiB")
    answer = fit_budget(budget, **kwargs)
    batch = answer["max_batch_size"]
    assert answer["fits"] and batch > 1
    assert plan_memory(**{**kwargs, "batch_size": batch}).peak_bytes <= budget
    assert plan_memory(**{**kwargs, "batch_size": batch + 1}).peak_bytes > budget
    rank = fit_budget(budget, **{**kwargs, "batch_size": batch})["max_rank"]
    assert plan_memory(**{**kwargs, "batch_size": batch, "rank": rank}).peak_bytes <= budget
    plan = plan_memory(**kwargs)
    assert fit_budget(parse_size("1GiB"), **kwargs) == {
        "budget_bytes": 2**30, "fits": False, "total_bytes": plan.total_bytes,
        "peak_bytes": plan.peak_bytes, "max_batch_size": None, "min_rank": None, "max_rank": None,
    }  # fmt: skip


def test_peak_counts_activations_and_gradients_in_turn():
    """The peak holds what lives all step, plus the larger of activations and gradients."""
    for method in ("adamw", "grass"):
        plan = plan_memory("1b", method, 512, "bf16", batch_size=8)
        p = plan.parts
        assert plan.peak_bytes == plan.total_bytes - min(p["activations"], p["gradients"])
    # Pure-bf16 AdamW on LLaMA-1B, 8 x 256 tokens: activations (4.7 GiB) outweigh gradients.
    adamw = plan_memory("1b", "adamw", dtype="bf16", batch_size=8)
    assert adamw.parts["activations"] > adamw.parts["gradients"]


def _saved_bytes(model, ids, dtype: str) -> tuple[torch.Tensor, int]:
    """One forward's loss and the bytes of the distinct non-parameter storages it keeps for the
    backward: what autograd packs, plus the inputs of recomputed norms, which their checkpoint
    holds itself (what it saves goes through its own hooks, not this one)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()  # alive until the backward: no reuse

    def pack(t):
        keep(t)
        return t

    def norm_input(module, args):
        if "forward" in vars(module):  # replaced by recompute_norms
            keep(args[0])

    hooks = [m.register_forward_pre_hook(norm_input) for m in model.modules() if is_norm(m)]
    autocast = (
        torch.autocast("cpu", torch.bfloat16) if dtype == "bf16-mixed" else contextlib.nullcontext()
    )
    try:
        with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
    finally:
        for hook in hooks:
            hook.remove()
    return loss, sum(kept.values())


@pytest.mark.parametrize("dtype", ["fp32", "bf16-mixed", "bf16"])
@pytest.mark.parametrize(
    "overrides", [dict(num_key_value_heads=2), dict(num_key_value_heads=2, head_dim=8)]
)
def test_recompute_matches_what_real_steps_keep(dtype, overrides):
    """``recompute`` against real steps: a plain loop's selection step (every linear keeps its
    whole input, norms their full set), an ordinary step (cols-side layers keep ``X[:, cols]``)
    and an ordinary step with the norms recomputed, as GrassTrainer runs them.

    The planner's attention and loss terms model the CUDA kernels (sdpa's flash kernel), not
    the CPU ones, so the totals are compared by their differences, which only the linears and
    the norms make: these must be exact. Config: k/v (32 x 64) and down (64 x 128) are cols
    side; with head_dim 8, q (32 x 64) too and o reads a 32-wide input.
    """
    model = _model("grass", dtype, **overrides)
    optimizer = _optimizer(model, "grass")
    ids = torch.randint(0, 512, (2, 16))
    measured = []
    for step in range(3):  # step 0 selects rows; 1 and 2 are ordinary (update_proj_gap 200)
        if step == 2:
            recompute_norms(model)
        loss, nbytes = _saved_bytes(model, ids, dtype)
        measured.append(nbytes)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    selection, ordinary, recomputed = measured

    config = llama_config("tiny", **overrides)
    arch = architecture(config, False, False)
    # the planner's layer linears are the model's: same shapes, same sides as the engine's
    modules = dict(model.named_modules())
    for linear in (linear for group in layer_linears(arch) for linear in group):
        name = next(n for n in modules if ".layers.0." in n and n.endswith(f".{linear.name}"))
        weight = modules[name].weight
        assert (tuple(weight.shape), projection_of(weight).side) == (linear.shape, linear.side)
        assert linear.projected
    assert {ln.name for g in layer_linears(arch) for ln in g if ln.side == "cols"} >= {
        "k_proj", "v_proj", "down_proj"
    }  # fmt: skip

    tokens = ids.numel()
    lin = [linear_input_bytes(arch, RANK, PRECISIONS[dtype], tokens, s) for s in (False, True)]
    assert selection - ordinary == arch.layers * (lin[0] - lin[1]) > 0

    def activations(recompute: bool) -> int:
        plan = plan_memory(
            config, "grass", RANK, dtype, batch_size=2, seq_len=16, recompute=recompute
        )
        return plan.parts["activations"]

    assert selection - recomputed == activations(False) - activations(True)


def test_recompute_relations():
    for model, dtype in (("tiny", "fp32"), ("1b", "bf16"), ("7b", "bf16-mixed")):
        for method in METHODS:
            on, off = (
                plan_memory(model, method, 64, dtype, batch_size=2, recompute=r)
                for r in (True, False)
            )
            if method == "grass":
                assert on.parts["activations"] < off.parts["activations"]
                del on.parts["activations"], off.parts["activations"]
            assert on.parts == off.parts, (model, method)
    # With checkpointing the peak is the selection step, whose one recomputed layer keeps its
    # whole inputs: the rank does not change the activations there.
    ckpt = dict(model="1b", dtype="bf16", activation_checkpointing=True)
    assert (
        plan_memory(rank=64, **ckpt).parts["activations"]
        == plan_memory(rank=1024, **ckpt).parts["activations"]
        < plan_memory(rank=64, recompute=False, **ckpt).parts["activations"]
    )
    # Without it, the ordinary step's slices grow with the rank.
    plain = {**ckpt, "activation_checkpointing": False}
    low, high = (plan_memory(rank=r, **plain).parts["activations"] for r in (64, 1024))
    assert low < high


@pytest.mark.parametrize(
    "dtype, overrides, width",
    [
        # down (64 x 128) is the only cols-side linear keeping a slice: k/v (32 x 64) read the
        # input q (rows side) keeps whole; rank 128 slices all of down's input
        ("fp32", dict(num_key_value_heads=2), "intermediate_size"),
        # k, v (32 x 64), gate, up (32 x 64) are cols side, each with its own bf16 copy of a
        # 64-wide input; rank 64 slices all of it
        ("bf16-mixed", dict(num_key_value_heads=2, intermediate_size=32), "hidden_size"),
    ],
)
def test_slicing_every_column_keeps_the_whole_input(dtype, overrides, width):
    config = llama_config("tiny", **overrides)
    arch = architecture(config, False, False)
    rank, prec = getattr(config, width), PRECISIONS[dtype]
    sliced = linear_input_bytes(arch, rank, prec, 32, sliced=True)
    assert sliced == linear_input_bytes(arch, rank, prec, 32, sliced=False)
    assert linear_input_bytes(arch, rank // 2, prec, 32, sliced=True) < sliced


@pytest.mark.parametrize(
    "text, expected",
    [("40GiB", 40 * 2**30), ("80gb", 80 * 10**9), ("1.5 MiB", 3 * 2**19), ("512", 512),
     ("2KB", 2000), ("7 b", 7), (".5KiB", 512)],
)  # fmt: skip
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "kwargs",
    [dict(model="70b"), dict(model="1b", method="sgd"), dict(model="1b", rank=4096),
     dict(model="1b", method="galore", rank=4096), dict(model="1b", dtype="fp16"),
     dict(model="1b", method="adamw", embeddings=True), dict(model="1b", batch_size=0)],
)  # fmt: skip
def test_usage_errors(kwargs):
    with pytest.raises(UsageError):
        plan_memory(**kwargs)
    with pytest.raises(UsageError):
        parse_size("40 gigs")


def test_config_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(llama_config("tiny").to_json_string())
    assert plan_memory(str(path), rank=8).parts == plan_memory("tiny", rank=8).parts


def test_cli_json_and_table(capsys):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import memory as script
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert script.run(["--preset", "tiny", "--method", "adamw", "--budget", "1MiB"]) == 0
    table = capsys.readouterr().out
    assert "optimizer_state" in table and "total" in table and "does not fit" in table
    assert script.run(["--preset", "13b", "--rank", "99999", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memory.py: error: rank 99999") and err.count("\n") == 1
    for flags, recompute in (([], True), (["--no_recompute"], False)):
        assert script.run(["--preset", "tiny", "--rank", "8", "--json", *flags]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result == plan_memory("tiny", rank=8, recompute=recompute).as_dict()
    assert result["recompute"] is False


def test_cli_command():
    cmd = [sys.executable, str(SCRIPT), "--preset", "llama-13b", "--method", "grass", "--rank",
           "256", "--dtype", "bf16", "--layerwise", "--activation_checkpointing", "--batch_size",
           "1", "--seq_len", "256", "--json", "--budget", "40GiB"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout)
    parts = [
        k
        for k in result
        if k.endswith("_bytes") and k not in ("total_bytes", "peak_bytes", "budget_bytes")
    ]
    assert len(parts) == 6
    assert result["total_bytes"] == sum(result[k] for k in parts)
    assert result["fits"] and result["max_batch_size"] >= 1
    del result["budget_bytes"], result["fits"], result["max_batch_size"]
    del result["min_rank"], result["max_rank"]
    plan = plan_memory("13b", "grass", 256, "bf16", layerwise=True, activation_checkpointing=True)
    assert result == {**plan.as_dict(), "model": "llama-13b"}

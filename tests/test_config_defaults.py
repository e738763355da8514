"""GrassConfig is the only home of every Grass setting's default and of its resume policy.

Every public function or class of ``hf_grass`` that takes a Grass setting as an argument, the
``grass_*`` Trainer arguments and the scripts' parsers either leave it unset (``None``: GrassConfig's
default) or default it to GrassConfig's value, read here from GrassConfig; the resume policy of
every setting comes from its field's metadata.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import pkgutil

import pytest
import torch
from conftest import load_script, tiny_llama
from torch import nn

import hf_grass
from hf_grass import GrassAdamW, GrassConfig, enable_layerwise, grass_param_groups
from hf_grass.config import FIXED, FIXED_ON_RESUME, RESUME_POLICIES, TAKES_NEW_ON_RESUME
from hf_grass.optim import _RESUME_TAKES_NEW
from hf_grass.trainer import GrassTrainer, GrassTrainingArguments

FIELDS = {f.name: f for f in dataclasses.fields(GrassConfig)}
# Arguments named otherwise than the setting they stand for.
ALIASES = {
    "bucket_mb": ("layerwise_bucket_mb",),  # enable_layerwise, LayerwiseHandle
    "recompute": ("recompute_selection", "recompute_norms"),  # the memory planner: both
}
# Arguments that share a setting's name but mean something else.
OTHER_MEANINGS = {
    "load_alpaca_eval.seed": "the seed of the held-out split",
    "GrassTrainingArguments.__init__.seed": "TrainingArguments' --seed",
}
# The Grass keys of GrassAdamW's param groups.
GROUP_KEYS = (*GrassConfig.GROUP_KEYS, *GrassConfig.OPTIMIZER_KEYS)


def default_of(name: str):
    """GrassConfig's default of ``name``, read from the dataclass field."""
    f = FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _signatures():
    """(qualified name, signature) of every public function, class and public method defined in
    a module of the package."""
    for info in pkgutil.iter_modules(hf_grass.__path__):
        module = importlib.import_module(f"hf_grass.{info.name}")
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                yield obj.__qualname__, inspect.signature(obj)
            elif inspect.isclass(obj) and obj is not GrassConfig:
                methods = {"__init__": obj.__init__} | {
                    k: v for k, v in vars(obj).items() if inspect.isfunction(v) and k[0] != "_"
                }
                for method in methods.values():
                    if inspect.isfunction(method):
                        yield f"{obj.__name__}.{method.__name__}", inspect.signature(method)


def _grass_defaults():
    """(where, setting, default) for every defaulted argument that stands for a Grass setting."""
    found = []
    for qualname, signature in _signatures():
        for param in signature.parameters.values():
            settings = ALIASES.get(param.name, (param.name,) if param.name in FIELDS else ())
            where = f"{qualname}.{param.name}"
            if not settings or param.default is inspect.Parameter.empty:
                continue
            if where not in OTHER_MEANINGS:
                found += [(where, setting, param.default) for setting in settings]
    return found


GRASS_DEFAULTS = _grass_defaults()


def test_the_walk_finds_the_public_functions_that_take_grass_settings():
    where = {w for w, _, _ in GRASS_DEFAULTS}
    assert {
        "grassify.target_modules",
        "grass_param_groups.lm_head",
        "GrassDataParallel.__init__.bucket_cap_mb",
        "GrassDataParallel.__init__.layerwise",
        "enable_layerwise.bucket_mb",
        "GrassAdamW.__init__.stochastic_rounding",
        "plan_memory.rank",
    } <= where


@pytest.mark.parametrize(
    "where,setting,default", GRASS_DEFAULTS, ids=[w for w, _, _ in GRASS_DEFAULTS]
)
def test_signature_defaults_are_unset_or_grassconfigs(where, setting, default):
    """``None`` means GrassConfig's default; any other default must be GrassConfig's value."""
    assert default is None or default == default_of(setting), (
        f"{where} defaults to {default!r}, GrassConfig.{setting} to {default_of(setting)!r}: "
        "default it to None and resolve it with hf_grass.config.resolve_option"
    )


def test_unset_arguments_resolve_to_grassconfigs_default():
    p = nn.Parameter(torch.zeros(4, 4))
    handle = enable_layerwise(GrassAdamW([p]))
    assert handle.bucket_bytes == int(default_of("layerwise_bucket_mb") * 2**20)
    handle.remove()


def _grass_values(args) -> dict:
    return {name: getattr(args, f"grass_{name}") for name in FIELDS}


def test_trainer_arguments_default_to_grassconfig(tmp_path):
    arguments = {f.name: f for f in dataclasses.fields(GrassTrainingArguments)}
    assert {f"grass_{name}" for name in FIELDS} <= set(arguments)
    for name in FIELDS:
        default = arguments[f"grass_{name}"].default
        # seed and target_modules: unset, resolved from --seed / --optim_target_modules
        assert default == default_of(name) or (
            default is None and name in ("seed", "target_modules")
        )
    config = GrassTrainingArguments(str(tmp_path), optim="grass", use_cpu=True).grass_config()
    assert dataclasses.replace(config, seed=default_of("seed")) == GrassConfig()


@pytest.mark.parametrize("script", ["finetune", "pretrain"])
def test_script_parsers_default_to_grassconfig(script):
    """Without flags the scripts run GrassConfig's defaults, except the overrides they name."""
    module = load_script(script)
    parsed = module.parse_args([])
    args = parsed[-1]
    overrides = getattr(module, "GRASS_PRETRAIN_DEFAULTS", {})
    for name, value in _grass_values(args).items():
        if f"grass_{name}" in overrides:
            assert value == overrides[f"grass_{name}"] != default_of(name), name
        elif name == "seed":
            assert value is None  # --seed
        elif name == "target_modules":
            assert value is None and args.grass_targets() == default_of(name)
        else:
            assert value == default_of(name), name


def test_memory_script_leaves_the_plans_defaults_to_plan_memory():
    script = load_script("memory")
    args = script.build_parser().parse_args(["--preset", "tiny"])
    assert not set(vars(args)) & set(script.PLAN_ARGUMENTS)
    args = script.build_parser().parse_args(["--preset", "tiny", "--rank", "8", "--no_recompute"])
    assert args.rank == 8 and args.recompute is False


# ---- resume policy ----------------------------------------------------------------------------


def test_every_setting_declares_its_resume_policy():
    for name, f in FIELDS.items():
        assert f.metadata.get("resume") in RESUME_POLICIES, name
    assert FIXED_ON_RESUME == tuple(n for n, f in FIELDS.items() if f.metadata["resume"] == FIXED)
    assert set(FIXED_ON_RESUME).isdisjoint(TAKES_NEW_ON_RESUME)
    assert set(FIXED_ON_RESUME) | set(TAKES_NEW_ON_RESUME) == set(FIELDS)


def test_fixed_and_take_new_keys_partition_the_grass_group_keys():
    take_new = [k for k in _RESUME_TAKES_NEW if k in FIELDS]
    fixed = [k for k in GROUP_KEYS if k in FIXED_ON_RESUME]
    assert set(take_new).isdisjoint(fixed)
    assert sorted(take_new + fixed) == sorted(GROUP_KEYS)
    assert set(take_new) <= set(TAKES_NEW_ON_RESUME)


def test_group_keys_list_every_grass_key_of_an_optimizer_group():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    opt = GrassAdamW(grass_param_groups(model, rank=2))
    keys = {k for g in opt.param_groups for k in g if k in FIELDS}
    assert keys == set(GROUP_KEYS)


# A valid value other than the default for each Grass group key.
CHANGED = {
    "rank": 3,
    "update_proj_gap": 7,
    "scale": 0.5,
    "selection": "uniform",
    "reselect_state": "reset",
    "proj_side": "cols",
    "seed": 5,
    "state_dtype": torch.float64,
    "stochastic_rounding": True,
    "implementation": "reference",
    "update_rule": "lion",
    "residual_update": "sign",
    "state_format": "stochastic_bf16",
}


@pytest.mark.parametrize("key", GROUP_KEYS)
def test_resume_keeps_or_refuses_each_group_key_as_its_metadata_says(key):
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(8, 6, generator=gen)
    grad = torch.randn(8, 6, generator=gen)

    def optimizer(**options):
        grass = {k: v for k, v in options.items() if k in GrassConfig.GROUP_KEYS}
        others = {k: v for k, v in options.items() if k not in GrassConfig.GROUP_KEYS}
        p = nn.Parameter(weight.clone())
        return p, GrassAdamW([{"params": [p], "rank": 2, **grass}], lr=1e-2, **others)

    p, saved = optimizer()
    p.grad = grad.clone()
    saved.step()
    buf = io.BytesIO()
    torch.save(saved.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    _, resumed = optimizer(**{key: CHANGED[key]})
    if key in FIXED_ON_RESUME:
        with pytest.raises(ValueError, match=rf"{key}: checkpoint"):
            resumed.load_state_dict(state)
    else:
        resumed.load_state_dict(state)
        assert resumed.param_groups[0][key] == CHANGED[key]


# ---- --grass_bucket_cap_mb reaches the data-parallel buckets ----------------------------------


@pytest.mark.parametrize("flag", [None, "0.002"])
def test_grass_bucket_cap_mb_flag_reaches_the_buckets(
    tmp_path, monkeypatch, one_process_group, flag
):
    from transformers import HfArgumentParser

    argv = ["--output_dir", str(tmp_path), "--optim", "grass", "--grass_rank", "4"]
    argv += ["--use_cpu", "true"]
    argv += [] if flag is None else ["--grass_bucket_cap_mb", flag]
    (args,) = HfArgumentParser(GrassTrainingArguments).parse_args_into_dataclasses(argv)
    cap_mb = default_of("bucket_cap_mb") if flag is None else float(flag)
    assert args.grass_bucket_cap_mb == cap_mb
    trainer = GrassTrainer(model=tiny_llama(), args=args)
    # The Trainer builds GrassDataParallel when several processes train: one that says so.
    monkeypatch.setattr(type(args), "world_size", property(lambda self: 2))
    one_process_group()
    trainer.create_optimizer()
    grass_dp = trainer._grass_dp
    cap = int(cap_mb * 2**20)
    assert grass_dp.bucket_cap_bytes == cap
    buckets = grass_dp._buckets
    assert sum(len(b.projections) for b in buckets) == len(grass_dp.projected) > 1

    def nbytes(projection) -> int:  # its compressed gradient's: rank x the unselected dimension
        k = projection.weight.shape[1 if projection.side == "rows" else 0]
        return projection.rank * k * projection.weight.element_size()

    for i, bucket in enumerate(buckets):  # all one dtype: a bucket closes once it holds the cap
        sizes = [nbytes(q) for q in bucket.projections]
        assert sum(sizes) - sizes[-1] < cap, i
        assert i == len(buckets) - 1 or sum(sizes) >= cap, i
    assert (len(buckets) > 1) == (flag is not None)  # 25 MB holds the tiny model's gradients

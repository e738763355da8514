"""Defects that gave silently wrong results or crashes off the happy path, one test each."""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import FailingBackward, failing_backward, tiny_llama
from datasets import Dataset
from torch import nn

from hf_grass import GrassAdamW, clip_grad_norm_, grass_param_groups, grassify, projection_of
from hf_grass.cli import resolve_resume
from hf_grass.errors import UsageError
from hf_grass.targets import match_target_modules
from hf_grass.trainer import GrassTrainer, GrassTrainingArguments

LEGACY = Path(__file__).parent / "data" / "legacy_checkpoint_0.1.0.pt"


def _round_trip(obj, **load_kwargs):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True, **load_kwargs)


def _mlp(dtype=torch.float64, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).to(dtype)


def _batches(n, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g), torch.randn(8, 6, generator=g)) for _ in range(n)]


# ---- 1. moments of every dtype in one projected group are kept ---------------------------------


def test_mixed_dtype_group_keeps_the_moments_of_every_weight():
    """An fp32 and a bf16 weight in one projected group: the bf16 weight trains exactly as alone."""
    gen = torch.Generator().manual_seed(0)
    w32 = nn.Parameter(torch.randn(16, 8, generator=gen))
    w16 = nn.Parameter(torch.randn(16, 8, generator=gen).bfloat16())
    alone = nn.Parameter(w16.detach().clone())
    together = GrassAdamW([{"params": [w32, w16], "rank": 4}], lr=1e-2)
    single = GrassAdamW([{"params": [alone], "rank": 4}], lr=1e-2)
    for _ in range(4):
        g32, g16 = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen).bfloat16()
        w32.grad, w16.grad, alone.grad = g32, g16, g16.clone()
        together.step()
        single.step()
    assert together.state[w16]["exp_avg"].abs().sum() > 0
    torch.testing.assert_close(together.state[w16]["exp_avg"], single.state[alone]["exp_avg"])
    assert torch.equal(w16, alone)


# ---- 2. clipping measures the same quantity with and without the compressed backward ------------


def _clipped_run(compressed: bool, max_norm: float) -> tuple[list[float], list[torch.Tensor]]:
    model = _mlp()
    groups = (grassify if compressed else grass_param_groups)(
        model, rank=4, target_modules=["0", "2"], update_proj_gap=2, proj_side="rows"
    )
    opt = GrassAdamW(groups, lr=1e-2)
    norms = []
    for x, y in _batches(5):
        F.mse_loss(model(x.double()), y.double()).backward()
        norms.append(float(clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
        opt.zero_grad()
    return norms, [p.detach().clone() for p in model.parameters()]


def test_clipping_is_the_same_with_and_without_the_compressed_backward():
    full_norms, full_params = _clipped_run(compressed=False, max_norm=0.05)
    norms, params = _clipped_run(compressed=True, max_norm=0.05)
    assert min(norms) > 0.05  # the clip is active on every step
    torch.testing.assert_close(norms, full_norms, rtol=1e-10, atol=0)
    for p, q in zip(params, full_params, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)


# ---- 3. fp16 set through accelerate is refused like --fp16 --------------------------------------


def _tiny_data(n=16) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 512, (n, 8), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(tmp_path, **kw) -> GrassTrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        optim="grass",
        grass_rank=8,
        grass_update_proj_gap=2,
        per_device_train_batch_size=4,
        max_steps=4,
        save_steps=2,
        save_strategy="steps",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=3,
    )
    base.update(kw)
    return GrassTrainingArguments(**base)


def test_fp16_from_accelerate_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ValueError, match=r"fp16 \(set through accelerate\).*--bf16"):
        GrassTrainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=_tiny_data())


# ---- 4. a Grass weight also used outside its layer keeps both gradients --------------------------


class _Shared(nn.Module):
    """``layer`` is grassified; its weight is used a second time functionally."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(12, 10).double()

    def forward(self, x):
        return self.layer(x) + F.linear(x.flip(0), self.layer.weight)


def test_weight_used_outside_its_layer_combines_both_gradients():
    torch.manual_seed(0)
    ours, ref = _Shared(), _Shared()
    ref.load_state_dict(ours.state_dict())
    opt = GrassAdamW(grassify(ours, rank=4, target_modules=["layer"], update_proj_gap=2), lr=1e-2)
    ref_opt = GrassAdamW(
        grass_param_groups(ref, rank=4, target_modules=["layer"], update_proj_gap=2), lr=1e-2
    )
    for x, _ in _batches(5):
        for model, o in ((ours, opt), (ref, ref_opt)):
            model(x.double()).pow(2).mean().backward()
            o.step()
            o.zero_grad()
    assert torch.equal(projection_of(ours.layer.weight).rows, projection_of(ref.layer.weight).rows)
    torch.testing.assert_close(ours.layer.weight, ref.layer.weight, rtol=0, atol=1e-12)


# ---- 5. Grass settings on resume: fixed ones refused, the others applied -------------------------


def _trained(steps=3, **group):
    model = _mlp()
    options = dict(rank=4, target_modules=["0", "2"], update_proj_gap=2, selection="multinomial")
    options.update(group)
    opt = GrassAdamW(grass_param_groups(model, **options), lr=1e-2)
    for x, y in _batches(steps):
        F.mse_loss(model(x.double()), y.double()).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("key,value", [("selection", "top_r"), ("seed", 9), ("proj_side", "cols")])
def test_resume_with_another_fixed_setting_is_refused(key, value):
    _, opt = _trained()
    _, fresh = _trained(steps=0, **{key: value})
    with pytest.raises(ValueError, match=rf"{key}: checkpoint .*, now {value!r}"):
        fresh.load_state_dict(_round_trip(opt.state_dict()))


def test_resume_applies_a_changed_gap_scale_and_state_dtype(caplog):
    model, opt = _trained()
    saved = _round_trip(opt.state_dict())
    _, fresh = _trained(steps=0, update_proj_gap=5, scale=0.5)
    fresh.param_groups[0]["state_dtype"] = torch.float32
    with caplog.at_level(logging.WARNING, logger="hf_grass.optim"):
        fresh.load_state_dict(saved)
    group = fresh.param_groups[0]
    assert group["update_proj_gap"] == 5 and group["scale"] == 0.5
    assert "update_proj_gap=5 (the checkpoint had 2)" in caplog.text
    state = next(iter(fresh.state.values()))
    assert state["exp_avg"].dtype == torch.float32
    # the new gap is the one used: step 4 (a multiple of 2, not of 5) re-selects nothing
    projections = [fresh.projection(p) for p in group["params"]]
    assert all(int(fresh.state[p]["step"]) == 3 for p in group["params"])
    assert not any(pr.needs_full_gradient() for pr in projections)


def test_trainer_resume_with_another_selection_is_refused_and_keeps_the_checkpoint(tmp_path):
    GrassTrainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=_tiny_data()).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    before = {
        f: (checkpoint / f).read_bytes()
        for f in os.listdir(checkpoint)
        if (checkpoint / f).is_file()
    }
    args = _args(tmp_path, grass_selection="multinomial")
    trainer = GrassTrainer(model=tiny_llama(), args=args, train_dataset=_tiny_data())
    with pytest.raises(ValueError, match=r"selection: checkpoint 'top_r', now 'multinomial'"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert before == {f: (checkpoint / f).read_bytes() for f in before}


# ---- 6. all-linear under PEFT, and Grass + LoRA on the same weights ------------------------------


def test_all_linear_under_peft_skips_heads_and_lora_factors(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama("classifier", num_labels=2, pad_token_id=0)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    )
    names = match_target_modules(peft_model, "all-linear")
    assert names and not any("score" in n or "lora_" in n for n in names)
    args = _args(tmp_path, grass_target_modules=r".*lora_A\.default")
    with pytest.raises(ValueError, match="Grass and LoRA on the same weights"):
        GrassTrainer(model=peft_model, args=args, train_dataset=_tiny_data())


# ---- 7. the RNG state survives map_location; checkpoints of 0.1 resume as 0.1 did ---------------


def test_rng_state_survives_a_non_cpu_map_location():
    _, opt = _trained()
    saved = opt.state_dict()
    on_meta = _round_trip(saved, map_location="meta")
    for pid, state in saved["state"].items():
        if "rng" in state:
            assert on_meta["state"][pid]["rng"] == state["rng"]
            generator = torch.Generator()
            generator.set_state(
                torch.frombuffer(bytearray(on_meta["state"][pid]["rng"]), dtype=torch.uint8)
            )


def _resume_legacy(legacy: dict) -> tuple[nn.Module, GrassAdamW, dict]:
    """The 0.1.0 model and optimizer state, loaded; returns them and the state as loaded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))
    model.load_state_dict(legacy["model"])
    groups = grass_param_groups(
        model,
        rank=4,
        target_modules=["0", "2"],
        weight_decay=0.01,
        selection="multinomial",
        update_proj_gap=2,
        proj_side="rows",
        seed=3,
    )
    opt = GrassAdamW(groups, lr=1e-2, weight_decay=0.01)
    opt.load_state_dict(legacy["optimizer"])
    # copies: the state dict's entries are the optimizer's live state
    loaded = {pid: dict(entry) for pid, entry in opt.state_dict()["state"].items()}
    for x, y in legacy["batches"][3:]:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt, loaded


def test_checkpoint_of_version_0_1_resumes_as_0_1_did():
    """A state written by hf-grass 0.1.0 (rng as a uint8 tensor, derived rows saved) continues
    as 0.1.0 continued it, across re-selections with multinomial draws.

    The fixture's floats were computed on another machine: another vector width or kernel
    rounds differently by an ulp now and then, so weights are compared within float32 rounding
    over five steps (about 8 ulps; a row selected differently would be off by about lr = 1e-2).
    Integers are exact: rows, RNG bytes, step counts, and which weights moved at all. Two resumes
    on this machine are bit-identical."""
    legacy = torch.load(LEGACY, weights_only=True)
    model, opt, loaded = _resume_legacy(legacy)
    steps = len(legacy["batches"][3:])
    for pid, saved in legacy["optimizer"]["state"].items():
        if "rng" in saved:
            assert loaded[pid]["rng"] == bytes(saved["rng"].tolist()), pid
            assert torch.equal(loaded[pid]["rows"], saved["rows"]), pid
        assert int(opt.state_dict()["state"][pid]["step"]) == int(saved["step"]) + steps, pid
    for name, value in model.state_dict().items():
        start, final = legacy["model"][name], legacy["final"][name]
        assert torch.equal(value != start, final != start), name  # the same rows were updated
        torch.testing.assert_close(value, final, rtol=1e-6, atol=1e-7, msg=name)
    again = _resume_legacy(legacy)[0].state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, again[name]), name


# ---- 9. corrupt checkpoint files: one line naming the file and the fix ---------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    GrassTrainer(model=tiny_llama(), args=_args(root), train_dataset=_tiny_data()).train()
    return root / "out" / "checkpoint-2"


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("optimizer.pt", b"", r"optimizer\.pt is empty or truncated \(0 bytes"),
        ("optimizer.pt", None, r"optimizer\.pt is empty or truncated"),
        ("grass_config.json", b"{", r"grass_config\.json is unreadable"),
        ("grass_config.json", b"[]", r"grass_config\.json is unreadable"),
    ],
)
def test_corrupt_checkpoint_file_is_named(saved_run, tmp_path, name, content, match):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(saved_run, checkpoint)
    path = checkpoint / name
    path.write_bytes(
        content if content is not None else path.read_bytes()[: path.stat().st_size // 2]
    )
    damaged = path.read_bytes()
    trainer = GrassTrainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=_tiny_data())
    with pytest.raises(ValueError, match=match) as err:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert "earlier checkpoint" in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == damaged


# ---- 13. transformers without the clipping hooks fails loudly ------------------------------------


def test_missing_trainer_clipping_hooks_fail_loudly(tmp_path, monkeypatch):
    monkeypatch.delattr(transformers.Trainer, "_clip_grad_norm")
    with pytest.raises(RuntimeError, match=r"_clip_grad_norm.*transformers>=5"):
        GrassTrainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=_tiny_data())


def test_grass_config_json_records_every_fixed_setting(saved_run):
    saved = json.loads((saved_run / "grass_config.json").read_text())
    assert {"rank", "proj_side", "selection", "seed", "target_modules"} <= saved.keys()


def test_training_after_load_leaves_the_loaded_state_dict_unchanged():
    """One state dict loaded into two optimizers: training the first must not advance the
    second's step counters (torch.optim would share the ``step`` tensors)."""
    _, opt = _trained()
    saved = _round_trip(opt.state_dict())
    snapshot = {
        pid: {k: v.clone() for k, v in entry.items() if isinstance(v, torch.Tensor)}
        for pid, entry in saved["state"].items()
    }
    model, first = _trained(steps=0)
    first.load_state_dict(saved)
    for x, y in _batches(2):
        F.mse_loss(model(x.double()), y.double()).backward()
        first.step()
        first.zero_grad()
    for pid, entry in snapshot.items():
        for key, value in entry.items():
            assert torch.equal(saved["state"][pid][key], value), (pid, key)


# ---- 8. clipping across devices (a device_map model) -------------------------------------------


def test_clipping_gradients_on_two_devices_measures_on_one():
    """Fake tensors stand for two GPUs: every norm moves to the first gradient's device, as
    torch's own clipping does, instead of stacking norms that live on different devices."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a, b = (
            nn.Parameter(torch.empty(4, 3, device="cuda:0")),
            nn.Parameter(torch.empty(5, device="cuda:1")),
        )
        a.grad, b.grad = torch.empty(4, 3, device="cuda:0"), torch.empty(5, device="cuda:1")
        total = clip_grad_norm_([a, b], 1.0)
        assert total.device == torch.device("cuda:0")
        assert a.grad.device == torch.device("cuda:0") and b.grad.device == torch.device("cuda:1")


# ---- a checkpoint whose save was interrupted before trainer_state.json --------------------------


def _interrupted_copy(saved_run: Path, tmp_path: Path) -> Path:
    """The saved run's output folder with its last checkpoint (step 4) cut short of its state."""
    out = tmp_path / "out"
    shutil.copytree(saved_run.parent, out)
    (out / "checkpoint-4" / "trainer_state.json").unlink()  # written last by the Trainer
    return out


def test_resume_true_skips_an_incomplete_checkpoint_and_resumes(saved_run, tmp_path, caplog):
    out = _interrupted_copy(saved_run, tmp_path)
    with caplog.at_level(logging.INFO, logger="hf_grass"):
        resume = resolve_resume("true", str(out))
    assert resume == str(out / "checkpoint-2")
    skipped = [r.getMessage() for r in caplog.records if "checkpoint-4" in r.getMessage()]
    assert len(skipped) == 1 and "trainer_state.json" in skipped[0], caplog.text
    trainer = GrassTrainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=_tiny_data())
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.state.global_step == 4


def test_resume_from_a_named_incomplete_checkpoint_names_the_complete_one(saved_run, tmp_path):
    out = _interrupted_copy(saved_run, tmp_path)
    with pytest.raises(UsageError) as err:
        resolve_resume(str(out / "checkpoint-4"), str(out))
    message = str(err.value)
    assert "\n" not in message and "trainer_state.json" in message
    assert str(out / "checkpoint-4") in message and str(out / "checkpoint-2") in message
    (out / "checkpoint-2" / "trainer_state.json").unlink()  # no complete one left
    with pytest.raises(UsageError, match=r"no complete checkpoint.*drop the flag"):
        resolve_resume(str(out / "checkpoint-4"), str(out))
    with pytest.raises(UsageError, match=r"no complete checkpoint.*drop the flag"):
        resolve_resume("true", str(out))


# ---- an unreadable entry of the hf-grass cache is built again -----------------------------------


def _fake_conversion(conversions: list[str]):
    """Stands for the GGUF conversion (a minute): writes a tiny LLaMA and its tokenizer."""

    def convert(gguf: Path, out_dir: Path) -> None:
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        conversions.append(str(out_dir))
        tiny_llama().save_pretrained(out_dir)
        vocab = {"<unk>": 0, "</s>": 1, "hello": 2}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="<unk>", eos_token="</s>"
        ).save_pretrained(out_dir)

    return convert


@pytest.mark.parametrize("name", ["tokenizer.json", "model.safetensors", "config.json"])
def test_an_unreadable_converted_checkpoint_is_converted_again(tmp_path, monkeypatch, caplog, name):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from hf_grass import models

    monkeypatch.setenv("HF_GRASS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    conversions: list[str] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_conversion(conversions))
    path = models.default_model_path()
    assert models.default_model_path() == path and len(conversions) == 1  # reused
    damaged = path / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="hf_grass"):
        assert models.default_model_path() == path
    assert len(conversions) == 2
    # (an earlier test may have set hf_grass's module loggers to INFO: count warnings only)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    AutoTokenizer.from_pretrained(path)
    LlamaForCausalLM.from_pretrained(path)


def test_data_parallel_drops_a_failed_backwards_partial_averages(one_process_group, caplog):
    """A backward that raises midway (an out-of-memory error a loop catches) has launched some
    buckets' averages and never reaches its end: those are finished and dropped, with one line,
    and the next backward sends and writes back every bucket once, as a first one would."""
    from hf_grass.distributed import GrassDataParallel

    one_process_group()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    plain = copy.deepcopy(model)
    opt = GrassAdamW(grassify(model, rank=2, update_proj_gap=5), lr=1e-2)
    grass_dp = GrassDataParallel(model, opt, bucket_cap_mb=0)  # a bucket per weight
    x = torch.randn(6, 8)

    def loss(model=model):
        hidden = FailingBackward.apply(model[1](model[0](x)))
        return model[4](model[3](model[2](hidden))).square().sum()

    loss().backward()  # a selection step: full gradients, averaged synchronously
    opt.step()
    opt.zero_grad()
    grass_dp.meter.end_step()
    with caplog.at_level(logging.WARNING, logger="hf_grass.distributed"), failing_backward():
        with pytest.raises(RuntimeError, match="simulated"):
            loss().backward()  # the last two layers' buckets are launched, then it raises
    assert [r.message for r in caplog.records if "raised before its end" in r.message]
    assert all(b.work is None and not b.ready for b in grass_dp._buckets)
    opt.zero_grad()
    grass_dp.meter.current.clear()
    loss().backward()
    assert all(b.work is None and not b.ready for b in grass_dp._buckets)  # written back
    one_pass = sum(
        (math.prod(b.projections[0].compressed_shape) + 1) * 4 for b in grass_dp._buckets
    )
    assert len(grass_dp._buckets) == 3 and grass_dp.meter.current["compressed"] == one_pass
    # the averages written back (of one rank: the gradients themselves) are this pass's
    plain.load_state_dict(model.state_dict())
    loss(plain).backward()
    for i in (0, 2, 4):
        projection = projection_of(model[i].weight)
        dense = plain[i].weight.grad if projection.side == "rows" else plain[i].weight.grad.T
        expected = projection.rho[:, None] * dense[projection.rows]
        torch.testing.assert_close(projection.grad, expected)

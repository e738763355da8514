"""Grass is never silently off: a run that projects nothing stops, and a run that projects says
what, where the Trainer's own messages go (CPU, seconds)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import grass_sft_trainer, tiny_llama
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers.utils import logging as hf_logging

from hf_grass import GrassLinear, clip_grad_norm_, grassify
from hf_grass.errors import UsageError
from hf_grass.optim import CLIPPED_ELSEWHERE_WARNING, LOSS_SCALER_REFUSAL
from hf_grass.report import REPORT_NAME, ResourceReportCallback, coverage_line
from hf_grass.trainer import GrassTrainer, GrassTrainingArguments

SEQ = 12
# vocab 256, so that token ids 1..255 fit; pad 0.
TINY = dict(vocab_size=256, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
MLP = ["gate_proj", "up_proj", "down_proj"]
NOTHING_PROJECTED = "would project nothing and train as plain AdamW: all {} target weights"


def lm_data(n: int = 16, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 256, (n, SEQ), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
         "labels": ids.tolist()}
    )  # fmt: skip


def make_args(tmp_path, **kw) -> GrassTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"), optim="grass", grass_rank=8, grass_update_proj_gap=2,
        learning_rate=1e-2, per_device_train_batch_size=8, max_steps=2, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, seed=7,
    )  # fmt: skip
    defaults.update(kw)
    return GrassTrainingArguments(**defaults)


def lora_llama():
    """The tiny LLaMA with LoRA on q_proj/v_proj: PEFT freezes every base weight."""
    return get_peft_model(
        tiny_llama("lm", **TINY), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )


@pytest.fixture
def trainer_log():
    """The messages of the ``transformers`` logger (where the Trainer's own go), at its default
    verbosity: a record that arrives here is one a default run prints."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = hf_logging.get_logger("transformers")
    handler, verbosity = Keep(), hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # transformers' default; a Trainer's log_level "passive"
    root.addHandler(handler)
    yield records
    root.removeHandler(handler)
    hf_logging.set_verbosity(verbosity)


def grass_lines(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith("Grass:")]


# ---- nothing projected: stop with one line ------------------------------------------------------


@pytest.mark.parametrize("targets, count", [(None, 14), (MLP, 6)], ids=["all-linear", "frozen-mlp"])
def test_grass_trainer_on_a_lora_model_with_frozen_targets_stops(tmp_path, targets, count):
    model = lora_llama()
    args = make_args(tmp_path, grass_target_modules=targets)
    with pytest.raises(UsageError, match=NOTHING_PROJECTED.format(count)) as err:
        GrassTrainer(model=model, args=args, train_dataset=lm_data())
    message = str(err.value)
    assert "\n" not in message
    for fix in ("modules_to_save", "grass_target_modules", "drop LoRA", "adamw_torch"):
        assert fix in message
    assert not any(isinstance(m, GrassLinear) for m in model.modules())


def test_trl_sft_trainer_with_peft_config_stops(tmp_path):
    pytest.importorskip("trl")
    with pytest.raises(UsageError, match=NOTHING_PROJECTED.format(14)):
        grass_sft_trainer(tmp_path / "out", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_grassify_refuses_targets_that_are_all_frozen():
    model = tiny_llama("lm", **TINY)
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)  # something trains, but no target does
    with pytest.raises(ValueError, match=r"grassify would project nothing: all 14 target") as e:
        grassify(model, rank=8)
    assert "'model.layers.0.self_attn.q_proj'" in str(e.value)
    assert not any(isinstance(m, GrassLinear) for m in model.modules())
    # Some targets frozen among trainable ones is a choice: it goes through.
    model.model.layers[1].requires_grad_(True)
    groups = grassify(model, rank=8)
    assert sum(len(g["params"]) for g in groups if "rank" in g) == 7


def test_lora_on_attention_and_grass_on_the_unfrozen_mlp_trains_both(tmp_path, trainer_log):
    model = lora_llama()
    mlp = [m for n, m in model.named_modules() if n.split(".")[-1] in MLP]
    for module in mlp:
        module.requires_grad_(True)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    before = [m.weight.detach().clone() for m in mlp]
    args = make_args(tmp_path, grass_target_modules=MLP, max_steps=3)
    trainer = GrassTrainer(model=model, args=args, train_dataset=lm_data())
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    for module, old in zip(mlp, before, strict=True):
        assert isinstance(module, GrassLinear)
        assert optimizer.state[module.weight]["rows"].numel() == 8
        assert not torch.equal(module.weight, old)
    for name, p in model.named_parameters():
        if name in lora and name.split(".")[-3] == "lora_B":  # B starts at zero, then moves
            assert not torch.equal(p, lora[name]), name
    # Projected: 6 MLP matrices of 8192 elements. Dense: 8 LoRA matrices, per layer q's A 4x64
    # and B 64x4, v's A 4x64 and B 32x4 (v has 2 KV heads of 16): 1792 elements.
    projected, lora_elements = 6 * 8192, 2 * (256 + 256 + 256 + 128)
    assert projected / (projected + lora_elements) == pytest.approx(0.9648, abs=1e-4)
    # fp32 moments: 8 x 64 per MLP matrix (rank x smaller side) -> 24 KiB, LoRA 14 KiB; AdamW
    # 2 x 4 x 50944 bytes = 398 KiB.
    assert grass_lines(trainer_log) == [
        "Grass: 6 of 14 weight matrices projected at rank 8 (96.5% of trainable parameters); "
        "Adam moments 38.0 KiB vs 398.0 KiB for AdamW (9.5%); dense: 8 LoRA adapter weights."
    ]


# ---- the coverage line and the report ------------------------------------------------------------


def test_coverage_line_reaches_the_trainer_log_with_exact_counts(tmp_path, trainer_log):
    # Hand count of the tiny LLaMA (hidden 64, 2 layers, MLP 128, 2 KV heads of 16, vocab 256):
    # per layer q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128 = 36864
    # elements; embed_tokens and lm_head 256x64 = 16384 each; 5 norms of 64.
    projected = 2 * 36864
    trainable = projected + 2 * 16384 + 5 * 64
    # Adam moments, fp32: rank 8 times the unselected (smaller) side, per projected matrix:
    # 8 * (64 + 32 + 32 + 64 + 64 + 64 + 64) per layer; dense parameters 2 per element.
    grass_moments = 2 * 4 * (2 * 8 * 384 + 2 * 16384 + 5 * 64)
    adamw_moments = 2 * 4 * trainable
    assert (grass_moments, adamw_moments) == (313856, 854528)  # 306.5 and 834.5 KiB
    cb = ResourceReportCallback()
    trainer = GrassTrainer(
        model=tiny_llama("lm", **TINY), args=make_args(tmp_path), train_dataset=lm_data(),
        callbacks=[cb],
    )  # fmt: skip
    trainer.train()
    expected = (
        "Grass: 14 of 16 weight matrices projected at rank 8 (69.0% of trainable parameters); "
        "Adam moments 306.5 KiB vs 834.5 KiB for AdamW (36.7%); dense: embed_tokens (embedding), "
        "lm_head (head), 5 norms."
    )
    assert grass_lines(trainer_log) == [expected]
    assert f"{100 * projected / trainable:.1f}%" == "69.0%"
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["projected_param_fraction"] == projected / trainable


def test_coverage_line_only_on_the_main_process(tmp_path, trainer_log, monkeypatch):
    trainer = GrassTrainer(
        model=tiny_llama("lm", **TINY), args=make_args(tmp_path), train_dataset=lm_data()
    )
    monkeypatch.setattr(trainer, "is_world_process_zero", lambda: False)
    trainer.create_optimizer()
    assert grass_lines(trainer_log) == []
    monkeypatch.setattr(trainer, "is_world_process_zero", lambda: True)
    trainer.optimizer = None
    trainer.create_optimizer()
    assert len(grass_lines(trainer_log)) == 1


def test_report_projects_nothing_for_adamw(tmp_path):
    cb = ResourceReportCallback()
    args = make_args(tmp_path, optim="adamw_torch", max_steps=1)
    trainer = GrassTrainer(
        model=tiny_llama("lm", **TINY), args=args, train_dataset=lm_data(), callbacks=[cb]
    )
    trainer.train()
    assert cb.report["projected_param_fraction"] == 0.0


# ---- the logged grad_norm ------------------------------------------------------------------------


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e6], ids=["unclipped", "clip-hook"])
def test_logged_grad_norm_is_the_norm_of_plain_and_compressed_gradients(tmp_path, max_grad_norm):
    """The Trainer logs sqrt(sum |plain .grad|^2 + sum |rho * G[rows]|^2), the quantity
    --max_grad_norm clips; with top_r rows it is below the full gradient's norm AdamW logs."""
    import math

    from conftest import compressed_grad
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [g for p in model.parameters() for g in (p.grad, compressed_grad(p))]
            squares = sum(g.double().square().sum().item() for g in grads if g is not None)
            self.norms.append(math.sqrt(squares))

    def logged(trainer) -> list[float]:
        return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]

    probe = Probe()
    args = make_args(tmp_path, max_steps=3, logging_steps=1, max_grad_norm=max_grad_norm)
    trainer = GrassTrainer(
        model=tiny_llama("lm", **TINY), args=args, train_dataset=lm_data(), callbacks=[probe]
    )
    trainer.train()
    assert len(probe.norms) == 3
    assert logged(trainer) == pytest.approx(probe.norms, rel=1e-5)
    adamw_args = make_args(tmp_path / "adamw", optim="adamw_torch", max_steps=1, logging_steps=1)
    adamw = GrassTrainer(model=tiny_llama("lm", **TINY), args=adamw_args, train_dataset=lm_data())
    adamw.train()
    assert logged(trainer)[0] < logged(adamw)[0]  # the same first batch and weights


# ---- an own loop: clipping and loss scaling that cannot see compressed gradients ----------------
def _own_loop(
    steps: int = 3,
    micro_batches: int = 1,
    between=None,
    grassified: bool = True,
    reentrant: bool = False,
):
    """``steps`` optimizer steps of a tiny LLaMA with GrassAdamW; ``between(model, opt)`` runs
    after the backward(s) and before each step; ``reentrant``: decoder layers checkpointed with
    ``use_reentrant=True`` (each layer's backward nested in the outer one). Returns the
    RuntimeWarnings raised."""
    import warnings

    from hf_grass import GrassAdamW, grass_param_groups

    model = tiny_llama(seed=0, vocab_size=64)
    if reentrant:
        model.gradient_checkpointing_enable({"use_reentrant": True})
        model.train()
    groups = grassify(model, rank=4) if grassified else grass_param_groups(model, rank=4)
    opt = GrassAdamW(groups, lr=1e-2)
    ids = torch.randint(
        0, 64, (steps * micro_batches, 2, 8), generator=torch.Generator().manual_seed(0)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in ids.split(micro_batches):
            for micro in batch:
                model(input_ids=micro, labels=micro).loss.backward()
            if between is not None:
                between(model, opt)
            opt.step()
            opt.zero_grad()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def _accelerate_clip(model, opt):
    from accelerate import Accelerator

    Accelerator(cpu=True).clip_grad_norm_(model.parameters(), 1.0)


CLIPS = {
    "torch-norm": lambda model, opt: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0),
    "torch-norm-inactive": lambda model, opt: torch.nn.utils.clip_grad_norm_(
        model.parameters(), 1e9
    ),
    "torch-value": lambda model, opt: torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3),
    "accelerate": _accelerate_clip,
}
CLIPPED_ELSEWHERE = "Plain gradients were changed in place after the backward"


@pytest.mark.parametrize(
    "micro_batches, reentrant",
    [(1, False), (2, False), (1, True)],
    ids=["", "accumulate", "reentrant"],
)
@pytest.mark.parametrize("clip", list(CLIPS))
def test_clipping_that_cannot_see_compressed_gradients_is_reported_once(
    clip, micro_batches, reentrant
):
    """torch's and accelerate's clipping read ``.grad`` only: the compressed gradients would go
    unclipped, so the first step says so (once), even when the clip changed nothing (x1)."""
    caught = _own_loop(micro_batches=micro_batches, between=CLIPS[clip], reentrant=reentrant)
    assert [w for w in caught if w.startswith(CLIPPED_ELSEWHERE)] == [CLIPPED_ELSEWHERE_WARNING]


@pytest.mark.parametrize(
    "between",
    [
        None,
        lambda model, opt: clip_grad_norm_(model.parameters(), 1.0),
    ],
    ids=["no-clip", "grass-clip"],
)
@pytest.mark.parametrize("reentrant", [False, True], ids=["", "reentrant"])
def test_grass_clipping_or_none_is_not_reported(between, reentrant):
    """Also when reentrant checkpointing nests a backward per layer: the gradients are noted
    at the end of the outer backward, not after the first layer's."""
    caught = _own_loop(between=between, reentrant=reentrant)
    assert not [w for w in caught if w.startswith(CLIPPED_ELSEWHERE)]


def test_torch_clipping_with_full_gradients_is_not_reported():
    """Without the compressed backward every gradient is a ``.grad``: torch's clip is right."""
    caught = _own_loop(between=CLIPS["torch-norm"], grassified=False)
    assert not [w for w in caught if w.startswith(CLIPPED_ELSEWHERE)]


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale+step"])
def test_fp16_loss_scaler_with_compressed_gradients_stops_before_any_update(unscale_first):
    from hf_grass import GrassAdamW

    model = tiny_llama(seed=0, vocab_size=64)
    opt = GrassAdamW(grassify(model, rank=4), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
    if unscale_first:
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError) as error:
        scaler.step(opt)
    assert str(error.value) == LOSS_SCALER_REFUSAL
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_fp16_loss_scaler_with_full_gradients_works_as_for_any_optimizer():
    """Without the compressed backward the scaler sees every gradient: a power-of-two scale is
    undone exactly, so the weights equal those of the same steps without a scaler."""
    from hf_grass import GrassAdamW, grass_param_groups

    def train(scaler: torch.amp.GradScaler | None) -> list[torch.Tensor]:
        model = tiny_llama(seed=0, vocab_size=64)
        opt = GrassAdamW(grass_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)
        for seed in range(3):
            ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
            loss = model(input_ids=ids, labels=ids).loss
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
        return [p.detach() for p in model.parameters()]

    scaled = train(torch.amp.GradScaler("cpu", init_scale=2.0**10))
    plain = train(None)
    assert all(torch.equal(p, q) for p, q in zip(scaled, plain, strict=True))


# ---- layer types Grass cannot project ---------------------------------------------------------
class _UndescribedExperts(torch.nn.Module):
    """Experts as one 3-D parameter in a module that transformers' experts layout does not
    describe (no ``use_experts_implementation``): Grass cannot project it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 24, 16))

    def forward(self, x):
        return torch.einsum("bh,emh->bm", x, self.w)


class _ToyWithUndescribedExperts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.experts = _UndescribedExperts()

    def forward(self, x):
        return self.experts(self.proj(x))


def _unprojectable_warnings(model) -> tuple[list[dict], list[str]]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = grassify(model, rank=4)
    return groups, [str(w.message) for w in caught if "Grass cannot project" in str(w.message)]


def test_layer_types_grass_cannot_project_are_named_with_their_share():
    """Weights of a layer type Grass does not project stay dense; holding most of the model they
    are named with their share (counted here by hand)."""
    model = _ToyWithUndescribedExperts()
    share = 4 * 24 * 16 / (4 * 24 * 16 + 16 * 16 + 16)
    groups, caught = _unprojectable_warnings(model)
    assert len(caught) == 1
    assert caught[0].startswith(
        f"{100 * share:.1f}% of the trainable parameters are weights of layer types Grass "
        "cannot project, most in _UndescribedExperts (1 weight such as 'experts.w' of shape "
        "(4, 24, 16))"
    )
    assert "Freeze them (requires_grad_(False))" in caught[0]
    line = coverage_line(model, groups)
    assert line.endswith("experts (layer Grass cannot project).")


def test_frozen_unprojectable_weights_and_models_grass_covers_raise_no_warning():
    from conftest import tiny_gpt2, tiny_moe

    model = _ToyWithUndescribedExperts()
    model.experts.w.requires_grad_(False)
    assert _unprojectable_warnings(model)[1] == []
    assert _unprojectable_warnings(tiny_llama(seed=0))[1] == []
    assert _unprojectable_warnings(tiny_moe("mixtral"))[1] == []  # experts are projected
    gpt2 = tiny_gpt2()
    groups, caught = _unprojectable_warnings(gpt2)
    assert caught == []
    assert coverage_line(gpt2, groups).startswith("Grass: 8 of 10 weight matrices projected")


def test_the_engine_imports_without_transformers_and_the_trainer_on_first_use():
    """A torch-only user's ``import hf_grass`` loads no Hugging Face library; the Trainer names
    resolve to the integration's classes when first used."""
    import subprocess
    import sys

    import hf_grass
    from hf_grass import trainer

    code = (
        "import sys; import hf_grass; "
        "from hf_grass import GrassAdamW, GrassDataParallel, clip_grad_norm_, grassify; "
        "loaded = [m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'accelerate', 'peft', 'datasets')]; "
        "assert not loaded, loaded"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert hf_grass.GrassTrainer is trainer.GrassTrainer
    assert hf_grass.GrassTrainingArguments is trainer.GrassTrainingArguments
    with pytest.raises(AttributeError):
        hf_grass.GrassNothing  # noqa: B018


def test_torch_compile_trains_as_eager_without_recompiling():
    """``torch.compile`` of a grassified model (the Trainer's ``--torch_compile``): the Grass
    layers run eagerly, one graph break each, so dynamo does not break inside them and recompile
    at every call site until its limit, and training equals the eager run (the same rows, the
    same weights)."""
    import torch._dynamo

    from hf_grass import GrassAdamW, projection_of

    def train(compiled: bool):
        model = tiny_llama(seed=0, vocab_size=64).double()  # compiled kernels round otherwise
        opt = GrassAdamW(grassify(model, rank=4, update_proj_gap=2, embeddings=True), lr=1e-2)
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        ids = torch.randint(0, 64, (4, 2, 8), generator=torch.Generator().manual_seed(0))
        rows = []
        for batch in ids:  # steps 0 and 2 select
            forward(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
            rows.append([projection_of(w).rows.tolist() for w in opt.param_groups[0]["params"]])
        return model, rows

    from torch._dynamo.utils import counters

    eager, eager_rows = train(compiled=False)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled, compiled_rows = train(compiled=True)
    finally:
        torch._dynamo.reset()
    breaks = counters["graph_break"]
    assert sum(n for reason, n in breaks.items() if "_apply_grass_" in reason) > 0
    assert not [r for r in counters["unimplemented"] if "recompile limit" in r.lower()]
    assert compiled_rows == eager_rows
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-10, msg=name)

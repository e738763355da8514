"""Shared test helpers: the devices and dtypes to test, warning set-up and tiny seeded LLaMAs.

Fixtures (`device`, `fresh_warning`) are found by pytest; the plain helpers
(`tiny_llama`, `DEVICES`, `FLOAT_DTYPES`) are imported with `from conftest import ...`
(pytest puts this folder on `sys.path`; a script run as `python tests/x.py` has it there too).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from hf_grass import selection as selection_module
from hf_grass.models import llama_config

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16]  # for @pytest.mark.parametrize


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each device the test runs on: cpu, plus cuda when available."""
    return request.param


@pytest.fixture
def fresh_warning(monkeypatch):
    """The selection fallback warns once per process; let every test that uses this see it."""
    monkeypatch.setattr(selection_module, "_warned_fallback", False)


def tiny_llama(
    head: str = "lm", seed: int = 0, **overrides
) -> LlamaForCausalLM | LlamaForSequenceClassification:
    """A randomly initialized LLaMA of the "tiny" preset (2 layers, hidden 64, vocab 512).

    `head` is "lm" (causal LM) or "classifier" (sequence classification; pass `num_labels` and
    `pad_token_id` when batches hold several sequences). `seed` seeds the initialization, so two
    calls with the same arguments give identical weights. `overrides` go to `llama_config`.
    """
    classes = {"lm": LlamaForCausalLM, "classifier": LlamaForSequenceClassification}
    if head not in classes:
        raise ValueError(f"head={head!r}; choose one of {', '.join(classes)}")
    torch.manual_seed(seed)
    return classes[head](llama_config("tiny", **overrides))


def compressed_grad(p: torch.Tensor) -> torch.Tensor | None:
    """The compressed gradient of ``p`` (``None`` without a live Grass projection)."""
    from hf_grass import projection_of

    projection = projection_of(p)
    return None if projection is None else projection.grad


def assert_gradients_match_dense(
    model: torch.nn.Module, reference: torch.nn.Module, side: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every gradient of ``model`` against the dense float64 gradients of ``reference`` (an
    untouched copy after the same backward): a plain ``.grad`` equal to it, a projected weight
    (selecting ``side``) with no ``.grad`` and a compressed gradient equal to ``rho * G[rows]``,
    plain indexing of the dense gradient. Returns the projected weights with their dense
    gradients."""
    from hf_grass import projection_of
    from hf_grass.functional import row_index

    ref_params = dict(reference.named_parameters())
    projected = []
    for name, p in model.named_parameters():
        projection = projection_of(p)
        dense = ref_params[name].grad
        if projection is None:
            torch.testing.assert_close(p.grad, dense, rtol=0, atol=1e-12)
            continue
        assert p.grad is None and projection.side == side
        oriented = dense if side == "rows" else dense.transpose(-2, -1)
        rows = oriented[row_index(oriented, projection.rows)]
        expected = projection.rho.to(dense.dtype)[:, None] * rows
        torch.testing.assert_close(projection.grad, expected, rtol=0, atol=1e-12)
        projected.append((p, dense))
    return projected


def method_optimizer(model: torch.nn.Module, method: str, rank: int, **grass):
    """The optimizer the memory planner models for ``method``: torch's AdamW, bitsandbytes'
    AdamW8bit, GrassAdamW on a grassified ``model``, galore_torch's GaLoreAdamW on every
    ``nn.Linear`` but the output head (scale 0.25, K 200), or AdamW on what is trainable (LoRA)."""
    from hf_grass import GrassAdamW, grassify

    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if method == "adamw-8bit":
        bnb = pytest.importorskip("bitsandbytes")
        return bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    if method == "grass":
        return GrassAdamW(grassify(model, rank=rank, **grass), lr=1e-3)
    if method == "galore":
        galore = pytest.importorskip("galore_torch")
        linear = {
            f"{n}.weight"
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "lm_head"
        }
        params = dict(model.named_parameters())
        groups = [
            {"params": [p for n, p in params.items() if n not in linear]},
            {
                "params": [p for n, p in params.items() if n in linear],
                **dict(rank=rank, update_proj_gap=200, scale=0.25, proj_type="std"),
            },
        ]
        return galore.GaLoreAdamW(groups, lr=1e-3)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def end_worker() -> None:
    """End a torchrun worker: tear the process group down and leave without running C++ static
    destructors (gloo occasionally aborts there, "terminate called without an active
    exception", after a correct run, with or without hf_grass)."""
    import os
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_two_processes(script: str, *args: str, timeout: float = 180):
    """``script args`` under ``torch.distributed.run`` on 2 CPU processes (gloo, one thread
    each, this folder importable), bounded by :func:`run_bounded`."""
    import os
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        script, *args,
    ]  # fmt: skip
    return run_bounded(cmd, env, timeout)


def run_bounded(cmd: list[str], env: dict[str, str], timeout: float):
    """Run ``cmd`` (e.g. a torchrun job) in its own session; on a timeout kill it and all its
    workers and fail the test. Returns the ``subprocess.CompletedProcess``."""
    import os
    import signal
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts its workers in sessions of their own: kill every descendant, or a
        # hung worker keeps the pipes open and the test waits forever.
        for pid in [*_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"{' '.join(cmd[:6])} ... did not finish in {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux /proc), children before their own children."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                for child in map(int, children.read_text().split()):
                    found.append(child)
                    todo.append(child)
    return found


def functional_problem(dtype, state_dtype, repeats, gen, shapes, strided_last=False):
    """Inputs of ``functional.grass_adamw``: projected weights of ``shapes`` ((m, k, r) each),
    their compressed gradients, moments, per-row counts and sorted selections, then one dense
    parameter. ``repeats``: rows drawn with replacement, at least one drawn twice per weight.
    ``strided_last``: the last weight is a transposed view, as a column-selected weight is.
    """
    params, grads, ms, vs, steps, rows, rhos = [], [], [], [], [], [], []
    for j, (m, k, r) in enumerate(shapes):
        w = torch.randn(m, k, generator=gen).to(dtype)
        last = j == len(shapes) - 1
        params.append(w.t().contiguous().t() if strided_last and last else w)
        if repeats:
            idx = torch.randint(0, m, (r,), generator=gen)
            idx[1] = idx[0]
        else:
            idx = torch.randperm(m, generator=gen)[:r]
        rows.append(idx.sort().values)
        rhos.append(torch.rand(r, generator=gen) + 0.5)
        grads.append(torch.randn(r, k, generator=gen).to(dtype))
        ms.append((torch.randn(r, k, generator=gen) * 0.1).to(state_dtype))
        vs.append((torch.rand(r, k, generator=gen) * 0.1).to(state_dtype))
        steps.append(torch.randint(0, 5, (r,), generator=gen).float())
    params.append(torch.randn(5, generator=gen).to(dtype))  # a dense parameter
    grads.append(torch.randn(5, generator=gen).to(dtype))
    ms.append(torch.zeros(5, dtype=state_dtype))
    vs.append(torch.zeros(5, dtype=state_dtype))
    steps.append(torch.tensor(0.0))
    rows.append(None)
    rhos.append(None)
    return params, grads, ms, vs, steps, rows, rhos


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One hf-grass cache (HF_GRASS_CACHE) per test module: a tokenizer is trained once."""
    path = tmp_path_factory.mktemp("hf_grass_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_GRASS_CACHE", str(path))
        yield path


def load_script(name: str, folder: str = "scripts"):
    """``<folder>/<name>.py`` (``scripts/`` or ``benchmarks/``) as a module, loaded once per test
    session (its dataclasses resolve their annotations through ``sys.modules``, so it is
    registered there under ``name``)."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


WORDS = (
    "the a an and or but of to in on for with is was it this that film movie story not no very "
    "good bad great best worst fun funny dull boring love hate script acting plot characters "
    "write give list name what how why explain describe make one two three words answer"
).split()


def _word_level_tokenizer():
    """A lower-casing word-level tokenizer of ``WORDS`` with LLaMA's special tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def _saved_tiny_model(tmp_path_factory, name: str, config_cls, model_cls, **config) -> str:
    """A tiny random causal LM with the word-level tokenizer, saved like any checkpoint."""
    tokenizer = _word_level_tokenizer()
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
        eos_token_id=3, **config,
    )  # fmt: skip
    path = tmp_path_factory.mktemp(name)
    model_cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random LLaMA with a word-level tokenizer, saved like any checkpoint."""
    from transformers import LlamaConfig

    return _saved_tiny_model(
        tmp_path_factory, "tiny_llama", LlamaConfig, LlamaForCausalLM, intermediate_size=64
    )


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory) -> str:
    """A tiny random Mixtral (4 experts, top-2) with the word-level tokenizer, saved."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return _saved_tiny_model(
        tmp_path_factory, "tiny_mixtral", MixtralConfig, MixtralForCausalLM,
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip


SFT_WORDS = "<pad> <unk> <s> </s> the cat sat on a mat dog ran".split()
SFT_TEXT = ["the cat sat on a mat", "a dog ran", "the dog sat", "a cat ran on the mat"]


def word_tokenizer(words: list[str]):
    """A word-level tokenizer built offline (no Hub download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="</s>",
    )  # fmt: skip


def grass_sft_trainer(out_dir, peft_config, **args):
    """TRL's SFTTrainer with Grass (``GrassTrainerMixin`` + ``GrassArguments``) on a tiny LLaMA
    and four short texts; ``args`` go to the config (rank 4, 1 step, CPU by default)."""
    from dataclasses import dataclass

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from hf_grass.trainer import GrassArguments, GrassTrainerMixin

    @dataclass
    class GrassSFTConfig(GrassArguments, SFTConfig):
        pass

    class GrassSFTTrainer(GrassTrainerMixin, SFTTrainer):
        pass

    config = GrassSFTConfig(
        str(out_dir), **{
            "optim": "grass", "grass_rank": 4, "max_steps": 1, "max_length": 16,
            "per_device_train_batch_size": 2, "use_cpu": True, "report_to": "none",
            "save_strategy": "no", **args,
        },
    )  # fmt: skip
    return GrassSFTTrainer(
        model=tiny_llama("lm", vocab_size=len(SFT_WORDS), pad_token_id=0),
        args=config,
        train_dataset=Dataset.from_dict({"text": SFT_TEXT}),
        processing_class=word_tokenizer(SFT_WORDS),
        peft_config=peft_config,
    )


def tiny_gpt2(seed: int = 0, **overrides):
    """A randomly initialized 2-layer GPT-2 (hidden 32, vocab 64): its attention and MLP are
    ``Conv1D`` layers, whose weights are stored transposed (in, out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = dict(
        n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=64, loss_type="ForCausalLM"
    )
    config |= dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # deterministic
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**(config | overrides)))


def tiny_moe(family: str = "mixtral", seed: int = 0, **overrides):
    """A randomly initialized 2-layer mixture-of-experts model of a transformers 5 family
    (hidden 16, vocab 64, 8 experts), whose experts are 3-D parameters of one experts module:
    ``mixtral`` (top-1 routing), ``qwen3_moe`` (top-2, layer 0 a dense MLP of ``nn.Linear``
    layers when ``mlp_only_layers=[0]``), ``gpt_oss`` (top-2, transposed experts with biases).
    Every parameter is drawn from N(0, 0.2), so that biases (zero at init) matter too. The
    experts run transformers' eager implementation, the plain reference loop."""
    import transformers

    common = dict(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    if family == "mixtral":
        config = transformers.MixtralConfig(
            **common, intermediate_size=24, num_local_experts=8, num_experts_per_tok=1
        )
        cls = transformers.MixtralForCausalLM
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common, head_dim=8, intermediate_size=24, moe_intermediate_size=12, num_experts=8,
            num_experts_per_tok=2, decoder_sparse_step=1,
        )  # fmt: skip
        cls = transformers.Qwen3MoeForCausalLM
    elif family == "gpt_oss":
        config = transformers.GptOssConfig(
            **common, head_dim=8, intermediate_size=12, num_local_experts=8, num_experts_per_tok=2,
            layer_types=["full_attention"] * 2,
        )  # fmt: skip
        cls = transformers.GptOssForCausalLM
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone (GrassDataParallel needs torch.distributed)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    yield lambda: dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1
    )
    if dist.is_initialized():
        dist.destroy_process_group()


class FailingBackward(torch.autograd.Function):
    """Identity; its backward raises while ``FailingBackward.armed`` (a backward pass that fails
    midway, as an out-of-memory error would)."""

    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if FailingBackward.armed:
            raise RuntimeError("out of memory (simulated)")
        return grad


@contextlib.contextmanager
def failing_backward():
    """Arms :class:`FailingBackward` inside the block."""
    FailingBackward.armed = True
    try:
        yield
    finally:
        FailingBackward.armed = False

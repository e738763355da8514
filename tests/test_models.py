import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, Trainer, TrainingArguments

from hf_grass import models
from hf_grass.models import LLAMA_PRESETS, build_llama, default_model_path, llama_config
from hf_grass.resources import smollm2_gguf_path


@pytest.fixture(scope="session")
def converted():
    # The first run converts (about a minute); later runs reuse the checkpoint in the cache.
    return default_model_path()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied tensors are counted once


def test_converted_checkpoint_loads_cleanly_without_quantization_config(converted, tmp_path):
    model, info = LlamaForCausalLM.from_pretrained(converted, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_parameters(model) == 134_515_008
    # Trainer refuses models whose config says they are quantized.
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


@pytest.mark.slow  # parsing the GGUF file takes transformers about 30 s of CPU
def test_converted_logits_equal_the_gguf_models(converted):
    gguf = smollm2_gguf_path()
    reference = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = LlamaForCausalLM.from_pretrained(converted)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    input_ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids).logits
        logits = model(input_ids).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def _gguf_forward(gguf_path, ids: torch.Tensor) -> torch.Tensor:
    """Float64 logits of a LLaMA GGUF file computed from its tensors as stored, by the ``gguf``
    package's own dequantization and a plain forward written here (no transformers code).

    llama.cpp stores q/k rows permuted for its rotary embedding over adjacent pairs
    ``(x[2i], x[2i + 1])``: this forward rotates those pairs, so a conversion that undoes the
    permutation wrongly (or not at all) gives other logits."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(gguf_path)

    def field(name):
        f = reader.fields[name]
        return f.parts[f.data[0]][0].item()

    w = {
        t.name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), np.float64))
        for t in reader.tensors
    }
    layers, heads = field("llama.block_count"), field("llama.attention.head_count")
    kv_heads, base = field("llama.attention.head_count_kv"), field("llama.rope.freq_base")
    eps = field("llama.attention.layer_norm_rms_epsilon")

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotate_pairs(x):  # (T, heads, d)
        t, _, d = x.shape
        angle = torch.arange(t, dtype=torch.float64)[:, None] * base ** (
            -torch.arange(0, d, 2, dtype=torch.float64) / d
        )
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    t = len(ids)
    causal = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    x = w["token_embd.weight"][ids]
    for i in range(layers):
        b = f"blk.{i}."
        h = rms_norm(x, w[b + "attn_norm.weight"])
        q = rotate_pairs((h @ w[b + "attn_q.weight"].T).view(t, heads, -1))
        k = rotate_pairs((h @ w[b + "attn_k.weight"].T).view(t, kv_heads, -1))
        v = (h @ w[b + "attn_v.weight"].T).view(t, kv_heads, -1)
        k, v = (z.repeat_interleave(heads // kv_heads, dim=1) for z in (k, v))
        scores = torch.einsum("thd,shd->hts", q, k) / q.shape[-1] ** 0.5 + causal
        attended = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(t, -1)
        x = x + attended @ w[b + "attn_output.weight"].T
        h = rms_norm(x, w[b + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(h @ w[b + "ffn_gate.weight"].T)
        x = x + (gate * (h @ w[b + "ffn_up.weight"].T)) @ w[b + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])  # tied: no output tensor
    return rms_norm(x, w["output_norm.weight"]) @ head.T


@pytest.mark.slow  # dequantizing the whole GGUF file takes about 10 s
def test_converted_logits_equal_a_plain_forward_of_the_dequantized_gguf(converted):
    model = LlamaForCausalLM.from_pretrained(converted)
    ids = AutoTokenizer.from_pretrained(converted)("The capital of France is")["input_ids"]
    ids = torch.tensor(ids)
    expected = _gguf_forward(smollm2_gguf_path(), ids)
    with torch.no_grad():
        logits = model(ids[None]).logits[0].double()
    # float32 against float64 over 30 layers: measured 9e-5 on logits up to 31; rotating
    # halves instead of pairs here (q/k in the other order) differs by 6
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-3)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_default_model_path_reuses_the_checkpoint(converted, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    assert default_model_path() == converted


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_GRASS_CACHE", str(tmp_path))

    def interrupted(gguf, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        default_model_path()
    assert list(tmp_path.iterdir()) == []

    def complete(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", complete)
    path = default_model_path()
    assert path == tmp_path / "SmolLM2-135M-Instruct"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert (path / "config.json").is_file()

    (path / "config.json").rename(path / "stray.json")  # not a finished conversion
    with pytest.raises(FileExistsError, match=r"delete that folder"):
        default_model_path()


@pytest.mark.parametrize(
    "name, low, high",
    [
        ("tiny", 0.1e6, 0.2e6),
        ("20m", 18e6, 22e6),
        ("60m", 57e6, 59e6),
        ("130m", 130e6, 138e6),
        ("350m", 360e6, 372e6),
        ("1b", 1.30e9, 1.36e9),
        ("7b", 6.6e9, 6.8e9),
        ("13b", 12.9e9, 13.1e9),
    ],
)
def test_preset_sizes_on_meta_device(name, low, high):
    model = build_llama(name, device="meta")
    assert model.device.type == "meta"
    assert low <= count_parameters(model) <= high


def test_build_llama_on_cpu_runs_with_dtype_and_overrides():
    torch.manual_seed(0)
    model = build_llama("tiny", dtype=torch.bfloat16, num_hidden_layers=1)
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 1
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # tiny: vocab 512, hidden 64, 4 heads of 16 (4 kv heads), MLP 128, untied head; one layer
    v, h, f = 512, 64, 128
    assert count_parameters(model) == 2 * v * h + (4 * h * h + 3 * f * h + 2 * h) + h
    # built in place, not left uninitialized: matrices ~ N(0, 0.02) (HF's initializer_range),
    # RMSNorm weights ones
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert abs(p.float().std().item() - 0.02) < 0.002, name
            assert abs(p.float().mean().item()) < 0.002, name
        else:
            assert torch.equal(p, torch.ones_like(p)), name
    ids = torch.randint(0, 512, (2, 8))
    logits = model(ids).logits
    assert logits.shape == (2, 8, 512) and logits.dtype == torch.bfloat16
    # the same weights through a float64 model: equal up to bf16 rounding (measured 2.5e-3 on
    # logits of size 0.55)
    reference = LlamaForCausalLM(llama_config("tiny", num_hidden_layers=1)).double()
    reference.load_state_dict({k: t.double() for k, t in model.state_dict().items()}, strict=True)
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(logits.double(), expected, rtol=0, atol=1e-2)


def test_llama_config_presets_and_errors():
    config = llama_config("60m", vocab_size=49152)
    assert (config.hidden_size, config.intermediate_size) == (512, 1376)
    assert config.vocab_size == 49152 and LLAMA_PRESETS["60m"]["vocab_size"] == 32000
    with pytest.raises(ValueError, match=r"'60M'.*60m"):
        llama_config("60M")

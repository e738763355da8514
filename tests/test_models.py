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
    logits = model(torch.randint(0, 512, (2, 8))).logits
    assert logits.shape == (2, 8, 512) and torch.isfinite(logits.float()).all()


def test_llama_config_presets_and_errors():
    config = llama_config("60m", vocab_size=49152)
    assert (config.hidden_size, config.intermediate_size) == (512, 1376)
    assert config.vocab_size == 49152 and LLAMA_PRESETS["60m"]["vocab_size"] == 32000
    with pytest.raises(ValueError, match=r"'60M'.*60m"):
        llama_config("60M")

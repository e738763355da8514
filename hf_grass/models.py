"""Models: the default SmolLM2-135M-Instruct checkpoint and the LLaMA presets of the Grass/GaLore papers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .errors import discard_unreadable_cache
from .resources import cache_dir, smollm2_gguf_path, write_cache_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# Sizes of the LLaMA models used by GaLore, APOLLO and Grass (vocab 32000, as with the LLaMA
# tokenizer; pass `vocab_size=len(tokenizer)` to `llama_config` for another tokenizer).
# Parameter counts (untied embeddings): 60m 58.1M, 130m 134M, 350m 368M, 1b 1.34B, 7b 6.74B,
# 13b 13.0B. "20m" is 19.5M, 84% of it in the embedding and output matrices; "20m-wide" (20.3M at
# vocab 8000, 70% of it in the attention and MLP matrices) is the CPU pretraining comparison's
# model; "demo" (2.9M at vocab 8192, the default pretraining tokenizer's) is the CPU pretraining
# demo; "tiny" (vocab 512, 0.15M) is for unit tests.
LLAMA_PRESETS: dict[str, dict[str, int]] = {
    "demo": dict(
        hidden_size=128,
        intermediate_size=352,
        num_attention_heads=4,
        num_hidden_layers=4,
        vocab_size=8192,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=512,
    ),
    "20m": dict(
        hidden_size=256,
        intermediate_size=688,
        num_attention_heads=4,
        num_hidden_layers=4,
        vocab_size=32000,
    ),
    "20m-wide": dict(
        hidden_size=384,
        intermediate_size=1024,
        num_attention_heads=6,
        num_hidden_layers=8,
        vocab_size=8000,
    ),
    "60m": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_attention_heads=8,
        num_hidden_layers=8,
        vocab_size=32000,
    ),
    "130m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_attention_heads=12,
        num_hidden_layers=12,
        vocab_size=32000,
    ),
    "350m": dict(
        hidden_size=1024,
        intermediate_size=2736,
        num_attention_heads=16,
        num_hidden_layers=24,
        vocab_size=32000,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5461,
        num_attention_heads=32,
        num_hidden_layers=24,
        vocab_size=32000,
    ),
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_hidden_layers=32,
        vocab_size=32000,
    ),
    "13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_attention_heads=40,
        num_hidden_layers=40,
        vocab_size=32000,
    ),
}


def llama_config(name: str, **overrides) -> LlamaConfig:
    """The `LlamaConfig` of preset `name` (see `LLAMA_PRESETS`), with `overrides` applied."""
    if name not in LLAMA_PRESETS:
        raise ValueError(
            f"Unknown LLaMA preset {name!r}; choose one of {', '.join(LLAMA_PRESETS)}."
        )
    # rms_norm_eps as in the GaLore configs; other fields keep LlamaConfig's defaults.
    kwargs = {"rms_norm_eps": 1e-6, **LLAMA_PRESETS[name], **overrides}
    return LlamaConfig(**kwargs)


def build_llama(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> LlamaForCausalLM:
    """A randomly initialized LLaMA of preset `name`, built directly on `device` in `dtype`.

    `device="meta"` allocates no memory: use it to count parameters or plan memory for 7B models.
    """
    config = llama_config(name, **overrides)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def default_model_path() -> Path:
    """A Hugging Face checkpoint of SmolLM2-135M-Instruct, converted once from the bundled GGUF.

    The weights are dequantized to float32 and saved with the tokenizer under
    `cache_dir()/SmolLM2-135M-Instruct`; later calls return that folder at once, or convert again
    if one of its files is unreadable.
    """
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        try:
            _check_converted(target)
        except (OSError, ValueError, SafetensorError) as err:
            discard_unreadable_cache(target, f"{DEFAULT_MODEL_NAME} checkpoint", err)
        else:
            logger.info("Reusing the %s checkpoint converted in %s", DEFAULT_MODEL_NAME, target)
            return target
    elif target.exists() and any(target.iterdir()):
        raise FileExistsError(
            f"{target} holds files but no config.json, so it is not a finished conversion; "
            "delete that folder and run again to convert anew."
        )
    gguf = smollm2_gguf_path()
    logger.info("Converting %s to a float32 checkpoint in %s (once, about a minute)", gguf, target)
    write_cache_dir(target, lambda tmp: _convert_gguf(gguf, tmp))
    return target


def _check_converted(folder: Path) -> None:
    """Raise if a file of a converted checkpoint is missing or cut short (a full disk, a copy
    interrupted): its JSON files must parse and the safetensors header must cover its file. Cheap:
    no tensor is read."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        json.loads((folder / name).read_text(encoding="utf-8"))
    with safe_open(folder / "model.safetensors", framework="pt"):
        pass


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    gguf_model = LlamaForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model cannot save itself, and its config keeps a `quantization_config`
    # although the weights are dequantized floats; Trainer refuses to finetune a model whose
    # config has one. Copy the weights into a fresh model whose config lacks it.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    # strict: every key matches; lm_head.weight and embed_tokens.weight are one tied tensor in
    # both models, and save_pretrained stores it once.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("SmolLM2's lm_head should be tied to embed_tokens after conversion")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

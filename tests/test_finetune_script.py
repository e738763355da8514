"""scripts/finetune.py: argument handling, configs, bad input, and tiny end-to-end runs."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

_spec = importlib.util.spec_from_file_location("finetune", ROOT / "scripts" / "finetune.py")
finetune = importlib.util.module_from_spec(_spec)
sys.modules["finetune"] = finetune  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(finetune)

WORDS = (
    "the a an and or but of to in on for with is was it this that film movie story not no very "
    "good bad great best worst fun funny dull boring love hate script acting plot characters "
    "write give list name what how why explain describe make one two three words answer"
).split()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random LLaMA with a word-level tokenizer, saved like any checkpoint."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_flags(model_dir: str, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", model_dir, "--output_dir", str(out),
        "--max_train_samples", "32", "--max_eval_samples", "32", "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--grass_rank", "8", "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


# ---- arguments and configs ---------------------------------------------------------------------


def test_no_flags_follow_the_benchmark_protocol():
    _, data, args = finetune.parse_args([])
    assert args.optim == "grass" and args.learning_rate == finetune.LEARNING_RATES["grass"]
    assert (args.per_device_train_batch_size, args.max_steps, args.seed) == (16, 64, 42)
    assert args.lr_scheduler_type == "linear" and args.warmup_steps == 0.1
    assert (args.weight_decay, args.max_grad_norm) == (0.0, 1.0)
    assert data.task_type == "classification" and data.task_name is None
    assert args.output_dir == "outputs/rotten_tomatoes-grass"


@pytest.mark.parametrize(
    "flags, optim, lr, out",
    [
        (["--optim", "adamw_torch"], "adamw_torch", 5e-5, "rotten_tomatoes-adamw"),
        (["--use_lora"], "adamw_torch", 5e-4, "rotten_tomatoes-lora"),
        (["--optim", "galore_adamw"], "galore_adamw", 2e-4, "rotten_tomatoes-galore"),
        (["--optim", "grass", "--learning_rate", "1e-3"], "grass", 1e-3, "rotten_tomatoes-grass"),
        (["--task_type", "instruction"], "grass", 2e-4, "alpaca_eval-grass"),
    ],
)
def test_method_dependent_defaults(flags, optim, lr, out):
    _, _, args = finetune.parse_args(flags)
    assert args.optim == optim and args.learning_rate == lr
    assert args.output_dir == f"outputs/{out}"
    if optim == "galore_adamw":
        assert args.optim_target_modules == "all-linear" and "rank=64" in args.optim_args


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses(config):
    model, data, args = finetune.parse_args([str(config)])
    values = yaml.safe_load(config.read_text())
    parsed = {**vars(model), **vars(data), **{k: getattr(args, k) for k in vars(args)}}
    for key, value in values.items():
        got = parsed[key]
        if key == "grass_target_modules":
            assert got == value, key
        elif key == "lora_target_modules":
            assert list(got) == value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert got == value, key
        else:
            assert str(getattr(got, "value", got)).lower() == str(value).lower(), key


def test_config_then_flags_and_json(tmp_path):
    _, _, args = finetune.parse_args([str(ROOT / "configs/default.yaml"), "--max_steps", "3"])
    assert args.max_steps == 3 and args.optim == "grass"
    (tmp_path / "c.json").write_text(json.dumps({"optim": "adamw_torch", "grass_rank": 4}))
    _, _, args = finetune.parse_args([str(tmp_path / "c.json")])
    assert args.optim == "adamw_torch" and args.grass_rank == 4 and args.learning_rate == 5e-5
    (tmp_path / "bad.yaml").write_text("not_a_flag: 1\n")
    with pytest.raises(ValueError, match="not_a_flag"):
        finetune.parse_args([str(tmp_path / "bad.yaml")])


# ---- bad input: one clear error, before training, nothing deleted -----------------------------


def test_unknown_task_fails_before_loading(tmp_path):
    with pytest.raises(ValueError, match="Unknown --task_name 'sst5'.*rotten_tomatoes"):
        finetune.main(["--task_name", "sst5", "--output_dir", str(tmp_path)])


def test_missing_model_path_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*leave the flag out"):
        finetune.main(
            ["--model_name_or_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path)]
        )


def test_lora_with_grass_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Choose one"):
        finetune.main(["--use_lora", "--optim", "grass", "--output_dir", str(tmp_path)])


def _csv(path: Path, labels) -> str:
    rows = ["sentence,label"] + [f"a good film number {i},{y}" for i, y in enumerate(labels)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "extra, error, match",
    [
        (["--grass_target_modules", "no_such_proj"], ValueError, "no_such_proj"),
        (["--grass_rank", "4096"], ValueError, "rank 4096 is larger"),
        (["--task_name", "rte"], ValueError, "not valid for task 'rte'"),
    ],
)
def test_bad_setup_fails_before_training_and_keeps_checkpoints(
    tiny_model_dir, tmp_path, extra, error, match
):
    out = tmp_path / "out"
    checkpoint = out / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"keep me")
    labels = [0, 1, 2, 0] if "rte" in extra else [0, 1, 0, 1]
    flags = tiny_flags(tiny_model_dir, out, "--train_file", _csv(tmp_path / "t.csv", labels))
    with pytest.raises(error, match=match):
        finetune.main([*flags, *extra])
    assert (checkpoint / "model.safetensors").read_bytes() == b"keep me"
    assert sorted(os.listdir(out)) == ["checkpoint-5"]


def test_missing_columns_are_reported(tiny_model_dir, tmp_path):
    (tmp_path / "t.csv").write_text("text,label\nhello,0\nbye,1\n")
    flags = tiny_flags(tiny_model_dir, tmp_path / "out", "--train_file", str(tmp_path / "t.csv"))
    with pytest.raises(ValueError, match="sentence"):
        finetune.main(flags)


# ---- end to end on tiny slices of the default datasets -----------------------------------------


@pytest.mark.slow
def test_default_classification_task_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    results = finetune.main(tiny_flags(tiny_model_dir, out))
    assert results["task"] == "rotten_tomatoes" and results["method"] == "grass"
    assert 0.0 <= results["eval"]["eval_accuracy"] <= 1.0
    report = json.loads((out / "resource_report.json").read_text())
    assert report["optimizer_state_bytes"] > 0 and report["tokens_per_s"] > 0
    assert json.loads((out / "eval_results.json").read_text())["eval_accuracy"] == pytest.approx(
        results["eval"]["eval_accuracy"]
    )


@pytest.mark.slow
def test_default_instruction_task_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    flags = tiny_flags(tiny_model_dir, out, "--task_type", "instruction", "--max_seq_length", "48")
    results = finetune.main([*flags, "--num_generations", "2", "--max_new_tokens", "4"])
    assert results["task"] == "alpaca_eval"
    assert torch.isfinite(torch.tensor(results["eval"]["eval_perplexity"]))
    lines = (out / "generations.jsonl").read_text().splitlines()
    assert (
        len(lines) == 2 and {"instruction", "reference", "generated"} <= json.loads(lines[0]).keys()
    )


@pytest.mark.slow
def test_lora_baseline_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    results = finetune.main([*tiny_flags(tiny_model_dir, out), "--use_lora", "--max_steps", "1"])
    assert results["method"] == "lora"
    report = results["resources"]
    assert 0 < report["optimizer_state_bytes"] < report["param_bytes"]

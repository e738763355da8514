#!/usr/bin/env python
"""Pretrain a LLaMA from scratch with Grass or a baseline (AdamW, GaLore, Muon, ...) via the Trainer.

    python scripts/pretrain.py                                   # demo preset on Shakespeare
    python scripts/pretrain.py --optim grass --max_steps 20 --output_dir out/p
    python scripts/pretrain.py --preset 60m --optim adamw_torch  # GaLore's LLaMA-60M
    python scripts/pretrain.py --model_config my_llama.json --train_files a.txt b.txt
    python scripts/pretrain.py --dataset_name allenai/c4 --dataset_config_name en --streaming \\
        --tokenizer_name t5-base --preset 60m                    # C4 (online)
    python scripts/pretrain.py configs/pretrain/demo.yaml        # a config file, flags on top

Without flags it trains the "demo" preset (2.9M parameters) on Shakespeare's works (the
``shakespeare`` package; whole works held out for validation) with a byte-level BPE tokenizer
trained on the training works and cached, sequences of 256 tokens packed from the text,
batch 16, 400 steps, cosine schedule with 10% warm-up, validation every 50 steps. Learning rates
and each method's extra arguments default by method (``hf_grass.methods``: LEARNING_RATES), and
Grass's scale and selection rule follow the pretraining ablations (GRASS_PRETRAIN_DEFAULTS).
Writes ``eval_results.json`` (``eval_loss``, ``perplexity``), ``train_results.json``,
``trainer_state.json`` (losses step by step), ``resource_report.json`` and checkpoints
(``--save_steps``; resume with ``--resume_from_checkpoint true``) to ``output_dir``
(default ``outputs/pretrain-<preset>-<method>``). Every flag of TrainingArguments and the
``grass_*`` flags are accepted; a mistake prints one line ``pretrain.py: error: ...``, exit 2.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    # transformers imports peft, and peft imports bitsandbytes when it is installed (GaLore's and
    # APOLLO's packages pull it in); that import logs a warning about CPU kernels that no user of
    # this script can act on. So hf_grass.trainer, and with it transformers and peft, is imported
    # while `import bitsandbytes` fails, which peft allows for (`cli.without_bitsandbytes`, written
    # out here as hf_grass is not loaded yet). A baseline that uses it imports it when chosen.
    _hold_bitsandbytes = "bitsandbytes" not in sys.modules
    if _hold_bitsandbytes:
        sys.modules["bitsandbytes"] = None  # an import of it raises ImportError
    import hf_grass.trainer  # noqa: F401  (loads transformers and peft)
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import hf_grass.trainer  # noqa: F401  (loads transformers and peft)
finally:
    if _hold_bitsandbytes:
        del sys.modules["bitsandbytes"]

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PretrainedConfig,
    PreTrainedModel,
)

from hf_grass import cli, methods
from hf_grass import corpus as grass_corpus
from hf_grass.errors import MissingFileError, UsageError
from hf_grass.models import LLAMA_PRESETS, llama_config
from hf_grass.report import ResourceReportCallback, format_report
from hf_grass.trainer import GrassTrainer, GrassTrainingArguments

logger = logging.getLogger("pretrain")

# Learning rates when --learning_rate is not given, by method, from the ablations of BENCHMARKS.md
# section 12 (the registry, hf_grass.methods, says which).
LEARNING_RATES = methods.learning_rates(methods.PRETRAIN)
# Grass's pretraining defaults from the same ablations (scale 0.25, rows sampled without
# replacement); GaLore, APOLLO, Fira and Muon get their target modules and options there too.
GRASS_PRETRAIN_DEFAULTS = methods.get("grass").pretrain_args
SCRIPT_DEFAULTS: dict[str, Any] = dict(
    cli.TRAINER_DEFAULTS,
    max_steps=400,
    lr_scheduler_type="cosine",
    eval_strategy="steps",
    eval_steps=50,
    save_strategy="steps",
    save_steps=200,
    save_total_limit=2,
    logging_steps=10,
    dataloader_pin_memory=torch.cuda.is_available(),
    include_num_input_tokens_seen=True,
)


@dataclass
class PretrainArguments:
    preset: str = field(
        default="demo",
        metadata={"help": f"LLaMA size: {', '.join(p for p in LLAMA_PRESETS if p != 'tiny')}."},
    )
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "A model config JSON (a model's config.json: LLaMA, or any causal LM family "
            "by its model_type, e.g. a MoE model such as configs/models/mixtral-tiny.json) "
            "instead of --preset."
        },
    )
    model_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the weights; 'bfloat16' trains in pure bf16 (see "
            "--grass_stochastic_rounding).",
            "choices": ["float32", "bfloat16"],
        },
    )
    train_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Local corpus: .txt (one document per file), .jsonl/.json or .parquet "
            "(--text_column). Default: Shakespeare's works."
        },
    )
    validation_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Validation corpus, same format. Default: the last --validation_fraction of "
            "the training blocks."
        },
    )
    test_files: list[str] = field(
        default_factory=list,
        metadata={"help": "Test corpus, same format, evaluated once after training."},
    )
    hold_out_test: bool = field(
        default=False,
        metadata={
            "help": "Evaluate once after training on a test split that neither training nor the "
            "validation during training sees: 3 more held-out works of the default corpus (7 "
            "percent), a Hub dataset's test split, or --test_files. For tuning on validation and "
            "reporting on test."
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset (online), e.g. allenai/c4."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The Hub dataset's configuration, e.g. en."}
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream the Hub dataset instead of downloading it."}
    )
    text_column: str = field(default="text", metadata={"help": "Column that holds the text."})
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer folder or Hub id. Default: a byte-level BPE of "
            "--tokenizer_vocab_size tokens trained on the training corpus (cached)."
        },
    )
    tokenizer_vocab_size: int = field(
        default=grass_corpus.DEFAULT_VOCAB_SIZE,
        metadata={"help": "Size of the default tokenizer."},
    )
    seq_len: int = field(default=256, metadata={"help": "Tokens per packed training sequence."})
    validation_fraction: float = field(
        default=0.05,
        metadata={"help": "Held-out share of the training blocks when no validation files."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N validation blocks."}
    )


@dataclass
class TrainingArguments(cli.BuiltOptimArguments, GrassTrainingArguments):
    """GrassTrainingArguments whose ``--optim`` also takes the baselines built here (Muon,
    Adam-mini, Fira, BAdam; see ``hf_grass.methods``)."""


def parse_args(argv: list[str]) -> tuple[PretrainArguments, TrainingArguments]:
    """Flags, optionally after one .json/.yaml/.yml config file; flags win over the file."""
    parser = HfArgumentParser((PretrainArguments, TrainingArguments), epilog=cli.EPILOG)
    argv = cli.expand_config(parser, argv, "pretrain.py")
    given = cli.given_flags(argv, ("optim", "preset", "model_config"))
    optim = given["optim"] or SCRIPT_DEFAULTS["optim"]
    method = cli.method_name(optim)
    size = Path(given["model_config"]).stem if given["model_config"] else given["preset"] or "demo"
    defaults = {
        **SCRIPT_DEFAULTS,
        "optim": optim,
        "output_dir": f"outputs/pretrain-{size}-{method}",
    }
    entry = methods.find(method)
    if entry is not None:
        # Its learning rate and extra arguments: Grass's scale and selection; GaLore's and
        # APOLLO's target modules (HF's need them) and their papers' scale at rank 128; ...
        defaults.update(entry.trainer_defaults(methods.PRETRAIN))
    parser.set_defaults(**defaults)
    return cli.parse_dataclasses(parser, argv)


def check_preset(pargs: PretrainArguments) -> None:
    """Refuse an unknown ``--preset`` (unless ``--model_config`` replaces it)."""
    if pargs.model_config is None and pargs.preset not in LLAMA_PRESETS:
        raise UsageError(
            f"Unknown --preset {pargs.preset!r}: choose one of {', '.join(LLAMA_PRESETS)}, or "
            "pass --model_config."
        )


def model_config(pargs: PretrainArguments, vocab_size: int) -> PretrainedConfig:
    """The preset's LlamaConfig, or the JSON's config of its ``model_type`` (LLaMA when it has
    none), with the tokenizer's vocabulary size."""
    if pargs.model_config:
        if not Path(pargs.model_config).is_file():
            raise MissingFileError(f"--model_config {pargs.model_config} does not exist.")
        values = json.loads(Path(pargs.model_config).read_text())
        model_type = values.pop("model_type", "llama")
        try:
            config = AutoConfig.for_model(model_type, **values)
        except ValueError as error:
            raise UsageError(
                f"--model_config {pargs.model_config}: model_type {model_type!r} is not one "
                "transformers knows; use the model_type of a causal LM family (llama, mixtral, "
                "qwen3_moe, ...)."
            ) from error
        config.vocab_size = vocab_size
    else:
        check_preset(pargs)
        config = llama_config(pargs.preset, vocab_size=vocab_size)
    if pargs.seq_len > config.max_position_embeddings:
        raise UsageError(
            f"--seq_len {pargs.seq_len} is longer than the model allows "
            f"(max_position_embeddings {config.max_position_embeddings}): lower it."
        )
    return config


def build_model(config: PretrainedConfig, tokenizer, dtype: torch.dtype) -> PreTrainedModel:
    """A randomly initialized causal LM of ``config``, with the tokenizer's special tokens.

    Packed blocks hold no padding, so the model gets no pad token: LLaMA makes the pad token's
    embedding row a zero ``padding_idx`` that never trains, and the default tokenizer pads with
    its end-of-text token, the one that ends every document of the corpus (`load_tokenizer`
    drops such a pad token, so that the Trainer does not copy it into the config either).
    """
    config.pad_token_id = None
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_tokenizer(pargs: PretrainArguments, spec: grass_corpus.CorpusSpec, raw):
    """The tokenizer of ``--tokenizer_name`` or the default one, without a pad token that is its
    end-of-text token (see `build_model`)."""
    if pargs.tokenizer_name is None:
        tokenizer = grass_corpus.default_tokenizer(spec, raw["train"], pargs.tokenizer_vocab_size)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(pargs.tokenizer_name)
        except OSError as e:
            raise UsageError(
                f"Cannot load the tokenizer {pargs.tokenizer_name}: {e}. Offline, pass a local "
                "folder, or leave --tokenizer_name out to train one on the corpus."
            ) from e
        if tokenizer.eos_token is None:
            raise UsageError(f"The tokenizer {pargs.tokenizer_name} has no end-of-text token.")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        # The Trainer copies the tokenizer's pad token into the model's config, and a model
        # loaded from that config (a checkpoint) would make end-of-text its padding row.
        tokenizer.pad_token = None
    return tokenizer


def main(argv: list[str] | None = None) -> dict[str, Any]:
    pargs, args = parse_args(sys.argv[1:] if argv is None else argv)
    cli.setup_logging(args, ("pretrain", "hf_grass"))
    method = cli.method_name(args.optim)
    spec = grass_corpus.CorpusSpec(
        train_files=pargs.train_files,
        validation_files=pargs.validation_files,
        test_files=pargs.test_files,
        hold_out_test=pargs.hold_out_test,
        dataset_name=pargs.dataset_name,
        dataset_config_name=pargs.dataset_config_name,
        text_column=pargs.text_column,
        streaming=pargs.streaming,
    )
    # Bad input fails here, before the corpus is read or anything is written.
    grass_corpus.check_corpus(spec)
    check_preset(pargs)
    entry = methods.find(method)
    if entry is not None:
        entry.require()  # its package is installed
    if pargs.seq_len < 2:
        raise UsageError(f"--seq_len {pargs.seq_len}: a causal LM needs at least 2 tokens.")
    resume = cli.resolve_resume(args.resume_from_checkpoint, args.output_dir)

    with args.main_process_first(desc="tokenizer and packed corpus"):  # rank 0 writes the caches
        raw = grass_corpus.load_corpus(spec)
        tokenizer = load_tokenizer(pargs, spec, raw)
        config = model_config(pargs, len(tokenizer))
        blocks = grass_corpus.packed_blocks(
            spec, raw, tokenizer, pargs.seq_len, pargs.validation_fraction
        )
    eval_blocks = blocks["validation"]
    if pargs.max_eval_samples is not None and not spec.streaming:
        eval_blocks = eval_blocks.select(range(min(pargs.max_eval_samples, len(eval_blocks))))

    transformers.set_seed(args.seed)  # the initial weights
    model = build_model(config, tokenizer, getattr(torch, pargs.model_dtype))
    n_params = sum(p.numel() for p in model.parameters())
    train_size = "streamed" if spec.streaming else f"{len(blocks['train']):,} blocks"
    logger.info(
        "Pretraining %s (%.1fM parameters, vocab %d) with %s on %s of %d tokens; output %s",
        pargs.model_config or pargs.preset,
        n_params / 1e6,
        config.vocab_size,
        method,
        train_size,
        pargs.seq_len,
        args.output_dir,
    )
    report = ResourceReportCallback(method=method)
    optimizer = None  # the Trainer builds it, unless the registry's method is built here
    with cli.values_as_usage_errors():
        if entry is not None and entry.build is not None:
            optimizer = entry.build_optimizer(model.to(args.device), args)
        trainer = GrassTrainer(  # checks Grass targets and ranks against the model here
            model=model,
            args=args,
            train_dataset=blocks["train"],
            eval_dataset=eval_blocks,
            data_collator=grass_corpus.causal_lm_collator,
            processing_class=tokenizer,
            callbacks=[report],
            optimizers=(optimizer, None),
        )

    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    metrics = final_evaluation(trainer)
    metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    test: dict[str, float] = {}
    if "test" in blocks:
        test = trainer.evaluate(blocks["test"], metric_key_prefix="test")
        test["test_perplexity"] = math.exp(min(test["test_loss"], 50.0))
        trainer.log_metrics("test", test)
        trainer.save_metrics("test", test)
    if args.should_save:
        print(f"\n== pretrain {pargs.model_config or pargs.preset} / {method} ==")
        print(f"  eval_loss: {metrics['eval_loss']:.4f}  perplexity: {metrics['perplexity']:.2f}")
        if test:
            print(
                f"  test_loss: {test['test_loss']:.4f}  perplexity: {test['test_perplexity']:.2f}"
            )
        print(f"  resources: {format_report(report.report)}")
        print(f"  written to {args.output_dir}")
    return {"method": method, "eval": metrics, "test": test, "resources": report.report}


def final_evaluation(trainer: GrassTrainer) -> dict[str, float]:
    """The evaluation logged at the last step if the schedule ran one there, else a new one."""
    last = [e for e in trainer.state.log_history if "eval_loss" in e]
    if last and last[-1].get("step") == trainer.state.global_step:
        return {k: v for k, v in last[-1].items() if k != "step"}
    return trainer.evaluate()


def run(argv: list[str] | None = None) -> int:
    """`main` as a command: a usage error prints one line and returns status 2."""
    return cli.run(main, argv, "pretrain.py")


if __name__ == "__main__":
    sys.exit(run())

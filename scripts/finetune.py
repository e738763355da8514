#!/usr/bin/env python
"""Finetune a LLaMA-family model with Grass or a baseline, on GLUE-style or Alpaca-style data.

    python scripts/finetune.py --optim grass                 # SmolLM2-135M on Rotten Tomatoes
    python scripts/finetune.py configs/lora.yaml             # a config file (JSON or YAML) ...
    python scripts/finetune.py configs/default.yaml --max_steps 8   # ... with flags on top
    python scripts/finetune.py --task_name rte --optim adamw_torch  # GLUE (Hub, or its cache)
    python scripts/finetune.py --task_type instruction --optim grass  # AlpacaEval records
    python scripts/finetune.py --do_train false --model_name_or_path outputs/rotten_tomatoes-grass
                                                             # evaluate a saved model only

Every flag of ModelArguments, DataArguments and GrassTrainingArguments (all of transformers'
TrainingArguments plus the ``grass_*`` ones) is accepted. Without flags the run follows
Protocol 1 of BENCHMARKS.md: max length 64, batch 16, 64 steps, linear schedule with 10%
warm-up, weight decay 0, max grad norm 1.0, seed 42, one evaluation on the whole validation
split. The learning rate and a method's extra arguments default by method (``hf_grass.methods``,
LEARNING_RATES). Writes train and eval metrics (``train_results.json``, ``eval_results.json``),
the loss log (``trainer_state.json``), ``resource_report.json``, with ``--hold_out_test`` the
test split's metrics (``test_results.json``) and, for instruction tuning, ``generations.jsonl``
to ``output_dir`` (default ``outputs/<task>-<method>``).
``--do_train false`` only evaluates the model (a checkpoint saved by ``--save_final_model true``,
say) on the validation split: no optimizer is created, and ``eval_results.json`` is written as a
training run writes it (default output ``outputs/<task>-eval``).

A mistake in the flags, the config file or the data files stops the script before training (and
before the model is loaded, unless the check needs the model) with one line
``finetune.py: error: <what is wrong and how to fix it>`` on stderr and exit status 2, as
argparse does. Set ``HF_GRASS_DEBUG=1`` to see the traceback of such errors too; any other error
always shows its traceback.
"""

from __future__ import annotations

import json
import logging
import math
import re
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

import numpy as np
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    HfArgumentParser,
)

from hf_grass import cli, methods
from hf_grass import data as grass_data
from hf_grass.errors import MissingFileError, UsageError
from hf_grass.layers import is_linear_layer
from hf_grass.report import ResourceReportCallback, format_report, limit_malloc_caching
from hf_grass.targets import match_target_modules
from hf_grass.trainer import GrassTrainer, GrassTrainingArguments

logger = logging.getLogger("finetune")

DEFAULT_TASKS = {"classification": "rotten_tomatoes", "instruction": "alpaca_eval"}
TASK_TYPES = ("classification", "instruction")
FALSE_VALUES = ("false", "f", "no", "n", "0")  # what HfArgumentParser reads as False
# Learning rates when --learning_rate is not given (BENCHMARKS.md, Protocol 1), by method.
LEARNING_RATES = methods.learning_rates(methods.FINETUNE)
# TrainingArguments defaults of this script (Protocol 1's), applied unless given.
SCRIPT_DEFAULTS: dict[str, Any] = dict(
    cli.TRAINER_DEFAULTS,
    max_steps=64,
    lr_scheduler_type="linear",
    eval_strategy="no",
    save_strategy="no",
    logging_steps=8,
    dataloader_pin_memory=torch.cuda.is_available(),
    do_train=True,  # --do_train false: evaluate only
)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local folder or Hub id of a causal LM (LLaMA family first). Default: "
            "SmolLM2-135M-Instruct, converted once from the bundled GGUF (offline)."
        },
    )
    model_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype the weights are loaded in; 'bfloat16' trains a pure-bf16 model "
            "(no fp32 master copy; see --grass_stochastic_rounding).",
            "choices": ["float32", "bfloat16", "float16"],
        },
    )
    use_lora: bool = field(
        default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "Modules that get LoRA adapters."},
    )
    freeze_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Do not train the input embedding (a tied output head is frozen with it): "
            "the common way to save its optimizer state, for comparison with "
            "--grass_embeddings."
        },
    )
    limit_malloc_caching: bool = field(
        default=False,
        metadata={
            "help": "CPU, glibc: return freed activations to the system at once (0.4-0.7 GB less "
            "peak memory on the default finetune, same results, up to 40 percent more CPU time in page "
            "faults). See BENCHMARKS.md section 11."
        },
    )
    save_final_model: bool = field(
        default=False,
        metadata={"help": "Write the finetuned model (stock transformers format) to output_dir."},
    )


@dataclass
class DataArguments:
    task_name: str | None = field(
        default=None,
        metadata={
            "help": "'rotten_tomatoes' (offline sentiment, the default), 'alpaca_eval' (offline "
            f"instructions) or a GLUE task ({', '.join(grass_data.GLUE_TASKS)}; needs the Hub, "
            "or its datasets cache from an earlier online run, unless --train_file is given)."
        },
    )
    task_type: str = field(
        default="classification",
        metadata={"help": "Sequence classification or instruction tuning.", "choices": TASK_TYPES},
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "CSV/JSON training data: sentence (or sentence1, sentence2) and label; or "
            "instruction, input, output for --task_type instruction."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "CSV/JSON validation data, same columns."}
    )
    hold_out_test: bool = field(
        default=False,
        metadata={
            "help": "Evaluate once after training on a test split that neither training nor the "
            "validation sees: the reviews of 49 more movies of rotten_tomatoes (test_results.json)."
            " For tuning on validation and reporting on test."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N training examples."}
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Keep the first N validation examples (and test, --hold_out_test)."},
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={
            "help": "Truncate to this many tokens (default 64 classification, 256 instruction)."
        },
    )
    prompt_template: str = field(
        default="auto",
        metadata={
            "help": "Instruction prompt: the tokenizer's chat template, the Alpaca prompt, or auto.",
            "choices": ["auto", "chat", "alpaca"],
        },
    )
    num_generations: int = field(
        default=4,
        metadata={
            "help": "Instruction tuning: validation prompts answered into generations.jsonl."
        },
    )
    max_new_tokens: int = field(
        default=64, metadata={"help": "Instruction tuning: tokens generated per answer."}
    )


@dataclass
class TrainingArguments(cli.BuiltOptimArguments, GrassTrainingArguments):
    """GrassTrainingArguments whose ``--optim`` also takes the baselines built here (Muon,
    Adam-mini, Fira, BAdam; see ``hf_grass.methods``)."""


# ---- arguments ---------------------------------------------------------------------------------


def same_targets_as_grass(model: torch.nn.Module, args: GrassTrainingArguments) -> str:
    """A regex of exactly the modules Grass would project, for HF's GaLore/APOLLO, Fira and Muon
    (the methods with ``grass_targets`` in ``hf_grass.methods``).

    Their ``optim_target_modules="all-linear"`` takes every ``nn.Linear``, the classifier head
    (``score``) among them, which Grass leaves out: a comparison must project the same weights.
    """
    names = match_target_modules(model, args.grass_targets())
    modules = dict(model.named_modules())
    linear = [n for n in names if n in modules and is_linear_layer(modules[n])]
    if len(linear) < len(names):
        logger.warning(
            "%s projects linear layers only: the experts of %d MoE layers, which Grass "
            "projects, stay dense (plain AdamW) under it.", args.optim, len(names) - len(linear),
        )  # fmt: skip
    logger.info("%s takes Grass's %d linear target modules.", args.optim, len(linear))
    return "|".join(re.escape(name) for name in linear)


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Flags, optionally after one .json/.yaml/.yml config file; flags win over the file."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), epilog=cli.EPILOG)
    argv = cli.expand_config(parser, argv, "finetune.py")
    # Pre-parse what the method-dependent defaults need.
    given = cli.given_flags(
        argv, ("optim", "task_name", "task_type", "train_file", "use_lora", "do_train")
    )
    use_lora = str(given["use_lora"] or False).lower() in ("true", "1", "yes", "y")
    optim = given["optim"] or ("adamw_torch_fused" if use_lora else SCRIPT_DEFAULTS["optim"])
    method = cli.method_name(optim, use_lora)
    task_type = given["task_type"] or "classification"
    task = given["task_name"] or ("custom" if given["train_file"] else DEFAULT_TASKS.get(task_type))

    eval_only = str(given["do_train"]).lower() in FALSE_VALUES
    output = f"outputs/{task}-{'eval' if eval_only else method}"
    defaults = {**SCRIPT_DEFAULTS, "optim": optim, "output_dir": output}
    entry = methods.find(method)
    if entry is not None:
        # Its learning rate and extra arguments (GaLore: rank 64, as in Protocol 1); target
        # modules are set once the model is loaded: Grass's (see same_targets_as_grass).
        defaults.update(entry.trainer_defaults(methods.FINETUNE))
    parser.set_defaults(**defaults)
    return cli.parse_dataclasses(parser, argv)


# ---- data and model ----------------------------------------------------------------------------


def resolve_model_path(model_args: ModelArguments) -> str:
    """The model folder or Hub id; a missing local path fails here, before anything runs."""
    name = model_args.model_name_or_path
    if name is None:
        from hf_grass.models import default_model_path

        return str(default_model_path())
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") != 1
    if looks_local and not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise MissingFileError(
            f"--model_name_or_path {name} {what}: pass a folder written by save_pretrained, a "
            "Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct (online), or leave the flag out "
            "to use the bundled SmolLM2-135M-Instruct."
        )
    return str(path) if path.exists() else name


def check_task(data_args: DataArguments) -> str:
    """The task name, validated: fails before the model or data are loaded."""
    if data_args.task_type not in TASK_TYPES:
        raise UsageError(
            f"Unknown --task_type {data_args.task_type!r}: use one of {', '.join(TASK_TYPES)}."
        )
    task = data_args.task_name
    if task is None:
        return "custom" if data_args.train_file else DEFAULT_TASKS[data_args.task_type]
    known = (
        [DEFAULT_TASKS["classification"], *grass_data.GLUE_TASKS]
        if data_args.task_type == "classification"
        else [DEFAULT_TASKS["instruction"]]
    )
    if task not in known:
        raise UsageError(
            f"Unknown --task_name {task!r} for --task_type {data_args.task_type}: use one of "
            f"{', '.join(known)}, or pass --train_file/--validation_file."
        )
    if data_args.validation_file and not data_args.train_file:
        raise UsageError("--validation_file needs --train_file too.")
    if data_args.hold_out_test and (task != "rotten_tomatoes" or data_args.train_file):
        raise UsageError(
            f"--hold_out_test holds out movies of the built-in rotten_tomatoes task, not of "
            f"{task}: drop the flag (GLUE's test labels are hidden), or evaluate a saved model on "
            "your own test file with --do_train false --validation_file."
        )
    return task


def check_eval_only(data_args: DataArguments, args: GrassTrainingArguments) -> None:
    """``--do_train false`` needs a validation split and cannot resume a training run."""
    if args.do_train:
        return
    if data_args.train_file and not data_args.validation_file:
        raise UsageError(
            "--do_train false evaluates on the validation split, but --train_file comes without "
            "--validation_file: pass the file to evaluate on as --validation_file."
        )
    if args.resume_from_checkpoint is not None:
        raise UsageError(
            "--do_train false with --resume_from_checkpoint: resuming continues training. To "
            "evaluate a checkpoint, pass its folder as --model_name_or_path instead."
        )


def load_raw_data(task: str, data_args: DataArguments):
    if data_args.train_file:
        if data_args.task_type == "instruction":
            return grass_data.load_instruction_files(
                data_args.train_file, data_args.validation_file
            )
        raw = grass_data.load_classification_files(data_args.train_file, data_args.validation_file)
        if task in grass_data.GLUE_TASKS:
            for split in raw.values():
                grass_data.validate_labels(split, grass_data.GLUE_TASKS[task].num_labels, task)
        return raw
    if task == "rotten_tomatoes":
        return grass_data.load_rotten_tomatoes(data_args.hold_out_test)
    if task == "alpaca_eval":
        return grass_data.load_alpaca_eval()
    return grass_data.load_glue(task)


def _truncate(raw, data_args: DataArguments):
    for split, limit in (
        ("train", data_args.max_train_samples),
        ("validation", data_args.max_eval_samples),
        ("test", data_args.max_eval_samples),
    ):
        if limit is not None and split in raw:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    return raw


def _sort_by_length(dataset):
    """Evaluation order by length, so that batches carry little padding."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return dataset.select(np.argsort(lengths, kind="stable"))


def _metric(task: str, num_labels: int):
    from hf_grass.metrics import load_glue_metric

    if task in grass_data.GLUE_TASKS:
        return load_glue_metric(task)
    return load_glue_metric("stsb" if num_labels == 1 else "accuracy")


def build_classification(task, raw, tokenizer, model_path, model_args, max_len, dtype):
    num_labels = grass_data.infer_num_labels(raw["train"])
    glue = grass_data.GLUE_TASKS.get(task)
    if glue is not None and glue.sentence1_key in raw["train"].column_names:
        keys = (glue.sentence1_key, glue.sentence2_key)  # the Hub's GLUE columns
    else:
        keys = grass_data.sentence_keys(raw["train"])  # sentence or sentence1/sentence2
    datasets_ = grass_data.tokenize_classification(raw, tokenizer, max_len, *keys)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=num_labels,
        dtype=dtype,
        pad_token_id=tokenizer.pad_token_id,
        problem_type="regression" if num_labels == 1 else "single_label_classification",
    )
    metric = _metric(task, num_labels)

    def compute_metrics(prediction) -> dict[str, float]:
        logits = prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        preds = logits.squeeze(-1) if num_labels == 1 else logits.argmax(-1)
        return metric.compute(predictions=preds, references=prediction.label_ids)

    collator = DataCollatorWithPadding(tokenizer)
    return model, datasets_, collator, compute_metrics, num_labels


def build_instruction(raw, tokenizer, model_path, data_args, max_len, dtype):
    datasets_ = grass_data.tokenize_instruction(raw, tokenizer, max_len, data_args.prompt_template)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    collator = DataCollatorForSeq2Seq(
        tokenizer, label_pad_token_id=grass_data.IGNORE_INDEX, padding=True
    )
    return model, datasets_, collator


def apply_lora(model, model_args: ModelArguments, task_type: str):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="SEQ_CLS" if task_type == "classification" else "CAUSAL_LM",
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=list(model_args.lora_target_modules),
    )
    with cli.without_bitsandbytes():  # peft's bitsandbytes layers only fit quantized models
        model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


@torch.no_grad()
def write_generations(model, tokenizer, raw_validation, data_args, path: Path) -> list[dict]:
    """Greedy answers to the first validation prompts, one JSON object per line."""
    model.eval()
    device = next(model.parameters()).device
    records = []
    for example in raw_validation.select(
        range(min(data_args.num_generations, len(raw_validation)))
    ):
        prompt = grass_data.format_prompt(
            example["instruction"], example["input"], tokenizer, data_args.prompt_template
        )
        use_chat = data_args.prompt_template == "chat" or (
            data_args.prompt_template == "auto" and bool(tokenizer.chat_template)
        )
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=not use_chat).to(device)
        out = model.generate(
            **enc,
            max_new_tokens=data_args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        records.append(
            {
                "instruction": example["instruction"],
                "reference": example["output"],
                "generated": answer,
            }
        )
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return records


# ---- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, args = parse_args(sys.argv[1:] if argv is None else argv)
    cli.setup_logging(args, ("finetune", "hf_grass"))
    # Evaluation only trains with no method: "eval" names its results and default output folder.
    method = cli.method_name(args.optim, model_args.use_lora) if args.do_train else "eval"
    if args.include_num_input_tokens_seen == "no":
        args.include_num_input_tokens_seen = "non_padding"  # tokens/s in the resource report

    # Bad input fails here, before the model is loaded or anything is written.
    task = check_task(data_args)
    check_eval_only(data_args, args)
    grass_data.check_sample_limits(data_args.max_train_samples, data_args.max_eval_samples)
    if model_args.freeze_embeddings and args.grass_embeddings:
        raise UsageError(
            "--freeze_embeddings with --grass_embeddings: a frozen embedding has nothing to "
            "project. Choose one."
        )
    if model_args.use_lora and (args.use_grass or args.optim in methods.BUILT_HERE):
        raise UsageError(
            f"--use_lora with --optim {args.optim}: LoRA trains its adapters with AdamW. Choose "
            f"one: --use_lora --optim adamw_torch_fused, or --optim {args.optim} without "
            "--use_lora."
        )
    entry = methods.find(method) if args.do_train else None
    if entry is not None:
        entry.require()  # its package is installed
    resume = cli.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    model_path = resolve_model_path(model_args)
    logger.info(
        "Task %s (%s), model %s, method %s, output %s",
        task,
        data_args.task_type,
        model_path,
        method,
        args.output_dir,
    )

    if model_args.limit_malloc_caching:
        # Freed activations go back to the system at once rather than to glibc's heap: 0.4-0.7 GB
        # less peak memory on a CPU, same results, more page faults (see limit_malloc_caching).
        limit_malloc_caching()
    raw = _truncate(load_raw_data(task, data_args), data_args)
    if not args.do_train:
        # Evaluation only: the train split keeps its columns and label set, not its examples.
        raw["train"] = raw["train"].select([])
    if "validation" not in raw:
        logger.warning("No validation split: training only (pass --validation_file to evaluate).")
    max_len = data_args.max_seq_length or (64 if data_args.task_type == "classification" else 256)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except OSError as e:
        raise UsageError(
            f"Cannot load {model_path}: {e}. Offline, pass a local folder to "
            "--model_name_or_path, or leave it out to use the bundled SmolLM2-135M-Instruct."
        ) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = getattr(torch, model_args.model_dtype)
    # Seed before the model is built: a new head (the classifier's `score`) and LoRA's adapters
    # are initialized at random here, so --seed must fix them, not the RNG state of the caller.
    if args.full_determinism:
        transformers.enable_full_determinism(args.seed)
    else:
        transformers.set_seed(args.seed)
    if data_args.task_type == "classification":
        model, tokenized, collator, compute_metrics, _ = build_classification(
            task, raw, tokenizer, model_path, model_args, max_len, dtype
        )
    else:
        model, tokenized, collator = build_instruction(
            raw, tokenizer, model_path, data_args, max_len, dtype
        )
        compute_metrics = None
    if model_args.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if model_args.use_lora:
        model = apply_lora(model, model_args, data_args.task_type)
    if entry is not None and entry.grass_targets and args.optim_target_modules is None:
        args.optim_target_modules = same_targets_as_grass(model, args)
    optimizer = None  # the Trainer builds it, unless the registry's method is built here
    if entry is not None and entry.build is not None:
        with cli.values_as_usage_errors():  # a bad --optim_args value
            optimizer = entry.build_optimizer(model.to(args.device), args)

    eval_dataset = _sort_by_length(tokenized["validation"]) if "validation" in tokenized else None
    report = ResourceReportCallback(method=method)
    # Evaluation only creates no optimizer: Grass's checks of targets and ranks do not apply.
    trainer_class = GrassTrainer if args.do_train else transformers.Trainer
    with cli.values_as_usage_errors():
        trainer = trainer_class(  # GrassTrainer checks Grass targets and ranks against the model
            model=model,
            args=args,
            train_dataset=tokenized["train"] if args.do_train else None,
            eval_dataset=eval_dataset,
            data_collator=collator,
            processing_class=tokenizer,
            compute_metrics=compute_metrics,
            callbacks=[report],
            optimizers=(optimizer, None),
        )
    if data_args.task_type == "classification":
        # Classification heads average their loss per micro-batch: let the Trainer divide by the
        # accumulation steps (it would otherwise expect a loss summed over the window's tokens).
        trainer.model_accepts_loss_kwargs = False

    results: dict[str, Any] = {"task": task, "method": method}
    if args.do_train:
        train_result = trainer.train(resume_from_checkpoint=resume)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()  # trainer_state.json: the logged training loss, step by step
        results["resources"] = report.report
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        if data_args.task_type == "instruction":
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results["eval"] = metrics
        if (
            data_args.task_type == "instruction"
            and data_args.num_generations > 0
            and args.should_save
        ):
            path = Path(args.output_dir) / "generations.jsonl"
            results["generations"] = write_generations(
                model, tokenizer, raw["validation"], data_args, path
            )
            logger.info("Wrote %d generated answers to %s", len(results["generations"]), path)
    if "test" in tokenized:
        test = trainer.evaluate(_sort_by_length(tokenized["test"]), metric_key_prefix="test")
        trainer.log_metrics("test", test)
        trainer.save_metrics("test", test)
        results["test"] = test
    if model_args.save_final_model:
        trainer.save_model()
        tokenizer.save_pretrained(args.output_dir)

    if args.should_save:
        print(f"\n== {task} / {method} ==")
        for key, value in {**results.get("eval", {}), **results.get("test", {})}.items():
            if key.startswith(("eval_", "test_")) and not key.endswith(
                ("runtime", "per_second", "_time")
            ):
                print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
        if args.do_train:
            print(f"  resources: {format_report(report.report)}")
        print(f"  written to {args.output_dir}")
    return results


def run(argv: list[str] | None = None) -> int:
    """`main` as a command: a usage error prints one line and returns status 2."""
    return cli.run(main, argv, "finetune.py")


if __name__ == "__main__":
    sys.exit(run())

"""scripts/finetune.py: argument handling, configs, bad input, and tiny end-to-end runs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_script

from hf_grass.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

finetune = load_script("finetune")


def run_script(*flags: str, debug: bool = False) -> subprocess.CompletedProcess:
    """`python scripts/finetune.py FLAGS` in a fresh process, importing this checkout."""
    env = {k: v for k, v in os.environ.items() if k != finetune.cli.DEBUG_ENV}
    env.update(
        OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    )
    if debug:
        env[finetune.cli.DEBUG_ENV] = "1"
    script = str(ROOT / "scripts" / "finetune.py")
    return subprocess.run(
        [sys.executable, script, *flags], capture_output=True, text=True, env=env, timeout=300
    )


def logged_losses(out: Path) -> list[float]:
    """The training losses that the run logged, from its ``trainer_state.json``."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


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
        (["--use_lora"], "adamw_torch_fused", 5e-4, "rotten_tomatoes-lora"),
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
        # Targets are set once the model is loaded: Grass's (see the next test).
        assert args.optim_target_modules is None and "rank=64" in args.optim_args


def test_galore_projects_the_modules_grass_projects_not_the_classifier_head():
    """HF's ``optim_target_modules="all-linear"`` would put ``score`` into GaLore's projected
    group; a fair comparison projects Grass's targets (every linear layer but the head)."""
    from conftest import tiny_llama
    from transformers.trainer_utils import check_target_module_exists

    model = tiny_llama("classifier", num_labels=2, pad_token_id=0)
    _, _, args = finetune.parse_args(["--optim", "galore_adamw"])
    regex = finetune.same_targets_as_grass(model, args)
    matched = {n for n, _ in model.named_modules() if check_target_module_exists(regex, n)}
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "score" in linear and matched == linear - {"score"}


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


TUNED = sorted((ROOT / "configs" / "finetune").glob("*.yaml"))


@pytest.mark.parametrize("config", TUNED, ids=[c.stem for c in TUNED])
def test_every_finetune_comparison_point_parses_to_the_values_it_names(config):
    compare = load_script("compare", "benchmarks")
    spec = compare.load_spec(str(config))
    assert spec["script"] == "finetune"
    for method, entry in spec["methods"].items():
        for flags in compare.grid_points(method, entry).values():
            flags = {**spec["flags"], **flags}
            model, data, args = finetune.parse_args(compare.as_flags(flags))
            parsed = {**vars(model), **vars(data), **{k: getattr(args, k) for k in vars(args)}}
            for key, value in flags.items():
                got = parsed[key]
                assert str(getattr(got, "value", got)) == str(value), (config.name, key)


@pytest.mark.slow
def test_a_tuned_finetune_comparison_chooses_by_validation_accuracy(tiny_model_dir, tmp_path):
    flags = {"model_name_or_path": tiny_model_dir, "max_train_samples": 32, "max_steps": 2}
    flags |= {"max_eval_samples": 24, "per_device_train_batch_size": 8, "grass_rank": 8}
    flags |= {"hold_out_test": True}
    methods = {
        "adamw": {"flags": {"optim": "adamw_torch"}, "grid": {"learning_rate": [1e-4, 3e-2]}},
        "grass": {"flags": {"optim": "grass"}, "grid": {"learning_rate": [1e-2]}},
    }
    spec = {"script": "finetune", "flags": flags, "methods": methods, "seeds": [1, 2]}
    config = tmp_path / "tuned.yaml"
    config.write_text(yaml.safe_dump({**spec, "reference": "grass"}))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(config), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    results = {(r["name"], r["seed"]): r for r in summary["results"]}
    for (name, seed), r in results.items():  # each run's own files, read back
        folder = out / f"{name}-s{seed}"
        assert (
            r["accuracy"] == json.loads((folder / "eval_results.json").read_text())["eval_accuracy"]
        )
        assert (
            r["test_accuracy"]
            == json.loads((folder / "test_results.json").read_text())["test_accuracy"]
        )
    grid = ["adamw-lr0.0001", "adamw-lr0.03"]
    # the highest validation accuracy, ties to the lower validation loss
    best = min(grid, key=lambda n: (-results[(n, 1)]["accuracy"], results[(n, 1)]["eval_loss"]))
    assert summary["chosen"] == {"adamw": best, "grass": "grass-lr0.01"}
    assert sorted(k for k in results if k[1] == 2) == sorted([(best, 2), ("grass-lr0.01", 2)])
    diffs = [results[(best, s)]["test_accuracy"] - results[("grass-lr0.01", s)]["test_accuracy"]
             for s in (1, 2)]  # fmt: skip
    table = (out / "table.md").read_text()
    row = next(line for line in table.splitlines() if "| adamw |" in line)
    assert f"{sum(diffs) / 2:+.4f} ({min(diffs):+.4f} to {max(diffs):+.4f})" in row
    assert "| test accuracy |" in table


def test_config_then_flags_and_json(tmp_path):
    _, _, args = finetune.parse_args([str(ROOT / "configs/default.yaml"), "--max_steps", "3"])
    assert args.max_steps == 3 and args.optim == "grass"
    (tmp_path / "c.json").write_text(json.dumps({"optim": "adamw_torch", "grass_rank": 4}))
    _, _, args = finetune.parse_args([str(tmp_path / "c.json")])
    assert args.optim == "adamw_torch" and args.grass_rank == 4 and args.learning_rate == 5e-5
    (tmp_path / "bad.yaml").write_text("not_a_flag: 1\n")
    with pytest.raises(ValueError, match="not_a_flag"):
        finetune.parse_args([str(tmp_path / "bad.yaml")])
    (tmp_path / "broken.yaml").write_text("optim: [grass\nmax_steps: 3\n")
    with pytest.raises(UsageError, match=r"Cannot parse the config file \S*broken\.yaml: while"):
        finetune.parse_args([str(tmp_path / "broken.yaml")])


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


# The data problems that used to surface as errors from inside `datasets` or torch.
DATA_PROBLEMS = {
    "empty_csv": (
        "t.csv",
        "",
        [],
        r"The train file \S*t\.csv is empty: give it the columns `label` and either `sentence`",
    ),
    "header_only_csv": (
        "t.csv",
        "sentence,label\n",
        [],
        r"t\.csv has a header \(sentence,label\) but no rows: add at least one example",
    ),
    "empty_jsonl": ("t.jsonl", "", [], r"The train file \S*t\.jsonl is empty"),
    "stray_label": (
        "t.csv",
        "sentence,label\ngood film,1\nbad film,0\ndull plot,negative\nfun,1\n",
        [],
        r"t\.csv, row 2 \('dull plot'\): label 'negative' is not a number, unlike the rest of the "
        r"column; fix or remove that row",
    ),
    "max_train_samples_0": (
        "t.csv",
        "sentence,label\ngood film,1\nbad film,0\n",
        ["--max_train_samples", "0"],
        r"--max_train_samples 0 keeps no examples: pass a number >= 1, or leave the flag out",
    ),
}


@pytest.mark.parametrize("problem", DATA_PROBLEMS)
def test_data_problems_fail_before_the_model_with_one_clear_error(
    tiny_model_dir, tmp_path, monkeypatch, problem
):
    name, text, extra, match = DATA_PROBLEMS[problem]
    (tmp_path / name).write_text(text)
    out = tmp_path / "out"

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data were checked")

    monkeypatch.setattr(finetune.AutoModelForSequenceClassification, "from_pretrained", no_model)
    flags = tiny_flags(tiny_model_dir, out, "--train_file", str(tmp_path / name))
    with pytest.raises(UsageError, match=match):
        finetune.main([*flags, *extra])
    assert not out.exists()


def test_seed_fixes_the_new_head_whatever_the_callers_rng_state(tiny_model_dir, tmp_path):
    # The classifier head and LoRA's adapters are initialized when the model is built: --seed
    # must cover them, or two runs with the same flags differ.
    runs = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        out = tmp_path / f"out{caller_seed}"
        flags = tiny_flags(tiny_model_dir, out, "--max_train_samples", "16", "--logging_steps", "1")
        results = finetune.main([*flags, "--max_eval_samples", "16"])
        runs.append((logged_losses(out), results["eval"]["eval_loss"]))
    assert runs[0] == runs[1]


# ---- usage errors: one line on stderr and exit status 2, like argparse -------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--task_name", "no_such_task"], "Unknown --task_name 'no_such_task'"),
        (["--model_name_or_path", "/no/such/model"], "--model_name_or_path /no/such/model does "),
        (["--use_lora", "--optim", "grass"], "--use_lora with --optim grass"),
    ],
    ids=["task", "model", "lora_grass"],
)
def test_usage_errors_print_one_line_and_exit_2(tmp_path, flags, message):
    run = run_script(*flags, "--output_dir", str(tmp_path / "out"))
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("finetune.py: error: ")]
    assert len(errors) == 1 and message in errors[0], run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_data_problem_from_the_command_line_exits_2(tiny_model_dir, tmp_path):
    name, text, _, match = DATA_PROBLEMS["stray_label"]
    (tmp_path / name).write_text(text)
    run = run_script(
        *tiny_flags(tiny_model_dir, tmp_path / "out", "--train_file", str(tmp_path / name))
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert re.search(r"finetune\.py: error: \S*" + match, run.stderr), run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_debug_switch_shows_the_traceback_of_a_usage_error(tmp_path):
    run = run_script("--task_name", "no_such_task", "--output_dir", str(tmp_path), debug=True)
    assert run.returncode == 1
    assert (
        "Traceback" in run.stderr and "UsageError: Unknown --task_name 'no_such_task'" in run.stderr
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--grass_rank", "0"], "Invalid grass_rank=0"),  # refused by the arguments' own checks
        (["--max_eval_samples", "0"], "--max_eval_samples 0 keeps no examples"),
    ],
)
def test_cli_turns_usage_errors_into_status_2(tmp_path, capsys, flags, message):
    assert finetune.run([*flags, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune.py: error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_keeps_the_traceback_of_real_faults(monkeypatch, capsys):
    def fault(argv):
        raise RuntimeError("a bug, not the user's mistake")

    monkeypatch.setattr(finetune, "main", fault)
    with pytest.raises(RuntimeError, match="a bug"):
        finetune.run([])
    monkeypatch.setattr(finetune, "main", lambda argv: {})
    assert finetune.run([]) == 0


# ---- end to end on tiny slices of the default datasets -----------------------------------------


# The tiny model cannot generalize from 32 reviews, but it can fit them: over 8 epochs of the same
# 32 examples (4 steps each, one logged loss per epoch) Grass lowers the training loss to 0.42-0.68x
# its first epoch's (seeds 1-6 and 42); a run whose updates do not reach the weights stays at 1.0x.
FIT = ("--max_steps", "32", "--logging_steps", "4")


def _grass_state_bytes(model: torch.nn.Module, rank: int) -> int:
    """GrassAdamW's state for a float32 LLaMA by hand: per decoder linear (``*_proj``, m x n)
    two r x min(m, n) moments, per-row counts (float32), rows (int64), scales (float32), step
    and selected_step scalars and a CPU generator's state (bytes); per other parameter (the
    embedding, norms, classifier head) AdamW's two moments and step scalar."""
    rng = len(torch.Generator().get_state().numpy().tobytes())
    total = 0
    for name, p in model.named_parameters():
        if name.endswith("_proj.weight"):
            total += 2 * rank * min(p.shape) * 4 + rank * (4 + 8 + 4) + 2 * 4 + rng
        else:
            total += 2 * p.numel() * 4 + 4
    return total


def _check_tokens_per_s(report: dict) -> None:
    """tokens/s is the training tokens over the summed step time (s_per_step to 0.1 ms)."""
    step_time = report["s_per_step"] * report["steps"]
    assert report["tokens_per_s"] == pytest.approx(report["train_tokens"] / step_time, rel=0.02)


def _evaluate_by_hand(model, tokenizer, dataset) -> tuple[float, float]:
    """Accuracy and mean loss of ``model`` over ``dataset``, one review at a time (no padding),
    truncated to 64 tokens as the script does."""
    correct, nll = 0, 0.0
    with torch.no_grad():
        for example in dataset:
            ids = tokenizer(example["sentence"], truncation=True, max_length=64)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0]
            correct += int(logits.argmax().item() == example["label"])
            nll -= logits.log_softmax(-1)[example["label"]].item()
    return correct / len(dataset), nll / len(dataset)


@pytest.mark.slow
def test_default_classification_task_end_to_end(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "out"
    flags = [*tiny_flags(tiny_model_dir, out), *FIT, "--learning_rate", "5e-3"]
    results = finetune.main([*flags, "--save_final_model", "true"])
    assert results["task"] == "rotten_tomatoes" and results["method"] == "grass"
    losses = logged_losses(out)
    assert len(losses) == 8 and losses[-1] < 0.85 * losses[0], losses

    # The evaluation again, by hand: the saved model on the first 32 validation reviews, one at
    # a time (no padding), truncated to 64 tokens as the script does.
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    raw = finetune.grass_data.load_rotten_tomatoes()
    accuracy, loss = _evaluate_by_hand(model, tokenizer, raw["validation"].select(range(32)))
    assert results["eval"]["eval_accuracy"] == accuracy
    assert results["eval"]["eval_loss"] == pytest.approx(loss, rel=1e-4)
    written = json.loads((out / "eval_results.json").read_text())
    assert written["eval_accuracy"] == results["eval"]["eval_accuracy"]

    report = json.loads((out / "resource_report.json").read_text())
    assert report["optimizer_state_bytes"] == _grass_state_bytes(model, rank=8)
    # 32 steps of 8 = 8 passes over the 32 training reviews, counted without padding
    train = list(raw["train"].select(range(32))["sentence"])
    lengths = [len(ids) for ids in tokenizer(train, truncation=True, max_length=64)["input_ids"]]
    assert report["steps"] == 32 and report["train_tokens"] == 8 * sum(lengths)
    _check_tokens_per_s(report)


@pytest.mark.slow
def test_held_out_test_split_is_evaluated_after_training(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "out"
    flags = [*tiny_flags(tiny_model_dir, out, "--max_eval_samples", "16"), "--hold_out_test"]
    results = finetune.main([*flags, "--save_final_model", "true"])
    written = json.loads((out / "test_results.json").read_text())
    assert written == results["test"]
    # The first 16 test reviews by hand: movies that neither train nor validation holds.
    splits = finetune.grass_data.load_rotten_tomatoes(hold_out_test=True)
    test = splits["test"].select(range(16))
    assert not set(test["movie_name"]) & set(splits["train"]["movie_name"])
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    accuracy, loss = _evaluate_by_hand(model, tokenizer, test)
    assert written["test_accuracy"] == accuracy
    assert written["test_loss"] == pytest.approx(loss, rel=1e-4)
    # Validation is the same split as without the flag.
    default = finetune.grass_data.load_rotten_tomatoes()["validation"]
    assert list(splits["validation"]["sentence"]) == list(default["sentence"])


def test_hold_out_test_needs_the_built_in_task(tmp_path):
    with pytest.raises(UsageError, match="--hold_out_test holds out movies of the built-in"):
        finetune.main(["--task_name", "rte", "--hold_out_test", "--output_dir", str(tmp_path)])


@pytest.mark.slow
def test_default_instruction_task_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    flags = tiny_flags(tiny_model_dir, out, "--task_type", "instruction", "--max_seq_length", "48")
    flags += ["--max_steps", "8", "--logging_steps", "4", "--learning_rate", "1e-2"]
    results = finetune.main([*flags, "--num_generations", "2", "--max_new_tokens", "4"])
    assert results["task"] == "alpaca_eval"
    # Most answer tokens are <unk> to the tiny word-level tokenizer, which 8 steps learn. The
    # untrained model's loss is about 3.86 nats (validation perplexity ~48); the first 4 steps
    # average ~3.6, the last 4 ~2.7, and the validation perplexity falls to ~12. A run that does
    # not learn keeps its validation perplexity near exp(first loss) or above.
    first, last = logged_losses(out)
    assert last < first - 0.5, (first, last)
    perplexity = results["eval"]["eval_perplexity"]
    assert perplexity < 0.5 * math.exp(first), (perplexity, first)
    lines = (out / "generations.jsonl").read_text().splitlines()
    assert (
        len(lines) == 2 and {"instruction", "reference", "generated"} <= json.loads(lines[0]).keys()
    )


@pytest.mark.slow
def test_lora_baseline_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    # LoRA trains only its q/v adapters and the head: 12 epochs take it to 0.22-0.52x (seeds 1-6, 42).
    flags = [*tiny_flags(tiny_model_dir, out), "--use_lora", *FIT, "--learning_rate", "1e-2"]
    results = finetune.main([*flags, "--max_steps", "48"])
    assert results["method"] == "lora"
    losses = logged_losses(out)
    assert losses[-1] < 0.85 * losses[0], losses
    report = results["resources"]
    # AdamW on what LoRA trains: A (8 x 32) and B (out x 8) on q (out 32) and v (out 16: 2 kv
    # heads of 8) in both layers, and the classifier head's trainable copy (2 x 32)
    lora = 2 * (8 * 32 + 32 * 8 + 8 * 32 + 16 * 8)
    trainable, tensors = lora + 2 * 32, 2 * 4 + 1
    assert report["trainable_param_bytes"] == 4 * trainable
    assert report["optimizer_state_bytes"] == 2 * 4 * trainable + 4 * tensors


@pytest.mark.slow
def test_resume_with_changed_grass_flags_is_one_line_and_keeps_the_checkpoint(
    tiny_model_dir, tmp_path
):
    out = tmp_path / "out"
    finetune.main(tiny_flags(tiny_model_dir, out, "--save_strategy", "steps", "--save_steps", "1"))
    checkpoint = out / "checkpoint-1"
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    flags = tiny_flags(tiny_model_dir, out, "--grass_selection", "multinomial")
    run = run_script(*flags, "--resume_from_checkpoint", str(checkpoint))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert re.search(
        r"finetune\.py: error: Cannot resume .*selection: checkpoint 'top_r'", run.stderr
    )
    assert before == {name: (checkpoint / name).read_bytes() for name in before}


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"],
    # accelerate's --cpu starts one process; --multi_gpu starts torch.distributed.run, and on a
    # machine without GPUs the processes use gloo on the CPU.
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_then_resume_on_one(tiny_model_dir, tmp_path, launcher):
    """scripts/finetune.py under torchrun or accelerate launch (2 CPU processes, gloo) with
    compressed communication, then the run resumed from its checkpoint on a single process."""
    out = tmp_path / "out"
    flags = tiny_flags(tiny_model_dir, out, "--save_strategy", "steps", "--save_steps", "2",
                       "--per_device_train_batch_size", "4", "--logging_steps", "1")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, *LAUNCHERS[launcher], str(ROOT / "scripts" / "finetune.py"), *flags]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((out / "resource_report.json").read_text())
    assert report["world_size"] == 2
    assert 0 < report["comm_bytes_per_step"] < report["dense_ddp_comm_bytes_per_step"]
    # DDP averaged the plain parameters, Grass the compressed gradients and selection statistics
    assert report["comm_bytes_per_step_by_kind"].keys() >= {"ddp", "compressed", "selection"}, (
        run.stderr[-3000:]
    )
    steps = len(logged_losses(out))
    finetune.main(
        [
            *tiny_flags(
                tiny_model_dir, out, "--max_steps", "4", "--per_device_train_batch_size", "8"
            ),
            "--resume_from_checkpoint",
            str(out / "checkpoint-2"),
        ]  # fmt: skip
    )
    state = json.loads((out / "trainer_state.json").read_text())
    assert steps == 2 and state["global_step"] == 4


def test_freeze_embeddings_trains_everything_but_the_embedding(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "out"
    finetune.main(tiny_flags(tiny_model_dir, out, "--freeze_embeddings", "true",
                             "--save_final_model", "true"))  # fmt: skip
    before = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    after = AutoModelForSequenceClassification.from_pretrained(out)
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert not torch.equal(
        a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"]
    )
    with pytest.raises(UsageError, match="--freeze_embeddings with --grass_embeddings"):
        finetune.main(tiny_flags(tiny_model_dir, tmp_path / "o2", "--freeze_embeddings", "true",
                                 "--grass_embeddings", "true"))  # fmt: skip


@pytest.mark.parametrize(
    "script, flags",
    [
        ("finetune.py", ["--output_dir", "--grass_rank", "--use_lora", "--task_name"]),
        ("pretrain.py", ["--output_dir", "--grass_rank", "--preset", "--seq_len"]),
        ("memory.py", ["--preset", "--method", "--rank", "--budget"]),
    ],
)
def test_help_lists_the_flags(script, flags):
    """--help prints every flag's help (argparse %-formats help texts: a bare % breaks it)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [f for f in flags if f not in proc.stdout] == []


# ---- a quiet start: bitsandbytes stays out unless a baseline needs it ---------------------------

# What bitsandbytes logs on import on a CPU with AVX-512 bf16 when its Hub kernels cannot load.
BITSANDBYTES_WARNING = "kernels-community"
BASELINE_MARK = "-- a baseline imports bitsandbytes now --"
_START_OF_A_SCRIPT = f"""
import json, runpy, sys
path = sys.argv[1]
sys.argv = [path, "--help"]
try:
    runpy.run_path(path, run_name="__main__")
except SystemExit as stop:
    assert stop.code == 0, stop.code
result = {{"after_help": "bitsandbytes" in sys.modules}}
script = runpy.run_path(path, run_name="imports_only")  # its functions, without main()
if "apply_lora" in script:
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=64)
    script["apply_lora"](LlamaForCausalLM(config), script["ModelArguments"](), "instruction")
    result["after_lora"] = "bitsandbytes" in sys.modules
print("{BASELINE_MARK}", file=sys.stderr, flush=True)
import bitsandbytes  # a baseline that needs it still can import it
print(json.dumps(result))
"""


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed"
)
@pytest.mark.parametrize("script", ["finetune.py", "pretrain.py"])
def test_the_scripts_start_without_bitsandbytes_and_its_warning(script):
    """transformers imports peft, which imports bitsandbytes when installed (GaLore's package
    pulls it in): its import logs a warning about CPU kernels that no user can act on."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _START_OF_A_SCRIPT, str(ROOT / "scripts" / script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    help_text, result = proc.stdout.strip().rsplit("\n", 1)
    assert "--output_dir" in help_text
    before_baseline, _ = proc.stderr.split(BASELINE_MARK)
    assert BITSANDBYTES_WARNING not in before_baseline + help_text
    modules = json.loads(result)
    assert not any(modules.values()), modules


def test_a_moe_model_finetunes_with_its_experts_projected(tiny_moe_dir, tmp_path, caplog):
    """A Mixtral checkpoint: Grass projects its experts (the report's projected share counts
    their 3-D weights); GaLore, which projects linear layers only, gets the linear targets and
    a line saying that the experts stay dense under it."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_moe_dir, num_labels=2)
    _, _, args = finetune.parse_args(["--optim", "galore_adamw"])
    with caplog.at_level("WARNING"):  # before finetune.main, which resets the root logger
        regex = finetune.same_targets_as_grass(model, args)
    assert sorted(regex.replace("\\", "").split("|")) == sorted(
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "score"
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "the experts of 2 MoE layers, which Grass projects, stay dense" in w for w in warnings
    )

    out = tmp_path / "out"
    finetune.main(tiny_flags(tiny_moe_dir, out, "--max_train_samples", "16"))
    report = json.loads((out / "resource_report.json").read_text())
    params = dict(model.named_parameters())
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n)
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("score")
    )
    share = (experts + linear) / sum(p.numel() for p in params.values())
    assert report["projected_param_fraction"] == pytest.approx(share, rel=1e-6)

"""scripts/finetune.py --do_train false (evaluation only), and GLUE tasks without the Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import datasets
import pytest
from conftest import load_script

from hf_grass import data as grass_data

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port: nothing listens, refused at once

finetune = load_script("finetune")


def common_flags(model_dir: str | Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--output_dir", str(out),
        "--max_train_samples", "32", "--max_eval_samples", "32", "--grass_rank", "8",
        "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


# ---- evaluation only ---------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_only_on_the_saved_model_reports_the_training_runs_accuracy(
    tiny_model_dir, tmp_path, monkeypatch
):
    trained = tmp_path / "trained"
    train_flags = ["--max_steps", "4", "--per_device_train_batch_size", "8"]
    train_flags += ["--learning_rate", "5e-3", "--save_final_model", "true"]
    run = finetune.main(common_flags(tiny_model_dir, trained, *train_flags))

    def no_optimizer(self, *args, **kwargs):
        raise AssertionError("evaluation only must not create an optimizer")

    for trainer_class in (finetune.GrassTrainer, finetune.transformers.Trainer):
        monkeypatch.setattr(trainer_class, "create_optimizer", no_optimizer)
    evaluated = tmp_path / "evaluated"
    again = finetune.main(common_flags(trained, evaluated, "--do_train", "false"))

    assert again["task"] == "rotten_tomatoes" and again["method"] == "eval"
    assert again["eval"]["eval_accuracy"] == run["eval"]["eval_accuracy"]
    assert again["eval"]["eval_loss"] == pytest.approx(run["eval"]["eval_loss"], rel=1e-5)
    written = json.loads((evaluated / "eval_results.json").read_text())
    assert written["eval_accuracy"] == run["eval"]["eval_accuracy"]
    # Nothing of a training run: no train metrics, loss log or resource report.
    assert not {"train_results.json", "trainer_state.json", "resource_report.json"} & set(
        os.listdir(evaluated)
    )

    # The untrained model, evaluated the same way, scores another loss: the numbers above are
    # the trained model's. A Grass rank larger than its weights does not matter: nothing trains.
    flags = ["--do_train", "false", "--grass_rank", "64"]
    before = finetune.main(common_flags(tiny_model_dir, tmp_path / "base", *flags))
    assert before["eval"]["eval_loss"] != pytest.approx(run["eval"]["eval_loss"], rel=1e-4)


def test_eval_only_output_folder_defaults_apart_from_the_training_runs():
    _, _, args = finetune.parse_args(["--do_train", "false"])
    assert args.do_train is False and args.output_dir == "outputs/rotten_tomatoes-eval"
    _, _, args = finetune.parse_args([])
    assert args.do_train is True and args.output_dir == "outputs/rotten_tomatoes-grass"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train_file", "{csv}"], "--do_train false evaluates on the validation split"),
        (["--resume_from_checkpoint", "true"], "To evaluate a checkpoint, pass its folder as"),
    ],
    ids=["no_validation_file", "resume"],
)
def test_eval_only_refuses_what_it_cannot_do_in_one_line(
    tiny_model_dir, tmp_path, capsys, extra, message
):
    csv = tmp_path / "train.csv"
    csv.write_text("sentence,label\ngood film,1\nbad film,0\n")
    extra = [flag.format(csv=csv) for flag in extra]
    out = tmp_path / "out"
    assert finetune.run(common_flags(tiny_model_dir, out, "--do_train", "false", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune.py: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


# ---- GLUE without the Hub ----------------------------------------------------------------------


def hub_env(tmp_path: Path, offline: bool) -> dict[str, str]:
    """The environment of a run that cannot reach the Hub and has an empty datasets cache:
    offline mode on, or off with an endpoint that refuses connections."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    env.update(HF_HUB_OFFLINE="1") if offline else env.update(HF_ENDPOINT=UNREACHABLE_HUB)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_uncached_glue_task_without_the_hub_fails_in_one_fast_line(
    tiny_model_dir, tmp_path, offline
):
    out = tmp_path / "out"
    script = [sys.executable, str(ROOT / "scripts" / "finetune.py")]
    flags = ["--task_name", "rte", *common_flags(tiny_model_dir, out)]
    run = subprocess.run(
        script + flags, capture_output=True, text=True, env=hub_env(tmp_path, offline), timeout=300
    )
    ended = datetime.now()
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("finetune.py: error: ")]
    assert len(errors) == 1, run.stderr
    assert "GLUE task rte needs the Hub dataset nyu-mll/glue" in errors[0]
    assert "Run once online to cache it" in errors[0] and "--train_file" in errors[0]
    assert not out.exists()
    # From the script's first log line (its imports done) to its exit: no retries with back-off
    # (about 25 s before). The imports themselves take 5-15 s on a busy 2-core machine.
    started = next(line for line in run.stderr.splitlines() if "INFO finetune: Task rte" in line)
    began = datetime.strptime(started[:23], "%Y-%m-%d %H:%M:%S,%f")
    assert (ended - began).total_seconds() < 10, run.stderr


def fake_cached_glue(cache: Path, task: str = "rte") -> None:
    """What an online `load_dataset("nyu-mll/glue", task)` leaves in the datasets cache, in
    miniature: `nyu-mll___glue/<task>/0.0.0/<hash>/` with arrow files and dataset_info.json."""
    from datasets.packaged_modules.json.json import Json

    files = {}
    for split in ("train", "validation"):
        files[split] = str(cache.parent / f"{split}.jsonl")
        with open(files[split], "w") as f:
            for i in range(4):
                record = {"sentence1": f"the film {i}", "sentence2": "it was good", "label": i % 2}
                f.write(json.dumps({**record, "idx": i}) + "\n")
    features = datasets.Features(
        sentence1=datasets.Value("string"),
        sentence2=datasets.Value("string"),
        label=datasets.ClassLabel(names=["entailment", "not_entailment"]),
        idx=datasets.Value("int32"),
    )
    builder = Json(
        cache_dir=str(cache / "build"), dataset_name="glue", config_name=task, hash="0" * 16,
        data_files=files, features=features,
    )  # fmt: skip
    builder.download_and_prepare()
    target = cache / "nyu-mll___glue" / task / "0.0.0"
    target.mkdir(parents=True)
    Path(builder.cache_dir).rename(target / ("0" * 16))


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_cached_glue_task_loads_without_the_hub_at_once(tmp_path, monkeypatch, offline):
    cache = tmp_path / "datasets"
    fake_cached_glue(cache)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    # A process started without offline mode; HF_HUB_OFFLINE=1 may be set after the imports.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", UNREACHABLE_HUB)
    start = time.perf_counter()
    raw = grass_data.load_glue("rte")
    assert time.perf_counter() - start < 5  # no retries with back-off (about 25 s before)
    assert list(raw) == ["train", "validation"]
    assert raw["validation"]["sentence1"] == [f"the film {i}" for i in range(4)]
    assert not datasets.config.HF_HUB_OFFLINE  # offline for that load only

    # Another task of the same cache, and an empty cache: one line naming the fix.
    for folder, task in ((cache, "mrpc"), (tmp_path / "empty", "rte")):
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
        with pytest.raises(grass_data.HubDatasetUnavailableError) as failure:
            grass_data.load_glue(task)
        message = str(failure.value)
        assert f"GLUE task {task} needs" in message and f"not cached in {folder}" in message
        assert "\n" not in message and "Run once online" in message

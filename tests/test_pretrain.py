"""scripts/pretrain.py and hf_grass.corpus: the default corpus, packing, caching, bad input, runs."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import load_script
from safetensors.torch import load_file

from hf_grass import corpus
from hf_grass.errors import UsageError
from hf_grass.trainer import GrassTrainer, GrassTrainingArguments

ROOT = Path(__file__).resolve().parents[1]
pretrain = load_script("pretrain")


def small_flags(out: Path, *extra: str) -> list[str]:
    """The demo preset on the default corpus, short sequences: seconds per run."""
    return [
        "--output_dir", str(out), "--seq_len", "64", "--per_device_train_batch_size", "8",
        "--max_eval_samples", "64", "--disable_tqdm", "true", "--logging_steps", "1",
        "--grass_rank", "32", *extra,
    ]  # fmt: skip


def logged(out: Path, key: str) -> list[float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry]


# ---- the default corpus and packing ------------------------------------------------------------


def test_default_corpus_holds_whole_works_out_for_validation():
    files = corpus.shakespeare_files()
    train = {p.name for p in files["train"]}
    validation = {p.name for p in files["validation"]}
    assert not train & validation
    assert validation == {
        f"{w}_gut.txt"
        for w in ("comedy_of_errors", "henry_v", "lovers_complaint", "passionate_pilgrim")
    }
    assert len(train) + len(validation) == 42


def test_a_held_out_test_split_takes_three_more_works_and_leaves_validation_alone():
    plain = corpus.shakespeare_files()
    files = corpus.shakespeare_files(hold_out_test=True)
    names = {split: {p.name for p in paths} for split, paths in files.items()}
    assert names["test"] == {
        f"{w}_gut.txt" for w in ("midsummer_nights_dream", "taming_of_the_shrew", "winters_tale")
    }
    assert names["validation"] == {p.name for p in plain["validation"]}
    assert names["train"] == {p.name for p in plain["train"]} - names["test"]
    assert not names["test"] & (names["train"] | names["validation"])


def test_the_test_split_is_evaluated_once_after_training_on_its_own_text(cache, tmp_path):
    """--test_files: the final model's loss on the test blocks, recomputed here by a plain
    forward pass, is what test_results.json says; training and validation never read them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = {
        "train": "The quick brown fox jumps over the lazy dog. " * 400,
        "validation": "A lazy dog sleeps while the quick fox runs. " * 40,
        "test": "Over the dog the fox jumps, quick and brown. " * 40,
    }
    paths = {}
    for split, text in texts.items():
        paths[split] = tmp_path / f"{split}.txt"
        paths[split].write_text(text)
    out = tmp_path / "out"
    flags = ["--preset", "tiny", "--tokenizer_vocab_size", "300", "--seq_len", "32"]
    flags += ["--train_files", str(paths["train"]), "--validation_files", str(paths["validation"])]
    flags += ["--test_files", str(paths["test"]), "--optim", "grass", "--grass_rank", "8"]
    flags += ["--output_dir", str(out), "--max_steps", "6", "--save_steps", "6"]
    flags += ["--per_device_train_batch_size", "4", "--disable_tqdm", "true"]
    results = pretrain.main(flags)
    written = json.loads((out / "test_results.json").read_text())
    assert written["test_perplexity"] == pytest.approx(math.exp(written["test_loss"]))
    assert results["test"]["test_loss"] == written["test_loss"]

    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-6").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "checkpoint-6")
    ids = tokenizer(texts["test"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    with torch.no_grad():  # the mean of per-block mean losses, as the Trainer's evaluation
        losses = [model(input_ids=b[None], labels=b[None]).loss for b in blocks]
    assert written["test_loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-4)
    validation = json.loads((out / "eval_results.json").read_text())["eval_loss"]
    assert abs(validation - written["test_loss"]) > 1e-3  # a different text, not validation again


def test_packing_concatenates_documents_with_end_of_text_and_drops_the_tail(cache):
    from datasets import Dataset

    docs = Dataset.from_dict({"text": ["to be or not to be", "", "that is the question " * 7]})
    spec = corpus.CorpusSpec()
    raw = corpus.load_corpus(spec)
    tokenizer = corpus.default_tokenizer(spec, raw["train"])
    stream: list[int] = []
    for text in docs["text"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream += ids + [tokenizer.eos_token_id] if ids else []
    blocks = corpus.pack(docs, tokenizer, seq_len=5)
    flat = [t for block in blocks["input_ids"] for t in block]
    assert all(len(block) == 5 for block in blocks["input_ids"])
    assert flat == stream[: len(stream) // 5 * 5]
    batch = corpus.causal_lm_collator([{"input_ids": b} for b in blocks["input_ids"][:2]])
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_packed_corpus_is_cached_and_invalidated_when_corpus_or_tokenizer_change(
    cache, tmp_path, monkeypatch
):
    text = tmp_path / "a.txt"
    text.write_text("Once upon a time there was a corpus. " * 400)
    spec = corpus.CorpusSpec(train_files=[str(text)])
    raw = corpus.load_corpus(spec)
    tokenizer = corpus.default_tokenizer(spec, raw["train"], vocab_size=300)
    first = corpus.packed_blocks(spec, raw, tokenizer, seq_len=32)
    # Validation is the held-out end of the training blocks.
    assert len(first["validation"]) == max(1, int(0.05 * (len(first["train"]) + 1)))
    packs = []
    real_pack = corpus.pack
    monkeypatch.setattr(corpus, "pack", lambda *a, **k: packs.append(1) or real_pack(*a, **k))
    again = corpus.packed_blocks(spec, raw, tokenizer, seq_len=32)
    assert packs == [] and again["train"]["input_ids"] == first["train"]["input_ids"]

    other_tokenizer = corpus.default_tokenizer(spec, raw["train"], vocab_size=280)
    corpus.packed_blocks(spec, raw, other_tokenizer, seq_len=32)
    assert len(packs) == 1  # a new tokenizer: packed anew
    text.write_text("A different corpus altogether, longer than before. " * 500)
    raw = corpus.load_corpus(spec)
    changed = corpus.packed_blocks(spec, raw, tokenizer, seq_len=32)
    assert len(packs) == 2  # a changed file: packed anew
    assert changed["train"]["input_ids"] != first["train"]["input_ids"]


def test_a_local_dataset_folder_is_cached_by_its_files(cache, tmp_path, caplog):
    """``--dataset_name <folder>`` (as ``datasets.load_dataset`` reads it): text appended to its
    files must reach the tokenizer and the packed blocks, not a stale cache entry."""
    folder = tmp_path / "my_corpus"
    folder.mkdir()
    lines = [f"Line {i} of a small corpus that grows later." for i in range(40)]
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text("\n".join(lines) + "\n")
    spec = corpus.CorpusSpec(dataset_name=str(folder))
    raw = corpus.load_corpus(spec)
    tokenizer = corpus.default_tokenizer(spec, raw["train"], vocab_size=300)
    first = corpus.packed_blocks(spec, raw, tokenizer, seq_len=32)
    caplog.clear()  # (an earlier test may have left hf_grass's module loggers at INFO)
    with caplog.at_level(logging.INFO, logger="hf_grass"):
        corpus.default_tokenizer(spec, raw["train"], vocab_size=300)
        corpus.packed_blocks(spec, raw, tokenizer, seq_len=32)
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == [
        "Reusing the tokenizer",
        "Reusing the packed corpus",
    ]

    for name in ("a.txt", "b.txt"):
        with open(folder / name, "a") as f:
            f.write("\n".join(lines * 3) + "\n")
    raw = corpus.load_corpus(spec)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_grass"):
        corpus.default_tokenizer(spec, raw["train"], vocab_size=300)
    assert not any("Reusing" in r.getMessage() for r in caplog.records)  # trained anew
    grown = corpus.packed_blocks(spec, raw, tokenizer, seq_len=32)
    expected = len(corpus.pack(raw["train"], tokenizer, seq_len=32))  # packed without a cache
    assert len(grown["train"]) + len(grown["validation"]) == expected
    assert expected > 3 * (len(first["train"]) + len(first["validation"]))


def test_a_hub_dataset_is_cached_by_the_revision_it_resolves_to(monkeypatch):
    """The revision comes from ``datasets`` (its builder's hash is the dataset's commit); where
    it cannot be found (offline, no cached copy) the name alone keys the caches, as before."""
    revision = {"allenai/c4": "0123abc"}

    def builder(name, config_name=None):
        if name not in revision:
            raise ConnectionError(f"Couldn't reach '{name}' on the Hub")
        return SimpleNamespace(hash=revision[name])

    monkeypatch.setattr(corpus, "load_dataset_builder", builder)
    spec = corpus.CorpusSpec(dataset_name="allenai/c4", dataset_config_name="en")
    first = corpus.corpus_fingerprint(spec)
    assert corpus.corpus_fingerprint(spec) == first
    revision["allenai/c4"] = "4567def"  # a new commit on the Hub
    assert corpus.corpus_fingerprint(spec) != first
    offline = corpus.CorpusSpec(dataset_name="someone/unreachable")
    assert corpus.corpus_fingerprint(offline) == corpus.corpus_fingerprint(offline)


def _corrupt(entry: Path, kind: str) -> None:
    if kind == "blocks":  # an interrupted copy, a full disk: a truncated block file
        for arrow in entry.glob("train/*.arrow"):
            arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    else:
        (entry / "tokenizer.json").write_text('{"version": "1.0", "model": ')


@pytest.mark.parametrize("kind", ["blocks", "tokenizer"])
def test_an_unreadable_cache_entry_is_built_again(tmp_path, monkeypatch, caplog, kind):
    monkeypatch.setenv("HF_GRASS_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "a.txt"
    text.write_text("Once upon a time there was a corpus. " * 100)
    spec = corpus.CorpusSpec(train_files=[str(text)])
    raw = corpus.load_corpus(spec)
    tokenizer = corpus.default_tokenizer(spec, raw["train"], vocab_size=300)
    # read before the files under it are cut short (they are memory-mapped)
    expected = list(corpus.packed_blocks(spec, raw, tokenizer, seq_len=32)["train"]["input_ids"])
    (entry,) = (tmp_path / "cache" / "pretrain").glob(f"{kind}-*")
    _corrupt(entry, kind)
    with caplog.at_level(logging.INFO, logger="hf_grass"):
        again = corpus.default_tokenizer(spec, raw["train"], vocab_size=300)
        rebuilt = corpus.packed_blocks(spec, raw, again, seq_len=32)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert rebuilt["train"]["input_ids"] == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(entry) in warnings[0], caplog.text
    assert "unreadable" in warnings[0] and "building it again" in warnings[0]


def test_an_unreadable_cache_entry_that_cannot_be_removed_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_GRASS_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "a.txt"
    text.write_text("Once upon a time there was a corpus. " * 100)
    spec = corpus.CorpusSpec(train_files=[str(text)])
    raw = corpus.load_corpus(spec)
    corpus.default_tokenizer(spec, raw["train"], vocab_size=300)
    (entry,) = (tmp_path / "cache" / "pretrain").glob("tokenizer-*")
    _corrupt(entry, "tokenizer")

    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", read_only)
    with pytest.raises(UsageError, match="delete that folder") as err:
        corpus.default_tokenizer(spec, raw["train"], vocab_size=300)
    assert str(entry) in str(err.value) and "\n" not in str(err.value)


def test_end_of_text_is_no_padding_row_and_trains(cache, tmp_path):
    """The default tokenizer pads with its end-of-text token, which ends every packed document:
    it must not become LLaMA's ``padding_idx`` (a zero embedding row that never trains), neither
    in the model the script builds nor in the config that its checkpoints save."""
    files = [tmp_path / f"{i}.txt" for i in range(8)]  # short documents: every block ends some
    for i, path in enumerate(files):
        path.write_text(f"Document {i}: once upon a time there was a corpus.")
    spec = corpus.CorpusSpec(train_files=[str(f) for f in files])
    raw = corpus.load_corpus(spec)
    assert corpus.default_tokenizer(spec, raw["train"], vocab_size=300).pad_token == "<|endoftext|>"
    pargs = pretrain.PretrainArguments(preset="tiny", seq_len=32, tokenizer_vocab_size=300)
    tokenizer = pretrain.load_tokenizer(pargs, spec, raw)
    eos = tokenizer.eos_token_id
    config = pretrain.model_config(pargs, len(tokenizer))
    model = pretrain.build_model(config, tokenizer, torch.float32)
    embedding = model.get_input_embeddings()
    assert embedding.padding_idx != eos
    assert embedding.weight[eos].norm() > 0  # initialized like every other row

    blocks = corpus.packed_blocks(spec, raw, tokenizer, seq_len=32)["train"]
    ids = torch.tensor([blocks[0]["input_ids"]])
    assert (ids == eos).any()
    model(input_ids=ids, labels=ids).loss.backward()
    assert embedding.weight.grad[eos].norm() > 0

    args = GrassTrainingArguments(
        output_dir=str(tmp_path / "out"), optim="adamw_torch", max_steps=1, report_to="none",
        per_device_train_batch_size=2, use_cpu=True, disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    trainer = GrassTrainer(
        model=model,
        args=args,
        train_dataset=blocks,
        data_collator=corpus.causal_lm_collator,
        processing_class=tokenizer,
    )
    trainer.train()  # the Trainer aligns the config with the tokenizer's special tokens
    assert model.config.pad_token_id != eos
    reloaded = type(model)(model.config)  # what a checkpoint's config builds
    assert reloaded.get_input_embeddings().padding_idx != eos


# ---- end to end ---------------------------------------------------------------------------------


def _grass_state_bytes(weights: dict[str, torch.Tensor], rank: int) -> int:
    """GrassAdamW's state, by hand, for float32 weights whose decoder linears (``*_proj``) are
    projected: per projected (m x n) weight two r x min(m, n) moments, per-row steps (float32),
    rows (int64), scales (float32), two step scalars and one CPU generator state (bytes); per
    other tensor AdamW's two moments and its step scalar."""
    rng = len(torch.Generator().get_state().numpy().tobytes())
    total = 0
    for name, w in weights.items():
        if name.endswith("_proj.weight"):
            r = min(rank, max(w.shape))
            total += 2 * r * min(w.shape) * 4 + r * (4 + 8 + 4) + 2 * 4 + rng
        else:
            total += 2 * w.numel() * 4 + 4
    return total


def test_pretrain_runs_as_documented_and_the_loss_falls(cache, tmp_path):
    out = tmp_path / "p"
    results = pretrain.main(small_flags(out, "--optim", "grass", "--max_steps", "30"))
    losses = logged(out, "loss")
    # From log(8192) = 9.0 at initialization; a broken update (no step, wrong sign) stays there.
    assert losses[0] > 8.5 and min(losses[-5:]) < losses[0] - 1.5
    written = json.loads((out / "eval_results.json").read_text())
    assert written["perplexity"] == pytest.approx(torch.tensor(written["eval_loss"]).exp().item())
    assert written["eval_loss"] < losses[0] - 1.0
    report = json.loads((out / "resource_report.json").read_text())
    weights = load_file(out / "checkpoint-30" / "model.safetensors")
    assert report["method"] == "grass"
    assert report["optimizer_state_bytes"] == _grass_state_bytes(weights, rank=32)
    assert report["train_tokens"] == 30 * 8 * 64
    assert results["eval"]["eval_loss"] == written["eval_loss"]
    assert (out / "checkpoint-30" / "model.safetensors").is_file()


def test_resume_reproduces_the_uninterrupted_run(cache, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    flags = ["--optim", "grass", "--max_steps", "8", "--save_steps", "4"]
    flags += ["--grass_update_proj_gap", "3", "--grass_selection", "multinomial"]
    pretrain.main(small_flags(whole, *flags))
    # Resume the same run from its step-4 checkpoint: data order, schedule, rows, moments.
    checkpoint = str(whole / "checkpoint-4")
    pretrain.main(small_flags(resumed, *flags, "--resume_from_checkpoint", checkpoint))
    a = load_file(whole / "checkpoint-8" / "model.safetensors")
    b = load_file(resumed / "checkpoint-8" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert logged(resumed, "loss") == pytest.approx(logged(whole, "loss"), abs=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--preset", "3b"], "Unknown --preset '3b'"),
        (["--seq_len", "4096"], "longer than the model allows"),
        (["--grass_rank", "4096"], "grass_rank"),
        (["--train_files", "missing.txt"], "missing.txt does not exist"),
    ],
)
def test_bad_input_gives_one_line_and_status_2(cache, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert pretrain.run(["--output_dir", str(out), "--max_steps", "1", *flags]) == 2
    err = capsys.readouterr().err  # progress logs, then the error as the last line
    last = err.strip().splitlines()[-1]
    assert last.startswith("pretrain.py: error: ") and message in last, err
    assert "Traceback" not in err
    assert not (out / "checkpoint-1").exists()


def test_an_empty_corpus_is_refused(cache, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert pretrain.run(["--train_files", str(empty), "--output_dir", str(tmp_path / "o")]) == 2
    assert "holds no text" in capsys.readouterr().err


def _flag_sets(config: Path) -> list[dict]:
    """A pretraining config's flags; for a comparison config, each run's flags."""
    import yaml

    data = yaml.safe_load(config.read_text())
    if "methods" in data:  # a tuned comparison: every grid point of every method
        compare = load_script("compare", "benchmarks")
        points = [compare.grid_points(m, e) for m, e in data["methods"].items()]
        return [{**data["flags"], **flags} for p in points for flags in p.values()]
    if "runs" not in data:
        return [data]
    return [{**data["flags"], **(run or {})} for run in data["runs"].values()]


@pytest.mark.parametrize(
    "config", sorted((ROOT / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.stem
)
def test_every_pretrain_config_parses_to_the_values_it_names(config):
    for flags in _flag_sets(config):
        tokens = [str(config)]  # a flag config is read as the script reads it
        if "runs" in config.read_text():
            tokens = []
            for key, value in flags.items():
                tokens += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
        pargs, args = pretrain.parse_args(tokens)
        for key, value in flags.items():
            got = getattr(pargs, key) if hasattr(pargs, key) else getattr(args, key)
            got = getattr(got, "value", got)  # enums (optim, scheduler) compare by value
            assert got == value, (config.name, key, got)


def run_comparison(config: Path, out: Path, cache: Path, *extra: str):
    """``benchmarks/compare.py config`` in a subprocess, checked to succeed."""
    import subprocess

    env = {"HF_GRASS_CACHE": str(cache), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), str(config)]
        + ["--out", str(out), *extra],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_comparison_runs_each_config_entry_and_writes_table_summary_and_plot(tmp_path):

    import yaml

    text = tmp_path / "corpus.txt"
    text.write_text("Now is the winter of our discontent made glorious summer. " * 300)
    config = tmp_path / "tiny_compare.yaml"
    flags = {"preset": "tiny", "train_files": str(text), "tokenizer_vocab_size": 300}
    flags |= {"seq_len": 32, "per_device_train_batch_size": 4, "max_steps": 4, "eval_steps": 2}
    flags |= {"save_strategy": "no", "grass_rank": 8}
    runs = {"adamw": {"optim": "adamw_torch"}, "grass": {"optim": "grass"}}
    config.write_text(yaml.safe_dump({"title": "tiny", "flags": flags, "runs": runs}))
    out = tmp_path / "out"
    run_comparison(config, out, tmp_path / "cache")
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in summary["results"]] == ["adamw", "grass"]
    for result in summary["results"]:
        assert [tokens for tokens, _ in result["curve"]] == [2 * 4 * 32, 4 * 4 * 32]
        assert result["perplexity"] == pytest.approx(torch.tensor(result["eval_loss"]).exp().item())
    table = (out / "table.md").read_text()
    assert "| adamw |" in table and "| grass |" in table
    assert (out / "val_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_tuned_comparison_chooses_each_method_on_validation_then_runs_the_other_seeds(tmp_path):

    import yaml

    paths = {}
    for split, repeat in (("train", 300), ("validation", 30), ("test", 30)):
        paths[split] = tmp_path / f"{split}.txt"
        paths[split].write_text(f"The {split} text of a winter's tale, told again. " * repeat)
    flags = {"preset": "tiny", "tokenizer_vocab_size": 300, "seq_len": 32, "max_steps": 4}
    flags |= {"train_files": str(paths["train"]), "validation_files": str(paths["validation"])}
    flags |= {"test_files": str(paths["test"]), "per_device_train_batch_size": 4}
    flags |= {"eval_steps": 2, "save_strategy": "no"}
    methods = {
        "adamw": {"flags": {"optim": "adamw_torch"}, "grid": {"learning_rate": [1e-4, 3e-2]}},
        "grass": {"flags": {"optim": "grass", "grass_rank": 8}, "grid": {"grass_scale": [1.0]}},
    }
    spec = {"flags": flags, "methods": methods, "seeds": [1, 2], "reference": "grass"}
    config = tmp_path / "tuned.yaml"
    config.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    done = run_comparison(config, out, tmp_path / "cache")
    assert "unequal tuning budgets" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    results = {(r["name"], r["seed"]): r for r in summary["results"]}
    grid = ["adamw-lr0.0001", "adamw-lr0.03"]
    assert summary["grids"] == {"adamw": grid, "grass": ["grass-scale1"]}
    best = min(grid, key=lambda name: results[(name, 1)]["eval_loss"])
    assert summary["chosen"] == {"adamw": best, "grass": "grass-scale1"}
    # the seeds after the first run the chosen points only
    assert sorted(k for k in results if k[1] == 2) == sorted([(best, 2), ("grass-scale1", 2)])
    for r in summary["results"]:
        assert r["test_perplexity"] == pytest.approx(math.exp(r["test_loss"]))
    diffs = [results[(best, s)]["test_perplexity"] - results[("grass-scale1", s)]["test_perplexity"]
             for s in (1, 2)]  # fmt: skip
    row = next(line for line in (out / "table.md").read_text().splitlines() if "| adamw |" in line)
    assert f"{sum(diffs) / 2:+.2f} ({min(diffs):+.2f} to {max(diffs):+.2f})" in row
    assert "| test perplexity |" in (out / "table.md").read_text()
    tuning = (out / "tuning.md").read_text()
    assert "| adamw | adamw-lr0.03 |" in tuning
    edge = "lowest" if best == "adamw-lr0.0001" else "highest"
    lr = 1e-4 if best == "adamw-lr0.0001" else 3e-2
    assert f"adamw is chosen at an edge of its grid (learning_rate {lr:g} is the {edge})" in tuning
    assert "grass is chosen" not in tuning  # one value: no edge to speak of
    assert list(summary["chosen_at_grid_edge"]) == ["adamw"]

    # --read-only starts nothing: a third seed is not run, the finished runs are tabulated
    run_comparison(config, out, tmp_path / "cache", "--seeds", "1", "2", "3", "--read-only")
    again = json.loads((out / "summary.json").read_text())
    assert sorted(again["not_run"]) == sorted([[best, 3], ["grass-scale1", 3]])
    assert len(again["results"]) == len(summary["results"])
    assert not (out / f"{best}-s3").exists()
    assert "(2 seeds)" in (out / "table.md").read_text()


def test_grid_edges_name_the_knobs_at_the_end_of_several_numeric_values():
    compare = load_script("compare", "benchmarks")
    entry = {"grid": {"learning_rate": [1e-3, 3e-3, 1e-2], "optim_args.scale": [0.25, 1.0]}}
    entry["grid"]["selection"] = ["top_r", "multinomial_nr"]  # not numeric: never an edge
    names = list(compare.grid_points("m", entry))
    assert len(names) == 12
    edges = {name: compare.grid_edges("m", entry, name) for name in names}
    assert edges["m-lr0.003-scale0.25-selectiontop_r"] == ["optim_args.scale 0.25 is the lowest"]
    assert edges["m-lr0.01-scale1-selectionmultinomial_nr"] == [
        "learning_rate 0.01 is the highest",
        "optim_args.scale 1 is the highest",
    ]
    middle = {"grid": {"learning_rate": [1e-3, 3e-3, 1e-2], "optim_args.scale": [0.25]}}
    assert compare.grid_edges("m", middle, "m-lr0.003-scale0.25") == []


def test_a_streamed_corpus_packs_the_same_blocks_lazily(cache, tmp_path):
    from datasets import load_dataset

    text = tmp_path / "stream.txt"
    text.write_text("A streamed corpus is packed on the fly, block by block. " * 300)
    spec = corpus.CorpusSpec(train_files=[str(text)])
    raw = corpus.load_corpus(spec)
    tokenizer = corpus.default_tokenizer(spec, raw["train"], vocab_size=300)
    eager = corpus.pack(raw["train"], tokenizer, seq_len=32)["input_ids"]
    streamed = load_dataset(
        "text", data_files={"train": [str(text)]}, sample_by="document", streaming=True
    )
    spec = corpus.CorpusSpec(dataset_name="local-text", streaming=True)
    blocks = corpus.packed_blocks(spec, streamed, tokenizer, seq_len=32, max_validation_blocks=3)
    validation = [b["input_ids"] for b in blocks["validation"]]
    train = [b["input_ids"] for b in blocks["train"]]
    assert validation == eager[:3] and train == eager[3:]


def test_grass_pretraining_defaults_follow_the_ablations_and_yield_to_flags():
    _, args = pretrain.parse_args([])
    assert args.learning_rate == pretrain.LEARNING_RATES["grass"]
    assert (args.grass_scale, args.grass_selection) == (0.25, "multinomial_nr")
    _, args = pretrain.parse_args(["--grass_scale", "1", "--grass_selection", "top_r"])
    assert (args.grass_scale, args.grass_selection) == (1.0, "top_r")
    _, args = pretrain.parse_args(["--optim", "adamw_torch"])
    assert args.learning_rate == pretrain.LEARNING_RATES["adamw"]


def test_pretrain_takes_a_moe_config_and_projects_its_experts(cache, tmp_path):
    """``--model_config`` with a Mixtral config (configs/models/mixtral-tiny.json): the experts'
    3-D weights are projected (the report's projected share counts them) and the loss falls."""
    out = tmp_path / "moe"
    config = ROOT / "configs" / "models" / "mixtral-tiny.json"
    pretrain.main(small_flags(out, "--optim", "grass", "--model_config", str(config),
                              "--max_steps", "12", "--save_strategy", "no"))  # fmt: skip
    losses = logged(out, "loss")
    assert min(losses[-3:]) < losses[0] - 0.5
    report = json.loads((out / "resource_report.json").read_text())
    values = json.loads(config.read_text())
    h, inter, experts = (
        values["hidden_size"],
        values["intermediate_size"],
        values["num_local_experts"],
    )
    trainable = report["trainable_param_bytes"] / 4  # float32
    expert_share = values["num_hidden_layers"] * experts * 3 * h * inter / trainable
    assert report["projected_param_fraction"] > expert_share > 0.3

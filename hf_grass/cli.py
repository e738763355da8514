"""What the training scripts share: config files as flags, method names, resume, logging, exit.

``scripts/finetune.py`` and ``scripts/pretrain.py`` parse their flags with transformers'
``HfArgumentParser``, optionally after one JSON/YAML config file whose keys are flag names; a
user's mistake (`UsageError`) prints one line ``<script>: error: ...`` and exits with status 2, as
argparse does. ``HF_GRASS_DEBUG=1`` shows the traceback of such errors as well.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import methods
from .errors import MissingFileError, UsageError

logger = logging.getLogger(__name__)

# Set to 1 to see the traceback of a usage error (a bad flag, config or data file) too.
DEBUG_ENV = "HF_GRASS_DEBUG"
EPILOG = (
    f"A bad flag value, config or data file prints one line and exits with status 2; set "
    f"{DEBUG_ENV}=1 to see its traceback as well."
)
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
# TrainingArguments defaults shared by the scripts (unless given): Grass, batch 16, warm-up over
# 10% of the steps, no weight decay, clipping at 1.0, seed 42, no reporting services.
TRAINER_DEFAULTS: dict[str, Any] = dict(
    optim="grass",
    per_device_train_batch_size=16,
    per_device_eval_batch_size=32,
    warmup_steps=0.1,
    weight_decay=0.0,
    max_grad_norm=1.0,
    seed=42,
    report_to="none",
)


def method_name(optim: Any, use_lora: bool = False) -> str:
    """The registry's name of the method ``optim`` selects ('lora' with ``use_lora``; see
    ``hf_grass.methods``), or the optimizer's own name for an optim the registry does not list."""
    if use_lora:
        return "lora"
    method = methods.for_optim(optim)
    return str(getattr(optim, "value", optim)).lower() if method is None else method.name


class BuiltOptimArguments:
    """Lets ``optim`` take the registry's optimizers that the scripts build (``muon``,
    ``adam_mini``, ``fira_adamw``, ``badam``: ``methods.BUILT_HERE``) past transformers' check
    of optimizer names, as ``GrassArguments`` does for ``grass``. An optim that neither the
    registry nor transformers knows is a `UsageError` naming both. Put it first among the bases:
    ``class Args(BuiltOptimArguments, GrassTrainingArguments)``.
    """

    def __post_init__(self) -> None:
        from transformers.training_args import OptimizerNames

        name = str(getattr(self.optim, "value", self.optim))
        built_here = name.lower() in methods.BUILT_HERE
        if (
            not built_here
            and name.lower() != "grass"
            and name not in {o.value for o in OptimizerNames}
        ):
            raise UsageError(
                f"Unknown --optim {name!r}: use grass, {', '.join(methods.BUILT_HERE)}, or a "
                "transformers optimizer name (adamw_torch, adamw_bnb_8bit, galore_adamw, ...; "
                "--help lists them)."
            )
        if built_here:
            self.optim = OptimizerNames.ADAMW_TORCH.value  # a stand-in for the stock checks
        super().__post_init__()  # type: ignore[misc]
        if built_here:
            self.optim = name.lower()


def read_config(path: str) -> dict[str, Any]:
    """A JSON or YAML mapping of flag names to values."""
    if not os.path.isfile(path):
        raise MissingFileError(f"Config file {path} does not exist; see configs/ for examples.")
    text = Path(path).read_text()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        problem = " ".join(str(err).split())  # YAML's messages span several lines
        raise UsageError(f"Cannot parse the config file {path}: {problem}") from err
    if not isinstance(data, dict):
        raise UsageError(
            f"{path} must hold a mapping of flag names to values, got {type(data).__name__}."
        )
    return data


def config_to_flags(config: dict[str, Any]) -> list[str]:
    """A config mapping as command-line tokens, so argparse converts every value's type."""
    tokens: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            tokens += [f"--{key}", *(str(v) for v in value)]
        elif isinstance(value, dict):
            tokens += [f"--{key}", json.dumps(value)]
        else:
            tokens += [f"--{key}", str(value)]
    return tokens


def expand_config(parser: argparse.ArgumentParser, argv: Sequence[str], script: str) -> list[str]:
    """``argv`` with a leading config file replaced by its flags (later flags win)."""
    argv = list(argv)
    if not argv or not argv[0].endswith(CONFIG_SUFFIXES):
        return argv
    config = read_config(argv[0])
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(config) - known)
    if unknown:
        raise UsageError(
            f"Unknown keys {unknown} in {argv[0]}: use the flag names of "
            f"`python scripts/{script} --help`, without the dashes."
        )
    return config_to_flags(config) + argv[1:]


def given_flags(argv: Sequence[str], names: Sequence[str]) -> dict[str, str | None]:
    """The values of ``names`` on the command line (the last occurrence wins, as in argparse)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in names:
        pre.add_argument(
            f"--{name}", f"--{name.replace('_', '-')}", default=None, nargs="?", const="true"
        )
    return vars(pre.parse_known_args(list(argv))[0])


@contextlib.contextmanager
def values_as_usage_errors() -> Iterator[None]:
    """Report a ``ValueError`` raised inside as a `UsageError`: a value the user passed (a flag
    the arguments' own checks refuse, Grass targets or a rank that do not fit the model)."""
    try:
        yield
    except ValueError as err:
        if isinstance(err, UsageError):
            raise
        raise UsageError(str(err)) from err


@contextlib.contextmanager
def without_bitsandbytes() -> Iterator[None]:
    """Inside, ``import bitsandbytes`` raises ImportError unless it is imported already.

    peft imports bitsandbytes where it is installed (GaLore's and APOLLO's packages pull it in),
    and that import logs a warning about CPU kernels that no user of the scripts can act on.
    peft treats a failed import as bitsandbytes being absent, which is right for a model that
    holds no bitsandbytes layer: such a model could only exist with bitsandbytes imported. peft
    remembers some of these checks, so use it where no such model comes later in the process.
    """
    hold = "bitsandbytes" not in sys.modules
    if hold:
        sys.modules["bitsandbytes"] = None  # how Python marks a module as not importable
    try:
        yield
    finally:
        if hold and sys.modules.get("bitsandbytes", False) is None:
            del sys.modules["bitsandbytes"]


def parse_dataclasses(parser, argv: Sequence[str]) -> tuple:
    """``parser.parse_args_into_dataclasses``; values the dataclasses refuse become UsageError."""
    with values_as_usage_errors():  # argparse itself exits with status 2 on a malformed flag
        return parser.parse_args_into_dataclasses(list(argv))


# The Trainer writes a checkpoint's trainer_state.json last: a folder without a readable one is
# a save that was interrupted, and resuming from it fails halfway through loading.
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def incomplete_reason(checkpoint: str | Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (its save was interrupted), or None."""
    state = Path(checkpoint) / TRAINER_STATE
    if not state.is_file():
        return f"it has no {TRAINER_STATE}, so its save was interrupted"
    try:
        json.loads(state.read_text())
    except ValueError:  # JSON and UTF-8 decoding errors alike: a file cut short
        return f"its {TRAINER_STATE} is unreadable, so its save was interrupted"
    return None


def _step(checkpoint: Path) -> int | None:
    match = _CHECKPOINT.match(checkpoint.name)
    return int(match[1]) if match else None


def _checkpoints(folder: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders in ``folder``, latest step first."""
    found = [p for p in folder.iterdir() if _step(p) is not None and p.is_dir()]
    return sorted(found, key=_step, reverse=True)


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from (``true``: the last complete one in ``output_dir``).

    A checkpoint whose save was interrupted is skipped (with one log line) when choosing the last
    one, and refused, naming the complete one before it, when named.
    """
    if resume is None:
        return None
    if str(resume).lower() == "true":
        folder = Path(output_dir)
        checkpoints = _checkpoints(folder) if folder.is_dir() else []
        if not checkpoints:
            raise MissingFileError(
                f"--resume_from_checkpoint true, but {output_dir} holds no checkpoint-* "
                "folder: pass the checkpoint folder, or drop the flag."
            )
        skipped = []
        for checkpoint in checkpoints:
            reason = incomplete_reason(checkpoint)
            if reason is None:
                if skipped:
                    logger.warning("Skipping %s; resuming from %s", "; ".join(skipped), checkpoint)
                return str(checkpoint)
            skipped.append(f"{checkpoint.name} ({reason})")
        raise UsageError(
            f"--resume_from_checkpoint true, but {output_dir} holds no complete checkpoint "
            f"({'; '.join(skipped)}): drop the flag to start afresh."
        )
    if not os.path.isdir(resume):
        raise MissingFileError(
            f"--resume_from_checkpoint {resume} does not exist; pass a checkpoint folder."
        )
    reason = incomplete_reason(resume)
    if reason is not None:
        named = Path(resume)
        step = _step(named)
        earlier = [
            c
            for c in _checkpoints(named.parent)
            if (step is None or _step(c) < step) and incomplete_reason(c) is None
        ]
        if earlier:
            fix = f"resume from {earlier[0]} instead"
        else:
            fix = (
                f"no complete checkpoint precedes it in {named.parent}: drop the flag to start "
                "afresh"
            )
        raise UsageError(f"--resume_from_checkpoint {resume} cannot be used: {reason}; {fix}.")
    return resume


def setup_logging(args: Any, names: Sequence[str]) -> None:
    """transformers'/datasets' verbosity from ``args``; our loggers ``names`` at INFO on rank 0."""
    import datasets
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    log_level = args.get_process_log_level()
    transformers.utils.logging.set_verbosity(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    for name in names:
        logging.getLogger(name).setLevel(
            min(logging.INFO, log_level) if args.should_log else log_level
        )


def run(main: Callable[[list[str] | None], Any], argv: list[str] | None, script: str) -> int:
    """Run ``main``; a usage error prints one line (no traceback) and returns status 2."""
    import torch.distributed as dist

    try:
        main(argv)
        if dist.is_available() and dist.is_initialized():
            # Tear the process group down before exit: gloo can abort in its destructors
            # otherwise, failing a torchrun job that trained correctly.
            dist.destroy_process_group()
    except UsageError as err:
        if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            raise
        prog = Path(sys.argv[0]).name if argv is None else script
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0

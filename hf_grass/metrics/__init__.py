"""GLUE metrics that also work offline: the Hub's `glue` metric, or a local copy of its math."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import evaluate

logger = logging.getLogger(__name__)

GLUE_OFFLINE_PATH = Path(__file__).parent / "glue_offline"
_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
_OTHER_CONFIGS = ("mnli_matched", "mnli_mismatched", "ax", "hans", "accuracy", "default")


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(f, "").upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def load_glue_metric(task: str = "accuracy") -> evaluate.EvaluationModule:
    """The GLUE metric of `task` (a GLUE task name, or "accuracy" for any classification task).

    Online, the Hub's `glue` metric is tried first; when it cannot be loaded, or when
    `HF_HUB_OFFLINE` is set, the local module `glue_offline`, which computes the same numbers.
    """
    if task not in _TASKS + _OTHER_CONFIGS:
        raise ValueError(
            f"Unknown GLUE metric {task!r}; use one of {', '.join(_TASKS + _OTHER_CONFIGS)}."
        )
    if task in _TASKS and not _offline():
        try:
            return evaluate.load("glue", task)
        except Exception as err:  # no network, Hub outage, a changed script: all mean "use ours"
            logger.info("Using the local GLUE metric (the Hub's could not be loaded: %s)", err)
    return evaluate.load(str(GLUE_OFFLINE_PATH), config_name=task)

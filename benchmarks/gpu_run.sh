#!/usr/bin/env bash
# The GPU suite in one command, for a machine with no network (about 5.5 minutes on an H200):
# install the wheels of the repo's .whl/ folder (torchao for 8-bit AdamW, galore-torch; no
# dependencies, so the machine's torch stays the one in use) into /tmp/site, run
# benchmarks/gpu_suite.py within a time budget, print its tables. /tmp/site is not put on
# PYTHONPATH: the suite adds it (--site) only in the runs that need it, because transformers
# imports torchao at import time whenever it can find it.
#
#   bash benchmarks/gpu_run.sh                  # everything the budget allows
#   bash benchmarks/gpu_run.sh --only 13b,7b16  # any gpu_suite.py options
#   PYTHON=.venv/bin/python OUT=/tmp/x bash benchmarks/gpu_run.sh --tiny   # CPU self-check
#
# The wheels are not in git; on a machine with the package index, before the GPU run:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     torchao==0.17.0 galore-torch==1.0      # torchao 0.17 is the release made for torch 2.11
#
# Results: $OUT/gpu_suite.json (rewritten after every run) and $OUT/gpu_run.log (this output);
# OUT defaults to benchmarks/results. BUDGET_S (330) is the suite's --budget-s: no run ends
# after it. Without the wheels the suite still runs and reports GaLore and 8-bit AdamW missing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
export OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
SITE_ARGS=()
{
  echo "gpu_run: $(date -u +%FT%TZ), $("$PY" --version 2>&1), budget ${BUDGET_S:-330} s"
  if compgen -G ".whl/*.whl" > /dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl; then
      rm -rf "$SITE/test"  # torchao's wheel ships a top-level "test" package: not ours to import
      SITE_ARGS=(--site "$SITE")
      echo "gpu_run: installed $(cd .whl && echo *.whl) into $SITE"
    else
      echo "gpu_run: the wheels did not install; GaLore and 8-bit AdamW may be reported missing"
    fi
  else
    echo "gpu_run: no .whl/ folder; GaLore and 8-bit AdamW may be reported missing"
  fi
  "$PY" -c "import torch; print('gpu_run: torch', torch.__version__, torch.__file__)"
  "$PY" benchmarks/gpu_suite.py --budget-s "${BUDGET_S:-330}" ${SITE_ARGS[@]+"${SITE_ARGS[@]}"} "$@"
} 2>&1 | tee "$OUT/gpu_run.log"

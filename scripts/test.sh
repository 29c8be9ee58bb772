#!/usr/bin/env bash
# The README's test command: sets up .venv when needed, then runs the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/test_metrics.py -x`; `-n 0` runs in one process).
# The files are shared out over one pytest-xdist worker per CPU core (a whole file to one worker, so that its
# module fixtures are built once), each worker with one torch thread unless OMP_NUM_THREADS says otherwise.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh --with-browser
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -n auto --dist loadfile "$@"

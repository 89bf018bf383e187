#!/usr/bin/env bash
# Every GPU measurement of issue 11 in one go: about 6 minutes on one H100/H200 with torch,
# transformers and PEFT installed; no network. Prints each table and writes them (Markdown
# and JSON) to the output folder.
#
#   benchmarks/gpu_check.sh [OUT_DIR]        # or GPU_CHECK_OUT=DIR; default ./gpu_check_out
#
# Environment:
#   GPU_CHECK_BUDGET_S  total seconds (default 360); each step gets what is left of it
#   WHEELS=DIR          pip-install soundfile/soxr from local wheels (--no-index) if missing:
#                       only the end-to-end run needs them, and it is skipped without them
#   GPU_CHECK_CLIPS     clips of the end-to-end run (default 1000; it gets what is left of the budget)
#   SMOKE=1             run everything on the CPU at tiny size (what the test suite does)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${GPU_CHECK_OUT:-gpu_check_out}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET="${GPU_CHECK_BUDGET_S:-360}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export AUDIOPETL_CACHE="${AUDIOPETL_CACHE:-$(mktemp -d)}"
PY="${PYTHON:-python}"
if [ "${SMOKE:-0}" = 1 ]; then
  DEVICE=cpu
  TRAIN=(--tiny --in-process --sides audiopetl,audiopetl-fused,hf-sdpa,hf-eager-fp32 --methods lora,dpt25)
  INFER=(--tiny --no-compile)
  PROFILE=(--tiny --methods lora)
  ATTENTION=(--tiny --repeats 1)
  ACCURACY=(--tiny --epochs 2)
  E2E=(--tiny)
else
  DEVICE=cuda
  TRAIN=(--shapes 500x32,100x128 --sides audiopetl,hf-sdpa,hf-eager-fp32,audiopetl-eager,hf-sdpa-compile,audiopetl-cudagraphs
         --peer-compile-methods lora --budget-s $((BUDGET * 40 / 100)))
  INFER=(--frames 500 --batch 64)
  PROFILE=(--frames 500 --batch 32 --layers 2)
  ATTENTION=()
  ACCURACY=()
  E2E=(--clips "${GPU_CHECK_CLIPS:-1000}" --seconds 5 --epochs 3 --batch 32 --workers 8)
fi
START=$SECONDS
FAILED=0

step() {  # step NAME MAX_SECONDS COMMAND...: run with what is left of the budget, at most MAX_SECONDS
  local name=$1 most=$2 left
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  [ "$left" -gt "$most" ] && left=$most
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped, the time budget is spent" | tee -a "$OUT/summary.txt"
    return
  fi
  echo "== $name (at most ${left}s): $*"
  local began=$SECONDS
  timeout "$left" "$@" 2>"$OUT/$name.stderr.txt" | tee "$OUT/$name.txt"
  local status=${PIPESTATUS[0]}
  echo "== $name: exit $status after $((SECONDS - began))s" | tee -a "$OUT/summary.txt"
  [ "$status" -ne 0 ] && FAILED=1 && tail -20 "$OUT/$name.stderr.txt"
}

{
  echo "gpu_check $(date -u +%Y-%m-%dT%H:%MZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "| transformers", transformers.__version__, "| peft", peft.__version__,
  "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
} | tee "$OUT/summary.txt"

step train_step $((BUDGET * 62 / 100)) "$PY" benchmarks/bench_train_step.py --device "$DEVICE" "${TRAIN[@]}" --out "$OUT"
step inference 50 "$PY" benchmarks/bench_inference.py --device "$DEVICE" "${INFER[@]}" --out "$OUT"
step profile_step 40 "$PY" benchmarks/profile_step.py --device "$DEVICE" "${PROFILE[@]}" --out "$OUT"
step attention 20 "$PY" benchmarks/bench_attention.py --device "$DEVICE" "${ATTENTION[@]}" --out "$OUT"

if ! "$PY" -c 'import soundfile, soxr' 2>/dev/null && [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install --no-index --find-links "$WHEELS" soundfile soxr >/dev/null
fi
if "$PY" -c 'import soundfile, soxr' 2>/dev/null; then
  if [ "${SMOKE:-0}" = 1 ] && [ "${SMOKE_E2E:-0}" != 1 ]; then
    echo "== end_to_end: skipped in SMOKE mode (SMOKE_E2E=1 runs it)" | tee -a "$OUT/summary.txt"
  else
    step end_to_end 120 "$PY" benchmarks/bench_end_to_end.py --device "$DEVICE" "${E2E[@]}" --out "$OUT"
  fi
else
  echo "== end_to_end: skipped, soundfile/soxr are not installed (set WHEELS=DIR with their wheels)" \
    | tee -a "$OUT/summary.txt"
fi

step accuracy 90 "$PY" benchmarks/bench_accuracy.py --device "$DEVICE" "${ACCURACY[@]}" --out "$OUT"

echo "== done in $((SECONDS - START))s; tables in $OUT/*.md" | tee -a "$OUT/summary.txt"
exit $FAILED

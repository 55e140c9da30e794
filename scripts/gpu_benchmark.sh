#!/usr/bin/env bash
# IR2Net-A stages 1 and 2 and the float ResNet-18 baseline (then stage 2
# with remat and the ResNet-34 teacher trained alone, while time is left), in bfloat16 and
# float32, on one GPU: img/s, MFU, peak memory, XLA's memory figure and the
# ratio to the float ResNet-18 (goal for IR2Net-A: >= 0.33; for stage 2 in
# bfloat16 on one H100: >= 2,500 img/s).
#
#   scripts/gpu_benchmark.sh [more python -m ir2net_jax.tools.benchmark flags]
#
# Made to finish in 8 minutes on one H100 with the packages of a JAX CUDA
# image (jax, flax, optax, orbax-checkpoint, chex, absl-py, PyYAML) plus
# ml_collections; no TensorFlow. Wheels in .whl/ (if any) are installed to
# /tmp/site first. Each recipe runs in its own process, so that its peak
# memory is its own, under `timeout`, at per-device batch $BATCH, retried at
# $FALLBACK_BATCH if it runs out of memory. Runs that would not end before
# $BUDGET seconds are skipped. The table goes to stdout; with $OUT set,
# gpu_benchmark.json (all rows), gpu_benchmark.txt (the table) and
# gpu_benchmark.log (everything) are written there.
#
# Environment: BATCH (256), FALLBACK_BATCH (128), STEPS (10), WARMUP (2),
# RECIPE_TIMEOUT (150 s), BUDGET (460 s), PYTHON (python3).
# A CPU dry run: BATCH=1 FALLBACK_BATCH=1 scripts/gpu_benchmark.sh --tiny
set -euo pipefail

cd "$(dirname "$0")/.."
BATCH=${BATCH:-256}
FALLBACK_BATCH=${FALLBACK_BATCH:-128}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
RECIPE_TIMEOUT=${RECIPE_TIMEOUT:-150}
BUDGET=${BUDGET:-460}
MIN_RUN_S=40  # A run given less than this would only compile.
source scripts/gpu_common.sh gpu_benchmark

echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname)"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
      --format=csv || true
fi
"$PYTHON" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex",
             "ml_collections", "numpy"):
  try:
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "?"))
  except ImportError as e:
    print(name, "MISSING:", e)
import jax
print("devices:", jax.devices())
EOF

# One line per finished run, so that a cut-off log still has the numbers.
SUMMARY='
import json, sys
(r,) = json.load(open(sys.argv[1]))["rows"]
mfu = "-" if r["mfu"] is None else "%.1f" % (100 * r["mfu"])
xla = "-" if r["xla_memory_mb"] is None else "%.0f" % r["xla_memory_mb"]
print("   %.0f img/s, MFU %s %%, peak %.0f MB, XLA %s MB, compile %.0f s"
      % (r["images_per_s"], mfu, r["peak_memory_mb"], xla, r["compile_s"]))
'

# run RECIPE DTYPE [flags...]: one benchmark process; its JSON goes to
# $WORK/NN.json, its stderr's tail to the log if it fails.
runs=0
run() {
  local recipe=$1 dtype=$2 batch left limit status
  shift 2
  for batch in "$BATCH" "$FALLBACK_BATCH"; do
    left=$((BUDGET - SECONDS))
    if ((left < MIN_RUN_S)); then
      echo "== $recipe $dtype: skipped, ${left}s of the budget left"
      return 0
    fi
    limit=$((left < RECIPE_TIMEOUT ? left : RECIPE_TIMEOUT))
    echo "== $recipe $dtype, per-device batch $batch (timeout ${limit}s)"
    if timeout "$limit" "$PYTHON" -m ir2net_jax.tools.benchmark \
        --recipes="$recipe" --config.dtype="$dtype" \
        --per_device_batch="$batch" --steps="$STEPS" --warmup="$WARMUP" \
        --xla_cpu_flags= --skip_pipeline --skip_inference --json "$@" \
        > "$WORK/run.out" 2> "$WORK/run.err"; then
      runs=$((runs + 1))
      mv "$WORK/run.out" "$WORK/$(printf '%02d' "$runs").json"
      "$PYTHON" -c "$SUMMARY" "$WORK/$(printf '%02d' "$runs").json"
      return 0
    else
      status=$?
    fi
    tail -n 5 "$WORK/run.err"
    if ((status == 124)); then
      echo "== $recipe $dtype: timed out after ${limit}s"
      return 0
    elif ! grep -qiE 'RESOURCE_EXHAUSTED|out of memory' "$WORK/run.err"; then
      echo "== $recipe $dtype: failed (exit $status)"
      return 0
    fi
    echo "== $recipe $dtype: out of memory at per-device batch $batch"
  done
}

for dtype in bfloat16 float32; do
  for recipe in float_resnet18 ir2net_a_stage2 ir2net_a_stage1; do
    run "$recipe" "$dtype" "$@"
  done
done
# Rematerialised residual blocks: the memory lever for larger batches.
run ir2net_a_stage2 bfloat16 --remat "$@"
for dtype in bfloat16 float32; do
  run float_resnet34 "$dtype" "$@"
done

if ((runs == 0)); then
  echo "== no recipe ran"
  exit 1
fi
rows=$(printf '%s,' "$WORK"/*.json)
rows=${rows%,}
echo "== $runs runs in ${SECONDS}s"
"$PYTHON" -m ir2net_jax.tools.benchmark --from_json="$rows" | tee "$WORK/table.txt"
if [[ -n "${OUT:-}" ]]; then
  "$PYTHON" -m ir2net_jax.tools.benchmark --from_json="$rows" --json \
      > "$OUT/gpu_benchmark.json"
  cp "$WORK/table.txt" "$OUT/gpu_benchmark.txt"
fi

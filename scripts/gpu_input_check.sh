#!/usr/bin/env bash
# Whole runs on one GPU with TensorFlow absent, each against its own step
# (python -m ir2net_jax.tools.benchmark.loop): end-to-end img/s, the step's
# img/s, the share of the run spent waiting for input, host CPU use.
#
#   (a) digits, data on the device (the device input engine);
#   (b) IR2Net-A stage 2 in bfloat16 at batch 256 on an ImageNet-shaped
#       folder of generated JPEGs (1000 classes), the grain engine on every
#       core, with one evaluation and one checkpoint (random weights: the
#       speed of stage 2, not its accuracy); the windows resized on the GPU
#       (input_resize 'auto');
#   (c) the same for half the steps with the windows resized on the host
#       (the same batches: only the speed differs);
#   (d) (b) for a third of the steps on a copy of the folder with shorter
#       sides of 256 pixels (ir2net-preresize), what feeds a faster model;
#   then the ImageNet augmentation per decoder on 1 and all cores.
#
#   scripts/gpu_input_check.sh
#
# Made to finish in 8 minutes on one H100-class GPU with 16 cores and the
# packages of a JAX CUDA image plus the wheels in .whl/ (ml_collections,
# tensorboard, scikit-learn, grain, array_record, simplejpeg and what they
# need that the image lacks, 29 MB for Python 3.12: scripts/gpu_wheels.sh;
# no tensorflow-datasets: digits and folders need none), installed to
# /tmp/site first. With $OUT set,
# input_check.json (the rows) and input_check.log are written there.
#
# Environment: STEPS (300), PER_CLASS (12 train images a class), TIMEOUT
# (240 s a run), PYTHON (python3). A CPU dry run: TINY=1 scripts/gpu_input_check.sh
set -euo pipefail

cd "$(dirname "$0")/.."
STEPS=${STEPS:-300}
PER_CLASS=${PER_CLASS:-12}
TIMEOUT=${TIMEOUT:-240}
source scripts/gpu_common.sh input_check

echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname), $(nproc) cores:" \
     "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
command -v nvidia-smi > /dev/null && nvidia-smi \
    --query-gpu=name,memory.total,driver_version --format=csv || true
"$PYTHON" -c "import importlib.util as u; print('tensorflow:', 'present' if u.find_spec('tensorflow') else 'absent')"

if [[ -n "${TINY:-}" ]]; then   # a CPU dry run of every command
  STEPS=4; CLASSES=4; PER_CLASS=6
  DIGITS=(--steps=4)
  SIZE=(--config.image_size=32 --config.batch_size=8 --config.eval_batch_size=8)
  RESIZE=(--config.input_resize=device)   # what 'auto' is on a GPU
  DECODERS=(--examples=16 --workers=1,2 --image_size=64)
else
  CLASSES=1000
  DIGITS=(--steps=600)
  SIZE=(--config.batch_size=256 --config.dtype=bfloat16)
  RESIZE=()
  DECODERS=(--examples=2048 --workers=1,$(nproc))
fi

loop() {  # loop NAME [benchmark.loop flags...]
  local name=$1; shift
  echo "== $name"
  timeout "$TIMEOUT" "$PYTHON" -m ir2net_jax.tools.benchmark.loop --json "$@" \
      > "$WORK/$name.json" || echo "   $name failed (status $?)"
}

loop digits --config=configs/digits.py "${DIGITS[@]}" --config.log_every_steps=50

"$PYTHON" -m ir2net_jax.tools.benchmark.decoders --write_folder="$WORK/inet" \
    --classes="$CLASSES" --train_per_class="$PER_CLASS" --eval_per_class=1
loop ir2net_a_stage2 --config=configs/imagenet.py:a,stage=2 --random_weights \
    --steps="$STEPS" --config.dataset="folder:$WORK/inet" \
    --config.eval_split=val --config.input_engine=grain "${SIZE[@]}" \
    "${RESIZE[@]}" --config.checkpoint_every_steps="$STEPS" \
    --config.eval_every_epochs=100000 --config.log_every_steps=20
loop ir2net_a_stage2_host_resize --config=configs/imagenet.py:a,stage=2 \
    --random_weights --steps="$((STEPS / 2))" \
    --config.dataset="folder:$WORK/inet" --config.eval_split=val \
    --config.input_engine=grain --config.input_resize=host "${SIZE[@]}" \
    --config.checkpoint_every_steps=100000 \
    --config.eval_every_epochs=100000 --config.log_every_steps=20
"$PYTHON" -m ir2net_jax.tools.preresize --input="$WORK/inet" \
    --output="$WORK/inet256" --shorter_side=256
loop ir2net_a_stage2_shorter_256 --config=configs/imagenet.py:a,stage=2 \
    --random_weights --steps="$((STEPS > 6 ? STEPS / 3 : 2))" \
    --config.dataset="folder:$WORK/inet256" --config.eval_split=val \
    --config.input_engine=grain "${SIZE[@]}" "${RESIZE[@]}" \
    --config.checkpoint_every_steps=100000 \
    --config.eval_every_epochs=100000 --config.log_every_steps=20

"$PYTHON" - "$WORK" "${OUT:-}" <<'EOF'
import glob, json, os, sys
from ir2net_jax.tools.benchmark import loop
rows = []
for path in sorted(glob.glob(sys.argv[1] + "/*.json")):
  try:
    rows.append({"run": os.path.basename(path)[:-5], **json.load(open(path))})
  except ValueError:
    print("no row:", os.path.basename(path))
for row in rows:
  print(f"{row['run']}:")
  print(loop.format_row(row))
if sys.argv[2]:
  with open(os.path.join(sys.argv[2], "input_check.json"), "w") as f:
    json.dump(rows, f, indent=1)
EOF

echo "== decoders"
timeout "$TIMEOUT" "$PYTHON" -m ir2net_jax.tools.benchmark.decoders \
    "${DECODERS[@]}" || echo "   decoders failed (status $?)"

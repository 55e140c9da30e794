#!/usr/bin/env bash
# Wheels for a GPU machine that reaches no package registry: what a run with
# TensorFlow absent needs beyond a JAX CUDA image (which has jax, flax,
# optax, orbax-checkpoint, chex, numpy, scipy, absl-py, protobuf, pillow),
# for that machine's Python, into .whl/, which scripts/gpu_common.sh
# installs before the GPU scripts start. Run it where the registries are
# reachable, with the machine's `python3 -V`:
#
#   scripts/gpu_wheels.sh 3.12
#
# Then carry .whl (git ignores it) with the scripts. It prints the total
# size: the device tool carries 64 MiB at most.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?pass the Python version of the GPU machine, e.g. 3.12}
PIP=${PIP:-python3 -m pip}
rm -rf .whl
mkdir -p .whl
# The pins of requirements.txt, for what the image lacks.
wanted=$(grep -iE '^(ml-collections|tensorboard|scikit-learn|simplejpeg|grain|array_record)==' \
    requirements.txt)
$PIP download -q -d .whl --only-binary=:all: --implementation cp \
    --python-version "$PY" --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any $wanted
# What the image already has (and must keep: its jax, numpy and protobuf
# are the versions its CUDA build was made with), flax's and orbax's own
# dependencies included.
for have in jax jaxlib numpy scipy ml_dtypes absl_py protobuf pillow flax \
            optax orbax_checkpoint chex typing_extensions setuptools etils \
            fsspec zipp pyyaml packaging; do
  rm -f .whl/"$have"-*.whl
done
ls .whl
du -ch .whl/*.whl | tail -1

"""Cost accounting (ir2net_jax.models.costs) against SPEC section 6."""

import functools
import math
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from ir2net_jax.models import costs, create_model
from ir2net_jax.nn.layers import BatchNorm, BinaryConv

IMAGENET = (1, 224, 224, 3)
CIFAR = (1, 32, 32, 3)

# SPEC section 6 (ImageNet, 224 x 224): BOPs, FLOPs, OPs, fusion params.
SPEC = {
    "a": (1.676e9, 1.635e8, 1.897e8, 524_288),
    "b": (1.676e9, 1.508e8, 1.769e8, 264_448),
    "c": (1.676e9, 1.469e8, 1.731e8, 186_368),
    "d": (1.676e9, 1.393e8, 1.655e8, 31_070),
}
RTOL = 0.005


@functools.lru_cache(maxsize=None)
def _summary(name, shape=IMAGENET, **kwargs):
  return costs.summarize(create_model(name, **kwargs), shape)


def _trainable_count(name, shape, **kwargs):
  model = create_model(name, **kwargs)
  variables = jax.eval_shape(
      lambda k: model.init(k, jnp.zeros(shape), train=False),
      jax.random.key(0))
  return sum(math.prod(p.shape)
             for p in jax.tree_util.tree_leaves(variables["params"]))


@pytest.mark.parametrize("variant", sorted(SPEC))
def test_spec_table(variant):
  bops, flops, ops, fusion = SPEC[variant]
  s = _summary(f"ir2net_{variant}", stage=2)
  assert s.bops == pytest.approx(bops, rel=RTOL)
  assert s.flops == pytest.approx(flops, rel=RTOL)
  assert s.ops == pytest.approx(ops, rel=RTOL)
  assert s.ops == s.bops / 64 + s.flops
  assert s.fusion_params == fusion


def test_backbone():
  s = _summary("ir2net_a", information_recovery=False)
  assert s.bops == pytest.approx(1.676e9, rel=RTOL)
  assert s.flops == pytest.approx(1.378e8, rel=RTOL)
  assert s.ops == pytest.approx(1.640e8, rel=RTOL)
  assert s.layer("conv1").flops == pytest.approx(1.180e8, rel=RTOL)
  downsample = sum(l.flops for l in s.layers if "downsample_conv" in l.path)
  assert downsample == pytest.approx(1.93e7, rel=RTOL)
  assert s.layer("fc").flops == pytest.approx(5.1e5, rel=RTOL)
  assert s.fusion_params == 0
  assert {l.kind for l in s.layers if l.bops} == {"binary_conv"}
  # 16 binary 3x3 convs: 10.99 M weights, about 1.37 MB at 1 bit each.
  assert s.params_1bit == pytest.approx(10.99e6, rel=RTOL)
  assert s.params_1bit / 8 == pytest.approx(1.37e6, rel=RTOL)
  assert s.size_bytes == s.params_1bit / 8 + 4 * s.params_32bit


def test_fusion_adds_only_fusion_flops():
  backbone = _summary("ir2net_a", information_recovery=False)
  for variant in SPEC:
    s = _summary(f"ir2net_{variant}", stage=2)
    fusion_flops = sum(l.flops for l in s.layers if "fusion" in l.path)
    assert s.bops == backbone.bops
    assert s.flops == backbone.flops + fusion_flops
    # Every fusion conv runs at 7 x 7, once per weight per position.
    assert fusion_flops == 49 * s.fusion_params


def test_binary_weights_are_1bit_in_both_stages():
  one, two = _summary("ir2net_a", stage=1), _summary("ir2net_a", stage=2)
  assert one.params_1bit == two.params_1bit
  assert one.size_bytes == two.size_bytes


@pytest.mark.parametrize("name, shape, expected", [
    ("cifar_resnet20", CIFAR, 272_458),
    ("ir2net_a", IMAGENET, 12_220_264),
])
def test_params_total_trainable_count(name, shape, expected):
  s = _summary(name, shape)
  assert s.params_1bit + s.params_32bit == expected
  assert _trainable_count(name, shape) == expected


class _Toy(nn.Module):
  """Hand-countable: grouped conv, binary conv, BN, dense (bias)."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), strides=2, padding="VALID", feature_group_count=2,
                use_bias=False, name="gconv")(x)          # (B, 3, 3, 8)
    x = BinaryConv(6, name="bconv")(x)                    # (B, 3, 3, 6)
    x = BatchNorm(use_running_average=not train, name="bn")(x)
    return nn.Dense(5, name="fc")(x.reshape(x.shape[0], -1))


def test_hand_counted_toy_per_example():
  s = costs.summarize(_Toy(), (4, 7, 7, 4))   # batch 4: MACs stay per example
  assert [l.name for l in s.layers] == ["gconv", "bconv", "bn", "fc"]
  assert s.layer("gconv").flops == 3 * 3 * 8 * (3 * 3 * 4 // 2)
  assert s.layer("bconv").bops == 3 * 3 * 6 * (3 * 3 * 8)
  assert s.layer("fc").flops == 54 * 5
  assert s.params_1bit == 3 * 3 * 8 * 6
  assert s.params_32bit == 3 * 3 * 2 * 8 + 2 * 6 + 54 * 5 + 5
  assert s.layer("bconv").output_shape == (4, 3, 3, 6)


def test_format_summary_contains_totals():
  s = _summary("ir2net_c", stage=2)
  text = costs.format_summary(s)
  for total in (f"{s.params:,}", f"{s.params_1bit:,}", f"{s.params_32bit:,}",
                f"{s.fusion_params:,}", f"{s.bops:.3e}", f"{s.flops:.3e}",
                f"{s.ops:.3e}", f"{s.size_bytes / 1e6:.2f} MB"):
    assert total in text
  assert "1.676e+09" in text and "1.469e+08" in text and "1.731e+08" in text
  for layer in s.layers:
    assert layer.name in text


def test_command_line():
  out = subprocess.run(
      [sys.executable, "-m", "ir2net_jax.tools.costs", "--model=ir2net_c",
       "--stage=2", "--image_size=224"],
      capture_output=True, text=True, timeout=60, check=True).stdout
  assert "1.731e+08" in out and "fusion/cheap_operation/conv" in out
  bad = subprocess.run(
      [sys.executable, "-m", "ir2net_jax.tools.costs", "--model=cifar_resnet20",
       "--stage=2"], capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and "stage" in bad.stderr

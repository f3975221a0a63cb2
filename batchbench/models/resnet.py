"""ResNet v1.5 (He et al. 2016, stride on the 3x3 conv) in flax.linen, with ghost batch norm.

Two stems: ``"cifar"`` (3x3 conv, stride 1, no max-pool; for 32x32 inputs) and ``"imagenet"``
(7x7 conv stride 2 then 3x3 max-pool stride 2; for 224x224 inputs). Parameters are always
float32; ``dtype`` is the compute dtype (bfloat16 allowed); logits come back in float32.

Variables: ``params`` and ``batch_stats``. Train with
``model.apply(variables, x, train=True, mutable=["batch_stats"])``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

STEMS = ("cifar", "imagenet")


class GroupBatchNorm(nn.Module):
  """Batch norm whose statistics come from ``num_groups`` equal consecutive slices of the batch.

  ``num_groups=1`` is ordinary batch norm and matches ``nn.BatchNorm`` (same variable names,
  same E[x^2] - E[x]^2 variance in float32, same update rule). With ``num_groups=G`` ("ghost
  batch norm", Hoffer et al. 2017) the batch (B, ...) is viewed as (G, B/G, ...) and each group
  is normalised with its own mean and variance. Under ``jax.jit`` with the batch sharded over a
  mesh, G=1 reduces over the whole global batch (XLA inserts the cross-device all-reduce),
  while G = number of devices gives per-device statistics, as ``pmap``-era BN did: the groups
  are the shards of a batch split along its first axis, so no reduction crosses devices.

  Running averages move towards the mean over groups of the group statistics, and are not
  updated while the module is being initialised (as in ``nn.BatchNorm``).

  Attributes:
    num_groups: G; the batch size must be a multiple of it.
    momentum: running average decay.
    epsilon: added to the variance.
    dtype: dtype of the output (statistics are always float32).
    param_dtype: dtype of ``scale`` and ``bias``.
    scale_init: initialiser of ``scale``.
    bias_init: initialiser of ``bias``.
  """

  num_groups: int = 1
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jnp.ndarray, use_running_average: bool) -> jnp.ndarray:
    """Normalises ``x`` over every axis but the last (features).

    Args:
      x: activations, shape (batch, ..., features).
      use_running_average: use the stored running averages instead of batch statistics.

    Returns:
      Normalised ``x``, in ``dtype`` (or ``x``'s dtype if ``dtype`` is None).
    """
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
    out_dtype = self.dtype or x.dtype

    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
      y = x
    else:
      batch = x.shape[0]
      if batch % self.num_groups:
        raise ValueError(f"bn_groups={self.num_groups} must divide the batch size; got a batch "
                         f"of {batch}. Use a batch that is a multiple of bn_groups.")
      y = x.reshape((self.num_groups, batch // self.num_groups) + x.shape[1:])
      # Statistics in float32 even for bfloat16 compute, as nn.BatchNorm does.
      y32 = y.astype(jnp.promote_types(y.dtype, jnp.float32))
      axes = tuple(range(1, y.ndim - 1))
      mean = y32.mean(axes, keepdims=True)
      # One-pass variance clipped at 0, exactly as nn.BatchNorm's default (use_fast_variance).
      var = jnp.maximum(0.0, (y32 * y32).mean(axes, keepdims=True) - mean * mean)
      if not self.is_initializing():
        group_mean = mean.reshape(self.num_groups, features).mean(0)
        group_var = var.reshape(self.num_groups, features).mean(0)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * group_mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * group_var

    # Same operation order as flax's _normalize, so that G=1 matches nn.BatchNorm closely.
    mul = jax.lax.rsqrt(var + self.epsilon) * scale
    y = (y - mean) * mul + bias
    return jnp.asarray(y.reshape(x.shape), out_dtype)


def _conv_out(size: int, stride: int) -> int:
  # "SAME" padding (and the stem's symmetric pad 3 for a 7x7 kernel) gives ceil(size / stride).
  return -(-size // stride)


class BasicBlock(nn.Module):
  """Two 3x3 convs (stride on the first), as in ResNet-18/34.

  Attributes:
    filters: output channels.
    strides: stride of the first conv and of the projection shortcut.
    dtype: compute dtype.
    bn_groups: ghost batch norm groups (see ``GroupBatchNorm``).
    bn_momentum: running average decay of batch norm.
  """

  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  bn_groups: int = 1
  bn_momentum: float = 0.9
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """Applies the block.

    Args:
      x: activations (batch, height, width, channels).
      train: batch statistics (and running-average updates) if True, running averages if not.

    Returns:
      Activations (batch, height / strides, width / strides, filters).
    """
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
    norm = functools.partial(GroupBatchNorm, num_groups=self.bn_groups,
                             momentum=self.bn_momentum, dtype=self.dtype)
    s = (self.strides, self.strides)
    y = conv(self.filters, (3, 3), s)(x)
    y = nn.relu(norm()(y, not train))
    y = conv(self.filters, (3, 3))(y)
    # Zero-initialised last BN scale: each residual branch starts at 0 (Goyal et al. 2017).
    y = norm(scale_init=nn.initializers.zeros)(y, not train)
    residual = x
    if self.strides != 1 or x.shape[-1] != self.filters:
      residual = conv(self.filters, (1, 1), s, name="conv_proj")(x)
      residual = norm(name="norm_proj")(residual, not train)
    return nn.relu(residual + y)

  @staticmethod
  def macs(height: int, width: int, in_features: int, filters: int,
           strides: int) -> tuple[int, int, int, int]:
    """Multiply-accumulates of one block; see ``resnet_flops_per_example``.

    Returns:
      (macs, out_height, out_width, out_features).
    """
    h, w = _conv_out(height, strides), _conv_out(width, strides)
    macs = h * w * 9 * (in_features * filters + filters * filters)
    if strides != 1 or in_features != filters:
      macs += h * w * in_features * filters
    return macs, h, w, filters


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (carrying the stride: the "v1.5" change), 1x1 expand x4; ResNet-50+.

  Attributes:
    filters: channels of the 3x3 conv; the block outputs ``4 * filters``.
    strides: stride of the 3x3 conv and of the projection shortcut.
    dtype: compute dtype.
    bn_groups: ghost batch norm groups (see ``GroupBatchNorm``).
    bn_momentum: running average decay of batch norm.
  """

  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  bn_groups: int = 1
  bn_momentum: float = 0.9
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """Applies the block.

    Args:
      x: activations (batch, height, width, channels).
      train: batch statistics (and running-average updates) if True, running averages if not.

    Returns:
      Activations (batch, height / strides, width / strides, 4 * filters).
    """
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
    norm = functools.partial(GroupBatchNorm, num_groups=self.bn_groups,
                             momentum=self.bn_momentum, dtype=self.dtype)
    s = (self.strides, self.strides)
    out_features = self.filters * self.expansion
    y = conv(self.filters, (1, 1))(x)
    y = nn.relu(norm()(y, not train))
    y = conv(self.filters, (3, 3), s)(y)
    y = nn.relu(norm()(y, not train))
    y = conv(out_features, (1, 1))(y)
    # Zero-initialised last BN scale: each residual branch starts at 0 (Goyal et al. 2017).
    y = norm(scale_init=nn.initializers.zeros)(y, not train)
    residual = x
    if self.strides != 1 or x.shape[-1] != out_features:
      residual = conv(out_features, (1, 1), s, name="conv_proj")(x)
      residual = norm(name="norm_proj")(residual, not train)
    return nn.relu(residual + y)

  @staticmethod
  def macs(height: int, width: int, in_features: int, filters: int,
           strides: int) -> tuple[int, int, int, int]:
    """Multiply-accumulates of one block; see ``resnet_flops_per_example``.

    Returns:
      (macs, out_height, out_width, out_features).
    """
    out_features = 4 * filters
    h, w = _conv_out(height, strides), _conv_out(width, strides)
    macs = height * width * in_features * filters  # 1x1 reduce, before the stride
    macs += h * w * 9 * filters * filters + h * w * filters * out_features
    if strides != 1 or in_features != out_features:
      macs += h * w * in_features * out_features
    return macs, h, w, out_features


class ResNet(nn.Module):
  """ResNet v1.5.

  ``remat=True`` wraps every residual block in ``nn.remat`` (``jax.checkpoint``) with the
  default policy, which saves nothing inside a block: only each block's input is kept for the
  backward pass and the block is recomputed from it. Activation memory then grows with the
  number of blocks rather than the number of layers, for about one extra forward pass of
  compute. Outputs and gradients are unchanged.

  Attributes:
    stage_sizes: blocks per stage; stage i has ``num_filters * 2**i`` filters and (for i > 0)
      halves the resolution in its first block.
    block_cls: ``BasicBlock`` or ``BottleneckBlock`` (or a class with their fields, call
      signature and static ``macs``).
    num_classes: logits per example.
    num_filters: channels of the stem and the first stage.
    stem: "cifar" or "imagenet" (see the module docstring).
    dtype: compute dtype; parameters and batch statistics stay float32.
    bn_groups: ghost batch norm groups, 1 for batch norm over the whole batch.
    remat: recompute each block on the backward pass.
    bn_momentum: running average decay of batch norm.
  """

  stage_sizes: Sequence[int]
  block_cls: Any
  num_classes: int
  num_filters: int = 64
  stem: str = "cifar"
  dtype: Any = jnp.float32
  bn_groups: int = 1
  remat: bool = False
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """Computes logits.

    Args:
      x: images (batch, height, width, channels).
      train: use batch statistics and update ``batch_stats`` (pass
        ``mutable=["batch_stats"]``); otherwise use the running averages.

    Returns:
      float32 logits (batch, num_classes).
    """
    _check_stem(self.stem)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)
    norm = functools.partial(GroupBatchNorm, num_groups=self.bn_groups,
                             momentum=self.bn_momentum, dtype=self.dtype)
    if self.stem == "imagenet":
      x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x, not train))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    else:
      x = conv(self.num_filters, (3, 3), name="conv_init")(x)
      x = nn.relu(norm(name="bn_init")(x, not train))
    # `train` (argument 2, counting self) is a Python bool that selects code, so static.
    block_cls = nn.remat(self.block_cls, static_argnums=(2,)) if self.remat else self.block_cls
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        # Explicit names keep the variable tree identical with and without remat.
        x = block_cls(self.num_filters * 2**i, strides=2 if i > 0 and j == 0 else 1,
                      dtype=self.dtype, bn_groups=self.bn_groups, bn_momentum=self.bn_momentum,
                      name=f"stage{i + 1}_block{j + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="head")(x)
    return jnp.asarray(x, jnp.float32)


def _check_stem(stem: str) -> None:
  if stem not in STEMS:
    raise ValueError(f"ResNet stem={stem!r} is not one of {STEMS}.")


def ResNet18(num_classes: int = 10, **kwargs) -> ResNet:
  """ResNet-18 with the CIFAR stem, for 32x32 inputs (11,173,962 parameters at 10 classes).

  Args:
    num_classes: logits per example.
    **kwargs: other ``ResNet`` attributes (num_filters, dtype, bn_groups, remat, ...).

  Returns:
    The module.
  """
  kwargs.setdefault("stem", "cifar")
  return ResNet(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, num_classes=num_classes,
                **kwargs)


def ResNet50(num_classes: int = 1000, **kwargs) -> ResNet:
  """ResNet-50 with the ImageNet stem, for 224x224 inputs (25,557,032 parameters at 1000).

  Args:
    num_classes: logits per example.
    **kwargs: other ``ResNet`` attributes (num_filters, dtype, bn_groups, remat, ...).

  Returns:
    The module.
  """
  kwargs.setdefault("stem", "imagenet")
  return ResNet(stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock, num_classes=num_classes,
                **kwargs)


def resnet_flops_per_example(model: ResNet, input_shape: Sequence[int]) -> float:
  """Analytic training FLOPs per example: 3 x forward, forward = 2 x conv and dense MACs.

  Counted from the architecture's arithmetic (kernel sizes, strides, channels), not from XLA.
  Batch norm, ReLU, pooling, the residual adds and the head's bias are ignored: they are
  elementwise, a small fraction of the work, and not what accelerators' peak FLOPs measure.
  The backward pass is taken as twice the forward (gradients with respect to activations and
  to weights), hence the factor 3.

  Values this gives: ResNet-50 at 224x224x3 with 1000 classes, 4.089e9 forward MACs (24.5
  GFLOPs per training example; the published figure is ~4.1e9); ResNet-18 with the CIFAR stem
  at 32x32x3 with 10 classes, 5.554e8 forward MACs (3.33 GFLOPs per training example).

  Args:
    model: a ``ResNet``.
    input_shape: (height, width, channels) of one example.

  Returns:
    Training FLOPs per example.
  """
  _check_stem(model.stem)
  h, w, c = input_shape
  nf = model.num_filters
  if model.stem == "imagenet":
    h, w = _conv_out(h, 2), _conv_out(w, 2)
    macs = h * w * 7 * 7 * c * nf
    h, w = _conv_out(h, 2), _conv_out(w, 2)  # max-pool
  else:
    macs = h * w * 3 * 3 * c * nf
  c = nf
  for i, num_blocks in enumerate(model.stage_sizes):
    for j in range(num_blocks):
      block_macs, h, w, c = model.block_cls.macs(
          h, w, c, nf * 2**i, 2 if i > 0 and j == 0 else 1)
      macs += block_macs
  macs += c * model.num_classes
  return float(3 * 2 * macs)


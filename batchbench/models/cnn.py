"""Convolutional networks."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class CNN(nn.Module):
  """The Flax examples' MNIST CNN: conv32-avgpool-conv64-avgpool-dense256-dense10."""

  features: Sequence[int] = (32, 64)
  dense: int = 256
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for f in self.features:
      x = nn.relu(nn.Conv(f, kernel_size=(3, 3))(x))
      x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense)(x))
    return nn.Dense(self.num_classes)(x)


class CNN1D(nn.Module):
  """A small 1-D CNN for sequences such as MNIST-1D (length x channels)."""

  features: Sequence[int] = (32, 32, 32)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if x.ndim == 2:
      x = x[..., None]
    for f in self.features:
      x = nn.relu(nn.Conv(f, kernel_size=(5,), strides=(2,))(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)

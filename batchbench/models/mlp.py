"""Multi-layer perceptron."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """ReLU MLP on flattened inputs: ``hidden`` widths, then ``num_classes`` logits."""

  hidden: Sequence[int] = (256, 256)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)

"""A noise-prediction network for small images: an MLP with a timestep embedding.

``NoiseMLP`` maps a batch of noisy images ``x_t`` (any shape after the batch axis,
e.g. ``(8, 8)``) and their integer timesteps ``t`` to a prediction of the noise
that was added, of the same shape. The timestep enters every residual block
through a sinusoidal embedding (Vaswani et al. 2017; Ho et al. 2020) and a small
MLP, the way the DDPM U-Net conditions on it. On 8x8 digits an MLP of a few
residual blocks learns a good denoiser in a few minutes on a CPU, where a U-Net's
convolutions would dominate the time (FACTS.md: XLA CPU convolutions are slow).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10_000.0) -> jnp.ndarray:
  """Sinusoidal embedding of integer (or real) timesteps ``t``: shape ``(len(t), dim)``.

  Half the channels are ``cos(t w_k)`` and half ``sin(t w_k)`` with frequencies
  ``w_k = max_period^(-k / (dim / 2))``, as in the DDPM and Transformer code.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class ResidualBlock(nn.Module):
  """``h + Dense(silu(Dense(silu(LayerNorm(h))) + Dense(temb)))``."""

  width: int

  @nn.compact
  def __call__(self, h: jnp.ndarray, temb: jnp.ndarray) -> jnp.ndarray:
    y = nn.silu(nn.LayerNorm()(h))
    y = nn.Dense(self.width)(y) + nn.Dense(self.width)(temb)
    y = nn.Dense(self.width, kernel_init=nn.initializers.zeros)(nn.silu(y))
    return h + y


class NoiseMLP(nn.Module):
  """Predicts the noise in ``x_t`` at timestep ``t``.

  Attributes:
    width: width of the residual stream.
    num_blocks: residual blocks, each conditioned on the timestep.
    time_dim: channels of the sinusoidal timestep embedding.
  """

  width: int = 256
  num_blocks: int = 3
  time_dim: int = 64

  @nn.compact
  def __call__(self, x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    shape = x.shape
    h = x.reshape((shape[0], -1))
    temb = timestep_embedding(t, self.time_dim)
    temb = nn.Dense(self.width)(nn.silu(nn.Dense(self.width)(temb)))
    h = nn.Dense(self.width)(h)
    for _ in range(self.num_blocks):
      h = ResidualBlock(self.width)(h, temb)
    h = nn.silu(nn.LayerNorm()(h))
    return nn.Dense(math.prod(shape[1:]))(h).reshape(shape)

"""On-device image augmentation, drawn from a key: the same key gives the same images.

Runs inside the compiled train step (a workload's ``loss`` calls it with the step's
key), so it costs no host time and a step's augmented batch is a pure function of the
step: a resumed trial, or the same batch split over other devices, sees the same images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_crop_flip(rng: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
  """Random crop after zero padding, then random horizontal flip, per example.

  The CIFAR recipe (He et al. 2016): pad each side by ``padding`` pixels, crop back to
  the original size at a uniform offset in ``[0, 2 * padding]`` on each axis, flip left
  to right with probability 1/2. Padding is 0, which for normalised images is the
  dataset's mean colour.

  Args:
    rng: the key; each example gets its own offsets and flip from it.
    images: (batch, height, width, channels).
    padding: pixels added on each side before cropping.

  Returns:
    Augmented images, same shape and dtype.
  """
  n, h, w, c = images.shape
  k_offset, k_flip = jax.random.split(rng)
  offsets = jax.random.randint(k_offset, (n, 2), 0, 2 * padding + 1)
  flips = jax.random.bernoulli(k_flip, 0.5, (n,))
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  padded = jnp.pad(images, pad)

  def one(image, offset, flip):
    crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, offsets, flips)

"""The diffusion process of a DDPM: beta schedules, the noising step and two samplers.

Notation of Ho et al. (2020): ``alpha_bar[t] = prod_{s <= t} (1 - beta[s])`` for
``t = 0 .. T-1``; a training example is ``x_t = sqrt(alpha_bar[t]) x_0 +
sqrt(1 - alpha_bar[t]) eps`` and the network predicts ``eps``.

Sampling runs ``S`` sampler steps over a subsequence ``tau`` of the ``T`` training
timesteps (``sampler_timesteps``) as one ``lax.scan``. Each step is the update of
DDIM (Song et al. 2021, eq. 12) with

  sigma_j = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev),

``eta = 0`` for DDIM (deterministic given ``x_T``) and ``eta = 1`` for DDPM
ancestral sampling: with all ``T`` steps that is exactly Ho et al.'s sampler with
the posterior variance ``beta~_t``, and with fewer steps the same sampler on the
respaced process (Nichol & Dhariwal 2021). The predicted ``x_0`` is clipped to
[-1, 1], as in Ho et al.'s code.

Same seed, same image, at any batch size: image ``i`` draws all its noise from its
own key ``fold_in(key(seed), i)`` (``x_T`` from ``fold_in(k_i, 0)``, step ``j``'s
noise from ``fold_in(k_i, j + 1)``), never from a noise tensor drawn for the whole
batch, so its trajectory does not depend on which batch it is in or how large it is.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("cosine", "linear")
SAMPLERS = {"ddpm": 1.0, "ddim": 0.0}  # sampler name -> eta
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


def beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """The ``T`` betas of a schedule, float64.

  ``linear``: Ho et al.'s 1e-4 .. 0.02 over 1,000 steps, scaled by 1000 / T so that
  other T keep the same total noise (Nichol & Dhariwal 2021; below T = 21 the last
  betas would pass 1 and are clipped at 0.999 like the cosine ones). ``cosine``: Nichol &
  Dhariwal's ``alpha_bar(t) = f(t) / f(0)``, ``f(t) = cos^2(pi/2 (t/T + s) / (1 + s))``,
  ``s = 0.008``, betas clipped at 0.999.
  """
  if name not in SCHEDULES:
    raise ValueError(f"beta schedule {name!r}: must be one of {', '.join(SCHEDULES)}")
  if not isinstance(num_timesteps, int) or num_timesteps < 2:
    raise ValueError(f"num_timesteps={num_timesteps!r}: must be an integer >= 2")
  t = num_timesteps
  if name == "linear":
    scale = 1000.0 / t
    return np.minimum(np.linspace(scale * 1e-4, scale * 0.02, t, dtype=np.float64), 0.999)
  s = 0.008
  f = lambda u: math.cos((u / t + s) / (1 + s) * math.pi / 2) ** 2
  return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(t)], np.float64)


def alphas_bar(betas: np.ndarray) -> np.ndarray:
  """``alpha_bar[t] = prod_{s <= t} (1 - beta[s])``."""
  return np.cumprod(1.0 - np.asarray(betas, np.float64))


def noisy(x0: jax.Array, eps: jax.Array, alpha_bar_t: jax.Array) -> jax.Array:
  """``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``; ``alpha_bar_t`` per example."""
  a = alpha_bar_t.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps


def sampler_timesteps(num_timesteps: int, sampler_steps: int) -> np.ndarray:
  """``sampler_steps`` training timesteps evenly spaced over ``0 .. T-1``, ascending,
  both ends included (all of them when ``sampler_steps == T``)."""
  if not 1 <= sampler_steps <= num_timesteps:
    raise ValueError(f"sampler_steps={sampler_steps}: must be between 1 and the "
                     f"{num_timesteps} training timesteps")
  if sampler_steps == 1:
    return np.array([num_timesteps - 1])
  ts = np.unique(np.round(np.linspace(0, num_timesteps - 1, sampler_steps)).astype(np.int64))
  assert len(ts) == sampler_steps, (num_timesteps, sampler_steps)
  return ts


def image_keys(seed: jax.Array | int, indices: jax.Array) -> jax.Array:
  """One key per image: ``fold_in(key(seed), global image index)``."""
  root = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(root, i))(indices)


def sample(eps_fn: EpsFn, alpha_bar: jax.Array, timesteps: jax.Array, keys: jax.Array,
           image_shape: tuple[int, ...], eta: float, clip: bool = True) -> jax.Array:
  """Runs the sampler from ``x_T`` to ``x_0`` for one batch of images.

  Args:
    eps_fn: ``(x_t, t) -> predicted noise`` for a batch (``t`` an int32 per image).
    alpha_bar: the ``T`` cumulative products of the schedule.
    timesteps: the ``S`` ascending training timesteps the sampler visits (``tau``).
    keys: one key per image (``image_keys``): all of an image's noise comes from it.
    image_shape: shape of one image.
    eta: 0 for DDIM, 1 for DDPM ancestral sampling (a Python float: 0 draws no
      noise after ``x_T``).
    clip: clip the predicted ``x_0`` to [-1, 1].

  Returns:
    The images ``x_0``, shape ``(len(keys), *image_shape)``.
  """
  draw = lambda j: jax.vmap(
      lambda k: jax.random.normal(jax.random.fold_in(k, j), image_shape))(keys)
  a_all = alpha_bar[timesteps]
  a_prev_all = jnp.concatenate([jnp.ones((1,), a_all.dtype), a_all[:-1]])
  n = keys.shape[0]

  def step(x, j):
    a, a_prev = a_all[j], a_prev_all[j]
    eps = eps_fn(x, jnp.full((n,), timesteps[j], jnp.int32))
    x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    if clip:
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1 - a_prev - sigma**2, 0.0)) * eps
    if eta:
      x = x + sigma * draw(j + 1)
    return x, None

  x, _ = jax.lax.scan(step, draw(0), jnp.arange(len(timesteps) - 1, -1, -1))
  return x


@functools.lru_cache(maxsize=64)
def sampler_fn(model: nn.Module, schedule: str, num_timesteps: int, sampler_steps: int,
               sampler: str, image_shape: tuple[int, ...]):
  """``(params, seed, indices) -> images``, jitted, for a Flax noise network ``model``.

  Cached per settings, so every workload instance of a process shares one compile
  per batch shape. ``indices`` are the images' global indices (int32): image ``i``
  is the same whatever else is in its batch.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler {sampler!r}: must be one of {', '.join(SAMPLERS)}")
  alpha_bar = alphas_bar(beta_schedule(schedule, num_timesteps)).astype(np.float32)
  timesteps = sampler_timesteps(num_timesteps, sampler_steps).astype(np.int32)

  def generate(params, seed, indices):
    eps_fn = lambda x, t: model.apply({"params": params}, x, t)
    return sample(eps_fn, jnp.asarray(alpha_bar), jnp.asarray(timesteps),
                  image_keys(seed, indices), image_shape, SAMPLERS[sampler])

  return jax.jit(generate)

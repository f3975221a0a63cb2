"""``digits_ddpm``: a small DDPM on the embedded 8x8 digits, with a Frechet-distance target.

Importing this module registers the workload. The model is ``models.ddpm.NoiseMLP``
(unconditional), trained with the DDPM "simple" loss, the mean squared error of the
predicted noise; each step draws its examples' timesteps (uniform over ``0..T-1``)
and noise from the step's key (the ``rng`` argument of ``loss``). Images are 8x8 in
[-1, 1] (the digits' 0..16 scaled).

The model state is an exponential moving average of the params (``ema_examples``,
its time constant in examples; Ho et al. sample from such an average too), updated
by the loss per example rather than per step, so that it means the same at every
batch size and an accumulation split updates it exactly as one batch does.
Evaluation and ``generate`` sample with it: without it the FD of Adam's noisy
iterates jumps between about 1.3 and 2.5 from one eval to the next (measured), and
no target on it is reached reliably.

Evaluation (``Workload.evaluate``, at every eval of a trial):

* ``fd``: the Frechet distance (``workloads.frechet``) between the classifier
  features of ``eval_samples`` images generated with ``eval_sampler_steps`` DDIM
  steps from ``eval_seed``, and those of the 360 test images. Deterministic: the same
  params give the same images and the same number.
* ``loss``: the denoising loss on the test set, each test image with its own
  timestep and noise drawn from ``fold_in(key(EVAL_NOISE_SEED), image index)``, so
  the figure does not depend on how the test set is chunked or sharded
  (``eval_sums`` computes it as sums, for the harness's other uses).

The eval trade-off: the FD of ``n`` samples is biased upwards (finite-sample
covariances: 360 training images against the 360 test images score about 0.6, all
1,437 about 0.4) and noisier the fewer they are; DDIM with few steps makes slightly
worse images than with many (50 steps scored 0.02-0.1 below 20 on the same model,
the 200-step DDPM sampler lower still late in training but 10x the cost). 512 samples
x 20 DDIM steps, one jitted ``scan``, cost 0.15-0.3 s per eval on the project's 2-core
machine (the first eval adds 1-2 s of compiles and training the classifier once).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from batchbench.data.arrays import MASK, ArrayData
from batchbench.models.ddpm import NoiseMLP
from batchbench.workloads import frechet
from batchbench.workloads.base import LossOutput, Metric, Target, Workload, register_workload
from batchbench.workloads.ddpm_sampling import (SAMPLERS, SCHEDULES, alphas_bar, beta_schedule,
                                                noisy, sampler_fn)

DIGITS_TRAIN = 1437
IMAGE_SHAPE = (8, 8)
EVAL_NOISE_SEED = 12345
EMA = "ema"  # the model state's one entry: an exponential moving average of the params
DIFFUSION_METRICS = {"fd": Metric(0.0, float("inf"), "min"),
                     "loss": Metric(0.0, float("inf"), "min")}
# Set by measurement (docs/diffusion.md): configs/digits_ddpm.py's trial reaches it in
# about 20 s of training on 2 CPU cores, its FD falling about 0.1 per 100k examples there
# (recognisable, still grainy digits; about 0.75 after 800k examples).
DEFAULT_FD_TARGET = 1.0


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
  """What a sampler needs to know about a trained DDPM, besides its params."""

  model: NoiseMLP
  schedule: str
  num_timesteps: int
  image_shape: tuple[int, ...]

  def sampler(self, sampler: str, sampler_steps: int):
    """``(params, seed, indices) -> images`` (jitted; ``ddpm_sampling.sampler_fn``)."""
    return sampler_fn(self.model, self.schedule, self.num_timesteps, sampler_steps, sampler,
                      self.image_shape)


@functools.lru_cache(maxsize=16)
def _init_fn(model: NoiseMLP, shape: tuple[int, ...]):
  """The network's init, jitted: one compile instead of one per operation when the
  harness initialises eagerly."""
  return jax.jit(lambda rng: model.init(rng, jnp.zeros(shape, jnp.float32),
                                       jnp.zeros(shape[:1], jnp.int32))["params"])


def digits_images_data(num_train: int = DIGITS_TRAIN) -> ArrayData:
  """Digits as ``{"inputs": (N, 8, 8) in [-1, 1], "index": int32}`` for both splits."""
  train_x, _, test_x, _ = frechet.digits_images(num_train)
  split = lambda x, offset: {"inputs": x, "index": np.arange(offset, offset + len(x),
                                                              dtype=np.int32)}
  return ArrayData(split(train_x, 0), split(test_x, len(train_x)))


def on_one_device(tree: Any) -> Any:
  """``tree`` on the first local device (a replicated copy is read from there)."""
  return jax.device_put(tree, jax.local_devices()[0])


def diffusion_workload(name: str, settings: DiffusionSettings, *, data, train_size: int,
                       target: Target | None, reference_batch: int, eval_samples: int,
                       eval_sampler: str, eval_sampler_steps: int, eval_seed: int,
                       ema_examples: float, cache_dir: str | None) -> Workload:
  """A DDPM workload around ``settings.model`` on an embedded image dataset.

  Args:
    name: registry name.
    settings: the network, beta schedule and image shape.
    data: ``() -> ArrayData`` with ``inputs`` (images in [-1, 1]) and ``index`` (a
      distinct int per example) in both splits.
    train_size: training-set size.
    target: default target (``fd`` or ``loss``, direction ``min``), or None.
    reference_batch: batch at which the default learning rate was tuned.
    eval_samples, eval_sampler, eval_sampler_steps, eval_seed: how ``evaluate``
      generates the images it scores.
    ema_examples: time constant, in examples, of the moving average of the params
      that evaluation and generation use (kept as the model state); 0: none, the
      params themselves.
    cache_dir: where the feature classifier is cached (default: the batchbench cache).

  Returns:
    The workload; its ``evaluate`` returns ``{"fd", "loss"}``.
  """
  model, shape = settings.model, tuple(settings.image_shape)
  alpha_bar = alphas_bar(beta_schedule(settings.schedule,
                                       settings.num_timesteps)).astype(np.float32)
  example_spec = {"inputs": jax.ShapeDtypeStruct(shape, jnp.float32),
                  "index": jax.ShapeDtypeStruct((), jnp.int32)}

  def init(rng, batch_spec):
    params = _init_fn(model, tuple(batch_spec["inputs"].shape))(rng)
    return params, ({EMA: jax.tree.map(jnp.copy, params)} if ema_examples else {})

  def update_ema(model_state, params, count):
    """The EMA after ``count`` more examples at ``params``: per example, not per step, so
    an accumulation split of one step (constant params) updates it exactly as one batch."""
    if not ema_examples:
      return model_state
    w = 1.0 - jnp.exp(-count / ema_examples)
    return {EMA: jax.tree.map(lambda e, p: e + w * (jax.lax.stop_gradient(p) - e),
                              model_state[EMA], params)}

  def per_example_loss(params, x0, t, eps):
    pred = model.apply({"params": params}, noisy(x0, eps, jnp.asarray(alpha_bar)[t]), t)
    return jnp.mean(jnp.square(pred - eps).reshape(x0.shape[0], -1), axis=1)

  def loss(params, model_state, batch, rng):
    x0 = batch["inputs"]
    kt, ke = jax.random.split(rng)
    t = jax.random.randint(kt, (x0.shape[0],), 0, settings.num_timesteps)
    eps = jax.random.normal(ke, x0.shape, x0.dtype)
    losses = per_example_loss(params, x0, t, eps)
    count = jnp.sum(batch[MASK])
    return LossOutput(jnp.sum(losses * batch[MASK]), count,
                      update_ema(model_state, params, count))

  def eval_sums(params, model_state, batch):
    params = sampling_params(params, model_state)
    x0 = batch["inputs"]
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(EVAL_NOISE_SEED), i))(
        batch["index"])
    t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0,
                                              settings.num_timesteps))(keys)
    eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), shape))(keys)
    losses = per_example_loss(params, x0, t, eps)
    return {"loss": jnp.sum(losses * batch[MASK]), "count": jnp.sum(batch[MASK])}

  reference: dict[str, Any] = {}  # filled on the first evaluate: classifier, test stats

  def references():
    if not reference:
      test = data().test
      params = frechet.load_classifier(cache_dir)
      reference["classifier"] = params
      reference["stats"] = frechet.gaussian_stats(
          frechet.classifier_features(params, test["inputs"]))
      reference["test"] = {"inputs": jnp.asarray(test["inputs"]),
                           "index": jnp.asarray(test["index"]),
                           MASK: jnp.ones(len(test["inputs"]), jnp.float32)}
    return reference

  eval_loss = jax.jit(eval_sums)
  generate = settings.sampler(eval_sampler, eval_sampler_steps)

  def evaluate(params, model_state):
    ref = references()
    params, model_state = on_one_device((params, model_state))
    images = generate(sampling_params(params, model_state), np.int32(eval_seed),
                      np.arange(eval_samples, dtype=np.int32))
    features = frechet.classifier_features(ref["classifier"], images)
    fd = frechet.frechet_distance(*frechet.gaussian_stats(features), *ref["stats"])
    sums = jax.device_get(eval_loss(params, model_state, ref["test"]))
    return {"fd": fd, "loss": float(sums["loss"]) / float(sums["count"])}

  return Workload(name=name, init=init, loss=loss, eval_sums=eval_sums,
                  metrics=DIFFUSION_METRICS, example_spec=example_spec, data=data,
                  train_size=train_size, target=target, reference_batch=reference_batch,
                  evaluate=evaluate)


def digits_ddpm_settings(width: int = 256, num_blocks: int = 3, time_dim: int = 64,
                         num_timesteps: int = 200, schedule: str = "cosine",
                         **unused: Any) -> DiffusionSettings:
  """The network and diffusion process of ``digits_ddpm`` with these workload options."""
  del unused  # the eval and cache options do not change the model
  if schedule not in SCHEDULES:
    raise TypeError(f"workload digits_ddpm: schedule={schedule!r}: must be one of "
                    f"{', '.join(SCHEDULES)}")
  if not isinstance(num_timesteps, int) or num_timesteps < 2:
    raise TypeError(f"workload digits_ddpm: num_timesteps={num_timesteps!r}: must be an "
                    "integer >= 2")
  return DiffusionSettings(NoiseMLP(width, num_blocks, time_dim), schedule, num_timesteps,
                           IMAGE_SHAPE)


# Registered diffusion workloads: name -> (workload options -> DiffusionSettings), so that
# ``generate`` can rebuild a trained model's sampler from a trial's spec.
GENERATIVE: dict[str, Any] = {"digits_ddpm": digits_ddpm_settings}


def generation_settings(name: str, workload_options: dict[str, Any]) -> DiffusionSettings:
  """The ``DiffusionSettings`` of a registered diffusion workload.

  Raises:
    KeyError: ``name`` is not a diffusion workload (the message lists those that are).
  """
  if name not in GENERATIVE:
    raise KeyError(f"workload {name!r} generates no images; diffusion workloads: "
                   f"{', '.join(sorted(GENERATIVE))}")
  return GENERATIVE[name](**dict(workload_options))


@register_workload("digits_ddpm")
def digits_ddpm(width: int = 256, num_blocks: int = 3, time_dim: int = 64,
                num_timesteps: int = 200, schedule: str = "cosine", eval_samples: int = 512,
                eval_sampler: str = "ddim", eval_sampler_steps: int = 20, eval_seed: int = 0,
                ema_examples: int = 20_000, cache_dir: str | None = None) -> Workload:
  """A DDPM (noise-prediction MLP) on scikit-learn's 8x8 digits; target: FD at most 1.0.

  Options: the network (``width``, ``num_blocks``, ``time_dim``), the process
  (``num_timesteps`` T, ``schedule`` cosine|linear), how ``evaluate`` samples
  (``eval_samples``, ``eval_sampler`` ddim|ddpm, ``eval_sampler_steps``, ``eval_seed``)
  and where the FD classifier is cached (``cache_dir``).
  """
  settings = digits_ddpm_settings(width, num_blocks, time_dim, num_timesteps, schedule)
  if eval_sampler not in SAMPLERS:
    raise TypeError(f"workload digits_ddpm: eval_sampler={eval_sampler!r}: must be one of "
                    f"{', '.join(SAMPLERS)}")
  if not isinstance(eval_sampler_steps, int) or not 1 <= eval_sampler_steps <= num_timesteps:
    raise TypeError(f"workload digits_ddpm: eval_sampler_steps={eval_sampler_steps!r}: must "
                    f"be an integer between 1 and num_timesteps={num_timesteps}")
  if not isinstance(eval_samples, int) or eval_samples < 2:
    raise TypeError(f"workload digits_ddpm: eval_samples={eval_samples!r}: must be an integer "
                    ">= 2 (a covariance needs two samples)")
  return diffusion_workload(
      "digits_ddpm", settings, data=functools.partial(digits_images_data, DIGITS_TRAIN),
      train_size=DIGITS_TRAIN, target=Target("fd", DEFAULT_FD_TARGET, "min"),
      reference_batch=64, eval_samples=eval_samples, eval_sampler=eval_sampler,
      eval_sampler_steps=eval_sampler_steps, eval_seed=eval_seed, ema_examples=ema_examples,
      cache_dir=cache_dir)


def sampling_params(params: Any, model_state: Any) -> Any:
  """The params to sample with: the moving average in the model state when kept."""
  return model_state[EMA] if isinstance(model_state, dict) and EMA in model_state else params

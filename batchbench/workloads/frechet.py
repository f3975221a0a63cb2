"""Frechet distance between image sets, in the features of a small cached digits classifier.

The FID recipe (Heusel et al. 2017) scaled down to 8x8 digits: images are mapped to
the penultimate activations of a classifier, each set is summarised by the mean and
covariance of its features, and the distance is the Frechet (2-Wasserstein)
distance between the two Gaussians:

  FD = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

The classifier is an MLP 64-128-32-10 trained once with plain optax on the digits
training split, deterministically (fixed seed, fixed minibatch order, one CPU or
accelerator program), and cached as ``.npz`` in the batchbench cache directory
(``batchbench.data.embedded.default_cache_dir()``), keyed by a hash of its settings
and the JAX backend, written atomically. The 32 features are ``tanh`` units, so no
feature is dead (a ReLU feature that is always 0 would make the covariances singular).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from batchbench.data import embedded

CLASSIFIER_SETTINGS = {"version": 1, "hidden": 128, "features": 32, "steps": 600, "batch": 128,
                       "lr": 3e-3, "seed": 0, "split_seed": embedded.SPLIT_SEED,
                       "num_train": 1437}


class FeatureClassifier(nn.Module):
  """MLP on flattened images: ``hidden`` ReLU units, ``features`` tanh units, 10 logits."""

  hidden: int = 128
  features: int = 32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, features_only: bool = False) -> jnp.ndarray:
    h = nn.relu(nn.Dense(self.hidden)(x.reshape((x.shape[0], -1))))
    f = jnp.tanh(nn.Dense(self.features)(h))
    return f if features_only else nn.Dense(10)(f)


def digits_images(num_train: int = 1437) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The embedded digits as ``(N, 8, 8)`` float32 images in [-1, 1], with labels:
  ``(train_x, train_y, test_x, test_y)``, read-only (loaded once per process)."""
  return _digits_images(num_train)


@functools.lru_cache(maxsize=2)
def _digits_images(num_train: int):
  data = embedded.digits(num_train)
  to_images = lambda x: (2.0 * x - 1.0).reshape(-1, 8, 8).astype(np.float32)
  out = (to_images(data.train["inputs"]), data.train["labels"],
         to_images(data.test["inputs"]), data.test["labels"])
  for a in out:
    a.setflags(write=False)  # shared by every caller of this process
  return out


def _settings_key(settings: dict[str, Any]) -> str:
  blob = json.dumps({**settings, "backend": jax.default_backend()}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def classifier_path(cache_dir: str | None = None,
                    settings: dict[str, Any] | None = None) -> str:
  """Where the classifier of ``settings`` (default ``CLASSIFIER_SETTINGS``) is cached."""
  settings = settings or CLASSIFIER_SETTINGS
  return os.path.join(cache_dir or embedded.default_cache_dir(),
                      f"digits_fd_classifier_{_settings_key(settings)}.npz")


def train_classifier(settings: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains the feature classifier (Adam, minibatches in a fixed order); returns params."""
  settings = settings or CLASSIFIER_SETTINGS
  train_x, train_y, _, _ = digits_images(settings["num_train"])
  rng = np.random.default_rng(settings["seed"])
  n, b = len(train_x), settings["batch"]
  per_epoch = n // b
  epochs = -(-settings["steps"] // per_epoch)
  order = np.concatenate([rng.permutation(n)[:per_epoch * b] for _ in range(epochs)])
  order = order[:settings["steps"] * b].reshape(settings["steps"], b)
  init, train = _trainer(settings["hidden"], settings["features"], settings["lr"])
  params = init(jax.random.key(settings["seed"]), train_x[:1])
  return jax.device_get(train(params, train_x, train_y, order))


@functools.lru_cache(maxsize=4)
def _trainer(hidden: int, features: int, lr: float):
  """``(init, train)``, jitted once per architecture and learning rate."""
  model = FeatureClassifier(hidden, features)
  tx = optax.adam(lr)

  @jax.jit
  def init(key, x):
    return model.init(key, x)["params"]

  @jax.jit
  def train(params, x, y, order):
    def step(carry, idx):
      params, opt_state = carry
      def loss_fn(p):
        logits = model.apply({"params": p}, x[idx])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()
      grads = jax.grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    return jax.lax.scan(step, (params, tx.init(params)), order)[0][0]

  return init, train


def load_classifier(cache_dir: str | None = None,
                    settings: dict[str, Any] | None = None) -> dict[str, Any]:
  """The cached classifier's params; trains and caches it (atomically) when absent.

  An unreadable cache file is retrained and replaced; a cache directory that cannot
  be written only costs training again next time.
  """
  settings = settings or CLASSIFIER_SETTINGS
  path = classifier_path(cache_dir, settings)
  if os.path.exists(path):
    try:
      with np.load(path) as z:
        flat = {tuple(k.split("/")): np.asarray(z[k]) for k in z.files}
      return traverse_util.unflatten_dict(flat)
    except (OSError, ValueError, KeyError):
      pass  # unreadable cache: retrain below
  params = train_classifier(settings)
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)
  except OSError:
    pass
  return params


@functools.lru_cache(maxsize=4)
def _features_fn(hidden: int, features: int):
  model = FeatureClassifier(hidden, features)
  return jax.jit(lambda p, x: model.apply({"params": p}, x, features_only=True))


def classifier_features(params: dict[str, Any], images: Any) -> np.ndarray:
  """Features of ``images`` (``(N, 8, 8)`` in [-1, 1]) as float64 ``(N, features)``."""
  settings = {"hidden": params["Dense_0"]["kernel"].shape[1],
              "features": params["Dense_1"]["kernel"].shape[1]}
  fn = _features_fn(settings["hidden"], settings["features"])
  return np.asarray(fn(params, jnp.asarray(images, jnp.float32)), np.float64)


def classifier_accuracy(params: dict[str, Any], images: Any, labels: Any) -> float:
  """Test accuracy of the classifier (a check that its features mean something)."""
  model = FeatureClassifier(params["Dense_0"]["kernel"].shape[1],
                            params["Dense_1"]["kernel"].shape[1])
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(images))
  return float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(labels)))


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and (unbiased, float64) covariance of ``(N, D)`` features, N >= 2."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or len(f) < 2:
    raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray,
                     cov2: np.ndarray) -> float:
  """Frechet distance between N(mu1, cov1) and N(mu2, cov2), >= 0.

  tr((S_1 S_2)^(1/2)) is computed as tr((A S_2 A)^(1/2)) with A = S_1^(1/2): the
  same eigenvalues (A S_2 A is similar to S_1 S_2), but a symmetric positive
  semi-definite matrix, so its square root comes from ``eigh`` with real
  eigenvalues, the small negative ones that rounding leaves clipped to 0. A
  general ``sqrtm(S_1 S_2)`` can return complex parts and NaNs for the nearly
  singular covariances of a few hundred samples.
  """
  import scipy.linalg  # pylint: disable=g-import-not-at-top  (keeps `import batchbench` light)

  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  cov1, cov2 = (cov1 + cov1.T) / 2, (cov2 + cov2.T) / 2
  w1, v1 = scipy.linalg.eigh(cov1)
  root1 = (v1 * np.sqrt(np.clip(w1, 0.0, None))) @ v1.T
  inner = root1 @ cov2 @ root1
  w = scipy.linalg.eigvalsh((inner + inner.T) / 2)
  trace_sqrt = float(np.sum(np.sqrt(np.clip(w, 0.0, None))))
  diff = mu1 - mu2
  fd = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)
  return max(fd, 0.0)


def frechet_distance_of(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """Frechet distance between the Gaussians fitted to two feature sets."""
  return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))

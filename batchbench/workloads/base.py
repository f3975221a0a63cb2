"""What a workload is: data plus pure functions, and the registry that names them.

A workload is a frozen dataclass: how to initialise parameters, the loss as a
*sum* with a count of valid examples (so padding and sharding normalise
correctly), the evaluation metrics as sums, the data, and the target that
defines "trained". Variants come from ``dataclasses.replace``.

Registering your own model and data takes a few lines::

  @batchbench.register_workload("my_mlp")
  def my_mlp(hidden: int = 128):
    return batchbench.classification_workload(
        "my_mlp", model=MyFlaxModule(hidden), input_shape=(64,), num_classes=10,
        data=lambda: batchbench.ArrayData(x_train, y_train, x_test, y_test),
        target=batchbench.Target("accuracy", 0.9), reference_batch=32)
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

@dataclasses.dataclass(frozen=True)
class Target:
  """A workload is trained once ``metric`` reaches ``value`` in ``direction``."""

  metric: str
  value: float
  direction: str = "max"

  def met(self, value: float) -> bool:
    return value >= self.value if self.direction == "max" else value <= self.value


@dataclasses.dataclass(frozen=True)
class ArrayData:
  """An in-memory dataset; small enough to live on every device."""

  train_x: np.ndarray
  train_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray

  @property
  def num_train(self) -> int:
    return int(self.train_x.shape[0])


@dataclasses.dataclass(frozen=True)
class Metric:
  """An evaluation metric: its valid range and which way is better."""

  low: float
  high: float
  direction: str


@dataclasses.dataclass(frozen=True)
class Workload:
  """A model, its data, its loss and metrics, and its target.

  Attributes:
    name: registry name.
    init: ``rng -> params``.
    loss: ``(params, x, y, mask) -> (loss_sum, count)``; ``mask`` is 1.0 for
      real examples, 0.0 for padding.
    eval_sums: ``(params, x, y, mask) -> {name: sum}``, including ``count``.
    metrics: metric name -> valid range and direction; a metric value is
      ``eval_sums[name] / eval_sums["count"]``.
    input_shape: shape of one example.
    input_dtype: dtype of an example.
    num_classes: labels are ints in ``[0, num_classes)``.
    data: ``() -> ArrayData``, or None for a synthetic workload whose inputs
      are generated on the device.
    train_size: examples in the training set (known without loading it), or
      None for synthetic data.
    target: default target, or None (throughput only).
    reference_batch: batch at which the default learning rate was tuned.
  """

  name: str
  init: Callable[[jax.Array], PyTree]
  loss: Callable[..., tuple[jax.Array, jax.Array]]
  eval_sums: Callable[..., dict[str, jax.Array]]
  metrics: Mapping[str, Metric]
  input_shape: tuple[int, ...]
  num_classes: int
  data: Callable[[], ArrayData] | None
  train_size: int | None
  target: Target | None
  reference_batch: int
  input_dtype: Any = jnp.float32

  @property
  def synthetic(self) -> bool:
    return self.data is None


CLASSIFICATION_METRICS = {
    "accuracy": Metric(0.0, 1.0, "max"),
    "loss": Metric(0.0, float("inf"), "min"),
}


def classification_workload(name: str, *, model: nn.Module, input_shape: tuple[int, ...],
                            num_classes: int, data: Callable[[], ArrayData] | None,
                            train_size: int | None = None, target: Target | None = None,
                            reference_batch: int = 32) -> Workload:
  """Builds a softmax cross-entropy classification workload around a Flax module.

  Args:
    name: registry name.
    model: a Flax linen module mapping a batch of inputs to logits.
    input_shape: shape of one example.
    num_classes: number of classes.
    data: returns the dataset; None for synthetic inputs generated on device.
    train_size: training-set size if known without loading ``data`` (used to
      validate batch sizes before anything runs).
    target: default target (metric ``accuracy`` or ``loss``), or None.
    reference_batch: batch at which the default learning rate was tuned.

  Returns:
    The workload.
  """

  def init(rng):
    return model.init(rng, jnp.zeros((1, *input_shape), jnp.float32))["params"]

  def per_example(params, x, y):
    logits = model.apply({"params": params}, x)
    return logits, optax.softmax_cross_entropy_with_integer_labels(logits, y)

  def loss(params, x, y, mask):
    _, losses = per_example(params, x, y)
    return jnp.sum(losses * mask), jnp.sum(mask)

  def eval_sums(params, x, y, mask):
    logits, losses = per_example(params, x, y)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return {"loss": jnp.sum(losses * mask), "accuracy": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}

  return Workload(name=name, init=init, loss=loss, eval_sums=eval_sums,
                  metrics=CLASSIFICATION_METRICS, input_shape=tuple(input_shape),
                  num_classes=num_classes, data=data, train_size=train_size, target=target,
                  reference_batch=reference_batch)


_REGISTRY: dict[str, Callable[..., Workload]] = {}


def register_workload(name: str):
  """Decorator: registers ``factory(**options) -> Workload`` under ``name``."""

  def wrap(factory):
    _REGISTRY[name] = factory
    return factory

  return wrap


def workload_names() -> list[str]:
  return sorted(_REGISTRY)


def workload_options(name: str) -> dict[str, Any]:
  """The options a workload factory takes, with their defaults."""
  params = inspect.signature(_REGISTRY[name]).parameters
  return {k: p.default for k, p in params.items()}


def get_workload(name: str, options: Mapping[str, Any] | None = None) -> Workload:
  """Builds the named workload.

  Raises:
    KeyError: unknown name (the message lists the known ones).
    TypeError: an option the workload does not take (the message lists them).
  """
  if name not in _REGISTRY:
    raise KeyError(f"unknown workload {name!r}; known workloads: {', '.join(workload_names())}")
  options = dict(options or {})
  known = workload_options(name)
  unknown = sorted(set(options) - set(known))
  if unknown:
    raise TypeError(f"workload {name!r} has no option(s) {unknown}; its options are "
                    f"{sorted(known)}")
  return _REGISTRY[name](**options)

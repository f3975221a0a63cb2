"""What a workload is: data plus pure functions, and the registry that names them.

A workload is a frozen dataclass (AlgoPerf's shape, without its class tree):

* ``init(rng, batch_spec) -> (params, model_state)``: ``batch_spec`` is a batch of
  ``jax.ShapeDtypeStruct`` (``Workload.batch_spec(n)``), so integer token inputs
  or images initialise the model with their own shapes and dtypes;
  ``model_state`` holds mutable model variables such as BatchNorm statistics
  (``{}`` when there are none).
* ``loss(params, model_state, batch, rng) -> LossOutput``: the loss as a *sum*
  over valid examples with their count (so padding and sharding normalise
  correctly) and the updated model state; ``rng`` is a fresh key per step and
  micro-batch (dropout, augmentation).
* ``eval_sums(params, model_state, batch) -> {name: sum, "count": n}``.

A batch is a dict of arrays with the examples on axis 0 plus ``"mask"`` (1.0 for
real examples, 0.0 for padding). Variants come from ``dataclasses.replace``.

Registering your own model and data takes a few lines::

  @batchbench.register_workload("my_mlp")
  def my_mlp(hidden: int = 128):
    return batchbench.classification_workload(
        "my_mlp", model=MyFlaxModule(hidden), input_shape=(64,), num_classes=10,
        data=lambda: batchbench.ArrayData.classification(x_train, y_train, x_test, y_test),
        target=batchbench.Target("accuracy", 0.9), reference_batch=32)
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from batchbench.data.arrays import ArrayData

PyTree = Any
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Target:
  """A workload is trained once ``metric`` reaches ``value`` in ``direction``."""

  metric: str
  value: float
  direction: str = "max"

  def met(self, value: float) -> bool:
    return value >= self.value if self.direction == "max" else value <= self.value


@dataclasses.dataclass(frozen=True)
class Metric:
  """An evaluation metric: its valid range and which way is better."""

  low: float
  high: float
  direction: str


class LossOutput(NamedTuple):
  """What a workload's ``loss`` returns."""

  loss_sum: jax.Array  # sum of per-example losses over valid examples
  count: jax.Array  # number of valid examples (the sum of the mask)
  model_state: PyTree  # the updated mutable model state ({} when there is none)


@dataclasses.dataclass(frozen=True)
class Workload:
  """A model, its data, its loss and metrics, and its target.

  Attributes:
    name: registry name.
    init: ``(rng, batch_spec) -> (params, model_state)``.
    loss: ``(params, model_state, batch, rng) -> LossOutput``.
    eval_sums: ``(params, model_state, batch) -> {name: sum}``, including ``count``.
    metrics: metric name -> valid range and direction; a metric value is
      ``eval_sums[name] / eval_sums["count"]``.
    example_spec: field name -> ``jax.ShapeDtypeStruct`` of one example (no batch axis).
    data: ``() -> ArrayData``: an embedded dataset, placed on every device; or None.
    synthetic_batch: ``(rng, n) -> batch`` of ``n`` examples drawn on the device, for
      throughput-only workloads (``data`` is None); the harness adds the mask.
    gather: ``(train_arrays, indices) -> batch`` for embedded data whose examples are
      not rows (e.g. token windows cut from one stream); None takes rows of every array.
    train_size: examples in the training set (known without loading it), or None.
    target: default target, or None (throughput only).
    reference_batch: batch at which the default learning rate was tuned.
    evaluate: ``(params, model_state) -> {metric: value}``, a whole evaluation run on the
      host (it may call jitted functions of its own), for metrics that are not sums over
      test batches (e.g. a Frechet distance of generated samples); None: ``eval_sums``
      over the test set.
    host_data: ``() -> HostData``: a dataset read on the host per process (TFDS through
      Grain, ``batchbench.data.host``) for data that does not fit on every device; the
      third kind of source beside ``data`` (embedded) and ``synthetic_batch``.
    flops_per_example: analytic training FLOPs per example (forward + backward, e.g.
      3 x the forward matmul FLOPs), for MFU; None: XLA's count of the compiled step.
  """

  name: str
  init: Callable[[jax.Array, Batch], tuple[PyTree, PyTree]]
  loss: Callable[[PyTree, PyTree, Batch, jax.Array], LossOutput]
  eval_sums: Callable[[PyTree, PyTree, Batch], dict[str, jax.Array]]
  metrics: Mapping[str, Metric]
  example_spec: Mapping[str, jax.ShapeDtypeStruct]
  data: Callable[[], ArrayData] | None
  train_size: int | None
  target: Target | None
  reference_batch: int
  synthetic_batch: Callable[[jax.Array, int], Batch] | None = None
  gather: Callable[[Mapping[str, jax.Array], jax.Array], Batch] | None = None
  evaluate: Callable[[PyTree, PyTree], dict[str, float]] | None = None
  host_data: Callable[[], HostData] | None = None
  flops_per_example: float | None = None

  def __post_init__(self):
    sources = [x is not None for x in (self.data, self.synthetic_batch, self.host_data)]
    if sum(sources) != 1:
      raise ValueError(f"workload {self.name!r}: give exactly one of data (embedded), "
                       "synthetic_batch (drawn on the device) or host_data (read on the "
                       "host)")

  @property
  def synthetic(self) -> bool:
    return self.synthetic_batch is not None

  @property
  def source(self) -> str:
    """``embedded``, ``synthetic`` or ``host``."""
    return ("embedded" if self.data is not None else
            "synthetic" if self.synthetic_batch is not None else "host")

  def batch_spec(self, n: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a batch of ``n`` examples (without the mask)."""
    return {k: jax.ShapeDtypeStruct((n, *s.shape), s.dtype)
            for k, s in self.example_spec.items()}


@dataclasses.dataclass(frozen=True)
class HostData:
  """A dataset read on the host: TFDS data sources and how an example becomes a batch row.

  Attributes:
    train, test: random-access sources (``batchbench.data.host.open_source``).
    num_train: training examples (``len(train)``).
    transform: example dict -> example dict of numpy arrays (decode, normalise), run in
      the pipeline's threads; its output fields are the workload's ``example_spec``.
    fields: source key -> batch key, selected before ``transform`` (None: all).
  """

  train: Any
  test: Any
  num_train: int
  transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None
  fields: Mapping[str, str] | None = None


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
    raise TypeError(f"workload {name} has no option(s) {', '.join(unknown)}; its options "
                    f"are {', '.join(sorted(known))}")
  return _REGISTRY[name](**options)


__all__ = ["ArrayData", "Batch", "HostData", "LossOutput", "Metric", "Target", "Workload",
           "get_workload",
           "register_workload", "workload_names", "workload_options"]


def tokens_per_example(workload: Workload) -> int | None:
  """Tokens one example trains on (``seq_len`` for a language model), or None.

  A language model's ``example_spec`` has integer ``targets`` of shape (seq_len,);
  tokens/s is samples/s times this.
  """
  targets = workload.example_spec.get("targets")
  if (targets is None or len(targets.shape) != 1
      or not jax.numpy.issubdtype(targets.dtype, jax.numpy.integer)):
    return None
  return int(targets.shape[0])

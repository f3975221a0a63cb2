"""The built-in workloads: embedded digits, MNIST-1D and synthetic throughput."""

from __future__ import annotations

import functools
from collections.abc import Callable

from batchbench.config.errors import require
from batchbench.data import embedded
from batchbench.data.arrays import ArrayData
from batchbench.data.host import ArraySource
from batchbench.models import CNN, CNN1D, MLP
from batchbench.workloads.base import HostData, Target, Workload, register_workload
from batchbench.workloads.classification import classification_workload

DIGITS_TRAIN = 1437


PIPELINES = ("device", "host")


@register_workload("digits_mlp")
def digits_mlp(hidden: tuple[int, ...] = (256, 256), pipeline: str = "device") -> Workload:
  """scikit-learn's bundled 8x8 digits, MLP 64-256-256-10. Needs no network.

  ``pipeline="device"`` keeps the dataset on every device (the default); ``"host"``
  reads the same arrays through the host input pipeline (``batchbench.data.host``),
  in the same order, to measure that pipeline's cost on a model that needs no data.
  """
  require(pipeline in PIPELINES, "workload_options.pipeline", pipeline,
          f"must be one of {', '.join(PIPELINES)}")
  data = functools.partial(embedded.digits, DIGITS_TRAIN)
  return classification_workload(
      "digits_mlp", model=MLP(hidden=tuple(hidden), num_classes=10), input_shape=(64,),
      num_classes=10, data=data if pipeline == "device" else None,
      host_data=functools.partial(_host_arrays, data) if pipeline == "host" else None,
      train_size=DIGITS_TRAIN, target=Target("accuracy", 0.96), reference_batch=32)


def _host_arrays(data: Callable[[], ArrayData]) -> HostData:
  """An embedded dataset served by the host pipeline (``ArraySource``)."""
  arrays = data()
  return HostData(train=ArraySource(arrays.train), test=ArraySource(arrays.test),
                  num_train=arrays.num_train)


def _mnist1d(name, model, num_train, num_test, seed, cache_dir, target):
  data = functools.partial(embedded.mnist1d, num_train=num_train, num_test=num_test,
                           seed=seed, cache_dir=cache_dir)
  return classification_workload(name, model=model, input_shape=(40,), num_classes=10,
                                 data=data, train_size=num_train, target=target,
                                 reference_batch=32)


@register_workload("mnist1d_mlp")
def mnist1d_mlp(num_train: int = 10_000, num_test: int = 2_500, seed: int = 42,
                cache_dir: str | None = None,
                hidden: tuple[int, ...] = (256, 256)) -> Workload:
  """MNIST-1D generated procedurally (never downloaded), MLP 40-256-256-10."""
  return _mnist1d("mnist1d_mlp", MLP(hidden=tuple(hidden)), num_train, num_test, seed,
                  cache_dir, Target("accuracy", 0.80))


@register_workload("mnist1d_cnn")
def mnist1d_cnn(num_train: int = 10_000, num_test: int = 2_500, seed: int = 42,
                cache_dir: str | None = None,
                features: tuple[int, ...] = (32, 32, 32)) -> Workload:
  """MNIST-1D with a small 1-D CNN."""
  return _mnist1d("mnist1d_cnn", CNN1D(features=tuple(features)), num_train, num_test, seed,
                  cache_dir, Target("accuracy", 0.85))


@register_workload("synthetic_mlp")
def synthetic_mlp(input_dim: int = 64, hidden: tuple[int, ...] = (256, 256)) -> Workload:
  """Random inputs generated on device for pure throughput; no target."""
  return classification_workload("synthetic_mlp", model=MLP(hidden=tuple(hidden)),
                                 input_shape=(input_dim,), num_classes=10, data=None)


@register_workload("synthetic_cnn")
def synthetic_cnn(image_size: int = 28) -> Workload:
  """The Flax examples' MNIST CNN on random 28x28x1 inputs; no target."""
  return classification_workload("synthetic_cnn", model=CNN(),
                                 input_shape=(image_size, image_size, 1), num_classes=10,
                                 data=None)

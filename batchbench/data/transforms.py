"""Per-example transforms for the host pipeline: example dict -> example dict of arrays.

A transform runs on the host, in ``HostFeed``'s reader threads, once per example; it
sees the example after ``fields`` has selected and renamed its keys (so it is written
in the batch's names, ``"inputs"`` and ``"labels"``), and returns numpy arrays of a
fixed shape and dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

Example = dict[str, np.ndarray]
Transform = Callable[[Example], Example]

# Per-channel statistics of the CIFAR-10 training images, on the [0, 1] scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def compose(*transforms: Transform) -> Transform:
  """One transform that applies ``transforms`` left to right."""
  def apply(example: Example) -> Example:
    for transform in transforms:
      example = transform(example)
    return example
  return apply


def normalize_image(mean: Sequence[float], std: Sequence[float], key: str = "inputs") -> Transform:
  """uint8 image in [0, 255] -> float32 ``(image / 255 - mean) / std``, per channel."""
  mean32 = np.asarray(mean, np.float32)
  inv_std = 1.0 / np.asarray(std, np.float32)

  def apply(example: Example) -> Example:
    image = np.asarray(example[key], np.float32) * np.float32(1 / 255)
    return {**example, key: (image - mean32) * inv_std}
  return apply


def cast(dtypes: Mapping[str, np.dtype | type]) -> Transform:
  """Casts the named fields (``{"labels": np.int32}``); other fields pass through."""
  def apply(example: Example) -> Example:
    return {**example, **{k: np.asarray(example[k], dtypes[k]) for k in dtypes}}
  return apply


def image_classification(mean: Sequence[float] = CIFAR10_MEAN,
                         std: Sequence[float] = CIFAR10_STD, image: str = "inputs",
                         label: str = "labels") -> Transform:
  """Normalised float32 image and int32 label: the CIFAR-style classification transform."""
  return compose(normalize_image(mean, std, image), cast({label: np.int32}))

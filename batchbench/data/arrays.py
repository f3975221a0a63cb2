"""``ArrayData``: an in-memory dataset, as pytrees of arrays with a leading example axis.

A batch anywhere in batchbench is a dict of arrays (``{"inputs": ..., "labels": ...}``,
or token windows, or anything a workload defines), plus ``"mask"``, a float 0/1 per
example that the harness adds (1 for real examples, 0 for padding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

MASK = "mask"


@dataclasses.dataclass(frozen=True)
class ArrayData:
  """A dataset small enough to live on every device.

  Attributes:
    train: name -> array, each with the training examples on axis 0.
    test: name -> array, each with the test examples on axis 0.
  """

  train: Mapping[str, np.ndarray]
  test: Mapping[str, np.ndarray]

  def __post_init__(self):
    for split in ("train", "test"):
      arrays = getattr(self, split)
      if MASK in arrays:
        raise ValueError(f"ArrayData.{split} may not have a field named {MASK!r} (reserved)")
      sizes = {name: len(a) for name, a in arrays.items()}
      if len(set(sizes.values())) > 1:
        raise ValueError(f"ArrayData.{split}: fields differ in length: {sizes}")

  @classmethod
  def classification(cls, train_x, train_y, test_x, test_y) -> ArrayData:
    """``{"inputs": x, "labels": y}`` for both splits."""
    return cls({"inputs": train_x, "labels": train_y}, {"inputs": test_x, "labels": test_y})

  @property
  def num_train(self) -> int:
    return int(len(next(iter(self.train.values()))))

  @property
  def num_test(self) -> int:
    return int(len(next(iter(self.test.values()))))

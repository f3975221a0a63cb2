"""The device mesh (one data axis) and the shardings every program uses."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D ``data`` mesh over the first ``num_devices`` devices (default: all).

  Built as a plain ``Mesh`` so the axis type is Auto: ``jax.make_mesh`` now
  defaults to Explicit axes, under which sharding propagation is stricter.
  """
  devices = jax.devices()
  num_devices = num_devices or len(devices)
  return Mesh(np.array(devices[:num_devices]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
  """Examples on the data axis, after ``leading`` unsharded axes (steps, micro-batches)."""
  return NamedSharding(mesh, P(*([None] * leading), DATA_AXIS))

"""Device-resident datasets and the per-call example indices that feed them.

Embedded datasets are small, so the whole training and test set is put on every
device once; a train call then receives only the example indices of its steps
(``steps_per_call x accum_steps x micro_batch`` int32, sharded along the batch)
and gathers its batches on device. The host never copies examples per step.

Shuffling is a fresh permutation per epoch drawn from ``(seed, epoch)``, and the
indices of a step are a pure function of the step number, so the data position
of a run is just its step count (what a checkpoint needs to resume exactly).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from batchbench.workloads.base import ArrayData

DATA_AXIS = "data"


class EpochIndexFeeder:
  """Example indices for the steps of a call, from per-epoch permutations.

  Each epoch uses ``num_train // global_batch`` full batches of a permutation
  seeded by ``(seed, epoch)``; the remainder is dropped, so every step sees a
  full global batch.
  """

  def __init__(self, num_train: int, global_batch: int, accum_steps: int,
               steps_per_call: int, seed: int):
    self.num_train = num_train
    self.global_batch = global_batch
    self.accum_steps = accum_steps
    self.steps_per_call = steps_per_call
    self.seed = seed
    self.steps_per_epoch = num_train // global_batch
    self._perm_epoch: int | None = None
    self._perm: np.ndarray | None = None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._perm = rng.permutation(self.num_train).astype(np.int32)
      self._perm_epoch = epoch
    return self._perm

  def step_indices(self, step: int) -> np.ndarray:
    """Indices of the global batch of optimizer step ``step``."""
    epoch, pos = divmod(step, self.steps_per_epoch)
    start = pos * self.global_batch
    return self._permutation(epoch)[start:start + self.global_batch]

  def call_indices(self, first_step: int) -> np.ndarray:
    """Indices for steps ``first_step .. first_step + steps_per_call - 1``.

    Copies one contiguous run of the permutation per epoch the call touches (a
    view, without copying, when it stays within one epoch).

    Returns:
      int32 array of shape ``(steps_per_call, accum_steps, global_batch // accum_steps)``.
    """
    k, batch = self.steps_per_call, self.global_batch
    epoch, pos = divmod(first_step, self.steps_per_epoch)
    if pos + k <= self.steps_per_epoch:
      out = self._permutation(epoch)[pos * batch:(pos + k) * batch]
    else:
      out = np.empty(k * batch, np.int32)
      done = 0
      while done < k:
        n = min(k - done, self.steps_per_epoch - pos)
        out[done * batch:(done + n) * batch] = self._permutation(epoch)[pos * batch:
                                                                        (pos + n) * batch]
        done += n
        epoch, pos = epoch + 1, 0
    return out.reshape(k, self.accum_steps, -1)


class LookaheadFeed:
  """``feed(first_step)`` that can build the next call's inputs ahead of time.

  Dispatch is asynchronous, so after dispatching a call the loop calls
  ``prefetch(next_step)``: the host builds the next call's inputs while the
  device runs the current one, and ``feed(next_step)`` then returns them at once.
  Without this, a window of one call would wait on the host's index building
  (about 1 ms per 32 fresh permutations of 1,437 examples). The inputs are a pure
  function of the step, so computing them early changes nothing.
  """

  def __init__(self, feed: Callable[[int], np.ndarray]):
    self._feed = feed
    self._ahead: tuple[int, np.ndarray] | None = None

  def __call__(self, first_step: int) -> np.ndarray:
    ahead, self._ahead = self._ahead, None
    if ahead is not None and ahead[0] == first_step:
      return ahead[1]
    return self._feed(first_step)

  def prefetch(self, first_step: int) -> None:
    self._ahead = (first_step, self._feed(first_step))


def feed_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a call's indices: the batch (last) axis over the data axis."""
  return NamedSharding(mesh, P(None, None, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_train_data(data: ArrayData, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
  """Puts the training set on every device of ``mesh`` (replicated)."""
  sharding = replicated(mesh)
  return (jax.device_put(jnp.asarray(data.train_x), sharding),
          jax.device_put(jnp.asarray(data.train_y), sharding))


def put_eval_data(data: ArrayData, mesh: Mesh, chunk: int = 4096
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pads the test set into ``(n_chunks, chunk, ...)`` with a 0/1 mask, sharded.

  The chunk is a multiple of the device count so each chunk splits evenly over
  the data axis; padded examples have mask 0 and do not count in any metric.
  """
  n = data.test_x.shape[0]
  devices = mesh.devices.size
  chunk = min(chunk, n)
  chunk = -(-chunk // devices) * devices
  n_chunks = -(-n // chunk)
  pad = n_chunks * chunk - n
  x = np.concatenate([data.test_x, np.zeros((pad, *data.test_x.shape[1:]), data.test_x.dtype)])
  y = np.concatenate([data.test_y, np.zeros((pad,), data.test_y.dtype)])
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  sharding = NamedSharding(mesh, P(None, DATA_AXIS))
  return tuple(jax.device_put(a.reshape(n_chunks, chunk, *a.shape[1:]), sharding)
               for a in (x, y, mask))

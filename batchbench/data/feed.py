"""The example indices of each compiled call, as a pure function of the step.

Embedded datasets live on every device; a train call receives only the example
indices of its steps (``steps_per_call x accum_steps x micro_batch`` int32) and
gathers its batches on the device. Shuffling is a fresh permutation per epoch
drawn from ``(seed, epoch)``, and the indices of a step depend only on the seed,
the global batch and the step (not on how the batch is split over devices and
micro-batches), so the data position of a run is its step count: what a
checkpoint needs to resume exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


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

  def call_indices(self, first_step: int, num_steps: int | None = None) -> np.ndarray:
    """Indices for steps ``first_step .. first_step + num_steps - 1`` (default all K).

    The array always has the call's K rows (the compiled shape); rows past
    ``num_steps`` are 0 and never read. One contiguous run of the permutation is
    copied per epoch the call touches (a view, without copying, for a full call
    within one epoch).

    Returns:
      int32 array of shape ``(steps_per_call, accum_steps, global_batch // accum_steps)``.
    """
    k, batch = self.steps_per_call, self.global_batch
    n = k if num_steps is None else num_steps
    epoch, pos = divmod(first_step, self.steps_per_epoch)
    if n == k and pos + k <= self.steps_per_epoch:
      out = self._permutation(epoch)[pos * batch:(pos + k) * batch]
    else:
      out = np.zeros(k * batch, np.int32)
      done = 0
      while done < n:
        m = min(n - done, self.steps_per_epoch - pos)
        perm = self._permutation(epoch)
        out[done * batch:(done + m) * batch] = perm[pos * batch:(pos + m) * batch]
        done += m
        epoch, pos = epoch + 1, 0
    return out.reshape(k, self.accum_steps, -1)


def synthetic_keys(steps_per_call: int, accum_steps: int) -> Callable[..., np.ndarray]:
  """``feed(first_step, num_steps=None)`` for synthetic inputs: one integer key per
  (step, micro-batch), as a function of the step alone."""
  def keys(first_step: int, num_steps: int | None = None) -> np.ndarray:
    del num_steps  # keys past the call's steps are never read
    flat = np.arange(first_step * accum_steps, (first_step + steps_per_call) * accum_steps,
                     dtype=np.int64)
    return (flat.reshape(steps_per_call, accum_steps) % (2**31 - 1)).astype(np.int32)
  return keys


class LookaheadFeed:
  """``feed(first_step, num_steps)`` that can build the next call's inputs ahead of time.

  Dispatch is asynchronous, so after dispatching a call the loop calls
  ``prefetch(next_step, num_steps)``: the host builds the next call's inputs while
  the device runs the current one, and ``feed(next_step, num_steps)`` then returns
  them at once. The inputs are a pure function of the steps, so computing them early
  changes nothing.
  """

  def __init__(self, feed: Callable[..., np.ndarray]):
    self._feed = feed
    self._ahead: tuple[tuple[int, int | None], np.ndarray] | None = None

  def __call__(self, first_step: int, num_steps: int | None = None) -> np.ndarray:
    ahead, self._ahead = self._ahead, None
    if ahead is not None and ahead[0] == (first_step, num_steps):
      return ahead[1]
    return self._feed(first_step, num_steps)

  def prefetch(self, first_step: int, num_steps: int | None = None) -> None:
    self._ahead = ((first_step, num_steps), self._feed(first_step, num_steps))

  def close(self) -> None:
    """Nothing to stop (``HostFeed.close`` stops its threads)."""
    self._ahead = None

  def __enter__(self) -> LookaheadFeed:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

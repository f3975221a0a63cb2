"""The per-epoch shuffle that feeds embedded datasets, and the lookahead feed."""

import numpy as np
import pytest

from batchbench.data.device import EpochIndexFeeder, LookaheadFeed


@pytest.mark.parametrize("num_train,batch", [(1437, 32), (1437, 1024), (100, 10)])
def test_each_epoch_is_a_fresh_permutation_without_repeats(num_train, batch):
  feeder = EpochIndexFeeder(num_train, batch, 1, 1, seed=3)
  spe = num_train // batch
  epochs = [np.concatenate([feeder.step_indices(e * spe + s) for s in range(spe)])
            for e in range(3)]
  for seen in epochs:
    assert seen.dtype == np.int32 and seen.shape == (spe * batch,)
    assert len(np.unique(seen)) == spe * batch  # no example twice in an epoch
    assert seen.min() >= 0 and seen.max() < num_train
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
  again = EpochIndexFeeder(num_train, batch, 1, 1, seed=3)
  np.testing.assert_array_equal(again.step_indices(2 * spe), epochs[2][:batch])  # seeded
  other = EpochIndexFeeder(num_train, batch, 1, 1, seed=4)
  assert not np.array_equal(other.step_indices(0), epochs[0][:batch])


@pytest.mark.parametrize("num_train,batch,accum,k", [
    (1437, 32, 1, 64),  # a call spans two epochs
    (1437, 1024, 1, 32),  # one step per epoch: a new permutation every step
    (1437, 256, 2, 64),  # thirteen epochs per call, split into micro-batches
    (100, 10, 5, 3),  # calls inside one epoch
])
def test_call_indices_are_the_steps_indices_in_order(num_train, batch, accum, k):
  calls = EpochIndexFeeder(num_train, batch, accum, k, seed=0)
  steps = EpochIndexFeeder(num_train, batch, accum, 1, seed=0)
  for first in (0, k, 5 * k, 7):
    got = calls.call_indices(first)
    assert got.shape == (k, accum, batch // accum)
    want = np.stack([steps.step_indices(first + i) for i in range(k)])
    np.testing.assert_array_equal(got.reshape(k, batch), want)


def test_lookahead_feed_returns_the_prefetched_inputs_once():
  built = []

  def feed(step):
    built.append(step)
    return np.full((2,), step)

  ahead = LookaheadFeed(feed)
  ahead.prefetch(4)
  assert built == [4]
  np.testing.assert_array_equal(ahead(4), [4, 4])
  assert built == [4]  # served from the prefetch, not built again
  np.testing.assert_array_equal(ahead(4), [4, 4])
  assert built == [4, 4]  # a prefetch is used once
  ahead.prefetch(6)
  np.testing.assert_array_equal(ahead(8), [8, 8])  # another step: built, not the prefetch
  assert built == [4, 4, 6, 8]
  np.testing.assert_array_equal(ahead(6), [6, 6])  # the unused prefetch was dropped
  assert built == [4, 4, 6, 8, 6]

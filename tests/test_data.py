"""The per-epoch shuffle that feeds embedded datasets, the lookahead feed, and placement."""

import jax
import numpy as np
import pytest

from batchbench.core.mesh import make_mesh
from batchbench.data import placement
from batchbench.data.arrays import MASK
from batchbench.data.feed import EpochIndexFeeder, LookaheadFeed, synthetic_keys


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


@pytest.mark.parametrize("num_train,batch,k", [(1000, 256, 3), (1437, 48, 40)])
def test_a_steps_indices_do_not_depend_on_the_accumulation_split(num_train, batch, k):
  """Every split of a global batch trains on the same examples in the same order each step:
  the micro-batches are consecutive slices of the step's global batch."""
  reference = EpochIndexFeeder(num_train, batch, 1, k, seed=5)
  splits = [a for a in range(1, batch + 1) if batch % a == 0]
  assert len(splits) > 4
  for first in (0, 7, 2 * k):
    want = reference.call_indices(first).reshape(k, batch)
    for accum in splits:
      got = EpochIndexFeeder(num_train, batch, accum, k, seed=5).call_indices(first)
      assert got.shape == (k, accum, batch // accum)
      np.testing.assert_array_equal(got.reshape(k, batch), want)
      for a in range(accum):  # micro-batch a is the a-th slice of each step's batch
        m = batch // accum
        np.testing.assert_array_equal(got[:, a], want[:, a * m:(a + 1) * m])


def test_synthetic_keys_are_one_per_step_and_micro_batch():
  k, accum = 4, 3
  keys = synthetic_keys(k, accum)
  first = keys(10)
  assert first.shape == (k, accum) and first.dtype == np.int32
  # A pure function of the step: a call's keys are its steps' keys, one step at a time.
  one = synthetic_keys(1, accum)
  np.testing.assert_array_equal(first, np.concatenate([one(10 + i) for i in range(k)]))
  # Distinct across steps and micro-batches of a run.
  seen = np.concatenate([keys(s).ravel() for s in range(0, 40, k)])
  assert len(np.unique(seen)) == seen.size


def test_lookahead_feed_returns_the_prefetched_inputs_once():
  built = []

  def feed(step, num_steps=None):
    built.append((step, num_steps))
    return np.full((2,), step)

  ahead = LookaheadFeed(feed)
  ahead.prefetch(4, 2)
  assert built == [(4, 2)]
  np.testing.assert_array_equal(ahead(4, 2), [4, 4])
  assert built == [(4, 2)]  # served from the prefetch, not built again
  np.testing.assert_array_equal(ahead(4, 2), [4, 4])
  assert built == [(4, 2)] * 2  # a prefetch is used once
  ahead.prefetch(6, 2)
  np.testing.assert_array_equal(ahead(8, 2), [8, 8])  # another step: built, not the prefetch
  assert built == [(4, 2), (4, 2), (6, 2), (8, 2)]
  np.testing.assert_array_equal(ahead(6, 2), [6, 6])  # the unused prefetch was dropped
  ahead.prefetch(10, 2)
  ahead(10, 1)  # the same first step but a shorter call: not the prefetched inputs
  assert built[-2:] == [(10, 2), (10, 1)]


# --- placement --------------------------------------------------------------------------

def _test_set(n, seed=0):
  rng = np.random.default_rng(seed)
  return {"inputs": rng.normal(size=(n, 3, 2)).astype(np.float32),
          "labels": rng.integers(0, 10, n).astype(np.int32)}


@pytest.mark.parametrize("n,num_devices,chunk", [
    (101, 8, 4096),  # one chunk of 104: 101 real, 3 padding
    (101, 8, 24),  # five chunks of 24
    (50, 4, 10),  # a chunk of 10 rounds up to 12, a multiple of the devices
    (64, 8, 16),  # divides exactly: no padding
    (5, 8, 4096),  # fewer examples than devices
])
def test_eval_chunks_pad_to_whole_device_chunks_and_mask_the_padding(n, num_devices, chunk):
  test = _test_set(n)
  out = placement.eval_chunks(test, num_devices, chunk)
  assert set(out) == {"inputs", "labels", MASK}
  size = out[MASK].shape[1]
  expected_size = -(-min(chunk, n) // num_devices) * num_devices  # ceil to the devices
  n_chunks = -(-n // size)
  assert size == expected_size and size % num_devices == 0
  assert out[MASK].shape == (n_chunks, size) and out[MASK].dtype == np.float32
  assert out["inputs"].shape == (n_chunks, size, 3, 2) and out["labels"].shape == (n_chunks, size)
  assert out["inputs"].dtype == np.float32 and out["labels"].dtype == np.int32
  mask = out[MASK].reshape(-1)
  np.testing.assert_array_equal(mask, (np.arange(n_chunks * size) < n).astype(np.float32))
  assert mask.sum() == n
  # The real examples in order, then zeros; padding never outnumbers a chunk.
  for name, a in test.items():
    flat = out[name].reshape(n_chunks * size, *a.shape[1:])
    np.testing.assert_array_equal(flat[:n], a)
    assert not flat[n:].any()
  assert n_chunks * size - n < size


def test_put_eval_data_shards_examples_over_the_devices():
  mesh = make_mesh(4)
  test = _test_set(50)
  placed = placement.put_eval_data(test, mesh)
  want = placement.eval_chunks(test, 4)
  for name, a in placed.items():
    np.testing.assert_array_equal(np.asarray(a), want[name])
    shards = a.addressable_shards
    assert len(shards) == 4
    # Each device holds a quarter of every chunk's examples.
    assert {s.data.shape[:2] for s in shards} == {(a.shape[0], a.shape[1] // 4)}


def test_train_data_is_replicated_and_its_abstract_twin_matches_without_placing():
  mesh = make_mesh(2)
  train = {"inputs": np.arange(24, dtype=np.float64).reshape(6, 4),
           "labels": np.arange(6, dtype=np.int64)}
  live = len(jax.live_arrays())
  abstract = placement.abstract_train_data(train, mesh)
  assert len(jax.live_arrays()) == live  # nothing placed
  placed = placement.put_train_data(train, mesh)
  for name, a in placed.items():
    assert a.sharding.is_fully_replicated and len(a.addressable_shards) == 2
    np.testing.assert_array_equal(np.asarray(a), train[name])
    assert (abstract[name].shape, abstract[name].dtype) == (a.shape, a.dtype)
    assert abstract[name].sharding == a.sharding

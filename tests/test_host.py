"""The host input pipeline: TFDS data sources (mocked offline) read through Grain."""

import re
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds

from batchbench.config.errors import ConfigError
from batchbench.data.feed import EpochIndexFeeder
from batchbench.data.host import HostFeed, eval_batches, open_source
from batchbench.data.transforms import CIFAR10_MEAN, CIFAR10_STD, image_classification

CIFAR_FIELDS = {"image": "inputs", "label": "labels"}


@pytest.fixture(name="cifar")
def fixture_cifar():
  """CIFAR-10's train split as a mocked ArrayRecord data source (random images, offline)."""
  with tfds.testing.mock_data(num_examples=40):
    yield open_source("cifar10", "train")


def indexed(n):
  """A source whose example i carries i: the batches show which examples were read."""
  return [{"index": np.int32(i), "vec": np.full(3, i, np.int32)} for i in range(n)]


def cifar_feed(source, **kwargs):
  args = dict(num_train=len(source), global_batch=8, accum_steps=2, steps_per_call=3, seed=5,
              transform=image_classification(), fields=CIFAR_FIELDS, num_threads=4)
  return HostFeed(source, **{**args, **kwargs})


def test_cifar_arrays_have_the_call_shape_and_are_normalised(cifar):
  with cifar_feed(cifar, process_index=1, process_count=2) as feed:
    arrays = feed(4)
    indices = feed.local_indices(4)
  assert set(arrays) == {"inputs", "labels"}  # fields dropped TFDS's string "id"
  assert arrays["inputs"].shape == (3, 2, 2, 32, 32, 3) and arrays["inputs"].dtype == np.float32
  assert arrays["labels"].shape == (3, 2, 2) and arrays["labels"].dtype == np.int32
  raw = [cifar[i] for i in indices.reshape(-1)]
  images = np.stack([r["image"] for r in raw]).astype(np.float64)
  expected = (images / 255 - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
  np.testing.assert_allclose(arrays["inputs"].reshape(expected.shape), expected, atol=1e-5)
  np.testing.assert_array_equal(arrays["labels"].reshape(-1), [r["label"] for r in raw])


@pytest.mark.parametrize("accum_steps", [1, 2, 4])
def test_global_indices_are_the_index_feeders_whatever_the_accumulation(accum_steps):
  # 45 examples, batch 8: 5 steps an epoch; the call at step 3 crosses into epoch 1.
  expected = EpochIndexFeeder(45, 8, 1, 4, seed=7).call_indices(3, 3).reshape(4, 8)
  with HostFeed(indexed(45), num_train=45, global_batch=8, accum_steps=accum_steps,
                steps_per_call=4, seed=7, transform=None, num_threads=2) as feed:
    arrays = feed(3, 3)
  assert arrays["index"].shape == (4, accum_steps, 8 // accum_steps)
  np.testing.assert_array_equal(arrays["index"].reshape(4, 8)[:3], expected[:3])
  np.testing.assert_array_equal(arrays["vec"].reshape(4, 8, 3)[:3, :, 0], expected[:3])
  assert not arrays["index"][3].any() and not arrays["vec"][3].any()  # past num_steps: zero


def test_process_slices_concatenate_to_the_single_process_batch(cifar):
  with cifar_feed(cifar) as whole:
    expected = whole(2)
  parts = []
  for p in range(2):
    with cifar_feed(cifar, process_index=p, process_count=2) as feed:
      parts.append(feed(2))
  for key in expected:
    np.testing.assert_array_equal(np.concatenate([q[key] for q in parts], axis=2),
                                  expected[key])


def test_a_resumed_feed_reads_the_same_batches(cifar):
  # 40 examples, batch 8: 5 steps an epoch; calls of 3 steps cross epochs.
  with cifar_feed(cifar) as feed:
    first = [feed(3 * c) for c in range(6)]
  with cifar_feed(cifar) as resumed:
    again = [resumed(3 * c) for c in range(3, 6)]
  for a, b in zip(first[3:], again, strict=True):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
  assert not np.array_equal(first[3]["inputs"], first[4]["inputs"])


def test_prefetch_returns_the_direct_arrays_and_records_the_wait():
  # A fake clock that advances one second per example read: a call waits exactly as
  # long as the reading it could not overlap.
  now, lock = [0.0], threading.Lock()

  def tick(example):
    with lock:
      now[0] += 1.0
    return example

  args = dict(num_train=45, global_batch=8, accum_steps=2, steps_per_call=2, seed=1,
              transform=tick, process_index=1, process_count=2, num_threads=3,
              clock=lambda: now[0])
  with HostFeed(indexed(45), **args) as direct:
    expected = direct(6)
  with HostFeed(indexed(45), **args) as feed:
    feed(0)
    assert feed.last_wait_seconds == 8.0  # 2 steps x 2 micro-batches x 2 examples, unhidden
    feed.prefetch(6).result()  # the device would compute meanwhile
    arrays = feed(6)
    assert feed.last_wait_seconds == 0.0
    feed.prefetch(8)
    other = feed(10, 1)  # not the prefetched steps: built directly, the right ones
    assert feed.wait_seconds == 8.0 + feed.last_wait_seconds
    assert feed.last_wait_seconds >= 4.0  # at least its own 1 x 2 x 2 reads
  for key in expected:
    np.testing.assert_array_equal(arrays[key], expected[key])
  np.testing.assert_array_equal(other["index"][0], feed.local_indices(10, 1)[0])


def test_prefetch_builds_in_the_background():
  gate = threading.Event()

  def held(example):
    gate.wait(timeout=2)  # a synchronous prefetch would return only after this
    return example

  with HostFeed(indexed(8), num_train=8, global_batch=2, accum_steps=1, steps_per_call=1,
                seed=0, transform=held, num_threads=2) as feed:
    pending = feed.prefetch(0)
    assert not pending.done()
    gate.set()
    np.testing.assert_array_equal(feed(0)["index"], feed.local_indices(0))


def test_eval_batches_cover_every_example_once_and_pad_with_mask_zero():
  source = indexed(29)
  seen, counts, padded = [], [], 0
  for p in range(2):
    chunks = list(eval_batches(source, lambda e: {**e, "vec": e["vec"] * 2}, chunk=8,
                               process_index=p, process_count=2, num_threads=2))
    counts.append(len(chunks))
    for arrays, mask in chunks:
      assert arrays["index"].shape == (4,) and arrays["vec"].shape == (4, 3)
      assert mask.dtype == np.float32 and set(mask.tolist()) <= {0.0, 1.0}
      np.testing.assert_array_equal(arrays["vec"][:, 0], 2 * arrays["index"])
      seen += arrays["index"][mask == 1].tolist()
      padded += int((mask == 0).sum())
  assert counts == [4, 4]  # 29 examples in chunks of 8, on both processes
  assert sorted(seen) == list(range(29)) and padded == 32 - 29
  last = list(eval_batches(source, None, chunk=8, process_index=1, process_count=2))[-1][1]
  np.testing.assert_array_equal(last, [1, 0, 0, 0])  # 24..27 on process 0; 28 then padding


def test_eval_batches_slices_each_chunk_contiguously():
  arrays, mask = next(eval_batches(indexed(29), None, chunk=8, process_index=1,
                                   process_count=2))
  np.testing.assert_array_equal(arrays["index"], [4, 5, 6, 7])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1])


def test_a_micro_batch_that_does_not_split_over_processes_is_a_config_error():
  with pytest.raises(ConfigError, match=r"global_batch=12.*micro-batch of 6.*process_count=4"):
    HostFeed(indexed(40), num_train=40, global_batch=12, accum_steps=2, steps_per_call=1,
             seed=0, transform=None, process_count=4)


def test_a_dataset_not_prepared_names_the_data_dir_and_the_prepare_command(tmp_path,
                                                                             monkeypatch):
  with pytest.raises(ConfigError) as info:
    open_source("cifar10", "train", data_dir=str(tmp_path))
  message = str(info.value)
  assert info.value.field == "data_dir" and "\n" not in message
  assert f"data_dir='{tmp_path}'" in message
  assert (f"tfds.builder('cifar10', data_dir='{tmp_path}', file_format='array_record')"
          ".download_and_prepare()") in message
  assert not any(tmp_path.iterdir())  # nothing downloaded or written
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "default"))
  with pytest.raises(ConfigError, match=re.escape(f"data_dir='{tmp_path / 'default'}'")):
    open_source("cifar10", "train")


class BatchbenchHostTiny(tfds.core.GeneratorBasedBuilder):
  """A dataset that prepares offline and without TensorFlow (Tensor features only)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "x": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(12), "test": self._generate_examples(5)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"x": np.array([i, -i], np.float32), "label": i % 3}


def test_the_prepare_command_makes_a_dataset_open_source_reads(tmp_path):
  with pytest.raises(ConfigError) as info:
    open_source("batchbench_host_tiny", "train", data_dir=str(tmp_path))
  code = re.search(r'python -c "(.*)"', str(info.value)).group(1)
  exec(code, {})  # pylint: disable=exec-used  (the one-liner the message tells users to run)
  source = open_source("batchbench_host_tiny", "train", data_dir=str(tmp_path))
  assert len(source) == 12
  assert sorted(float(source[i]["x"][0]) for i in range(12)) == list(range(12))
  with HostFeed(source, num_train=12, global_batch=4, accum_steps=2, steps_per_call=2, seed=3,
                transform=None, fields={"x": "inputs"}, num_threads=2) as feed:
    arrays = feed(2)
    indices = feed.local_indices(2)
  expected = np.stack([source[i]["x"] for i in indices.reshape(-1)])
  np.testing.assert_array_equal(arrays["inputs"].reshape(expected.shape), expected)


def test_a_dataset_prepared_as_tfrecord_says_to_prepare_it_again(tmp_path):
  builder = tfds.builder("batchbench_host_tiny", data_dir=str(tmp_path),
                         file_format="array_record")
  builder.download_and_prepare()
  # What plain `tfds build` writes (TFRecord, which data_source cannot read); writing one
  # needs TensorFlow, so the prepared folder's metadata is rewritten to say so.
  info = tmp_path / "batchbench_host_tiny" / "1.0.0" / "dataset_info.json"
  info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
  with pytest.raises(ConfigError, match=r"as tfrecord, not ArrayRecord; delete that folder.*"
                     r"file_format='array_record'\)\.download_and_prepare\(\)"):
    open_source("batchbench_host_tiny", "train", data_dir=str(tmp_path))

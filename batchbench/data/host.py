"""The host input pipeline: TFDS data sources read through Grain, one shard per process.

For datasets that do not fit on every device. Each process reads, on its host, only
the examples of its own slice of every batch, from a random-access
``tfds.data_source`` (ArrayRecord; reading needs no TensorFlow), through Grain's
``MapDataset.source(src).map(transform)`` in a pool of reader threads.

The example order is ``EpochIndexFeeder``'s (the on-device feed's): a permutation per
``(seed, epoch)``, the indices of a step a pure function of the step and independent
of how the batch is split. Process ``p`` of ``P`` takes the contiguous slice
``[p * L, (p + 1) * L)`` of each micro-batch, ``L = micro_batch / P``: the block a
global array sharded on the batch axis gives a process that owns a contiguous block
of devices, so ``jax.make_array_from_process_local_data`` on axis 2 of the call's
arrays rebuilds the global batch. The data position of a run is its step count: a
resumed trial reads exactly the batches the uninterrupted one would have read.
"""

from __future__ import annotations

import concurrent.futures as futures
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from batchbench.config.errors import ConfigError, require
from batchbench.data.feed import EpochIndexFeeder
from batchbench.data.transforms import Example, Transform

Arrays = dict[str, np.ndarray]


def default_data_dir() -> str:
  """TFDS's default ``data_dir``: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), "tensorflow_datasets")


def prepare_command(name: str, data_dir: str) -> str:
  """The shell command that prepares ``name`` as ArrayRecord in ``data_dir``.

  Preparing runs the dataset's own builder, which for most datasets (CIFAR-10,
  ImageNet, lm1b: ``tf.io.gfile`` reads, PNG/JPEG encoding) needs TensorFlow; the
  ``tfds build`` CLI needs it too. TFDS writes TFRecord by default, which
  ``data_source`` cannot read, hence ``file_format='array_record'``.
  """
  return (f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
          f"data_dir='{data_dir}', file_format='array_record').download_and_prepare()\"")


def open_source(name: str, split: str, data_dir: str | None = None) -> Sequence[Any]:
  """A random-access TFDS data source (``len`` and ``[i]``) over a prepared dataset.

  Never downloads. Args: ``name`` (a TFDS name, ``"cifar10"`` or ``"imagenet2012:5.1.0"``),
  ``split`` (``"train"``, ``"test"``, ``"train[:90%]"``), ``data_dir`` (a local or ``gs://``
  path; None: ``default_data_dir()``).

  Raises:
    ConfigError: one line naming ``data_dir`` and, when the dataset is not prepared
      there, the command that prepares it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  where = str(data_dir or default_data_dir())
  try:
    return tfds.data_source(name, split=split, data_dir=where, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError("dataset", name, "not a TFDS dataset (tfds.list_builders() lists them)"
                      ) from None
  except ImportError as e:  # gs:// without TensorFlow reads metadata through gcsfs
    hint = " (pip install gcsfs for gs://)" if where.startswith("gs://") else ""
    raise ConfigError("data_dir", where, f"{_one_line(e)}{hint}") from None
  except (NotImplementedError, ValueError, OSError, AssertionError) as e:
    builder = tfds.builder(name, data_dir=where)
    if not builder.is_prepared():
      raise ConfigError("data_dir", where, f"TFDS dataset {name!r} is not prepared here; "
                        f"prepare it once where there is network (TensorFlow needed for most "
                        f"datasets), then point data_dir at it: {prepare_command(name, where)}"
                        ) from None
    if isinstance(e, NotImplementedError):
      raise ConfigError("data_dir", where, f"{name!r} is prepared at {builder.data_dir} as "
                        f"{builder.info.file_format.value}, not ArrayRecord; delete that folder, "
                        f"then prepare it again: {prepare_command(name, where)}") from None
    raise ConfigError("data_dir", where, f"TFDS {name!r} split {split!r}: {_one_line(e)}"
                      ) from None


class ArraySource:
  """An in-memory random-access source: ``[i]`` is ``{name: arrays[name][i]}``.

  Puts a small dataset (``ArrayData.train``) behind the host pipeline, so the host
  path can be run, tested and compared with the on-device one offline.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self._arrays = dict(arrays)
    self._len = len(next(iter(self._arrays.values())))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {name: a[i] for name, a in self._arrays.items()}


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())


def _examples(source: Sequence[Any], transform: Transform | None,
              fields: Mapping[str, str] | None):
  """Grain's random-access view of ``source``: ``[i]`` -> fields selected, transformed."""
  import grain  # pylint: disable=g-import-not-at-top  (slow import, only when feeding)

  def prepare(example: Mapping[str, Any]) -> Example:
    if fields is not None:
      example = {new: example[old] for old, new in fields.items()}
    example = transform(example) if transform is not None else example
    return {k: np.asarray(v) for k, v in example.items()}
  return grain.MapDataset.source(source).map(prepare)


def _stack(rows: list[Example], shape: tuple[int, ...], total: int) -> Arrays:
  """Stacks examples into arrays of leading shape ``shape``, zero rows up to ``total``."""
  out = {}
  for key in rows[0]:
    values = np.stack([row[key] for row in rows]).reshape(shape + rows[0][key].shape)
    if total > shape[0]:
      values = np.concatenate([values, np.zeros((total - shape[0],) + values.shape[1:],
                                                values.dtype)])
    out[key] = values
  return out


class HostFeed:
  """``feed(first_step, num_steps)``: this process's slice of a call's batches, built on
  the host, with ``prefetch`` to build the next call's while the device computes.

  ``fields`` maps source keys to batch keys (``{"image": "inputs", "label": "labels"}``)
  and drops the rest (TFDS's string ``"id"``, say); it applies before ``transform``, so
  a transform is written in the batch's names. None keeps every key.

  Attributes:
    local_batch: examples per micro-batch on this process, micro_batch / process_count.
    wait_seconds: total time ``__call__`` waited for its arrays (input wait).
    last_wait_seconds: the wait of the latest ``__call__``.
  """

  def __init__(self, source: Sequence[Any], *, num_train: int, global_batch: int,
               accum_steps: int, steps_per_call: int, seed: int,
               transform: Transform | None, process_index: int = 0, process_count: int = 1,
               num_threads: int = 8, fields: Mapping[str, str] | None = None,
               clock: Callable[[], float] = time.perf_counter):
    require(global_batch % accum_steps == 0, "global_batch", global_batch,
            f"must be a multiple of accum_steps={accum_steps}")
    micro = global_batch // accum_steps
    require(micro % process_count == 0, "global_batch", global_batch,
            f"its micro-batch of {micro} (global_batch / accum_steps) must split evenly over "
            f"process_count={process_count} processes")
    require(0 <= process_index < process_count, "process_index", process_index,
            f"must be in [0, {process_count})")
    require(global_batch <= num_train <= len(source), "num_train", num_train,
            f"must be between global_batch={global_batch} and the source's {len(source)}")
    self.steps_per_call = steps_per_call
    self.local_batch = micro // process_count
    self._start = process_index * self.local_batch
    self._order = EpochIndexFeeder(num_train, global_batch, accum_steps, steps_per_call, seed)
    self._order_lock = threading.Lock()  # the feeder caches one permutation: not thread-safe
    self._examples = _examples(source, transform, fields)
    self._readers = futures.ThreadPoolExecutor(num_threads, thread_name_prefix="host-read")
    self._builder = futures.ThreadPoolExecutor(1, thread_name_prefix="host-prefetch")
    self._ahead: tuple[tuple[int, int], futures.Future] | None = None
    self._clock = clock
    self.wait_seconds = 0.0
    self.last_wait_seconds = 0.0

  def _num_steps(self, num_steps: int | None) -> int:
    n = self.steps_per_call if num_steps is None else num_steps
    require(1 <= n <= self.steps_per_call, "num_steps", num_steps,
            f"must be in [1, steps_per_call={self.steps_per_call}]")
    return n

  def local_indices(self, first_step: int, num_steps: int | None = None) -> np.ndarray:
    """This process's global example indices, ``(steps_per_call, accum_steps, local_batch)``
    (rows past ``num_steps`` are 0 and never read)."""
    with self._order_lock:
      indices = self._order.call_indices(first_step, num_steps)
    return indices[:, :, self._start:self._start + self.local_batch]

  def _build(self, first_step: int, num_steps: int) -> Arrays:
    indices = self.local_indices(first_step, num_steps)[:num_steps]
    rows = list(self._readers.map(self._examples.__getitem__, indices.reshape(-1).tolist()))
    return _stack(rows, indices.shape, self.steps_per_call)

  def prefetch(self, first_step: int, num_steps: int | None = None) -> futures.Future:
    """Starts building the arrays of ``(first_step, num_steps)`` in the background.

    Returns the future of those arrays; the next ``__call__`` with the same steps takes
    them, a call with other steps builds its own.
    """
    n = self._num_steps(num_steps)
    if self._ahead is not None:
      self._ahead[1].cancel()
    self._ahead = ((first_step, n), self._builder.submit(self._build, first_step, n))
    return self._ahead[1]

  def __call__(self, first_step: int, num_steps: int | None = None) -> Arrays:
    """The arrays of steps ``first_step .. first_step + num_steps - 1`` (default K).

    Returns:
      name -> array of shape ``(steps_per_call, accum_steps, local_batch, *example_shape)``,
      rows past ``num_steps`` zero (the compiled call has a fixed K).
    """
    n = self._num_steps(num_steps)
    ahead, self._ahead = self._ahead, None
    start = self._clock()
    if ahead is not None and ahead[0] == (first_step, n):
      arrays = ahead[1].result()
    else:
      if ahead is not None:
        ahead[1].cancel()
      arrays = self._build(first_step, n)
    self.last_wait_seconds = self._clock() - start
    self.wait_seconds += self.last_wait_seconds
    return arrays

  def close(self) -> None:
    """Stops the reader and prefetch threads (a pending prefetch is dropped)."""
    if self._ahead is not None:
      self._ahead[1].cancel()
      self._ahead = None
    self._builder.shutdown(wait=True, cancel_futures=True)
    self._readers.shutdown(wait=True, cancel_futures=True)

  def __enter__(self) -> HostFeed:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def eval_batches(source: Sequence[Any], transform: Transform | None, *, chunk: int,
                 process_index: int = 0, process_count: int = 1,
                 fields: Mapping[str, str] | None = None, num_threads: int = 8,
                 limit: int | None = None) -> Iterator[tuple[Arrays, np.ndarray]]:
  """The whole of ``source`` (or its first ``limit`` examples) in order, in chunks of
  ``chunk`` examples, this process's part.

  Each chunk is split like a micro-batch: process ``p`` takes its contiguous slice of
  ``chunk // process_count``. The last chunk is padded to full size: padding rows repeat
  example 0 with mask 0, so every process yields the same number of chunks. The next
  chunk is read while the caller uses the current one.

  Yields:
    (name -> array of shape ``(chunk // process_count, ...)``, float32 mask of 0/1).
  """
  require(chunk % process_count == 0, "chunk", chunk,
          f"must be a multiple of process_count={process_count}")
  local = chunk // process_count
  total = len(source) if limit is None else min(limit, len(source))
  examples = _examples(source, transform, fields)

  def read(pool: futures.ThreadPoolExecutor, c: int) -> tuple[Arrays, np.ndarray]:
    indices = np.arange(local) + c * chunk + process_index * local
    valid = indices < total
    rows = list(pool.map(examples.__getitem__, np.where(valid, indices, 0).tolist()))
    return _stack(rows, (local,), local), valid.astype(np.float32)

  num_chunks = -(-total // chunk)
  with (futures.ThreadPoolExecutor(num_threads, thread_name_prefix="eval-read") as pool,
        futures.ThreadPoolExecutor(1, thread_name_prefix="eval-prefetch") as ahead):
    pending = ahead.submit(read, pool, 0) if num_chunks else None
    for c in range(num_chunks):
      current = pending.result()
      if c + 1 < num_chunks:
        pending = ahead.submit(read, pool, c + 1)
      yield current

"""Placing embedded datasets on a mesh: the train set on every device, the test set padded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, Sharding

from batchbench.core.mesh import batch_sharding, replicated
from batchbench.data.arrays import MASK

EVAL_CHUNK = 4096


def put(tree: Any, sharding: Sharding) -> Any:
  """``jax.device_put(tree, sharding)`` for values every process holds whole.

  On one process that is ``device_put``. On several, ``sharding`` spans devices this
  process cannot address, so each leaf is assembled with ``make_array_from_callback``
  from this process's copy (each process places the parts its devices hold); PRNG key
  arrays travel as their key data.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: _put_global(x, sharding), tree)


def _put_global(x: Any, sharding: Sharding) -> jax.Array:
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = _put_global(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_train_data(train: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Puts every training array on every device of ``mesh`` (replicated)."""
  return put(dict(train), replicated(mesh))


def abstract_train_data(train: Mapping[str, np.ndarray],
                        mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """``put_train_data``'s shapes, dtypes and shardings, without placing anything."""
  sharding = replicated(mesh)
  return {k: jax.ShapeDtypeStruct(a.shape, jax.dtypes.canonicalize_dtype(a.dtype),
                                  sharding=sharding) for k, a in train.items()}


def eval_chunks(test: Mapping[str, np.ndarray], num_devices: int,
                chunk: int = EVAL_CHUNK) -> dict[str, np.ndarray]:
  """The test set as ``(n_chunks, chunk, ...)`` arrays plus a 0/1 ``mask``.

  The chunk is a multiple of the device count so that each chunk splits evenly
  over the data axis; padded examples have mask 0 and count in no metric.
  """
  n = len(next(iter(test.values())))
  if n == 0:
    raise ValueError("the test set is empty: an embedded dataset needs test examples to "
                     "evaluate (ArrayData.test)")
  chunk = -(-min(chunk, n) // num_devices) * num_devices
  n_chunks = -(-n // chunk)
  pad = n_chunks * chunk - n
  out = {}
  for name, a in {**test, MASK: np.ones(n, np.float32)}.items():
    padded = np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
    out[name] = padded.reshape(n_chunks, chunk, *a.shape[1:])
  return out


def put_eval_data(test: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """``eval_chunks`` of the test set, examples sharded over the data axis."""
  return put(eval_chunks(test, mesh.devices.size), batch_sharding(mesh, leading=1))

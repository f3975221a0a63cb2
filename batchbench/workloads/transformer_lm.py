"""``transformer_lm``: a decoder-only Transformer over byte tokens, with a bits-per-byte target.

Importing this module registers the workload. The model is ``models.transformer.
TransformerLM`` (pre-LayerNorm, tied embeddings, dropout from the step's key in training
only). Three sources (the ``data`` option):

* ``"pysrc"`` (default, offline): the running Python's standard library sources as bytes
  (``data.pysrc.stdlib_corpus``, a deterministic split by file, cached), capped at
  ``max_bytes``. The train stream is placed on every device once and each step cuts its
  windows from it on the device (``gather``): example ``i`` is the ``seq_len + 1`` tokens
  from offset ``i * seq_len`` (``data.text``); ``train_size`` is the number of full
  windows. The test set is the first ``num_test`` windows of the test stream.
* ``"tfds"``: a TFDS text dataset read on the host (``tfds_name``, default ``lm1b``), one
  example per text, byte-tokenised and padded to a window (``data.text.byte_window``);
  ``weights`` marks the real targets. The sources open only when the harness calls
  ``host_data``.
* ``"synthetic"``: uniform random tokens drawn on the device, for throughput only.

A batch is ``{"inputs", "targets"}`` (int32, (batch, seq_len); plus ``"weights"`` for
tfds) and the harness's ``mask``. An example's loss is the mean cross-entropy (nats) over
its targets; the harness sums it over examples. Metrics: ``loss`` and ``bpb``, bits per
byte = loss / ln 2 (one token is one byte). Tokens per example: ``seq_len``
(``tokens_per_example(workload)``); ``flops_per_example`` is
``transformer_flops_per_token x seq_len``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from batchbench.config.errors import require
from batchbench.data import pysrc, text
from batchbench.data.arrays import MASK, ArrayData
from batchbench.data.host import open_source
from batchbench.models.transformer import TransformerLM, transformer_flops_per_token
from batchbench.workloads.base import (HostData, LossOutput, Metric, Target, Workload,
                                       register_workload,
                                       tokens_per_example)  # noqa: F401  (re-exported)
from batchbench.workloads.options import choice, compute_dtype

LM_METRICS = {"bpb": Metric(0.0, float("inf"), "min"),
              "loss": Metric(0.0, float("inf"), "min")}
VOCAB_SIZE = 256  # byte tokens
# The default corpus cap: the first 4 MB of the stdlib's train split (and 400 kB of its
# test split), enough for many epochs of a few-minute CPU run without placing the whole
# 30 MB stream on every device (README, Workloads).
DEFAULT_MAX_BYTES = 4_000_000
# Set by measurement of configs/transformer_lm.py (README, Workloads): on a 2-core CPU
# (2026-12-02) its trial passed 2.7 bpb at step 600 (19,200 examples, 226 s of training,
# 92 samples/s), with 2.64 there and 2.50 at step 700.
PYSRC_TARGET = Target("bpb", 2.7, "min")
# Training texts of TFDS datasets whose size is known without opening them.
TFDS_TRAIN_SIZES = {"lm1b": 30_301_028}
LN2 = math.log(2.0)


@functools.lru_cache(maxsize=4)
def _pysrc_streams(cache_dir: str | None, max_bytes: int | None) -> tuple[np.ndarray, np.ndarray]:
  train, test, _ = pysrc.stdlib_corpus(cache_dir=cache_dir, max_bytes=max_bytes)
  return train, test


def _example_losses(logits: jax.Array, batch) -> jax.Array:
  """Mean cross-entropy (nats) over each example's targets (weighted when given)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  weights = batch.get("weights")
  if weights is None:
    return jnp.mean(losses, axis=-1)
  return jnp.sum(losses * weights, axis=-1) / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)


def lm_functions(model: TransformerLM):
  """``(init, loss, eval_sums)`` of a next-token LM workload around ``model``."""
  def init(rng, batch_spec):
    tokens = jnp.zeros(batch_spec["inputs"].shape, jnp.int32)
    variables = dict(model.init({"params": rng}, tokens, train=False))
    return variables.pop("params"), variables

  def loss(params, model_state, batch, rng):
    logits = model.apply({"params": params}, batch["inputs"].astype(jnp.int32), train=True,
                         rngs={"dropout": rng})
    mask = batch[MASK]
    return LossOutput(jnp.sum(_example_losses(logits, batch) * mask), jnp.sum(mask),
                      model_state)

  def eval_sums(params, model_state, batch):
    del model_state
    logits = model.apply({"params": params}, batch["inputs"].astype(jnp.int32), train=False)
    mask = batch[MASK]
    loss_sum = jnp.sum(_example_losses(logits, batch) * mask)
    return {"loss": loss_sum, "bpb": loss_sum / LN2, "count": jnp.sum(mask)}

  return init, loss, eval_sums


def pysrc_data(seq_len: int, max_bytes: int | None, num_test: int | None,
               cache_dir: str | None):
  """``(data, gather, train_size)`` for the stdlib corpus cut into windows of ``seq_len``.

  The train stream is stored as a single row, ``{"tokens": (1, length) uint8}``: its
  windows are not rows of it (``gather`` cuts them), and ``ArrayData`` counts rows as
  examples, so the harness does not take its first rows for a train-split eval.
  """
  train, test = _pysrc_streams(cache_dir, max_bytes)
  train_size = text.num_windows(len(train), seq_len)
  require(train_size >= 1, "workload_options.max_bytes", max_bytes,
          f"the train stream ({len(train)} bytes) must hold a window of seq_len + 1 = "
          f"{seq_len + 1} tokens")
  require(text.num_windows(len(test), seq_len) >= 1, "workload_options.max_bytes", max_bytes,
          f"the test stream ({len(test)} bytes) must hold a window of {seq_len + 1} tokens")

  def data() -> ArrayData:
    return ArrayData({"tokens": train[None, :]}, text.windows(test, seq_len, num_test))

  def gather(train_arrays, indices):
    stream = train_arrays["tokens"][0]
    return text.split_window(stream[text.window_offsets(indices, seq_len, jnp)], jnp)

  return data, gather, train_size


def tfds_host_data(name: str, seq_len: int, text_field: str, data_dir: str | None,
                   train_split: str, test_split: str):
  """``() -> HostData`` for a TFDS text dataset, one byte window per text; opens on call."""
  def host_data() -> HostData:
    train = open_source(name, train_split, data_dir)
    test = open_source(name, test_split, data_dir)
    return HostData(train=train, test=test, num_train=len(train),
                    transform=text.byte_window(seq_len, "text"), fields={text_field: "text"})
  return host_data


@register_workload("transformer_lm")
def transformer_lm(data: str = "pysrc", seq_len: int = 128, d_model: int = 128,
                   num_layers: int = 4, num_heads: int = 4, d_ff: int = 512,
                   dropout_rate: float = 0.1, dtype: str = "float32", remat: bool = False,
                   max_bytes: int | None = DEFAULT_MAX_BYTES, num_test: int | None = 256,
                   cache_dir: str | None = None, tfds_name: str = "lm1b",
                   text_field: str = "text", data_dir: str | None = None,
                   train_split: str = "train", test_split: str = "test") -> Workload:
  """A byte-level decoder-only Transformer LM.

  Args:
    data: ``"pysrc"`` (stdlib sources, offline), ``"tfds"`` or ``"synthetic"``.
    seq_len: tokens per example (the model's context).
    d_model, num_layers, num_heads, d_ff: model size (tiny values for tests).
    dropout_rate: dropout in training (embeddings, attention weights, residual branches).
    dtype: compute dtype, ``"float32"`` or ``"bfloat16"``; parameters stay float32.
    remat: recompute each block on the backward pass (``jax.checkpoint``).
    max_bytes: pysrc: cap on the train stream (test: ``max_bytes // 10``); None: all.
    num_test: pysrc: test windows evaluated (None: every full window of the test stream).
    cache_dir: pysrc: where the corpus is cached (default ``~/.cache/batchbench``).
    tfds_name, text_field, data_dir, train_split, test_split: tfds: the dataset, the
      feature holding the text, TFDS's data directory and the splits.
  """
  choice("data", data, ("pysrc", "tfds", "synthetic"))
  require(isinstance(seq_len, int) and seq_len >= 1, "workload_options.seq_len", seq_len,
          "must be a positive integer")
  model = TransformerLM(vocab_size=VOCAB_SIZE, d_model=d_model, num_layers=num_layers,
                        num_heads=num_heads, d_ff=d_ff, max_len=seq_len,
                        dropout_rate=dropout_rate, dtype=compute_dtype(dtype),
                        remat=bool(remat))
  init, loss, eval_sums = lm_functions(model)
  tokens = jax.ShapeDtypeStruct((seq_len,), jnp.int32)
  example_spec = {"inputs": tokens, "targets": tokens}
  common = dict(name="transformer_lm", init=init, loss=loss, eval_sums=eval_sums,
                metrics=LM_METRICS, reference_batch=32,
                flops_per_example=transformer_flops_per_token(model, seq_len) * seq_len)

  if data == "synthetic":
    def synthetic_batch(rng, n):
      k_in, k_out = jax.random.split(rng)
      return {"inputs": jax.random.randint(k_in, (n, seq_len), 0, VOCAB_SIZE, jnp.int32),
              "targets": jax.random.randint(k_out, (n, seq_len), 0, VOCAB_SIZE, jnp.int32)}
    return Workload(example_spec=example_spec, data=None, train_size=None, target=None,
                    synthetic_batch=synthetic_batch, **common)
  if data == "tfds":
    example_spec["weights"] = jax.ShapeDtypeStruct((seq_len,), jnp.float32)
    host_data = tfds_host_data(tfds_name, seq_len, text_field, data_dir, train_split,
                               test_split)
    return Workload(example_spec=example_spec, data=None, host_data=host_data,
                    train_size=TFDS_TRAIN_SIZES.get(tfds_name), target=None, **common)
  arrays, gather, train_size = pysrc_data(seq_len, max_bytes, num_test, cache_dir)
  return Workload(example_spec=example_spec, data=arrays, gather=gather,
                  train_size=train_size, target=PYSRC_TARGET, **common)

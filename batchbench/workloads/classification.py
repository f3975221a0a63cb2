"""Softmax cross-entropy classification around any Flax module that maps inputs to logits."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from batchbench.data.arrays import MASK, ArrayData
from batchbench.workloads.base import HostData, LossOutput, Metric, Target, Workload

CLASSIFICATION_METRICS = {
    "accuracy": Metric(0.0, 1.0, "max"),
    "loss": Metric(0.0, float("inf"), "min"),
}


def classification_workload(name: str, *, model: nn.Module, input_shape: tuple[int, ...],
                            num_classes: int, data: Callable[[], ArrayData] | None,
                            train_size: int | None = None, target: Target | None = None,
                            reference_batch: int = 32, input_dtype=jnp.float32,
                            train_flag: bool = False,
                            host_data: Callable[[], HostData] | None = None) -> Workload:
  """Builds a softmax cross-entropy classification workload around a Flax module.

  Batches are ``{"inputs", "labels", "mask"}``. Variables other than ``params``
  (e.g. ``batch_stats``) are the model state: updated by the loss (``mutable``),
  read by evaluation. Dropout, if the module has any, gets the step's key as its
  ``dropout`` stream.

  Args:
    name: registry name.
    model: a Flax linen module mapping a batch of inputs to logits.
    input_shape: shape of one example.
    num_classes: number of classes.
    data: returns the dataset (``ArrayData.classification``); None (and no
      ``host_data``) for synthetic inputs generated on the device (normal inputs,
      uniform labels).
    train_size: training-set size if known without loading ``data`` (used to
      validate batch sizes before anything runs).
    target: default target (metric ``accuracy`` or ``loss``), or None.
    reference_batch: batch at which the default learning rate was tuned.
    input_dtype: dtype of an input.
    train_flag: the module's ``__call__`` takes ``train: bool`` (BatchNorm, dropout).
    host_data: instead of ``data``, a dataset read on the host per process
      (``HostData`` whose transform yields ``inputs`` and ``labels``).

  Returns:
    The workload.
  """
  example_spec = {"inputs": jax.ShapeDtypeStruct(tuple(input_shape), input_dtype),
                  "labels": jax.ShapeDtypeStruct((), jnp.int32)}

  def init(rng, batch_spec):
    x = jnp.zeros(batch_spec["inputs"].shape, batch_spec["inputs"].dtype)
    kwargs = {"train": False} if train_flag else {}
    variables = dict(model.init(rng, x, **kwargs))
    params = variables.pop("params")
    return params, variables

  def apply(params, model_state, x, train: bool, rng=None):
    variables = {"params": params, **model_state}
    kwargs = {"train": train} if train_flag else {}
    if train and model_state:
      logits, new_state = model.apply(variables, x, mutable=list(model_state),
                                      rngs={"dropout": rng}, **kwargs)
      return logits, dict(new_state)
    rngs = {"dropout": rng} if train else {}
    return model.apply(variables, x, rngs=rngs, **kwargs), model_state

  def loss(params, model_state, batch, rng):
    logits, new_state = apply(params, model_state, batch["inputs"], True, rng)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return LossOutput(jnp.sum(losses * batch[MASK]), jnp.sum(batch[MASK]), new_state)

  def eval_sums(params, model_state, batch):
    logits, _ = apply(params, model_state, batch["inputs"], False)
    mask = batch[MASK]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return {"loss": jnp.sum(losses * mask), "accuracy": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}

  def synthetic_batch(rng, n):
    kx, ky = jax.random.split(rng)
    shape = (n, *input_shape)
    if jnp.issubdtype(input_dtype, jnp.integer):
      x = jax.random.randint(kx, shape, 0, num_classes, input_dtype)
    else:
      x = jax.random.normal(kx, shape, input_dtype)
    return {"inputs": x, "labels": jax.random.randint(ky, (n,), 0, num_classes)}

  return Workload(name=name, init=init, loss=loss, eval_sums=eval_sums,
                  metrics=CLASSIFICATION_METRICS, example_spec=example_spec, data=data,
                  train_size=train_size, target=target, reference_batch=reference_batch,
                  host_data=host_data,
                  synthetic_batch=(None if data is not None or host_data is not None
                                   else synthetic_batch))

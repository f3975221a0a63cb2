"""The programs: a train call of up to K steps with gradient accumulation, and eval.

One *train call* runs ``num_steps`` optimizer steps, a runtime value up to its
compiled maximum K (``steps_per_call``), in a ``lax.fori_loop``, so that small
models are not bound by Python dispatch, while a trial can still stop at any step
(an eval, the budget, a checkpoint) with the same executable the throughput phase
runs full. With K = 1 the call is the step itself, without a loop. Each step
accumulates gradients over ``accum_steps`` micro-batches (an inner ``lax.scan``; no
loop for one) of loss *sums*, divided by the total example count, so the
update equals the update on the whole global batch. The model state (BatchNorm
statistics) threads through the micro-batches; each micro-batch gets its own key,
``fold_in(fold_in(state.rng, step), i)``. Parameters are replicated and the batch
is sharded along the mesh's ``data`` axis; XLA inserts the gradient all-reduce
(and, for BatchNorm over the batch axis, the statistics' all-reduce: batch
statistics are global by default).

The gradient noise scale needs the squared norms of gradients over two batch
sizes (``analysis.noise``), taken at the steps that are multiples of ``gns_every``;
the steps between are the plain step, run in a loop of their own (``train_call``; with
one step per call, a separate compiled call that the host picks by step). They come
without a second gradient:

* ``micro_batches``: each accumulation micro-batch's gradient (B_small = the
  micro-batch) and the step's (B_big = the global batch);
* ``groups``: G groups of B/G examples, G a multiple of the devices. In
  ``jax.shard_map`` over the data axis each device computes its groups' gradients
  (with G = the number of devices, just its own share of the batch's gradient, as the
  plain step does) and their squared norms; one all-reduce sums both: the same FLOPs
  and communication as without. (XLA partitions the plain step itself; on CPU that
  ran a transformer's step 3-7% faster than the same step in ``shard_map``, one more
  reason why the unmeasured steps are plain.) Groups need a model without
  cross-example state (no BatchNorm statistics).

These functions only build Python callables; ``core.program`` compiles them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from batchbench.core.mesh import DATA_AXIS, batch_sharding
from batchbench.core.state import TrainState
from batchbench.data.arrays import MASK
from batchbench.workloads.base import Workload

# Synthetic inputs: this many micro-batches are drawn per compiled call and the steps
# cycle through them. Drawing with jax.random inside every step cost up to 28% of
# throughput on CPU (benchmarks/overhead.py); a per-call pool keeps the inputs
# changing from call to call at a cost amortised over the call's steps.
SYNTHETIC_POOL = 2
GNS_SOURCES = ("micro_batches", "groups")
# The per-step metrics of the noise scale's squared norms (NaN at unmeasured steps).
GNS_METRICS = ("grad_sq_small", "grad_sq_big")


def _constrain(tree: Any, sharding) -> Any:
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)


def _take_rows(arrays, idx):
  return {name: a[idx] for name, a in arrays.items()}


def _sq_norm(tree: Any) -> jax.Array:
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def micro_batches(workload: Workload, mesh: Mesh, micro_batch: int):
  """Returns ``(prepare, get)`` for the micro-batches of a call.

  ``prepare(data, feed, rng)`` runs once per call and returns what ``get(prepared,
  micro_feed) -> batch`` reads: the device-resident training set, or a pool of
  synthetic micro-batches drawn from the call's first key. ``micro_feed`` is the
  micro-batch's example indices (embedded data), its integer key (synthetic), or the
  micro-batch itself (host data, read by the host pipeline).
  """
  sharding = batch_sharding(mesh)
  if workload.source == "host":
    def prepare(data, feed, rng):
      del data, rng
      return None

    def get(prepared, micro_batch_arrays):
      del prepared
      batch = dict(micro_batch_arrays)
      batch[MASK] = jnp.ones((micro_batch,), jnp.float32)
      return _constrain(batch, sharding)
  elif workload.synthetic:
    def prepare(data, feed, rng):
      del data
      pool = workload.synthetic_batch(jax.random.fold_in(rng, feed[0, 0]),
                                      SYNTHETIC_POOL * micro_batch)
      pool = jax.tree.map(lambda a: a.reshape(SYNTHETIC_POOL, micro_batch, *a.shape[1:]),
                          pool)
      return _constrain(pool, batch_sharding(mesh, leading=1))

    def get(pool, key):
      batch = {name: a[key % SYNTHETIC_POOL] for name, a in pool.items()}
      batch[MASK] = jnp.ones((micro_batch,), jnp.float32)
      return _constrain(batch, sharding)
  else:
    gather = workload.gather or _take_rows

    def prepare(data, feed, rng):
      del feed, rng
      return data

    def get(data, idx):
      batch = dict(gather(data, idx))
      batch[MASK] = jnp.ones(idx.shape, jnp.float32)
      return _constrain(batch, sharding)
  return prepare, get


def make_train_call(workload: Workload, mesh: Mesh, tx: optax.GradientTransformation, *,
                    micro_batch: int, gns: str | None = None, gns_groups: int = 1,
                    gns_every: int = 1, measured: bool | None = None,
                    traces: list[int] | None = None):
  """The un-jitted train call ``(state, data, feed, num_steps) -> (state, metrics)``.

  ``feed`` is ``(K, accum, micro_batch)`` example indices for an embedded dataset,
  ``(K, accum)`` integer keys for synthetic inputs, or a dict of ``(K, accum,
  micro_batch, ...)`` arrays for host data; only its first ``num_steps`` rows are read.
  ``metrics`` are per-step arrays of length K (rows past ``num_steps`` are 0): ``loss``,
  and with ``gns`` the squared gradient norms ``grad_sq_small`` (mean
  over groups or micro-batches) and ``grad_sq_big`` (the step's gradient), measured at
  the steps that are multiples of ``gns_every`` and NaN at the others. With one step
  per call (K = 1) and ``gns_every`` > 1 there is no loop to split, and a ``lax.cond``
  around the step ran convolution gradients several times slower on CPU: the caller
  builds two calls, ``measured=False`` and ``measured=True``, and runs the measured one
  at the measured steps (``core.program.Program.run``). The plain call returns ``loss``
  alone: two more outputs per call cost the 1-D CNN's 4 ms step about 2% on CPU (8
  devices, a buffer per device each).
  ``traces`` gets an entry each time the body is traced (once for a good program).
  """
  if gns not in (None, *GNS_SOURCES):
    raise ValueError(f"gns={gns!r}: must be None or one of {GNS_SOURCES}")
  prepare, get = micro_batches(workload, mesh, micro_batch)
  groups = gns_groups if gns == "groups" else 1

  devices = mesh.shape[DATA_AXIS]
  if groups > 1 and groups % devices:
    raise ValueError(f"gns_groups={groups}: must be a multiple of the {devices} devices")
  local_groups = groups // devices

  def loss_fn(params, model_state, batch, rng):
    out = workload.loss(params, model_state, batch, rng)
    return out.loss_sum, out

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def plain_grad(params, model_state, batch, key):
    (_, out), g = grad_fn(params, model_state, batch, key)
    return g, out.loss_sum, out.count, out.model_state, jnp.float32(0.0)

  def split_grads(params, model_state, batch, key, first):
    """Gradient sum, loss sum, count and sum of squared mean-gradient norms of
    ``local_groups`` slices of ``batch``, one ordinary gradient after another (no
    ``vmap``: batched matrix products ran the digits step 40% slower on CPU,
    benchmarks/gns_cost.py); ``first`` numbers the first slice's key."""
    size = jax.tree.leaves(batch)[0].shape[0] // local_groups
    total, loss_sum, count, sq = None, 0.0, 0.0, 0.0
    for j in range(local_groups):
      part = jax.tree.map(lambda a, j=j: a[j * size:(j + 1) * size], batch)
      (_, out), g = grad_fn(params, model_state, part, jax.random.fold_in(key, first + j))
      total = g if total is None else jax.tree.map(jnp.add, total, g)
      loss_sum, count = loss_sum + out.loss_sum, count + out.count
      sq = sq + _sq_norm(g) / jnp.square(out.count)
    return total, loss_sum, count, sq

  def device_groups(params, model_state, batch, key):
    """On one device (inside ``shard_map``): its groups, then one all-reduce of their
    gradients' sum, as the plain step's, and of the norms."""
    # The parameters vary by device from here, so each gradient stays this device's own
    # (differentiating invariant parameters would all-reduce it).
    params = jax.lax.pcast(params, DATA_AXIS, to="varying")
    first = jax.lax.axis_index(DATA_AXIS) * local_groups
    return jax.lax.psum(split_grads(params, model_state, batch, key, first), DATA_AXIS)

  if devices == 1:  # nothing to all-reduce (in shard_map the split step ran ~5% slower)
    local = lambda params, model_state, batch, key: split_grads(
        params, model_state, batch, key, 0)
  else:
    local = jax.shard_map(device_groups, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS), P()),
                          out_specs=P())

  def group_grads(params, model_state, batch, key):
    total, loss_sum, count, sq = local(params, model_state, batch, key)
    return total, loss_sum, count, model_state, sq

  def train_step(state: TrainState, data, step_feed, measure: bool):
    """One optimizer step; ``measure`` (a Python bool: two traces) adds the norms."""
    step_key = jax.random.fold_in(state.rng, state.step)
    grad = group_grads if measure and groups > 1 else plain_grad

    def accumulate(carry, xs):
      grads, loss_sum, count, model_state, sq_small = carry
      i, micro_feed = xs
      batch = get(data, micro_feed)
      g, micro_loss, micro_count, model_state, group_sq = grad(
          state.params, model_state, batch, jax.random.fold_in(step_key, i))
      if measure and gns == "micro_batches":
        group_sq = _sq_norm(g) / jnp.square(micro_count)
      return (jax.tree.map(jnp.add, grads, g), loss_sum + micro_loss, count + micro_count,
              model_state, sq_small + group_sq), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    accum = jax.tree.leaves(step_feed)[0].shape[0]
    carry = (zeros, 0.0, 0.0, state.model_state, 0.0)
    if accum == 1:  # no loop (see train_call: convolution gradients in loop bodies)
      (grads, loss_sum, count, model_state, sq_small), _ = accumulate(
          carry, (jnp.int32(0), jax.tree.map(lambda a: a[0], step_feed)))
    else:
      (grads, loss_sum, count, model_state, sq_small), _ = jax.lax.scan(
          accumulate, carry, (jnp.arange(accum), step_feed))
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state)
    metrics = {"loss": loss_sum / count}
    if gns is not None and measured is not False:  # the plain call of K = 1: no norms
      nan = jnp.float32(jnp.nan)
      metrics["grad_sq_small"] = sq_small / (accum * groups) if measure else nan
      metrics["grad_sq_big"] = _sq_norm(grads) if measure else nan
    return new_state, metrics

  def train_call(state: TrainState, data, feed, num_steps):
    if traces is not None:
      traces.append(1)
    prepared = prepare(data, feed, state.rng)
    k = jax.tree.leaves(feed)[0].shape[0]
    row = lambda i: jax.tree.map(lambda a: a[i], feed)  # step i's feed
    shapes = jax.eval_shape(lambda s: train_step(s, prepared, row(0), False)[1], state)
    buffers = jax.tree.map(lambda s: jnp.zeros((k, *s.shape), s.dtype), shapes)

    def body(measure: bool):
      def run(i, carry):
        state, buffers = carry
        state, metrics = train_step(state, prepared, row(i), measure)
        return state, jax.tree.map(lambda b, m: b.at[i].set(m), buffers, metrics)
      return run

    carry = (state, buffers)
    every = gns_every if gns is not None else 0  # 0: no step is measured
    if k == 1:
      # One step per call (the caller never asks for 0): no loop. XLA on CPU compiles
      # convolution gradients inside a loop body many times slower than outside one
      # (jax-ml/jax#12868; benchmarks/real_workloads.py), so conv models run K = 1.
      del num_steps
      if every <= 1:
        return body(every == 1)(0, carry)
      if measured is None:
        raise ValueError(f"one step per call with gns_every={every}: build a plain and a "
                         "measured call (measured=False, measured=True)")
      return body(measured)(0, carry)
    if every <= 1:
      return jax.lax.fori_loop(0, num_steps, body(every == 1), carry)
    # The measured steps (global step a multiple of ``every``) are taken out of the loop
    # of plain steps: the call is a loop over the blocks of ``every`` steps it touches,
    # each the block's first step, measured (when the call has it: a loop of 0 or 1
    # trips), then a loop of the block's plain steps. On CPU (digits, one device, 2
    # groups, one step in 8) a ``lax.cond`` per step between the two cost 4-7%, a
    # ``lax.cond`` per block on the measured step 4%, and this about 1%.
    s0 = state.step
    q = s0 // every

    def block(b, carry):
      start = (q + b) * every  # the block's first global step
      lo = jnp.maximum(start, s0) - s0
      hi = jnp.minimum(start + every, s0 + num_steps) - s0
      has_first = start >= s0
      mid = lo + has_first.astype(lo.dtype)
      carry = jax.lax.fori_loop(lo, mid, body(True), carry)
      return jax.lax.fori_loop(mid, hi, body(False), carry)

    blocks = (s0 + num_steps - 1) // every - q + 1
    return jax.lax.fori_loop(0, blocks, block, carry)

  return train_call


def make_eval_call(workload: Workload, traces: list[int] | None = None):
  """``(params, model_state, eval_data) -> {metric: sum}`` over every eval chunk.

  ``eval_data`` is ``data.placement.put_eval_data``'s ``(n_chunks, chunk, ...)``
  arrays with their mask; padded examples count in no sum.
  """
  def eval_call(params, model_state, eval_data):
    if traces is not None:
      traces.append(1)

    def chunk(total, batch):
      sums = workload.eval_sums(params, model_state, batch)
      return jax.tree.map(jnp.add, total, sums), None

    first = {name: a[0] for name, a in eval_data.items()}
    shapes = jax.eval_shape(lambda: workload.eval_sums(params, model_state, first))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.scan(chunk, zeros, eval_data)[0]

  return eval_call


def make_forward_call(workload: Workload, traces: list[int] | None = None):
  """``(params, model_state, batch) -> {metric: sum}``: one forward pass (inference)."""
  def forward(params, model_state, batch):
    if traces is not None:
      traces.append(1)
    return workload.eval_sums(params, model_state, batch)

  return forward

"""Mesh, train state, and the step factory: jitted, sharded, donated, AOT-compiled.

One compiled *train call* runs ``steps_per_call`` optimizer steps (a ``lax.scan``)
so small models are not bound by Python dispatch; each step accumulates
gradients over ``accum_steps`` micro-batches (an inner ``lax.scan``) of loss
*sums*, divided by the total example count, so the update equals the update on
the whole global batch. Parameters are replicated and the batch is sharded along
the mesh's ``data`` axis; XLA inserts the gradient all-reduce.

The step is compiled ahead of time (``lower().compile()``) so compile seconds,
memory and FLOPs are known before anything is timed, and a trial can never
recompile: the compiled object only accepts the shapes it was built for.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from batchbench import scaling
from batchbench.config import TrialSpec
from batchbench.data.device import (DATA_AXIS, EpochIndexFeeder, LookaheadFeed, feed_sharding,
                                    replicated)
from batchbench.workloads.base import Workload


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  rng: jax.Array  # key for synthetic inputs


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D ``data`` mesh over the first ``num_devices`` devices (default: all).

  Built as a plain ``Mesh`` so the axis type is Auto: ``jax.make_mesh`` now
  defaults to Explicit axes, under which sharding propagation is stricter.
  """
  devices = jax.devices()
  num_devices = num_devices or len(devices)
  return Mesh(np.array(devices[:num_devices]), (DATA_AXIS,))


def make_optimizer(spec: TrialSpec) -> optax.GradientTransformation:
  """The optimizer with the trial's warmup/decay schedule around its peak LR."""
  schedule = scaling.make_schedule(spec.lr, spec.warmup_steps, spec.schedule, spec.max_steps)
  if spec.optimizer == "sgd":
    sgd = optax.sgd(schedule, momentum=spec.momentum or None)
    if spec.weight_decay:
      return optax.chain(optax.add_decayed_weights(spec.weight_decay), sgd)
    return sgd
  if spec.optimizer == "adam":
    return optax.adam(schedule)
  return optax.adamw(schedule, weight_decay=spec.weight_decay)


def init_state(workload: Workload, spec: TrialSpec, mesh: Mesh,
               tx: optax.GradientTransformation) -> TrainState:
  """Initialises the train state from the trial seed, replicated over ``mesh``.

  Runs eagerly rather than under ``jit``: a jitted init would be compiled anew for
  every trial (its closure differs), costing more than the op-by-op init of the
  small models here once JAX has warmed its primitive caches.
  """
  init_key, data_key = jax.random.split(jax.random.key(spec.seed))
  params = workload.init(init_key)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=data_key)
  return jax.device_put(state, replicated(mesh))


def _memory_analysis(compiled) -> dict[str, int | None]:
  """XLA's byte counts for a compiled program (per device).

  ``peak_bytes`` is argument + output + temp - alias (on CPU the runtime's own
  ``peak_memory_in_bytes`` omits temporaries, so it is computed from the parts).
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (backends may not implement it)
    m = None
  if m is None:
    return {k: None for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
                              "generated_code_bytes", "peak_bytes")}
  out = {"argument_bytes": int(m.argument_size_in_bytes),
         "output_bytes": int(m.output_size_in_bytes),
         "alias_bytes": int(m.alias_size_in_bytes),
         "temp_bytes": int(m.temp_size_in_bytes),
         "generated_code_bytes": int(m.generated_code_size_in_bytes)}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                       - out["alias_bytes"])
  return out


def _flops(lowered) -> float | None:
  try:
    cost = lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


@dataclasses.dataclass
class CompiledCall:
  """An AOT-compiled function with what compiling it told us."""

  fn: Callable[..., Any]
  compile_s: float
  memory: dict[str, int | None]
  traces: list[int]  # one counter, incremented each time the Python body is traced

  def __call__(self, *args):
    return self.fn(*args)


def _aot(fn, args, in_shardings, out_shardings, traces: list[int],
         donate=()) -> CompiledCall:
  start = time.perf_counter()
  lowered = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                    donate_argnums=donate).lower(*args)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  return CompiledCall(compiled, seconds, _memory_analysis(compiled), traces)


# Synthetic inputs: this many micro-batches are drawn per compiled call and the
# steps cycle through them. Drawing with jax.random inside every step cost up to 28%
# of throughput on CPU (benchmarks/overhead.py); a per-call pool keeps the inputs
# changing from call to call at a cost amortised over the call's steps.
SYNTHETIC_POOL = 2


def _batch_fn(workload: Workload, spec: TrialSpec, mesh: Mesh):
  """Returns ``(prepare, get_batch)`` for one micro-batch.

  ``prepare(data, feed, rng)`` runs once per call and returns what ``get_batch(
  prepared, step_input) -> (x, y, mask)`` reads: the device-resident dataset, or a
  pool of synthetic micro-batches drawn from the call's first key.
  """
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
  pool_sharding = NamedSharding(mesh, P(None, DATA_AXIS))
  micro = spec.micro_batch

  def constrain(sharding, *arrays):
    return tuple(jax.lax.with_sharding_constraint(a, sharding) for a in arrays)

  if workload.synthetic:
    def prepare(data, feed, rng):
      del data
      kx, ky = jax.random.split(jax.random.fold_in(rng, feed[0, 0]))
      shape = (SYNTHETIC_POOL, micro)
      x = jax.random.normal(kx, (*shape, *workload.input_shape), workload.input_dtype)
      y = jax.random.randint(ky, shape, 0, workload.num_classes)
      return constrain(pool_sharding, x, y)

    def get_batch(pool, key):
      x, y = pool
      i = key % SYNTHETIC_POOL
      return constrain(batch_sharding, x[i], y[i], jnp.ones((micro,), jnp.float32))
  else:
    def prepare(data, feed, rng):
      del feed, rng
      return data

    def get_batch(data, idx):
      train_x, train_y = data
      return constrain(batch_sharding, train_x[idx], train_y[idx],
                       jnp.ones(idx.shape, jnp.float32))
  return prepare, get_batch


def make_train_call(workload: Workload, spec: TrialSpec, mesh: Mesh,
                    tx: optax.GradientTransformation, traces: list[int]):
  """The un-jitted train call: ``(state, data, feed) -> (state, losses[K], eval_params)``.

  ``feed`` is ``(K, accum, micro)`` example indices for an embedded dataset, or
  ``(K, accum)`` integer keys for synthetic inputs (the call draws a pool of
  ``SYNTHETIC_POOL`` micro-batches from its first key; key % pool picks one).

  ``eval_params`` is ``()`` unless the call spans several eval intervals
  (``spec.evals_per_call`` E > 1): then it is the parameters after each of the E
  intervals, stacked on a leading axis (the last equals the returned state's), for
  the trial to evaluate after the call, outside the timed region.
  """
  prepare, get_batch = _batch_fn(workload, spec, mesh)
  grad_fn = jax.value_and_grad(workload.loss, has_aux=True)

  def train_step(state: TrainState, data, step_feed):
    def accumulate(carry, micro_feed):
      grads, loss_sum, count = carry
      x, y, mask = get_batch(data, micro_feed)
      (micro_loss, micro_count), g = grad_fn(state.params, x, y, mask)
      return (jax.tree.map(jnp.add, grads, g), loss_sum + micro_loss,
              count + micro_count), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss_sum, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), step_feed)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, loss_sum / count

  evals = spec.evals_per_call

  def train_call(state: TrainState, data, feed):
    traces.append(1)
    prepared = prepare(data, feed, state.rng)
    steps = lambda s, f: jax.lax.scan(lambda s, f: train_step(s, prepared, f), s, f)
    if evals == 1:
      state, losses = steps(state, feed)
      return state, losses, ()

    def interval(s, f):
      s, losses = steps(s, f)
      return s, (losses, s.params)

    per_interval = feed.reshape(evals, feed.shape[0] // evals, *feed.shape[1:])
    state, (losses, params) = jax.lax.scan(interval, state, per_interval)
    return state, losses.reshape(-1), params

  return train_call


def feed_shape(workload: Workload, spec: TrialSpec) -> tuple[int, ...]:
  if workload.synthetic:
    return (spec.steps_per_call, spec.accum_steps)
  return (spec.steps_per_call, spec.accum_steps, spec.micro_batch)


def feed_sharding_for(workload: Workload, mesh: Mesh) -> NamedSharding:
  return replicated(mesh) if workload.synthetic else feed_sharding(mesh)


def compile_train_call(workload: Workload, spec: TrialSpec, mesh: Mesh,
                       tx: optax.GradientTransformation, state: TrainState,
                       data) -> CompiledCall:
  """Compiles the train call ahead of time for ``state`` and ``data``'s shapes.

  The state argument is donated. Memory figures are XLA's, per device.
  """
  traces: list[int] = []
  fn = make_train_call(workload, spec, mesh, tx, traces)
  repl = replicated(mesh)
  feed = jax.ShapeDtypeStruct(feed_shape(workload, spec), jnp.int32,
                              sharding=feed_sharding_for(workload, mesh))
  return _aot(fn, (state, data, feed), (repl, repl, feed.sharding), repl, traces,
              donate=(0,))


def flops_per_step(workload: Workload, spec: TrialSpec, mesh: Mesh,
                   tx: optax.GradientTransformation, state: TrainState, data) -> float | None:
  """XLA's FLOP count of one optimizer step, all devices together.

  XLA's cost analysis counts a loop body once, whatever its trip count, so the
  fused call cannot be used: this lowers (without compiling) one unsharded step
  with a single micro-batch and multiplies by ``accum_steps``.
  """
  one = dataclasses.replace(spec, steps_per_call=1, accum_steps=1,
                            global_batch=spec.micro_batch)
  fn = make_train_call(workload, one, make_mesh(1), tx, [])
  feed = jax.ShapeDtypeStruct(feed_shape(workload, one), jnp.int32)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), (state, data))
  flops = _flops(jax.jit(fn).lower(*abstract, feed))
  return None if flops is None else flops * spec.accum_steps


def compile_eval_call(workload: Workload, mesh: Mesh, params, eval_data,
                      evals_per_call: int = 1) -> CompiledCall:
  """Compiles ``(params, (x, y, mask)) -> {metric: sum}`` over all eval chunks.

  With ``evals_per_call`` E > 1 the call takes a train call's stacked eval
  parameters (a leading axis of E) and returns each metric's E sums.
  """
  traces: list[int] = []

  def eval_one(params, eval_data):
    def chunk(total, xym):
      sums = workload.eval_sums(params, *xym)
      return jax.tree.map(jnp.add, total, sums), None
    zeros = jax.eval_shape(lambda: workload.eval_sums(params, *(a[0] for a in eval_data)))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    return jax.lax.scan(chunk, zeros, eval_data)[0]

  def eval_call(params, eval_data):
    traces.append(1)
    if evals_per_call == 1:
      return eval_one(params, eval_data)
    return jax.lax.map(lambda p: eval_one(p, eval_data), params)

  repl = replicated(mesh)
  if evals_per_call > 1:
    params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct((evals_per_call, *jnp.shape(a)), a.dtype), params)
  return _aot(eval_call, (params, eval_data), (repl, eval_data[0].sharding), repl, traces)


def abstract_state(workload: Workload, spec: TrialSpec, mesh: Mesh,
                   tx: optax.GradientTransformation) -> TrainState:
  """``init_state``'s shapes, dtypes and shardings, computed without running it.

  A resumed trial restores its checkpoint onto this tree, so it must carry the
  same shardings as ``init_state``'s outputs.
  """
  shapes = jax.eval_shape(lambda: init_state(workload, spec, mesh, tx))
  sharding = replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      shapes)


def abstract_train_data(workload: Workload, mesh: Mesh,
                        arrays: Any = None) -> tuple[jax.ShapeDtypeStruct, ...]:
  """The shapes, dtypes and shardings of ``put_train_data``'s arrays, without placing them.

  With ``compile_train_call`` and ``abstract_state`` this compiles a train call
  (and reads its memory) without allocating anything on the devices.

  Args:
    workload: the workload; a synthetic one has no train data (returns ``()``).
    mesh: the mesh the data would be replicated over.
    arrays: the loaded ``ArrayData``, if the caller has it (else ``workload.data()``).

  Returns:
    ``(train_x, train_y)`` as ``ShapeDtypeStruct``s, or ``()``.
  """
  if workload.synthetic:
    return ()
  arrays = arrays if arrays is not None else workload.data()
  sharding = replicated(mesh)
  return tuple(jax.ShapeDtypeStruct(a.shape, jax.dtypes.canonicalize_dtype(a.dtype),
                                    sharding=sharding)
               for a in (arrays.train_x, arrays.train_y))


def compile_forward_call(workload: Workload, mesh: Mesh, params,
                         batch_size: int) -> CompiledCall:
  """Compiles the forward pass ``(params, x, y, mask) -> {metric: sum}`` for one batch.

  The forward pass is the workload's ``eval_sums`` (model apply plus loss and
  metric sums). Parameters are replicated and the batch is sharded along the
  ``data`` axis, so ``batch_size`` must be a multiple of the mesh size.
  """
  traces: list[int] = []

  def forward(params, x, y, mask):
    traces.append(1)
    return workload.eval_sums(params, x, y, mask)

  batch = NamedSharding(mesh, P(DATA_AXIS))
  args = (params,
          jax.ShapeDtypeStruct((batch_size, *workload.input_shape), workload.input_dtype,
                               sharding=batch),
          jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch),
          jax.ShapeDtypeStruct((batch_size,), jnp.float32, sharding=batch))
  repl = replicated(mesh)
  return _aot(forward, args, (repl, batch, batch, batch), repl, traces)


def make_feed(workload: Workload, spec: TrialSpec) -> LookaheadFeed:
  """Returns ``feed(first_step)``: the train call's inputs, as a host array.

  The same inputs as a trial's: example indices from ``EpochIndexFeeder`` (the
  global indices of a step depend only on the seed and the global batch, not on
  how it is split), or one integer key per (step, micro-batch) for synthetic data.
  The compiled call places the array with its input sharding, which costs a few
  microseconds where a ``jax.device_put`` per call costs about 60 (on CPU).
  ``feed.prefetch(step)`` builds a call's inputs ahead, while the device works.
  """
  k, accum = spec.steps_per_call, spec.accum_steps
  if workload.synthetic:
    def keys(first_step: int) -> np.ndarray:
      flat = np.arange(first_step * accum, (first_step + k) * accum, dtype=np.int64)
      return (flat.reshape(k, accum) % (2**31 - 1)).astype(np.int32)
    return LookaheadFeed(keys)
  return LookaheadFeed(
      EpochIndexFeeder(spec.train_size, spec.global_batch, accum, k, spec.seed).call_indices)

"""The one builder: spec -> mesh, optimizer, placed data, compiled train/eval calls.

Trial, the throughput phase, probe, decompose and the overhead benchmark all get
their compiled calls from ``build`` (or a ``ProgramCache`` around it), so the
sequence workload -> optimizer -> state -> data -> compiled calls exists once.

A ``Program`` is keyed by ``TrialSpec.program_key``: the learning rate and the
seed are runtime values (``Program.init_state(seed, lr)``), and so is the number of
steps a call runs (up to K), so one program serves every LR and seed of a batch,
its throughput phase and decompose's one-step update check. Calls are compiled ahead of time
(``lower().compile()``), so compile seconds, memory and FLOPs are known before
anything is timed, and a program can never recompile: the compiled object only
accepts the shapes it was built for.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from batchbench.config import TrialSpec
from batchbench.core import optim, steps
from batchbench.core.mesh import batch_sharding, make_mesh, replicated
from batchbench.core.state import TrainState
from batchbench.data import feed as feed_lib
from batchbench.data import placement
from batchbench.data.arrays import MASK
from batchbench.measure import mfu
from batchbench.measure.flops import cost_flops
from batchbench.measure.memory import compiled_memory
from batchbench.workloads import Workload, get_workload
from batchbench.workloads.base import tokens_per_example


# At most this many train calls are in flight (dispatched, not finished) at once: callers
# block on the oldest beyond it. The device keeps a queue; unbounded async dispatch of
# programs with collectives deadlocked XLA:CPU's rendezvous (8 fake devices, 2 cores,
# ~500 calls in flight: threads waiting in later calls' all-reduces starved earlier ones).
MAX_IN_FLIGHT = 4
# Host data's test set is streamed in chunks of at most this many examples and bytes.
HOST_EVAL_CHUNK = 1024
HOST_EVAL_BYTES = 64 * 2**20


@dataclasses.dataclass
class CompiledCall:
  """An AOT-compiled function with what compiling it told us."""

  fn: Callable[..., Any]
  compile_s: float
  memory: dict[str, int | None]
  traces: list[int]  # one entry per trace of the Python body (1 for a good program)
  cached: bool  # served from JAX's persistent compilation cache

  def __call__(self, *args):
    return self.fn(*args)


class _PersistentCacheHits:
  """Counts JAX's persistent-compilation-cache hits (a monitoring event)."""

  count = 0
  _lock = threading.Lock()
  _registered = False

  @classmethod
  def ensure_listening(cls) -> None:
    with cls._lock:
      if not cls._registered:
        jax.monitoring.register_event_listener(cls._on_event)
        cls._registered = True

  @classmethod
  def _on_event(cls, event: str, **kwargs) -> None:
    del kwargs
    if event == "/jax/compilation_cache/cache_hits":
      cls.count += 1


def aot(fn, args, in_shardings, out_shardings, traces: list[int], donate=()) -> CompiledCall:
  """Lowers and compiles ``fn`` for ``args`` (arrays or ``ShapeDtypeStruct``s)."""
  _PersistentCacheHits.ensure_listening()
  hits = _PersistentCacheHits.count
  start = time.perf_counter()
  lowered = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                    donate_argnums=donate).lower(*args)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  return CompiledCall(compiled, seconds, compiled_memory(compiled), traces,
                      cached=_PersistentCacheHits.count > hits)


def _abstract(tree: Any, sharding=None) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype,
                                                     sharding=sharding), tree)


@dataclasses.dataclass
class Program:
  """The compiled programs of one program key, and what it needs to run them.

  Attributes:
    spec: the spec the program was built for (its LR and seed are not compiled in).
    steps_per_call: K, the most steps one train call runs.
    workload, mesh, tx: as built from the spec.
    train: ``(state, data, feed, num_steps) -> (state, metrics)``, state donated;
      ``run`` calls it. Metrics are per-step arrays of length K (``loss``, and the
      gradient norms of the noise scale when measured), valid for the first
      ``num_steps`` entries.
    data: the training set on the devices (``{}`` for synthetic workloads).
    eval_data: the padded test set on the devices, or None (synthetic, or abstract).
    train_eval_data: as many training examples as the test set has, padded the same way
      (so the one eval executable serves both), for train metrics; None when the
      training set is smaller than the test set.
    flops_per_step: XLA's FLOPs of one optimizer step, all devices (None if unknown).
    train_measured: see the field.
  """

  spec: TrialSpec
  steps_per_call: int
  workload: Workload
  mesh: Mesh
  tx: optax.GradientTransformation
  train: CompiledCall
  data: Any
  eval_data: Any
  flops_per_step: float | None
  train_eval_data: Any = None
  # With one step per call and the noise scale at one step in N: the measured step's
  # call, which ``run`` calls at the measured steps (``train`` at the others).
  train_measured: Callable[..., Any] | None = None
  # The eval call does not depend on the batch: programs of one workload and mesh may
  # share this one-element holder (ProgramCache does), so it is compiled once.
  eval_slot: list = dataclasses.field(default_factory=lambda: [None])
  _host: Any = None  # the workload's HostData, once opened

  @property
  def eval(self) -> CompiledCall | None:
    """The eval call, compiled on first use; None without eval data. For host data it
    is the forward call of one streamed chunk (``host_eval_chunk`` examples)."""
    if self.eval_slot[0] is None and (self.eval_data is not None
                                      or self.workload.source == "host"):
      repl = replicated(self.mesh)
      state = self.abstract_state()
      traces: list[int] = []
      if self.workload.source == "host":
        sharding = batch_sharding(self.mesh)
        chunk = self.host_eval_chunk
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                 for k, v in self.workload.batch_spec(chunk).items()}
        batch[MASK] = jax.ShapeDtypeStruct((chunk,), jnp.float32, sharding=sharding)
        self.eval_slot[0] = aot(steps.make_forward_call(self.workload, traces),
                                (state.params, state.model_state, batch),
                                (repl, repl, sharding), repl, traces)
      else:
        self.eval_slot[0] = aot(steps.make_eval_call(self.workload, traces),
                                (state.params, state.model_state,
                                 _abstract(self.eval_data)),
                                (repl, repl, batch_sharding(self.mesh, leading=1)), repl,
                                traces)
    return self.eval_slot[0]

  @property
  def can_evaluate(self) -> bool:
    """Whether the workload has test data (embedded or host) or its own evaluate."""
    return (self.eval_data is not None or self.workload.source == "host"
            or self.workload.evaluate is not None)

  @property
  def host_eval_chunk(self) -> int:
    """Host data: examples per streamed eval chunk, a multiple of the devices, at most
    ``HOST_EVAL_CHUNK`` examples and ``HOST_EVAL_BYTES`` of input."""
    devices = self.mesh.devices.size
    example = sum(math.prod(s.shape) * s.dtype.itemsize
                  for s in self.workload.example_spec.values())
    per_device = max(1, min(HOST_EVAL_CHUNK, HOST_EVAL_BYTES // max(1, example)) // devices)
    return per_device * devices

  def init_state(self, seed: int, lr: float) -> TrainState:
    """The initial state for ``seed`` with peak learning rate ``lr``, replicated.

    Runs eagerly rather than under ``jit``: eager initialisation gives the same bits
    as it always has (the shipped workloads keep their results), and costs little
    for the models here once JAX has warmed its primitive caches.
    """
    return placement.put(_host_init(self.workload, self.tx, seed, lr), replicated(self.mesh))

  def abstract_state(self) -> TrainState:
    """``init_state``'s shapes, dtypes and shardings, computed without running it.

    A resumed trial restores its checkpoint onto this tree.
    """
    shapes = jax.eval_shape(lambda: _host_init(self.workload, self.tx, 0, self.spec.lr))
    return _abstract(shapes, replicated(self.mesh))

  def run(self, state: TrainState, feed: Any, num_steps: int | None = None, *,
          step: int | None = None):
    """One train call of ``num_steps`` steps (default K) on the host ``feed``; returns
    ``(state, metrics)`` with the metrics still on the device (K entries).

    ``step`` is the call's first step (``state.step``, known to the caller without
    waiting for the device); a program with ``train_measured`` needs it.
    Indices and keys are host arrays every process holds whole (the compiled call
    places them); host batches are this process's slice, assembled into global arrays.
    """
    n = self.steps_per_call if num_steps is None else num_steps
    if not 1 <= n <= self.steps_per_call:
      raise ValueError(f"num_steps={n}: a train call runs 1..{self.steps_per_call} steps")
    if self.train_measured is not None:
      if step is None:
        raise ValueError("this program measures the noise scale at one step in "
                         f"{self.spec.gns_every} with one step per call: run() needs step=")
      if step % self.spec.gns_every:  # the plain call returns the loss alone
        state, metrics = self._call(self.train, state, feed, n)
        nan = np.full(self.steps_per_call, np.nan, np.float32)
        return state, {**metrics, **{name: nan for name in steps.GNS_METRICS}}
      return self._call(self.train_measured, state, feed, n)
    return self._call(self.train, state, feed, n)

  def _call(self, call: Callable[..., Any], state: TrainState, feed: Any, n: int):
    """``call`` on the host ``feed``."""
    if self.workload.source == "host":
      sharding = batch_sharding(self.mesh, leading=2)
      feed = {name: jax.make_array_from_process_local_data(sharding, a)
              for name, a in feed.items()}
    return call(state, self.data, feed, np.int32(n))

  def utilization(self, samples_per_sec: float | None) -> dict[str, Any]:
    """``utilization`` of this program at ``samples_per_sec``."""
    return utilization(self.workload, self.spec, self.flops_per_step,
                       self.mesh.devices.flat[0].device_kind, samples_per_sec)

  def host_data(self) -> Any:
    """The workload's ``HostData``, opened once per program."""
    if self._host is None:
      self._host = self.workload.host_data()
    return self._host

  def feed(self, seed: int) -> Any:
    """``feed(first_step, num_steps=None)``: a call's inputs, K rows (a pure function of
    the steps): indices, keys, or (host data) this process's slice of the batches read
    through the host pipeline, with ``prefetch`` building the next call's ahead."""
    k, accum = self.steps_per_call, self.spec.accum_steps
    if self.workload.source == "host":
      from batchbench.data.host import HostFeed  # pylint: disable=g-import-not-at-top
      host = self.host_data()
      return HostFeed(host.train, num_train=host.num_train,
                      global_batch=self.spec.global_batch, accum_steps=accum,
                      steps_per_call=k, seed=seed, transform=host.transform,
                      fields=host.fields, process_index=jax.process_index(),
                      process_count=jax.process_count())
    if self.workload.synthetic:
      return feed_lib.LookaheadFeed(feed_lib.synthetic_keys(k, accum))
    return feed_lib.LookaheadFeed(feed_lib.EpochIndexFeeder(
        self.spec.train_size, self.spec.global_batch, accum, k, seed).call_indices)

  def evaluate(self, state: TrainState, split: str = "test") -> dict[str, float] | None:
    """Metric means of ``state`` on the test set (or on ``train_eval_data`` with
    ``split="train"``, None without it), or the workload's own ``evaluate``."""
    if self.workload.evaluate is not None:
      if split != "test":
        return None
      return {k: float(v) for k, v in self.workload.evaluate(state.params,
                                                             state.model_state).items()}
    if self.workload.source == "host":
      return self._evaluate_host(state, split)
    data = self.eval_data if split == "test" else self.train_eval_data
    if data is None:
      return None
    sums = jax.device_get(self.eval(state.params, state.model_state, data))
    count = float(sums["count"])
    return {name: float(v) / count for name, v in sums.items() if name != "count"}


  def _evaluate_host(self, state: TrainState, split: str) -> dict[str, float] | None:
    """Streams the test set (or the train subset as large as it, ``split="train"``)
    from the host pipeline in chunks through the compiled forward call, summing each
    metric on the host."""
    from batchbench.data.host import eval_batches  # pylint: disable=g-import-not-at-top
    host = self.host_data()
    num_test = len(host.test)
    if split == "train" and host.num_train < num_test:
      return None
    forward = self.eval
    sharding = batch_sharding(self.mesh)
    total: dict[str, float] = {}
    for arrays, mask in eval_batches(host.test if split == "test" else host.train,
                                     host.transform, chunk=self.host_eval_chunk,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count(), fields=host.fields,
                                     limit=num_test):
      batch = {k: jax.make_array_from_process_local_data(sharding, a)
               for k, a in {**arrays, MASK: mask}.items()}
      sums = jax.device_get(forward(state.params, state.model_state, batch))
      for name, value in sums.items():
        total[name] = total.get(name, 0.0) + float(value)
    count = total.pop("count")
    return {name: value / count for name, value in total.items()}


def utilization(workload: Workload, spec: TrialSpec, flops_per_step: float | None,
                device_kind: str, samples_per_sec: float | None) -> dict[str, Any]:
  """The row fields of model FLOPs per example (analytic, else XLA's count of the step,
  ``flops_per_step``), TFLOP/s per device at ``samples_per_sec``, MFU, and for a language
  model tokens per example and tokens/s."""
  flops, source = mfu.model_flops(workload.flops_per_example, flops_per_step,
                                  spec.global_batch)
  tokens = tokens_per_example(workload)
  return {"tokens_per_example": tokens,
          "tokens_per_sec": tokens * samples_per_sec if tokens and samples_per_sec else None,
          **mfu.utilization(flops_per_example=flops, flops_source=source,
                            samples_per_sec=samples_per_sec, num_devices=spec.num_devices,
                            device_kind=device_kind, compute_dtype=spec.compute_dtype,
                            peak_override=spec.peak_tflops)}


def _host_init(workload: Workload, tx, seed: int, lr: float) -> TrainState:
  init_key, data_key = jax.random.split(jax.random.key(seed))
  params, model_state = workload.init(init_key, workload.batch_spec(1))
  opt_state = optim.with_learning_rate(tx.init(params), lr)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    opt_state=opt_state, rng=data_key)


def _feed_spec(workload: Workload, spec: TrialSpec, k: int, mesh: Mesh) -> Any:
  if workload.source == "host":
    sharding = batch_sharding(mesh, leading=2)
    return {name: jax.ShapeDtypeStruct((k, spec.accum_steps, *s.shape), s.dtype,
                                       sharding=sharding)
            for name, s in workload.batch_spec(spec.micro_batch).items()}
  if workload.synthetic:
    return jax.ShapeDtypeStruct((k, spec.accum_steps), jnp.int32, sharding=replicated(mesh))
  return jax.ShapeDtypeStruct((k, spec.accum_steps, spec.micro_batch), jnp.int32,
                              sharding=batch_sharding(mesh, leading=2))


def flops_per_step(workload: Workload, spec: TrialSpec, tx, state: Any, data: Any) -> float | None:
  """XLA's FLOPs of one optimizer step, all devices together.

  XLA's cost analysis counts a loop body once whatever its trip count, so it lowers
  (without compiling) one unsharded step of one micro-batch, and the optimizer update
  alone: a step costs ``accum_steps`` micro-batch gradients and one update.
  """
  one = dataclasses.replace(spec, accum_steps=1, global_batch=spec.micro_batch)
  mesh = make_mesh(1)
  fn = steps.make_train_call(workload, mesh, tx, micro_batch=one.micro_batch)
  args = (*_abstract((state, data)), _abstract(_feed_spec(workload, one, 1, mesh)),
          jax.ShapeDtypeStruct((), jnp.int32))
  step = cost_flops(jax.jit(fn).lower(*args))
  if step is None:
    return None
  if spec.accum_steps == 1:
    return step
  params, opt_state = _abstract((state.params, state.opt_state))
  update = cost_flops(jax.jit(tx.update).lower(params, opt_state, params)) or 0.0
  return spec.accum_steps * step - (spec.accum_steps - 1) * update


def build(spec: TrialSpec, *, mesh: Mesh | None = None, abstract: bool = False,
          flops: bool = True, data: Any = None, eval_data: Any = None,
          train_eval_data: Any = None, arrays: Any = None) -> Program:
  """Builds and compiles the program of ``spec`` (its LR and seed are runtime values).

  Args:
    spec: the resolved trial.
    mesh: its mesh (default: a ``data`` mesh of ``spec.num_devices``).
    abstract: compile against abstract state and data; nothing is placed on the
      devices (what ``probe`` needs). Such a program cannot run.
    flops: lower one step for XLA's FLOP count.
    data: the training set already on this mesh (shared between programs), if any.
    eval_data, train_eval_data: the padded test set and train subset already on this
      mesh, likewise.
    arrays: the loaded ``ArrayData``, if the caller has it.

  Returns:
    The program.
  """
  workload = get_workload(spec.workload, dict(spec.workload_options))
  mesh = mesh or make_mesh(spec.num_devices)
  k = spec.steps_per_call
  tx = optim.make_optimizer(spec)
  shapes = jax.eval_shape(lambda: _host_init(workload, tx, 0, spec.lr))
  state = _abstract(shapes, replicated(mesh))
  if workload.source != "embedded":
    data, eval_data = {}, None  # synthetic: drawn on device; host: read per call
  elif data is None or (eval_data is None and not abstract):
    arrays = arrays if arrays is not None else workload.data()
    if data is None:
      data = (placement.abstract_train_data(arrays.train, mesh) if abstract
              else placement.put_train_data(arrays.train, mesh))
    if eval_data is None and not abstract:
      eval_data = placement.put_eval_data(arrays.test, mesh)
      if arrays.num_train >= arrays.num_test:
        subset = {k: a[:arrays.num_test] for k, a in arrays.train.items()}
        train_eval_data = placement.put_eval_data(subset, mesh)
  repl = replicated(mesh)
  traces: list[int] = []
  feed = _feed_spec(workload, spec, k, mesh)
  num_steps = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)

  def compile_train(measured: bool | None, traces: list[int]) -> CompiledCall:
    return aot(steps.make_train_call(workload, mesh, tx, micro_batch=spec.micro_batch,
                                     gns=spec.gns_source, gns_groups=spec.gns_groups,
                                     gns_every=spec.gns_every, measured=measured,
                                     traces=traces),
               (state, _abstract(data, repl), feed, num_steps),
               (repl, repl, jax.tree.map(lambda f: f.sharding, feed), repl), repl, traces,
               donate=(0,))

  train_measured = None
  if k == 1 and spec.gns_source and spec.gns_every > 1:
    # One step per call, measured at one in gns_every: a plain and a measured call, and
    # the host picks (steps.make_train_call). ``train`` reports both compiles.
    train, measured = compile_train(False, traces), compile_train(True, [])
    train_measured = measured.fn
    train = dataclasses.replace(
        train, compile_s=train.compile_s + measured.compile_s,
        memory={key: None if v is None else max(v, measured.memory.get(key) or 0)
                for key, v in train.memory.items()},
        cached=train.cached and measured.cached)
  else:
    train = compile_train(None, traces)
  step_flops = flops_per_step(workload, spec, tx, shapes, data) if flops else None
  return Program(spec=spec, steps_per_call=k, workload=workload, mesh=mesh, tx=tx,
                 train=train, train_measured=train_measured, data=data,
                 eval_data=None if abstract else eval_data,
                 train_eval_data=None if abstract else train_eval_data,
                 flops_per_step=step_flops)


class ProgramCache:
  """Programs by program key, and placed datasets and the eval call by workload and
  mesh, within a process.

  A sweep keeps one: every LR and seed of a batch (and its throughput phase) then runs
  the same train executable, and every batch the same eval executable.
  """

  def __init__(self, flops: bool = True):
    self._flops = flops  # lower each program once more for XLA's FLOP count
    self._programs: dict[str, Program] = {}
    self._data: dict[tuple, tuple[Any, Any, Any, list]] = {}
    self.hits = 0
    self.compiles = 0

  def get(self, spec: TrialSpec) -> tuple[Program, bool]:
    """The program for ``spec``, and whether it came from this cache."""
    key = spec.program_key
    if key in self._programs:
      self.hits += 1
      return self._programs[key], True
    mesh = make_mesh(spec.num_devices)
    data_key = (spec.workload, spec.workload_options, tuple(d.id for d in mesh.devices.flat))
    shared = self._data.get(data_key)
    program = build(spec, mesh=mesh, flops=self._flops, data=shared and shared[0],
                    eval_data=shared and shared[1], train_eval_data=shared and shared[2])
    if shared is None:
      shared = self._data[data_key] = (program.data, program.eval_data,
                                       program.train_eval_data, program.eval_slot)
    program.eval_slot = shared[3]
    self._programs[key] = program
    self.compiles += 1
    return program, False

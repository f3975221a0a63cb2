"""``resolve()``: validate every field of a config, then freeze a ``TrialSpec``.

A config says *what* to run ("global batch 1024, linear LR scaling from 0.05 at
batch 32"); ``resolve`` turns it, given the number of data-parallel devices, into
a frozen ``TrialSpec`` with per-device batch, accumulation steps, learning rate
and step counts. Every invalid combination fails here, before any compute, with
a ``ConfigError`` naming the field, the value and what would be valid.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import ml_collections
import numpy as np

from batchbench import version
from batchbench.config import scaling
from batchbench.config.errors import ConfigError, positive_int, require
from batchbench.config.spec import TrialSpec
from batchbench.workloads import base as workloads_base
from batchbench.workloads import get_workload, workload_names, workload_options

OPTIMIZERS = ("sgd", "adam", "adamw")
DEFAULT_SGD_MOMENTUM = 0.9
NO_TARGET = "none"
# Aim for about this many examples per compiled call when steps_per_call is auto (up to
# MAX_AUTO_STEPS_PER_CALL steps): each call costs host time (dispatch ~0.15 ms, building
# its inputs), which on a 2-core CPU also takes cores from XLA; benchmarks/overhead.py
# measured 4,096 examples per call (K=4 at batch 1,024) about 5% slower than 32-64 steps.
# K is only the most steps a call runs: a trial runs shorter calls up to each eval, so
# evals, budgets and checkpoints fall on any step.
AUTO_EXAMPLES_PER_CALL = 65_536
MAX_AUTO_STEPS_PER_CALL = 64
# Host data crosses to the devices with every call: a call carries at most this much.
MAX_HOST_BYTES_PER_CALL = 64 * 2**20


def auto_steps_per_call(global_batch: int, example_bytes: int | None = None) -> int:
  """Steps per call for about ``AUTO_EXAMPLES_PER_CALL`` examples, 1..64; for host data
  (``example_bytes`` given) also at most ``MAX_HOST_BYTES_PER_CALL`` of input per call."""
  k = max(1, min(MAX_AUTO_STEPS_PER_CALL, AUTO_EXAMPLES_PER_CALL // global_batch))
  if example_bytes:
    k = max(1, min(k, MAX_HOST_BYTES_PER_CALL // (example_bytes * global_batch)))
  return k


def resolve(config: ml_collections.ConfigDict, num_available_devices: int) -> TrialSpec:
  """Validates ``config`` and resolves it into a frozen ``TrialSpec``.

  Args:
    config: a config as returned by a config file's ``get_config``.
    num_available_devices: local devices that may form the data axis.

  Returns:
    The frozen spec.

  Raises:
    ConfigError: on the first invalid field, naming it, its value and what is valid.
  """
  c = config
  names = workload_names()
  require(c.workload in names, "workload", c.workload, f"known workloads: {', '.join(names)}")
  options = dict(c.workload_options) if c.workload_options is not None else {}
  options = _compute_dtype(c, options)
  require(c.peak_tflops is None or (isinstance(c.peak_tflops, (int, float))
                                    and c.peak_tflops > 0), "peak_tflops", c.peak_tflops,
          "must be a positive number (dense TFLOP/s per device), or unset for the table")
  require(isinstance(c.num_devices, int) and 0 <= c.num_devices <= num_available_devices,
          "num_devices", c.num_devices,
          f"must be between 1 and the {num_available_devices} available devices (0 = all)")
  num_devices = c.num_devices or num_available_devices
  options = _batch_norm_groups(c.workload, options, num_devices)
  try:
    workload = get_workload(c.workload, options)
  except TypeError as e:
    raise ConfigError("workload_options", options, str(e)) from e

  global_batch = positive_int(c.global_batch, "global_batch")
  accum_steps = positive_int(c.accum_steps, "accum_steps")
  require(global_batch % (num_devices * accum_steps) == 0, "global_batch", global_batch,
          f"must be divisible by data-parallel devices x accum_steps = {num_devices} x "
          f"{accum_steps} = {num_devices * accum_steps}")
  train_size = workload.train_size
  if train_size is None and workload.source == "embedded":
    # The workload did not declare its size (train_size is optional): load it to learn it.
    train_size = workload.data().num_train
  elif train_size is None and workload.source == "host":
    # Opening the sources checks that the dataset is prepared (a ConfigError naming the
    # data_dir and the command that prepares it), before anything is compiled.
    train_size = workload.host_data().num_train
  if train_size is not None:
    require(global_batch <= train_size, "global_batch", global_batch,
            f"must be at most the {train_size}-example training set of {c.workload}")

  momentum, weight_decay = _optimizer_options(c)
  require(c.lr_rule in scaling.LR_RULES, "lr_rule", c.lr_rule,
          f"must be one of {', '.join(scaling.LR_RULES)}")
  require(c.schedule in scaling.DECAYS, "schedule", c.schedule,
          f"must be one of {', '.join(scaling.DECAYS)}")
  for field in ("base_lr", "lr_multiplier"):
    require(isinstance(c[field], (int, float)) and not isinstance(c[field], bool)
            and c[field] > 0 and math.isfinite(c[field]),
            field, c[field], "must be a positive finite number")
  reference_batch = positive_int(c.reference_batch, "reference_batch")
  require(isinstance(c.warmup_examples, int) and c.warmup_examples >= 0, "warmup_examples",
          c.warmup_examples, "must be an integer >= 0 (examples of linear warmup)")
  eval_every_examples = positive_int(c.eval_every_examples, "eval_every_examples")
  max_examples = positive_int(c.max_examples, "max_examples", optional=True)
  max_steps = positive_int(c.max_steps, "max_steps", optional=True)
  if c.max_seconds is not None:
    require(c.max_seconds > 0, "max_seconds", c.max_seconds, "must be a positive number")
  require(max_examples or max_steps or c.max_seconds, "max_examples", max_examples,
          "a budget is required: set max_examples, max_steps or max_seconds")
  require(isinstance(c.steps_per_call, int) and c.steps_per_call >= 0, "steps_per_call",
          c.steps_per_call, "must be an integer >= 0 (0 = chosen by the harness)")
  if c.memory_budget_bytes is not None:
    positive_int(c.memory_budget_bytes, "memory_budget_bytes")
  require(isinstance(c.seed, int) and not isinstance(c.seed, bool) and c.seed >= 0, "seed",
          c.seed, "must be an integer >= 0")
  checkpoint_every_examples = positive_int(c.checkpoint_every_examples,
                                           "checkpoint_every_examples", optional=True)
  require(isinstance(c.stop_at_target, bool), "stop_at_target", c.stop_at_target,
          "must be True or False")
  require(isinstance(c.get("fallback_to_previous_checkpoint", False), bool),
          "fallback_to_previous_checkpoint", c.get("fallback_to_previous_checkpoint"),
          "must be True or False")
  throughput = _throughput_settings(c)
  gns_source, gns_groups, gns_note = _noise_scale(c, workload, num_devices, accum_steps,
                                                  global_batch)
  every_steps = positive_int(c.gns.every_steps, "gns.every_steps")
  gns_every = every_steps if gns_source else 1

  target = _resolve_target(c, workload)
  eval_every_steps = None if workload.synthetic else max(1, eval_every_examples // global_batch)
  if workload.synthetic:
    require(max_steps or c.max_seconds, "max_steps", max_steps,
            f"{c.workload} is synthetic (no data to count examples of): set max_steps")
  example_bytes = (sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                       for x in workload.example_spec.values())
                   if workload.source == "host" else None)
  steps_per_call = c.steps_per_call or (
      1 if _loops_slow_it(workload) else auto_steps_per_call(global_batch, example_bytes))

  budget_steps = None
  if max_examples:
    budget_steps = scaling.examples_to_steps(max_examples, global_batch)
  if max_steps:
    budget_steps = min(budget_steps or max_steps, max_steps)
  if c.schedule != "constant":
    require(budget_steps is not None, "schedule", c.schedule,
            "a decaying schedule needs max_examples or max_steps as its horizon")

  lr = scaling.scaled_lr(c.base_lr, c.lr_rule, global_batch, reference_batch) * c.lr_multiplier
  return TrialSpec(
      workload=c.workload, workload_options=tuple(sorted(options.items())),
      global_batch=global_batch,
      per_device_batch=global_batch // (num_devices * accum_steps), accum_steps=accum_steps,
      num_devices=num_devices, num_processes=_process_count(), steps_per_call=steps_per_call,
      optimizer=c.optimizer, momentum=momentum, weight_decay=weight_decay,
      base_lr=float(c.base_lr), reference_batch=reference_batch, lr_rule=c.lr_rule,
      lr_multiplier=float(c.lr_multiplier), lr=float(lr), schedule=c.schedule,
      warmup_examples=c.warmup_examples,
      warmup_steps=scaling.examples_to_steps(c.warmup_examples, global_batch),
      eval_every_examples=eval_every_examples, eval_every_steps=eval_every_steps,
      max_steps=budget_steps, max_seconds=c.max_seconds, target=target, seed=c.seed,
      train_size=train_size, throughput=tuple(sorted(throughput.items())),
      measurement_version=version.MEASUREMENT_VERSION,
      memory_budget_bytes=c.memory_budget_bytes,
      checkpoint_every_examples=checkpoint_every_examples, gns_source=gns_source,
      gns_groups=gns_groups, gns_ema=float(c.gns.ema), gns_every=gns_every,
      gns_note=gns_note,
      stop_at_target=c.stop_at_target, compute_dtype=c.compute_dtype,
      peak_tflops=None if c.peak_tflops is None else float(c.peak_tflops))


COMPUTE_DTYPES = ("float32", "bfloat16")


def _process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


def _batch_norm_groups(name: str, options: dict, num_devices: int) -> dict:
  """The options with ``bn_groups`` = the trial's devices under ``bn_group="per_device"``.

  Ghost batch norm computes its statistics per device shard of each micro-batch, so the
  number of groups follows the split; an explicit ``bn_groups`` is kept.
  """
  if (options.get("bn_group") == "per_device" and "bn_groups" not in options
      and "bn_groups" in workload_options(name)):
    return {**options, "bn_groups": num_devices}
  return options


def batch_norm_group_size(spec: TrialSpec) -> int | None:
  """Examples each BatchNorm statistic is computed over in ``spec``'s training step: the
  micro-batch (``bn_group="global"``, synchronised across devices) or its per-device
  shard (``"per_device"``); None for a workload without batch norm."""
  if "bn_group" not in workload_options(spec.workload):
    return None
  options = dict(spec.workload_options)
  groups = options.get("bn_groups", 1) if options.get("bn_group") == "per_device" else 1
  return spec.global_batch // spec.accum_steps // groups


def _compute_dtype(c, options: dict) -> dict:
  """The workload options with ``compute_dtype`` as the workload's ``dtype`` option."""
  require(c.compute_dtype in COMPUTE_DTYPES, "compute_dtype", c.compute_dtype,
          f"must be one of {', '.join(COMPUTE_DTYPES)}")
  require("dtype" not in options, "workload_options.dtype", options.get("dtype"),
          "is set by compute_dtype; set compute_dtype instead")
  if c.compute_dtype == "float32":
    return options
  takes = [n for n in workload_names() if "dtype" in workload_options(n)]
  require(c.workload in takes, "compute_dtype", c.compute_dtype,
          f"{c.workload} computes in float32 only; the workloads with a compute dtype are "
          f"{', '.join(takes) or 'none'}")
  return {**options, "dtype": c.compute_dtype}


def _optimizer_options(c) -> tuple[float | None, float]:
  """Momentum and weight decay, refusing the ones the optimizer would ignore."""
  require(c.optimizer in OPTIMIZERS, "optimizer", c.optimizer,
          f"must be one of {', '.join(OPTIMIZERS)}")
  momentum = c.momentum
  if c.optimizer != "sgd":
    require(momentum is None, "momentum", momentum,
            f"optimizer {c.optimizer} ignores momentum (its first-moment decay b1 is 0.9); "
            "leave momentum unset, or use optimizer=sgd")
  else:
    momentum = DEFAULT_SGD_MOMENTUM if momentum is None else momentum
    require(isinstance(momentum, (int, float)) and 0 <= momentum < 1, "momentum", momentum,
            "must be in [0, 1)")
    momentum = float(momentum)
  wd = c.weight_decay
  require(isinstance(wd, (int, float)) and wd >= 0, "weight_decay", wd, "must be >= 0")
  require(not (c.optimizer == "adam" and wd > 0), "weight_decay", wd,
          "optimizer adam ignores weight_decay; use adamw (decoupled decay) or sgd (L2 on "
          "the gradient), or set weight_decay=0")
  return momentum, float(wd)


def _throughput_settings(c) -> dict[str, float | int]:
  t = c.throughput
  out = {"warmup_calls": t.warmup_calls, "min_windows": t.min_windows}
  require(isinstance(t.warmup_calls, int) and t.warmup_calls >= 1, "throughput.warmup_calls",
          t.warmup_calls, "must be an integer >= 1 (the first call is never timed)")
  require(isinstance(t.min_windows, int) and t.min_windows >= 3, "throughput.min_windows",
          t.min_windows, "must be an integer >= 3 (a median and an IQR need 3 windows)")
  for field in ("min_seconds", "max_seconds"):
    value = t[field]
    require(isinstance(value, (int, float)) and value > 0, f"throughput.{field}", value,
            "must be a positive number of seconds")
    out[field] = float(value)
  require(out["max_seconds"] >= out["min_seconds"], "throughput.max_seconds", t.max_seconds,
          f"must be at least throughput.min_seconds ({t.min_seconds})")
  return out


GNS_MODES = ("auto", "groups", "off")


class _Traits(NamedTuple):
  """What in a workload's model settles how the harness runs it."""

  has_state: bool  # mutable model state (BatchNorm statistics)
  has_conv: bool  # convolutions


_TRAITS: dict[str, _Traits] = {}


def _traits(workload) -> _Traits:
  """The model's traits, from one abstract trace of its init and loss (nothing runs and
  nothing is placed on a device), once per workload."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from batchbench.data.arrays import MASK  # pylint: disable=g-import-not-at-top
  key = repr((workload.name, workload.example_spec))
  if key not in _TRAITS:
    def init_and_loss():
      params, model_state = workload.init(jax.random.key(0), workload.batch_spec(1))
      batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in workload.batch_spec(2).items()}
      batch[MASK] = jnp.ones((2,), jnp.float32)
      return model_state, workload.loss(params, model_state, batch,
                                        jax.random.key(1)).loss_sum
    jaxpr, (state, _) = jax.make_jaxpr(init_and_loss, return_shape=True)()
    _TRAITS[key] = _Traits(has_state=bool(jax.tree.leaves(state)),
                           has_conv="conv_general_dilated" in str(jaxpr))
  return _TRAITS[key]


def _loops_slow_it(workload) -> bool:
  """Whether the harness should not put this workload's steps in a loop: on CPU, a model
  with convolutions. XLA's CPU backend compiles convolution gradients inside a loop body
  10-30x slower than outside one (jax-ml/jax#12868; measured: ResNet-18 CIFAR at batch 16
  0.77 vs 25.5 samples/s, the Flax MNIST CNN at 32 148 vs 1,958), so such a workload runs
  one step per call, which has no loop (``core.steps``)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.default_backend() == "cpu" and _traits(workload).has_conv


def _noise_scale(c, workload, num_devices: int, accum_steps: int,
                 global_batch: int) -> tuple[str | None, int, str | None]:
  """How the gradient noise scale is measured: ``(source, groups, why not)``."""
  g = c.gns
  require(g.mode in GNS_MODES, "gns.mode", g.mode, f"must be one of {', '.join(GNS_MODES)}")
  require(isinstance(g.ema, float) and 0 < g.ema < 1, "gns.ema", g.ema,
          "must be a number in (0, 1)")
  if g.mode == "off":
    return None, 1, "not measured (gns.mode=off)"
  if accum_steps >= 2:
    return "micro_batches", 1, None
  if workload.synthetic or num_devices < 2 and g.mode == "auto":
    why = ("synthetic inputs" if workload.synthetic else
           "one device without accumulation has no second batch size for free; set "
           "gns.mode=groups, or accum_steps >= 2")
    return None, 1, f"not measured: {why}"
  if _traits(workload).has_state:
    require(g.mode != "groups", "gns.mode", g.mode,
            f"{workload.name} has model state (e.g. BatchNorm statistics) that groups "
            "would split; measure the noise scale with accum_steps >= 2 instead")
    return None, 1, ("not measured: the model has state (e.g. BatchNorm statistics) "
                     "that per-device groups would split; use accum_steps >= 2")
  groups = num_devices if num_devices >= 2 else g.groups
  require(isinstance(groups, int) and groups >= 2 and global_batch % groups == 0,
          "gns.groups", groups, f"must be an integer >= 2 dividing the global batch "
          f"{global_batch}")
  return "groups", groups, None


def _resolve_target(c, workload) -> workloads_base.Target | None:
  if c.target_metric == NO_TARGET:
    return None
  if c.target_metric is None and c.target_value is None:
    return workload.target
  if workload.synthetic:
    raise ConfigError("target_metric", c.target_metric,
                      f"{workload.name} is synthetic and has no eval data; use 'none'")
  metric = c.target_metric or (workload.target.metric if workload.target else None)
  require(metric in workload.metrics, "target_metric", metric,
          f"{workload.name} reports {', '.join(sorted(workload.metrics))} (or 'none')")
  m = workload.metrics[metric]
  value = c.target_value
  if value is None:
    require(workload.target is not None and workload.target.metric == metric, "target_value",
            value, f"must be set for target metric {metric!r}")
    value = workload.target.value
  require(isinstance(value, (int, float)) and m.low <= value <= m.high, "target_value", value,
          f"{metric} lies in [{m.low}, {m.high}]")
  return workloads_base.Target(metric, float(value), m.direction)


def open_workdir(workdir: str | None) -> str:
  """Creates ``workdir`` if needed and checks that a file can be written in it.

  Call it after the config is validated: it is the first thing written.

  Returns:
    The absolute path.

  Raises:
    ConfigError: no workdir, or one that cannot be created or written (a file in the
      way, a read-only or virtual filesystem such as /proc, no permission).
  """
  if not workdir:
    raise ConfigError("workdir", workdir, "a writable directory path is required")
  path = os.path.abspath(os.path.expanduser(workdir))
  probe = os.path.join(path, f".batchbench-write-probe-{os.getpid()}")
  try:
    os.makedirs(path, exist_ok=True)
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    reason = e.strerror or type(e).__name__
    raise ConfigError("workdir", workdir, f"cannot create or write a file there ({reason}); "
                      "give a writable directory") from None
  return path

"""Configs and ``resolve()``: validate every field, then freeze a trial spec.

A config says *what* to run ("global batch 1024, linear LR scaling from 0.05 at
batch 32"); ``resolve`` turns it, given the number of data-parallel devices, into
a frozen ``TrialSpec`` with per-device batch, accumulation steps, learning rate
and step counts. Every invalid combination fails here, before any compute, with
a ``ConfigError`` naming the field, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any

import jax
import ml_collections
from ml_collections import config_dict

from batchbench import scaling
from batchbench.workloads import base as workloads_base
from batchbench.workloads import get_workload, workload_names

OPTIMIZERS = ("sgd", "adam", "adamw")
NO_TARGET = "none"
# Aim for about this many examples per compiled call when steps_per_call is auto (up
# to MAX_AUTO_STEPS_PER_CALL steps, and dividing the eval interval): each call costs
# host time (dispatch ~0.15 ms, building and transferring its indices), which on a
# 2-core CPU also takes cores from XLA; benchmarks/overhead.py measured 4,096 (K=4 at
# batch 1,024) about 5% slower than a hand-fused loop of 32-64 steps.
AUTO_EXAMPLES_PER_CALL = 65_536
MAX_AUTO_STEPS_PER_CALL = 64
# When evals come more often than that (small eval interval, large batch), an auto call
# spans several eval intervals and returns the parameters at each eval point, which are
# evaluated after the call (outside the timed region). Evaluating at call boundaries
# instead meant one step per call and a block per step: 0.69-0.72x the throughput at
# batch 256-1,024 on digits (eval every 256 examples). The copies cost memory, so at
# most this many per call and this many bytes of them:
MAX_EVALS_PER_CALL = 16
MAX_EVAL_SNAPSHOT_BYTES = 64 * 2**20


class ConfigError(ValueError):
  """An invalid config field: names the field, the value and what is valid."""

  def __init__(self, field: str, value: Any = None, valid: str | None = None):
    self.field, self.value, self.valid = field, value, valid
    # ``valid`` None: ``field`` is a whole message. ml_collections' config_flags re-raises
    # an error from ``get_config`` as ``type(e)(message)``, and pickling does the same.
    super().__init__(field if valid is None else f"invalid config: {field}={value!r}: {valid}")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a ``get_config`` argument string ``"k=v,k2=v2"`` against ``defaults``.

  Values take the type of their default. Unknown keys raise ``ConfigError``.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"config arg {key!r}", value, f"known args: {sorted(defaults)}")
    default = defaults[key]
    try:
      if isinstance(default, bool):
        out[key] = value.strip().lower() in ("1", "true", "yes", "")
      elif default is None:
        out[key] = value
      else:
        out[key] = type(default)(value)
    except ValueError as e:
      raise ConfigError(f"config arg {key!r}", value, f"expected {type(default).__name__}") from e
  return out


def default_config() -> ml_collections.ConfigDict:
  """Every field a trial takes, with defaults; config files override a few."""
  c = ml_collections.ConfigDict()
  c.workload = "digits_mlp"
  c.workload_options = ml_collections.ConfigDict()
  c.global_batch = 32
  c.accum_steps = 1
  c.num_devices = 0  # data-parallel devices; 0 = all local devices
  c.steps_per_call = 0  # train steps fused per compiled call; 0 = chosen by the harness
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.base_lr = 0.05
  c.reference_batch = 32
  c.lr_rule = "linear"
  c.lr_multiplier = 1.0
  c.schedule = "constant"  # after warmup: constant | cosine | linear
  c.warmup_examples = 0
  c.eval_every_examples = 256
  c.max_examples = config_dict.placeholder(int)
  c.max_steps = config_dict.placeholder(int)
  c.max_seconds = config_dict.placeholder(float)
  c.target_metric = config_dict.placeholder(str)  # None: the workload's; "none": no target
  c.target_value = config_dict.placeholder(float)
  c.seed = 0
  c.memory_budget_bytes = config_dict.placeholder(int)
  # Checkpoints (sweeps keep them under <workdir>/trials/<trial_id>/): one every this
  # many examples (at the next call boundary) and at the end; None = only at the end
  # and on preemption (SIGTERM).
  c.checkpoint_every_examples = config_dict.placeholder(int)
  # A corrupted latest checkpoint is an error; True restores the previous one instead
  # (the row records it). A run option, not part of the trial's identity.
  c.fallback_to_previous_checkpoint = False
  c.sweep = ml_collections.ConfigDict()
  c.sweep.global_batches = config_dict.placeholder(tuple)
  c.sweep.batch_range = config_dict.placeholder(str)  # "8:1024": powers of two, inclusive
  # Optional per-sweep overrides of the top-level fields of the same names.
  c.sweep.lr_rule = config_dict.placeholder(str)
  c.sweep.reference_batch = config_dict.placeholder(int)
  c.sweep.warmup_examples = config_dict.placeholder(int)
  c.sweep.schedule = config_dict.placeholder(str)
  c.sweep.lr_multipliers = (1.0,)
  c.sweep.seeds = (0,)
  return c


@dataclasses.dataclass(frozen=True)
class TrialSpec:
  """Everything one trial needs, validated and resolved for a device count."""

  workload: str
  workload_options: tuple[tuple[str, Any], ...]
  global_batch: int
  per_device_batch: int
  accum_steps: int
  num_devices: int
  steps_per_call: int
  optimizer: str
  momentum: float
  weight_decay: float
  base_lr: float
  reference_batch: int
  lr_rule: str
  lr_multiplier: float
  lr: float
  schedule: str
  warmup_examples: int
  warmup_steps: int
  eval_every_examples: int
  eval_every_steps: int | None  # None: no evaluation (synthetic workload)
  max_steps: int | None
  max_seconds: float | None
  target: workloads_base.Target | None
  seed: int
  train_size: int | None
  memory_budget_bytes: int | None = None
  checkpoint_every_examples: int | None = None  # None: only at the end / on preemption

  # Fields that do not change a trial's result (only how often it is checkpointed):
  # left out of ``trial_id`` and of the spec a resumed checkpoint must match.
  NOT_IDENTITY = ("checkpoint_every_examples",)

  @property
  def micro_batch(self) -> int:
    """Global examples per accumulation micro-batch (all devices)."""
    return self.global_batch // self.accum_steps

  @property
  def evals_per_call(self) -> int:
    """Eval points inside one call (> 1 only when a call spans several eval intervals)."""
    every = self.eval_every_steps
    return self.steps_per_call // every if every and self.steps_per_call > every else 1

  @property
  def steps_per_epoch(self) -> int | None:
    return self.train_size // self.global_batch if self.train_size else None

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> TrialSpec:
    """Inverse of ``to_dict`` (used to hand a spec to a worker process)."""
    d = dict(d)
    d["workload_options"] = tuple(sorted(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in d["workload_options"].items()))
    if d.get("target") is not None:
      d["target"] = workloads_base.Target(**d["target"])
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["workload_options"] = dict(self.workload_options)
    return d

  def identity(self) -> dict[str, Any]:
    """``to_dict()`` without the fields that cannot change the result."""
    d = self.to_dict()
    for field in self.NOT_IDENTITY:
      d.pop(field, None)
    return d

  @property
  def trial_id(self) -> str:
    """Stable hash of everything that determines the trial's result."""
    blob = json.dumps(self.identity(), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _require(ok: bool, field: str, value: Any, valid: str) -> None:
  if not ok:
    raise ConfigError(field, value, valid)


def _positive_int(config, field: str, optional: bool = False) -> int | None:
  value = config[field] if "." not in field else config.get(field)
  if value is None and optional:
    return None
  _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, field, value,
           "must be a positive integer")
  return value


def _largest_divisor_at_most(n: int, cap: int) -> int:
  return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


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
  _require(c.workload in names, "workload", c.workload, f"known workloads: {', '.join(names)}")
  options = dict(c.workload_options) if c.workload_options is not None else {}
  try:
    workload = get_workload(c.workload, options)
  except TypeError as e:
    raise ConfigError("workload_options", options, str(e)) from e

  num_devices = c.num_devices or num_available_devices
  _require(isinstance(c.num_devices, int) and 0 <= c.num_devices <= num_available_devices,
           "num_devices", c.num_devices,
           f"must be between 1 and the {num_available_devices} available devices (0 = all)")
  global_batch = _positive_int(c, "global_batch")
  accum_steps = _positive_int(c, "accum_steps")
  _require(global_batch % (num_devices * accum_steps) == 0, "global_batch", global_batch,
           f"must be divisible by data-parallel devices x accum_steps = {num_devices} x "
           f"{accum_steps} = {num_devices * accum_steps}")
  train_size = workload.train_size
  if train_size is None and not workload.synthetic:
    # The workload did not declare its size (train_size is optional): load it to learn it.
    train_size = workload.data().num_train
  if train_size is not None:
    _require(global_batch <= train_size, "global_batch", global_batch,
             f"must be at most the {train_size}-example training set of {c.workload}")

  _require(c.lr_rule in scaling.LR_RULES, "lr_rule", c.lr_rule,
           f"must be one of {', '.join(scaling.LR_RULES)}")
  _require(c.optimizer in OPTIMIZERS, "optimizer", c.optimizer,
           f"must be one of {', '.join(OPTIMIZERS)}")
  _require(c.schedule in scaling.DECAYS, "schedule", c.schedule,
           f"must be one of {', '.join(scaling.DECAYS)}")
  for field in ("base_lr", "lr_multiplier"):
    _require(isinstance(c[field], (int, float)) and c[field] > 0 and math.isfinite(c[field]),
             field, c[field], "must be a positive finite number")
  _require(0 <= c.momentum < 1, "momentum", c.momentum, "must be in [0, 1)")
  _require(c.weight_decay >= 0, "weight_decay", c.weight_decay, "must be >= 0")
  reference_batch = _positive_int(c, "reference_batch")
  _require(isinstance(c.warmup_examples, int) and c.warmup_examples >= 0, "warmup_examples",
           c.warmup_examples, "must be an integer >= 0 (examples of linear warmup)")
  eval_every_examples = _positive_int(c, "eval_every_examples")
  max_examples = _positive_int(c, "max_examples", optional=True)
  max_steps = _positive_int(c, "max_steps", optional=True)
  if c.max_seconds is not None:
    _require(c.max_seconds > 0, "max_seconds", c.max_seconds, "must be a positive number")
  _require(max_examples or max_steps or c.max_seconds, "max_examples", max_examples,
           "a budget is required: set max_examples, max_steps or max_seconds")
  steps_per_call = c.steps_per_call
  _require(isinstance(steps_per_call, int) and steps_per_call >= 0, "steps_per_call",
           steps_per_call, "must be an integer >= 0 (0 = chosen by the harness)")
  if c.memory_budget_bytes is not None:
    _positive_int(c, "memory_budget_bytes")
  _require(isinstance(c.seed, int) and c.seed >= 0, "seed", c.seed, "must be an integer >= 0")
  checkpoint_every_examples = _positive_int(c, "checkpoint_every_examples", optional=True)
  _require(isinstance(c.get("fallback_to_previous_checkpoint", False), bool),
           "fallback_to_previous_checkpoint", c.get("fallback_to_previous_checkpoint"),
           "must be True or False")

  target = _resolve_target(c, workload)
  eval_every_steps = None if workload.synthetic else max(1, eval_every_examples // global_batch)
  if workload.synthetic:
    _require(max_steps or c.max_seconds, "max_steps", max_steps,
             f"{c.workload} is synthetic (no data to count examples of): set max_steps")

  # Steps fused per call: evals and a max_steps budget must fall on call boundaries.
  # An eval interval longer than max_steps never fires, so it constrains nothing.
  eval_boundary = eval_every_steps if not max_steps or (eval_every_steps or 0) <= max_steps else 0
  boundary = math.gcd(eval_boundary or 0, max_steps or 0)
  if steps_per_call == 0:
    want = max(1, min(MAX_AUTO_STEPS_PER_CALL, AUTO_EXAMPLES_PER_CALL // global_batch))
    steps_per_call = _largest_divisor_at_most(boundary, want) if boundary else want
    if eval_boundary and eval_boundary * 2 <= want:
      evals = _evals_per_call(workload, eval_boundary, want, max_steps)
      if evals > 1:
        steps_per_call = evals * eval_boundary
  elif boundary and boundary % steps_per_call:
    spans_evals = (eval_boundary and steps_per_call % eval_boundary == 0
                   and (not max_steps or max_steps % steps_per_call == 0))
    _require(spans_evals, "steps_per_call", steps_per_call,
             f"must divide the eval interval / max_steps ({boundary} steps), or be a multiple "
             f"of the eval interval ({eval_boundary} steps) that divides max_steps, so evals "
             "fall on call boundaries or at fixed points inside a call")

  budget_steps = None
  if max_examples:
    budget_steps = -(-scaling.examples_to_steps(max_examples, global_batch) // steps_per_call)
    budget_steps *= steps_per_call  # whole calls
  if max_steps:
    budget_steps = min(budget_steps or max_steps, max_steps)
  if c.schedule != "constant":
    _require(budget_steps is not None, "schedule", c.schedule,
             "a decaying schedule needs max_examples or max_steps as its horizon")

  lr = scaling.scaled_lr(c.base_lr, c.lr_rule, global_batch, reference_batch) * c.lr_multiplier
  return TrialSpec(
      workload=c.workload, workload_options=tuple(sorted(options.items())),
      global_batch=global_batch,
      per_device_batch=global_batch // (num_devices * accum_steps), accum_steps=accum_steps,
      num_devices=num_devices, steps_per_call=steps_per_call, optimizer=c.optimizer,
      momentum=float(c.momentum), weight_decay=float(c.weight_decay), base_lr=float(c.base_lr),
      reference_batch=reference_batch, lr_rule=c.lr_rule, lr_multiplier=float(c.lr_multiplier),
      lr=float(lr), schedule=c.schedule, warmup_examples=c.warmup_examples,
      warmup_steps=scaling.examples_to_steps(c.warmup_examples, global_batch),
      eval_every_examples=eval_every_examples, eval_every_steps=eval_every_steps,
      max_steps=budget_steps, max_seconds=c.max_seconds, target=target, seed=c.seed,
      train_size=train_size, memory_budget_bytes=c.memory_budget_bytes,
      checkpoint_every_examples=checkpoint_every_examples)


def _evals_per_call(workload, eval_steps: int, want_steps: int, max_steps: int | None) -> int:
  """How many eval intervals an auto call spans: the most that fit ``want_steps``,
  ``MAX_EVALS_PER_CALL`` and ``MAX_EVAL_SNAPSHOT_BYTES`` of parameter copies, with the
  call dividing ``max_steps``."""
  shapes = jax.eval_shape(workload.init, jax.random.key(0))
  param_bytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(shapes))
  cap = min(want_steps // eval_steps, MAX_EVALS_PER_CALL,
            max(1, MAX_EVAL_SNAPSHOT_BYTES // max(1, param_bytes)))
  fits = [m for m in range(1, cap + 1) if not max_steps or max_steps % (m * eval_steps) == 0]
  return max(fits, default=1)


def _resolve_target(c, workload) -> workloads_base.Target | None:
  if c.target_metric == NO_TARGET:
    return None
  if c.target_metric is None and c.target_value is None:
    return workload.target
  if workload.synthetic:
    raise ConfigError("target_metric", c.target_metric,
                      f"{workload.name} is synthetic and has no eval data; use 'none'")
  metric = c.target_metric or (workload.target.metric if workload.target else None)
  _require(metric in workload.metrics, "target_metric", metric,
           f"{workload.name} reports {', '.join(sorted(workload.metrics))} (or 'none')")
  m = workload.metrics[metric]
  value = c.target_value
  if value is None:
    _require(workload.target is not None and workload.target.metric == metric, "target_value",
             value, f"must be set for target metric {metric!r}")
    value = workload.target.value
  _require(isinstance(value, (int, float)) and m.low <= value <= m.high, "target_value", value,
           f"{metric} lies in [{m.low}, {m.high}]")
  return workloads_base.Target(metric, float(value), m.direction)


def check_workdir(workdir: str | None) -> str:
  """Checks that ``workdir`` can be created and written, without creating it.

  Returns:
    The absolute path.

  Raises:
    ConfigError: no workdir, or one that exists as a file or cannot be written.
  """
  if not workdir:
    raise ConfigError("workdir", workdir, "a writable directory path is required")
  path = os.path.abspath(os.path.expanduser(workdir))
  probe = path
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if not os.path.isdir(probe):
    raise ConfigError("workdir", workdir, f"{probe} exists and is not a directory")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ConfigError("workdir", workdir, f"{probe} is not writable")
  return path

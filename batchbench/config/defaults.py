"""Every field a trial takes, with its default, and the config-file argument parser.

A config file has ``get_config(arg)`` returning ``default_config()`` with a few
fields overridden. Configs hold no device facts: ``resolve()`` turns them into a
frozen ``TrialSpec`` for a given number of devices.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from batchbench.config.errors import ConfigError


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a ``get_config`` argument string ``"k=v,k2=v2"`` against ``defaults``.

  Values take the type of their default. Unknown keys raise ``ConfigError``.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"config arg {key}", value, f"known args: {', '.join(sorted(defaults))}")
    default = defaults[key]
    try:
      if isinstance(default, bool):
        out[key] = value.strip().lower() in ("1", "true", "yes", "")
      elif default is None:
        out[key] = value
      else:
        out[key] = type(default)(value)
    except ValueError as e:
      raise ConfigError(f"config arg {key}", value,
                        f"expected {type(default).__name__}") from e
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
  c.momentum = config_dict.placeholder(float)  # sgd only; None = 0.9
  c.weight_decay = 0.0  # sgd (L2 on the gradient) and adamw (decoupled); adam has none
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
  # Stop a trial at the eval that first meets the target; False trains on to the budget
  # (steps to target are recorded all the same), so final metrics compare at equal epochs.
  c.stop_at_target = True
  c.seed = 0
  # The dtype of the model's activations and matmuls (workload option `dtype` of the
  # workloads that take one); parameters and optimizer state stay float32. MFU is taken
  # against the peak of this dtype.
  c.compute_dtype = "float32"
  # The device's peak dense TFLOP/s for MFU; None: batchbench's table for the device kind
  # and compute_dtype (TPU v4/v5e/v5p/v6e, A100, H100, H200), no MFU where it has none.
  c.peak_tflops = config_dict.placeholder(float)
  c.memory_budget_bytes = config_dict.placeholder(int)
  # Checkpoints (kept under <workdir>/trials/<trial_id>/): one every this many examples
  # (at the next call boundary) and at the end; None = only at the end and on SIGTERM.
  c.checkpoint_every_examples = config_dict.placeholder(int)
  # A corrupted latest checkpoint is an error; True restores the previous one instead
  # (the row records it). A run option, not part of the trial's identity.
  c.fallback_to_previous_checkpoint = False
  # The gradient noise scale B_simple, measured in the train step from two batch sizes:
  # auto = when free (accumulation micro-batches, or 2+ devices for a model without
  # cross-example state); groups = also on one device, by splitting each batch's gradient
  # into `groups` groups (same FLOPs, summed in another order; 2 groups: a measured
  # step cost 9% more on CPU, 4 groups 17%, benchmarks/gns_cost.py); off.
  c.gns = ml_collections.ConfigDict()
  c.gns.mode = "auto"
  c.gns.groups = 2
  c.gns.ema = 0.95  # decay of the moving averages of |G|^2 and tr(Sigma), per measured step
  # Measure at steps 0, N, 2N, ... only; the steps between are the plain step. The norms
  # (and, for groups on one device, the split) cost a measured step a few % on CPU; every
  # 8th step keeps the whole within 2% (benchmarks/gns_cost.py). 1: every step.
  c.gns.every_steps = 8
  # The throughput phase: pure train calls per sweep point, timed in windows.
  c.throughput = ml_collections.ConfigDict()
  c.throughput.warmup_calls = 2  # discarded (the first call may still allocate)
  c.throughput.min_windows = 5  # at least this many timed windows ...
  c.throughput.min_seconds = 1.0  # ... and at least this much timed work
  c.throughput.max_seconds = 60.0  # stop adding windows after this much timed work
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
  # Extend the LR grid past an edge while the best LR (fewest steps to target, median over
  # seeds) sits on it: x factor (or / factor), up to max_extensions in each direction.
  c.sweep.lr_search = ml_collections.ConfigDict()
  c.sweep.lr_search.enabled = True
  c.sweep.lr_search.factor = 2.0
  c.sweep.lr_search.max_extensions = 3
  return c

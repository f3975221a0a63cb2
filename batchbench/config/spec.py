"""``TrialSpec``: one trial, validated and resolved, and the identities derived from it.

Three identities come out of a spec, each a stable hash of a dict:

* ``trial_id``: everything that can change the trial's result or what it measures
  (the learning rate and the seed among them, and ``MEASUREMENT_VERSION``). Rows
  and checkpoints are keyed by it; run options (checkpoint fallback) are not in it.
* ``program_key``: what the compiled train program depends on. The learning rate,
  the seed, the number of steps a call runs, the target and the budget are runtime
  values, so every LR and seed of a batch, and its throughput phase, share one program.
* ``point_id``: the throughput point of a batch: its program and the throughput
  phase's measurement settings.

``benchmark`` drops ``measurement_version`` from the identity: ``compare`` matches
tonight's rows to last night's by it, across code versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from batchbench.workloads.base import Target


def digest(d: dict[str, Any]) -> str:
  """A 12-hex-digit hash of a JSON-able dict (stable across runs and machines)."""
  blob = json.dumps(d, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class TrialSpec:
  """Everything one trial needs, validated and resolved for a device count."""

  workload: str
  workload_options: tuple[tuple[str, Any], ...]
  global_batch: int
  per_device_batch: int
  accum_steps: int
  num_devices: int
  steps_per_call: int  # K: the most steps one compiled call runs (a call may run fewer)
  optimizer: str
  momentum: float | None  # sgd only
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
  target: Target | None
  seed: int
  train_size: int | None
  throughput: tuple[tuple[str, Any], ...]  # the throughput phase's settings
  measurement_version: int
  num_processes: int = 1
  memory_budget_bytes: int | None = None
  checkpoint_every_examples: int | None = None  # None: only at the end / on preemption
  gns_source: str | None = None  # "micro_batches" | "groups" | None (not measured)
  gns_groups: int = 1  # groups a micro-batch's gradient is split into ("groups")
  gns_ema: float = 0.95
  gns_every: int = 1  # the norms are measured at steps 0, N, 2N, ... (1 when not measured)
  gns_note: str | None = None  # why the noise scale is not measured, when it is not
  stop_at_target: bool = True
  compute_dtype: str = "float32"
  peak_tflops: float | None = None  # the MFU denominator's override

  # Fields that change neither the result nor what is measured.
  NOT_IDENTITY = ("peak_tflops",)
  # Fields that enter the compiled program as runtime values, or not at all.
  NOT_PROGRAM = ("base_lr", "reference_batch",
                 "lr_rule", "lr_multiplier", "lr", "warmup_examples", "eval_every_examples",
                 "eval_every_steps", "max_steps", "max_seconds", "target", "seed",
                 "memory_budget_bytes", "checkpoint_every_examples", "throughput", "gns_ema",
                 "gns_note", "stop_at_target", "peak_tflops")

  @property
  def micro_batch(self) -> int:
    """Global examples per accumulation micro-batch (all devices)."""
    return self.global_batch // self.accum_steps

  @property
  def gns_batches(self) -> tuple[int, int] | None:
    """(B_small, B_big) of the noise-scale estimate, or None when it is not measured."""
    if self.gns_source == "micro_batches":
      return self.micro_batch, self.global_batch
    if self.gns_source == "groups":
      return self.micro_batch // self.gns_groups, self.global_batch
    return None

  @property
  def steps_per_epoch(self) -> int | None:
    return self.train_size // self.global_batch if self.train_size else None

  @property
  def throughput_settings(self) -> dict[str, Any]:
    return dict(self.throughput)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> TrialSpec:
    """Inverse of ``to_dict`` (used to hand a spec to a worker process)."""
    d = dict(d)
    for field in ("workload_options", "throughput"):
      d[field] = tuple(sorted(
          (k, tuple(v) if isinstance(v, list) else v) for k, v in d[field].items()))
    if d.get("target") is not None:
      d["target"] = Target(**d["target"])
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["workload_options"] = dict(self.workload_options)
    d["throughput"] = dict(self.throughput)
    return d

  def identity(self) -> dict[str, Any]:
    """``to_dict()`` without the fields that change neither result nor measurement."""
    d = self.to_dict()
    for field in self.NOT_IDENTITY:
      d.pop(field, None)
    return d

  @property
  def trial_id(self) -> str:
    """Stable hash of everything that determines the trial's result and measurement."""
    return digest(self.identity())

  def benchmark(self) -> dict[str, Any]:
    """The identity without the code version: what ``compare`` matches trials by."""
    d = self.identity()
    d.pop("measurement_version")
    return d

  def program_identity(self) -> dict[str, Any]:
    """What the compiled train program depends on. The schedule's horizon matters only
    when it decays."""
    d = {k: v for k, v in self.to_dict().items() if k not in self.NOT_PROGRAM}
    d["decay_steps"] = self.max_steps if self.schedule != "constant" else None
    return d

  @property
  def program_key(self) -> str:
    return digest(self.program_identity())

  def point_benchmark(self) -> dict[str, Any]:
    """The throughput point's identity without the code version (``compare`` key)."""
    d = self.program_identity()
    d.pop("measurement_version")
    d["throughput"] = self.throughput_settings
    return d

  @property
  def point_id(self) -> str:
    """Stable hash of the throughput point this trial's batch is measured at."""
    return digest({**self.point_benchmark(), "measurement_version": self.measurement_version})

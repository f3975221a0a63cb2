"""MLPerf-style logging: ``:::MLLOG {json}`` lines per trial, as mlcommons/logging writes them.

``MLLogObserver`` writes ``<workdir>/mllog/<trial_id>.log`` (and, optionally, the same
lines to a stream such as stdout). Each line is ``:::MLLOG `` followed by a JSON object
with, in this order, ``namespace``, ``time_ms`` (milliseconds since the epoch),
``event_type`` (``INTERVAL_START``, ``POINT_IN_TIME`` or ``INTERVAL_END``), ``key``,
``value`` and ``metadata`` (always ``file`` and ``lineno`` of the call site, as the
reference logger records them, plus the key's own fields). The keys are the standard
ones of ``mlperf_logging.mllog.constants``:

* ``run_start`` (INTERVAL_START) and ``run_stop`` (INTERVAL_END, metadata ``status``:
  ``success`` when the trial ended ok, else ``aborted``);
* ``seed``, ``global_batch_size``, ``gradient_accumulation_steps``, ``opt_name``,
  ``opt_base_learning_rate``, ``opt_learning_rate_warmup_steps``, ``train_samples``;
* ``eval_accuracy`` (POINT_IN_TIME, metadata ``epoch_num`` and ``samples_count``) at
  every eval that has an ``accuracy``; ``eval_loss`` likewise where there is one.

Writing the lines needs no ``mlperf-logging`` package. A resumed trial appends to its file
without a second ``run_start``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from batchbench.config import TrialSpec
from batchbench.runs.observe import TrialObserver

MLLOG_DIR = "mllog"
PREFIX = ":::MLLOG "
INTERVAL_START, POINT_IN_TIME, INTERVAL_END = "INTERVAL_START", "POINT_IN_TIME", "INTERVAL_END"


def encode(key: str, value: Any, event_type: str, time_ms: int,
           metadata: dict[str, Any] | None = None, namespace: str = "") -> str:
  """One ``:::MLLOG`` line, its fields in the reference logger's order."""
  return PREFIX + json.dumps({"namespace": namespace, "time_ms": time_ms,
                              "event_type": event_type, "key": key, "value": value,
                              "metadata": metadata or {}})


class MLLogObserver(TrialObserver):
  """Writes a trial's MLPerf-style log (see the module docstring)."""

  def __init__(self, workdir: str, *, stream: TextIO | None = None,
               clock: Callable[[], float] = time.time, write_file: bool = True):
    self.dir = os.path.join(workdir, MLLOG_DIR)
    self.stream, self.clock, self.write_file = stream, clock, write_file
    self.file: TextIO | None = None
    self.train_size: int | None = None

  def path(self, trial_id: str) -> str:
    return os.path.join(self.dir, f"{trial_id}.log")

  def _log(self, event_type: str, key: str, value: Any = None,
           metadata: dict[str, Any] | None = None) -> None:
    caller = sys._getframe(2)  # pylint: disable=protected-access  (the call site, as mllog does)
    meta = {"file": os.path.basename(caller.f_code.co_filename), "lineno": caller.f_lineno,
            **(metadata or {})}
    line = encode(key, value, event_type, int(self.clock() * 1e3), meta)
    for out in (self.file, self.stream):
      if out is not None:
        out.write(line + "\n")

  def on_start(self, spec: TrialSpec, step: int) -> None:
    self.close()
    self.train_size = spec.train_size
    if self.write_file:
      os.makedirs(self.dir, exist_ok=True)
      self.file = open(self.path(spec.trial_id), "a", encoding="utf-8")  # noqa: SIM115
    if step > 0:  # a resume: the run started in an earlier process
      return
    self._log(INTERVAL_START, "run_start", metadata={"trial_id": spec.trial_id})
    for key, value in (("submission_benchmark", spec.workload), ("seed", spec.seed),
                       ("global_batch_size", spec.global_batch),
                       ("gradient_accumulation_steps", spec.accum_steps),
                       ("opt_name", spec.optimizer), ("opt_base_learning_rate", spec.lr),
                       ("opt_learning_rate_warmup_steps", spec.warmup_steps),
                       ("train_samples", spec.train_size)):
      if value is not None:
        self._log(POINT_IN_TIME, key, value)

  def on_eval(self, step: int, examples: int, metrics: dict[str, float],
              b_simple: float | None) -> None:
    meta = {"samples_count": examples, "step": step}
    if self.train_size:
      meta["epoch_num"] = examples / self.train_size
    for name, key in (("accuracy", "eval_accuracy"), ("loss", "eval_loss")):
      if name in metrics:
        self._log(POINT_IN_TIME, key, float(metrics[name]), meta)

  def on_end(self, row: dict[str, Any]) -> None:
    self._log(INTERVAL_END, "run_stop", metadata={
        "status": "success" if row.get("status") == "ok" else "aborted",
        "batchbench_status": row.get("status"), "steps": row.get("steps"),
        "steps_to_target": row.get("steps_to_target")})
    self.close()

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
      self.file = None
    if self.stream is not None:
      self.stream.flush()

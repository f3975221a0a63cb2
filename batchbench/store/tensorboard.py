"""TensorBoard event files per trial: ``tensorboard --logdir <workdir>/tensorboard``.

``TensorBoardObserver`` writes, for each trial, under ``<workdir>/tensorboard/<trial_id>/``:

* against the step (that run): ``train/loss``, ``train/lr``, ``perf/samples_per_sec``
  (each timing window's), ``eval/<metric>`` for every eval metric, ``gns/b_simple`` (the
  gradient noise scale, where measured), and ``result/steps_to_target`` at the end;
* against examples seen (the run ``<trial_id>/examples``): the same tags under
  ``by_examples/``, so batches can be compared on one axis of data seen.

The writer is tensorboardX's ``FileWriter`` (no TensorFlow needed). Scalars are kept in
memory and handed to it at an eval at most every ``push_seconds`` (and at the end), one
event per step holding all of that step's values: its background thread then writes in
bursts, not during every timing window (see benchmarks/tensorboard_overhead.py). A
resumed trial starts new event files with a purge (``SessionLog.START``) just past its
resume step, so TensorBoard drops what the first attempt logged after the checkpoint and
the curves are not drawn twice.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from batchbench.config import TrialSpec
from batchbench.runs.observe import TrialObserver

TENSORBOARD_DIR = "tensorboard"
EXAMPLES_RUN = "examples"
PUSH_SECONDS = 30.0


class TensorBoardObserver(TrialObserver):
  """Writes a trial's curves as TensorBoard scalars (see the module docstring)."""

  def __init__(self, workdir: str, *, push_seconds: float = PUSH_SECONDS,
               clock: Callable[[], float] = time.time):
    self.root = os.path.join(workdir, TENSORBOARD_DIR)
    self.push_seconds, self.clock = push_seconds, clock
    self.writers = None
    self.pending: dict[tuple[int, int], tuple[float, dict[str, float]]] = {}
    self.pushed = 0.0

  def logdir(self, trial_id: str) -> str:
    return os.path.join(self.root, trial_id)

  def on_start(self, spec: TrialSpec, step: int) -> None:
    from tensorboardX.proto.event_pb2 import Event, SessionLog  # pylint: disable=g-import-not-at-top
    from tensorboardX.summary import text  # pylint: disable=g-import-not-at-top
    from tensorboardX.writer import FileWriter  # pylint: disable=g-import-not-at-top

    self.close()
    logdir = self.logdir(spec.trial_id)
    # tensorboardX names a file by the second and the host: a resume within the same
    # second would overwrite the first attempt's file. A nanosecond suffix keeps both, in
    # the order TensorBoard reads them (sorted by name).
    suffix = f".{time.time_ns():020d}"
    self.writers = (FileWriter(logdir, filename_suffix=suffix),
                    FileWriter(os.path.join(logdir, EXAMPLES_RUN), filename_suffix=suffix))
    self.pushed = self.clock()
    if step > 0:  # a resume: what was logged after ``step`` is logged again now
      for writer, purge in zip(self.writers, (step + 1, step * spec.global_batch + 1),
                               strict=True):
        writer.add_event(Event(step=purge, session_log=SessionLog(status=SessionLog.START)))
    else:
      self.writers[0].add_summary(text("spec", _spec_text(spec)), 0)

  def _scalars(self, step: int, examples: int, values: dict[str, float | None]) -> None:
    values = {k: float(v) for k, v in values.items() if v is not None}
    if self.writers is None or not values:
      return
    _, kept = self.pending.setdefault((step, examples), (self.clock(), {}))
    kept.update(values)

  def push(self) -> None:
    """Hands the kept scalars to the writers, one event per step and axis, and flushes."""
    from tensorboardX.proto.summary_pb2 import Summary  # pylint: disable=g-import-not-at-top

    if self.writers is None:
      return
    by_step, by_examples = self.writers
    for (step, examples), (wall, values) in sorted(self.pending.items()):
      by_step.add_summary(Summary(value=[Summary.Value(tag=k, simple_value=v)
                                         for k, v in values.items()]), step, wall)
      by_examples.add_summary(Summary(value=[
          Summary.Value(tag=f"by_examples/{k}", simple_value=v) for k, v in values.items()]),
          examples, wall)
    self.pending = {}
    for writer in self.writers:
      writer.flush()
    self.pushed = self.clock()

  def on_window(self, step: int, examples: int, samples_per_sec: float, loss: float,
                lr: float) -> None:
    self._scalars(step, examples, {"train/loss": loss, "train/lr": lr,
                                   "perf/samples_per_sec": samples_per_sec})

  def on_eval(self, step: int, examples: int, metrics: dict[str, float],
              b_simple: float | None) -> None:
    self._scalars(step, examples, {**{f"eval/{k}": v for k, v in metrics.items()},
                                   "gns/b_simple": b_simple})
    if self.clock() - self.pushed >= self.push_seconds:  # progress visible while it runs
      self.push()

  def on_end(self, row: dict[str, Any]) -> None:
    self._scalars(row.get("steps") or 0, row.get("examples") or 0,
                  {"result/steps_to_target": row.get("steps_to_target"),
                   "result/time_to_target_s": row.get("time_to_target_s")})
    self.close()

  def close(self) -> None:
    """Writes what is kept and closes the files (a trial stopped by preemption gets no
    ``on_end``: its scalars since the last push are lost and logged again on resume)."""
    if self.writers is not None:
      self.push()
      for writer in self.writers:
        writer.close()
      self.writers = None


def _spec_text(spec: TrialSpec) -> str:
  """The trial's resolved settings as a Markdown table (TensorBoard's Text tab)."""
  rows = [f"| {k} | {v} |" for k, v in sorted(spec.to_dict().items())]
  return "\n".join(["| field | value |", "|---|---|", *rows])

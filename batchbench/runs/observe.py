"""What watches a trial: observers that receive its progress outside the timed region.

TensorBoard event files and MLPerf-style log lines are observers; a sweep builds them
per trial from its run options.
"""

from __future__ import annotations

from typing import Any

from batchbench.config import TrialSpec


class TrialObserver:
  """Receives a trial's progress (TensorBoard, MLPerf logging). Every method is optional.

  Called outside the timed region: ``on_start`` once, ``on_window`` after every timing
  window, ``on_eval`` after every eval, ``on_end`` with the finished row (not when the
  trial stops for preemption; a resumed trial starts again with ``on_start``).
  """

  def on_start(self, spec: TrialSpec, step: int) -> None:
    """The trial starts (or resumes) at ``step``."""

  def on_window(self, step: int, examples: int, samples_per_sec: float, loss: float,
                lr: float) -> None:
    """A timing window ended at ``step``: its throughput, last loss and learning rate."""

  def on_eval(self, step: int, examples: int, metrics: dict[str, float],
              b_simple: float | None) -> None:
    """An eval at ``step``."""

  def on_end(self, row: dict[str, Any]) -> None:
    """The trial's result row."""

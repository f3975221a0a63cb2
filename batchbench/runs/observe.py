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


def observers_for(workdir: str, *, tensorboard: bool = False, mllog: bool = False,
                  mllog_stdout: bool = False,
                  process_index: int = 0) -> tuple[TrialObserver, ...]:
  """The observers a run's options ask for (only process 0 writes files).

  Args:
    workdir: the sweep's (or trial command's) workdir: TensorBoard event files go to
      ``<workdir>/tensorboard/<trial_id>``, MLPerf logs to ``<workdir>/mllog/<trial_id>.log``.
    tensorboard: write TensorBoard event files (``store.tensorboard``).
    mllog: write ``:::MLLOG`` lines (``store.mllog``).
    mllog_stdout: also print the ``:::MLLOG`` lines to stdout.
    process_index: this JAX process; other processes than 0 get no observers.

  Returns:
    New observers (build them per trial; each opens its files in ``on_start``).
  """
  if process_index != 0:
    return ()
  out: list[TrialObserver] = []
  if tensorboard:
    from batchbench.store.tensorboard import TensorBoardObserver  # pylint: disable=g-import-not-at-top
    out.append(TensorBoardObserver(workdir))
  if mllog or mllog_stdout:
    import sys  # pylint: disable=g-import-not-at-top

    from batchbench.store.mllog import MLLogObserver  # pylint: disable=g-import-not-at-top
    out.append(MLLogObserver(workdir, stream=sys.stdout if mllog_stdout else None,
                             write_file=mllog))
  return tuple(out)

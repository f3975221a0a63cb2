"""Time ledger and windowed throughput, with an injectable clock.

JAX dispatch is asynchronous, so the trial closes every timing window only after
``jax.block_until_ready`` on the step's outputs; this module just does the
arithmetic, which is why it takes the clock as an argument (tests pass a fake).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

Clock = Callable[[], float]

# Where a trial's wall time goes. ``input_wait`` is the part of ``train`` that the loop
# waited for inputs the host had not built ahead; every other bucket is disjoint
# (``profile``: train steps run under the profiler, outside every timed window).
BUCKETS = ("setup", "compile", "train", "input_wait", "eval", "checkpoint", "profile")


class TimeLedger:
  """Seconds spent per bucket, kept in ``seconds`` (a dict that may be shared).

  A trial passes its loop state's dict, so the ledger a checkpoint saves is this
  one, and a resumed trial keeps accumulating into the restored seconds.
  """

  def __init__(self, clock: Clock, seconds: dict[str, float] | None = None):
    self._clock = clock
    self.seconds = {b: 0.0 for b in BUCKETS} if seconds is None else seconds
    unknown = sorted(set(self.seconds) - set(BUCKETS))
    if unknown:
      raise KeyError(f"unknown time bucket(s) {unknown}; buckets: {BUCKETS}")
    for bucket in BUCKETS:
      self.seconds.setdefault(bucket, 0.0)

  def add(self, bucket: str, seconds: float) -> None:
    if bucket not in self.seconds:
      raise KeyError(f"unknown time bucket {bucket!r}; buckets: {BUCKETS}")
    self.seconds[bucket] += float(seconds)

  @contextlib.contextmanager
  def measure(self, bucket: str) -> Iterator[None]:
    start = self._clock()
    try:
      yield
    finally:
      self.add(bucket, self._clock() - start)

  @property
  def wall(self) -> float:
    """Seconds accounted for (``input_wait`` is inside ``train``)."""
    return sum(s for b, s in self.seconds.items() if b != "input_wait")

  def as_dict(self) -> dict[str, float]:
    return dict(self.seconds)


@dataclasses.dataclass(frozen=True)
class Window:
  examples: int
  steps: int
  seconds: float


class WindowTimer:
  """Times work in windows; the first ``warmup_windows`` are discarded.

  Usage: ``start()``, dispatch work, block on its outputs, ``stop(examples,
  steps)``. Statistics are taken over the steady-state windows. ``windows`` may be
  a list the caller keeps (a trial's loop state).
  """

  def __init__(self, clock: Clock, warmup_windows: int = 1,
               windows: list[Window] | None = None):
    self._clock = clock
    self._start: float | None = None
    self.warmup_windows = warmup_windows
    self.windows: list[Window] = [] if windows is None else windows

  def start(self) -> None:
    self._start = self._clock()

  def stop(self, examples: int, steps: int) -> float:
    """Closes the window; returns its seconds. Call after blocking on outputs."""
    if self._start is None:
      raise RuntimeError("WindowTimer.stop() called without start()")
    seconds = self._clock() - self._start
    self._start = None
    self.windows.append(Window(examples, steps, seconds))
    return seconds

  def steady(self) -> list[Window]:
    """Windows after warm-up (all of them if there are no more than warm-up)."""
    steady = self.windows[self.warmup_windows:]
    return steady or list(self.windows)

  def summary(self) -> dict[str, float | list[float] | int | None]:
    """``window_stats`` of the steady-state windows."""
    return window_stats(self.steady())


def window_stats(windows: list[Window]) -> dict[str, float | list[float] | int | None]:
  """Median and IQR of samples/sec, median step time, and the count of windows.

  Returns:
    ``samples_per_sec`` (median), ``samples_per_sec_iqr`` ([q25, q75]),
    ``step_time_ms`` (median), ``timed_windows``, and the raw per-window
    ``window_samples_per_sec``. Windows without time or steps are left out.
  """
  windows = [w for w in windows if w.seconds > 0 and w.steps > 0]
  if not windows:
    return {"samples_per_sec": None, "samples_per_sec_iqr": None, "step_time_ms": None,
            "timed_windows": 0, "window_samples_per_sec": []}
  rates = np.array([w.examples / w.seconds for w in windows])
  step_ms = np.array([1e3 * w.seconds / w.steps for w in windows])
  q25, q50, q75 = np.percentile(rates, [25, 50, 75])
  return {"samples_per_sec": float(q50), "samples_per_sec_iqr": [float(q25), float(q75)],
          "step_time_ms": float(np.median(step_ms)), "timed_windows": len(windows),
          "window_samples_per_sec": [float(r) for r in rates]}

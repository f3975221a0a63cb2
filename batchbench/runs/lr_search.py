"""The LR search of one batch: extend the grid until its best LR is bracketed.

The search starts from the config's multipliers of the rule's LR. After every
round (all seeds of the LRs it asked for), ``decide`` looks at the batch's trials:
while the best LR (fewest steps to target, median over seeds) is at an edge of
the LRs tried, it asks for the next LR beyond that edge (x ``factor``, or /
``factor`` below), up to ``max_extensions`` per direction. It stops with a reason:

* ``interior``: the best LR has a tried LR on each side, both slower to the target;
* ``diverged_beyond``: it has a tried LR on each side, but one of them diverged or
  missed the target (the optimum lies between; common just below the stability edge);
* ``limit``: the best LR is still at an edge after ``max_extensions`` extensions;
* ``none_reached``: no LR reached the target and no direction is left to try (the LR
  that came closest, by its final metric, is interior, or the extensions ran out).

Multipliers are rounded to 12 significant digits, so the same LR keeps the same
trial id across rounds and reruns; decisions depend only on the rows, so a
resumed sweep takes the same path.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from typing import Any

from batchbench.analysis.selection import lr_groups

REASONS = ("interior", "diverged_beyond", "limit", "none_reached")
Row = dict[str, Any]


def multiplier(value: float) -> float:
  """A multiplier as stored: 12 significant digits (stable across float arithmetic)."""
  return float(f"{value:.12g}")


@dataclasses.dataclass(frozen=True)
class Decision:
  """What to run next for a batch, or why its search stopped."""

  run: tuple[float, ...]  # multipliers to run next (empty when stopped)
  reason: str | None  # one of REASONS once stopped, else None
  best: float | None  # the best multiplier so far (None if none reached the target)
  tried: tuple[float, ...]

  def as_row(self, global_batch: int) -> dict[str, Any]:
    return {"global_batch": global_batch, "reason": self.reason, "best_lr_multiplier": self.best,
            "lr_multipliers": list(self.tried)}


def _progress(rows: list[Row]) -> float:
  """The median over seeds of the final target metric, oriented so that larger is better
  (-inf for a seed without one: diverged, failed, not evaluated)."""
  values = []
  for r in rows:
    target, final = r.get("target") or {}, r.get("final_eval") or {}
    value = final.get(target.get("metric"))
    if value is None or r["status"] in ("diverged", "oom", "error") or not math.isfinite(
        value):
      values.append(-math.inf)
    else:
      values.append(value if target.get("direction", "max") == "max" else -value)
  return statistics.median(values) if values else -math.inf


def _extensions(tried: Sequence[float], grid: Sequence[float], up: bool) -> int:
  edge = max(grid) if up else min(grid)
  return sum(1 for m in tried if (m > edge if up else m < edge))


def decide(rows: list[Row], grid: Sequence[float], *, factor: float = 2.0,
           max_extensions: int = 3) -> Decision:
  """The next multipliers to run for one batch, from its rows so far.

  Args:
    rows: every finished trial of this batch in this sweep (all seeds).
    grid: the config's multipliers (run first).
    factor: the extension step (> 1).
    max_extensions: extensions allowed in each direction.

  Returns:
    The decision: multipliers to run, or the reason the search stopped.
  """
  grid = sorted(multiplier(m) for m in grid)
  done = {multiplier(r["lr_multiplier"]) for r in rows}
  missing = tuple(m for m in grid if m not in done)
  if missing:
    return Decision(missing, None, None, tuple(sorted(done)))
  groups = {multiplier(g["lr_multiplier"]): g for g in lr_groups(rows)}
  tried = sorted(groups)

  def extend(up: bool, best: float | None) -> Decision:
    if _extensions(tried, grid, up) >= max_extensions:
      return Decision((), "limit" if best is not None else "none_reached", best, tuple(tried))
    edge = tried[-1] if up else tried[0]
    return Decision((multiplier(edge * factor if up else edge / factor),), None, best,
                    tuple(tried))

  hits = [m for m in tried if groups[m]["steps"] != math.inf]
  if not hits:
    # No LR reached the target: head towards the one that got closest (median final
    # value of the target metric; a diverged or unevaluated seed counts as worst). A
    # loss can explode and stay finite (chance accuracy, no NaN), so "not diverged"
    # alone does not mean "too small".
    progress = {m: _progress(groups[m]["rows"]) for m in tried}
    closest = max(tried, key=lambda m: (progress[m], -m))
    if progress[closest] == -math.inf or closest == tried[0]:
      return extend(False, None)  # everything failed, or the smallest LR did best
    if closest == tried[-1]:
      return extend(True, None)
    return Decision((), "none_reached", None, tuple(tried))
  best = min(hits, key=lambda m: (groups[m]["steps"], m))
  i = tried.index(best)
  if i == len(tried) - 1:
    return extend(True, best)
  if i == 0:
    return extend(False, best)
  neighbours = (groups[tried[i - 1]], groups[tried[i + 1]])
  bracketed = all(g["steps"] != math.inf for g in neighbours)
  return Decision((), "interior" if bracketed else "diverged_beyond", best, tuple(tried))

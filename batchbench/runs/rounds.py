"""The sweep's LR-search rounds: when each is decided, and who runs its trials.

A batch's search goes in rounds: its grid, then each set of LRs ``lr_search.decide``
asks for (a spec per seed). A round is decided from the rows of every trial of the
batch so far, so only once they are all in ``results.jsonl``.

Unsplit, they are: this process has just run them, and each batch's search runs to
its end before the next batch starts. Split across shards (``runs.shard``), some
rows come from other processes. A shard runs its slice of each round, then takes
the next round of whichever batch has all its rows (earliest batch first), reading
the other shards' rows as they come, and pauses only when no batch can go on. Every
shard takes every decision from the same rows, so the decisions, and the trials each
round adds, are those of the unsplit sweep.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, Protocol

from batchbench import fmt
from batchbench.config import TrialSpec
from batchbench.core import distributed
from batchbench.runs import lr_search
from batchbench.runs import shard as shard_lib
from batchbench.store import results

# Starts the error of every trial of a batch whose throughput point failed.
POINT_FAILED = "the throughput point of this batch failed"


@dataclasses.dataclass
class BatchSearch:
  """One batch's trials so far (its grid, then each round's) and whether its search
  has ended."""

  specs: list[TrialSpec]
  done: bool = False


class Run(Protocol):
  """What the rounds need of a sweep's run (``sweep._Run``)."""

  workdir: str
  rows: dict[str, dict[str, Any]]
  shard: shard_lib.Shard
  log: Callable[[str], None]

  def refresh(self) -> int: ...
  def trials(self, specs: list[TrialSpec]) -> None: ...
  def check_preempted(self) -> None: ...


class Rounds:
  """Takes the LR-search rounds of a sweep's batches as their rows come in."""

  def __init__(self, run: Run, search: Any):  # search: sweep.LRSearch
    self.run, self.search = run, search

  def _complete(self, batches: list[BatchSearch]) -> int:
    """The first batch whose search goes on and whose rows are all in; -1 if none."""
    for i, b in enumerate(batches):
      if not b.done and all(s.trial_id in self.run.rows for s in b.specs):
        return i
    return -1

  def _ready(self, batches: list[BatchSearch]) -> int:
    """``_complete`` as process 0 of the shard sees it, after reading others' rows."""
    index = self._complete(batches)
    if index < 0 and self.run.shard.split:
      self.run.refresh()
      index = self._complete(batches)
    return distributed.from_process_0(index)  # once per call: every process calls it as often

  def advance(self, batches: list[BatchSearch]) -> None:
    """Takes every round whose rows are in, earliest batch first."""
    while (i := self._ready(batches)) >= 0:
      waiter = shard_lib.Waiter(self.run.shard, lambda _: None)
      while missing := [s for s in batches[i].specs if s.trial_id not in self.run.rows]:
        # Process 0 of this shard has them: they are on their way to this process.
        waiter.pause(len(self.run.rows),
                     lambda m=missing: shard_lib.describe(m, self.run.shard.count))
        self.run.refresh()
      self._round(batches[i])

  def settle(self, batches: list[BatchSearch]) -> None:
    """Takes the remaining rounds, pausing for other shards' rows when none can go on.

    Raises:
      shard_lib.ShardTimeout: no new row for the shard's timeout.
    """
    run = self.run
    waiter = shard_lib.Waiter(run.shard, run.log)
    while True:
      self.advance(batches)
      if all(b.done for b in batches):  # the same in every process of the shard
        return
      run.check_preempted()
      awaited = [s for b in batches if not b.done for s in b.specs
                 if s.trial_id not in run.rows]
      try:
        waiter.pause(run.refresh(), lambda: shard_lib.describe(awaited, run.shard.count))
        timeout = None
      except shard_lib.ShardTimeout as e:
        timeout = e
      if distributed.agree_any(timeout is not None):  # all processes give up together
        raise timeout or shard_lib.ShardTimeout(
            f"shard {run.shard.label}: another process of this shard gave up waiting")

  def _round(self, batch: BatchSearch) -> None:
    """Decides one round of a batch's search from its rows, and runs this shard's part."""
    run, search = self.run, self.search
    spec = batch.specs[0]
    rows = [run.rows[s.trial_id] for s in batch.specs]
    if spec.target is None or all(POINT_FAILED in (r.get("error") or "") for r in rows):
      batch.done = True  # nothing to bracket: no target, or the batch failed
      return
    decision = lr_search.decide(rows, search.grid, factor=search.factor,
                                max_extensions=search.max_extensions)
    head = f"  LR search, batch {spec.global_batch}:"
    if not decision.run:
      batch.done = True
      run.log(f"{head} {decision.reason} (best "
              + (f"x{decision.best:g})" if decision.best is not None else "none)"))
      self._record({**decision.as_row(spec.global_batch), "point_id": spec.point_id,
                    "grid": list(search.grid), "factor": search.factor,
                    "max_extensions": search.max_extensions})
      return
    tries = f"x{', x'.join(f'{m:g}' for m in decision.run)}"
    run.log(f"{head} best x{decision.best:g} is at an edge; trying {tries}"
            if decision.best is not None else
            f"{head} no LR reached the target; trying {tries}")
    new = [s for m in decision.run for s in search.extend(spec.global_batch, m)]
    batch.specs += new
    run.trials(new)

  def _record(self, record: dict[str, Any]) -> None:
    """Appends why a batch's search stopped, unless the same record is there already:
    every shard takes every decision, and the first to take it records it (so a
    report written once all rows are in finds every record)."""
    if shard_lib.process_index() != 0:
      return
    path = f"{self.run.workdir}/{results.LR_SEARCH_FILE}"
    record = json.loads(json.dumps(fmt.to_jsonable(record)))
    with shard_lib.workdir_lock(self.run.workdir, "lr_search", self.run.shard):
      if record not in results.read_jsonl(path):
        results.append_jsonl(path, record)

"""A sweep split across machines: ``batchbench sweep --shard=I/N``.

N processes (SLURM array tasks, separate machines, or several on one) run the same
sweep command on one shared workdir, each with its own ``--shard=I/N``. I is 0-based,
0..N-1, like ``SLURM_ARRAY_TASK_ID`` of ``--array=0-(N-1)``.

* **Which trials.** Shard I runs the trials with ``slice_of(trial_id, N) == I``: the
  SHA-256 of the trial id modulo N (not Python's ``hash``, which is salted per
  process). A trial's slice depends on its identity alone: it is the same in every
  shard, on resume, and for the trials that the LR search adds later.
* **Throughput points.** A batch's point is shared by its trials, which may lie in
  several shards. A shard holds ``locks/point-<point_id>.lock`` while it obtains the
  point: the first one measures it and appends the row, and any other shard waits for
  the lock, then reads that row. A point is measured once, and two shards never measure
  the same point at the same time. (A point that failed is not recorded: each shard
  that needs it tries it once, in turn.)
* **LR-search rounds** (``runs.rounds``). Every shard follows every batch's search. A
  round's decision needs the rows of the whole round, so it is taken once they are all
  in ``results.jsonl`` (from every shard), by the same ``lr_search.decide`` over the
  same rows as an unsplit sweep: the same decisions, in every shard. The next round's
  trials are sliced by identity again. While a batch waits, the shard works on any
  other batch whose round is complete, and pauses only when nothing can run; a pause
  gives up after ``timeout_s`` without a new row from any shard, with ``ShardTimeout``
  (exit status 4) naming the missing trials and their shards.
* **Shared files.** Rows are appended under the file's lock (``store.results``). Why a
  batch's search stopped goes to ``lr_search.jsonl`` once: the first shard to take that
  decision appends it, under ``locks/lr_search.lock``, unless the same record is there.
  Shard 0 writes ``run_meta.json``; each shard its own ``shards/run_meta-I-of-N.json``.
* **One report.** A shard that ends takes ``locks/report.lock``; if every trial of the
  sweep (``run_sweep``'s ``planned``) has a row, it writes the report from the merged
  rows, the one an unsplit sweep writes, and records which trials it was made from in
  ``report/shards.json``, so the shards that end after it do not write it again. A
  shard that ends while others still run prints the ``batchbench report`` command; the
  last one to end writes the report.

Within a shard of several JAX processes (a multi-host shard), process 0 holds the
locks and decides which round to take next (``distributed.from_process_0``); the
others follow it, so all its processes run the same calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence

from batchbench import fmt
from batchbench.config import ConfigError
from batchbench.store import results

LOCK_DIR = "locks"
SHARD_DIR = "shards"
REPORT_STAMP = "shards.json"  # in <workdir>/report/: the trials the report was made from
DEFAULT_TIMEOUT_S = 6 * 3600.0
MAX_POLL_S = 5.0
PROGRESS_EVERY_S = 60.0
TIMEOUT_EXIT_CODE = 4
Log = Callable[[str], None]


class ShardTimeout(RuntimeError):
  """Other shards' rows did not come within the timeout."""


@dataclasses.dataclass(frozen=True)
class Shard:
  """Slice ``index`` of ``count``, and how long to wait for the other slices."""

  index: int = 0
  count: int = 1
  timeout_s: float = DEFAULT_TIMEOUT_S  # without a new row from any shard
  poll_s: float = 0.5  # the first poll interval of a pause; grows to MAX_POLL_S

  @property
  def label(self) -> str:
    return f"{self.index}/{self.count}"

  @property
  def split(self) -> bool:
    return self.count > 1

  def owns(self, trial_id: str) -> bool:
    return slice_of(trial_id, self.count) == self.index

  def mine(self, specs: Sequence) -> list:
    """Those of ``specs`` (anything with a ``trial_id``) in this slice, in order."""
    return [s for s in specs if self.owns(s.trial_id)]


UNSPLIT = Shard()


def slice_of(trial_id: str, count: int) -> int:
  """The slice (0..count-1) of a trial: a stable hash of its id, modulo ``count``."""
  digest = hashlib.sha256(trial_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % count


def parse(text: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Shard:
  """``"I/N"`` (0-based I) as a ``Shard``.

  Raises:
    ConfigError: naming ``--shard``, the value and what is valid.
  """
  match = re.fullmatch(r"(\d+)/(\d+)", str(text))
  valid = ("--shard=I/N runs slice I of N, 0-based (I in 0..N-1, like "
           "SLURM_ARRAY_TASK_ID), e.g. --shard=0/4 ... --shard=3/4")
  if match is None:
    raise ConfigError("shard", text, valid)
  index, count = int(match.group(1)), int(match.group(2))
  if count < 1:
    raise ConfigError("shard", text, f"N must be at least 1; {valid}")
  if index >= count:
    raise ConfigError("shard", text, f"I={index} is not in 0..{count - 1}; {valid}")
  if not timeout_s > 0:
    raise ConfigError("shard_timeout", timeout_s, "must be a positive number of seconds")
  return Shard(index, count, float(timeout_s))


# --- one shard of several JAX processes -----------------------------------------------

def process_index() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


def barrier(name: str) -> None:
  """Waits until every process of this shard got here (nothing with one process)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# --- locks ---------------------------------------------------------------------------------

def _lock_path(workdir: str, name: str) -> str:
  os.makedirs(os.path.join(workdir, LOCK_DIR), exist_ok=True)
  return os.path.join(workdir, LOCK_DIR, f"{name}.lock")


def check_locks(workdir: str) -> None:
  """Raises ``ConfigError`` unless ``workdir``'s filesystem has file locks."""
  try:
    with results.file_lock(_lock_path(workdir, "probe")):
      pass
  except OSError as e:
    raise ConfigError("workdir", workdir, "--shard needs a filesystem with file locks "
                      f"(flock) that every host shares ({e.strerror or e})") from None


@contextlib.contextmanager
def point_lock(workdir: str, point_id: str, shard: Shard, log: Log) -> Iterator[None]:
  """Held around obtaining a throughput point: one shard measures it, the others then
  read its row. Unsplit, nothing is locked."""
  if not shard.split:
    yield
    return
  if process_index() != 0:
    barrier(f"point {point_id}")  # process 0 holds the lock: throughput.jsonl is settled
    yield
    return

  def on_wait():
    log(f"  shard {shard.label}: another shard is measuring throughput point "
        f"{point_id[:12]}; waiting to reuse it")

  with results.file_lock(_lock_path(workdir, f"point-{point_id}"), on_wait=on_wait):
    barrier(f"point {point_id}")
    yield


@contextlib.contextmanager
def workdir_lock(workdir: str, name: str, shard: Shard = UNSPLIT) -> Iterator[None]:
  """``locks/<name>.lock`` held for a read-modify-write of a shared file; unsplit
  (``shard`` of one), nothing is locked."""
  if not shard.split:
    yield
    return
  with results.file_lock(_lock_path(workdir, name)):
    yield


def report_lock(workdir: str) -> contextlib.AbstractContextManager[None]:
  return results.file_lock(_lock_path(workdir, "report"))


# --- waiting for the other shards ----------------------------------------------------------

class Waiter:
  """Paces a shard's pauses for other shards' rows: polling, progress lines, timeout.

  The timeout counts from the last time the number of rows changed, so a pause may
  last as long as the other shards keep finishing trials.
  """

  def __init__(self, shard: Shard, log: Log, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep):
    self.shard, self.log, self.clock, self.sleep = shard, log, clock, sleep
    self.count: int | None = None
    self.since = self.logged = 0.0
    self.interval = shard.poll_s

  def pause(self, count: int, awaited: Callable[[], str]) -> None:
    """Sleeps one poll interval, given ``count`` rows now and what is awaited.

    Raises:
      ShardTimeout: no new row for ``shard.timeout_s``.
    """
    now = self.clock()
    if count != self.count:
      self.count, self.since, self.interval = count, now, self.shard.poll_s
      self.logged = now - PROGRESS_EVERY_S  # say so at once
    waited = now - self.since
    if waited >= self.shard.timeout_s:
      raise ShardTimeout(
          f"shard {self.shard.label}: no new trial row for {fmt.duration(waited)} "
          f"(--shard_timeout={self.shard.timeout_s:g}) while waiting for {awaited()}. "
          "Are those shards still running? Rerun any that stopped with its own --shard "
          "(it resumes), then rerun this one; or raise --shard_timeout above the longest "
          "trial")
    if now - self.logged >= PROGRESS_EVERY_S:
      self.logged = now
      since = f"no new row for {fmt.duration(waited)}; " if waited >= 1 else ""
      self.log(f"  shard {self.shard.label}: waiting for {awaited()} ({since}gives up "
               f"after {fmt.duration(self.shard.timeout_s)} without one)")
    self.sleep(max(0.0, min(self.interval, self.shard.timeout_s - waited)))
    self.interval = min(self.interval * 1.5, max(MAX_POLL_S, self.shard.poll_s))


def describe(specs: Sequence, count: int, limit: int = 6) -> str:
  """``"3 trial(s) of other shards: B=64 x2 seed 0 (shard 2), ..."``."""
  parts = [f"B={s.global_batch} x{s.lr_multiplier:g} seed {s.seed} (shard "
           f"{slice_of(s.trial_id, count)})" for s in specs[:limit]]
  more = f", and {len(specs) - limit} more" if len(specs) > limit else ""
  return f"{len(specs)} trial(s) of other shards: {', '.join(parts)}{more}"


# --- the one report ----------------------------------------------------------------------

def _stamp(planned: Sequence[str], deadline_s: float | None) -> dict:
  digest = hashlib.sha256("\n".join(sorted(planned)).encode("utf-8")).hexdigest()
  return {"trials": len(planned), "trial_ids_sha256": digest, "deadline_s": deadline_s}


def _stamp_path(workdir: str) -> str:
  from batchbench.report.render import REPORT_DIR  # pylint: disable=g-import-not-at-top
  return os.path.join(workdir, REPORT_DIR, REPORT_STAMP)


def report_state(workdir: str, planned: Sequence[str],
                 deadline_s: float | None) -> tuple[str, int]:
  """Whether the sweep's report is due; call it under ``report_lock``.

  Returns:
    ``("incomplete", n)`` with n trials still without a row, ``("written", 0)`` when a
    report of exactly these trials exists, else ``("due", 0)``.
  """
  done = {r["trial_id"] for r in results.read_results(workdir)}
  missing = sum(t not in done for t in set(planned))
  if missing:
    return "incomplete", missing
  try:
    with open(_stamp_path(workdir), encoding="utf-8") as f:
      written = json.load(f) == _stamp(planned, deadline_s)
  except (OSError, ValueError):
    written = False
  return ("written" if written else "due"), 0


def mark_reported(workdir: str, planned: Sequence[str], deadline_s: float | None) -> None:
  """Records that ``report/`` was written from every trial of ``planned``."""
  results.atomic_write_text(_stamp_path(workdir),
                            json.dumps(_stamp(planned, deadline_s), indent=2))


def _meta_path(workdir: str, index: int, count: int) -> str:
  return os.path.join(workdir, SHARD_DIR, f"run_meta-{index}-of-{count}.json")


def write_meta(workdir: str, shard: Shard, run_meta: dict, grid: Sequence[str],
               log: Log) -> None:
  """Writes this shard's run metadata (``store.meta.run_metadata``) beside the other
  shards', with a digest of its grid's trial ids, and warns about any other shard of
  this split whose grid differs (another config, or other devices or processes: trial
  ids include them, so the shards would wait for trials that no shard runs)."""
  os.makedirs(os.path.join(workdir, SHARD_DIR), exist_ok=True)
  digest = hashlib.sha256("\n".join(sorted(grid)).encode("utf-8")).hexdigest()
  results.atomic_write_text(
      _meta_path(workdir, shard.index, shard.count),
      json.dumps(fmt.to_jsonable({**run_meta, "shard": shard.label,
                                  "grid_trial_ids_sha256": digest}), indent=2, sort_keys=True))
  for i in range(shard.count):
    try:
      with open(_meta_path(workdir, i, shard.count), encoding="utf-8") as f:
        other = json.load(f)
    except (OSError, ValueError):
      continue
    if other.get("grid_trial_ids_sha256") not in (None, digest):
      log(f"warning: shard {i}/{shard.count} (host {other.get('host')}, started "
          f"{other.get('time_utc')}) planned other trials than this shard: its config, "
          f"devices ({other.get('device_count')} {other.get('device_kind')}) or processes "
          f"({other.get('process_count')}) differ. If it is running now, the shards will "
          "wait for trials that no shard runs: run every shard with the same command on "
          "the same kind of machine")

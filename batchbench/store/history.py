"""The benchmark history: each run's summary, appended to one SQLite file.

``<DIR>/history.sqlite`` holds three tables:

* ``runs``: one row per recorded run (``run_id``, its time, source, git commit);
* ``series``: one row per fingerprint, with the benchmark, machine and software it stands
  for and a label a person recognises;
* ``entries``: the summary of one point, trial or probe in one run (``analysis.summaries``:
  raw windows, FLOPs, compiled peak, steps and time to target), as JSON.

A **fingerprint** is the hash of benchmark identity + machine (device kind and count,
host CPU) + software versions (jax, jaxlib, flax, optax, Python, measurement version),
not the git commit: the code is what the history tracks. A new jax, another machine or
a new measurement version starts a new series instead of looking like a regression.

Why SQLite: it is in Python's standard library (no new dependency); every append is one
transaction, so a nightly job killed mid-write leaves the history as it was, and two jobs
appending at once are serialised by its file lock; the baseline query (the last K runs
of each fingerprint) is one indexed SELECT; the store is one file to copy or back up.
Parquet would need pyarrow and one new file per run (no in-place append) and no
transactions. Keep the file on a local disk: SQLite's locking is not reliable on network
file systems.
"""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
from collections.abc import Iterable
from typing import Any

from batchbench.analysis import summaries
from batchbench.analysis.compare import Side
from batchbench.config import ConfigError
from batchbench.config.spec import digest

HISTORY_FILE = "history.sqlite"
KINDS = ("point", "trial", "probe")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run_id TEXT PRIMARY KEY, time_utc TEXT NOT NULL, recorded_utc TEXT NOT NULL,
  source TEXT, git_commit TEXT, label TEXT);
CREATE TABLE IF NOT EXISTS series (
  fingerprint TEXT PRIMARY KEY, kind TEXT NOT NULL, label TEXT NOT NULL,
  benchmark TEXT NOT NULL, machine TEXT NOT NULL, software TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
  run_id TEXT NOT NULL REFERENCES runs(run_id),
  fingerprint TEXT NOT NULL REFERENCES series(fingerprint),
  summary TEXT NOT NULL, PRIMARY KEY (run_id, fingerprint));
CREATE INDEX IF NOT EXISTS entries_by_fingerprint ON entries(fingerprint);
"""
Row = dict[str, Any]


def _now() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat()


def fingerprint(kind: str, summary: Row) -> tuple[str, Row, Row]:
  """``(fingerprint, machine, software)`` of a point, trial or probe summary."""
  env = summary.get("provenance") or {}
  machine = {k: env.get(k) for k in summaries.MACHINE_FIELDS}
  software = {k: env.get(k) for k in summaries.SOFTWARE_FIELDS}
  return digest({"kind": kind, "benchmark": summary.get("benchmark"), "machine": machine,
                 "software": software}), machine, software


def side_entries(side: Side) -> list[tuple[str, Row]]:
  """``(kind, summary)`` of every point, trial and probe of ``side``."""
  return ([("point", summaries.point_summary(p)) for p in side.points]
          + [("trial", summaries.trial_summary(t)) for t in side.trials]
          + [("probe", summaries.probe_summary(p)) for p in side.probes])


def run_id_of(side: Side) -> str:
  """The id a run of ``side`` gets: the hash of its summaries."""
  return digest({"entries": side_entries(side)})


def _label(kind: str, summary: Row) -> str:
  if kind == "point":
    return summaries.point_label(summary)
  if kind == "trial":
    return summaries.trial_label(summary)
  return summaries.probe_label(summary)


class History:
  """A history store in ``directory`` (``history.sqlite``). Use as a context manager.

  Raises:
    ConfigError: the directory has no history (``create=False``) or cannot hold one.
  """

  def __init__(self, directory: str, *, create: bool = False):
    self.path = os.path.join(directory, HISTORY_FILE)
    if not create and not os.path.exists(self.path):
      raise ConfigError("history", directory, f"has no {HISTORY_FILE}; record a run there "
                        "first (compare --history=DIR, or scripts/nightly.sh with HISTORY=DIR)")
    try:
      if create:
        os.makedirs(directory, exist_ok=True)
      self.db = sqlite3.connect(self.path, timeout=60)
      self.db.executescript(_SCHEMA)
    except (OSError, sqlite3.Error) as e:
      raise ConfigError("history", directory, f"cannot open {self.path} as a SQLite history "
                        f"({e}); give a writable local directory") from e

  def __enter__(self) -> History:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self.db.close()

  def record(self, side: Side, *, time_utc: str | None = None,
             label: str | None = None) -> tuple[str, bool]:
    """Appends ``side`` as one run; ``(run_id, added)``. A run already there is not added
    again (its id is the hash of its summaries)."""
    entries = side_entries(side)
    run_id = run_id_of(side)
    if self.db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone():
      return run_id, False
    times = [s.get("time_utc") for k, s in entries if k == "point" and s.get("time_utc")]
    commits = [(s.get("provenance") or {}).get("git_commit") for _, s in entries]
    with self.db:  # one transaction: all of the run or none of it
      self.db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)", (
          run_id, time_utc or (max(times) if times else _now()), _now(), side.source,
          next((c for c in commits if c), None), label))
      for kind, summary in entries:
        fp, machine, software = fingerprint(kind, summary)
        self.db.execute("INSERT OR IGNORE INTO series VALUES (?, ?, ?, ?, ?, ?)", (
            fp, kind, _label(kind, summary), json.dumps(summary.get("benchmark"),
                                                        sort_keys=True, default=str),
            json.dumps(machine, sort_keys=True), json.dumps(software, sort_keys=True)))
        self.db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)", (
            run_id, fp, json.dumps(summary, sort_keys=True, default=str)))
    return run_id, True

  def runs(self) -> list[Row]:
    """Every recorded run, oldest first."""
    cur = self.db.execute("SELECT run_id, time_utc, source, git_commit, label FROM runs "
                          "ORDER BY time_utc, recorded_utc")
    return [dict(zip(("run_id", "time_utc", "source", "git_commit", "label"), r, strict=True))
            for r in cur]

  def _entries(self, fps: Iterable[str]) -> dict[str, list[tuple[str, str, Row]]]:
    """Per fingerprint: ``(run_id, time_utc, summary)``, oldest run first."""
    out: dict[str, list[tuple[str, str, Row]]] = {}
    for fp in fps:
      cur = self.db.execute(
          "SELECT e.run_id, r.time_utc, e.summary FROM entries e JOIN runs r USING (run_id) "
          "WHERE e.fingerprint = ? ORDER BY r.time_utc, r.recorded_utc", (fp,))
      out[fp] = [(run_id, t, json.loads(s)) for run_id, t, s in cur]
    return out

  def baseline(self, side: Side, runs: int = 1, exclude: str | None = None) -> Side:
    """A baseline for ``side``: each of its points, trials and probes from the last
    ``runs`` recorded runs that have its fingerprint (not run ``exclude``), combined
    (``summaries.combine_points`` / ``combine_trials``; a probe from the latest run)."""
    wanted = {fingerprint(kind, s)[0]: kind for kind, s in side_entries(side)}
    found = self._entries(wanted)
    out = Side(source=f"{self.path} (last {runs} run(s))", runs=runs)
    for fp, kind in wanted.items():
      last = [s for run_id, _, s in found[fp] if run_id != exclude][-runs:]
      if not last:
        continue
      if kind == "point":
        out.points.append(summaries.combine_points(last))
      elif kind == "trial":
        out.trials.append(summaries.combine_trials(last))
      else:
        out.probes.append(last[-1])
    return out

  def series(self) -> list[Row]:
    """Every series: ``fingerprint``, ``kind``, ``label``, ``benchmark``, ``machine``,
    ``software`` and its ``entries`` (``run_index`` in ``runs()``, ``run_id``, ``time_utc``,
    ``git_commit``, ``summary``), oldest first."""
    index = {r["run_id"]: (i, r) for i, r in enumerate(self.runs())}
    cur = self.db.execute("SELECT fingerprint, kind, label, benchmark, machine, software "
                          "FROM series ORDER BY kind, label")
    out = []
    for fp, kind, label, bench, machine, software in cur.fetchall():
      entries = [{"run_index": index[run_id][0], "run_id": run_id, "time_utc": t,
                  "git_commit": index[run_id][1]["git_commit"], "summary": s}
                 for run_id, t, s in self._entries([fp])[fp]]
      out.append({"fingerprint": fp, "kind": kind, "label": label,
                  "benchmark": json.loads(bench), "machine": json.loads(machine),
                  "software": json.loads(software), "entries": entries})
    return out

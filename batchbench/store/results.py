"""Append-only JSONL stores in the workdir, read back whole, and atomic file writes.

* ``results.jsonl``: one row per finished trial, keyed by ``trial_id``
  (schema: ``batchbench.runs.rows``).
* ``throughput.jsonl``: one row per measured throughput point, keyed by ``point_id``
  (schema: ``batchbench.runs.throughput``).

A line is written whole with one ``write`` on a file opened for appending and
fsynced before the next one, so a kill leaves at most one torn last line, which
readers skip; several processes appending to one file (a sweep split across
hosts) never interleave within a line. When a key appears more than once, the
last row wins.
"""

from __future__ import annotations

import json
import os
from typing import Any

from batchbench.fmt import to_jsonable

RESULTS_FILE = "results.jsonl"
THROUGHPUT_FILE = "throughput.jsonl"
LR_SEARCH_FILE = "lr_search.jsonl"  # why each batch's LR search stopped (runs.lr_search)
KEYS = {RESULTS_FILE: "trial_id", THROUGHPUT_FILE: "point_id"}
STATUSES = ("ok", "target_not_reached", "diverged", "oom", "error")


def append_jsonl(path: str, row: dict[str, Any]) -> None:
  """Appends one JSON object to ``path`` durably (one write, then fsync).

  A torn tail left by an earlier kill is first closed with a newline so that the
  new row starts on a line of its own.
  """
  line = json.dumps(to_jsonable(row), sort_keys=True, allow_nan=False)
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    size = os.fstat(fd).st_size
    prefix = ""
    if size:
      with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) != b"\n":
          prefix = "\n"
    os.write(fd, (prefix + line + "\n").encode())
    os.fsync(fd)
  finally:
    os.close(fd)


def read_jsonl(path: str, key: str | None = None) -> list[dict[str, Any]]:
  """Every complete JSON object of ``path``, torn lines skipped; deduplicated by ``key``
  (the last row of a key wins, in the position of its last appearance)."""
  if not os.path.exists(path):
    return []
  rows: dict[Any, dict[str, Any]] = {}
  with open(path, encoding="utf-8", errors="replace") as f:
    for i, line in enumerate(f):
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if not isinstance(row, dict) or (key is not None and key not in row):
        continue
      k = row[key] if key is not None else i
      rows.pop(k, None)
      rows[k] = row
  return list(rows.values())


def append_row(workdir: str, row: dict[str, Any], file: str = RESULTS_FILE) -> None:
  """Appends a trial row (or, with ``file=THROUGHPUT_FILE``, a throughput point)."""
  append_jsonl(os.path.join(workdir, file), row)


def read_results(workdir: str) -> list[dict[str, Any]]:
  """The trial rows of ``workdir``, one per ``trial_id``."""
  return read_jsonl(os.path.join(workdir, RESULTS_FILE), KEYS[RESULTS_FILE])


def read_points(workdir: str) -> list[dict[str, Any]]:
  """The throughput points of ``workdir``, one per ``point_id``."""
  return read_jsonl(os.path.join(workdir, THROUGHPUT_FILE), KEYS[THROUGHPUT_FILE])


def atomic_write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` so that readers see the old or the new file."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """``atomic_write_text`` for bytes (PNG plots)."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)

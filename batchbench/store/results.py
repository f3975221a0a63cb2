"""Append-only JSONL stores in the workdir, read back whole, and atomic file writes.

* ``results.jsonl``: one row per finished trial, keyed by ``trial_id``
  (schema: ``batchbench.runs.rows``).
* ``throughput.jsonl``: one row per measured throughput point, keyed by ``point_id``
  (schema: ``batchbench.runs.throughput``).

A line is written whole with one ``write`` on a file opened for appending and
fsynced before the next one, so a kill leaves at most one torn last line, which
readers skip. When a key appears more than once, the last row wins.

Several processes append to one file when a sweep is split across hosts
(``sweep --shard``), so every append holds an exclusive ``flock`` on the file
itself. On a local filesystem ``O_APPEND`` alone would keep lines whole, but on
NFS it does not (the client writes at the size it last saw, so two hosts can
overwrite each other's line), and the check for a torn tail before the write is
a read-then-write. The lock makes the append one step on every filesystem whose
locks hold across hosts (NFS, Lustre with ``-o flock``, GPFS, CephFS); where
locks are not supported at all the append goes on unlocked, as before. Readers
take no lock: a line being written is a torn line to them and is read next time.
``file_lock`` is the same lock for other read-modify-write steps (the sweep's
per-point, LR-search and report locks, ``runs.shard``). Atomic writes go through a
temporary name unique to the host and process, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

from batchbench.fmt import to_jsonable

RESULTS_FILE = "results.jsonl"
THROUGHPUT_FILE = "throughput.jsonl"
LR_SEARCH_FILE = "lr_search.jsonl"  # why each batch's LR search stopped (runs.lr_search)
KEYS = {RESULTS_FILE: "trial_id", THROUGHPUT_FILE: "point_id"}
STATUSES = ("ok", "target_not_reached", "diverged", "oom", "error")
# flock errors that mean "this filesystem has no locks", not "someone holds it".
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _lock(fd: int, *, required: bool) -> None:
  """An exclusive ``flock`` on ``fd``, released when it is closed; blocks until held."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
  except OSError as e:
    if required or e.errno not in NO_LOCKS:
      raise


@contextlib.contextmanager
def file_lock(path: str, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
  """Holds an exclusive lock on ``path`` (created if missing) for the ``with`` block.

  The lock is the kernel's (``flock``): it is released when the holder exits or is
  killed, so a crashed process never leaves a stale lock behind.

  Args:
    path: the lock file.
    on_wait: called once, with no argument, if another process holds the lock (before
      blocking until it is released).

  Raises:
    OSError: the filesystem has no working locks.
  """
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      if on_wait is not None:
        on_wait()
      _lock(fd, required=True)
    yield
  finally:
    os.close(fd)


def append_jsonl(path: str, row: dict[str, Any]) -> None:
  """Appends one JSON object to ``path`` durably (one write under the file's lock, then
  fsync).

  A torn tail left by an earlier kill is first closed with a newline so that the
  new row starts on a line of its own.
  """
  line = json.dumps(to_jsonable(row), sort_keys=True, allow_nan=False)
  fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    _lock(fd, required=False)
    size = os.fstat(fd).st_size
    prefix = "\n" if size and os.pread(fd, 1, size - 1) != b"\n" else ""
    os.write(fd, (prefix + line + "\n").encode())
    os.fsync(fd)
  finally:
    os.close(fd)  # releases the lock


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


def _tmp_path(path: str) -> str:
  """A temporary name beside ``path``, unique across the hosts sharing the workdir."""
  return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"


def atomic_write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` so that readers see the old or the new file."""
  tmp = _tmp_path(path)
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """``atomic_write_text`` for bytes (PNG plots)."""
  tmp = _tmp_path(path)
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)

"""Result rows, the append-only results store and the run metadata record.

A workdir holds:

* ``results.jsonl``: one JSON object per finished trial, appended as each trial
  ends. A line is written whole with one ``write`` and flushed to disk before the
  next trial starts, so a kill leaves at most one torn last line, which readers skip.
* ``run_meta.json``: versions, devices, command line and resolved config of the
  latest invocation, written atomically (temporary file + rename).

The row schema (every key is always present; ``None`` where not applicable):

=====================  =====================================================
key                    meaning
=====================  =====================================================
trial_id               stable hash of the resolved trial spec
workload               workload name
status                 ok | target_not_reached | diverged | oom | error
error                  error text (status error/oom/diverged), else None
global_batch           examples per optimizer update
per_device_batch       examples per device per micro-batch
accum_steps            micro-batches accumulated per update
num_devices            data-parallel devices
steps_per_call         train steps fused in one compiled call
lr                     peak learning rate after scaling and multiplier
base_lr, lr_rule, lr_multiplier, reference_batch, optimizer, schedule
seed                   trial seed
steps, examples, epochs   work done when the trial stopped
samples_per_sec        median over steady-state timing windows
samples_per_sec_iqr    [q25, q75] of samples/sec over those windows
step_time_ms           median milliseconds per optimizer step
compile_s              seconds spent lowering + compiling (train + eval)
memory                 dict of XLA byte counts of the compiled train call:
                       argument_bytes, output_bytes, alias_bytes, temp_bytes,
                       generated_code_bytes, peak_bytes (computed from parts),
                       device_peak_bytes (runtime's own peak, where reported)
flops_per_step         XLA cost-analysis FLOPs per optimizer step (all devices)
steps_to_target, examples_to_target, epochs_to_target,
time_to_target_s       training seconds only, at the first eval meeting target
time_to_target_wall_s  including compile and eval seconds
final_eval             {metric: value} of the last eval
final_train_loss       mean train loss of the last step
target                 {"metric", "value", "direction"} or None
eval_history           list of {"examples", "step", "train_s", "metrics"}
time_ledger            {"compile", "train", "eval", "input_wait", "checkpoint"}
diverged_step          first step with a non-finite loss, else None
resumes                times this trial was resumed from a checkpoint
restored_from_fallback True when a corrupt latest checkpoint was skipped
notes                  list of plain-language notes (e.g. that fallback)
params_hash            sha256 of the final parameters' bytes (resume equality)
timed_windows          steady-state timing windows behind samples_per_sec
traces                 {"train": n, "eval": n}: times each step was traced (1)
wall_s                 wall seconds of the trial (accumulated across resumes)
spec                   the resolved TrialSpec as a dict
=====================  =====================================================
"""

import datetime
import json
import math
import os
import platform
import socket
import subprocess
import sys
from typing import Any
from collections.abc import Iterable

RESULTS_FILE = "results.jsonl"
META_FILE = "run_meta.json"
STATUSES = ("ok", "target_not_reached", "diverged", "oom", "error")


def to_jsonable(value: Any) -> Any:
  """Converts numpy/jax scalars and arrays inside ``value`` to plain Python."""
  if isinstance(value, dict):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if hasattr(value, "tolist"):  # numpy / jax arrays and scalars: convert their elements too
    return to_jsonable(value.tolist())
  if isinstance(value, float) and not math.isfinite(value):  # NaN/inf are not valid JSON
    return None
  return value


def append_row(workdir: str, row: dict[str, Any]) -> None:
  """Appends one result row to ``<workdir>/results.jsonl`` durably.

  The line is written with a single ``write`` call on a file opened in append
  mode and fsynced, so a kill leaves either the whole line or a torn tail that
  ``read_results`` ignores. A torn tail left by an earlier kill is first closed
  with a newline so that the new row starts on a line of its own.
  """
  path = os.path.join(workdir, RESULTS_FILE)
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


def read_results(workdir: str) -> list[dict[str, Any]]:
  """Reads every complete row of ``<workdir>/results.jsonl``.

  Lines that do not parse as a JSON object (a row torn by a kill) are skipped.
  When a trial id appears more than once the last row wins.

  Returns:
    The rows in file order (deduplicated by ``trial_id``).
  """
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return []
  rows: dict[str, dict[str, Any]] = {}
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and "trial_id" in row:
        rows.pop(row["trial_id"], None)
        rows[row["trial_id"]] = row
  return list(rows.values())


def atomic_write_text(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` so that readers see the old or the new file."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _git_commit() -> str | None:
  try:
    out = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
        cwd=os.path.dirname(os.path.abspath(__file__)), check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None if out.returncode == 0 else None


def run_metadata(config: Any, argv: Iterable[str] | None = None) -> dict[str, Any]:
  """Collects the environment record of a run: versions, devices, command line."""
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  def version(dist: str) -> str | None:
    try:
      return md.version(dist)
    except md.PackageNotFoundError:
      return None

  devices = jax.devices()
  return {
      "time_utc": datetime.datetime.now(datetime.UTC).isoformat(),
      "python": platform.python_version(),
      "versions": {d: version(d) for d in (
          "batchbench", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
          "ml-collections", "numpy")},
      "platform": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "process_count": jax.process_count(),
      "xla_flags": os.environ.get("XLA_FLAGS"),
      "host": socket.gethostname(),
      "git_commit": _git_commit(),
      "argv": list(argv if argv is not None else sys.argv),
      "config": to_jsonable(config.to_dict() if hasattr(config, "to_dict") else config),
  }


def write_run_meta(workdir: str, meta: dict[str, Any]) -> None:
  atomic_write_text(os.path.join(workdir, META_FILE),
                    json.dumps(to_jsonable(meta), indent=2, sort_keys=True))

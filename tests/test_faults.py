"""Fault injection: SIGTERM, SIGKILL at random moments, a full disk, a torn results line.

The trials run in child processes that the tests signal or starve; every interrupted
trial is then resumed and compared bit for bit with an uninterrupted run.

This file is also the child: ``python tests/test_faults.py trial TRIAL_DIR ROW_JSON
[--slow S] [--fsize-after-checkpoint BYTES]`` runs the small trial of ``test_checkpoint``
there; ``python tests/test_faults.py sync PROCESS_ID PORT`` is one of two processes
that ask JAX's preemption sync point at every call boundary.
"""

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


# ---------------------------------------------------------------------------------------
# The child process


def _sync_child(process_id: int, port: int) -> int:
  """Calls of 4 steps, each process at its own speed, until the sync point says stop."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id, initialization_timeout=60)
  from batchbench.store import checkpoint  # pylint: disable=g-import-not-at-top
  with checkpoint.preemption_watch() as watch:
    print("ready", flush=True)
    step, k = 0, 4
    while step < 200_000:
      time.sleep(0.005 * (1 + process_id))
      step += k
      if watch.check(step, k):
        print(f"stopped at step {step}", flush=True)
        break
  multihost_utils.sync_global_devices("stopped")  # both processes got here
  print("synced", flush=True)
  return 0


def _child(argv) -> int:
  if argv[0] == "sync":
    return _sync_child(int(argv[1]), int(argv[2]))
  parser = argparse.ArgumentParser()
  parser.add_argument("trial_dir")
  parser.add_argument("row_json")
  parser.add_argument("--slow", type=float, default=0.0, help="sleep per timing window")
  parser.add_argument("--fsize-after-checkpoint", type=int, default=0,
                      help="once a checkpoint is committed, files may not grow past this")
  args = parser.parse_args(argv[1:])

  import resource  # pylint: disable=g-import-not-at-top

  from batchbench.fmt import to_jsonable  # pylint: disable=g-import-not-at-top
  from batchbench.runs import trial  # pylint: disable=g-import-not-at-top
  from batchbench.store import checkpoint, results  # pylint: disable=g-import-not-at-top
  from test_checkpoint import small_spec  # pylint: disable=g-import-not-at-top

  ckpt_dir = os.path.join(args.trial_dir, checkpoint.CHECKPOINT_DIR)
  limited = []

  def on_window(step, window):
    del step, window
    if args.fsize_after_checkpoint and not limited and checkpoint.committed_steps(ckpt_dir):
      # A full disk, as the kernel reports it: writes past the limit fail with EFBIG.
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
      resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize_after_checkpoint, hard))
      limited.append(True)
    time.sleep(args.slow)

  try:
    row = trial.run_trial(small_spec(), workdir=args.trial_dir, on_window=on_window,
                          log=lambda s: print(s, flush=True))
  except checkpoint.Preempted as e:
    print(f"stopped: {e}", flush=True)
    return checkpoint.PREEMPTED_EXIT_CODE
  except checkpoint.CheckpointError as e:
    print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return checkpoint.CHECKPOINT_ERROR_EXIT_CODE
  results.atomic_write_text(args.row_json, json.dumps(to_jsonable(row)))
  return 0


def _start_child(tmp_path, *flags):
  trial_dir = str(tmp_path / "trial")
  cmd = [sys.executable, os.path.abspath(__file__), "trial", trial_dir,
         str(tmp_path / "row.json"), *flags]
  if "--fsize-after-checkpoint" in flags:  # its file-size limit would cut log files short
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True), trial_dir
  return _popen(cmd, tmp_path / "child"), trial_dir


def _popen(cmd, log_prefix):
  """Starts ``cmd`` with its output in files (a full pipe would block a child we poll)."""
  with open(f"{log_prefix}.out", "w") as out, open(f"{log_prefix}.err", "w") as err:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True)
  proc.log_prefix = log_prefix
  return proc


def _finish(proc, timeout=TIMEOUT_S):
  """Waits for ``proc``; returns its (stdout, stderr)."""
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  with open(f"{proc.log_prefix}.out") as out, open(f"{proc.log_prefix}.err") as err:
    return out.read(), err.read()


def _wait_for(condition, proc, timeout=TIMEOUT_S, poll=0.005):
  """Polls ``condition`` until it holds (True) or ``proc`` exits (False)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if condition():
      return True
    if proc.poll() is not None:
      return bool(condition())
    time.sleep(poll)
  proc.kill()
  raise AssertionError("timed out waiting for the child")


# ---------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def reference():
  from batchbench.runs import trial  # pylint: disable=g-import-not-at-top
  from test_checkpoint import small_spec  # pylint: disable=g-import-not-at-top
  return trial.run_trial(small_spec(), log=None)


def test_sigterm_saves_at_a_call_boundary_exits_cleanly_and_resumes_exactly(
    tmp_path, reference):
  from batchbench.runs import trial  # pylint: disable=g-import-not-at-top
  from batchbench.store import checkpoint  # pylint: disable=g-import-not-at-top
  from test_checkpoint import assert_same_result, small_spec  # pylint: disable=g-import-not-at-top

  proc, trial_dir = _start_child(tmp_path, "--slow", "0.15")
  ckpt_dir = os.path.join(trial_dir, checkpoint.CHECKPOINT_DIR)
  assert _wait_for(lambda: checkpoint.committed_steps(ckpt_dir), proc), _finish(proc)
  proc.send_signal(signal.SIGTERM)  # mid-trial: one checkpoint exists, many steps to go
  out, err = _finish(proc)
  assert proc.returncode == checkpoint.PREEMPTED_EXIT_CODE, (out, err)
  assert "SIGTERM: saving a checkpoint at the next call boundary" in err
  stopped = int(out.split("preempted at step ")[1].split(";")[0])
  assert 0 < stopped < reference["steps"]
  assert checkpoint.committed_steps(ckpt_dir)[-1] == stopped
  assert not os.path.exists(tmp_path / "row.json")

  row = trial.run_trial(small_spec(), workdir=trial_dir, log=None)
  assert_same_result(row, reference)
  assert row["resumes"] == 1 and row["notes"] == [f"resumed from step {stopped}"]


def test_full_disk_is_a_clear_error_and_the_previous_checkpoint_restores(tmp_path, reference):
  from batchbench.runs import trial  # pylint: disable=g-import-not-at-top
  from batchbench.store import checkpoint  # pylint: disable=g-import-not-at-top
  from test_checkpoint import assert_same_result, small_spec  # pylint: disable=g-import-not-at-top

  proc, trial_dir = _start_child(tmp_path, "--fsize-after-checkpoint", "2048")
  out, err = proc.communicate(timeout=TIMEOUT_S)
  assert proc.returncode == checkpoint.CHECKPOINT_ERROR_EXIT_CODE, (out, err)
  assert "CheckpointWriteError: writing a checkpoint under" in err
  assert "is the disk full or the directory read-only?" in err
  committed = checkpoint.committed_steps(os.path.join(trial_dir, checkpoint.CHECKPOINT_DIR))
  assert f"The last committed checkpoint, step {committed[-1]}, is intact" in err

  row = trial.run_trial(small_spec(), workdir=trial_dir, log=None)
  assert_same_result(row, reference)
  assert row["notes"] == [f"resumed from step {committed[-1]}"]


def test_multiprocess_preemption_stops_every_process_at_the_same_call(tmp_path):
  """SIGTERM to one of two JAX processes: both stop at the same call (TPU pod path)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  procs = [_popen([sys.executable, os.path.abspath(__file__), "sync", str(i), str(port)],
                  tmp_path / f"process{i}") for i in range(2)]
  try:
    for proc in procs:
      assert _wait_for(lambda p=proc: "ready" in open(f"{p.log_prefix}.out").read(), proc,
                       timeout=120), _finish(proc)
    time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one host only
    outs = [_finish(proc, timeout=120) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  assert [p.returncode for p in procs] == [0, 0], outs
  stops = [out.split("stopped at step ")[1].split()[0] for out, _ in outs]
  assert stops[0] == stops[1], outs  # the slower process (1) and the faster agree
  assert all("synced" in out for out, _ in outs)


# A two-batch sweep: 4-step calls and a checkpoint every call, so kills land mid-trial;
# a short throughput phase (its settings are part of every trial's identity).
SWEEP = {"sweep.global_batches": (32, 64), "sweep.lr_multipliers": (1.0,),
         "sweep.seeds": (0,), "sweep.lr_search.enabled": False,
         "workload_options.hidden": (64,), "num_devices": 2, "target_value": 0.95,
         "checkpoint_every_examples": 128, "steps_per_call": 4, "throughput.min_windows": 3,
         "throughput.min_seconds": 0.05, "throughput.max_seconds": 0.5}


def sweep_command(workdir, *flags, quiet=True, **overrides):
  """``batchbench sweep`` of ``SWEEP`` (with ``overrides``) in ``workdir``."""
  fields = {**SWEEP, **{key.replace("__", "."): value for key, value in overrides.items()}}
  return [sys.executable, "-m", "batchbench", "sweep", "--config=configs/digits_mlp.py",
          f"--workdir={workdir}", *flags, *(["--quiet"] if quiet else []),
          *(f"--config.{key}={value}" for key, value in fields.items())]


@pytest.fixture(scope="module")
def sweep_reference():
  """The sweep's trials run uninterrupted in this process, by trial id."""
  import runpy  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from batchbench.runs import sweep, trial  # pylint: disable=g-import-not-at-top
  config = runpy.run_path(os.path.join(REPO, "configs", "digits_mlp.py"))["get_config"]()
  for key, value in SWEEP.items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  specs = sweep.expand(config, jax.local_device_count())
  assert len(specs) == 2
  return {s.trial_id: trial.run_trial(s, log=None) for s in specs}


def _checkpoint_entries(workdir, since=0.0):
  """(committed steps, temporary folders changed since ``since``) over a sweep's trials."""
  from batchbench.store import checkpoint  # pylint: disable=g-import-not-at-top
  committed, tmp = 0, []
  trials = os.path.join(workdir, "trials")
  for trial_id in os.listdir(trials) if os.path.isdir(trials) else []:
    ckpt_dir = os.path.join(trials, trial_id, checkpoint.CHECKPOINT_DIR)
    committed += len(checkpoint.committed_steps(ckpt_dir))
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    for name in (n for n in names if checkpoint.TMP_MARKER in n):
      try:
        if os.stat(os.path.join(ckpt_dir, name)).st_mtime >= since:
          tmp.append(name)
      except FileNotFoundError:  # committed (renamed) or cleaned up meanwhile
        pass
  return committed, tmp


def _rows_in_file(workdir):
  from batchbench.store import results  # pylint: disable=g-import-not-at-top
  rows = []
  path = os.path.join(workdir, results.RESULTS_FILE)
  if not os.path.exists(path):
    return rows
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return rows


@pytest.mark.slow
def test_sweep_killed_at_random_moments_resumes_to_the_uninterrupted_results(
    tmp_path, sweep_reference):
  from test_checkpoint import assert_same_result  # pylint: disable=g-import-not-at-top

  reference = sweep_reference
  workdir = str(tmp_path / "sweep")
  cmd = sweep_command(workdir)
  rng = random.Random(4)
  # Kill moments: any time (start-up, compile), while a checkpoint is being written,
  # soon after this run committed a checkpoint, and once the first row is in.
  moments = [("any", rng.uniform(1.0, 6.0)), ("writing", None), ("progress", rng.random() / 3),
             ("writing", None), ("first_row", rng.random() / 2), ("writing", None),
             ("any", rng.uniform(1.0, 6.0))]
  kills = []
  for i, (kind, delay) in enumerate(moments):
    proc = _popen(cmd, tmp_path / f"run{i}")
    start, started_at = time.monotonic(), time.time()
    committed_at_start = _checkpoint_entries(workdir)[0]
    condition = {
        "any": lambda: time.monotonic() - start >= delay,
        # A temporary folder this run is writing (not one a killed run left behind).
        "writing": lambda: bool(_checkpoint_entries(workdir, since=started_at)[1]),
        "progress": lambda: _checkpoint_entries(workdir)[0] > committed_at_start,
        "first_row": lambda: len(_rows_in_file(workdir)) >= 1,
    }[kind]
    if _wait_for(condition, proc):
      if kind in ("progress", "first_row"):
        time.sleep(delay)
      proc.kill()
      _finish(proc)
      if proc.returncode == -signal.SIGKILL:
        kills.append((kind, _checkpoint_entries(workdir, since=started_at)[1]))
    else:
      _finish(proc)
  assert len(kills) >= 5, kills
  assert any(kind == "writing" and tmp for kind, tmp in kills), kills  # killed mid-save

  final = _popen(cmd, tmp_path / "final")
  _, err = _finish(final)
  assert final.returncode == 0, err[-3000:]
  rows = _rows_in_file(workdir)
  assert sorted(r["trial_id"] for r in rows) == sorted(reference)  # each trial exactly once
  for row in rows:
    assert_same_result(row, reference[row["trial_id"]])
  assert any(row["resumes"] >= 1 for row in rows)
  assert _checkpoint_entries(workdir)[1] == []  # half-written checkpoints were cleaned up


def test_torn_last_results_line_is_ignored_and_its_trial_rerun(tmp_path):
  from batchbench.runs import sweep  # pylint: disable=g-import-not-at-top
  from batchbench.store import results  # pylint: disable=g-import-not-at-top
  from test_checkpoint import RESULT_KEYS, small_config  # pylint: disable=g-import-not-at-top

  config = small_config(num_devices=2)
  config.sweep.global_batches, config.sweep.lr_multipliers = (32, 64), (1.0,)
  config.throughput.min_windows, config.throughput.min_seconds = 3, 0.05
  specs = sweep.expand(config, 8)
  workdir = str(tmp_path)
  sweep.run_sweep(specs, workdir, log=lambda _: None)
  path = os.path.join(workdir, results.RESULTS_FILE)
  with open(path, encoding="utf-8") as f:
    first, last = f.readlines()
  with open(path, "w", encoding="utf-8") as f:  # a kill in the middle of the last append
    f.write(first + last[:len(last) // 2])
  assert [r["trial_id"] for r in results.read_results(workdir)] == [specs[0].trial_id]

  summary = sweep.run_sweep(specs, workdir, log=lambda _: None)
  assert summary["skipped"] == 1 and summary["ran"] == 1
  rows = _rows_in_file(workdir)
  assert [r["trial_id"] for r in rows] == [s.trial_id for s in specs]
  rerun, before = rows[1], json.loads(last)
  assert all(rerun[k] == before[k] for k in RESULT_KEYS)
  assert rerun["resumes"] == 1  # rebuilt from the trial's final checkpoint, not retrained


@pytest.mark.slow
def test_sigterm_under_process_isolation_is_forwarded_and_the_sweep_resumes(
    tmp_path, sweep_reference):
  """The sweep forwards SIGTERM to the trial's process: exit 75, no row, exact resume."""
  from batchbench.store import checkpoint, results  # pylint: disable=g-import-not-at-top
  from test_checkpoint import assert_same_result  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "sweep")
  # One batch (its throughput point and trial, each in a process of its own).
  cmd = sweep_command(workdir, "--isolation=process", sweep__global_batches=(32,))
  proc = _popen(cmd, tmp_path / "sweep1")
  # The trial's first checkpoint: it has a dozen more calls to go, each checkpointed.
  assert _wait_for(lambda: _checkpoint_entries(workdir)[0] >= 1, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = _finish(proc)
  assert proc.returncode == checkpoint.PREEMPTED_EXIT_CODE, err[-2000:]
  assert "rerun the same command" in err
  assert _rows_in_file(workdir) == []

  again = _popen(cmd, tmp_path / "sweep2")
  _, err = _finish(again)
  assert again.returncode == 0, err[-2000:]
  (row,) = _rows_in_file(workdir)
  assert row["resumes"] == 1  # continued from the checkpoint the preempted process saved
  assert_same_result(row, sweep_reference[row["trial_id"]])
  assert row["time_to_target_s"] is not None  # from the point measured before the SIGTERM
  assert [p["point_id"] for p in results.read_points(workdir)] == [row["point_id"]]


@pytest.mark.slow
def test_sigterm_while_the_trial_process_starts_records_no_outcome(tmp_path, sweep_reference):
  from batchbench.store import checkpoint  # pylint: disable=g-import-not-at-top
  from test_checkpoint import assert_same_result  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "sweep")
  cmd = sweep_command(workdir, "--isolation=process", quiet=False,
                      sweep__global_batches=(32,))
  proc = _popen(cmd, tmp_path / "sweep1")

  def starting_the_trial():  # the sweep logged the trial and is starting its process
    with open(f"{proc.log_prefix}.out", encoding="utf-8") as f:
      return "[trial 1/1]" in f.read()

  assert _wait_for(starting_the_trial, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = _finish(proc)
  assert _rows_in_file(workdir) == []  # preempted: the trial has no outcome yet
  assert proc.returncode == checkpoint.PREEMPTED_EXIT_CODE, err[-2000:]

  again = _popen(cmd, tmp_path / "sweep2")
  _, err = _finish(again)
  assert again.returncode == 0, err[-2000:]
  (row,) = _rows_in_file(workdir)
  assert_same_result(row, sweep_reference[row["trial_id"]])


if __name__ == "__main__":
  sys.exit(_child(sys.argv[1:]))

"""Several JAX processes on localhost (2 x 4 CPU devices) against one (1 x 8): the same
results for on-device and host-fed data, one writer, a lost peer named within the bound,
and a resume after it. Each process is a real ``python -m batchbench`` joined through
``--coordinator_address``; every launch has an outer timeout."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, load_config

from batchbench import config as config_lib
from batchbench.runs import sweep as sweep_lib
from batchbench.runs import trial as trial_lib

TIMEOUT_S = 240
# digits_mlp, one hidden layer of 32, 64 steps at batch 32; a checkpoint and an eval
# every 16 steps.
FIELDS = {"workload_options.hidden": (32,), "max_steps": 64, "steps_per_call": 8,
          "checkpoint_every_examples": 512, "eval_every_examples": 512,
          "throughput.min_windows": 3, "throughput.min_seconds": 0.01}
SWEEP_FIELDS = {"sweep.global_batches": (32, 64), "sweep.lr_multipliers": (1.0,),
                "sweep.seeds": (0,), "sweep.lr_search.enabled": False}
TRIAL = ["--config=configs/digits_mlp.py",
         *[f"--config.{k}={v}".replace(" ", "") for k, v in FIELDS.items()], "--quiet"]


def config(pipeline="device", **fields):
  c = load_config("digits_mlp", f"pipeline={pipeline}")
  c.update_from_flattened_dict({**FIELDS, **fields})
  return c


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict[str, str]:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])}


def launch(args: list[str], workdir, processes: int, extra=()) -> list[subprocess.Popen]:
  """``processes`` processes of ``batchbench args`` on one workdir, 8 devices in all."""
  base = [sys.executable, "-m", "batchbench", *args, f"--workdir={workdir}", *extra]
  if processes == 1:
    return [subprocess.Popen(base, cwd=REPO, env=env(8), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)]
  port = free_port()
  return [subprocess.Popen([*base, f"--coordinator_address=127.0.0.1:{port}",
                            f"--num_processes={processes}", f"--process_id={i}",
                            "--peer_timeout=10"],
                           cwd=REPO, env=env(8 // processes), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for i in range(processes)]


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=TIMEOUT_S)
      out.append((p.returncode, stdout, stderr))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return out


def run(args, workdir, processes, extra=()) -> list[tuple[int, str, str]]:
  out = finish(launch(args, workdir, processes, extra))
  for i, (code, stdout, stderr) in enumerate(out):
    assert code == 0, f"process {i} exited {code}\n{stdout}\n{stderr[-3000:]}"
  return out


def rows(workdir, name="results.jsonl"):
  with open(os.path.join(workdir, name), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def assert_same_results(one: dict, two: dict):
  """The same trial outcome; losses agree to float32 summation order (gloo all-reduces
  across processes in another order than one process across its devices)."""
  assert (two["status"], two["steps"], two["steps_to_target"]) == (
      one["status"], one["steps"], one["steps_to_target"])
  assert [h["step"] for h in two["eval_history"]] == [h["step"] for h in one["eval_history"]]
  for a, b in zip(one["eval_history"], two["eval_history"], strict=True):
    assert b["metrics"]["accuracy"] == a["metrics"]["accuracy"]
    assert b["metrics"]["loss"] == pytest.approx(a["metrics"]["loss"], rel=1e-5)
  assert (one["num_processes"], two["num_processes"]) == (1, 2)
  assert one["num_devices"] == two["num_devices"] == 8


@pytest.fixture(name="reference", scope="module")
def fixture_reference():
  """The trial in this process: 1 process x 8 devices."""
  return trial_lib.run_trial(config_lib.resolve(config(), 8), log=None)


@pytest.fixture(name="two_host_fed", scope="module")
def fixture_two_host_fed(tmp_path_factory):
  """The trial on 2 processes x 4 devices, host-fed: ``(row, outputs)``."""
  workdir = tmp_path_factory.mktemp("two-host")
  out = run(["trial", f"{TRIAL[0]}:pipeline=host", *TRIAL[1:], "--noquiet"], workdir, 2)
  [row] = rows(workdir)  # process 0 alone writes
  return row, out


def test_host_fed_trial_on_two_processes_gives_the_results_of_one(reference, two_host_fed):
  # The host pipeline reads the batches of the device path (tests/test_host_trials.py),
  # each process its own contiguous slice of every batch.
  row, out = two_host_fed
  assert_same_results(reference, row)
  assert "result appended" in out[0][1] and "process 0 writes the result" in out[1][1]
  assert "[distributed] process 1 of 2: 4 local of 8 devices" in out[1][1]


GLOO_ABORT = "gloo::EnforceNotMet"  # README, Limitations: gloo, not the watchdog, ends it
ATTEMPTS = 3


def kill_a_peer_after_the_first_checkpoint(args, workdir) -> tuple[int, str, float, str]:
  """Starts 2 processes, SIGKILLs process 1 once a checkpoint is committed; the survivor's
  exit code, stderr, seconds from the kill to its exit, and the checkpoint directory."""
  procs = launch(args, workdir, 2)
  checkpoints = None
  deadline = time.monotonic() + TIMEOUT_S
  while checkpoints is None and time.monotonic() < deadline:  # the first checkpoint
    time.sleep(0.2)
    trials = os.path.join(workdir, "trials")
    for d in os.listdir(trials) if os.path.isdir(trials) else ():
      path = os.path.join(trials, d, "checkpoints")
      if os.path.isdir(path) and any(n.isdigit() for n in os.listdir(path)):
        checkpoints = path
  assert checkpoints is not None and procs[0].poll() is None
  procs[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  [(code, _, stderr)] = finish(procs[:1])
  return code, stderr, time.monotonic() - killed, checkpoints


def test_a_killed_peer_is_named_within_the_bound_and_a_rerun_resumes(reference, two_host_fed,
                                                                    tmp_path):
  args = ["trial", f"{TRIAL[0]}:pipeline=device", *TRIAL[1:]]
  # In about 1 of 8 runs gloo aborts the survivor the moment its peer dies (SIGABRT, a
  # "collective mismatch" enforce inside gloo's TCP pair): a known limitation. Such a run
  # still leaves its checkpoints intact and no row; the watchdog is then tried again on a
  # fresh workdir, so it must name the peer in one of ATTEMPTS runs.
  for attempt in range(ATTEMPTS):
    workdir = tmp_path / str(attempt)
    code, stderr, seconds, checkpoints = kill_a_peer_after_the_first_checkpoint(args, workdir)
    assert not os.path.exists(os.path.join(workdir, "results.jsonl"))
    if code != -signal.SIGABRT or GLOO_ABORT not in stderr:
      break
  assert code == 5, stderr[-3000:]
  assert seconds < 10 + 15  # --peer_timeout=10, plus a beat
  assert "process 0 of 2: lost process 1" in stderr
  saved = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
  assert saved and saved[-1] < 64
  out = run(args, workdir, 2, extra=["--noquiet"])
  assert f"resumed from step {saved[-1]}" in out[0][1]
  [row] = rows(workdir)
  assert_same_results(reference, row)
  # Training bitwise the uninterrupted 2-process trial's (host-fed: the same batches, the
  # same layout, the same all-reduces): the same last train loss to the bit. (Its eval
  # losses are summed over chunks on the host, which rounds at 1e-7.)
  uninterrupted, _ = two_host_fed
  assert row["final_train_loss"] == uninterrupted["final_train_loss"]
  for a, b in zip(row["eval_history"], uninterrupted["eval_history"], strict=True):
    assert a["metrics"]["accuracy"] == b["metrics"]["accuracy"]
    assert a["metrics"]["loss"] == pytest.approx(b["metrics"]["loss"], rel=1e-6)


def test_sweep_on_two_processes_writes_the_rows_of_one(tmp_path):
  c = config(**SWEEP_FIELDS)
  os.makedirs(tmp_path / "one")
  sweep_lib.run_sweep(sweep_lib.expand(c, 8), str(tmp_path / "one"), log=lambda _: None)
  run(["sweep", *TRIAL, *[f"--config.{k}={v}".replace(" ", "")
                          for k, v in SWEEP_FIELDS.items()]], tmp_path / "two", 2)
  one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
  assert len(one) == len(two) == 2
  key = lambda r: (r["global_batch"], r["lr"], r["seed"])
  for a, b in zip(sorted(one, key=key), sorted(two, key=key), strict=True):
    assert key(a) == key(b)
    assert_same_results(a, b)
  assert len(rows(tmp_path / "two", "throughput.jsonl")) == 2
  report = (tmp_path / "two" / "report" / "report.md").read_text()
  assert "on 8 devices in 2 processes" in report


def test_inconsistent_process_flags_exit_2_before_compute(tmp_path):
  for extra, message in [(["--num_processes=2"], "give all three"),
                         (["--coordinator_address=127.0.0.1:1", "--num_processes=2",
                           "--process_id=2"], "--process_id=2: must be in 0..1"),
                         (["--coordinator_address=localhost", "--num_processes=2",
                           "--process_id=0"], "must be HOST:PORT")]:
    proc = subprocess.run([sys.executable, "-m", "batchbench", "trial", *TRIAL,
                           f"--workdir={tmp_path}", *extra], cwd=REPO, env=env(8),
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not os.listdir(tmp_path)

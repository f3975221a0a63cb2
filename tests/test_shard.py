"""A sweep split across processes (``sweep --shard=I/N``): slices chosen by trial
identity, one measurement per throughput point, LR-search rounds decided from every
shard's rows, bad values refused before anything runs, and three real shards giving
the rows, decisions and report of one unsplit sweep."""

import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest
from absl import flags
from conftest import REPO, load_config

from batchbench import config as config_lib
from batchbench import main
from batchbench.config import ConfigError
from batchbench.report import render
from batchbench.runs import shard as shard_lib
from batchbench.runs import sweep
from batchbench.runs.rows import make_row
from batchbench.store import results


def QUIET(_):  # noqa: N802  (a log sink, used like a constant)
  pass


def small_config(batches=(32, 64, 256, 1024), multipliers=(0.5, 1.0, 2.0), seeds=(0, 1)):
  c = config_lib.default_config()
  c.workload = "digits_mlp"
  c.num_devices = 1
  c.max_examples = 4096
  c.target_metric = "accuracy"
  c.target_value = 0.9
  c.sweep.global_batches = tuple(batches)
  c.sweep.lr_multipliers = tuple(multipliers)
  c.sweep.seeds = tuple(seeds)
  c.sweep.lr_search.max_extensions = 3
  return c


def lines_of(path):
  with open(path, encoding="utf-8") as f:
    return f.read().splitlines()


# --- which trials a shard runs -----------------------------------------------------------

def test_slices_are_disjoint_cover_the_sweep_and_depend_only_on_the_trial_id():
  specs = sweep.expand(small_config(), 8)
  ids = [s.trial_id for s in specs]
  for n in (1, 2, 3, 5):
    slices = [shard_lib.Shard(i, n).mine(specs) for i in range(n)]
    assert sorted(s.trial_id for part in slices for s in part) == sorted(ids)
    for i, part in enumerate(slices):
      for s in part:
        # An independent computation: SHA-256 of the id, first 8 bytes, modulo N.
        assert int(hashlib.sha256(s.trial_id.encode()).hexdigest()[:16], 16) % n == i
  # More batches, LRs and seeds (what the LR search adds) move no existing trial.
  more = sweep.expand(small_config(batches=(32, 64, 128, 256, 1024),
                                   multipliers=(0.25, 0.5, 1.0, 2.0, 4.0), seeds=(0, 1, 2)), 8)
  assert set(ids) < {s.trial_id for s in more}
  for i in range(3):
    before = {s.trial_id for s in shard_lib.Shard(i, 3).mine(specs)}
    after = {s.trial_id for s in shard_lib.Shard(i, 3).mine(more)}
    assert after & set(ids) == before


def test_slices_are_the_same_in_another_python_process():
  # Python's hash() of a str is salted per process: a slice must not depend on it.
  specs = sweep.expand(small_config(batches=(32, 64)), 8)
  ids = [s.trial_id for s in specs]
  code = ("import json, sys; from batchbench.runs.shard import slice_of; "
          "print(json.dumps([slice_of(t, 3) for t in json.loads(sys.argv[1])]))")
  out = subprocess.run([sys.executable, "-c", code, json.dumps(ids)], cwd=REPO,
                       env={**os.environ, "PYTHONHASHSEED": "12345"}, capture_output=True,
                       text=True, check=True, timeout=120)
  assert json.loads(out.stdout) == [shard_lib.slice_of(t, 3) for t in ids]


# --- bad values ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, why", [
    ("3/3", "I=3 is not in 0..2"), ("0/0", "N must be at least 1"), ("x/2", "--shard=I/N"),
    ("-1/2", "--shard=I/N"), ("1", "--shard=I/N"), ("1/2/3", "--shard=I/N"),
    ("", "--shard=I/N"), (" 1/2", "--shard=I/N")])
def test_bad_shard_values_name_the_flag_the_value_and_what_is_valid(text, why):
  with pytest.raises(ConfigError) as e:
    shard_lib.parse(text)
  assert e.value.field == "shard" and e.value.value == text
  assert why in str(e.value) and "0-based" in str(e.value)


def test_good_shard_values():
  assert shard_lib.parse("0/1") == shard_lib.Shard(0, 1)
  assert shard_lib.parse("2/3", 60) == shard_lib.Shard(2, 3, 60.0)
  with pytest.raises(ConfigError, match="shard_timeout=0"):
    shard_lib.parse("0/2", 0)


@pytest.fixture(name="run_cli")
def fixture_run_cli(monkeypatch):
  """Parses absl flags in this process, runs ``main.main``, and resets the flags."""
  def run(*args):
    argv = ["batchbench", *args]
    monkeypatch.setattr(sys, "argv", argv)
    return main.main(flags.FLAGS(argv))
  yield run
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)


@pytest.mark.parametrize("args, fragment", [
    (["--shard=3/3"], "shard='3/3': I=3 is not in 0..2"),
    (["--shard=x/2"], "shard='x/2': --shard=I/N runs slice I of N, 0-based"),
    (["--shard=0/0"], "shard='0/0': N must be at least 1"),
    (["--shard=0/2", "--shard_timeout=-1"], "shard_timeout=-1.0: must be a positive"),
])
def test_bad_shard_flag_exits_2_before_anything_runs(args, fragment, run_cli, no_compile,
                                                     tmp_path, capsys):
  workdir = tmp_path / "wd"
  status = run_cli("sweep", f"--config={REPO / 'configs' / 'digits_mlp.py'}",
                   f"--workdir={workdir}", *args)
  err = capsys.readouterr().err
  assert status == 2, err
  (line,) = err.strip().splitlines()
  assert line.startswith("batchbench: error: invalid config: ") and fragment in line, line
  assert not workdir.exists()


def test_a_shard_warns_when_another_planned_other_trials(tmp_path):
  meta = {"host": "node7", "time_utc": "2026-12-01T00:00:00", "device_count": 8,
          "device_kind": "cpu", "process_count": 1}
  warnings = []
  shard_lib.write_meta(str(tmp_path), shard_lib.Shard(0, 3), meta, ["a", "b"], warnings.append)
  shard_lib.write_meta(str(tmp_path), shard_lib.Shard(1, 3), meta, ["b", "a"], warnings.append)
  assert not warnings  # the same grid, in any order
  shard_lib.write_meta(str(tmp_path), shard_lib.Shard(2, 3), {**meta, "device_count": 4},
                       ["a", "c"], warnings.append)
  assert len(warnings) == 2 and all("planned other trials" in w for w in warnings)
  assert warnings[0].startswith("warning: shard 0/3 (host node7")
  with open(tmp_path / shard_lib.SHARD_DIR / "run_meta-2-of-3.json", encoding="utf-8") as f:
    assert json.load(f)["shard"] == "2/3"


# --- rounds, points and waits, without training --------------------------------------------

class Scripted:
  """Points and trials without training. Steps to target form a valley in log LR whose
  bottom moves up with the batch (x0.5 at batch 32 ... x16 at 1024); more than 2
  doublings from the bottom misses the target. Every point counts as measured."""

  def __init__(self, delay=0.0):
    self.delay, self.measured, self.ran = delay, [], []

  def point(self, spec, workdir, log, options, watch):
    del log, options, watch
    for p in results.read_points(workdir):
      if p["point_id"] == spec.point_id:
        return p
    time.sleep(0.05)  # long enough for another shard to come for it too
    point = {"point_id": spec.point_id, "global_batch": spec.global_batch,
             "step_time_ms": 1.0, "samples_per_sec": spec.global_batch * 1e3,
             "timed_windows": 5}
    results.append_row(workdir, point, results.THROUGHPUT_FILE)
    self.measured.append(spec.point_id)
    return point

  def trial(self, spec, workdir, log, options, watch, point):
    del workdir, log, options, watch, point
    self.ran.append(spec.trial_id)
    # A few ms that differ per trial, so the shards' rows interleave differently.
    time.sleep(self.delay * (int(spec.trial_id[:2], 16) / 255))
    best = spec.global_batch / 64
    distance = abs(math.log2(spec.lr_multiplier / best))
    accuracy = 0.95 - 0.1 * distance
    if distance > 2:
      return make_row(spec, status="target_not_reached", steps=500,
                      final_eval={"accuracy": accuracy})
    steps = round(100 * (1 + distance ** 2)) + spec.seed
    return make_row(spec, status="ok", steps=steps, steps_to_target=steps,
                    final_eval={"accuracy": accuracy})


def scripted_sweep(workdir, shard=shard_lib.UNSPLIT, runner=None, config=None):
  specs, search = sweep.plan(config or small_config(), 8)
  os.makedirs(workdir, exist_ok=True)
  return sweep.run_sweep(specs, str(workdir), log=QUIET, runner=runner or Scripted(),
                         search=search, shard=shard)


def run_shards(workdir, n, *, timeout_s=60.0, delay=0.01, config=None):
  """N shards in threads of this process (flock excludes per open file, so the point
  lock works between them); returns their summaries and runners."""
  runners, summaries, errors = [Scripted(delay) for _ in range(n)], [None] * n, []

  def go(i):
    try:
      summaries[i] = scripted_sweep(workdir, shard_lib.Shard(i, n, timeout_s, 0.01),
                                    runners[i], config)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not errors, errors
  return summaries, runners


def searches_of(workdir):
  return {d["global_batch"]: d for d in results.read_jsonl(
      os.path.join(workdir, sweep.LR_SEARCH_FILE))}


@pytest.fixture(scope="module", name="scripted")
def fixture_scripted(tmp_path_factory):
  root = tmp_path_factory.mktemp("scripted")
  whole = scripted_sweep(root / "whole")
  summaries, runners = run_shards(root / "split", 3)
  return {"root": root, "whole": whole, "summaries": summaries, "runners": runners}


def test_split_search_takes_the_decisions_of_the_unsplit_one(scripted):
  whole, split = scripted["root"] / "whole", scripted["root"] / "split"
  decisions = searches_of(whole)
  # The landscape makes the searches go both ways and stop for different reasons.
  assert {d["reason"] for d in decisions.values()} >= {"interior", "limit"}
  assert any(min(d["lr_multipliers"]) < 0.5 for d in decisions.values())
  assert any(max(d["lr_multipliers"]) > 2.0 for d in decisions.values())
  assert searches_of(split) == decisions
  # One record per batch: every shard takes every decision, the first records it.
  assert len(lines_of(split / sweep.LR_SEARCH_FILE)) == len(decisions)
  # Every shard knows the whole sweep: the grid and every round's trials.
  planned = sorted(scripted["whole"]["planned"])
  assert all(sorted(s["planned"]) == planned for s in scripted["summaries"])


def test_split_search_runs_each_trial_once_in_its_own_slice(scripted):
  split = scripted["root"] / "split"
  rows = results.read_results(str(split))
  whole = {r["trial_id"]: r for r in results.read_results(str(scripted["root"] / "whole"))}
  assert len(lines_of(split / results.RESULTS_FILE)) == len(rows) == len(whole)
  for r in rows:
    assert (r["status"], r["steps_to_target"]) == (whole[r["trial_id"]]["status"],
                                                    whole[r["trial_id"]]["steps_to_target"])
  ran = [runner.ran for runner in scripted["runners"]]
  assert sorted(t for part in ran for t in part) == sorted(whole)
  for i, part in enumerate(ran):
    assert all(shard_lib.slice_of(t, 3) == i for t in part)
    assert scripted["summaries"][i]["ran"] == len(part)


def test_each_throughput_point_is_measured_once_across_shards(scripted):
  split = scripted["root"] / "split"
  measured = [p for runner in scripted["runners"] for p in runner.measured]
  assert len(measured) == len(set(measured)) == 4
  assert len(lines_of(split / results.THROUGHPUT_FILE)) == 4


def test_a_shard_times_out_naming_the_missing_trials_then_resumes(tmp_path):
  config, split, whole = small_config(batches=(32, 64)), tmp_path / "split", tmp_path / "whole"
  alone = Scripted()
  with pytest.raises(shard_lib.ShardTimeout) as e:
    scripted_sweep(split, shard_lib.Shard(1, 2, 0.3, 0.02), alone, config)
  message = str(e.value)
  assert "shard 1/2: no new trial row for" in message and "--shard_timeout=0.3" in message
  assert "(shard 0)" in message and "(shard 1)" not in message
  # It ran its slice of the grid before waiting; a rerun next to shard 0 finishes the
  # sweep, running none of its trials again.
  first = set(alone.ran)
  assert first and all(shard_lib.slice_of(t, 2) == 1 for t in first)
  summaries, runners = run_shards(split, 2, config=config)
  assert not first & set(runners[1].ran) and summaries[1]["skipped"] >= len(first)
  scripted_sweep(whole, config=config)
  assert searches_of(split) == searches_of(whole)
  assert sorted(r["trial_id"] for r in results.read_results(str(split))) == sorted(
      r["trial_id"] for r in results.read_results(str(whole)))


def test_a_pause_times_out_only_after_no_new_row_for_the_timeout():
  now, slept, lines = [0.0], [], []
  waiter = shard_lib.Waiter(shard_lib.Shard(0, 2, timeout_s=10.0, poll_s=1.0), lines.append,
                            clock=lambda: now[0], sleep=slept.append)
  for t, count in ((0.0, 1), (6.0, 1), (9.0, 2), (18.0, 2)):  # a row came at t=9
    now[0] = t
    waiter.pause(count, lambda: "2 trial(s)")
  now[0] = 19.0
  with pytest.raises(shard_lib.ShardTimeout, match="no new trial row for 10s"):
    waiter.pause(2, lambda: "2 trial(s)")
  assert slept[0] == 1.0 and slept[1] == 1.5  # the poll backs off while nothing comes
  assert slept[2] == 1.0 and slept[3] == 1.0  # ... restarts with a new row, ends at 10 s
  assert [line.split("waiting for ")[1][:10] for line in lines] == ["2 trial(s)"] * 2


def test_appends_hold_the_files_lock(tmp_path):
  path = str(tmp_path / results.RESULTS_FILE)
  results.append_jsonl(path, {"trial_id": "a"})
  with results.file_lock(path):  # as another host's append would hold it
    writer = threading.Thread(target=results.append_jsonl, args=(path, {"trial_id": "b"}))
    writer.start()
    writer.join(timeout=0.5)
    assert writer.is_alive() and len(lines_of(path)) == 1
  writer.join(timeout=10)
  assert [r["trial_id"] for r in results.read_jsonl(path, "trial_id")] == ["a", "b"]


# --- three real shards against one unsplit sweep -----------------------------------------

OVERRIDES = ["--config.sweep.global_batches=(64,128)", "--config.sweep.lr_multipliers=(1.0,)",
             "--config.sweep.seeds=(0,1)", "--config.sweep.lr_search.max_extensions=1",
             "--config.max_examples=2048", "--config.workload_options.hidden=(32,)",
             "--config.throughput.min_seconds=0.05", "--config.steps_per_call=2",
             "--config.num_devices=1", "--config.target_value=0.9"]


def reference_config():
  """The shards' config, as ``--config=configs/digits_mlp.py`` + OVERRIDES make it."""
  c = load_config("digits_mlp")
  c.sweep.global_batches, c.sweep.lr_multipliers, c.sweep.seeds = (64, 128), (1.0,), (0, 1)
  c.sweep.lr_search.max_extensions = 1
  c.max_examples, c.workload_options.hidden = 2048, (32,)
  c.throughput.min_seconds, c.steps_per_call, c.num_devices, c.target_value = 0.05, 2, 1, 0.9
  return c


@pytest.fixture(scope="module", name="real")
def fixture_real(tmp_path_factory):
  """Three ``sweep --shard=i/3`` processes on one workdir and, while they run, the same
  sweep unsplit in this process in another workdir."""
  root = tmp_path_factory.mktemp("real")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  procs = []
  for i in range(3):
    with open(root / f"shard{i}.out", "w") as out, open(root / f"shard{i}.err", "w") as err:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "batchbench", "sweep", "--config=configs/digits_mlp.py",
           f"--workdir={root / 'split'}", *OVERRIDES, f"--shard={i}/3",
           "--shard_timeout=240"], cwd=REPO, env=env, stdout=out, stderr=err))
  try:
    specs, search = sweep.plan(reference_config(), 8)
    os.makedirs(root / "whole")
    sweep.run_sweep(specs, str(root / "whole"), log=QUIET, search=search)
    for proc in procs:
      proc.wait(timeout=300)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  outs = [((root / f"shard{i}.out").read_text(), (root / f"shard{i}.err").read_text())
          for i in range(3)]
  for proc, (out, err) in zip(procs, outs, strict=True):
    assert proc.returncode == 0, (out[-2000:], err[-3000:])
  return {"root": root, "outs": outs}


def comparable(row):
  """A row without what the clock decides."""
  history = [{k: v for k, v in h.items() if k != "train_s"} for h in row["eval_history"]]
  return (row["status"], row["steps"], row["steps_to_target"], row["final_eval"],
          row["params_hash"], history)


def test_shards_write_the_rows_of_the_unsplit_sweep_once_each(real):
  split, whole = real["root"] / "split", real["root"] / "whole"
  rows = {r["trial_id"]: r for r in results.read_results(str(split))}
  expected = {r["trial_id"]: r for r in results.read_results(str(whole))}
  assert sorted(rows) == sorted(expected) and len(rows) >= 6
  assert len(lines_of(split / results.RESULTS_FILE)) == len(rows)  # no duplicate line
  for trial_id, row in rows.items():
    assert comparable(row) == comparable(expected[trial_id]), trial_id
  # Each shard ran exactly its slice.
  ran = [int(out.split("trial(s) run")[0].rsplit(": ", 1)[1]) for out, _ in real["outs"]]
  assert ran == [sum(shard_lib.slice_of(t, 3) == i for t in rows) for i in range(3)]


def test_shards_measure_each_point_once_and_decide_the_searches_alike(real):
  split, whole = real["root"] / "split", real["root"] / "whole"
  points = results.read_points(str(split))
  assert len(lines_of(split / results.THROUGHPUT_FILE)) == len(points) == 2  # one per batch
  assert sorted(p["point_id"] for p in points) == sorted(
      p["point_id"] for p in results.read_points(str(whole)))
  decisions = searches_of(split)
  assert sorted(decisions) == [64, 128] and decisions == searches_of(whole)
  assert len(lines_of(split / sweep.LR_SEARCH_FILE)) == 2
  assert all(len(d["lr_multipliers"]) == 3 for d in decisions.values())  # both extended


def test_one_shard_writes_the_report_and_it_is_the_unsplit_sweeps(real):
  split, whole = real["root"] / "split", real["root"] / "whole"
  wrote = [out for out, _ in real["outs"] if "(also report.md" in out]
  others = [out for out, _ in real["outs"] if "another shard wrote the report" in out]
  assert len(wrote) == 1 and len(others) == 2
  with open(split / render.REPORT_DIR / "summary.csv", encoding="utf-8") as f:
    written = f.read()
  # `batchbench report` over the shards' workdir renders the same file again.
  out = subprocess.run([sys.executable, "-m", "batchbench", "report", f"--workdir={split}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  with open(split / render.REPORT_DIR / "summary.csv", encoding="utf-8") as f:
    assert f.read() == written
  # Both timed by the shards' points: the reports differ in nothing else.
  points = results.read_points(str(split))
  mine, theirs = render.write_report(str(split)), render.write_report(str(whole), points=points)
  assert mine["recommendation"]["text"] == theirs["recommendation"]["text"]
  timed = ("time_to_target_wall_s", "loop_time_to_target_s")  # the trials' own clocks
  drop = lambda records: [{k: v for k, v in r.items() if k not in timed} for r in records]
  from batchbench.report import tables  # pylint: disable=g-import-not-at-top
  assert drop(tables.summary_records(mine["best"], searches_of(split))) == drop(
      tables.summary_records(theirs["best"], searches_of(whole)))

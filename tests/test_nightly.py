"""The nightly suite end to end at tiny sizes, and scripts/nightly.sh's exit status."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from batchbench.config import ConfigError
from batchbench.runs import nightly
from batchbench.store import results

TINY = "configs/nightly.py:tiny=True,windows=5"


@pytest.fixture(scope="module", name="suite_run")
def fixture_suite_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("nightly"))
  suite = nightly.load_suite(str(REPO / TINY))
  summary = nightly.run_suite(suite.suite, workdir, log=None)
  return {"workdir": workdir, "suite": suite.suite, "summary": summary}


def test_the_tiny_suite_runs_every_entry(suite_run):
  workdir, suite = suite_run["workdir"], suite_run["suite"]
  assert [(e["name"], e["status"]) for e in suite_run["summary"]["entries"]] == [
      (e["name"], "ok") for e in suite]
  points = results.read_points(workdir)
  wanted = {(e["config"]["workload"], b) for e in suite if e["kind"] == "throughput"
            for b in e["batches"]}
  assert wanted <= {(p["workload"], p["global_batch"]) for p in points}
  assert all(p["timed_windows"] >= 5 for p in points)
  sweep = next(e for e in suite if e["kind"] == "sweep")
  trials = results.read_results(workdir)
  assert sorted(t["seed"] for t in trials) == sorted(sweep["config"]["sweep.seeds"])
  probe_files = [os.path.join(d, "probe", "probe.json") for d in os.scandir(
      os.path.join(workdir, nightly.PROBES_DIR))]
  assert len(probe_files) == 1 and os.path.exists(probe_files[0])


def test_a_rerun_on_the_same_workdir_skips_finished_entries(suite_run):
  again = nightly.run_suite(suite_run["suite"], suite_run["workdir"], log=None)
  assert {e["status"] for e in again["entries"]} == {"skipped"}


def doctored(workdir, dest, factor, steady=False):
  """A copy of ``workdir`` whose throughput windows are scaled by ``factor`` (and, with
  ``steady``, first replaced by their median with a deterministic 1% spread: a quiet
  machine, so that a test of the exit status does not depend on this machine's load)."""
  shutil.copytree(workdir, dest)
  path = os.path.join(dest, results.THROUGHPUT_FILE)
  points = results.read_points(dest)
  os.remove(path)
  for p in points:
    windows = p["window_samples_per_sec"]
    if steady:
      median, n = float(np.median(windows)), len(windows)
      windows = [median * (1 + 0.01 * (i - n / 2) / n) for i in range(n)]
    p["window_samples_per_sec"] = [w * factor for w in windows]
    results.append_jsonl(path, p)
  return dest


def test_nightly_against_an_identical_baseline_passes(suite_run, tmp_path):
  same = doctored(suite_run["workdir"], str(tmp_path / "same"), 1.0)
  status = nightly.run_nightly(suite_run["suite"], suite_run["workdir"], baseline=same,
                               log=None)
  assert status == 0
  report = json.loads(open(os.path.join(suite_run["workdir"], "nightly", "compare.json"),
                           encoding="utf-8").read())
  assert report["verdict"] == "no regression" and report["matched"] >= 5


def test_nightly_sh_exits_1_when_tonight_is_slower_than_the_baseline(suite_run, tmp_path):
  # The baseline was 25% faster: tonight's windows are 0.8x of it.
  tonight = doctored(suite_run["workdir"], str(tmp_path / "tonight"), 1.0, steady=True)
  faster = doctored(tonight, str(tmp_path / "faster"), 1.25)
  env = {**os.environ, "PY": sys.executable, "WORKDIR": tonight,
         "BASELINE": faster, "SUITE": TINY}
  out = subprocess.run(["bash", str(REPO / "scripts" / "nightly.sh")], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 1, out.stdout + out.stderr
  report = json.loads(open(os.path.join(tonight, "nightly", "compare.json"),
                           encoding="utf-8").read())
  regressed = {f["metric"] for f in report["findings"] if f["verdict"] == "regression"}
  assert regressed == {"samples_per_sec", "step_time_ms"}
  assert "nightly: exit status 1" in out.stdout


def test_nightly_sh_exits_2_on_a_bad_baseline_before_running_anything(tmp_path):
  workdir = str(tmp_path / "never")
  env = {**os.environ, "PY": sys.executable, "WORKDIR": workdir,
         "BASELINE": str(tmp_path / "missing"), "SUITE": TINY}
  out = subprocess.run(["bash", str(REPO / "scripts" / "nightly.sh")], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 2
  assert "baseline=" in out.stderr and "no such file or directory" in out.stderr
  assert not os.path.exists(workdir)


def test_a_bad_suite_entry_is_rejected_before_anything_runs(tmp_path):
  suite = [{"name": "a", "kind": "throughput", "batches": (32,),
            "config": {"workload": "digits_mlp", "max_steps": 1, "target_metric": "none"}},
           {"name": "b", "kind": "train", "config": {}}]
  with pytest.raises(ConfigError, match=r"suite entry 'b': kind='train'.*throughput, sweep"):
    nightly.run_suite(suite, str(tmp_path / "w"), log=None)
  suite[1] = {"name": "b", "kind": "throughput", "batches": (32,),
              "config": {"workload": "digits_mlp", "globl_batch": 3}}
  with pytest.raises(ConfigError, match=r"globl_batch.*not a config field"):
    nightly.run_suite(suite, str(tmp_path / "w"), log=None)
  assert not os.path.exists(tmp_path / "w")

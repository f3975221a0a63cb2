"""The history store (SQLite), change points, a baseline from the last K runs, trend plots."""

import copy
import os
import sqlite3
import statistics

import numpy as np
import pytest
from test_compare import PROV, point, scaled, side, trial, write

from batchbench.analysis import changepoints
from batchbench.config import ConfigError
from batchbench.runs import compare as compare_cmd
from batchbench.runs import history as history_cmd
from batchbench.store.history import HISTORY_FILE, History


# -- change points -----------------------------------------------------------------------

def test_a_step_sustained_over_three_runs_is_a_change_point():
  values = [100, 101, 99, 100, 102, 80, 81, 79, 80]
  (cp,) = changepoints.change_points(values)
  assert cp["index"] == 5
  assert cp["before"] == statistics.median(values[:5])
  assert cp["after"] == statistics.median(values[5:8])
  assert cp["change"] == pytest.approx(80 / 100 - 1)


def test_one_outlier_or_a_step_of_two_runs_so_far_is_not_a_change_point():
  assert changepoints.change_points([100, 101, 99, 100, 60, 100, 101, 99]) == []
  assert changepoints.change_points([100, 101, 99, 100, 80, 80]) == []  # not yet 3 runs
  assert changepoints.change_points([100, 101, 99, 100, 80, 100, 80, 80]) == []  # interrupted


def test_steps_within_the_noise_or_the_threshold_are_not_change_points():
  rng = np.random.default_rng(0)
  noisy = (100 * np.exp(rng.normal(0, 0.15, 40))).tolist()
  noisy[20:] = [v * 0.94 for v in noisy[20:]]  # a 6% step inside 15% noise
  assert changepoints.change_points(noisy) == []
  assert changepoints.change_points([100.0] * 5 + [97.0] * 5) == []  # 3% < 5% threshold


def test_two_steps_are_found_each_against_its_own_level():
  values = [10.0] * 4 + [12.0] * 4 + [9.0] * 4
  assert [cp["index"] for cp in changepoints.change_points(values)] == [4, 8]


# -- the store -------------------------------------------------------------------------------

def night(factor, seed, trials=()):
  """One night: the same two points, their windows scaled by ``factor``."""
  p32, p64 = point(32, seed=seed), point(64, seed=seed + 100)
  return side([scaled(p32, factor), scaled(p64, factor)], trials)


def test_record_is_one_run_of_entries_and_recording_it_again_adds_nothing(tmp_path):
  with History(str(tmp_path / "h"), create=True) as store:
    run_id, added = store.record(night(1.0, 1, [trial(0, 10)]), time_utc="2026-01-01")
    assert added and store.record(night(1.0, 1, [trial(0, 10)]))[1] is False
    assert [r["run_id"] for r in store.runs()] == [run_id]
  db = sqlite3.connect(tmp_path / "h" / HISTORY_FILE)
  kinds = sorted(k for (k,) in db.execute("SELECT kind FROM series"))
  assert kinds == ["point", "point", "trial"]
  assert db.execute("SELECT COUNT(*) FROM entries").fetchone() == (3,)


def test_baseline_of_k_runs_pools_windows_around_the_median_of_medians(tmp_path):
  nights = [night(f, seed) for f, seed in ((1.0, 1), (0.9, 2), (1.1, 3), (1.2, 4))]
  with History(str(tmp_path), create=True) as store:
    for i, s in enumerate(nights):
      store.record(s, time_utc=f"2026-01-0{i + 1}")
    last = store.baseline(nights[0], runs=1)
    three = store.baseline(nights[0], runs=3)
  by_batch = {p["global_batch"]: p for p in last.points}
  assert by_batch[32]["window_samples_per_sec"] == nights[3].points[0]["window_samples_per_sec"]
  b32 = {p["global_batch"]: p for p in three.points}[32]
  runs = [n.points[0]["window_samples_per_sec"] for n in nights[1:]]
  assert b32["window_samples_per_sec"] == [w for r in runs for w in r]
  assert b32["baseline_center"] == pytest.approx(statistics.median(
      [statistics.median(r) for r in runs]))


def test_a_new_software_version_starts_a_new_series(tmp_path):
  newer = copy.deepcopy(night(1.0, 1))
  for p in newer.points:
    p["provenance"] = {**PROV, "jax": "0.11.0"}
  with History(str(tmp_path), create=True) as store:
    store.record(night(1.0, 1), time_utc="2026-01-01")
    assert store.baseline(newer).empty
    store.record(newer, time_utc="2026-01-02")
    assert len(store.series()) == 4


def test_compare_against_history_flags_a_slowdown_and_records_the_candidate(tmp_path):
  hist = str(tmp_path / "hist")
  for i, factor in enumerate((1.0, 1.02, 0.99)):
    path = write(tmp_path, f"n{i}.jsonl", night(factor, 10 + i).points)
    assert compare_cmd.run_compare(None, path, history=hist, log=None) == 0
  slow = write(tmp_path, "slow.jsonl", night(0.8, 20).points)
  assert compare_cmd.run_compare(None, slow, history=hist, baseline_runs=3, log=None) == 1
  with History(hist) as store:
    assert len(store.runs()) == 4  # the first night was recorded as the first, with nothing
                                   # to compare; the slow one after its comparison


def test_the_first_run_into_an_empty_history_is_recorded_and_passes(tmp_path):
  lines = []
  path = write(tmp_path, "n.jsonl", night(1.0, 1).points)
  assert compare_cmd.run_compare(None, path, history=str(tmp_path / "h"),
                                 log=lines.append) == 0
  assert "recorded this one" in lines[0] and "nothing to compare" in lines[0]


def test_no_history_there_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match=r"history=.*has no history.sqlite"):
    history_cmd.run_history(str(tmp_path / "none"), log=None)


# -- trends ----------------------------------------------------------------------------------

def test_history_renders_a_plot_per_metric_and_marks_sustained_steps_only(tmp_path):
  hist = str(tmp_path / "h")
  # 32: a 25% slowdown from night 5 on; 64: one slow night (an outlier) then back.
  factors32 = [1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.75, 0.75]
  factors64 = [1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 1.0, 1.0]
  with History(hist, create=True) as store:
    for i, (f32, f64) in enumerate(zip(factors32, factors64, strict=True)):
      p32 = scaled(point(32, seed=0), f32)
      p64 = scaled(point(64, seed=1), f64)
      p32["window_samples_per_sec"][0] += i  # each night's figures differ a little
      store.record(side([p32, p64], [trial(0, 10)]), time_utc=f"2026-01-{i + 10}")
  out = str(tmp_path / "out")
  assert history_cmd.run_history(hist, out, log=None) == 0
  for metric in ("samples_per_sec", "step_time_ms", "flops_per_step", "peak_bytes",
                 "steps_to_target", "time_to_target_s"):
    assert os.path.getsize(os.path.join(out, f"history_{metric}.png")) > 1000
  with History(hist) as store:
    by_metric = history_cmd.trends(store.series())
  sps = {s["label"]: s for s in by_metric["samples_per_sec"]}
  (cp,) = sps["digits_mlp B=32 (1x32)"]["change_points"]
  assert cp["run_index"] == 5 and cp["change"] == pytest.approx(-0.25, abs=0.01)
  assert sps["digits_mlp B=64 (1x64)"]["change_points"] == []
  text = open(os.path.join(out, "history.md"), encoding="utf-8").read()
  assert "2026-01-15" in text and "-25" in text

"""compare: matching by benchmark identity, the statistics of its verdicts, exit statuses."""

import copy
import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from batchbench.analysis import compare
from batchbench.config import ConfigError
from batchbench.runs import compare as compare_cmd
from batchbench.store import results

PROV = {"device_kind": "cpu", "device_count": 1, "host_cpu": "test cpu", "jax": "0.10.2",
        "jaxlib": "0.10.2", "flax": "0.12", "optax": "0.2.8", "python": "3.11.7",
        "measurement_version": 2, "git_commit": "a" * 40}


def windows(n=20, seed=0, rate=1e6, sigma=0.1):
  return (rate * np.exp(np.random.default_rng(seed).normal(0, sigma, n))).tolist()


def point(batch=32, n=20, seed=0, workload="digits_mlp", **fields):
  bench = {"workload": workload, "global_batch": batch, "num_devices": 1,
           "per_device_batch": batch, "accum_steps": 1, "throughput": {"min_windows": 5}}
  row = {"point_id": f"p{batch}{workload}", "benchmark": bench, "workload": workload,
         "workload_options": {}, "global_batch": batch, "per_device_batch": batch,
         "num_devices": 1, "accum_steps": 1, "window_samples_per_sec": windows(n, seed),
         "flops_per_step": 1000.0 * batch, "memory": {"peak_bytes": 4096 * batch},
         "provenance": dict(PROV), "time_utc": "2026-12-01T00:00:00+00:00"}
  row.update(fields)
  return row


def trial(seed=0, steps=10, batch=32, step_ms=2.0, status="ok", mult=1.0):
  bench = {"workload": "digits_mlp", "global_batch": batch, "seed": seed, "lr_multiplier": mult,
           "num_devices": 1}
  reached = steps is not None
  return {"trial_id": f"t{batch}-{seed}-{mult}", "point_id": f"p{batch}digits_mlp",
          "benchmark": bench, "workload": "digits_mlp", "workload_options": {},
          "global_batch": batch, "per_device_batch": batch, "num_devices": 1, "accum_steps": 1,
          "lr_multiplier": mult, "seed": seed, "status": status if reached else
          "target_not_reached", "target": {"metric": "accuracy", "value": 0.9},
          "steps_to_target": steps, "time_to_target_s": steps * step_ms / 1e3 if reached else
          None, "provenance": dict(PROV)}


def scaled(row, factor):
  row = copy.deepcopy(row)
  row["window_samples_per_sec"] = [w * factor for w in row["window_samples_per_sec"]]
  return row


def side(points=(), trials=(), probes=()):
  return compare.Side("test", list(points), list(trials), list(probes))


def finding(report, metric, kind="point"):
  found = [f for f in report["findings"] if f["metric"] == metric and f["kind"] == kind]
  assert len(found) == 1, found
  return found[0]


def write(tmp_path, name, rows):
  path = str(tmp_path / name)
  for row in rows:
    results.append_jsonl(path, row)
  return path


# -- the statistics ---------------------------------------------------------------------

def test_smallest_reachable_p_is_that_of_fully_separated_samples():
  for n, m in ((3, 3), (4, 5), (5, 5), (2, 7)):
    exact = scipy_stats.mannwhitneyu(list(range(n)), list(range(100, 100 + m)),
                                     alternative="two-sided", method="exact").pvalue
    assert compare.min_p_value(n, m) == pytest.approx(exact)
  assert compare.windows_needed(0.01) == 5  # 2/C(8,4) = 0.029; 2/C(10,5) = 0.0079


def test_identical_inputs_give_no_regression(tmp_path):
  rows = [point(32, seed=1), point(256, seed=2)]
  report = compare.compare(side(rows), side(copy.deepcopy(rows)))
  assert report["verdict"] == "no regression" and report["matched"] == 2
  assert {f["verdict"] for f in report["findings"]} == {"no change"}
  path = write(tmp_path, "throughput.jsonl", rows)
  assert compare_cmd.run_compare(path, path, log=None) == 0


def test_windows_scaled_by_0_8_are_a_regression(tmp_path):
  base = point(seed=3)
  report = compare.compare(side([base]), side([scaled(base, 0.8)]))
  sps, step = finding(report, "samples_per_sec"), finding(report, "step_time_ms")
  assert sps["verdict"] == step["verdict"] == "regression"
  assert sps["change"] == pytest.approx(-0.2)
  assert step["change"] == pytest.approx(1 / 0.8 - 1)
  expected_p = scipy_stats.mannwhitneyu([w * 0.8 for w in base["window_samples_per_sec"]],
                                        base["window_samples_per_sec"]).pvalue
  assert sps["p_value"] == pytest.approx(expected_p) and sps["p_value"] < 0.01
  out = tmp_path / "report.json"
  status = compare_cmd.run_compare(write(tmp_path, "a.jsonl", [base]),
                                   write(tmp_path, "b.jsonl", [scaled(base, 0.8)]),
                                   output=str(out), log=None)
  assert status == 1
  assert json.loads(out.read_text())["verdict"] == "regression"


def test_windows_scaled_by_0_98_are_within_the_default_threshold(tmp_path):
  base = point(n=40, seed=4)
  report = compare.compare(side([base]), side([scaled(base, 0.98)]))
  assert report["verdict"] == "no regression"
  assert finding(report, "samples_per_sec")["change"] == pytest.approx(-0.02)
  status = compare_cmd.run_compare(write(tmp_path, "a.jsonl", [base]),
                                   write(tmp_path, "b.jsonl", [scaled(base, 0.98)]), log=None)
  assert status == 0


def test_too_few_windows_are_insufficient_samples_never_no_change():
  base = point(n=3, seed=5)
  for factor in (1.0, 0.5):  # not even a halving can be significant with 3 windows a side
    report = compare.compare(side([base]), side([scaled(base, factor)]))
    for metric in ("samples_per_sec", "step_time_ms"):
      f = finding(report, metric)
      assert f["verdict"] == "insufficient samples", f
      assert f["min_p_value"] == pytest.approx(0.1) and f["p_value"] is None
    assert report["verdict"] == "no regression"


def test_a_per_metric_threshold_applies_to_that_metric_only():
  base = point(seed=6)
  thresholds = compare_cmd.parse_thresholds("samples_per_sec=0.3")
  assert thresholds == {"samples_per_sec": 0.3, "step_time_ms": 0.05, "time_to_target_s": 0.05}
  report = compare.compare(side([base]), side([scaled(base, 0.8)]), thresholds=thresholds)
  assert finding(report, "samples_per_sec")["verdict"] == "no change"
  assert finding(report, "step_time_ms")["verdict"] == "regression"  # +25% > 5%


def test_a_faster_candidate_is_an_improvement_not_a_regression():
  base = point(seed=7)
  report = compare.compare(side([base]), side([scaled(base, 1.3)]))
  assert finding(report, "samples_per_sec")["verdict"] == "improvement"
  assert report["verdict"] == "no regression"


# -- matching ----------------------------------------------------------------------------

def test_points_match_by_benchmark_identity_not_by_id_or_key_order():
  base = point(seed=8)
  cand = scaled(base, 0.8)
  cand["point_id"] = "another-code-version"
  cand["benchmark"] = dict(reversed(list(cand["benchmark"].items())))
  report = compare.compare(side([base]), side([cand]))
  assert report["matched"] == 1 and report["verdict"] == "regression"


def test_unmatched_points_are_listed_on_their_side():
  a, b, c = point(32, seed=1), point(64, seed=2), point(128, seed=3)
  report = compare.compare(side([a, b]), side([copy.deepcopy(a), c]))
  assert report["matched"] == 1
  assert report["unmatched"] == {"baseline_only": [compare.point_label(b)],
                                 "candidate_only": [compare.point_label(c)]}
  assert "B=64" in report["unmatched"]["baseline_only"][0]


# -- deterministic proxies -----------------------------------------------------------------

def test_flops_and_compiled_memory_are_compared_exactly():
  base = point(seed=9)
  cand = copy.deepcopy(base)
  cand["flops_per_step"] = base["flops_per_step"] + 1  # one FLOP more is a change
  cand["memory"]["peak_bytes"] = base["memory"]["peak_bytes"] - 1
  report = compare.compare(side([base]), side([cand]))
  assert finding(report, "flops_per_step")["verdict"] == "regression"
  assert finding(report, "peak_bytes")["verdict"] == "improvement"
  assert finding(report, "samples_per_sec")["verdict"] == "no change"


def test_steps_to_target_at_the_same_seed_is_exact_and_a_miss_is_infinitely_slow():
  base = [trial(0, 10), trial(1, 12)]
  report = compare.compare(side(trials=base), side(trials=[trial(0, 11), trial(1, None)]))
  by_label = {f["label"]: f for f in report["findings"] if f["metric"] == "steps_to_target"}
  seed0, seed1 = (by_label[compare.trial_label(t)] for t in base)
  assert (seed0["verdict"], seed0["baseline"], seed0["candidate"]) == ("regression", 10, 11)
  assert seed1["verdict"] == "regression" and math.isinf(seed1["candidate"])
  assert "target_not_reached" in seed1["note"]


def test_time_to_target_is_the_median_over_seeds_with_misses_infinite():
  base = [trial(s, steps) for s, steps in enumerate((10, 20, 30))]
  one_miss = [trial(0, 10), trial(1, 20), trial(2, None)]  # median still 20 steps
  two_misses = [trial(0, 10), trial(1, None), trial(2, None)]
  report = compare.compare(side(trials=base), side(trials=one_miss))
  ttt = finding(report, "time_to_target_s", "time_to_target")
  assert ttt["verdict"] == "no change"
  assert ttt["baseline"] == ttt["candidate"] == pytest.approx(20 * 2.0 / 1e3)
  report = compare.compare(side(trials=base), side(trials=two_misses))
  ttt = finding(report, "time_to_target_s", "time_to_target")
  assert ttt["verdict"] == "regression" and ttt["candidate"] is None  # inf: missed


def test_time_to_target_change_from_step_time_noise_alone_is_not_a_regression():
  # Steps unchanged; the point's median step time 8% slower but from 3 windows a side
  # (insufficient samples): the 8% is not attributable, so no regression.
  base_point = point(n=3, seed=10)
  cand_point = scaled(base_point, 1 / 1.08)
  base = [trial(s, 10, step_ms=2.0) for s in range(2)]
  cand = [trial(s, 10, step_ms=2.16) for s in range(2)]
  report = compare.compare(side([base_point], base), side([cand_point], cand))
  ttt = finding(report, "time_to_target_s", "time_to_target")
  assert ttt["change"] == pytest.approx(0.08)
  assert ttt["verdict"] == "no change" and "insufficient samples" in ttt["note"]
  # With enough windows the same 8% step-time regression is significant: it counts.
  base_point, cand_point = point(n=40, seed=11), None
  cand_point = scaled(base_point, 1 / 1.08)
  report = compare.compare(side([base_point], base), side([cand_point], cand))
  assert finding(report, "step_time_ms")["verdict"] == "regression"
  assert finding(report, "time_to_target_s", "time_to_target")["verdict"] == "regression"


def test_probe_answer_is_compared_exactly():
  probe = {"workload": "synthetic_mlp", "workload_options": {}, "num_devices": 1,
           "accum_steps": 1, "unit": 1, "budget_bytes": 2**20, "cap": 4096,
           "answer": {"global_batch": 1000},
           "points": [{"global_batch": 512, "peak_bytes": 500}]}
  smaller = copy.deepcopy(probe)
  smaller["answer"]["global_batch"] = 999
  smaller["points"][0]["peak_bytes"] = 501
  report = compare.compare(side(probes=[probe]), side(probes=[smaller]))
  assert finding(report, "largest_batch", "probe")["verdict"] == "regression"
  assert finding(report, "peak_bytes", "probe")["verdict"] == "regression"


# -- inputs and exit statuses ---------------------------------------------------------------

def test_a_workdir_is_read_whole_and_the_markdown_names_the_regression(tmp_path):
  for name, factor in (("base", 1.0), ("cand", 0.8)):
    (tmp_path / name).mkdir()
    results.append_row(str(tmp_path / name), scaled(point(seed=12), factor),
                       results.THROUGHPUT_FILE)
    results.append_row(str(tmp_path / name), trial(0, 10))
  lines = []
  status = compare_cmd.run_compare(str(tmp_path / "base"), str(tmp_path / "cand"),
                                   output=str(tmp_path / "r.md"), log=lines.append)
  assert status == 1
  text = (tmp_path / "r.md").read_text()
  assert text == lines[0] and "**Verdict: REGRESSION**" in text
  assert "| digits_mlp B=32 (1x32) | samples_per_sec |" in text


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "no_match"])
def test_bad_input_is_a_config_error_naming_the_flag(tmp_path, case):
  good = write(tmp_path, "good.jsonl", [point(seed=13)])
  bad = str(tmp_path / "bad.jsonl")
  if case == "empty":
    open(bad, "w").close()
  elif case == "garbage":
    (tmp_path / "bad.jsonl").write_text("not json\n{\"a\": 1}\n")
  elif case == "no_match":
    bad = write(tmp_path, "other.jsonl", [point(64, seed=14)])
  with pytest.raises(ConfigError, match=r"candidate=.*(no such file|no throughput points|"
                     r"matches no point)"):
    compare_cmd.run_compare(good, bad, log=None)


@pytest.mark.parametrize("kwargs, field", [
    ({"threshold": "1.5"}, "threshold"), ({"threshold": "speed=0.1"}, "threshold"),
    ({"alpha": 0}, "alpha"), ({"output": "x.txt"}, "output"),
    ({"baseline_runs": 3}, "baseline_runs")])
def test_bad_settings_are_config_errors(tmp_path, kwargs, field):
  good = write(tmp_path, "good.jsonl", [point(seed=15)])
  with pytest.raises(ConfigError, match=rf"invalid config: {field}="):
    compare_cmd.run_compare(good, good, log=None, **kwargs)


def test_no_baseline_and_no_history_is_an_error(tmp_path):
  good = write(tmp_path, "good.jsonl", [point(seed=16)])
  with pytest.raises(ConfigError, match="baseline=None.*--history"):
    compare_cmd.run_compare(None, good, log=None)


def test_compare_stats_benchmark_runs_and_four_windows_are_always_insufficient(capsys):
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
  import compare_stats  # pylint: disable=g-import-not-at-top

  assert compare_stats.main(["--trials", "20", "--windows", "4,20", "--baseline_runs", "2"]) == 0
  rows = [line.split() for line in capsys.readouterr().out.splitlines()
          if line.startswith(("lognormal", "heavy", "t3", "run shift"))]
  assert len(rows) == 2 * (len(compare_stats.NOISES) + 1)
  for row in rows:
    runs, windows = int(row[-7]), int(row[-5])
    alarm, insufficient, detect = map(float, row[-4:-1])
    # 2 / C(8, 4) = 0.029 >= 0.01: with 4 windows a side no verdict can be reached; a
    # baseline of 2 runs pools 8 windows, and 2 / C(12, 4) = 0.004 can.
    assert insufficient == (1.0 if (runs, windows) == (1, 4) else 0.0)
    assert 0.0 <= alarm <= 1.0 and 0.0 <= detect <= 1.0

"""The critical-batch fit, its honesty rules, time/cost on top of it, tables and plots.

Expected values come from the model written out here (S = S_min (1 + B_crit/B)), from
scipy minimising the same objective independently, or from brute force over candidates.
"""

import ast
import json
import math
import pathlib
import re

import numpy as np
import pytest
from matplotlib.figure import Figure
from scipy.optimize import minimize

from batchbench.analysis import cost, fit
from batchbench.config.errors import ConfigError
from batchbench.report import fit_plot

BATCHES = [8, 16, 32, 64, 128, 256, 512, 1024]
# Measured by this project on digits, one seed: falls, then rises at 512 and 1024.
DIGITS = {8: 192, 16: 176, 32: 88, 64: 40, 128: 24, 256: 19, 512: 27, 1024: 51}


def model_steps(batch, s_min, b_crit):
  return s_min * (1 + b_crit / np.asarray(batch, float))


def simulate(rng, s_min=100.0, b_crit=128.0, seeds=5, noise=0.1, batches=BATCHES):
  return {b: list(model_steps(b, s_min, b_crit) * np.exp(noise * rng.standard_normal(seeds)))
          for b in batches}


def number_after(text, prefix):
  """The number (commas allowed) right after ``prefix`` in ``text``."""
  match = re.search(re.escape(prefix) + r"\s*([0-9][0-9,]*\.?[0-9]*)", text)
  assert match, f"{prefix!r} not in {text!r}"
  return float(match.group(1).replace(",", ""))


# --- the fit ----------------------------------------------------------------------------

def test_recovers_known_parameters_within_interval():
  result = fit.fit_curve(simulate(np.random.default_rng(3)), "steps")
  assert result["status"] == "ok" and result["bootstrap"] == "seeds"
  assert result["b_crit"] == pytest.approx(128, rel=0.15)
  assert result["s_min"] == pytest.approx(100, rel=0.1)
  assert result["b_crit_interval"][0] <= 128 <= result["b_crit_interval"][1]
  assert result["s_min_interval"][0] <= 100 <= result["s_min_interval"][1]
  assert result["weights"] == [5.0] * len(BATCHES)
  json.dumps(result, allow_nan=False)  # fit.json must be valid JSON


def test_main_fit_minimises_the_weighted_log_objective():
  rng = np.random.default_rng(7)
  data = simulate(rng, seeds=3, noise=0.2)
  data[64] = data[64][:2]  # 2 seeds here, 3 elsewhere: unequal weights; median = mean
  result = fit.fit_curve(data, resamples=50)
  assert result["batches"] == BATCHES  # no rise excluded
  b = np.array(BATCHES, float)
  y = np.array([np.median(data[k]) for k in BATCHES])
  w = np.array([len(data[k]) for k in BATCHES], float)
  loss = lambda p: np.sum(w * (np.log(y) - p[0] - np.log1p(np.exp(p[1]) / b)) ** 2)
  best = minimize(loss, [np.log(100), np.log(128)], method="Nelder-Mead",
                  options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 5000}).x
  assert result["b_crit"] == pytest.approx(np.exp(best[1]), rel=1e-4)
  assert result["s_min"] == pytest.approx(np.exp(best[0]), rel=1e-4)
  assert result["weights"] == w.tolist()


@pytest.mark.parametrize("unit", ["steps", "examples"])
def test_bootstrap_refits_agree_with_the_main_fit(unit):
  # One seed per batch: every seeds-bootstrap replicate is the data itself, so the
  # vectorised replicate fits must land where least_squares did.
  values = {b: [float(model_steps(b, 50, 200)) * (1 + 0.1 * (-1) ** i) * (b if unit ==
                                                                          "examples" else 1)]
            for i, b in enumerate(BATCHES)}
  result = fit.fit_curve(values, unit, bootstrap="seeds", resamples=20)
  assert result["status"] == "ok"
  np.testing.assert_allclose(result["replicates"]["b_crit"], result["b_crit"], rtol=5e-4)
  key = fit.scale_key(unit)
  np.testing.assert_allclose(result["replicates"][key], result[key], rtol=5e-4)
  assert any("single seed" in w for w in result["warnings"])


def test_interval_coverage_near_nominal():
  rng = np.random.default_rng(2024)
  hits = []
  for _ in range(100):
    result = fit.fit_curve(simulate(rng, seeds=5, noise=0.15), resamples=300)
    assert result["status"] == "ok"
    lo, hi = result["b_crit_interval"]
    hits.append(lo <= 128 <= hi)
  assert 0.75 <= np.mean(hits) <= 0.98


def test_reproducible_with_fixed_seed():
  data = simulate(np.random.default_rng(0))
  first, again = fit.fit_curve(data, resamples=100), fit.fit_curve(data, resamples=100)
  other = fit.fit_curve(data, resamples=100, seed=1)
  assert first["replicates"] == again["replicates"]
  assert first["replicates"]["b_crit"] != other["replicates"]["b_crit"]
  assert len(first["replicates"]["b_crit"]) == 100 - first["resamples_failed"]


def test_steps_examples_epochs_give_the_same_critical_batch():
  steps = simulate(np.random.default_rng(5))
  examples = {b: [v * b for v in vs] for b, vs in steps.items()}
  epochs = {b: [v * b / 1797 for v in vs] for b, vs in steps.items()}
  s, e, ep = (fit.fit_curve(v, u) for v, u in
              ((steps, "steps"), (examples, "examples"), (epochs, "epochs")))
  assert e["b_crit"] == pytest.approx(s["b_crit"], rel=1e-5)
  assert ep["b_crit"] == pytest.approx(s["b_crit"], rel=1e-5)
  assert e["e_min"] == pytest.approx(s["s_min"] * s["b_crit"], rel=1e-5)
  assert e["s_min"] == pytest.approx(s["s_min"], rel=1e-5)
  assert ep["e_min"] == pytest.approx(e["e_min"] / 1797, rel=1e-5)
  assert ep["s_min"] is None and ep["e_min_unit"] == "epochs"
  np.testing.assert_allclose(e["b_crit_interval"], s["b_crit_interval"], rtol=1e-3)


def test_missed_seeds_count_as_infinite_in_the_median():
  data = simulate(np.random.default_rng(1), seeds=5)
  data[16] = data[16][:3] + [None, None]  # 3 of 5 reached: reached, weight 3
  data[1024] = data[1024][:2] + [None, math.inf, None]  # 2 of 5: missed
  result = fit.fit_curve(data, resamples=200)
  assert result["batches"] == BATCHES[:-1]
  assert result["weights"][1] == 3.0


# --- honesty: refusals and curves the model cannot describe ------------------------------

def test_refuses_with_fewer_than_three_reached_batches():
  result = fit.fit_curve({8: [100.0, 90.0], 16: [55.0], 32: [None, None], 64: [None]})
  assert result["status"] == "refused"
  assert "only 2 batch size(s) reached the target (8, 16)" in result["reason"]
  assert result["b_crit"] is None and "at least 3" in result["text"]


def test_steps_rising_with_batch_are_not_describable():
  result = fit.fit_curve({b: [10 * b**0.3] for b in BATCHES})
  assert result["status"] == "not_describable" and result["b_crit"] is None
  assert result["reason"].startswith("steps do not fall with batch size")


def test_perfect_scaling_everywhere_is_not_pinned_down():
  result = fit.fit_curve(simulate(np.random.default_rng(4), b_crit=1e6, seeds=3))
  assert result["status"] == "not_describable" and result["b_crit"] is None
  assert "still in the perfect-scaling regime at the largest batch" in result["reason"]
  bound = result["b_crit_bound"]
  assert bound["side"] == "above" and bound["value"] <= 1024 * fit.IDENTIFIABLE_FACTOR
  assert number_after(result["reason"], "B_crit is above about") == pytest.approx(
      bound["value"], rel=0.006)


def test_levelled_off_everywhere_is_not_pinned_down():
  result = fit.fit_curve(simulate(np.random.default_rng(4), b_crit=0.5, seeds=3))
  assert result["status"] == "not_describable"
  assert result["b_crit_bound"]["side"] == "below" and result["b_crit_bound"]["value"] > 0.5
  assert "levelled off at the smallest batch" in result["reason"]


def test_digits_table_flags_the_rise_and_claims_no_confident_b_crit():
  # The model lets steps only fall or level off; the rise at 512-1024 is reported and
  # left out, and the one-seed curve leaves B_crit uncertain by a wide factor.
  result = fit.fit_curve({b: [s] for b, s in DIGITS.items()})
  assert [e["global_batch"] for e in result["excluded"]] == [512, 1024]
  assert result["batches"] == [8, 16, 32, 64, 128, 256]
  assert result["bootstrap"] == "points"
  rise = next(w for w in result["warnings"] if "rise" in w)
  assert "27 at 512" in rise and "51 at 1024" in rise and "learning-rate grid" in rise
  assert rise in result["text"]
  assert result["status"] == "ok"  # the falling part 8..256 pins B_crit, loosely:
  lo, hi = result["b_crit_interval"]
  assert lo < result["b_crit"] < hi and hi / lo > 4  # no confident number from one seed
  assert result["s_min_interval"][1] / result["s_min_interval"][0] > 3


def test_a_rise_leaving_too_few_batches_is_not_describable():
  result = fit.fit_curve({8: [200.0], 16: [60.0], 32: [90.0], 64: [100.0]})
  assert result["status"] == "not_describable"
  assert "rise from batch 32 on" in result["reason"] and "leaves 2" in result["reason"]


# --- the regimes: one definition for text and plot ---------------------------------------

def test_regime_boundaries_follow_the_algebra():
  s_min, bc = 7.0, 300.0
  ratio_to_line = lambda b: model_steps(b, s_min, bc) / (s_min * bc / b)
  assert ratio_to_line(fit.perfect_scaling_limit(bc)) == pytest.approx(1.1)
  assert model_steps(fit.max_parallelism_start(bc), s_min, bc) / s_min == pytest.approx(1.1)
  b = fit.diminishing_returns_start(bc)
  assert 1 - model_steps(2 * b, s_min, bc) / model_steps(b, s_min, bc) == pytest.approx(1 / 3)
  assert fit.doubling_saving(b, bc) == pytest.approx(1 / 3)
  assert fit.regime(29.9, bc) == "perfect scaling"
  assert fit.regime(30.5, bc) == "diminishing returns"
  assert fit.regime(3000, bc) == "maximal data parallelism"
  np.testing.assert_allclose(fit.perfect_scaling_line("steps", [10, 20], s_min, bc),
                             [s_min * bc / 10, s_min * bc / 20])
  np.testing.assert_allclose(fit.perfect_scaling_line("examples", [10, 20], 5.0, bc), [5, 5])


def test_regime_sentence_numbers_are_the_fit_numbers():
  result = fit.fit_curve(simulate(np.random.default_rng(11)))
  text, bc, s_min = result["text"], result["b_crit"], result["s_min"]
  num = r"([0-9][0-9,]*\.?[0-9]*)"
  said = [float(x.replace(",", "")) for x in
          re.search(rf"B_crit ≈ {num} \[{num}, {num}\]", text).groups()]
  np.testing.assert_allclose(said, [bc, *result["b_crit_interval"]], rtol=0.006)
  assert number_after(text, "S_min ≈") == pytest.approx(s_min, rel=0.006)
  # Each boundary the sentence names has the property the sentence states, by the model.
  up_to = number_after(text, "up to about")
  assert model_steps(up_to, s_min, bc) / (s_min * bc / up_to) == pytest.approx(1.1, rel=0.001)
  halving = number_after(text, "; from about")
  assert 1 - model_steps(2 * halving, s_min, bc) / model_steps(halving, s_min, bc) == \
      pytest.approx(1 / 3, rel=0.01)
  flat = number_after(text, "a third of the steps; from about")
  assert model_steps(flat, s_min, bc) / s_min == pytest.approx(1.1, rel=0.001)
  in_perfect = [b for b in BATCHES if b <= bc / 10]
  assert in_perfect and f"perfect scaling: {', '.join(map(str, in_perfect))};" in text


def test_plot_perfect_scaling_line_is_the_texts_definition():
  data = simulate(np.random.default_rng(12))
  result = fit.fit_curve(data, resamples=200)
  fig = Figure()
  fit_plot.draw_fit(fig, result, data)
  line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "perfect scaling")
  x, y = line.get_data()
  np.testing.assert_allclose(y, result["s_min"] * result["b_crit"] / x, rtol=1e-9)
  curve = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "fit")
  np.testing.assert_allclose(curve.get_ydata(), model_steps(curve.get_xdata(), result["s_min"],
                                                           result["b_crit"]), rtol=1e-9)


# --- time and cost ----------------------------------------------------------------------

def exact_fit(s_min=100.0, b_crit=128.0):
  """A fit of noise-free model data at three seeds (all replicates equal the truth)."""
  return fit.fit_curve({b: [float(model_steps(b, s_min, b_crit))] * 3 for b in BATCHES},
                       resamples=50)


def throughput(step_ms, devices=lambda b: 1, batches=BATCHES):
  return [{"global_batch": b, "step_time_ms": step_ms(b), "num_devices": devices(b),
           "timed_windows": 5} for b in batches]


def test_log_space_interpolation_is_exact_for_power_laws_and_never_extrapolates():
  points = throughput(lambda b: 3.0 * b**0.6, batches=[8, 32, 128, 512])
  for b in (8, 16, 50, 100, 300, 512):
    assert cost.step_time_ms(points, b) == pytest.approx(3.0 * b**0.6, rel=1e-12)
  assert cost.step_time_ms(points, 4) is None and cost.step_time_ms(points, 1024) is None


def test_recommends_the_true_argmin_of_time_to_target():
  step_ms = lambda b: 10 + 0.05 * b
  plan = cost.time_to_target(exact_fit(), throughput(step_ms))
  times = {b: model_steps(b, 100, 128) * step_ms(b) / 1000 for b in BATCHES}
  best = min(times, key=times.get)
  assert plan["status"] == "ok" and plan["recommended"]["global_batch"] == best
  assert plan["recommended"]["interior"] and plan["recommended"]["replicate_agreement"] == 1
  for row in plan["candidates"]:
    assert row["time_to_target_s"] == pytest.approx(times[row["global_batch"]], rel=1e-4)
  assert f"batch {best}" in plan["text"]


def test_deadline_picks_fewest_device_seconds_among_batches_meeting_it():
  step_ms = lambda b: 10 + 0.05 * b
  devices = lambda b: max(1, b // 64)
  times = {b: model_steps(b, 100, 128) * step_ms(b) / 1000 for b in BATCHES}
  deadline = sorted(times.values())[3]  # four batches meet it
  plan = cost.time_to_target(exact_fit(), throughput(step_ms, devices), deadline_s=deadline)
  meeting = [b for b in BATCHES if times[b] <= deadline]
  expected = min(meeting, key=lambda b: times[b] * devices(b))
  assert len(meeting) == 4 and plan["deadline_pick"]["global_batch"] == expected
  assert expected != plan["recommended"]["global_batch"]  # cost, not time, decides
  assert plan["deadline_pick"]["device_seconds"] == pytest.approx(
      times[expected] * devices(expected), rel=1e-4)
  none = cost.time_to_target(exact_fit(), throughput(step_ms), deadline_s=min(times.values()) / 2)
  assert none["deadline_pick"] is None
  assert none["deadline_message"].startswith("no candidate batch reaches the target within")


def test_candidates_outside_measured_or_fitted_batches_are_skipped():
  points = throughput(lambda b: 3.0 * b**0.6, lambda b: {32: 2, 128: 8}.get(b, 1),
                      batches=[16, 32, 128, 2048])
  plan = cost.time_to_target(exact_fit(), points, candidates=[8, 16, 64, 100, 1024, 2048])
  skipped = {s["global_batch"]: s["reason"] for s in plan["skipped"]}
  assert "step time is not extrapolated" in skipped[8]
  assert "steps are not extrapolated" in skipped[2048]  # measured, but past the fit
  rows = {r["global_batch"]: r for r in plan["candidates"]}
  assert sorted(rows) == [16, 64, 100, 1024]
  assert rows[64]["num_devices"] == 2 and rows[100]["num_devices"] == 8  # nearest in log
  assert cost.candidate_batches(points, powers_of_two=True) == [
      16, 32, 64, 128, 256, 512, 1024, 2048]


def test_time_to_target_refuses_without_a_fit_or_train_size():
  refused = cost.time_to_target(fit.fit_curve({8: [1.0]}), throughput(lambda b: 1.0))
  assert refused["status"] == "refused" and "refused" in refused["reason"]
  epochs = fit.fit_curve({b: [float(model_steps(b, 100, 128)) * b / 1000] * 3
                          for b in BATCHES}, "epochs", resamples=20)
  assert "train_size" in cost.time_to_target(epochs, throughput(lambda b: 1.0))["reason"]
  with_size = cost.time_to_target(epochs, throughput(lambda b: 1.0), train_size=1000)
  assert with_size["candidates"][0]["steps"] == pytest.approx(model_steps(8, 100, 128), 1e-4)


# --- tables -----------------------------------------------------------------------------

def write(tmp_path, text, name="table.csv"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_read_table_groups_repeated_batches(tmp_path):
  path = write(tmp_path, "batch,steps,note\n8,100,a\n16,52,b\n8,110,c\n32,30,\n")
  table = fit.read_table(path)
  assert table.unit == "steps" and table.values == {8: [100.0, 110.0], 16: [52.0], 32: [30.0]}


@pytest.mark.parametrize("text, needles", [
    ("size,steps\n8,1\n", ["'batch'", "size"]),
    ("batch,loss\n8,1\n", ["exactly one of the columns steps, examples, epochs", "none"]),
    ("batch,steps,epochs\n8,1,2\n", ["exactly one", "found steps, epochs"]),
    ("batch,steps\n8,abc\n", ["line 2", "column 'steps'", "'abc'", "positive number"]),
    ("batch,examples\n8,10\n16,-3\n", ["line 3", "column 'examples'", "'-3'"]),
    ("batch,steps\n0,5\n", ["column 'batch'", "'0'"]),
    ("batch,steps\n8.5,5\n", ["column 'batch'", "whole number"]),
])
def test_read_table_errors_name_file_and_column(tmp_path, text, needles):
  path = write(tmp_path, text)
  with pytest.raises(ConfigError) as err:
    fit.read_table(path)
  for needle in [path, *needles]:
    assert needle in str(err.value)


def test_read_table_missing_file(tmp_path):
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "no.csv")) + ".*no such file"):
    fit.read_table(str(tmp_path / "no.csv"))


def test_fit_table_bootstraps_points(tmp_path):
  rows = "".join(f"{b},{s}\n" for b, s in DIGITS.items())
  result = fit.fit_table(fit.read_table(write(tmp_path, "batch,steps\n" + rows)))
  assert result["bootstrap"] == "points" and result["source"].endswith("table.csv")
  assert result["n_points"] == 6


# --- plots and module hygiene -----------------------------------------------------------

def test_plots_draw_every_status_and_save_png(tmp_path):
  ok_data = simulate(np.random.default_rng(0))
  cases = {"ok": (fit.fit_curve(ok_data, resamples=100), ok_data),
           "digits": (fit.fit_curve({b: [s] for b, s in DIGITS.items()}, resamples=100),
                      {b: [s] for b, s in DIGITS.items()}),
           "refused": (fit.fit_curve({8: [5.0], 16: [None]}), {8: [5.0], 16: [None]}),
           "rising": (fit.fit_curve({b: [float(b)] for b in BATCHES}),
                      {b: [float(b)] for b in BATCHES})}
  for name, (result, data) in cases.items():
    fig = Figure()
    fit_plot.draw_fit(fig, result, data)
    if result["status"] != "ok":
      assert fig.axes[0].get_title() == result["reason"]
    json.dumps(result, allow_nan=False)
    fig.savefig(tmp_path / f"{name}.png", format="png")
  plan = cost.time_to_target(exact_fit(), throughput(lambda b: 10 + 0.05 * b), deadline_s=20)
  refused = cost.time_to_target(cases["refused"][0], throughput(lambda b: 1.0))
  for name, p in (("time", plan), ("time_refused", refused)):
    fig = Figure()
    fit_plot.draw_time_to_target(fig, p)
    fig.savefig(tmp_path / f"{name}.png", format="png")
  for png in tmp_path.glob("*.png"):
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_analysis_imports_no_jax_or_core():
  for module in (fit, cost):
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n and (n.startswith("jax") or "batchbench.core" in n)]

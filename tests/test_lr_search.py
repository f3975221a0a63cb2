"""The LR search brackets the best LR, stops for the documented reasons, and is resumable."""

import math

import pytest

from batchbench.runs.lr_search import decide, multiplier


TARGET = {"metric": "accuracy", "value": 0.96, "direction": "max"}


def rows_for(steps_by_multiplier, seeds=(0,)):
  """Trial rows: steps_by_multiplier maps a multiplier to, per seed, steps to target, or
  "diverged", or ("missed", final accuracy) (bare "target_not_reached": accuracy 0.5)."""
  rows = []
  for m, outcome in steps_by_multiplier.items():
    outcomes = (outcome if isinstance(outcome, list)
                else [outcome] * len(seeds))
    for seed, o in zip(seeds, outcomes, strict=True):
      row = {"lr_multiplier": m, "lr": 0.1 * m, "seed": seed, "steps": 100,
             "status": "ok", "steps_to_target": o, "target": TARGET,
             "final_eval": {"accuracy": 0.97}}
      if o == "diverged":
        row.update(status=o, steps_to_target=None, final_eval=None)
      elif o == "target_not_reached" or isinstance(o, tuple):
        accuracy = o[1] if isinstance(o, tuple) else 0.5
        row.update(status="target_not_reached", steps_to_target=None,
                   final_eval={"accuracy": accuracy})
      rows.append(row)
  return rows


def simulate(true_steps, grid, factor=2.0, max_extensions=3, seeds=(0,)):
  """Runs the search against a function multiplier -> outcome; returns the final decision
  and every multiplier run, in order."""
  rows, ran = [], []
  for _ in range(20):
    d = decide(rows, grid, factor=factor, max_extensions=max_extensions)
    if not d.run:
      return d, ran
    ran += list(d.run)
    rows += rows_for({m: true_steps(m) for m in d.run}, seeds)
  raise AssertionError("the search did not stop")


def test_grid_first_then_extends_towards_the_edge_until_bracketed():
  # Steps fall as the LR grows up to x8, then rise: the optimum is at x8.
  steps = lambda m: round(100 * (1 + (math.log2(m) - 3) ** 2))
  d, ran = simulate(steps, (0.5, 1.0, 2.0))
  assert ran == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
  assert (d.best, d.reason) == (8.0, "interior")


def test_stops_early_when_the_lr_beyond_the_edge_diverges():
  steps = lambda m: "diverged" if m >= 4 else round(100 / m)
  d, ran = simulate(steps, (0.5, 1.0, 2.0))
  assert ran == [0.5, 1.0, 2.0, 4.0]
  assert (d.best, d.reason) == (2.0, "diverged_beyond")


def test_extends_downward_and_stops_at_the_limit():
  steps = lambda m: round(100 * m) + 1  # smaller is always better
  d, ran = simulate(steps, (0.5, 1.0, 2.0), max_extensions=2)
  assert ran == [0.5, 1.0, 2.0, 0.25, 0.125]
  assert (d.best, d.reason) == (0.125, "limit")


def test_a_configurable_factor():
  steps = lambda m: round(100 * (1 + (math.log(m, 3) - 2) ** 2))
  d, ran = simulate(steps, (1.0,), factor=3.0)
  assert ran == [1.0, 3.0, 9.0, 27.0]
  assert (d.best, d.reason) == (9.0, "interior")


def test_median_over_seeds_decides_and_a_missed_seed_counts_against_its_lr():
  # x2 has the fastest seed but misses the target at two of three seeds.
  outcomes = {0.5: [300, 310, 305], 1.0: [200, 210, 190],
              2.0: [50, "target_not_reached", "target_not_reached"]}
  d = decide(rows_for(outcomes, seeds=(0, 1, 2)), (0.5, 1.0, 2.0))
  assert (d.best, d.reason, d.run) == (1.0, "diverged_beyond", ())


def test_everything_diverged_goes_lower_and_nothing_reached_stops():
  d, ran = simulate(lambda m: "diverged" if m > 0.1 else 500, (0.5, 1.0, 2.0))
  assert ran[:3] == [0.5, 1.0, 2.0] and ran[3:] == [0.25, 0.125, 0.0625]
  assert d.best == 0.0625 and d.reason == "limit"
  # Nothing reached: the LR that came closest (x1, best final accuracy) is interior.
  closest = lambda m: "diverged" if m > 1 else ("missed", 0.9 if m == 1 else 0.6)
  d, ran = simulate(closest, (0.5, 1.0, 2.0))
  assert ran == [0.5, 1.0, 2.0] and (d.best, d.reason) == (None, "none_reached")


def test_an_exploded_but_finite_loss_sends_the_search_down_not_up():
  # Large LRs blow up to chance accuracy without a NaN ("target_not_reached", not
  # "diverged"); smaller LRs do better but miss within the budget. The search must go
  # down (towards the progress), where x0.25 reaches the target.
  outcome = lambda m: (("missed", 0.1) if m >= 1 else ("missed", 0.8) if m == 0.5
                       else round(300 * 0.25 / m))  # below x0.5: slower as the LR falls
  d, ran = simulate(outcome, (0.5, 1.0, 2.0))
  assert ran == [0.5, 1.0, 2.0, 0.25, 0.125]
  assert (d.best, d.reason) == (0.25, "diverged_beyond")  # x0.5 beside it missed
  # And up when the largest LR made the most progress.
  d, ran = simulate(lambda m: ("missed", 0.2 * m) if m < 4 else 200, (0.5, 1.0, 2.0))
  assert ran == [0.5, 1.0, 2.0, 4.0, 8.0] and (d.best, d.reason) == (4.0, "diverged_beyond")


def test_decisions_depend_only_on_rows_so_a_rerun_takes_the_same_path():
  steps = lambda m: round(100 * (1 + (math.log2(m) - 2) ** 2))
  first, ran = simulate(steps, (0.5, 1.0, 2.0))
  rows = rows_for({m: steps(m) for m in ran})
  again = decide(list(reversed(rows)), (0.5, 1.0, 2.0))
  assert again == first


@pytest.mark.parametrize("value", [0.1 * 3, 2.0 * 1.5 * 1.5, 1 / 3 * 3])
def test_multipliers_are_stable_under_float_arithmetic(value):
  assert multiplier(value) == multiplier(float(repr(value)))
  assert multiplier(0.1 * 3) == 0.3

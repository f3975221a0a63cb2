"""How often does ``compare`` cry wolf, and how often does it catch a 10% slowdown?

Simulates per-window samples/sec figures of a throughput point and runs the verdict that
``batchbench compare`` gives a point (``analysis.compare.compare_samples``: two-sided
Mann-Whitney U at alpha, and a median change beyond the threshold) on many independent
pairs of runs:

  null       baseline and candidate from the same distribution: a regression verdict
             is a false alarm;
  slow 10%   the candidate's windows are 0.9x: a regression verdict is a detection.

Noise models (per window, multiplicative, around a true rate of 1,000,000 samples/s):

  lognormal s=0.10    exp(N(0, 0.10^2)): about the 10% window-to-window spread of this
                      2-core machine;
  lognormal s=0.15    the 15% end of it;
  heavy tail          lognormal s=0.10, and 10% of windows hit by interference that
                      slows them to 50-80%;
  t3 s=0.10           exp(0.10 x Student-t with 3 degrees of freedom): rare large outliers;
  run shift 3%        lognormal s=0.10 plus a per-run level shift exp(N(0, 0.03^2)) that
                      all windows of a run share (the machine's state differs between
                      nights; the test assumes independent windows, so this is its weak spot).

For each window count (5 is the throughput phase's default; the nightly suite uses 40) it
prints the rate of each verdict. Reports, never asserts; exit status 0.

  .venv/bin/python benchmarks/compare_stats.py            # 1,000 comparisons per cell
  .venv/bin/python benchmarks/compare_stats.py --quick    # 100
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable

import numpy as np
import scipy

from batchbench.analysis import compare, summaries

RATE = 1_000_000.0
Noise = Callable[[np.random.Generator, int], np.ndarray]


def _lognormal(sigma: float) -> Noise:
  return lambda rng, n: np.exp(rng.normal(0.0, sigma, n))


def _heavy_tail(rng: np.random.Generator, n: int) -> np.ndarray:
  x = np.exp(rng.normal(0.0, 0.10, n))
  hit = rng.random(n) < 0.10
  return np.where(hit, x * rng.uniform(0.5, 0.8, n), x)


def _t3(rng: np.random.Generator, n: int) -> np.ndarray:
  return np.exp(0.10 * rng.standard_t(3, n))


def _run_shift(rng: np.random.Generator, n: int) -> np.ndarray:
  return np.exp(rng.normal(0.0, 0.03)) * np.exp(rng.normal(0.0, 0.10, n))


NOISES: dict[str, Noise] = {"lognormal s=0.10": _lognormal(0.10),
                            "lognormal s=0.15": _lognormal(0.15),
                            "heavy tail": _heavy_tail, "t3 s=0.10": _t3,
                            "run shift 3%": _run_shift}


def rates(noise: Noise, windows: int, slowdown: float, trials: int, *, alpha: float,
          threshold: float, seed: int, baseline_runs: int = 1) -> dict[str, float]:
  """The share of each verdict over ``trials`` simulated comparisons.

  With ``baseline_runs`` > 1 the baseline is made as ``compare --history
  --baseline_runs=K`` makes it: that many runs' windows pooled, centred on the median
  of their medians (``analysis.summaries.combine_points``).
  """
  rng = np.random.default_rng(seed)
  counts: collections.Counter[str] = collections.Counter()
  for _ in range(trials):
    runs = [{"window_samples_per_sec": (RATE * noise(rng, windows)).tolist()}
            for _ in range(baseline_runs)]
    base = summaries.combine_points(runs) if baseline_runs > 1 else runs[0]
    cand = RATE * (1.0 - slowdown) * noise(rng, windows)
    counts[compare.compare_samples(
        base["window_samples_per_sec"], cand.tolist(), alpha=alpha, threshold=threshold,
        higher_is_better=True, baseline_center=base.get("baseline_center"))["verdict"]] += 1
  return {v: counts[v] / trials for v in compare.VERDICTS}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--trials", type=int, default=1000)
  parser.add_argument("--windows", default="4,5,10,20,40,60")
  parser.add_argument("--baseline_runs", type=int, default=5,
                      help="K of the extra rows with a baseline from K runs of a history")
  parser.add_argument("--alpha", type=float, default=compare.DEFAULT_ALPHA)
  parser.add_argument("--threshold", type=float, default=compare.DEFAULT_THRESHOLD)
  parser.add_argument("--quick", action="store_true", help="100 comparisons per cell")
  args = parser.parse_args(argv)
  trials = 100 if args.quick else args.trials
  windows = [int(w) for w in args.windows.split(",")]
  start = time.perf_counter()
  print(f"compare_stats: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}, scipy {scipy.__version__}")
  print(f"verdict per point: two-sided Mann-Whitney U p < {args.alpha:g} and median change "
        f"worse than {args.threshold:.0%}; {trials} simulated comparisons per cell, "
        "fixed seeds")
  print("smallest reachable p per window count: " + ", ".join(
      f"{n}: {compare.min_p_value(n, n):.2g}" for n in windows)
      + f"; p < {args.alpha:g} needs {compare.windows_needed(args.alpha)}+ windows a side")
  print()
  head = (f"{'noise':18s} {'baseline':>8s} {'windows':>7s} {'false alarm':>11s} "
          f"{'insufficient':>12s} {'detect 10%':>10s} {'miss: no change':>15s}")
  print(head)
  print("-" * len(head))
  cells = [(name, 1) for name in NOISES] + [("run shift 3%", args.baseline_runs)]
  for name, k in cells:
    for i, n in enumerate(windows):
      settings = {"alpha": args.alpha, "threshold": args.threshold, "baseline_runs": k}
      null = rates(NOISES[name], n, 0.0, trials, seed=1000 + i, **settings)
      slow = rates(NOISES[name], n, 0.10, trials, seed=2000 + i, **settings)
      base = "1 run" if k == 1 else f"{k} runs"
      print(f"{name:18s} {base:>8s} {n:7d} {null[compare.REGRESSION]:11.3f} "
            f"{null[compare.INSUFFICIENT]:12.3f} {slow[compare.REGRESSION]:10.3f} "
            f"{slow[compare.NO_CHANGE]:15.3f}")
  print()
  print(f"took {time.perf_counter() - start:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())

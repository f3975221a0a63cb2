"""Where a sweep's wall time goes, compiling per trial ("before") vs per batch ("after").

Runs the same digits sweep (the default config: 8 batches x 3 LR multipliers x the
seeds given) twice in fresh workdirs, in one process, side by side:

  per_trial   every trial (and every throughput point) builds its own program: what
              batchbench did before LR and seed became runtime values;
  per_batch   the sweep's ``ProgramCache``: one train program per batch serves every
              LR and seed (and the throughput phase when its steps per call agree).

For each it prints the sweep's wall time, the time the devices spent training (the
trials' ``train`` buckets plus the throughput phases' timed windows), the seconds
spent compiling and how many programs were compiled, per trial; and it checks that
both runs reached the same steps to target in every trial (LR and seed as runtime
values change no result). It reports; it never asserts (exit status 0).

  .venv/bin/python benchmarks/sweep_compile.py             # 1 seed, about a minute
  .venv/bin/python benchmarks/sweep_compile.py --seeds 0,1
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from typing import Any

import jax

from batchbench.core.program import ProgramCache
from batchbench.runs import sweep
from batchbench.store import results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PerTrial(sweep.InProcess):
  """The "before" runner: a fresh program cache for every trial and point."""

  def point(self, spec, workdir, log, options, watch):
    self.cache = ProgramCache()
    return super().point(spec, workdir, log, options, watch)

  def trial(self, spec, workdir, log, options, watch, point):
    self.cache = ProgramCache()
    return super().trial(spec, workdir, log, options, watch, point)


def load_config(seeds: tuple[int, ...], batches: tuple[int, ...] | None = None):
  path = os.path.join(REPO, "configs", "digits_mlp.py")
  module_spec = importlib.util.spec_from_file_location("digits_mlp_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  c = module.get_config()
  c.sweep.seeds = seeds
  if batches:
    c.sweep.global_batches = batches
  return c


def run(mode: str, specs, workdir: str) -> dict[str, Any]:
  runner = PerTrial() if mode == "per_trial" else sweep.InProcess()
  compiles = 0
  original_get = ProgramCache.get

  def counting_get(cache, *args, **kwargs):
    nonlocal compiles
    program, hit = original_get(cache, *args, **kwargs)
    compiles += not hit
    return program, hit

  ProgramCache.get = counting_get
  try:
    start = time.perf_counter()
    sweep.run_sweep(specs, workdir, log=lambda _: None, runner=runner)
    wall = time.perf_counter() - start
  finally:
    ProgramCache.get = original_get
  rows, points = results.read_results(workdir), results.read_points(workdir)
  train = (sum(r["time_ledger"]["train"] for r in rows)
           + sum(sum(p["window_seconds"]) for p in points))
  compile_s = sum(r["time_ledger"]["compile"] for r in rows) + sum(p["compile_s"]
                                                                   for p in points)
  return {"mode": mode, "wall": wall, "train": train, "compile": compile_s,
          "compiles": compiles, "trials": len(rows), "points": len(points),
          "steps": {r["trial_id"]: r["steps_to_target"] for r in rows}}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
  p.add_argument("--batches", default=None,
                 help="comma-separated global batches (default: the config's 8..1024)")
  args = p.parse_args(argv)
  seeds = tuple(int(s) for s in args.seeds.split(","))
  batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else None
  specs = sweep.expand(load_config(seeds, batches), jax.local_device_count())
  print("batchbench sweep compile benchmark: digits_mlp default sweep, "
        f"{len(specs)} trials ({len(seeds)} seed(s)), in one process")
  print(f"  jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
  out = []
  with tempfile.TemporaryDirectory() as tmp:
    for mode in ("per_trial", "per_batch"):
      os.makedirs(os.path.join(tmp, mode))
      out.append(run(mode, specs, os.path.join(tmp, mode)))
  before, after = out
  print()
  print(f"{'mode':<10} {'trials':>6} {'wall s':>7} {'train s':>8} {'compile s':>9} "
        f"{'compiles':>8} {'compile s/trial':>15} {'train/wall':>10}")
  for r in out:
    print(f"{r['mode']:<10} {r['trials']:>6} {r['wall']:>7.1f} {r['train']:>8.2f} "
          f"{r['compile']:>9.1f} {r['compiles']:>8} {r['compile'] / r['trials']:>15.3f} "
          f"{r['train'] / r['wall']:>10.1%}")
  same = before["steps"] == after["steps"]
  print()
  print(f"per_batch / per_trial: wall {after['wall'] / before['wall']:.2f}x, compile seconds "
        f"{after['compile'] / before['compile']:.2f}x, compiles {after['compiles']} vs "
        f"{before['compiles']} (batches: {len({s.global_batch for s in specs})})")
  print(f"steps to target identical in all {len(before['steps'])} trials: "
        f"{'yes' if same else 'NO'}")
  print(f"SUMMARY: {after['compiles']} programs for {len(specs)} trials at "
        f"{len({s.global_batch for s in specs})} batches (was {before['compiles']}); wall "
        f"{after['wall'] / before['wall']:.2f}x, compile seconds "
        f"{after['compile'] / before['compile']:.2f}x")
  print("train s: the trials' train buckets plus the throughput phases' timed windows; "
        "compile s: seconds spent getting programs (trials' compile buckets and the "
        "points' compile_s); compiles: programs built.")
  return 0


if __name__ == "__main__":
  sys.exit(main())

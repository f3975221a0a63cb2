"""What writing TensorBoard event files costs a trial.

Runs the same small digits trial (digits_mlp 64-256-256-10, one device, SGD, constant LR,
no target: a fixed number of steps, an eval every 256 examples) with and without
``store.tensorboard.TensorBoardObserver``, interleaved (the order alternates per repeat),
after one discarded warm-up trial; every trial shares one compiled program, so compile
time is in neither. Per repeat it takes two ratios, with / without:

  wall      the trial's wall seconds (``run_trial`` start to end: set-up, train calls,
            evals, and the observer's calls, which run outside the timed windows);
  loop      the trial's own ``loop_samples_per_sec`` (median over its timing windows):
            what the observer costs the measured training speed.

It prints the per-repeat ratios, their medians and ranges, and how many scalars one
trial wrote. Reports, never asserts; exit status 0.

  .venv/bin/python benchmarks/tensorboard_overhead.py              # 9 repeats
  .venv/bin/python benchmarks/tensorboard_overhead.py --repeats 3 --steps 200
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import tensorboardX

from batchbench import config as bb_config
from batchbench.core.program import ProgramCache
from batchbench.runs.trial import run_trial
from batchbench.store.tensorboard import TensorBoardObserver


def make_spec(batch: int, steps: int) -> bb_config.TrialSpec:
  c = bb_config.default_config()
  c.workload = "digits_mlp"
  c.global_batch = batch
  c.num_devices = 1
  c.base_lr = 0.01
  c.reference_batch = batch
  c.eval_every_examples = 256
  c.max_steps = steps
  c.target_metric = "none"
  return bb_config.resolve(c, jax.local_device_count())


class Counting(TensorBoardObserver):
  """Counts the scalars it writes."""

  scalars = 0

  def _scalars(self, step, examples, values):
    Counting.scalars += sum(v is not None for v in values.values())
    super()._scalars(step, examples, values)


def one(spec, cache, workdir: str | None) -> tuple[float, float]:
  observers = (Counting(workdir),) if workdir else ()
  start = time.perf_counter()
  row = run_trial(spec, log=None, cache=cache, observers=observers)
  return time.perf_counter() - start, row["loop_samples_per_sec"]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args(argv)
  spec = make_spec(args.batch, args.steps)
  cache = ProgramCache()
  print(f"tensorboard_overhead: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"jax {jax.__version__} ({jax.default_backend()}), tensorboardX "
        f"{tensorboardX.__version__}")
  print(f"trial: digits_mlp B={spec.global_batch}, {spec.max_steps} steps, eval every "
        f"{spec.eval_every_steps} steps, {spec.steps_per_call} steps/call max; "
        f"{args.repeats} repeats, order alternating")
  with tempfile.TemporaryDirectory() as tmp:
    one(spec, cache, tmp)  # warm-up: compiles, fills caches, imports tensorboardX
    Counting.scalars = 0
    wall, loop = [], []
    for r in range(args.repeats):
      order = (True, False) if r % 2 == 0 else (False, True)
      got = {}
      for with_tb in order:
        got[with_tb] = one(spec, cache, os.path.join(tmp, str(r)) if with_tb else None)
      wall.append(got[True][0] / got[False][0])
      loop.append(got[True][1] / got[False][1])
      print(f"  repeat {r}: wall {got[True][0]:.3f}s / {got[False][0]:.3f}s = {wall[-1]:.3f}; "
            f"loop {got[True][1]:,.0f} / {got[False][1]:,.0f} samples/s = {loop[-1]:.3f}")
  per_trial = Counting.scalars // max(1, args.repeats)
  print()
  print(f"with / without TensorBoard, median over {args.repeats} repeats (range):")
  print(f"  wall seconds:       {statistics.median(wall):.3f} ({min(wall):.3f}-{max(wall):.3f})")
  print(f"  loop samples/sec:   {statistics.median(loop):.3f} ({min(loop):.3f}-{max(loop):.3f})")
  print(f"  scalars written per trial: {per_trial} (x2: against step and against examples)")
  return 0


if __name__ == "__main__":
  sys.exit(main())

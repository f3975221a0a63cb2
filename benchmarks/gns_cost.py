"""What measuring the gradient noise scale costs: the train step with it against without it.

The noise scale (B_simple, ``batchbench.analysis.noise``) is measured inside the train
step from gradients the step computes anyway: per accumulation micro-batch, or per group
of the batch (devices, or ``gns.groups`` splits of one device's batch, default 2), at
every ``gns.every_steps``-th step (default 8; ``--every_steps`` overrides it); the steps
between are the plain step. Its cost is the measured steps': the squared norms, the
per-device step in ``shard_map`` and, for several groups on one device, the split into
smaller matrix products. The issue's budget: at most 2% of step time.

For each case (a workload, batch and split, and how B_simple is measured there) this
compiles the train call the throughput phase times (``runs.throughput``, the figure every
sweep point uses) three times: with the noise scale at one step in N, at every step, and
with ``gns.mode="off"``. It then runs ``--windows`` rounds, each one timed window (about
``WINDOW_SECONDS``, whole calls, as the throughput phase runs them) of each program, in
a rotating order: the windows of a round are side by side in time, so the machine's
drifting load falls on all three alike. ``paired`` is the median over rounds of (with /
without) samples/sec, with a 95% bootstrap interval (as in ``overhead.py``); cost =
1 - paired. It reports; it never asserts (exit 0).

  .venv/bin/python benchmarks/gns_cost.py             # 6 cases, 40 windows, ~5 minutes
  .venv/bin/python benchmarks/gns_cost.py --quick     # 1 case, 6 windows
  .venv/bin/python benchmarks/gns_cost.py --every_steps=1   # the norms at every step
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time
from contextlib import ExitStack

# The first case needs 8 devices: 8 fake CPU devices unless the caller chose a count
# (before JAX is imported).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead  # noqa: E402  pylint: disable=wrong-import-position

from batchbench import config as bb_config  # noqa: E402  pylint: disable=wrong-import-position
from batchbench.core.program import MAX_IN_FLIGHT, ProgramCache  # noqa: E402  pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = 0.02
WARMUP_CALLS = 2
WINDOW_SECONDS = 0.25
# (name, config fields; "config" names configs/<config>.py, default digits_mlp: 64-256-256-10,
# SGD, batch 1024). The LM: the byte-level transformer on the stdlib sources (host-fed),
# d_model 64, 1 layer, 64 tokens, Adam, batch 64.
CASES = (
    ("8 devices, per-device groups", {"global_batch": 1024, "num_devices": 8}),
    ("1 device, accum 4 micro-batches", {"global_batch": 1024, "num_devices": 1,
                                         "accum_steps": 4}),
    ("1 device, 2 groups of its batch", {"global_batch": 1024, "num_devices": 1,
                                         "gns.mode": "groups", "gns.groups": 2}),
    ("1 device, 4 groups of its batch", {"global_batch": 1024, "num_devices": 1,
                                         "gns.mode": "groups", "gns.groups": 4}),
    # One step per call, as conv models get on CPU: a plain and a measured call, the host
    # picks. The 1-D CNN (3 x 32 channels) on MNIST-1D, batch 256.
    ("CNN, 8 devices, 1 step a call", {"config": "mnist1d_cnn", "global_batch": 256,
                                       "num_devices": 8}),
    ("LM, 8 devices, per-device groups", {
        "config": "transformer_lm", "global_batch": 64, "num_devices": 8,
        "workload_options.seq_len": 64, "workload_options.d_model": 64,
        "workload_options.num_layers": 1, "workload_options.d_ff": 256}),
)


def base_config(name: str = "digits_mlp"):
  path = os.path.join(REPO, "configs", f"{name}.py")
  module_spec = importlib.util.spec_from_file_location(f"{name}_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config()


def specs(fields: dict, windows: int,
          every_steps: int | None = None) -> tuple[bb_config.TrialSpec, bb_config.TrialSpec]:
  """``(with the noise scale, without)`` for one case."""
  out = []
  fields = dict(fields)
  name = fields.pop("config", "digits_mlp")
  for mode in (fields.get("gns.mode", "auto"), "off"):
    c = base_config(name)
    if every_steps is not None:
      c.gns.every_steps = every_steps
    c.update_from_flattened_dict({**fields, "gns.mode": mode, "max_steps": 64,
                                  "target_metric": "none", "throughput.min_windows": windows,
                                  "throughput.min_seconds": windows * 0.25})
    out.append(bb_config.resolve(c, jax.device_count()))
  return out[0], out[1]


class Runner:
  """One compiled train call (the program the throughput phase times) and its state,
  run one timed window at a time as the throughput phase runs it."""

  def __init__(self, spec: bb_config.TrialSpec, cache: ProgramCache, stack: ExitStack):
    self.spec = spec
    self.program, _ = cache.get(spec)
    self.state = self.program.init_state(spec.seed, spec.lr)
    self.feed = stack.enter_context(self.program.feed(spec.seed))
    self.step = 0

  def calls(self, n: int) -> float:
    """Runs ``n`` calls of K steps; returns their seconds."""
    k, start, outs = self.spec.steps_per_call, time.perf_counter(), []
    for _ in range(n):
      self.state, metrics = self.program.run(self.state, self.feed(self.step), step=self.step)
      outs.append(metrics)
      if len(outs) > MAX_IN_FLIGHT:
        jax.block_until_ready(outs[-MAX_IN_FLIGHT - 1])
      self.step += k
      self.feed.prefetch(self.step)
    jax.block_until_ready((self.state, outs))
    return time.perf_counter() - start


def paired_cost(with_: list[float], without: list[float]) -> tuple[float, tuple[float, float]]:
  """``(paired, its 95% bootstrap interval)``: the median over windows of (samples/sec
  with / samples/sec without, the windows side by side)."""
  pairs = np.asarray(with_) / np.asarray(without)
  resampled = np.random.default_rng(0).choice(pairs, (overhead.BOOTSTRAP_RESAMPLES, pairs.size))
  ci = np.percentile(np.median(resampled, axis=1), [2.5, 97.5])
  return float(np.median(pairs)), (float(ci[0]), float(ci[1]))


def run_case(fields: dict, windows: int, every_steps: int | None) -> dict:
  """Samples/sec of the train call with the noise scale at one step in N, at every
  step, and off: ``windows`` rounds of one timed window of each, side by side, in a
  rotating order (the machine's load drifts within seconds)."""
  on, off = specs(fields, windows, every_steps)
  if on.gns_source is None:
    return {"source": None, "note": on.gns_note}
  every_step, _ = specs(fields, windows, 1)
  cache = ProgramCache()
  with ExitStack() as stack:
    runners = {name: Runner(spec, cache, stack)  # compiled first: windows time only steps
               for name, spec in (("on", on), ("every_step", every_step), ("off", off))}
    for runner in runners.values():
      runner.calls(WARMUP_CALLS)
    n = max(1, math.ceil(WINDOW_SECONDS / runners["off"].calls(1)))  # calls per window
    rates = {name: [] for name in runners}
    names = list(runners)
    for w in range(windows):
      for name in names[w % 3:] + names[:w % 3]:
        runner = runners[name]
        rates[name].append(n * runner.spec.steps_per_call * runner.spec.global_batch
                           / runner.calls(n))
  paired, ci = paired_cost(rates["on"], rates["off"])
  every_paired, every_ci = paired_cost(rates["every_step"], rates["off"])
  return {"source": on.gns_source, "groups": on.gns_groups, "every": on.gns_every,
          "med": {name: statistics.median(r) for name, r in rates.items()},
          "paired": paired, "ci": ci, "windows": windows,
          "every_step_cost": 1 - every_paired,
          "every_step_ci": (1 - every_ci[1], 1 - every_ci[0])}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--windows", type=int, default=40,
                 help="timed windows of each program per case")
  p.add_argument("--quick", action="store_true", help="the first case only, 6 windows")
  p.add_argument("--every_steps", type=int, default=None,
                 help="gns.every_steps (default: the config's, 8)")
  args = p.parse_args(argv)
  cases = CASES[:1] if args.quick else CASES
  windows = 6 if args.quick else args.windows
  env = overhead.environment()
  print(f"# gns_cost: the train step with the gradient noise scale measured vs gns.mode=off, "
        f"{env['date']}")
  print(f"# {env['machine']}, {env['cpus']} CPUs ({env['usable_cpus']} usable), load "
        f"{overhead._show_load(env['loadavg'])}; jax {env['jax']} {env['backend']} "
        f"({env['device_count']} x {env['device_kind']})")  # pylint: disable=protected-access
  every = args.every_steps or base_config().gns.every_steps
  when = "every step" if every == 1 else f"one step in {every}"
  print(f"# digits_mlp 64-256-256-10, SGD, batch 1024 (the CNN: 1-D, 3 x 32 channels, Adam, batch "
        f"256; the LM: d_model 64, 1 layer, 64 "
        f"tokens, Adam, batch 64); the norms at {when} (gns.every_steps={every}) and at "
        f"every step, against off: {windows} rounds of one ~{WINDOW_SECONDS} s window of "
        f"each program's train call, side by side")
  print(f"{'case':34s} {'source':>13s} {'on/s':>10s} {'off/s':>10s} {'paired':>7s} "
        f"{'95% CI':>13s} {'windows':>7s} {'cost':>6s} {'every step':>10s} "
        f"{'95% CI':>13s} {'/N':>6s}")
  for name, fields in cases:
    res = run_case(fields, windows, args.every_steps)
    if res["source"] is None:
      print(f"{name:34s} not measured here: {res['note']}")
      continue
    paired, every_cost, lo, hi = (res["paired"], res["every_step_cost"],
                                  *res["every_step_ci"])
    print(f"{name:34s} {res['source'] + ' x' + str(res['groups']):>13s} "
          f"{res['med']['on']:>10,.0f} {res['med']['off']:>10,.0f} {paired:>7.3f} "
          f"{res['ci'][0]:.3f}-{res['ci'][1]:.3f} {res['windows']:>7d} "
          f"{(1 - paired) * 100:>+5.1f}% {every_cost * 100:>+9.1f}% "
          f"{lo * 100:+5.1f}..{hi * 100:+5.1f}% {every_cost / res['every'] * 100:>+5.1f}%")
  print(f"paired: median over rounds of (samples/sec with / samples/sec without) of the "
        f"round's windows; cost = 1 - paired, the step's slowdown with B_simple measured; "
        f"every step: the same with gns.every_steps=1, and /N that cost divided by "
        f"N = {every}: what the measured steps alone cost at one step in N, the steps "
        f"between being the plain step; budget {BUDGET:.0%}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())

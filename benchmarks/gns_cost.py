"""What measuring the gradient noise scale costs: the train step with it against without it.

The noise scale (B_simple, ``batchbench.analysis.noise``) is measured inside the train
step from gradients the step computes anyway: per accumulation micro-batch, or per group
of the batch (devices, or ``gns.groups`` splits of one device's batch), at every
``gns.every_steps``-th step (default 8; ``--every_steps`` overrides it). Its cost is the
squared norms of those gradients and, for several groups on one device, the split into
smaller matrix products at the measured steps. The issue's budget: at most 2% of step
time.

For each case (a workload, batch and split, and how B_simple is measured there) this runs
the throughput phase (``runs.throughput.measure``, the figure every sweep point uses) of
the same spec with ``gns.mode`` as given and with ``gns.mode="off"``, alternating which
goes first, ``--repeats`` times, each a fresh phase of at least ``--windows`` timed
windows on an already compiled program. It prints both medians over repeats, the ratio
on/off of the medians, its range over repeats, and ``paired``: the median over all
windows of (on window i / off window i of the same repeat), with a 95% bootstrap interval
(as in ``overhead.py``). Cost = 1 - paired. It reports; it never asserts (exit 0).

  .venv/bin/python benchmarks/gns_cost.py             # 4 cases, 5 repeats, about 3 minutes
  .venv/bin/python benchmarks/gns_cost.py --quick     # 1 case, 2 repeats
  .venv/bin/python benchmarks/gns_cost.py --every_steps=1   # the norms at every step
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys

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
from batchbench.core.program import ProgramCache  # noqa: E402  pylint: disable=wrong-import-position
from batchbench.runs import throughput  # noqa: E402  pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = 0.02
# (name, config fields; "config" names configs/<config>.py, default digits_mlp: 64-256-256-10,
# SGD, batch 1024). The LM: the byte-level transformer on the stdlib sources (host-fed),
# d_model 64, 1 layer, 64 tokens, Adam, batch 64.
CASES = (
    ("8 devices, per-device groups", {"global_batch": 1024, "num_devices": 8}),
    ("1 device, accum 4 micro-batches", {"global_batch": 1024, "num_devices": 1,
                                         "accum_steps": 4}),
    ("1 device, 4 groups of its batch", {"global_batch": 1024, "num_devices": 1,
                                         "gns.mode": "groups", "gns.groups": 4}),
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


def window_rates(point: dict) -> list[float]:
  """Samples/sec of each timed window of a throughput point."""
  return [w.examples / w.seconds for w in throughput.windows_of(point)]


def run_case(fields: dict, repeats: int, windows: int, every_steps: int | None) -> dict:
  on, off = specs(fields, windows, every_steps)
  if on.gns_source is None:
    return {"source": None, "note": on.gns_note}
  cache = ProgramCache()
  for spec in (on, off):  # compile both first: the phases time only steps
    cache.get(spec)
  rows = {"on": [], "off": []}
  for r in range(repeats):
    order = ("on", "off") if r % 2 == 0 else ("off", "on")
    for name in order:
      rows[name].append(throughput.measure(on if name == "on" else off, cache=cache))
  med = {n: statistics.median(p["samples_per_sec"] for p in rows[n]) for n in rows}
  ratios = [a["samples_per_sec"] / b["samples_per_sec"]
            for a, b in zip(rows["on"], rows["off"], strict=True)]
  pairs = np.asarray([a / b for pa, pb in zip(rows["on"], rows["off"], strict=True)
                      for a, b in zip(window_rates(pa), window_rates(pb), strict=False)])
  resampled = np.random.default_rng(0).choice(pairs, (overhead.BOOTSTRAP_RESAMPLES, pairs.size))
  ci = np.percentile(np.median(resampled, axis=1), [2.5, 97.5])
  return {"source": on.gns_source, "groups": on.gns_groups, "med": med,
          "ratio": med["on"] / med["off"], "range": (min(ratios), max(ratios)),
          "paired": float(np.median(pairs)),
          "ci": (float(ci[0]), float(ci[1])), "pairs": int(pairs.size),
          "windows": sum(p["timed_windows"] for n in rows for p in rows[n])}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--windows", type=int, default=8)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--every_steps", type=int, default=None,
                 help="gns.every_steps (default: the config's, 8)")
  args = p.parse_args(argv)
  cases = CASES[:1] if args.quick else CASES
  repeats = 2 if args.quick else args.repeats
  env = overhead.environment()
  print(f"# gns_cost: the train step with the gradient noise scale measured vs gns.mode=off, "
        f"{env['date']}")
  print(f"# {env['machine']}, {env['cpus']} CPUs ({env['usable_cpus']} usable), load "
        f"{overhead._show_load(env['loadavg'])}; jax {env['jax']} {env['backend']} "
        f"({env['device_count']} x {env['device_kind']})")  # pylint: disable=protected-access
  every = args.every_steps or base_config().gns.every_steps
  when = "every step" if every == 1 else f"one step in {every}"
  print(f"# digits_mlp 64-256-256-10, SGD, batch 1024 (the LM: d_model 64, 1 layer, 64 "
        f"tokens, Adam, batch 64); the norms at {when} "
        f"(gns.every_steps={every}); throughput phases of >= {args.windows} windows, "
        f"{repeats} repeats each way, alternating")
  print(f"{'case':34s} {'source':>13s} {'on/s':>10s} {'off/s':>10s} {'ratio':>6s} "
        f"{'range':>11s} {'paired':>7s} {'95% CI':>13s} {'pairs':>5s} {'cost':>6s}")
  for name, fields in cases:
    res = run_case(fields, repeats, args.windows, args.every_steps)
    if res["source"] is None:
      print(f"{name:34s} not measured here: {res['note']}")
      continue
    paired = res["paired"]
    cost = f"{(1 - paired) * 100:+.1f}%"
    print(f"{name:34s} {res['source'] + ' x' + str(res['groups']):>13s} "
          f"{res['med']['on']:>10,.0f} {res['med']['off']:>10,.0f} {res['ratio']:>6.3f} "
          f"{res['range'][0]:.3f}-{res['range'][1]:.3f} "
          f"{paired:>7.3f} "
          f"{res['ci'][0]:.3f}-{res['ci'][1]:.3f} {res['pairs']:>5d} {cost:>6s}")
  print(f"paired: median over window pairs (window i with / window i without, same repeat) "
        f"of their samples/sec; cost = 1 - paired, the step's slowdown with B_simple "
        f"measured; budget {BUDGET:.0%}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())

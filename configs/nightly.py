"""The nightly suite: fixed benchmarks that scripts/nightly.sh runs and compares night to night.

  bash scripts/nightly.sh                                      # run, compare, exit 1 on regression
  SUITE=configs/nightly.py:tiny=True bash scripts/nightly.sh   # a seconds-long version (tests)

The suite is data: ``THROUGHPUT`` has one line per workload (adding one is one line), then
a short digits sweep and a memory probe. Every throughput point times ``windows`` windows
of about 0.2 s: 40 by default, with which ``compare`` catches a 10% slowdown in 96% of
simulated nights at 10% window noise (5 windows, the throughput phase's default, catch
10%; see benchmarks/compare_stats.py).

Arg keys: tiny (bool), windows (timed windows per throughput point), devices (data-parallel
devices per point; 0 = all local devices).
"""

import ml_collections

from batchbench.config import parse_arg

# (workload, two global batches, workload options, other config fields). The CNNs run on
# CPU at a few to hundreds of ms a step, so their calls are short to keep windows ~0.2 s.
THROUGHPUT = (
    ("digits_mlp", (32, 256), {}, {}),
    ("mnist1d_mlp", (32, 256), {"num_train": 2_000, "num_test": 500}, {}),
    ("mnist1d_cnn", (32, 256), {"num_train": 2_000, "num_test": 500}, {"steps_per_call": 4}),
    ("synthetic_mlp", (32, 256), {}, {}),
    ("synthetic_cnn", (4, 16), {}, {"steps_per_call": 1}),
)
TINY_THROUGHPUT = (
    ("digits_mlp", (32, 64), {"hidden": (32,)}, {"steps_per_call": 4}),
    ("synthetic_mlp", (32,), {"hidden": (32,)}, {"steps_per_call": 4}),
)
WINDOW_SECONDS = 0.2

# The digits sweep: the default job's workload at two batches and two seeds.
SWEEP = {"workload": "digits_mlp", "workload_options": {},  # its B=32 point is THROUGHPUT's
         "optimizer": "sgd", "base_lr": 0.05, "reference_batch": 32, "lr_rule": "linear",
         "eval_every_examples": 256, "max_examples": 30 * 1437, "target_metric": "accuracy",
         "target_value": 0.96, "sweep.global_batches": (32, 128), "sweep.seeds": (0, 1),
         "sweep.lr_multipliers": (1.0,), "sweep.lr_search.enabled": False}
TINY_SWEEP = {**SWEEP, "workload_options": {"hidden": (32,)}, "base_lr": 0.1,
              "max_examples": 4096, "eval_every_examples": 512, "target_value": 0.5,
              "steps_per_call": 4, "sweep.global_batches": (32,)}

# The probe: the largest synthetic-MLP batch whose compiled step fits the budget.
PROBE = {"memory_budget": "16MiB", "min_batch": 256, "max_batch": 8192,
         "config": {"workload": "synthetic_mlp", "max_steps": 1, "target_metric": "none"}}
TINY_PROBE = {"memory_budget": "1GiB", "min_batch": 64, "max_batch": 256,
              "config": {**PROBE["config"], "workload_options": {"hidden": (32,)}}}


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False, windows=40, devices=0)
  devices = 1 if arg.tiny else arg.devices
  window_s = 0.01 if arg.tiny else WINDOW_SECONDS
  measure = {"num_devices": devices, "throughput.min_windows": arg.windows,
             "throughput.min_seconds": arg.windows * window_s,
             "throughput.max_seconds": max(60.0, 3 * arg.windows * window_s)}
  suite = []
  for workload, batches, options, fields in TINY_THROUGHPUT if arg.tiny else THROUGHPUT:
    suite.append({"name": f"throughput/{workload}", "kind": "throughput",
                  "batches": batches, "config": {
                      "workload": workload, "workload_options": options,
                      "target_metric": "none", "max_steps": 1, **measure, **fields}})
  suite.append({"name": "sweep/digits_mlp", "kind": "sweep",
                "config": {**(TINY_SWEEP if arg.tiny else SWEEP), **measure}})
  probe = TINY_PROBE if arg.tiny else PROBE
  suite.append({"name": "probe/synthetic_mlp", "kind": "probe", **probe,
                "config": {**probe["config"], "num_devices": devices}})
  c = ml_collections.ConfigDict()
  c.suite = tuple(suite)
  return c

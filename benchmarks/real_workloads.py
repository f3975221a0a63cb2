"""Real workloads: the harness against a hand-written JAX loop, and time spent waiting for input.

For ResNet-18 (BatchNorm, on-device crop and flip) and the byte-level Transformer LM,
each fed two ways, this times two training loops on one device, same model (the
workload's own ``init`` and ``loss``, dropout and augmentation included), optimizer (the
config file's: SGD momentum 0.9 + L2 5e-4 for the ResNet, Adam with warmup for the LM),
batch and input pipeline:

  harness  ``batchbench.runs.throughput.measure``: the throughput phase every sweep point
           is measured with (train calls of K steps; its row's ``samples_per_sec`` and
           ``input_wait_fraction``).
  hand     what a JAX user writes: one jitted step per Python call, the train state
           (params, BatchNorm statistics, optimizer state) donated, each step's batch
           taken from the same source and ``jax.device_put`` to the same sharding, one
           ``block_until_ready`` per window.

The cases (``--cases``):

  resnet18/synthetic  ``resnet18_cifar10`` with ``data="synthetic"``: images drawn on the
                      device (the harness: a pool of 2 batches per call; hand: one draw
                      per step inside the step).
  resnet18/host       the same model fed by the host pipeline (``batchbench.data.host``:
                      Grain over a random-access source, CIFAR-10's per-example
                      normalisation in reader threads, one call or step read ahead).
                      CIFAR-10 is not prepared here (no network), so the source is 10,000
                      random CIFAR-shaped uint8 images in memory: no ArrayRecord reads or
                      PNG decoding, so its input wait is a lower bound for real CIFAR-10.
  lm/pysrc            ``transformer_lm`` as shipped (``data="pysrc"``): the stdlib-sources
                      token stream lives on the device, each step cuts its windows there
                      from host-made indices.
  lm/host             the same corpus and windows read through the host pipeline (one
                      ``seq_len + 1`` token window per example).

Input wait is the time blocked in getting the next batch, in timed windows only: the
harness's row measures it around its feed call; the hand loop around its next-batch call
(``HostFeed.__call__``, or making the step's indices); neither counts the transfer.

The loops are interleaved as in ``overhead.py``: after each timed harness window the
throughput phase's ``on_window`` hook runs one hand window of the same steps, outside the
harness's timed region. ``paired`` is the median over all windows of harness window i /
hand window i with a bootstrap 95% interval (``overhead.summarize``). Reports, never
asserts: the exit status is 0.

  .venv/bin/python benchmarks/real_workloads.py            # about 6 minutes on 2 busy cores
  .venv/bin/python benchmarks/real_workloads.py --quick    # 2 cases, smaller, 1 x 3 windows
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import overhead  # benchmarks/ is on sys.path when this file runs, and in its test
from batchbench import config as bb_config
from batchbench.core.mesh import batch_sharding, make_mesh, replicated
from batchbench.core.program import ProgramCache
from batchbench.data import text
from batchbench.data.arrays import MASK
from batchbench.data.feed import EpochIndexFeeder
from batchbench.data.host import ArraySource, HostFeed
from batchbench.data.transforms import CIFAR10_MEAN, CIFAR10_STD, image_classification
from batchbench.measure.timing import Window
from batchbench.runs import throughput
from batchbench.workloads import HostData, get_workload, register_workload
from batchbench.workloads import resnet as resnet_lib
from batchbench.workloads import transformer_lm as lm_lib

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")
SEED = 0
WINDOW_SECONDS = 0.5  # about this much work per timed window (whole calls)
HOST_IMAGES = 10_000  # resnet18/host: random CIFAR-shaped images in memory
# Model sizes: ResNet-18's depth at a quarter of its width; the LM as the config has it.
SIZES = {"resnet": {"num_filters": 16}, "lm": {"seq_len": 128, "d_model": 128}}
# The harness's K: its calls are a loop of up to K steps. One ResNet step in a loop takes
# seconds here (see the README), so the ResNet's windows are of one step.
STEPS_PER_CALL = {"resnet": 1, "lm": 2}
QUICK_SIZES = {"resnet": {"num_filters": 8, "stage_sizes": (1, 1)},
               "lm": {"seq_len": 64, "d_model": 64, "num_layers": 1, "d_ff": 256}}
# Test sizes (tests/test_benchmarks.py): seconds to compile, numbers meaningless.
TINY_SIZES = {"resnet": {"num_filters": 4, "stage_sizes": (1, 1)},
              "lm": {"seq_len": 16, "d_model": 32, "num_layers": 1, "num_heads": 2,
                     "d_ff": 64}}


@dataclasses.dataclass(frozen=True)
class Case:
  """One row group: a workload, fed one way, with the config file it trains with."""

  workload: str
  options: dict[str, Any]  # besides the model size
  model: str  # "resnet" | "lm": which sizes apply
  config: str  # configs/<config>.py, loaded with config_arg
  config_arg: str | None = None


CASES = {
    "resnet18/synthetic": Case("resnet18_cifar10", {"data": "synthetic"}, "resnet",
                               "resnet18_cifar10", "data=synthetic"),
    "resnet18/host": Case("bench_resnet18_host", {}, "resnet", "resnet18_cifar10",
                          "data=synthetic"),
    "lm/pysrc": Case("transformer_lm", {"data": "pysrc"}, "lm", "transformer_lm"),
    "lm/host": Case("bench_transformer_lm_host", {}, "lm", "transformer_lm"),
}
QUICK_CASES = ("resnet18/host", "lm/host")


def resnet18_host(num_filters: int = 64, stage_sizes: tuple[int, ...] = (2, 2, 2, 2),
                  num_images: int = HOST_IMAGES):
  """``resnet18_cifar10`` read through the host pipeline from CIFAR-shaped uint8 images."""
  base = get_workload("resnet18_cifar10", {"data": "synthetic", "num_filters": num_filters,
                                           "stage_sizes": stage_sizes})

  def host_data() -> HostData:
    rng = np.random.default_rng(SEED)
    def split(n):
      return ArraySource({"image": rng.integers(0, 256, (n, *resnet_lib.CIFAR10_SHAPE),
                                                np.uint8),
                          "label": rng.integers(0, 10, n)})
    return HostData(train=split(num_images), test=split(1024), num_train=num_images,
                    transform=image_classification(CIFAR10_MEAN, CIFAR10_STD),
                    fields=resnet_lib.CIFAR10_FIELDS)
  return dataclasses.replace(base, name="bench_resnet18_host", synthetic_batch=None,
                             host_data=host_data, train_size=num_images)


def transformer_lm_host(seq_len: int = 128, d_model: int = 128, num_layers: int = 4,
                        num_heads: int = 4, d_ff: int = 512):
  """``transformer_lm`` on the pysrc corpus, its windows read through the host pipeline."""
  base = get_workload("transformer_lm", {"data": "pysrc", "seq_len": seq_len,
                                         "d_model": d_model, "num_layers": num_layers,
                                         "num_heads": num_heads, "d_ff": d_ff})

  def host_data() -> HostData:
    arrays = base.data()
    stream = arrays.train["tokens"][0]
    windows = stream[text.window_offsets(np.arange(base.train_size), seq_len)]
    test = np.concatenate([arrays.test["inputs"], arrays.test["targets"][:, -1:]], axis=1)
    return HostData(train=ArraySource({"window": windows}),
                    test=ArraySource({"window": test.astype(np.uint8)}),
                    num_train=base.train_size,
                    transform=lambda example: text.split_window(example["window"]))
  return dataclasses.replace(base, name="bench_transformer_lm_host", data=None, gather=None,
                             host_data=host_data, target=None)


def register_workloads() -> None:
  """Registers the two host-fed variants (idempotent)."""
  register_workload("bench_resnet18_host")(resnet18_host)
  register_workload("bench_transformer_lm_host")(transformer_lm_host)


def load_config(name: str, arg: str | None) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of ``configs/<name>.py``."""
  module_spec = importlib.util.spec_from_file_location(f"config_{name}",
                                                       os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg)


def harness_spec(case: Case, sizes: dict[str, Any], batch: int, steps_per_call: int,
                 windows: int) -> bb_config.TrialSpec:
  """The config file's trial at ``batch`` on one device, timing ``windows`` windows."""
  c = load_config(case.config, case.config_arg)
  # The model options replace the config's: its dtype is compute_dtype's float32 default.
  c.workload = case.workload
  c.workload_options = ml_collections.ConfigDict({**case.options, **sizes})
  c.global_batch = batch
  c.num_devices = 1
  c.steps_per_call = steps_per_call
  c.target_metric = bb_config.NO_TARGET
  c.max_steps = 1_000_000
  c.seed = SEED
  c.throughput.warmup_calls = 1  # after compiling; the first call allocates
  c.throughput.min_windows = windows
  c.throughput.min_seconds = windows * WINDOW_SECONDS
  return bb_config.resolve(c, num_available_devices=1)


def hand_optimizer(spec: bb_config.TrialSpec) -> optax.GradientTransformation:
  """The spec's optimizer written with optax directly (constant LR after a linear warmup)."""
  if spec.schedule != "constant":
    raise ValueError(f"the hand loop writes a constant schedule, not {spec.schedule!r}")
  lr = (optax.warmup_constant_schedule(spec.lr / spec.warmup_steps, spec.lr,
                                       spec.warmup_steps - 1)
        if spec.warmup_steps > 1 else spec.lr)
  if spec.optimizer == "adam":
    return optax.adam(lr)
  decay = [optax.add_decayed_weights(spec.weight_decay)] if spec.weight_decay else []
  return optax.chain(*decay, optax.sgd(lr, momentum=spec.momentum))


class HandLoop:
  """The hand-written loop of one spec: a jitted step, state donated, one device."""

  def __init__(self, spec: bb_config.TrialSpec):
    workload = get_workload(spec.workload, dict(spec.workload_options))
    tx = hand_optimizer(spec)
    mesh = make_mesh(1)
    self.batch = batch = spec.global_batch
    self.source = workload.source
    self._sharding = batch_sharding(mesh)
    self._feed: HostFeed | None = None
    self.data: Any = {}
    if workload.source == "host":
      host = workload.host_data()
      self._feed = HostFeed(host.train, num_train=host.num_train, global_batch=batch,
                            accum_steps=1, steps_per_call=1, seed=SEED,
                            transform=host.transform, fields=host.fields)
    elif workload.source == "embedded":
      self.data = jax.device_put(workload.data().train, replicated(mesh))
      self._order = EpochIndexFeeder(spec.train_size, batch, 1, 1, SEED)
    gather = workload.gather or (lambda arrays, idx: {k: a[idx] for k, a in arrays.items()})
    base_key = jax.random.key(SEED)

    def train_step(params, model_state, opt_state, data, inputs, step):
      key = jax.random.fold_in(base_key, step)
      if workload.source == "synthetic":
        key, draw = jax.random.split(key)
        inputs = workload.synthetic_batch(draw, batch)
      elif workload.source == "embedded":
        inputs = gather(data, inputs)
      inputs = {**inputs, MASK: jnp.ones((batch,), jnp.float32)}

      def mean_loss(p):
        out = workload.loss(p, model_state, inputs, key)
        return out.loss_sum / out.count, out.model_state
      (loss, model_state), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), model_state, opt_state, loss

    params, model_state = workload.init(jax.random.key(SEED), workload.batch_spec(1))
    self.state = jax.device_put((params, model_state, tx.init(params)), replicated(mesh))
    self.step = 0
    self._step = jax.jit(train_step, donate_argnums=(0, 1, 2)).lower(
        *self.state, self.data, self._place(self._next(0)), np.int32(0)).compile()

  def _next(self, step: int) -> Any:
    """Step ``step``'s inputs on the host: its batch, its indices, or nothing."""
    if self._feed is not None:
      return {k: a[0, 0] for k, a in self._feed(step).items()}
    if self.source == "embedded":
      return self._order.step_indices(step)
    return {}

  def _place(self, inputs: Any) -> Any:
    return jax.device_put(inputs, self._sharding)

  def window(self, steps: int, clock: Callable[[], float]) -> tuple[float, float, float]:
    """Runs ``steps`` steps; returns (samples/sec, seconds waited for input, seconds)."""
    params, model_state, opt_state = self.state
    wait = 0.0
    start = clock()
    for _ in range(steps):
      asked = clock()
      inputs = self._next(self.step)
      wait += clock() - asked
      params, model_state, opt_state, loss = self._step(
          params, model_state, opt_state, self.data, self._place(inputs), np.int32(self.step))
      self.step += 1
      if self._feed is not None:
        self._feed.prefetch(self.step)  # the next batch is read while the device computes
    jax.block_until_ready((params, model_state, opt_state, loss))
    seconds = clock() - start
    self.state = (params, model_state, opt_state)
    return steps * self.batch / seconds, wait, seconds

  def close(self) -> None:
    if self._feed is not None:
      self._feed.close()


def run_repeat(case: dict[str, Any], clock: Callable[[], float]) -> dict[str, Any]:
  """One throughput phase with a hand window after each of its timed windows.

  Returns ``overhead.summarize``'s repeat (the hand loop in both hand-loop slots) plus
  both loops' input-wait fractions.
  """
  hand, rates, waits = case["hand"], {"harness": [], "hand": []}, [0.0, 0.0]
  hand.window(case["spec"].steps_per_call, clock)  # warm-up, not recorded

  def on_window(window: Window) -> None:
    rates["harness"].append(window.examples / window.seconds)
    rate, wait, seconds = hand.window(window.steps, clock)
    rates["hand"].append(rate)
    waits[0] += wait
    waits[1] += seconds

  point = throughput.measure(case["spec"], cache=case["cache"], clock=clock,
                             on_window=on_window)
  case["window"] = point["calls_per_window"] * point["steps_per_call"]
  return {"windows": {"harness": rates["harness"], "dispatched": rates["hand"],
                      "fused": rates["hand"]},
          "harness_row": point["samples_per_sec"],
          "harness_wait": point["input_wait_fraction"], "hand_wait": waits[0] / waits[1]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help=f"smaller models, cases {','.join(QUICK_CASES)}, 1 repeat of 3 windows")
  p.add_argument("--tiny", action="store_true",
                 help="test-size models (a smoke test: the numbers mean nothing)")
  p.add_argument("--cases", default=None,
                 help=f"comma-separated, of {', '.join(CASES)} (default: all)")
  p.add_argument("--resnet_batches", default="32", help="comma-separated global batches")
  p.add_argument("--lm_batches", default="8", help="comma-separated global batches")
  p.add_argument("--steps_per_call", type=int, default=None,
                 help=f"the harness's K (default {STEPS_PER_CALL})")
  p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 2)")
  p.add_argument("--windows", type=int, default=None,
                 help="timed windows per repeat (at least 3; default 6)")
  args = p.parse_args(argv)
  cases = args.cases or ",".join(QUICK_CASES if args.quick else CASES)
  args.cases = [c.strip() for c in cases.split(",") if c.strip()]
  unknown = sorted(set(args.cases) - set(CASES))
  if unknown:
    p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
  args.batches = {"resnet": [int(b) for b in args.resnet_batches.split(",")],
                  "lm": [int(b) for b in args.lm_batches.split(",")]}
  args.sizes = TINY_SIZES if args.tiny else QUICK_SIZES if args.quick else SIZES
  args.repeats = args.repeats or (1 if args.quick else 2)
  args.windows = max(3, args.windows or (3 if args.quick else 6))
  return args


def build_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
  """One case per (case name, batch): its harness spec, program cache and hand loop."""
  cases = []
  for name in args.cases:
    case = CASES[name]
    for batch in args.batches[case.model]:
      k = args.steps_per_call or STEPS_PER_CALL[case.model]
      spec = harness_spec(case, args.sizes[case.model], batch, k,
                          args.windows)
      cases.append({"name": name, "batch": batch, "spec": spec, "window": None,
                    "cache": ProgramCache(flops=False), "hand": HandLoop(spec),
                    "tokens": lm_lib.tokens_per_example(get_workload(
                        spec.workload, dict(spec.workload_options))), "repeats": []})
  return cases


def print_header(args: argparse.Namespace, env: dict[str, Any]) -> None:
  print("batchbench on real workloads: the throughput phase vs a hand-written JAX loop, "
        "and input wait")
  print(f"  {env['date']}; Python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}")
  print(f"  device: {env['device_count']} x {env['device_kind']} ({env['backend']}); "
        f"{env['cpus']} CPUs ({env['usable_cpus']} usable), {env['machine']}; "
        f"load average {overhead._show_load(env['loadavg'])}")  # pylint: disable=protected-access
  print(f"  models: ResNet-18 {args.sizes['resnet']} (32x32x3, BatchNorm, crop+flip); "
        f"Transformer LM {args.sizes['lm']} (other options the workload's defaults)")
  print("  optimizers: the config files' (resnet18_cifar10: SGD momentum 0.9, L2 5e-4, "
        "linear LR rule; transformer_lm: Adam, sqrt LR rule, warmup), 1 device")
  print(f"  timing: each repeat, the harness's throughput phase (K steps per call) times "
        f"{args.windows}+ windows of ~{WINDOW_SECONDS} s (whole calls; at most 60 s of them) "
        "after 1 warm-up and 1 sizing call; after each, the hand loop runs a window of the "
        f"same steps outside the harness's timed region; {args.repeats} repeat(s)")
  print("  hand loop: 1 jitted step per call, state donated, inputs device_put to the "
        "harness's batch sharding, the host feed read 1 step ahead; 1 warm-up window")
  print()


def print_table(cases: list[dict[str, Any]], env: dict[str, Any], seconds: float) -> None:
  """The results table, its legend and a SUMMARY line."""
  header = (f"{'case':<18} {'batch':>5} {'K':>2} {'W':>3}  {'harness':>8} {'tokens/s':>8} "
            f"{'hand':>8}  {'ratio':>5} {'paired':>6} {'n':>3} {'95% CI':>9}  "
            f"{'wait h':>6} {'wait hand':>9}")
  print(header)
  print("-" * len(header))
  paired = []
  for case in cases:
    st = overhead.summarize(case["repeats"])
    med = st["med"]
    h_wait = statistics.median(r["harness_wait"] for r in case["repeats"])
    hand_wait = statistics.median(r["hand_wait"] for r in case["repeats"])
    tokens = f"{med['harness'] * case['tokens']:>8,.0f}" if case["tokens"] else f"{'-':>8}"
    paired.append(st["paired"])
    print(f"{case['name']:<18} {case['batch']:>5} {case['spec'].steps_per_call:>2} "
          f"{case['window']:>3}  "
          f"{med['harness']:>8,.1f} {tokens} {med['dispatched']:>8,.1f}  "
          f"{st['ratio']:>5.3f} {st['paired']:>6.3f} {st['pairs']:>3} "
          f"{st['paired_ci'][0]:.2f}-{st['paired_ci'][1]:.2f}  "
          f"{h_wait:>6.1%} {hand_wait:>9.1%}")
  print()
  print("harness, hand: samples/sec, medians over repeats of each repeat's median window "
        "(the harness's: its point's samples_per_sec); tokens/s: the harness's, LM only. "
        "K: the harness's steps per call; W: steps per timed window.")
  print("ratio: harness / hand of those medians; paired: median over all n timed windows of "
        "harness window i / hand window i run right after it; 95% CI: a bootstrap interval "
        "of that median.")
  print("wait h / wait hand: share of timed window time blocked in getting the next batch "
        "(the harness's row's input_wait_fraction; the hand loop's the same way), median "
        "over repeats.")
  if paired:
    print(f"SUMMARY: harness / hand loop, paired, {min(paired):.3f}-{max(paired):.3f} over "
          f"{len(paired)} case(s); {seconds:.0f}s; load average at end "
          f"{overhead._show_load(overhead._loadavg())}")  # pylint: disable=protected-access


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  register_workloads()
  clock = time.perf_counter
  env = overhead.environment()
  began = clock()
  cases = build_cases(args)
  print_header(args, env)
  try:
    for r in range(args.repeats):
      for case in cases:
        case["repeats"].append(run_repeat(case, clock))
      print(f"  repeat {r + 1}/{args.repeats} done ({clock() - began:.0f}s, compiles "
            "included)", flush=True)
  finally:
    for case in cases:
      case["hand"].close()
  print()
  print_table(cases, env, clock() - began)
  return 0


if __name__ == "__main__":
  sys.exit(main())

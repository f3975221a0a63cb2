"""Harness overhead: the throughput phase against two minimal hand-written JAX loops.

For each workload and global batch this times three training loops on the same
model (the workload's own ``init`` and ``loss``), optimizer (SGD with momentum 0.9,
constant LR), batch and window size, on one device:

  harness     ``batchbench.runs.throughput.measure``: the throughput phase every
              sweep point is measured with (pure train calls of K steps, the
              workload's data gathered on device from the feed's indices).
  dispatched  one jitted step per Python call, batches pre-sliced on device.
  fused       K steps per call, one ``lax.scan`` over a (K, B, ...) stack on device,
              with the harness's K.

Every loop blocks once per window and discards warm-up work. The loops are
interleaved window by window: the throughput phase calls its ``on_window`` hook
after each timed window, outside its timed region, and the hook runs one
dispatched and one fused window of the same number of steps (alternating which goes
first). The table shows, per (workload, batch), the medians over repeats and two
ratios to the better hand loop: of the medians, and ``paired``, the median over all
windows of harness window i / hand window i run right after it. Pairing cancels
load that changes between seconds on a shared machine, so ``paired`` is the
verdict: it should be at least ``THRESHOLD`` at every batch. The benchmark reports
and never asserts: the exit status is 0.

  .venv/bin/python benchmarks/overhead.py            # default run, about 3 minutes
  .venv/bin/python benchmarks/overhead.py --quick    # digits and synthetic at 32, 1024

What counts as overhead, deliberately: the hand loops read ready-made batches; the
harness gathers each digits batch on device from example indices it builds and
transfers once per call, and draws synthetic batches on device once per call.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jaxlib
import numpy as np
import optax

from batchbench import config as bb_config
from batchbench.data.arrays import MASK
from batchbench.measure.timing import Window
from batchbench.runs import throughput
from batchbench.workloads import get_workload

THRESHOLD = 0.97
LR = 0.01  # small and unscaled, so no batch diverges
MOMENTUM = 0.9
SEED = 0
METHODS = ("harness", "dispatched", "fused")
BOOTSTRAP_RESAMPLES = 2000
WINDOW_SECONDS = 0.25  # about this much work per timed window


def harness_spec(workload: str, batch: int, windows: int) -> bb_config.TrialSpec:
  """A resolved trial whose throughput phase times ``windows`` windows of ~0.25 s."""
  c = bb_config.default_config()
  c.workload = workload
  c.global_batch = batch
  c.num_devices = 1
  c.optimizer = "sgd"
  c.momentum = MOMENTUM
  c.base_lr = LR
  c.lr_rule = "none"
  c.target_metric = bb_config.NO_TARGET
  c.max_steps = 1_000_000
  c.seed = SEED
  c.throughput.min_windows = windows
  c.throughput.min_seconds = windows * WINDOW_SECONDS
  c.throughput.max_seconds = 4 * windows * WINDOW_SECONDS
  return bb_config.resolve(c, num_available_devices=1)


class HandLoops:
  """The two reference loops for one (workload, batch), compiled once, state on device."""

  def __init__(self, workload_name: str, batch: int, fused_steps: int, device: jax.Device):
    workload = get_workload(workload_name)
    tx = optax.sgd(LR, momentum=MOMENTUM)
    key = jax.random.key(SEED)

    def step(params, opt_state, batch):
      def mean_loss(p):
        out = workload.loss(p, {}, batch, key)
        return out.loss_sum / out.count
      loss, grads = jax.value_and_grad(mean_loss)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    def fused(params, opt_state, stack):
      def body(carry, batch):
        p, o, loss = step(*carry, batch)
        return (p, o), loss
      (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), stack)
      return params, opt_state, losses

    k = fused_steps
    rng = np.random.default_rng(SEED)
    if workload.synthetic:
      stack = jax.device_get(workload.synthetic_batch(jax.random.key(SEED), k * batch))
      stack = {n: np.asarray(a).reshape(k, batch, *a.shape[1:]) for n, a in stack.items()}
    else:
      data = workload.data()
      idx = rng.integers(0, data.num_train, (k, batch))
      stack = {n: a[idx] for n, a in data.train.items()}
    stack[MASK] = np.ones((k, batch), np.float32)
    self.stack = jax.device_put(stack, device)
    self.batches = [jax.device_put({n: a[i] for n, a in stack.items()}, device)
                    for i in range(k)]
    params, _ = workload.init(jax.random.key(SEED), workload.batch_spec(1))
    params = jax.device_put(params, device)
    opt_state = jax.device_put(tx.init(params), device)
    self.state = (params, opt_state)
    donate = (0, 1)
    self._step = jax.jit(step, donate_argnums=donate).lower(
        params, opt_state, self.batches[0]).compile()
    self._fused = jax.jit(fused, donate_argnums=donate).lower(
        params, opt_state, self.stack).compile()
    self.k = k
    self.batch = batch

  def window_rate(self, method: str, steps: int, clock: Callable[[], float]) -> float:
    """Samples/sec of one window of ``steps`` steps of ``method``."""
    params, opt_state = self.state
    start = clock()
    if method == "dispatched":
      for s in range(steps):
        params, opt_state, loss = self._step(params, opt_state, self.batches[s % self.k])
    else:
      for _ in range(steps // self.k):
        params, opt_state, loss = self._fused(params, opt_state, self.stack)
    jax.block_until_ready((params, opt_state, loss))
    seconds = clock() - start
    self.state = (params, opt_state)
    return steps * self.batch / seconds


def run_repeat(case: dict[str, Any], clock: Callable[[], float]) -> dict[str, Any]:
  """One repeat of one case: every loop's samples/sec, window by window.

  The hand loops run from the throughput phase's ``on_window`` hook, after each
  timed window, outside the timed region: harness window i is followed by
  dispatched and fused window i (alternating which goes first), so load on the
  machine hits the three alike. Each hand loop's first window is a warm-up.

  Returns:
    ``{"windows": {loop: [samples/sec of timed window i]}, "harness_row": the
    point's samples_per_sec}``.
  """
  hand = case["hand"]
  rates: dict[str, list[float]] = {m: [] for m in METHODS}
  for method in ("dispatched", "fused"):  # warm-up, not recorded
    hand.window_rate(method, hand.k, clock)

  def on_window(window: Window) -> None:
    rates["harness"].append(window.examples / window.seconds)
    first = len(rates["harness"]) % 2
    for method in (("dispatched", "fused") if first else ("fused", "dispatched")):
      rates[method].append(hand.window_rate(method, window.steps, clock))

  point = throughput.measure(case["spec"], clock=clock, on_window=on_window)
  case["window"] = point["calls_per_window"] * point["steps_per_call"]
  return {"windows": rates, "harness_row": point["samples_per_sec"]}


def summarize(repeats: list[dict[str, Any]]) -> dict[str, Any]:
  """The statistics of one case over its repeats.

  * ``med``: per loop, the median over repeats of the per-repeat median window
    (for the harness that is its row's ``samples_per_sec``);
  * ``better``: the hand loop with the higher ``med``;
  * ``ratio``: harness / better of the ``med``s; ``range``: that ratio per repeat,
    min and max; ``best``: the ratio of each loop's best repeat;
  * ``paired``: the median over all timed windows of harness window i / better-loop
    window i (run right after it), and ``paired_ci``, a 95% bootstrap interval of
    that median (resampling the pairs; fixed seed, so reruns on the same numbers
    agree). Pairing cancels load that changes between seconds, so this is the
    verdict.
  """
  per_repeat = {m: [statistics.median(r["windows"][m]) for r in repeats] for m in METHODS}
  per_repeat["harness"] = [r["harness_row"] for r in repeats]
  med = {m: statistics.median(v) for m, v in per_repeat.items()}
  better = max(("dispatched", "fused"), key=lambda m: med[m])
  repeat_ratios = [h / max(d, f) for h, d, f in zip(
      per_repeat["harness"], per_repeat["dispatched"], per_repeat["fused"], strict=True)]
  pairs = [h / b for r in repeats
           for h, b in zip(r["windows"]["harness"], r["windows"][better], strict=True)]
  pairs = np.asarray(pairs)
  resampled = np.random.default_rng(0).choice(pairs, (BOOTSTRAP_RESAMPLES, pairs.size))
  ci = np.percentile(np.median(resampled, axis=1), [2.5, 97.5])
  return {"med": med, "better": better, "ratio": med["harness"] / med[better],
          "range": (min(repeat_ratios), max(repeat_ratios)),
          "best": max(per_repeat["harness"]) / max(max(per_repeat["dispatched"]),
                                                    max(per_repeat["fused"])),
          "paired": float(np.median(pairs)), "paired_ci": (float(ci[0]), float(ci[1])),
          "pairs": int(pairs.size)}


def environment() -> dict[str, Any]:
  devices = jax.devices()
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  return {
      "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
      "python": platform.python_version(), "jax": jax.__version__,
      "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind, "device_count": len(devices),
      "cpus": os.cpu_count(), "usable_cpus": usable,
      "machine": f"{platform.system()} {platform.machine()} {platform.processor() or ''}".strip(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "loadavg": _loadavg(),
  }


def _loadavg() -> tuple[float, float, float] | None:
  try:
    return os.getloadavg()
  except OSError:
    return None


def _show_load(load: tuple[float, float, float] | None) -> str:
  return "n/a" if load is None else " ".join(f"{x:.1f}" for x in load)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="batches 32,1024; 2 repeats of 5 windows (about a minute)")
  p.add_argument("--workloads", default="digits_mlp,synthetic_mlp",
                 help="comma-separated workload names")
  p.add_argument("--batches", default=None,
                 help="comma-separated global batches (default 32,256,1024)")
  p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5)")
  p.add_argument("--windows", type=int, default=None,
                 help="timed windows per repeat (at least 3; default 8)")
  args = p.parse_args(argv)
  quick = args.quick
  args.batches = [int(b) for b in (args.batches or ("32,1024" if quick else "32,256,1024"))
                  .split(",")]
  args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
  args.repeats = args.repeats or (2 if quick else 5)
  args.windows = max(3, args.windows or (5 if quick else 8))
  return args


def build_cases(args: argparse.Namespace, device: jax.Device) -> list[dict[str, Any]]:
  """One case per (workload, batch): the harness spec and the compiled hand loops."""
  cases = []
  for name in args.workloads:
    for batch in args.batches:
      spec = harness_spec(name, batch, args.windows)
      hand = HandLoops(name, batch, spec.steps_per_call, device)
      cases.append({"workload": name, "batch": batch, "window": None, "spec": spec,
                    "hand": hand, "repeats": []})
  return cases


def print_header(args: argparse.Namespace, env: dict[str, Any]) -> None:
  print("batchbench harness overhead: the throughput phase vs hand-written JAX loops")
  print(f"  {env['date']}; Python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}")
  print(f"  device: {env['device_count']} x {env['device_kind']} ({env['backend']}); "
        f"{env['cpus']} CPUs ({env['usable_cpus']} usable), {env['machine']}; "
        f"load average {_show_load(env['loadavg'])}")
  if env["xla_flags"]:
    print(f"  XLA_FLAGS={env['xla_flags']}")
  print(f"  model: the workload's own init and loss; SGD momentum {MOMENTUM}, constant LR "
        f"{LR}; 1 device")
  print(f"  timing: each repeat, the harness's throughput phase times {args.windows}+ "
        f"windows of ~{WINDOW_SECONDS} s (after its warm-up calls), one block_until_ready "
        f"per window; after each, one dispatched and one fused window of the same steps run "
        f"(outside the harness's timed region); {args.repeats} repeats")
  print("  dispatched: 1 jitted step per call; fused: K steps per lax.scan call (the "
        "harness's K); both read batches already on device")
  print()


def print_table(cases: list[dict[str, Any]], env: dict[str, Any], seconds: float) -> None:
  """The results table, its legend, a SUMMARY line and, on a busy machine, a NOTE."""
  header = (f"{'workload':<14} {'batch':>5} {'W':>5} {'K h/f':>6}  {'harness':>9} "
            f"{'dispatched':>10} {'fused':>9}  {'ratio':>5} {'range':>9} {'best':>5}  "
            f"{'paired':>6} {'95% CI':>9}  verdict")
  print(header)
  print("-" * len(header))
  worst, passed, unsure = None, 0, []
  for case in cases:
    st = summarize(case["repeats"])
    med = st["med"]
    ok = st["paired"] >= THRESHOLD
    passed += ok
    if st["paired_ci"][0] < THRESHOLD <= st["paired_ci"][1]:
      unsure.append(f"{case['workload']} B={case['batch']}")
    if worst is None or st["paired"] < worst[0]:
      worst = (st["paired"], case["workload"], case["batch"], st["ratio"])
    ks = f"{case['spec'].steps_per_call}/{case['hand'].k}"
    print(f"{case['workload']:<14} {case['batch']:>5} {case['window']:>5} {ks:>6}  "
          f"{med['harness']:>9,.0f} {med['dispatched']:>10,.0f} {med['fused']:>9,.0f}  "
          f"{st['ratio']:>5.3f} {st['range'][0]:.2f}-{st['range'][1]:.2f} {st['best']:>5.3f}  "
          f"{st['paired']:>6.3f} {st['paired_ci'][0]:.2f}-{st['paired_ci'][1]:.2f}  "
          f"{'PASS' if ok else 'BELOW'}")
  print()
  print("samples/sec, medians over repeats of each repeat's median window (the harness's: "
        "its point's samples_per_sec). W: steps per timed window; K h/f: steps per call of "
        "the harness / of the fused loop.")
  print("ratio: harness / max(dispatched, fused) of those medians; range: the same ratio per "
        "repeat, min-max; best: the ratio of each loop's best repeat.")
  print("paired: median over all timed windows of harness window i / window i of the better "
        "hand loop, run right after it; 95% CI: a bootstrap interval of that median.")
  print(f"verdict: PASS when paired >= {THRESHOLD}. Pairing cancels load that changes from "
        "second to second, which moves the ratio of medians by several percent here.")
  if worst is None:
    return
  load, cpus = _loadavg(), env["usable_cpus"]
  print(f"SUMMARY: harness >= {THRESHOLD} x the better hand loop at {passed}/{len(cases)} "
        f"points (paired); worst paired {worst[0]:.3f} ({worst[1]} B={worst[2]}, ratio of "
        f"medians {worst[3]:.3f}); {seconds:.0f}s; load average at end {_show_load(load)}")
  if unsure:
    print(f"UNCERTAIN: the 95% CI straddles {THRESHOLD} at {', '.join(unsure)}; more "
          "--repeats or --windows narrow it.")
  if any(x is not None and x[0] > cpus + 0.5 for x in (env["loadavg"], load)):
    print(f"NOTE: the machine was busy (1-min load above its {cpus} CPUs): numbers "
          "are noisy; rerun on an idle machine before trusting a verdict.")


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  clock = time.perf_counter
  env = environment()
  began = clock()
  cases = build_cases(args, jax.devices()[0])
  print_header(args, env)
  for r in range(args.repeats):
    for case in cases:
      case["repeats"].append(run_repeat(case, clock))
    print(f"  repeat {r + 1}/{args.repeats} done ({clock() - began:.0f}s)", flush=True)
  print()
  print_table(cases, env, clock() - began)
  return 0


if __name__ == "__main__":
  sys.exit(main())

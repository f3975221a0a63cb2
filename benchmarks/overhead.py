"""Harness overhead: ``trial.run_trial`` against two minimal hand-written JAX loops.

For each workload and global batch this times three loops on the same model,
optimizer (SGD with momentum 0.9, constant LR), batch and window size, on one
device:

  harness     ``batchbench.trial.run_trial`` with no target; its reported
              ``samples_per_sec`` (median over its timed windows).
  dispatched  one jitted step per Python call, batches pre-sliced on device.
  fused       K steps per call, one ``lax.scan`` over a (K, B, ...) stack on device;
              K is the largest divisor of the window up to 64, not the harness's
              choice, so a poor automatic ``steps_per_call`` shows up here.

Every loop blocks once per timed window of W steps (W is the harness's own
window, about ``trial.WINDOW_EXAMPLES`` examples), discards its first window as
warm-up and reports the median over the rest. The loops are interleaved window
by window: after each harness window, ``run_trial``'s ``on_window`` hook runs one
dispatched and one fused window (outside the harness's timed region), so load on
the machine hits the three alike. The table shows medians over repeats and
``harness / max(dispatched, fused)``, which should be at least ``THRESHOLD`` at
every batch. It reports and never asserts: the exit status is 0.

  .venv/bin/python benchmarks/overhead.py            # default run, about 3-5 minutes
  .venv/bin/python benchmarks/overhead.py --quick    # about a minute

What the comparison includes (see benchmarks/README.md):
  * The hand loops read pre-made batches; the harness gathers each batch on device
    from example indices it transfers per call (digits) or draws it with
    ``jax.random`` inside the step (synthetic). Both costs count as overhead.
  * The harness closes a timing window at each eval for an embedded dataset, so
    for ``digits_mlp`` ``eval_every_examples`` is one window and the (untimed)
    eval runs between windows. With evals pushed past the budget the whole run
    would be one window and its "median" would include the warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from batchbench import config as bb_config
from batchbench import trial
from batchbench.workloads import get_workload

THRESHOLD = 0.97
LR = 0.01  # small and unscaled, so no batch diverges (a diverged trial stops early)
MOMENTUM = 0.9
SEED = 0
METHODS = ("harness", "dispatched", "fused")
MAX_FUSED_STEPS = 64  # the hand-fused loop's K: the largest divisor of the window up to this


def window_steps_for(batch: int, window_examples: int) -> int:
  """Steps per timed window: ``window_examples`` worth, at least one step."""
  return max(1, window_examples // batch)


def harness_spec(workload: str, batch: int, window_steps: int, windows: int
                 ) -> bb_config.TrialSpec:
  """A resolved trial with no target, LR unscaled, and ``windows`` + 1 windows.

  For an embedded dataset the harness closes a window at each eval, so the eval
  interval is set to one window; a synthetic workload's window is the harness's
  own ``trial.WINDOW_EXAMPLES`` rule, which ``window_steps`` reproduces.
  """
  c = bb_config.default_config()
  c.workload = workload
  c.global_batch = batch
  c.num_devices = 1
  c.optimizer = "sgd"
  c.momentum = MOMENTUM
  c.base_lr = LR
  c.lr_rule = "none"
  c.schedule = "constant"
  c.warmup_examples = 0
  c.target_metric = bb_config.NO_TARGET
  c.eval_every_examples = window_steps * batch
  c.max_steps = (windows + 1) * window_steps
  c.seed = SEED
  return bb_config.resolve(c, num_available_devices=1)


def harness_window_steps(spec: bb_config.TrialSpec) -> int:
  """Steps in one of the harness's timed windows (mirrors ``trial.run_trial``)."""
  k = spec.steps_per_call
  if spec.eval_every_steps:
    calls = max(1, spec.eval_every_steps // k)
  else:
    calls = max(1, trial.WINDOW_EXAMPLES // (k * spec.global_batch))
  return calls * k


class HandLoops:
  """The two reference loops for one (workload, batch), compiled once, state on device."""

  def __init__(self, workload_name: str, batch: int, fused_steps: int, window_steps: int,
               device: jax.Device):
    workload = get_workload(workload_name)
    tx = optax.sgd(LR, momentum=MOMENTUM)
    grad_fn = jax.value_and_grad(workload.loss, has_aux=True)

    def step(params, opt_state, x, y):
      mask = jnp.ones((x.shape[0],), jnp.float32)
      (loss_sum, count), grads = grad_fn(params, x, y, mask)
      grads = jax.tree.map(lambda g: g / count, grads)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss_sum / count

    def fused(params, opt_state, xs, ys):
      def body(carry, xy):
        p, o, loss = step(*carry, *xy)
        return (p, o), loss
      (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), (xs, ys))
      return params, opt_state, losses

    k = fused_steps
    rng = np.random.default_rng(SEED)
    if workload.synthetic:
      xs = rng.standard_normal((k, batch, *workload.input_shape), np.float32)
      ys = rng.integers(0, workload.num_classes, (k, batch), dtype=np.int32)
    else:
      data = workload.data()
      idx = rng.integers(0, data.num_train, (k, batch))
      xs, ys = data.train_x[idx], data.train_y[idx]
    self.xs, self.ys = jax.device_put((xs, ys), device)
    self.batches = [jax.device_put((xs[i], ys[i]), device) for i in range(k)]

    params = jax.device_put(workload.init(jax.random.key(SEED)), device)
    opt_state = jax.device_put(tx.init(params), device)
    self.state = (params, opt_state)
    donate = (0, 1)
    self._step = jax.jit(step, donate_argnums=donate).lower(
        params, opt_state, *self.batches[0]).compile()
    self._fused = jax.jit(fused, donate_argnums=donate).lower(
        params, opt_state, self.xs, self.ys).compile()
    self.k = k
    self.batch = batch
    self.window_steps = window_steps

  def dispatched_window(self, clock: Callable[[], float]) -> float:
    """Seconds for one window of ``window_steps`` steps, one jitted step per call."""
    params, opt_state = self.state
    start = clock()
    for s in range(self.window_steps):
      x, y = self.batches[s % self.k]
      params, opt_state, loss = self._step(params, opt_state, x, y)
    jax.block_until_ready((params, opt_state, loss))
    seconds = clock() - start
    self.state = (params, opt_state)
    return seconds

  def fused_window(self, clock: Callable[[], float]) -> float:
    """Seconds for one window of ``window_steps`` steps, ``k`` steps per call."""
    params, opt_state = self.state
    start = clock()
    for _ in range(self.window_steps // self.k):
      params, opt_state, losses = self._fused(params, opt_state, self.xs, self.ys)
    jax.block_until_ready((params, opt_state, losses))
    seconds = clock() - start
    self.state = (params, opt_state)
    return seconds

  def window_rate(self, method: str, clock: Callable[[], float]) -> float:
    """Samples/sec of one window of ``method`` ("dispatched" or "fused")."""
    window = self.dispatched_window if method == "dispatched" else self.fused_window
    return self.window_steps * self.batch / window(clock)


def run_repeat(case: dict[str, Any], windows: int, clock: Callable[[], float],
               interleave_windows: bool) -> dict[str, float]:
  """One repeat of one case: each loop's median samples/sec over ``windows`` windows.

  With ``interleave_windows`` the hand loops run from ``run_trial``'s ``on_window``
  hook, which it calls after each timing window, outside the timed region: harness,
  dispatched and fused windows then alternate, so load on the machine hits the three
  alike. The first window of each loop is a warm-up, as in the harness.
  """
  hand = case["hand"]
  hand_rates: dict[str, list[float]] = {"dispatched": [], "fused": []}
  seen = 0

  def on_window(step: int) -> None:
    nonlocal seen
    del step
    order = ("dispatched", "fused") if seen % 2 == 0 else ("fused", "dispatched")
    for method in order:
      hand_rates[method].append(hand.window_rate(method, clock))
    seen += 1

  if interleave_windows:
    harness = run_harness(case["spec"], windows, on_window=on_window)
  else:
    harness = run_harness(case["spec"], windows)
    for _ in range(windows + 1):
      on_window(0)
  out = {m: statistics.median(r[1:]) for m, r in hand_rates.items()}
  out["harness"] = harness
  return out


def run_harness(spec: bb_config.TrialSpec, expected_windows: int,
                **kwargs: Any) -> float:
  """``run_trial``'s samples/sec for ``spec``; NaN (with a warning) if it has none."""
  row = trial.run_trial(spec, log=None, **kwargs)
  if row["status"] != "ok" or row["timed_windows"] != expected_windows:
    print(f"  warning: harness {spec.workload} B={spec.global_batch}: status "
          f"{row['status']}, {row['timed_windows']} timed windows (expected "
          f"{expected_windows})", file=sys.stderr)
  rate = row["samples_per_sec"]
  return float("nan") if rate is None else float(rate)


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
                 help="batches 32,1024; 2 repeats of 3 windows (under a minute)")
  p.add_argument("--workloads", default="digits_mlp,synthetic_mlp",
                 help="comma-separated workload names")
  p.add_argument("--batches", default=None,
                 help="comma-separated global batches (default 32,256,1024)")
  p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5)")
  p.add_argument("--windows", type=int, default=None,
                 help="timed windows per loop per repeat, after one warm-up (default 5)")
  p.add_argument("--window-examples", type=int, default=trial.WINDOW_EXAMPLES,
                 help="examples per timed window of an embedded dataset (its eval "
                      "interval); a synthetic workload keeps the harness's own window "
                      f"(default {trial.WINDOW_EXAMPLES})")
  p.add_argument("--fused-steps", type=int, default=0,
                 help="K of the hand-fused loop; 0 = the largest divisor of the window "
                      f"up to {MAX_FUSED_STEPS}")
  args = p.parse_args(argv)
  # Window-by-window interleaving needs run_trial's on_window hook.
  args.interleave_windows = "on_window" in inspect.signature(trial.run_trial).parameters
  quick = args.quick
  args.batches = [int(b) for b in (args.batches or ("32,1024" if quick else "32,256,1024"))
                  .split(",")]
  args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
  args.repeats = args.repeats or (2 if quick else 5)
  args.windows = args.windows or (3 if quick else 5)
  return args


def fused_steps_for(window_steps: int, cap: int = MAX_FUSED_STEPS) -> int:
  """The hand-fused loop's K: the largest divisor of the window at most ``cap``."""
  return max(d for d in range(1, min(window_steps, cap) + 1) if window_steps % d == 0)


def build_cases(args: argparse.Namespace, device: jax.Device) -> list[dict[str, Any]]:
  """One case per (workload, batch): the harness spec and the compiled hand loops."""
  cases = []
  for name in args.workloads:
    for batch in args.batches:
      window = window_steps_for(batch, args.window_examples)
      spec = harness_spec(name, batch, window, args.windows)
      if harness_window_steps(spec) != window:  # the harness rounds to whole calls
        window = harness_window_steps(spec)
        spec = harness_spec(name, batch, window, args.windows)
      k = args.fused_steps or fused_steps_for(window)
      if window % k:
        print(f"skipping {name} B={batch}: --fused-steps={k} does not divide the "
              f"{window}-step window", file=sys.stderr)
        continue
      cases.append({"workload": name, "batch": batch, "window": window, "spec": spec,
                    "hand": HandLoops(name, batch, k, window, device),
                    "rates": {m: [] for m in METHODS}})
  return cases


def print_header(args: argparse.Namespace, env: dict[str, Any]) -> None:
  print("batchbench harness overhead: trial.run_trial vs hand-written JAX loops")
  print(f"  {env['date']}; Python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}")
  print(f"  device: {env['device_count']} x {env['device_kind']} ({env['backend']}); "
        f"{env['cpus']} CPUs ({env['usable_cpus']} usable), {env['machine']}; "
        f"load average {_show_load(env['loadavg'])}")
  if env["xla_flags"]:
    print(f"  XLA_FLAGS={env['xla_flags']}")
  print(f"  model: the workload's own init and loss; SGD momentum {MOMENTUM}, constant LR "
        f"{LR}; 1 device")
  how = ("window by window (hand windows run from run_trial's on_window hook, outside its "
         "timed region)" if args.interleave_windows else "trial by trial")
  print(f"  timing: each loop, each repeat: 1 warm-up + {args.windows} windows of W steps "
        f"(~{args.window_examples} examples), one block_until_ready per window, median over "
        f"windows; {args.repeats} repeats, median over repeats; loops interleaved {how}")
  print("  harness: run_trial's samples_per_sec (no target; digits: eval once per window, "
        "outside the timed region)")
  print("  dispatched: 1 jitted step per call; fused: K steps per lax.scan call; both read "
        "batches already on device")
  print()


def print_table(cases: list[dict[str, Any]], env: dict[str, Any], seconds: float) -> None:
  """The results table, its legend, a SUMMARY line and, on a busy machine, a NOTE."""
  header = (f"{'workload':<14} {'batch':>5} {'W':>5} {'K h/f':>6}  {'harness':>9} "
            f"{'dispatched':>10} {'fused':>9}  {'ratio':>5} {'range':>9} {'best':>5}  verdict")
  print(header)
  print("-" * len(header))
  worst, passed = None, 0
  for case in cases:
    rates = case["rates"]
    med = {m: statistics.median(v) for m, v in rates.items()}
    ratio = med["harness"] / max(med["dispatched"], med["fused"])
    best = max(rates["harness"]) / max(max(rates["dispatched"]), max(rates["fused"]))
    per_repeat = [h / max(d, f) for h, d, f in
                  zip(rates["harness"], rates["dispatched"], rates["fused"], strict=True)]
    ok = ratio >= THRESHOLD
    passed += ok
    if worst is None or ratio < worst[0]:
      worst = (ratio, case["workload"], case["batch"])
    ks = f"{case['spec'].steps_per_call}/{case['hand'].k}"
    print(f"{case['workload']:<14} {case['batch']:>5} {case['window']:>5} {ks:>6}  "
          f"{med['harness']:>9,.0f} {med['dispatched']:>10,.0f} {med['fused']:>9,.0f}  "
          f"{ratio:>5.3f} {min(per_repeat):.2f}-{max(per_repeat):.2f} {best:>5.3f}  "
          f"{'PASS' if ok else 'BELOW'}")
  print()
  print("samples/sec, medians over repeats. W: steps per timed window; K h/f: steps per call "
        "of the harness / of the fused loop.")
  print("ratio: harness / max(dispatched, fused) of the medians (the verdict, PASS at >= "
        f"{THRESHOLD}); range: the same ratio per repeat, min-max;")
  print("best: the ratio of each loop's best repeat (less sensitive to other load on the "
        "machine).")
  if worst is None:
    return
  load, cpus = _loadavg(), env["usable_cpus"]
  print(f"SUMMARY: harness >= {THRESHOLD} x the better hand loop at {passed}/{len(cases)} "
        f"points; worst ratio {worst[0]:.3f} ({worst[1]} B={worst[2]}); {seconds:.0f}s; "
        f"load average at end {_show_load(load)}")
  if any(x is not None and x[0] > cpus + 0.5 for x in (env["loadavg"], load)):
    print(f"NOTE: the machine was busy (1-min load above its {cpus} CPUs): medians "
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
      for method, rate in run_repeat(case, args.windows, clock,
                                     args.interleave_windows).items():
        case["rates"][method].append(rate)
    print(f"  repeat {r + 1}/{args.repeats} done ({clock() - began:.0f}s)", flush=True)
  print()
  print_table(cases, env, clock() - began)
  return 0


if __name__ == "__main__":
  sys.exit(main())

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
window, about ``trial.WINDOW_EXAMPLES`` examples) and discards its first window
as warm-up. The loops are interleaved window by window: after each harness
window, ``run_trial``'s ``on_window`` hook (which receives that window's timing)
runs one dispatched and one fused window, outside the harness's timed region.
The table shows, per (workload, batch), the medians over repeats and two ratios
to the better hand loop: of the medians, and ``paired``, the median over all
windows of harness window i / hand window i run right after it. Pairing cancels
load that changes between seconds on a shared machine, so ``paired`` is the
verdict: it should be at least ``THRESHOLD`` at every batch. The benchmark
reports and never asserts: the exit status is 0.

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
from batchbench.timing import Window
from batchbench.workloads import get_workload

THRESHOLD = 0.97
LR = 0.01  # small and unscaled, so no batch diverges (a diverged trial stops early)
MOMENTUM = 0.9
SEED = 0
METHODS = ("harness", "dispatched", "fused")
MAX_FUSED_STEPS = 64  # the hand-fused loop's K: the largest divisor of the window up to this
BOOTSTRAP_RESAMPLES = 2000


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


def run_repeat(case: dict[str, Any], windows: int, clock: Callable[[], float]
               ) -> dict[str, Any]:
  """One repeat of one case: every loop's samples/sec, window by window.

  The hand loops run from ``run_trial``'s ``on_window`` hook, which it calls after
  each timing window, outside the timed region, with that window's timing: harness
  window i is followed by dispatched and fused window i (alternating which goes
  first), so load on the machine hits the three alike and window i of each loop
  can be compared with window i of the others. The first window of each loop is a
  warm-up (dropped), as in the harness.

  Returns:
    ``{"windows": {loop: [samples/sec of timed window i]}, "harness_row": the
    row's samples_per_sec}``.
  """
  hand = case["hand"]
  rates: dict[str, list[float]] = {m: [] for m in METHODS}

  def on_window(step: int, window: Window) -> None:
    del step
    rates["harness"].append(window.examples / window.seconds)
    first = len(rates["harness"]) % 2
    for method in (("dispatched", "fused") if first else ("fused", "dispatched")):
      rates[method].append(hand.window_rate(method, clock))

  row_rate = run_harness(case["spec"], windows, on_window=on_window)
  return {"windows": {m: r[1:] for m, r in rates.items()}, "harness_row": row_rate}


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
                 help="batches 32,1024; 2 repeats of 3 windows (under a minute)")
  p.add_argument("--workloads", default="digits_mlp,synthetic_mlp",
                 help="comma-separated workload names")
  p.add_argument("--batches", default=None,
                 help="comma-separated global batches (default 32,256,1024)")
  p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5)")
  p.add_argument("--windows", type=int, default=None,
                 help="timed windows per loop per repeat, after one warm-up (default 8)")
  p.add_argument("--window-examples", type=int, default=trial.WINDOW_EXAMPLES,
                 help="examples per timed window of an embedded dataset (its eval "
                      "interval); a synthetic workload keeps the harness's own window "
                      f"(default {trial.WINDOW_EXAMPLES})")
  p.add_argument("--fused-steps", type=int, default=0,
                 help="K of the hand-fused loop; 0 = the largest divisor of the window "
                      f"up to {MAX_FUSED_STEPS}")
  args = p.parse_args(argv)
  quick = args.quick
  args.batches = [int(b) for b in (args.batches or ("32,1024" if quick else "32,256,1024"))
                  .split(",")]
  args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
  args.repeats = args.repeats or (2 if quick else 5)
  args.windows = args.windows or (3 if quick else 8)
  return args


def fused_steps_for(window_steps: int, cap: int = MAX_FUSED_STEPS) -> int:
  """The hand-fused loop's K: the largest divisor of the window at most ``cap``."""
  return max(d for d in range(1, min(window_steps, cap) + 1) if window_steps % d == 0)


def matched_window(name: str, batch: int, window: int, windows: int
                   ) -> tuple[int, bb_config.TrialSpec]:
  """The window W and spec for which the harness's own window is W steps.

  The harness rounds its window to whole calls, and its automatic steps per call
  depends on the budget (``windows + 1`` windows), so W and the spec are iterated
  to agreement (a few rounds at most). A synthetic workload's window is whole calls
  of about ``trial.WINDOW_EXAMPLES``; starting from the automatic steps per call
  keeps its budget a multiple of it, so the harness keeps its usual K.
  """
  if get_workload(name).synthetic:
    window = max(window, min(bb_config.MAX_AUTO_STEPS_PER_CALL,
                             bb_config.AUTO_EXAMPLES_PER_CALL // batch))
  for _ in range(8):
    spec = harness_spec(name, batch, window, windows)
    if harness_window_steps(spec) == window:
      return window, spec
    window = harness_window_steps(spec)
  raise RuntimeError(f"{name} B={batch}: no window agrees with the harness's; pass "
                     "--window-examples")


def build_cases(args: argparse.Namespace, device: jax.Device) -> list[dict[str, Any]]:
  """One case per (workload, batch): the harness spec and the compiled hand loops."""
  cases = []
  for name in args.workloads:
    for batch in args.batches:
      window, spec = matched_window(name, batch, window_steps_for(batch, args.window_examples),
                                    args.windows)
      k = args.fused_steps or fused_steps_for(window)
      if window % k:
        print(f"skipping {name} B={batch}: --fused-steps={k} does not divide the "
              f"{window}-step window", file=sys.stderr)
        continue
      cases.append({"workload": name, "batch": batch, "window": window, "spec": spec,
                    "hand": HandLoops(name, batch, k, window, device), "repeats": []})
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
  print(f"  timing: each loop, each repeat: 1 warm-up + {args.windows} windows of W steps "
        f"(~{args.window_examples} examples), one block_until_ready per window; "
        f"{args.repeats} repeats; loops interleaved window by window (hand windows run "
        "from run_trial's on_window hook, outside its timed region)")
  print("  harness: run_trial's samples_per_sec (no target; digits: eval once per window, "
        "outside the timed region)")
  print("  dispatched: 1 jitted step per call; fused: K steps per lax.scan call; both read "
        "batches already on device")
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
  print("samples/sec, medians over repeats of each repeat's median window. W: steps per timed "
        "window; K h/f: steps per call of the harness / of the fused loop.")
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
      case["repeats"].append(run_repeat(case, args.windows, clock))
    print(f"  repeat {r + 1}/{args.repeats} done ({clock() - began:.0f}s)", flush=True)
  print()
  print_table(cases, env, clock() - began)
  return 0


if __name__ == "__main__":
  sys.exit(main())

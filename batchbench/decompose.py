"""For one global batch, which split is fastest: per-device batch x devices x accumulation.

``run_decompose`` enumerates every split ``global_batch = per_device_batch x
num_devices x accum_steps`` the local devices allow (data-parallel degree 1 up to
``config.num_devices``, 0 = all, wherever it divides), and for each compiles the
train call a trial would run, times it the way a trial does (windows closed by
``jax.block_until_ready``, the first discarded as warm-up, median and IQR over
the rest), and records compile seconds and compiled memory. Splits whose
compiled peak exceeds the memory budget are recorded ``over_budget`` and not run.

Every split must compute the same update: from one initial state and the same
global batch of examples (``EpochIndexFeeder`` gives the same indices whatever
the split), one optimizer step runs under each split, and its update ``delta =
params_after - params_before`` is compared with the reference split's (1 device,
no accumulation, or the first split within budget):
``max over parameter tensors of |delta - delta_ref|_2 / |delta_ref|_2``. A norm
per tensor, not per element: Adam's first step is about ``lr * sign(grad)``, so
an element whose gradient is within rounding of zero may flip sign under a
different summation order without the update being any less equal. Splits above
``EQUIVALENCE_TOLERANCE`` are flagged and never named fastest. Synthetic
workloads draw inputs per micro-batch, so their splits see different examples and
are not compared.

``run_inference`` answers the image-generation sense of "batch size vs batch
count": ``total`` examples through the forward pass as ``count`` batches of
``size`` (``size x count = total``), reporting samples/sec, latency per batch and
compiled memory.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from batchbench import parallel
from batchbench.config import ConfigError, check_workdir, resolve
from batchbench.data import device as device_data
from batchbench.probe import format_bytes, format_table, with_fields, write_outputs
from batchbench.timing import WindowTimer
from batchbench.workloads import get_workload

DECOMPOSE_DIR = "decompose"
MODES = ("train", "inference")
EQUIVALENCE_TOLERANCE = 1e-5
WINDOW_EXAMPLES = 8192  # examples per timing window by default
TRAIN_COLUMNS = ("num_devices", "per_device_batch", "accum_steps", "global_batch",
                 "steps_per_call", "status", "samples_per_sec", "samples_per_sec_q25",
                 "samples_per_sec_q75", "step_time_ms", "timed_windows", "compile_s",
                 "peak_bytes", "temp_bytes", "argument_bytes", "max_rel_diff", "equivalent",
                 "fastest")
INFERENCE_COLUMNS = ("batch_size", "batch_count", "total", "status", "samples_per_sec",
                     "latency_ms_median", "latency_ms_q25", "latency_ms_q75", "compile_s",
                     "peak_bytes", "temp_bytes", "argument_bytes")
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Split:
  num_devices: int
  accum_steps: int
  per_device_batch: int


def splits(global_batch: int, max_devices: int) -> list[Split]:
  """Every ``(devices, accum_steps)`` with ``devices x accum_steps`` dividing the batch.

  Devices run from 1 to ``max_devices``; the reference split (1, 1) comes first.
  """
  out = []
  for d in range(1, max_devices + 1):
    if global_batch % d:
      continue
    for a in range(1, global_batch // d + 1):
      if (global_batch // d) % a == 0:
        out.append(Split(d, a, global_batch // (d * a)))
  return out


def update_rel_diff(before, after, ref_after) -> float:
  """Max over tensors of ``|delta - delta_ref|_2 / |delta_ref|_2``, ``delta = after - before``.

  A tensor the reference does not move counts by its absolute difference.
  """
  worst = 0.0
  for b, a, r in zip(*(jax.tree.leaves(t) for t in (before, after, ref_after)), strict=True):
    b, a, r = (np.asarray(x, np.float64) for x in (b, a, r))
    ref_norm = float(np.linalg.norm(r - b))
    diff = float(np.linalg.norm(a - r))
    worst = max(worst, diff / ref_norm if ref_norm > 0 else diff)
  return worst


def run(config: ml_collections.ConfigDict, workdir: str, *, mode: str = "train",
        global_batch: int | None = None, total: int | None = None,
        memory_budget_bytes: int | None = None, log: Log | None = print,
        **kwargs: Any) -> dict[str, Any]:
  """``run_decompose`` (mode train) or ``run_inference`` (mode inference)."""
  if mode not in MODES:
    raise ConfigError("mode", mode, f"must be one of {', '.join(MODES)}")
  if mode == "inference":
    return run_inference(config, workdir, total, memory_budget_bytes=memory_budget_bytes,
                         log=log, **kwargs)
  return run_decompose(config, workdir, global_batch, memory_budget_bytes=memory_budget_bytes,
                       log=log, **kwargs)


def _max_devices(config, available: int) -> int:
  n = config.num_devices
  if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= available:
    raise ConfigError("num_devices", n, f"must be between 1 and the {available} available "
                                        "devices (0 = all): the largest data-parallel degree")
  return n or available


def _positive(value: Any, field: str, valid: str = "must be a positive integer") -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ConfigError(field, value, valid)
  return value


def _budget(memory_budget_bytes: int | None, config) -> int | None:
  """The optional per-device budget: the argument, else ``config.memory_budget_bytes``."""
  budget = memory_budget_bytes
  if budget is None:
    budget = config.get("memory_budget_bytes")
  if budget is not None:
    _positive(budget, "memory_budget", "must be a positive size, e.g. 2GiB")
  return budget


class _HostKey:
  """A PRNG key held on the host (a plain object, so a pytree leaf)."""

  def __init__(self, key):
    self.data, self.impl = np.array(jax.random.key_data(key)), jax.random.key_impl(key)


def _to_host(state):
  return jax.tree.map(lambda x: _HostKey(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else np.array(x), state)


def _place(host_state, mesh):
  """Fresh device copies of ``host_state``, replicated over ``mesh`` (safe to donate)."""

  def leaf(x):
    if isinstance(x, _HostKey):
      return jax.random.wrap_key_data(np.array(x.data), impl=x.impl)
    return np.array(x)
  return jax.device_put(jax.tree.map(leaf, host_state), device_data.replicated(mesh))


def _time_windows(call, state, data, feed, spec, window_steps: int, windows: int,
                  clock) -> dict[str, Any]:
  """A trial's timing: ``windows`` + 1 windows, each closed after blocking; first discarded."""

  timer = WindowTimer(clock, warmup_windows=1)
  k, step = spec.steps_per_call, 0
  calls = window_steps // k
  for _ in range(windows + 1):
    timer.start()
    losses = []
    for _ in range(calls):
      state, call_losses, _ = call(state, data, feed(step))
      losses.append(call_losses)
      step += k
      feed.prefetch(step)
    jax.block_until_ready((state, losses))
    timer.stop(calls * k * spec.global_batch, calls * k)
  return timer.summary()


def run_decompose(config: ml_collections.ConfigDict, workdir: str,
                  global_batch: int | None = None, *, memory_budget_bytes: int | None = None,
                  num_available_devices: int | None = None, window_steps: int | None = None,
                  windows: int = 5, clock: Callable[[], float] = time.perf_counter,
                  log: Log | None = print) -> dict[str, Any]:
  """Times, checks and compares every split of ``global_batch``; writes ``decompose/``.

  Args:
    config: the trial config (optimizer, LR rule, workload, seed ...); its
      ``num_devices`` caps the data-parallel degree (0 = all local devices).
    workdir: where ``decompose/decompose.{json,csv,png}`` is written.
    global_batch: the batch to split (default ``config.global_batch``).
    memory_budget_bytes: optional per-device budget (default
      ``config.memory_budget_bytes``); splits over it are not run.
    num_available_devices: local devices (default: all).
    window_steps: optimizer steps per timing window (default: about
      ``WINDOW_EXAMPLES`` examples, a multiple of the steps fused per call).
    windows: timed windows per split, after one warm-up window.
    clock: seconds clock.
    log: progress sink; None for silence.

  Returns:
    ``{"rows": [...], "fastest": row or None, "reference": ..., ...}``.
  """
  log = log or (lambda _: None)
  available = num_available_devices or jax.local_device_count()
  batch = _positive(config.global_batch if global_batch is None else global_batch,
                    "global_batch")
  max_devices = _max_devices(config, available)
  _positive(windows, "windows")
  k_user = config.steps_per_call if isinstance(config.steps_per_call, int) else 0
  window_steps = _positive(window_steps or max(1, -(-WINDOW_EXAMPLES // batch)),
                           "window_steps")
  if k_user > 0:
    window_steps = -(-window_steps // k_user) * k_user
  timing = dict(global_batch=batch, max_examples=None, max_seconds=None,
                target_metric="none", target_value=None,
                eval_every_examples=batch * window_steps)
  base = resolve(with_fields(config, num_devices=1, accum_steps=1, max_steps=window_steps,
                             **timing), available)
  timing.update(steps_per_call=base.steps_per_call, max_steps=window_steps * (windows + 1))
  budget = _budget(memory_budget_bytes, config)
  workdir = check_workdir(workdir)

  workload = get_workload(base.workload, dict(base.workload_options))
  arrays = None if workload.synthetic else workload.data()
  check = not workload.synthetic
  host_state = _to_host(parallel.init_state(workload, base, parallel.make_mesh(1),
                                            parallel.make_optimizer(base)))
  before = host_state.params
  reference, ref_after, rows = None, None, []
  log(f"[decompose {base.workload} B={batch}] up to {max_devices} device(s); "
      f"{window_steps} steps x {windows} windows (+1 warm-up) per split, "
      f"{base.steps_per_call} steps/call")
  for s in splits(batch, max_devices):
    spec = resolve(with_fields(config, num_devices=s.num_devices, accum_steps=s.accum_steps,
                               **timing), available)
    mesh = parallel.make_mesh(s.num_devices)
    tx = parallel.make_optimizer(spec)
    data = () if workload.synthetic else device_data.put_train_data(arrays, mesh)
    call = parallel.compile_train_call(workload, spec, mesh, tx,
                                       parallel.abstract_state(workload, spec, mesh, tx), data)
    m = call.memory
    row = {"num_devices": s.num_devices, "per_device_batch": s.per_device_batch,
           "accum_steps": s.accum_steps, "global_batch": batch,
           "steps_per_call": spec.steps_per_call, "status": "ok", "compile_s": call.compile_s,
           "peak_bytes": m["peak_bytes"], "temp_bytes": m["temp_bytes"],
           "argument_bytes": m["argument_bytes"], "memory": m, "max_rel_diff": None,
           "equivalent": None, "fastest": False}
    rows.append(row)
    if budget is not None and m["peak_bytes"] is not None and m["peak_bytes"] > budget:
      row["status"] = "over_budget"
      log(f"  {_label(row)}: compiled peak {format_bytes(m['peak_bytes'])} over budget; not run")
      continue
    if check:
      one = dataclasses.replace(spec, steps_per_call=1)
      step_call = call if spec.steps_per_call == 1 else parallel.compile_train_call(
          workload, one, mesh, tx, parallel.abstract_state(workload, one, mesh, tx), data)
      new_state, _, _ = step_call(_place(host_state, mesh), data,
                               parallel.make_feed(workload, one)(0))
      after = jax.device_get(new_state.params)
      if ref_after is None:
        reference, ref_after = dict(num_devices=s.num_devices, accum_steps=s.accum_steps), after
      row["max_rel_diff"] = update_rel_diff(before, after, ref_after)
      row["equivalent"] = row["max_rel_diff"] <= EQUIVALENCE_TOLERANCE
    perf = _time_windows(call, _place(host_state, mesh), data,
                         parallel.make_feed(workload, spec), spec, window_steps, windows,
                         clock)
    iqr = perf["samples_per_sec_iqr"] or [None, None]
    row.update(samples_per_sec=perf["samples_per_sec"], samples_per_sec_q25=iqr[0],
               samples_per_sec_q75=iqr[1], step_time_ms=perf["step_time_ms"],
               timed_windows=perf["timed_windows"])
    log(f"  {_label(row)}: {row['samples_per_sec'] or 0:,.0f} samples/s, compiled in "
        f"{row['compile_s']:.2f}s, peak {format_bytes(row['peak_bytes'])}"
        + ("" if row["max_rel_diff"] is None else f", rel diff {row['max_rel_diff']:.1e}"))
    del data

  fastest = pick_fastest(rows)
  result = {"mode": "train", "workload": base.workload,
            "workload_options": dict(base.workload_options), "global_batch": batch,
            "max_devices": max_devices, "window_steps": window_steps, "windows": windows,
            "steps_per_call": base.steps_per_call, "budget_bytes": budget,
            "tolerance": EQUIVALENCE_TOLERANCE, "reference": reference,
            "equivalence_checked": check, "platform": jax.default_backend(),
            "device_kind": jax.local_devices()[0].device_kind, "rows": rows,
            "fastest": fastest,
            "not_equivalent": [_label(r) for r in rows if r["equivalent"] is False]}
  if jax.process_index() == 0:
    result["files"] = write_outputs(os.path.join(workdir, DECOMPOSE_DIR), "decompose", result,
                                    rows, TRAIN_COLUMNS, lambda fig: _plot_train(fig, result))
  for line in format_decompose(result).splitlines():
    log(line)
  return result


def pick_fastest(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
  """Marks and returns the fastest row that ran, is not flagged, and fits the budget."""
  ok = [r for r in rows if r["status"] == "ok" and r["equivalent"] is not False
        and r.get("samples_per_sec")]
  for r in rows:
    r["fastest"] = False
  if not ok:
    return None
  best = max(ok, key=lambda r: r["samples_per_sec"])
  best["fastest"] = True
  return best


def _label(row: dict[str, Any]) -> str:
  return f"{row['num_devices']}dev x {row['per_device_batch']} x accum {row['accum_steps']}"


def format_decompose(result: dict[str, Any]) -> str:
  """The console table of a train decomposition and its verdict."""
  head = ("devices", "per_device", "accum", "samples/s", "IQR", "step_ms", "compile_s",
          "peak", "rel_diff", "equal", "status", "")
  body = []
  for r in result["rows"]:
    ran = r.get("samples_per_sec") is not None
    body.append((
        str(r["num_devices"]), f"{r['per_device_batch']:,}", str(r["accum_steps"]),
        f"{r['samples_per_sec']:,.0f}" if ran else "-",
        f"{r['samples_per_sec_q25']:,.0f}-{r['samples_per_sec_q75']:,.0f}" if ran else "-",
        f"{r['step_time_ms']:.3g}" if ran else "-", f"{r['compile_s']:.2f}",
        format_bytes(r["peak_bytes"]),
        "-" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.1e}",
        {True: "yes", False: "NO", None: "-"}[r["equivalent"]], r["status"],
        "<- fastest" if r["fastest"] else ""))
  lines = [format_table(head, body)]
  if not result["equivalence_checked"]:
    lines.append("equivalence not checked: synthetic inputs are drawn per micro-batch, so "
                 "splits see different examples")
  elif result["not_equivalent"]:
    lines.append(f"NOT EQUIVALENT (update differs by more than {result['tolerance']:g} from "
                 f"the reference): {', '.join(result['not_equivalent'])}")
  else:
    lines.append(f"all splits give the same update as the reference within "
                 f"{result['tolerance']:g} (max relative difference "
                 f"{max(r['max_rel_diff'] or 0 for r in result['rows']):.1e})")
  f = result["fastest"]
  within = (f" within {format_bytes(result['budget_bytes'])} per device"
            if result["budget_bytes"] else "")
  lines.append(f"fastest split of global batch {result['global_batch']:,}{within}: "
               + (f"{_label(f)} at {f['samples_per_sec']:,.0f} samples/s" if f else "none ran"))
  return "\n".join(lines)


def run_inference(config: ml_collections.ConfigDict, workdir: str, total: int | None, *,
                  memory_budget_bytes: int | None = None,
                  num_available_devices: int | None = None,
                  clock: Callable[[], float] = time.perf_counter,
                  log: Log | None = print) -> dict[str, Any]:
  """Batch size x batch count = ``total`` through the forward pass; writes ``decompose/``.

  Batch sizes are ``devices x 2^k`` dividing ``total`` (``devices`` =
  ``config.num_devices``, 0 = all; the batch is sharded over them). The forward
  pass is the workload's ``eval_sums`` on inputs already on the device, so the
  numbers are compute, not host transfer. Each batch is timed on its own (its
  latency), after one warm-up batch; samples/sec is ``total`` over their sum.

  Returns:
    ``{"rows": [one per (size, count)], ...}``; files ``inference.{json,csv,png}``.
  """
  log = log or (lambda _: None)
  available = num_available_devices or jax.local_device_count()
  if total is None:
    raise ConfigError("total", None, "--mode=inference needs --total=N, the examples to run")
  total = _positive(total, "total")
  devices = _max_devices(config, available)
  sizes = [devices * 2**k for k in range(64) if total % (devices * 2**k) == 0]
  if not sizes:
    raise ConfigError("total", total, f"must be divisible by the {devices} data-parallel "
                                      f"device(s) (batch sizes are {devices} x 2^k dividing "
                                      f"it), e.g. {devices * 1024}")
  base = resolve(with_fields(config, global_batch=devices, num_devices=devices, accum_steps=1,
                             steps_per_call=1, max_steps=1, max_examples=None,
                             max_seconds=None, target_metric="none", target_value=None),
                 available)
  budget = _budget(memory_budget_bytes, config)
  workdir = check_workdir(workdir)

  workload = get_workload(base.workload, dict(base.workload_options))
  mesh = parallel.make_mesh(devices)
  params = jax.device_put(workload.init(jax.random.key(base.seed)), device_data.replicated(mesh))
  batch_sharding = NamedSharding(mesh, P(device_data.DATA_AXIS))
  rng = np.random.default_rng(base.seed)
  rows = []
  log(f"[inference {base.workload}] {total:,} examples on {devices} device(s), "
      f"batch sizes {', '.join(map(str, sizes))}")
  for size in sizes:
    count = total // size
    call = parallel.compile_forward_call(workload, mesh, params, size)
    m = call.memory
    row = {"batch_size": size, "batch_count": count, "total": total, "status": "ok",
           "compile_s": call.compile_s, "peak_bytes": m["peak_bytes"],
           "temp_bytes": m["temp_bytes"], "argument_bytes": m["argument_bytes"], "memory": m,
           "samples_per_sec": None, "latency_ms_median": None, "latency_ms_q25": None,
           "latency_ms_q75": None}
    rows.append(row)
    if budget is not None and m["peak_bytes"] is not None and m["peak_bytes"] > budget:
      row["status"] = "over_budget"
      continue
    x = rng.standard_normal((size, *workload.input_shape)).astype(workload.input_dtype)
    args = jax.device_put((x, np.zeros(size, np.int32), np.ones(size, np.float32)),
                          batch_sharding)
    jax.block_until_ready(call(params, *args))  # warm-up
    latencies = []
    for _ in range(count):
      start = clock()
      jax.block_until_ready(call(params, *args))
      latencies.append(clock() - start)
    q25, q50, q75 = (1e3 * q for q in np.percentile(latencies, [25, 50, 75]))
    row.update(samples_per_sec=total / max(sum(latencies), 1e-12), latency_ms_median=q50,
               latency_ms_q25=q25, latency_ms_q75=q75)
    log(f"  {size:>7,d} x {count:<7,d}: {row['samples_per_sec']:,.0f} samples/s, "
        f"{q50:.3g} ms per batch, peak {format_bytes(row['peak_bytes'])}")
  result = {"mode": "inference", "workload": base.workload,
            "workload_options": dict(base.workload_options), "total": total,
            "num_devices": devices, "budget_bytes": budget, "platform": jax.default_backend(),
            "device_kind": jax.local_devices()[0].device_kind, "rows": rows}
  if jax.process_index() == 0:
    result["files"] = write_outputs(os.path.join(workdir, DECOMPOSE_DIR), "inference", result,
                                    rows, INFERENCE_COLUMNS,
                                    lambda fig: _plot_inference(fig, result))
  head = ("batch_size", "batch_count", "samples/s", "latency_ms", "compile_s", "peak", "status")
  body = [(f"{r['batch_size']:,}", f"{r['batch_count']:,}",
           "-" if r["samples_per_sec"] is None else f"{r['samples_per_sec']:,.0f}",
           "-" if r["latency_ms_median"] is None else f"{r['latency_ms_median']:.3g}",
           f"{r['compile_s']:.2f}", format_bytes(r["peak_bytes"]), r["status"]) for r in rows]
  for line in format_table(head, body).splitlines():
    log(line)
  return result


def _plot_train(fig, result: dict[str, Any]) -> None:
  rows = result["rows"]
  labels = [f"{r['num_devices']}x{r['per_device_batch']}x{r['accum_steps']}" for r in rows]
  ax_rate, ax_mem = fig.subplots(2, 1, sharex=True)
  rates = [r.get("samples_per_sec") or 0.0 for r in rows]
  colors = ["tab:green" if r["fastest"] else "tab:red" if r["equivalent"] is False
            else "lightgray" if r["status"] != "ok" else "tab:blue" for r in rows]
  ax_rate.bar(range(len(rows)), rates, color=colors)
  ax_rate.set_ylabel("samples/sec")
  ax_rate.set_title(f"{result['workload']}: splits of global batch {result['global_batch']:,}\n"
                    "devices x per-device batch x accum steps; green: fastest, red: not "
                    "equivalent, gray: over budget", fontsize="small")
  ax_mem.bar(range(len(rows)), [(r["peak_bytes"] or 0) / 2**20 for r in rows], color=colors)
  if result["budget_bytes"]:
    ax_mem.axhline(result["budget_bytes"] / 2**20, color="red", alpha=0.6, label="budget")
    ax_mem.legend(fontsize="small")
  ax_mem.set_ylabel("compiled peak MiB / device")
  ax_mem.set_xticks(range(len(rows)), labels=labels, rotation=60, fontsize="x-small")
  for ax in (ax_rate, ax_mem):
    ax.grid(True, axis="y", alpha=0.3)


def _plot_inference(fig, result: dict[str, Any]) -> None:
  rows = [r for r in result["rows"] if r["samples_per_sec"] is not None]
  ax_rate, ax_lat = fig.subplots(1, 2)
  sizes = [r["batch_size"] for r in rows]
  ax_rate.plot(sizes, [r["samples_per_sec"] for r in rows], marker="o")
  ax_rate.set_ylabel("samples/sec")
  ax_lat.plot(sizes, [r["latency_ms_median"] for r in rows], marker="o")
  ax_lat.set_ylabel("median latency per batch (ms)")
  for ax in (ax_rate, ax_lat):
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"batch size (batch count = {result['total']:,} / size)")
    ax.grid(True, alpha=0.3)
  fig.suptitle(f"{result['workload']}: forward pass, batch size x batch count", fontsize="small")


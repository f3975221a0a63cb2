"""For one global batch, which split is fastest: per-device batch x devices x accumulation.

``run_decompose`` enumerates every split ``global_batch = per_device_batch x
num_devices x accum_steps`` the local devices allow (data-parallel degree 1 up to
``config.num_devices``, 0 = all, wherever it divides). For each it builds the
program a trial would run and measures it with the throughput phase
(``runs.throughput``: warm-up discarded, windows closed by ``block_until_ready``,
median and IQR), recording compile seconds and compiled memory. Splits whose
compiled peak exceeds the memory budget are recorded ``over_budget`` and not run.

Every split must compute the same update. From one initial state and the same
global batch of examples (the feed's indices do not depend on the split), one
optimizer step runs under each split, and its update ``delta = params_after -
params_before`` is compared with the update computed in float64 (1 device, no
accumulation, ``jax.enable_x64``): ``error = max over parameter tensors of
|delta - delta64|_2 / |delta64|_2`` (a norm per tensor: Adam's first step is about
``lr * sign(grad)``, so an element whose gradient is within rounding of zero may
flip under a different summation order without the update being any less equal).

The tolerance is float32 rounding, measured: ``ROUNDING_FACTOR`` x the error of
the 1-device, no-accumulation float32 update against float64 (floored at float32
epsilon x sqrt(global batch)). A different summation order (devices,
micro-batches) moves an update by about as much as rounding already did; a wrong
split (a dropped micro-batch, means of unequal micro-batches averaged) moves it by
orders of magnitude more. Splits beyond the tolerance are flagged and never named
fastest. Synthetic workloads draw inputs per micro-batch, so their splits see
different examples and are not compared.

BatchNorm makes a split part of the model: its statistics are computed over each
micro-batch (``bn_group="global"``, synchronised across devices) or over each
device's shard of it (``"per_device"``, ghost batch norm). A split whose statistics
cover a different number of examples than the 1-device, no-accumulation split's
computes a different update by design; it is reported as differing in BatchNorm
statistics (``bn_examples`` beside the reference's), never as equivalent, and never
named fastest.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from batchbench.config import TrialSpec, open_workdir, resolve
from batchbench.config.resolve import batch_norm_group_size
from batchbench.core.program import Program, ProgramCache, build
from batchbench.fmt import format_bytes, format_table
from batchbench.report.files import write_outputs
from batchbench.runs import throughput
from batchbench.runs.inference import max_devices, run_inference
from batchbench.runs.probe import memory_budget, positive, with_fields
from batchbench.workloads import get_workload

DECOMPOSE_DIR = "decompose"
MODES = ("train", "inference")
ROUNDING_FACTOR = 8.0
TRAIN_COLUMNS = ("num_devices", "per_device_batch", "accum_steps", "global_batch",
                 "steps_per_call", "status", "samples_per_sec", "samples_per_sec_q25",
                 "samples_per_sec_q75", "step_time_ms", "timed_windows", "compile_s",
                 "peak_bytes", "temp_bytes", "argument_bytes", "error_vs_x64", "equivalent",
                 "bn_examples", "differs", "fastest")
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


def update_error(before, after, reference_after) -> float:
  """Max over tensors of ``|delta - delta_ref|_2 / |delta_ref|_2``, ``delta = after - before``.

  A tensor the reference does not move counts by its absolute difference.
  """
  worst = 0.0
  for b, a, r in zip(*(jax.tree.leaves(t) for t in (before, after, reference_after)),
                     strict=True):
    b, a, r = (np.asarray(x, np.float64) for x in (b, a, r))
    ref_norm = float(np.linalg.norm(r - b))
    diff = float(np.linalg.norm(a - r))
    worst = max(worst, diff / ref_norm if ref_norm > 0 else diff)
  return worst


def one_update(program: Program) -> Any:
  """The parameters after one optimizer step from the seed's initial state, on the
  seed's first batch (both independent of the split)."""
  spec = program.spec
  state = program.init_state(spec.seed, spec.lr)
  new_state, _ = program.run(state, first_feed(program, spec.seed), 1, step=0)
  return jax.device_get(new_state.params)


def first_feed(program: Program, seed: int) -> Any:
  """The inputs of a call whose one step is the seed's first (the feed closed after)."""
  with program.feed(seed) as feed:
    return feed(0, 1)


def float64_update(spec: TrialSpec) -> Any:
  """``one_update`` of the 1-device, no-accumulation split, computed in float64."""
  from batchbench.core import steps  # pylint: disable=g-import-not-at-top

  one = dataclasses.replace(spec, num_devices=1, accum_steps=1,
                            per_device_batch=spec.global_batch)
  widen = lambda a: (a.astype(jnp.float64) if hasattr(a, "dtype")
                     and jnp.issubdtype(a.dtype, jnp.floating) else a)
  with jax.enable_x64(True):
    program = build(one, flops=False)
    state = jax.tree.map(widen, program.init_state(one.seed, one.lr))
    data = jax.tree.map(widen, program.data)
    train = jax.jit(steps.make_train_call(program.workload, program.mesh, program.tx,
                                          micro_batch=one.micro_batch))
    feed = jax.tree.map(widen, first_feed(program, one.seed))  # host data: its arrays
    new_state, _ = train(state, data, feed, np.int32(1))
    return jax.device_get(new_state.params)


def run(config: ml_collections.ConfigDict, workdir: str, *, mode: str = "train",
        global_batch: int | None = None, total: int | None = None,
        memory_budget_bytes: int | None = None, log: Log | None = print,
        **kwargs: Any) -> dict[str, Any]:
  """``run_decompose`` (mode train) or ``inference.run_inference`` (mode inference)."""
  from batchbench.config import ConfigError  # pylint: disable=g-import-not-at-top
  if mode not in MODES:
    raise ConfigError("mode", mode, f"must be one of {', '.join(MODES)}")
  if mode == "inference":
    return run_inference(config, workdir, total, memory_budget_bytes=memory_budget_bytes,
                         log=log, **kwargs)
  return run_decompose(config, workdir, global_batch, memory_budget_bytes=memory_budget_bytes,
                       log=log, **kwargs)


def run_decompose(config: ml_collections.ConfigDict, workdir: str,
                  global_batch: int | None = None, *, memory_budget_bytes: int | None = None,
                  num_available_devices: int | None = None,
                  log: Log | None = print) -> dict[str, Any]:
  """Times, checks and compares every split of ``global_batch``; writes ``decompose/``.

  Args:
    config: the trial config (optimizer, LR rule, workload, seed, throughput
      settings); its ``num_devices`` caps the data-parallel degree (0 = all).
    workdir: where ``decompose/decompose.{json,csv,png}`` is written.
    global_batch: the batch to split (default ``config.global_batch``).
    memory_budget_bytes: optional per-device budget (default
      ``config.memory_budget_bytes``); splits over it are not run.
    num_available_devices: local devices (default: all).
    log: progress sink; None for silence.

  Returns:
    ``{"rows": [...], "fastest": row or None, "tolerance": ..., ...}``.
  """
  log = log or (lambda _: None)
  available = num_available_devices or jax.local_device_count()
  batch = positive(config.global_batch if global_batch is None else global_batch,
                   "global_batch")
  limit = max_devices(config, available)
  fields = dict(global_batch=batch, target_metric="none", target_value=None,
                max_examples=None, max_seconds=None, max_steps=1)
  base = resolve(with_fields(config, num_devices=1, accum_steps=1, **fields), available)
  budget, _ = memory_budget(memory_budget_bytes, config)
  workdir = open_workdir(workdir)

  check = not get_workload(base.workload, dict(base.workload_options)).synthetic
  cache = ProgramCache(flops=False)
  first, _ = cache.get(base)  # the 1-device, no-accumulation split's program
  before = jax.device_get(first.init_state(base.seed, base.lr).params)
  reference = float64_update(base) if check else None
  rounding = (max(update_error(before, one_update(first), reference),
                  np.finfo(np.float32).eps * math.sqrt(batch)) if check else None)
  tolerance = ROUNDING_FACTOR * rounding if check else None
  bn_reference = batch_norm_group_size(base)
  rows = []
  log(f"[decompose {base.workload} B={batch}] up to {limit} device(s); "
      + (f"tolerance {tolerance:.1e} (float32 rounding {rounding:.1e} x {ROUNDING_FACTOR:g})"
         if check else "synthetic inputs: equivalence not checked"))
  for s in splits(batch, limit):
    spec = resolve(with_fields(config, num_devices=s.num_devices, accum_steps=s.accum_steps,
                               **fields), available)
    program, _ = cache.get(spec)
    m = program.train.memory
    row = {"num_devices": s.num_devices, "per_device_batch": s.per_device_batch,
           "accum_steps": s.accum_steps, "global_batch": batch,
           "steps_per_call": program.steps_per_call, "status": "ok",
           "compile_s": program.train.compile_s, "peak_bytes": m["peak_bytes"],
           "temp_bytes": m["temp_bytes"], "argument_bytes": m["argument_bytes"], "memory": m,
           "error_vs_x64": None, "equivalent": None, "fastest": False,
           "bn_examples": batch_norm_group_size(spec), "differs": None}
    rows.append(row)
    if budget is not None and m["peak_bytes"] is not None and m["peak_bytes"] > budget:
      row["status"] = "over_budget"
      log(f"  {_label(row)}: compiled peak {format_bytes(m['peak_bytes'])} over budget; not run")
      continue
    if check:
      row["error_vs_x64"] = update_error(before, one_update(program), reference)
      row["equivalent"] = row["error_vs_x64"] <= tolerance
    if row["bn_examples"] != bn_reference:
      row["equivalent"] = False
      row["differs"] = (f"BatchNorm statistics over {row['bn_examples']:,} examples, not "
                        f"{bn_reference:,}")
    point = throughput.measure(spec, cache=cache)
    iqr = point["samples_per_sec_iqr"] or [None, None]
    row.update(samples_per_sec=point["samples_per_sec"], samples_per_sec_q25=iqr[0],
               samples_per_sec_q75=iqr[1], step_time_ms=point["step_time_ms"],
               timed_windows=point["timed_windows"])
    log(f"  {_label(row)}: {throughput.format_rate(point)}, compiled in "
        f"{row['compile_s']:.2f}s, peak {format_bytes(row['peak_bytes'])}"
        + ("" if row["error_vs_x64"] is None else f", error vs x64 {row['error_vs_x64']:.1e}"))

  fastest = pick_fastest(rows)
  result = {"mode": "train", "workload": base.workload,
            "workload_options": dict(base.workload_options), "global_batch": batch,
            "max_devices": limit, "throughput_settings": base.throughput_settings,
            "budget_bytes": budget, "tolerance": tolerance, "rounding": rounding,
            "rounding_factor": ROUNDING_FACTOR, "equivalence_checked": check,
            "bn_examples": bn_reference,
            "platform": jax.default_backend(),
            "device_kind": jax.local_devices()[0].device_kind, "rows": rows,
            "fastest": fastest,
            "not_equivalent": [_label(r) for r in rows
                               if r["equivalent"] is False and not r["differs"]],
            "differ_in_batch_norm": [_label(r) for r in rows if r["differs"]]}
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
  head = ("devices", "per_device", "accum", "samples/s", "IQR", "windows", "step_ms",
          "compile_s", "peak", "err_vs_x64", "equal", "status", "")
  body = []
  for r in result["rows"]:
    ran = r.get("samples_per_sec") is not None
    body.append((
        str(r["num_devices"]), f"{r['per_device_batch']:,}", str(r["accum_steps"]),
        f"{r['samples_per_sec']:,.0f}" if ran else "-",
        f"{r['samples_per_sec_q25']:,.0f}-{r['samples_per_sec_q75']:,.0f}" if ran else "-",
        str(r.get("timed_windows") or "-"),
        f"{r['step_time_ms']:.3g}" if ran else "-", f"{r['compile_s']:.2f}",
        format_bytes(r["peak_bytes"]),
        "-" if r["error_vs_x64"] is None else f"{r['error_vs_x64']:.1e}",
        "BN" if r.get("differs") else {True: "yes", False: "NO", None: "-"}[r["equivalent"]],
        r["status"],
        "<- fastest" if r["fastest"] else ""))
  lines = [format_table(head, body)]
  if result.get("differ_in_batch_norm"):
    lines.append(f"differ in BatchNorm statistics (computed over a different number of "
                 f"examples than the 1-device split's {result['bn_examples']:,}; a different "
                 f"update by design, not compared): {', '.join(result['differ_in_batch_norm'])}")
  if not result["equivalence_checked"]:
    lines.append("equivalence not checked: synthetic inputs are drawn per micro-batch, so "
                 "splits see different examples")
  elif result["not_equivalent"]:
    lines.append(f"NOT EQUIVALENT (update further from the float64 update than float32 "
                 f"rounding allows, {result['tolerance']:.1e}): "
                 f"{', '.join(result['not_equivalent'])}")
  else:
    compared = [r for r in result["rows"] if not r.get("differs")]
    lines.append(f"{'every other' if result.get('differ_in_batch_norm') else 'every'} split "
                 f"gives the float64 update within float32 rounding (largest error "
                 f"{max(r['error_vs_x64'] or 0 for r in compared):.1e}, tolerance "
                 f"{result['tolerance']:.1e} = {ROUNDING_FACTOR:g} x the 1-device float32 "
                 f"error {result['rounding']:.1e})")
  f = result["fastest"]
  within = (f" within {format_bytes(result['budget_bytes'])} per device"
            if result["budget_bytes"] else "")
  lines.append(f"fastest split of global batch {result['global_batch']:,}{within}: "
               + (f"{_label(f)} at {f['samples_per_sec']:,.0f} samples/s" if f else "none ran"))
  return "\n".join(lines)



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



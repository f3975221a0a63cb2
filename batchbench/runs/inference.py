"""Inference, batch size x batch count: ``total`` examples through the forward pass.

``run_inference`` answers the image-generation sense of "batch size vs batch
count": ``total`` examples through the forward pass as ``count`` batches of
``size`` (``size x count = total``), reporting samples/sec, latency per batch and
compiled memory per batch size. The forward pass is the workload's ``eval_sums``
on inputs already on the device, so the numbers are compute, not host transfer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from batchbench.config import ConfigError, open_workdir, resolve
from batchbench.core import program, steps
from batchbench.core.mesh import batch_sharding, make_mesh, replicated
from batchbench.data.arrays import MASK
from batchbench.fmt import format_bytes, format_table
from batchbench.report.files import write_outputs
from batchbench.runs.probe import memory_budget, positive, with_fields
from batchbench.workloads import Workload, get_workload

INFERENCE_DIR = "decompose"
INFERENCE_COLUMNS = ("batch_size", "batch_count", "total", "status", "samples_per_sec",
                     "latency_ms_median", "latency_ms_q25", "latency_ms_q75", "compile_s",
                     "peak_bytes", "temp_bytes", "argument_bytes")
Log = Callable[[str], None]


def random_batch(workload: Workload, size: int, rng: np.random.Generator) -> dict[str, Any]:
  """A host batch of ``size`` examples of the workload's shapes: normal floats, zero ints."""
  batch = {}
  for name, s in workload.batch_spec(size).items():
    batch[name] = (rng.standard_normal(s.shape).astype(s.dtype)
                   if np.issubdtype(s.dtype, np.floating) else np.zeros(s.shape, s.dtype))
  batch[MASK] = np.ones(size, np.float32)
  return batch


def compile_forward(workload: Workload, mesh, variables, size: int) -> program.CompiledCall:
  """Compiles ``(params, model_state, batch) -> {metric: sum}`` for batches of ``size``."""
  traces: list[int] = []
  sharding = batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
           for k, v in workload.batch_spec(size).items()}
  batch[MASK] = jax.ShapeDtypeStruct((size,), np.float32, sharding=sharding)
  repl = replicated(mesh)
  return program.aot(steps.make_forward_call(workload, traces), (*variables, batch),
             (repl, repl, sharding), repl, traces)


def max_devices(config, available: int) -> int:
  """The largest data-parallel degree: ``config.num_devices`` (0 = all available)."""
  n = config.num_devices
  if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= available:
    raise ConfigError("num_devices", n, f"must be between 1 and the {available} available "
                                        "devices (0 = all): the largest data-parallel degree")
  return n or available


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
  total = positive(total, "total")
  devices = max_devices(config, available)
  sizes = [devices * 2**k for k in range(64) if total % (devices * 2**k) == 0]
  if not sizes:
    raise ConfigError("total", total, f"must be divisible by the {devices} data-parallel "
                                      f"device(s) (batch sizes are {devices} x 2^k dividing "
                                      f"it), e.g. {devices * 1024}")
  base = resolve(with_fields(config, global_batch=devices, num_devices=devices, accum_steps=1,
                             steps_per_call=1, max_steps=1, max_examples=None,
                             max_seconds=None, target_metric="none", target_value=None),
                 available)
  budget, _ = memory_budget(memory_budget_bytes, config)
  workdir = open_workdir(workdir)

  workload = get_workload(base.workload, dict(base.workload_options))
  mesh = make_mesh(devices)
  params, model_state = jax.device_put(
      workload.init(jax.random.key(base.seed), workload.batch_spec(1)), replicated(mesh))
  sharding = batch_sharding(mesh)
  rng = np.random.default_rng(base.seed)
  rows = []
  log(f"[inference {base.workload}] {total:,} examples on {devices} device(s), "
      f"batch sizes {', '.join(map(str, sizes))}")
  for size in sizes:
    count = total // size
    call = compile_forward(workload, mesh, (params, model_state), size)
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
    batch = jax.device_put(random_batch(workload, size, rng), sharding)
    jax.block_until_ready(call(params, model_state, batch))  # warm-up
    latencies = []
    for _ in range(count):
      start = clock()
      jax.block_until_ready(call(params, model_state, batch))
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
    result["files"] = write_outputs(os.path.join(workdir, INFERENCE_DIR), "inference", result,
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


"""The probe's console text and plot, from a ``runs.probe.run_probe`` result (no JAX).

The text: compiled memory per batch, the memory fit and the answer; then, for every
batch that fits, model FLOPs per example, samples/s, TFLOP/s per device and MFU, with
one line on where the FLOPs come from and one on why MFU is ``-`` where it is; then the
remat comparison (both largest batches, both compiled peaks per batch, and throughput at
the largest batch both fit), or one line saying the workload has no remat option.
"""

from __future__ import annotations

from typing import Any

from batchbench.fmt import format_bytes, format_table, number
from batchbench.report.tables import flops_text, mfu_note, mfu_text


def flops_count(n: float | None) -> str:
  """FLOPs with an SI prefix, e.g. ``"1.23 GFLOP"``; None as ``"-"``."""
  if n is None:
    return "-"
  for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3g} {prefix}FLOP"
  return f"{n:.3g} FLOP"


def format_probe(result: dict[str, Any]) -> str:
  """The console text of a probe: memory, answer, speed and MFU, remat comparison."""
  return "\n".join(_memory_lines(result) + _speed_lines(result) + remat_lines(result))


def _memory_lines(result: dict[str, Any]) -> list[str]:
  head = ("global_batch", "per_device", "argument", "output", "alias", "temp", "peak",
          "GFLOP/step", "compile_s", "fits")
  body = [(f"{p['global_batch']:,}", f"{p['per_device_batch']:,}",
           *(format_bytes(p[k]) for k in ("argument_bytes", "output_bytes", "alias_bytes",
                                          "temp_bytes", "peak_bytes")),
           "-" if p["flops_per_step"] is None else f"{p['flops_per_step'] / 1e9:.3g}",
           f"{p['compile_s']:.2f}", "yes" if p["fits"] else "no") for p in result["points"]]
  lines = [format_table(head, body)]
  fit, answer = result["fit"], result["answer"]
  if fit:
    r2 = "-" if fit["r2"] is None else f"{fit['r2']:.4f}"
    lines.append(f"fit: peak = {format_bytes(fit['fixed_bytes'])} + "
                 f"{fit['bytes_per_example']:,.0f} B x global_batch (per device; R^2 {r2}, "
                 f"max residual {format_bytes(fit['max_residual_bytes'])})")
  exact = lambda n: f"{format_bytes(n)} ({n:,} B)"
  remat = result.get("remat") or {}
  setting = (f" (remat {'on' if remat['config_remat'] else 'off'})"
             if remat.get("available") else "")
  lines.append(
      f"largest global batch{setting} within {exact(result['budget_bytes'])} per device "
      f"({result['budget_source']}): {answer['global_batch']:,} "
      f"({answer['per_device_batch']:,} per device x {result['num_devices']} device(s) x "
      f"accum {result['accum_steps']}), compiled peak {exact(answer['peak_bytes'])}; "
      + (f"{answer['next_batch']:,} needs {exact(answer['next_peak_bytes'])}"
         if answer["next_batch"] else f"limited by {answer['limited_by']}, not memory"))
  if answer.get("fit_global_batch") is not None:
    lines.append(f"the linear fit alone predicts {answer['fit_global_batch']:,}")
  m = result["measured"]
  if m and m.get("error"):
    lines.append(f"running batch {m['global_batch']:,} for real failed: {m['error']}")
  elif m:
    lines.append(f"measured peak_bytes_in_use / predicted = {m['ratio']:.3f} "
                 f"({format_bytes(m['measured_peak_bytes'])} / "
                 f"{format_bytes(m['predicted_peak_bytes'])})")
  return lines


def _rate(p: dict[str, Any]) -> str:
  if p.get("samples_per_sec") is None:
    return "-"
  thin = (p.get("timed_windows") or 0) < 3  # as the report marks a thin median
  return f"{p['samples_per_sec']:,.0f}" + ("*" if thin else "")


def _rate_iqr(p: dict[str, Any]) -> str:
  iqr = p.get("samples_per_sec_iqr")
  return _rate(p) + (f" (IQR {iqr[0]:,.0f}-{iqr[1]:,.0f})" if iqr else "")


def _speed_lines(result: dict[str, Any]) -> list[str]:
  """Model FLOPs, samples/s, TFLOP/s per device and MFU of the batches that fit."""
  fitting = [{**p, "compute_dtype": result.get("compute_dtype")}
             for p in result["points"] if p["fits"]]
  if not fitting or "model_flops_source" not in fitting[0]:
    return []  # a result from before the probe measured speed
  timing = result.get("timing")
  if timing:
    how = (f"timed: {timing['warmup_calls']} warm-up call, then windows until "
           f"{timing['min_windows']} and {timing['min_seconds']:g} s of timed work, at most "
           f"{timing['max_seconds']:g} s; * fewer than 3 windows")
  else:
    how = "not timed (--noprobe_time)"
  head = ("global_batch", "model FLOPs/example", "samples/s", "TFLOP/s/dev", "MFU")
  body = [(f"{p['global_batch']:,}", flops_count(p["model_flops_per_example"]), _rate(p),
           number(p["tflops_per_sec_per_device"]), mfu_text(p["mfu"])) for p in fitting]
  lines = [f"speed at the batches that fit ({how}):", format_table(head, body),
           flops_text(fitting)]
  note = mfu_note(fitting, no_rate="timing failed (below)" if timing else
                  "not timed (--noprobe_time)")
  if note:
    lines.append(note)
  lines += [f"timing batch {p['global_batch']:,} failed: {p['time_error']}"
            for p in fitting if p.get("time_error")]
  return lines


def remat_lines(result: dict[str, Any]) -> list[str]:
  """Both largest batches, both peaks per batch, and what remat costs in throughput."""
  remat = result.get("remat")
  if not remat:
    return []
  if not remat["available"]:
    return [remat["note"]]
  off, on = remat["without"], remat["with"]
  by_batch = [{p["global_batch"]: p for p in s["points"]} for s in (off, on)]
  cell = lambda p: "-" if p is None else (format_bytes(p["peak_bytes"])
                                          + ("" if p["fits"] else " (over)"))
  body = [(f"{b:,}", cell(by_batch[0].get(b)), cell(by_batch[1].get(b)))
          for b in sorted(set(by_batch[0]) | set(by_batch[1]))]
  largest = lambda s: "none fits" if s["largest_batch"] is None else f"{s['largest_batch']:,}"
  lines = [f"remat (each block recomputed on the backward pass) under the same budget "
           f"{format_bytes(result['budget_bytes'])} per device; compiled peak per device:",
           format_table(("global_batch", "remat off", "remat on"), body)]
  change = ""
  if off["largest_batch"] is not None and on["largest_batch"] is not None:
    delta = on["largest_batch"] - off["largest_batch"]
    change = (f" (remat fits {delta:,} more)" if delta > 0 else
              f" (remat fits {-delta:,} fewer)" if delta < 0 else " (the same)")
  lines.append(f"largest global batch: {largest(off)} without remat, {largest(on)} with "
               f"remat{change}")
  common = remat["common_batch"]
  without, with_ = remat["samples_per_sec_without"], remat["samples_per_sec_with"]
  if common is None:
    lines.append("no batch fits both with and without remat: no throughput to compare")
  elif without is None or with_ is None:
    lines.append(f"throughput with and without remat at batch {common:,} (both fit): not "
                 "measured" + ("" if result.get("timing") else " (--noprobe_time)"))
  else:
    cost = remat["throughput_cost"]
    lines.append(f"at batch {common:,} (both fit): {_rate_iqr(by_batch[0][common])} samples/s "
                 f"without remat, {_rate_iqr(by_batch[1][common])} with remat: remat "
                 + (f"costs {cost:.1%} of throughput" if cost >= 0 else
                    f"runs {-cost:.1%} faster") + " (medians; compare the IQRs)")
  top = by_batch[1].get(on["largest_batch"]) if on["largest_batch"] != common else None
  if top and top.get("samples_per_sec") is not None:
    lines.append(f"with remat at its largest batch {on['largest_batch']:,}: "
                 f"{top['samples_per_sec']:,.0f} samples/s, "
                 f"{number(top['tflops_per_sec_per_device'])} TFLOP/s/dev, MFU "
                 f"{mfu_text(top['mfu'])}")
  return lines


def draw_probe(fig: Any, result: dict[str, Any]) -> None:
  """Compiled memory against global batch (log2 axis): peak, temp and argument bytes,
  the linear fit, the budget and the answer; the remat ladder's peak when probed."""
  mib = 2.0**20
  points = result["points"]
  batches = [p["global_batch"] for p in points]
  ax = fig.subplots()
  remat = result.get("remat") or {}
  setting = (f" (remat {'on' if remat['config_remat'] else 'off'})"
             if remat.get("available") else "")
  for key, label in (("peak_bytes", "peak"), ("temp_bytes", "temp"),
                     ("argument_bytes", "argument")):
    ax.plot(batches, [p[key] / mib for p in points], marker="o", label=label + setting)
  peaks = [p["peak_bytes"] for p in points]
  if remat.get("available"):
    other = remat["without" if remat["config_remat"] else "with"]["points"]
    peaks += [p["peak_bytes"] for p in other]
    ax.plot([p["global_batch"] for p in other], [p["peak_bytes"] / mib for p in other],
            marker="x", linestyle="-.", color="purple",
            label=f"peak, remat {'off' if remat['config_remat'] else 'on'}")
  fit = result["fit"]
  if fit:
    xs = [min(batches) * (max(batches) / min(batches)) ** (i / 64) for i in range(65)]
    ax.plot(xs, [(fit["fixed_bytes"] + fit["bytes_per_example"] * x) / mib for x in xs], "--",
            color="gray", label="linear fit of peak")  # a line, drawn on a log2 axis
  budget = result["budget_bytes"]
  if budget <= 2 * max(peaks):
    ax.axhline(budget / mib, color="red", alpha=0.6, label="budget")
  else:  # a line far above the points would flatten them
    ax.plot([], [], color="red", alpha=0.6, label=f"budget {format_bytes(budget)} (off scale)")
  ax.axvline(result["answer"]["global_batch"], color="green", linestyle=":",
             label=f"largest that fits ({result['answer']['global_batch']:,})")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("global batch")
  ax.set_ylabel("MiB per device (compiled)")
  ax.set_title(f"Compiled memory of the train step: {result['workload']}")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small")

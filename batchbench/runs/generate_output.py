"""The files and console summary of ``batchbench generate`` (``runs.generate``).

``<workdir>/generate/``: ``generate.jsonl`` (one row per batch size, replaced by each
run), ``generate.json`` (the whole result), ``generate.csv``, ``generate.png`` (images/s
and latency against batch size), ``samples.png`` (a grid of the first batch size's
images) and, with ``save_images``, ``images_b{size}.npy`` per batch size.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from batchbench.fmt import format_bytes, format_table, to_jsonable
from batchbench.report.files import save_figure, write_outputs
from batchbench.store.results import atomic_write_text

GENERATE_DIR = "generate"
ROWS_FILE = "generate.jsonl"
GRID_FILE = "samples.png"
COLUMNS = ("batch_size", "batch_count", "num_images", "status", "images_per_sec",
           "latency_ms_median", "latency_ms_q25", "latency_ms_q75", "time_to_first_image_s",
           "total_s", "compile_s", "peak_bytes", "temp_bytes", "argument_bytes", "fits_budget",
           "image_max_abs_diff")


def write_files(out_dir: str, result: dict[str, Any], images: dict[int, np.ndarray],
                save_images: bool) -> dict[str, str]:
  """``generate.jsonl`` (one row per batch size), ``generate.{json,csv,png}``, the sample
  grid and, with ``save_images``, ``images_b{size}.npy``."""
  os.makedirs(out_dir, exist_ok=True)
  rows_path = os.path.join(out_dir, ROWS_FILE)
  atomic_write_text(rows_path, "".join(json.dumps(to_jsonable(r), allow_nan=False) + "\n"
                                       for r in result["rows"]))
  files = {"jsonl": rows_path}
  if images:
    files["grid"] = os.path.join(out_dir, GRID_FILE)
    save_figure(_grid_figure(next(iter(images.values())), result), files["grid"])
  if save_images:
    for size, array in images.items():
      path = os.path.join(out_dir, f"images_b{size}.npy")
      tmp = f"{path}.tmp.{os.getpid()}.npy"
      np.save(tmp, array)
      os.replace(tmp, path)
      files[f"images_b{size}"] = path
  payload = {k: v for k, v in result.items() if k != "files"}
  files.update(write_outputs(out_dir, "generate", {**payload, "files_extra": files},
                             result["rows"], COLUMNS, lambda fig: _plot(fig, result)))
  return files


def _plot(fig, result: dict[str, Any]) -> None:
  rows = [r for r in result["rows"] if r["status"] == "ok"]
  ax_rate, ax_lat = fig.subplots(1, 2)
  sizes = [r["batch_size"] for r in rows]
  ax_rate.plot(sizes, [r["images_per_sec"] for r in rows], marker="o")
  ax_rate.set_ylabel("images/sec")
  ax_lat.plot(sizes, [r["latency_ms_median"] / 1e3 for r in rows], marker="o",
              label="latency per batch")
  ax_lat.plot(sizes, [r["total_s"] for r in rows], marker="s", label=f"all {result['num_images']}")
  ax_lat.set_ylabel("seconds")
  ax_lat.set_yscale("log")
  ax_lat.legend(fontsize="small")
  for ax in (ax_rate, ax_lat):
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"batch size (batch count = ceil({result['num_images']} / size))")
    ax.grid(True, alpha=0.3)
  fig.suptitle(f"{result['workload']}: {result['num_images']} images, {result['sampler']} "
               f"{result['sampler_steps']} steps, {result['device_kind']}", fontsize="small")


def _grid_figure(images: np.ndarray, result: dict[str, Any]):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  shown = images[:64]
  cols = min(8, len(shown))
  rows = -(-len(shown) // cols)
  h, w = shown.shape[1:3]
  grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1), np.float32)
  for i, image in enumerate(shown):
    r, c = divmod(i, cols)
    pixels = image if image.ndim == 2 else image.mean(axis=-1)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = (
        np.clip(pixels, -1, 1) + 1) / 2
  fig = Figure(figsize=(cols * 0.6 + 0.4, rows * 0.6 + 0.6), dpi=100, layout="constrained")
  ax = fig.subplots()
  ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
  ax.set_axis_off()
  ax.set_title(f"{result['sampler']} {result['sampler_steps']} steps, seed {result['seed']}",
               fontsize="small")
  return fig


def format_generate(result: dict[str, Any]) -> str:
  """The console summary: one line per batch size, the budget and the answer."""
  head = ("batch_size", "batch_count", "images/s", "ms/batch", "first_image_s", "total_s",
          "compile_s", "peak", "status")
  body = [(f"{r['batch_size']:,}", f"{r['batch_count']:,}",
           "-" if r["images_per_sec"] is None else f"{r['images_per_sec']:,.1f}",
           "-" if r["latency_ms_median"] is None else f"{r['latency_ms_median']:.4g}",
           "-" if r["time_to_first_image_s"] is None else f"{r['time_to_first_image_s']:.3g}",
           "-" if r["total_s"] is None else f"{r['total_s']:.3g}", f"{r['compile_s']:.2f}",
           format_bytes(r["peak_bytes"]), r["status"]) for r in result["rows"]]
  lines = [format_table(head, body)]
  diffs = [r["image_max_abs_diff"] for r in result["rows"] if r["image_max_abs_diff"] is not None]
  if len(diffs) > 1:
    lines.append(f"same seed, same images: largest difference across batch sizes "
                 f"{max(diffs):.2g} (pixels in [-1, 1])")
  b = result["budget"]
  if b["budget_bytes"] is None:
    lines.append("memory budget: none (the runtime reports no device memory; pass "
                 "--memory_budget=SIZE to name the largest batch size that fits)")
  else:
    lines.append(f"memory budget {format_bytes(b['budget_bytes'])} ({result['budget_source']}): "
                 f"largest batch size tried that fits: {b['largest_tried']}"
                 + (f"; the line through the compiled peaks predicts {b['predicted']:,}"
                    if b["predicted"] is not None else ""))
  ans = result["answer"]
  lines.append(ans["text"] if ans else "no batch size ran (all over the memory budget)")
  return "\n".join(lines)

"""Generation, batch size vs batch count: N images from a trained diffusion model.

``run_generate`` answers the image-generation sense of the question (what web UIs
call "batch size", images per forward pass, and "batch count", passes one after
another): for ``num_images`` images and each batch size ``b`` it runs
``ceil(N / b)`` batches of ``b`` images with a fixed sampler (DDPM ancestral or
DDIM, ``sampler_steps`` network evaluations per image) and records images/s,
latency per batch, time to the first image, compile seconds and the compiled
program's memory (XLA's ``memory_analysis()``, ahead of time, as ``probe`` does),
and which batch sizes fit a memory budget. The answer names the batch size and
count that make the N images soonest.

Same seed, same image: image ``i`` draws all its noise from ``fold_in(key(seed),
i)`` (``workloads.ddpm_sampling``), so the N images are the same at every batch
size and count, to float32 rounding; each row records the largest difference
from the first batch size's images. A last batch that is not full is padded with
the next indices (images N, N+1, ... that are generated and dropped), so one
program serves every batch of a size.

The trained model comes from a trial's final checkpoint (``checkpoint``: a trial
directory such as ``<workdir>/trials/<trial_id>``), or, without one, from the
config's own trial, trained first in ``<workdir>/trials/<trial_id>`` (or reused
from there when it has finished). Generation runs on one device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from batchbench.config import ConfigError, TrialSpec, open_workdir, resolve
from batchbench.fmt import format_bytes
from batchbench.measure.memory import compiled_memory
from batchbench.runs.generate_output import GENERATE_DIR, format_generate, write_files
from batchbench.runs.probe import memory_budget
from batchbench.store import checkpoint as checkpoint_lib
from batchbench.workloads import diffusion
from batchbench.workloads.ddpm_sampling import SAMPLERS

Log = Callable[[str], None]


# -- input ----------------------------------------------------------------------------


def parse_batch_sizes(value: str | Sequence[int] | None, num_images: int) -> tuple[int, ...]:
  """Batch sizes from ``"1,2,4"``, a power-of-two range ``"1:64"``, or a sequence of ints.

  None: the powers of two from 1 up to ``num_images`` (and ``num_images`` itself).

  Raises:
    ConfigError: naming ``batch_sizes``, for anything but positive integers.
  """
  help_ = ("positive integers as a list '1,2,4,8' or a power-of-two range 'LO:HI' (e.g. "
           "'1:64')")
  if value is None:
    sizes, b = [], 1
    while b < num_images:
      sizes.append(b)
      b *= 2
    return tuple([*sizes, num_images])
  if isinstance(value, str):
    text = value.strip()
    try:
      if ":" in text:
        lo, hi = (int(p) for p in text.split(":"))
        if lo < 1 or hi < lo or lo & (lo - 1):
          raise ValueError
        sizes = [lo * 2**k for k in range(64) if lo * 2**k <= hi]
      else:
        sizes = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
      raise ConfigError("batch_sizes", value, help_) from None
  else:
    sizes = list(value)
  if not sizes or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
                      for s in sizes):
    raise ConfigError("batch_sizes", value, help_)
  return tuple(sorted({int(s) for s in sizes}))


@dataclasses.dataclass(frozen=True)
class Request:
  """A validated ``generate`` request."""

  spec: TrialSpec  # the config's trial (the model to train when there is no checkpoint)
  settings: diffusion.DiffusionSettings
  num_images: int
  batch_sizes: tuple[int, ...]
  sampler: str
  sampler_steps: int
  seed: int
  checkpoint: str | None  # a trial directory
  checkpoint_spec: TrialSpec | None
  budget: int | None
  budget_source: str | None
  repeats: int = 3


def _int(value: Any, field: str, low: int, valid: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ConfigError(field, value, valid)
  return int(value)


def _checkpoint_spec(path: str, spec: TrialSpec) -> TrialSpec:
  """The spec a trial directory was trained under, checked against the config's model."""
  where = "a trial directory (<workdir>/trials/<trial_id>) with spec.json and checkpoints/"
  spec_file = os.path.join(path, checkpoint_lib.SPEC_FILE)
  if not os.path.isdir(path):
    raise ConfigError("checkpoint", path, f"no such directory; give {where}")
  if not os.path.exists(spec_file):
    raise ConfigError("checkpoint", path, f"has no {checkpoint_lib.SPEC_FILE}; give {where}")
  if not checkpoint_lib.committed_steps(os.path.join(path, checkpoint_lib.CHECKPOINT_DIR)):
    raise ConfigError("checkpoint", path, f"holds no committed checkpoint; give {where}")
  try:
    with open(spec_file, encoding="utf-8") as f:
      saved = TrialSpec.from_dict(json.load(f)["spec"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError("checkpoint", path, f"its {checkpoint_lib.SPEC_FILE} is unreadable "
                      f"({type(e).__name__}: {e}); give {where}") from None
  ours = (spec.workload, dict(spec.workload_options))
  theirs = (saved.workload, dict(saved.workload_options))
  if ours != theirs:
    raise ConfigError("checkpoint", path, f"was trained as workload {theirs[0]} with options "
                      f"{theirs[1]}, but the config gives {ours[0]} with {ours[1]}: use the "
                      "config (and --config.workload_options.*) the checkpoint was trained with")
  return saved


def validate(config: ml_collections.ConfigDict, *, num_images: Any, batch_sizes: Any,
             sampler: Any, sampler_steps: Any, seed: Any = 0, checkpoint: str | None = None,
             memory_budget_bytes: int | None = None, repeats: Any = 3,
             num_available_devices: int | None = None) -> Request:
  """Checks every input of ``run_generate`` before anything is compiled or written.

  Raises:
    ConfigError: naming the flag or field, the value and what is valid.
  """
  if config is None:
    raise ConfigError("config", None, "pass --config=configs/<name>.py, e.g. "
                      "configs/digits_ddpm.py")
  num_images = _int(num_images, "num_images", 1, "must be an integer >= 1")
  sizes = parse_batch_sizes(batch_sizes, num_images)
  if sampler not in SAMPLERS:
    raise ConfigError("sampler", sampler, f"must be one of {'|'.join(SAMPLERS)}")
  seed = _int(seed, "seed", 0, "must be an integer >= 0")
  repeats = _int(repeats, "repeats", 1, "must be an integer >= 1")
  spec = resolve(config, num_available_devices or jax.local_device_count())
  try:
    settings = diffusion.generation_settings(spec.workload, dict(spec.workload_options))
  except KeyError as e:
    raise ConfigError("workload", spec.workload, str(e.args[0])) from None
  steps = _int(sampler_steps, "sampler_steps", 1, f"must be an integer between 1 and the "
               f"{settings.num_timesteps} training timesteps (num_timesteps)")
  if steps > settings.num_timesteps:
    raise ConfigError("sampler_steps", steps, f"must be at most the {settings.num_timesteps} "
                      "training timesteps (workload_options.num_timesteps)")
  saved = None
  if checkpoint is not None:
    checkpoint = os.path.abspath(os.path.expanduser(checkpoint))
    saved = _checkpoint_spec(checkpoint, spec)
  budget, source = memory_budget(memory_budget_bytes, config, jax.local_devices()[:1])
  return Request(spec, settings, num_images, sizes, sampler, steps, seed, checkpoint, saved,
                 budget, source, repeats)


# -- the trained model ------------------------------------------------------------------


def _restore(trial_dir: str, spec: TrialSpec, log: Log,
             program: Any = None) -> tuple[Any, dict[str, Any]]:
  """The latest checkpoint of a trial directory: (train state, loop JSON).

  ``program``: the trial's program when at hand (its abstract state); else one is
  built for the state's shapes alone, on one device with one step per call.
  """
  if program is None:
    from batchbench.core.program import build  # pylint: disable=g-import-not-at-top
    local = dataclasses.replace(spec, num_devices=1, per_device_batch=spec.micro_batch,
                                steps_per_call=1, gns_source=None, gns_groups=1)
    program = build(local, abstract=True, flops=False)
  ckpt = checkpoint_lib.TrialCheckpointer(trial_dir, spec, log=log)
  try:
    restored = ckpt.restore(program.abstract_state())
  finally:
    ckpt.close()
  return restored.state, restored.loop


def trained_state(request: Request, workdir: str, log: Log) -> tuple[Any, dict[str, Any]]:
  """The trained train state, and where it came from (``{"checkpoint", "step", ...}``)."""
  if request.checkpoint is not None:
    state, loop = _restore(request.checkpoint, request.checkpoint_spec, log)
    status = loop.get("status")
    log(f"[generate] model from {request.checkpoint} (step {loop['step']}, trial status "
        f"{status}" + (": an unfinished trial's latest checkpoint)" if status is None else ")"))
    return state, {"checkpoint": request.checkpoint, "step": loop["step"],
                   "trained_now": False, "status": loop.get("status")}
  from batchbench.core.program import ProgramCache  # pylint: disable=g-import-not-at-top
  from batchbench.runs.sweep import trial_dir  # pylint: disable=g-import-not-at-top
  from batchbench.runs.trial import run_trial  # pylint: disable=g-import-not-at-top
  from batchbench.store import results  # pylint: disable=g-import-not-at-top

  spec, directory = request.spec, trial_dir(workdir, request.spec)
  steps_dir = os.path.join(directory, checkpoint_lib.CHECKPOINT_DIR)
  if checkpoint_lib.committed_steps(steps_dir):
    state, loop = _restore(directory, spec, log)
    if loop.get("status") is not None:
      log(f"[generate] no --checkpoint: using the config's trial, already trained in "
          f"{directory} (step {loop['step']}, status {loop['status']})")
      return state, {"checkpoint": directory, "step": loop["step"], "trained_now": False,
                     "status": loop["status"]}
  log(f"[generate] no --checkpoint: training the config's trial first (global batch "
      f"{spec.global_batch}, lr {spec.lr:.3g}, seed {spec.seed}) in {directory}")
  start = time.perf_counter()
  cache = ProgramCache()
  row = run_trial(spec, workdir=directory, log=log, cache=cache)
  seconds = time.perf_counter() - start
  if jax.process_index() == 0:
    results.append_row(workdir, row)
  log(f"[generate] trained in {seconds:.1f}s: {row['status']} after {row['steps']} steps"
      + ("" if row["status"] == "ok" else " (the model did NOT reach the target)"))
  state, loop = _restore(directory, spec, log, program=cache.get(spec)[0])
  return state, {"checkpoint": directory, "step": loop["step"], "trained_now": True,
                 "status": row["status"], "train_wall_s": seconds,
                 "final_eval": row.get("final_eval")}


# -- measuring one batch size -------------------------------------------------------------


def batch_indices(num_images: int, size: int) -> list[np.ndarray]:
  """The global image indices of each of the ``ceil(N / size)`` batches; the last batch
  is padded with indices ``N, N+1, ...`` (generated, then dropped)."""
  count = -(-num_images // size)
  return [np.arange(j * size, (j + 1) * size, dtype=np.int32) for j in range(count)]


def measure_size(fn, params, request: Request, size: int, clock: Callable[[], float],
                 log: Log) -> tuple[dict[str, Any], np.ndarray | None]:
  """Compiles and times one batch size; returns its row and its N images (or None).

  After one discarded warm-up batch, the N images are made ``request.repeats``
  times over; each batch is timed on its own, closed by ``block_until_ready``.
  ``total_s`` and ``time_to_first_image_s`` are medians over the repeats.
  """
  n = request.num_images
  batches = batch_indices(n, size)
  seed = np.int32(request.seed)
  start = clock()
  compiled = fn.lower(params, seed, batches[0]).compile()
  compile_s = clock() - start
  memory = compiled_memory(compiled)
  peak = memory["peak_bytes"]
  fits = None if request.budget is None or peak is None else peak <= request.budget
  row = {"batch_size": size, "batch_count": len(batches), "num_images": n, "status": "ok",
         "sampler": request.sampler, "sampler_steps": request.sampler_steps,
         "repeats": request.repeats, "compile_s": compile_s, "peak_bytes": peak,
         "temp_bytes": memory["temp_bytes"], "argument_bytes": memory["argument_bytes"],
         "memory": memory, "fits_budget": fits, "images_per_sec": None,
         "latency_ms_median": None, "latency_ms_q25": None, "latency_ms_q75": None,
         "time_to_first_image_s": None, "total_s": None, "latencies_s": None,
         "image_max_abs_diff": None}
  if fits is False:
    row["status"] = "over_budget"
    log(f"  batch {size:>5,d} x {len(batches):<5,d}: compiled peak {format_bytes(peak)} is "
        f"over the budget {format_bytes(request.budget)}: not run")
    return row, None
  jax.block_until_ready(compiled(params, seed, batches[0]))  # warm-up, discarded
  outputs, latencies = [], []
  for repeat in range(request.repeats):
    times = []
    for indices in batches:
      t0 = clock()
      out = jax.block_until_ready(compiled(params, seed, indices))
      times.append(clock() - t0)
      if repeat == 0:
        outputs.append(out)
    latencies.append(times)
  images = np.concatenate([np.asarray(o) for o in jax.device_get(outputs)])[:n]
  total = float(np.median([sum(t) for t in latencies]))
  q25, q50, q75 = (1e3 * q for q in np.percentile(np.concatenate(latencies), [25, 50, 75]))
  first = float(np.median([t[0] for t in latencies]))
  row.update(images_per_sec=n / max(total, 1e-12), latency_ms_median=q50, latency_ms_q25=q25,
             latency_ms_q75=q75, time_to_first_image_s=first, total_s=total,
             latencies_s=latencies)
  log(f"  batch {size:>5,d} x {len(batches):<5,d}: {row['images_per_sec']:,.1f} images/s, "
      f"{q50:.4g} ms per batch, first image after {first:.3g}s, compile "
      f"{compile_s:.2f}s, peak {format_bytes(peak)}")
  return row, images


def largest_within_budget(rows: Sequence[dict[str, Any]],
                          budget: int | None) -> dict[str, Any]:
  """The largest batch size tried whose compiled peak fits ``budget``, and the largest
  size a line ``peak = fixed + per_image x size`` through the tried sizes predicts."""
  out = {"budget_bytes": budget, "largest_tried": None, "predicted": None,
         "fixed_bytes": None, "bytes_per_image": None}
  points = [(r["batch_size"], r["peak_bytes"]) for r in rows if r["peak_bytes"] is not None]
  if len(points) >= 2 and len({b for b, _ in points}) >= 2:
    per_image, fixed = np.polyfit(*np.array(points, np.float64).T, 1)
    out.update(fixed_bytes=float(fixed), bytes_per_image=float(per_image))
    if budget is not None and per_image > 0:
      out["predicted"] = max(0, int(math.floor((budget - fixed) / per_image)))
  if budget is not None:
    fitting = [b for b, p in points if p <= budget]
    out["largest_tried"] = max(fitting) if fitting else None
  return out


def answer(rows: Sequence[dict[str, Any]], num_images: int) -> dict[str, Any] | None:
  """The batch size (and count) that made the N images soonest, compile excluded."""
  ran = [r for r in rows if r["status"] == "ok"]
  if not ran:
    return None
  best = min(ran, key=lambda r: (r["total_s"], r["batch_size"]))
  one = next((r for r in ran if r["batch_size"] == 1), None)
  text = (f"For {num_images:,} images on this machine ({jax.devices()[0].device_kind}), use "
          f"batch size {best['batch_size']:,} and batch count {best['batch_count']:,}: "
          f"{best['total_s']:.3g}s ({best['images_per_sec']:,.1f} images/s")
  if one is not None and one is not best:
    text += f"; {one['total_s'] / best['total_s']:.1f}x faster than batch size 1"
  text += (f"), first image after {best['time_to_first_image_s']:.3g}s, plus "
           f"{best['compile_s']:.2f}s to compile once.")
  return {"batch_size": best["batch_size"], "batch_count": best["batch_count"],
          "total_s": best["total_s"], "images_per_sec": best["images_per_sec"], "text": text}


# -- the command ---------------------------------------------------------------------------


def run_generate(config: ml_collections.ConfigDict, workdir: str, *, num_images: int,
                 batch_sizes: str | Sequence[int] | None = None, sampler: str = "ddim",
                 sampler_steps: int = 50, seed: int = 0, checkpoint: str | None = None,
                 memory_budget_bytes: int | None = None, save_images: bool = False,
                 repeats: int = 3, clock: Callable[[], float] = time.perf_counter,
                 log: Log | None = print) -> dict[str, Any]:
  """N images at each batch size (batch count = ceil(N / size)); writes ``generate/``.

  Args:
    config: a diffusion workload's config (e.g. ``configs/digits_ddpm.py``).
    workdir: results go to ``<workdir>/generate/``; without ``checkpoint`` the
      config's trial is trained (or reused) in ``<workdir>/trials/<trial_id>``.
    num_images: N, the images to make at every batch size.
    batch_sizes: ``"1,2,4"``, ``"1:64"`` (powers of two) or ints; None: 1, 2, 4, ... N.
    sampler: ``ddpm`` (ancestral) or ``ddim`` (deterministic given the initial noise).
    sampler_steps: network evaluations per image (at most the training timesteps).
    seed: the sampler seed; image ``i``'s noise is keyed by ``(seed, i)``.
    checkpoint: a trial directory to take the trained model from.
    memory_budget_bytes: per-device budget: larger compiled peaks are not run
      (default: ``config.memory_budget_bytes``, else the device's memory minus 10%).
    save_images: write ``images_b{size}.npy``, ``(N, H, W)``, per batch size.
    repeats: times the N images are made at each batch size (medians are reported).
    clock: seconds clock.
    log: progress sink; None for silence.

  Returns:
    ``{"rows": [one per batch size], "answer", "budget", "model", "files", ...}``.

  Raises:
    ConfigError: invalid input, before anything is compiled or written.
  """
  log = log or (lambda _: None)
  request = validate(config, num_images=num_images, batch_sizes=batch_sizes, sampler=sampler,
                     sampler_steps=sampler_steps, seed=seed, checkpoint=checkpoint,
                     memory_budget_bytes=memory_budget_bytes, repeats=repeats)
  workdir = open_workdir(workdir)
  out_dir = os.path.join(workdir, GENERATE_DIR)
  state, model = trained_state(request, workdir, log)
  # One device: the trial's state may be replicated over several, and generating with it
  # there would repeat every batch on each.
  params = diffusion.on_one_device(diffusion.sampling_params(state.params, state.model_state))
  fn = request.settings.sampler(request.sampler, request.sampler_steps)
  log(f"[generate {request.spec.workload}] {request.num_images:,} images, {request.sampler} "
      f"with {request.sampler_steps} steps, seed {request.seed}, batch sizes "
      f"{', '.join(map(str, request.batch_sizes))} on {jax.devices()[0].device_kind}")
  rows, images, reference = [], {}, None
  for size in request.batch_sizes:
    row, got = measure_size(fn, params, request, size, clock, log)
    if got is not None:
      if reference is None:
        reference = (size, got)
      row["image_max_abs_diff"] = float(np.max(np.abs(got - reference[1])))
      row["image_reference_batch_size"] = reference[0]
      images[size] = got
    rows.append(row)
  result = {"workload": request.spec.workload,
            "workload_options": dict(request.spec.workload_options),
            "num_images": request.num_images, "sampler": request.sampler,
            "sampler_steps": request.sampler_steps, "seed": request.seed,
            "repeats": request.repeats,
            "platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "model": model, "budget_source": request.budget_source,
            "budget": largest_within_budget(rows, request.budget),
            "answer": answer(rows, request.num_images), "rows": rows}
  if jax.process_index() == 0:
    result["files"] = write_files(out_dir, result, images, save_images)
  return result


__all__ = ["GENERATE_DIR", "Request", "answer", "batch_indices", "format_generate",
           "largest_within_budget", "measure_size", "parse_batch_sizes", "run_generate",
           "trained_state", "validate"]

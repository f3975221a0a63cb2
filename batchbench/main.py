"""The ``batchbench`` command: an absl app with subcommands. The only reader of flags.

  batchbench trial     --config=configs/digits_mlp.py --workdir=/tmp/bb
  batchbench sweep     --config=configs/digits_mlp.py --workdir=/tmp/sweep
  batchbench report    --workdir=/tmp/sweep
  batchbench probe     --config=configs/synthetic_cnn.py --workdir=/tmp/p --memory_budget=2GiB
  batchbench decompose --config=configs/mnist1d_mlp.py --global_batch=1024 --workdir=/tmp/dec

``batchbench --help`` lists the commands; ``batchbench COMMAND --help`` shows a
command's flags, the config fields that matter to it, and an example. Invalid
input exits with status 2 and one message naming the field, the value and what is
valid, before anything is compiled or written.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from batchbench.core import distributed  # defines the multi-process flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/x.py:key=value,...",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, reports and checkpoints.")
_QUIET = flags.DEFINE_bool("quiet", False, "Print only the final summary.")
_ISOLATION = flags.DEFINE_enum(
    "isolation", "none", ["none", "process"],
    "Run trials in this process, or each in its own process (a native crash or leaked "
    "device memory then ends only that trial).")
_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "JAX persistent compilation cache directory. With --isolation=process it defaults to "
    "<workdir>/xla_cache, so every trial of a batch loads the program the first compiled.")
_MEMORY_BUDGET = flags.DEFINE_string(
    "memory_budget", None,
    "Per-device memory budget with a unit, e.g. 2GiB, 512MiB, 1.5GB. probe: the budget to "
    "fit (default: the device memory the runtime reports, minus 10%); decompose: splits "
    "over it are not run; trial, sweep: trials whose compiled peak exceeds it are recorded "
    "oom without training.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 2**16, "The largest global batch to compile.")
_PROBE_TIME = flags.DEFINE_bool(
    "probe_time", True, "probe: also run every batch that fits for a short timing (1 "
    "warm-up call, 3+ windows, 0.5 s to 5 s of timed work) for samples/s, TFLOP/s per "
    "device and MFU, and on GPU/TPU the answer's measured device peak; --noprobe_time "
    "only compiles.")
_GLOBAL_BATCH = flags.DEFINE_integer(
    "global_batch", None, "The global batch to split (default: the config's).")
_MODE = flags.DEFINE_string(
    "mode", "train", "train (split --global_batch into per-device batch x devices x "
    "accumulation steps) or inference (--total examples as batch size x batch count).")
_TOTAL = flags.DEFINE_integer("total", None,
                              "--mode=inference: examples to run through the forward pass.")
_TABLE = flags.DEFINE_string(
    "table", None, "fit: a CSV with a column 'batch' and one of 'steps', 'examples' or "
    "'epochs' (repeated batches are several runs), e.g. a published table, instead of a "
    "sweep's --workdir.")
_BASELINE = flags.DEFINE_string(
    "baseline", None, "compare: the baseline: a workdir, or its throughput.jsonl / "
    "results.jsonl. Without it, --history's last --baseline_runs runs.")
_CANDIDATE = flags.DEFINE_string(
    "candidate", None, "compare: the candidate: a workdir, or its throughput.jsonl / "
    "results.jsonl.")
_ALPHA = flags.DEFINE_float(
    "alpha", 0.01, "compare: significance level of the two-sided Mann-Whitney U test on "
    "per-window figures.")
_THRESHOLD = flags.DEFINE_string(
    "threshold", "0.05", "compare: smallest relative median change that counts: one "
    "fraction, or METRIC=FRACTION,... for samples_per_sec, step_time_ms, time_to_target_s.")
_OUTPUT = flags.DEFINE_string("output", None,
                              "compare: also write the report here (.json or .md).")
_HISTORY = flags.DEFINE_string(
    "history", None, "compare: history directory (SQLite); the candidate is appended, and "
    "without --baseline it is the baseline. history: the store to render.")
_BASELINE_RUNS = flags.DEFINE_integer(
    "baseline_runs", 1, "compare --history: the baseline is the median of this many last "
    "runs.")
_PROFILE_STEPS = flags.DEFINE_integer(
    "profile_steps", 0, "trial, sweep: trace this many steady-state steps of each trial "
    "with jax.profiler into <workdir>/trials/<trial_id>/profile (TensorBoard's profile "
    "plugin or Perfetto); left out of the timed windows.")
_TENSORBOARD = flags.DEFINE_bool(
    "tensorboard", False, "trial, sweep: TensorBoard event files in "
    "<workdir>/tensorboard/<trial_id> (tensorboard --logdir <workdir>/tensorboard).")
_MLLOG = flags.DEFINE_bool("mllog", False, "trial, sweep: ':::MLLOG {json}' lines in "
                           "<workdir>/mllog/<trial_id>.log.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 64,
                                   "generate: N, the images to make at every batch size.")
_BATCH_SIZES = flags.DEFINE_string(
    "batch_sizes", None, "generate: batch sizes, a list '1,2,4,8' or a power-of-two range "
    "'1:64' (default: 1, 2, 4, ... up to --num_images); each runs ceil(N / size) batches.")
_SAMPLER = flags.DEFINE_string(
    "sampler", "ddim", "generate: ddim (deterministic given the initial noise) or ddpm "
    "(ancestral: fresh noise every step).")
_SAMPLER_STEPS = flags.DEFINE_integer(
    "sampler_steps", 50, "generate: network evaluations per image (at most the model's "
    "training timesteps, workload_options.num_timesteps).")
_SAMPLER_SEED = flags.DEFINE_integer(
    "sampler_seed", 0, "generate: image i's noise is keyed by (sampler_seed, i), so image i "
    "is the same at every batch size.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "generate: a trial directory (<workdir>/trials/<trial_id>) to take "
    "the trained model from; default: the config's trial in --workdir, trained first if "
    "needed.")
_SAVE_IMAGES = flags.DEFINE_bool(
    "save_images", False, "generate: write <workdir>/generate/images_b{size}.npy, the N "
    "images of each batch size.")
_SHARD = flags.DEFINE_string(
    "shard", None, "sweep: I/N runs slice I of N (0-based, I in 0..N-1, e.g. "
    "${SLURM_ARRAY_TASK_ID}/N) of the trials, chosen by a hash of each trial's id; N "
    "shards on one shared --workdir together run the whole sweep (see docs/shard.md).")
_SHARD_TIMEOUT = flags.DEFINE_float(
    "shard_timeout", 6 * 3600.0, "sweep --shard: seconds a shard waits for other shards' "
    "rows (an LR-search round needs all of them) with no new row arriving before it gives "
    "up with exit status 4; set it above the longest trial.")
_DEADLINE = flags.DEFINE_float(
    "deadline", None, "fit, report, sweep: seconds of training; also recommend the batch "
    "with the fewest device-seconds that reaches the target within them.")

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Command:
  name: str
  summary: str
  run: Callable[..., int]
  flags: tuple[str, ...]
  fields: tuple[str, ...]
  example: str


COMMANDS: dict[str, Command] = {}
COMMON_FLAGS = ("config", "workdir", "quiet")


def command(name: str, summary: str, *, flags_: tuple[str, ...] = (),
            fields: tuple[str, ...] = (), example: str = ""):
  """Registers ``fn(config, workdir, log) -> exit status`` as a subcommand."""
  def wrap(fn):
    COMMANDS[name] = Command(name, summary, fn, flags_, fields, example)
    return fn
  return wrap


def usage() -> str:
  lines = ["usage: batchbench COMMAND --config=PATH[:ARG] --workdir=DIR "
           "[--config.FIELD=VALUE ...] [flags]", "", "commands:"]
  lines += [f"  {c.name:10s} {c.summary}" for c in COMMANDS.values()]
  lines += ["", "batchbench COMMAND --help shows the command's flags, the config fields that "
            "matter to it, and an example.", "Config files are in configs/; see README.md."]
  return "\n".join(lines)


def command_help(name: str) -> str:
  c = COMMANDS[name]
  lines = [f"batchbench {name}: {c.summary}", "", "flags:"]
  for flag in (*COMMON_FLAGS, *c.flags):
    lines.append(f"  --{flag}: {flags.FLAGS[flag].help}")
  if c.fields:
    lines += ["", "config fields that matter (override with --config.FIELD=VALUE):"]
    lines += [f"  {f}" for f in c.fields]
  if c.example:
    lines += ["", "example:", f"  {c.example}"]
  return "\n".join(lines)


def fail(message: str) -> int:
  print(f"batchbench: error: {message}", file=sys.stderr)
  return 2


def _require_config(config):
  from batchbench.config import ConfigError  # pylint: disable=g-import-not-at-top
  if config is None:
    raise ConfigError("config", None, "pass --config=configs/<name>.py (see configs/)")
  return config


def _memory_budget_bytes() -> int | None:
  from batchbench.fmt import parse_bytes  # pylint: disable=g-import-not-at-top
  text = _MEMORY_BUDGET.value
  return None if text is None else parse_bytes(text, "memory_budget")


def _with_memory_budget(config):
  """``--memory_budget`` (e.g. 2GiB), when given, sets ``config.memory_budget_bytes``."""
  config = _require_config(config)
  budget = _memory_budget_bytes()
  if budget is not None:
    config.memory_budget_bytes = budget
  return config


def _open_workdir(workdir: str | None, config, shard=None, grid=(), warn: Log = print) -> str:
  """Creates and stamps the workdir (run_meta.json) once the config is valid.

  Of a split sweep (``shard``, with the trial ids of its ``grid``), shard 0 writes
  run_meta.json and each shard its own ``shards/run_meta-I-of-N.json``; the workdir
  must have file locks.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from batchbench.config import open_workdir  # pylint: disable=g-import-not-at-top
  from batchbench.runs import shard as shard_lib  # pylint: disable=g-import-not-at-top
  from batchbench.store import meta  # pylint: disable=g-import-not-at-top

  workdir = open_workdir(workdir)
  if shard is not None:
    shard_lib.check_locks(workdir)
  if jax.process_index() == 0:
    run_meta = meta.run_metadata(config)
    if shard is None or shard.index == 0:
      meta.write_run_meta(workdir, run_meta)
    if shard is not None:
      shard_lib.write_meta(workdir, shard, run_meta, grid, warn)
  return workdir


def _use_compilation_cache(default: str | None = None) -> str | None:
  directory = _CACHE_DIR.value or default
  if directory:
    from batchbench.runs.worker import use_compilation_cache  # pylint: disable=g-import-not-at-top
    use_compilation_cache(directory)
  return directory


TRIAL_FIELDS = ("workload, workload_options", "global_batch, accum_steps, num_devices",
                "optimizer, momentum, weight_decay", "base_lr, reference_batch, lr_rule, "
                "lr_multiplier", "schedule, warmup_examples", "eval_every_examples",
                "max_examples, max_steps, max_seconds", "target_metric, target_value", "seed",
                "steps_per_call", "checkpoint_every_examples, fallback_to_previous_checkpoint",
                "throughput.min_windows, throughput.min_seconds, throughput.warmup_calls")


@command("trial", "one training run at the config's global_batch: its throughput point, "
         "steps and time to target",
         flags_=("memory_budget", "compilation_cache_dir", "tensorboard", "mllog",
                 "profile_steps", *distributed.DISTRIBUTED_FLAGS),
         fields=TRIAL_FIELDS,
         example="batchbench trial --config=configs/digits_mlp.py --workdir=/tmp/bb "
                 "--config.global_batch=128")
def _trial(config, workdir, log) -> int:
  import jax  # pylint: disable=g-import-not-at-top

  from batchbench.config import resolve  # pylint: disable=g-import-not-at-top
  from batchbench.core.program import ProgramCache  # pylint: disable=g-import-not-at-top
  from batchbench.runs import observe, sweep, throughput, trial  # pylint: disable=g-import-not-at-top
  from batchbench.store import results  # pylint: disable=g-import-not-at-top

  spec = resolve(_with_memory_budget(config), jax.device_count())
  workdir = _open_workdir(workdir, config)
  _use_compilation_cache()
  cache = ProgramCache()
  point = throughput.ensure_point(spec, workdir, cache=cache, log=log)
  observers = observe.observers_for(workdir, tensorboard=_TENSORBOARD.value,
                                    mllog=_MLLOG.value, process_index=jax.process_index())
  row = trial.run_trial(spec, log=log, workdir=sweep.trial_dir(workdir, spec), cache=cache,
                        point=point, observers=observers, profile_steps=_profile_steps(),
                        fallback_to_previous_checkpoint=config.fallback_to_previous_checkpoint)
  print(f"throughput: {throughput.format_rate(point)}, step {point['step_time_ms']:.3g} ms")
  if jax.process_index() == 0:
    results.append_row(workdir, row)
    print(f"result appended to {os.path.join(workdir, results.RESULTS_FILE)}")
  else:
    print(f"process {jax.process_index()}: done; process 0 writes the result")
  return 0


@command("sweep", "every (global batch x LR multiplier x seed) of the config's sweep section, "
         "each batch's throughput point, then the report",
         flags_=("isolation", "memory_budget", "compilation_cache_dir", "deadline",
                 "tensorboard", "mllog", "profile_steps", "shard", "shard_timeout",
                 *distributed.DISTRIBUTED_FLAGS),
         fields=("sweep.global_batches or sweep.batch_range", "sweep.lr_multipliers",
                 "sweep.seeds", "sweep.lr_search.enabled, sweep.lr_search.factor, "
                 "sweep.lr_search.max_extensions", "sweep.lr_rule, sweep.reference_batch, "
                 "sweep.warmup_examples, sweep.schedule", *TRIAL_FIELDS),
         example="batchbench sweep --config=configs/digits_mlp.py --workdir=/tmp/sweep "
                 "--config.sweep.seeds='(0,1)'")
def _sweep(config, workdir, log) -> int:
  import jax  # pylint: disable=g-import-not-at-top

  from batchbench.runs import shard as shard_lib  # pylint: disable=g-import-not-at-top
  from batchbench.runs import sweep  # pylint: disable=g-import-not-at-top

  shard = _shard()
  specs, search = sweep.plan(_with_memory_budget(config), jax.device_count())
  _deadline()
  workdir = _open_workdir(workdir, config, shard, [s.trial_id for s in specs],
                          lambda s: print(s, file=sys.stderr, flush=True))
  cache_dir = _CACHE_DIR.value
  if _ISOLATION.value == "none":
    _use_compilation_cache()
  options = sweep.RunOptions(
      config_path=_config_path(), compilation_cache_dir=cache_dir,
      fallback_to_previous_checkpoint=config.fallback_to_previous_checkpoint,
      tensorboard=_TENSORBOARD.value, mllog=_MLLOG.value, profile_steps=_profile_steps())
  summary = sweep.run_sweep(specs, workdir, isolation=_ISOLATION.value, log=log,
                            options=options, search=search,
                            shard=shard or shard_lib.UNSPLIT)
  counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["statuses"].items())) or "none"
  print(f"sweep{f' shard {shard.label}' if shard else ''}: {summary['ran']} trial(s) run "
        f"({counts}), {summary['skipped']} already done, {summary['points']} throughput "
        "point(s)")
  if shard is None:
    return _write_report(workdir)
  return _shard_report(workdir, shard, summary["planned"])


def _shard():
  """``--shard`` as a ``runs.shard.Shard`` (None without it)."""
  from batchbench.runs import shard as shard_lib  # pylint: disable=g-import-not-at-top
  if _SHARD.value is None:
    return None
  return shard_lib.parse(_SHARD.value, _SHARD_TIMEOUT.value)


def _shard_report(workdir: str, shard, planned: list[str]) -> int:
  """The report once every trial of the sweep has a row, written by one shard only."""
  import jax  # pylint: disable=g-import-not-at-top

  from batchbench.runs import shard as shard_lib  # pylint: disable=g-import-not-at-top

  if jax.process_index() != 0:
    shard_lib.barrier("report")  # process 0 writes it; all leave the job together
    return 0
  with shard_lib.report_lock(workdir):
    state, missing = shard_lib.report_state(workdir, planned, _deadline())
    if state == "due":
      status = _write_report(workdir)
      shard_lib.mark_reported(workdir, planned, _deadline())
  shard_lib.barrier("report")
  if state == "due":
    return status
  if state == "written":
    print(f"shard {shard.label}: every trial has a row; another shard wrote the report: "
          f"{os.path.join(workdir, 'report')}")
  else:
    print(f"shard {shard.label}: done; {missing} trial(s) of other shards have no row yet. "
          "The last shard to finish writes the report; or, once all have finished, run: "
          f"batchbench report --workdir={workdir}")
  return 0


def _profile_steps() -> int:
  from batchbench.config import ConfigError  # pylint: disable=g-import-not-at-top
  if _PROFILE_STEPS.value < 0:
    raise ConfigError("profile_steps", _PROFILE_STEPS.value, "must be an integer >= 0")
  return _PROFILE_STEPS.value


def _deadline() -> float | None:
  from batchbench.config import ConfigError  # pylint: disable=g-import-not-at-top
  value = _DEADLINE.value
  if value is not None and not value > 0:
    raise ConfigError("deadline", value, "must be a positive number of seconds")
  return value


def _write_report(workdir: str) -> int:
  from batchbench.analysis.fit import fit_text  # pylint: disable=g-import-not-at-top
  from batchbench.report import render, tables  # pylint: disable=g-import-not-at-top

  out = render.write_report(workdir, deadline_s=_deadline())
  print(tables.console_table(out["best"]))
  if out["answer"]["fit"] is not None:
    print(fit_text(out["answer"]["fit"]))
  print(out["recommendation"]["text"])
  for warning in out["recommendation"]["warnings"]:
    print(f"  warning: {warning}")
  print(f"report: {out['paths'].get('report.html') or os.path.join(workdir, 'report')} "
        "(also report.md, summary.csv and the plots beside it)")
  return 0


@command("fit", "the critical batch size: fit S(B) = S_min (1 + B_crit/B) to a sweep's steps "
         "to target (--workdir) or to a table (--table), with 90% bootstrap intervals, and "
         "the batch with the least time to target", flags_=("table", "deadline"),
         example="batchbench fit --workdir=/tmp/sweep   # or --table=published.csv")
def _fit(config, workdir, log) -> int:
  del config, log
  from batchbench.config import ConfigError  # pylint: disable=g-import-not-at-top
  from batchbench.report import fit_command  # pylint: disable=g-import-not-at-top

  if workdir is None and _TABLE.value is None:
    raise ConfigError("workdir", workdir, "give a sweep's --workdir, or --table=FILE.csv "
                      "(with --workdir too, the outputs go there)")
  out = fit_command.run_fit(workdir=workdir, table=_TABLE.value, deadline_s=_deadline())
  print(out["text"])
  print(f"fit: {out['paths']['fit.json']} (and the plots beside it)")
  return 0


@command("report", "render the tables, plots and recommendation of a workdir's results",
         flags_=("deadline",), example="batchbench report --workdir=/tmp/sweep")
def _report(config, workdir, log) -> int:
  del config, log
  from batchbench.config import ConfigError  # pylint: disable=g-import-not-at-top
  from batchbench.store import results  # pylint: disable=g-import-not-at-top

  if not workdir:
    raise ConfigError("workdir", workdir, "give the workdir of a sweep")
  if not os.path.exists(os.path.join(workdir, results.RESULTS_FILE)):
    raise ConfigError("workdir", workdir, f"has no {results.RESULTS_FILE}; run a sweep there "
                      "first")
  return _write_report(os.path.abspath(workdir))


def _config_path() -> str | None:
  """The config file named by --config (without its ':arg' part), if any."""
  raw = flags.FLAGS["config"].serialize().partition("=")[2]
  path = raw.split(":", 1)[0]
  return os.path.abspath(path) if path and os.path.exists(path) else None


@command("compare", "did the candidate regress against the baseline? Mann-Whitney U on the "
         "per-window throughput plus a threshold; FLOPs, memory and steps exactly; exit 1 "
         "on a regression", flags_=("baseline", "candidate", "alpha", "threshold", "output",
                                    "history", "baseline_runs"),
         example="batchbench compare --baseline=/data/nightly/prev --candidate=/data/nightly/"
                 "tonight --output=cmp.json")
def _compare(config, workdir, log) -> int:
  del config, workdir, log
  from batchbench.runs.compare import run_compare  # pylint: disable=g-import-not-at-top
  return run_compare(_BASELINE.value, _CANDIDATE.value, alpha=_ALPHA.value,
                     threshold=_THRESHOLD.value, output=_OUTPUT.value, history=_HISTORY.value,
                     baseline_runs=_BASELINE_RUNS.value, log=print)


@command("history", "trend plots per metric from a --history store, with change points "
         "(a step change sustained over 3+ runs)", flags_=("history",),
         example="batchbench history --history=$HOME/bb_history --workdir=/tmp/trends")
def _history(config, workdir, log) -> int:
  del config, log
  from batchbench.runs.history import run_history  # pylint: disable=g-import-not-at-top
  return run_history(_HISTORY.value, workdir, log=print)


@command("nightly", "the fixed nightly suite (configs/nightly.py): throughput points, a "
         "short digits sweep and a probe, compared with the baseline or the history; exit 1 "
         "on a regression", flags_=("baseline", "history", "baseline_runs", "alpha",
                                    "threshold"),
         example="batchbench nightly --config=configs/nightly.py --workdir=/data/nightly/"
                 "tonight --history=$HOME/bb_history")
def _nightly(config, workdir, log) -> int:
  from batchbench.runs.nightly import run_nightly  # pylint: disable=g-import-not-at-top
  return run_nightly(_require_config(config).suite, workdir, baseline=_BASELINE.value,
                     history=_HISTORY.value, baseline_runs=_BASELINE_RUNS.value,
                     alpha=_ALPHA.value, threshold=_THRESHOLD.value, log=log)


@command("probe", "compile the train step at growing batches: the largest global batch "
         "that fits a memory budget (with and without remat where the workload has it), "
         "and samples/s, TFLOP/s and MFU of the batches that fit",
         flags_=("memory_budget", "max_batch", "probe_time"),
         fields=("workload, workload_options (a remat option is probed off and on)",
                 "accum_steps, num_devices",
                 "optimizer", "memory_budget_bytes", "compute_dtype, peak_tflops (MFU)",
                 "throughput.min_seconds, throughput.max_seconds (capped at 0.5 s, 5 s)"),
         example="batchbench probe --config=configs/synthetic_cnn.py --workdir=/tmp/probe "
                 "--memory_budget=2GiB")
def _probe(config, workdir, log) -> int:
  from batchbench import fmt  # pylint: disable=g-import-not-at-top
  from batchbench.runs import probe  # pylint: disable=g-import-not-at-top

  config = _require_config(config)
  result = probe.run_probe(config, workdir, memory_budget_bytes=_memory_budget_bytes(),
                           max_batch=_MAX_BATCH.value, measure=_PROBE_TIME.value, log=log)
  answer, remat = result["answer"], result["remat"]
  other = ""
  if remat["available"]:
    largest = remat["without" if remat["config_remat"] else "with"]["largest_batch"]
    other = (f"; {'without' if remat['config_remat'] else 'with'} remat: "
             + ("none fits" if largest is None else f"{largest:,}"))
  print(f"probe: largest global batch within {fmt.format_bytes(result['budget_bytes'])} "
        f"per device: {answer['global_batch']:,} (limited by {answer['limited_by']}){other}; "
        f"files in {os.path.join(os.path.abspath(workdir), probe.PROBE_DIR)}")
  return 0


@command("decompose", "time every split of --global_batch into per-device batch x devices x "
         "accumulation steps and check their updates agree; or --mode=inference --total=N",
         flags_=("global_batch", "mode", "total", "memory_budget"),
         fields=("workload, workload_options", "num_devices (the largest degree tried)",
                 "optimizer, base_lr, lr_rule", "seed",
                 "throughput.min_windows, throughput.min_seconds"),
         example="batchbench decompose --config=configs/mnist1d_mlp.py --global_batch=256 "
                 "--workdir=/tmp/dec")
def _decompose(config, workdir, log) -> int:
  from batchbench.runs import decompose  # pylint: disable=g-import-not-at-top

  config = _require_config(config)
  result = decompose.run(config, workdir, mode=_MODE.value, global_batch=_GLOBAL_BATCH.value,
                         total=_TOTAL.value, memory_budget_bytes=_memory_budget_bytes(),
                         log=log)
  where = os.path.join(os.path.abspath(workdir), decompose.DECOMPOSE_DIR)
  if result["mode"] == "inference":
    print(f"decompose: {len(result['rows'])} batch size x count rows; files in {where}")
    return 0
  best = result["fastest"]
  print(f"decompose: fastest split of {result['global_batch']:,}: "
        + (f"{best['num_devices']} device(s) x {best['per_device_batch']} per device x "
           f"accum {best['accum_steps']} ({best['samples_per_sec']:,.0f} samples/s)"
           if best else "none ran")
        + (f"; NOT EQUIVALENT: {', '.join(result['not_equivalent'])}"
           if result["not_equivalent"] else "") + f"; files in {where}")
  return 1 if result["not_equivalent"] else 0


@command("generate", "N images from a trained diffusion model at each batch size (batch "
         "count = ceil(N / size)): images/s, latency, time to first image, compile, memory",
         flags_=("num_images", "batch_sizes", "sampler", "sampler_steps", "sampler_seed",
                 "checkpoint", "save_images", "memory_budget"),
         fields=("workload, workload_options (a diffusion workload, e.g. digits_ddpm)",
                 "global_batch, base_lr, seed, max_examples, target_value (the trial trained "
                 "when there is no --checkpoint)"),
         example="batchbench generate --config=configs/digits_ddpm.py --workdir=/tmp/ddpm "
                 "--num_images=64 --batch_sizes=1:64")
def _generate(config, workdir, log) -> int:
  from batchbench.runs import generate  # pylint: disable=g-import-not-at-top
  config = _require_config(config)
  result = generate.run_generate(
      config, workdir, num_images=_NUM_IMAGES.value, batch_sizes=_BATCH_SIZES.value,
      sampler=_SAMPLER.value, sampler_steps=_SAMPLER_STEPS.value, seed=_SAMPLER_SEED.value,
      checkpoint=_CHECKPOINT.value, memory_budget_bytes=_memory_budget_bytes(),
      save_images=_SAVE_IMAGES.value, log=log)
  print(generate.format_generate(result))
  print(f"files in {os.path.join(os.path.abspath(workdir), generate.GENERATE_DIR)}")
  return 0


def main(argv) -> int:
  from batchbench.config import ConfigError  # pylint: disable=g-import-not-at-top

  args = argv[1:]
  if len(args) != 1 or args[0] not in COMMANDS:
    got = " ".join(args) or "nothing"
    print(f"batchbench: error: expected one command, got {got}\n\n{usage()}", file=sys.stderr)
    return 2
  log = (lambda _: None) if _QUIET.value else (lambda s: print(s, flush=True))
  if not flags.FLAGS["verbosity"].present:  # Orbax and JAX log INFO lines by the dozen
    logging.set_verbosity(logging.WARNING)
  try:
    distributed.initialize(log)
    return COMMANDS[args[0]].run(_CONFIG.value, _WORKDIR.value, log)
  except (ConfigError, distributed.DistributedError) as e:
    return fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    from batchbench.store import checkpoint  # pylint: disable=g-import-not-at-top
    if isinstance(e, checkpoint.Preempted):
      print(f"batchbench: {e}", file=sys.stderr)
      return checkpoint.PREEMPTED_EXIT_CODE
    if isinstance(e, checkpoint.CheckpointError):
      print(f"batchbench: error: {e}", file=sys.stderr)
      return checkpoint.CHECKPOINT_ERROR_EXIT_CODE
    from batchbench.runs import shard  # pylint: disable=g-import-not-at-top
    if isinstance(e, shard.ShardTimeout):
      print(f"batchbench: error: {e}", file=sys.stderr)
      return shard.TIMEOUT_EXIT_CODE
    raise


def _flag_error_message(error: Exception) -> str:
  """One line out of a flag-parsing error (ml_collections wraps tracebacks in them)."""
  # ml_collections raises AttributeError(KeyError(message)); str(KeyError) quotes it.
  while isinstance(error, (AttributeError, KeyError)) and error.args and isinstance(
      error.args[0], (KeyError, AttributeError, str)):
    inner = error.args[0]
    if isinstance(inner, str):
      error = ValueError(inner)
      break
    error = inner
  text = str(error).replace("\\n", "\n").replace("\\'", "'")
  lines = [line.strip() for line in text.splitlines()]
  for line in reversed(lines):
    if "ConfigError: " in line:
      return line.split("ConfigError: ", 1)[1]
  kept = [line for line in lines
          if line and not line.startswith(("Traceback", "File ", "^", "~")) and "^^^" not in line]
  return " ".join(kept[:1] + kept[-1:] if len(kept) > 1 else kept)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with errors (bad --config file, arg or override) as exit 2.

  absl would print "FATAL Flags parsing error" and a traceback and exit 1; a config
  error is the user's input, so it gets one line and the same status as ``resolve``'s.
  """
  try:
    args = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.keys()  # a config file that failed to load raises only when read
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    prefix = "unknown --config field: " if isinstance(e, (AttributeError, KeyError)) else ""
    print(f"batchbench: error: {prefix}{_flag_error_message(e)}", file=sys.stderr)
    sys.exit(2)
  return args


HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort", "-?")


def run() -> None:
  """Console-script entry point."""
  argv = sys.argv
  if len(argv) == 1 or any(a in HELP_FLAGS for a in argv[1:]):
    names = [a for a in argv[1:] if a in COMMANDS]
    print(command_help(names[0]) if names else usage())
    sys.exit(0)
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)


if __name__ == "__main__":
  run()

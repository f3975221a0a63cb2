"""The ``batchbench`` command: an absl app with subcommands (flags in ``batchbench.cli``).

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

import os
import sys
from collections.abc import Callable

from absl import app, flags, logging

from batchbench import cli
from batchbench.cli import COMMANDS, command, command_help, usage
from batchbench.core import distributed  # defines the multi-process flags

Log = Callable[[str], None]


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
  text = cli.MEMORY_BUDGET.value
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
  directory = cli.CACHE_DIR.value or default
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
  observers = observe.observers_for(workdir, tensorboard=cli.TENSORBOARD.value,
                                    mllog=cli.MLLOG.value, process_index=jax.process_index())
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
  cache_dir = cli.CACHE_DIR.value
  if cli.ISOLATION.value == "none":
    _use_compilation_cache()
  options = sweep.RunOptions(
      config_path=_config_path(), compilation_cache_dir=cache_dir,
      fallback_to_previous_checkpoint=config.fallback_to_previous_checkpoint,
      tensorboard=cli.TENSORBOARD.value, mllog=cli.MLLOG.value, profile_steps=_profile_steps())
  summary = sweep.run_sweep(specs, workdir, isolation=cli.ISOLATION.value, log=log,
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
  if cli.SHARD.value is None:
    return None
  return shard_lib.parse(cli.SHARD.value, cli.SHARD_TIMEOUT.value)


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
  if cli.PROFILE_STEPS.value < 0:
    raise ConfigError("profile_steps", cli.PROFILE_STEPS.value, "must be an integer >= 0")
  return cli.PROFILE_STEPS.value


def _deadline() -> float | None:
  from batchbench.config import ConfigError  # pylint: disable=g-import-not-at-top
  value = cli.DEADLINE.value
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

  if workdir is None and cli.TABLE.value is None:
    raise ConfigError("workdir", workdir, "give a sweep's --workdir, or --table=FILE.csv "
                      "(with --workdir too, the outputs go there)")
  out = fit_command.run_fit(workdir=workdir, table=cli.TABLE.value, deadline_s=_deadline())
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
  return run_compare(cli.BASELINE.value, cli.CANDIDATE.value, alpha=cli.ALPHA.value,
                     threshold=cli.THRESHOLD.value, output=cli.OUTPUT.value,
                     history=cli.HISTORY.value, baseline_runs=cli.BASELINE_RUNS.value,
                     log=print)


@command("history", "trend plots per metric from a --history store, with change points "
         "(a step change sustained over 3+ runs)", flags_=("history",),
         example="batchbench history --history=$HOME/bb_history --workdir=/tmp/trends")
def _history(config, workdir, log) -> int:
  del config, log
  from batchbench.runs.history import run_history  # pylint: disable=g-import-not-at-top
  return run_history(cli.HISTORY.value, workdir, log=print)


@command("nightly", "the fixed nightly suite (configs/nightly.py): throughput points, a "
         "short digits sweep and a probe, compared with the baseline or the history; exit 1 "
         "on a regression", flags_=("baseline", "history", "baseline_runs", "alpha",
                                    "threshold"),
         example="batchbench nightly --config=configs/nightly.py --workdir=/data/nightly/"
                 "tonight --history=$HOME/bb_history")
def _nightly(config, workdir, log) -> int:
  from batchbench.runs.nightly import run_nightly  # pylint: disable=g-import-not-at-top
  return run_nightly(_require_config(config).suite, workdir, baseline=cli.BASELINE.value,
                     history=cli.HISTORY.value, baseline_runs=cli.BASELINE_RUNS.value,
                     alpha=cli.ALPHA.value, threshold=cli.THRESHOLD.value, log=log)


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
                           max_batch=cli.MAX_BATCH.value, measure=cli.PROBE_TIME.value, log=log)
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
  result = decompose.run(config, workdir, mode=cli.MODE.value, global_batch=cli.GLOBAL_BATCH.value,
                         total=cli.TOTAL.value, memory_budget_bytes=_memory_budget_bytes(),
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
      config, workdir, num_images=cli.NUM_IMAGES.value, batch_sizes=cli.BATCH_SIZES.value,
      sampler=cli.SAMPLER.value, sampler_steps=cli.SAMPLER_STEPS.value, seed=cli.SAMPLER_SEED.value,
      checkpoint=cli.CHECKPOINT.value, memory_budget_bytes=_memory_budget_bytes(),
      save_images=cli.SAVE_IMAGES.value, log=log)
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
  log = (lambda _: None) if cli.QUIET.value else (lambda s: print(s, flush=True))
  if not flags.FLAGS["verbosity"].present:  # Orbax and JAX log INFO lines by the dozen
    logging.set_verbosity(logging.WARNING)
  try:
    distributed.initialize(log)
    return COMMANDS[args[0]].run(cli.CONFIG.value, cli.WORKDIR.value, log)
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


def run() -> None:
  """Console-script entry point."""
  argv = sys.argv
  if len(argv) == 1 or any(a in cli.HELP_FLAGS for a in argv[1:]):
    names = [a for a in argv[1:] if a in COMMANDS]
    print(command_help(names[0]) if names else usage())
    sys.exit(0)
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()

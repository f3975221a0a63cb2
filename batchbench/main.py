"""The ``batchbench`` command: an absl app with subcommands. The only reader of flags.

  batchbench trial  --config=configs/digits_mlp.py --workdir=/tmp/bb
  batchbench sweep  --config=configs/digits_mlp.py --workdir=/tmp/sweep
  batchbench report --workdir=/tmp/sweep
  batchbench probe  --config=configs/synthetic_cnn.py --workdir=/tmp/probe --memory_budget=2GiB
  batchbench decompose --config=configs/mnist1d_mlp.py --global_batch=1024 --workdir=/tmp/dec

Invalid input exits with status 2 and one message naming the field, the value and
what is valid, before anything is created in the workdir.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/x.py:key=value,...",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, reports and checkpoints.")
_QUIET = flags.DEFINE_bool("quiet", False, "Print only the final summary.")
_ISOLATION = flags.DEFINE_enum(
    "isolation", "none", ["none", "process"],
    "sweep: run trials in this process, or each in its own process (a native crash or "
    "leaked device memory then ends only that trial).")

COMMANDS: dict[str, tuple[str, object]] = {}


def command(name: str, help_text: str):
  """Registers ``fn(config, workdir, log) -> exit status`` as a subcommand."""
  def wrap(fn):
    COMMANDS[name] = (help_text, fn)
    return fn
  return wrap


def _usage() -> str:
  lines = ["usage: batchbench COMMAND --config=PATH[:ARG] --workdir=DIR [--config.FIELD=VALUE]",
           "", "commands:"]
  lines += [f"  {name:10s} {text}" for name, (text, _) in COMMANDS.items()]
  return "\n".join(lines)


def fail(message: str) -> int:
  print(f"batchbench: error: {message}", file=sys.stderr)
  return 2


def _require_config(config):
  from batchbench.config import ConfigError  # pylint: disable=g-import-not-at-top
  if config is None:
    raise ConfigError("config", None, "pass --config=configs/<name>.py (see configs/)")
  return config


def _with_memory_budget(config):
  """``--memory_budget`` (e.g. 2GiB), when given, sets ``config.memory_budget_bytes``."""
  config = _require_config(config)
  budget = _memory_budget_bytes()
  if budget is not None:
    config.memory_budget_bytes = budget
  return config


def _open_workdir(workdir: str | None, config) -> str:
  """Checks, creates and stamps the workdir (run_meta.json) once the config is valid."""
  import jax  # pylint: disable=g-import-not-at-top

  from batchbench import config as config_lib, results  # pylint: disable=g-import-not-at-top

  workdir = config_lib.check_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    results.write_run_meta(workdir, results.run_metadata(config))
  return workdir


@command("trial", "run one training trial at the config's global_batch")
def _trial(config, workdir, log) -> int:
  import jax  # pylint: disable=g-import-not-at-top

  from batchbench import config as config_lib, results, sweep, trial  # pylint: disable=g-import-not-at-top

  spec = config_lib.resolve(_with_memory_budget(config), jax.local_device_count())
  workdir = _open_workdir(workdir, config)
  row = trial.run_trial(spec, log=log, workdir=sweep.trial_dir(workdir, spec),
                        fallback_to_previous_checkpoint=config.fallback_to_previous_checkpoint)
  if jax.process_index() == 0:
    results.append_row(workdir, row)
  print(f"result appended to {os.path.join(workdir, results.RESULTS_FILE)}")
  return 0


@command("sweep", "run every trial of the config's sweep section, then write the report")
def _sweep(config, workdir, log) -> int:
  import jax  # pylint: disable=g-import-not-at-top

  from batchbench import sweep  # pylint: disable=g-import-not-at-top

  specs = sweep.expand(_with_memory_budget(config), jax.local_device_count())
  workdir = _open_workdir(workdir, config)
  options = sweep.RunOptions(
      config_path=_config_path(),
      fallback_to_previous_checkpoint=config.fallback_to_previous_checkpoint)
  summary = sweep.run_sweep(specs, workdir, isolation=_ISOLATION.value, log=log,
                            options=options)
  counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["statuses"].items())) or "none"
  print(f"sweep: {summary['ran']} trial(s) run ({counts}), {summary['skipped']} already done")
  return _write_report(workdir)


def _write_report(workdir: str) -> int:
  from batchbench import report, results  # pylint: disable=g-import-not-at-top

  rows = results.read_results(workdir)
  paths = report.write_report(workdir, rows)
  print(report.format_table(rows))
  print(report.recommend(rows)["text"])
  print(f"report: {paths.get('report.html') or os.path.join(workdir, 'report')} "
        "(also report.md, summary.csv and the plots beside it)")
  return 0


@command("report", "render the tables, plots and recommendation of a workdir's results")
def _report(config, workdir, log) -> int:
  from batchbench import config as config_lib, results  # pylint: disable=g-import-not-at-top
  del config, log
  from batchbench.config import ConfigError  # pylint: disable=g-import-not-at-top

  workdir = config_lib.check_workdir(workdir)
  if not os.path.exists(os.path.join(workdir, results.RESULTS_FILE)):
    raise ConfigError("workdir", workdir, f"has no {results.RESULTS_FILE}; run a sweep there first")
  return _write_report(workdir)


def _config_path() -> str | None:
  """The config file named by --config (without its ':arg' part), if any."""
  raw = flags.FLAGS["config"].serialize().partition("=")[2]
  path = raw.split(":", 1)[0]
  return os.path.abspath(path) if path and os.path.exists(path) else None


# ----------------------------------------------------- probe and decompose (issue 5)
_MEMORY_BUDGET = flags.DEFINE_string(
    "memory_budget", None,
    "per-device memory budget with a unit, e.g. 2GiB, 512MiB, 1.5GB. probe: the budget to "
    "fit (default: the device memory the runtime reports, minus 10%); decompose: splits "
    "over it are not run; trial, sweep: sets config.memory_budget_bytes (trials whose "
    "compiled peak exceeds it are recorded oom without training).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 2**16,
                                  "probe: the largest global batch to compile.")
_GLOBAL_BATCH = flags.DEFINE_integer(
    "global_batch", None, "decompose: the global batch to split (default: the config's).")
_MODE = flags.DEFINE_string(
    "mode", "train", "decompose: train (split --global_batch into per-device batch x devices "
    "x accumulation steps) or inference (--total examples as batch size x batch count).")
_TOTAL = flags.DEFINE_integer(
    "total", None, "decompose --mode=inference: examples to run through the forward pass.")


def _memory_budget_bytes() -> int | None:
  from batchbench import probe  # pylint: disable=g-import-not-at-top

  text = _MEMORY_BUDGET.value
  return None if text is None else probe.parse_bytes(text, "memory_budget")


@command("probe", "compile the train step at growing batches (no training): the largest "
                  "global batch that fits a memory budget")
def _probe(config, workdir, log) -> int:
  from batchbench import config as config_lib, probe  # pylint: disable=g-import-not-at-top

  config = _require_config(config)
  budget = _memory_budget_bytes()
  workdir = config_lib.check_workdir(workdir)
  result = probe.run_probe(config, workdir, memory_budget_bytes=budget,
                           max_batch=_MAX_BATCH.value, log=log)
  answer = result["answer"]
  print(f"probe: largest global batch within {probe.format_bytes(result['budget_bytes'])} "
        f"per device: {answer['global_batch']:,} (limited by {answer['limited_by']}); "
        f"files in {os.path.join(workdir, probe.PROBE_DIR)}")
  return 0


@command("decompose", "time every split of --global_batch into per-device batch x devices x "
                      "accumulation steps; or --mode=inference --total=N")
def _decompose(config, workdir, log) -> int:
  from batchbench import config as config_lib, decompose  # pylint: disable=g-import-not-at-top

  config = _require_config(config)
  budget = _memory_budget_bytes()
  workdir = config_lib.check_workdir(workdir)
  result = decompose.run(config, workdir, mode=_MODE.value, global_batch=_GLOBAL_BATCH.value,
                         total=_TOTAL.value, memory_budget_bytes=budget, log=log)
  where = os.path.join(workdir, decompose.DECOMPOSE_DIR)
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


def main(argv) -> int:
  from batchbench.config import ConfigError  # pylint: disable=g-import-not-at-top

  args = argv[1:]
  if len(args) != 1 or args[0] not in COMMANDS:
    got = " ".join(args) or "nothing"
    print(f"batchbench: error: expected one command, got {got}\n\n{_usage()}", file=sys.stderr)
    return 2
  _, fn = COMMANDS[args[0]]
  log = (lambda _: None) if _QUIET.value else (lambda s: print(s, flush=True))
  if not flags.FLAGS["verbosity"].present:  # Orbax and JAX log INFO lines by the dozen
    logging.set_verbosity(logging.WARNING)
  try:
    return fn(_CONFIG.value, _WORKDIR.value, log)
  except ConfigError as e:
    return fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    from batchbench import checkpoint, sweep  # pylint: disable=g-import-not-at-top
    if isinstance(e, checkpoint.Preempted):
      print(f"batchbench: {e}", file=sys.stderr)
      return checkpoint.PREEMPTED_EXIT_CODE
    if isinstance(e, checkpoint.CheckpointError):
      print(f"batchbench: error: {e}", file=sys.stderr)
      return sweep.CHECKPOINT_ERROR_EXIT_CODE
    raise


def _flag_error_message(error: Exception) -> str:
  """One line out of a flag-parsing error (ml_collections wraps tracebacks in them)."""
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
    prefix = "unknown --config field " if isinstance(e, (AttributeError, KeyError)) else ""
    print(f"batchbench: error: {prefix}{_flag_error_message(e)}", file=sys.stderr)
    sys.exit(2)
  return args


def run() -> None:
  """Console-script entry point."""
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)


if __name__ == "__main__":
  run()

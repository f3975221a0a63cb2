"""The ``batchbench`` command: an absl app with subcommands. The only reader of flags.

  batchbench trial  --config=configs/digits_mlp.py --workdir=/tmp/bb
  batchbench sweep  --config=configs/digits_mlp.py --workdir=/tmp/sweep
  batchbench report --workdir=/tmp/sweep

Invalid input exits with status 2 and one message naming the field, the value and
what is valid, before anything is created in the workdir.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/x.py:key=value,...",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, reports and checkpoints.")
_QUIET = flags.DEFINE_bool("quiet", False, "Print only the final summary.")

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


@command("trial", "run one training trial at the config's global_batch")
def _trial(config, workdir, log) -> int:
  import jax  # pylint: disable=g-import-not-at-top

  from batchbench import config as config_lib, results, trial  # pylint: disable=g-import-not-at-top

  spec = config_lib.resolve(_require_config(config), jax.local_device_count())
  workdir = config_lib.check_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    results.write_run_meta(workdir, results.run_metadata(config))
  row = trial.run_trial(spec, log=log)
  if jax.process_index() == 0:
    results.append_row(workdir, row)
  print(f"result appended to {os.path.join(workdir, results.RESULTS_FILE)}")
  return 0


def main(argv) -> int:
  from batchbench.config import ConfigError  # pylint: disable=g-import-not-at-top

  args = argv[1:]
  if len(args) != 1 or args[0] not in COMMANDS:
    got = " ".join(args) or "nothing"
    print(f"batchbench: error: expected one command, got {got}\n\n{_usage()}", file=sys.stderr)
    return 2
  _, fn = COMMANDS[args[0]]
  log = (lambda _: None) if _QUIET.value else (lambda s: print(s, flush=True))
  try:
    return fn(_CONFIG.value, _WORKDIR.value, log)
  except ConfigError as e:
    return fail(str(e))


def run() -> None:
  """Console-script entry point."""
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()

"""The command line's plumbing: its flags (absl, one definition each), the command
registry with its help texts, and flag parsing with errors as exit status 2.

``batchbench.main`` defines the commands. The multi-process flags live with their code
in ``batchbench.core.distributed``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/x.py:key=value,...",
    lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, reports and checkpoints.")
QUIET = flags.DEFINE_bool("quiet", False, "Print only the final summary.")
ISOLATION = flags.DEFINE_enum(
    "isolation", "none", ["none", "process"],
    "Run trials in this process, or each in its own process (a native crash or leaked "
    "device memory then ends only that trial).")
CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "JAX persistent compilation cache directory. With --isolation=process it defaults to "
    "<workdir>/xla_cache, so every trial of a batch loads the program the first compiled.")
MEMORY_BUDGET = flags.DEFINE_string(
    "memory_budget", None,
    "Per-device memory budget with a unit, e.g. 2GiB, 512MiB, 1.5GB. probe: the budget to "
    "fit (default: the device memory the runtime reports, minus 10%); decompose: splits "
    "over it are not run; trial, sweep: trials whose compiled peak exceeds it are recorded "
    "oom without training.")
MAX_BATCH = flags.DEFINE_integer("max_batch", 2**16, "The largest global batch to compile.")
PROBE_TIME = flags.DEFINE_bool(
    "probe_time", True, "probe: also run every batch that fits for a short timing (1 "
    "warm-up call, 3+ windows, 0.5 s to 5 s of timed work) for samples/s, TFLOP/s per "
    "device and MFU, and on GPU/TPU the answer's measured device peak; --noprobe_time "
    "only compiles.")
GLOBAL_BATCH = flags.DEFINE_integer(
    "global_batch", None, "The global batch to split (default: the config's).")
MODE = flags.DEFINE_string(
    "mode", "train", "train (split --global_batch into per-device batch x devices x "
    "accumulation steps) or inference (--total examples as batch size x batch count).")
TOTAL = flags.DEFINE_integer("total", None,
                              "--mode=inference: examples to run through the forward pass.")
TABLE = flags.DEFINE_string(
    "table", None, "fit: a CSV with a column 'batch' and one of 'steps', 'examples' or "
    "'epochs' (repeated batches are several runs), e.g. a published table, instead of a "
    "sweep's --workdir.")
BASELINE = flags.DEFINE_string(
    "baseline", None, "compare: the baseline: a workdir, or its throughput.jsonl / "
    "results.jsonl. Without it, --history's last --baseline_runs runs.")
CANDIDATE = flags.DEFINE_string(
    "candidate", None, "compare: the candidate: a workdir, or its throughput.jsonl / "
    "results.jsonl.")
ALPHA = flags.DEFINE_float(
    "alpha", 0.01, "compare: significance level of the two-sided Mann-Whitney U test on "
    "per-window figures.")
THRESHOLD = flags.DEFINE_string(
    "threshold", "0.05", "compare: smallest relative median change that counts: one "
    "fraction, or METRIC=FRACTION,... for samples_per_sec, step_time_ms, time_to_target_s.")
OUTPUT = flags.DEFINE_string("output", None,
                              "compare: also write the report here (.json or .md).")
HISTORY = flags.DEFINE_string(
    "history", None, "compare: history directory (SQLite); the candidate is appended, and "
    "without --baseline it is the baseline. history: the store to render.")
BASELINE_RUNS = flags.DEFINE_integer(
    "baseline_runs", 1, "compare --history: the baseline is the median of this many last "
    "runs.")
PROFILE_STEPS = flags.DEFINE_integer(
    "profile_steps", 0, "trial, sweep: trace this many steady-state steps of each trial "
    "with jax.profiler into <workdir>/trials/<trial_id>/profile (TensorBoard's profile "
    "plugin or Perfetto); left out of the timed windows.")
TENSORBOARD = flags.DEFINE_bool(
    "tensorboard", False, "trial, sweep: TensorBoard event files in "
    "<workdir>/tensorboard/<trial_id> (tensorboard --logdir <workdir>/tensorboard).")
MLLOG = flags.DEFINE_bool("mllog", False, "trial, sweep: ':::MLLOG {json}' lines in "
                           "<workdir>/mllog/<trial_id>.log.")
NUM_IMAGES = flags.DEFINE_integer("num_images", 64,
                                   "generate: N, the images to make at every batch size.")
BATCH_SIZES = flags.DEFINE_string(
    "batch_sizes", None, "generate: batch sizes, a list '1,2,4,8' or a power-of-two range "
    "'1:64' (default: 1, 2, 4, ... up to --num_images); each runs ceil(N / size) batches.")
SAMPLER = flags.DEFINE_string(
    "sampler", "ddim", "generate: ddim (deterministic given the initial noise) or ddpm "
    "(ancestral: fresh noise every step).")
SAMPLER_STEPS = flags.DEFINE_integer(
    "sampler_steps", 50, "generate: network evaluations per image (at most the model's "
    "training timesteps, workload_options.num_timesteps).")
SAMPLER_SEED = flags.DEFINE_integer(
    "sampler_seed", 0, "generate: image i's noise is keyed by (sampler_seed, i), so image i "
    "is the same at every batch size.")
CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "generate: a trial directory (<workdir>/trials/<trial_id>) to take "
    "the trained model from; default: the config's trial in --workdir, trained first if "
    "needed.")
SAVE_IMAGES = flags.DEFINE_bool(
    "save_images", False, "generate: write <workdir>/generate/images_b{size}.npy, the N "
    "images of each batch size.")
SHARD = flags.DEFINE_string(
    "shard", None, "sweep: I/N runs slice I of N (0-based, I in 0..N-1, e.g. "
    "${SLURM_ARRAY_TASK_ID}/N) of the trials, chosen by a hash of each trial's id; N "
    "shards on one shared --workdir together run the whole sweep (see docs/shard.md).")
SHARD_TIMEOUT = flags.DEFINE_float(
    "shard_timeout", 6 * 3600.0, "sweep --shard: seconds a shard waits for other shards' "
    "rows (an LR-search round needs all of them) with no new row arriving before it gives "
    "up with exit status 4; set it above the longest trial.")
DEADLINE = flags.DEFINE_float(
    "deadline", None, "fit, report, sweep: seconds of training; also recommend the batch "
    "with the fewest device-seconds that reaches the target within them.")


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


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with errors (bad --config file, arg or override) as exit 2.

  absl would print "FATAL Flags parsing error" and a traceback and exit 1; a config
  error is the user's input, so it gets one line and the same status as ``resolve``'s.
  """
  try:
    args = flags.FLAGS(argv)
    if CONFIG.value is not None:
      CONFIG.value.keys()  # a config file that failed to load raises only when read
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    prefix = "unknown --config field: " if isinstance(e, (AttributeError, KeyError)) else ""
    print(f"batchbench: error: {prefix}{_flag_error_message(e)}", file=sys.stderr)
    sys.exit(2)
  return args


HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort", "-?")

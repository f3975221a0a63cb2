#!/usr/bin/env bash
# Writes an sbatch script that runs one batchbench command on SLURM GPU nodes, and submits it.
#
#   scripts/launch_slurm.sh [OPTIONS] -- COMMAND [BATCHBENCH ARGS...]
#   scripts/launch_slurm.sh --nodes=2 --partition=gpu -- \
#     sweep --config=configs/digits_mlp.py --workdir=/shared/runs/run1
#   scripts/launch_slurm.sh --array=4 -- sweep --config=configs/digits_mlp.py --workdir=/shared/r2
#
# The job runs `srun --ntasks-per-node=T VENV/bin/python -m batchbench ARGS...` from the
# directory this launcher was started in (so relative paths mean what they mean here; the
# SLURM log files land there too). No coordinator flags are added: jax.distributed.initialize()
# reads SLURM_* variables (job id, node list, task count, task id) by itself.
#
# Expects: srun; nodes with NVIDIA drivers; this checkout and VENV (made with
# pip install -e ".[cuda]") on a filesystem every node sees, and --workdir on one too. sbatch
# passes the submitting shell's environment to the job, so `module load ...` before launching.
#
# The script is written to ${TMPDIR:-/tmp}/batchbench-XXXXXX.sbatch and kept (also with
# --dry_run, so that the printed sbatch line submits exactly what was printed).
#
# Options (values only in the --opt=VALUE form):
#   --nodes=N                  nodes per job (default 1)
#   --gpus_per_node=G          GPUs to request per node (default 8)
#   --processes=per_gpu        one process per GPU, each using one GPU (default)
#   --processes=per_node       one process per node, using all its G GPUs
#   --time=HH:MM:SS            time limit (default 01:00:00)
#   --partition=P              partition (default: the cluster's default)
#   --account=A                account to charge (default: yours)
#   --venv=PATH                virtualenv with batchbench (default: .venv of this checkout)
#   --array=N                  job array of N tasks for a split sweep: task i runs
#                              `sweep ... --shard=i/N` (each task is its own --nodes-node job)
#   --job_name=NAME            job name (default batchbench)
#   --output=PATTERN           log file (default %x-%j.out, %x-%A_%a.out with --array)
#   --dry_run                  print the script and the sbatch line; submit nothing
#   -h, --help                 this text
set -euo pipefail

PROG=$(basename "$0")
REPO=$(cd "$(dirname "$0")/.." && pwd)
OPTIONS="[--nodes=N] [--gpus_per_node=G] [--processes=per_gpu|per_node] [--time=HH:MM:SS]"
OPTIONS+=" [--partition=P] [--account=A] [--venv=PATH] [--array=N] [--job_name=NAME]"
OPTIONS+=" [--output=PATTERN] [--dry_run] -- COMMAND [ARGS...]"

die() {  # die STATUS MESSAGE: one line on stderr
  echo "$PROG: error: $2" >&2
  exit "$1"
}

# quote WORD: WORD as one POSIX shell word (bare when safe, else single-quoted).
quote() {
  local sq="'\\''"
  case $1 in
    '') printf "''" ;;
    *[!A-Za-z0-9_./:=@%+,-]*) printf "'%s'" "${1//\'/$sq}" ;;
    *) printf '%s' "$1" ;;
  esac
}

# word WORD: quote WORD, but a --opt=VALUE word as --opt='VALUE' (same word, easier to read).
word() {
  local name=${1%%=*}
  case $1 in
    --*=*) case $name in
      *[!A-Za-z0-9_.-]*) quote "$1" ;;
      *) printf '%s=' "$name"; quote "${1#*=}" ;;
    esac ;;
    *) quote "$1" ;;
  esac
}

need_value() {  # need_value OPTION VALUE HINT
  [ -n "$2" ] || die 2 "$1 needs a value: $1=$3"
}
need_count() {  # need_count OPTION VALUE: a positive integer
  case $2 in
    '' | *[!0-9]* | 0*) die 2 "$1 must be a positive integer, got '$2'" ;;
  esac
}
need_word() {  # need_word OPTION VALUE: nothing an #SBATCH line could split or mangle
  case $2 in
    *[[:space:]\'\"\\]*) die 2 "$1 must not contain spaces, quotes or backslashes, got '$2'" ;;
  esac
}

nodes=1 gpus=8 processes=per_gpu time_limit=01:00:00 partition="" account=""
venv="$REPO/.venv" array="" job_name=batchbench output="" dry_run=0
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --nodes=*) nodes=${1#*=}; need_count --nodes "$nodes" ;;
    --gpus_per_node=*) gpus=${1#*=}; need_count --gpus_per_node "$gpus" ;;
    --processes=*) processes=${1#*=}
      case $processes in
        per_gpu | per_node) ;;
        *) die 2 "--processes must be per_gpu or per_node, got '$processes'" ;;
      esac ;;
    --time=*) time_limit=${1#*=}
      [[ $time_limit =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$ ]] ||
        die 2 "--time must be HH:MM:SS (or MM, D-HH:MM:SS ...), got '$time_limit'" ;;
    --partition=*) partition=${1#*=}; need_value --partition "$partition" P
      need_word --partition "$partition" ;;
    --account=*) account=${1#*=}; need_value --account "$account" A
      need_word --account "$account" ;;
    --venv=*) venv=${1#*=}; need_value --venv "$venv" PATH ;;
    --array=*) array=${1#*=}; need_count --array "$array" ;;
    --job_name=*) job_name=${1#*=}; need_value --job_name "$job_name" NAME
      need_word --job_name "$job_name" ;;
    --output=*) output=${1#*=}; need_value --output "$output" PATTERN
      need_word --output "$output" ;;
    --nodes | --gpus_per_node | --processes | --time | --partition | --account | --venv | \
      --array | --job_name | --output)
      die 2 "$1 needs a value in the $1=VALUE form; valid options: $OPTIONS" ;;
    --dry_run) dry_run=1 ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    --) shift; args=("$@"); break ;;
    -*) die 2 "unknown option $1; valid options: $OPTIONS" ;;
    *) die 2 "unexpected argument '$1': put the batchbench command after --, e.g. -- sweep ..." ;;
  esac
  shift
done

[ ${#args[@]} -gt 0 ] || die 2 "no batchbench command after --; e.g. -- sweep --config=configs/digits_mlp.py --workdir=/shared/run1"
case ${args[0]} in
  -*) die 2 "no batchbench command after -- (got option ${args[0]}); e.g. -- sweep --config=..." ;;
esac
if [ -n "$array" ]; then
  [ "${args[0]}" = sweep ] ||
    die 2 "--array splits a sweep into --shard=i/N slices; the command must be sweep, got '${args[0]}'"
  for a in "${args[@]}"; do
    case $a in --shard | --shard=*) die 2 "--array sets --shard itself; drop $a" ;; esac
  done
fi
case $venv in /*) ;; *) venv="$PWD/$venv" ;; esac

if [ "$processes" = per_gpu ]; then tasks=$gpus; else tasks=1; fi
if [ -z "$output" ]; then
  if [ -n "$array" ]; then output='%x-%A_%a.out'; else output='%x-%j.out'; fi
fi

bb_words=""
for a in "${args[@]}"; do
  bb_words+=" $(word "$a")"
done
# In double quotes: SLURM_ARRAY_TASK_ID is expanded in each array task.
[ -z "$array" ] || bb_words+=" \"--shard=\${SLURM_ARRAY_TASK_ID}/$array\""

script=$(
  echo '#!/usr/bin/env bash'
  echo "# Generated by scripts/launch_slurm.sh from $(quote "$REPO")."
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=$tasks"
  echo "#SBATCH --gres=gpu:$gpus"
  echo "#SBATCH --time=$time_limit"
  [ -z "$partition" ] || echo "#SBATCH --partition=$partition"
  [ -z "$account" ] || echo "#SBATCH --account=$account"
  [ -z "$array" ] || echo "#SBATCH --array=0-$((array - 1))"
  echo "#SBATCH --output=$output"
  case $PWD in *[[:space:]\'\"\\]*) ;; *) echo "#SBATCH --chdir=$PWD" ;; esac
  echo 'set -euo pipefail'
  echo "cd $(quote "$PWD")"
  echo "VENV=$(quote "$venv")"
  # shellcheck disable=SC2016  # expanded when the job runs
  echo '[ -x "$VENV/bin/python" ] || { echo "no $VENV/bin/python on $(hostname)" >&2; exit 1; }'
  if [ "$processes" = per_gpu ]; then
    echo "# per_gpu: $tasks tasks per node, each given all the node's GPUs (srun's default);"
    echo "# jax.distributed.initialize() then makes task SLURM_LOCALID use GPU SLURM_LOCALID"
    echo "# alone. The other GPUs stay visible, so CUDA peer access (NVLink) between the"
    echo "# processes works; srun --gpus-per-task=1 could hide them, and break JAX's choice."
    echo 'unset JAX_LOCAL_DEVICE_IDS'
  else
    echo "# per_node: one task per node using all $gpus GPUs. Without this, jax.distributed's"
    echo "# SLURM default (one GPU per task, number SLURM_LOCALID) would leave it only GPU 0."
    ids=0
    for ((i = 1; i < gpus; i++)); do ids+=",$i"; done
    echo "export JAX_LOCAL_DEVICE_IDS=$ids"
  fi
  echo "srun --nodes=$nodes --ntasks-per-node=$tasks --kill-on-bad-exit=1 \\"
  echo "  \"\$VENV/bin/python\" -m batchbench$bb_words"
)

file=$(mktemp "${TMPDIR:-/tmp}/batchbench-XXXXXX.sbatch")
printf '%s\n' "$script" > "$file"
if [ "$dry_run" = 1 ]; then
  printf '%s\n' "$script"
  echo "sbatch $(quote "$file")"
  exit 0
fi
[ -x "$venv/bin/python" ] || echo "$PROG: warning: no $venv/bin/python here; the job needs it" >&2
command -v sbatch >/dev/null 2>&1 || die 1 "sbatch not found on PATH (run this on a SLURM login node)"
echo "$PROG: wrote $file" >&2
exec sbatch "$file"

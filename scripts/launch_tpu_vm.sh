#!/usr/bin/env bash
# Runs one batchbench command on every worker of a Cloud TPU VM (single host or pod slice).
#
#   scripts/launch_tpu_vm.sh --tpu=NAME --zone=ZONE [OPTIONS] -- COMMAND [BATCHBENCH ARGS...]
#   scripts/launch_tpu_vm.sh --tpu=my-v4-32 --zone=us-central2-b -- \
#     sweep --config=configs/digits_mlp.py --workdir=/mnt/bucket/run1
#
# It composes ONE `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...` whose remote
# command, on each worker at the same time: clones the repo into DIR (or fetches it there) and
# checks out REF; with --install creates DIR/.venv if missing and runs
# `pip install -e ".[tpu]"` in it; then runs `.venv/bin/python -m batchbench ARGS...` from DIR.
#
# No --coordinator_address/--num_processes/--process_id flags are added: on a TPU VM,
# jax.distributed.initialize() finds the coordinator, the process count and this worker's id
# from the TPU metadata server by itself. Pass any of them after `--` to override.
#
# The --workdir must be an absolute path every worker sees (each worker has its own disk): a
# Cloud Storage bucket mounted with gcsfuse at the same path on all workers, or NFS/Filestore.
# Relative paths in ARGS (--config=configs/...) are relative to the checkout in REMOTE_DIR.
#
# Options (values only in the --opt=VALUE form):
#   --tpu=NAME          TPU VM name (required)
#   --zone=ZONE         its zone (required)
#   --project=P         GCP project (default: gcloud's configured project)
#   --repo_url=URL      repo each worker clones (default: `git remote get-url origin` here)
#   --branch=REF        branch, tag or commit to check out (default: this checkout's HEAD commit)
#   --dir=REMOTE_DIR    checkout location on the workers (default: ~/batchbench)
#   --python=PYTHON     interpreter that creates DIR/.venv, 3.11+ (default: python3)
#   --install           create/update DIR/.venv with pip install -e ".[tpu]" (default)
#   --no_install        skip it (DIR/.venv must exist from an earlier --install run)
#   --dry_run           print the command instead of running it, exit 0
#   -h, --help          this text
set -euo pipefail

PROG=$(basename "$0")
REPO=$(cd "$(dirname "$0")/.." && pwd)
OPTIONS="--tpu=NAME --zone=ZONE [--project=P] [--repo_url=URL] [--branch=REF] [--dir=REMOTE_DIR]"
OPTIONS+=" [--python=PYTHON] [--install|--no_install] [--dry_run] -- COMMAND [ARGS...]"

die() {  # die STATUS MESSAGE: one line on stderr
  echo "$PROG: error: $2" >&2
  exit "$1"
}

# quote WORD: WORD as one POSIX shell word (bare when safe, else single-quoted). POSIX rather
# than printf %q, whose $'...' form only bash reads, and the remote login shell may be sh.
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

# print_cmd WORD...: the command on one line, each word quoted so that pasting it runs it.
print_cmd() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(word "$w")"
  done
  printf '%s\n' "$out"
}

need_value() {  # need_value OPTION VALUE HINT
  [ -n "$2" ] || die 2 "$1 needs a value: $1=$3"
}

# shellcheck disable=SC2088  # the tilde is for the remote shell to expand
tpu="" zone="" project="" repo_url="" branch="" dir="~/batchbench" python="python3"
install=1 dry_run=0
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --tpu=*) tpu=${1#*=}; need_value --tpu "$tpu" NAME ;;
    --zone=*) zone=${1#*=}; need_value --zone "$zone" ZONE ;;
    --project=*) project=${1#*=}; need_value --project "$project" P ;;
    --repo_url=*) repo_url=${1#*=}; need_value --repo_url "$repo_url" URL ;;
    --branch=*) branch=${1#*=}; need_value --branch "$branch" REF ;;
    --dir=*) dir=${1#*=}; need_value --dir "$dir" REMOTE_DIR ;;
    --python=*) python=${1#*=}; need_value --python "$python" PYTHON ;;
    --tpu | --zone | --project | --repo_url | --branch | --dir | --python)
      die 2 "$1 needs a value in the $1=VALUE form; valid options: $OPTIONS" ;;
    --install) install=1 ;;
    --no_install) install=0 ;;
    --dry_run) dry_run=1 ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
    --) shift; args=("$@"); break ;;
    -*) die 2 "unknown option $1; valid options: $OPTIONS" ;;
    *) die 2 "unexpected argument '$1': put the batchbench command after --, e.g. -- sweep ..." ;;
  esac
  shift
done

[ -n "$tpu" ] || die 2 "missing --tpu=NAME (the TPU VM name); usage: $PROG $OPTIONS"
[ -n "$zone" ] || die 2 "missing --zone=ZONE (the TPU VM's zone); usage: $PROG $OPTIONS"
[ ${#args[@]} -gt 0 ] || die 2 "no batchbench command after --; e.g. -- sweep --config=configs/digits_mlp.py --workdir=/mnt/bb/run1"
case ${args[0]} in
  -*) die 2 "no batchbench command after -- (got option ${args[0]}); e.g. -- sweep --config=..." ;;
esac

if [ -z "$repo_url" ]; then
  repo_url=$(git -C "$REPO" remote get-url origin 2>/dev/null) ||
    die 2 "missing --repo_url=URL: $REPO has no 'origin' remote to default to"
fi
if [ -z "$branch" ]; then
  branch=$(git -C "$REPO" rev-parse --verify -q HEAD 2>/dev/null) ||
    die 2 "missing --branch=REF: $REPO has no commit to default to"
  if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    echo "$PROG: warning: uncommitted changes in $REPO are not sent; workers check out $branch" >&2
  fi
  if [ -z "$(git -C "$REPO" branch -r --contains "$branch" 2>/dev/null)" ]; then
    echo "$PROG: warning: $branch is on no remote-tracking branch; push it or pass --branch" >&2
  fi
fi

# The remote command: POSIX sh, one line. D=~/... keeps the tilde unquoted so it expands there.
# shellcheck disable=SC2088  # the tilde is for the remote shell to expand
case $dir in
  '~') d_word='~' ;;
  '~/'*) d_word="~/$(quote "${dir#\~/}")" ;;
  *) d_word=$(quote "$dir") ;;
esac
url_q=$(quote "$repo_url")
ref_q=$(quote "$branch")
remote="set -e; D=$d_word"
remote+="; if [ -d \"\$D/.git\" ]; then cd \"\$D\"; git remote set-url origin $url_q"
remote+="; else git clone -q $url_q \"\$D\"; cd \"\$D\"; fi"
remote+="; if git fetch -q origin $ref_q 2>/dev/null; then git checkout -q --detach FETCH_HEAD"
remote+="; else git fetch -q origin; git checkout -q --detach $ref_q; fi"
if [ "$install" = 1 ]; then
  remote+="; [ -x .venv/bin/python ] || $(quote "$python") -m venv .venv"
  remote+="; .venv/bin/python -m pip install -q -e \".[tpu]\""
else
  remote+="; [ -x .venv/bin/python ] || { echo \"no \$D/.venv: run once with --install\" >&2; exit 1; }"
fi
remote+="; exec .venv/bin/python -m batchbench"
for a in "${args[@]}"; do
  remote+=" $(word "$a")"
done

cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
[ -z "$project" ] || cmd+=("--project=$project")
cmd+=(--worker=all "--command=$remote")

if [ "$dry_run" = 1 ]; then
  print_cmd "${cmd[@]}"
  exit 0
fi
command -v gcloud >/dev/null 2>&1 || die 1 "gcloud not found on PATH (install the Google Cloud SDK)"
exec "${cmd[@]}"

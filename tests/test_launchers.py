"""scripts/launch_tpu_vm.sh and scripts/launch_slurm.sh, through --dry_run.

Neither gcloud nor sbatch/srun is needed: the printed commands are parsed, and also run
against small fakes (gcloud, git, srun, python) that record their argv, so that every level
of shell quoting is checked end to end: local argv -> printed line -> remote shell -> argv.
"""

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
TPU = REPO / "scripts" / "launch_tpu_vm.sh"
SLURM = REPO / "scripts" / "launch_slurm.sh"

# Arguments that only survive correct quoting: spaces, both quote characters, $, `, ~, *.
ARGS = [
  "sweep", "--config=configs/digits_mlp.py", "--workdir=/mnt/my bucket/run 1",
  "--config.note=it's a \"test\" $HOME `id` ~ *", "",
]
TPU_BASE = ["--tpu=my-tpu", "--zone=us-central2-b", "--repo_url=https://example.com/bb.git",
            "--branch=abc123"]

RECORDER = """#!/bin/sh
{ printf '%s\\0' "$0" "$@"; printf '\\036'; } >> "$FAKE_LOG"
"""
FAKE_GIT = RECORDER + """\
if [ "$1" = clone ]; then for last; do :; done; mkdir -p "$last/.git"; fi
"""
FAKE_PYTHON = RECORDER + """\
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; fi
"""


def run(script, *args, env=None, cwd=None):
  return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                        env=env, cwd=cwd, timeout=30, check=False)


def make_fakes(tmp_path):
  """A bin/ folder with recording gcloud, git, srun, and a recording python."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in [("gcloud", RECORDER), ("srun", RECORDER), ("git", FAKE_GIT),
                     ("fakepython", FAKE_PYTHON)]:
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return bin_dir


def fake_env(tmp_path, bin_dir, log, **extra):
  env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path / "home"),
         "FAKE_LOG": str(log), "TMPDIR": str(tmp_path)}
  env.update(extra)
  return env


def calls(log):
  """The recorded calls, each [argv0, args...], in order; the log is then emptied."""
  if not log.exists():
    return []
  records = log.read_bytes().decode().split("\x1e")[:-1]
  log.unlink()
  return [r.split("\0")[:-1] for r in records]


def check_usage_error(result, option):
  assert result.returncode == 2, result
  assert result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert "error" in lines[0] and option in lines[0], lines[0]


# ---------------------------------------------------------------- both scripts


@pytest.mark.parametrize("script", [TPU, SLURM], ids=["tpu", "slurm"])
def test_scripts_parse_and_lint(script):
  assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
  assert script.read_text().startswith("#!/usr/bin/env bash\n")
  assert "set -euo pipefail" in script.read_text()
  if shutil.which("shellcheck"):
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", [TPU, SLURM], ids=["tpu", "slurm"])
def test_help(script):
  result = run(script, "--help")
  assert result.returncode == 0
  assert "--dry_run" in result.stdout and "Options" in result.stdout


# ---------------------------------------------------------------- TPU VM


def tpu_dry_run(*options, args=ARGS, **kwargs):
  result = run(TPU, *TPU_BASE, *options, "--dry_run", "--", *args, **kwargs)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 1, result.stdout
  return lines[0]


def remote_command(line):
  words = shlex.split(line)
  commands = [w for w in words if w.startswith("--command=")]
  assert len(commands) == 1
  return words, commands[0].removeprefix("--command=")


def test_tpu_dry_run_composes_one_gcloud_ssh():
  words, command = remote_command(tpu_dry_run("--project=my-proj"))
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "--zone=us-central2-b" in words and "--project=my-proj" in words
  assert "--worker=all" in words
  assert "git clone -q https://example.com/bb.git" in command
  assert 'pip install -q -e ".[tpu]"' in command
  assert "--coordinator_address" not in command
  # The batchbench invocation ends the remote command, its arguments intact.
  tail = shlex.split(command.rsplit("; ", 1)[1])
  assert tail == ["exec", ".venv/bin/python", "-m", "batchbench", *ARGS]


def test_tpu_no_project_and_no_install():
  words, command = remote_command(tpu_dry_run("--no_install"))
  assert not any(w.startswith("--project") for w in words)
  assert "pip install" not in command and "-m venv" not in command
  _, command = remote_command(tpu_dry_run("--no_install", "--install"))
  assert 'pip install -q -e ".[tpu]"' in command


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_tpu_round_trip_through_gcloud_and_remote_shell(tmp_path, shell):
  """Runs the printed line with a fake gcloud, then its --command in a fake worker's shell."""
  bin_dir = make_fakes(tmp_path)
  log = tmp_path / "log"
  env = fake_env(tmp_path, bin_dir, log)
  (tmp_path / "home").mkdir()
  line = tpu_dry_run("--dir=~/bench dir", f"--python={bin_dir / 'fakepython'}")
  subprocess.run(["bash", "-c", line], env=env, check=True, timeout=30)
  (gcloud_call,) = calls(log)
  assert gcloud_call[0].endswith("gcloud") and gcloud_call[1:] == shlex.split(line)[1:]
  command = remote_command(line)[1]

  # First run on a fresh worker: clone, check out, create the venv, install, run.
  subprocess.run([shell, "-c", command], env=env, check=True, timeout=30)
  checkout = tmp_path / "home" / "bench dir"
  recorded = [c[1:] for c in calls(log)]
  assert recorded == [
    ["clone", "-q", "https://example.com/bb.git", str(checkout)],
    ["fetch", "-q", "origin", "abc123"],
    ["checkout", "-q", "--detach", "FETCH_HEAD"],
    ["-m", "venv", ".venv"],
    ["-m", "pip", "install", "-q", "-e", ".[tpu]"],
    ["-m", "batchbench", *ARGS],
  ]
  assert (checkout / ".venv" / "bin" / "python").exists()

  # Second run, --no_install: the existing checkout is updated, nothing installed.
  line = tpu_dry_run("--dir=~/bench dir", "--no_install")
  subprocess.run([shell, "-c", remote_command(line)[1]], env=env, check=True, timeout=30)
  recorded = calls(log)
  assert [c[1:] for c in recorded] == [
    ["remote", "set-url", "origin", "https://example.com/bb.git"],
    ["fetch", "-q", "origin", "abc123"],
    ["checkout", "-q", "--detach", "FETCH_HEAD"],
    ["-m", "batchbench", *ARGS],
  ]
  assert recorded[-1][0].endswith(".venv/bin/python")


def test_tpu_no_install_without_venv_fails_on_the_worker(tmp_path):
  bin_dir = make_fakes(tmp_path)
  log = tmp_path / "log"
  (tmp_path / "home").mkdir()
  line = tpu_dry_run("--no_install", "--dir=/nonexistent-ok", args=["trial"])
  command = remote_command(line)[1].replace("/nonexistent-ok", str(tmp_path / "w"))
  result = subprocess.run(["sh", "-c", command], env=fake_env(tmp_path, bin_dir, log),
                          capture_output=True, text=True, timeout=30, check=False)
  assert result.returncode == 1 and "--install" in result.stderr
  assert all(c[1] != "-m" for c in calls(log))


def test_tpu_defaults_come_from_the_checkout(tmp_path):
  """--repo_url and --branch default to origin and HEAD of the checkout holding the script."""
  checkout = tmp_path / "checkout"
  (checkout / "scripts").mkdir(parents=True)
  shutil.copy(TPU, checkout / "scripts")
  git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@example.com"]
  subprocess.run([*git, "init", "-q"], check=True)
  subprocess.run([*git, "add", "."], check=True)
  subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
  script = checkout / "scripts" / TPU.name
  base = ["--tpu=t", "--zone=z", "--dry_run", "--", "trial"]
  check_usage_error(run(script, *base), "--repo_url")
  subprocess.run([*git, "remote", "add", "origin", "https://example.com/o.git"], check=True)
  head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                        check=True).stdout.strip()
  result = run(script, *base)
  assert result.returncode == 0, result.stderr
  command = remote_command(result.stdout)[1]
  assert "git clone -q https://example.com/o.git" in command
  assert f"git fetch -q origin {head}" in command
  assert "no remote-tracking branch" in result.stderr  # never pushed: warned, not fatal


@pytest.mark.parametrize("options, option", [
  (["--zone=z"], "--tpu"),
  (["--tpu=t"], "--zone"),
  (["--tpu=", "--zone=z"], "--tpu"),
  (["--tpu", "t", "--zone=z"], "--tpu"),
  (["--tpu=t", "--zone=z", "--workers=all"], "--workers"),
  (["--tpu=t", "--zone=z", "sweep"], "sweep"),
])
def test_tpu_usage_errors(options, option):
  check_usage_error(run(TPU, *options, "--dry_run", "--", "sweep"), option)


@pytest.mark.parametrize("tail", [[], ["--"], ["--", "--workdir=x"]])
def test_tpu_needs_a_batchbench_command(tail):
  check_usage_error(run(TPU, *TPU_BASE, "--dry_run", *tail), "after --")


# ---------------------------------------------------------------- SLURM


def slurm_dry_run(tmp_path, *options, args=ARGS):
  result = run(SLURM, *options, "--dry_run", "--", *args,
               env={**os.environ, "TMPDIR": str(tmp_path)}, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  script, sbatch = result.stdout.rstrip("\n").rsplit("\n", 1)
  words = shlex.split(sbatch)
  assert words[0] == "sbatch" and len(words) == 2
  # The printed sbatch line submits exactly the printed script.
  assert pathlib.Path(words[1]).read_text() == script + "\n"
  assert pathlib.Path(words[1]).parent == tmp_path
  return script


def sbatch_lines(script):
  return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def srun_words(script):
  srun = script[script.index("\nsrun ") + 1:].replace("\\\n", " ")
  return shlex.split(srun)


def test_slurm_per_gpu(tmp_path):
  script = slurm_dry_run(tmp_path, "--nodes=2", "--partition=gpu", "--account=acct",
                         "--time=02:30:00", "--job_name=bb1")
  assert script.startswith("#!/usr/bin/env bash\n")
  assert sbatch_lines(script) == [
    "#SBATCH --job-name=bb1", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
    "#SBATCH --gres=gpu:8", "#SBATCH --time=02:30:00", "#SBATCH --partition=gpu",
    "#SBATCH --account=acct", "#SBATCH --output=%x-%j.out", f"#SBATCH --chdir={tmp_path}",
  ]
  words = srun_words(script)
  assert words[:4] == ["srun", "--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=1"]
  assert words[4:] == ["$VENV/bin/python", "-m", "batchbench", *ARGS]
  assert f"VENV={REPO / '.venv'}" in script
  assert "unset JAX_LOCAL_DEVICE_IDS" in script
  assert "--coordinator_address" not in script and "--array" not in script


def test_slurm_per_node_uses_all_gpus(tmp_path):
  script = slurm_dry_run(tmp_path, "--processes=per_node", "--gpus_per_node=4")
  assert "#SBATCH --ntasks-per-node=1" in sbatch_lines(script)
  assert "#SBATCH --gres=gpu:4" in sbatch_lines(script)
  assert "#SBATCH --nodes=1" in sbatch_lines(script)
  assert "--ntasks-per-node=1" in srun_words(script)
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in script.splitlines()


def test_slurm_array_splits_a_sweep(tmp_path):
  script = slurm_dry_run(tmp_path, "--array=4", "--output=logs/%A-%a.txt")
  assert "#SBATCH --array=0-3" in sbatch_lines(script)
  assert "#SBATCH --output=logs/%A-%a.txt" in sbatch_lines(script)
  assert "--shard=${SLURM_ARRAY_TASK_ID}/4" in script
  assert srun_words(script)[-1] == "--shard=${SLURM_ARRAY_TASK_ID}/4"
  default_output = slurm_dry_run(tmp_path, "--array=2")
  assert "#SBATCH --output=%x-%A_%a.out" in sbatch_lines(default_output)


@pytest.mark.parametrize("processes, tasks, device_ids", [
  ("per_gpu", "8", None), ("per_node", "1", "0,1,2,3,4,5,6,7")])
def test_slurm_script_runs_srun_with_intact_args(tmp_path, processes, tasks, device_ids):
  """Runs the generated script with a fake srun: what srun gets, in the job's environment."""
  bin_dir = make_fakes(tmp_path)
  log = tmp_path / "log"
  venv = tmp_path / "my venv"
  (venv / "bin").mkdir(parents=True)
  shutil.copy(bin_dir / "fakepython", venv / "bin" / "python")
  bin_dir.joinpath("srun").write_text(
    RECORDER + 'echo "${JAX_LOCAL_DEVICE_IDS-unset}" > "$FAKE_LOG.ids"\n')
  script = slurm_dry_run(tmp_path, f"--processes={processes}", "--array=4", f"--venv={venv}")
  env = fake_env(tmp_path, bin_dir, log, SLURM_ARRAY_TASK_ID="2", JAX_LOCAL_DEVICE_IDS="5")
  subprocess.run(["bash", "-c", script], env=env, cwd="/", check=True, timeout=30)
  (srun,) = calls(log)
  assert srun[1:] == ["--nodes=1", f"--ntasks-per-node={tasks}", "--kill-on-bad-exit=1",
                      str(venv / "bin" / "python"), "-m", "batchbench", *ARGS, "--shard=2/4"]
  assert (tmp_path / "log.ids").read_text().strip() == (device_ids or "unset")


def test_slurm_relative_venv_is_made_absolute(tmp_path):
  script = slurm_dry_run(tmp_path, "--venv=envs/bb", args=["trial"])
  assert f"VENV={tmp_path}/envs/bb" in script.splitlines()


@pytest.mark.parametrize("options, args, option", [
  (["--processes=per_host"], ["sweep"], "--processes"),
  (["--nodes=0"], ["sweep"], "--nodes"),
  (["--nodes=two"], ["sweep"], "--nodes"),
  (["--gpus_per_node=-1"], ["sweep"], "--gpus_per_node"),
  (["--array=0"], ["sweep"], "--array"),
  (["--time=soon"], ["sweep"], "--time"),
  (["--partition=a b"], ["sweep"], "--partition"),
  (["--gpus=8"], ["sweep"], "--gpus"),
  (["--nodes", "2"], ["sweep"], "--nodes"),
  (["sweep"], ["x"], "sweep"),
  (["--array=4"], ["trial"], "--array"),
  (["--array=4"], ["sweep", "--shard=0/2"], "--shard"),
])
def test_slurm_usage_errors(tmp_path, options, args, option):
  result = run(SLURM, *options, "--dry_run", "--", *args,
               env={**os.environ, "TMPDIR": str(tmp_path)})
  check_usage_error(result, option)
  assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("tail", [[], ["--"], ["--", "--shard=0/2"]])
def test_slurm_needs_a_batchbench_command(tail):
  check_usage_error(run(SLURM, "--dry_run", *tail), "after --")

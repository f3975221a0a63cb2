"""What several processes cost: 2 processes x 4 devices against 1 process x 8, one machine.

For each global batch, runs the throughput phase (``batchbench trial`` with a budget of a
few steps: the point it measures first is the figure) of ``digits_mlp`` in both layouts,
alternating which goes first, ``--repeats`` times, each in fresh processes and a fresh
workdir. The 2-process runs join through ``--coordinator_address`` on localhost; their
collectives go through gloo over TCP, where the 1-process run's stay inside XLA.

Prints per batch the median samples/s of each layout over repeats (each repeat's figure
is the median of its timed windows), the ratio 2x4 / 1x8 of the medians and its range
over repeats (each repeat's two runs are adjacent in time). Here the "devices" are fake
CPU devices (``--xla_force_host_platform_device_count``) sharing the machine's cores, and
the processes share them too: the ratio measures the cost of the multi-process runtime
(cross-process all-reduce over loopback TCP, per-process feeds) on this machine, not
of a network between hosts. It reports; it never asserts (exit status 0).

  .venv/bin/python benchmarks/multihost.py                 # batches 64 and 1024, 3 repeats
  .venv/bin/python benchmarks/multihost.py --quick         # batch 256, 1 repeat
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("--config.workload_options.hidden=(256,256)", "--config.max_steps=16",
          "--config.eval_every_examples=1000000", "--config.target_metric=none",
          "--config.throughput.min_windows=5", "--config.throughput.min_seconds=1.0")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])}


def measure(batch: int, processes: int, timeout: float = 600) -> dict:
  """The throughput point of ``digits_mlp`` at ``batch`` on 8 devices in ``processes``."""
  with tempfile.TemporaryDirectory() as workdir:
    base = [sys.executable, "-m", "batchbench", "trial", "--config=configs/digits_mlp.py",
            f"--config.global_batch={batch}", *FIELDS, f"--workdir={workdir}", "--quiet"]
    if processes == 1:
      commands = [(base, _env(8))]
    else:
      port = _free_port()
      commands = [([*base, f"--coordinator_address=127.0.0.1:{port}",
                    f"--num_processes={processes}", f"--process_id={i}"],
                   _env(8 // processes)) for i in range(processes)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for cmd, env in commands]
    try:
      errors = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    for p, err in zip(procs, errors, strict=True):
      if p.returncode:
        raise RuntimeError(f"{processes}-process run at batch {batch} exited "
                           f"{p.returncode}: {err[-2000:]}")
    with open(os.path.join(workdir, "throughput.jsonl"), encoding="utf-8") as f:
      [point] = [json.loads(line) for line in f]
  return point


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="64,1024")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  batches = [256] if args.quick else [int(b) for b in args.batches.split(",")]
  repeats = 1 if args.quick else args.repeats

  print(f"# multihost: 2 processes x 4 devices vs 1 process x 8, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
  print(f"# machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
        f"python {platform.python_version()}; fake CPU devices sharing those cores")
  print(f"# workload: digits_mlp 64-256-256-10, SGD; each figure the throughput phase's "
        f"median over its timed windows ({FIELDS[-2].split('=')[1]}+ windows, "
        f">= {FIELDS[-1].split('=')[1]} s); {repeats} repeat(s), layouts alternating")
  print(f"{'batch':>6} {'1x8 samples/s':>14} {'2x4 samples/s':>14} {'2x4/1x8':>8} "
        f"{'range':>13} {'windows 1x8/2x4':>16}")
  for batch in batches:
    rates: dict[int, list[float]] = {1: [], 2: []}
    windows: dict[int, list[int]] = {1: [], 2: []}
    ratios = []
    for r in range(repeats):
      order = (1, 2) if r % 2 == 0 else (2, 1)
      got = {n: measure(batch, n) for n in order}
      for n, point in got.items():
        rates[n].append(point["samples_per_sec"])
        windows[n].append(point["timed_windows"])
      ratios.append(got[2]["samples_per_sec"] / got[1]["samples_per_sec"])
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"{batch:>6} {one:>14,.0f} {two:>14,.0f} {two / one:>8.3f} "
          f"{min(ratios):>6.3f}-{max(ratios):<6.3f} "
          f"{sum(windows[1]):>7}/{sum(windows[2]):<7}")


if __name__ == "__main__":
  main()

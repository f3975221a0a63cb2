"""Many processes: ``jax.distributed`` set-up, decisions all processes agree on, lost peers.

Every command that computes calls ``initialize()`` first. With ``--coordinator_address``,
``--num_processes`` and ``--process_id`` it joins that job; without them it joins the job
``jax.distributed.initialize()`` detects (a SLURM step with more than one task, an Open
MPI job, a Cloud TPU VM slice), and otherwise runs as the only process.

After it, every process sees the same global devices, builds the same mesh over them and
feeds only its own slice of each batch; process 0 alone writes rows, reports and run
metadata, and all processes write their shards of each checkpoint (``store.checkpoint``).

**Agreement.** A decision that ends a trial must be the same on every process, or one of
them waits forever in a collective the others never enter. Eval metrics and losses come
out of global computations and are the same everywhere; wall-clock budgets and signals
are not. ``agree_any(flag)`` is a logical OR over processes (one small all-gather), used
at each call boundary for the time budget, and ``from_process_0(value)`` takes process
0's timing decisions (the throughput phase's window size and count); preemption uses
JAX's own sync point.

**Lost peers.** A collective whose peer has died does not return. Once joined, every
process runs a ``PeerWatchdog`` thread that publishes a heartbeat to the coordination
service's key-value store and reads the others'; a peer silent for ``--peer_timeout``
seconds (default 120) is named on stderr and this process exits with
``LOST_PEER_EXIT_CODE`` (5). Rows are appended whole and checkpoints committed
atomically (``store``), so nothing already written is lost; rerunning every process
resumes from the last checkpoint.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from absl import flags

LOST_PEER_EXIT_CODE = 5
HEARTBEAT_KEY = "batchbench/heartbeat/"

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process: HOST:PORT of process 0's coordinator "
    "(with --num_processes and --process_id). Without these three, batchbench joins the "
    "job jax.distributed detects (SLURM, Open MPI, Cloud TPU VM) or runs alone.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-process: the number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-process: this process's index, 0..num_processes-1.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "Multi-process: seconds to wait for every process to "
    "join before giving up.")
_PEER_TIMEOUT = flags.DEFINE_float(
    "peer_timeout", 120.0, "Multi-process: seconds without progress (a collective waiting "
    "on a dead peer) after which a process names the lost peers and exits with status 5.")

DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id",
                     "initialization_timeout", "peer_timeout")


class DistributedError(ValueError):
  """Inconsistent multi-process flags (exit 2 before anything starts)."""


def detected_cluster() -> str | None:
  """The multi-process job this process runs in, by its environment, or None.

  Only jobs with more than one process count: a one-task SLURM allocation runs alone.
  """
  env = os.environ
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
    return "SLURM"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "Open MPI"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "Cloud TPU (TPU_WORKER_HOSTNAMES)"
  try:
    from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return "Cloud TPU VM" if cloud_tpu_cluster.running_in_cloud_tpu_vm else None


def check_flags(coordinator_address: str | None, num_processes: int | None,
                process_id: int | None) -> None:
  """Raises ``DistributedError`` unless the three flags are all given and consistent, or
  none is."""
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise DistributedError(
        f"--coordinator_address={coordinator_address!r} --num_processes={num_processes!r} "
        f"--process_id={process_id!r}: give all three, or none (auto-detection)")
  if not any(given):
    return
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedError(f"--coordinator_address={coordinator_address!r}: must be HOST:PORT, "
                           "e.g. 10.0.0.2:8476 (process 0's host)")
  if num_processes < 1:
    raise DistributedError(f"--num_processes={num_processes}: must be at least 1")
  if not 0 <= process_id < num_processes:
    raise DistributedError(f"--process_id={process_id}: must be in 0..{num_processes - 1} "
                           f"(--num_processes={num_processes})")


def initialize(log=print) -> None:
  """Joins the multi-process job named by the flags or detected; nothing when alone.

  Call before anything touches a device. Raises ``DistributedError`` on bad flags.
  """
  import jax  # pylint: disable=g-import-not-at-top  (flags load without jax)
  check_flags(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _PEER_TIMEOUT.value <= 0:
    raise DistributedError(f"--peer_timeout={_PEER_TIMEOUT.value}: must be positive seconds")
  if jax.distributed.is_initialized():
    return
  explicit = _COORDINATOR.value is not None
  cluster = None if explicit else detected_cluster()
  if not explicit and cluster is None:
    return
  if explicit and _NUM_PROCESSES.value == 1:
    return
  # JAX's own heartbeat is the backstop (it aborts the process); the watchdog, with a
  # message naming the lost peer, fires first.
  heartbeat = int(_PEER_TIMEOUT.value) + 60
  jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value, initialization_timeout=_INIT_TIMEOUT.value,
      heartbeat_timeout_seconds=heartbeat)
  log(f"[distributed] process {jax.process_index()} of {jax.process_count()}"
      f"{f' ({cluster})' if cluster else ''}: {jax.local_device_count()} local of "
      f"{jax.device_count()} devices")
  start_watchdog()


def agree_any(flag: bool) -> bool:
  """True on every process when ``flag`` is True on any (one tiny all-gather)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.array([bool(flag)]))))


def from_process_0(value: float | int | bool):
  """Process 0's ``value`` on every process (a scalar; one small broadcast)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return value
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  out = multihost_utils.broadcast_one_to_all(np.asarray(value))
  return type(value)(np.asarray(out).item())


def _kv_client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


class PeerWatchdog:
  """Exits this process, naming the lost peers, when a peer stops reporting in.

  A daemon thread publishes this process's heartbeat (its wall time) to the coordination
  service's key-value store every ``beat_every`` seconds and reads every other
  process's. A process whose heartbeat is older than ``timeout`` seconds (counted from
  the watchdog's start for one that never reported) is lost: the thread prints which,
  and calls ``exit_fn(LOST_PEER_EXIT_CODE)``. When the store itself stops answering for
  that long, process 0, which hosts it, is the one lost. The thread needs no progress
  from the main thread, so a long compile or eval never reads as a lost peer.
  """

  def __init__(self, timeout: float, exit_fn=os._exit, client=None,
               process_index: int | None = None, process_count: int | None = None):
    import jax  # pylint: disable=g-import-not-at-top
    self.timeout = timeout
    self.beat_every = max(0.2, min(5.0, timeout / 6))
    self._exit = exit_fn
    self._client = client
    self.index = jax.process_index() if process_index is None else process_index
    self.count = jax.process_count() if process_count is None else process_count
    self._started = time.time()
    self._store_ok = time.time()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def start(self) -> PeerWatchdog:
    if self.count > 1:
      if self._client is None:
        self._client = _kv_client()
      self._started = self._store_ok = time.time()
      self._thread = threading.Thread(target=self._run, name="batchbench-peer-watchdog",
                                      daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=self.beat_every + 1)

  def lost_peers(self, now: float | None = None) -> list[int] | None:
    """Processes whose last heartbeat is older than the timeout; None while the store
    does not answer."""
    now = time.time() if now is None else now
    try:
      self._client.key_value_set(f"{HEARTBEAT_KEY}{self.index}", repr(now),
                                 allow_overwrite=True)
      beats = dict(self._client.key_value_dir_get(HEARTBEAT_KEY))
    except Exception:  # pylint: disable=broad-except
      return None
    self._store_ok = now
    lost = []
    for p in range(self.count):
      if p == self.index:
        continue
      beat = float(beats.get(f"{HEARTBEAT_KEY}{p}", self._started))
      if now - beat > self.timeout:
        lost.append(p)
    return lost

  def message(self, lost: list[int] | None) -> str:
    if lost is None:
      named = "process 0 (the coordinator: its key-value store stopped answering)"
    else:
      named = "process" + ("es " if len(lost) > 1 else " ") + ", ".join(map(str, lost))
    return (f"batchbench: error: process {self.index} of {self.count}: lost {named}, no "
            f"heartbeat for {self.timeout:g} s (--peer_timeout). Rows and checkpoints "
            "already written are intact; rerun every process to resume.")

  def check(self, now: float | None = None) -> bool:
    """One round: publish, read, and exit when a peer is lost. True while all are here."""
    now = time.time() if now is None else now
    lost = self.lost_peers(now)
    if lost == [] or (lost is None and now - self._store_ok <= self.timeout):
      return True
    print(self.message(lost), file=sys.stderr, flush=True)
    self._exit(LOST_PEER_EXIT_CODE)
    return False

  def _run(self) -> None:
    while not self._stop.wait(self.beat_every):
      if not self.check():
        return


_WATCHDOG: list[PeerWatchdog] = []


def start_watchdog() -> PeerWatchdog | None:
  """Starts the process-wide ``PeerWatchdog`` (once; none on a single process)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return None
  if not _WATCHDOG:
    _WATCHDOG.append(PeerWatchdog(_PEER_TIMEOUT.value).start())
  return _WATCHDOG[0]

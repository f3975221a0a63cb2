"""TensorBoard event files and MLPerf-style logs, driven directly and through a real trial.

Event files are read back with a TFRecord reader written here (8-byte length, 4-byte CRC,
the record, 4-byte CRC) and tensorboardX's ``Event`` protobuf; a ``SessionLog.START`` at
step s drops what came before it at steps >= s, as TensorBoard does on a resume.
"""

import collections
import io
import json
import os
import struct

import pytest
from conftest import load_config
from tensorboardX.proto import event_pb2

from batchbench import config as config_lib
from batchbench.runs import observe, trial
from batchbench.store import mllog, tensorboard


def read_scalars(logdir):
  """tag -> [(step, value)] of every event file directly in ``logdir``, purges applied."""
  out = collections.defaultdict(list)
  for name in sorted(os.listdir(logdir)):
    if not name.startswith("events.out.tfevents"):
      continue
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (length,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
      i += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == \
          event_pb2.SessionLog.START:
        for tag in out:
          out[tag] = [(s, v) for s, v in out[tag] if s < event.step]
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out[value.tag].append((event.step, value.simple_value))
  return dict(out)


def tiny_spec(**overrides):
  c = load_config("digits_mlp")
  c.workload_options.hidden = (32,)
  c.global_batch = 64
  c.num_devices = 1
  c.steps_per_call = 4
  c.eval_every_examples = 256  # an eval every 4 steps
  c.max_examples = None
  c.max_steps = 16
  c.target_value = 0.5
  c.gns.mode = "groups"  # the noise scale is measured: its curve is written too
  for k, v in overrides.items():
    c[k] = v
  return config_lib.resolve(c, 8)


@pytest.fixture(scope="module", name="observed")
def fixture_observed(tmp_path_factory):
  """One tiny digits trial with both observers (and MLLOG lines to a stream too)."""
  workdir = str(tmp_path_factory.mktemp("observed"))
  spec = tiny_spec()
  stream = io.StringIO()
  tb, ml = observe.observers_for(workdir, tensorboard=True, mllog=True)
  ml.stream = stream
  row = trial.run_trial(spec, log=None, observers=(tb, ml))
  return {"workdir": workdir, "spec": spec, "row": row, "stream": stream.getvalue()}


def test_trial_event_files_hold_its_curves_against_step_and_examples(observed):
  spec, row = observed["spec"], observed["row"]
  logdir = os.path.join(observed["workdir"], "tensorboard", spec.trial_id)
  by_step = read_scalars(logdir)
  by_examples = read_scalars(os.path.join(logdir, "examples"))
  history = row["eval_history"]
  assert [s for s, _ in by_step["eval/accuracy"]] == [h["step"] for h in history]
  assert [v for _, v in by_step["eval/accuracy"]] == pytest.approx(
      [h["metrics"]["accuracy"] for h in history])
  assert [v for _, v in by_step["gns/b_simple"]] == pytest.approx(
      [h["b_simple"] for h in history], rel=1e-6)
  assert by_step["train/loss"][-1] == (row["steps"], pytest.approx(row["final_train_loss"]))
  assert all(v == pytest.approx(spec.lr) for _, v in by_step["train/lr"])  # constant schedule
  assert all(v > 0 for _, v in by_step["perf/samples_per_sec"])
  assert by_step["result/steps_to_target"] == [(row["steps"], row["steps_to_target"])]
  # The examples run: the same values at step x global batch.
  for tag in ("train/loss", "eval/accuracy", "perf/samples_per_sec"):
    assert by_examples[f"by_examples/{tag}"] == [
        (s * spec.global_batch, pytest.approx(v)) for s, v in by_step[tag]]


def test_a_resumed_trial_replaces_what_was_logged_past_its_checkpoint(tmp_path):
  spec = tiny_spec()
  first = tensorboard.TensorBoardObserver(str(tmp_path))
  first.on_start(spec, 0)
  for step in (4, 8, 12):
    first.on_window(step, step * 64, 1000.0, loss=float(step), lr=0.1)
  first.close()  # killed after step 12; the checkpoint was at step 8
  resumed = tensorboard.TensorBoardObserver(str(tmp_path))
  resumed.on_start(spec, 8)
  for step in (12, 16):
    resumed.on_window(step, step * 64, 1000.0, loss=100.0 + step, lr=0.1)
  resumed.close()
  logdir = resumed.logdir(spec.trial_id)
  assert read_scalars(logdir)["train/loss"] == [(4, 4.0), (8, 8.0), (12, 112.0), (16, 116.0)]
  assert read_scalars(os.path.join(logdir, "examples"))["by_examples/train/loss"] == [
      (256, 4.0), (512, 8.0), (768, 112.0), (1024, 116.0)]


def mllog_events(text):
  lines = [line for line in text.splitlines() if line]
  assert all(line.startswith(":::MLLOG {") for line in lines)
  return [json.loads(line[len(":::MLLOG "):]) for line in lines]


def test_trial_mllog_has_the_standard_keys_in_the_reference_format(observed):
  spec, row = observed["spec"], observed["row"]
  with open(os.path.join(observed["workdir"], "mllog", f"{spec.trial_id}.log"),
            encoding="utf-8") as f:
    text = f.read()
  assert text == observed["stream"]  # the same lines to the file and the stream
  events = mllog_events(text)
  for e in events:  # the reference logger's field order, and its call-site metadata
    assert list(e) == ["namespace", "time_ms", "event_type", "key", "value", "metadata"]
    assert isinstance(e["time_ms"], int) and {"file", "lineno"} <= set(e["metadata"])
  assert [e["time_ms"] for e in events] == sorted(e["time_ms"] for e in events)
  assert (events[0]["key"], events[0]["event_type"]) == ("run_start", "INTERVAL_START")
  assert (events[-1]["key"], events[-1]["event_type"]) == ("run_stop", "INTERVAL_END")
  assert events[-1]["metadata"]["status"] == "success" and row["status"] == "ok"
  values = {e["key"]: e["value"] for e in events if e["event_type"] == "POINT_IN_TIME"}
  assert values["global_batch_size"] == 64
  assert values["opt_base_learning_rate"] == pytest.approx(spec.lr)
  assert values["seed"] == spec.seed and values["train_samples"] == spec.train_size
  accuracy = [e for e in events if e["key"] == "eval_accuracy"]
  assert [e["value"] for e in accuracy] == pytest.approx(
      [h["metrics"]["accuracy"] for h in row["eval_history"]])
  assert [e["metadata"]["samples_count"] for e in accuracy] == [
      h["examples"] for h in row["eval_history"]]
  assert accuracy[0]["metadata"]["epoch_num"] == pytest.approx(
      row["eval_history"][0]["examples"] / spec.train_size)


def test_mllog_of_a_failed_trial_is_aborted_and_a_resume_starts_no_second_run(tmp_path):
  spec = tiny_spec()
  ticks = iter(range(1000, 2000))
  obs = mllog.MLLogObserver(str(tmp_path), clock=lambda: next(ticks))
  obs.on_start(spec, 0)
  obs.on_end({"status": "diverged", "steps": 3})
  obs.on_start(spec, 8)  # a resume appends to the same file
  obs.on_eval(12, 768, {"accuracy": 0.5, "loss": 1.0}, None)
  obs.on_end({"status": "ok", "steps": 16})
  events = mllog_events(open(obs.path(spec.trial_id), encoding="utf-8").read())
  assert [e["key"] for e in events].count("run_start") == 1
  stops = [e for e in events if e["key"] == "run_stop"]
  assert [s["metadata"]["status"] for s in stops] == ["aborted", "success"]
  assert [e["time_ms"] for e in events] == [t * 1000 for t in range(1000, 1000 + len(events))]


def test_only_process_zero_gets_observers(tmp_path):
  assert observe.observers_for(str(tmp_path), tensorboard=True, mllog=True,
                               process_index=1) == ()
  assert observe.observers_for(str(tmp_path)) == ()


def test_tensorboard_overhead_benchmark_runs(capsys):
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
  import tensorboard_overhead  # pylint: disable=g-import-not-at-top

  assert tensorboard_overhead.main(["--repeats", "1", "--steps", "64"]) == 0
  out = capsys.readouterr().out
  wall = next(line for line in out.splitlines() if "wall seconds:" in line)
  assert 0.2 < float(wall.split()[2]) < 5.0  # a ratio of two measured times
  per_trial = next(line for line in out.splitlines() if "scalars written" in line)
  # 64 steps, an eval every 8: 8 windows x 3 scalars + 8 evals x 2 metrics (no noise scale)
  assert int(per_trial.split(":")[1].split()[0]) == 8 * 3 + 8 * 2

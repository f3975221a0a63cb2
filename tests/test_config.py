"""Configs and resolve(): what a valid config resolves to, every invalid field's error, the
identities a spec derives (trial, program, throughput point), and the workdir."""

import dataclasses
import math
import os
import pickle
import re

import pytest
from conftest import REPO, load_config

from batchbench import config as config_lib
from batchbench import version
from batchbench.config import ConfigError, TrialSpec, open_workdir, parse_arg, resolve
from batchbench.workloads import Target

# Every trial config (nightly.py holds a suite of them, not one).
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "nightly")


def digits(**overrides):
  """configs/digits_mlp.py with fields overridden (dotted names for nested fields)."""
  c = load_config("digits_mlp")
  c.update_from_flattened_dict(overrides)
  return c



# --- what valid configs resolve to ------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_file_resolves(name):
  spec = resolve(load_config(name), 8)
  assert spec.num_devices == 8 and spec.per_device_batch * 8 == spec.global_batch
  assert 1 <= spec.steps_per_call <= 64
  assert spec.measurement_version == version.MEASUREMENT_VERSION


def test_digits_default_spec():
  spec = resolve(load_config("digits_mlp"), 8)
  assert (spec.global_batch, spec.per_device_batch, spec.accum_steps) == (32, 4, 1)
  # Calls of up to 64 steps (65,536 examples' worth, capped at 64); an eval every 8 steps.
  assert spec.eval_every_steps == 8 and spec.steps_per_call == 64
  # 100 epochs = 143,700 examples = 4,491 steps exactly (calls stop anywhere).
  assert spec.max_steps == math.ceil(143_700 / 32) == 4491
  assert spec.lr == pytest.approx(0.05) and spec.warmup_steps == 0
  assert (spec.optimizer, spec.momentum, spec.weight_decay) == ("sgd", 0.9, 0.0)
  assert spec.target == Target("accuracy", 0.96, "max")
  assert spec.train_size == 1437 and spec.steps_per_epoch == 1437 // 32
  assert spec.throughput_settings == {"warmup_calls": 2, "min_windows": 5,
                                      "min_seconds": 1.0, "max_seconds": 60.0}


@pytest.mark.parametrize("rule, batch, mult, lr", [
    ("linear", 1024, 1.0, 0.05 * 32), ("sqrt", 1024, 1.0, 0.05 * math.sqrt(32)),
    ("none", 1024, 1.0, 0.05), ("linear", 8, 2.0, 0.05 / 4 * 2), ("sqrt", 128, 0.5, 0.05)])
def test_resolved_lr_follows_the_rule(rule, batch, mult, lr):
  spec = resolve(digits(lr_rule=rule, global_batch=batch, lr_multiplier=mult), 8)
  assert spec.lr == pytest.approx(lr, rel=1e-12)
  assert (spec.base_lr, spec.reference_batch, spec.lr_rule) == (0.05, 32, rule)


@pytest.mark.parametrize("batch, steps_per_call", [(8, 64), (512, 64), (1024, 64),
                                                    (2048, 32), (65536, 1)])
def test_auto_steps_per_call_aims_at_65536_examples_up_to_64_steps(batch, steps_per_call):
  c = config_lib.default_config()
  c.workload, c.global_batch, c.num_devices, c.max_steps = "synthetic_mlp", batch, 1, 7
  spec = resolve(c, 8)
  assert spec.steps_per_call == steps_per_call
  assert spec.max_steps == 7  # a budget is exact: calls may run fewer than K steps


def test_conv_models_on_cpu_get_one_step_per_call_unless_told():
  # XLA:CPU runs convolution gradients far slower inside a loop body; a call of one step
  # has none. Models without convolutions keep the automatic K.
  cnn, mlp = load_config("mnist1d_cnn"), load_config("mnist1d_mlp")
  assert cnn.steps_per_call == 0 and mlp.steps_per_call == 0  # chosen by the harness
  assert resolve(cnn, 8).steps_per_call == 1
  assert resolve(mlp, 8).steps_per_call > 1
  cnn.steps_per_call = 4  # an explicit K is kept
  assert resolve(cnn, 8).steps_per_call == 4


def test_steps_per_call_is_a_maximum_not_a_divisor():
  # Any K is valid whatever the eval interval and budget: a trial's calls end at each.
  for k in (3, 16, 64):
    spec = resolve(digits(global_batch=256, eval_every_examples=2048, steps_per_call=k,
                          max_examples=None, max_steps=21), 8)
    assert (spec.eval_every_steps, spec.steps_per_call, spec.max_steps) == (8, k, 21)
  # Steps per call are compiled in: programs differ by K, not by the eval interval.
  a = resolve(digits(eval_every_examples=256), 8)
  b = resolve(digits(eval_every_examples=4096), 8)
  assert a.program_key == b.program_key and a.trial_id != b.trial_id
  assert resolve(digits(steps_per_call=8), 8).program_key != a.program_key


def test_devices_and_accumulation():
  spec = resolve(digits(global_batch=64, accum_steps=2), 8)
  assert (spec.num_devices, spec.per_device_batch, spec.micro_batch) == (8, 4, 32)
  spec = resolve(digits(global_batch=64, num_devices=2), 8)
  assert (spec.num_devices, spec.per_device_batch, spec.micro_batch) == (2, 32, 64)
  spec = resolve(digits(global_batch=8, num_devices=0), 8)
  assert (spec.num_devices, spec.per_device_batch) == (8, 1)


def test_warmup_and_budgets_in_examples_become_steps():
  spec = resolve(digits(warmup_examples=100, max_examples=None, max_steps=20), 8)
  assert spec.warmup_steps == 4  # ceil(100 / 32)
  assert spec.max_steps == 20
  spec = resolve(digits(max_examples=1000, max_steps=16), 8)
  assert spec.max_steps == 16  # the smaller budget wins
  spec = resolve(digits(max_examples=1000, steps_per_call=2), 8)
  assert spec.max_steps == 32  # ceil(1000 / 32) = 32 steps
  spec = resolve(digits(max_examples=None, max_seconds=5.0), 8)
  assert spec.max_steps is None and spec.max_seconds == 5.0


def test_eval_cadence_is_in_examples():
  for batch, every in ((32, 8), (64, 4), (256, 1), (1024, 1)):
    assert resolve(digits(global_batch=batch), 8).eval_every_steps == every


def test_targets():
  assert resolve(digits(target_metric=None, target_value=None), 8).target == Target(
      "accuracy", 0.96, "max")
  assert resolve(digits(target_metric="none"), 8).target is None
  assert resolve(digits(target_metric="loss", target_value=0.25), 8).target == Target(
      "loss", 0.25, "min")
  assert resolve(digits(target_metric=None, target_value=0.9), 8).target == Target(
      "accuracy", 0.9, "max")


def test_synthetic_config_has_no_evals_or_target():
  spec = resolve(load_config("synthetic_mlp", "batch=64,steps=24"), 8)
  assert spec.eval_every_steps is None and spec.target is None and spec.train_size is None
  assert spec.max_steps == 24 and spec.steps_per_call == 64  # a budget of 24 steps is exact


def test_optimizer_options():
  sgd = resolve(digits(momentum=None), 8)
  assert sgd.momentum == 0.9  # sgd's default momentum
  adam = resolve(digits(optimizer="adam", momentum=None), 8)
  assert adam.momentum is None and adam.weight_decay == 0.0
  adamw = resolve(digits(optimizer="adamw", momentum=None, weight_decay=0.01), 8)
  assert (adamw.momentum, adamw.weight_decay) == (None, 0.01)


# --- identities -------------------------------------------------------------------------

def test_trial_id_is_stable_and_tracks_the_spec():
  a, b = resolve(digits(), 8), resolve(digits(), 8)
  assert a.trial_id == b.trial_id and len(a.trial_id) == 12
  for change in ({"seed": 1}, {"global_batch": 64}, {"num_devices": 1},
                 {"lr_multiplier": 2.0}, {"checkpoint_every_examples": 512},
                 {"throughput.min_seconds": 2.0}):
    assert resolve(digits(**change), 8).trial_id != a.trial_id, change
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.global_batch = 64  # type: ignore[misc]


def test_identities_change_with_the_measurement_version(monkeypatch):
  before = resolve(digits(), 8)
  monkeypatch.setattr(version, "MEASUREMENT_VERSION", version.MEASUREMENT_VERSION + 1)
  after = resolve(digits(), 8)
  assert after.measurement_version == before.measurement_version + 1
  # Rows and points measured by other code are not reused ...
  assert after.trial_id != before.trial_id and after.point_id != before.point_id
  # ... but compare still matches them to the same benchmark.
  assert after.benchmark() == before.benchmark()
  assert after.point_benchmark() == before.point_benchmark()


def test_lr_and_seed_share_one_program_and_throughput_point():
  a = resolve(digits(global_batch=64), 8)
  for change in ({"seed": 3}, {"lr_multiplier": 2.0}, {"base_lr": 0.2},
                 {"lr_rule": "sqrt"}, {"target_value": 0.5},
                 {"checkpoint_every_examples": 512}):
    b = resolve(digits(global_batch=64, **change), 8)
    assert b.trial_id != a.trial_id, change
    assert (b.program_key, b.point_id) == (a.program_key, a.point_id), change
  for change in ({"global_batch": 128}, {"accum_steps": 2}, {"num_devices": 4},
                 {"optimizer": "adam", "momentum": None}):
    b = resolve(digits(**{"global_batch": 64, **change}), 8)
    assert b.program_key != a.program_key and b.point_id != a.point_id, change
  # The throughput phase's settings are part of its point, not of the program.
  b = resolve(digits(global_batch=64, **{"throughput.min_windows": 7}), 8)
  assert b.program_key == a.program_key and b.point_id != a.point_id
  # How many steps a trial's call runs is a runtime value: the eval cadence, the budget
  # and the checkpoint cadence share the program too.
  for change in ({"eval_every_examples": 1024}, {"max_examples": 5000}):
    b = resolve(digits(global_batch=64, **change), 8)
    assert b.program_key == a.program_key and b.trial_id != a.trial_id, change


def test_spec_round_trips_through_its_dict():
  spec = resolve(digits(warmup_examples=64, checkpoint_every_examples=512), 8)
  clone = TrialSpec.from_dict(spec.to_dict())
  assert clone == spec and clone.trial_id == spec.trial_id and clone.point_id == spec.point_id


# --- every invalid field ----------------------------------------------------------------

def _synthetic(**overrides):
  c = load_config("synthetic_mlp")
  c.update_from_flattened_dict(overrides)
  return c


INVALID = [
    # (config, field, value, what the message says is valid)
    (digits(global_batch=0), "global_batch", 0, "must be a positive integer"),
    (digits(global_batch=-32), "global_batch", -32, "must be a positive integer"),
    (digits(global_batch=12), "global_batch", 12,
     r"divisible by data-parallel devices x accum_steps = 8 x 1 = 8"),
    (digits(global_batch=64, accum_steps=3), "global_batch", 64, r"= 8 x 3 = 24"),
    (digits(global_batch=48, num_devices=2, accum_steps=32), "global_batch", 48,
     r"= 2 x 32 = 64"),
    (digits(global_batch=2048), "global_batch", 2048,
     "must be at most the 1437-example training set of digits_mlp"),
    (digits(accum_steps=0), "accum_steps", 0, "must be a positive integer"),
    (digits(num_devices=9), "num_devices", 9, "between 1 and the 8 available devices"),
    (digits(num_devices=-1), "num_devices", -1, "between 1 and the 8 available devices"),
    (digits(lr_rule="cubic"), "lr_rule", "cubic", "must be one of none, linear, sqrt"),
    (digits(workload="resnet50"), "workload", "resnet50",
     "known workloads: .*digits_mlp.*mnist1d_cnn.*mnist1d_mlp.*synthetic_cnn.*synthetic_mlp"),
    (digits(optimizer="lamb"), "optimizer", "lamb", "must be one of sgd, adam, adamw"),
    # Options the optimizer would silently ignore.
    (digits(optimizer="adam", momentum=0.9), "momentum", 0.9,
     "optimizer adam ignores momentum"),
    (digits(optimizer="adamw", momentum=0.5), "momentum", 0.5,
     "optimizer adamw ignores momentum"),
    (digits(optimizer="adam", momentum=None, weight_decay=0.1), "weight_decay", 0.1,
     "optimizer adam ignores weight_decay; use adamw"),
    (digits(schedule="step"), "schedule", "step", "must be one of constant, cosine, linear"),
    (digits(base_lr=0.0), "base_lr", 0.0, "must be a positive finite number"),
    (digits(base_lr=math.inf), "base_lr", math.inf, "must be a positive finite number"),
    (digits(lr_multiplier=-1.0), "lr_multiplier", -1.0, "must be a positive finite number"),
    (digits(momentum=1.0), "momentum", 1.0, r"must be in \[0, 1\)"),
    (digits(weight_decay=-0.1), "weight_decay", -0.1, "must be >= 0"),
    (digits(reference_batch=0), "reference_batch", 0, "must be a positive integer"),
    (digits(warmup_examples=-1), "warmup_examples", -1, "must be an integer >= 0"),
    (digits(target_metric="f1"), "target_metric", "f1",
     r"digits_mlp reports accuracy, loss \(or 'none'\)"),
    (digits(target_value=1.5), "target_value", 1.5, r"accuracy lies in \[0.0, 1.0\]"),
    (digits(target_value=-0.01), "target_value", -0.01, r"accuracy lies in \[0.0, 1.0\]"),
    (digits(target_metric="loss", target_value=-1.0), "target_value", -1.0,
     r"loss lies in \[0.0, inf\]"),
    (digits(target_metric="loss", target_value=None), "target_value", None,
     "must be set for target metric 'loss'"),
    (digits(eval_every_examples=0), "eval_every_examples", 0, "must be a positive integer"),
    (digits(eval_every_examples=-256), "eval_every_examples", -256, "must be a positive integer"),
    (digits(max_examples=0), "max_examples", 0, "must be a positive integer"),
    (digits(max_examples=-1437), "max_examples", -1437, "must be a positive integer"),
    (digits(max_steps=0), "max_steps", 0, "must be a positive integer"),
    (digits(max_steps=-5), "max_steps", -5, "must be a positive integer"),
    (digits(max_seconds=0.0), "max_seconds", 0.0, "must be a positive number"),
    (digits(max_seconds=-1.0), "max_seconds", -1.0, "must be a positive number"),
    (digits(max_examples=None), "max_examples", None,
     "a budget is required: set max_examples, max_steps or max_seconds"),
    (digits(steps_per_call=-1), "steps_per_call", -1, "must be an integer >= 0"),
    (digits(seed=-1), "seed", -1, "must be an integer >= 0"),
    (digits(memory_budget_bytes=0), "memory_budget_bytes", 0, "must be a positive integer"),
    (digits(checkpoint_every_examples=0), "checkpoint_every_examples", 0,
     "must be a positive integer"),
    (digits(schedule="cosine", max_examples=None, max_seconds=10.0), "schedule", "cosine",
     "a decaying schedule needs max_examples or max_steps"),
    (digits(**{"throughput.min_windows": 2}), "throughput.min_windows", 2,
     "must be an integer >= 3"),
    (digits(**{"throughput.warmup_calls": 0}), "throughput.warmup_calls", 0,
     "must be an integer >= 1"),
    (digits(**{"throughput.min_seconds": 0.0}), "throughput.min_seconds", 0.0,
     "must be a positive number of seconds"),
    (digits(**{"throughput.min_seconds": 5.0, "throughput.max_seconds": 2.0}),
     "throughput.max_seconds", 2.0, r"must be at least throughput.min_seconds \(5.0\)"),
    (_synthetic(target_metric="accuracy"), "target_metric", "accuracy",
     "synthetic_mlp is synthetic and has no eval data; use 'none'"),
    (_synthetic(max_steps=None, max_examples=4096), "max_steps", None,
     "synthetic_mlp is synthetic .* set max_steps"),
]


@pytest.mark.parametrize("c, field, value, valid", INVALID,
                         ids=[f"{f}={v!r}" for _, f, v, _ in INVALID])
def test_invalid_field_is_rejected_with_field_value_and_what_is_valid(c, field, value, valid):
  with pytest.raises(ConfigError) as e:
    resolve(c, 8)
  assert (e.value.field, e.value.value) == (field, value)
  message = str(e.value)
  assert message.startswith(f"invalid config: {field}={value!r}: "), message
  assert re.search(valid, message), message


def test_unknown_workload_option_is_a_config_error():
  c = digits()
  c.workload_options.width = 3
  with pytest.raises(ConfigError, match=r"workload_options=.*has no option\(s\) width"):
    resolve(c, 8)


# --- config arguments and the error type ------------------------------------------------

def test_parse_arg_types_and_errors():
  arg = parse_arg("batch=64,rule=sqrt,quick=false", batch=32, rule="linear", quick=True)
  assert (arg.batch, arg.rule, arg.quick) == (64, "sqrt", False)
  assert parse_arg(None, batch=32).batch == 32
  assert parse_arg("quick", quick=False).quick is True
  with pytest.raises(ConfigError, match=r"config arg batchh='3': known args: batch, rule$"):
    parse_arg("batchh=3", batch=32, rule="linear")
  with pytest.raises(ConfigError, match=r"config arg batch='x': expected int$"):
    parse_arg("batch=x", batch=32)


def test_config_file_arg_string():
  c = load_config("digits_mlp", "batch=128,rule=sqrt")
  assert (c.global_batch, c.lr_rule) == (128, "sqrt")


def test_config_error_survives_being_rebuilt_from_its_message():
  # ml_collections' config_flags re-raises get_config errors as type(e)(message), and
  # pickling (process-isolated trials) rebuilds exceptions from their args.
  err = ConfigError("global_batch", 0, "must be a positive integer")
  assert str(type(err)(str(err))) == str(err)
  clone = pickle.loads(pickle.dumps(err))
  assert isinstance(clone, ConfigError) and str(clone) == str(err)


# --- the workdir ------------------------------------------------------------------------

def test_open_workdir_creates_the_path_and_leaves_nothing_behind(tmp_path, monkeypatch):
  target = tmp_path / "a" / "b"
  assert open_workdir(str(target)) == str(target)
  assert target.is_dir() and os.listdir(target) == []  # the write probe is removed
  monkeypatch.chdir(tmp_path)
  assert open_workdir("rel") == os.path.join(str(tmp_path), "rel")
  (tmp_path / "rel" / "keep").write_text("x")
  assert open_workdir(str(tmp_path / "rel")) == str(tmp_path / "rel")  # existing: fine
  assert os.listdir(tmp_path / "rel") == ["keep"]


@pytest.mark.parametrize("workdir", [None, ""])
def test_open_workdir_requires_a_path(workdir):
  with pytest.raises(ConfigError, match="workdir=.*a writable directory path is required"):
    open_workdir(workdir)


def test_open_workdir_rejects_an_existing_file(tmp_path):
  f = tmp_path / "results.txt"
  f.write_text("keep")
  with pytest.raises(ConfigError, match=f"workdir='{f}': cannot create or write a file"):
    open_workdir(str(f))
  assert f.read_text() == "keep" and os.listdir(tmp_path) == ["results.txt"]


def test_open_workdir_rejects_a_path_under_a_file(tmp_path):
  f = tmp_path / "file"
  f.write_text("")
  with pytest.raises(ConfigError, match=f"workdir='{f}/sub/dir': cannot create or write"):
    open_workdir(str(f / "sub" / "dir"))
  assert os.listdir(tmp_path) == ["file"]


def test_open_workdir_rejects_a_virtual_filesystem():
  # /proc cannot hold new files even for root (whom permission bits do not stop).
  with pytest.raises(ConfigError) as e:
    open_workdir("/proc/batchbench-wd")
  assert e.value.field == "workdir" and "cannot create or write a file there" in str(e.value)
  assert not os.path.exists("/proc/batchbench-wd")

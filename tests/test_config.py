"""Configs and resolve(): what a valid config resolves to, and every invalid field's error."""

import dataclasses
import math
import os
import pathlib
import pickle
import re

import pytest
from conftest import load_config

from batchbench import config as config_lib
from batchbench.config import ConfigError, check_workdir, parse_arg, resolve
from batchbench.workloads import Target

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py"))




def digits(**overrides):
  c = load_config("digits_mlp")
  for k, v in overrides.items():
    c[k] = v
  return c


# --- what valid configs resolve to ------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_file_resolves(name):
  spec = resolve(load_config(name), 8)
  assert spec.num_devices == 8 and spec.per_device_batch * 8 == spec.global_batch
  assert spec.max_steps is None or spec.max_steps % spec.steps_per_call == 0
  if spec.eval_every_steps:  # evals at call boundaries, or at fixed points inside a call
    every, k = spec.eval_every_steps, spec.steps_per_call
    assert every % k == 0 or (k % every == 0 and spec.evals_per_call == k // every > 1)


def test_digits_default_spec():
  spec = resolve(load_config("digits_mlp"), 8)
  assert (spec.global_batch, spec.per_device_batch, spec.accum_steps) == (32, 4, 1)
  # Evals every 8 steps; a 64-step call spans 8 of them (evaluated after the call).
  assert spec.eval_every_steps == 8 and spec.steps_per_call == 64 and spec.evals_per_call == 8
  # 100 epochs = 143,700 examples = 4,491 steps, rounded up to whole 64-step calls.
  assert spec.max_steps == 4544
  assert spec.lr == pytest.approx(0.05) and spec.warmup_steps == 0
  assert spec.target == Target("accuracy", 0.96, "max")
  assert spec.train_size == 1437 and spec.steps_per_epoch == 44


@pytest.mark.parametrize("rule, batch, mult, lr", [
    ("linear", 1024, 1.0, 0.05 * 32), ("sqrt", 1024, 1.0, 0.05 * math.sqrt(32)),
    ("none", 1024, 1.0, 0.05), ("linear", 8, 2.0, 0.05 / 4 * 2), ("sqrt", 128, 0.5, 0.05)])
def test_resolved_lr_follows_the_rule(rule, batch, mult, lr):
  spec = resolve(digits(lr_rule=rule, global_batch=batch, lr_multiplier=mult), 8)
  assert spec.lr == pytest.approx(lr, rel=1e-12)
  assert (spec.base_lr, spec.reference_batch, spec.lr_rule) == (0.05, 32, rule)


@pytest.mark.parametrize("batch, every, k, evals", [
    (1024, 256, 16, 16),  # an eval every step: 16 steps per call, each evaluated
    (64, 256, 64, 16),  # every 4 steps: a 64-step call spans 16 eval intervals
    (32, 256, 64, 8),
    (8, 8192, 64, 1),  # every 1,024 steps: calls of 64 divide the interval
])
def test_auto_steps_per_call_spans_short_eval_intervals(batch, every, k, evals):
  spec = resolve(digits(global_batch=batch, eval_every_examples=every), 8)
  assert (spec.steps_per_call, spec.evals_per_call) == (k, evals)
  assert spec.max_steps % spec.steps_per_call == 0


def test_evals_per_call_respect_the_snapshot_budget_and_max_steps(monkeypatch):
  # digits_mlp has 85,002 float32 parameters (340,008 bytes): a 1 MB budget holds 2 copies.
  monkeypatch.setattr(config_lib, "MAX_EVAL_SNAPSHOT_BYTES", 1_000_000)
  spec = resolve(digits(global_batch=1024, eval_every_examples=256), 8)
  assert (spec.steps_per_call, spec.evals_per_call) == (2, 2)
  monkeypatch.setattr(config_lib, "MAX_EVAL_SNAPSHOT_BYTES", 100)  # not even one copy
  spec = resolve(digits(global_batch=1024, eval_every_examples=256), 8)
  assert (spec.steps_per_call, spec.evals_per_call) == (1, 1)
  monkeypatch.undo()
  # A max_steps budget must still end on a call boundary: 20 = 10 evals of 2 steps.
  spec = resolve(digits(global_batch=128, eval_every_examples=256, max_examples=None,
                        max_steps=20), 8)
  assert (spec.steps_per_call, spec.evals_per_call, spec.max_steps) == (20, 10, 20)


def test_explicit_steps_per_call_may_span_eval_intervals():
  spec = resolve(digits(global_batch=256, eval_every_examples=512, steps_per_call=8), 8)
  assert (spec.eval_every_steps, spec.evals_per_call) == (2, 4)
  with pytest.raises(ConfigError, match=r"steps_per_call=3: must divide the eval interval"):
    resolve(digits(global_batch=256, eval_every_examples=512, steps_per_call=3), 8)


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
  assert spec.steps_per_call == 4  # gcd(eval every 8 steps, 20 steps)
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
  c = digits(target_metric="loss")
  c.target_value = 0.25
  assert resolve(c, 8).target == Target("loss", 0.25, "min")
  c = digits(target_metric=None)
  c.target_value = 0.9
  assert resolve(c, 8).target == Target("accuracy", 0.9, "max")


def test_synthetic_config_has_no_evals_or_target():
  spec = resolve(load_config("synthetic_mlp", "batch=64,steps=24"), 8)
  assert spec.eval_every_steps is None and spec.target is None and spec.train_size is None
  assert spec.max_steps == 24 and 24 % spec.steps_per_call == 0


def test_trial_id_is_stable_and_tracks_the_spec():
  a, b = resolve(digits(), 8), resolve(digits(), 8)
  assert a.trial_id == b.trial_id and len(a.trial_id) == 12
  assert resolve(digits(seed=1), 8).trial_id != a.trial_id
  assert resolve(digits(global_batch=64), 8).trial_id != a.trial_id
  assert resolve(digits(num_devices=1), 8).trial_id != a.trial_id
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.global_batch = 64  # type: ignore[misc]


# --- every invalid field ----------------------------------------------------------------

def _synthetic(**overrides):
  c = load_config("synthetic_mlp")
  for k, v in overrides.items():
    c[k] = v
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
     "known workloads: digits_mlp, mnist1d_cnn, mnist1d_mlp, synthetic_cnn, synthetic_mlp"),
    (digits(optimizer="lamb"), "optimizer", "lamb", "must be one of sgd, adam, adamw"),
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
    (digits(steps_per_call=3), "steps_per_call", 3, r"must divide the eval interval"),
    (digits(steps_per_call=-1), "steps_per_call", -1, "must be an integer >= 0"),
    (digits(seed=-1), "seed", -1, "must be an integer >= 0"),
    (digits(memory_budget_bytes=0), "memory_budget_bytes", 0, "must be a positive integer"),
    (digits(schedule="cosine", max_examples=None, max_seconds=10.0), "schedule", "cosine",
     "a decaying schedule needs max_examples or max_steps"),
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
  with pytest.raises(ConfigError, match=r"workload_options=.*no option\(s\) \['width'\]"):
    resolve(c, 8)


# --- config arguments and the error type ------------------------------------------------

def test_parse_arg_types_and_errors():
  arg = parse_arg("batch=64,rule=sqrt,quick=false", batch=32, rule="linear", quick=True)
  assert (arg.batch, arg.rule, arg.quick) == (64, "sqrt", False)
  assert parse_arg(None, batch=32).batch == 32
  assert parse_arg("quick", quick=False).quick is True
  with pytest.raises(ConfigError, match=r"config arg 'batchh'.*known args: \['batch'"):
    parse_arg("batchh=3", batch=32, rule="linear")
  with pytest.raises(ConfigError, match=r"config arg 'batch'='x': expected int"):
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

def test_check_workdir_accepts_a_new_path_without_creating_it(tmp_path, monkeypatch):
  target = tmp_path / "a" / "b"
  assert check_workdir(str(target)) == str(target)
  assert not (tmp_path / "a").exists()
  monkeypatch.chdir(tmp_path)
  assert check_workdir("rel") == os.path.join(str(tmp_path), "rel")
  assert check_workdir(str(tmp_path)) == str(tmp_path)  # an existing directory is fine


@pytest.mark.parametrize("workdir", [None, ""])
def test_check_workdir_requires_a_path(workdir):
  with pytest.raises(ConfigError, match="workdir=.*a writable directory path is required"):
    check_workdir(workdir)


def test_check_workdir_rejects_an_existing_file(tmp_path):
  f = tmp_path / "results.txt"
  f.write_text("keep")
  with pytest.raises(ConfigError, match=f"workdir='{f}'.*exists and is not a directory"):
    check_workdir(str(f))
  assert f.read_text() == "keep"


def test_check_workdir_rejects_a_path_under_a_file(tmp_path):
  f = tmp_path / "file"
  f.write_text("")
  with pytest.raises(ConfigError, match=f"workdir='{f}/sub/dir'.*{f} exists and is not a dir"):
    check_workdir(str(f / "sub" / "dir"))
  assert os.listdir(tmp_path) == ["file"]


def test_check_workdir_rejects_a_read_only_parent(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    if os.access(ro, os.W_OK):  # root: permissions do not stop writes
      pytest.skip("running as root: a read-only directory is still writable")
    with pytest.raises(ConfigError, match=f"workdir='{ro}/wd'.*{ro} is not writable"):
      check_workdir(str(ro / "wd"))
    assert os.listdir(ro) == []
  finally:
    ro.chmod(0o755)



def test_an_eval_interval_past_max_steps_does_not_shrink_steps_per_call():
  c = config_lib.default_config()
  c.global_batch, c.num_devices, c.max_steps = 1024, 1, 2048
  c.eval_every_examples = 10**9  # 976,562 steps: never reached within 2,048
  spec = config_lib.resolve(c, 8)
  assert spec.steps_per_call == config_lib.MAX_AUTO_STEPS_PER_CALL
  assert spec.max_steps % spec.steps_per_call == 0

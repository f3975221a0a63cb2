"""The real workloads (ResNet with BatchNorm, the byte-level Transformer LM): they train
through the harness, and their parts do what they claim: batch statistics, ghost batch
norm, augmentation, token windows, bits per byte, dropout, lazy TFDS sources, FLOPs."""

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import load_config

from batchbench import config as config_lib
from batchbench.config.errors import ConfigError
from batchbench.data import pysrc
from batchbench.data.arrays import MASK, ArrayData
from batchbench.data.augment import random_crop_flip
from batchbench.runs import decompose, trial
from batchbench.workloads import get_workload, register_workload
from batchbench.workloads import resnet as resnet_workloads
from batchbench.workloads import transformer_lm as lm_workloads

TINY_RESNET = {"num_filters": 4, "stage_sizes": (1, 1), "image_size": 8}
TINY_LM = {"seq_len": 16, "d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64}
LM_MAX_BYTES = 40_000


def with_mask(batch):
  n = len(next(iter(batch.values())))
  return {**batch, MASK: jnp.ones((n,), jnp.float32)}


def init(workload, seed=0):
  return workload.init(jax.random.key(seed), workload.batch_spec(1))


@pytest.fixture(name="lm_cache", scope="module")
def fixture_lm_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("pysrc"))


def tiny_lm(lm_cache, **options):
  return get_workload("transformer_lm", {**TINY_LM, "max_bytes": LM_MAX_BYTES,
                                         "cache_dir": lm_cache, **options})


# --- training through the harness -------------------------------------------------------

def blob_images(n, size, seed):
  """Images whose class sets the mean of one channel: learnable in a few steps."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.int32)
  images = rng.normal(size=(n, size, size, 3)).astype(np.float32)
  images[..., 0] += (labels[:, None, None] - 4.5) * 2
  return images, labels


@register_workload("test_tiny_resnet18")
def tiny_resnet18(bn_group: str = "global", bn_groups: int = 1):
  """resnet18_cifar10 (augmentation, BatchNorm) with embedded, learnable 8x8 images."""
  w = get_workload("resnet18_cifar10", {**TINY_RESNET, "data": "synthetic",
                                        "bn_group": bn_group, "bn_groups": bn_groups})

  def data():
    x, y = blob_images(320, 8, seed=0)
    return ArrayData.classification(x[:256], y[:256], x[256:], y[256:])
  return dataclasses.replace(w, synthetic_batch=None, data=data, train_size=256)


def first_and_last_loss(row):
  losses = [h["metrics"]["loss"] for h in row["eval_history"]]
  return losses[0], losses[-1]


def test_resnet18_trains_through_the_harness_on_two_devices():
  c = load_config("resnet18_cifar10", "data=synthetic")
  c.workload = "test_tiny_resnet18"
  c.workload_options = {}
  c.update(num_devices=2, global_batch=32, max_steps=24, eval_every_examples=256,
           target_metric="none", warmup_examples=0, schedule="constant", base_lr=0.05,
           max_examples=None)
  row = trial.run_trial(config_lib.resolve(c, 8), log=None)
  assert row["status"] == "ok" and row["steps"] == 24 and row["num_devices"] == 2
  assert [h["step"] for h in row["eval_history"]] == [8, 16, 24]
  first, last = first_and_last_loss(row)
  assert last < 0.92 * first
  assert row["eval_history"][-1]["metrics"]["accuracy"] > 0.25  # chance is 0.1


def test_transformer_lm_trains_through_the_harness_on_pysrc(lm_cache):
  c = load_config("transformer_lm")
  c.workload_options.update({**TINY_LM, "max_bytes": LM_MAX_BYTES, "cache_dir": lm_cache})
  c.update(num_devices=2, global_batch=16, max_steps=30, eval_every_examples=160,
           target_metric="none", warmup_examples=0, base_lr=3e-3, steps_per_call=10,
           max_examples=None)
  spec = config_lib.resolve(c, 8)
  assert spec.train_size == (LM_MAX_BYTES - 1) // 16
  row = trial.run_trial(spec, log=None)
  assert row["status"] == "ok" and row["steps"] == 30
  first, last = first_and_last_loss(row)
  assert first < math.log(256) + 0.5  # about uniform over bytes after 10 steps ...
  assert last < first - 0.4  # ... then it learns the bytes of Python source
  for h in row["eval_history"]:
    assert h["metrics"]["bpb"] == pytest.approx(h["metrics"]["loss"] / math.log(2), rel=1e-5)
  # tokens/s: samples/s (the rate the row's MFU is taken at) x seq_len.
  assert row["tokens_per_example"] == 16 and row["mfu_basis"] == "trial_loop"
  assert row["tokens_per_sec"] == pytest.approx(16 * row["loop_samples_per_sec"])


# --- ResNet: batch statistics, ghost batch norm, augmentation ---------------------------

def images(n=8, size=8, seed=0):
  x = jax.random.normal(jax.random.key(seed), (n, size, size, 3))
  # Different halves: per-half statistics differ from the whole batch's.
  return x.at[n // 2:].multiply(3.0).at[n // 2:].add(1.0)


def test_resnet_batch_statistics_live_in_model_state_and_move_in_training():
  w = get_workload("resnet18_cifar10", {**TINY_RESNET, "data": "synthetic", "augment": False})
  params, state = init(w)
  assert set(state) == {"batch_stats"}
  batch = with_mask({"inputs": images(), "labels": jnp.arange(8) % 10})
  out = w.loss(params, state, batch, jax.random.key(1))
  before = jax.tree.leaves(state)
  after = jax.tree.leaves(out.model_state)
  assert len(before) == len(after) > 0
  assert all(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
  # Eval reads the running averages: an example's loss does not depend on the others
  # in its batch (in training it does, through the batch statistics).
  alone = w.eval_sums(params, out.model_state,
                      with_mask({k: v[:1] for k, v in batch.items() if k != MASK}))
  first_only = w.eval_sums(params, out.model_state, {**batch, MASK: jnp.eye(8)[0]})
  assert alone["count"] == first_only["count"] == 1
  np.testing.assert_allclose(alone["loss"], first_only["loss"], rtol=1e-5)
  train_alone = w.loss(params, state, with_mask({k: v[:2] for k, v in batch.items()
                                                 if k != MASK}), jax.random.key(1))
  train_first = w.loss(params, state, {**batch, MASK: jnp.eye(8)[0] + jnp.eye(8)[1]},
                       jax.random.key(1))
  assert not np.isclose(train_alone.loss_sum, train_first.loss_sum, rtol=1e-4)


def test_per_device_batch_norm_normalises_each_group_on_its_own():
  options = {**TINY_RESNET, "data": "synthetic", "augment": False}
  global_w = get_workload("resnet18_cifar10", options)
  ghost_w = get_workload("resnet18_cifar10", {**options, "bn_group": "per_device",
                                               "bn_groups": 2})
  params, state = init(global_w)
  params2, state2 = init(ghost_w)
  jax.tree.map(np.testing.assert_array_equal, params, params2)  # same variables
  # Non-zero residual scales, so every batch norm affects the logits.
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.5 if "scale" in jax.tree_util.keystr(p) else v, params)
  x, y = images(), jnp.arange(8) % 10
  batch = with_mask({"inputs": x, "labels": y})
  key = jax.random.key(0)
  ghost = ghost_w.loss(params, state, batch, key)
  whole = global_w.loss(params, state, batch, key)
  assert not np.isclose(ghost.loss_sum, whole.loss_sum, rtol=1e-3)
  # Two groups = each half of the batch on its own with ordinary batch norm.
  halves = [global_w.loss(params, state, with_mask({"inputs": x[s], "labels": y[s]}), key)
            for s in (slice(0, 4), slice(4, 8))]
  np.testing.assert_allclose(ghost.loss_sum, halves[0].loss_sum + halves[1].loss_sum,
                             rtol=1e-4)
  # Running averages move towards the mean of the groups' statistics.
  jax.tree.map(lambda g, a, b: np.testing.assert_allclose(g, (a + b) / 2, rtol=1e-4,
                                                          atol=1e-6),
               ghost.model_state, halves[0].model_state, halves[1].model_state)


def test_bn_group_options_are_checked_and_named():
  for options, field in [({"bn_group": "per_host"}, "bn_group"),
                         ({"bn_groups": 4}, "bn_groups"),
                         ({"bn_group": "per_device", "bn_groups": 0}, "bn_groups"),
                         ({"dtype": "float16"}, "dtype"),
                         ({"data": "imagenet"}, "data")]:
    with pytest.raises(ConfigError, match=rf"workload_options\.{field}="):
      get_workload("resnet18_cifar10", {"data": "synthetic", **options})
  # resolve() reports it like any invalid field, before anything is built.
  c = load_config("resnet18_cifar10", "data=synthetic")
  c.workload_options.bn_group = "per_host"
  with pytest.raises(ConfigError, match="workload_options.bn_group='per_host'.*per_device"):
    config_lib.resolve(c, 8)


def crops(image, padding=4):
  """Every crop and flip ``random_crop_flip`` may return for ``image``, by brute force."""
  h, w, _ = image.shape
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  out = []
  for dy in range(2 * padding + 1):
    for dx in range(2 * padding + 1):
      crop = padded[dy:dy + h, dx:dx + w]
      out += [crop, crop[:, ::-1]]
  return out


def test_augmentation_crops_and_flips_deterministically_per_key():
  x = np.asarray(images(n=16))
  a = np.asarray(random_crop_flip(jax.random.key(3), x))
  assert a.shape == x.shape and a.dtype == x.dtype
  np.testing.assert_array_equal(a, random_crop_flip(jax.random.key(3), x))
  b = np.asarray(random_crop_flip(jax.random.key(4), x))
  assert not np.array_equal(a, b)
  changed = [not np.array_equal(a[i], x[i]) for i in range(16)]
  assert sum(changed) >= 12  # 1/162 of draws is the identity
  for i in range(16):  # each output is one of the crops of its own image
    assert any(np.array_equal(a[i], c) for c in crops(x[i]))


def test_augmentation_is_in_the_training_loss_only():
  options = {**TINY_RESNET, "data": "synthetic"}
  aug = get_workload("resnet18_cifar10", options)
  plain = get_workload("resnet18_cifar10", {**options, "augment": False})
  params, state = init(aug)
  batch = with_mask({"inputs": images(), "labels": jnp.arange(8) % 10})
  k1, k2 = jax.random.key(1), jax.random.key(2)
  # Training: the key draws the augmentation (the model has no dropout).
  assert aug.loss(params, state, batch, k1).loss_sum == aug.loss(params, state, batch,
                                                                  k1).loss_sum
  assert aug.loss(params, state, batch, k1).loss_sum != aug.loss(params, state, batch,
                                                                  k2).loss_sum
  assert plain.loss(params, state, batch, k1).loss_sum == plain.loss(params, state, batch,
                                                                      k2).loss_sum
  # Eval sees the images as they are.
  jax.tree.map(np.testing.assert_array_equal, aug.eval_sums(params, state, batch),
               plain.eval_sums(params, state, batch))


def test_resnet_flops_remat_and_bfloat16():
  full = get_workload("resnet18_cifar10", {"data": "synthetic"})
  # ResNet-18, CIFAR stem, 32x32x3, 10 classes: 5.554e8 forward MACs (He et al.'s
  # architecture counted by hand), x 2 FLOPs x 3 for training.
  assert full.flops_per_example == pytest.approx(6 * 5.554e8, rel=1e-3)
  big = get_workload("resnet50_imagenet")
  assert big.synthetic and big.example_spec["inputs"].shape == (224, 224, 3)
  assert big.flops_per_example == pytest.approx(6 * 4.089e9, rel=1e-3)  # 4.1 GMACs

  options = {**TINY_RESNET, "data": "synthetic", "augment": False}
  base = get_workload("resnet18_cifar10", options)
  params, state = init(base)
  batch = with_mask({"inputs": images(), "labels": jnp.arange(8) % 10})
  key = jax.random.key(0)

  def loss_and_grad(w):
    return jax.value_and_grad(lambda p: w.loss(p, state, batch, key).loss_sum)(params)

  loss, grads = loss_and_grad(base)
  r_loss, r_grads = loss_and_grad(get_workload("resnet18_cifar10", {**options, "remat": True}))
  np.testing.assert_allclose(r_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               r_grads, grads)
  bf_loss, bf_grads = loss_and_grad(get_workload("resnet18_cifar10",
                                                 {**options, "dtype": "bfloat16"}))
  assert bf_loss != loss and bf_loss == pytest.approx(float(loss), rel=0.05)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(bf_grads))  # float32 params


# --- the LM: windows, bits per byte, dropout, FLOPs -------------------------------------

def test_lm_windows_are_the_streams_tokens_shifted_by_one(lm_cache):
  w = tiny_lm(lm_cache)
  train, test, _ = pysrc.stdlib_corpus(cache_dir=lm_cache, max_bytes=LM_MAX_BYTES)
  arrays = w.data()
  assert w.train_size == (len(train) - 1) // 16
  indices = jnp.array([[0, 5], [w.train_size - 1, 77]], jnp.int32)
  batch = jax.jit(w.gather)(arrays.train, indices)
  assert set(batch) == set(w.example_spec) == {"inputs", "targets"}
  for name in ("inputs", "targets"):
    assert batch[name].shape == (2, 2, 16) and batch[name].dtype == jnp.int32
  for (r, c), i in np.ndenumerate(np.asarray(indices)):
    start = int(i) * 16  # example i starts at i * seq_len
    np.testing.assert_array_equal(batch["inputs"][r, c], train[start:start + 16])
    np.testing.assert_array_equal(batch["targets"][r, c], train[start + 1:start + 17])
  # The last window ends inside the stream; the test set is the test stream's windows.
  assert (w.train_size - 1) * 16 + 17 <= len(train)
  assert arrays.test["inputs"].shape == (min(256, (len(test) - 1) // 16), 16)
  np.testing.assert_array_equal(arrays.test["inputs"][3], test[48:64])
  np.testing.assert_array_equal(arrays.test["targets"][3], test[49:65])


def test_bits_per_byte_is_the_mean_token_loss_over_ln2(lm_cache):
  w = tiny_lm(lm_cache)
  params, state = init(w)
  assert state == {}
  x = jax.random.randint(jax.random.key(1), (4, 17), 0, 256)
  batch = {"inputs": x[:, :-1], "targets": x[:, 1:],
           MASK: jnp.array([1.0, 1.0, 1.0, 0.0])}
  sums = w.eval_sums(params, state, batch)
  model = lm_workloads.TransformerLM(d_model=32, num_layers=1, num_heads=2, d_ff=64,
                                     max_len=16)
  logits = model.apply({"params": params}, batch["inputs"], train=False)
  log_p = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(log_p, batch["targets"][..., None], -1)[..., 0]
  expected = float(nll[:3].mean(axis=1).sum())  # padding (mask 0) counts nowhere
  assert float(sums["count"]) == 3
  np.testing.assert_allclose(sums["loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(sums["bpb"], expected / math.log(2), rtol=1e-5)


def test_lm_dropout_only_in_training(lm_cache):
  w = tiny_lm(lm_cache, dropout_rate=0.3)
  no_dropout = tiny_lm(lm_cache, dropout_rate=0.0)
  params, state = init(w)
  x = jax.random.randint(jax.random.key(1), (4, 17), 0, 256)
  batch = with_mask({"inputs": x[:, :-1], "targets": x[:, 1:]})
  k1, k2 = jax.random.key(1), jax.random.key(2)
  l1 = w.loss(params, state, batch, k1).loss_sum
  assert l1 == w.loss(params, state, batch, k1).loss_sum  # the step's key decides
  assert l1 != w.loss(params, state, batch, k2).loss_sum
  clean = no_dropout.loss(params, state, batch, k1).loss_sum
  assert clean == no_dropout.loss(params, state, batch, k2).loss_sum
  assert l1 != clean
  # Eval is the dropout-free model.
  np.testing.assert_allclose(w.eval_sums(params, state, batch)["loss"], clean, rtol=1e-6)


def test_lm_flops_tokens_and_synthetic_variant(lm_cache):
  w = tiny_lm(lm_cache)
  params, _ = init(w)
  # 6 x matmul weights (every kernel, plus the tied output projection = the embedding)
  # + 12 x layers x d_model x seq_len per token, x seq_len tokens per example.
  flat = flax.traverse_util.flatten_dict(params)
  kernels = sum(v.size for k, v in flat.items() if k[-1] == "kernel")
  n = kernels + params["embed"]["embedding"].size
  assert w.flops_per_example == 16 * (6 * n + 12 * 1 * 32 * 16)
  assert lm_workloads.tokens_per_example(w) == 16
  assert lm_workloads.tokens_per_example(get_workload("resnet50_imagenet")) is None

  s = get_workload("transformer_lm", {**TINY_LM, "data": "synthetic"})
  assert s.synthetic and s.train_size is None and s.target is None
  batch = s.synthetic_batch(jax.random.key(0), 5)
  for name in ("inputs", "targets"):
    assert batch[name].shape == (5, 16) and batch[name].dtype == jnp.int32
    assert 0 <= int(batch[name].min()) and int(batch[name].max()) < 256
  assert s.flops_per_example == w.flops_per_example


# --- TFDS sources: lazy, and the right shapes under mock data ----------------------------

def test_tfds_variants_open_nothing_until_asked(monkeypatch):
  opened = []
  for module in (resnet_workloads, lm_workloads):
    monkeypatch.setattr(module, "open_source", lambda *a: opened.append(a))
  resnet = get_workload("resnet18_cifar10", {"data_dir": "/nonexistent"})
  lm = get_workload("transformer_lm", {"data": "tfds", "data_dir": "/nonexistent"})
  assert resnet.source == lm.source == "host" and opened == []
  for name, arg in [("resnet18_cifar10", None), ("transformer_lm", "data=tfds")]:
    spec = config_lib.resolve(load_config(name, arg), 8)
    assert spec.target is not None
  assert opened == []
  assert resnet.train_size == 50_000 and resnet.target.metric == "accuracy"


def check_host_data(workload, num_examples):
  host = workload.host_data()
  assert host.num_train == len(host.train) == num_examples and len(host.test) == num_examples
  for source in (host.train, host.test):
    example = {new: source[0][old] for old, new in host.fields.items()}
    out = host.transform(example)
    assert set(out) == set(workload.example_spec)
    for name, spec in workload.example_spec.items():
      assert np.asarray(out[name]).shape == spec.shape, name
      assert np.asarray(out[name]).dtype == spec.dtype, name
  return host


def test_cifar10_host_data_under_mock_data():
  w = get_workload("resnet18_cifar10")
  with tfds.testing.mock_data(num_examples=6):
    host = check_host_data(w, 6)
    raw = host.train[2]["image"]
    image = host.transform({"inputs": raw, "labels": host.train[2]["label"]})["inputs"]
  # Normalised per channel with CIFAR-10's statistics.
  expected = (raw / 255.0 - np.array([0.4914, 0.4822, 0.4465])) / np.array(
      [0.2470, 0.2435, 0.2616])
  np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-5)


def test_lm1b_host_data_under_mock_data():
  w = get_workload("transformer_lm", {**TINY_LM, "data": "tfds"})
  assert set(w.example_spec) == {"inputs", "targets", "weights"}
  with tfds.testing.mock_data(num_examples=4):
    host = check_host_data(w, 4)
    text = host.train[1]["text"]
  text = text.encode() if isinstance(text, str) else bytes(text)
  out = host.transform({"text": text})
  tokens = np.frombuffer(text + b"\0", np.uint8)[:17]
  n = len(tokens) - 1  # targets that are real tokens
  np.testing.assert_array_equal(out["inputs"][:n], tokens[:-1])
  np.testing.assert_array_equal(out["targets"][:n], tokens[1:])
  np.testing.assert_array_equal(out["weights"], (np.arange(16) < n).astype(np.float32))
  # A long text is cut to one window, every target real.
  long = host.transform({"text": "x" * 40})
  assert long["weights"].sum() == 16 and (long["targets"] == ord("x")).all()


# --- decompose: BatchNorm makes the split part of the model ------------------------------

def test_decompose_reports_splits_that_differ_in_batch_norm_statistics(tmp_path):
  # Ghost batch norm: statistics per device shard of each micro-batch. (With the default
  # global statistics only accumulation changes them; 2 devices x no accumulation then
  # computes the same update.)
  bn_group = "per_device"
  c = load_config("resnet18_cifar10", "data=synthetic")
  c.workload = "test_tiny_resnet18"
  c.workload_options = {"bn_group": bn_group}
  c.update(num_devices=2, global_batch=4, steps_per_call=1, warmup_examples=0)
  c.throughput.update(warmup_calls=1, min_windows=3, min_seconds=0.01)
  result = decompose.run_decompose(c, str(tmp_path), log=None)
  rows = {(r["num_devices"], r["accum_steps"]): r for r in result["rows"]}
  assert result["bn_examples"] == 4 and rows[(1, 1)]["equivalent"] is True
  for (devices, accum), r in rows.items():
    # Statistics over each micro-batch, or over each device's shard of it.
    expected = 4 // accum // (devices if bn_group == "per_device" else 1)
    assert r["bn_examples"] == expected
    assert (r["differs"] is None) == (expected == 4), (devices, accum)
    if r["differs"]:
      assert r["equivalent"] is False and not r["fastest"]
  # Global statistics are synchronised across devices: 2 devices compute the same update.
  assert (rows[(2, 1)]["equivalent"] is True) == (bn_group == "global")
  text = decompose.format_decompose(result)
  assert "differ in BatchNorm statistics" in text and "1dev x 2 x accum 2" in text
  assert ("2dev x 2 x accum 1" in text.split("differ in BatchNorm")[1].splitlines()[0]) == (
      bn_group == "per_device")
  assert result["not_equivalent"] == []

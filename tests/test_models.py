"""ResNet and Transformer LM: parameter counts, analytic FLOPs, BN, remat, dtypes, masking."""

import math

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from batchbench.models.resnet import (BasicBlock, BottleneckBlock, GroupBatchNorm, ResNet,
                                      ResNet18, ResNet50, resnet_flops_per_example)
from batchbench.models.transformer import TransformerLM, transformer_flops_per_token

# Tiny sizes keep every test to a few seconds on two CPU cores.
TINY_RESNET = dict(num_classes=10, num_filters=8)
TINY_IMAGES = (4, 8, 8, 3)
TINY_LM = dict(d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=16)


def num_params(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def traced_eqns(fn, *args):
  """Every equation of ``fn``'s jaxpr, descending into nested jaxprs (jit, remat, ...)."""

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn
      for sub in jex.jaxprs_in_params(eqn.params):
        yield from walk(sub)

  return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def matmul_flops(fn, *args) -> int:
  """FLOPs (2 per multiply-accumulate) of every dot and conv in ``fn``'s jaxpr.

  An independent count to check the analytic formulas against: it reads the shapes of the
  traced program, not the architecture's description.
  """
  total = 0
  for eqn in traced_eqns(fn, *args):
    out = eqn.outvars[0].aval.shape if eqn.outvars else ()
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
    elif eqn.primitive.name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      total += 2 * math.prod(out) * math.prod(rhs) // rhs[out_feature_dim]
  return total


def num_checkpoints(fn, *args) -> int:
  """How many ``jax.checkpoint`` (remat) regions ``fn`` traces to."""
  return sum(eqn.primitive.name in ("checkpoint", "remat2") for eqn in traced_eqns(fn, *args))


def perturbed(variables, seed=0, scale=0.1):
  """Variables with noise added, so zero-initialised BN scales do not hide gradients.

  The noise is drawn with numpy: eager JAX would compile one kernel per leaf shape.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: x + scale * rng.standard_normal(x.shape).astype(x.dtype), variables)


def tiny_resnet(block_cls=BasicBlock, **kwargs):
  """Two stages of one block: a plain block and a strided projection block, quick to compile."""
  return ResNet((1, 1), block_cls, **TINY_RESNET, **kwargs)


def init_resnet(model, shape=TINY_IMAGES):
  # Jitted: an eager init compiles every layer's ops one by one, several seconds on CPU.
  return jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))()


def images(shape=TINY_IMAGES, seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


def tokens(seed=0, shape=(2, 16)):
  return jax.random.randint(jax.random.key(seed), shape, 0, 256, jnp.int32)


def init_lm(model):
  return jax.jit(lambda: model.init(jax.random.key(0), tokens(), train=False))()


def train_forward_fn(model):
  """Jitted forward pass with batch statistics (one compile instead of one per op)."""
  return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))


def eval_fn(model):
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


@pytest.fixture(name="resnet_variables", scope="module")
def fixture_resnet_variables():
  """Perturbed variables of ``tiny_resnet()``, shared because each init costs a compile.

  They fit any bn_groups, remat or dtype setting: none of these changes the variables.
  """
  return perturbed(init_resnet(tiny_resnet()))


@pytest.fixture(name="lm_variables", scope="module")
def fixture_lm_variables():
  """Variables of ``TransformerLM(**TINY_LM)``, whatever its dtype, dropout or remat."""
  return init_lm(TransformerLM(**TINY_LM))


# ResNet ----------------------------------------------------------------------------------------


def test_resnet18_cifar_param_count():
  shapes = jax.eval_shape(lambda: init_resnet(ResNet18(num_classes=10), (1, 32, 32, 3)))
  assert num_params(shapes["params"]) == 11_173_962


def test_resnet50_param_count():
  shapes = jax.eval_shape(lambda: init_resnet(ResNet50(num_classes=1000), (1, 224, 224, 3)))
  assert num_params(shapes["params"]) == 25_557_032


def test_resnet_flops_match_published_figures():
  r50 = resnet_flops_per_example(ResNet50(num_classes=1000), (224, 224, 3))
  r18 = resnet_flops_per_example(ResNet18(num_classes=10), (32, 32, 3))
  # Training = 3 x forward, forward = 2 x MACs; published forward MACs: 4.1e9 and 0.56e9.
  assert r50 / 6 == pytest.approx(4.1e9, rel=0.05)
  assert r18 / 6 == pytest.approx(0.56e9, rel=0.05)


@pytest.mark.parametrize("block_cls,stem,hw", [
    (BasicBlock, "cifar", 8), (BasicBlock, "imagenet", 19),
    (BottleneckBlock, "imagenet", 17), (BottleneckBlock, "cifar", 9)])
def test_resnet_flops_match_traced_program(block_cls, stem, hw):
  model = ResNet((2, 1, 1), block_cls, num_classes=7, num_filters=4, stem=stem)
  x = jnp.zeros((2, hw, hw, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  traced = matmul_flops(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert resnet_flops_per_example(model, (hw, hw, 3)) == 3 * traced / 2


def test_group_batchnorm_one_group_matches_flax_batchnorm():
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (6, 3, 3, 5))
  ours = GroupBatchNorm(num_groups=1, momentum=0.9, epsilon=1e-5)
  theirs = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
  variables = perturbed(ours.init(jax.random.key(1), x, use_running_average=False))
  y_ours, s_ours = ours.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  y_theirs, s_theirs = theirs.apply(variables, x, use_running_average=False,
                                    mutable=["batch_stats"])
  np.testing.assert_allclose(y_ours, y_theirs, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s_ours, s_theirs)
  np.testing.assert_allclose(ours.apply(variables, x, use_running_average=True),
                             theirs.apply(variables, x, use_running_average=True), atol=1e-5)


def test_ghost_batchnorm_normalises_each_group_on_its_own(resnet_variables):
  model = tiny_resnet(bn_groups=2)
  whole = tiny_resnet()
  variables = resnet_variables
  x = images()
  y, stats = train_forward_fn(model)(variables, x)
  y_a, stats_a = train_forward_fn(whole)(variables, x[:2])
  y_b, stats_b = train_forward_fn(whole)(variables, x[2:])
  np.testing.assert_allclose(y, jnp.concatenate([y_a, y_b]), atol=1e-4)
  # The running-average update is linear in the statistics: mean over groups.
  jax.tree.map(lambda s, a, b: np.testing.assert_allclose(s, (a + b) / 2, atol=1e-5),
               stats, stats_a, stats_b)


def test_bn_groups_must_divide_the_batch(resnet_variables):
  model = tiny_resnet(bn_groups=3)
  with pytest.raises(ValueError, match="bn_groups=3"):
    train_forward_fn(model)(resnet_variables, images())


def test_batchnorm_under_sharded_jit(num_devices):
  """G=1 reduces over the global batch across devices; G=devices is per-device BN."""
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  x = jax.random.normal(jax.random.key(0), (2 * num_devices, 2, 2, 3))
  x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch")))
  for groups in (1, num_devices):
    bn = GroupBatchNorm(num_groups=groups)
    variables = bn.init(jax.random.key(1), x, use_running_average=False)
    fn = jax.jit(lambda v, x, bn=bn: bn.apply(v, x, use_running_average=False,
                                              mutable=["batch_stats"]))
    y, stats = fn(variables, x_sharded)
    if groups == 1:
      expected = (x - x.mean((0, 1, 2))) / jnp.sqrt(x.var((0, 1, 2)) + 1e-5)
    else:
      per_device = x.reshape(num_devices, 2, 2, 2, 3)
      mean = per_device.mean((1, 2, 3), keepdims=True)
      var = per_device.var((1, 2, 3), keepdims=True)
      expected = ((per_device - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    np.testing.assert_allclose(stats["batch_stats"]["mean"], 0.1 * x.mean((0, 1, 2)), atol=1e-6)


def test_resnet_eval_uses_running_averages(resnet_variables):
  model = tiny_resnet()
  variables = resnet_variables
  x = images()
  alone = eval_fn(model)(variables, x[:1])
  batched = eval_fn(model)(variables, x)[:1]
  np.testing.assert_allclose(alone, batched, atol=1e-5)
  # With batch statistics, an example's logits depend on the rest of its batch.
  train_alone, _ = train_forward_fn(model)(variables, x[:2])
  train_batched, _ = train_forward_fn(model)(variables, x)
  assert not np.allclose(train_alone[:1], train_batched[:1], atol=1e-3)


@pytest.mark.parametrize("block_cls", [BasicBlock, BottleneckBlock])
def test_resnet_remat_matches_plain(block_cls):
  x, labels = images(), jnp.arange(4) % 10
  variables = perturbed(init_resnet(tiny_resnet(block_cls)))
  results = []
  for remat in (False, True):
    model = tiny_resnet(block_cls, remat=remat)

    def loss_fn(params, model=model, variables=variables):
      logits, stats = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, train=True, mutable=["batch_stats"])
      loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
      return loss, stats

    # One checkpoint region per block: two blocks in tiny_resnet.
    assert num_checkpoints(loss_fn, variables["params"]) == (2 if remat else 0)
    (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"])
    results.append((loss, stats, grads))
  (loss0, stats0, grads0), (loss1, stats1, grads1) = results
  np.testing.assert_allclose(loss0, loss1, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), stats0, stats1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads0, grads1)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads0)) > 1e-3


def test_resnet_bfloat16_compute_keeps_float32_params(resnet_variables):
  model = tiny_resnet(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda: init_resnet(model))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  variables = resnet_variables
  logits, stats = train_forward_fn(model)(variables, images())
  assert logits.dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(stats)} == {jnp.dtype(jnp.float32)}
  reference, _ = train_forward_fn(tiny_resnet())(variables, images())
  np.testing.assert_allclose(logits, reference, atol=0.1)


def test_resnet_rejects_unknown_stem():
  with pytest.raises(ValueError, match="stem='vit'"):
    init_resnet(tiny_resnet(stem="vit"))


# Transformer -----------------------------------------------------------------------------------


def test_transformer_is_causal(lm_variables):
  model = TransformerLM(**TINY_LM)
  variables = lm_variables
  t = 6
  a, b = tokens(1), tokens(2)
  changed = a.at[:, t + 1:].set(b[:, t + 1:])
  logits_a = eval_fn(model)(variables, a)
  logits_changed = eval_fn(model)(variables, changed)
  np.testing.assert_allclose(logits_a[:, :t + 1], logits_changed[:, :t + 1], atol=1e-5)
  assert not np.allclose(logits_a[:, t + 1:], logits_changed[:, t + 1:], atol=1e-3)


def test_transformer_dropout_only_when_training(lm_variables):
  model = TransformerLM(**TINY_LM, dropout_rate=0.1)
  variables = lm_variables
  x = tokens(1)
  key_a, key_b = jax.random.key(10), jax.random.key(11)
  eval_a = model.apply(variables, x, train=False, rngs={"dropout": key_a})
  eval_b = model.apply(variables, x, train=False, rngs={"dropout": key_b})
  np.testing.assert_array_equal(eval_a, eval_b)
  np.testing.assert_array_equal(eval_a, model.apply(variables, x, train=False))
  train_a = model.apply(variables, x, train=True, rngs={"dropout": key_a})
  train_a2 = model.apply(variables, x, train=True, rngs={"dropout": key_a})
  train_b = model.apply(variables, x, train=True, rngs={"dropout": key_b})
  np.testing.assert_array_equal(train_a, train_a2)
  assert not np.allclose(train_a, train_b, atol=1e-3)
  assert not np.allclose(train_a, eval_a, atol=1e-3)


def test_transformer_remat_matches_plain(lm_variables):
  x = tokens(1)
  results = []
  for remat in (False, True):
    model = TransformerLM(**TINY_LM, remat=remat)
    params = lm_variables["params"]

    def loss_fn(params, model=model):
      logits = model.apply({"params": params}, x[:, :-1], train=True,
                           rngs={"dropout": jax.random.key(3)})
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, 1:, None], -1))

    assert num_checkpoints(loss_fn, params) == (TINY_LM["num_layers"] if remat else 0)
    results.append(jax.jit(jax.value_and_grad(loss_fn))(params))
  (loss0, grads0), (loss1, grads1) = results
  np.testing.assert_allclose(loss0, loss1, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads0, grads1)


def test_transformer_bfloat16_compute_keeps_float32_params(lm_variables):
  model = TransformerLM(**TINY_LM, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda: init_lm(model))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  variables = lm_variables
  logits = eval_fn(model)(variables, tokens(1))
  assert logits.dtype == jnp.float32
  reference = eval_fn(TransformerLM(**TINY_LM))(variables, tokens(1))
  np.testing.assert_allclose(logits, reference, atol=0.1)


def test_transformer_output_projection_is_tied(lm_variables):
  params = lm_variables["params"]
  assert set(params) == {"embed", "pos_embed", "ln_final", "block1", "block2"}


def test_transformer_flops_match_traced_program():
  batch, seq_len = 2, 12
  model = TransformerLM(**TINY_LM)
  x = tokens(1, (batch, seq_len))
  variables = jax.eval_shape(lambda: init_lm(model))
  traced = matmul_flops(lambda v, x: model.apply(v, x, train=False), variables, x)
  # The traced forward pass holds every matmul once; training is 3 x forward.
  assert transformer_flops_per_token(model, seq_len) == 3 * traced / (batch * seq_len)


def test_transformer_rejects_too_long_sequences():
  model = TransformerLM(**TINY_LM)
  with pytest.raises(ValueError, match="max_len=16"):
    model.init(jax.random.key(0), tokens(0, (1, 17)), train=False)

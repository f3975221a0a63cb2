"""The diffusion workload: beta schedules, samplers, the Frechet distance, the cached feature
classifier, and digits_ddpm training under the harness."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from conftest import load_config

from batchbench import config as config_lib
from batchbench.config import ConfigError
from batchbench.core.program import ProgramCache
from batchbench.data.arrays import MASK
from batchbench.models.ddpm import NoiseMLP
from batchbench.runs import trial
from batchbench.workloads import diffusion, frechet, get_workload, workload_names
from batchbench.workloads import ddpm_sampling as ds

TINY_CLASSIFIER = {**frechet.CLASSIFIER_SETTINGS, "steps": 40, "hidden": 32, "features": 8}
TINY_OPTIONS = {"width": 32, "num_blocks": 1, "time_dim": 16, "num_timesteps": 20,
                "eval_samples": 32, "eval_sampler_steps": 5, "ema_examples": 256}


@pytest.fixture(name="tiny_classifier")
def fixture_tiny_classifier(monkeypatch, tmp_path):
  """A quick-to-train FD classifier, cached in a fresh directory (returned)."""
  monkeypatch.setattr(frechet, "CLASSIFIER_SETTINGS", TINY_CLASSIFIER)
  return str(tmp_path / "cache")


def tiny_config(cache_dir, **fields):
  c = load_config("digits_ddpm")
  c.workload_options.update({**TINY_OPTIONS, "cache_dir": cache_dir})
  c.num_devices = 1
  c.global_batch = 64
  c.warmup_examples = 0
  c.base_lr = 3e-3
  c.eval_every_examples = 64 * 40
  c.max_examples = None
  c.max_steps = 80
  for k, v in fields.items():
    c[k] = v
  return c


# --- schedules and timesteps --------------------------------------------------------------

def test_linear_schedule_is_hos_scaled_to_t():
  betas = ds.beta_schedule("linear", 250)
  assert betas[0] == pytest.approx(4 * 1e-4) and betas[-1] == pytest.approx(4 * 0.02)
  assert np.allclose(np.diff(betas), (4 * 0.02 - 4 * 1e-4) / 249)
  short = ds.beta_schedule("linear", 10)  # 100 x 0.02 would pass 1
  assert short.max() == 0.999 and np.all(ds.alphas_bar(short) > 0)


def test_cosine_alpha_bar_is_the_squared_cosine_ratio():
  t = 100
  f = lambda u: math.cos((u / t + 0.008) / 1.008 * math.pi / 2) ** 2
  a = ds.alphas_bar(ds.beta_schedule("cosine", t))
  expected = np.array([f(i + 1) / f(0) for i in range(t)])
  unclipped = ds.beta_schedule("cosine", t) < 0.999
  assert unclipped[:-1].all()  # only the last beta is clipped
  assert np.allclose(a[:-1], expected[:-1], rtol=1e-10)
  assert np.all(np.diff(a) < 0) and 0 < a[-1] < 1e-4


@pytest.mark.parametrize("name,steps", [("cosine", 1), ("sigmoid", 10)])
def test_bad_schedules_raise(name, steps):
  with pytest.raises(ValueError):
    ds.beta_schedule(name, steps)


def test_sampler_timesteps():
  assert list(ds.sampler_timesteps(10, 10)) == list(range(10))
  assert list(ds.sampler_timesteps(10, 1)) == [9]
  ts = ds.sampler_timesteps(1000, 37)
  assert len(set(ts)) == 37 and ts[0] == 0 and ts[-1] == 999 and np.all(np.diff(ts) > 0)
  for bad in (0, 11):
    with pytest.raises(ValueError, match="sampler_steps"):
      ds.sampler_timesteps(10, bad)


# --- samplers -----------------------------------------------------------------------------

def _keys(seed, n):
  return ds.image_keys(seed, jnp.arange(n, dtype=jnp.int32))


# One compile per (eta, clip) and shapes: the sampler is a scan over steps.
_sample = jax.jit(ds.sample, static_argnames=("eps_fn", "image_shape", "eta", "clip"))


def test_ddpm_with_all_steps_is_hos_ancestral_sampler():
  """eta = 1 over every timestep equals Ho et al.'s posterior mean and variance, computed
  here in float64 with the same noise draws."""
  t, shape, n = 12, (2, 3), 4
  betas = ds.beta_schedule("cosine", t)
  a = ds.alphas_bar(betas)
  eps_fn = lambda x, ts: 0.4 * x + 0.05 * ts[:, None, None].astype(jnp.float32) / t
  keys = _keys(7, n)
  got = ds.sample(eps_fn, jnp.asarray(a, jnp.float32), jnp.arange(t), keys, shape, 1.0)
  noise = lambda j: np.asarray(jax.vmap(
      lambda k: jax.random.normal(jax.random.fold_in(k, j), shape))(keys), np.float64)
  x = noise(0)
  for step in range(t - 1, -1, -1):
    a_t, a_prev = a[step], a[step - 1] if step > 0 else 1.0
    eps = 0.4 * x + 0.05 * step / t
    x0 = np.clip((x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t), -1, 1)
    mean = (np.sqrt(a_prev) * betas[step] / (1 - a_t) * x0
            + np.sqrt(1 - betas[step]) * (1 - a_prev) / (1 - a_t) * x)
    var = (1 - a_prev) / (1 - a_t) * betas[step]
    x = mean + (np.sqrt(var) * noise(step + 1) if step > 0 else 0.0)
  assert np.isfinite(x).all()
  np.testing.assert_allclose(np.asarray(got), x, atol=2e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_samplers_with_the_exact_denoiser_reproduce_gaussian_data(eta):
  """For data N(mu, s^2) the optimal noise prediction is known in closed form; both
  samplers must then produce samples with that mean and spread."""
  mu, s, t = 0.3, 0.2, 200
  a = jnp.asarray(ds.alphas_bar(ds.beta_schedule("cosine", t)), jnp.float32)

  def eps_fn(x, ts):
    at = a[ts][:, None]
    return jnp.sqrt(1 - at) * (x - jnp.sqrt(at) * mu) / (at * s**2 + 1 - at)

  out = np.asarray(ds.sample(eps_fn, a, jnp.arange(t), _keys(0, 2000), (8,), eta, clip=False))
  assert abs(out.mean() - mu) < 0.01
  assert out.std() == pytest.approx(s, rel=0.05)


def test_ddim_is_deterministic_and_ddpm_is_not():
  a = jnp.asarray(ds.alphas_bar(ds.beta_schedule("cosine", 30)), jnp.float32)
  eps_fn = lambda x, ts: 0.5 * x
  run = lambda seed, eta, clip=True: np.asarray(
      _sample(eps_fn, a, jnp.arange(30), _keys(seed, 8), image_shape=(4,), eta=eta, clip=clip))
  np.testing.assert_array_equal(run(0, 0.0), run(0, 0.0))
  np.testing.assert_array_equal(run(0, 1.0), run(0, 1.0))
  # With the noise prediction 0.5 x and no clipping, each DDIM step scales x by the same
  # factor for every image: the output is a function of x_T alone, and no later noise.
  x_t = np.asarray(jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), (4,)))(
      _keys(0, 8)))
  ratio = run(0, 0.0, False) / x_t
  assert np.allclose(ratio, ratio.flat[0], rtol=1e-4)
  assert not np.allclose(run(0, 1.0), run(1, 1.0))


def test_same_seed_same_image_at_any_batch_size():
  """DDPM, the sampler that draws noise at every step (generate's test covers DDIM too)."""
  model = NoiseMLP(width=16, num_blocks=1, time_dim=8)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8)), jnp.zeros((1,), jnp.int32))
  fn = ds.sampler_fn(model, "cosine", 20, 6, "ddpm", (8, 8))
  whole = np.asarray(fn(params["params"], np.int32(3), np.arange(7, dtype=np.int32)))
  for size in (3,):  # three batches, the last padded with images 7 and 8
    parts = [np.asarray(fn(params["params"], np.int32(3),
                           np.arange(j, j + size, dtype=np.int32))) for j in range(0, 7, size)]
    np.testing.assert_allclose(np.concatenate(parts)[:7], whole, atol=1e-5)
  other_seed = np.asarray(fn(params["params"], np.int32(4), np.arange(7, dtype=np.int32)))
  assert np.abs(other_seed - whole).max() > 0.1


# --- Frechet distance and the classifier ---------------------------------------------------

def test_frechet_distance_of_a_set_with_itself_is_zero_and_a_shift_adds_its_square():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16))
  assert frechet.frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-8)
  shift = rng.standard_normal(16)
  assert frechet.frechet_distance_of(x, x + shift) == pytest.approx(shift @ shift, rel=1e-7)
  assert frechet.frechet_distance_of(x, 2 * x) > frechet.frechet_distance_of(x, 1.5 * x) > 0


def test_frechet_distance_matches_the_sqrtm_formula_and_diagonal_case():
  rng = np.random.default_rng(1)
  m1, m2 = rng.standard_normal((2, 6))
  c1, c2 = (m @ m.T + 0.1 * np.eye(6) for m in rng.standard_normal((2, 6, 6)))
  want = (m1 - m2) @ (m1 - m2) + np.trace(c1 + c2 - 2 * np.real(scipy.linalg.sqrtm(c1 @ c2)))
  assert frechet.frechet_distance(m1, c1, m2, c2) == pytest.approx(want, rel=1e-8)
  d1, d2 = rng.uniform(0.5, 2, (2, 6))
  diag = (m1 - m2) @ (m1 - m2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
  assert frechet.frechet_distance(m1, np.diag(d1), m2, np.diag(d2)) == pytest.approx(diag)
  singular = np.outer(m1, m1)  # rank one: no NaN, no complex part
  assert np.isfinite(frechet.frechet_distance(m1, singular, m2, singular))


def test_classifier_is_deterministic_and_its_cache_is_reused(tiny_classifier, monkeypatch):
  first = frechet.load_classifier(tiny_classifier)
  path = frechet.classifier_path(tiny_classifier)
  assert path.startswith(tiny_classifier) and path.endswith(".npz")
  again = frechet.train_classifier()
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)

  def refuse(*args, **kwargs):
    raise AssertionError("retrained although the cache holds the classifier")

  monkeypatch.setattr(frechet, "train_classifier", refuse)
  cached = frechet.load_classifier(tiny_classifier)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(cached), strict=True):
    np.testing.assert_array_equal(a, b)
  _, _, test_x, test_y = frechet.digits_images()
  assert frechet.classifier_accuracy(cached, test_x, test_y) > 0.5  # 40 steps: well above 0.1


# --- the workload -------------------------------------------------------------------------

def test_digits_ddpm_is_registered_and_bad_options_are_config_errors(tiny_classifier):
  assert "digits_ddpm" in workload_names()
  w = get_workload("digits_ddpm", {"cache_dir": tiny_classifier})
  assert w.metrics["fd"].direction == "min" and w.metrics["fd"].high == float("inf")
  assert w.target.metric == "fd" and w.target.direction == "min"
  for option, value in (("schedule", "sigmoid"), ("eval_sampler", "euler"),
                        ("eval_sampler_steps", 500), ("eval_samples", 1)):
    c = tiny_config(tiny_classifier)
    c.workload_options[option] = value
    with pytest.raises(ConfigError, match=f"workload_options.*{option}"):
      config_lib.resolve(c, 1)


def test_eval_loss_does_not_depend_on_position_and_ema_on_splitting(tiny_classifier):
  w = get_workload("digits_ddpm", {**TINY_OPTIONS, "cache_dir": tiny_classifier})
  params, state = jax.jit(lambda k: w.init(k, w.batch_spec(1)))(jax.random.key(0))
  eval_sums, loss = jax.jit(w.eval_sums), jax.jit(w.loss)
  test = {k: jnp.asarray(v[:40]) for k, v in w.data().test.items()}
  test[MASK] = jnp.ones(40)
  # Each test image's timestep and noise come from its index, not its place in a batch.
  reordered = {k: v[::-1] for k, v in test.items()}
  assert float(eval_sums(params, state, reordered)["loss"]) == pytest.approx(
      float(eval_sums(params, state, test)["loss"]), rel=1e-5)
  # The EMA moves per example: two micro-batches (of 20 real examples each) at the same
  # params equal one batch of 40.
  moved = jax.tree.map(lambda p: p + 1.0, params)
  first, second = ({**test, MASK: (jnp.arange(40) < 20) == keep} for keep in (True, False))
  first, second = ({**b, MASK: b[MASK].astype(jnp.float32)} for b in (first, second))
  one = loss(moved, state, test, jax.random.key(1)).model_state
  two = loss(moved, loss(moved, state, first, jax.random.key(1)).model_state, second,
             jax.random.key(2)).model_state
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  weight = 1 - math.exp(-40 / TINY_OPTIONS["ema_examples"])
  leaf = lambda t: np.asarray(jax.tree.leaves(t)[0])
  np.testing.assert_allclose(leaf(one[diffusion.EMA]), leaf(params) + weight, atol=1e-6)


def test_training_lowers_the_loss_and_evaluate_is_deterministic(tiny_classifier):
  # Target FD 0 is never met: the trial runs its 80 steps.
  spec = config_lib.resolve(tiny_config(tiny_classifier, target_value=0.0),
                            jax.local_device_count())
  cache = ProgramCache()
  row = trial.run_trial(spec, log=None, cache=cache)
  history = row["eval_history"]
  assert [h["step"] for h in history] == [40, 80]
  program, hit = cache.get(spec)
  assert hit
  state = program.init_state(spec.seed, spec.lr)
  first = program.evaluate(state)
  assert set(first) == {"fd", "loss"} and first["fd"] >= 0
  assert program.evaluate(state) == first  # fixed sampler seed: the same number
  assert history[-1]["metrics"]["loss"] < 0.7 * first["loss"]
  assert all(np.isfinite(h["metrics"]["fd"]) for h in history)

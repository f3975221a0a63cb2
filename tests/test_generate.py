"""``batchbench generate``: batch size x batch count for N images of a trained DDPM."""

import json
import os

import numpy as np
import pytest
from conftest import load_config

from batchbench import config as config_lib
from batchbench.config import ConfigError
from batchbench.fmt import to_jsonable
from batchbench.runs import generate
from batchbench.workloads import frechet

TINY_CLASSIFIER = {**frechet.CLASSIFIER_SETTINGS, "steps": 20, "hidden": 16, "features": 4}
N = 5


def tiny_config(cache_dir, **options):
  c = load_config("digits_ddpm")
  c.workload_options.update({"width": 16, "num_blocks": 1, "time_dim": 8, "num_timesteps": 20,
                             "eval_samples": 16, "eval_sampler_steps": 3, "ema_examples": 64,
                             "cache_dir": cache_dir, **options})
  c.num_devices = 1
  c.global_batch = 32
  c.warmup_examples = 0
  c.max_examples = None
  c.max_steps = 4
  c.target_value = 0.0
  return c


@pytest.fixture(name="first_run", scope="module")
def fixture_first_run(tmp_path_factory):
  """One generate run without a checkpoint: it trains the config's (tiny) trial first."""
  root = tmp_path_factory.mktemp("generate")
  lines = []
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(frechet, "CLASSIFIER_SETTINGS", TINY_CLASSIFIER)
    config = tiny_config(str(root / "cache"))
    result = generate.run_generate(config, str(root / "work"), num_images=N,
                                   batch_sizes="2,8", sampler="ddim", sampler_steps=4,
                                   save_images=True, repeats=2, log=lines.append)
  return {"config": config, "workdir": str(root / "work"), "result": result, "log": lines}


def test_trains_first_then_same_images_at_every_batch_size(first_run):
  result, log = first_run["result"], "\n".join(first_run["log"])
  assert "no --checkpoint: training the config's trial first" in log
  assert result["model"]["trained_now"] and result["model"]["step"] == 4
  rows = result["rows"]
  assert [(r["batch_size"], r["batch_count"]) for r in rows] == [(2, 3), (8, 1)]
  assert all(len(r["latencies_s"]) == 2 and len(r["latencies_s"][0]) == r["batch_count"]
             for r in rows)
  files = result["files"]
  images = {b: np.load(files[f"images_b{b}"]) for b in (2, 8)}
  assert images[2].shape == (N, 8, 8)
  np.testing.assert_allclose(images[8], images[2], atol=1e-5)
  assert np.abs(images[2][0] - images[2][1]).max() > 0.1  # distinct images, not one repeated
  with open(files["jsonl"], encoding="utf-8") as f:
    assert [json.loads(line)["batch_size"] for line in f] == [2, 8]
  for kind in ("json", "csv", "png", "grid"):
    assert os.path.getsize(files[kind]) > 0
  best = result["answer"]
  fastest = min(rows, key=lambda r: r["total_s"])
  assert (best["batch_size"], best["batch_count"]) == (fastest["batch_size"],
                                                        fastest["batch_count"])
  assert f"use batch size {best['batch_size']} and batch count {best['batch_count']}" in (
      best["text"])
  assert best["text"] in generate.format_generate(result)


def test_reuses_the_trained_trial_and_a_checkpoint_with_a_budget(first_run, monkeypatch):
  monkeypatch.setattr(frechet, "CLASSIFIER_SETTINGS", TINY_CLASSIFIER)
  config, workdir = first_run["config"], first_run["workdir"]
  lines = []
  again = generate.run_generate(config, workdir, num_images=N, batch_sizes=[1], sampler="ddim",
                                sampler_steps=4, repeats=1, save_images=True,
                                log=lines.append)
  assert "already trained" in "\n".join(lines) and not again["model"]["trained_now"]
  np.testing.assert_allclose(np.load(again["files"]["images_b1"]),
                             np.load(first_run["result"]["files"]["images_b2"]), atol=1e-5)
  peaks = {r["batch_size"]: r["peak_bytes"] for r in first_run["result"]["rows"]}
  assert peaks[8] > peaks[2]
  budget = (peaks[2] + peaks[8]) // 2
  lines = []
  out = generate.run_generate(config, workdir, num_images=N, batch_sizes="2,8",
                              sampler="ddim", sampler_steps=4, repeats=1,
                              checkpoint=again["model"]["checkpoint"],
                              memory_budget_bytes=budget, log=lines.append)
  assert f"model from {again['model']['checkpoint']}" in "\n".join(lines)
  statuses = {r["batch_size"]: r["status"] for r in out["rows"]}
  assert statuses == {2: "ok", 8: "over_budget"}
  assert out["budget"]["largest_tried"] == 2 and out["answer"]["batch_size"] == 2


# --- input checks: before anything is compiled or written -----------------------------------

@pytest.mark.parametrize("field,kwargs", [
    ("num_images", {"num_images": 0}),
    ("batch_sizes", {"batch_sizes": "0,2"}),
    ("batch_sizes", {"batch_sizes": "two"}),
    ("batch_sizes", {"batch_sizes": "3:8"}),
    ("sampler", {"sampler": "euler"}),
    ("sampler_steps", {"sampler_steps": 0}),
    ("sampler_steps", {"sampler_steps": 21}),
    ("checkpoint", {"checkpoint": "/nonexistent/trial"}),
])
def test_bad_input_is_a_config_error(tmp_path, no_compile, field, kwargs):
  del no_compile
  args = {"num_images": 4, "batch_sizes": "1,2", "sampler": "ddim", "sampler_steps": 4, **kwargs}
  with pytest.raises(ConfigError, match=f"invalid config: {field}=") as e:
    generate.run_generate(tiny_config(str(tmp_path / "c")), str(tmp_path / "w"), **args)
  assert e.value.valid  # says what is valid
  assert not os.path.exists(tmp_path / "w")


def test_a_checkpoint_of_another_model_or_workload_is_refused(tmp_path, no_compile):
  del no_compile
  other = config_lib.resolve(tiny_config(None, width=24), 1)
  trial_dir = tmp_path / "trial"
  os.makedirs(trial_dir / "checkpoints" / "4")
  (trial_dir / "spec.json").write_text(json.dumps({"spec": to_jsonable(other.identity())}))
  with pytest.raises(ConfigError, match="checkpoint=.*trained as workload digits_ddpm"):
    generate.run_generate(tiny_config(None), str(tmp_path / "w"), num_images=2,
                          batch_sizes="1", sampler="ddim", sampler_steps=2,
                          checkpoint=str(trial_dir))
  (trial_dir / "spec.json").unlink()
  with pytest.raises(ConfigError, match="spec.json"):
    generate.run_generate(tiny_config(None), str(tmp_path / "w"), num_images=2,
                          batch_sizes="1", sampler="ddim", sampler_steps=2,
                          checkpoint=str(trial_dir))
  with pytest.raises(ConfigError, match="workload=.*generates no images"):
    generate.run_generate(load_config("digits_mlp"), str(tmp_path / "w"), num_images=2,
                          batch_sizes="1", sampler="ddim", sampler_steps=2)
  assert not os.path.exists(tmp_path / "w")


def test_batch_sizes_and_batches():
  assert generate.parse_batch_sizes(None, 5) == (1, 2, 4, 5)
  assert generate.parse_batch_sizes("1:64", 64) == (1, 2, 4, 8, 16, 32, 64)
  assert generate.parse_batch_sizes("8, 2,2", 3) == (2, 8)
  assert [list(b) for b in generate.batch_indices(5, 2)] == [[0, 1], [2, 3], [4, 5]]


def test_largest_within_budget_reads_the_line_through_the_peaks():
  rows = [{"batch_size": b, "peak_bytes": 1000 + 300 * b} for b in (1, 2, 4, 8)]
  got = generate.largest_within_budget(rows, 3000)
  assert got["largest_tried"] == 4  # 2,200 fits, 3,400 does not
  assert got["predicted"] == 6  # 1000 + 300 x 6 = 2,800 <= 3,000 < 3,100
  assert got["bytes_per_image"] == pytest.approx(300)
  assert generate.largest_within_budget(rows, None)["largest_tried"] is None

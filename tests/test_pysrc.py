"""The stdlib-sources LM corpus: determinism, caching, the file-level split, the byte stream."""

import glob
import hashlib
import os
import sysconfig

import numpy as np
import pytest

from batchbench.data import pysrc

# A small cap keeps each build to a few dozen files.
MAX_BYTES = 200_000


def corpus(cache_dir, **kwargs):
  kwargs.setdefault("max_bytes", MAX_BYTES)
  return pysrc.stdlib_corpus(cache_dir=str(cache_dir), **kwargs)


def in_test_split(relpath, test_fraction):
  """The documented rule, written out independently of the module."""
  h = hashlib.sha256(relpath.encode()).digest()
  return int.from_bytes(h[:8], "big") / 2**64 < test_fraction


def test_tokens_are_bytes_of_the_capped_length(tmp_path):
  train, test, info = corpus(tmp_path)
  for tokens in (train, test):
    assert tokens.dtype == np.uint8 and tokens.ndim == 1
  assert train.size == MAX_BYTES and test.size == MAX_BYTES // 10
  assert info["train_bytes"] == train.size and info["test_bytes"] == test.size
  assert info["num_files"] == info["num_train_files"] + info["num_test_files"]


def test_same_corpus_from_separate_builds(tmp_path):
  train_a, test_a, info_a = corpus(tmp_path / "a")
  train_b, test_b, info_b = corpus(tmp_path / "b")
  np.testing.assert_array_equal(train_a, train_b)
  np.testing.assert_array_equal(test_a, test_b)
  assert info_a == info_b


def test_second_call_reads_the_cache(tmp_path, monkeypatch):
  train, test, info = corpus(tmp_path)
  assert len(glob.glob(str(tmp_path / "pysrc_*.npz"))) == 1

  def no_source_reads(path):
    raise AssertionError(f"read {path} although the corpus was cached")
  monkeypatch.setattr(pysrc, "_read_bytes", no_source_reads)
  train_c, test_c, info_c = corpus(tmp_path)
  np.testing.assert_array_equal(train, train_c)
  np.testing.assert_array_equal(test, test_c)
  assert info == info_c


def test_split_is_by_file_and_follows_the_path_hash(tmp_path):
  _, _, info = corpus(tmp_path, test_fraction=0.2)
  train_files, test_files = set(info["train_files"]), set(info["test_files"])
  assert train_files and test_files
  assert not train_files & test_files
  assert all(in_test_split(f, 0.2) for f in test_files)
  assert not any(in_test_split(f, 0.2) for f in train_files)


def test_test_fraction_holds_over_the_whole_stdlib():
  files = [rel for rel, _ in pysrc.stdlib_files()]
  assert len(files) > 500
  held_out = sum(in_test_split(f, 0.05) for f in files) / len(files)
  assert 0.02 < held_out < 0.09


def test_stream_is_the_files_joined_by_separators(tmp_path):
  train, _, info = corpus(tmp_path)
  root = sysconfig.get_paths()["stdlib"]
  sources = []
  for rel in info["train_files"]:
    with open(os.path.join(root, rel), "rb") as f:
      sources.append(f.read() + b"\x00")
  assert train.tobytes() == b"".join(sources)[:MAX_BYTES]
  # No more files than the cap needs: only the last one is cut short.
  assert len(b"".join(sources[:-1])) < MAX_BYTES


def test_only_stdlib_python_files():
  root = os.path.realpath(sysconfig.get_paths()["stdlib"])
  files = [rel for rel, _ in pysrc.stdlib_files()]
  assert files == sorted(files)
  assert "os.py" in files and "json/__init__.py" in files
  for rel in files:
    assert rel.endswith(".py")
    assert not {"site-packages", "dist-packages"} & set(rel.split("/"))
    assert os.path.realpath(os.path.join(root, rel)).startswith(root + os.sep)


def test_unreadable_cache_is_rebuilt(tmp_path):
  train, test, _ = corpus(tmp_path)
  (path,) = glob.glob(str(tmp_path / "pysrc_*.npz"))
  with open(path, "wb") as f:
    f.write(b"PK\x03\x04 not a zip archive")
  train_r, test_r, _ = corpus(tmp_path)
  np.testing.assert_array_equal(train, train_r)
  np.testing.assert_array_equal(test, test_r)
  with np.load(path) as z:  # rewritten whole
    np.testing.assert_array_equal(z["train"], train)


def test_unwritable_cache_dir_only_costs_time(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  train, _, _ = corpus(blocker / "cache")
  assert train.size == MAX_BYTES
  assert os.listdir(tmp_path) == ["a_file"]


@pytest.mark.parametrize("kwargs,match", [
    ({"test_fraction": 1.5}, "test_fraction=1.5"), ({"max_bytes": 0}, "max_bytes=0")])
def test_bad_arguments_are_named(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    corpus(tmp_path, **kwargs)

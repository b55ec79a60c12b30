"""Corpora: the default standard-library corpus, text and token directories, the stable held-out split."""

import hashlib

import numpy as np
import pytest

from deepseek_jax.data import (default_corpus_files, find_corpus, read_bytes, split_files, stable_unit_hash,
                               stdlib_dir)


def test_default_corpus_is_the_stdlib():
  corpus = find_corpus("")
  root = stdlib_dir()
  rel = [corpus.relative(f) for f in corpus.files]
  assert corpus.kind == "text" and corpus.split == "files" and corpus.root == root
  for module in ("os.py", "json/__init__.py", "collections/__init__.py"):
    assert module in rel
  assert all(r.endswith(".py") for r in rel)
  assert not any("site-packages" in r or "__pycache__" in r for r in rel)
  assert len(rel) > 200
  # Disjoint, complete, ordered, about 1% held out (at least 4 files).
  assert set(corpus.train).isdisjoint(corpus.held_out)
  assert sorted(corpus.files, key=corpus.relative) == default_corpus_files(root)
  train_rel = [corpus.relative(f) for f in corpus.train]
  assert train_rel == sorted(train_rel)
  assert 4 <= len(corpus.held_out) <= max(4, 0.03 * len(rel))
  assert find_corpus("") == corpus  # deterministic


def test_default_corpus_files_are_real_python_source():
  corpus = find_corpus(None)
  data = read_bytes(stdlib_dir() / "os.py")
  assert b"def makedirs" in data
  for f in corpus.held_out:
    assert f.read_bytes()  # real, non-empty files


def test_stable_hash_matches_sha256():
  path = "json/__init__.py"
  ref = int(hashlib.sha256(path.encode()).hexdigest()[:16], 16) / 2**64
  assert stable_unit_hash(path) == ref


def test_split_is_stable_when_files_change(tmp_path):
  files = [tmp_path / f"d{i % 3}" / f"f{i}.txt" for i in range(60)]
  train, held = split_files(files, tmp_path, heldout_fraction=0.3, min_heldout_files=0)
  expected = {f for f in files if stable_unit_hash(f.relative_to(tmp_path).as_posix()) < 0.3}
  assert set(held) == expected and set(train) == set(files) - expected
  # Dropping half of the files does not move any remaining file between the splits.
  sub = files[::2]
  train2, held2 = split_files(sub, tmp_path, heldout_fraction=0.3, min_heldout_files=0)
  assert set(held2) == expected & set(sub)
  # The minimum count takes the smallest hashes.
  _, held3 = split_files(files, tmp_path, heldout_fraction=0.001, min_heldout_files=5)
  smallest = sorted(files, key=lambda f: stable_unit_hash(f.relative_to(tmp_path).as_posix()))[:5]
  assert set(held3) == set(smallest)


def test_text_directory_is_searched_recursively(tmp_path):
  for i in range(12):
    (tmp_path / f"sub{i % 2}").mkdir(exist_ok=True)
    (tmp_path / f"sub{i % 2}" / f"doc{i:02d}.txt").write_text(f"document {i}\n")
  (tmp_path / ".hidden").mkdir()
  (tmp_path / ".hidden" / "secret.txt").write_text("no")
  (tmp_path / "weights.safetensors").write_bytes(b"\x00\x01")
  corpus = find_corpus(tmp_path)
  rel = sorted(corpus.relative(f) for f in corpus.files)
  assert rel == sorted(f"sub{i % 2}/doc{i:02d}.txt" for i in range(12))
  assert corpus.split == "files" and len(corpus.held_out) >= 1 and len(corpus.train) >= 1


def test_few_files_and_single_files_split_the_tail(tmp_path):
  (tmp_path / "a.txt").write_text("x")
  (tmp_path / "b.txt").write_text("y")
  corpus = find_corpus(tmp_path)
  assert corpus.split == "tail" and corpus.held_out == () and len(corpus.train) == 2
  single = find_corpus(tmp_path / "a.txt")
  assert single.kind == "text" and single.train == (tmp_path / "a.txt",)
  np.save(tmp_path / "t.npy", np.arange(10))
  assert find_corpus(tmp_path / "t.npy").kind == "tokens"
  assert find_corpus(tmp_path).kind == "tokens"  # a directory holding .npy files is a token corpus


def test_read_bytes_skips_binary_and_non_utf8(tmp_path):
  (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
  (tmp_path / "nul.txt").write_bytes(b"abc\x00def")
  (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhi")
  assert read_bytes(tmp_path / "latin1.txt") is None
  assert read_bytes(tmp_path / "nul.txt") is None
  assert read_bytes(tmp_path / "bom.txt") == b"hi"


def test_corpus_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="corpus path .*does_not_exist"):
    find_corpus(tmp_path / "does_not_exist")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="empty holds no text or .npy files"):
    find_corpus(tmp_path / "empty")
  with pytest.raises(ValueError, match="heldout_fraction=1.5"):
    find_corpus("", heldout_fraction=1.5)

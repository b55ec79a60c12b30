"""Packing: EOS separators at document boundaries, windows whose targets are the inputs shifted by one."""

import numpy as np
import pytest

from deepseek_jax.data import (ByteTokenizer, check_min_tokens, gather_windows, load_token_files, num_windows,
                               pack_documents, token_dtype, tokenize_files)


def test_pack_documents_places_separators_at_boundaries():
  docs = [[5, 6, 7], [], [8], [9, 10]]
  out = pack_documents(docs, eos_id=99)
  assert out.tolist() == [5, 6, 7, 99, 99, 8, 99, 9, 10, 99]
  ends = np.cumsum([len(d) + 1 for d in docs]) - 1
  assert np.flatnonzero(out == 99).tolist() == ends.tolist()


def test_tokenize_files_byte_matches_reference(tmp_path):
  texts = ["first doc\n", "zweites Dokument: äöü\n", "第三"]
  files = []
  for i, t in enumerate(texts):
    files.append(tmp_path / f"{i}.txt")
    files[-1].write_text(t, encoding="utf-8")
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"\xff\xfe broken")
  tok = ByteTokenizer()
  out = tokenize_files(files[:2] + [bad] + files[2:], tok)
  ref = []
  for t in texts:
    ref += list(t.encode("utf-8")) + [tok.eos_id]
  assert out.tokens.tolist() == ref
  assert out.tokens.dtype == np.uint16
  assert out.documents == 3 and out.skipped == (str(bad),)
  assert out.text_bytes == sum(len(t.encode()) for t in texts)
  # Document boundaries decode back to the documents.
  pieces = tok.decode(out.tokens, skip_special_tokens=False).split("<eos>")
  assert pieces[:3] == texts


def test_windows_shift_by_one():
  stream = np.arange(1000, 1000 + 53, dtype=np.uint16)
  seq_len = 8
  n = num_windows(len(stream), seq_len)
  assert n == (53 - 1) // 8 == 6
  ids = np.array([0, 5, 2])
  batch = gather_windows(stream, ids, seq_len)
  assert batch["inputs"].dtype == np.int32 and batch["targets"].dtype == np.int32
  for row, i in enumerate(ids):
    window = stream[i * seq_len:i * seq_len + seq_len + 1].astype(np.int32)
    np.testing.assert_array_equal(batch["inputs"][row], window[:-1])
    np.testing.assert_array_equal(batch["targets"][row], window[1:])
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  # The last window ends inside the stream and consecutive windows share exactly one token.
  assert (n - 1) * seq_len + seq_len + 1 <= len(stream)
  w = gather_windows(stream, np.arange(n), seq_len)
  np.testing.assert_array_equal(w["targets"][:-1, -1], w["inputs"][1:, 0])


def test_min_tokens_error():
  check_min_tokens(9, 8)
  with pytest.raises(ValueError, match=r"corpus has 8 tokens, fewer than one window of seq_len \+ 1 = 9"):
    check_min_tokens(8, 8)
  with pytest.raises(ValueError, match="seq_len=0"):
    num_windows(10, 0)


def test_token_dtype():
  assert token_dtype(259) == np.uint16 and token_dtype(65536) == np.uint16
  assert token_dtype(129280) == np.uint32


def test_load_token_files(tmp_path):
  np.save(tmp_path / "a.npy", np.array([1, 2, 3], np.int64))
  np.save(tmp_path / "b.npy", np.array([4, 5], np.int32))
  out = load_token_files([tmp_path / "a.npy", tmp_path / "b.npy"], vocab_size=259)
  assert out.tolist() == [1, 2, 3, 4, 5] and out.dtype == np.uint16
  np.save(tmp_path / "2d.npy", np.zeros((2, 2), np.int32))
  with pytest.raises(ValueError, match=r"2d.npy holds a int32 array of shape \(2, 2\)"):
    load_token_files([tmp_path / "2d.npy"], 259)
  np.save(tmp_path / "f.npy", np.zeros(3, np.float32))
  with pytest.raises(ValueError, match="f.npy holds a float32"):
    load_token_files([tmp_path / "f.npy"], 259)
  np.save(tmp_path / "big.npy", np.array([3, 400]))
  with pytest.raises(ValueError, match=r"big.npy has ids in \[3, 400\], outside .*\[0, 259\)"):
    load_token_files([tmp_path / "big.npy"], 259)
  (tmp_path / "junk.npy").write_bytes(b"not numpy")
  with pytest.raises(ValueError, match="cannot read token file .*junk.npy"):
    load_token_files([tmp_path / "junk.npy"], 259)

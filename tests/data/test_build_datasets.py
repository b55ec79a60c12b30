"""build_datasets: splits, caching, tokenizer choices, vocabulary checks, bits per byte."""

import math

import numpy as np
import pytest

from deepseek_jax.data import (ByteTokenizer, TokenBatches, bits_per_byte, build_datasets, bytes_per_token,
                               find_corpus, load_tokenizer)


def _text_dir(root, n=14):
  root.mkdir(parents=True, exist_ok=True)
  texts = {}
  for i in range(n):
    t = f"# module {i}\n" + "".join(f"def f{i}_{j}(x):\n    return x * {j}  # ü\n" for j in range(20))
    (root / f"m{i:02d}.py").write_text(t, encoding="utf-8")
    texts[f"m{i:02d}.py"] = t
  return texts


def _byte_stream(texts):
  out = []
  for t in texts:
    out += list(t.encode("utf-8")) + [ByteTokenizer.EOS]
  return np.asarray(out)


def test_file_split_streams_match_reference_and_cache(tmp_path):
  texts = _text_dir(tmp_path / "corpus")
  cache = tmp_path / "cache"
  ds = build_datasets(tmp_path / "corpus", "byte", seq_len=16, cache_dir=cache)
  train, held, tok = ds
  corpus = find_corpus(tmp_path / "corpus")
  train_names = [corpus.relative(f) for f in corpus.train]
  held_names = [corpus.relative(f) for f in corpus.held_out]
  assert set(train_names).isdisjoint(held_names) and len(held_names) >= 1
  np.testing.assert_array_equal(train, _byte_stream(texts[n] for n in train_names))
  np.testing.assert_array_equal(held, _byte_stream(texts[n] for n in held_names))
  held_bytes = sum(len(texts[n].encode()) for n in held_names)
  assert ds.heldout_bytes_per_token == pytest.approx(held_bytes / len(held))
  assert isinstance(tok, ByteTokenizer)
  # Second run: read from the cache (memory-mapped), identical.
  assert len(list((cache / "tokens").glob("*.npy"))) == 2
  again = build_datasets(tmp_path / "corpus", "byte", seq_len=16, cache_dir=cache)
  assert isinstance(again.train, np.memmap)
  np.testing.assert_array_equal(again.train, train)
  # Editing a file invalidates its entry.
  (tmp_path / "corpus" / train_names[0]).write_text("changed\n")
  edited = build_datasets(tmp_path / "corpus", "byte", seq_len=16, cache_dir=cache)
  assert edited.train[:8].tolist() == list(b"changed\n")
  uncached = build_datasets(tmp_path / "corpus", "byte", seq_len=16, use_cache=False)
  np.testing.assert_array_equal(uncached.train, edited.train)


def test_tail_split_of_a_single_file(tmp_path):
  text = "line of text é\n" * 200
  (tmp_path / "one.txt").write_text(text, encoding="utf-8")
  train, held, _ = build_datasets(tmp_path / "one.txt", seq_len=64, cache_dir=tmp_path / "c",
                                  heldout_fraction=0.1)
  full = _byte_stream([text])
  np.testing.assert_array_equal(np.concatenate([train, held]), full)
  assert len(held) == math.ceil(0.1 * len(full))
  with pytest.raises(ValueError, match=r"has 3201 tokens: too few to hold out 3001"):
    build_datasets(tmp_path / "one.txt", seq_len=3000, use_cache=False)


def test_token_corpora(tmp_path):
  rng = np.random.default_rng(0)
  arrays = [rng.integers(0, 259, 500) for _ in range(12)]
  (tmp_path / "toks").mkdir()
  for i, a in enumerate(arrays):
    np.save(tmp_path / "toks" / f"{i:02d}.npy", a)
  train, held, _ = build_datasets(tmp_path / "toks", seq_len=32)
  corpus = find_corpus(tmp_path / "toks")
  ref = np.concatenate([arrays[int(f.stem)] for f in corpus.train])
  np.testing.assert_array_equal(train, ref)
  assert len(train) + len(held) == 12 * 500
  single_train, single_held, _ = build_datasets(tmp_path / "toks" / "00.npy", seq_len=8)
  np.testing.assert_array_equal(np.concatenate([single_train, single_held]), arrays[0])


def test_bpe_through_build_datasets_is_cached(tmp_path):
  _text_dir(tmp_path / "corpus")
  cache = tmp_path / "cache"
  first = build_datasets(tmp_path / "corpus", "bpe", seq_len=16, cache_dir=cache, vocab_size=300)
  assert first.tokenizer.vocab_size <= 300
  second = build_datasets(tmp_path / "corpus", "bpe", seq_len=16, cache_dir=cache, vocab_size=300)
  assert second.tokenizer.fingerprint == first.tokenizer.fingerprint
  np.testing.assert_array_equal(second.train, first.train)
  # The stream decodes back to the training text, separated by EOS.
  doc = first.tokenizer.decode(first.train[:int(np.argmax(first.train == first.tokenizer.eos_id))])
  assert doc.startswith("# module ")
  # A saved tokenizer directory is accepted as the tokenizer argument.
  first.tokenizer.save(tmp_path / "tok")
  third = build_datasets(tmp_path / "corpus", str(tmp_path / "tok"), seq_len=16, cache_dir=cache)
  np.testing.assert_array_equal(third.held_out, first.held_out)
  assert isinstance(load_tokenizer(tmp_path / "tok").encode("x"), list)


def test_build_datasets_errors(tmp_path):
  _text_dir(tmp_path / "corpus", n=3)
  with pytest.raises(ValueError, match="tokenizer vocab_size=259 exceeds the model's vocab_size=256"):
    build_datasets(tmp_path / "corpus", "byte", vocab_size=256, use_cache=False)
  with pytest.raises(ValueError, match="tokenizer='bpe' needs vocab_size"):
    build_datasets(tmp_path / "corpus", "bpe", use_cache=False)
  with pytest.raises(FileNotFoundError, match="no_such_corpus"):
    build_datasets(tmp_path / "no_such_corpus")
  with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
    build_datasets(tmp_path / "corpus", str(tmp_path / "no_such_tokenizer"), use_cache=False)
  np.save(tmp_path / "t.npy", np.arange(100))
  with pytest.raises(ValueError, match="tokenizer='bpe' trains on a text corpus"):
    build_datasets(tmp_path / "t.npy", "bpe", vocab_size=300, use_cache=False)


def test_bits_per_byte():
  assert bits_per_byte(2 * math.log(2), 2.0) == pytest.approx(1.0)
  assert bits_per_byte(math.log(256), 1.0) == pytest.approx(8.0)  # uniform over bytes = 8 bits per byte
  tok = ByteTokenizer()
  texts = ["abc", "日本"]  # 3 + 6 bytes, and one separator each
  assert bytes_per_token(tok, texts) == pytest.approx(9 / 11)
  assert bytes_per_token(tok, texts, count_separators=False) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="bytes_per_token_ratio=0"):
    bits_per_byte(1.0, 0)


def test_default_corpus_end_to_end(tmp_path):
  ds = build_datasets("", seq_len=128, cache_dir=tmp_path)
  assert len(ds.corpus.held_out) >= 4 and len(ds.train) > 1_000_000
  # Byte tokenizer: bytes per held-out token = 1 - documents / tokens.
  n_docs = int(np.count_nonzero(np.asarray(ds.held_out) == ByteTokenizer.EOS))
  assert ds.heldout_bytes_per_token == pytest.approx(1 - n_docs / len(ds.held_out))
  assert ds.held_out[-1] == ByteTokenizer.EOS
  first = ds.corpus.held_out[0].read_bytes()
  assert bytes(np.asarray(ds.held_out[:len(first)], np.uint8)) == first
  batch = TokenBatches(ds.train, 128, 4, seed=0).next_batch()
  assert batch["inputs"].max() < 259 and batch["inputs"].dtype == np.int32

"""Tokenizers: byte-level round trips, trained BPE, HF tokenizer.json loading, vocabulary checks."""

import json

import numpy as np
import pytest

from deepseek_jax.data import (ByteTokenizer, HFTokenizer, check_vocab, find_tokenizer, load_tokenizer,
                               train_bpe)

TEXT = "héllo wörld, 日本語 and emoji 🚀 - naïve café\n"


def _sample_text(n=400):
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "δέλτα", "日本", "café", "def", "return"]
  rng = np.random.default_rng(0)
  return " ".join(words[i] for i in rng.integers(0, len(words), n)) + "\n"


def test_byte_roundtrip_non_ascii():
  tok = ByteTokenizer()
  ids = tok.encode(TEXT)
  assert ids == list(TEXT.encode("utf-8"))
  assert tok.decode(ids) == TEXT
  assert tok.decode(np.asarray(ids, np.int32)) == TEXT
  assert tok.vocab_size == 259 and {tok.pad_id, tok.bos_id, tok.eos_id} == {256, 257, 258}
  assert tok.vocab_size <= 512  # fits the 'tiny' preset


def test_byte_decode_invalid_utf8_and_specials():
  tok = ByteTokenizer()
  cut = list("日".encode("utf-8"))[:2] + list(b"ok")  # a 3-byte character cut after 2 bytes
  assert tok.decode(cut) == bytes(cut).decode("utf-8", errors="replace")
  assert "\ufffd" in tok.decode(cut)
  ids = tok.encode("ab") + [tok.eos_id] + tok.encode("c")
  assert tok.decode(ids) == "abc"
  assert tok.decode(ids, skip_special_tokens=False) == "ab<eos>c"
  assert tok.count_bytes(np.asarray(ids)) == 3
  with pytest.raises(ValueError, match="token id 300 is outside the vocabulary"):
    tok.decode([1, 300])


def test_byte_save_load(tmp_path):
  ByteTokenizer().save(tmp_path / "tok")
  tok = load_tokenizer(tmp_path / "tok")
  assert isinstance(tok, ByteTokenizer) and tok.encode(TEXT) == list(TEXT.encode())


def test_bpe_roundtrip_and_save_load(tmp_path):
  text = _sample_text()
  f = tmp_path / "train.txt"
  f.write_text(text, encoding="utf-8")
  tok = train_bpe([f], vocab_size=320)
  assert 259 < tok.vocab_size <= 320
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert len(ids) < len(text.encode("utf-8")) / 2   # merges were learned
  assert tok.decode(tok.encode(TEXT)) == TEXT       # unseen characters fall back to bytes
  tok.save(tmp_path / "saved")
  back = load_tokenizer(tmp_path / "saved")
  assert back.encode(text) == ids and back.encode(TEXT) == tok.encode(TEXT)
  assert (back.vocab_size, back.eos_id, back.fingerprint) == (tok.vocab_size, tok.eos_id, tok.fingerprint)
  # Lone-byte tokens of a multi-byte character decode with a replacement character, not an error.
  first_byte = [i for i in range(tok.vocab_size) if tok.decode([i]) == b"\xe6".decode("utf-8", "replace")]
  assert first_byte and tok.decode(first_byte[:1] + tok.encode("ok")) == "\ufffdok"


def test_bpe_errors(tmp_path):
  with pytest.raises(ValueError, match="vocab_size=200 must exceed 259"):
    train_bpe([], vocab_size=200)
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    train_bpe([tmp_path / "missing.txt"], vocab_size=300)


def _deepseek_like_tokenizer_json(path):
  """A small tokenizer.json with DeepSeek's special tokens and a BOS-adding post-processor."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[bos, eos], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([_sample_text()], trainer)
  tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
  tok.save(str(path))
  return tok, bos, eos


def test_load_hf_tokenizer_json(tmp_path):
  ref, bos, eos = _deepseek_like_tokenizer_json(tmp_path / "tokenizer.json")
  cfg = {"add_bos_token": True, "tokenizer_class": "LlamaTokenizerFast",
         "bos_token": {"__type": "AddedToken", "content": bos, "lstrip": False},
         "eos_token": {"__type": "AddedToken", "content": eos, "lstrip": False},
         "pad_token": {"__type": "AddedToken", "content": eos, "lstrip": False}}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
  for where in (tmp_path, tmp_path / "tokenizer.json"):
    tok = load_tokenizer(where)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    # Raw ids: the post-processor's BOS is not added (packing places separators itself).
    assert tok.encode(TEXT) == ref.encode(TEXT, add_special_tokens=False).ids
    assert ref.encode(TEXT).ids[0] == 0
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_load_bare_tokenizer_json_finds_special_names(tmp_path):
  _deepseek_like_tokenizer_json(tmp_path / "my.json")
  tok = load_tokenizer(tmp_path / "my.json")
  assert (tok.bos_id, tok.eos_id) == (0, 1)


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    load_tokenizer(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
    load_tokenizer(tmp_path)
  from tokenizers import Tokenizer, models
  Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="no end-of-sequence token"):
    load_tokenizer(tmp_path)
  with pytest.raises(ValueError, match="eos_token 'zz' is not in the vocabulary"):
    load_tokenizer(tmp_path, eos_token="zz")
  assert load_tokenizer(tmp_path, eos_token="b").eos_id == 1


def test_find_tokenizer_beside_a_checkpoint(tmp_path):
  """What a checkpoint directory holds: nothing, a foreign tokenizer_config.json, a byte tokenizer, tokenizer.json."""
  assert find_tokenizer(tmp_path) is None
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
  assert find_tokenizer(tmp_path) is None          # e.g. a SentencePiece-only HF tokenizer: not one we read
  (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="tokenizer_config.json is not a JSON object"):
    find_tokenizer(tmp_path)
  ByteTokenizer().save(tmp_path)
  assert isinstance(find_tokenizer(tmp_path), ByteTokenizer)
  (tmp_path / "hf").mkdir()
  _deepseek_like_tokenizer_json(tmp_path / "hf" / "tokenizer.json")
  assert isinstance(find_tokenizer(tmp_path / "hf"), HFTokenizer)


def test_check_vocab():
  check_vocab(ByteTokenizer(), 512)
  check_vocab(ByteTokenizer(), 259)
  with pytest.raises(ValueError, match=r"tokenizer vocab_size=259 exceeds the model's vocab_size=258"):
    check_vocab(ByteTokenizer(), 258)

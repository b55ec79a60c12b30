"""Tokenizers behind one interface: byte-level (default), BPE trained with `tokenizers`, HF `tokenizer.json`.

Every tokenizer has `encode(text) -> list[int]` (no special tokens added: packing places the separators),
`decode(ids) -> str` (robust to ids that cut a UTF-8 sequence: invalid bytes become U+FFFD), `vocab_size`,
`bos_id`, `eos_id`, `pad_id`, `save(directory)` and `fingerprint` (a string that changes whenever the mapping from
text to ids could change; the token cache is keyed by it). `load_tokenizer` reads back what `save` wrote, and
also a HF checkpoint directory or a bare `tokenizer.json` (DeepSeek's included).
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

CONFIG_FILE = "tokenizer_config.json"
HF_FILE = "tokenizer.json"

# Names that special tokens carry in common vocabularies, tried in order when no tokenizer_config.json names
# them: DeepSeek (full-width bars and U+2581), Llama 3, GPT-2 style, SentencePiece style, ours.
_BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("<｜end▁of▁sentence｜>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
_PAD_NAMES = ("<｜▁pad▁｜>", "<pad>", "<|pad|>", "[PAD]")


class Tokenizer(abc.ABC):
  """The interface every tokenizer of the data pipeline implements."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without any special token added."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids`; byte sequences that are not valid UTF-8 decode to U+FFFD instead of raising."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """One more than the largest id the tokenizer can produce (the embedding rows it needs)."""

  @property
  @abc.abstractmethod
  def bos_id(self) -> int:
    """Beginning-of-sequence id."""

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    """End-of-sequence id; also the separator between packed documents."""

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    """Padding id."""

  @property
  @abc.abstractmethod
  def fingerprint(self) -> str:
    """A short string identifying the text -> ids mapping (cache key)."""

  @abc.abstractmethod
  def save(self, directory: str | os.PathLike) -> Path:
    """Writes the tokenizer into `directory` (created if needed) so that `load_tokenizer` reads it back.

    Returns:
      The directory.
    """

  def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes many documents at once.

    Args:
      texts: the documents.
    Returns:
      One 1-D int64 array of ids per document.
    """
    return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

  def count_bytes(self, ids: np.ndarray) -> int:
    """UTF-8 bytes of the text that `ids` stand for (special tokens count zero).

    Args:
      ids: a token array.
    Returns:
      The byte count of `decode(ids)`.
    """
    return len(self.decode(np.asarray(ids).tolist()).encode("utf-8"))


def _as_ids(ids: Iterable[int], vocab_size: int) -> np.ndarray:
  """Flattens lists, numpy or jax arrays into int64 ids and checks they are in the vocabulary."""
  if not hasattr(ids, "__array__") and not isinstance(ids, (list, tuple)):
    ids = list(ids)
  arr = np.asarray(ids, dtype=np.int64).reshape(-1)
  if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
    bad = int(arr[(arr < 0) | (arr >= vocab_size)][0])
    raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
  return arr


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255, then <pad> 256, <bos> 257, <eos> 258 (vocab_size 259).

  Ids equal byte values, so a whole file tokenizes with one `np.frombuffer`; the vocabulary fits every preset,
  the 512-entry 'tiny' one included.
  """

  PAD = 256
  BOS = 257
  EOS = 258
  _NAMES = {256: "<pad>", 257: "<bos>", 258: "<eos>"}

  def encode(self, text: str) -> list[int]:
    """UTF-8 bytes of `text` as ids."""
    return list(text.encode("utf-8"))

  def encode_bytes(self, data: bytes) -> np.ndarray:
    """Ids of raw UTF-8 bytes without a Python-level loop.

    Args:
      data: UTF-8 encoded text.
    Returns:
      uint8 array (a view of `data`).
    """
    return np.frombuffer(data, dtype=np.uint8)

  def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes many documents, each through `np.frombuffer`."""
    return [self.encode_bytes(t.encode("utf-8")) for t in texts]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids`; specials are dropped, or written as <pad>/<bos>/<eos> when not skipped."""
    arr = _as_ids(ids, self.vocab_size)
    special = np.flatnonzero(arr >= 256)
    if skip_special_tokens or special.size == 0:
      return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")
    parts, start = [], 0
    for pos in special.tolist():
      parts.append(arr[start:pos].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
      parts.append(self._NAMES[int(arr[pos])])
      start = pos + 1
    parts.append(arr[start:].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
    return "".join(parts)

  def count_bytes(self, ids: np.ndarray) -> int:
    """Bytes are the ids below 256."""
    return int(np.count_nonzero(np.asarray(ids) < 256))

  @property
  def vocab_size(self) -> int:
    return 259

  @property
  def bos_id(self) -> int:
    return self.BOS

  @property
  def eos_id(self) -> int:
    return self.EOS

  @property
  def pad_id(self) -> int:
    return self.PAD

  @property
  def fingerprint(self) -> str:
    return "byte-utf8-259"

  def save(self, directory: str | os.PathLike) -> Path:
    """Writes tokenizer_config.json with tokenizer_type 'byte' and the special ids."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"tokenizer_type": "byte", "vocab_size": self.vocab_size, "pad_id": self.PAD,
            "bos_id": self.BOS, "eos_id": self.EOS}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory

  def __repr__(self) -> str:
    return "ByteTokenizer(vocab_size=259)"


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer` (BPE trained here, or any HF tokenizer.json) behind the common interface.

  Args:
    tokenizer: the `tokenizers.Tokenizer`.
    eos_token: end-of-sequence token string (must be in the vocabulary).
    bos_token: beginning-of-sequence token; defaults to `eos_token` (GPT-2 style) when None.
    pad_token: padding token; defaults to `eos_token` when None.
    source: where it came from, for error messages.
  """

  def __init__(self, tokenizer: Any, eos_token: str, bos_token: str | None = None,
               pad_token: str | None = None, source: str = "tokenizer"):
    self._tok = tokenizer
    self._source = source
    self._tokens = {"eos": eos_token, "bos": bos_token or eos_token, "pad": pad_token or eos_token}
    self._ids = {}
    for role, token in self._tokens.items():
      idx = tokenizer.token_to_id(token)
      if idx is None:
        raise ValueError(f"{role}_token {token!r} is not in the vocabulary of {source}")
      self._ids[role] = idx
    self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

  @property
  def hf_tokenizer(self) -> Any:
    """The wrapped `tokenizers.Tokenizer`."""
    return self._tok

  def encode(self, text: str) -> list[int]:
    """Ids of `text`; the tokenizer's post-processor (e.g. an automatic BOS) is not applied."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes a batch of documents in parallel inside `tokenizers`."""
    encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
    return [np.asarray(e.ids, dtype=np.int64) for e in encode(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids` (the byte-level decoder replaces invalid UTF-8 with U+FFFD)."""
    return self._tok.decode(_as_ids(ids, self._vocab_size).tolist(), skip_special_tokens=skip_special_tokens)

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def bos_id(self) -> int:
    return self._ids["bos"]

  @property
  def eos_id(self) -> int:
    return self._ids["eos"]

  @property
  def pad_id(self) -> int:
    return self._ids["pad"]

  @property
  def fingerprint(self) -> str:
    h = hashlib.sha256(self._tok.to_str().encode("utf-8"))
    h.update(json.dumps(self._tokens, sort_keys=True).encode("utf-8"))
    return "hf-" + h.hexdigest()[:32]

  def save(self, directory: str | os.PathLike) -> Path:
    """Writes tokenizer.json and a tokenizer_config.json naming the special tokens (HF field names)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self._tok.save(str(directory / HF_FILE))
    meta = {"tokenizer_type": "hf", "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self._tokens["bos"], "eos_token": self._tokens["eos"],
            "pad_token": self._tokens["pad"]}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return directory

  def __repr__(self) -> str:
    return f"HFTokenizer({self._source}, vocab_size={self._vocab_size})"


def train_bpe(files: Iterable[str | os.PathLike], vocab_size: int, *, min_frequency: int = 2,
              special_tokens: Sequence[str] = ("<pad>", "<bos>", "<eos>")) -> HFTokenizer:
  """Trains a byte-level BPE tokenizer (GPT-2 pre-tokenization) on text files.

  Files that are not UTF-8 text are skipped, the same rule the corpus readers apply.

  Args:
    files: text files to learn merges from, in a deterministic order.
    vocab_size: target vocabulary including the 256 byte symbols and the special tokens; the result can be
      smaller when the text has too few distinct pairs.
    min_frequency: a pair must occur this often to be merged.
    special_tokens: (pad, bos, eos) strings, given ids 0, 1, 2.
  Returns:
    The trained tokenizer.
  """
  from tokenizers import Tokenizer as _HF, decoders, models, pre_tokenizers, trainers
  from deepseek_jax.data.corpus import read_text  # local: corpus imports nothing from here

  if len(special_tokens) != 3:
    raise ValueError(f"special_tokens={tuple(special_tokens)!r}: expected (pad, bos, eos)")
  floor = 256 + len(special_tokens)
  if vocab_size <= floor:
    raise ValueError(f"vocab_size={vocab_size} must exceed {floor} (256 bytes + {len(special_tokens)} specials)")
  files = [Path(f) for f in files]
  for f in files:
    if not f.is_file():
      raise FileNotFoundError(f"BPE training file {f} does not exist")
  tok = _HF(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(special_tokens), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  texts = (t for t in map(read_text, files) if t is not None)
  tok.train_from_iterator(texts, trainer)
  pad, bos, eos = special_tokens
  return HFTokenizer(tok, eos_token=eos, bos_token=bos, pad_token=pad, source="trained BPE")


def _token_content(value: Any) -> str | None:
  """A special token in tokenizer_config.json is a string or an AddedToken dict with 'content'."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def _first_present(tok: Any, names: Sequence[str]) -> str | None:
  for name in names:
    if tok.token_to_id(name) is not None:
      return name
  return None


def _load_hf(file: Path, config: dict, bos_token: str | None, eos_token: str | None,
             pad_token: str | None) -> HFTokenizer:
  from tokenizers import Tokenizer as _HF

  try:
    tok = _HF.from_file(str(file))
  except Exception as e:  # tokenizers raises a bare Exception on malformed files
    raise ValueError(f"cannot read tokenizer file {file}: {e}") from e
  eos = eos_token or _token_content(config.get("eos_token")) or _first_present(tok, _EOS_NAMES)
  if eos is None:
    raise ValueError(f"{file}: no end-of-sequence token found (no eos_token in {CONFIG_FILE} and none of "
                     f"{_EOS_NAMES} in the vocabulary); pass eos_token=")
  bos = bos_token or _token_content(config.get("bos_token")) or _first_present(tok, _BOS_NAMES)
  pad = pad_token or _token_content(config.get("pad_token")) or _first_present(tok, _PAD_NAMES)
  return HFTokenizer(tok, eos_token=eos, bos_token=bos, pad_token=pad, source=str(file))


def load_tokenizer(path: str | os.PathLike, *, bos_token: str | None = None, eos_token: str | None = None,
                   pad_token: str | None = None) -> Tokenizer:
  """Reads a tokenizer written by `save`, a HF tokenizer directory, or a bare tokenizer.json file.

  Special tokens come from the arguments, else from tokenizer_config.json beside the file (HF's fields
  `bos_token`/`eos_token`/`pad_token`, strings or AddedToken dicts), else from well-known names.

  Args:
    path: a directory holding tokenizer.json and/or tokenizer_config.json, or one of those files.
    bos_token: overrides the beginning-of-sequence token (HF tokenizers only).
    eos_token: overrides the end-of-sequence token (HF tokenizers only).
    pad_token: overrides the padding token (HF tokenizers only).
  Returns:
    A ByteTokenizer or an HFTokenizer.
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"tokenizer path {path} does not exist")
  if path.is_dir():
    directory, file = path, path / HF_FILE
  elif path.name == CONFIG_FILE:
    directory, file = path.parent, path.parent / HF_FILE
  else:
    directory, file = path.parent, path
  config_file = directory / CONFIG_FILE
  config = {}
  if config_file.is_file():
    try:
      config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_file} is not valid JSON: {e}") from e
  if config.get("tokenizer_type") == "byte":
    if config.get("vocab_size") != ByteTokenizer().vocab_size:
      raise ValueError(f"{config_file}: byte tokenizer with vocab_size={config.get('vocab_size')}, "
                       f"expected {ByteTokenizer().vocab_size}")
    return ByteTokenizer()
  if file.is_file():
    return _load_hf(file, config, bos_token, eos_token, pad_token)
  raise FileNotFoundError(f"{path}: neither {HF_FILE} nor a byte-tokenizer {CONFIG_FILE} found")


def find_tokenizer(directory: str | os.PathLike) -> Tokenizer | None:
  """The tokenizer saved in a checkpoint directory, or None when it holds none.

  A tokenizer is there when the directory has a tokenizer.json, or a tokenizer_config.json of a byte
  tokenizer (what `save` writes); it is read with `load_tokenizer`, so a broken one raises.

  Args:
    directory: a checkpoint directory (HF, the project's model checkpoint, a training run's tokenizer/).
  Returns:
    The tokenizer, or None.
  """
  directory = Path(directory)
  config_file = directory / CONFIG_FILE
  if (directory / HF_FILE).is_file():
    return load_tokenizer(directory)
  if config_file.is_file():
    try:
      byte = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_type") == "byte"
    except (json.JSONDecodeError, AttributeError) as e:
      raise ValueError(f"{config_file} is not a JSON object: {e}") from e
    if byte:
      return load_tokenizer(directory)
  return None


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Raises ValueError when the tokenizer can emit ids the model's embedding does not have.

  Args:
    tokenizer: the tokenizer.
    model_vocab_size: ModelConfig.vocab_size.
  """
  if tokenizer.vocab_size > model_vocab_size:
    raise ValueError(f"tokenizer vocab_size={tokenizer.vocab_size} exceeds the model's "
                     f"vocab_size={model_vocab_size}")

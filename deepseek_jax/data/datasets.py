"""`build_datasets`: corpus path + tokenizer name -> (train tokens, held-out tokens, tokenizer), cached.

Tokenized streams are cached as `.npy` under the cache directory, keyed by a hash of the file list (path, size,
modification time) and the tokenizer's fingerprint, and loaded as memory maps, so a second run starts in well
under a second. A BPE tokenizer trained here is cached the same way (keyed by its training files and size).
Cache files are written to a temporary name and renamed, so concurrent processes never read a partial file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from deepseek_jax.data.corpus import DEFAULT_HELDOUT_FRACTION, Corpus, find_corpus
from deepseek_jax.data.packing import check_min_tokens, load_token_files, tokenize_files
from deepseek_jax.data.tokenizer import ByteTokenizer, Tokenizer, check_vocab, load_tokenizer, train_bpe

_CACHE_VERSION = 1


class Datasets(tuple):
  """(train, held_out, tokenizer), also readable by name, plus what bits-per-byte needs.

  Attributes:
    train: 1-D training token stream.
    held_out: 1-D held-out token stream.
    tokenizer: the Tokenizer both were made with.
    heldout_bytes_per_token: UTF-8 bytes of held-out text per held-out token (EOS separators counted as
      tokens), for `bits_per_byte`.
    corpus: the Corpus the streams came from.
  """

  def __new__(cls, train: np.ndarray, held_out: np.ndarray, tokenizer: Tokenizer,
              heldout_bytes_per_token: float, corpus: Corpus):
    self = super().__new__(cls, (train, held_out, tokenizer))
    self.heldout_bytes_per_token = heldout_bytes_per_token
    self.corpus = corpus
    return self

  def __getnewargs__(self):  # pickling passes every constructor argument, not only the tuple items
    return (*self, self.heldout_bytes_per_token, self.corpus)

  @property
  def train(self) -> np.ndarray:
    """The training token stream."""
    return self[0]

  @property
  def held_out(self) -> np.ndarray:
    """The held-out token stream."""
    return self[1]

  @property
  def tokenizer(self) -> Tokenizer:
    """The tokenizer of both streams."""
    return self[2]


def default_cache_dir() -> Path:
  """$DEEPSEEK_JAX_CACHE, else $XDG_CACHE_HOME/deepseek_jax, else ~/.cache/deepseek_jax."""
  if os.environ.get("DEEPSEEK_JAX_CACHE"):
    return Path(os.environ["DEEPSEEK_JAX_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "deepseek_jax"


def files_key(files: Sequence[Path], *extra: str) -> str:
  """Hash of a file list (resolved path, size, mtime) and extra strings; changes when any file changes.

  Args:
    files: the files, in order.
    *extra: further strings that the cached content depends on (tokenizer fingerprint, ...).
  Returns:
    32 hex digits.
  """
  h = hashlib.sha256(f"v{_CACHE_VERSION}".encode())
  for f in files:
    st = Path(f).stat()
    h.update(f"{Path(f).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
  for e in extra:
    h.update(b"\1" + e.encode("utf-8"))
  return h.hexdigest()[:32]


def _atomic_write(path: Path, write) -> None:
  """Writes through `write(tmp_path)` then renames: readers never see a partial file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  os.close(fd)
  try:
    write(Path(tmp))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _save_npy(path: Path, array: np.ndarray) -> None:
  with open(path, "wb") as f:  # a file object: np.save would append '.npy' to a temporary name
    np.save(f, array)


def cached_tokenize(files: Sequence[Path], tokenizer: Tokenizer,
                    cache_dir: Path | None) -> tuple[np.ndarray, dict]:
  """Packed token stream of text files, read from or written to the cache.

  Args:
    files: text files in corpus order.
    tokenizer: the tokenizer.
    cache_dir: cache directory; None disables caching.
  Returns:
    (tokens, info) with info = {'documents', 'skipped', 'text_bytes', 'num_tokens'}.
  """
  if cache_dir is not None:
    key = files_key(files, tokenizer.fingerprint)
    npy, meta = cache_dir / "tokens" / f"{key}.npy", cache_dir / "tokens" / f"{key}.json"
    if npy.is_file() and meta.is_file():
      try:
        info = json.loads(meta.read_text())
        tokens = np.load(npy, mmap_mode="r")
        if tokens.ndim == 1 and tokens.shape[0] == info["num_tokens"]:
          return tokens, info
      except (OSError, ValueError, KeyError):
        pass  # a damaged entry is rebuilt below
  out = tokenize_files(files, tokenizer)
  info = {"documents": out.documents, "skipped": list(out.skipped), "text_bytes": out.text_bytes,
          "num_tokens": int(out.tokens.shape[0]), "tokenizer": tokenizer.fingerprint, "files": len(files)}
  if cache_dir is not None:
    try:
      _atomic_write(npy, lambda p: _save_npy(p, out.tokens))
      _atomic_write(meta, lambda p: p.write_text(json.dumps(info)))
    except OSError as e:
      warnings.warn(f"cannot write the token cache under {cache_dir}: {e}")
  return out.tokens, info


def resolve_tokenizer(tokenizer: str | os.PathLike | Tokenizer, corpus: Corpus | None = None,
                      vocab_size: int | None = None, cache_dir: Path | None = None) -> Tokenizer:
  """A Tokenizer from a name: 'byte', 'bpe' (trained on the corpus's training files), or a path.

  Args:
    tokenizer: 'byte', 'bpe', a Tokenizer, or a path for `load_tokenizer` (tokenizer.json, a saved tokenizer).
    corpus: the text corpus 'bpe' trains on (its `train` files; with a 'tail' split these also hold the
      held-out tail).
    vocab_size: the BPE vocabulary size ('bpe' only).
    cache_dir: where a trained BPE is cached; None trains every time.
  Returns:
    The Tokenizer.
  """
  if isinstance(tokenizer, Tokenizer):
    return tokenizer
  name = str(tokenizer)
  if name == "byte":
    return ByteTokenizer()
  if name != "bpe":
    return load_tokenizer(name)
  if vocab_size is None:
    raise ValueError("tokenizer='bpe' needs vocab_size (the BPE vocabulary to train)")
  if corpus is None or corpus.kind != "text":
    raise ValueError("tokenizer='bpe' trains on a text corpus; "
                     f"got {'none' if corpus is None else corpus.kind + ' corpus at ' + str(corpus.root)}")
  if cache_dir is not None:
    target = cache_dir / "bpe" / files_key(corpus.train, f"bpe-{vocab_size}")
    if (target / "tokenizer.json").is_file():
      return load_tokenizer(target)
  tok = train_bpe(corpus.train, vocab_size)
  if cache_dir is not None:
    try:
      target.parent.mkdir(parents=True, exist_ok=True)
      staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + "."))
      tok.save(staging)
      try:
        os.rename(staging, target)
      except OSError:  # another process finished first: its copy is the same tokenizer
        shutil.rmtree(staging, ignore_errors=True)
    except OSError as e:
      warnings.warn(f"cannot write the BPE cache under {cache_dir}: {e}")
  return tok


def build_datasets(path: str | os.PathLike | None = "", tokenizer: str | os.PathLike | Tokenizer = "byte",
                   seq_len: int | None = None, cache_dir: str | os.PathLike | None = None,
                   vocab_size: int | None = None, *, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                   use_cache: bool = True) -> Datasets:
  """Token streams for training and held-out evaluation; the one entry point training uses.

  Args:
    path: corpus ('' or None: the Python standard library; else a text file/dir or `.npy` file/dir).
    tokenizer: 'byte' (default), 'bpe', a Tokenizer, or a tokenizer path (see `resolve_tokenizer`).
    seq_len: when given, both streams must hold at least one window of seq_len + 1 tokens, and a tail
      split holds out at least that much.
    cache_dir: cache directory; `default_cache_dir()` when None.
    vocab_size: the model's vocabulary: the tokenizer must fit in it (`check_vocab`); 'bpe' trains to it.
    heldout_fraction: fraction held out (files, or the stream's tail for corpora of few files).
    use_cache: False neither reads nor writes any cache.
  Returns:
    Datasets: unpacks as (train_tokens, heldout_tokens, tokenizer).
  """
  cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) if use_cache else None
  corpus = find_corpus(path, heldout_fraction=heldout_fraction)
  tok = resolve_tokenizer(tokenizer, corpus, vocab_size, cache)
  if vocab_size is not None:
    check_vocab(tok, vocab_size)
  text_bytes = None
  if corpus.kind == "tokens":
    train = load_token_files(corpus.train, tok.vocab_size)
    held = load_token_files(corpus.held_out, tok.vocab_size)
  else:
    train, _ = cached_tokenize(corpus.train, tok, cache)
    held, info = cached_tokenize(corpus.held_out, tok, cache) if corpus.held_out else (None, None)
    if info is not None:
      text_bytes = info["text_bytes"]
  if corpus.split == "tail":
    n = int(train.shape[0])
    k = max(math.ceil(n * heldout_fraction), (seq_len + 1) if seq_len else 1)
    if n - k < max(seq_len + 1 if seq_len else 1, 1):
      raise ValueError(f"corpus {corpus.root if len(corpus.train) != 1 else corpus.train[0]} has {n} tokens: "
                       f"too few to hold out {k} and keep one window of seq_len + 1 = "
                       f"{(seq_len or 0) + 1} for training")
    train, held = train[:n - k], train[n - k:]
  if seq_len is not None:
    check_min_tokens(int(train.shape[0]), seq_len, "training split")
    check_min_tokens(int(held.shape[0]), seq_len, "held-out split")
  if text_bytes is None:
    text_bytes = tok.count_bytes(np.asarray(held))
  bpt = text_bytes / max(int(held.shape[0]), 1)
  return Datasets(train, held, tok, bpt, corpus)

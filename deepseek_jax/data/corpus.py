"""Corpora: which files hold the training text, in what order, and which of them are held out.

A corpus is one of
- the default: the `.py` files of the Python standard library on this machine (`sysconfig` 'stdlib'),
  site-packages and caches excluded - real text without a download;
- a text file, or a directory searched recursively for text files (hidden entries, empty files and known
  binary suffixes skipped; at read time a file holding NUL bytes or invalid UTF-8 is skipped too);
- a pre-tokenized `.npy` file (1-D integer token array), or a directory of them.

Files are ordered by relative POSIX path. With at least `MIN_FILES_FOR_FILE_SPLIT` files the held-out split
takes whole files, chosen by a stable hash of the relative path (so adding or removing other files never moves
a file between splits); with fewer files the token stream's tail is held out instead (`split == 'tail'`).
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import os
import sysconfig
from pathlib import Path

MIN_FILES_FOR_FILE_SPLIT = 10
DEFAULT_HELDOUT_FRACTION = 0.01
DEFAULT_MIN_HELDOUT_FILES = 4
DEFAULT_MAX_FILE_BYTES = 4 << 20   # no stdlib module comes close; guards against generated giants

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib-dynload", "node_modules"}
_BINARY_SUFFIXES = {
    ".npy", ".npz", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".o", ".a", ".exe", ".bin", ".pt", ".pth",
    ".ckpt", ".safetensors", ".msgpack", ".pkl", ".pickle", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar",
    ".tgz", ".7z", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".ico", ".webp", ".pdf", ".mp3", ".mp4",
    ".wav", ".ogg", ".ttf", ".otf", ".woff", ".woff2", ".db", ".sqlite", ".parquet", ".arrow", ".h5",
}


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Files of a corpus and their split.

  Attributes:
    root: directory the relative paths (and the split hash) are taken from.
    kind: 'text' or 'tokens' (pre-tokenized .npy).
    split: 'files' (held_out lists whole files) or 'tail' (held_out is empty; the last `heldout_fraction`
      of the token stream of `train` is held out).
    train: training files, ordered by relative path.
    held_out: held-out files, ordered by relative path; disjoint from `train`.
    heldout_fraction: the fraction asked for.
  """
  root: Path
  kind: str
  split: str
  train: tuple[Path, ...]
  held_out: tuple[Path, ...]
  heldout_fraction: float

  @property
  def files(self) -> tuple[Path, ...]:
    """All files, train then held-out."""
    return self.train + self.held_out

  def relative(self, path: Path) -> str:
    """Relative POSIX path of a corpus file (as hashed for the split)."""
    return path.relative_to(self.root).as_posix()


def stable_unit_hash(relative_path: str) -> float:
  """A number in [0, 1) from the SHA-256 of a relative path: the same on every machine and Python run.

  Args:
    relative_path: POSIX relative path.
  Returns:
    The first 8 digest bytes as a fraction of 2**64.
  """
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_files(files: list[Path], root: Path, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                min_heldout_files: int = DEFAULT_MIN_HELDOUT_FILES) -> tuple[list[Path], list[Path]]:
  """Splits files into train and held-out by the stable hash of their relative path.

  A file is held out when its hash is below `heldout_fraction`; when that gives fewer than
  `min_heldout_files`, the files with the smallest hashes are held out instead (never all of them).

  Args:
    files: corpus files under `root`.
    root: directory the relative paths are taken from.
    heldout_fraction: expected fraction of held-out files, in [0, 1).
    min_heldout_files: lower bound on the number of held-out files.
  Returns:
    (train, held_out), each ordered by relative path.
  """
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")
  rel = {f: f.relative_to(root).as_posix() for f in files}
  by_hash = sorted(files, key=lambda f: (stable_unit_hash(rel[f]), rel[f]))
  n_below = sum(stable_unit_hash(rel[f]) < heldout_fraction for f in files)
  n_held = min(max(n_below, min_heldout_files), len(files) - 1)
  held = set(by_hash[:n_held])
  order = sorted(files, key=lambda f: rel[f])
  return [f for f in order if f not in held], [f for f in order if f in held]


def stdlib_dir() -> Path:
  """The standard library directory of the running Python."""
  return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, keep) -> list[Path]:
  """Non-empty files under root, recursively, skipping hidden and cache directories, in relative-path order."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS]
    for name in filenames:
      path = Path(dirpath) / name
      # Empty files (e.g. bare __init__.py) carry no text: they would only add separators.
      if not name.startswith(".") and path.is_file() and path.stat().st_size > 0 and keep(path):
        found.append(path)
  return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def default_corpus_files(root: str | os.PathLike | None = None,
                         max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> list[Path]:
  """The standard library's non-empty `.py` files (site-packages, caches, compiled extensions excluded).

  Args:
    root: standard library directory; `sysconfig.get_paths()['stdlib']` when None.
    max_file_bytes: larger files are skipped.
  Returns:
    Paths ordered by relative path. Files that are not UTF-8 (a few test modules) are still listed; the
    readers skip them.
  """
  root = Path(root) if root is not None else stdlib_dir()
  if not root.is_dir():
    raise FileNotFoundError(f"standard library directory {root} does not exist")
  return _walk(root, lambda p: p.suffix == ".py" and p.stat().st_size <= max_file_bytes)


def find_corpus(path: str | os.PathLike | None = "", *, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                min_heldout_files: int = DEFAULT_MIN_HELDOUT_FILES,
                max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Corpus:
  """Resolves a corpus path (empty: the standard library) into its ordered, split files.

  Args:
    path: '' or None for the default corpus; a text file, `.npy` file, or a directory of either. A directory
      holding any `.npy` file is a token corpus of its `.npy` files (other files there are ignored).
    heldout_fraction: fraction held out (of files, or of tokens for a 'tail' split).
    min_heldout_files: at least this many held-out files in a 'files' split.
    max_file_bytes: larger files are skipped in the default corpus.
  Returns:
    The Corpus.
  """
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(f"heldout_fraction={heldout_fraction} must be in (0, 1)")
  if path is None or str(path) == "":
    root = stdlib_dir()
    files, kind = default_corpus_files(root, max_file_bytes), "text"
    if not files:
      raise ValueError(f"no .py files found in the standard library directory {root}")
  else:
    p = Path(path).expanduser()
    if not p.exists():
      raise FileNotFoundError(f"corpus path {p} does not exist")
    if p.is_file():
      kind = "tokens" if p.suffix == ".npy" else "text"
      return Corpus(root=p.parent, kind=kind, split="tail", train=(p,), held_out=(),
                    heldout_fraction=heldout_fraction)
    root = p
    files, kind = _walk(root, lambda f: f.suffix == ".npy"), "tokens"
    if not files:
      files, kind = _walk(root, lambda f: f.suffix.lower() not in _BINARY_SUFFIXES), "text"
    if not files:
      raise ValueError(f"corpus directory {root} holds no text or .npy files")
  if len(files) < MIN_FILES_FOR_FILE_SPLIT:
    return Corpus(root=root, kind=kind, split="tail", train=tuple(files), held_out=(),
                  heldout_fraction=heldout_fraction)
  train, held = split_files(files, root, heldout_fraction, min_heldout_files)
  return Corpus(root=root, kind=kind, split="files", train=tuple(train), held_out=tuple(held),
                heldout_fraction=heldout_fraction)


def read_bytes(path: Path) -> bytes | None:
  """UTF-8 bytes of a text file without a leading byte-order mark, or None if it is not UTF-8 text.

  A file is not text when it holds a NUL byte or does not decode as UTF-8.

  Args:
    path: the file.
  Returns:
    The bytes, or None.
  """
  data = Path(path).read_bytes()
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8):]
  if b"\x00" in data:
    return None
  try:
    data.decode("utf-8")
  except UnicodeDecodeError:
    return None
  return data


def read_text(path: Path) -> str | None:
  """Text of a UTF-8 file, or None if it is not UTF-8 text (see `read_bytes`)."""
  data = read_bytes(path)
  return None if data is None else data.decode("utf-8")

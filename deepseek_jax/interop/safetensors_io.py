"""Streaming reader and writer of the safetensors file format, one tensor at a time.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, offsets relative to the
end of the header) and the raw little-endian tensor bytes.  The `safetensors` package's NumPy backend cannot
return float8 tensors (NumPy has no such dtype), and its writers take every tensor of a file at once, so this
module reads and writes the layout directly with `ml_dtypes` for bfloat16 / float8: a read copies exactly one
tensor's bytes into host memory, and a write pulls one tensor at a time from a producer.

A checkpoint directory holds `model.safetensors`, or several files named by `model.safetensors.index.json`
(`{"metadata": {"total_size"}, "weight_map": {name: file}}`), the layout transformers reads and writes.

A checkpoint is untrusted input.  Every file it names must resolve (symlinks included) inside its folder
(or, for a Hugging Face hub cache snapshot, inside the repository's `blobs/`) and be a regular file, checked
with `stat` before it is opened; every header is validated whole (types, known dtype, shape x dtype = byte
range, ranges inside the file and disjoint) before any tensor is read, so nothing is allocated for a size a
file does not hold.  Every refusal is a `CheckpointError` whose one-line message names the file and the field
or tensor.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import stat
import struct
from typing import Callable, Iterable, Mapping, Optional, Sequence

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Largest JSON header / index / config.json read (the safetensors package's own header limit).
MAX_JSON_BYTES = 100_000_000
MAX_RANK = 32

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint that is malformed, unsafe, or does not fit its config (one line naming file and field)."""


def dtype_name(dtype) -> str:
  """The safetensors dtype string ('F32', 'BF16', 'F8_E4M3', ...) of a NumPy / ml_dtypes / jnp dtype."""
  dt = np.dtype(dtype)
  if dt not in _NAMES:
    raise ValueError(f"dtype {dt} has no safetensors name (known: {sorted(_NAMES.values())})")
  return _NAMES[dt]


def show(value, limit: int = 80) -> str:
  """repr of an untrusted value, its middle cut to keep `limit` characters (one line, whatever it holds)."""
  r = repr(value)
  return r if len(r) <= limit else r[:limit // 2] + "..." + r[-(limit // 2):]


# ------------------------------------------------------------------------------------------------ files

def _allowed_roots(root: str) -> list[str]:
  """The real folders a checkpoint's files may live in: the folder, and for a hub cache snapshot
  (`<repo>/snapshots/<revision>`, whose files link to `<repo>/blobs/`) that repository's blobs."""
  real = os.path.realpath(root)
  roots = [real]
  parent = os.path.dirname(real)
  if os.path.basename(parent) == "snapshots":
    roots.append(os.path.join(os.path.dirname(parent), "blobs"))
  return roots


def resolve_inside(root: str, name, where: str) -> str:
  """The real path of file `name` of the checkpoint folder `root`, refused unless it resolves inside it.

  Args:
    root: the checkpoint folder.
    name: a relative file name from the checkpoint (an index entry, a fixed name).
    where: what names it, for the message (e.g. 'model.safetensors.index.json weight_map entry x').
  Raises:
    CheckpointError: not a string, absolute, or resolving (through '..' or symlinks) outside the folder.
  """
  if not isinstance(name, str) or not name or "\0" in name:
    raise CheckpointError(f"{where}: file name {show(name)} is not a file name")
  if os.path.isabs(name):
    raise CheckpointError(f"{where}: file name {show(name)} is an absolute path; a checkpoint may only name "
                          f"files inside its folder {root}")
  real = os.path.realpath(os.path.join(root, name))
  if real == os.path.realpath(root):
    raise CheckpointError(f"{where}: file name {show(name)} names the checkpoint folder itself")
  for r in _allowed_roots(root):
    if os.path.commonpath([real, r]) == r:
      return real
  raise CheckpointError(f"{where}: file {show(name)} resolves outside the checkpoint folder {root} "
                        "(through '..' or a symlink); refused")


_KINDS = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


def _kind(mode: int) -> str:
  return next((k for test, k in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str, shown: Optional[str] = None):
  """A binary file object of `path`, refused (without opening it for reading) unless it is a regular file.

  Raises:
    FileNotFoundError: no such file.
    CheckpointError: a directory, FIFO, device, socket, or a file that cannot be opened.
  """
  shown = shown or path
  try:
    st = os.stat(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"{shown}: no such file") from None
  except OSError as e:
    raise CheckpointError(f"{shown}: cannot stat ({e.strerror})") from None
  if not stat.S_ISREG(st.st_mode):
    raise CheckpointError(f"{shown} is {_kind(st.st_mode)}, not a regular file; refused")
  try:  # O_NONBLOCK: a file swapped for a FIFO after the stat still cannot block the open
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
  except OSError as e:
    raise CheckpointError(f"{shown}: cannot open ({e.strerror})") from None
  f = os.fdopen(fd, "rb")
  if not stat.S_ISREG(os.fstat(fd).st_mode):
    f.close()
    raise CheckpointError(f"{shown} is not a regular file; refused")
  return f


def _no_duplicates(pairs):
  d = {}
  for k, v in pairs:
    if k in d:
      raise CheckpointError(f"key {show(k)} appears twice")
    d[k] = v
  return d


def parse_json(raw: bytes, shown: str, *, unique_keys: bool = False):
  """JSON of untrusted bytes; one CheckpointError line for bad UTF-8, bad JSON or too deep nesting."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{shown}: not UTF-8 text (byte {e.start})") from None
  try:
    return json.loads(text, object_pairs_hook=_no_duplicates if unique_keys else None)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{shown}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
  except RecursionError:
    raise CheckpointError(f"{shown}: JSON nested too deeply") from None
  except CheckpointError as e:
    raise CheckpointError(f"{shown}: {e}") from None
  except ValueError as e:  # e.g. an integer of more digits than Python converts
    raise CheckpointError(f"{shown}: not valid JSON ({e})") from None


def read_json(path: str, shown: Optional[str] = None, *, unique_keys: bool = False,
              limit: int = MAX_JSON_BYTES):
  """The parsed JSON of a regular file of at most `limit` bytes (see `parse_json`)."""
  shown = shown or path
  with open_regular(path, shown) as f:
    size = os.fstat(f.fileno()).st_size
    if size > limit:
      raise CheckpointError(f"{shown}: {size} bytes, more than the {limit} a JSON file here may have")
    raw = f.read(size + 1)  # read(n) allocates n bytes up front: ask for what the file holds
  if len(raw) > limit:
    raise CheckpointError(f"{shown}: more than the {limit} bytes a JSON file here may have")
  return parse_json(raw, shown, unique_keys=unique_keys)


# ------------------------------------------------------------------------------------------------ headers

@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives: its file, dtype string, shape and byte range inside the data section."""
  name: str
  file: str
  dtype: str
  shape: tuple
  begin: int
  end: int

  @property
  def nbytes(self) -> int:
    return self.end - self.begin


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _tensor_info(fn: str, shown: str, name: str, meta, data_size: int) -> TensorInfo:
  where = f"{shown}: tensor {show(name)}"
  if not isinstance(meta, Mapping):
    raise CheckpointError(f"{where} is a {type(meta).__name__}, not an object with dtype, shape and "
                          "data_offsets")
  for key in ("dtype", "shape", "data_offsets"):
    if key not in meta:
      raise CheckpointError(f"{where} has no '{key}' field")
  dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
  if not isinstance(dtype, str) or dtype not in DTYPES:
    raise CheckpointError(f"{where}: field 'dtype' {show(dtype)} is not a known dtype ({sorted(DTYPES)})")
  if (not isinstance(shape, list) or len(shape) > MAX_RANK
      or not all(_is_int(n) and n >= 0 for n in shape)):
    raise CheckpointError(f"{where}: field 'shape' {show(shape)} is not a list of at most {MAX_RANK} "
                          "non-negative integers")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(n) and n >= 0 for n in offsets)):
    raise CheckpointError(f"{where}: field 'data_offsets' {show(offsets)} is not two non-negative integers")
  begin, end = offsets
  if begin > end:
    raise CheckpointError(f"{where}: field 'data_offsets' [{begin}, {end}] ends before it begins")
  if end > data_size:
    raise CheckpointError(f"{where}: field 'data_offsets' [{begin}, {end}] reaches past the "
                          f"{data_size}-byte data section of the file")
  need = math.prod(shape) * DTYPES[dtype].itemsize
  if need != end - begin:
    raise CheckpointError(f"{where}: shape {tuple(shape)} of {dtype} is {need} bytes, but field "
                          f"'data_offsets' [{begin}, {end}] holds {end - begin}")
  return TensorInfo(name, fn, dtype, tuple(shape), begin, end)


def read_header(path: str, fn: Optional[str] = None, shown: Optional[str] = None):
  """(data section offset, [TensorInfo]) of one safetensors file, its header validated whole.

  Args:
    path: the file (already resolved / checked by the caller, or trusted).
    fn: the file's name in its checkpoint (TensorInfo.file); default the base name.
    shown: how messages name the file; default `path`.
  Raises:
    CheckpointError: not a regular file, header length past the end of the file, header not UTF-8 JSON
      of tensor objects, unknown dtype, malformed shape or data_offsets, byte ranges that do not match the
      shape, lie outside the file or overlap.
  """
  fn = fn or os.path.basename(path)
  shown = shown or path
  with open_regular(path, shown) as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise CheckpointError(f"{shown}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", raw)
    size = os.fstat(f.fileno()).st_size
    if n > size - 8:
      raise CheckpointError(f"{shown}: header length {n} exceeds the file size {size}")
    if n > MAX_JSON_BYTES:
      raise CheckpointError(f"{shown}: header length {n} exceeds the format's limit of {MAX_JSON_BYTES}")
    header_raw = f.read(n)
  if len(header_raw) != n:
    raise CheckpointError(f"{shown}: the file ended inside its {n}-byte header")
  header = parse_json(header_raw, f"{shown} header", unique_keys=True)
  if not isinstance(header, Mapping):
    raise CheckpointError(f"{shown}: header is a {type(header).__name__}, not an object of tensors")
  data_size = size - 8 - n
  infos = []
  for name, meta in header.items():
    if name == "__metadata__":
      if meta is not None and not isinstance(meta, Mapping):
        raise CheckpointError(f"{shown}: field '__metadata__' is a {type(meta).__name__}, not an object")
      continue
    infos.append(_tensor_info(fn, shown, name, meta, data_size))
  previous = None
  for t in sorted(infos, key=lambda t: (t.begin, t.end)):
    if previous is not None and t.begin < previous.end:
      raise CheckpointError(f"{shown}: tensors {show(previous.name)} (bytes {previous.begin}-{previous.end}) "
                            f"and {show(t.name)} (bytes {t.begin}-{t.end}) overlap")
    if t.end > t.begin:
      previous = t
  return 8 + n, infos


# ------------------------------------------------------------------------------------------------ checkpoint

def _exists(path: str) -> bool:
  return os.path.lexists(path)


class Checkpoint:
  """The tensors of a checkpoint directory (single file, index + shards, or a set of *.safetensors).

  Only headers are read (and validated) on construction; `read(name)` copies one tensor into a NumPy array.
  Raises FileNotFoundError for a missing folder or no safetensors file, CheckpointError for the rest.
  """

  def __init__(self, path: str):
    self.path = os.fspath(path)
    if not os.path.isdir(self.path):
      raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
    index = os.path.join(self.path, INDEX_FILE)
    weight_map = None
    if _exists(index):
      resolve_inside(self.path, INDEX_FILE, index)
      data = read_json(index, unique_keys=True)
      weight_map = data.get("weight_map") if isinstance(data, Mapping) else None
      if not isinstance(weight_map, Mapping):
        raise CheckpointError(f"{index}: no 'weight_map' object")
      first = {}
      for name, fn in weight_map.items():
        if not isinstance(fn, str):
          raise CheckpointError(f"{index}: weight_map entry {show(name)} is a {type(fn).__name__}, not a "
                                "file name")
        first.setdefault(fn, name)
      files = sorted(first)
      where = {fn: f"{index}: weight_map entry {show(first[fn])}" for fn in files}
    elif _exists(os.path.join(self.path, SINGLE_FILE)):
      files = [SINGLE_FILE]
      where = {SINGLE_FILE: os.path.join(self.path, SINGLE_FILE)}
    else:
      files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(self.path),
                                                                         "*.safetensors")))
      if not files:
        raise FileNotFoundError(f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file in {self.path}")
      where = {fn: os.path.join(self.path, fn) for fn in files}
    # Every file is checked to resolve inside the folder before any is opened.
    self._real = {fn: resolve_inside(self.path, fn, where[fn]) for fn in files}
    self.files = files
    self.tensors: dict[str, TensorInfo] = {}
    self._data_start: dict[str, int] = {}
    for fn in files:
      shown = os.path.join(self.path, fn)
      try:
        start, infos = read_header(self._real[fn], fn, shown)
      except FileNotFoundError:
        if weight_map is None:
          raise
        raise CheckpointError(f"{where[fn]} names file {show(fn)}, which is not in {self.path}") from None
      self._data_start[fn] = start
      for t in infos:
        if t.name in self.tensors:
          raise CheckpointError(f"tensor {show(t.name)} appears in both {self.tensors[t.name].file} and {fn}")
        self.tensors[t.name] = t
    if weight_map is not None:
      for name, fn in weight_map.items():
        if name not in self.tensors:
          raise CheckpointError(f"{index}: weight_map maps {show(name)} to {show(fn)}, which does not contain "
                                "it")
        if self.tensors[name].file != fn:
          raise CheckpointError(f"{index}: weight_map maps {show(name)} to {show(fn)}, but it is in "
                                f"{self.tensors[name].file}")

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def names(self) -> list[str]:
    return list(self.tensors)

  @property
  def total_bytes(self) -> int:
    return sum(t.nbytes for t in self.tensors.values())

  def read(self, name: str) -> np.ndarray:
    """One tensor as a (writable, owned) NumPy array of its stored dtype."""
    if name not in self.tensors:
      raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.path}")
    t = self.tensors[name]
    dt = DTYPES[t.dtype]
    shown = os.path.join(self.path, t.file)
    with open_regular(self._real[t.file], shown) as f:
      offset = self._data_start[t.file] + t.begin
      size = os.fstat(f.fileno()).st_size
      if offset + t.nbytes > size:  # the file shrank since its header was read: allocate nothing
        raise CheckpointError(f"{shown}: tensor {show(name)} needs bytes up to {offset + t.nbytes}, the file "
                              f"has {size}")
      buf = bytearray(t.nbytes)
      view = memoryview(buf)
      f.seek(offset)
      got = 0
      while got < t.nbytes:  # readinto may return short counts for reads over 2 GiB
        n = f.readinto(view[got:])
        if not n:
          raise CheckpointError(f"{shown}: tensor {show(name)}: the file ends after {got} of {t.nbytes} bytes")
        got += n
    return np.frombuffer(buf, dtype=dt).reshape(t.shape)


@dataclasses.dataclass
class PlannedTensor:
  """A tensor to write: name, shape, dtype string and a function returning its NumPy value."""
  name: str
  shape: tuple
  dtype: str
  produce: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize


def write_file(path: str, tensors: Sequence[PlannedTensor], metadata: Optional[Mapping[str, str]] = None):
  """Writes one safetensors file, calling each tensor's producer in order (one tensor in memory at a time)."""
  header, offset = {}, 0
  for t in tensors:
    header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  header["__metadata__"] = dict(metadata or {"format": "pt"})
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for t in tensors:
      a = np.ascontiguousarray(t.produce())
      if tuple(a.shape) != tuple(t.shape) or dtype_name(a.dtype) != t.dtype:
        raise ValueError(f"tensor {t.name!r}: produced {a.dtype} {a.shape}, planned {t.dtype} {t.shape}")
      if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
      f.write(memoryview(a.reshape(-1).view(np.uint8)))


def parse_size(size) -> int:
  """Bytes of a size given as an int or a string like '5GB', '500MB', '2GiB' (GB = 10^9, GiB = 2^30)."""
  if isinstance(size, (int, np.integer)):
    return int(size)
  m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
  if not m:
    raise ValueError(f"max_shard_size={size!r}: expected bytes or a string like '5GB'")
  unit = (m.group(2) or "B").upper()
  mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
  return int(float(m.group(1)) * mult)


def plan_shards(tensors: Iterable[PlannedTensor], max_shard_size) -> list[list[PlannedTensor]]:
  """Splits tensors, in order, into shards of at most max_shard_size bytes (a larger tensor gets its own)."""
  limit = parse_size(max_shard_size)
  shards: list[list[PlannedTensor]] = [[]]
  size = 0
  for t in tensors:
    if shards[-1] and size + t.nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  return [s for s in shards if s]


def write_checkpoint(path: str, tensors: Sequence[PlannedTensor], max_shard_size="5GB",
                     progress: Optional[Callable[[str], None]] = None) -> list[str]:
  """Writes tensors into `path` as model.safetensors or model-0000i-of-0000n.safetensors + index.

  Args:
    path: an existing directory.
    tensors: planned tensors, in file order.
    max_shard_size: bytes per shard (int or '5GB').
    progress: called with each tensor's name after it is written.
  Returns:
    The file names written.
  """
  shards = plan_shards(tensors, max_shard_size)
  n = len(shards)
  names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  weight_map = {}
  for fn, shard in zip(names, shards):
    planned = shard
    if progress is not None:
      planned = [dataclasses.replace(t, produce=_reporting(t, progress)) for t in shard]
    write_file(os.path.join(path, fn), planned)
    weight_map.update({t.name: fn for t in shard})
  if n > 1:
    total = sum(t.nbytes for s in shards for t in s)
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names


def _reporting(t: PlannedTensor, progress):
  def produce():
    a = t.produce()
    progress(t.name)
    return a
  return produce

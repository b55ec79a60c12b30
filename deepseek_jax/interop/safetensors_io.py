"""Streaming reader and writer of the safetensors file format, one tensor at a time.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, offsets relative to the
end of the header) and the raw little-endian tensor bytes.  The `safetensors` package's NumPy backend cannot
return float8 tensors (NumPy has no such dtype), and its writers take every tensor of a file at once, so this
module reads and writes the layout directly with `ml_dtypes` for bfloat16 / float8: a read copies exactly one
tensor's bytes into host memory, and a write pulls one tensor at a time from a producer.

A checkpoint directory holds `model.safetensors`, or several files named by `model.safetensors.index.json`
(`{"metadata": {"total_size"}, "weight_map": {name: file}}`), the layout transformers reads and writes.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import struct
from typing import Callable, Iterable, Mapping, Optional, Sequence

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype) -> str:
  """The safetensors dtype string ('F32', 'BF16', 'F8_E4M3', ...) of a NumPy / ml_dtypes / jnp dtype."""
  dt = np.dtype(dtype)
  if dt not in _NAMES:
    raise ValueError(f"dtype {dt} has no safetensors name (known: {sorted(_NAMES.values())})")
  return _NAMES[dt]


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


def read_header(path: str) -> tuple[int, dict]:
  """(data section offset, parsed JSON header) of one safetensors file."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", raw)
    size = os.fstat(f.fileno()).st_size
    if n > size - 8:
      raise ValueError(f"{path}: header length {n} exceeds the file size {size}")
    header = json.loads(f.read(n))
  return 8 + n, header


class Checkpoint:
  """The tensors of a checkpoint directory (single file, index + shards, or a set of *.safetensors).

  Only headers are read on construction; `read(name)` copies one tensor into a NumPy array.
  """

  def __init__(self, path: str):
    self.path = os.fspath(path)
    index = os.path.join(self.path, INDEX_FILE)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, Mapping):
        raise ValueError(f"{index}: no 'weight_map' object")
      files = sorted(set(weight_map.values()))
      for fn in files:
        if not os.path.exists(os.path.join(self.path, fn)):
          raise FileNotFoundError(f"{index} names shard {fn!r}, which is not in {self.path}")
    elif os.path.exists(os.path.join(self.path, SINGLE_FILE)):
      weight_map, files = None, [SINGLE_FILE]
    else:
      files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.path, "*.safetensors")))
      weight_map = None
      if not files:
        raise FileNotFoundError(f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file in {self.path}")
    self.files = files
    self.tensors: dict[str, TensorInfo] = {}
    self._data_start: dict[str, int] = {}
    for fn in files:
      full = os.path.join(self.path, fn)
      start, header = read_header(full)
      self._data_start[fn] = start
      for name, meta in header.items():
        if name == "__metadata__":
          continue
        if name in self.tensors:
          raise ValueError(f"tensor {name!r} appears in both {self.tensors[name].file} and {fn}")
        if meta["dtype"] not in DTYPES:
          raise ValueError(f"tensor {name!r} in {fn} has unsupported dtype {meta['dtype']!r}")
        b, e = meta["data_offsets"]
        self.tensors[name] = TensorInfo(name, fn, meta["dtype"], tuple(meta["shape"]), int(b), int(e))
    if weight_map is not None:
      for name, fn in weight_map.items():
        if name not in self.tensors:
          raise ValueError(f"{INDEX_FILE} maps {name!r} to {fn}, which does not contain it")
        if self.tensors[name].file != fn:
          raise ValueError(f"{INDEX_FILE} maps {name!r} to {fn}, but it is in {self.tensors[name].file}")

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
    count = int(np.prod(t.shape, dtype=np.int64))
    if count * dt.itemsize != t.nbytes:
      raise ValueError(f"tensor {name!r} in {t.file}: {t.nbytes} bytes for shape {t.shape} of {t.dtype}")
    buf = bytearray(t.nbytes)
    view = memoryview(buf)
    with open(os.path.join(self.path, t.file), "rb") as f:
      f.seek(self._data_start[t.file] + t.begin)
      got = 0
      while got < t.nbytes:  # readinto may return short counts for reads over 2 GiB
        n = f.readinto(view[got:])
        if not n:
          raise ValueError(f"tensor {name!r}: {t.file} ends after {got} of {t.nbytes} bytes")
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

"""Import and export of HF DeepSeek-V2/V3 checkpoints (safetensors, FP8 blockwise, MTP layer, index files).

`load` reads a directory with `config.json` and `model.safetensors` (or shards named by
`model.safetensors.index.json`) into the variables `DeepSeekV3(cfg).init` makes:
1. `ModelConfig.from_hf(config.json)` (values type-checked, sizes bounded); every safetensors header is
   validated (`safetensors_io.Checkpoint`: files inside the folder, regular, byte ranges inside them); the
   config's layer and expert counts are checked against the tensors present before the name table of
   `hf_names.entries` is built, and the headers against that table before any data is read (missing,
   misshapen, unexpected tensors, FP8 weights without their scale).  A config with MTP layers whose tensors
   are absent loads with those depths removed.  Every problem is one `CheckpointError` line naming the file
   and the field or tensor.
2. One variable at a time: each HF tensor is read, dequantized if it is float8_e4m3fn (block x
   `weight_scale_inv`, block from `quantization_config.weight_block_size`, ragged edge blocks), laid out
   ([out, in] -> [in..., out...]; per-expert tensors -> slices of the stacked [E, in, out]) and cast.
3. With a mesh, each variable is assembled shard by shard (`jax.make_array_from_single_device_arrays` of
   per-device blocks, the shardings from the logical axis rules): a shard of an expert stack reads only the
   experts it holds, and other variables are read once and sliced, so host memory holds one tensor (or one
   shard of experts) at a time, never the model.
`save` writes the layout transformers reads (per-expert names, `config.json` from `cfg.to_hf()`, an index
when there are several shards, MTP depth k as `model.layers.{num_hidden_layers + k - 1}.*` including its
copies of the embedding and head), optionally the released FP8 layout, through a temporary directory that
is renamed into place only when complete.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import MAX_CONFIG_BYTES, ModelConfig
from deepseek_jax.interop import fp8_variables, hf_names, safetensors_io
from deepseek_jax.interop.hf_names import Entry
from deepseek_jax.interop.placement import abstract_variables, variable_shardings
from deepseek_jax.layers import fp8_weights
from deepseek_jax.ops.fp8 import E4M3, dequantize_blockwise, quantize_blockwise

DEFAULT_BLOCK = (128, 128)
# The released FP8 layout keeps these in bf16 (docs/reference.md); the router bias stays fp32.
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}


CheckpointError = safetensors_io.CheckpointError


@dataclasses.dataclass
class LoadReport:
  """What `load_with_report` converted.

  Attributes:
    tensors: HF tensors read (weights and FP8 scales).
    bytes: bytes of those tensors on disk.
    fp8_dequantized: float8_e4m3fn weights dequantized.
    fp8_kept: float8_e4m3fn weights kept as codes + scales (`keep_fp8=True`).
    fp8_quantized: higher-precision weights quantized to E4M3 on load (`keep_fp8=True`).
    mtp_layers: MTP depths loaded.
    skipped: tensors present but not needed (MTP copies of the embedding / head, old buffers).
    files: safetensors files of the checkpoint.
    largest_tensor_bytes: the largest variable as loaded (bytes in the target dtype).
  """
  tensors: int = 0
  bytes: int = 0
  fp8_dequantized: int = 0
  fp8_kept: int = 0
  fp8_quantized: int = 0
  mtp_layers: int = 0
  skipped: list = dataclasses.field(default_factory=list)
  files: list = dataclasses.field(default_factory=list)
  largest_tensor_bytes: int = 0


# ------------------------------------------------------------------------------------------------ layouts

def _flat(shape) -> int:
  return int(math.prod(shape))


def hf_shape(e: Entry, leaf_shape: Sequence[int]) -> tuple:
  """The HF tensor shape of entry e, whose variable has shape leaf_shape."""
  leaf_shape = tuple(leaf_shape)
  if e.kind == "copy":
    return leaf_shape
  if e.kind == "linear":
    return (_flat(leaf_shape[e.n_in:]), _flat(leaf_shape[:e.n_in]))
  return (leaf_shape[2], leaf_shape[1])  # expert j of [E, in, out]


def _rope_permutation(cfg: ModelConfig, width: int) -> np.ndarray:
  """Index map of the last (output) axis from the rotate-half rope layout to the interleaved one.

  The rope columns are the last qk_rope_head_dim of the axis (of each head for q, of kv_a for k_pe).
  Interleaved pair p is (2p, 2p + 1); rotate-half pair p is (p, p + Dr/2).  Applied to the same columns of q
  and k, it leaves every q.k product, hence the model, unchanged.
  """
  dr = cfg.qk_rope_head_dim
  half = dr // 2
  perm = np.arange(width)
  start = width - dr
  perm[start:] = start + np.array([c * half + p for p in range(half) for c in (0, 1)])
  return perm


def to_model_layout(cfg: ModelConfig, e: Entry, w: np.ndarray, leaf_shape, interleaved: bool = True):
  """HF tensor -> the variable (or for an expert, its slice j) in the model's layout."""
  if e.kind == "copy":
    return w
  if e.kind == "linear":
    k = w.T.reshape(tuple(leaf_shape))
  else:
    k = w.T
  if e.rope is not None and not interleaved:
    k = k[..., _rope_permutation(cfg, k.shape[-1])]
  return k


def to_hf_layout(e: Entry, k: np.ndarray) -> np.ndarray:
  """The model's variable (for an expert, its slice j) -> the HF tensor [out, in] (rope interleaved)."""
  if e.kind == "copy":
    return k
  if e.kind == "linear":
    return k.reshape(_flat(k.shape[:e.n_in]), _flat(k.shape[e.n_in:])).T
  return k.T


# ------------------------------------------------------------------------------------------------ config

def _read_config(path: str) -> tuple[str, dict]:
  """(path of config.json, its parsed JSON object), the file checked like every checkpoint file."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  fn = os.path.join(path, "config.json")
  if not os.path.lexists(fn):
    raise FileNotFoundError(f"no config.json in {path}: an HF checkpoint directory needs one")
  safetensors_io.resolve_inside(path, "config.json", fn)
  raw = safetensors_io.read_json(fn, limit=MAX_CONFIG_BYTES)
  if not isinstance(raw, dict):
    raise CheckpointError(f"{fn}: the config is a {type(raw).__name__}, not an object")
  return fn, raw


def _block_size(raw: dict, fn: str) -> tuple:
  q = raw.get("quantization_config")
  if q is None:
    q = {}
  if not isinstance(q, dict):
    raise CheckpointError(f"{fn}: field quantization_config={safetensors_io.show(q)} is not an object")
  block = q.get("weight_block_size") or DEFAULT_BLOCK
  if (not isinstance(block, (list, tuple)) or len(block) != 2
      or not all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 1 << 16 for b in block)):
    raise CheckpointError(f"{fn}: field quantization_config.weight_block_size={safetensors_io.show(block)}: "
                          "expected two positive ints")
  return tuple(int(b) for b in block)


def _config(raw: dict, fn: str, overrides: dict) -> ModelConfig:
  try:
    return ModelConfig.from_hf(raw, **overrides)
  except ValueError as e:
    raise CheckpointError(f"{fn}: {e}") from None


def _dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


def _path_str(collection: str, path: tuple) -> str:
  return "/".join((collection,) + tuple(path))


def _leaves(tree) -> dict:
  """{(collection, path): leaf} of a variables tree."""
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in kp)
    out[(keys[0], keys[1:])] = leaf
  return out


def _unflatten(items: dict) -> dict:
  root: dict = {}
  for (col, path), v in items.items():
    node = root.setdefault(col, {})
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = v
  return root


# ------------------------------------------------------------------------------------------------ checks

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def _check_sizes_against_files(cfg: ModelConfig, ckpt: safetensors_io.Checkpoint, fn: str):
  """Refuses a config whose layer / expert counts the files cannot hold, before any table is built."""
  layers, experts = set(), set()
  for name in ckpt.tensors:
    m = _LAYER.match(name)
    if m:
      layers.add(m.group(1))
      e = _EXPERT.search(name, m.end() - 1)
      if e:
        experts.add(e.group(1))
  if cfg.num_hidden_layers > len(layers):
    raise CheckpointError(f"{fn}: field num_hidden_layers={cfg.num_hidden_layers}, but the safetensors files "
                          f"hold tensors of {len(layers)} layers")
  if cfg.num_moe_layers and cfg.n_routed_experts > len(experts):
    raise CheckpointError(f"{fn}: field n_routed_experts={cfg.n_routed_experts}, but the safetensors files "
                          f"hold tensors of {len(experts)} experts")


def _check_table_size(cfg: ModelConfig, ckpt: safetensors_io.Checkpoint, fn: str):
  """Refuses a config that needs more tensors than the files hold, counting at most that many entries."""
  have, need = len(ckpt.tensors), 0
  for e in hf_names.iter_entries(cfg):
    need += not e.alias
    if need > have:
      raise CheckpointError(f"{fn} describes a model of more tensors than the {have} its safetensors files "
                            "hold (check num_hidden_layers, n_routed_experts, num_nextn_predict_layers)")


def _mtp_depths_present(cfg: ModelConfig, names) -> int:
  depth = 0
  for k in range(1, cfg.num_nextn_predict_layers + 1):
    prefix = hf_names.mtp_prefix(cfg, k)
    if not any(n.startswith(prefix) for n in names):
      break
    depth = k
  return depth


def _validate(ckpt: safetensors_io.Checkpoint, cfg: ModelConfig, table, shapes, strict: bool, block):
  """Checks every tensor header against the table; returns the names skipped."""
  names = set(ckpt.names())
  needed = [e for e in table if not e.alias]
  missing = [e.hf for e in needed if e.hf not in names]
  if missing:
    shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
    raise CheckpointError(f"checkpoint {ckpt.path} lacks tensors the model needs: {shown}")
  used = set()
  for e in needed:
    info = ckpt.tensors[e.hf]
    if not info.dtype.startswith(("F", "BF")):
      raise CheckpointError(f"tensor {e.hf} (in {info.file}) has dtype {info.dtype}; model weights are floating "
                            "point")
    want = hf_shape(e, shapes[(e.collection, e.path)].shape)
    if tuple(info.shape) != want:
      raise CheckpointError(f"tensor {e.hf}: expected shape {want} from config.json, found "
                            f"{tuple(info.shape)} (in {info.file})")
    used.add(e.hf)
    if info.dtype.startswith("F8"):
      if info.dtype != "F8_E4M3":
        raise CheckpointError(f"tensor {e.hf} has dtype {info.dtype}; only float8_e4m3fn (F8_E4M3) "
                              "checkpoints are supported")
      scale = hf_names.scale_name(e.hf)
      if scale not in names:
        raise CheckpointError(f"FP8 weight {e.hf} ({info.dtype}) has no {scale} tensor to dequantize it")
      sinfo = ckpt.tensors[scale]
      swant = tuple(-(-n // b) for n, b in zip(info.shape, block))
      if tuple(sinfo.shape) != swant:
        raise CheckpointError(f"tensor {scale} (in {sinfo.file}): weight_scale_inv has shape "
                              f"{tuple(sinfo.shape)}, expected {swant} for {info.shape} weights in {block} "
                              "blocks")
      if sinfo.dtype not in ("F32", "BF16", "F16"):
        raise CheckpointError(f"tensor {scale} (in {sinfo.file}) has dtype {sinfo.dtype}; a weight_scale_inv "
                              "is F32, BF16 or F16")
      used.add(scale)
  aliases = {e.hf for e in table if e.alias}
  rest = sorted(names - used)
  skipped = [n for n in rest if n in aliases or n.endswith(hf_names.IGNORED_SUFFIXES)]
  unexpected = [n for n in rest if n not in skipped]
  if unexpected:
    # Names from the file: shown escaped (a name may hold a newline) unless plain.
    shown = ", ".join(n if n.isprintable() and len(n) <= 200 else safetensors_io.show(n)
                      for n in unexpected[:12]) + (f", ... ({len(unexpected)} in all)" if len(unexpected) > 12
                                          else "")
    msg = f"checkpoint {ckpt.path} has tensors the model has no place for: {shown}"
    if strict:
      raise CheckpointError(msg + " (load(..., strict=False) skips them)")
    warnings.warn(msg + "; skipped")
    skipped += unexpected
  return skipped


# ------------------------------------------------------------------------------------------------ load

_FINITE_CHUNK = 1 << 24  # elements checked at a time (bounds the temporary of np.isfinite)


class _LeafReader:
  """Produces one variable (or a shard of it) in the model layout from its HF tensors."""

  def __init__(self, ckpt, cfg, entries, shape, dtype, block, interleaved, report):
    self.ckpt, self.cfg, self.entries = ckpt, cfg, entries
    self.shape, self.dtype, self.block = tuple(shape), np.dtype(dtype), block
    self.interleaved, self.report = interleaved, report
    self._full = None
    self._experts_cache = None
    self._read_names = set()

  def _read(self, name) -> np.ndarray:
    info = self.ckpt.tensors[name]
    w = self.ckpt.read(name)
    first = name not in self._read_names
    self._read_names.add(name)
    if first:
      self.report.tensors += 1
      self.report.bytes += info.nbytes
    if info.dtype == "F8_E4M3":
      scale_name = hf_names.scale_name(name)
      s = self.ckpt.read(scale_name)
      if first:
        self.report.tensors += 1
        self.report.bytes += self.ckpt.tensors[scale_name].nbytes
        self.report.fp8_dequantized += 1
      return dequantize_blockwise(w, s, self.block, dtype=np.float32)
    return w

  def _convert(self, e: Entry) -> np.ndarray:
    w = self._read(e.hf)
    k = to_model_layout(self.cfg, e, w, self.shape, self.interleaved)
    return np.ascontiguousarray(k, dtype=self.dtype)

  def _finite(self, e: Entry) -> np.ndarray:
    """_convert(e), refused if a value is NaN or inf (a damaged file, or scales that overflow the dtype)."""
    k = self._convert(e)
    flat = k.reshape(-1)
    for i in range(0, flat.size, _FINITE_CHUNK):
      if not np.isfinite(flat[i:i + _FINITE_CHUNK]).all():
        raise CheckpointError(f"tensor {e.hf} (in {self.ckpt.tensors[e.hf].file}) holds non-finite values "
                              f"(NaN or inf) as {k.dtype}")
    return k

  def full(self) -> np.ndarray:
    """The whole variable."""
    if self._full is None:
      if self.entries[0].kind == "expert":
        self._full = self.block_of(tuple(slice(0, n) for n in self.shape))
      else:
        self._full = self._finite(self.entries[0])
    return self._full

  def block_of(self, index) -> np.ndarray:
    """The variable's block at `index` (a tuple of slices): experts are read only for the rows asked."""
    index = tuple(slice(*s.indices(n)) for s, n in zip(
        tuple(index) + (slice(None),) * (len(self.shape) - len(index)), self.shape))
    if self.entries[0].kind != "expert":
      return self.full()[index]
    rows = (index[0].start, index[0].stop, index[0].step)
    if self._experts_cache is not None and self._experts_cache[0] == rows:
      stack = self._experts_cache[1]
    else:
      by_expert = {e.expert: e for e in self.entries}
      stack = np.stack([self._finite(by_expert[j]) for j in range(*rows)]) if range(*rows) else \
          np.zeros((0,) + self.shape[1:], self.dtype)
      self._experts_cache = (rows, stack)
    return stack[(slice(None),) + index[1:]]


class _Fp8LeafReader(_LeafReader):
  """The E4M3 codes (which='codes') or the scale_inv (which='scale') of an FP8-stored variable (keep_fp8).

  An F8_E4M3 checkpoint tensor is taken as it is (codes transposed to the kernel layout, weight_scale_inv
  transposed to [in blocks, out blocks]); a higher-precision one is quantized per block on load.
  """

  def __init__(self, ckpt, cfg, entries, codes_shape, which, block, interleaved, report):
    shape = codes_shape
    if which == "scale":
      n_lead = 1 if entries[0].kind == "expert" else 0
      n_in = 1 if entries[0].kind == "expert" else entries[0].n_in
      shape = fp8_weights.scale_shape(codes_shape, n_lead, n_in, block[0])
    super().__init__(ckpt, cfg, entries, shape, E4M3 if which == "codes" else np.float32, block,
                     interleaved, report)
    self.which, self.codes_shape = which, tuple(codes_shape)
    self._quantized = None

  def _count(self, name, counter):
    if name in self._read_names:
      return
    self._read_names.add(name)
    self.report.tensors += 1
    self.report.bytes += self.ckpt.tensors[name].nbytes
    if counter:
      setattr(self.report, counter, getattr(self.report, counter) + 1)

  def _hf_tensor(self, e: Entry) -> np.ndarray:
    """This reader's half of e as the checkpoint lays it out: codes [out, in] or scale [out / b, in / b]."""
    if self.ckpt.tensors[e.hf].dtype == "F8_E4M3":
      if self.which == "codes":
        self._count(e.hf, "fp8_kept")
        return self.ckpt.read(e.hf)
      name = hf_names.scale_name(e.hf)
      self._count(name, None)
      return np.asarray(self.ckpt.read(name), np.float32)
    if self._quantized is None or self._quantized[0] != e.hf:
      self._count(e.hf, "fp8_quantized")
      self._quantized = (e.hf, quantize_blockwise(np.asarray(self.ckpt.read(e.hf), np.float32), self.block))
    return self._quantized[1][0 if self.which == "codes" else 1]

  def _convert(self, e: Entry) -> np.ndarray:
    t = self._hf_tensor(e)
    if self.which == "codes":
      leaf = self.codes_shape[1:] if e.kind == "expert" else self.codes_shape
      return np.ascontiguousarray(to_model_layout(self.cfg, e, t, leaf, self.interleaved))
    if e.rope is not None and not self.interleaved:
      # The rope column permutation must keep every output column in its block for the scales to hold.
      width = self.codes_shape[-1]
      total = _flat(self.codes_shape[e.n_in:])
      perm = np.concatenate([h * width + _rope_permutation(self.cfg, width) for h in range(total // width)])
      if np.any(perm // self.block[0] != np.arange(total) // self.block[0]):
        raise CheckpointError(f"tensor {e.hf}: the rope column permutation of this rope_interleave=false "
                              f"checkpoint moves columns across {self.block} blocks; load it with "
                              "keep_fp8=False")
    return np.ascontiguousarray(t.T, dtype=np.float32)


def _place(reader: _LeafReader, shape: tuple, sharding) -> jax.Array:
  """Assembles one variable from per-device blocks: each distinct block is built once (sorted, so that
  devices holding the same experts follow each other), copied to its devices and dropped."""
  groups = collections.defaultdict(list)
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    norm = tuple((s.indices(n)[:2]) for s, n in zip(
        tuple(index) + (slice(None),) * (len(shape) - len(index)), shape))
    groups[norm].append(device)
  arrays = []
  for norm in sorted(groups):
    # An owned copy: a CPU device may alias the NumPy buffer, and a view would pin the whole tensor.
    block = np.array(reader.block_of(tuple(slice(a, b) for a, b in norm)), copy=True)
    arrays += [jax.device_put(block, d) for d in groups[norm]]
    del block
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load_with_report(path, *, dtype=jnp.float32, mesh=None, rules=None, strict: bool = True,
                     progress: bool = False, config_overrides: Optional[dict] = None, keep_fp8: bool = False):
  """`load`, also returning a `LoadReport` of what was converted.

  Args: as `load`.
  Returns:
    (cfg, variables, report).
  """
  path = os.fspath(path)
  fn, raw = _read_config(path)
  overrides = dict(param_dtype=_dtype_name(dtype))
  overrides.update(config_overrides or {})
  cfg = _config(raw, fn, overrides)
  block = _block_size(raw, fn)
  interleaved = raw.get("rope_interleave", True)
  if not isinstance(interleaved, bool):
    raise CheckpointError(f"{fn}: field rope_interleave={safetensors_io.show(interleaved)} must be a bool")
  ckpt = safetensors_io.Checkpoint(path)
  _check_sizes_against_files(cfg, ckpt, fn)
  present = _mtp_depths_present(cfg, ckpt.names())
  if present < cfg.num_nextn_predict_layers:
    warnings.warn(
        f"config.json of {path} says num_nextn_predict_layers={cfg.num_nextn_predict_layers}, but the "
        f"checkpoint has tensors for {present} MTP layer(s) (model.layers.{cfg.num_hidden_layers + present}.*"
        f" is absent): loading with num_nextn_predict_layers={present}"
        + (" (MTP disabled)" if present == 0 else ""))
    cfg = cfg.replace(num_nextn_predict_layers=present)
  _check_table_size(cfg, ckpt, fn)
  if keep_fp8:
    if block[0] != block[1]:
      raise CheckpointError(f"quantization_config.weight_block_size={list(block)}: keep_fp8 needs square "
                            "blocks")
    cfg = cfg.replace(fp8_weights=True, fp8_weight_block=block[0])
  table = hf_names.entries(cfg)
  shapes = _leaves(abstract_variables(cfg))
  # FP8-stored variables: codes at the weight's key, scale_inv at the key with SCALE_SUFFIX.
  fp8_codes = {(k[0], k[1:]) for k in fp8_variables.fp8_layout(cfg)} if cfg.fp8_weights else set()
  fp8_scales = {(c, p[:-1] + (p[-1] + fp8_weights.SCALE_SUFFIX,)): (c, p) for c, p in fp8_codes}
  skipped = _validate(ckpt, cfg, table, shapes, strict, block)
  shardings = _leaves(variable_shardings(cfg, mesh, rules)) if mesh is not None else None

  by_leaf = collections.defaultdict(list)
  for e in table:
    if not e.alias:
      by_leaf[(e.collection, e.path)].append(e)
  report = LoadReport(mtp_layers=cfg.num_nextn_predict_layers, skipped=skipped, files=list(ckpt.files))
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=sum(len(v) for v in by_leaf.values()), unit="tensor", desc=f"load {path}")
  out = {}
  for key, leaf in shapes.items():
    codes_key = fp8_scales.get(key, key)
    if codes_key not in by_leaf:
      raise CheckpointError(f"variable {_path_str(*key)} has no HF tensor in the name table")
    ents = by_leaf[codes_key]
    if key in fp8_codes or key in fp8_scales:
      reader = _Fp8LeafReader(ckpt, cfg, ents, shapes[codes_key].shape,
                              "codes" if key in fp8_codes else "scale", block, interleaved, report)
    else:
      reader = _LeafReader(ckpt, cfg, ents, leaf.shape, leaf.dtype, block, interleaved, report)
    if shardings is None:
      arr = jnp.asarray(reader.full())
    else:
      arr = _place(reader, tuple(leaf.shape), shardings[key])
    report.largest_tensor_bytes = max(report.largest_tensor_bytes,
                                      _flat(leaf.shape) * np.dtype(leaf.dtype).itemsize)
    out[key] = arr
    del reader
    if bar is not None and key not in fp8_scales:
      bar.update(len(ents))
  if bar is not None:
    bar.close()
  return cfg, _unflatten(out), report


def load(path, *, dtype=jnp.float32, mesh=None, rules=None, strict: bool = True, progress: bool = False,
         config_overrides: Optional[dict] = None, keep_fp8: bool = False):
  """Reads an HF DeepSeek-V2/V3/R1 checkpoint directory into the model's variables.

  Args:
    path: directory with config.json and model.safetensors, or shards + model.safetensors.index.json.
    dtype: parameter dtype of the result (also cfg.param_dtype); the router bias stays float32.
    mesh: optional jax.sharding.Mesh; each variable is then placed shard by shard on it (streaming).
    rules: logical-axis rules for the mesh ((logical, mesh axis) pairs); None: `sharding.LOGICAL_RULES`.
    strict: raise on tensors the model has no place for (else warn and skip them).
    progress: show a tqdm bar over the tensors.
    config_overrides: ModelConfig fields to set on top of config.json (e.g. moe_impl, attention_impl).
    keep_fp8: keep the FP8 set's weights as E4M3 (cfg.fp8_weights=True, `deepseek_jax.layers.fp8_weights`):
      F8_E4M3 tensors and their weight_scale_inv exactly as stored (transposed to the kernel layout, no
      dequantize / requantize); weights the checkpoint holds in higher precision are quantized per block on
      load.  The other variables take `dtype`.
  Returns:
    (cfg, variables) with variables in exactly `DeepSeekV3(cfg).init`'s structure ({'params', 'router'}).
  Raises:
    FileNotFoundError: no directory / config.json / safetensors files.
    CheckpointError (a ValueError; one line naming the file and the field or tensor): a file named outside
      the folder or not a regular file, a malformed index / header / config.json (bad JSON, wrong types,
      non-finite or out-of-bounds values, byte ranges the file does not hold), a config larger than its
      files, missing, misshapen or unexpected tensors, FP8 weights without their scale, non-finite weights.
  """
  cfg, variables, _ = load_with_report(path, dtype=dtype, mesh=mesh, rules=rules, strict=strict,
                                       progress=progress, config_overrides=config_overrides,
                                       keep_fp8=keep_fp8)
  return cfg, variables


# ------------------------------------------------------------------------------------------------ save

def _host(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def _check_variables(cfg: ModelConfig, variables) -> dict:
  want = _leaves(abstract_variables(cfg))
  have = _leaves(variables)
  missing = [_path_str(*k) for k in want if k not in have]
  if missing:
    raise CheckpointError(f"variables lack {', '.join(missing[:12])}"
                          + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
                          + " that the config's model has")
  extra = [_path_str(*k) for k in have if k not in want]
  if extra:
    raise CheckpointError(f"variables hold {', '.join(extra[:12])}, which the config's model does not have")
  for k, leaf in want.items():
    if tuple(have[k].shape) != tuple(leaf.shape):
      raise CheckpointError(f"variable {_path_str(*k)}: expected shape {tuple(leaf.shape)} from the config, "
                            f"found {tuple(have[k].shape)}")
  return have


def _plan(cfg: ModelConfig, have: dict, fp8: bool, block, dtype):
  """PlannedTensor list of the checkpoint, in table order."""
  planned = []
  cache = {}

  def source(e: Entry):
    leaf = have[(e.collection, e.path)]
    if e.kind == "expert":
      return lambda: to_hf_layout(e, _host(leaf[e.expert]))
    return lambda: to_hf_layout(e, _host(leaf))

  def quantized(name, get):
    if cache.get("name") != name:
      w, s = quantize_blockwise(np.asarray(get(), np.float32), block)
      cache.update(name=name, value=(w, s))
    return cache["value"]

  for e in hf_names.entries(cfg):
    leaf = have[(e.collection, e.path)]
    shape = hf_shape(e, leaf.shape)
    get = source(e)
    if e.collection == "router":
      planned.append(safetensors_io.PlannedTensor(e.hf, shape, "F32",
                                                  lambda get=get: np.asarray(get(), np.float32)))
    elif fp8 and e.fp8:
      sshape = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
      planned.append(safetensors_io.PlannedTensor(
          e.hf, shape, "F8_E4M3", lambda n=e.hf, get=get: quantized(n, get)[0]))
      planned.append(safetensors_io.PlannedTensor(
          hf_names.scale_name(e.hf), sshape, "F32", lambda n=e.hf, get=get: quantized(n, get)[1]))
    else:
      dt = np.dtype(jnp.bfloat16) if fp8 else np.dtype(dtype or leaf.dtype)
      planned.append(safetensors_io.PlannedTensor(
          e.hf, shape, safetensors_io.dtype_name(dt), lambda get=get, dt=dt: np.asarray(get(), dt)))
  return planned


def save(path, cfg: ModelConfig, variables, *, fp8: bool = False, block_size=DEFAULT_BLOCK, dtype=None,
         max_shard_size="5GB", progress: bool = False, overwrite: bool = False) -> list[str]:
  """Writes variables as an HF checkpoint directory that transformers' DeepseekV3ForCausalLM reads.

  Args:
    path: output directory; must not exist, or be empty (or overwrite=True).
    cfg: the model's config (written as config.json via cfg.to_hf()).
    variables: {'params': ..., 'router': ...} as `init` / `load` make them (jax or NumPy arrays); scanned
      layers (cfg.scan_layers) are written per layer.
    fp8: write the released FP8 layout: the linear weights the release quantizes as float8_e4m3fn with
      `weight_scale_inv` per block, embedding / head / norms / router gate / eh_proj as bf16, router bias
      fp32, and `quantization_config` in config.json.
    block_size: FP8 block (rows, cols) of the [out, in] weights.
    dtype: storage dtype of non-FP8 tensors (None: the variables' own dtype).
    max_shard_size: bytes per safetensors file (int or '5GB'); several files get an index.
    progress: show a tqdm bar over the tensors.
    overwrite: replace an existing non-empty directory.
  Returns:
    The safetensors file names written.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and os.listdir(path) and not overwrite:
    raise FileExistsError(f"{path} exists and is not empty (save(..., overwrite=True) replaces it)")
  if cfg.scan_layers:  # HF checkpoints hold one tensor per layer
    from deepseek_jax.model import to_layer_layout  # pylint: disable=g-import-not-at-top
    cfg = dataclasses.replace(cfg, scan_layers=False)
    variables = to_layer_layout(cfg, variables)
  have = _check_variables(cfg, variables)
  block = tuple(int(b) for b in block_size)
  planned = _plan(cfg, have, fp8, block, dtype)
  hf_config = cfg.to_hf()
  if cfg.scoring_func == "softmax" and cfg.topk_method != "noaux_tc":
    # A V2 / V2-Lite model: transformers' V3 class always routes with sigmoid + noaux_tc, so the file must name
    # the V2 architecture (as the released V2 config.json does) for transformers to compute the same model.
    hf_config.update(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"])
  hf_config["torch_dtype"] = "bfloat16" if fp8 else _dtype_name(
      dtype or have[("params", ("embed_tokens", "embedding"))].dtype)
  if fp8:
    hf_config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG, weight_block_size=list(block))
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".partial-", dir=parent)
  bar = None
  try:
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=len(planned), unit="tensor", desc=f"save {path}")
    files = safetensors_io.write_checkpoint(tmp, planned, max_shard_size,
                                            progress=(lambda _: bar.update(1)) if bar else None)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is read by others
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    if bar is not None:
      bar.close()
  return files


def summary(report: LoadReport) -> dict[str, Any]:
  """A JSON-able dict of a LoadReport."""
  d = dataclasses.asdict(report)
  d["skipped"] = len(report.skipped)
  return d

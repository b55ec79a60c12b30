"""Hostile and malformed HF checkpoints, generated from a valid tiny one: each is refused with one
`CheckpointError` line naming the file and the field or tensor, before anything large is allocated.

Cases: files outside the folder (index traversal, absolute paths, symlink escapes), non-regular files (FIFO,
directory), memory bombs (declared sizes the file does not hold, configs larger than their files), malformed
safetensors headers / index / config.json (wrong types, missing fields, deep nesting, bad UTF-8, overlapping
or reversed byte ranges, unknown dtype) and non-finite config values.  Nothing here compiles a model.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import deepseek_jax as dsj
from deepseek_jax.interop import hf, safetensors_io
import test_hf_roundtrip  # noqa: E402  pylint: disable=g-import-not-at-top

INDEX = safetensors_io.INDEX_FILE
PEAK_LIMIT = 32 << 20  # bytes any refusal may allocate; the memory-bomb cases declare 2 GiB and more
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_cfg):
  """A valid float32 checkpoint of the tiny preset in several shards with an index."""
  path = tmp_path_factory.mktemp("valid") / "ckpt"
  _, variables = test_hf_roundtrip._random_model(tiny_cfg)  # pylint: disable=protected-access
  files = hf.save(path, tiny_cfg, variables, max_shard_size="300KB")
  assert len(files) >= 3 and os.path.exists(path / INDEX)
  return path


# ------------------------------------------------------------------------------------------------ helpers

def _shards(d):
  return sorted(f for f in os.listdir(d) if f.startswith("model-") and f.endswith(".safetensors"))


def _read_st(path):
  raw = open(path, "rb").read()
  (n,) = struct.unpack("<Q", raw[:8])
  return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_st(path, header: bytes, data: bytes, n=None):
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header) if n is None else n) + header + data)


def _first(h):
  return next(k for k in h if k != "__metadata__")


def header(change, shard=0):
  """A case editing the JSON header of shard `shard`: change(h) edits the dict in place or returns bytes."""
  def mutate(d, outside):
    p = d / _shards(d)[shard]
    h, data = _read_st(p)
    out = change(h)
    _write_st(p, out if isinstance(out, bytes) else json.dumps(h).encode(), data)
  return mutate


def config(change):
  """A case editing config.json: change(c) edits the dict in place, or returns the file's bytes."""
  def mutate(d, outside):
    c = json.loads((d / "config.json").read_text())
    out = change(c)
    (d / "config.json").write_bytes(out if isinstance(out, bytes) else json.dumps(c).encode())
  return mutate


def index(change):
  """A case editing the index: change(ix, shards) edits the dict in place, or returns the file's bytes."""
  def mutate(d, outside):
    ix = json.loads((d / INDEX).read_text())
    out = change(ix, _shards(d))
    (d / INDEX).write_bytes(out if isinstance(out, bytes) else json.dumps(ix).encode())
  return mutate


def repoint(target):
  """Index entries of the first shard now name target(d, outside, shard) instead."""
  def mutate(d, outside):
    ix = json.loads((d / INDEX).read_text())
    s = _shards(d)[0]
    ix["weight_map"] = {k: (target(d, outside, s) if v == s else v) for k, v in ix["weight_map"].items()}
    (d / INDEX).write_text(json.dumps(ix))
  return mutate


def replace_file(name, make):
  """The file `name` (a callable of the shard list for a shard) is replaced by make(path, outside)."""
  def mutate(d, outside):
    fn = name(_shards(d)) if callable(name) else name
    p = d / fn
    if os.path.isdir(p):
      shutil.rmtree(p)
    elif os.path.lexists(p):
      os.remove(p)
    make(p, outside / fn, outside)
  return mutate


def single_file(make):
  """The single-file layout: no index, no shards, model.safetensors made by make(path, outside)."""
  def mutate(d, outside):
    for f in _shards(d) + [INDEX]:
      os.remove(d / f)
    make(d / safetensors_io.SINGLE_FILE, outside / _shards(outside)[0], outside)
  return mutate


def glob_layout(extra):
  """No index: the shards are found as *.safetensors; extra(d) adds something to the folder."""
  def mutate(d, outside):
    os.remove(d / INDEX)
    extra(d)
  return mutate


def both(*mutations):
  def mutate(d, outside):
    for m in mutations:
      m(d, outside)
  return mutate


def _symlink(target):
  return lambda p, out_same, outside: os.symlink(target(out_same), p)


def _fifo(p, *_):
  os.mkfifo(p)


def _setitem(key, value):
  def change(x):
    x[key] = value
  return change


def _set_tensor(field, value):
  def change(h):
    h[_first(h)][field] = value
  return change


def _del_tensor(field):
  def change(h):
    del h[_first(h)][field]
  return change


def _nested(depth=100_000):
  return b'{"a": ' + b"[" * depth + b"]" * depth + b"}"


def _overlap(h):
  names = [k for k in h if k != "__metadata__"]
  a, b = h[names[0]], h[names[1]]
  h[names[1]] = dict(a)
  del b


def _duplicate(h):
  first = _first(h)
  text = json.dumps(h)
  return (text[:-1] + ", " + json.dumps(first) + ": " + json.dumps(h[first]) + "}").encode()


def _text(c, key, raw: str):
  """config.json bytes with c[key] written as the raw JSON text `raw` (NaN, Infinity, huge numbers)."""
  c[key] = "@@@"
  return json.dumps(c).replace('"@@@"', raw).encode()


def _vocab_bomb(d, outside):
  """config.json and the headers agree on a 4M-token vocabulary (1 GiB embedding and head) that the files do
  not hold: the shapes match the config, only the byte ranges give the files away."""
  c = json.loads((d / "config.json").read_text())
  c["vocab_size"] = 4_000_000
  (d / "config.json").write_text(json.dumps(c))
  for s in _shards(d):
    h, data = _read_st(d / s)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
      if name in h:
        begin = h[name]["data_offsets"][0]
        h[name].update(shape=[4_000_000, 64], data_offsets=[begin, begin + 4_000_000 * 64 * 4])
    _write_st(d / s, json.dumps(h).encode(), data)


def _poke(value):
  """A case writing float32 `value` as element 5 of the first tensor of the first shard."""
  def mutate(d, outside):
    p = d / _shards(d)[0]
    h, data = _read_st(p)
    begin = h[_first(h)]["data_offsets"][0] + 5 * 4
    data = data[:begin] + np.float32(value).tobytes() + data[begin + 4:]
    _write_st(p, json.dumps(h).encode(), data)
  return mutate


def _bomb(h):
  h[_first(h)].update(dtype="F32", shape=[1 << 29], data_offsets=[0, 1 << 31])


SHARD0 = r"model-00001-of-\d+\.safetensors"
CFG = r"config\.json"
IDX = r"model\.safetensors\.index\.json"
PASSWD = "/etc/passwd"

# id: (mutation, regex naming the file, regex naming the field / tensor / problem)
CASES = {
    # --- files outside the folder
    "index_traversal": (repoint(lambda d, o, s: f"../outside/{s}"), IDX, r"weight_map entry .*'\.\./outside/"
                        r"model-00001.*resolves outside the checkpoint folder"),
    "index_absolute": (repoint(lambda d, o, s: str(o / s)), IDX, r"weight_map entry .* is an absolute path"),
    "index_etc_passwd": (repoint(lambda d, o, s: PASSWD), IDX, r"'/etc/passwd' is an absolute path"),
    "index_dotdot_passwd": (repoint(lambda d, o, s: "../" * 30 + "etc/passwd"), IDX,
                            r"etc/passwd' resolves outside"),
    "index_empty_name": (repoint(lambda d, o, s: ""), IDX, r"'' is not a file name"),
    "index_names_folder": (repoint(lambda d, o, s: "."), IDX, r"'\.' names the checkpoint folder itself"),
    "shard_symlink_escape": (replace_file(lambda s: s[0], _symlink(lambda out: out)), IDX,
                             r"model-00001.*resolves outside"),
    "shard_symlink_to_device": (replace_file(lambda s: s[0], _symlink(lambda out: "/dev/zero")), IDX,
                                r"resolves outside"),
    "single_file_symlink_escape": (single_file(_symlink(lambda out: out)), r"model\.safetensors",
                                   r"resolves outside"),
    "config_symlink_escape": (replace_file("config.json", _symlink(lambda out: out)), CFG,
                              r"resolves outside"),
    "index_symlink_escape": (replace_file(INDEX, _symlink(lambda out: out)), IDX, r"resolves outside"),
    # --- non-regular files
    "fifo_single_file": (single_file(_fifo), r"model\.safetensors", r"is a FIFO"),
    "fifo_shard": (replace_file(lambda s: s[0], _fifo), SHARD0, r"is a FIFO"),
    "fifo_config": (replace_file("config.json", _fifo), CFG, r"is a FIFO"),
    "fifo_index": (replace_file(INDEX, _fifo), IDX, r"is a FIFO"),
    "directory_named_safetensors": (glob_layout(lambda d: os.mkdir(d / "zz.safetensors")),
                                    r"zz\.safetensors", r"is a directory"),
    "directory_config": (replace_file("config.json", lambda p, *_: os.mkdir(p)), CFG, r"is a directory"),
    "directory_shard": (replace_file(lambda s: s[0], lambda p, *_: os.mkdir(p)), SHARD0, r"is a directory"),
    # --- memory bombs
    "tensor_2gib_in_small_file": (header(_bomb), SHARD0, r"'data_offsets' \[0, 2147483648\] reaches past"),
    "shape_product_overflow": (header(_set_tensor("shape", [1 << 40, 1 << 40])), SHARD0,
                               r"shape \(1099511627776, 1099511627776\) of F32 is \d+ bytes, but field "
                               r"'data_offsets'"),
    "header_length_past_file": (lambda d, o: _write_st(d / _shards(d)[0], b"{}", b"", n=1 << 40), SHARD0,
                                r"header length 1099511627776 exceeds the file size 10"),
    "vocab_bomb_consistent_with_config": (_vocab_bomb, r"model-0000\d-of-\d+\.safetensors",
                                          r"tensor '(model\.embed_tokens|lm_head)\.weight': field 'data_offsets' "
                                          r"\[\d+, \d+\] reaches past"),
    "layers_1e6": (config(_setitem("num_hidden_layers", 10**6)), CFG,
                   r"num_hidden_layers=1000000 exceeds the largest"),
    "experts_1e5": (config(_setitem("n_routed_experts", 10**5)), CFG, r"n_routed_experts=100000 exceeds"),
    "vocab_1e9": (config(_setitem("vocab_size", 10**9)), CFG, r"vocab_size=1000000000 exceeds"),
    "layers_beyond_files": (config(_setitem("num_hidden_layers", 1000)), CFG,
                            r"num_hidden_layers=1000, but the safetensors files hold tensors of 4 layers"),
    "experts_beyond_files": (config(_setitem("n_routed_experts", 4096)), CFG,
                             r"n_routed_experts=4096, but the safetensors files hold tensors of 8 experts"),
    "more_tensors_than_files": (config(_setitem("first_k_dense_replace", 0)), CFG,
                                r"more tensors than the \d+ its safetensors files hold"),
    "vocab_beyond_files": (config(_setitem("vocab_size", 4_000_000)), SHARD0,
                           r"model\.embed_tokens\.weight: expected shape \(4000000, 64\)"),
    # --- malformed safetensors headers
    "tensor_name_with_newline": (both(glob_layout(lambda d: None), header(lambda h: h.update(
        {"model.x\nerror: fake": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}))),
                                 r"checkpoint \S*ckpt", r"no place for: 'model\.x\\nerror: fake'"),
    "header_is_list": (header(lambda h: b"[]"), SHARD0, r"header is a list, not an object"),
    "tensor_entry_is_list": (header(lambda h: h.update({_first(h): [1, 2]})), SHARD0,
                             r"tensor 'model\.embed_tokens\.weight' is a list"),
    "missing_dtype": (header(_del_tensor("dtype")), SHARD0, r"embed_tokens\.weight' has no 'dtype' field"),
    "missing_shape": (header(_del_tensor("shape")), SHARD0, r"has no 'shape' field"),
    "missing_offsets": (header(_del_tensor("data_offsets")), SHARD0, r"has no 'data_offsets' field"),
    "shape_null": (header(_set_tensor("shape", None)), SHARD0, r"field 'shape' None is not a list"),
    "shape_negative": (header(_set_tensor("shape", [-512, -64])), SHARD0, r"field 'shape' \[-512, -64\]"),
    "shape_float": (header(_set_tensor("shape", [512.0, 64])), SHARD0, r"field 'shape' \[512\.0, 64\]"),
    "shape_bool": (header(_set_tensor("shape", [True, 64])), SHARD0, r"field 'shape' \[True, 64\]"),
    "shape_rank_1000": (header(_set_tensor("shape", [1] * 1000)), SHARD0, r"field 'shape' \[1, 1, "),
    "offsets_three": (header(_set_tensor("data_offsets", [0, 4, 8])), SHARD0, r"field 'data_offsets' \[0, 4, 8\]"),
    "offsets_strings": (header(_set_tensor("data_offsets", ["0", "8"])), SHARD0,
                        r"field 'data_offsets' \['0', '8'\]"),
    "offsets_nan": (header(lambda h: json.dumps(h).replace('"data_offsets": [0,', '"data_offsets": [NaN,', 1)
                           .encode()), SHARD0, r"field 'data_offsets' \[nan,"),
    "offsets_reversed": (header(lambda h: h[_first(h)].update(
        data_offsets=h[_first(h)]["data_offsets"][::-1])), SHARD0, r"ends before it begins"),
    "offsets_overlap": (header(_overlap), SHARD0, r"tensors '.*' \(bytes \d+-\d+\) and '.*' \(bytes \d+-\d+\) "
                        r"overlap"),
    "unknown_dtype": (header(_set_tensor("dtype", "F7")), SHARD0, r"field 'dtype' 'F7' is not a known dtype"),
    "dtype_not_string": (header(_set_tensor("dtype", 5)), SHARD0, r"field 'dtype' 5 is not a known dtype"),
    "duplicate_tensor": (header(_duplicate), SHARD0, r"key 'model\.embed_tokens\.weight' appears twice"),
    "metadata_list": (header(_setitem("__metadata__", [1])), SHARD0, r"field '__metadata__' is a list"),
    "header_deep_nesting": (header(lambda h: _nested()), SHARD0, r"header: JSON nested too deeply"),
    "header_not_utf8": (header(lambda h: b'{"\xff\xfe": 1}'), SHARD0, r"header: not UTF-8 text \(byte 2\)"),
    "header_truncated_json": (header(lambda h: json.dumps(h).encode()[:-7]), SHARD0, r"header: not valid JSON"),
    "header_huge_int": (header(lambda h: json.dumps(h).replace('"shape": [', '"shape": [' + "9" * 5000 + ",", 1)
                               .encode()), SHARD0, r"header: not valid JSON \(.*digits"),
    "file_shorter_than_8": (replace_file(lambda s: s[0], lambda p, *_: open(p, "wb").write(b"\1\2\3")), SHARD0,
                            r"shorter than its 8-byte header length"),
    "weight_dtype_int": (header(_set_tensor("dtype", "I32")), SHARD0,
                         r"tensor model\.embed_tokens\.weight \(in model-00001.*\) has dtype I32"),
    "weight_value_nan": (_poke(np.nan), SHARD0, r"tensor model\.embed_tokens\.weight \(in model-00001.*\) holds "
                         r"non-finite values"),
    "weight_value_inf": (_poke(-np.inf), SHARD0, r"embed_tokens\.weight .* holds non-finite values"),
    "file_empty": (replace_file(lambda s: s[0], lambda p, *_: open(p, "wb").close()), SHARD0,
                   r"shorter than its 8-byte header length"),
    # --- malformed index
    "index_is_list": (index(lambda ix, s: b"[]"), IDX, r"no 'weight_map' object"),
    "weight_map_is_list": (index(lambda ix, s: ix.update(weight_map=[s[0]])), IDX, r"no 'weight_map' object"),
    "weight_map_value_int": (index(lambda ix, s: ix["weight_map"].update({"model.norm.weight": 7})), IDX,
                             r"weight_map entry 'model\.norm\.weight' is a int, not a file name"),
    "index_names_missing_shard": (index(lambda ix, s: ix["weight_map"].update({"model.norm.weight": "x.safetensors"})),
                                  IDX, r"'model\.norm\.weight' names file 'x\.safetensors', which is not in"),
    "index_maps_wrong_shard": (index(lambda ix, s: ix["weight_map"].update({"model.embed_tokens.weight": s[1]})),
                               IDX, r"maps 'model\.embed_tokens\.weight' to 'model-00002.*but it is in model-00001"),
    "index_deep_nesting": (index(lambda ix, s: _nested()), IDX, r"JSON nested too deeply"),
    "index_not_utf8": (index(lambda ix, s: b"\xc3\x28"), IDX, r"not UTF-8 text \(byte 0\)"),
    "index_duplicate_key": (index(lambda ix, s: b'{"weight_map": {}, "weight_map": {}}'), IDX,
                            r"key 'weight_map' appears twice"),
    # --- malformed config.json and non-finite values
    "config_is_list": (config(lambda c: b"[1, 2]"), CFG, r"the config is a list, not an object"),
    "config_deep_nesting": (config(lambda c: _nested()), CFG, r"JSON nested too deeply"),
    "config_not_utf8": (config(lambda c: b'{"vocab_size": "\xff"}'), CFG, r"not UTF-8 text"),
    "config_truncated": (config(lambda c: b'{"vocab_size": 5'), CFG, r"not valid JSON"),
    "config_huge_int": (config(lambda c: _text(c, "hidden_size", "9" * 5000)), CFG, r"not valid JSON"),
    "rms_norm_eps_string": (config(_setitem("rms_norm_eps", "1e-6")), CFG,
                            r"rms_norm_eps='1e-6' must be a finite number"),
    "rms_norm_eps_nan": (config(lambda c: _text(c, "rms_norm_eps", "NaN")), CFG,
                         r"rms_norm_eps=nan must be a finite number"),
    "routed_scaling_factor_nan": (config(lambda c: _text(c, "routed_scaling_factor", "NaN")), CFG,
                                  r"routed_scaling_factor=nan must be a finite number"),
    "rope_theta_inf": (config(lambda c: _text(c, "rope_theta", "Infinity")), CFG,
                       r"rope_theta=inf must be a finite number"),
    "rope_theta_1e999": (config(lambda c: _text(c, "rope_theta", "1e999")), CFG, r"rope_theta=inf must be"),
    "initializer_range_neg_inf": (config(lambda c: _text(c, "initializer_range", "-Infinity")), CFG,
                                  r"initializer_range=-inf must be a finite number"),
    "aux_loss_alpha_nan": (config(lambda c: _text(c, "aux_loss_alpha", "NaN")), CFG, r"aux_loss_alpha=nan"),
    "rope_scaling_list": (config(_setitem("rope_scaling", [4.0])), CFG, r"rope_scaling=\[4\.0\] must be an "
                          r"object or null"),
    "rope_factor_nan": (config(lambda c: json.dumps(c).replace('"factor": 4.0', '"factor": NaN').encode()), CFG,
                        r"rope_scaling\.factor=nan must be a finite number"),
    "rope_factor_string": (config(lambda c: c["rope_scaling"].update(factor="4")), CFG,
                           r"rope_scaling\.factor='4' must be a finite number"),
    "rope_orig_max_float": (config(lambda c: c["rope_scaling"].update(original_max_position_embeddings=1.5)),
                            CFG, r"rope_scaling\.original_max_position_embeddings=1\.5 must be an integer"),
    "hidden_size_string": (config(_setitem("hidden_size", "64")), CFG, r"hidden_size='64' must be an integer"),
    "hidden_size_float": (config(_setitem("hidden_size", 64.5)), CFG, r"hidden_size=64\.5 must be an integer"),
    "hidden_size_dict": (config(_setitem("hidden_size", {"a": 1})), CFG, r"hidden_size=\{'a': 1\} must be"),
    "num_hidden_layers_bool": (config(_setitem("num_hidden_layers", True)), CFG,
                               r"num_hidden_layers=True must be an integer"),
    "num_nextn_negative": (config(_setitem("num_nextn_predict_layers", -1)), CFG,
                           r"num_nextn_predict_layers=-1 must be a non-negative integer"),
    "tie_word_embeddings_string": (config(_setitem("tie_word_embeddings", "false")), CFG,
                                   r"tie_word_embeddings='false' must be a bool"),
    "topk_method_list": (config(_setitem("topk_method", ["noaux_tc"])), CFG,
                         r"topk_method=\['noaux_tc'\] must be a string"),
    "model_type_list": (config(_setitem("model_type", ["deepseek_v3"])), CFG,
                        r"model_type=\['deepseek_v3'\] is not supported"),
    "bos_token_id_empty_list": (config(_setitem("bos_token_id", [])), CFG, r"bos_token_id=\[\] must be"),
    "bos_token_id_string": (config(_setitem("bos_token_id", "0")), CFG, r"bos_token_id='0' must be an integer"),
    "quantization_config_list": (config(_setitem("quantization_config", [128])), CFG,
                                 r"field quantization_config=\[128\] is not an object"),
    "weight_block_size_zero": (config(_setitem("quantization_config", {"weight_block_size": [0, 128]})), CFG,
                               r"quantization_config\.weight_block_size=\[0, 128\]"),
    "weight_block_size_strings": (config(_setitem("quantization_config", {"weight_block_size": ["a", "b"]})),
                                  CFG, r"quantization_config\.weight_block_size=\['a', 'b'\]"),
    "rope_interleave_string": (config(_setitem("rope_interleave", "yes")), CFG,
                               r"field rope_interleave='yes' must be a bool"),
}


@contextlib.contextmanager
def _deadline(seconds):
  """Fails (instead of hanging: a FIFO opened for reading blocks) after `seconds`."""
  def expire(*_):
    raise TimeoutError(f"no answer within {seconds} s")
  old = signal.signal(signal.SIGALRM, expire)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _hostile(tmp_path, base, mutate):
  d, outside = tmp_path / "ckpt", tmp_path / "outside"
  shutil.copytree(base, d)
  shutil.copytree(base, outside)
  mutate(d, outside)
  return d


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_checkpoint_is_refused_in_one_line(tmp_path, base, case):
  mutate, file_re, field_re = CASES[case]
  d = _hostile(tmp_path, base, mutate)
  tracemalloc.start()
  try:
    with _deadline(60), pytest.raises(hf.CheckpointError) as err:
      hf.load(d)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  msg = str(err.value)
  assert "\n" not in msg and len(msg) < 600, msg
  assert re.search(file_re, msg), f"the message does not name the file ({file_re}): {msg}"
  assert re.search(field_re, msg), f"the message does not name the field ({field_re}): {msg}"
  assert peak < PEAK_LIMIT, f"{peak} bytes allocated before refusing"
  if "passwd" in case:  # nothing about the outside file leaks (its size, its contents)
    rest = msg.replace(str(d), "")
    assert str(os.path.getsize(PASSWD)) not in rest and "root:" not in rest, msg


# Cases refused by config.json alone (not by comparing it with the tensors, not by where it lives).
CONFIG_ONLY = [c for c, (_, f, field) in CASES.items() if f == CFG and not re.search(
    r"hold|resolves outside|is a directory|weight_block_size|quantization_config|rope_interleave", field)]


@pytest.mark.parametrize("case", CONFIG_ONLY)
def test_model_config_from_hf_file_refuses_in_one_line(tmp_path, base, case):
  """`ModelConfig.from_hf(path)` (used for workdirs too) refuses each bad config.json on its own."""
  mutate, _, field_re = CASES[case]
  d = _hostile(tmp_path, base, mutate)
  with _deadline(60), pytest.raises(ValueError) as err:
    dsj.ModelConfig.from_hf(d / "config.json")
  msg = str(err.value)
  assert "\n" not in msg and str(d / "config.json") in msg, msg
  assert re.search(field_re.replace("field ", ""), msg), msg


def test_peak_check_sees_a_tensor_buffer():
  """The peak assertion above is meaningful: tracemalloc counts the buffer a tensor read allocates (a reader
  that trusted a bomb's declared size would allocate it before finding the file short)."""
  tracemalloc.start()
  try:
    buf = bytearray(2 * PEAK_LIMIT)
    peak = tracemalloc.get_traced_memory()[1]
    del buf
  finally:
    tracemalloc.stop()
  assert peak >= 2 * PEAK_LIMIT


def test_legitimate_layouts_still_load(tmp_path, base, tiny_cfg):
  """Symlinks that stay inside the folder, and a hub cache snapshot linking into its repository's blobs/."""
  d = tmp_path / "inside"
  shutil.copytree(base, d)
  os.mkdir(d / "store")
  s = _shards(d)[0]
  os.rename(d / s, d / "store" / s)
  os.symlink(os.path.join("store", s), d / s)
  _, ref = hf.load(base)
  cfg, got = hf.load(d)
  assert cfg == tiny_cfg.replace(param_dtype="float32")
  repo = tmp_path / "hub" / "models--x--tiny"
  snap = repo / "snapshots" / "abc123"
  os.makedirs(repo / "blobs")
  os.makedirs(snap)
  for i, f in enumerate(sorted(os.listdir(base))):
    shutil.copy(base / f, repo / "blobs" / f"blob{i}")
    os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snap / f)
  _, hub = hf.load(snap)
  for tree in (got, hub):
    np.testing.assert_array_equal(np.asarray(tree["params"]["embed_tokens"]["embedding"]),
                                  np.asarray(ref["params"]["embed_tokens"]["embedding"]))


@pytest.mark.parametrize("make", [_symlink(lambda out: "/etc/passwd"), _fifo], ids=["symlink_escape", "fifo"])
def test_generation_refuses_a_hostile_tokenizer_json(tmp_path, base, make):
  from deepseek_jax.inference import loading  # pylint: disable=g-import-not-at-top
  d = _hostile(tmp_path, base, replace_file("tokenizer.json", make))
  with _deadline(60), pytest.raises(hf.CheckpointError, match=r"tokenizer\.json.*(resolves outside|is a FIFO)"):
    loading.load_for_generation(hf_dir=str(d))


@pytest.mark.parametrize("entry,case", [("generate", "index_traversal"), ("convert", "rms_norm_eps_nan")])
def test_entry_point_exits_2_with_one_line(tmp_path, base, entry, case):
  d = _hostile(tmp_path, base, CASES[case][0])
  args = {"generate": ["--prompt_ids=1,2", "--max_new_tokens=1"], "convert": [f"--out={tmp_path / 'out'}"]}
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-m", f"experiments.{entry}", f"--hf_dir={d}"] + args[entry],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert r.returncode == 2, r.stderr
  assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
  assert re.search(CASES[case][1], lines[0]) and re.search(CASES[case][2], lines[0]), lines[0]
  assert not os.path.exists(tmp_path / "out")

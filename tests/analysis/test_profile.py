"""analysis.profile: op_name parsing, HLO metadata, and a real profiler trace folded onto Flax modules."""

import glob
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from deepseek_jax.analysis import profile


def test_split_op_name_forward_backward_and_remat_paths():
  fwd = "jit(step)/jvp(DeepSeekV3)/DeepSeekV3.main/layers_2/mlp/experts/NBD,NDG->NBG/dot_general"
  assert profile.split_op_name(fwd) == ("forward", "DeepSeekV3.main/mlp/experts/NBD,NDG->NBG", 2, "dot_general")
  # A rematerialized forward inside the backward restates the module path after the transpose.
  remat = ("jit(step)/transpose(jvp(DeepSeekV3))/DeepSeekV3.main/layers_1/mlp/experts/jvp(DeepSeekV3)/"
           "DeepSeekV3.main/layers_1/mlp/experts/checkpoint/NBF,NFD->NBD/dot_general")
  assert profile.split_op_name(remat) == ("backward", "DeepSeekV3.main/mlp/experts/NBF,NFD->NBD", 1,
                                          "dot_general")
  # Nested jits (jax.nn.silu) are not modules; ops outside the gradient (the optimizer) are 'other'.
  assert profile.split_op_name("jit(step)/jvp(DeepSeekV3)/DeepSeekV3.main/layers_0/mlp/jit(silu)/div") == (
      "forward", "DeepSeekV3.main/mlp", 0, "div")
  assert profile.split_op_name("jit(step)/jit(_where)/select_n") == ("other", "", None, "select_n")
  assert profile.split_op_name("") == ("other", "", None, "")


def test_hlo_metadata_reads_shapes_and_op_names():
  f = jax.jit(lambda x: (jnp.sort(x), jnp.argsort(x), x @ x.T))
  text = f.lower(jnp.ones((8, 8))).compile().as_text()
  meta = profile.hlo_metadata(text)
  dots = [(s, n) for s, n in meta.values() if n.endswith("dot_general")]
  assert dots and all(s.startswith("f32[8,8]") for s, _ in dots)
  tuples = [s for s, _ in meta.values() if s.startswith("(")]
  assert tuples and all(s.endswith(")") for s in tuples)   # tuple shapes are read whole


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(256, name="up")(x)
    return nn.Dense(128, name="down")(jnp.tanh(x))


def test_profile_ops_folds_a_trace_onto_modules(tmp_path):
  model = _Mlp()
  x = jnp.ones((512, 128))
  params = model.init(jax.random.PRNGKey(0), x)
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(p, x) ** 2)))
  hlo = tmp_path / "grad.hlo.txt"
  p = profile.profile_ops(grad, params, x, runs=2, trace_dir=str(tmp_path / "trace"), hlo_path=str(hlo))
  assert glob.glob(str(tmp_path / "trace" / "**" / "*.xplane.pb"), recursive=True)
  assert hlo.read_text() == grad.lower(params, x).compile().as_text()
  assert p.runs == 2 and p.lanes >= 1 and p.wall_ms > 0 and p.busy_ms > 0 and 0 < p.utilization
  assert sum(ms for _, ms in p.by("phase")) == pytest.approx(p.busy_ms)
  assert [o.ms for o in p.ops] == sorted((o.ms for o in p.ops), reverse=True)
  modules = {(o.phase, o.module) for o in p.ops if o.primitive in ("dot_general", "transpose")}
  # Both Dense layers' products, forward and backward (the weight gradient is dot_general's transpose),
  # found under their module names.
  assert {("forward", "_Mlp/up"), ("forward", "_Mlp/down"), ("backward", "_Mlp/up"),
          ("backward", "_Mlp/down")} <= modules
  d = p.to_dict(top=5)
  assert len(d["ops"]) == min(5, len(p.ops)) and d["busy_ms"] == pytest.approx(p.busy_ms)
  text = profile.summarize(p, top=5)
  assert "_Mlp/up" in text and "utilization" in text


def test_an_asynchronous_dot_counts_until_it_completes():
  # A transposed-operand product is an Eigen dot on XLA:CPU: launched on the intra-op pool, its event on the
  # executor thread ends at the launch.  The program is that one dot, so the dot's time must be about all
  # of the wall time (not the launch's few percent).
  f = jax.jit(lambda a, b: a.T @ b)
  a = jnp.ones((1024, 1024))
  p = profile.profile_ops(f, a, a, runs=3)
  dots = [o for o in p.ops if o.primitive == "dot_general"]
  assert len(dots) == 1
  if jax.default_backend() == "cpu":
    assert dots[0].asynchronous and 0.6 * p.wall_ms < dots[0].ms < 1.5 * p.wall_ms
    assert "(async)" in profile.summarize(p)
    assert [o["name"] for o in p.to_dict()["ops"] if o["asynchronous"]] == [dots[0].name]


def test_hlo_dataflow_reads_opcodes_and_consumers():
  f = jax.jit(lambda a, b: jnp.sin(a.T @ b) @ b)
  text = f.lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
  opcodes, consumers = profile.hlo_dataflow(text)
  assert all(c in opcodes for cs in consumers.values() for c in cs)   # consumers are instructions
  # The transposed product (an unfused dot on CPU) reads both parameters and feeds the sine's fusion; the
  # sine feeds the last product, which also reads b and feeds nothing.
  if jax.default_backend() == "cpu":
    (dot,) = [n for n, op in opcodes.items() if op == "dot" and consumers.get(n)]   # the entry's dot
    params = [n for n, op in opcodes.items() if op == "parameter" and dot in consumers.get(n, ())]
    assert len(params) == 2
    (sine,) = consumers[dot]
    (last,) = consumers[sine]
    assert opcodes[sine] == "fusion" and last not in consumers
    assert [p for p in params if last in consumers[p]] and not all(last in consumers[p] for p in params)


def test_completion_is_bounded_by_the_marker_and_the_first_consumer():
  # Events shaped like XLA:CPU's, in ns: (lane, op, start, duration, flow id).
  ms = 1_000_000
  events = [("exec", "dot.1", 0, 1 * ms, 7),          # an Eigen dot: the event ends at its launch
            ("pool", "sine", 20 * ms, 5 * ms, 8),      # its consumer, run inline on a pool thread
            ("exec", "gather", 30 * ms, 2 * ms, 9),    # a synchronous op
            ("pool", "dot.2", 40 * ms, 1 * ms, 10)]    # an Eigen dot whose result nothing reads
  ends = {(7, "dot.1"): [25 * ms],      # left after the thread also ran the consumer: late
          (8, "sine"): [60 * ms],       # markers of synchronous ops are ignored
          (9, "gather"): [60 * ms],
          (10, "dot.2"): [49 * ms]}
  consumers = {"dot.1": ("bitcast.3",), "bitcast.3": ("sine",), "sine": ("gather",)}
  out = {op: (t, a) for _, op, t, a in profile.completed(events, ends, consumers,
                                                          lambda op: op.startswith("dot"))}
  assert out == {"dot.1": (20.0, True), "sine": (5.0, False), "gather": (2.0, False), "dot.2": (9.0, True)}


def test_a_chain_of_dependent_ops_is_timed_without_overlap():
  # Each op needs the one before, so their times cannot add up to more than the wall time: a completion
  # marker taken as the end of a synchronous op (or a late one of an asynchronous op) would.
  f = jax.jit(lambda a, b: jnp.sum(jnp.sin(a.T @ b).T @ b))
  a = jnp.ones((1024, 1024))
  p = profile.profile_ops(f, a, a, runs=1)   # one call: the wall time is that call's, not a median
  assert p.busy_ms < 1.1 * p.wall_ms
  assert not any(o.asynchronous for o in p.ops if o.primitive == "sin")


def test_profile_ops_without_gradients_is_all_forward():
  f = jax.jit(lambda a, b: jnp.sin(a @ b))
  a = jnp.ones((256, 256))
  p = profile.profile_ops(f, a, a, runs=1)
  assert {o.phase for o in p.ops} == {"forward"}
  assert os.path.isdir(p.trace_dir)
  # A reused trace directory: the second profile reads its own trace, never the first one's.
  again_dir = os.path.dirname(os.path.dirname(p.trace_dir))
  before = profile.trace_snapshot(again_dir)
  again = profile.profile_ops(f, a, a, runs=2, trace_dir=again_dir)
  assert again.runs == 2 and profile.new_trace(again_dir) and profile.trace_snapshot(again_dir) != before
  with pytest.raises(RuntimeError, match="no new"):
    profile.new_trace(again_dir, profile.trace_snapshot(again_dir))
  with pytest.raises(ValueError, match="runs"):
    profile.profile_ops(f, a, a, runs=0)

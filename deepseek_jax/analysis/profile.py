"""Where a compiled step spends its time: the jax profiler's trace folded back onto the model's modules.

`profile_ops` runs a jitted function a few times under `jax.profiler.trace`, reads the trace with
`jax.profiler.ProfileData` and joins every executed HLO op (an event with an `hlo_op` stat: the CPU
executor's threads, a GPU's 'XLA Ops' line) with the optimized HLO of the same executable, whose metadata
names the JAX primitive and the Flax module path that produced it.  The result (`Profile`) says, per op and
summed by module, phase or op kind, how many milliseconds per call it ran:

  name      the HLO instruction (`ynn_fusion.12`, `gather_bitcast_fusion.3`, ...)
  kind      its name without the number: the fusion kind or the op (`ynn_fusion`, `dot`, `copy`, `sort`)
  shape     its result shape in the HLO
  phase     'backward' (under a `transpose(...)` in its op_name), 'forward' (under `jvp(...)`) or 'other'
            (outside the gradient: the optimizer update); a function without gradients is all 'forward'
  module    the Flax module path without layer indices (`DeepSeekV3.main/mlp/experts`), so that the same
            module of every layer sums together; `layer` keeps the index
  primitive the JAX primitive (`dot_general`, `gather`, ...)

Times are the durations of the op events on the thread (or device line) that ran them.  A fusion counts
under the op_name of its root, so a fusion of forward and backward work counts under one of them.  An
asynchronous CPU op - an unfused `dot` or `convolution`, which XLA:CPU runs with Eigen on the intra-op
pool, so that its event on the executor thread ends at the launch - counts from its start to its
completion: the earlier of its completion marker ('end: <op>' on a pool thread, joined by flow id) and
the first start of an op that consumes its result (through the HLO's operands).  Without that a 100 ms
dot reads as 5 ms; the marker alone is late, since the pool thread runs the ops that become ready inline
before it leaves the marker.  A synchronous op leaves such markers too, and they are ignored.  The span of
an asynchronous op includes any wait for the pool's threads, so under load it overstates the op's own
work.  On CPU an op's intra-op helpers (Eigen's or YNN's worker shards) are not separate events, so
`busy_ms` is not the CPU time either: it misses those shards and counts the asynchronous ops' waits.
`utilization` = busy / (wall x lanes) is the fraction of that capacity the executor kept busy (its
complement is time spent waiting on dependencies; an asynchronous op overlaps the ops launched after it,
so it can exceed 100%); lanes are the CPU cores the executor's threads ran on (at most the threads that
ran ops) plus the GPUs' op lines.  The trace itself stays under `trace_dir` for TensorBoard's profile
plugin or Perfetto.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import glob
import json
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import jax

_WRAPPER = re.compile(r"^(?:jvp|transpose|checkpoint|remat|vmap|custom_jvp_call|custom_vjp_call)\((.*)\)$")
_LAYER = re.compile(r"^(?:layers?|block|blocks)_(\d+)$")
_METADATA = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class OpTime:
  """One HLO op of the profiled executable and its time per call."""
  name: str
  kind: str
  shape: str
  phase: str
  module: str
  primitive: str
  layer: Optional[int]
  ms: float
  asynchronous: bool = False   # timed from its launch to its completion (see the module docstring)


@dataclasses.dataclass(frozen=True)
class Profile:
  """Per-op times of one executable (see the module docstring); `ops` sorted by time, longest first."""
  module_name: str
  ops: tuple[OpTime, ...]
  wall_ms: float
  lanes: int
  runs: int
  trace_dir: str

  @property
  def busy_ms(self) -> float:
    """Summed op time per call (all lanes)."""
    return sum(o.ms for o in self.ops)

  @property
  def utilization(self) -> float:
    """busy / (wall x lanes): the fraction of the lanes' time spent running ops."""
    return self.busy_ms / (self.wall_ms * max(self.lanes, 1)) if self.wall_ms > 0 else 0.0

  def by(self, key: str | Callable[[OpTime], Any], top: Optional[int] = None) -> list[tuple[Any, float]]:
    """Milliseconds per call summed by an OpTime field name (e.g. 'module', 'kind', 'phase') or a function
    of an OpTime, longest first."""
    get = (lambda o: getattr(o, key)) if isinstance(key, str) else key
    totals = collections.Counter()
    for o in self.ops:
      totals[get(o)] += o.ms
    return totals.most_common(top)

  def table(self, by: str | Sequence[str] = ("phase", "module", "kind"), top: int = 25) -> str:
    """A text table of the `top` groups by the given OpTime fields, with the totals."""
    fields = (by,) if isinstance(by, str) else tuple(by)
    rows = self.by(lambda o: tuple(getattr(o, f) for f in fields), top)
    lines = [f"{self.module_name}: {self.wall_ms:.1f} ms per call, {self.busy_ms:.1f} ms of ops on {self.lanes} "
             f"lanes (utilization {self.utilization:.0%}), {len(self.ops)} ops",
             f"{'ms':>9}  {'share':>6}  " + " | ".join(fields)]
    for group, ms in rows:
      lines.append(f"{ms:9.2f}  {ms / max(self.busy_ms, 1e-9):6.1%}  " + " | ".join(str(g) for g in group))
    return "\n".join(lines)

  def to_dict(self, top: int = 200) -> dict:
    """JSON-ready summary: totals, sums by phase / kind / module, and the `top` longest ops."""
    return {"module_name": self.module_name, "wall_ms": self.wall_ms, "busy_ms": self.busy_ms,
            "lanes": self.lanes, "utilization": self.utilization, "runs": self.runs,
            "trace_dir": self.trace_dir,
            "by_phase": dict(self.by("phase")), "by_kind": dict(self.by("kind", 40)),
            "by_module": [{"phase": p, "module": m, "ms": ms}
                          for (p, m), ms in self.by(lambda o: (o.phase, o.module), 60)],
            "ops": [dataclasses.asdict(o) for o in self.ops[:top]]}


def _instructions(hlo_text: str) -> Iterable[tuple[str, str, str]]:
  """(name, result shape, the rest of the line) of every instruction line in an HLO module's text."""
  for line in hlo_text.splitlines():
    line = line.strip()
    if line.startswith("ROOT "):
      line = line[5:]
    name, sep, rest = line.partition(" = ")
    if not sep or not name or " " in name or name.startswith(("HloModule", "//")):
      continue
    if rest.startswith("("):   # a tuple shape: up to its closing parenthesis
      depth, end = 0, 0
      for end, ch in enumerate(rest):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
          break
      shape = rest[:end + 1]
    else:
      shape = rest.split(" ", 1)[0]
    yield name.lstrip("%"), shape, rest[len(shape):].lstrip()


def hlo_metadata(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (result shape, op_name metadata)} of every instruction in an HLO module's text."""
  out = {}
  for name, shape, rest in _instructions(hlo_text):
    m = _METADATA.search(rest)
    out[name] = (shape, m.group(1) if m else "")
  return out


# XLA:CPU thunks that run asynchronously on the intra-op pool (Eigen's matmuls and convolutions).
ASYNC_OPCODES = ("dot", "convolution")


def hlo_dataflow(hlo_text: str) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
  """({instruction: opcode}, {instruction: the instructions that take its result as an operand}) of an HLO
  module's text (fused computations included: their names never clash with the entry's)."""
  opcodes, consumers = {}, collections.defaultdict(list)
  for name, _, rest in _instructions(hlo_text):
    opcode, paren, args = rest.partition("(")
    if not paren or " " in opcode:
      continue
    opcodes[name] = opcode
    depth, end = 1, 0
    for end, ch in enumerate(args):   # the operand list: up to its closing parenthesis
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        break
    for operand in re.findall(r"%([\w.\-]+)", args[:end]):
      consumers[operand].append(name)
  return opcodes, {k: tuple(v) for k, v in consumers.items()}


def split_op_name(op_name: str) -> tuple[str, str, Optional[int], str]:
  """(phase, module path without layer indices, layer index or None, primitive) of an HLO op_name such as
  'jit(step)/transpose(jvp(DeepSeekV3))/DeepSeekV3.main/layers_1/mlp/experts/dot_general'."""
  phase = "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "other"
  parts, layer = [], None
  for part in op_name.split("/"):
    if part.startswith(("jit(", "pjit(")):   # the jitted function's own name, or a nested jit (silu)
      continue
    while True:   # transpose(jvp(DeepSeekV3)) -> DeepSeekV3
      m = _WRAPPER.match(part)
      if not m:
        break
      part = m.group(1)
    if not part or part in ("checkpoint", "remat"):
      continue
    m = _LAYER.match(part)
    if m:
      layer = int(m.group(1)) if layer is None else layer
      continue
    if parts and part == parts[0]:   # a rematerialized forward inside the backward restates the path
      parts = []
    parts.append(part)
  if len(parts) > 1 and parts[1].startswith(parts[0] + "."):   # DeepSeekV3/DeepSeekV3.main -> DeepSeekV3.main
    parts = parts[1:]
  if not parts:
    return phase, "", layer, ""
  primitive = parts[-1]
  module = "/".join(parts[:-1])
  return phase, module, layer, primitive


def _cpu_count() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:   # not on Linux
    return os.cpu_count() or 1


def _xplane_files(trace_dir: str) -> list[str]:
  return sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)


def trace_snapshot(trace_dir: str) -> frozenset:
  """The trace files under trace_dir with their modification times (what `new_trace` leaves out): two
  traces started in the same second share a file name, so the name alone does not tell them apart."""
  return frozenset((f, os.stat(f).st_mtime_ns) for f in _xplane_files(trace_dir))


def _completions(planes) -> dict[tuple[int, str], list[int]]:
  """{(flow id, hlo op): sorted timestamps ns} of the 'end: <op>' markers that XLA:CPU's thunk executor
  leaves on an intra-op thread after an op completes (and after the ops that became ready with it, which
  the thread runs first); the marker's '_c' stat is the flow id that the op's own event carries as '_p'."""
  ends = collections.defaultdict(list)
  for plane in planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name.startswith("end: "):
          flow = dict(ev.stats).get("_c")
          if flow is not None:
            ends[(int(flow), ev.name[5:])].append(int(ev.start_ns))
  for v in ends.values():
    v.sort()
  return ends


def op_events(xplane_path: str, module_name: Optional[str] = None,
              hlo_text: Optional[str] = None) -> Iterable[tuple[str, str, float, bool]]:
  """(lane, hlo op, duration ms, asynchronous) of every executed HLO op in a trace file, optionally of one
  HLO module.

  A lane is a (plane, line): a CPU executor thread, or a GPU's 'XLA Ops' line where the trace has one (its
  stream lines carry the same ops again as kernels and are then skipped), else each of its stream lines.

  An asynchronous CPU op (`ASYNC_OPCODES`; without `hlo_text`, an op named 'dot...' or 'convolution...')
  lasts from its event's start to its completion, bounded by its 'end: <op>' marker of the same flow id and
  by the first later start of a consumer of its result (`hlo_text`'s dataflow); see the module docstring.
  """
  data = jax.profiler.ProfileData.from_file(xplane_path)
  planes = list(data.planes)
  ends = _completions(planes)
  events = []   # (lane, op, start ns, duration ns, flow id or None)
  for plane in planes:
    device = plane.name.startswith("/device:")
    lines = list(plane.lines)
    if device and any(line.name == "XLA Ops" for line in lines):
      lines = [line for line in lines if line.name == "XLA Ops"]
    for line in lines:
      for ev in line.events:
        stats = dict(ev.stats)
        op = stats.get("hlo_op") or (ev.name if line.name == "XLA Ops" else None)
        if not op:
          continue
        if module_name is not None and stats.get("hlo_module", module_name) != module_name:
          continue
        flow = stats.get("_p")
        events.append((f"{plane.name}/{line.name}", str(op), float(ev.start_ns), float(ev.duration_ns),
                       None if flow is None else int(flow)))
  if hlo_text is not None:
    opcodes, consumers = hlo_dataflow(hlo_text)
    is_async = lambda op: opcodes.get(op) in ASYNC_OPCODES
  else:
    consumers = {}
    is_async = lambda op: re.match(r"(?:dot|convolution)\b", op) is not None
  yield from completed(events, ends, consumers, is_async)


def completed(events, ends: dict, consumers: dict, is_async: Callable[[str], bool]):
  """(lane, op, duration ms, asynchronous) of each (lane, op, start ns, duration ns, flow id) event.

  An asynchronous CPU op (`is_async(op)`, on a lane outside the '/device:' planes) lasts until the earlier
  of its completion marker (`ends[(flow, op)]`, sorted timestamps) and the first start of one of its
  `consumers` after its event ends; any other op, its event.
  """
  starts = collections.defaultdict(list)
  for _, op, start, _, _ in events:
    starts[op].append(start)
  for v in starts.values():
    v.sort()
  timed, memo = set(starts), {}

  def timed_consumers(op):
    """The consumers of op that have events, looking through those that have none (bitcasts, tuples)."""
    if op not in memo:
      out, todo, seen = set(), list(consumers.get(op, ())), set()
      while todo:
        c = todo.pop()
        if c in seen:
          continue
        seen.add(c)
        if c in timed:
          out.add(c)
        else:
          todo.extend(consumers.get(c, ()))
      memo[op] = tuple(out)
    return memo[op]

  for lane, op, start, duration, flow in events:
    asynchronous = False
    if is_async(op) and not lane.startswith("/device:"):   # a GPU's op events are its kernels' own spans
      marks = ends.get((flow, op)) if flow is not None else None
      done = None
      if marks:
        i = bisect.bisect_left(marks, start)
        done = marks[i] if i < len(marks) else None
      for c in timed_consumers(op):
        j = bisect.bisect_left(starts[c], start + duration)
        if j < len(starts[c]) and (done is None or starts[c][j] < done):
          done = starts[c][j]
      if done is not None and done - start > duration:
        duration, asynchronous = done - start, True
    yield lane, op, duration / 1e6, asynchronous


def profile_ops(fn: Callable, *args, runs: int = 3, trace_dir: Optional[str] = None,
                hlo_path: Optional[str] = None, **kwargs) -> Profile:
  """Profiles `runs` calls of a jitted function on `args` and folds the op times onto the model.

  The function is compiled once here (`fn.lower(*args).compile()`, a plain function is jitted first), run
  once to warm up and then `runs` times under `jax.profiler.trace`; its arguments must not be donated.

  Args:
    fn: a `jax.jit`-ed function (or a function to jit).
    *args, **kwargs: its arguments.
    runs: profiled calls; times are per call.
    trace_dir: where the trace goes (default: a new temporary directory), for TensorBoard or Perfetto.
    hlo_path: also write the optimized HLO text of the executable here (the XLA dump of what ran).
  Returns:
    Profile.
  Raises:
    ValueError: runs < 1.
    RuntimeError: the trace holds no op of the executable.
  """
  if runs < 1:
    raise ValueError(f"profile_ops: runs must be >= 1, got {runs}")
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  compiled = jitted.lower(*args, **kwargs).compile()
  hlo_text = compiled.as_text()
  if hlo_path:
    os.makedirs(os.path.dirname(os.path.abspath(hlo_path)), exist_ok=True)
    with open(hlo_path, "w") as f:
      f.write(hlo_text)
  jax.block_until_ready(compiled(*args, **kwargs))
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="deepseek_jax_profile_")
  before = trace_snapshot(trace_dir)
  walls = []
  with jax.profiler.trace(trace_dir):
    for _ in range(runs):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args, **kwargs))
      walls.append(time.perf_counter() - t0)
  return fold_trace(new_trace(trace_dir, before), hlo_text, runs=runs, wall_ms=statistics.median(walls) * 1e3)


def module_name_of(hlo_text: str) -> Optional[str]:
  """The HLO module's name ('jit_step') from its text's first line, or None."""
  first = hlo_text.split("\n", 1)[0]
  return first.split()[1].rstrip(",") if first.startswith("HloModule ") else None


def new_trace(trace_dir: str, before: frozenset = frozenset()) -> str:
  """The newest .xplane.pb under a `jax.profiler` trace directory that is not in `before` (its
  `trace_snapshot` when tracing started), so that a reused directory never yields an older trace."""
  files = [f for f in _xplane_files(trace_dir) if (f, os.stat(f).st_mtime_ns) not in before]
  if not files:
    raise RuntimeError(f"jax.profiler wrote no new .xplane.pb under {trace_dir}")
  return files[-1]


def fold_trace(xplane_path: str, hlo_text: str, *, runs: int, wall_ms: float) -> Profile:
  """A Profile of the executable whose optimized HLO is `hlo_text`, from a trace holding `runs` calls of
  it (e.g. the steps between `jax.profiler.start_trace` and `stop_trace` in a training loop) that took
  `wall_ms` each.

  Raises:
    RuntimeError: the trace holds no op of that HLO module.
  """
  module_name = module_name_of(hlo_text)
  meta = hlo_metadata(hlo_text)
  totals, lanes, asynchronous = collections.Counter(), set(), set()
  for lane, op, ms, is_async in op_events(xplane_path, module_name, hlo_text):
    totals[op] += ms / runs
    lanes.add(lane)
    if is_async:
      asynchronous.add(op)
  if not totals:
    raise RuntimeError(f"the trace in {xplane_path} holds no op of HLO module {module_name}")
  device_lanes = sum(lane.startswith("/device:") for lane in lanes)
  host_lanes = min(len(lanes) - device_lanes, _cpu_count())   # executor threads beyond the cores share them
  ops = []
  for name, ms in totals.most_common():
    shape, op_name = meta.get(name, ("?", ""))
    phase, module, layer, primitive = split_op_name(op_name)
    ops.append(OpTime(name=name, kind=re.sub(r"\.\d+$", "", name), shape=shape, phase=phase, module=module,
                      primitive=primitive, layer=layer, ms=ms, asynchronous=name in asynchronous))
  if not any(o.phase == "backward" for o in ops):   # no gradients: every op is the forward pass
    ops = [dataclasses.replace(o, phase="forward") if o.phase == "other" else o for o in ops]
  return Profile(module_name=module_name or "?", ops=tuple(ops), wall_ms=wall_ms,
                 lanes=device_lanes + host_lanes, runs=runs, trace_dir=os.path.dirname(xplane_path))


def summarize(profile: Profile, top: int = 25) -> str:
  """The tables a profile is usually read by: by phase, by phase x module x op kind, and the longest ops
  (an asynchronous op's time, launch to completion, marked 'async')."""
  longest = "\n".join(f"{o.ms:9.2f}  {o.name:36s} {o.shape:28s} {o.phase:8s} {o.module}/{o.primitive}"
                      + ("  (async)" if o.asynchronous else "") for o in profile.ops[:top])
  return "\n\n".join([profile.table(by="phase", top=5), profile.table(top=top),
                      f"{'ms':>9}  longest ops\n{longest}"])


def save(profile: Profile, out_dir: str, top: int = 25) -> None:
  """Writes out_dir/ops.json (`Profile.to_dict` with every op) and out_dir/summary.txt (`summarize`)."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "ops.json"), "w") as f:
    json.dump(profile.to_dict(top=len(profile.ops)), f, indent=1)
  with open(os.path.join(out_dir, "summary.txt"), "w") as f:
    f.write(summarize(profile, top) + "\n")


class TraceWindow:
  """Traces `steps` consecutive steps of a loop, from the one that starts at step `start`, and folds them
  onto the model (MaxText's profiler window): `before(step)` ahead of each step, `after(step, fn, args)`
  behind it (step counted after the increment), `close()` at the end of the loop.

  The trace (TensorBoard / Perfetto) and `save`'s ops.json and summary.txt go to `out_dir`; the wall time
  per step is that of the whole window, so evaluation or checkpointing inside it counts.
  """

  def __init__(self, out_dir: str, start: int, steps: int):
    if start < 0 or steps < 0:
      raise ValueError(f"TraceWindow: start and steps must be >= 0, got start={start}, steps={steps}")
    self.out_dir, self.start, self.steps = out_dir, start, steps
    self._t0: Optional[float] = None
    self._before: frozenset = frozenset()

  @property
  def active(self) -> bool:
    return self._t0 is not None

  def before(self, step: int, *live) -> None:
    """Starts the trace when `step` is the window's first (waiting for `live` arrays to be computed)."""
    if self.steps and step == self.start and not self.active:
      jax.block_until_ready(live)
      trace_dir = os.path.join(self.out_dir, "trace")
      self._before = trace_snapshot(trace_dir)
      jax.profiler.start_trace(trace_dir)
      self._t0 = time.perf_counter()

  def after(self, step: int, fn: Callable, args: Sequence, *, main: bool = True) -> Optional[Profile]:
    """Ends the trace once `step` steps are done and the window is full (waiting for `args`, the step's
    outputs); returns the folded Profile of `fn` (lowered on `args` for its HLO) and saves it when `main`
    (else None)."""
    if not self.active or step != self.start + self.steps:
      return None
    jax.block_until_ready(args)
    wall_ms = (time.perf_counter() - self._t0) * 1e3 / self.steps
    jax.profiler.stop_trace()
    self._t0 = None
    if not main:
      return None
    p = fold_trace(new_trace(os.path.join(self.out_dir, "trace"), self._before),
                   fn.lower(*args).compile().as_text(), runs=self.steps, wall_ms=wall_ms)
    save(p, self.out_dir)
    return p

  def close(self) -> None:
    """Stops a trace the loop left running (a run that ended inside the window)."""
    if self.active:
      jax.profiler.stop_trace()
      self._t0 = None

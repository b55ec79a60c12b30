"""The package's layers: kernels -> ops -> layers -> model -> {interop, training, inference, analysis} ->
posttrain, with
config, sharding, data (and the process helpers) below whatever uses them.  Every import of `deepseek_jax/`
and `kernels/`, at module level or inside a function, goes down or sideways, never up, and no modules
import each other in a circle."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("deepseek_jax", "kernels")

# Module-name prefix -> rank: a module may import modules of its own rank or lower.
RANKS = (
    ("deepseek_jax.config", 0), ("deepseek_jax.sharding", 0), ("deepseek_jax.data", 0),
    ("deepseek_jax.host_memory", 0), ("deepseek_jax.distributed", 0),
    ("kernels", 1),
    ("deepseek_jax.ops", 2),
    ("deepseek_jax.layers", 3),
    ("deepseek_jax.model", 4),
    ("deepseek_jax.interop", 5), ("deepseek_jax.training", 5), ("deepseek_jax.inference", 5),
    ("deepseek_jax.analysis", 5),
    ("deepseek_jax.posttrain", 6),   # SFT / GRPO on top of training and inference
)


def _modules() -> dict:
  """{module name: path} of every .py file of the packages."""
  out = {}
  for pkg in PACKAGES:
    for base, _, files in os.walk(os.path.join(ROOT, pkg)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(base, name)
          mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          out[mod[:-len(".__init__")] if mod.endswith(".__init__") else mod] = path
  return out


def _rank(mod: str):
  for prefix, rank in RANKS:
    if mod == prefix or mod.startswith(prefix + "."):
      return rank
  return None


def _imports(mod: str, path: str, known) -> set:
  """The project modules `mod` imports anywhere in its file (a package's name where no module matches)."""
  is_pkg = path.endswith("__init__.py")
  out = set()
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = mod.split(".")
        parent = parts if is_pkg else parts[:-1]
        parent = parent[:len(parent) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
      continue
    for name in names:
      while name and name not in known:
        name = name.rpartition(".")[0]
      if name and name != mod:
        out.add(name)
  return out


def _graph() -> dict:
  mods = _modules()
  return {m: _imports(m, p, mods) for m, p in mods.items()}


def test_every_module_has_a_layer():
  unranked = [m for m in _graph() if m not in PACKAGES and _rank(m) is None]
  assert not unranked, f"modules outside the layer table: {unranked}"


def test_no_upward_imports():
  bad = []
  for mod, deps in _graph().items():
    if mod in PACKAGES:    # the packages' __init__ re-export the public API of everything below
      continue
    for dep in deps:
      if dep in PACKAGES or _rank(dep) > _rank(mod):
        bad.append(f"{mod} (rank {_rank(mod)}) imports {dep} (rank {_rank(dep)})")
  assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
  graph = {m: {d for d in deps if d not in PACKAGES} for m, deps in _graph().items() if m not in PACKAGES}
  # Tarjan's strongly connected components: any with two or more modules is a circle.
  index, low, stack, on_stack, circles = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        circles.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  pairs = [f"{a} -> {b}" for comp in circles for a in comp for b in sorted(graph[a]) if b in comp]
  assert not circles, "import circles:\n" + "\n".join(pairs)


def test_the_walk_sees_imports_inside_functions():
  graph = _graph()
  # deepseek_jax.layers.moe imports kernels.host_moe only inside the function that runs it.
  assert "kernels.host_moe" in graph["deepseek_jax.layers.moe"]
  assert "deepseek_jax.model" in graph["deepseek_jax.interop.placement"]

"""The house rules of the layout: no import cycle, lower layers never import higher ones.

The import graph of ``rpe_jax``, ``models`` and ``solvers`` is read with ``ast`` from the
source, counting imports inside functions (a deferred import is still a tie) and the lazy
public API table of ``rpe_jax/__init__.py``.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("rpe_jax", "models", "solvers")

# Layer of each module, by the longest matching prefix; an edge may only point to the same
# layer or a lower one.
LAYERS = {
    "solvers": 0,
    "models": 1,
    "rpe_jax.compose": 2, "rpe_jax.weighting": 2, "rpe_jax.retrieval": 2,
    "rpe_jax.prototypes": 2, "rpe_jax.batching": 2, "rpe_jax.merge": 2,
    "rpe_jax.library": 2, "rpe_jax.training": 2, "rpe_jax.parallel": 2,
    "rpe_jax.arrow": 2, "rpe_jax.weight_path_plot": 2,
    "rpe_jax.tasks": 3,
    "rpe_jax.pipeline": 4,
    "rpe_jax.cli": 5, "rpe_jax.demo": 5, "rpe_jax.__main__": 5,
    "rpe_jax.compose.__main__": 5,   # the entry point `python -m rpe_jax.compose`
    "rpe_jax": 6,
}
MODEL_PORTS = ("models.vit", "models.llama", "models.sam", "models.sam_encoder",
               "models.sam_decoder", "models.hf")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for path in (ROOT / package).rglob("*.py"):
      parts = path.relative_to(ROOT).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      out[name] = path
  return out


def _resolve(name: str, modules) -> str | None:
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = {m: set() for m in modules}
  for module, path in modules.items():
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = module if is_package else module.rpartition(".")[0]
          for _ in range(node.level - 1):
            anchor = anchor.rpartition(".")[0]
          base = f"{anchor}.{base}" if base else anchor
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                   for a in node.names]
      for target in targets:
        resolved = _resolve(target, modules)
        if resolved and resolved != module:
          graph[module].add(resolved)
    if module == "rpe_jax":   # the lazy public API: name → module, loaded on first use
      for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_API":
          graph[module] |= {v.value for v in node.value.values}
  return graph


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def _layer(module: str) -> int:
  name = module
  while name not in LAYERS:
    if "." not in name:
      raise AssertionError(f"module {module} has no layer: add it to LAYERS")
    name = name.rpartition(".")[0]
  return LAYERS[name]


def test_the_graph_is_read():
  graph = import_graph()
  # A few known edges, so that a reader that sees nothing cannot pass.
  assert "solvers.sparse_simplex" in graph["rpe_jax.weighting"]
  assert "rpe_jax.compose" in graph["rpe_jax.training"]
  assert "rpe_jax.cli.compose" in graph["rpe_jax.compose.__main__"]
  assert "rpe_jax.pipeline" in graph["rpe_jax"]


def test_no_import_cycle():
  assert _cycles(import_graph()) == []


def test_a_planted_cycle_is_found():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(graph) == [["a", "b", "c"]]


def test_lower_layers_never_import_higher_ones():
  bad = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
         for m, targets in import_graph().items() for t in targets if _layer(t) > _layer(m)]
  assert bad == []


def test_solvers_import_nothing_else_and_parallel_no_model_port():
  graph = import_graph()
  for module, targets in graph.items():
    if module.startswith("solvers"):
      assert all(t.startswith("solvers") for t in targets), (module, targets)
    if module.startswith("rpe_jax.parallel"):
      assert not targets & set(MODEL_PORTS), (module, targets & set(MODEL_PORTS))


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_are_small_and_say_their_idea(package):
  for path in sorted((ROOT / package).rglob("*.py")):
    lines = path.read_text().count("\n")
    assert lines <= 650, f"{path.relative_to(ROOT)} has {lines} lines"
    if lines > 20:
      assert ast.get_docstring(ast.parse(path.read_text())), \
          f"{path.relative_to(ROOT)} has no module docstring"

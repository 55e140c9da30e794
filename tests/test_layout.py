"""The package's layers: no import cycles and no arrow upward.

The import graph is built from the source with ``ast``: every ``import`` and
``from ... import``, inside functions too, so a cycle hidden by a late
import counts. A package ``__init__`` importing its own submodules is not an
arrow out of the package.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "ir2net_jax")
PACKAGE = "ir2net_jax"

# Bottom to top: a module may import its own layer's modules and lower ones.
LAYERS = (
    ("backend", "configs", "storage"),
    ("nn",),
    ("models",),
    ("data", "io"),
    ("train",),
    ("tools",),
)
# The package's own __init__: the public API, above everything it imports.
TOP = len(LAYERS)


def _modules():
  """``{dotted name: path}`` of every module of the package."""
  found = {}
  for directory, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(
            os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


def _resolve(name, modules):
  """The module of ``modules`` that ``name`` (a module or a name in one)
  is, or None."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def _graph():
  """``{module: set of modules it imports}``, within the package."""
  modules = _modules()
  edges = {m: set() for m in modules}
  for module, path in modules.items():
    package = module if path.endswith("__init__.py") else module.rpartition(
        ".")[0]
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(parts + ([node.module] if node.module else []))
        targets = [base] + [f"{base}.{a.name}" for a in node.names]
      else:
        continue
      for target in targets:
        if target.split(".")[0] != PACKAGE:
          continue
        found = _resolve(target, modules)
        # A module importing its own package (or itself) is no arrow.
        if found and found != module and not module.startswith(found + "."):
          edges[module].add(found)
  return edges


def _layer(module):
  """The index in ``LAYERS`` of ``module``'s layer (``TOP`` for the
  package's ``__init__``)."""
  if module == PACKAGE:
    return TOP
  top = module.split(".")[1]
  for i, names in enumerate(LAYERS):
    if top in names:
      return i
  raise AssertionError(f"{module} is in no layer of LAYERS; add its "
                       f"subpackage {top!r} there")


def _cycles(edges):
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return found


def test_every_module_is_in_a_layer():
  for module in _modules():
    _layer(module)


def test_no_import_cycles():
  assert _cycles(_graph()) == []


def test_no_arrow_goes_up():
  upward = sorted(f"{a} -> {b}" for a, targets in _graph().items()
                  for b in targets if _layer(b) > _layer(a))
  assert upward == []


def test_the_checker_sees_imports_inside_functions(tmp_path, monkeypatch):
  pkg = tmp_path / PACKAGE
  (pkg / "nn").mkdir(parents=True)
  (pkg / "train").mkdir()
  for init in (pkg, pkg / "nn", pkg / "train"):
    (init / "__init__.py").write_text("")
  (pkg / "nn" / "a.py").write_text(
      "def f():\n  from ir2net_jax.train import b\n")
  (pkg / "train" / "b.py").write_text("from ir2net_jax.nn import a\n")
  monkeypatch.setattr(__import__(__name__), "ROOT", str(pkg))
  edges = _graph()
  assert "ir2net_jax.train.b" in edges["ir2net_jax.nn.a"]
  assert _cycles(edges) == [["ir2net_jax.nn.a", "ir2net_jax.train.b"]]
  assert _layer("ir2net_jax.train.b") > _layer("ir2net_jax.nn.a")


if __name__ == "__main__":
  pytest.main([__file__])

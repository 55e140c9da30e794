"""The package's layers: no import cycles and no arrow upward.

The import graph is built from the source with ``ast``: every ``import`` and
``from ... import``, inside functions too, so a cycle hidden by a late
import counts. A package ``__init__`` importing its own submodules is not an
arrow out of the package.

Inside ``data``, each input engine is a subpackage that imports only
``data.shared`` and itself, and ``shared`` imports no engine; only the
modules that choose between the engines (``engines``, ``images``, the
``__init__``) import them all. The modules' flat names of before
(``from ir2net_jax.data import pipeline``) still import.
"""

import ast
import importlib
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
    ("deploy",),
    ("tools",),
)
# The package's own __init__: the public API, above everything it imports.
TOP = len(LAYERS)

DATA = f"{PACKAGE}.data"
SHARED = "shared"
ENGINES = ("device", "grain", "tf_data")
# The modules of ``data`` outside its subpackages, beside its __init__.
DATA_TOP = ("engines", "images")
# ``data``'s modules before the engines had subpackages.
FLAT_NAMES = (
    "augment", "bad_data", "constants", "custom", "digits", "digits_tfds",
    "folders", "grain_inputs", "host_recipes", "image_files", "on_device",
    "pillow_resize", "pipeline", "prefetch", "recipes", "sources", "specs",
    "tf_recipes", "window_resize",
)


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


def _imports(module, path, modules):
  """The modules of ``modules`` that ``module`` (the file ``path``)
  imports, its own packages included."""
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
      if target.split(".")[0] == PACKAGE:
        found = _resolve(target, modules)
        if found:
          yield found


def _graph():
  """``{module: set of modules it imports}``, within the package."""
  modules = _modules()
  edges = {m: set() for m in modules}
  for module, path in modules.items():
    for found in _imports(module, path, modules):
      # A module importing its own package (or itself) is no arrow.
      if found != module and not module.startswith(found + "."):
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


def _data_part(module):
  """Which part of ``data`` ``module`` is in: ``SHARED``, an engine of
  ``ENGINES``, or 'top' (the package's __init__ and ``DATA_TOP``)."""
  part = module.removeprefix(DATA + ".").split(".")[0]
  return part if part in (SHARED,) + ENGINES else "top"


def _engine_arrows_out():
  """``'a -> b'`` for each module ``a`` of ``shared`` or of an engine that
  imports a module ``b`` of ``data`` outside ``shared`` and its own engine
  (``ir2net_jax.data`` itself too: its __init__ imports every engine)."""
  modules = _modules()
  out = []
  for module, path in sorted(modules.items()):
    part = _data_part(module)
    if not module.startswith(DATA + ".") or part == "top":
      continue
    for found in _imports(module, path, modules):
      if (found == DATA or found.startswith(DATA + ".")) and _data_part(
          found) not in (SHARED, part):
        out.append(f"{module} -> {found}")
  return sorted(set(out))


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


def test_data_is_the_engines_and_what_they_share():
  flat = sorted(m for m in _modules() if m.startswith(DATA + ".") and
                _data_part(m) == "top")
  assert flat == [f"{DATA}.{name}" for name in DATA_TOP], (
      "a module of data belongs in data/shared (every engine reads it) or "
      "in an engine's subpackage")
  assert {m.split(".")[2] for m in _modules() if m.count(".") == 2 and
          m.startswith(DATA + ".")} == {SHARED, *ENGINES, *DATA_TOP}


def test_engines_import_only_shared_and_themselves():
  assert _engine_arrows_out() == []


def test_the_flat_module_names_still_import():
  data = importlib.import_module(DATA)
  for name in FLAT_NAMES:
    moved, = (m for m in _modules() if m.startswith(DATA + ".") and
              m.endswith(f".{name}") and _data_part(m) != "top")
    assert getattr(data, name) is importlib.import_module(moved), name


def test_the_checker_sees_an_engine_imported_from_shared(tmp_path,
                                                         monkeypatch):
  data = tmp_path / PACKAGE / "data"
  for sub in ("shared", "grain", "tf_data"):
    (data / sub).mkdir(parents=True)
    (data / sub / "__init__.py").write_text("")
  (data / "__init__.py").write_text("")
  (data / "shared" / "a.py").write_text(
      "def f():\n  from ir2net_jax.data import pipeline\n")
  (data / "grain" / "b.py").write_text(
      "from ir2net_jax.data.shared import a\n"
      "from ir2net_jax.data.tf_data import c\n")
  (data / "tf_data" / "c.py").write_text("from ir2net_jax.data import grain\n")
  monkeypatch.setattr(__import__(__name__), "ROOT", str(data.parent))
  assert _engine_arrows_out() == [
      "ir2net_jax.data.grain.b -> ir2net_jax.data.tf_data",
      "ir2net_jax.data.grain.b -> ir2net_jax.data.tf_data.c",
      "ir2net_jax.data.shared.a -> ir2net_jax.data",
      "ir2net_jax.data.tf_data.c -> ir2net_jax.data",
      "ir2net_jax.data.tf_data.c -> ir2net_jax.data.grain"]


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

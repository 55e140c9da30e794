"""The README and the docs/ pages: the "Use the modules in your own model"
example runs and does what its page says it does, every relative link
resolves, and the README stays short."""

import glob
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- readme-example: modules"
README_MAX_LINES = 200


def _pages():
  """README.md and every docs/*.md, as paths under ROOT."""
  return [os.path.join(ROOT, "README.md")] + sorted(
      glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _example_source():
  """``(page, source)``: the first ```python block after the marker comment,
  in whichever of README.md and docs/*.md holds it (exactly one)."""
  holders = [p for p in _pages() if MARKER in _read(p)]
  assert len(holders) == 1, (
      f"{MARKER!r} should be in exactly one of README.md and docs/*.md, "
      f"found in {[os.path.relpath(p, ROOT) for p in holders]}")
  page = _read(holders[0])
  match = re.compile(r"```python\n(.*?)```", re.S).search(
      page, page.find(MARKER))
  assert match is not None, "no ```python block after the marker"
  return os.path.relpath(holders[0], ROOT), match.group(1)


def _slug(heading):
  """GitHub's anchor for a Markdown heading."""
  text = re.sub(r"[`*]|\[|\]\([^)]*\)", "", heading.strip().lower())
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def _anchors(path):
  text = re.sub(r"```.*?```", "", _read(path), flags=re.S)
  return {_slug(h) for h in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M)}


def _links(path):
  """Every Markdown link target in ``path``, outside code blocks."""
  text = re.sub(r"```.*?```", "", _read(path), flags=re.S)
  text = re.sub(r"`[^`\n]*`", "", text)
  return re.findall(r"\]\(([^()\s]+)\)", text)


def test_every_relative_link_resolves():
  broken = []
  for page in _pages():
    for target in _links(page):
      if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
        continue
      path, _, anchor = target.partition("#")
      resolved = (os.path.normpath(os.path.join(os.path.dirname(page), path))
                  if path else page)
      where = f"{os.path.relpath(page, ROOT)}: {target}"
      if not os.path.exists(resolved):
        broken.append(f"{where} (no such file)")
      elif anchor and resolved.endswith(".md") and (
          anchor not in _anchors(resolved)):
        broken.append(f"{where} (no such heading)")
  assert not broken, "broken links:\n" + "\n".join(broken)


def test_links_are_checked():
  """The link check above sees the README's links to docs/ (so a change in
  the link syntax cannot make it pass vacuously)."""
  links = _links(os.path.join(ROOT, "README.md"))
  assert "docs/reproduce.md" in links and "docs/modules.md" in links


def test_readme_is_short():
  lines = _read(os.path.join(ROOT, "README.md")).count("\n")
  assert lines <= README_MAX_LINES, (
      f"README.md has {lines} lines (at most {README_MAX_LINES}): move "
      "details to a docs/ page and link it")


def test_ci_runs_the_readme_test_command():
  """.ci/run runs the test command of the README's Quick start verbatim
  (the whole suite; the fast tier's line picks tests with -m)."""
  readme = _read(os.path.join(ROOT, "README.md"))
  start = readme.index("## Quick start")
  block = re.compile(r"```bash\n(.*?)```", re.S).search(readme, start)
  commands = block.group(1).splitlines()
  tests = [c for c in commands if c.startswith("python -m pytest")
           and " -m " not in c[len("python -m pytest"):]]
  assert len(tests) == 1, commands
  ci = _read(os.path.join(ROOT, ".ci", "run")).splitlines()
  assert tests[0] in ci, f"{tests[0]!r} is not a line of .ci/run"


def test_every_docs_page_links_back_to_the_readme():
  for page in glob.glob(os.path.join(ROOT, "docs", "*.md")):
    assert "../README.md" in _links(page), page


def test_modules_example_runs_and_does_what_it_says():
  namespace = {}
  page, source = _example_source()
  exec(compile(source, f"{page} example", "exec"), namespace)  # pylint: disable=exec-used
  images, feature = namespace["images"], namespace["feature"]
  erased, mask = namespace["erased"], namespace["mask"]

  b, h, w, _ = images.shape
  assert feature.shape[0] == b and feature.ndim == 4
  # BinaryConv convolved ±1 activations with ±1 weights: every output is an
  # integer no larger than the number of products (3 x 3 x input channels).
  kernel = namespace["variables"]["params"]["BinaryConv_0"]["kernel"]
  fan_in = int(np.prod(kernel.shape[:-1]))
  f = np.asarray(feature)
  np.testing.assert_array_equal(f, np.round(f))
  assert np.abs(f).max() <= fan_in
  assert np.abs(f).max() > 0

  assert mask.shape == (b, h, w)
  m = np.asarray(mask)
  assert set(np.unique(m)) <= {0.0, 1.0}
  assert 0 < m.mean() < 1, "lam=1.0 on random features erases some pixels"
  np.testing.assert_array_equal(np.asarray(erased),
                                np.asarray(images) * m[..., None])
  # The mask keeps pixels whose attention is above lam x its mean: the kept
  # pixels' upsampled attention is higher on average than the erased ones'.
  from ir2net_jax.nn import restriction  # pylint: disable=g-import-not-at-top
  up = np.asarray(restriction.upsample_bilinear_align_corners(
      restriction.attention_map(feature), (h, w)))
  for i in range(b):
    assert up[i][m[i] == 1].min() > up[i][m[i] == 0].max()

  x = np.asarray(namespace["x"])
  surrogate = np.asarray(namespace["surrogate"])
  analytic = np.where(np.abs(x) < 1, 2 - 2 * np.abs(x), 0.0)
  np.testing.assert_allclose(surrogate, analytic, atol=1e-6)
  signs = np.asarray(jax.jit(namespace["binarize"].approx_sign)(
      jnp.asarray(x)))
  np.testing.assert_array_equal(signs, np.sign(x))


def _all_docs_text():
  return "\n".join(_read(p) for p in _pages())


def test_the_commands_the_docs_name_exist_and_the_readme_lists_each():
  import tomllib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = set(tomllib.load(f)["project"]["scripts"])
  text = _all_docs_text()
  named = set(re.findall(r"\bir2net-[a-z][a-z-]*[a-z]\b", text))
  assert named <= scripts, named - scripts
  readme = _read(os.path.join(ROOT, "README.md"))
  assert {s for s in scripts if s not in readme} == set()
  for module in set(re.findall(r"python -m (ir2net_jax\.[a-z_.]+)", text)):
    path = os.path.join(ROOT, *module.split("."))
    assert (os.path.isfile(path + ".py")
            or os.path.isfile(os.path.join(path, "__main__.py"))), module


def test_the_config_fields_and_models_the_docs_name_exist():
  from ir2net_jax import configs  # pylint: disable=g-import-not-at-top
  from ir2net_jax.models import MODELS  # pylint: disable=g-import-not-at-top
  text = _all_docs_text()
  fields = set(configs.get_config("digits").keys()) | {"field"}  # "FIELD"
  named = set(re.findall(r"--config\.([a-z_]+)", text))
  assert named and named <= fields, named - fields
  models = set(re.findall(r"create_model\(\"([a-z0-9_]+)\"", text)) | set(
      re.findall(r"--model=([a-z0-9_]+)", text))
  page = _read(os.path.join(ROOT, "docs", "modules.md"))
  listed = set(re.findall(r"`((?:cifar|ir2net|float|teacher)_[a-z0-9_]+)`",
                          page))
  assert models and models <= set(MODELS), models - set(MODELS)
  # modules.md lists every model (the resnet34 variants by their ends).
  assert set(MODELS) - listed <= {f"ir2net_{v}_resnet34" for v in "bc"}, (
      set(MODELS) - listed)
  assert listed <= set(MODELS), listed - set(MODELS)


def test_the_workdir_files_the_docs_name_are_the_runs():
  """The pictures are ``restriction/step_000006.png``: six digits."""
  text = _all_docs_text()
  for name in re.findall(r"step_[^\s`)]*\.png", text):
    assert re.fullmatch(r"step_(\d{6}|0+\d+|<[a-z]+>)\.png", name) and (
        "<step>" not in name), name

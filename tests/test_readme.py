"""The README's Python examples run as written.

Every fenced ```python block of README.md that is a complete example (its
first line imports; the API section's signature blocks are not) is executed
in a fresh namespace (blocks that import Flax are skipped without it), so the
snippets users copy -- the quickstart, the nnx.Optimizer and linen
TrainState examples -- cannot drift from the library. The "Code map" section
names every module of the library packages with its size, checked here too.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(path: str = os.path.join(REPO, "README.md")) -> list[str]:
  """The README's complete ```python examples (first line an import), in
  order."""
  with open(path, encoding="utf-8") as f:
    blocks = _BLOCK.findall(f.read())
  return [b for b in blocks if b.lstrip().startswith(("import ", "from "))]


def test_readme_has_the_flax_examples():
  blocks = python_blocks()
  assert any("nnx.Optimizer" in b for b in blocks)
  assert any("TrainState" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index):
  code = python_blocks()[index]
  if "flax" in code and importlib.util.find_spec("flax") is None:
    pytest.skip("needs flax (the examples extra)")
  exec(compile(code, f"README.md python block {index}", "exec"), {})  # pylint: disable=exec-used


def _code_map_bullet(folder: str) -> str:
  """The README's "Code map" bullet of ``folder`` (e.g. ``pallas_kernels/``)."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  section = text[text.index("## Code map\n"):]
  section = section[:section.index("\n## ", 1)]
  start = section.index(f"* `{folder}` ")
  end = section.find("\n* `", start + 1)
  return section[start:end if end >= 0 else None]


@pytest.mark.parametrize("package", ["microadam_optax", "pallas_kernels"])
def test_code_map_lists_every_library_module_with_its_size(package):
  bullet = " ".join(_code_map_bullet(f"{package}/").split())
  # "`microadam.py` (566" or "`gpu/step.py` 132": a module and its lines.
  sizes = {m[1]: int(m[2]) for m in re.finditer(
      r"`([\w/]+\.py)`[ (]+(\d+)", bullet)}
  root = os.path.join(REPO, package)
  for path in sorted(glob.glob(os.path.join(root, "**", "*.py"),
                               recursive=True)):
    name = os.path.relpath(path, root).replace(os.sep, "/")
    with open(path, encoding="utf-8") as f:
      lines = sum(1 for _ in f)
    if name.endswith("__init__.py") and name not in sizes and lines < 50:
      continue  # a package marker or a short re-export
    assert name in sizes, f"README's Code map does not list {package}/{name}"
    assert abs(sizes[name] - lines) <= 0.2 * lines, (
        f"README's Code map gives {package}/{name} {sizes[name]} lines; it "
        f"has {lines}")

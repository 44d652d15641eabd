"""The README's Python examples run as written.

Every fenced ```python block of README.md that is a complete example (its
first line imports; the API section's signature blocks are not) is executed
in a fresh namespace (blocks that import Flax are skipped without it), so the
snippets users copy -- the quickstart, the nnx.Optimizer and linen
TrainState examples -- cannot drift from the library.
"""

from __future__ import annotations

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

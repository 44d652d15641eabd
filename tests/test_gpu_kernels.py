"""The kernels compiled on a GPU against their references (GPU only).

The checks of ``benchmarks/kernels.py --check`` as tests: every Triton
kernel, compiled (not interpreted), against its ``jnp`` reference on fresh
random inputs of awkward sizes, and ``scale_by_microadam`` with
``implementation="pallas"`` against ``"xla"`` over several steps. Marked
``gpu`` and skipped where JAX's default back end is not a GPU (CI); run them
on a GPU machine with ``pytest -m gpu tests/test_gpu_kernels.py``.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu",
                       reason="needs a GPU (compiled Triton kernels)"),
]

_KERNELS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / (
    "kernels.py")


def _checks():
  spec = importlib.util.spec_from_file_location("benchmark_kernels", _KERNELS)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# (flattened size, block, density): several full blocks; a block that is not
# a power of two with a short last block; a tiny odd block; a ragged tail.
CASES = [(4096 * 3, 4096, 0.01), (1001, 256, 0.05), (7, 4, 0.3),
         (2 * 4096 + 1000, 4096, 0.01)]


@pytest.mark.parametrize("d,block,density", CASES)
def test_kernels_match_references_on_gpu(d, block, density):
  rows = []
  _checks()._check_case(rows, np.random.default_rng(d), d, block, density)
  bad = [r for r in rows if not r["ok"]]
  assert rows and not bad, bad


def test_optimizer_pallas_equals_xla_on_gpu():
  rows = _checks().check_optimizer(seed=0, steps=5)
  bad = [r for r in rows if not r["ok"]]
  assert rows and not bad, bad

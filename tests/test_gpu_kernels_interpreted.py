"""MicroAdam's GPU kernels in Triton's interpreter, against the XLA reference.

The three Triton kernels of ``pallas_kernels/gpu/step_kernel.py`` (Top-K,
``u``, and the fused parameter update) run on the CPU in Triton's
interpreter (``TRITON_INTERPRET=1``: each program's block operations in
NumPy) on the GPU tests' small awkward sizes, all-zero state and gradients
(ties everywhere) and one window entry per block, against
:func:`pallas_kernels.dispatch.leaf_step_reference`, with the criteria of
``tests/test_gpu_kernels.py`` (which runs the same kernels compiled, on a
GPU). The kernels are launched directly with the constants of
:func:`pallas_kernels.gpu.step.kernel_constants`; the JAX wrapper around
them is checked apart (``tests/test_gpu_wrapper.py``).

The checks run in a fresh process (``tests/triton_interpreted.py``): the
interpreter must be on before Triton is first imported. They need Triton
(the ``gpu`` extra) and PyTorch, whose CPU tensors the interpreter takes,
and are skipped where either is missing (CI has neither).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("torch")

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import triton_interpreted  # pylint: disable=g-import-not-at-top

NAMES = [name for name, _ in triton_interpreted.checks()]


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ, TRITON_INTERPRET="1")
  out = subprocess.run([sys.executable, str(HERE / "triton_interpreted.py")],
                       env=env, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.splitlines()
          if line.startswith("{")]
  return {row["name"]: row for row in rows}


@pytest.mark.parametrize("name", NAMES)
def test_kernel_matches_reference_in_the_interpreter(results, name):
  assert name in results, sorted(results)
  assert results[name]["ok"], results[name]

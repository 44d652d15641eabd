"""MicroAdam's GPU kernel compiled on a GPU, against the XLA reference (GPU only).

The checks of ``benchmarks/step_kernel.py`` as tests: the two Triton
kernels (:mod:`pallas_kernels.gpu.step`), compiled, against
:func:`pallas_kernels.dispatch.leaf_step_reference` on fresh random state of
awkward sizes, all-zero state and gradients (ties everywhere), a leaf of
more than 2**31 entries, and ``mo.microadam`` with the kernels against the
XLA path over several steps. Marked ``gpu`` and skipped where JAX's default
back end is not a GPU or jax-triton is missing (CI); run them on a GPU with
``pytest -m gpu tests/test_gpu_kernels.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import microadam_optax as mo
from benchmarks import step_kernel
from pallas_kernels.gpu import step as gpu_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu"
                       or not gpu_step.available(),
                       reason="needs a GPU and jax-triton"),
]


@pytest.mark.parametrize("case", step_kernel.CASES,
                         ids=[f"d{c[1]}_B{c[2]}" for c in step_kernel.CASES])
def test_kernel_matches_reference(case):
  res = step_kernel.check_case(*case)
  assert res["ok"], res


@pytest.mark.parametrize("zero_grad", [True, False])
def test_kernel_on_ties(zero_grad):
  res = step_kernel.check_case(6, 3 * 4096, 4096, 0.01, 4, 2, zero=True,
                               grad_zero=zero_grad)
  assert res["ok"], res


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("case", step_kernel.CASES,
                         ids=[f"d{c[1]}_B{c[2]}" for c in step_kernel.CASES])
def test_fused_parameter_update_matches_reference(case, weight_decay):
  res = step_kernel.check_apply_case(*case, weight_decay=weight_decay)
  assert res["ok"], res


def test_kernel_on_a_leaf_over_two_to_the_31():
  res = step_kernel.check_huge(8)
  assert res["ok"], res


def test_optimizer_steps_match_xla_from_the_same_state():
  # Each step both implementations start from the XLA path's state: the
  # kernel's step must give the same update and the same window row (the
  # trajectories themselves drift apart through rare one-level code flips
  # that change later selections). Float32, not bf16: with bf16 gradients
  # |g + Q^{-1}(e)| has exact ties at the Top-K threshold that a one-ulp
  # difference of the dequantization (a fused multiply-add or not) breaks
  # the other way, and every entry held by the new row alone has the same
  # |u| (w1 / sqrt(w2)), so a one-ulp difference rounds all of them to the
  # neighbouring bf16 value (0.6 %).
  rng = np.random.default_rng(0)
  shapes = {"w": (4096, 300), "b": (4096,), "odd": (7, 13)}
  params = {n: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for n, s in shapes.items()}
  txs = {i: mo.scale_by_microadam(implementation=i) for i in ("auto", "xla")}
  state = txs["xla"].init(params)
  steps = {i: jax.jit(tx.update) for i, tx in txs.items()}
  for _ in range(5):
    grads = {n: jnp.asarray(rng.standard_normal(s), jnp.float32)
             for n, s in shapes.items()}
    out_k, state_k = steps["auto"](grads, state)
    out_x, state = steps["xla"](grads, state)
    for n in shapes:
      a = np.asarray(out_k[n], np.float32)
      b = np.asarray(out_x[n], np.float32)
      assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b), n
      np.testing.assert_array_equal(
          np.sort(np.asarray(state_k.window_indices[n]), axis=-1),
          np.sort(np.asarray(state.window_indices[n]), axis=-1))
    params = jax.tree.map(lambda p, u: p - 1e-3 * u, params, out_x)


def test_apply_gradients_matches_xla_from_the_same_state():
  # mo.microadam's fused step (the parameter updated in the kernel) against
  # the XLA path's, from the same state every step; bf16 parameters with
  # weight decay on one leaf (a dense pass) and none on the others.
  rng = np.random.default_rng(1)
  shapes = {"w": (4096, 300), "b": (4096,), "odd": (7, 13)}
  params = {n: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
            for n, s in shapes.items()}
  mask = {"w": True, "b": False, "odd": False}
  txs = {i: mo.microadam(1e-2, weight_decay=0.1, mask=mask,
                         implementation=i) for i in ("auto", "xla")}
  state = txs["xla"].init(params)
  steps = {i: jax.jit(tx.apply_gradients) for i, tx in txs.items()}
  for _ in range(4):
    grads = {n: jnp.asarray(rng.standard_normal(s), jnp.float32)
             for n, s in shapes.items()}
    new_k, _ = steps["auto"](grads, state, params)
    new_x, state = steps["xla"](grads, state, params)
    for n in shapes:
      a = np.asarray(new_k[n], np.float32)
      b = np.asarray(new_x[n], np.float32)
      assert new_k[n].dtype == jnp.bfloat16
      assert np.mean(a == b) >= 0.99, n
      assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b), n
    params = new_x

"""``apply_gradients``: MicroAdam's update and the parameters' in one pass.

Against the float64 NumPy reference of MicroAdam (``microadam_reference``)
with decoupled weight decay, a mask and a schedule; against optax's own
``update`` then ``apply_updates`` (the state bit for bit, the parameters
within one rounding); every path the dispatch can take on the CPU (the XLA
reference whole and in groups, the Mosaic kernels in Pallas' interpreter,
the densified update of ``alpha > 0``). The GPU kernel that fuses the update
is checked on the GPU (``tests/test_gpu_kernels.py``) and, for its call, on
the CPU (``tests/test_gpu_wrapper.py``); sharded parameters in
``tests/test_sharding.py``.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import microadam_optax as mo
from microadam_reference import MicroAdamReference
from microadam_optax._layout import leaf_layout
from pallas_kernels import dispatch

SHAPES = {"w": (48, 100), "b": (100,), "odd": (7, 13)}
MASK = {"w": True, "b": False, "odd": True}
WEIGHT_DECAY = 0.1
KW = dict(window=4, density=0.05, topk_block_size=256)


def _schedule(count):
  return 1e-2 / (1.0 + count)  # a different rate every step


def _params(rng, dtype=jnp.float32):
  return {k: jnp.asarray(rng.standard_normal(s), dtype)
          for k, s in SHAPES.items()}


@pytest.mark.parametrize("implementation,kw", [
    ("xla", {}),
    ("xla", {"kernel_config": dispatch.KernelConfig(xla_chunk_elements=512)}),
    ("pallas", {}),
    ("xla", {"alpha": 0.3}),
], ids=["xla", "xla_in_groups", "pallas_interpret", "alpha"])
def test_matches_float64_reference(implementation, kw):
  rng = np.random.default_rng(zlib.crc32(implementation.encode()))
  params = _params(rng)
  tx = mo.microadam(_schedule, weight_decay=WEIGHT_DECAY, mask=MASK,
                    values_dtype=jnp.float32, implementation=implementation,
                    **KW, **kw)
  assert isinstance(tx, mo.FusedGradientTransformation)
  refs = {k: MicroAdamReference(
      s, window=4, density=0.05, topk_block=256, alpha=kw.get("alpha", 0.0))
          for k, s in SHAPES.items()}
  theta = {k: np.asarray(v, np.float64) for k, v in params.items()}
  state = tx.init(params)
  step = jax.jit(tx.apply_gradients)
  agree = total = 0
  for t in range(8):
    grads = {k: jnp.asarray(rng.standard_normal(s) * rng.uniform(0.1, 3.0),
                            jnp.float32) for k, s in SHAPES.items()}
    params, state = step(grads, state, params)
    lr = _schedule(t)
    for k in SHAPES:
      u = refs[k].step(np.asarray(grads[k], np.float64))
      wd = WEIGHT_DECAY if MASK[k] else 0.0
      theta[k] = theta[k] - lr * (u + wd * theta[k])
      got = np.asarray(params[k], np.float64)
      assert got.shape == theta[k].shape and np.all(np.isfinite(got))
      agree += int(np.sum(np.abs(got - theta[k])
                          <= 1e-5 * (1 + np.abs(theta[k]))))
      total += got.size
      # Keep both on the library's float32 trajectory.
      theta[k] = got
  assert agree / total >= 0.999, agree / total


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_state_is_updates_and_params_within_one_rounding(implementation):
  rng = np.random.default_rng(1)
  params = _params(rng, jnp.bfloat16)
  tx = mo.microadam(_schedule, weight_decay=WEIGHT_DECAY, mask=MASK,
                    implementation=implementation, **KW)
  state_a = state_b = tx.init(params)
  p_a = p_b = params
  update, fused = jax.jit(tx.update), jax.jit(mo.apply_gradients,
                                              static_argnums=0)
  for _ in range(4):
    grads = {k: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
             for k, s in SHAPES.items()}
    updates, state_a = update(grads, state_a, p_a)
    new_a = optax.apply_updates(p_a, updates)
    new_b, state_b = fused(tx, grads, state_b, p_a)
    assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for k in SHAPES:
      a = np.asarray(new_a[k], np.float32)
      b = np.asarray(new_b[k], np.float32)
      assert new_b[k].dtype == jnp.bfloat16
      # optax rounds the update to bf16 before adding it; the fused step
      # rounds once: at most one bf16 step of the larger magnitude apart.
      ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(a), 1e-30))) - 7)
      assert np.all(np.abs(a - b) <= 2 * ulp), k
    p_a = new_a
  del p_b


def test_bf16_parameter_is_rounded_once():
  # The float32 result of p - lr (u + wd p), rounded to bf16 once.
  rng = np.random.default_rng(2)
  shape = (64, 64)
  p = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  tx = mo.microadam(0.3, weight_decay=0.05, values_dtype=jnp.float32, **KW)
  new, _ = jax.jit(tx.apply_gradients)({"p": g}, tx.init({"p": p}), {"p": p})
  ref = MicroAdamReference(shape, window=4, density=0.05, topk_block=256)
  u = ref.step(np.asarray(g, np.float64))
  p64 = np.asarray(p, np.float64)
  want = (p64 - 0.3 * (u + 0.05 * p64)).astype(ml_dtypes.bfloat16)
  got = np.asarray(new["p"])
  assert np.mean(got == want) >= 0.995
  ulp = 2.0 ** (np.floor(np.log2(np.abs(p64) + 1e-30)) - 7)
  assert np.all(np.abs(got.astype(np.float64) - want.astype(np.float64))
                <= ulp + 1e-30)


def _assert_is_update_then_apply_updates(tx, step, grads, params):
  """``step(grads, state, params)`` gives ``tx.update`` then
  ``optax.apply_updates``, bit for bit."""
  state = tx.init(params)
  got, got_state = step(grads, state, params)
  updates, want_state = tx.update(grads, state, params)
  want = optax.apply_updates(params, updates)
  for x, y in zip(jax.tree.leaves((got, got_state)),
                  jax.tree.leaves((want, want_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_other_transformations_take_update_then_apply_updates():
  rng = np.random.default_rng(3)
  params, grads = _params(rng), _params(rng)
  for tx in (optax.adamw(1e-2, weight_decay=0.1),
             optax.chain(optax.clip_by_global_norm(1.0),
                         mo.microadam(1e-2, **KW))):
    assert not isinstance(tx, mo.FusedGradientTransformation)
    _assert_is_update_then_apply_updates(
        tx, lambda *a, tx=tx: mo.apply_gradients(tx, *a), grads, params)


def test_weight_decay_schedule_takes_optax_path():
  rng = np.random.default_rng(4)
  params, grads = _params(rng), _params(rng)
  tx = mo.microadam(1e-2, weight_decay=lambda c: 0.1 / (1 + c), **KW)
  _assert_is_update_then_apply_updates(tx, tx.apply_gradients, grads, params)


def test_donated_parameters_and_a_copy_of_the_transformation():
  rng = np.random.default_rng(5)
  params = _params(rng)
  tx = mo.microadam(1e-2, weight_decay=0.1, **KW)
  state = tx.init(params)
  grads = _params(rng)
  want, _ = jax.jit(tx.apply_gradients)(grads, state, params)
  step = jax.jit(tx.apply_gradients, donate_argnums=(1, 2))
  got, _ = step(grads, state, jax.tree.map(jnp.copy, params))
  for k in SHAPES:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
  # A tuple copy loses the fused function, not the step.
  copy = tx._replace(init=tx.init)
  got, _ = copy.apply_gradients(grads, tx.init(params), params)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]),
                               rtol=1e-6, atol=1e-7)


def test_mismatched_trees_and_sizes_are_refused():
  rng = np.random.default_rng(6)
  params = _params(rng)
  tx = mo.microadam(1e-2, **KW)
  state = tx.init(params)
  with pytest.raises(ValueError, match="params must have the gradients'"):
    tx.apply_gradients(params, state, {"w": params["w"]})
  lay = leaf_layout(100, topk_block_size=64, quant_block_size=64,
                    density=0.1, error_bits=4)
  z = lambda *s: jnp.zeros(s)
  with pytest.raises(ValueError, match="param must have as many elements"):
    dispatch.leaf_step(
        z(100), jnp.zeros((2, 2, lay.k), jnp.int16), z(2, 2, lay.k),
        jnp.zeros((2, lay.code_bytes), jnp.uint8), z(2), z(2), 1,
        layout=lay, b1=0.9, b2=0.999, eps=1e-8, bits=4,
        out_dtype=jnp.float32, param=z(99), learning_rate=0.1)
  with pytest.raises(ValueError, match="learning_rate must be given"):
    dispatch.leaf_step(
        z(100), jnp.zeros((2, 2, lay.k), jnp.int16), z(2, 2, lay.k),
        jnp.zeros((2, lay.code_bytes), jnp.uint8), z(2), z(2), 1,
        layout=lay, b1=0.9, b2=0.999, eps=1e-8, bits=4,
        out_dtype=jnp.float32, param=z(100))


def test_groups_give_the_whole_leaf_bit_for_bit():
  # The XLA path in groups of blocks (large leaves) against one piece.
  rng = np.random.default_rng(7)
  lay = leaf_layout(5000, topk_block_size=256, quant_block_size=256,
                    density=0.05, error_bits=4)
  nb, k = lay.num_topk_blocks, lay.k
  state = (jnp.asarray(rng.integers(0, 256, (3, nb, k)), jnp.int16),
           jnp.asarray(rng.standard_normal((3, nb, k)), jnp.bfloat16),
           jnp.asarray(rng.integers(0, 256, (nb, lay.code_bytes)), jnp.uint8),
           jnp.asarray(-rng.random(nb), jnp.float32),
           jnp.asarray(rng.random(nb), jnp.float32))
  g = jnp.asarray(rng.standard_normal(5000), jnp.bfloat16)
  p = jnp.asarray(rng.standard_normal(5000), jnp.bfloat16)
  outs = []
  for chunk in (1 << 20, 1024, 256):
    config = dispatch.KernelConfig(xla_chunk_elements=chunk)
    outs.append(jax.jit(lambda g, p, *s: dispatch.leaf_step(
        g, *s, 5, layout=lay, b1=0.9, b2=0.999, eps=1e-8, bits=4,
        out_dtype=jnp.bfloat16, config=config, param=p, learning_rate=0.1,
        weight_decay=0.01))(g, p, *state))
  for other in outs[1:]:
    for x, y in zip(outs[0], other):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert outs[0][0].dtype == jnp.bfloat16 and outs[0][0].shape == (5000,)

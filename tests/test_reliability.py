"""Nothing lost: checkpoints, non-finite gradients, odd leaves, huge leaves."""

from __future__ import annotations

import importlib
import os
import pathlib
import pickle
import subprocess
import sys
import warnings

import flax.serialization
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import microadam_optax as mo
from microadam_reference import MicroAdamReference

HERE = pathlib.Path(__file__).parent
CHECKPOINTED = ["microadam", "adam_mini"]


def _random_state(tx, params, steps=3, seed=0):
  rng = np.random.default_rng(seed)
  state = tx.init(params)
  for _ in range(steps):
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    _, state = tx.update(grads, state, params)
  return state


def _params():
  rng = np.random.default_rng(1)
  return {"w": jnp.asarray(rng.standard_normal((33, 70)), jnp.bfloat16),
          "b": jnp.asarray(rng.standard_normal((70,)), jnp.float32)}


def _assert_same_tree(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def test_orbax_round_trip_keeps_dtypes_and_shapes(tmp_path):
  params = _params()
  tx = mo.microadam(1e-3, density=0.1, topk_block_size=64)
  state = _random_state(tx, params)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", state)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "ckpt", jax.eval_shape(tx.init, params))
  _assert_same_tree(state, restored)
  inner = restored[0]
  assert inner.window_indices["w"].dtype == jnp.int16
  assert inner.window_values["w"].dtype == jnp.bfloat16
  assert inner.error_codes["w"].dtype == jnp.uint8
  assert inner.count.dtype == jnp.int32


def test_deprecated_state_name_is_the_same_class_and_restores(tmp_path):
  with pytest.warns(DeprecationWarning, match="ScaleByMicroAdamState"):
    old = mo.MicroAdamState
  assert old is mo.ScaleByMicroAdamState
  with pytest.warns(DeprecationWarning):
    from microadam_optax import MicroAdamState  # pylint: disable=g-import-not-at-top
  assert MicroAdamState is old
  # A state written under the old name restores as the new one.
  params = _params()
  tx = mo.scale_by_microadam(density=0.1, topk_block_size=64)
  state = old(*_random_state(tx, params))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", state)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "ckpt", jax.eval_shape(tx.init, params))
  assert type(restored) is mo.ScaleByMicroAdamState
  _assert_same_tree(state, restored)
  assert "MicroAdamState" not in mo.__all__
  with pytest.raises(AttributeError, match="no_such_name"):
    mo.no_such_name  # pylint: disable=pointless-statement


def test_pickle_naming_the_old_state_class_loads():
  """A pickle written before the rename names the class
  ``microadam_optax.microadam.MicroAdamState``: it loads, as the new class,
  with a DeprecationWarning."""
  module = importlib.import_module("microadam_optax.microadam")
  cls = mo.ScaleByMicroAdamState
  tx = mo.scale_by_microadam(density=0.1, topk_block_size=64)
  state = cls(*jax.tree.map(np.asarray, tuple(_random_state(tx, _params()))))
  # Bytes as the old class wrote them: its name, in the same module.
  module.MicroAdamState, cls.__qualname__ = cls, "MicroAdamState"
  try:
    old_bytes = pickle.dumps(state)
  finally:
    del module.MicroAdamState
    cls.__qualname__ = "ScaleByMicroAdamState"
  assert "MicroAdamState" not in vars(module)
  assert b"microadam_optax.microadam" in old_bytes
  assert b"MicroAdamState" in old_bytes and b"ScaleBy" not in old_bytes
  with pytest.warns(DeprecationWarning,
                    match=r"microadam\.MicroAdamState is deprecated"):
    restored = pickle.loads(old_bytes)
  assert type(restored) is cls
  _assert_same_tree(state, restored)
  with pytest.warns(DeprecationWarning):
    from microadam_optax.microadam import MicroAdamState  # pylint: disable=g-import-not-at-top
  assert MicroAdamState is cls
  with pytest.raises(AttributeError, match="no_such_name"):
    module.no_such_name  # pylint: disable=pointless-statement
  # The new name pickles and loads without a warning.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _assert_same_tree(state, pickle.loads(pickle.dumps(state)))


def test_flax_msgpack_round_trip():
  params = _params()
  tx = mo.microadam(1e-3, density=0.1, topk_block_size=64)
  state = _random_state(tx, params)
  blob = flax.serialization.to_bytes(state)
  restored = flax.serialization.from_bytes(tx.init(params), blob)
  _assert_same_tree(state, restored)


@pytest.mark.parametrize("optimizer", CHECKPOINTED)
def test_resume_in_fresh_process_is_bit_identical(optimizer, tmp_path):
  n = 6
  script = str(HERE / "checkpoint_run.py")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(HERE), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)

  def run(*args):
    subprocess.run([sys.executable, script, optimizer, *args], check=True,
                   env=env, capture_output=True, timeout=600)

  run(str(2 * n), str(tmp_path / "straight.npz"))
  run(str(n), str(tmp_path / "first.npz"), "--save", str(tmp_path / "ckpt"))
  run(str(n), str(tmp_path / "resumed.npz"), "--restore",
      str(tmp_path / "ckpt"), "--start", str(n))
  straight = np.load(tmp_path / "straight.npz")
  resumed = np.load(tmp_path / "resumed.npz")
  first = np.load(tmp_path / "first.npz")
  assert sorted(straight.files) == sorted(resumed.files)
  for k in straight.files:
    np.testing.assert_array_equal(straight[k], resumed[k])
    assert not np.array_equal(first[k], straight[k])


def test_apply_if_finite_keeps_state_clean():
  params = {"w": jnp.zeros((200,))}
  inner = mo.scale_by_microadam(density=0.05, topk_block_size=64)
  guarded = optax.apply_if_finite(inner, max_consecutive_errors=5)
  rng = np.random.default_rng(4)
  grads = [{"w": jnp.asarray(rng.standard_normal(200), jnp.float32)}
           for _ in range(4)]
  bad = {"w": grads[1]["w"].at[7].set(jnp.nan).at[9].set(jnp.inf)}
  s_ref = inner.init(params)
  s_g = guarded.init(params)
  inner_update, guarded_update = jax.jit(inner.update), jax.jit(guarded.update)
  for g in (grads[0], grads[2], grads[3]):
    u_ref, s_ref = inner_update(g, s_ref, params)
  for g in (grads[0], bad, grads[2], grads[3]):
    u_g, s_g = guarded_update(g, s_g, params)
  assert int(s_g.total_notfinite) == 1
  _assert_same_tree(s_ref, s_g.inner_state)
  np.testing.assert_array_equal(u_ref["w"], u_g["w"])


def test_non_finite_gradient_without_guard_is_visible_then_flushed():
  """Documented behaviour: non-finite entries (at most k per block) win the
  Top-K, so the error feedback stays finite; their update is NaN while they
  sit in the window, and the state is clean again ``window`` steps later."""
  window = 3
  tx = mo.scale_by_microadam(density=0.25, topk_block_size=8, window=window)
  params = jnp.zeros((32,))
  state = tx.init(params)
  rng = np.random.default_rng(8)
  g = jnp.asarray(rng.standard_normal(32), jnp.float32)
  u, state = tx.update(g.at[3].set(jnp.nan).at[20].set(-jnp.inf), state,
                       params)
  assert np.isnan(u[3]) and np.isnan(u[20])
  assert np.isfinite(np.delete(np.asarray(u), [3, 20])).all()
  for leaf in (state.error_min, state.error_max):
    assert np.isfinite(np.asarray(leaf)).all()
  for _ in range(window):
    u, state = tx.update(jnp.asarray(rng.standard_normal(32), jnp.float32),
                         state, params)
  assert np.isfinite(np.asarray(u)).all()
  assert np.isfinite(np.asarray(state.window_values, np.float32)).all()


def test_integer_leaf_passes_through_when_masked():
  params = {"w": jnp.ones((10,)), "step": jnp.array(3, jnp.int32)}
  tx = optax.masked(mo.scale_by_microadam(density=0.5),
                    {"w": True, "step": False})
  state = tx.init(params)
  updates, _ = tx.update({"w": jnp.arange(10.0), "step": jnp.array(1)},
                         state, params)
  assert updates["step"] == 1
  assert updates["w"].shape == (10,)


def test_float64_under_x64_in_a_subprocess():
  code = (
      "import jax, jax.numpy as jnp, microadam_optax as mo\n"
      "p = jnp.ones((50,), jnp.float64)\n"
      "tx = mo.scale_by_microadam(density=0.2, topk_block_size=16)\n"
      "s = tx.init(p)\n"
      "u, s2 = jax.jit(tx.update)(p * 0.5, s, p)\n"
      "assert u.dtype == jnp.float64, u.dtype\n"
      "assert jax.tree.map(lambda a: a.dtype, s) == "
      "jax.tree.map(lambda a: a.dtype, s2)\n"
      "print('ok')\n")
  env = dict(os.environ, JAX_ENABLE_X64="1")
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                       capture_output=True, text=True, timeout=300)
  assert out.stdout.strip() == "ok"


def test_leaf_over_two_to_the_31_elements_lowers():
  n = 2**31 + 4096 * 3 + 5  # > int32 range, not a multiple of the block
  params = {"huge": jax.ShapeDtypeStruct((n,), jnp.bfloat16)}
  tx = mo.microadam(1e-4)
  state = jax.eval_shape(tx.init, params)
  inner = state[0]
  assert inner.window_indices["huge"].shape == (10, n // 4096 + 1, 41)
  assert inner.error_codes["huge"].shape == (n // 4096 + 1, 2048)
  lowered = jax.jit(tx.update).lower(params, state, params)
  text = lowered.as_text()
  assert str(n) in text  # the full length appears as a static dimension


# ---------------------------------------------------------------------------
# Property-based: any shape, density, window, block sizes and dtypes.


@hypothesis.settings(max_examples=20, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(
    shape=st.lists(st.integers(1, 40), min_size=0, max_size=3),
    density=st.sampled_from([0.02, 0.1, 0.33, 1.0]),
    window=st.integers(1, 6),
    topk_block=st.integers(1, 80).map(lambda x: 2 * x),
    quant_block=st.integers(1, 80).map(lambda x: 2 * x),
    bits=st.sampled_from([4, 8]),
    values_dtype=st.sampled_from(["float32", "bfloat16"]),
    alpha=st.sampled_from([0.0, 0.25]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(shape, density, window, topk_block,
                                    quant_block, bits, values_dtype, alpha,
                                    seed):
  rng = np.random.default_rng(seed)
  shape = tuple(shape)
  vdt = jnp.dtype(values_dtype)
  tx = mo.scale_by_microadam(
      window=window, density=density, topk_block_size=topk_block,
      quant_block_size=quant_block, error_bits=bits, values_dtype=vdt,
      alpha=alpha, implementation="xla")
  rounder = None
  if values_dtype == "bfloat16":
    rounder = lambda v: v.astype(ml_dtypes.bfloat16).astype(np.float64)
  ref = MicroAdamReference(shape, window=window, density=density,
                           topk_block=topk_block, quant_block=quant_block,
                           bits=bits, alpha=alpha, values_round=rounder)
  params = jnp.zeros(shape, jnp.float32)
  state = tx.init(params)
  update = jax.jit(tx.update)
  agree = total = 0
  for _ in range(6):
    g = rng.standard_normal(shape).astype(np.float32)
    u, state = update(jnp.asarray(g), state, params)
    want = ref.step(g.astype(np.float64))
    got = np.asarray(u, np.float64)
    assert got.shape == shape
    agree += int(np.sum(np.abs(got - want) <= 1e-3 * (1 + np.abs(want))))
    total += max(want.size, 1)
  # Near-ties at a rounding boundary may flip one code; nothing more.
  assert agree >= total - max(2, total // 100), (agree, total)

"""MicroAdam against an independent float64 NumPy reference and its contract."""

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

# (name, params shapes, scale_by_microadam kwargs)
CASES = [
    ("scalar", [()], dict(density=0.01)),
    ("odd_size", [(7,)], dict(density=0.3, topk_block_size=4,
                              quant_block_size=2)),
    ("not_a_multiple_of_either_block", [(1001,)],
     dict(density=0.05, topk_block_size=256, quant_block_size=100)),
    ("multi_dim", [(37, 53), (3, 5, 7)],
     dict(density=0.05, topk_block_size=64, quant_block_size=30)),
    ("default_blocks_with_short_last_block", [(70, 130)], dict(density=0.01)),
    ("leaf_smaller_than_one_block", [(10,), (33, 3)],
     dict(density=0.1, topk_block_size=4096, quant_block_size=4096)),
    ("alpha", [(301,), (16, 16)],
     dict(density=0.05, alpha=0.3, topk_block_size=64, quant_block_size=64)),
    ("alpha_misaligned_blocks", [(257,)],
     dict(density=0.1, alpha=0.5, topk_block_size=50, quant_block_size=36)),
    ("eight_bit_errors", [(500,)],
     dict(density=0.02, error_bits=8, topk_block_size=128)),
]


def _run_pair(shapes, kwargs, steps, rng, window=4, values_dtype=jnp.float32,
              values_round=None, b1=0.9, b2=0.999, implementation="xla"):
  params = {f"p{i}": jnp.asarray(rng.standard_normal(s), jnp.float32)
            for i, s in enumerate(shapes)}
  tx = mo.scale_by_microadam(b1=b1, b2=b2, window=window,
                             values_dtype=values_dtype,
                             implementation=implementation, **kwargs)
  refs = {k: MicroAdamReference(
      v.shape, b1=b1, b2=b2, window=window, density=kwargs["density"],
      topk_block=kwargs.get("topk_block_size", mo.DEFAULT_BLOCK_SIZE),
      quant_block=kwargs.get("quant_block_size"),
      bits=kwargs.get("error_bits", 4), alpha=kwargs.get("alpha", 0.0),
      values_round=values_round) for k, v in params.items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  agree, total = 0, 0
  for _ in range(steps):
    grads64 = {k: rng.standard_normal(v.shape) * rng.uniform(0.1, 3.0)
               for k, v in params.items()}
    grads = {k: jnp.asarray(g, jnp.float32) for k, g in grads64.items()}
    updates, state = update(grads, state, params)
    for k, g in grads64.items():
      # The reference sees exactly the float32 gradient the library sees.
      want = refs[k].step(np.asarray(np.float32(g), np.float64))
      got = np.asarray(updates[k], np.float64)
      assert got.shape == want.shape and got.dtype == np.float64
      assert np.all(np.isfinite(got))
      agree += int(np.sum(np.abs(got - want) <= 1e-3 * (1 + np.abs(want))))
      total += want.size
  return agree / total


@pytest.mark.parametrize("name,shapes,kwargs", CASES,
                         ids=[c[0] for c in CASES])
def test_matches_float64_reference(name, shapes, kwargs):
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  frac = _run_pair(shapes, kwargs, steps=25, rng=rng)
  assert frac >= 0.999, f"{name}: only {frac:.5f} of update entries agree"


# The Pallas kernels (interpret mode on CPU) against the same float64
# reference: the fused error-feedback kernel (coinciding blocks, 4-bit), the
# separate kernels (misaligned blocks, 8-bit errors) and the densified update.
PALLAS_CASES = ["odd_size", "multi_dim", "default_blocks_with_short_last_block",
                "alpha_misaligned_blocks", "eight_bit_errors"]


@pytest.mark.parametrize("name", PALLAS_CASES)
def test_pallas_matches_float64_reference(name):
  shapes, kwargs = {c[0]: c[1:] for c in CASES}[name]
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  frac = _run_pair(shapes, kwargs, steps=8, rng=rng, implementation="pallas")
  assert frac >= 0.999, f"{name}: only {frac:.5f} of update entries agree"


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_matches_reference_with_bf16_values(implementation):
  rng = np.random.default_rng(7)

  def to_bf16(v):
    return v.astype(ml_dtypes.bfloat16).astype(np.float64)

  frac = _run_pair([(40, 25)], dict(density=0.04, topk_block_size=128),
                   steps=25, rng=rng, values_dtype=jnp.bfloat16,
                   values_round=to_bf16, implementation=implementation)
  assert frac >= 0.999


def test_reference_disagrees_with_wrong_hyperparameters():
  """The comparison has teeth: another b1 is caught."""
  rng = np.random.default_rng(3)
  params = jnp.zeros((300,))
  tx = mo.scale_by_microadam(b1=0.8, window=4, density=0.1,
                             topk_block_size=64, values_dtype=jnp.float32)
  ref = MicroAdamReference((300,), b1=0.9, window=4, density=0.1,
                           topk_block=64)
  state = tx.init(params)
  for _ in range(5):
    g = rng.standard_normal(300).astype(np.float32)
    u, state = tx.update(jnp.asarray(g), state, params)
    want = ref.step(g.astype(np.float64))
  assert np.mean(np.abs(np.asarray(u) - want) <= 1e-3 * (1 + np.abs(want))) < 0.9


@pytest.mark.parametrize("b1,b2,eps", [(0.9, 0.999, 1e-8), (0.5, 0.9, 1e-3)])
def test_density_one_equals_adam(b1, b2, eps):
  rng = np.random.default_rng(11)
  params = {"a": jnp.asarray(rng.standard_normal((33, 17)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((5,)), jnp.float32)}
  steps = 12
  tx = mo.scale_by_microadam(b1=b1, b2=b2, eps=eps, window=steps,
                             density=1.0, values_dtype=jnp.float32,
                             topk_block_size=64, quant_block_size=64)
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  s1, s2 = tx.init(params), adam.init(params)
  for _ in range(steps):
    g = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
        params)
    u1, s1 = tx.update(g, s1, params)
    u2, s2 = adam.update(g, s2, params)
    for k in params:
      np.testing.assert_allclose(u1[k], u2[k], rtol=2e-5, atol=2e-6)


def test_constant_and_zero_blocks_give_zero_updates_without_nan():
  params = {"frozen": jnp.ones((50, 40)), "live": jnp.ones((300,)),
            "const": jnp.ones((200,))}
  tx = mo.scale_by_microadam(density=0.05, topk_block_size=64,
                             quant_block_size=64)
  state = tx.init(params)
  rng = np.random.default_rng(5)
  for _ in range(6):
    grads = {"frozen": jnp.zeros((50, 40)),
             "live": jnp.asarray(rng.standard_normal(300), jnp.float32),
             "const": jnp.full((200,), 0.25)}
    updates, state = tx.update(grads, state, params)
    for leaf in jax.tree.leaves((updates, state)):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    np.testing.assert_array_equal(updates["frozen"], 0.0)
  # A constant block quantizes to its value exactly: with no error lost, the
  # constant gradient is always represented and every update is finite and
  # non-negative (the gradient is positive).
  assert bool(jnp.all(updates["const"] >= 0))
  assert bool(jnp.any(updates["live"] != 0))


def test_state_bytes_per_param_on_llama2_7b_shapes():
  shapes = mo.model_shapes.llama2_shapes("llama2-7b")
  state = jax.eval_shape(mo.microadam(1e-5).init, shapes)
  per_param = mo.state_nbytes(state) / mo.model_shapes.num_params(shapes)
  assert 0.85 <= per_param <= 0.91, per_param
  inner = state[0]
  assert isinstance(inner, mo.ScaleByMicroAdamState)
  leaf = inner.window_indices["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert leaf.dtype == jnp.int16 and leaf.shape == (10, 4096, 41)
  codes = inner.error_codes["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert codes.dtype == jnp.uint8 and codes.shape == (4096, 2048)


def test_state_layout_honours_explicit_block_sizes():
  params = {"w": jnp.ones((1000,))}
  state = mo.scale_by_microadam(window=3, density=0.1, topk_block_size=300,
                                quant_block_size=128).init(params)
  # 4 Top-K blocks of 300, 300, 300, 100: k = 30 (last block keeps 10).
  assert state.window_indices["w"].shape == (3, 4, 30)
  # 8 quantization blocks of 128 (the last holds 104), 64 bytes each.
  assert state.error_codes["w"].shape == (8, 64)
  assert state.error_min["w"].shape == (8,)
  big = mo.scale_by_microadam(topk_block_size=40000).init(
      {"w": jnp.ones((50000,))})
  assert big.window_indices["w"].dtype == jnp.int32


def test_last_short_block_keeps_ceil_density():
  params = jnp.zeros((1000,))
  tx = mo.scale_by_microadam(window=1, density=0.1, topk_block_size=300,
                             values_dtype=jnp.float32)
  state = tx.init(params)
  g = jnp.asarray(np.random.default_rng(0).standard_normal(1000) + 5.0,
                  jnp.float32)
  u, state = tx.update(g, state, params)
  nonzero = np.asarray(u) != 0
  assert [int(nonzero[i:i + 300].sum()) for i in (0, 300, 600)] == [30] * 3
  assert int(nonzero[900:].sum()) == 10


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=0), "window"),
    (dict(window=2.5), "window"),
    (dict(density=0.0), "density"),
    (dict(density=1.5), "density"),
    (dict(topk_block_size=0), "topk_block_size"),
    (dict(topk_block_size=-4), "topk_block_size"),
    (dict(topk_block_size=33), "topk_block_size"),
    (dict(quant_block_size=7), "quant_block_size"),
    (dict(error_bits=3), "error_bits"),
    (dict(alpha=1.0), "alpha"),
    (dict(alpha=-0.1), "alpha"),
    (dict(b1=1.0), "b1"),
    (dict(b2=-0.5), "b2"),
    (dict(eps=-1.0), "eps"),
    (dict(values_dtype=jnp.int8), "values_dtype"),
    (dict(implementation="cuda"), "implementation"),
])
def test_invalid_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mo.scale_by_microadam(**kwargs)
  with pytest.raises(ValueError, match=match):
    mo.microadam(1e-3, **kwargs)


def test_error_message_names_value_and_range():
  with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 2"):
    mo.scale_by_microadam(density=2)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_non_float_leaves_raise_naming_the_path(dtype):
  params = {"ok": jnp.ones((3,)), "bad": jnp.ones((3,), dtype)}
  with pytest.raises(TypeError, match=r"\['bad'\]"):
    mo.scale_by_microadam().init(params)


def test_size_zero_leaf():
  params = {"empty": jnp.zeros((0, 3)), "w": jnp.ones((10,))}
  tx = mo.scale_by_microadam()
  state = tx.init(params)
  grads = {"empty": jnp.zeros((0, 3)), "w": jnp.arange(10.0)}
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert updates["empty"].shape == (0, 3)
  assert bool(jnp.all(jnp.isfinite(updates["w"])))


def test_mismatched_tree_raises():
  tx = mo.scale_by_microadam()
  state = tx.init({"a": jnp.ones(3)})
  with pytest.raises(ValueError, match="does not match"):
    tx.update({"b": jnp.ones(3), "c": jnp.ones(2)}, state)


def test_microadam_alias_is_chain_with_weight_decay_and_schedule():
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.standard_normal((20, 10)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((10,)), jnp.float32)}
  schedule = optax.linear_schedule(0.1, 0.01, 5)
  mask = {"w": True, "b": False}
  tx = mo.microadam(schedule, weight_decay=0.1, mask=mask, density=0.2)
  base = mo.scale_by_microadam(density=0.2)
  s, sb = tx.init(params), base.init(params)
  for step in range(4):
    g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape),
                                           jnp.float32), params)
    u, s = tx.update(g, s, params)
    ub, sb = base.update(g, sb, params)
    lr = float(schedule(step))
    np.testing.assert_allclose(u["w"], -lr * (ub["w"] + 0.1 * params["w"]),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(u["b"], -lr * ub["b"], rtol=1e-5, atol=1e-7)


def test_traced_structural_argument_has_clear_error():
  def f(window):
    return mo.scale_by_microadam(window=window)

  with pytest.raises(ValueError, match="MICROADAM_STATIC_ARGS"):
    jax.jit(f)(3)

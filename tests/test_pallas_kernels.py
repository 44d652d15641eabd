"""The Pallas kernels against their jnp references (interpret mode on CPU).

Every kernel runs with ``interpret=True`` (the default off GPU/TPU) on fresh
random inputs of awkward sizes: one element, odd blocks, blocks that are not
a power of two, tensors that are not a multiple of the block, one block. The
GPU back end compiles the same kernel bodies; ``benchmarks/kernels.py
--check`` repeats these checks compiled on a GPU. Sizes stay small: interpret
mode is slow.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import microadam_optax as mo
from pallas_kernels import _backend
from pallas_kernels import error_feedback as ef_lib
from pallas_kernels import quantize as quant_lib
from pallas_kernels import topk as topk_lib
from pallas_kernels import window as window_lib


def _rng(request) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _sorted(x) -> np.ndarray:
  return np.sort(np.asarray(x), axis=-1)


# --------------------------------------------------------------------- Top-K

TOPK_CASES = [
    # (num_blocks, B, k, last_block_length, last_block_k)
    (1, 1, 1, None, None),          # a single element
    (3, 100, 7, 37, 3),             # B not a power of two, short last block
    (4, 7, 2, 5, 1),                # odd B
    (1, 4096, 41, None, None),      # one default-size block
    (2, 64, 64, None, None),        # k == B
]


@pytest.mark.parametrize("nb,block,k,last_len,last_k", TOPK_CASES)
def test_topk_matches_reference(request, nb, block, k, last_len, last_k):
  x = jnp.asarray(_rng(request).standard_normal((nb, block)), jnp.float32)
  kw = dict(last_block_length=last_len, last_block_k=last_k)
  idx, val = topk_lib.block_topk_pallas(x, k, index_dtype=jnp.int16, **kw)
  ref_idx, ref_val = topk_lib.block_topk_reference(x, k, **kw)
  assert idx.shape == (nb, k) and idx.dtype == jnp.int16
  assert val.shape == (nb, k) and val.dtype == x.dtype
  np.testing.assert_array_equal(_sorted(idx), _sorted(ref_idx))
  np.testing.assert_array_equal(_sorted(val), _sorted(ref_val))
  # Values are the entries at the indices; empty slots hold (0, 0).
  lk = k if last_k is None else last_k
  got = np.take_along_axis(np.asarray(x), np.asarray(idx, np.int64), axis=1)
  np.testing.assert_array_equal(got[:-1], np.asarray(val)[:-1])
  np.testing.assert_array_equal(got[-1, :lk], np.asarray(val)[-1, :lk])
  assert np.all(np.asarray(idx)[-1, lk:] == 0)
  assert np.all(np.asarray(val)[-1, lk:] == 0)


def test_topk_ties_and_special_values(request):
  rng = _rng(request)
  rows = [
      rng.integers(-2, 3, 256),                       # heavy ties
      np.zeros(256),                                   # all tied at zero
      np.where(rng.uniform(size=256) < 0.02, np.inf,   # infinities
               rng.standard_normal(256)),
      rng.standard_normal(256) * 1e-38,                # denormals
      rng.standard_t(1, 256),                          # Cauchy tails
      rng.standard_normal(256) * (rng.uniform(size=256) < 0.01),  # sparse
  ]
  x = jnp.asarray(np.stack(rows), jnp.float32)
  idx, val = topk_lib.block_topk_pallas(x, 9)
  _, ref_val = topk_lib.block_topk_reference(x, 9)
  np.testing.assert_array_equal(_sorted(np.abs(val)), _sorted(np.abs(ref_val)))
  for row in np.asarray(idx):
    assert len(set(row.tolist())) == 9  # exactly k distinct entries
  # Ties are broken by position: all-zero row keeps the first k.
  np.testing.assert_array_equal(np.asarray(idx)[1], np.arange(9))


def test_topk_several_blocks_per_program(request):
  x = jnp.asarray(_rng(request).standard_normal((4, 96)), jnp.float32)
  idx, _ = topk_lib.block_topk_pallas(x, 5, last_block_length=50,
                                      last_block_k=3, rows=2)
  ref, _ = topk_lib.block_topk_reference(x, 5, last_block_length=50,
                                         last_block_k=3)
  np.testing.assert_array_equal(_sorted(idx), _sorted(ref))


# ------------------------------------------------------- quantize / pack

QUANT_CASES = [(1, 2, None), (3, 100, 37), (5, 64, 1), (2, 4096, None),
               (1, 6, 5)]


@pytest.mark.parametrize("nb,q,last_len", QUANT_CASES)
def test_quantize_dequantize_match_reference(request, nb, q, last_len):
  x = jnp.asarray(_rng(request).standard_normal((nb, q)), jnp.float32)
  packed, lo, hi = quant_lib.quantize_pallas(x, 4, last_len)
  ref = quant_lib.quantize_reference(x, 4, last_len)
  np.testing.assert_array_equal(packed, ref[0])
  np.testing.assert_array_equal(lo, ref[1])
  np.testing.assert_array_equal(hi, ref[2])
  out = quant_lib.dequantize_pallas(*ref, 4, q)
  np.testing.assert_allclose(out, quant_lib.dequantize_reference(*ref, 4, q),
                             rtol=1e-6, atol=1e-6)


def test_quantize_constant_block_has_no_nan():
  x = jnp.full((2, 8), 3.0, jnp.float32)
  packed, lo, hi = quant_lib.quantize_pallas(x)
  assert np.all(np.asarray(packed) == 0)
  np.testing.assert_array_equal(quant_lib.dequantize_pallas(packed, lo, hi),
                                x)


def test_quantize_tpu_kernels_in_tpu_interpreter(request):
  # The Mosaic TPU versions, run by the TPU interpreter on CPU.
  x = jnp.asarray(_rng(request).standard_normal((10, 256)), jnp.float32)
  params = pltpu.InterpretParams()
  got = quant_lib._quantize_tpu(x, 100, interpret=params)  # pylint: disable=protected-access
  ref = quant_lib.quantize_reference(x, 4, 100)
  for a, b in zip(got, ref):
    np.testing.assert_array_equal(a, b)
  out = quant_lib._dequantize_tpu(*ref, 256, interpret=params)  # pylint: disable=protected-access
  np.testing.assert_allclose(out, quant_lib.dequantize_reference(*ref, 4, 256),
                             rtol=1e-6, atol=1e-6)


# ------------------------------------------------------ fused error feedback

EF_CASES = [
    # (d, block, k, last_block_k)
    (1000, 128, 3, 2),      # not a multiple of the block
    (4096, 4096, 41, None),  # one default-size block
    (2, 2, 1, None),         # the smallest even block
    (300, 100, 5, 5),        # block not a power of two
]


@pytest.mark.parametrize("d,block,k,last_k", EF_CASES)
def test_error_feedback_matches_reference(request, d, block, k, last_k):
  rng = _rng(request)
  nb = -(-d // block)
  g = jnp.asarray(rng.standard_normal(d), jnp.bfloat16)
  err = jnp.asarray(rng.standard_normal((nb, block)) * 0.1, jnp.float32)
  codes, lo, hi = quant_lib.quantize_reference(err)
  kw = dict(block_size=block, k=k, last_block_k=last_k,
            index_dtype=jnp.int16, values_dtype=jnp.bfloat16)
  got = jax.jit(lambda *a: ef_lib.error_feedback_pallas(*a, **kw))(
      g, codes, lo, hi)
  ref = jax.jit(lambda *a: ef_lib.error_feedback_reference(*a, **kw))(
      g, codes, lo, hi)
  np.testing.assert_array_equal(_sorted(got[0]), _sorted(ref[0]))
  np.testing.assert_array_equal(_sorted(got[1]), _sorted(ref[1]))
  np.testing.assert_array_equal(got[2], ref[2])
  np.testing.assert_allclose(got[3], ref[3], rtol=1e-6)
  np.testing.assert_allclose(got[4], ref[4], rtol=1e-6)
  assert got[0].dtype == jnp.int16 and got[1].dtype == jnp.bfloat16


@pytest.mark.parametrize("pack", [False, True])
def test_error_feedback_several_blocks_per_program(request, pack):
  rng = _rng(request)
  g = jnp.asarray(rng.standard_normal(4 * 64 - 10), jnp.float32)
  codes = jnp.zeros((4, 32), jnp.uint8)
  zeros = jnp.zeros((4,), jnp.float32)
  kw = dict(block_size=64, k=3)
  dtypes = dict(index_dtype=jnp.int16, values_dtype=jnp.bfloat16)
  got = ef_lib.error_feedback_pallas(g, codes, zeros, zeros, rows=2,
                                     pack=pack, **dtypes, **kw)
  ref = ef_lib.error_feedback_reference(g, codes, zeros, zeros, **dtypes,
                                        **kw)
  np.testing.assert_array_equal(_sorted(got[0]), _sorted(ref[0]))
  np.testing.assert_array_equal(_sorted(got[1]), _sorted(ref[1]))
  np.testing.assert_array_equal(got[2], ref[2])
  # The values are the selected entries, in the same slots as the indices.
  a = np.pad(np.asarray(g, np.float32), (0, 10)).reshape(4, 64)
  want = np.take_along_axis(a, np.asarray(got[0], np.int64), axis=1)
  np.testing.assert_array_equal(np.asarray(got[1], np.float32),
                                np.asarray(jnp.asarray(want, jnp.bfloat16),
                                           np.float32) * (want != 0))


# ------------------------------------------------------------------ window


def _window(rng, m, nb, k, block):
  idx = np.stack([np.stack([rng.choice(min(block, 60), k, replace=False)
                            for _ in range(nb)]) for _ in range(m)])
  val = rng.standard_normal((m, nb, k))
  return jnp.asarray(idx, jnp.int16), jnp.asarray(val, jnp.bfloat16)


@pytest.mark.parametrize("variant", window_lib.WINDOW_VARIANTS)
@pytest.mark.parametrize("m,nb,k,block,t,programs", [
    (4, 5, 6, 64, 3, 2),      # persistent programs loop over blocks
    (2, 3, 5, 100, 1, None),  # block not a power of two, first step
])
def test_window_update_matches_reference(request, variant, m, nb, k, block,
                                         t, programs):
  idx, val = _window(_rng(request), m, nb, k, block)
  got = jax.jit(lambda i, v: window_lib.window_update_pallas(
      i, v, t, block_size=block, variant=variant, programs=programs))(idx, val)
  ref = jax.jit(lambda i, v: window_lib.window_update_reference(
      i, v, t, block_size=block))(idx, val)
  assert got.shape == (nb, block) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant,wd", [("elect", 0.0), ("elect", 0.1),
                                        ("atomic", 0.1)])
def test_window_param_update_matches_reference(request, variant, wd):
  rng = _rng(request)
  idx, val = _window(rng, 3, 4, 5, 64)
  p = jnp.asarray(rng.standard_normal(4 * 64 - 7), jnp.float32)
  kw = dict(block_size=64, learning_rate=0.01, weight_decay=wd)
  got = window_lib.window_param_update_pallas(p, idx, val, 2, variant=variant,
                                              programs=1, rows=2, **kw)
  ref = window_lib.window_param_update_reference(p, idx, val, 2, **kw)
  assert got.shape == p.shape and got.dtype == p.dtype
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_window_param_update_doctest_values():
  idx = jnp.array([[[0, 2]]], jnp.int16)
  val = jnp.array([[[1.0, -2.0]]], jnp.float32)
  p = jnp.ones((4,), jnp.float32)
  for impl in ("xla", "pallas"):
    out = window_lib.window_param_update(p, idx, val, 1, block_size=4,
                                         learning_rate=0.1,
                                         implementation=impl)
    np.testing.assert_allclose(out, [0.9, 1.0, 1.1, 1.0], rtol=1e-6)


# ---------------------------------------------------------------- dispatch


def test_implementation_is_checked_and_chosen_per_platform():
  # "auto" is not resolved from the host's back end: see
  # tests/test_pallas_tpu_kernels.py for the choice per lowering platform.
  assert _backend.check_implementation("pallas") == "pallas"
  with pytest.raises(ValueError, match="implementation"):
    _backend.check_implementation("cuda")


def test_dispatch_functions_agree(request):
  rng = _rng(request)
  x = jnp.asarray(rng.standard_normal((3, 50)), jnp.float32)
  a = topk_lib.block_topk(x, 4, implementation="xla")
  b = topk_lib.block_topk(x, 4, implementation="pallas")
  np.testing.assert_array_equal(_sorted(a[0]), _sorted(b[0]))
  qa = quant_lib.quantize(x, 4, implementation="xla")
  qb = quant_lib.quantize(x, 4, implementation="pallas")
  np.testing.assert_array_equal(qa[0], qb[0])
  # 8-bit codes have no kernel: the dispatch falls back to the reference.
  q8 = quant_lib.quantize(x, 8, implementation="pallas")
  np.testing.assert_array_equal(q8[0], quant_lib.quantize_reference(x, 8)[0])


def test_kernels_lower_for_gpu_and_tpu():
  """Compile-checks on CPU: Triton lowering (GPU) and Mosaic lowering (TPU)."""
  def lower(fn, platform, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))

  x = jax.ShapeDtypeStruct((4, 4096), jnp.float32)
  g = jax.ShapeDtypeStruct((4 * 4096,), jnp.bfloat16)
  c = jax.ShapeDtypeStruct((4, 2048), jnp.uint8)
  s = jax.ShapeDtypeStruct((4,), jnp.float32)
  i = jax.ShapeDtypeStruct((10, 4, 41), jnp.int16)
  v = jax.ShapeDtypeStruct((10, 4, 41), jnp.bfloat16)
  lower(lambda a: topk_lib.block_topk_pallas(a, 41, interpret=False), "cuda",
        x)
  lower(lambda *a: ef_lib.error_feedback_pallas(
      *a, block_size=4096, k=41, interpret=False), "cuda", g, c, s, s)
  lower(lambda a, b: window_lib.window_update_pallas(
      a, b, 3, block_size=4096, interpret=False), "cuda", i, v)
  lower(lambda a: quant_lib.quantize_pallas(a, interpret=False), "cuda", x)
  lower(lambda a: quant_lib._quantize_tpu(a, 4096), "tpu", x)  # pylint: disable=protected-access
  lower(lambda *a: quant_lib._dequantize_tpu(*a, 4096), "tpu", c, s, s)  # pylint: disable=protected-access


def test_window_default_variant_is_read_at_each_trace(monkeypatch):
  """DEFAULT_VARIANT reaches the kernel though its wrapper is jitted (the
  step benchmark's A/B rows change it between traces)."""
  i = jax.ShapeDtypeStruct((10, 4, 41), jnp.int16)
  v = jax.ShapeDtypeStruct((10, 4, 41), jnp.bfloat16)

  def lowered():
    return jax.jit(lambda a, b: window_lib.window_update(
        a, b, 3, block_size=4096, implementation="auto")).trace(i, v).lower(
            lowering_platforms=("cuda",)).as_text()

  for variant in window_lib.WINDOW_VARIANTS:
    monkeypatch.setattr(window_lib, "DEFAULT_VARIANT", variant)
    assert f"window_{variant}" in lowered()


# --------------------------------------------------------------- optimizer


@pytest.mark.parametrize("kwargs", [
    dict(density=0.05, topk_block_size=256),                      # fused
    dict(density=0.1, topk_block_size=64, quant_block_size=40),   # separate
    dict(density=0.05, topk_block_size=128, alpha=0.3),           # densify
], ids=["aligned_blocks", "misaligned_blocks", "alpha"])
def test_optimizer_pallas_matches_xla(request, kwargs):
  rng = _rng(request)
  shapes = {"w": (37, 53), "b": (300,), "odd": (7,), "one": ()}
  params = {n: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for n, s in shapes.items()}
  txs = {impl: mo.scale_by_microadam(window=3, values_dtype=jnp.float32,
                                     implementation=impl, **kwargs)
         for impl in ("xla", "pallas")}
  states = {impl: tx.init(params) for impl, tx in txs.items()}
  updates = {impl: jax.jit(tx.update) for impl, tx in txs.items()}
  for _ in range(4):
    grads = {n: jnp.asarray(rng.standard_normal(s), jnp.float32)
             for n, s in shapes.items()}
    out = {}
    for impl in txs:
      out[impl], states[impl] = updates[impl](grads, states[impl])
    for n in shapes:
      # Continuous random gradients: no ties, so the same entries.
      np.testing.assert_array_equal(
          _sorted(states["pallas"].window_indices[n]),
          _sorted(states["xla"].window_indices[n]))
      np.testing.assert_array_equal(states["pallas"].error_codes[n],
                                    states["xla"].error_codes[n])
      np.testing.assert_allclose(out["pallas"][n], out["xla"][n], rtol=1e-5,
                                 atol=1e-6)

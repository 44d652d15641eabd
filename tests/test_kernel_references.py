"""The kernels' XLA references against float64 NumPy, and the dispatch's choice.

The references (:mod:`pallas_kernels.topk`, ``quantize``, ``window``,
``dispatch.leaf_step_reference``) are MicroAdam's XLA path and what every
kernel is checked against: here each is held to an independent float64
NumPy computation of the published formulas on fresh random inputs with
awkward sizes. Then the dispatch: invalid choices are refused with the
parameter named, and a layout without kernels takes the reference.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from microadam_optax._layout import leaf_layout
from pallas_kernels import dispatch
from pallas_kernels import quantize as quant_lib
from pallas_kernels import topk as topk_lib
from pallas_kernels import window as window_lib


def _rng(request) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.mark.parametrize("nb,q,last_len", [(1, 2, None), (3, 100, 37),
                                           (5, 64, 1)])
def test_quantize_reference_matches_numpy(request, nb, q, last_len):
  rng = _rng(request)
  x = rng.standard_normal((nb, q)).astype(np.float32)
  packed, lo, hi = quant_lib.quantize_reference(jnp.asarray(x), 4, last_len)
  n = q if last_len is None else last_len
  valid = np.ones((nb, q), bool)
  valid[-1, n:] = False
  for b in range(nb):
    v = x[b][valid[b]].astype(np.float64)
    assert lo[b] == np.float32(v.min()) and hi[b] == np.float32(v.max())
  codes = np.asarray(quant_lib.unpack_codes(packed, 4, q)).astype(np.int64)
  scale = (np.asarray(hi, np.float64) - np.asarray(lo, np.float64)) / 15
  safe = np.where(scale > 0, scale, 1.0)[:, None]
  want = np.clip(np.floor((x - np.asarray(lo)[:, None]) / safe + 0.5), 0, 15)
  want = np.where(scale[:, None] > 0, want, 0)  # a constant block codes 0
  # float32 arithmetic may land on the other side of a .5 boundary.
  assert np.abs(np.where(valid, codes - want, 0)).max() <= 1
  assert np.mean(np.where(valid, codes != want, False)) < 0.01
  assert (codes[~valid] == 0).all()
  deq = np.asarray(quant_lib.dequantize_reference(packed, lo, hi, 4, q))
  err = np.abs(deq - x)[valid]
  assert err.max() <= scale.max() / 2 * (1 + 1e-5)


def test_quantize_constant_block_has_no_nan():
  x = jnp.full((2, 8), 3.25, jnp.float32)
  packed, lo, hi = quant_lib.quantize_reference(x)
  out = quant_lib.dequantize_reference(packed, lo, hi)
  assert not np.isnan(np.asarray(out)).any()
  np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("nb,block,k,last_len,last_k", [
    (1, 1, 1, None, None), (3, 100, 7, 37, 3), (4, 7, 2, 5, 1),
    (2, 64, 64, 64, 0)])
def test_topk_reference_matches_numpy(request, nb, block, k, last_len,
                                      last_k):
  rng = _rng(request)
  x = rng.standard_normal((nb, block)).astype(np.float32)
  idx, val = topk_lib.block_topk_reference(
      jnp.asarray(x), k, last_block_length=last_len, last_block_k=last_k)
  idx, val = np.asarray(idx), np.asarray(val)
  for b in range(nb):
    n = block if b < nb - 1 or last_len is None else last_len
    kb = k if b < nb - 1 or last_k is None else last_k
    want = np.sort(np.abs(x[b, :n].astype(np.float64)))[::-1][:kb]
    got = np.sort(np.abs(val[b, :kb].astype(np.float64)))[::-1]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(x[b, idx[b, :kb]], val[b, :kb])
    assert (idx[b, kb:] == 0).all() and (val[b, kb:] == 0).all()


@pytest.mark.parametrize("m,nb,k,block,t", [(4, 5, 6, 64, 3), (2, 3, 5, 100, 1),
                                            (3, 2, 4, 30, 7)])
def test_window_reference_matches_numpy(request, m, nb, k, block, t):
  rng = _rng(request)
  idx = rng.integers(0, block, (m, nb, k))
  idx[..., 0] = block - 1  # a position repeated across rows
  val = rng.standard_normal((m, nb, k)).astype(np.float32)
  b1, b2, eps = 0.9, 0.999, 1e-8
  got = np.asarray(window_lib.window_update_reference(
      jnp.asarray(idx, jnp.int16), jnp.asarray(val), jnp.int32(t),
      block_size=block, b1=b1, b2=b2, eps=eps))
  want = np.zeros((nb, block))
  for b in range(nb):
    mom1 = np.zeros(block)
    mom2 = np.zeros(block)
    for r in range(m):
      age = (t - 1 - r) % m
      if age >= t:
        continue
      for j in range(k):
        i, v = idx[r, b, j], float(val[r, b, j])
        mom1[i] += (1 - b1) * b1**age / (1 - b1**t) * v
        mom2[i] += (1 - b2) * b2**age / (1 - b2**t) * v * v
    want[b] = mom1 / (np.sqrt(mom2) + eps)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_kernel_config_is_checked():
  assert dispatch.KernelConfig(gpu_num_warps=8).gpu_num_warps == 8
  for bad in (3, 0, 64, True, 4.0):
    with pytest.raises(ValueError, match="gpu_num_warps"):
      dispatch.KernelConfig(gpu_num_warps=bad)
  assert dispatch.KernelConfig(gpu_sub_per_thread=4).gpu_sub_per_thread == 4
  for bad in (3, 0, 128, True, 8.0):
    with pytest.raises(ValueError, match="gpu_sub_per_thread"):
      dispatch.KernelConfig(gpu_sub_per_thread=bad)
  with pytest.raises(ValueError, match="tpu_interpret"):
    dispatch.KernelConfig(tpu_interpret="yes")
  with pytest.raises(ValueError, match="implementation"):
    dispatch.check_implementation("cuda")


def test_which_layouts_have_kernels():
  kw = dict(density=0.01, error_bits=4)
  aligned = leaf_layout(10000, topk_block_size=4096, quant_block_size=4096,
                        **kw)
  apart = leaf_layout(10000, topk_block_size=4096, quant_block_size=1000,
                      **kw)
  assert dispatch.has_kernels(aligned, 4)
  assert not dispatch.has_kernels(aligned, 8)
  assert not dispatch.has_kernels(apart, 4)


def test_leaf_step_reference_is_algorithm_one(request):
  """Two steps of the reference against a float64 replay of Algorithm 1."""
  rng = _rng(request)
  d, block, density, m = 1000, 256, 0.05, 3
  lay = leaf_layout(d, topk_block_size=block, quant_block_size=block,
                    density=density, error_bits=4)
  nb, k = lay.num_topk_blocks, lay.k
  state = (jnp.zeros((m, nb, k), lay.index_dtype),
           jnp.zeros((m, nb, k), jnp.float32),
           jnp.zeros((nb, lay.code_bytes), jnp.uint8),
           jnp.zeros((nb,), jnp.float32), jnp.zeros((nb,), jnp.float32))
  err = np.zeros(d)
  rows = []
  for t in (1, 2):
    g = rng.standard_normal(d).astype(np.float32)
    u, *state = dispatch.leaf_step_reference(
        jnp.asarray(g), *state, jnp.int32(t), layout=lay, b1=0.9, b2=0.999,
        eps=1e-8, bits=4, out_dtype=jnp.float32)
    a = g.astype(np.float64) + err
    sel = np.zeros(d, bool)
    for b in range(nb):
      lo_i, hi_i = b * block, min(d, (b + 1) * block)
      kb = math.ceil(round((hi_i - lo_i) * density, 9))
      top = np.argsort(-np.abs(a[lo_i:hi_i]), kind="stable")[:kb]
      sel[lo_i + top] = True
    rows.append((np.nonzero(sel)[0], a[sel]))
    rest = np.where(sel, 0.0, a)
    # The error as the state now holds it (4-bit), for the next step.
    err = np.asarray(dispatch.dequantize_leaf(state[2], state[3], state[4],
                                              lay, 4), np.float64)
    assert np.abs(err - rest).max() <= (rest.max() - rest.min()) / 30 + 1e-6
    mom1 = np.zeros(d)
    mom2 = np.zeros(d)
    for s, (ix, vx) in enumerate(rows, start=1):
      age = t - s
      mom1[ix] += 0.1 * 0.9**age / (1 - 0.9**t) * vx
      mom2[ix] += 0.001 * 0.999**age / (1 - 0.999**t) * vx * vx
    want = mom1 / (np.sqrt(mom2) + 1e-8)
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-4, atol=1e-6)

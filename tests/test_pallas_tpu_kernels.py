"""The Mosaic TPU kernels in the TPU interpreter, and the per-platform choice.

No TPU is reachable from CI: every Mosaic kernel runs here in the TPU
interpreter (``interpret=pltpu.InterpretParams()``) against its ``jnp``
reference on awkward sizes, and MicroAdam's update is lowered from this CPU
host for ``"tpu"`` and ``"cuda"`` to check that one traced function gives the
Mosaic and the Triton kernels, with no XLA top-k or sort. Sizes stay small:
the interpreter is slow.
"""

from __future__ import annotations

import re
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

TPU = pltpu.InterpretParams()

#: XLA's sort and top-k as they appear in lowered StableHLO.
_XLA_TOPK = re.compile(r"stablehlo\.sort|chlo\.top_k|ApproxTopK|@TopK|mhlo\.topk")


def _rng(request) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _sorted(x) -> np.ndarray:
  return np.sort(np.asarray(x, np.float64), axis=-1)


# --------------------------------------------------------------------- Top-K

TOPK_CASES = [
    # (num_blocks, B, k, last_block_length, last_block_k)
    (1, 1, 1, None, None),        # a single element
    (3, 100, 7, 37, 3),           # B not a multiple of 128, short last block
    (4, 7, 2, 5, 1),              # odd B
    (9, 130, 5, 1, 1),            # rows past one tile of 8; last block of 1
    (2, 256, 41, None, None),     # two lane tiles per row
    (2, 64, 64, 64, 0),           # k == B; a last block that keeps nothing
]


@pytest.mark.parametrize("nb,block,k,last_len,last_k", TOPK_CASES)
def test_topk_tpu_matches_reference_and_numpy(request, nb, block, k, last_len,
                                              last_k):
  x = np.asarray(_rng(request).standard_normal((nb, block)), np.float32)
  kw = dict(last_block_length=last_len, last_block_k=last_k)
  idx, val = topk_lib.block_topk_pallas(jnp.asarray(x), k,
                                        index_dtype=jnp.int16, interpret=TPU,
                                        **kw)
  ref_idx, ref_val = topk_lib.block_topk_reference(jnp.asarray(x), k, **kw)
  assert idx.shape == (nb, k) and idx.dtype == jnp.int16
  assert val.shape == (nb, k) and val.dtype == jnp.float32
  np.testing.assert_array_equal(_sorted(idx), _sorted(ref_idx))
  np.testing.assert_array_equal(_sorted(val), _sorted(ref_val))
  # Exact: the multiset of selected magnitudes is numpy's.
  lens = [block] * (nb - 1) + [block if last_len is None else last_len]
  ks = [k] * (nb - 1) + [k if last_k is None else last_k]
  for r in range(nb):
    want = np.sort(np.abs(x[r, :lens[r]]))[::-1][:ks[r]]
    got = np.sort(np.abs(np.asarray(val)[r, :ks[r]]))[::-1]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        x[r, np.asarray(idx, np.int64)[r, :ks[r]]], np.asarray(val)[r, :ks[r]])
    assert np.all(np.asarray(idx)[r, ks[r]:] == 0)
    assert np.all(np.asarray(val)[r, ks[r]:] == 0)


def test_topk_tpu_ties_and_special_values(request):
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
  idx, val = topk_lib.block_topk_pallas(x, 9, interpret=TPU)
  _, ref_val = topk_lib.block_topk_reference(x, 9)
  np.testing.assert_array_equal(_sorted(np.abs(val)), _sorted(np.abs(ref_val)))
  for row in np.asarray(idx):
    assert len(set(row.tolist())) == 9  # exactly k distinct entries
  # Ties are broken by position, and slots are in ascending index order.
  np.testing.assert_array_equal(np.asarray(idx)[1], np.arange(9))
  assert np.all(np.diff(np.asarray(idx), axis=1) > 0)


# ------------------------------------------------------ quantize / pack


@pytest.mark.parametrize("nb,q,last_len", [(1, 2, None), (3, 100, 37),
                                           (9, 256, 1)])
def test_quantize_tpu_matches_reference(request, nb, q, last_len):
  x = jnp.asarray(_rng(request).standard_normal((nb, q)), jnp.float32)
  got = quant_lib.quantize_pallas(x, 4, last_len, interpret=TPU)
  ref = quant_lib.quantize_reference(x, 4, last_len)
  for a, b in zip(got, ref):
    np.testing.assert_array_equal(a, b)
  out = quant_lib.dequantize_pallas(*ref, 4, q, interpret=TPU)
  np.testing.assert_allclose(out, quant_lib.dequantize_reference(*ref, 4, q),
                             rtol=1e-6, atol=1e-6)


# ------------------------------------------------------ fused error feedback

EF_CASES = [
    # (d, block, k, last_block_k)
    (1000, 128, 3, 2),       # not a multiple of the block
    (1, 2, 1, None),         # one element
    (2, 2, 1, None),         # the smallest even block
    (300, 100, 5, 5),        # block not a multiple of 128
    (2001, 300, 7, None),    # 7 blocks, a short last one
    (9 * 64 - 3, 64, 4, 1),  # rows past one tile of 8
]


@pytest.mark.parametrize("d,block,k,last_k", EF_CASES)
def test_error_feedback_tpu_matches_reference(request, d, block, k, last_k):
  rng = _rng(request)
  nb = -(-d // block)
  g = jnp.asarray(rng.standard_normal(d), jnp.bfloat16)
  err = jnp.asarray(rng.standard_normal((nb, block)) * 0.1, jnp.float32)
  codes, lo, hi = quant_lib.quantize_reference(err)
  kw = dict(block_size=block, k=k, last_block_k=last_k,
            index_dtype=jnp.int16, values_dtype=jnp.bfloat16)
  got = jax.jit(lambda *a: ef_lib.error_feedback_pallas(
      *a, interpret=TPU, **kw))(g, codes, lo, hi)
  ref = jax.jit(lambda *a: ef_lib.error_feedback_reference(*a, **kw))(
      g, codes, lo, hi)
  np.testing.assert_array_equal(_sorted(got[0]), _sorted(ref[0]))
  np.testing.assert_array_equal(_sorted(got[1]), _sorted(ref[1]))
  np.testing.assert_array_equal(got[2], ref[2])
  np.testing.assert_array_equal(got[3], ref[3])
  np.testing.assert_array_equal(got[4], ref[4])
  assert got[0].dtype == jnp.int16 and got[1].dtype == jnp.bfloat16
  assert got[2].dtype == jnp.uint8 and got[2].shape == ref[2].shape


# ------------------------------------------------------------------ window


@pytest.mark.parametrize("m,nb,k,block,t", [
    (4, 5, 6, 64, 3),     # 5 blocks: one block a program
    (2, 3, 5, 100, 1),    # block not a multiple of 128, first step
    (3, 8, 4, 300, 7),    # 8 blocks a program; the window has wrapped
    (1, 1, 1, 1, 1),      # one element
])
def test_window_update_tpu_matches_reference(request, m, nb, k, block, t):
  rng = _rng(request)
  idx = np.stack([np.stack([rng.choice(min(block, 60), k, replace=False)
                            for _ in range(nb)]) for _ in range(m)])
  # Positions repeated across rows, and the block's last position.
  idx = np.where(rng.uniform(size=idx.shape) < 0.3, block - 1, idx)
  idx = jnp.asarray(idx, jnp.int16)
  val = jnp.asarray(rng.standard_normal((m, nb, k)), jnp.bfloat16)
  got = jax.jit(lambda i, v: window_lib.window_update_pallas(
      i, v, t, block_size=block, interpret=TPU))(idx, val)
  ref = window_lib.window_update_reference(idx, val, t, block_size=block)
  assert got.shape == (nb, block) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- dispatch


def test_per_platform_choice():
  def ref(x):
    return x + 1.0

  def triton(x, interpret):
    return x + (2.0 if interpret else 20.0)

  def mosaic(x, interpret):
    return x + (3.0 if interpret is not None else 30.0)

  x = jnp.zeros(())

  def run(impl, **kw):
    return float(_backend.per_platform(x, implementation=impl, reference=ref,
                                       triton=triton, mosaic=mosaic, **kw))

  assert run("xla") == 1.0 and run("auto") == 1.0  # CPU: the reference
  assert run("pallas") == 2.0                       # CPU: interpreted Triton
  assert run("pallas", interpret=True) == 2.0
  assert run("pallas", interpret=TPU) == 3.0
  with pytest.raises(ValueError, match="implementation"):
    run("cuda")


def _lowered(tx, params, platform: str) -> str:
  state = tx.init(params)
  return jax.jit(tx.update).trace(params, state).lower(
      lowering_platforms=(platform,)).as_text()


_LOWERING_CASES = [
    dict(density=0.05, topk_block_size=256),                     # fused
    dict(density=0.1, topk_block_size=64, quant_block_size=40),  # separate
]


@pytest.mark.parametrize("implementation", ["auto", "pallas"])
@pytest.mark.parametrize("kwargs", _LOWERING_CASES, ids=["fused", "separate"])
def test_update_lowers_to_mosaic_for_tpu_and_triton_for_cuda(implementation,
                                                             kwargs):
  params = {"w": jnp.zeros((37, 53)), "b": jnp.zeros((300,))}
  tx = mo.scale_by_microadam(window=3, implementation=implementation,
                             **kwargs)
  tpu = _lowered(tx, params, "tpu")
  assert "tpu_custom_call" in tpu
  assert "triton" not in tpu
  assert not _XLA_TOPK.search(tpu)
  for name in ("window_update_tpu",
               "error_feedback_tpu" if "quant_block_size" not in kwargs
               else "block_topk_tpu"):
    assert name in tpu, name
  cuda = _lowered(tx, params, "cuda")
  assert "__gpu$xla.gpu.triton" in cuda
  assert "tpu_custom_call" not in cuda
  assert not _XLA_TOPK.search(cuda)
  cpu = _lowered(tx, params, "cpu")
  assert "tpu_custom_call" not in cpu and "triton" not in cpu
  if implementation == "auto":
    assert _XLA_TOPK.search(cpu)  # CPU keeps the XLA path


def test_xla_implementation_traces_no_kernel():
  params = {"w": jnp.zeros((37, 53))}
  tx = mo.scale_by_microadam(window=3, density=0.05, topk_block_size=256,
                             implementation="xla")
  for platform in ("tpu", "cuda"):
    text = _lowered(tx, params, platform)
    assert "tpu_custom_call" not in text and "triton" not in text
    assert _XLA_TOPK.search(text)
  # Only the XLA path lowers for several platforms at once (see
  # pallas_kernels._backend).
  state = tx.init(params)
  jax.jit(tx.update).trace(params, state).lower(
      lowering_platforms=("cpu", "tpu", "cuda"))


# --------------------------------------------------------------- optimizer


@pytest.mark.parametrize("kwargs", _LOWERING_CASES + [
    dict(density=0.05, topk_block_size=128, alpha=0.3)],
    ids=["fused", "separate", "alpha"])
def test_optimizer_in_tpu_interpreter_matches_xla(request, monkeypatch,
                                                  kwargs):
  monkeypatch.setenv("PALLAS_KERNELS_INTERPRETER", "mosaic")
  rng = _rng(request)
  shapes = {"w": (37, 53), "odd": (7,)}
  params = {n: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for n, s in shapes.items()}
  txs = {impl: mo.scale_by_microadam(window=3, values_dtype=jnp.float32,
                                     implementation=impl, **kwargs)
         for impl in ("xla", "pallas")}
  states = {impl: tx.init(params) for impl, tx in txs.items()}
  # Not under jax.jit: microadam.py wraps a traced leaf's update in
  # custom_partitioning, whose lowering drops the ordered effects of the TPU
  # interpreter's callbacks (KeyError: OrderedIOEffect). Called eagerly,
  # each kernel is still one interpreted pallas_call.
  updates = {impl: tx.update for impl, tx in txs.items()}
  for _ in range(3):
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


def test_auto_on_cpu_is_the_xla_path(request):
  rng = _rng(request)
  params = {"w": jnp.asarray(rng.standard_normal((37, 53)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((300,)), jnp.float32)}
  txs = {impl: mo.scale_by_microadam(window=3, density=0.05,
                                     topk_block_size=256,
                                     implementation=impl)
         for impl in ("xla", "auto")}
  states = {impl: tx.init(params) for impl, tx in txs.items()}
  updates = {impl: jax.jit(tx.update) for impl, tx in txs.items()}
  for _ in range(3):
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    out = {}
    for impl in txs:
      out[impl], states[impl] = updates[impl](grads, states[impl])
    for a, b in zip(jax.tree.leaves((out["auto"], states["auto"])),
                    jax.tree.leaves((out["xla"], states["xla"]))):
      np.testing.assert_array_equal(a, b)

"""The Mosaic TPU kernels in the TPU interpreter, and the per-platform choice.

No TPU is reachable from CI: every Mosaic kernel runs here in the TPU
interpreter (``interpret=pltpu.InterpretParams()``) and in Pallas' generic
interpreter (``interpret=True``, what ``implementation="pallas"`` runs on
CPU) against its ``jnp`` reference on awkward sizes, and MicroAdam's update
is lowered from this CPU host for ``"tpu"`` to check that one traced
function gives the Mosaic kernels, with no XLA top-k or sort. Sizes stay
small: the interpreters are slow.
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
from pallas_kernels import error_feedback as ef_lib
from pallas_kernels import quantize as quant_lib
from pallas_kernels import window as window_lib
from pallas_kernels.tpu import error_feedback as tpu_ef
from pallas_kernels.tpu import window as tpu_window
from trajectories import assert_same_steps

TPU = pltpu.InterpretParams()

#: XLA's sort and top-k as they appear in lowered StableHLO.
_XLA_TOPK = re.compile(r"stablehlo\.sort|chlo\.top_k|ApproxTopK|@TopK|mhlo\.topk")


def _rng(request) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _sorted(x) -> np.ndarray:
  return np.sort(np.asarray(x, np.float64), axis=-1)


# ----------------------------------------------------------- error feedback

EF_CASES = [
    # (d, block, k, last_block_k)
    (1000, 128, 3, 2),       # not a multiple of the block
    (1, 2, 1, None),         # one element
    (2, 2, 1, None),         # the smallest even block
    (300, 100, 5, 5),        # block not a multiple of 128
    (2001, 300, 7, None),    # 7 blocks, a short last one
    (9 * 64 - 3, 64, 4, 1),  # rows past one tile of 8
]


@pytest.mark.parametrize("interpret", [TPU, True], ids=["tpu", "generic"])
@pytest.mark.parametrize("d,block,k,last_k", EF_CASES)
def test_error_feedback_tpu_matches_reference(request, d, block, k, last_k,
                                              interpret):
  rng = _rng(request)
  nb = -(-d // block)
  g = jnp.asarray(rng.standard_normal(d), jnp.bfloat16)
  err = jnp.asarray(rng.standard_normal((nb, block)) * 0.1, jnp.float32)
  codes, lo, hi = quant_lib.quantize_reference(err)
  kw = dict(block_size=block, k=k, last_block_k=last_k,
            index_dtype=jnp.int16, values_dtype=jnp.bfloat16)
  got = jax.jit(lambda *a: tpu_ef.error_feedback_mosaic(
      *a, interpret=interpret, **kw))(g, codes, lo, hi)
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
@pytest.mark.parametrize("interpret", [TPU, True], ids=["tpu", "generic"])
def test_window_update_tpu_matches_reference(request, m, nb, k, block, t,
                                             interpret):
  rng = _rng(request)
  idx = np.stack([np.stack([rng.choice(min(block, 60), k, replace=False)
                            for _ in range(nb)]) for _ in range(m)])
  # Positions repeated across rows, and the block's last position.
  idx = np.where(rng.uniform(size=idx.shape) < 0.3, block - 1, idx)
  idx = jnp.asarray(idx, jnp.int16)
  val = jnp.asarray(rng.standard_normal((m, nb, k)), jnp.bfloat16)
  got = jax.jit(lambda i, v: tpu_window.window_update_mosaic(
      i, v, jnp.int32(t), block_size=block, interpret=interpret))(idx, val)
  ref = window_lib.window_update_reference(idx, val, t, block_size=block)
  assert got.shape == (nb, block) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- dispatch


def _lowered(tx, params, platform: str) -> str:
  state = tx.init(params)
  return jax.jit(tx.update).trace(params, state).lower(
      lowering_platforms=(platform,)).as_text()


_LOWERING_CASES = [
    dict(density=0.05, topk_block_size=256),                     # kernels
    dict(density=0.1, topk_block_size=64, quant_block_size=40),  # XLA path
]


@pytest.mark.parametrize("implementation", ["auto", "pallas"])
def test_update_lowers_to_mosaic_for_tpu(implementation):
  params = {"w": jnp.zeros((37, 53)), "b": jnp.zeros((300,))}
  tx = mo.scale_by_microadam(window=3, implementation=implementation,
                             **_LOWERING_CASES[0])
  tpu = _lowered(tx, params, "tpu")
  assert "tpu_custom_call" in tpu
  assert "triton" not in tpu
  assert not _XLA_TOPK.search(tpu)
  for name in ("window_update_tpu", "error_feedback_tpu"):
    assert name in tpu, name
  cpu = _lowered(tx, params, "cpu")
  assert "tpu_custom_call" not in cpu and "triton" not in cpu
  if implementation == "auto":
    assert _XLA_TOPK.search(cpu)  # CPU keeps the XLA path


def test_layouts_without_kernels_take_the_xla_path_on_tpu():
  # Top-K and quantization blocks that differ: no kernel, on any platform.
  params = {"w": jnp.zeros((37, 53))}
  tx = mo.scale_by_microadam(window=3, implementation="pallas",
                             **_LOWERING_CASES[1])
  tpu = _lowered(tx, params, "tpu")
  assert "tpu_custom_call" not in tpu and _XLA_TOPK.search(tpu)


def test_xla_implementation_traces_no_kernel():
  params = {"w": jnp.zeros((37, 53))}
  tx = mo.scale_by_microadam(window=3, density=0.05, topk_block_size=256,
                             implementation="xla")
  for platform in ("tpu", "cuda"):
    text = _lowered(tx, params, platform)
    assert "tpu_custom_call" not in text and "triton" not in text
    assert _XLA_TOPK.search(text)
  # Only the XLA path lowers for several platforms at once (a pallas_call in
  # any branch of platform_dependent is lowered for every platform).
  state = tx.init(params)
  jax.jit(tx.update).trace(params, state).lower(
      lowering_platforms=("cpu", "tpu", "cuda"))


# --------------------------------------------------------------- optimizer


@pytest.mark.parametrize("kwargs", _LOWERING_CASES + [
    dict(density=0.05, topk_block_size=128, alpha=0.3)],
    ids=["kernels", "xla_layout", "alpha"])
def test_optimizer_with_interpreted_kernels_matches_xla(request, kwargs):
  rng = _rng(request)
  shapes = {"w": (37, 53), "odd": (7,)}
  params = {n: jnp.asarray(rng.standard_normal(s), jnp.float32)
            for n, s in shapes.items()}
  txs = {impl: mo.scale_by_microadam(window=3, values_dtype=jnp.float32,
                                     implementation=impl, **kwargs)
         for impl in ("xla", "pallas")}
  states = {impl: tx.init(params) for impl, tx in txs.items()}
  updates = {impl: jax.jit(tx.update) for impl, tx in txs.items()}
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
  assert_same_steps(txs, params, rng)

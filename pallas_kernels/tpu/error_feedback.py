"""MicroAdam's error-feedback pass as one Mosaic TPU kernel.

:func:`error_feedback_mosaic` computes
:func:`pallas_kernels.error_feedback.error_feedback_reference` (dequantize
and add, block Top-K, zero, re-quantize) in one pass over each block. It was
lowered for TPU and run in the TPU interpreter
(``interpret=pltpu.InterpretParams()``) and in Pallas' generic interpreter on
CPU, never compiled or run on a TPU.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import error_feedback as ef_lib
from pallas_kernels.tpu import _onchip as _onchip_tpu


def error_feedback_tpu_kernel(g_ref, c_ref, lo_ref, hi_ref, idx_ref, val_ref,
                              c_out, lo_out, hi_out, *, num_blocks: int,
                              block_size: int, k: int, last_len: int,
                              last_k: int) -> None:
  """One error-feedback step of ``ROWS`` blocks held as even/odd planes.

  ``g_ref`` ``(2, ROWS, W)``: the gradient's even and odd entries (element
  ``2 j + p`` at column ``j`` of plane ``p``); ``c_ref`` ``(ROWS, W)`` int32:
  byte ``j`` of the packed codes (element ``2 j`` in the low nibble);
  ``lo_ref``/``hi_ref`` ``(ROWS, 128)``: each row's min/max in every lane.
  Writes the Top-K (slot order), the new codes and min/max, same layouts.
  """
  rows, width = c_ref.shape
  b = _onchip_tpu.block_rows(pl.program_id(0), rows)
  length = _onchip_tpu.per_block(b, num_blocks, block_size, last_len)
  k_b = _onchip_tpu.per_block(b, num_blocks, k, last_k).astype(jnp.float32)
  col = jax.lax.broadcasted_iota(jnp.int32, (rows, width), 1)
  pos = [2 * col, 2 * col + 1]
  valid = [p < length for p in pos]
  # a = g + Q^{-1}(e): dequantize as quantize.dequantize_reference does.
  c = c_ref[...]
  lo = _onchip_tpu.lane_broadcast_value(lo_ref)
  scale = (_onchip_tpu.lane_broadcast_value(hi_ref) - lo) / 15.0
  err = [(c & 15).astype(jnp.float32) * scale + lo,
         (c >> 4).astype(jnp.float32) * scale + lo]
  a = [jnp.where(v, e + g_ref[p].astype(jnp.float32), 0.0)
       for p, (v, e) in enumerate(zip(valid, err))]
  mags = [_onchip_tpu.magnitude_bits(x, v) for x, v in zip(a, valid)]
  sel = _onchip_tpu.select_topk(mags, k_b)
  idx, val = _onchip_tpu.compact(sel, [p.astype(jnp.float32) for p in pos],
                                 a, k, idx_ref.shape[1])
  idx_ref[...] = idx.astype(jnp.int32)
  val_ref[...] = val
  # The rest, re-quantized with its own min/max (quantize_codes' arithmetic).
  rest = [jnp.where(s, 0.0, x) for s, x in zip(sel, a)]
  new_lo = jnp.minimum(*[jnp.min(jnp.where(v, x, jnp.inf), axis=1,
                                 keepdims=True) for v, x in zip(valid, rest)])
  new_hi = jnp.maximum(*[jnp.max(jnp.where(v, x, -jnp.inf), axis=1,
                                 keepdims=True) for v, x in zip(valid, rest)])
  step = (new_hi - new_lo) / 15.0
  safe = jnp.where(step > 0, step, 1.0)

  def code(x, v):
    q = jnp.clip(jnp.floor((x - new_lo) / safe + 0.5), 0.0, 15.0)
    return jnp.where(v & (step > 0), q, 0.0).astype(jnp.int32)

  c_out[...] = code(rest[0], valid[0]) | (code(rest[1], valid[1]) << 4)
  lo_out[...] = jnp.broadcast_to(new_lo, lo_out.shape)
  hi_out[...] = jnp.broadcast_to(new_hi, hi_out.shape)


@functools.partial(jax.jit, static_argnames=(
    "block_size", "k", "last_block_k", "index_dtype", "values_dtype",
    "interpret"))
def error_feedback_mosaic(grad: jax.Array, codes: jax.Array,
                           block_min: jax.Array, block_max: jax.Array, *,
                           block_size: int, k: int,
                           last_block_k: int | None = None,
                           index_dtype: Any = jnp.int32,
                           values_dtype: Any = jnp.float32, interpret=None):
  """:func:`error_feedback_reference` as a Mosaic TPU kernel, 8 blocks a program.

  The wrapper splits the gradient into even and odd planes (one XLA
  transpose, which also pads to whole ``(8, 128)`` tiles) and widens the
  codes to int32, so that every kernel array is 2-D and 32-bit; the kernel
  then selects the Top-K with :func:`pallas_kernels.tpu._onchip.select_topk`
  (bisection over bit patterns, prefix counts by matmul, masked reductions
  per slot) and re-quantizes the rest. ``interpret``: ``None``
  (compile with Mosaic), ``True`` (Pallas' generic interpreter) or a
  :class:`pltpu.InterpretParams` (the TPU interpreter).
  """
  num_blocks, last_len, last_k = ef_lib.check_args(grad, codes, block_size, k,
                                        last_block_k)
  d = grad.size
  half = block_size // 2
  rows = _onchip_tpu.ROWS
  nbp = _onchip_tpu.round_up(num_blocks, rows)
  width = _onchip_tpu.round_up(half, _onchip_tpu.LANES)
  slots = _onchip_tpu.round_up(k, _onchip_tpu.LANES)
  g = jnp.pad(grad.reshape(-1).astype(jnp.float32),
              (0, num_blocks * block_size - d))
  planes = g.reshape(num_blocks, half, 2).transpose(2, 0, 1)
  pad = ((0, nbp - num_blocks), (0, width - half))
  planes = jnp.pad(planes, ((0, 0),) + pad)
  c = jnp.pad(codes.astype(jnp.int32), pad)

  def lanes(v):
    v = jnp.broadcast_to(v.astype(jnp.float32)[:, None],
                         (num_blocks, _onchip_tpu.LANES))
    return jnp.pad(v, ((0, nbp - num_blocks), (0, 0)))

  kernel = functools.partial(error_feedback_tpu_kernel, num_blocks=num_blocks,
                             block_size=block_size, k=k, last_len=last_len,
                             last_k=last_k)
  row = pl.BlockSpec((rows, width), lambda i: (i, 0))
  scalar = pl.BlockSpec((rows, _onchip_tpu.LANES), lambda i: (i, 0))
  topk = pl.BlockSpec((rows, slots), lambda i: (i, 0))
  scalar_shape = jax.ShapeDtypeStruct((nbp, _onchip_tpu.LANES), jnp.float32)
  idx, val, new_codes, lo, hi = pl.pallas_call(
      kernel,
      grid=(nbp // rows,),
      in_specs=[pl.BlockSpec((2, rows, width), lambda i: (0, i, 0)), row,
                scalar, scalar],
      out_specs=[topk, topk, row, scalar, scalar],
      out_shape=[jax.ShapeDtypeStruct((nbp, slots), jnp.int32),
                 jax.ShapeDtypeStruct((nbp, slots), jnp.float32),
                 jax.ShapeDtypeStruct((nbp, width), jnp.int32),
                 scalar_shape, scalar_shape],
      input_output_aliases={1: 2, 2: 3, 3: 4},
      compiler_params=_onchip_tpu.tpu_params(),
      interpret=interpret or False,
      name="error_feedback_tpu",
  )(planes, c, lanes(block_min), lanes(block_max))
  return (idx[:num_blocks, :k].astype(index_dtype),
          val[:num_blocks, :k].astype(values_dtype),
          new_codes[:num_blocks, :half].astype(jnp.uint8),
          lo[:num_blocks, 0], hi[:num_blocks, 0])


__all__ = ["error_feedback_mosaic", "error_feedback_tpu_kernel"]

"""MicroAdam's error-feedback pass, fused into one kernel.

For every block of ``B`` elements of a flattened gradient ``g`` (Top-K blocks
and quantization blocks coincide):

.. math::

  a = g + Q^{-1}(e), \\quad (I, V) = \\mathrm{TopK}(|a|), \\quad a[I] = 0,
  \\quad \\delta', \\Delta' = \\min a, \\max a, \\quad e' = Q(a; \\delta', \\Delta').

The kernel reads the gradient, the packed 4-bit codes and the block's
min/max once and writes the new codes, min/max and the block's Top-K row:
one pass over the tensor instead of the five of the reference (dequantize,
add, Top-K, zero, quantize).

This module holds the pure-``jnp`` reference (:func:`error_feedback_reference`,
composed of the references of :mod:`~pallas_kernels.topk` and
:mod:`~pallas_kernels.quantize`), the kernels (Triton for GPU, Mosaic for
TPU, chosen per lowering platform by :func:`error_feedback_pallas`) and the
dispatch (:func:`error_feedback`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _backend
from pallas_kernels import _onchip
from pallas_kernels import _onchip_tpu
from pallas_kernels import quantize as quant_lib
from pallas_kernels import topk as topk_lib


def _check(grad: jax.Array, codes: jax.Array, block_size: int, k: int,
           last_block_k: int | None) -> tuple[int, int, int]:
  d = grad.size
  num_blocks = -(-max(d, 1) // block_size)
  if block_size % 2:
    raise ValueError(f"block_size must be even, got {block_size}.")
  if codes.shape != (num_blocks, block_size // 2):
    raise ValueError(
        f"codes must have shape {(num_blocks, block_size // 2)} (4-bit codes "
        f"of {num_blocks} blocks of {block_size}), got {codes.shape}.")
  last_len = max(d, 1) - (num_blocks - 1) * block_size
  last_k = k if last_block_k is None else int(last_block_k)
  if not 1 <= k <= block_size or not 0 <= last_k <= min(k, last_len):
    raise ValueError(
        f"need 1 <= k <= {block_size} and 0 <= last_block_k <= "
        f"{min(k, last_len)}, got k={k}, last_block_k={last_k}.")
  return num_blocks, last_len, last_k


def error_feedback_reference(grad: jax.Array, codes: jax.Array,
                             block_min: jax.Array, block_max: jax.Array, *,
                             block_size: int, k: int,
                             last_block_k: int | None = None,
                             index_dtype: Any = jnp.int32,
                             values_dtype: Any = jnp.float32):
  """One error-feedback step of a flattened gradient (pure ``jnp``).

  Args:
    grad: the gradient, any shape, ``d`` elements (flattened row-major).
    codes: packed 4-bit error codes ``(num_blocks, block_size // 2)`` uint8.
    block_min: per-block minimum of the error ``(num_blocks,)`` float32.
    block_max: per-block maximum of the error ``(num_blocks,)`` float32.
    block_size: ``B``, elements per block (Top-K and quantization), even.
    k: entries selected per full block.
    last_block_k: entries selected in the last block (default ``k``).
    index_dtype: dtype of the returned indices.
    values_dtype: dtype of the returned values.

  Returns:
    ``(indices (num_blocks, k), values (num_blocks, k), codes, block_min,
    block_max)``: the block's Top-K of ``a = grad + Q^{-1}(codes)``
    (block-relative indices; empty slots of the last block ``(0, 0)``) and
    the new error ``a`` with the selection zeroed, re-quantized.
  """
  num_blocks, last_len, last_k = _check(grad, codes, block_size, k,
                                        last_block_k)
  d = grad.size
  e = quant_lib.dequantize_reference(codes, block_min, block_max, 4,
                                     block_size)
  a = e.reshape(-1)[:d] + grad.reshape(-1).astype(jnp.float32)
  a2 = jnp.pad(a, (0, num_blocks * block_size - d)).reshape(num_blocks,
                                                           block_size)
  idx, vals = topk_lib.block_topk_reference(
      a2, k, last_block_length=last_len, last_block_k=last_k)
  slots = topk_lib.slot_mask(num_blocks, k, last_k)
  rest = topk_lib.zero_selected(a2, idx, slots)
  new_codes, lo, hi = quant_lib.quantize_reference(rest, 4, last_len)
  return (idx.astype(index_dtype), vals.astype(values_dtype), new_codes, lo,
          hi)


#: Whether the GPU kernel packs each selected ``(index, value)`` into one
#: 32-bit word when both dtypes are 16-bit (the default ``pack=None``).
PACK_TOPK = True


def error_feedback_kernel(g_ref, c_ref, lo_ref, hi_ref, *refs,
                          num_blocks: int, block_size: int, k: int,
                          last_len: int, last_k: int, rows: int,
                          values_dtype: Any, packed: bool) -> None:
  """One error-feedback step of ``rows`` blocks (Triton body).

  ``g_ref`` ``(rows, P/2, 2)``: the gradient as pairs; ``c_ref`` ``(rows,
  P/2)``: the packed 4-bit codes (byte ``j`` holds elements ``2 j`` and
  ``2 j + 1``); ``lo_ref``/``hi_ref`` ``(rows,)``: each block's min/max.
  Outputs (``refs``): the Top-K, either one flat int32 array of packed
  ``(index, value)`` words (``packed``, see
  :func:`pallas_kernels.topk.write_topk_packed`) or flat index and value
  arrays; then the new codes and min/max (aliased to the inputs).
  """
  if packed:
    topk_ref, c_out, lo_out, hi_out = refs
  else:
    idx_ref, val_ref, c_out, lo_out, hi_out = refs
  b, length, pos, col, valid = _onchip.program_blocks(
      rows, g_ref.shape[1], num_blocks, block_size, last_len)
  k_b = _onchip.per_block(b, num_blocks, k, last_k)
  err = quant_lib.dequantize_pairs(c_ref[...], col, lo_ref[...], hi_ref[...])
  a = jnp.where(valid, g_ref[...].astype(jnp.float32) + err, 0.0)
  mag = _onchip.magnitude_bits(a, valid)
  sel = _onchip.select_topk(mag, col, k_b, length)
  if packed:
    topk_lib.write_topk_packed(topk_ref, a, pos, col, sel, b, k, k_b,
                               values_dtype)
  else:
    topk_lib.write_topk(idx_ref, val_ref, a, pos, col, sel, b, k, k_b)
  packed_codes, lo, hi = quant_lib.quantize_pairs(jnp.where(sel, 0.0, a),
                                                  col, valid)
  c_out[...] = packed_codes
  lo_out[...] = lo
  hi_out[...] = hi


@functools.partial(jax.jit, static_argnames=(
    "block_size", "k", "last_block_k", "index_dtype", "values_dtype",
    "num_warps", "rows", "pack", "interpret"))
def _error_feedback_gpu(grad: jax.Array, codes: jax.Array,
                           block_min: jax.Array, block_max: jax.Array, *,
                           block_size: int, k: int,
                           last_block_k: int | None = None,
                           index_dtype: Any = jnp.int32,
                           values_dtype: Any = jnp.float32,
                           num_warps: int | None = None, rows: int = 1,
                           pack: bool | None = None,
                           interpret: bool = False):
  """:func:`error_feedback_reference` as one Triton program per block.

  Each program loads the block's gradient, its codes and min/max, holds the
  block on chip as ``(P/2, 2)`` pairs (``P`` the next power of two of
  ``block_size``), selects the Top-K (see
  :func:`pallas_kernels.topk.block_topk_pallas`), writes the selection in
  ascending index order, and overwrites the codes and min/max in place
  (``input_output_aliases``: with donated state no new buffer is made).

  Args: as :func:`error_feedback_reference`, plus
    num_warps: warps per program (default: see
      :func:`pallas_kernels._backend.num_warps`).
    rows: blocks per program (a power of two dividing the block count is
      used; default 1).
    pack: write each selected ``(index, value)`` as one 32-bit word (one
      scattered store instead of two), unpacked by XLA afterwards; default
      when both dtypes are 16-bit.
    interpret: run in interpret mode.

  Returns:
    As :func:`error_feedback_reference`; the same selected sets (ties may be
    broken differently).
  """
  num_blocks, last_len, last_k = _check(grad, codes, block_size, k,
                                        last_block_k)
  padded = max(2, _backend.next_pow2(block_size))
  half = padded // 2
  d = grad.size
  g = grad.reshape(-1)
  if num_blocks * padded == d:
    g = g.reshape(num_blocks, half, 2)
  else:
    # Ragged tensors (and blocks that are not a power of two) are padded to
    # whole (P/2, 2) tiles: a copy, avoided for the usual power-of-two sizes.
    g = jnp.pad(g, (0, num_blocks * block_size - d))
    g = topk_lib.to_pairs(g.reshape(num_blocks, block_size), padded)
  codes_in = codes
  if half != block_size // 2:
    codes_in = jnp.pad(codes, ((0, 0), (0, half - block_size // 2)))
  rows = _backend.rows_per_program(num_blocks, rows)
  if pack is None:
    pack = PACK_TOPK and topk_lib.packable(index_dtype, values_dtype)
  elif pack and not topk_lib.packable(index_dtype, values_dtype):
    raise ValueError("pack=True needs 16-bit index and value dtypes, got "
                     f"{jnp.dtype(index_dtype)} and {jnp.dtype(values_dtype)}.")
  kernel = functools.partial(
      error_feedback_kernel, num_blocks=num_blocks, block_size=block_size,
      k=k, last_len=last_len, last_k=last_k, rows=rows,
      values_dtype=jnp.dtype(values_dtype), packed=pack)
  row = pl.BlockSpec((rows, half), lambda i: (i, 0))
  scalar = pl.BlockSpec((rows,), lambda i: (i,))
  if pack:
    topk_shapes = [jax.ShapeDtypeStruct((num_blocks * k,), jnp.int32)]
  else:
    topk_shapes = [
        jax.ShapeDtypeStruct((num_blocks * k,), jnp.dtype(index_dtype)),
        jax.ShapeDtypeStruct((num_blocks * k,), jnp.dtype(values_dtype))]
  t = len(topk_shapes)
  outs = pl.pallas_call(
      kernel,
      grid=(num_blocks // rows,),
      in_specs=[pl.BlockSpec((rows, half, 2), lambda i: (i, 0, 0)), row,
                scalar, scalar],
      out_specs=[pl.no_block_spec] * t + [row, scalar, scalar],
      out_shape=topk_shapes + [
          jax.ShapeDtypeStruct(codes_in.shape, jnp.uint8),
          jax.ShapeDtypeStruct((num_blocks,), jnp.float32),
          jax.ShapeDtypeStruct((num_blocks,), jnp.float32),
      ],
      input_output_aliases={1: t, 2: t + 1, 3: t + 2},
      compiler_params=None if interpret else _backend.gpu_params(
          rows * padded, "error_feedback", num_warps),
      interpret=interpret,
      name="error_feedback",
  )(g, codes_in, block_min.astype(jnp.float32),
    block_max.astype(jnp.float32))
  if pack:
    idx, val = topk_lib.unpack_topk(outs[0], index_dtype, values_dtype)
  else:
    idx, val = outs[:2]
  new_codes, lo, hi = outs[t:]
  if half != block_size // 2:
    new_codes = new_codes[:, :block_size // 2]
  return (idx.reshape(num_blocks, k), val.reshape(num_blocks, k), new_codes,
          lo, hi)


# ---------------------------------------------------------------------------
# Mosaic TPU kernel (TPU interpreter on CPU).
# ---------------------------------------------------------------------------


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
def _error_feedback_mosaic(grad: jax.Array, codes: jax.Array,
                           block_min: jax.Array, block_max: jax.Array, *,
                           block_size: int, k: int,
                           last_block_k: int | None = None,
                           index_dtype: Any = jnp.int32,
                           values_dtype: Any = jnp.float32, interpret=None):
  """:func:`error_feedback_reference` as a Mosaic TPU kernel, 8 blocks a program.

  The wrapper splits the gradient into even and odd planes (one XLA
  transpose, which also pads to whole ``(8, 128)`` tiles) and widens the
  codes to int32, so that every kernel array is 2-D and 32-bit; the kernel
  then selects the Top-K as :func:`pallas_kernels.topk.block_topk_pallas`
  does on TPU (bisection over bit patterns, prefix counts by matmul, masked
  reductions per slot) and re-quantizes the rest. ``interpret``: ``None``
  (compile with Mosaic) or a :class:`pltpu.InterpretParams`.
  """
  num_blocks, last_len, last_k = _check(grad, codes, block_size, k,
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
      compiler_params=_backend.tpu_params(),
      interpret=interpret or False,
      name="error_feedback_tpu",
  )(planes, c, lanes(block_min), lanes(block_max))
  return (idx[:num_blocks, :k].astype(index_dtype),
          val[:num_blocks, :k].astype(values_dtype),
          new_codes[:num_blocks, :half].astype(jnp.uint8),
          lo[:num_blocks, 0], hi[:num_blocks, 0])


def error_feedback_pallas(grad: jax.Array, codes: jax.Array,
                          block_min: jax.Array, block_max: jax.Array, *,
                          block_size: int, k: int,
                          last_block_k: int | None = None,
                          index_dtype: Any = jnp.int32,
                          values_dtype: Any = jnp.float32,
                          num_warps: int | None = None, rows: int = 1,
                          pack: bool | None = None, interpret=None):
  """:func:`error_feedback_reference` as one fused Pallas kernel.

  The Triton kernel when lowered for GPU, the Mosaic kernel when lowered for
  TPU (see :func:`pallas_kernels._backend.per_platform`).

  Args: as :func:`error_feedback_reference`, plus
    num_warps: GPU only, warps per program (default: see
      :func:`pallas_kernels._backend.num_warps`).
    rows: GPU only, blocks per program (default 1).
    pack: GPU only, write each selected ``(index, value)`` as one 32-bit
      word (default: when both dtypes are 16-bit).
    interpret: ``None`` (the compiled kernel of the lowering platform,
      interpreted on CPU), ``True`` (the Triton kernel in interpret mode) or
      ``pltpu.InterpretParams()`` (the Mosaic kernel in the TPU
      interpreter).

  Returns:
    As :func:`error_feedback_reference`; the same selected sets (ties may be
    broken differently).
  """
  return error_feedback(grad, codes, block_min, block_max,
                        block_size=block_size, k=k, last_block_k=last_block_k,
                        index_dtype=index_dtype, values_dtype=values_dtype,
                        num_warps=num_warps, rows=rows, pack=pack,
                        implementation="pallas", interpret=interpret)


def error_feedback(grad: jax.Array, codes: jax.Array, block_min: jax.Array,
                   block_max: jax.Array, *, block_size: int, k: int,
                   last_block_k: int | None = None,
                   index_dtype: Any = jnp.int32,
                   values_dtype: Any = jnp.float32,
                   num_warps: int | None = None, rows: int = 1,
                   pack: bool | None = None,
                   implementation: str = "auto", interpret=None):
  """One error-feedback step: the reference or the fused kernel.

  Args: as :func:`error_feedback_reference`, plus ``implementation``:
    ``"xla"`` (the reference), ``"auto"`` (per lowering platform: the Triton
    kernel on GPU, the Mosaic kernel on TPU, the reference elsewhere) or
    ``"pallas"`` (the same, with an interpreted kernel elsewhere); and
    ``num_warps``, ``rows``, ``pack``, ``interpret`` (see
    :func:`error_feedback_pallas`).

  Returns:
    ``(indices, values, codes, block_min, block_max)``.
  """
  kwargs = dict(block_size=block_size, k=k, last_block_k=last_block_k,
                index_dtype=index_dtype, values_dtype=values_dtype)
  _check(grad, codes, block_size, k, last_block_k)
  return _backend.per_platform(
      grad, codes, block_min, block_max, implementation=implementation,
      reference=functools.partial(error_feedback_reference, **kwargs),
      triton=functools.partial(_error_feedback_gpu, num_warps=num_warps,
                               rows=rows, pack=pack, **kwargs),
      mosaic=functools.partial(_error_feedback_mosaic, **kwargs),
      interpret=interpret)


__all__ = ["error_feedback", "error_feedback_pallas",
           "error_feedback_reference"]

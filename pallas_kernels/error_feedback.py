"""MicroAdam's error-feedback pass, fused into one kernel.

For every block of ``B`` elements of a flattened gradient ``g`` (Top-K blocks
and quantization blocks coincide):

.. math::

  a = g + Q^{-1}(e), \\quad (I, V) = \\mathrm{TopK}(|a|), \\quad a[I] = 0,
  \\quad \\delta', \\Delta' = \\min a, \\max a, \\quad e' = Q(a; \\delta', \\Delta').

This module holds its pure-``jnp`` reference (:func:`error_feedback_reference`,
composed of the references of :mod:`~pallas_kernels.topk` and
:mod:`~pallas_kernels.quantize`). The kernels that fuse it into one pass are
:mod:`pallas_kernels.gpu.step` (with the window, on GPU) and
:mod:`pallas_kernels.tpu.error_feedback`; :mod:`pallas_kernels.dispatch`
chooses.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import quantize as quant_lib
from pallas_kernels import topk as topk_lib


def check_args(grad: jax.Array, codes: jax.Array, block_size: int, k: int,
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
  num_blocks, last_len, last_k = check_args(grad, codes, block_size, k,
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


__all__ = ["error_feedback_reference"]

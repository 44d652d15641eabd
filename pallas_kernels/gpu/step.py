"""MicroAdam's whole per-leaf step on GPU: one Triton kernel through jax-triton.

The GPU kernel is written in the official Triton language
(:mod:`pallas_kernels.gpu.step_kernel`) and called through
`jax-triton <https://github.com/jax-ml/jax-triton>`_, JAX's supported path to
Triton kernels since Pallas' Triton back end was deprecated (JAX 0.11.0).
Pallas' Mosaic GPU back end was tried first: it lowers no data-dependent
gather, scatter, sort or histogram inside a kernel, which the exact block
Top-K and the window's scatter need (``experiments/mosaic_gpu_probe.py``
records the errors).

One kernel program per block of ``B`` entries does steps 1-4 of MicroAdam
(error feedback, Top-K, re-quantization, the window's new row and the
update direction ``u``), reading the gradient, the codes and the window
once and writing ``u``, the codes and one window row once; the state is
updated in place (``input_output_aliases``). Offsets are 64-bit, so leaves of
any size run here.

``jax_triton`` and ``triton`` are optional: :func:`available` says whether
they import. Where they do not (CPU-only installs), the dispatch
(:mod:`pallas_kernels.dispatch`) never traces this kernel.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import window as window_lib


def next_pow2(n: int) -> int:
  """Smallest power of two ``>= max(n, 1)``."""
  return 1 << (max(int(n), 1) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether ``jax_triton`` and ``triton`` import (the GPU step can run)."""
  try:
    import jax_triton  # pylint: disable=g-import-not-at-top,unused-import
    from pallas_kernels.gpu import step_kernel  # pylint: disable=g-import-not-at-top,unused-import
  except Exception:  # pylint: disable=broad-except
    return False
  return True




def kernel_constants(size: int, *, block_size: int, k: int,
                     last_block_k: int, window: int) -> dict[str, Any]:
  """The step kernel's compile-time constants for a leaf of ``size`` entries.

  Args:
    size: entries of the flattened leaf.
    block_size: ``B``, entries per block.
    k: entries kept per full block.
    last_block_k: entries kept in the last block.
    window: ``m``, the window's rows.

  Returns:
    The keyword arguments ``B ... WIDE_KEYS`` of
    :func:`pallas_kernels.gpu.step_kernel.microadam_step_kernel`.
  """
  num_blocks = -(-size // block_size)
  entries_tile = next_pow2(window * k)
  return dict(
      B=block_size, TILE=next_pow2(block_size), NB=num_blocks,
      LAST_LEN=size - (num_blocks - 1) * block_size, K=k,
      LAST_K=last_block_k, KP=next_pow2(k), M=window, E=window * k,
      EP=entries_tile, WIDE_KEYS=block_size * entries_tile >= 2**31)


def default_num_warps(block_size: int) -> int:
  """Warps per program: one per 512 entries of the block, 1 to 16.

  Measured on an H200 (4096-entry blocks, one 4096 x 11008 leaf): 8 warps
  0.82 ms, 4 warps 1.05 ms, 2 warps 1.26 ms (fewer registers per thread,
  more warps to hide the loads' latency).
  """
  return max(1, min(16, next_pow2(block_size) // 512))


def microadam_step_gpu(grad: jax.Array, codes: jax.Array, block_min: jax.Array,
                       block_max: jax.Array, window_indices: jax.Array,
                       window_values: jax.Array, count: jax.Array, *,
                       block_size: int, k: int, last_block_k: int,
                       b1: Any, b2: Any, eps: Any, out_dtype: Any,
                       num_warps: int | None = None):
  """One MicroAdam step of one flattened leaf, as one Triton kernel.

  Computes what :func:`pallas_kernels.dispatch.leaf_step_reference` computes:

  .. math::

    a = g + Q^{-1}(e), \\quad (I, V) = \\mathrm{TopK}_B(|a|), \\quad
    e' = Q(a - a[I]), \\quad W_{(t-1) \\bmod m} = (I, V), \\quad
    u = \\hat m / (\\sqrt{\\hat v} + \\epsilon).

  Args:
    grad: the gradient, any shape, ``d`` elements.
    codes: packed 4-bit error codes ``(num_blocks, block_size // 2)`` uint8.
    block_min: per-block error minimum ``(num_blocks,)`` float32.
    block_max: per-block error maximum ``(num_blocks,)`` float32.
    window_indices: ``(m, num_blocks, k)`` int16/int32.
    window_values: ``(m, num_blocks, k)`` bf16/f16/f32.
    count: the step ``t >= 1`` (int32 scalar, may be traced).
    block_size: ``B`` (even), Top-K and quantization block.
    k: entries kept per full block.
    last_block_k: entries kept in the last block.
    b1, b2, eps: Adam's hyper-parameters (may be traced).
    out_dtype: dtype of ``u``.
    num_warps: warps per program (default :func:`default_num_warps`).

  Returns:
    ``(u (d,) out_dtype, window_indices, window_values, codes, block_min,
    block_max)``, the state updated.
  """
  import jax_triton as jt  # pylint: disable=g-import-not-at-top
  from pallas_kernels.gpu import step_kernel as kernel_lib  # pylint: disable=g-import-not-at-top
  d = grad.size
  num_blocks = codes.shape[0]
  m = window_indices.shape[0]
  constants = kernel_constants(d, block_size=block_size, k=k,
                               last_block_k=last_block_k, window=m)
  if constants["NB"] != num_blocks:
    raise ValueError(
        f"codes must hold one row per block of {block_size} entries "
        f"({constants['NB']} for {d} entries), got {num_blocks}.")
  count = jnp.asarray(count, jnp.int32)
  w1, w2 = window_lib.row_weights(count, m, b1, b2)
  row = jnp.mod(count - 1, m).astype(jnp.int32).reshape(1)
  eps = jnp.asarray(eps, jnp.float32).reshape(1)
  out_shape = [
      jax.ShapeDtypeStruct(codes.shape, codes.dtype),
      jax.ShapeDtypeStruct(block_min.shape, jnp.float32),
      jax.ShapeDtypeStruct(block_max.shape, jnp.float32),
      jax.ShapeDtypeStruct(window_indices.shape, window_indices.dtype),
      jax.ShapeDtypeStruct(window_values.shape, window_values.dtype),
      jax.ShapeDtypeStruct((d,), out_dtype),
  ]
  codes, lo, hi, idx_w, val_w, u = jt.triton_call(
      grad.reshape(-1), codes, block_min.astype(jnp.float32),
      block_max.astype(jnp.float32), window_indices, window_values, w1, w2,
      row, eps,
      kernel=kernel_lib.microadam_step_kernel,
      out_shape=out_shape,
      grid=(num_blocks,),
      input_output_aliases={1: 0, 2: 1, 3: 2, 4: 3, 5: 4},
      num_warps=int(num_warps or default_num_warps(block_size)),
      num_stages=1, **constants)
  return u, idx_w, val_w, codes, lo, hi

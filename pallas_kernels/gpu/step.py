"""MicroAdam's whole per-leaf step on GPU: two Triton kernels via jax-triton.

The GPU kernel is written in the official Triton language
(:mod:`pallas_kernels.gpu.step_kernel`) and called through
`jax-triton <https://github.com/jax-ml/jax-triton>`_, JAX's supported path to
Triton kernels since Pallas' Triton back end was deprecated (JAX 0.11.0).
Pallas' Mosaic GPU back end was tried first: it lowers no data-dependent
gather, scatter, sort or histogram inside a kernel, which the exact block
Top-K and the window's scatter need (``experiments/mosaic_gpu_probe.py``
records the errors).

Per block of ``B`` entries one program of the first kernel does steps 1-3
of MicroAdam (error feedback, Top-K, re-quantization, the window's new row),
reading the gradient and the codes once and writing the codes and one window
row once; one program of the second computes the update direction ``u``
from the block's window (read once) and writes ``u`` once. The state is
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




#: Entries per step of the parameter update's dense pass (weight decay):
#: 32 per thread at one warp, read and written in 16-byte vectors.
APPLY_CHUNK = 1024

#: Entries per thread in the Top-K kernel's sub-tiles (its passes B and C):
#: few, so that the kernel needs few registers and many programs share an
#: SM (64 registers per thread at 4 warps, eight programs per SM).
SUB_PER_THREAD = 8


def kernel_constants(size: int, *, block_size: int, k: int,
                     last_block_k: int, window: int,
                     num_warps: int | None = None,
                     sub_per_thread: int = SUB_PER_THREAD) -> dict[str, Any]:
  """The step kernels' compile-time constants for a leaf of ``size`` entries.

  Args:
    size: entries of the flattened leaf.
    block_size: ``B``, entries per block.
    k: entries kept per full block.
    last_block_k: entries kept in the last block.
    window: ``m``, the window's rows.
    num_warps: warps per program of the Top-K kernel (default
      :func:`default_num_warps`).
    sub_per_thread: entries per thread in the Top-K kernel's sub-tiles (a
      power of two).

  Returns:
    The compile-time constants ``B ... SUB`` of both kernels of
    :mod:`pallas_kernels.gpu.step_kernel` (each takes those it declares:
    :func:`constants_of`).
  """
  num_blocks = -(-size // block_size)
  entries_tile = next_pow2(window * k)
  tile = next_pow2(block_size)
  warps = int(num_warps or default_num_warps(block_size))
  return dict(
      B=block_size, TILE=tile, NB=num_blocks,
      LAST_LEN=size - (num_blocks - 1) * block_size, K=k,
      LAST_K=last_block_k, KP=next_pow2(k), M=window, E=window * k,
      EP=entries_tile, LOG_EP=entries_tile.bit_length() - 1,
      WIDE_KEYS=block_size * entries_tile >= 2**31,
      RW=min(8, tile), SUB=min(tile, 32 * warps * next_pow2(sub_per_thread)))


def constants_of(kernel: Any, constants: dict[str, Any]) -> dict[str, Any]:
  """The entries of ``constants`` that ``kernel`` (a Triton function) takes."""
  return {n: v for n, v in constants.items() if n in kernel.arg_names}


def default_num_warps(block_size: int) -> int:
  """Warps per program of the Top-K kernel: one per 1024 entries, 1 to 16.

  At 4 warps a 4096-entry block holds 32 entries per thread in the
  threshold search and 8 in the sub-tiles: 64 registers per thread, eight
  programs per SM (see :mod:`pallas_kernels.gpu.step_kernel`). Measured on
  an H100 (one 4096 x 11008 leaf, the Top-K kernel alone): 2 warps
  0.196 ms, 4 warps 0.191 ms, 8 warps 0.245 ms; 1 warp (the whole block in
  one warp's registers, 253 per thread) 0.390 ms in an earlier build.
  """
  return max(1, min(16, next_pow2(block_size) // 1024))


def default_u_num_warps(window_entries: int) -> int:
  """Warps per program of the ``u`` kernel: one per 512 window entries of a
  block (``m k``, rounded up to a power of two), 1 to 16.

  Measured on an H200 (410 entries, one 4096 x 11008 leaf, the pair of
  kernels): 1 warp 0.360 ms, 2 warps 0.413 ms, 4 warps 0.403 ms.
  """
  return max(1, min(16, next_pow2(window_entries) // 512))


def microadam_step_gpu(grad: jax.Array, codes: jax.Array, block_min: jax.Array,
                       block_max: jax.Array, window_indices: jax.Array,
                       window_values: jax.Array, count: jax.Array, *,
                       block_size: int, k: int, last_block_k: int,
                       b1: Any, b2: Any, eps: Any, out_dtype: Any,
                       num_warps: int | None = None,
                       sub_per_thread: int = SUB_PER_THREAD,
                       param: jax.Array | None = None,
                       learning_rate: Any = None, weight_decay: Any = 0.0):
  """One MicroAdam step of one flattened leaf, as two Triton kernels.

  Computes what :func:`pallas_kernels.dispatch.leaf_step_reference` computes:

  .. math::

    a = g + Q^{-1}(e), \\quad (I, V) = \\mathrm{TopK}_B(|a|), \\quad
    e' = Q(a - a[I]), \\quad W_{(t-1) \\bmod m} = (I, V), \\quad
    u = \\hat m / (\\sqrt{\\hat v} + \\epsilon),

  and, given ``param``, the parameter's update in the second kernel in place
  of ``u``: :math:`\\theta - \\eta (u + \\lambda \\theta)` in float32,
  rounded once to ``param``'s dtype (without weight decay only the window's
  entries of ``param`` are read and written).

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
    num_warps: warps per program of the Top-K kernel (default
      :func:`default_num_warps`); the ``u`` kernel's are
      :func:`default_u_num_warps`'s.
    sub_per_thread: entries per thread in the Top-K kernel's sub-tiles.
    param: the parameter, ``d`` elements, updated in place (donate it) where
      given; ``None``: ``u`` is returned.
    learning_rate: :math:`\\eta`, with ``param`` (may be traced).
    weight_decay: :math:`\\lambda`, with ``param`` (may be traced; a Python
      zero skips the dense pass over the parameter).

  Returns:
    ``(u (d,) out_dtype, window_indices, window_values, codes, block_min,
    block_max)``, the state updated; with ``param``, the updated parameter
    ``(d,)`` in its dtype in place of ``u``.
  """
  import jax_triton as jt  # pylint: disable=g-import-not-at-top
  from pallas_kernels.gpu import step_kernel as kernel_lib  # pylint: disable=g-import-not-at-top
  d = grad.size
  num_blocks = codes.shape[0]
  m = window_indices.shape[0]
  num_warps = int(num_warps or default_num_warps(block_size))
  constants = kernel_constants(d, block_size=block_size, k=k,
                               last_block_k=last_block_k, window=m,
                               num_warps=num_warps,
                               sub_per_thread=sub_per_thread)
  if constants["NB"] != num_blocks:
    raise ValueError(
        f"codes must hold one row per block of {block_size} entries "
        f"({constants['NB']} for {d} entries), got {num_blocks}.")
  if param is not None and param.size != d:
    raise ValueError(
        f"param must have as many elements as grad ({d}), got shape "
        f"{param.shape}.")
  if param is not None and learning_rate is None:
    raise ValueError("learning_rate must be given with param, got None.")
  count = jnp.asarray(count, jnp.int32)
  w1, w2 = window_lib.row_weights(count, m, b1, b2)
  row = jnp.mod(count - 1, m).astype(jnp.int32).reshape(1)
  eps = jnp.asarray(eps, jnp.float32).reshape(1)
  topk_shapes = [
      jax.ShapeDtypeStruct(codes.shape, codes.dtype),
      jax.ShapeDtypeStruct(block_min.shape, jnp.float32),
      jax.ShapeDtypeStruct(block_max.shape, jnp.float32),
      jax.ShapeDtypeStruct(window_indices.shape, window_indices.dtype),
      jax.ShapeDtypeStruct(window_values.shape, window_values.dtype),
  ]
  codes, lo, hi, idx_w, val_w = jt.triton_call(
      grad.reshape(-1), codes, block_min.astype(jnp.float32),
      block_max.astype(jnp.float32), window_indices, window_values, row,
      kernel=kernel_lib.microadam_topk_kernel,
      out_shape=topk_shapes,
      grid=(num_blocks,),
      input_output_aliases={1: 0, 2: 1, 3: 2, 4: 3, 5: 4},
      num_warps=num_warps,
      num_stages=1,
      **constants_of(kernel_lib.microadam_topk_kernel, constants))
  window_args = (idx_w, val_w, w1, w2, row, eps)
  u_warps = default_u_num_warps(constants["EP"])
  if param is None:
    u = jt.triton_call(
        *window_args,
        kernel=kernel_lib.microadam_u_kernel,
        out_shape=jax.ShapeDtypeStruct((d,), out_dtype),
        grid=(num_blocks,),
        num_warps=u_warps,
        num_stages=1,
        **constants_of(kernel_lib.microadam_u_kernel, constants))
    return u, idx_w, val_w, codes, lo, hi
  decay = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)
  scalar = lambda x: jnp.asarray(x, jnp.float32).reshape(1)
  new_param = jt.triton_call(
      *window_args, scalar(learning_rate), scalar(weight_decay),
      param.reshape(-1),
      kernel=kernel_lib.microadam_apply_kernel,
      out_shape=jax.ShapeDtypeStruct((d,), param.dtype),
      input_output_aliases={len(window_args) + 2: 0},
      grid=(num_blocks,),
      num_warps=u_warps,
      num_stages=1,
      DECAY=decay, CHUNK=min(constants["TILE"], APPLY_CHUNK),
      **constants_of(kernel_lib.microadam_apply_kernel, constants))
  return new_param, idx_w, val_w, codes, lo, hi

"""Block-wise Top-K by magnitude (MicroAdam's gradient compression).

A flattened tensor is cut into rows of ``B`` elements (an array
``(num_blocks, B)``; the last row may hold only ``last_block_length`` valid
entries). For every row the ``k`` entries of largest ``|x|`` are selected and
returned as block-relative indices and signed values; the last row selects
only ``last_block_k`` entries and fills its remaining slots with index 0 and
value 0 ("empty slots", which add nothing when scattered). Ties are broken
arbitrarily: only the multiset of selected magnitudes is specified.

This module holds the pure-``jnp`` reference (built on XLA's exact TopK),
which is also the XLA path of the optimizer, the Pallas kernels (Triton for
GPU, Mosaic for TPU, chosen per lowering platform by
:func:`block_topk_pallas`) and the dispatch between them and the reference
(:func:`block_topk`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _backend
from pallas_kernels import _onchip
from pallas_kernels import _onchip_tpu


def slot_mask(num_blocks: int, k: int, last_block_k: int) -> jax.Array:
  """Boolean ``(num_blocks, k)``: which output slots hold a selected entry."""
  slot = jnp.arange(k)[None, :]
  row = jnp.arange(num_blocks)[:, None]
  return (row < num_blocks - 1) | (slot < last_block_k)


def block_topk_reference(x: jax.Array, k: int, *,
                         last_block_length: int | None = None,
                         last_block_k: int | None = None
                         ) -> tuple[jax.Array, jax.Array]:
  """Indices and values of the ``k`` largest magnitudes of every row of ``x``.

  Args:
    x: float array ``(num_blocks, B)``.
    k: entries selected per row, ``1 <= k <= B``.
    last_block_length: valid entries of the last row (default ``B``); padded
      entries are never selected.
    last_block_k: entries selected in the last row (default ``k``), at most
      ``last_block_length``.

  Returns:
    ``(indices int32 (num_blocks, k), values (num_blocks, k) of x.dtype)``
    with block-relative indices; empty slots of the last row hold ``(0, 0)``.
  """
  num_blocks, block = x.shape
  if not 1 <= k <= block:
    raise ValueError(f"k must be in [1, {block}], got {k}.")
  last_block_length = block if last_block_length is None else last_block_length
  last_block_k = k if last_block_k is None else last_block_k
  if not 0 <= last_block_k <= min(k, last_block_length):
    raise ValueError(
        f"last_block_k must be in [0, {min(k, last_block_length)}], got "
        f"{last_block_k}.")
  mag = jnp.abs(x.astype(jnp.float32))
  if last_block_length != block:
    col = jnp.arange(block)[None, :]
    row = jnp.arange(num_blocks)[:, None]
    mag = jnp.where((row < num_blocks - 1) | (col < last_block_length), mag,
                    -1.0)
  # approx_max_k with recall_target=1 is exact (the same TopK as lax.top_k on
  # CPU/GPU) and, unlike lax.top_k, XLA partitions it along sharded rows.
  _, idx = jax.lax.approx_max_k(mag, k, recall_target=1.0)
  values = jnp.take_along_axis(x, idx, axis=1)
  if last_block_k != k:
    keep = slot_mask(num_blocks, k, last_block_k)
    idx = jnp.where(keep, idx, 0)
    values = jnp.where(keep, values, jnp.zeros((), x.dtype))
  return idx.astype(jnp.int32), values


def zero_selected(x: jax.Array, indices: jax.Array,
                  slots: jax.Array | None = None) -> jax.Array:
  """Returns ``x`` ``(num_blocks, B)`` with the selected entries set to zero.

  Args:
    x: the rows that were compressed.
    indices: block-relative indices ``(num_blocks, k)``.
    slots: optional boolean ``(num_blocks, k)`` of valid slots (see
      :func:`slot_mask`); empty slots leave ``x`` untouched.
  """
  hit = jnp.ones(indices.shape, jnp.bool_) if slots is None else slots
  # One scatter per row (vmap): XLA partitions it along sharded rows.
  selected = jax.vmap(
      lambda i, h: jnp.zeros(x.shape[1:], jnp.bool_).at[i].max(h))(
          indices.astype(jnp.int32), hit)
  return jnp.where(selected, jnp.zeros((), x.dtype), x)


# ---------------------------------------------------------------------------
# Triton kernel (GPU; interpret mode on CPU).
# ---------------------------------------------------------------------------


def to_pairs(x: jax.Array, padded: int) -> jax.Array:
  """``(num_blocks, B)`` -> ``(num_blocks, padded // 2, 2)``, zero-padded.

  ``padded`` is a power of two ``>= max(B, 2)``; no copy is made when it
  equals ``B``.
  """
  num_blocks, block = x.shape
  if padded != block:
    x = jnp.pad(x, ((0, 0), (0, padded - block)))
  return x.reshape(num_blocks, padded // 2, 2)


def write_topk(idx_ref, val_ref, a, pos, col, sel, b, k, k_b) -> None:
  """Stores the selected ``(pos, a)`` of blocks ``b`` in slot order.

  ``idx_ref`` and ``val_ref`` are flat ``(num_blocks * k,)``; ``a``, ``pos``,
  ``col`` and ``sel`` are ``(rows, h, 2)``, ``b`` and ``k_b`` ``(rows,)``.
  Slots ``k_b .. k-1`` of a block (empty slots of a short last block) get
  ``(0, 0)``.
  """
  rank = _onchip.exclusive_rank(jnp.where(sel, 1, 0), col)
  slot = _onchip.per_row(b) * k + rank
  _onchip.store_scattered(idx_ref, slot, pos, sel)
  _onchip.store_scattered(val_ref, slot, a, sel)
  kp = _backend.next_pow2(k)
  rows = b.shape[0]
  empty = jax.lax.broadcasted_iota(jnp.int32, (rows, kp), 1)
  hole = (empty >= k_b[:, None]) & (empty < k)
  at = b[:, None] * k + empty
  _onchip.store_scattered(idx_ref, at, jnp.zeros((rows, kp), jnp.int32), hole)
  _onchip.store_scattered(val_ref, at, jnp.zeros((rows, kp), jnp.float32),
                          hole)


def packable(index_dtype, values_dtype) -> bool:
  """Whether a Top-K row fits one 32-bit word per slot (16-bit both)."""
  return (jnp.dtype(index_dtype).itemsize == 2
          and jnp.dtype(values_dtype).itemsize == 2)


def write_topk_packed(out_ref, a, pos, col, sel, b, k, k_b,
                      values_dtype) -> None:
  """:func:`write_topk` into one int32 word per slot.

  The slot's index in the low 16 bits and the bit pattern of its value
  (``values_dtype``, 16-bit) in the high 16 bits: one scattered store per
  selected entry instead of two (see :func:`unpack_topk`).
  """
  value_bits = jax.lax.bitcast_convert_type(a.astype(values_dtype),
                                            jnp.uint16).astype(jnp.int32)
  word = (pos & 0xFFFF) | (value_bits << 16)
  rank = _onchip.exclusive_rank(jnp.where(sel, 1, 0), col)
  _onchip.store_scattered(out_ref, _onchip.per_row(b) * k + rank, word, sel)
  kp = _backend.next_pow2(k)
  rows = b.shape[0]
  empty = jax.lax.broadcasted_iota(jnp.int32, (rows, kp), 1)
  hole = (empty >= k_b[:, None]) & (empty < k)
  _onchip.store_scattered(out_ref, b[:, None] * k + empty,
                          jnp.zeros((rows, kp), jnp.int32), hole)


def unpack_topk(words: jax.Array, index_dtype, values_dtype
                ) -> tuple[jax.Array, jax.Array]:
  """The indices and values held by :func:`write_topk_packed`'s words."""
  low = (words & 0xFFFF).astype(jnp.uint16)
  high = jax.lax.shift_right_logical(words, jnp.int32(16)).astype(jnp.uint16)
  return (low.astype(index_dtype),
          jax.lax.bitcast_convert_type(high, values_dtype))


def _check_args(x: jax.Array, k: int, last_block_length: int | None,
                last_block_k: int | None) -> tuple[int, int]:
  """Checks the arguments; returns ``(last_block_length, last_block_k)``."""
  block = x.shape[1]
  if not 1 <= k <= block:
    raise ValueError(f"k must be in [1, {block}], got {k}.")
  last_len = block if last_block_length is None else int(last_block_length)
  last_k = k if last_block_k is None else int(last_block_k)
  if not 0 <= last_k <= min(k, last_len):
    raise ValueError(
        f"last_block_k must be in [0, {min(k, last_len)}], got {last_k}.")
  return last_len, last_k


def topk_kernel(x_ref, idx_ref, val_ref, *, num_blocks: int, block: int,
                k: int, last_len: int, last_k: int, rows: int) -> None:
  """Top-K of ``rows`` blocks held as ``(rows, P/2, 2)`` pairs (Triton body).

  Writes slot-ordered block-relative indices and values into the flat
  ``idx_ref``/``val_ref`` ``(num_blocks * k,)``.
  """
  b, length, pos, col, valid = _onchip.program_blocks(
      rows, x_ref.shape[1], num_blocks, block, last_len)
  k_b = _onchip.per_block(b, num_blocks, k, last_k)
  a = x_ref[...].astype(jnp.float32)
  mag = _onchip.magnitude_bits(a, valid)
  sel = _onchip.select_topk(mag, col, k_b, length)
  write_topk(idx_ref, val_ref, a, pos, col, sel, b, k, k_b)


@functools.partial(jax.jit, static_argnames=(
    "k", "last_block_length", "last_block_k", "index_dtype", "num_warps",
    "rows", "interpret"))
def _block_topk_gpu(x: jax.Array, k: int, *,
                       last_block_length: int | None = None,
                       last_block_k: int | None = None,
                       index_dtype=jnp.int32, num_warps: int | None = None,
                       rows: int = 1, interpret: bool = False
                       ) -> tuple[jax.Array, jax.Array]:
  """:func:`block_topk_reference` as one Triton program per row (or rows).

  Each program holds its row on chip, finds the bit pattern of the ``k``-th
  largest magnitude by counting passes (see
  :func:`pallas_kernels._onchip.kth_threshold`), breaks ties at it by
  position, and compacts the selection with a prefix sum into slots in
  ascending index order. ``num_warps``/``rows``: warps and blocks per
  program (defaults: :func:`pallas_kernels._backend.num_warps`, 1);
  ``interpret``: run in interpret mode.
  """
  num_blocks, block = x.shape
  last_len, last_k = _check_args(x, k, last_block_length, last_block_k)
  padded = max(2, _backend.next_pow2(block))
  half = padded // 2
  rows = _backend.rows_per_program(num_blocks, rows)
  kernel = functools.partial(topk_kernel, num_blocks=num_blocks, block=block,
                             k=k, last_len=last_len, last_k=last_k,
                             rows=rows)
  idx, val = pl.pallas_call(
      kernel,
      grid=(num_blocks // rows,),
      in_specs=[pl.BlockSpec((rows, half, 2), lambda i: (i, 0, 0))],
      out_specs=[pl.no_block_spec, pl.no_block_spec],
      out_shape=[jax.ShapeDtypeStruct((num_blocks * k,), index_dtype),
                 jax.ShapeDtypeStruct((num_blocks * k,), x.dtype)],
      compiler_params=None if interpret else _backend.gpu_params(
          rows * padded, "topk", num_warps),
      interpret=interpret,
      name="block_topk",
  )(to_pairs(x, padded))
  return idx.reshape(num_blocks, k), val.reshape(num_blocks, k)


# ---------------------------------------------------------------------------
# Mosaic TPU kernel (TPU interpreter on CPU).
# ---------------------------------------------------------------------------


def topk_tpu_kernel(x_ref, idx_ref, val_ref, *, num_blocks: int, block: int,
                    k: int, last_len: int, last_k: int) -> None:
  """Top-K of ``ROWS`` blocks held as rows ``(ROWS, W)`` of ``x_ref``.

  Writes slot-ordered positions (int32) and values (float32) ``(ROWS,
  slots)``; rows past ``num_blocks`` (padding) select nothing.
  """
  rows, width = x_ref.shape
  b = _onchip_tpu.block_rows(pl.program_id(0), rows)
  length = _onchip_tpu.per_block(b, num_blocks, block, last_len)
  k_b = _onchip_tpu.per_block(b, num_blocks, k, last_k).astype(jnp.float32)
  pos = jax.lax.broadcasted_iota(jnp.int32, (rows, width), 1)
  valid = pos < length
  a = jnp.where(valid, x_ref[...].astype(jnp.float32), 0.0)
  mag = _onchip_tpu.magnitude_bits(a, valid)
  sel = _onchip_tpu.select_topk([mag], k_b)
  idx, val = _onchip_tpu.compact(sel, [pos.astype(jnp.float32)], [a], k,
                                 idx_ref.shape[1])
  idx_ref[...] = idx.astype(jnp.int32)
  val_ref[...] = val


@functools.partial(jax.jit, static_argnames=(
    "k", "last_block_length", "last_block_k", "index_dtype", "interpret"))
def _block_topk_mosaic(x: jax.Array, k: int, *,
                       last_block_length: int | None = None,
                       last_block_k: int | None = None,
                       index_dtype=jnp.int32, interpret=None
                       ) -> tuple[jax.Array, jax.Array]:
  """:func:`block_topk_reference` as a Mosaic TPU kernel, 8 rows a program.

  The rows are padded to whole ``(8, 128)`` tiles (a copy unless the row
  count is a multiple of 8 and ``B`` of 128). In each program the ``k``-th
  magnitude is found by bisection over the int32 bit patterns (see
  :func:`pallas_kernels._onchip_tpu.kth_largest_bits`), ties are broken by
  position with a prefix count (triangular matmuls), and slot ``s`` is
  filled by a masked reduction over the entries of rank ``s``: TPU has no
  scatter. ``interpret``: ``None`` (compile with Mosaic) or a
  :class:`pltpu.InterpretParams` (the TPU interpreter).
  """
  num_blocks, block = x.shape
  last_len, last_k = _check_args(x, k, last_block_length, last_block_k)
  rows = _onchip_tpu.ROWS
  nbp = _onchip_tpu.round_up(num_blocks, rows)
  width = _onchip_tpu.round_up(block, _onchip_tpu.LANES)
  slots = _onchip_tpu.round_up(k, _onchip_tpu.LANES)
  xp = x.astype(jnp.float32)
  if (nbp, width) != (num_blocks, block):
    xp = jnp.pad(xp, ((0, nbp - num_blocks), (0, width - block)))
  kernel = functools.partial(topk_tpu_kernel, num_blocks=num_blocks,
                             block=block, k=k, last_len=last_len,
                             last_k=last_k)
  out = pl.BlockSpec((rows, slots), lambda i: (i, 0))
  idx, val = pl.pallas_call(
      kernel,
      grid=(nbp // rows,),
      in_specs=[pl.BlockSpec((rows, width), lambda i: (i, 0))],
      out_specs=[out, out],
      out_shape=[jax.ShapeDtypeStruct((nbp, slots), jnp.int32),
                 jax.ShapeDtypeStruct((nbp, slots), jnp.float32)],
      compiler_params=_backend.tpu_params(),
      interpret=interpret or False,
      name="block_topk_tpu",
  )(xp)
  return (idx[:num_blocks, :k].astype(index_dtype),
          val[:num_blocks, :k].astype(x.dtype))


def block_topk_pallas(x: jax.Array, k: int, *,
                      last_block_length: int | None = None,
                      last_block_k: int | None = None,
                      index_dtype=jnp.int32, num_warps: int | None = None,
                      rows: int = 1,
                      interpret=None) -> tuple[jax.Array, jax.Array]:
  """:func:`block_topk_reference` as a Pallas kernel.

  The Triton kernel when lowered for GPU, the Mosaic kernel when lowered for
  TPU (see :func:`pallas_kernels._backend.per_platform`).

  Args:
    x: float array ``(num_blocks, B)``.
    k: entries selected per row.
    last_block_length: valid entries of the last row (default ``B``).
    last_block_k: entries selected in the last row (default ``k``).
    index_dtype: dtype of the returned indices (int16 or int32).
    num_warps: GPU only, warps per program (default: see
      :func:`pallas_kernels._backend.num_warps`).
    rows: GPU only, blocks per program (default 1).
    interpret: ``None``: the compiled kernel of the lowering platform
      (interpreted on CPU); ``True``: the Triton kernel in interpret mode;
      ``pltpu.InterpretParams()``: the Mosaic kernel in the TPU interpreter.

  Returns:
    ``(indices (num_blocks, k) index_dtype, values (num_blocks, k) x.dtype)``,
    the same sets as :func:`block_topk_reference` (ties may differ).
  """
  return block_topk(x, k, last_block_length=last_block_length,
                    last_block_k=last_block_k, index_dtype=index_dtype,
                    num_warps=num_warps, rows=rows,
                    implementation="pallas", interpret=interpret)


def block_topk(x: jax.Array, k: int, *, last_block_length: int | None = None,
               last_block_k: int | None = None, index_dtype=jnp.int32,
               num_warps: int | None = None, rows: int = 1,
               implementation: str = "auto", interpret=None
               ) -> tuple[jax.Array, jax.Array]:
  """Block-wise Top-K by magnitude: the reference or a Pallas kernel.

  Args:
    x: float array ``(num_blocks, B)``.
    k: entries selected per row.
    last_block_length: valid entries of the last row (default ``B``).
    last_block_k: entries selected in the last row (default ``k``).
    index_dtype: dtype of the returned indices.
    implementation: ``"xla"`` (:func:`block_topk_reference`), ``"auto"``
      (per lowering platform: the Triton kernel on GPU, the Mosaic kernel
      on TPU, the reference elsewhere) or ``"pallas"`` (the same, with an
      interpreted kernel elsewhere); see
      :func:`pallas_kernels._backend.per_platform`.
    num_warps: see :func:`block_topk_pallas`.
    rows: see :func:`block_topk_pallas`.
    interpret: see :func:`block_topk_pallas` (``"pallas"`` only).

  Returns:
    ``(indices (num_blocks, k), values (num_blocks, k))``; see
    :func:`block_topk_reference`.
  """
  kw = dict(last_block_length=last_block_length, last_block_k=last_block_k,
            index_dtype=index_dtype)
  _check_args(x, k, last_block_length, last_block_k)

  def reference(v):
    idx, val = block_topk_reference(v, k, last_block_length=last_block_length,
                                    last_block_k=last_block_k)
    return idx.astype(index_dtype), val

  return _backend.per_platform(
      x, implementation=implementation, reference=reference,
      triton=lambda v, interpret: _block_topk_gpu(
          v, k, num_warps=num_warps, rows=rows, interpret=interpret, **kw),
      mosaic=lambda v, interpret: _block_topk_mosaic(v, k, interpret=interpret,
                                                     **kw),
      interpret=interpret)

"""Block-wise Top-K by magnitude (MicroAdam's gradient compression).

A flattened tensor is cut into rows of ``B`` elements (an array
``(num_blocks, B)``; the last row may hold only ``last_block_length`` valid
entries). For every row the ``k`` entries of largest ``|x|`` are selected and
returned as block-relative indices and signed values; the last row selects
only ``last_block_k`` entries and fills its remaining slots with index 0 and
value 0 ("empty slots", which add nothing when scattered). Ties are broken
arbitrarily: only the multiset of selected magnitudes is specified.

This module holds the pure-``jnp`` reference (built on :func:`jax.lax.top_k`),
which is also the XLA path of the optimizer, the Pallas kernel
(:func:`block_topk_pallas`) and the dispatch between them
(:func:`block_topk`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _backend
from pallas_kernels import _onchip


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
# Pallas kernel (GPU, Triton back end; interpret mode on CPU).
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


def block_topk_pallas(x: jax.Array, k: int, *,
                      last_block_length: int | None = None,
                      last_block_k: int | None = None,
                      index_dtype=jnp.int32,
                      interpret: bool | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  """:func:`block_topk_reference` as one Pallas kernel program per row.

  Each program holds its row on chip, finds the bit pattern of the ``k``-th
  largest magnitude by counting passes (see
  :func:`pallas_kernels._onchip.kth_threshold`), breaks ties at it by
  position, and compacts the selection with a prefix sum into slots in
  ascending index order.

  Args:
    x: float array ``(num_blocks, B)``.
    k: entries selected per row.
    last_block_length: valid entries of the last row (default ``B``).
    last_block_k: entries selected in the last row (default ``k``).
    index_dtype: dtype of the returned indices (int16 or int32).
    interpret: run in interpret mode (default: on CPU).

  Returns:
    ``(indices (num_blocks, k) index_dtype, values (num_blocks, k) x.dtype)``,
    the same sets as :func:`block_topk_reference` (ties may differ).
  """

  num_blocks, block = x.shape
  if not 1 <= k <= block:
    raise ValueError(f"k must be in [1, {block}], got {k}.")
  last_len = block if last_block_length is None else int(last_block_length)
  last_k = k if last_block_k is None else int(last_block_k)
  if not 0 <= last_k <= min(k, last_len):
    raise ValueError(
        f"last_block_k must be in [0, {min(k, last_len)}], got {last_k}.")
  interpret = _backend.interpret_mode(interpret)
  padded = max(2, _backend.next_pow2(block))
  half = padded // 2

  rows = _backend.rows_per_program(num_blocks, "topk")

  def kernel(x_ref, idx_ref, val_ref):
    b = _onchip.rows_of(pl.program_id(0), rows)
    last = b == num_blocks - 1
    length = jnp.where(last, last_len, block)
    k_b = jnp.where(last, last_k, k)
    pos, col = _onchip.pair_iota(rows, half)
    valid = pos < _onchip.per_row(length)
    a = x_ref[...].astype(jnp.float32)
    mag = _onchip.magnitude_bits(a, valid)
    sel = _onchip.select_topk(mag, col, k_b, length)
    write_topk(idx_ref, val_ref, a, pos, col, sel, b, k, k_b)

  idx, val = pl.pallas_call(
      kernel,
      grid=(num_blocks // rows,),
      in_specs=[pl.BlockSpec((rows, half, 2), lambda i: (i, 0, 0))],
      out_specs=[pl.no_block_spec, pl.no_block_spec],
      out_shape=[jax.ShapeDtypeStruct((num_blocks * k,), index_dtype),
                 jax.ShapeDtypeStruct((num_blocks * k,), x.dtype)],
      compiler_params=None if interpret else _backend.gpu_params(
          rows * padded, "topk"),
      interpret=interpret,
      name="block_topk",
  )(to_pairs(x, padded))
  return idx.reshape(num_blocks, k), val.reshape(num_blocks, k)


def block_topk(x: jax.Array, k: int, *, last_block_length: int | None = None,
               last_block_k: int | None = None, index_dtype=jnp.int32,
               implementation: str = "auto") -> tuple[jax.Array, jax.Array]:
  """Block-wise Top-K by magnitude: the reference or the Pallas kernel.

  Args:
    x: float array ``(num_blocks, B)``.
    k: entries selected per row.
    last_block_length: valid entries of the last row (default ``B``).
    last_block_k: entries selected in the last row (default ``k``).
    index_dtype: dtype of the returned indices.
    implementation: ``"xla"`` (:func:`block_topk_reference`), ``"pallas"``
      (:func:`block_topk_pallas`, interpret mode on CPU) or ``"auto"``
      (the kernel on GPU, the reference elsewhere).

  Returns:
    ``(indices (num_blocks, k), values (num_blocks, k))``; see
    :func:`block_topk_reference`.
  """
  if _backend.resolve(implementation, "topk") == "pallas":
    return block_topk_pallas(x, k, last_block_length=last_block_length,
                             last_block_k=last_block_k,
                             index_dtype=index_dtype)
  idx, val = block_topk_reference(x, k, last_block_length=last_block_length,
                                  last_block_k=last_block_k)
  return idx.astype(index_dtype), val

"""Block-wise Top-K by magnitude (MicroAdam's gradient compression).

A flattened tensor is cut into rows of ``B`` elements (an array
``(num_blocks, B)``; the last row may hold only ``last_block_length`` valid
entries). For every row the ``k`` entries of largest ``|x|`` are selected and
returned as block-relative indices and signed values; the last row selects
only ``last_block_k`` entries and fills its remaining slots with index 0 and
value 0 ("empty slots", which add nothing when scattered). Ties are broken
arbitrarily: only the multiset of selected magnitudes is specified.

This module holds the pure-``jnp`` reference (built on XLA's exact TopK),
which is also the XLA path of the optimizer. The kernels select inside their
fused passes (:mod:`pallas_kernels.gpu.step`,
:mod:`pallas_kernels.tpu.error_feedback`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


__all__ = ["block_topk_reference", "slot_mask", "zero_selected"]

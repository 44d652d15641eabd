"""Building blocks of the Mosaic TPU kernel bodies (values held in VMEM).

A program holds ``R`` blocks (``R`` a multiple of 8) as rows of 2-D arrays
``(R, W)`` with ``W`` a multiple of 128, so that every array is made of whole
``(8, 128)`` vregs. A block may be split into ``P`` *planes* (``P = 1``: the
block itself; ``P = 2``: its even and odd entries, the layout of packed
4-bit codes): column ``j`` of plane ``p`` is element ``j * P + p``.
Per-block scalars are ``(R, 1)`` columns.

TPU has no scatter and no prefix-sum instruction; these helpers use only
element-wise arithmetic, compares, lane reductions, ``lax.fori_loop`` and
small matmuls with 0/1 matrices (exact: 0/1 are exact in bf16 and the MXU
accumulates in float32), which Mosaic lowers.

* :func:`kth_largest_bits`: the bit pattern of each row's ``k``-th largest
  magnitude, by bisection over the 31 bits of ``|x|``'s int32 pattern (31
  counting passes, each a compare and a lane reduction).
* :func:`exclusive_rank`: prefix counts in element order (one ``(R, 128) x
  (128, 128)`` triangular matmul per 128 columns).
* :func:`select_topk`: exactly ``k`` entries per row, ties at the threshold
  broken by position.
* :func:`compact`: the selected (position, value) pairs in slot order, one
  masked lane reduction per slot.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jax.experimental.pallas import tpu as pltpu

#: Rows (blocks) per program: one vreg of sublanes.
ROWS = 8
#: Lanes of a vreg.
LANES = 128


def round_up(n: int, m: int) -> int:
  """Smallest multiple of ``m`` that is ``>= max(n, 1)``."""
  return -(-max(int(n), 1) // m) * m


def magnitude_bits(a: jax.Array, valid: jax.Array) -> jax.Array:
  """Bit pattern of ``|a|`` as int32 (monotone in ``|a|``); -1 where invalid."""
  bits = lax.bitcast_convert_type(a, jnp.int32) & 0x7FFFFFFF
  # The largest NaN payload is clamped so that ``max + 1`` cannot overflow.
  return jnp.where(valid, jnp.minimum(bits, 0x7FFFFFFE), -1)


def _count(planes: Sequence[jax.Array], pred) -> jax.Array:
  """``(R, 1)`` float32: entries of all planes where ``pred(plane)`` holds."""
  total = None
  for x in planes:
    c = jnp.sum(jnp.where(pred(x), 1.0, 0.0), axis=1, keepdims=True)
    total = c if total is None else total + c
  return total


def kth_largest_bits(mags: Sequence[jax.Array], k: jax.Array) -> jax.Array:
  """Per row, the largest ``T`` with ``count(mag >= T) >= k`` (int32 ``(R, 1)``).

  For ``1 <= k <= count(mag >= 0)`` that is the bit pattern of the ``k``-th
  largest magnitude; rows with ``k = 0`` get ``0x7FFFFFFF``, above every
  magnitude. Built bit by bit from the top (bisection over the int32
  patterns): 31 passes of one compare and one reduction per entry.

  Args:
    mags: the planes' magnitudes from :func:`magnitude_bits`, ``(R, W)``.
    k: entries to select per row, float32 ``(R, 1)``.
  """
  def body(i, t):
    bit = jnp.left_shift(jnp.int32(1), 30 - i)
    probe = t | bit
    return jnp.where(_count(mags, lambda x: x >= probe) >= k, probe, t)

  t0 = jnp.zeros(k.shape, jnp.int32)
  return lax.fori_loop(0, 31, body, t0)


def _triangle() -> jax.Array:
  """``(128, 128)`` bf16 with 1 where row < column (exclusive prefix)."""
  row = lax.broadcasted_iota(jnp.int32, (LANES, LANES), 0)
  col = lax.broadcasted_iota(jnp.int32, (LANES, LANES), 1)
  return jnp.where(row < col, 1.0, 0.0).astype(jnp.bfloat16)


def _exclusive_prefix(flag: jax.Array, tri: jax.Array) -> jax.Array:
  """Exclusive prefix sum along the lanes of 0/1 float32 ``(R, W)``."""
  width = flag.shape[1]
  offset = jnp.zeros((flag.shape[0], 1), jnp.float32)
  parts = []
  for c in range(width // LANES):
    chunk = flag[:, c * LANES:(c + 1) * LANES]
    within = jnp.dot(chunk.astype(jnp.bfloat16), tri,
                     preferred_element_type=jnp.float32)
    parts.append(within + offset)
    offset = offset + jnp.sum(chunk, axis=1, keepdims=True)
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def exclusive_rank(flags: Sequence[jax.Array]) -> list[jax.Array]:
  """Exclusive prefix counts of 0/1 float32 planes, in element order.

  Element ``j * P + p`` (column ``j`` of plane ``p``) gets the number of
  flagged elements before it: those of columns ``< j`` in every plane plus
  those of column ``j`` in planes ``< p``.
  """
  tri = _triangle()
  before = None
  for f in flags:
    e = _exclusive_prefix(f, tri)
    before = e if before is None else before + e
  ranks = []
  for f in flags:
    ranks.append(before)
    before = before + f
  return ranks


def select_topk(mags: Sequence[jax.Array], k: jax.Array) -> list[jax.Array]:
  """Boolean planes selecting exactly ``k`` largest magnitudes per row.

  Every entry above the ``k``-th largest magnitude is taken, then the first
  entries (in element order) equal to it until ``k`` are taken.

  Args:
    mags: int32 planes from :func:`magnitude_bits` (``-1``: never selected).
    k: float32 ``(R, 1)``, at most the number of valid entries of the row.
  """
  t = kth_largest_bits(mags, k)
  above = [x > t for x in mags]
  need = k - _count(mags, lambda x: x > t)
  tie = [jnp.where(x == t, 1.0, 0.0) for x in mags]
  ranks = exclusive_rank(tie)
  return [a | ((f > 0) & (r < need)) for a, f, r in zip(above, tie, ranks)]


def compact(sel: Sequence[jax.Array], positions: Sequence[jax.Array],
            values: Sequence[jax.Array], k: int, slots: int
            ) -> tuple[jax.Array, jax.Array]:
  """The selected ``(position, value)`` pairs of each row in slot order.

  Slot ``s`` receives the ``s``-th selected entry in element order (one
  masked reduction per slot and plane: no scatter); slots past a row's
  selection hold ``(0, 0)``.

  Args:
    sel: boolean planes ``(R, W)``.
    positions: float32 planes, the block-relative position of each entry.
    values: float32 planes.
    k: number of slots written (``<= slots``).
    slots: lanes of the result, a multiple of 128.

  Returns:
    ``(positions, values)``, float32 ``(R, slots)``.
  """
  flags = [jnp.where(s, 1.0, 0.0) for s in sel]
  # Exact integers below 2^24: compared with the loop's int32 slot.
  ranks = [r.astype(jnp.int32) for r in exclusive_rank(flags)]
  rows = sel[0].shape[0]
  slot = lax.broadcasted_iota(jnp.int32, (rows, slots), 1)

  def body(s, carry):
    idx, val = carry
    p_sum = jnp.zeros((rows, 1), jnp.float32)
    v_sum = jnp.zeros((rows, 1), jnp.float32)
    for f, r, pos, v in zip(sel, ranks, positions, values):
      hit = f & (r == s)
      p_sum = p_sum + jnp.sum(jnp.where(hit, pos, 0.0), axis=1, keepdims=True)
      v_sum = v_sum + jnp.sum(jnp.where(hit, v, 0.0), axis=1, keepdims=True)
    here = slot == s
    return jnp.where(here, p_sum, idx), jnp.where(here, v_sum, val)

  zero = jnp.zeros((rows, slots), jnp.float32)
  return lax.fori_loop(0, k, body, (zero, zero))


def lane_broadcast_value(ref) -> jax.Array:
  """``(R, 1)`` from a ``(R, 128)`` ref holding one value per row in every
  lane (a lane reduction: no narrow load or lane slice)."""
  return jnp.max(ref[...], axis=1, keepdims=True)


def block_rows(program: jax.Array, rows: int) -> jax.Array:
  """Block index of each row of ``program``, int32 ``(rows, 1)``."""
  return program * rows + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)


def per_block(block: jax.Array, num_blocks: int, full, last) -> jax.Array:
  """``full`` for blocks before the last, ``last`` for it, 0 past it."""
  return jnp.where(block < num_blocks - 1, full,
                   jnp.where(block == num_blocks - 1, last, 0))


__all__ = ["ROWS", "LANES", "round_up", "magnitude_bits", "kth_largest_bits",
           "exclusive_rank", "select_topk", "compact", "lane_broadcast_value",
           "block_rows", "per_block"]


def tpu_params():
  """Mosaic TPU compiler parameters: every grid axis is independent."""
  return pltpu.CompilerParams(dimension_semantics=("parallel",))

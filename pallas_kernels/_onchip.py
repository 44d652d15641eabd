"""Building blocks of the GPU kernel bodies (values held on chip).

A block of ``P`` elements (``P`` a power of two) is held as an ``(P // 2, 2)``
array: entry ``(j, c)`` is element ``2 j + c``. That is the natural layout of
4-bit codes (byte ``j`` holds the codes of elements ``2 j`` and ``2 j + 1``),
so dequantization, quantization and packing need no data movement between
threads.

A program may hold several blocks (``rows``): arrays are ``(rows, P/2, 2)``
and per-block scalars ``(rows,)`` vectors. (Keeping per-block values as
vectors also avoids a mistyping in the Triton lowering of ``jnp.where`` with
a rank-0 predicate and Python constants.)

These helpers are traced inside Pallas kernels (Triton back end, or interpret
mode on CPU); they use only operations the Triton lowering supports:
element-wise arithmetic, reductions, ``jnp.cumsum``, ``lax.while_loop``,
``lax.cond`` and masked (scattered) loads, stores and atomics.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp
from jax import lax

# 2^23 as float32: adding it to a small non-negative integer-valued float
# leaves the integer in the low mantissa bits (and the reverse).
_MAGIC = 8388608.0
_MAGIC_BITS = 0x4B000000


def small_int_to_float(x: jax.Array) -> jax.Array:
  """Exact ``float32(x)`` for int32 ``0 <= x < 2^23`` with two full-rate ops.

  (``convert`` runs on the GPU's quarter-rate conversion unit.)
  """
  return lax.bitcast_convert_type(x | _MAGIC_BITS, jnp.float32) - _MAGIC


def small_float_to_int(x: jax.Array) -> jax.Array:
  """Exact ``int32(x)`` for integer-valued float32 ``0 <= x < 2^23``."""
  return lax.bitcast_convert_type(x + _MAGIC, jnp.int32) & 0x7FFFFF


def pair_iota(rows: int, h: int) -> tuple[jax.Array, jax.Array]:
  """``(position, column)`` int32 arrays of shape ``(rows, h, 2)``."""
  shape = (rows, h, 2)
  row = lax.broadcasted_iota(jnp.int32, shape, 1)
  col = lax.broadcasted_iota(jnp.int32, shape, 2)
  return 2 * row + col, col


def per_row(v: jax.Array) -> jax.Array:
  """``(rows,)`` -> ``(rows, 1, 1)``, to broadcast against a block."""
  return v[:, None, None]


def row_sum(x: jax.Array) -> jax.Array:
  """Sum of each row's block: ``(rows, h, 2)`` -> ``(rows,)``."""
  return jnp.sum(x, axis=(1, 2))


def exclusive_rank(flag: jax.Array, col: jax.Array) -> jax.Array:
  """Exclusive prefix count of ``flag`` (int32 0/1) in element order per row."""
  first = jnp.sum(jnp.where(col == 0, flag, 0), axis=2)
  pair = jnp.sum(flag, axis=2)
  before = jnp.cumsum(pair, axis=1) - pair
  return before[:, :, None] + jnp.where(col == 1, first[:, :, None], 0)


def magnitude_bits(a: jax.Array, valid: jax.Array) -> jax.Array:
  """Bit pattern of ``|a|`` as int32 (monotone in ``|a|``); -1 where invalid."""
  bits = lax.bitcast_convert_type(a, jnp.int32) & 0x7FFFFFFF
  # The largest NaN payload is clamped so that ``max + 1`` cannot overflow.
  return jnp.where(valid, jnp.minimum(bits, 0x7FFFFFFE), -1)


def count_at_least(mag: jax.Array, probe: jax.Array) -> jax.Array:
  """Per row, how many entries have ``mag >= probe`` (``probe >= 1``).

  ``probe - 1 - mag`` is negative exactly where ``mag >= probe``, so its
  sign bit is the indicator: one subtraction and one shift-and-add per
  entry (the GPU fuses the shift into the add) instead of a compare, a
  select and an add. No overflow: ``mag`` is in ``[-1, 2^31 - 2]`` and
  ``probe`` in ``[1, 2^31 - 1]``.
  """
  below = per_row(probe - 1) - mag
  return row_sum(lax.shift_right_logical(below, jnp.int32(31)))


#: One octave of float32 bit patterns (the exponent's unit).
_OCTAVE = 1 << 23


def _log_count(c: jax.Array) -> jax.Array:
  """``~2^23 * log2(c + 1/2) + const``: the float bit pattern of ``c + 1/2``."""
  return lax.bitcast_convert_type(c.astype(jnp.float32) + 0.5, jnp.int32)


def kth_threshold(mag: jax.Array, k: jax.Array, nvalid: jax.Array
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-row threshold of the ``k`` largest entries of ``mag`` (int32 >= 0).

  Searches, for every row at once, the bit pattern of the ``k``-th largest
  magnitude with a bracket ``[lo, hi)`` such that ``count(mag >= lo) >= k >
  count(mag >= hi)``. Each pass counts the entries at or above one probe
  (one compare and one add per entry, one reduction):

  * while no lower bound is known, probes step down from the largest
    magnitude by 1, 2, 4, ... octaves;
  * then the probe interpolates linearly between the bracket ends in bit
    patterns (~ ``log|x|``) against the bit patterns of the counts (~
    ``log count``): a power-law tail model that costs a few integer and
    float operations, no transcendental functions;
  * an interpolation that did not halve the bracket is followed by a
    bisection, so that the bracket always shrinks geometrically.

  It stops when a probe counts exactly ``k`` or the bracket holds one bit
  pattern (the ``k``-th magnitude is then tied). On Gaussian-like data and
  on MicroAdam's gradient-plus-error blocks it makes 6-10 passes (at most
  ~35, on heavily tied data). Rows that are done wait for the others.

  Args:
    mag: int32 magnitudes ``(rows, h, 2)`` (``-1``: never selected).
    k: entries to select per row, int32 ``(rows,)``, ``<= nvalid``.
    nvalid: entries with ``mag >= 0`` per row, int32 ``(rows,)``.

  Returns:
    ``(at_least, tie, need)``, each ``(rows,)``: select every entry with
    ``mag >= at_least`` plus the first ``need`` entries (in element order)
    with ``mag == tie``.
  """
  top = jnp.max(mag, axis=(1, 2))
  zero = jnp.zeros_like(k)
  log_k = _log_count(k)

  def cond(s):
    lo, clo, hi = s[:3]
    active = (hi - lo > 1) & (clo != k) & (k > 0)
    return jnp.max(jnp.where(active, 1, 0)) > 0

  def body(s):
    lo, clo, hi, chi, bisect, down = s
    width = hi - lo
    gallop = lo == 0
    step_down = jnp.maximum(top - jnp.minimum(down, 255) * _OCTAVE, 1)
    frac = ((_log_count(clo) - log_k).astype(jnp.float32)
            / jnp.maximum(_log_count(clo) - _log_count(chi), 1).astype(
                jnp.float32))
    guess = lo + (width.astype(jnp.float32) * frac).astype(jnp.int32)
    probe = jnp.where(gallop, step_down,
                      jnp.where(bisect == 1, lo + width // 2, guess))
    probe = jnp.minimum(jnp.maximum(probe, lo + 1), hi - 1)
    c = count_at_least(mag, probe)
    up = c >= k
    lo = jnp.where(up, probe, lo)
    clo = jnp.where(up, c, clo)
    hi = jnp.where(up, hi, probe)
    chi = jnp.where(up, chi, c)
    # An interpolation that did not halve the bracket: bisect next.
    bisect = jnp.where(~gallop & (bisect == 0) & (hi - lo > width // 2), 1, 0)
    return lo, clo, hi, chi, bisect, jnp.where(gallop, 2 * down, down)

  lo, clo, hi, chi, _, _ = lax.while_loop(
      cond, body, (zero, nvalid, top + 1, zero, zero, zero + 1))
  found = clo == k
  at_least = jnp.where(found, lo, hi)
  need = jnp.where(found | (k <= 0), 0, k - chi)
  return at_least, lo, need


def select_topk(mag: jax.Array, col: jax.Array, k: jax.Array,
                nvalid: jax.Array) -> jax.Array:
  """Boolean mask of exactly ``min(k, nvalid)`` largest ``mag`` per row.

  Args:
    mag: int32 magnitudes ``(rows, h, 2)`` from :func:`magnitude_bits`.
    col: the column iota of :func:`pair_iota`.
    k: entries to select per row ``(rows,)``.
    nvalid: valid entries per row ``(rows,)``.

  Ties at the threshold are broken by element order (lowest first).
  """
  k = jnp.minimum(k, nvalid)
  at_least, tie, need = kth_threshold(mag, k, nvalid)
  above = (mag >= per_row(at_least)) & per_row(k > 0)

  def with_ties():
    is_tie = jnp.where(mag == per_row(tie), 1, 0)
    rank = exclusive_rank(is_tie, col)
    return above | ((is_tie == 1) & (rank < per_row(need)))

  return lax.cond(jnp.max(need) > 0, with_ties, lambda: above)


def rows_of(program: jax.Array, rows: int) -> jax.Array:
  """Block indices ``(rows,)`` handled by ``program`` (``rows`` per program)."""
  return program * rows + lax.broadcasted_iota(jnp.int32, (rows,), 0)


def per_block(b: jax.Array, num_blocks: int, full: int, last: int
              ) -> jax.Array:
  """``full`` for blocks before the last, ``last`` for the last (ragged) one.

  ``b``: block indices ``(rows,)`` (:func:`rows_of`).
  """
  return jnp.where(b == num_blocks - 1, last, full)


class ProgramBlocks(NamedTuple):
  """What :func:`program_blocks` returns."""
  b: jax.Array       # block indices (rows,)
  length: jax.Array  # real entries of each block (rows,)
  pos: jax.Array     # position of each entry in its block (rows, half, 2)
  col: jax.Array     # column of each entry's pair (rows, half, 2)
  valid: jax.Array   # pos < length, (rows, half, 2)


def program_blocks(rows: int, half: int, num_blocks: int, block: int,
                   last_len: int) -> ProgramBlocks:
  """The blocks the current program holds, as pairs, and their real entries.

  Every kernel body of this package maps program ``i`` (of a 1-D grid of
  ``num_blocks // rows``) to blocks ``i * rows`` to ``i * rows + rows - 1``,
  each held as ``(half, 2)`` pairs; the tensor's last block holds
  ``last_len`` real entries, the others ``block`` (the rest is padding).

  Returns:
    ``(b, length, pos, col, valid)``: the block indices and each block's
    real length ``(rows,)``, the position and column iotas ``(rows, half,
    2)`` (:func:`pair_iota`) and whether each position is a real entry.
  """
  b = rows_of(pl.program_id(0), rows)
  length = per_block(b, num_blocks, block, last_len)
  pos, col = pair_iota(rows, half)
  return ProgramBlocks(b, length, pos, col, pos < per_row(length))


def scatter_index(index: jax.Array, mask: jax.Array, size: int) -> jax.Array:
  """``index`` where ``mask``, else ``size`` (out of bounds: never written).

  Masked stores skip those lanes on GPU; in interpret mode a scattered store
  is a ``.at[].set`` that drops out-of-bounds indices, so the masked lanes
  must not alias a lane that is written.
  """
  return jnp.where(mask, index, size)


def scatter_add(ref, index: jax.Array, value: jax.Array, mask: jax.Array,
                interpret: bool) -> None:
  """``ref[index] += value`` where ``mask`` (duplicates summed), on a 1-D ref.

  On GPU this is one masked atomic add per lane. Interpret mode has no
  masked atomics and turns duplicate indices of an atomic into one write, so
  it reads the ref, scatter-adds and writes it back.
  """
  size = ref.shape[0]
  if interpret:
    current = ref[...]
    ref[...] = current.at[scatter_index(index, mask, size)].add(
        jnp.where(mask, value, 0).astype(current.dtype), mode="drop")
  else:
      pltriton.atomic_add(ref, index, value, mask=mask)


def store_scattered(ref, index: jax.Array, value: jax.Array,
                    mask: jax.Array) -> None:
  """``ref[index] = value`` where ``mask``, on a 1-D ref."""
  size = ref.shape[0]
  pltriton.store(ref.at[scatter_index(index, mask, size)],
                 value.astype(ref.dtype), mask=mask)


def load_scattered(ref, index: jax.Array, mask: jax.Array, other,
                   volatile: bool = False) -> jax.Array:
  """``ref[index]`` where ``mask``, else ``other``, on a 1-D ref.

  ``volatile`` loads bypass the L1 cache: use them for data that other
  threads of the program wrote (through stores or atomics) after a barrier.
  """
  safe = jnp.where(mask, index, 0)
  return pltriton.load(ref.at[safe], mask=mask, other=other,
                       volatile=volatile)


def load_block(ref, volatile: bool = False) -> jax.Array:
  """``ref[...]`` (a view), optionally volatile (see :func:`load_scattered`)."""
  return pltriton.load(ref, volatile=volatile)


__all__ = [
    "small_int_to_float", "small_float_to_int", "pair_iota", "per_row",
    "row_sum", "rows_of", "per_block", "ProgramBlocks",
    "program_blocks", "exclusive_rank",
    "magnitude_bits", "count_at_least", "kth_threshold",
    "select_topk", "scatter_index", "scatter_add", "store_scattered",
    "load_scattered", "load_block",
]

"""MicroAdam's whole per-leaf step as one Triton kernel (official Triton).

The kernel body only: it imports :mod:`triton` at the top, so it is imported
only where a GPU step is traced (see :mod:`pallas_kernels.gpu.step`, the
JAX wrapper called through ``jax-triton``). One program handles one block of
``B`` entries of the flattened gradient (Top-K and quantization blocks
coincide) and moves its bytes once:

1. ``a = g + Q^{-1}(e)``: the gradient and the block's packed 4-bit codes are
   read once and held in registers;
2. Top-K of ``|a|``: the exact threshold by an interpolating count search
   on the float32 bit patterns (6-10 counting passes over registers), then
   the selected entries (ties at the threshold taken by position) compacted
   in position order by one prefix count and written as the window's new
   row in place;
3. ``e' = Q(a with the selection zeroed)``: new min/max and codes written;
4. ``u = m_hat / (sqrt(v_hat) + eps)`` for the block: zeros written
   densely, then the window's ``m k`` entries of the block (the new row read
   back after a barrier of the program: same-CTA ordering) sorted by index
   (``tl.sort`` of ``index * E + entry`` keys), summed per index by a
   segmented scan, and ``u`` computed and stored for each distinct index
   only (one division and square root per entry of the window, not per
   entry of the block).

Offsets are 64-bit (the program's block index is widened before it is
multiplied), so a leaf of any size runs here: no leaf falls back to the XLA
path for its size. The update's division and square root are the IEEE-rounded
ones (``div_rn``, ``sqrt_rn``); the codes divide by the block's step once
and multiply per entry.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _segment_sum(k1, m1, v1, k2, m2, v2):
  """Combine of a segmented inclusive scan over entries sorted by key."""
  same = k1 == k2
  return k2, tl.where(same, m1 + m2, m2), tl.where(same, v1 + v2, v2)


@triton.jit
def _log_count(c):
  """``~2^23 log2(c + 1/2) + const``: the float32 bit pattern of ``c + 1/2``."""
  return (c.to(tl.float32) + 0.5).to(tl.int32, bitcast=True)


@triton.jit
def _count_at_least(mag, probe):
  """How many entries have ``mag >= probe`` (``probe >= 1``): one subtract
  and a sign-bit add per entry."""
  below = (probe - 1) - mag
  return tl.sum((below.to(tl.uint32, bitcast=True) >> 31).to(tl.int32))


@triton.jit
def _kth_search(mag, k, nvalid):
  """Threshold of the ``k`` largest ``mag`` by an interpolating count search.

  Keeps a bracket ``[lo, hi)`` of bit patterns with ``count(mag >= lo) >= k
  > count(mag >= hi)``; each pass counts the entries at or above one probe.
  While no lower end is known the probes step down from the largest
  magnitude by 1, 2, 4, ... octaves; then they interpolate between the ends
  in bit patterns (~ log |x|) against the counts' bit patterns (~ log
  count), with a bisection after any probe that did not halve the bracket.
  6-10 passes on gradient-like blocks.

  Returns:
    ``(at_least, tie, need)``: select every entry with ``mag >= at_least``
    and the first ``need`` (by position) with ``mag == tie``.
  """
  top = tl.max(mag)
  zero = k * 0
  lo = zero
  clo = nvalid + zero
  hi = top + 1
  chi = zero
  bisect = zero
  down = zero + 1
  log_k = _log_count(k)
  while (hi - lo > 1) & (clo != k) & (k > 0):
    width = hi - lo
    gallop = lo == 0
    step_down = tl.maximum(top - tl.minimum(down, 255) * 8388608, 1)
    frac = ((_log_count(clo) - log_k).to(tl.float32)
            / tl.maximum(_log_count(clo) - _log_count(chi), 1).to(tl.float32))
    guess = lo + (width.to(tl.float32) * frac).to(tl.int32)
    probe = tl.where(gallop, step_down,
                     tl.where(bisect == 1, lo + width // 2, guess))
    probe = tl.minimum(tl.maximum(probe, lo + 1), hi - 1)
    c = _count_at_least(mag, probe)
    up = c >= k
    lo = tl.where(up, probe, lo)
    clo = tl.where(up, c, clo)
    hi = tl.where(up, hi, probe)
    chi = tl.where(up, chi, c)
    bisect = tl.where((~gallop) & (bisect == 0) & (hi - lo > width // 2),
                      1, 0)
    down = tl.where(gallop, 2 * down, down)
  found = clo == k
  at_least = tl.where(found, lo, hi)
  need = tl.where(found | (k <= 0), 0, k - chi)
  return at_least, lo, need


@triton.jit
def _flat_exclusive_rank(flag):
  """Exclusive prefix count of ``flag`` ``(H, 2)`` in element order ``2j + c``
  (one scan of the flattened tile)."""
  flat = tl.reshape(flag, [flag.shape[0] * 2])
  return tl.reshape(tl.cumsum(flat, 0) - flat, [flag.shape[0], 2])


@triton.jit
def microadam_step_kernel(
    g_ptr, codes_in, lo_in, hi_in, widx_in, wval_in, w1_ptr, w2_ptr,
    row_ptr, eps_ptr,
    codes_ptr, lo_ptr, hi_ptr, widx_ptr, wval_ptr, u_ptr,
    B: tl.constexpr, TILE: tl.constexpr, NB: tl.constexpr,
    LAST_LEN: tl.constexpr,
    K: tl.constexpr, LAST_K: tl.constexpr, KP: tl.constexpr,
    M: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
    WIDE_KEYS: tl.constexpr):
  """One MicroAdam step of one block (see the module docstring).

  The block is held as ``(TILE / 2, 2)`` pairs, element ``2 j + c`` at
  ``[j, c]``: the layout of the packed codes (byte ``j`` holds elements
  ``2 j`` and ``2 j + 1``), so that unpacking and packing stay inside each
  thread. Inputs ``codes_in`` ... ``wval_in`` are aliased to the outputs
  ``codes_ptr`` ... ``wval_ptr`` (the state is updated in place); the kernel
  reads and writes them through the output pointers.

  Args:
    g_ptr: the flattened gradient ``(d,)`` (any float dtype).
    codes_in, lo_in, hi_in, widx_in, wval_in: aliases of the outputs.
    w1_ptr, w2_ptr: the rows' moment weights ``(M,)`` float32 (0 for rows
      not written yet).
    row_ptr: int32 ``(1,)``, the window row the new entries go to.
    eps_ptr: float32 ``(1,)``, added to ``sqrt(v_hat)``.
    codes_ptr: packed 4-bit codes ``(NB, B // 2)`` uint8, in place.
    lo_ptr, hi_ptr: per-block min/max ``(NB,)`` float32, in place.
    widx_ptr, wval_ptr: the window ``(M, NB, K)``, in place.
    u_ptr: the update direction ``(d,)``.
    B: entries per block (even).
    TILE: next power of two of ``B`` (the program's tile).
    NB: number of blocks; LAST_LEN: entries of the last block.
    K: entries kept per block; LAST_K: in the last block; KP: next power of
      two of ``K``.
    M: window rows; E: entries of the window of one block, ``M * K``; EP:
      next power of two of ``E``.
    WIDE_KEYS: sort keys in int64 (``B * EP >= 2**31``).
  """
  H: tl.constexpr = TILE // 2
  RANK_T: tl.constexpr = tl.uint32 if TILE < 65536 else tl.uint64
  RANK_SHIFT: tl.constexpr = 16 if TILE < 65536 else 32
  pid = tl.program_id(0).to(tl.int64)
  base = pid * B
  is_last = pid == NB - 1
  length = tl.where(is_last, LAST_LEN, B)
  k_b = tl.where(is_last, LAST_K, K)
  pair = tl.arange(0, H)
  col = tl.arange(0, 2)
  pos = 2 * pair[:, None] + col[None, :]
  valid = pos < length

  # 1. a = g + Q^{-1}(e).
  g = tl.load(g_ptr + base + pos, mask=valid, other=0.0).to(tl.float32)
  byte = tl.load(codes_ptr + pid * (B // 2) + pair, mask=pair < B // 2,
                 other=0).to(tl.int32)
  code = (byte[:, None] >> (4 * col[None, :])) & 15
  lo = tl.load(lo_ptr + pid)
  hi = tl.load(hi_ptr + pid)
  scale = tl.div_rn(hi - lo, 15.0)
  a = tl.where(valid, g + (code.to(tl.float32) * scale + lo), 0.0)

  # 2. Top-K of |a| on its float32 bit patterns (monotone; -1: padding).
  mag = tl.where(valid,
                 tl.minimum(a.to(tl.int32, bitcast=True) & 0x7FFFFFFF,
                            0x7FFFFFFE), -1)
  at_least, tie, need = _kth_search(mag, k_b, length)
  # Entries above the threshold, and ties at it (the first `need` of them
  # by position are selected): both prefix counts in one scan, as the low
  # and high halves of one word (no branch; 126-128 registers per thread at
  # 8 warps, where two scans and a branch for ties took 147: two programs
  # per SM instead of one).
  above = (mag >= at_least) & (k_b > 0)
  tied = (mag == tie) & (~above) & (need > 0)
  rank = _flat_exclusive_rank(above.to(RANK_T)
                              + (tied.to(RANK_T) << RANK_SHIFT))
  tie_rank = (rank >> RANK_SHIFT).to(tl.int32)
  sel = above | (tied & (tie_rank < need))
  slot = ((rank & ((1 << RANK_SHIFT) - 1)).to(tl.int32)
          + tl.minimum(tie_rank, need))

  # The new window row, in position order; empty slots of the last block
  # hold (0, 0).
  row = tl.load(row_ptr)
  row_base = (row.to(tl.int64) * NB + pid) * K
  vals = a.to(wval_ptr.dtype.element_ty)
  tl.store(widx_ptr + row_base + slot, pos.to(widx_ptr.dtype.element_ty),
           mask=sel)
  tl.store(wval_ptr + row_base + slot, vals, mask=sel)
  if k_b < K:
    slots = tl.arange(0, KP)
    empty = (slots >= k_b) & (slots < K)
    tl.store(widx_ptr + row_base + slots,
             tl.zeros([KP], widx_ptr.dtype.element_ty), mask=empty)
    tl.store(wval_ptr + row_base + slots,
             tl.zeros([KP], wval_ptr.dtype.element_ty), mask=empty)

  # 3. e' = Q(a with the selection zeroed), min/max over the block's entries.
  rest = tl.where(sel, 0.0, a)
  new_lo = tl.min(tl.where(valid, rest, float("inf")))
  new_hi = tl.max(tl.where(valid, rest, -float("inf")))
  new_scale = tl.div_rn(new_hi - new_lo, 15.0)
  # One division per block; per entry a multiply (XLA divides per entry:
  # a one-ulp difference moves an entry at a .5 boundary by one level).
  inv = tl.div_rn(1.0, tl.where(new_scale > 0, new_scale, 1.0))
  c = tl.floor((rest - new_lo) * inv + 0.5)
  c = tl.minimum(tl.maximum(c, 0.0), 15.0)
  c = tl.where(valid, tl.where(new_scale > 0, c, 0.0), 0.0).to(tl.int32)
  packed = tl.sum(c << (4 * col[None, :]), axis=1)
  tl.store(codes_ptr + pid * (B // 2) + pair, packed.to(tl.uint8),
           mask=pair < B // 2)
  tl.store(lo_ptr + pid, new_lo)
  tl.store(hi_ptr + pid, new_hi)

  # 4. u from the window: 0 where no row holds an entry, written densely;
  # then every row's entries (the new row read back after a barrier of the
  # program) sorted by index, summed per index, and their u stored over it.
  tl.store(u_ptr + base + pos, tl.zeros([H, 2], u_ptr.dtype.element_ty),
           mask=valid)
  eps = tl.load(eps_ptr)
  tl.debug_barrier()
  ent = tl.arange(0, EP)
  real = ent < E
  old = (row + 1 + ent // K) % M
  src = (old.to(tl.int64) * NB + pid) * K + ent % K
  idx = tl.load(widx_ptr + src, mask=real, other=0).to(tl.int32)
  val = tl.load(wval_ptr + src, mask=real, other=0.0).to(tl.float32)
  cm = tl.load(w1_ptr + old, mask=real, other=0.0) * val
  cv = tl.load(w2_ptr + old, mask=real, other=0.0) * (val * val)
  if WIDE_KEYS:
    keys = tl.where(real, idx.to(tl.int64), B).to(tl.int64) * EP + ent
  else:
    keys = tl.where(real, idx, B) * EP + ent
  keys = tl.sort(keys, 0)
  order = (keys % EP).to(tl.int32)
  sidx = (keys // EP).to(tl.int32)
  sm = tl.gather(cm, order, 0)
  sv = tl.gather(cv, order, 0)
  _, sm, sv = tl.associative_scan((sidx, sm, sv), 0, _segment_sum)
  nxt = tl.gather(sidx, tl.minimum(ent + 1, EP - 1), 0)
  last = (sidx != nxt) | (ent == EP - 1)
  inside = sidx < length
  u = tl.div_rn(sm, tl.sqrt_rn(sv) + eps)
  tl.store(u_ptr + base + tl.where(inside, sidx, 0),
           u.to(u_ptr.dtype.element_ty), mask=last & inside)

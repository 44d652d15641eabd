"""MicroAdam's whole per-leaf step as two Triton kernels (official Triton).

The kernel bodies only: this module imports :mod:`triton` at the top, so it
is imported only where a GPU step is traced (see
:mod:`pallas_kernels.gpu.step`, the JAX wrapper called through
``jax-triton``). In both kernels one program handles one block of ``B``
entries of the flattened gradient (Top-K and quantization blocks coincide).

:func:`microadam_topk_kernel` reads the gradient and the codes from memory
once and writes the codes and one window row once:

1. ``a = g + Q^{-1}(e)``: the block is held as rows of 8 consecutive
   entries, so that each thread reads the gradient in 16-byte vectors and
   unpacks its rows' codes itself;
2. Top-K of ``|a|``: the exact threshold by an interpolating count search
   (6-10 counting passes over registers, each a float compare and a float
   add per entry and one reduction); then, sub-tile by sub-tile, the
   selected entries (ties at the threshold taken by position) compacted in
   position order by a prefix count and written as the window's new row in
   place;
3. ``e' = Q(a with the selection zeroed)``: new min/max and codes written.

The sub-tiles re-read the block from the L1 cache (the program read it a
moment before) rather than hold it in registers: 64 registers per thread
let eight 4-warp programs share an SM, where a block held through the
whole step took 254 registers and two programs (on an H100, one 4096 x
11008 leaf: 0.191 ms against 0.316 ms for that build;
``benchmarks/NOTES_kernels.md``).

:func:`microadam_u_kernel` then computes

4. ``u = m_hat / (sqrt(v_hat) + eps)`` for the block: zeros written
   densely, then the window's ``m k`` entries of the block sorted by index
   (a bitonic sort of ``index * EP + entry`` keys), summed per index by a
   segmented scan, and ``u`` computed and stored for each distinct index
   only (one division and square root per entry of the window, not per
   entry of the block).

or, in its place, :func:`microadam_apply_kernel` computes the same ``u``
(:func:`_window_u`, one place for both) and updates the parameter in place,
``p <- p - lr (u + wd p)`` in float32, rounded once: no ``u`` is written and
``optax.apply_updates`` has nothing left to do. Without weight decay only
the window's distinct indices of the parameter are read and written.

Two kernels, not one: step 4 reads only the window, which step 3's kernel
has already written, so splitting costs no bytes, and each kernel runs at its
own warps and registers (the ``u`` kernel is fastest at one warp).

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
def _pair_bit(LOG_N: tl.constexpr, j: tl.constexpr):
  """Bit ``j`` of each position (0 or 1), shaped for a ``[2] * LOG_N``
  hypercube (axis ``LOG_N - 1 - j`` holds bit ``j``)."""
  return tl.reshape(tl.arange(0, 2), [1] * (LOG_N - j - 1) + [2] + [1] * j)


@triton.jit
def _exchange(h, flip, j: tl.constexpr, LOG_N: tl.constexpr):
  """One compare-exchange step of a bitonic network, at distance ``2^j``.

  Each entry of the hypercube ``h`` meets its partner (position xor
  ``2^j``) and keeps the smaller of the two where its bit ``j`` equals
  ``flip``, the larger elsewhere: one integer min or max per entry where
  both are in one thread (``tl.sort``'s exchange is a compare and a select
  per entry).
  """
  other = h ^ tl.xor_sum(h, LOG_N - 1 - j, True)
  upper = (flip ^ _pair_bit(LOG_N, j)) == 1
  return tl.where(upper, tl.maximum(h, other), tl.minimum(h, other))


@triton.jit
def _sort_distinct(x, LOG_N: tl.constexpr):
  """``x`` (``2^LOG_N`` distinct integers) in increasing order.

  The bitonic network of ``tl.sort`` with min/max exchanges: the same
  output for distinct keys, with 27 % fewer instructions for 512 int32 keys
  at one warp (ptxas for sm_90a: 1736 against 2384).
  """
  if LOG_N == 0:
    out = x
  else:
    h = tl.reshape(x, [2] * LOG_N)
    for stage in tl.static_range(1, LOG_N + 1):
      if stage < LOG_N:
        flip = _pair_bit(LOG_N, stage)
      else:
        flip = 0
      for i in tl.static_range(stage):
        h = _exchange(h, flip, stage - 1 - i, LOG_N)
    out = tl.reshape(h, x.shape)
  return out


@triton.jit
def _log_count(c):
  """``~2^23 log2(c + 1/2) + const``: the float32 bit pattern of ``c + 1/2``."""
  return (c.to(tl.float32) + 0.5).to(tl.int32, bitcast=True)


@triton.jit
def _count_at_least(a, probe):
  """How many entries have ``|a| >= probe`` (``probe >= 1``, a float32 bit
  pattern): per entry one float compare of ``|a|`` (an operand modifier)
  that yields 1.0 or 0.0, and one float add, both on the float pipes, which
  issue twice as fast as the integer ones (the sum is exact: at most
  ``2^24`` entries). The compares are IEEE (no flush to zero), so they
  order magnitudes as their bit patterns do, subnormals included.
  """
  p = probe.to(tl.float32, bitcast=True)
  return tl.sum(tl.where(tl.abs(a) >= p, 1.0, 0.0)).to(tl.int32)


@triton.jit
def _kth_search(a, k, nvalid):
  """Threshold of the ``k`` largest ``|a|`` by an interpolating count search.

  Magnitudes compare as the bit patterns of ``|a|`` (monotone). Keeps a
  bracket ``[lo, hi)`` of patterns with ``count(|a| >= lo) >= k >
  count(|a| >= hi)``; each pass counts the entries at or above one probe.
  While no lower end is known the probes step down from the largest
  magnitude by 1, 2, 4, ... octaves; then they interpolate between the ends
  in bit patterns (~ log |x|) against the counts' bit patterns (~ log
  count), with a bisection after any probe that did not halve the bracket.
  6-10 passes on gradient-like blocks (``a`` 0 for padding, which no probe
  counts).

  Returns:
    ``(at_least, tie, need)``: select every entry with ``|a| >= at_least``
    and the first ``need`` (by position) with ``|a| == tie``, in bit
    patterns.
  """
  top = tl.minimum(tl.max(a.to(tl.int32, bitcast=True) & 0x7FFFFFFF),
                   0x7FFFFFFE)
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
    c = _count_at_least(a, probe)
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
def _load_a(g_ptr, codes_ptr, pid, row0, length, lo, scale,
            B: tl.constexpr, ROWS: tl.constexpr, RW: tl.constexpr):
  """``a = g + Q^{-1}(e)`` for rows ``[row0, row0 + ROWS)`` of block ``pid``.

  The block is held as rows of ``RW`` consecutive entries (entry ``[r, n]``
  at position ``RW r + n``): each thread holds whole rows, so the gradient
  is read in 16-byte vectors, a row's packed codes (``RW / 2`` bytes, byte
  ``j`` holding entries ``2 j`` and ``2 j + 1``) unpack inside the thread,
  and prefix counts in position order run mostly inside the thread.

  Returns:
    ``(a, pos, valid)``, each ``(ROWS, RW)``: ``a`` float32 (0 past the
    block's ``length``), the entries' positions in the block, and
    ``pos < length``.
  """
  HW: tl.constexpr = RW // 2
  r = row0 + tl.arange(0, ROWS)
  pos = RW * r[:, None] + tl.arange(0, RW)[None, :]
  valid = pos < length
  g = tl.load(g_ptr + pid * B + pos, mask=valid, other=0.0).to(tl.float32)
  byte_at = HW * r[:, None] + tl.arange(0, HW)[None, :]
  byte = tl.load(codes_ptr + pid * (B // 2) + byte_at, mask=byte_at < B // 2,
                 other=0).to(tl.int32)
  code = tl.reshape(tl.join(byte & 15, byte >> 4), [ROWS, RW])
  # The code as a float without a conversion instruction: the bits of
  # 2^23 + code, less 2^23 (exact).
  code = (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
  a = tl.where(valid, g + (code * scale + lo), 0.0)
  return a, pos, valid


@triton.jit
def _exclusive_count(word, before, ROWS: tl.constexpr, RW: tl.constexpr):
  """Per entry of a ``(ROWS, RW)`` sub-tile, the sum of ``word`` over the
  entries before it in position order, plus ``before`` (the sum over the
  earlier sub-tiles); and ``before`` plus this sub-tile's sum."""
  flat = tl.reshape(word, [ROWS * RW])
  rank = tl.reshape(tl.cumsum(flat, 0) - flat, [ROWS, RW]) + before
  return rank, before + tl.sum(flat)


@triton.jit
def _row_and_codes(g_ptr, codes_ptr, widx_ptr, wval_ptr, pid, length, lo,
                   scale, row_base, at_least, tie, need, new_lo, new_scale,
                   inv, B: tl.constexpr, TILE: tl.constexpr,
                   SUB: tl.constexpr, RW: tl.constexpr, TIES: tl.constexpr):
  """Pass C of :func:`microadam_topk_kernel`, sub-tile by sub-tile: ``a``
  recomputed from the cached gradient and codes, the selection (``|a| >=
  at_least``, and with ``TIES`` the first ``need`` entries with ``|a| ==
  tie`` by position), its slots in the window's new row (a prefix count,
  carried across sub-tiles; with ``TIES`` the entries above the threshold
  and the tied ones counted in one scan, as the two halves of one word),
  the row's entries written, then the codes of ``a`` with the selection
  zeroed."""
  SUB_ROWS: tl.constexpr = SUB // RW
  HW: tl.constexpr = RW // 2
  RANK_T: tl.constexpr = tl.uint32 if TILE < 65536 else tl.uint64
  RANK_SHIFT: tl.constexpr = 16 if TILE < 65536 else 32
  carry = tl.zeros([1], RANK_T).sum()
  for t in range(TILE // SUB):
    a_t, pos_t, valid_t = _load_a(g_ptr, codes_ptr, pid, t * SUB_ROWS,
                                  length, lo, scale, B, SUB_ROWS, RW)
    mag_t = a_t.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    above = valid_t & (mag_t >= at_least)
    if TIES:
      tied = valid_t & (mag_t == tie) & (~above)
      rank, carry = _exclusive_count(
          above.to(RANK_T) + (tied.to(RANK_T) << RANK_SHIFT), carry,
          SUB_ROWS, RW)
      tie_rank = (rank >> RANK_SHIFT).to(tl.int32)
      sel = above | (tied & (tie_rank < need))
      slot = ((rank & ((1 << RANK_SHIFT) - 1)).to(tl.int32)
              + tl.minimum(tie_rank, need))
    else:
      rank, carry = _exclusive_count(above.to(RANK_T), carry, SUB_ROWS, RW)
      sel = above
      slot = rank.to(tl.int32)
    tl.store(widx_ptr + row_base + slot, pos_t.to(widx_ptr.dtype.element_ty),
             mask=sel)
    tl.store(wval_ptr + row_base + slot, a_t.to(wval_ptr.dtype.element_ty),
             mask=sel)
    rest = tl.where(sel, 0.0, a_t)
    # floor(t) clamped to [0, 15] is t clamped to [0, 15], truncated: no
    # rounding instruction (a NaN clamps to 0 either way).
    c = tl.minimum(tl.maximum((rest - new_lo) * inv + 0.5, 0.0), 15.0)
    c = tl.where(valid_t, tl.where(new_scale > 0, c, 0.0), 0.0).to(tl.int32)
    c0, c1 = tl.split(tl.reshape(c, [SUB_ROWS, HW, 2]))
    byte_at = (HW * (t * SUB_ROWS + tl.arange(0, SUB_ROWS))[:, None]
               + tl.arange(0, HW)[None, :])
    tl.store(codes_ptr + pid * (B // 2) + byte_at,
             (c0 | (c1 << 4)).to(tl.uint8), mask=byte_at < B // 2)


@triton.jit
def microadam_topk_kernel(
    g_ptr, codes_in, lo_in, hi_in, widx_in, wval_in, row_ptr,
    codes_ptr, lo_ptr, hi_ptr, widx_ptr, wval_ptr,
    B: tl.constexpr, TILE: tl.constexpr, NB: tl.constexpr,
    LAST_LEN: tl.constexpr,
    K: tl.constexpr, LAST_K: tl.constexpr, KP: tl.constexpr,
    RW: tl.constexpr, SUB: tl.constexpr):
  """Steps 1-3 of one block: error feedback, Top-K, the new row, the codes.

  Three passes over the block, which stays in the L1 cache between them:

  A. the block read from memory, ``a`` held in registers for the threshold
     search (every pass a count over registers and one reduction), then
     the new min/max of the block's error ``a`` with the selection zeroed
     (the entries below the threshold, and 0 for the selected ones);
  B. only where entries tie at the threshold: the tied entries left out
     (all but the first ``need`` by position) join the min/max;
  C. in sub-tiles of ``SUB`` entries, ``a`` recomputed from the cached
     gradient and codes: the selection, its slots in the window's new row
     by one prefix count carried from sub-tile to sub-tile, the row's
     entries written, then the codes of ``a`` with the selection zeroed
     (:func:`_row_and_codes`).

  Few registers (64 per thread at 4 warps and 8 entries per thread in the
  sub-tiles) let eight programs share an SM; re-reading the block from the
  L1 cache costs less than holding it in registers through pass C.

  Inputs ``codes_in`` ... ``wval_in`` are aliased to the outputs
  ``codes_ptr`` ... ``wval_ptr`` (the state is updated in place); the kernel
  reads and writes them through the output pointers.

  Args:
    g_ptr: the flattened gradient ``(d,)`` (any float dtype).
    codes_in, lo_in, hi_in, widx_in, wval_in: aliases of the outputs.
    row_ptr: int32 ``(1,)``, the window row the new entries go to.
    codes_ptr: packed 4-bit codes ``(NB, B // 2)`` uint8, in place.
    lo_ptr, hi_ptr: per-block min/max ``(NB,)`` float32, in place.
    widx_ptr, wval_ptr: the window ``(M, NB, K)``, in place (only row
      ``row`` is written).
    B: entries per block (even).
    TILE: next power of two of ``B`` (the program's tile).
    NB: number of blocks; LAST_LEN: entries of the last block.
    K: entries kept per block; LAST_K: in the last block; KP: next power of
      two of ``K``.
    RW: entries per row of the tile, ``min(8, TILE)``.
    SUB: entries per sub-tile of pass C (a power of two dividing ``TILE``).
  """
  ROWS: tl.constexpr = TILE // RW
  SUB_ROWS: tl.constexpr = SUB // RW
  pid = tl.program_id(0).to(tl.int64)
  is_last = pid == NB - 1
  length = tl.where(is_last, LAST_LEN, B)
  k_b = tl.where(is_last, LAST_K, K)
  lo = tl.load(lo_ptr + pid)
  hi = tl.load(hi_ptr + pid)
  scale = tl.div_rn(hi - lo, 15.0)

  # A. The threshold, then the min/max of the entries it leaves.
  a, _, _ = _load_a(g_ptr, codes_ptr, pid, 0, length, lo, scale, B, ROWS,
                    RW)
  bits = a.to(tl.int32, bitcast=True)
  at_least, tie, need = _kth_search(a, k_b, length)
  # Below the threshold (or below the tie when entries tie at it). Every
  # block keeps at least one entry (k >= 1), zeroed in the error: 0 is
  # among the values quantized, so the padding's zeros change nothing (and
  # no block-sized mask lives across the search).
  floor = tl.where(need > 0, tie, at_least)
  below = (bits & 0x7FFFFFFF) < floor
  new_lo = tl.minimum(tl.min(tl.where(below, a, float("inf"))), 0.0)
  new_hi = tl.maximum(tl.max(tl.where(below, a, -float("inf"))), 0.0)

  # B. Ties at the threshold: the tied entries past the first `need` (by
  # position) stay in the error.
  if need > 0:
    ties_before = need * 0
    for t in range(TILE // SUB):
      a_t, pos_t, valid_t = _load_a(g_ptr, codes_ptr, pid, t * SUB_ROWS,
                                    length, lo, scale, B, SUB_ROWS, RW)
      tied = valid_t & ((a_t.to(tl.int32, bitcast=True) & 0x7FFFFFFF) == tie)
      rank, ties_before = _exclusive_count(tied.to(tl.int32), ties_before,
                                           SUB_ROWS, RW)
      left = tied & (rank >= need)
      new_lo = tl.minimum(new_lo, tl.min(tl.where(left, a_t, float("inf"))))
      new_hi = tl.maximum(new_hi, tl.max(tl.where(left, a_t, -float("inf"))))

  new_scale = tl.div_rn(new_hi - new_lo, 15.0)
  # One division per block; per entry a multiply (XLA divides per entry:
  # a one-ulp difference moves an entry at a .5 boundary by one level).
  inv = tl.div_rn(1.0, tl.where(new_scale > 0, new_scale, 1.0))

  # C. Per sub-tile: the selection, its slots in the new row, the row's
  # entries, the codes (with the tie bookkeeping only where entries tie).
  row = tl.load(row_ptr)
  row_base = (row.to(tl.int64) * NB + pid) * K
  if need > 0:
    _row_and_codes(g_ptr, codes_ptr, widx_ptr, wval_ptr, pid, length, lo,
                   scale, row_base, at_least, tie, need, new_lo, new_scale,
                   inv, B, TILE, SUB, RW, True)
  else:
    _row_and_codes(g_ptr, codes_ptr, widx_ptr, wval_ptr, pid, length, lo,
                   scale, row_base, at_least, tie, need, new_lo, new_scale,
                   inv, B, TILE, SUB, RW, False)
  # The last block's empty slots hold (0, 0).
  if k_b < K:
    slots = tl.arange(0, KP)
    empty = (slots >= k_b) & (slots < K)
    tl.store(widx_ptr + row_base + slots,
             tl.zeros([KP], widx_ptr.dtype.element_ty), mask=empty)
    tl.store(wval_ptr + row_base + slots,
             tl.zeros([KP], wval_ptr.dtype.element_ty), mask=empty)
  tl.store(lo_ptr + pid, new_lo)
  tl.store(hi_ptr + pid, new_hi)


@triton.jit
def _window_u(widx_ptr, wval_ptr, w1_ptr, w2_ptr, row_ptr, eps_ptr, pid,
              length, B: tl.constexpr, NB: tl.constexpr, K: tl.constexpr,
              M: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
              LOG_EP: tl.constexpr, WIDE_KEYS: tl.constexpr):
  """Step 4 of one block at the window's entries: ``(index, u, store)``.

  The window's ``M K`` entries of block ``pid`` sorted by block-relative
  index (:func:`_sort_distinct` of ``index * EP + entry`` keys), their
  weighted values and squares summed per index by a segmented scan;
  ``u = m_hat / (sqrt(v_hat) + eps)`` float32 at each entry, and ``store``
  true at one entry per distinct index inside the block (the last of its
  run, which holds the whole sum). Entries where ``store`` is false are to be ignored.
  """
  row = tl.load(row_ptr)
  eps = tl.load(eps_ptr)
  ent = tl.arange(0, EP)
  real = ent < E
  old = (row + 1 + ent // K) % M
  src = (old.to(tl.int64) * NB + pid) * K + ent % K
  idx = tl.load(widx_ptr + src, mask=real, other=0).to(tl.int32)
  if WIDE_KEYS:
    keys = tl.where(real, idx.to(tl.int64), B).to(tl.int64) * EP + ent
  else:
    keys = tl.where(real, idx, B) * EP + ent
  keys = _sort_distinct(keys, LOG_EP)
  order = (keys % EP).to(tl.int32)
  sidx = (keys // EP).to(tl.int32)
  # Each sorted entry's value and its row's weights read from memory (L1
  # hits: the block's rows were just read), not gathered from the warp's
  # registers: 96 registers instead of 143, 11 % fewer instructions, the
  # same sums in the same order.
  o_old = (row + 1 + order // K) % M
  o_src = (o_old.to(tl.int64) * NB + pid) * K + order % K
  o_real = order < E
  val = tl.load(wval_ptr + o_src, mask=o_real, other=0.0).to(tl.float32)
  sm = tl.load(w1_ptr + o_old, mask=o_real, other=0.0) * val
  sv = tl.load(w2_ptr + o_old, mask=o_real, other=0.0) * (val * val)
  _, sm, sv = tl.associative_scan((sidx, sm, sv), 0, _segment_sum)
  nxt = tl.gather(sidx, tl.minimum(ent + 1, EP - 1), 0)
  store = ((sidx != nxt) | (ent == EP - 1)) & (sidx < length)
  u = tl.div_rn(sm, tl.sqrt_rn(sv) + eps)
  return tl.where(store, sidx, 0), u, store


@triton.jit
def microadam_u_kernel(
    widx_ptr, wval_ptr, w1_ptr, w2_ptr, row_ptr, eps_ptr, u_ptr,
    B: tl.constexpr, TILE: tl.constexpr, NB: tl.constexpr,
    LAST_LEN: tl.constexpr, K: tl.constexpr,
    M: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
    LOG_EP: tl.constexpr, WIDE_KEYS: tl.constexpr):
  """Step 4 of one block: ``u`` from the window (after
  :func:`microadam_topk_kernel` wrote the new row).

  Args:
    widx_ptr, wval_ptr: the window ``(M, NB, K)``, read only.
    w1_ptr, w2_ptr: the rows' moment weights ``(M,)`` float32 (0 for rows
      not written yet).
    row_ptr: int32 ``(1,)``, the window row written last.
    eps_ptr: float32 ``(1,)``, added to ``sqrt(v_hat)``.
    u_ptr: the update direction ``(d,)``, written whole.
    B, TILE, NB, LAST_LEN, K: as in :func:`microadam_topk_kernel`.
    M: window rows; E: entries of the window of one block, ``M * K``; EP:
      next power of two of ``E``; LOG_EP: ``log2(EP)``.
    WIDE_KEYS: sort keys in int64 (``B * EP >= 2**31``).
  """
  pid = tl.program_id(0).to(tl.int64)
  base = pid * B
  length = tl.where(pid == NB - 1, LAST_LEN, B)
  pos = tl.arange(0, TILE)
  # 0 where no row holds an entry, written densely; then u stored over it
  # at each distinct index of the window. Other threads of the program
  # write the same addresses, so a barrier orders the two stores (at one
  # warp, the default, nothing else does: the warp's in-order issue is not
  # a promise of PTX's memory model).
  tl.store(u_ptr + base + pos, tl.zeros([TILE], u_ptr.dtype.element_ty),
           mask=pos < length)
  sidx, u, store = _window_u(widx_ptr, wval_ptr, w1_ptr, w2_ptr, row_ptr,
                             eps_ptr, pid, length, B, NB, K, M, E, EP,
                             LOG_EP, WIDE_KEYS)
  tl.debug_barrier()  # every zero stored before any u
  tl.store(u_ptr + base + sidx, u.to(u_ptr.dtype.element_ty), mask=store)


@triton.jit
def microadam_apply_kernel(
    widx_ptr, wval_ptr, w1_ptr, w2_ptr, row_ptr, eps_ptr, lr_ptr, wd_ptr,
    p_in, p_ptr,
    B: tl.constexpr, TILE: tl.constexpr, NB: tl.constexpr,
    LAST_LEN: tl.constexpr, K: tl.constexpr,
    M: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
    LOG_EP: tl.constexpr, WIDE_KEYS: tl.constexpr, DECAY: tl.constexpr,
    CHUNK: tl.constexpr):
  """Step 4 and the parameter update of one block, in place:
  ``p <- p - lr (u + wd p)`` in float32, rounded once to ``p``'s dtype.

  ``u`` is zero off the window's entries, so without weight decay only the
  window's distinct indices are read and written (a gather and a scatter of
  at most ``M K`` entries); with it (``DECAY``) the block is also scaled
  densely, ``CHUNK`` entries at a time, between the gather and the scatter
  (barriers order the three: the update is in place).

  Args:
    widx_ptr ... eps_ptr: as in :func:`microadam_u_kernel`.
    lr_ptr: float32 ``(1,)``, the learning rate ``lr`` (positive).
    wd_ptr: float32 ``(1,)``, the decoupled weight decay ``wd`` (read only
      with ``DECAY``).
    p_in, p_ptr: the parameter ``(d,)``, one buffer (``p_ptr`` aliases
      ``p_in``: jax-triton passes the input and the output).
    B ... WIDE_KEYS: as in :func:`microadam_u_kernel`.
    DECAY: whether ``wd`` may be non-zero (a dense pass over the block).
    CHUNK: entries per step of the dense pass (a power of two).
  """
  pid = tl.program_id(0).to(tl.int64)
  base = pid * B
  length = tl.where(pid == NB - 1, LAST_LEN, B)
  sidx, u, store = _window_u(widx_ptr, wval_ptr, w1_ptr, w2_ptr, row_ptr,
                             eps_ptr, pid, length, B, NB, K, M, E, EP,
                             LOG_EP, WIDE_KEYS)
  lr = tl.load(lr_ptr)
  p = tl.load(p_in + base + sidx, mask=store, other=0.0).to(tl.float32)
  if DECAY:
    wd = tl.load(wd_ptr)
    new = p - lr * (u + wd * p)
    tl.debug_barrier()  # every gather before any dense write
    for c in tl.range(0, TILE, CHUNK):
      pos = c + tl.arange(0, CHUNK)
      live = pos < length
      q = tl.load(p_in + base + pos, mask=live, other=0.0).to(tl.float32)
      tl.store(p_ptr + base + pos,
               (q - lr * (wd * q)).to(p_ptr.dtype.element_ty), mask=live)
    tl.debug_barrier()  # every dense write before the scatter
  else:
    new = p - lr * u
  tl.store(p_ptr + base + sidx, new.to(p_ptr.dtype.element_ty), mask=store)

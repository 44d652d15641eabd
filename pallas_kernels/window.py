"""Adam's moments rebuilt from MicroAdam's window of sparse gradients.

The window holds the last ``m`` Top-K-compressed gradients as rows of
block-relative indices and values ``(m, num_blocks, k)``. At step ``t`` (the
row of step ``s`` is ``r = (s - 1) mod m`` and its age ``(t - 1 - r) mod m``):

.. math::

  \\hat m = \\frac{1-\\beta_1}{1-\\beta_1^t} \\sum_{r} \\beta_1^{age_r}
  \\,\\mathrm{scatter}(I_r, V_r), \\qquad
  \\hat v = \\frac{1-\\beta_2}{1-\\beta_2^t} \\sum_{r} \\beta_2^{age_r}
  \\,\\mathrm{scatter}(I_r, V_r^2), \\qquad
  u = \\hat m / (\\sqrt{\\hat v} + \\epsilon).

Rows not written yet (``age >= t``) are ignored. Entries outside every stored
index get ``u = 0``.

This module holds the pure-``jnp`` reference (:func:`window_update_reference`,
also the XLA path of the optimizer), the Pallas kernels (Triton for GPU,
Mosaic for TPU, chosen per lowering platform by :func:`window_update_pallas`)
and the dispatch (:func:`window_update`); and the same three for the fused
parameter update ``p - lr (u + wd p)`` (:func:`window_param_update`; Triton
only, the reference on TPU), for users who apply MicroAdam's update without
:func:`optax.apply_updates`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _backend
from pallas_kernels import _onchip
from pallas_kernels import _onchip_tpu


def row_weights(count: jax.Array, window: int, b1: float, b2: float
                ) -> tuple[jax.Array, jax.Array]:
  """Per-row weights of the first and second moment at step ``count``.

  Args:
    count: the step ``t >= 1`` (int32 scalar, may be traced).
    window: the number of rows ``m``.
    b1: first-moment decay.
    b2: second-moment decay.

  Returns:
    Two float32 arrays ``(m,)``: ``(1-b)/(1-b^t) * b^age`` for written rows
    and 0 for rows not written yet.
  """
  t = jnp.asarray(count, jnp.int32)
  ages = jnp.mod(t - 1 - jnp.arange(window, dtype=jnp.int32), window)
  written = ages < t
  tf = t.astype(jnp.float32)
  agef = ages.astype(jnp.float32)
  b1 = jnp.float32(b1)
  b2 = jnp.float32(b2)
  w1 = (1 - b1) * b1**agef / (1 - b1**tf)
  w2 = (1 - b2) * b2**agef / (1 - b2**tf)
  return jnp.where(written, w1, 0.0), jnp.where(written, w2, 0.0)


def window_update_reference(indices: jax.Array, values: jax.Array,
                            count: jax.Array, *, block_size: int,
                            b1: float = 0.9, b2: float = 0.999,
                            eps: float = 1e-8) -> jax.Array:
  """The update direction ``u`` rebuilt from the window, float32 ``(nb, B)``.

  Args:
    indices: block-relative indices ``(m, num_blocks, k)`` (int16 or int32).
    values: signed values ``(m, num_blocks, k)`` (bf16 or float32).
    count: the current step ``t >= 1`` (the newest row is ``(t-1) mod m``).
    block_size: ``B``, the length of a Top-K block.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to ``sqrt(v_hat)``.

  Returns:
    ``u`` as a float32 array ``(num_blocks, B)``.
  """
  w1, w2 = row_weights(count, indices.shape[0], b1, b2)
  v = values.astype(jnp.float32)

  def block(idx, val):  # (m, k) entries of one block -> its (B,) update.
    idx = idx.reshape(-1).astype(jnp.int32)
    m_hat = jnp.zeros((block_size,), jnp.float32).at[idx].add(
        (w1[:, None] * val).reshape(-1))
    v_hat = jnp.zeros((block_size,), jnp.float32).at[idx].add(
        (w2[:, None] * val * val).reshape(-1))
    return m_hat / (jnp.sqrt(v_hat) + eps)

  # One scatter per block (vmap): XLA partitions it along sharded blocks.
  return jax.vmap(block, in_axes=1)(indices, v)


def window_param_update_reference(params: jax.Array, indices: jax.Array,
                                  values: jax.Array, count: jax.Array, *,
                                  block_size: int, learning_rate: Any,
                                  weight_decay: Any = 0.0, b1: float = 0.9,
                                  b2: float = 0.999, eps: float = 1e-8
                                  ) -> jax.Array:
  """``params - lr * (u + wd * params)`` with ``u`` rebuilt from the window.

  Args:
    params: the parameter, any shape, ``d`` elements (flattened row-major
      into blocks of ``block_size``).
    indices: block-relative indices ``(m, num_blocks, k)``.
    values: signed values ``(m, num_blocks, k)``.
    count: the current step ``t >= 1``.
    block_size: ``B``.
    learning_rate: scalar (may be traced).
    weight_decay: decoupled weight decay (may be traced).
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to ``sqrt(v_hat)``.

  Returns:
    The new parameter, same shape and dtype; computed in float32 and rounded
    once.
  """
  d = params.size
  u = window_update_reference(indices, values, count, block_size=block_size,
                              b1=b1, b2=b2, eps=eps).reshape(-1)[:d]
  p = params.reshape(-1).astype(jnp.float32)
  lr = jnp.asarray(learning_rate, jnp.float32)
  wd = jnp.asarray(weight_decay, jnp.float32)
  return (p - lr * (u + wd * p)).astype(params.dtype).reshape(params.shape)


# ---------------------------------------------------------------------------
# Triton kernel (GPU; interpret mode on CPU).
# ---------------------------------------------------------------------------

#: How a program combines the ``m * k`` window entries of its block that
#: share a position (Triton has no scatter into on-chip memory):
#:
#: * ``"elect"``: every entry writes its slot number at its position of a
#:   per-program table in global memory (L2-resident); the one that reads its
#:   own number back is the position's representative, the others add their
#:   terms to it with atomics (rare: only repeated positions); the
#:   representatives compute ``u`` and store it into the zero-filled block.
#:   About 4 scattered accesses per entry, no dense scratch traffic.
#: * ``"atomic"``: every entry adds its two terms into a dense per-program
#:   ``(2, B)`` float32 scratch with atomics; the program reads the scratch
#:   back densely, writes ``u`` and re-zeroes it. 2 atomics per entry plus
#:   4 * 2 * B bytes of scratch traffic per block.
WINDOW_VARIANTS = ("elect", "atomic")

#: The variant used when none is given (the faster one on an H200).
DEFAULT_VARIANT = "elect"


def _entries_of(b, idx_ref, val_ref, w_ref, *, m: int, k: int, ep: int,
                stride: int):
  """The window entries of blocks ``b`` ``(rows,)``, as ``(rows, EP)``.

  Returns ``(slot, valid, position, w1 * value, w2 * value^2)``.
  """
  rows = b.shape[0]
  entries = m * k
  e = jax.lax.broadcasted_iota(jnp.int32, (rows, ep), 1)
  r = e // k
  valid = e < entries
  addr = r * stride + b[:, None] * k + (e - r * k)
  pos = _onchip.load_scattered(idx_ref, addr, valid, 0).astype(jnp.int32)
  v = _onchip.load_scattered(val_ref, addr, valid, 0).astype(jnp.float32)
  w1r = _onchip.load_scattered(w_ref, r, valid, 0.0)
  w2r = _onchip.load_scattered(w_ref, m + r, valid, 0.0)
  return e, valid, pos, w1r * v, (w2r * v) * v


def window_kernel(idx_ref, val_ref, w_ref, c_ref, *rest, m: int, k: int,
                  rows: int, padded: int, ep: int, groups: int,
                  g_count: int, variant: str, update_params: bool,
                  wd_is_zero: bool, interpret: bool) -> None:
  """Persistent-grid body of the window kernel (Triton).

  Program ``g`` of ``g_count`` walks the groups ``g, g + g_count, ...`` of
  ``rows`` consecutive blocks. Operands: the flat window indices and values
  ``(m * num_blocks * k,)``, the row weights ``(2 m,)`` (first, second
  moment), the constants ``(eps, lr, wd, 0)``, with ``update_params`` the
  flat parameter; outputs: ``u`` (or the new parameter, aliased), then the
  per-program scratch of ``variant`` (see :data:`WINDOW_VARIANTS`).
  """
  stride = groups * rows * k
  tag_size = rows * padded
  sums_size = rows * ep
  acc_size = 2 * rows * padded
  entries_of = functools.partial(_entries_of, m=m, k=k, ep=ep, stride=stride)
  if update_params:
    p_ref, out_ref, *scratch = rest
  else:
    p_ref = None
    out_ref, *scratch = rest
  g = pl.program_id(0)
  eps_ = c_ref[0]
  lr_ = c_ref[1]
  wd_ = c_ref[2]
  count_g = (groups - g + g_count - 1) // g_count
  local = jax.lax.broadcasted_iota(jnp.int32, (rows,), 0)

  def dense(group):
    return pl.ds(group * rows * padded, rows * padded)

  def dense_update(group, u):
    """Writes u (or the updated parameter) for the group's blocks."""
    u = u.reshape(rows * padded)
    if update_params:
      p = p_ref[dense(group)].astype(jnp.float32)
      u = p - lr_ * (u + wd_ * p)
    out_ref[dense(group)] = u.astype(out_ref.dtype)

  if variant == "atomic":
    (acc_ref,) = scratch
    base = g * acc_size
    acc_ref[pl.ds(base, acc_size)] = jnp.zeros((acc_size,), jnp.float32)
    _backend.barrier(interpret)

    def body(i, carry):
      group = g + i * g_count
      b = group * rows + local
      _, valid, pos, x1, x2 = entries_of(b, idx_ref, val_ref, w_ref)
      at = base + local[:, None] * padded + pos
      _onchip.scatter_add(acc_ref, at, x1, valid, interpret)
      _onchip.scatter_add(acc_ref, at + rows * padded, x2, valid,
                          interpret)
      _backend.barrier(interpret)
      m_hat = _onchip.load_block(acc_ref.at[pl.ds(base, rows * padded)],
                                 volatile=True)
      v_hat = _onchip.load_block(
          acc_ref.at[pl.ds(base + rows * padded, rows * padded)],
          volatile=True)
      dense_update(group, m_hat / (jnp.sqrt(v_hat) + eps_))
      acc_ref[pl.ds(base, acc_size)] = jnp.zeros((acc_size,), jnp.float32)
      _backend.barrier(interpret)
      return carry

  else:  # "elect"
    tag_ref, sum1_ref, sum2_ref = scratch
    tbase = (g * tag_size + local * padded)[:, None]
    sbase = (g * sums_size + local * ep)[:, None]
    mine = pl.ds(g * sums_size, sums_size)

    def body(i, carry):
      group = g + i * g_count
      b = group * rows + local
      e, valid, pos, x1, x2 = entries_of(b, idx_ref, val_ref, w_ref)
      _onchip.store_scattered(tag_ref, tbase + pos, e, valid)
      sum1_ref[mine] = jnp.zeros((sums_size,), jnp.float32)
      sum2_ref[mine] = jnp.zeros((sums_size,), jnp.float32)
      _backend.barrier(interpret)
      rep = _onchip.load_scattered(tag_ref, tbase + pos, valid, -1,
                                   volatile=True)
      loser = valid & (rep != e)
      _onchip.scatter_add(sum1_ref, sbase + rep, x1, loser, interpret)
      _onchip.scatter_add(sum2_ref, sbase + rep, x2, loser, interpret)
      _backend.barrier(interpret)
      s1 = _onchip.load_block(sum1_ref.at[mine], volatile=True).reshape(
          rows, ep)
      s2 = _onchip.load_block(sum2_ref.at[mine], volatile=True).reshape(
          rows, ep)
      winner = valid & (rep == e)
      u = (x1 + s1) / (jnp.sqrt(x2 + s2) + eps_)
      at = b[:, None] * padded + pos
      if update_params:
        p = _onchip.load_scattered(p_ref, at, winner, 0).astype(jnp.float32)
        if not wd_is_zero:
          _backend.barrier(interpret)
          dense_update(group, jnp.zeros((rows * padded,), jnp.float32))
          _backend.barrier(interpret)
        new = p - lr_ * (u + wd_ * p)
        _onchip.store_scattered(out_ref, at, new, winner)
      else:
        out_ref[dense(group)] = jnp.zeros((rows * padded,), out_ref.dtype)
        _backend.barrier(interpret)
        _onchip.store_scattered(out_ref, at, u, winner)
      _backend.barrier(interpret)
      return carry

  jax.lax.fori_loop(0, count_g, body, 0)


def _window_kernel_call(indices, values, count, *, block_size, b1, b2, eps,
                        out_dtype, params=None, learning_rate=None,
                        weight_decay=0.0, variant=None, programs=None,
                        num_warps=None, rows=1, interpret=None):
  """Shared wrapper of the window kernel (``u`` or the new parameter).

  A persistent grid of programs walks groups of ``rows`` consecutive blocks
  (see :func:`pallas_kernels._backend.rows_per_program`); each program owns
  a scratch area in global memory, small enough to stay in the L2 cache.
  """
  m, num_blocks, k = indices.shape
  if values.shape != indices.shape:
    raise ValueError(f"indices {indices.shape} and values {values.shape} "
                     "must have the same shape.")
  variant = variant or DEFAULT_VARIANT
  if variant not in WINDOW_VARIANTS:
    raise ValueError(f"variant must be one of {WINDOW_VARIANTS}, got "
                     f"{variant!r}.")
  interpret = _backend.interpret_mode(interpret)
  padded = _backend.next_pow2(block_size)
  ep = _backend.next_pow2(m * k)
  rows = _backend.rows_per_program(num_blocks, rows)
  groups = num_blocks // rows
  g_count = _backend.persistent_programs(groups, programs)
  g_count = max(1, min(int(g_count), groups))
  update_params = params is not None
  wd_is_zero = (not update_params) or (
      isinstance(weight_decay, (int, float)) and weight_decay == 0)
  w1, w2 = row_weights(count, m, b1, b2)
  weights = jnp.concatenate([w1, w2])
  lr = 0.0 if learning_rate is None else learning_rate
  consts = jnp.stack([jnp.asarray(eps, jnp.float32),
                      jnp.asarray(lr, jnp.float32),
                      jnp.asarray(weight_decay, jnp.float32),
                      jnp.float32(0)])
  # Scratch per program: "elect" a tag table (rows, P) and two sums
  # (rows, EP); "atomic" dense sums (2, rows, P).
  tag_size = rows * padded
  sums_size = rows * ep
  acc_size = 2 * rows * padded
  kernel = functools.partial(
      window_kernel, m=m, k=k, rows=rows, padded=padded, ep=ep,
      groups=groups, g_count=g_count, variant=variant,
      update_params=update_params, wd_is_zero=wd_is_zero,
      interpret=interpret)
  out_len = num_blocks * padded
  if variant == "atomic":
    scratch_shapes = [jax.ShapeDtypeStruct((g_count * acc_size,),
                                           jnp.float32)]
  else:
    scratch_shapes = [jax.ShapeDtypeStruct((g_count * tag_size,), jnp.int32)]
    scratch_shapes += [jax.ShapeDtypeStruct((g_count * sums_size,),
                                            jnp.float32)] * 2
  operands = [indices.reshape(-1), values.reshape(-1), weights, consts]
  aliases = {}
  if update_params:
    d = params.size
    p = params.reshape(-1)
    if out_len != d:
      p = jnp.pad(p, (0, num_blocks * block_size - d)).reshape(
          num_blocks, block_size)
      p = jnp.pad(p, ((0, 0), (0, padded - block_size))).reshape(-1)
    operands.append(p)
    aliases = {4: 0}
  outs = pl.pallas_call(
      kernel,
      grid=(g_count,),
      in_specs=[pl.no_block_spec] * len(operands),
      out_specs=[pl.no_block_spec] * (1 + len(scratch_shapes)),
      out_shape=[jax.ShapeDtypeStruct((out_len,), jnp.dtype(out_dtype))]
      + scratch_shapes,
      input_output_aliases=aliases,
      compiler_params=None if interpret else _backend.gpu_params(
          rows * padded, "window", num_warps),
      interpret=interpret,
      name=f"window_{variant}",
  )(*operands)
  out = outs[0].reshape(num_blocks, padded)
  if padded != block_size:
    out = out[:, :block_size]
  return out


@functools.partial(jax.jit, static_argnames=(
    "block_size", "out_dtype", "variant", "programs", "num_warps", "rows",
    "interpret"))
def _window_update_gpu(indices, values, count, *, block_size, b1=0.9,
                          b2=0.999, eps=1e-8, out_dtype=jnp.float32,
                          variant=None, programs=None, num_warps=None,
                          rows=1, interpret=None):
  """:func:`window_update_reference` as a persistent Triton kernel."""
  return _window_kernel_call(indices, values, count, block_size=block_size,
                             b1=b1, b2=b2, eps=eps, out_dtype=out_dtype,
                             variant=variant, programs=programs,
                             num_warps=num_warps, rows=rows,
                             interpret=interpret)


# ---------------------------------------------------------------------------
# Mosaic TPU kernel (TPU interpreter on CPU).
# ---------------------------------------------------------------------------


def window_tpu_kernel(pos_ref, val_ref, w1_ref, w2_ref, eps_ref, u_ref, *,
                      rows: int) -> None:
  """``u`` of ``rows`` blocks from their ``E = m * k`` window entries.

  ``pos_ref``/``val_ref`` ``(rows, 1, E)``: each block's entries along the
  lanes (int32 position, float32 value); ``w1_ref``/``w2_ref`` ``(1, E)``:
  each entry's row weight; ``u_ref`` ``(rows, W / 128, 128)``: the block's
  ``u``, position ``p`` at ``(p // 128, p % 128)``.

  The moments are accumulated densely with two one-hot factors: ``m_hat[h,
  l] = sum_e x_e [p_e // 128 == h] [p_e % 128 == l]``, the product of a
  ``(W / 128, E)`` and an ``(E, 128)`` matrix (MXU), built from ``E * (W /
  128 + 128)`` compares instead of ``E * W``; repeated positions add up.
  """
  hr = u_ref.shape[1]
  e = pos_ref.shape[2]
  w1 = w1_ref[...]
  w2 = w2_ref[...]
  eps = _onchip_tpu.lane_broadcast_value(eps_ref)
  high = jax.lax.broadcasted_iota(jnp.int32, (hr, e), 0)
  low = jax.lax.broadcasted_iota(jnp.int32, (_onchip_tpu.LANES, e), 0)
  nt = (((1,), (1,)), ((), ()))  # contract the entries of both factors

  def body(r, carry):
    pos = pos_ref[r]
    v = val_ref[r]
    x1 = w1 * v
    x2 = (w2 * v) * v
    in_row = high == (pos >> 7)
    one_hot = jnp.where(low == (pos & 127), 1.0, 0.0)
    m_hat = jax.lax.dot_general(
        jnp.where(in_row, x1, 0.0), one_hot, nt,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32)
    v_hat = jax.lax.dot_general(
        jnp.where(in_row, x2, 0.0), one_hot, nt,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32)
    u_ref[r] = m_hat / (jnp.sqrt(v_hat) + eps)
    return carry

  jax.lax.fori_loop(0, rows, body, 0)


@functools.partial(jax.jit, static_argnames=(
    "block_size", "out_dtype", "interpret"))
def _window_update_mosaic(indices, values, count, *, block_size, b1=0.9,
                          b2=0.999, eps=1e-8, out_dtype=jnp.float32,
                          interpret=None):
  """:func:`window_update_reference` as a Mosaic TPU kernel.

  The wrapper lays each block's ``m * k`` entries along the lanes, padded
  to a multiple of 128 (one XLA transpose of the window, which holds ``m *
  density`` of the tensor's size); a program then writes the dense ``u`` of
  up to 8 blocks (see
  :func:`window_tpu_kernel`). ``interpret``: ``None`` (compile with Mosaic)
  or a :class:`pltpu.InterpretParams`.
  """
  m, num_blocks, k = indices.shape
  if values.shape != indices.shape:
    raise ValueError(f"indices {indices.shape} and values {values.shape} "
                     "must have the same shape.")
  lanes = _onchip_tpu.LANES
  # Entries padded to whole lanes (position 0, value 0, weight 0: they add
  # nothing), so that the matmuls contract a multiple of 128.
  e = _onchip_tpu.round_up(m * k, lanes)
  width = _onchip_tpu.round_up(block_size, lanes)
  rows = 1
  while rows < _onchip_tpu.ROWS and num_blocks % (2 * rows) == 0:
    rows *= 2
  w1, w2 = row_weights(count, m, b1, b2)

  def entries_of(x, dtype):
    x = x.astype(dtype).transpose(1, 0, 2).reshape(num_blocks, 1, m * k)
    return jnp.pad(x, ((0, 0), (0, 0), (0, e - m * k)))

  def per_entry(w):
    return jnp.pad(jnp.repeat(w, k), (0, e - m * k))[None, :]

  pos = entries_of(indices, jnp.int32)
  val = entries_of(values, jnp.float32)
  eps_row = jnp.full((1, lanes), eps, jnp.float32)
  entries = pl.BlockSpec((rows, 1, e), lambda i: (i, 0, 0))
  whole = pl.BlockSpec((1, e), lambda i: (0, 0))
  u = pl.pallas_call(
      functools.partial(window_tpu_kernel, rows=rows),
      grid=(num_blocks // rows,),
      in_specs=[entries, entries, whole, whole,
                pl.BlockSpec((1, lanes), lambda i: (0, 0))],
      out_specs=pl.BlockSpec((rows, width // lanes, lanes),
                             lambda i: (i, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((num_blocks, width // lanes, lanes),
                                     jnp.float32),
      compiler_params=_backend.tpu_params(),
      interpret=interpret or False,
      name="window_update_tpu",
  )(pos, val, per_entry(w1), per_entry(w2), eps_row)
  u = u.reshape(num_blocks, width)
  if width != block_size:
    u = u[:, :block_size]
  return u.astype(out_dtype)


def window_update_pallas(indices: jax.Array, values: jax.Array,
                         count: jax.Array, *, block_size: int,
                         b1: float = 0.9, b2: float = 0.999,
                         eps: float = 1e-8, out_dtype: Any = jnp.float32,
                         variant: str | None = None,
                         programs: int | None = None,
                         num_warps: int | None = None, rows: int = 1,
                         interpret=None) -> jax.Array:
  """:func:`window_update_reference` as a Pallas kernel.

  On GPU (Triton) a persistent grid of ``programs`` programs (default: a
  few per multiprocessor) walks the blocks; each program reads its block's
  ``m * k`` window entries, combines repeated positions (see
  :data:`WINDOW_VARIANTS`) and writes the block of ``u``. On TPU (Mosaic)
  the entries are accumulated densely by one-hot matmuls (see
  :func:`window_tpu_kernel`).

  Args: as :func:`window_update_reference`, plus
    out_dtype: dtype of ``u`` (the parameters' dtype in the optimizer).
    variant: GPU only, one of :data:`WINDOW_VARIANTS` (default
      :data:`DEFAULT_VARIANT`).
    programs: GPU only, number of programs (default: see
      :func:`pallas_kernels._backend.persistent_programs`).
    num_warps: GPU only, warps per program (default: see
      :func:`pallas_kernels._backend.num_warps`).
    rows: GPU only, blocks per program iteration (default 1).
    interpret: ``None`` (the compiled kernel of the lowering platform,
      interpreted on CPU), ``True`` (the Triton kernel in interpret mode) or
      ``pltpu.InterpretParams()`` (the Mosaic kernel in the TPU
      interpreter).

  Returns:
    ``u`` ``(num_blocks, block_size)`` in ``out_dtype``.
  """
  return window_update(indices, values, count, block_size=block_size, b1=b1,
                       b2=b2, eps=eps, out_dtype=out_dtype, variant=variant,
                       programs=programs, num_warps=num_warps, rows=rows,
                       implementation="pallas", interpret=interpret)


def window_update(indices: jax.Array, values: jax.Array, count: jax.Array, *,
                  block_size: int, b1: float = 0.9, b2: float = 0.999,
                  eps: float = 1e-8, out_dtype: Any = jnp.float32,
                  variant: str | None = None, programs: int | None = None,
                  num_warps: int | None = None, rows: int = 1,
                  implementation: str = "auto", interpret=None) -> jax.Array:
  """The update direction ``u`` from the window: reference or kernel.

  Args: as :func:`window_update_pallas`, plus ``implementation``: ``"xla"``
    (the reference), ``"auto"`` (per lowering platform: the Triton kernel on
    GPU, the Mosaic kernel on TPU, the reference elsewhere) or ``"pallas"``
    (the same, with an interpreted kernel elsewhere).

  Returns:
    ``u`` ``(num_blocks, block_size)`` in ``out_dtype``.
  """
  kw = dict(block_size=block_size, b1=b1, b2=b2, eps=eps)
  # The module default is resolved here, outside the jitted kernel wrapper,
  # so that it is part of the wrapper's static arguments (its trace cache
  # key): a changed DEFAULT_VARIANT is seen by the next trace.
  variant = variant or DEFAULT_VARIANT

  def reference(i, v, t):
    return window_update_reference(i, v, t, **kw).astype(out_dtype)

  fits = _backend.triton_addressable(
      indices.shape[1] * _backend.next_pow2(block_size))
  return _backend.per_platform(
      indices, values, jnp.asarray(count, jnp.int32),
      implementation=implementation, reference=reference,
      triton=functools.partial(_window_update_gpu, out_dtype=out_dtype,
                               variant=variant, programs=programs,
                               num_warps=num_warps, rows=rows,
                               **kw) if fits else None,
      mosaic=functools.partial(_window_update_mosaic, out_dtype=out_dtype,
                               **kw),
      interpret=interpret)


def window_param_update_pallas(params: jax.Array, indices: jax.Array,
                               values: jax.Array, count: jax.Array, *,
                               block_size: int, learning_rate: Any,
                               weight_decay: Any = 0.0, b1: float = 0.9,
                               b2: float = 0.999, eps: float = 1e-8,
                               variant: str | None = None,
                               programs: int | None = None,
                               num_warps: int | None = None, rows: int = 1,
                               interpret: bool | None = None) -> jax.Array:
  """:func:`window_param_update_reference` as one kernel, in place.

  The parameter buffer is aliased to the output (donate it to avoid a
  copy). With ``weight_decay`` a Python ``0`` (and the ``"elect"``
  variant) only the positions held by the window are read and written:
  ``u`` is zero everywhere else, so the rest of the parameter is untouched.

  Args: as :func:`window_param_update_reference`, plus ``variant``,
    ``programs``, ``num_warps``, ``rows`` and ``interpret`` (see
    :func:`window_update_pallas`).

  Returns:
    The new parameter, same shape and dtype as ``params``.
  """
  d = params.size
  out = _window_kernel_call(indices, values, count, block_size=block_size,
                            b1=b1, b2=b2, eps=eps, out_dtype=params.dtype,
                            params=params, learning_rate=learning_rate,
                            weight_decay=weight_decay, variant=variant,
                            programs=programs, num_warps=num_warps, rows=rows,
                            interpret=interpret)
  return out.reshape(-1)[:d].reshape(params.shape)


def window_param_update(params: jax.Array, indices: jax.Array,
                        values: jax.Array, count: jax.Array, *,
                        block_size: int, learning_rate: Any,
                        weight_decay: Any = 0.0, b1: float = 0.9,
                        b2: float = 0.999, eps: float = 1e-8,
                        implementation: str = "auto") -> jax.Array:
  """MicroAdam's parameter step from the window, without ``apply_updates``.

  ``params - learning_rate * (u + weight_decay * params)``: the same as
  ``optax.chain(scale_by_microadam, add_decayed_weights, scale_by_learning_rate)``
  followed by :func:`optax.apply_updates`, rounded once instead of after
  every stage.

  Example:
    >>> import jax.numpy as jnp
    >>> from pallas_kernels import window
    >>> idx = jnp.array([[[0, 2]]], jnp.int16)       # m=1, one block, k=2
    >>> val = jnp.array([[[1.0, -2.0]]], jnp.float32)
    >>> p = jnp.ones((4,), jnp.float32)
    >>> new = window.window_param_update(p, idx, val, 1, block_size=4,
    ...                                  learning_rate=0.1,
    ...                                  implementation="xla")
    >>> [round(x, 4) for x in new.tolist()]
    [0.9, 1.0, 1.1, 1.0]

  Args: as :func:`window_param_update_reference`, plus ``implementation``
    (``"xla"``, ``"pallas"`` or ``"auto"``, per lowering platform: the
    Triton kernel on GPU; there is no TPU kernel, TPU takes the reference).

  Returns:
    The new parameter, same shape and dtype as ``params``.
  """
  kwargs = dict(block_size=block_size, learning_rate=learning_rate,
                weight_decay=weight_decay, b1=b1, b2=b2, eps=eps)

  def triton(p, i, v, t, interpret):
    return window_param_update_pallas(p, i, v, t, interpret=interpret,
                                      **kwargs)

  fits = _backend.triton_addressable(
      indices.shape[1] * _backend.next_pow2(block_size))
  return _backend.per_platform(
      params, indices, values, jnp.asarray(count, jnp.int32),
      implementation=implementation,
      reference=functools.partial(window_param_update_reference, **kwargs),
      triton=triton if fits else None)

"""Adam's moments rebuilt from MicroAdam's window as one Mosaic TPU kernel.

:func:`window_update_mosaic` computes
:func:`pallas_kernels.window.window_update_reference`. It was lowered for TPU
and run in the TPU interpreter and in Pallas' generic interpreter on CPU,
never compiled or run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.tpu import _onchip as _onchip_tpu
from pallas_kernels.window import row_weights


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
def window_update_mosaic(indices, values, count, *, block_size, b1=0.9,
                          b2=0.999, eps=1e-8, out_dtype=jnp.float32,
                          interpret=None):
  """:func:`window_update_reference` as a Mosaic TPU kernel.

  The wrapper lays each block's ``m * k`` entries along the lanes, padded
  to a multiple of 128 (one XLA transpose of the window, which holds ``m *
  density`` of the tensor's size); a program then writes the dense ``u`` of
  up to 8 blocks (see
  :func:`window_tpu_kernel`). ``interpret``: ``None`` (compile with Mosaic)
  ``True`` (Pallas' generic interpreter) or a :class:`pltpu.InterpretParams`
  (the TPU interpreter).
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
      compiler_params=_onchip_tpu.tpu_params(),
      interpret=interpret or False,
      name="window_update_tpu",
  )(pos, val, per_entry(w1), per_entry(w2), eps_row)
  u = u.reshape(num_blocks, width)
  if width != block_size:
    u = u[:, :block_size]
  return u.astype(out_dtype)


__all__ = ["window_tpu_kernel", "window_update_mosaic"]

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

This module holds the row weights (:func:`row_weights`) and the pure-``jnp``
reference (:func:`window_update_reference`, the XLA path of the optimizer).
The kernels are :mod:`pallas_kernels.gpu.step` (fused with the error
feedback, on GPU) and :mod:`pallas_kernels.tpu.window`;
:mod:`pallas_kernels.dispatch` chooses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp



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


__all__ = ["row_weights", "window_update_reference"]

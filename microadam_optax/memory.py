"""Byte accounting for optimizer states."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def state_nbytes(state: Any) -> int:
  """Bytes held by the array leaves of any pytree (an optax state, params, ...).

  Works on concrete arrays and on abstract ones (``jax.ShapeDtypeStruct`` from
  :func:`jax.eval_shape`), so the size of a state can be measured without
  allocating it. Python scalars and ``None`` count as zero.

  Args:
    state: a pytree, typically the second output of ``tx.init`` or of
      ``jax.eval_shape(tx.init, params)``.

  Returns:
    The total number of bytes, an ``int``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import microadam_optax as mo
    >>> params = {"w": jnp.zeros((1024, 1024), jnp.bfloat16)}
    >>> adam = jax.eval_shape(optax.adam(1e-3).init, params)
    >>> mo.state_nbytes(adam)  # mu and nu in bf16, plus the int32 count
    4194308
  """
  total = 0
  for leaf in jax.tree_util.tree_leaves(state):
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None or dtype is None:
      continue
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
  return total

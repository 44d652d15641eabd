"""Two optimizers stepped side by side on the same fresh gradients."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax


def assert_same_steps(txs: Mapping[str, optax.GradientTransformation],
                      params: Any, rng: np.random.Generator, *,
                      steps: int = 3, with_params: bool = False) -> dict:
  """Steps both transformations of ``txs`` (two) from their own ``init`` on
  the same standard-normal gradients, jitted, and asserts their updates and
  states equal bit for bit after every step.

  Args:
    txs: two transformations by name.
    params: the parameters (shapes and dtypes of the gradients).
    rng: draws the gradients.
    steps: how many steps.
    with_params: pass ``params`` to ``update`` (for transformations that
      need them).

  Returns:
    The last step's updates by name.
  """
  (a, b) = txs
  states = {c: tx.init(params) for c, tx in txs.items()}
  updates = {c: jax.jit(tx.update) for c, tx in txs.items()}
  extra = (params,) if with_params else ()
  out = {}
  for _ in range(steps):
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    for c in txs:
      out[c], states[c] = updates[c](grads, states[c], *extra)
    for x, y in zip(jax.tree.leaves((out[a], states[a])),
                    jax.tree.leaves((out[b], states[b]))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  return out

"""microadam_optax._trees: what counts as a wrapper around one array."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from microadam_optax import _trees


def test_tracers_are_arrays_not_wrappers():
  seen = []

  def record(x):
    seen.append(_trees.is_wrapper(x))
    return jnp.sum(x)

  x = jnp.ones(3)
  jax.jit(record)(x)
  jax.grad(record)(x)
  jax.vmap(record)(jnp.ones((2, 3)))
  record(x)
  assert seen == [False] * 4


def test_wrappers_flatten_to_their_array_and_rewrap():
  params = {"w": nnx.Param(jnp.arange(3.0)), "b": jnp.zeros(2),
            "n": [np.ones(1), 2.0]}
  assert _trees.is_wrapper(params["w"])
  assert not any(_trees.is_wrapper(v) for v in
                 (params["b"], params["n"], params["n"][0], 2.0, None))
  arrays, outer, rewrap = _trees.flatten(params)
  assert outer.num_leaves == 4
  by_shape = {np.shape(a): (a, r) for a, r in zip(arrays, rewrap)}
  array, put_back = by_shape[(3,)]
  np.testing.assert_array_equal(np.asarray(array), [0.0, 1.0, 2.0])
  again = put_back(2 * array)
  assert isinstance(again, nnx.Param)
  np.testing.assert_array_equal(np.asarray(again[...]), [0.0, 2.0, 4.0])

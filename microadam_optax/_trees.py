"""Parameter trees whose leaves may be wrapped in metadata-carrying nodes.

Flax wraps parameters in pytree nodes that carry metadata for the parameter's
own shape (``nnx.Variable`` with its sharding names, linen's ``Partitioned``).
An optimizer state shaped like its parameter (Adam's moments) may inherit such
a wrapper; one shaped otherwise (MicroAdam's window, Adam-mini's v) must not,
or the metadata is applied to it (``nnx.Optimizer`` reshards each state leaf
by its parameter's sharding names). These helpers see such a wrapper as one
leaf, so that a state can be built on the tree *around* the wrappers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np


def is_wrapper(x: Any) -> bool:
  """Whether ``x`` is a pytree node around exactly one array leaf.

  Standard containers (dicts, lists, tuples and named tuples) and arrays are
  not wrappers; tracers (inside ``jit``, ``grad``, ``vmap``) are instances
  of :class:`jax.Array`, so they are arrays here too.
  """
  if x is None or isinstance(x, (dict, list, tuple, jax.Array, np.ndarray,
                                 float, int, complex, bool)):
    return False
  leaves, treedef = jax.tree.flatten(x)
  return len(leaves) == 1 and treedef.num_nodes > 1


def flatten(tree: Any) -> tuple[list[Any], Any, list[Callable[[Any], Any]]]:
  """Flattens ``tree`` down to arrays, wrappers counting as their array.

  Returns:
    ``(arrays, outer_treedef, rewrap)``: the arrays; the structure around
    them (wrappers replaced by plain leaves), on which a state not shaped like
    the parameters is built; and per leaf a function that puts a new array
    back in that leaf's wrapper (identity for plain leaves).
  """
  items, outer = jax.tree.flatten(tree, is_leaf=is_wrapper)
  arrays, rewrap = [], []
  for x in items:
    if is_wrapper(x):
      inner = jax.tree.structure(x)
      arrays.append(jax.tree.leaves(x)[0])
      rewrap.append(lambda a, inner=inner: inner.unflatten([a]))
    else:
      arrays.append(x)
      rewrap.append(lambda a: a)
  return arrays, outer, rewrap


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def path_keys(path: Sequence[Any]) -> tuple[str, ...]:
  """Key names of a JAX key path, without the ``.value`` of NNX Variables."""
  keys = list(path)
  while keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and (
      keys[-1].name == "value"):
    keys.pop()
  return tuple(_key_name(k) for k in keys)

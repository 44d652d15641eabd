"""Input checks shared by the optimizers of this library."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from microadam_optax._sharding import is_traced


def check_float_leaves(params: Any, optimizer: str) -> None:
  """Raises ``TypeError`` naming the first leaf that is not real floating.

  Accepts what :func:`optax.adam` accepts: floating arrays, tracers and
  Python floats (a Python ``int`` or ``bool`` leaf is refused like an integer
  array). ``None`` leaves and ``optax.MaskedNode`` are skipped.

  Args:
    params: the parameters (or gradients) pytree.
    optimizer: the optimizer's name, for the message.

  Raises:
    TypeError: for an integer, boolean or complex leaf, naming its path.
  """

  def check(path: Any, leaf: Any) -> None:
    dtype = jnp.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.floating):
      return
    kind = ("complex" if jnp.issubdtype(dtype, jnp.complexfloating)
            else str(dtype))
    raise TypeError(
        f"{optimizer} optimizes real floating-point parameters; the leaf at "
        f"{jax.tree_util.keystr(path) or '<root>'} has dtype {kind}. "
        f"Exclude it with optax.masked / optax.multi_transform (or "
        f"optax.set_to_zero).")

  jax.tree_util.tree_map_with_path(check, params)


def check_learning_rate(learning_rate: Any) -> None:
  """Raises ``ValueError`` unless ``learning_rate`` is a finite number.

  A schedule (any callable) and a traced value (an injected
  hyper-parameter, checked where it was a number) pass.
  """
  if callable(learning_rate) or is_traced(learning_rate):
    return
  try:
    lr = float(np.asarray(learning_rate))
  except (TypeError, ValueError):
    raise ValueError(
        f"learning_rate must be a real number or a schedule, got "
        f"{learning_rate!r}.") from None
  if not math.isfinite(lr):
    raise ValueError(
        f"learning_rate must be a finite number, got {learning_rate!r}.")

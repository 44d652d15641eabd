"""Optax transformations that can also apply their update in the same pass.

Optax splits a step in two: ``tx.update`` returns the update, then
:func:`optax.apply_updates` adds it to the parameters. For an optimizer whose
update comes out of a kernel (MicroAdam on GPU) the second half is one more
pass over the parameters and the update: reading the parameter and the
update and writing the parameter, ~6 bytes per bf16 parameter, where the
kernel could update the parameter it already visits.

:class:`FusedGradientTransformation` is an ordinary optax transformation
(``init`` and ``update``: it goes into :func:`optax.chain`,
:class:`optax.MultiSteps` and any train step as it is) with one method more,
``apply_gradients``, that does both halves at once. :func:`apply_gradients`
calls it where a transformation has it and falls back to ``update`` plus
:func:`optax.apply_updates` for any other, so one train step serves every
optimizer.
"""

from __future__ import annotations

from typing import Any, Callable

import optax

#: ``(grads, state, params, **extra_args) -> (new_params, new_state)``.
ApplyGradientsFn = Callable[..., tuple[optax.Params, optax.OptState]]


class FusedGradientTransformation(optax.GradientTransformationExtraArgs):
  """An optax transformation that can also apply its update itself.

  It is a :class:`optax.GradientTransformationExtraArgs` (a named tuple of
  ``init`` and ``update``, usable wherever optax takes a transformation),
  plus :meth:`apply_gradients`, which gives what ``update`` followed by
  :func:`optax.apply_updates` gives, in one pass where the transformation
  has a faster way. Wrapping it (:func:`optax.chain`,
  :func:`optax.inject_hyperparams`, :class:`optax.MultiSteps`) keeps
  ``init`` and ``update`` and drops the method.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import microadam_optax as mo
    >>> params = {"w": jnp.ones((64, 64), jnp.bfloat16)}
    >>> tx = mo.microadam(1e-3, weight_decay=0.01, density=0.05)
    >>> isinstance(tx, mo.FusedGradientTransformation)
    True
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.full((64, 64), 0.1, jnp.bfloat16)}
    >>> step = jax.jit(tx.apply_gradients, donate_argnums=(1, 2))
    >>> params, state = step(grads, state, params)
    >>> str(params["w"].dtype), int(state[0].count)
    ('bfloat16', 1)
  """

  def __new__(cls, init: optax.TransformInitFn,
              update: optax.TransformUpdateExtraArgsFn,
              apply_gradients: ApplyGradientsFn):
    obj = super().__new__(cls, init, update)
    obj._apply_gradients = apply_gradients  # pylint: disable=protected-access
    return obj

  def apply_gradients(self, grads: optax.Updates, state: optax.OptState,
                      params: optax.Params, **extra_args: Any
                      ) -> tuple[optax.Params, optax.OptState]:
    """One step: the new parameters and state from ``grads``.

    Args:
      grads: the gradients, a tree like ``params``.
      state: the state from ``init`` or the previous step.
      params: the parameters (donate them to the jitted step so that they
        are updated in place).
      **extra_args: passed on as to ``update``.

    Returns:
      ``(new_params, new_state)``; ``new_state`` is what ``update`` would
      return.
    """
    fn = getattr(self, "_apply_gradients", None)
    if fn is None:  # a copy made by tuple methods (``_replace``)
      return _update_then_apply(self, grads, state, params, **extra_args)
    return fn(grads, state, params, **extra_args)


def _update_then_apply(tx, grads, state, params, **extra_args):
  updates, state = tx.update(grads, state, params, **extra_args)
  return optax.apply_updates(params, updates), state


def apply_gradients(tx: optax.GradientTransformation, grads: optax.Updates,
                    state: optax.OptState, params: optax.Params,
                    **extra_args: Any) -> tuple[optax.Params, optax.OptState]:
  """One optimizer step of any optax transformation, fused where it can be.

  For a :class:`FusedGradientTransformation` (``mo.microadam``) its
  :meth:`~FusedGradientTransformation.apply_gradients`; for any other
  transformation ``tx.update`` then :func:`optax.apply_updates`.

  Args:
    tx: an optax transformation.
    grads: the gradients, a tree like ``params``.
    state: ``tx``'s state.
    params: the parameters.
    **extra_args: passed on to ``tx.update``.

  Returns:
    ``(new_params, new_state)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import microadam_optax as mo
    >>> loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
    >>> params = {"w": jnp.zeros(1000)}
    >>> for tx in (mo.microadam(1e-2, density=0.1), optax.adamw(1e-2)):
    ...   state = tx.init(params)
    ...   step = jax.jit(lambda p, s: mo.apply_gradients(
    ...       tx, jax.grad(loss)(p), s, p))
    ...   p = params
    ...   for _ in range(100):
    ...     p, state = step(p, state)
    ...   print(bool(loss(p) < loss(params)))
    True
    True
  """
  if isinstance(tx, FusedGradientTransformation):
    return tx.apply_gradients(grads, state, params, **extra_args)
  return _update_then_apply(tx, grads, state, params, **extra_args)


__all__ = ["FusedGradientTransformation", "apply_gradients"]

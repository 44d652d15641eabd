"""The optax alias of a direction: decoupled weight decay, then the rate.

``optax.adamw`` is ``scale_by_adam`` followed by ``add_decayed_weights`` and
``scale_by_learning_rate``; every optimizer of this library builds its alias
(``microadam``, ``microadam_mixed``, ``adam_mini``) from its ``scale_by_*``
direction the same way, here.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import optax

from microadam_optax._checks import check_learning_rate


def decoupled_alias(
    direction: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]],
) -> optax.GradientTransformationExtraArgs:
  r""":math:`\theta_{t+1} = \theta_t - \eta_t (u_t + \lambda \theta_t)`.

  Args:
    direction: the transformation that gives :math:`u_t`.
    learning_rate: :math:`\eta_t`, a number or an optax schedule.
    weight_decay: :math:`\lambda`, applied to the leaves ``mask`` selects.
    mask: as in :func:`optax.add_decayed_weights` (``None``: every leaf).

  Returns:
    ``optax.chain(direction, add_decayed_weights, scale_by_learning_rate)``.

  Raises:
    ValueError: for a ``learning_rate`` that is neither a finite number nor
      a schedule.
  """
  check_learning_rate(learning_rate)
  return optax.chain(
      direction,
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )

"""The comparison's optimizers, fitted to a Llama's parameter layout.

Every optimizer comes from :mod:`microadam_compare.optimizers` (its authors'
hyper-parameters). Two things depend on the model:

* Adam-mini needs the head width (one second moment per head);
* with stacked layers a decoder matrix is one ``[num_layers, in, out]``
  array, while Adam-mini's partition, GaLore's projection and Muon's
  orthogonalisation are defined per matrix (and Adafactor factors the two
  largest axes, which for a stacked norm scale are the layer axis and the
  width). :func:`per_layer` maps such an optimizer over the layer axis
  (``jax.lax.map``), so each layer's matrix gets exactly the update it gets in
  the unrolled layout. Element-wise optimizers (AdamW) and MicroAdam (whose
  compression runs on the flattened leaf, whatever its shape) take the
  stacked arrays as they are.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import optax

from microadam_compare import optimizers as registry
from llama_finetune import model as model_lib

#: Registry optimizers whose update depends on the matrix structure of a
#: leaf, so a stacked leaf must be split by layer (:func:`per_layer`).
PER_MATRIX = frozenset({"adam_mini", "galore", "muon", "adafactor"})


class PerLayerState(NamedTuple):
  """State of :func:`per_layer`: the stacked layers' (with a leading layer
  axis) and the other parameters'."""
  layers: Any
  rest: Any


def per_layer(tx: optax.GradientTransformation, key: str = "layers"
              ) -> optax.GradientTransformation:
  """Applies ``tx`` to each layer of the stacked subtree ``params[key]``
  (``jax.lax.map`` over its leading axis) and to the other parameters as a
  whole.

  A loop rather than ``jax.vmap``: a batched ``lax.cond`` runs both branches,
  so GaLore would recompute its SVDs at every step; the loop also keeps one
  layer's temporaries alive at a time.

  Args:
    tx: any transformation that treats layers independently (its state is
      made per layer).
    key: the top-level key of the stacked layers.

  Returns:
    A transformation of the same parameters whose updates equal ``tx``'s on
    the unrolled layout (one leaf per layer).
  """
  def split(tree):
    return tree[key], {k: v for k, v in tree.items() if k != key}

  def init(params):
    layers, rest = split(params)
    return PerLayerState(jax.lax.map(tx.init, layers), tx.init(rest))

  def update(updates, state, params=None):
    u_layers, u_rest = split(updates)
    if params is None:
      new_layers, s_layers = jax.lax.map(lambda a: tx.update(*a),
                                         (u_layers, state.layers))
      new_rest, s_rest = tx.update(u_rest, state.rest)
    else:
      p_layers, p_rest = split(params)
      new_layers, s_layers = jax.lax.map(
          lambda a: tx.update(*a), (u_layers, state.layers, p_layers))
      new_rest, s_rest = tx.update(u_rest, state.rest, p_rest)
    return {**new_rest, key: new_layers}, PerLayerState(s_layers, s_rest)

  return optax.GradientTransformation(init, update)


def build(name: str, learning_rate: optax.ScalarOrSchedule,
          config: model_lib.LlamaConfig,
          weight_decay: Optional[float] = None
          ) -> optax.GradientTransformation:
  """The registry's optimizer ``name`` for a Llama of ``config``.

  Args:
    name: a key of :data:`microadam_compare.optimizers.REGISTRY` (first
      order: the Gauss-Newton entries need a model function, not gradients).
    learning_rate: a float or a schedule.
    config: the model's configuration (head width, layout).
    weight_decay: ``None``: the optimizer's own recommendation.

  Raises:
    ValueError: for a second-order optimizer.
  """
  spec = registry.get(name)
  if spec.second_order:
    raise ValueError(
        f"optimizer {name!r} is second order (it takes a model function, not "
        "gradients); fine-tuning takes the first-order ones: "
        + ", ".join(k for k, s in registry.REGISTRY.items()
                    if not s.second_order) + ".")
  # GaLore's rank: its authors' d/4 (the registry's default is for the
  # comparison's small models).
  context = registry.OptimizerContext(
      weight_decay=weight_decay, head_dim=config.dim_per_head,
      galore_rank=max(config.hidden_size // 4, 1))
  tx = registry.build(name, learning_rate, context)
  if config.layout == "stacked" and name in PER_MATRIX:
    tx = per_layer(tx)
  return tx

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
  stacked arrays as they are, unless a stacked leaf is too large for
  MicroAdam's GPU kernels (int32 offsets: Llama-2-13B's MLP), which are
  then updated per layer too.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
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


def layer_of(tree: Any, i: jax.Array) -> Any:
  """Layer ``i`` of a stacked tree (every leaf indexed on its first axis)."""
  return jax.tree.map(
      lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), tree)


def put_layer(tree: Any, values: Any, i: jax.Array) -> Any:
  """The stacked ``tree`` with layer ``i`` replaced by ``values`` (cast to
  each leaf's dtype)."""
  return jax.tree.map(lambda x, v: jax.lax.dynamic_update_index_in_dim(
      x, v.astype(x.dtype), i, 0), tree, values)


def per_layer(tx: optax.GradientTransformation, key: str = "layers"
              ) -> optax.GradientTransformation:
  """Applies ``tx`` to each layer of the stacked subtree ``params[key]``
  (a loop over its leading axis) and to the other parameters as a whole.

  The loop (``jax.lax.fori_loop``) carries the stacked gradients and state
  and overwrites layer ``i``'s slice with its update and new state, so the
  step holds no second copy of either (XLA updates loop-carried slices in
  place) and only one layer's temporaries. A loop rather than ``jax.vmap``:
  a batched ``lax.cond`` runs both branches, so GaLore would recompute its
  SVDs at every step. Updates are written in the gradients' dtype where
  ``tx`` returns another one into a buffer of that dtype.

  Args:
    tx: any transformation that treats layers independently (its state is
      made per layer).
    key: the top-level key of the stacked layers.

  Returns:
    A transformation of the same parameters whose updates equal ``tx``'s on
    the unrolled layout (one leaf per layer).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from llama_finetune import optim
    >>> params = {"layers": {"w": jnp.ones((3, 4, 4))}, "head": jnp.ones(4)}
    >>> tx = optim.per_layer(optax.adafactor(1e-2, min_dim_size_to_factor=2))
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["layers"]["w"].shape
    (3, 4, 4)
  """
  def split(tree):
    return tree[key], {k: v for k, v in tree.items() if k != key}

  def init(params):
    layers, rest = split(params)
    return PerLayerState(jax.lax.map(tx.init, layers), tx.init(rest))

  def update(updates, state, params=None):
    u_layers, u_rest = split(updates)
    p_layers, p_rest = split(params) if params is not None else (None, None)
    g_leaves, g_def = jax.tree.flatten(u_layers)
    num = g_leaves[0].shape[0]
    zero = jnp.zeros((), jnp.int32)
    out_leaves = jax.tree.leaves(jax.eval_shape(
        lambda u, s, p: tx.update(u, s, p)[0], layer_of(u_layers, zero),
        layer_of(state.layers, zero),
        None if p_layers is None else layer_of(p_layers, zero)))
    # Layer i's update overwrites its gradient where the dtypes agree; the
    # other updates go to buffers of their own dtype.
    same = [g.dtype == o.dtype for g, o in zip(g_leaves, out_leaves)]
    extra = [jnp.zeros(g.shape, o.dtype)
             for g, o, sm in zip(g_leaves, out_leaves, same) if not sm]

    def body(i, carry):
      grads, extra, s = carry
      p = None if p_layers is None else layer_of(p_layers, i)
      new_u, new_s = tx.update(g_def.unflatten(layer_of(grads, i)),
                               layer_of(s, i), p)
      rest = iter(extra)
      grads_out, extra_out = [], []
      for g, u, sm in zip(grads, jax.tree.leaves(new_u), same):
        if sm:
          grads_out.append(put_layer(g, u, i))
        else:
          grads_out.append(g)
          extra_out.append(put_layer(next(rest), u, i))
      return grads_out, extra_out, put_layer(s, new_s, i)

    grads, extra, s_layers = jax.lax.fori_loop(
        0, num, body, (g_leaves, extra, state.layers))
    rest = iter(extra)
    new_layers = g_def.unflatten([g if sm else next(rest)
                                  for g, sm in zip(grads, same)])
    new_rest, s_rest = tx.update(u_rest, state.rest, p_rest)
    return {**new_rest, key: new_layers}, PerLayerState(s_layers, s_rest)

  return optax.GradientTransformation(init, update)


def registry_optimizer(name: str, learning_rate: optax.ScalarOrSchedule,
                       config: model_lib.LlamaConfig,
                       weight_decay: Optional[float] = None
                       ) -> optax.GradientTransformation:
  """The registry's optimizer ``name`` configured for a Llama of ``config``
  (head width, GaLore's rank), for one layer's or an unrolled model's
  parameters: :func:`build` adds what a stacked layout needs.

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
  return registry.build(name, learning_rate, context)


def build(name: str, learning_rate: optax.ScalarOrSchedule,
          config: model_lib.LlamaConfig,
          weight_decay: Optional[float] = None
          ) -> optax.GradientTransformation:
  """The registry's optimizer ``name`` for a Llama of ``config``:
  :func:`registry_optimizer`, mapped over the stacked layers
  (:func:`per_layer`) where its update is defined per matrix. MicroAdam
  takes a stacked leaf whole (its kernels index leaves of any size; its
  blocks are over the flattened leaf, as for any other leaf).

  Args:
    name: a key of :data:`microadam_compare.optimizers.REGISTRY` (first
      order: the Gauss-Newton entries need a model function, not gradients).
    learning_rate: a float or a schedule.
    config: the model's configuration (head width, layout).
    weight_decay: ``None``: the optimizer's own recommendation.

  Raises:
    ValueError: for a second-order optimizer.
  """
  tx = registry_optimizer(name, learning_rate, config, weight_decay)
  if config.layout == "stacked" and name in PER_MATRIX:
    tx = per_layer(tx)
  return tx

"""The layer-by-layer training step: each layer updated as its gradient appears.

A plain step computes the whole gradient (one buffer the size of the
parameters) and then the optimizer's update. Here the backward pass over the
stacked layers is a loop, last layer first: it recomputes layer ``i`` from
its saved input (as remat does), takes that layer's parameter gradient and
the gradient of its input, and at once applies the optimizer to layer ``i``'s
parameters and state, writing both back into their stacked arrays. Only one
layer's gradient exists at a time; the embedding, final norm and head are
updated at the end from their own gradients.

Valid for optimizers that treat layers independently, with the state of
:func:`optim.per_layer` (the step gives the parameters of a plain step with
``optim.per_layer(tx)``; tested); not with what needs the whole gradient
before any update (global-norm clipping, ``optax.MultiSteps``
accumulation).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llama_finetune import model as model_lib
from llama_finetune import optim


def make_layerwise_step(graphdef: nnx.GraphDef, config: model_lib.LlamaConfig,
                        tx: optax.GradientTransformation):
  """``jit((params, state, tokens) -> (params, state, loss))`` updating each
  layer during the backward pass; ``state`` is
  ``optim.per_layer(tx).init(params)``, parameters and state donated.

  Args:
    graphdef: the stacked :class:`model.Llama`'s graph definition.
    config: its configuration (``layout="stacked"``).
    tx: the per-layer optimizer (not wrapped in :func:`optim.per_layer`).

  Returns:
    The jitted step; ``tokens`` ``[B, T + 1]``, the loss is next-token
    cross-entropy.
  """
  if config.layout != "stacked":
    raise ValueError(f"the layer-by-layer step needs layout='stacked', got "
                     f"{config.layout!r}.")
  layer_def = model_lib.layer_graphdef(config)

  def step(params, state, tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    layers = params["layers"]
    rest = {k: v for k, v in params.items() if k != "layers"}
    num = config.num_layers

    def whole(r):
      return nnx.merge(graphdef, {**r, "layers": layers})

    cos, sin = whole(rest).rope(inputs.shape[1])

    def layer_fn(p, x):
      return nnx.merge(layer_def, p)(x, cos, sin)

    x0, embed_vjp = jax.vjp(lambda r: whole(r).embed_tokens(inputs), rest)

    def forward(x, p):
      return layer_fn(p, x), x          # keep each layer's input

    x_last, xs = jax.lax.scan(forward, x0, layers)
    loss, head_vjp = jax.vjp(
        lambda r, x: model_lib.lm_loss(whole(r).head(x), targets), rest,
        x_last)
    d_rest, dx = head_vjp(jnp.ones_like(loss))

    def backward(j, carry):
      dx, layers, s = carry
      i = num - 1 - j
      p_i = optim.layer_of(layers, i)
      _, vjp = jax.vjp(layer_fn, p_i, optim.layer_of(xs, i))
      dp_i, dx = vjp(dx)
      updates, s_i = tx.update(dp_i, optim.layer_of(s, i), p_i)
      new_p = optax.apply_updates(p_i, updates)
      return (dx, optim.put_layer(layers, new_p, i),
              optim.put_layer(s, s_i, i))

    dx, layers, s_layers = jax.lax.fori_loop(
        0, num, backward, (dx, layers, state.layers))
    (d_embed,) = embed_vjp(dx)
    d_rest = jax.tree.map(jnp.add, d_rest, d_embed)
    updates, s_rest = tx.update(d_rest, state.rest, rest)
    new = {**optax.apply_updates(rest, updates), "layers": layers}
    return new, optim.PerLayerState(s_layers, s_rest), loss

  return jax.jit(step, donate_argnums=(0, 1))

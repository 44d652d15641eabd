"""MicroAdam trains Flax models: NNX through nnx.Optimizer, linen through TrainState."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.training import train_state

import microadam_optax as mo


def _data(seed=0, n=128):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(k1, (n, 16))
  w = jax.random.normal(k2, (16, 4))
  return x, jnp.tanh(x @ w)


class NnxMlp(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(16, 64, rngs=rngs)
    self.fc2 = nnx.Linear(64, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


class LinenMlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(nn.relu(nn.Dense(64)(x)))


def test_nnx_optimizer_reduces_loss():
  x, y = _data()
  model = NnxMlp(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, mo.microadam(3e-3, density=0.1,
                                                topk_block_size=256),
                            wrt=nnx.Param)

  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  first = float(loss_fn(model))
  for _ in range(150):
    step(model, optimizer)
  last = float(loss_fn(model))
  assert last < 0.5 * first, (first, last)


def test_linen_train_state_reduces_loss():
  x, y = _data(1)
  model = LinenMlp()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=mo.microadam(3e-3, density=0.1, topk_block_size=256))

  def loss_fn(params):
    return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

  @jax.jit
  def step(state):
    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

  first = float(loss_fn(state.params))
  for _ in range(150):
    state = step(state)
  last = float(loss_fn(state.params))
  assert last < 0.5 * first, (first, last)
  assert isinstance(state.opt_state[0], mo.ScaleByMicroAdamState)


def test_apply_gradients_on_nnx_state_with_a_mask():
  # The fused step on an NNX model's state (Variables around the arrays,
  # a mask on the kernels only): what update then apply_updates give.
  x, y = _data(2)
  graphdef, params = nnx.split(NnxMlp(nnx.Rngs(1)), nnx.Param)
  mask = lambda p: jax.tree.map(lambda a: a.ndim > 1, p)
  tx = mo.microadam(3e-3, weight_decay=0.1, mask=mask, density=0.1,
                    topk_block_size=256)

  def loss_fn(p):
    return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

  fused = opt = params
  s_fused = s_opt = tx.init(params)
  for _ in range(20):
    g = jax.grad(loss_fn)(fused)
    fused, s_fused = jax.jit(tx.apply_gradients)(g, s_fused, fused)
    u, s_opt = jax.jit(tx.update)(jax.grad(loss_fn)(opt), s_opt, opt)
    opt = optax.apply_updates(opt, u)
  assert jax.tree.structure(fused) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(opt)):
    assert jnp.allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(loss_fn(fused)) < 0.9 * float(loss_fn(params))

"""Trains a small model for N steps, optionally restoring/saving a checkpoint.

Run as a script by tests/test_reliability.py so that "restore" happens in a
fresh process:

  python checkpoint_run.py OPTIMIZER STEPS OUT.npz [--restore DIR] [--save DIR]
      [--start STEP]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import microadam_optax as mo


def make_optimizer(name: str) -> optax.GradientTransformation:
  if name == "microadam":
    return mo.microadam(3e-3, weight_decay=0.01, density=0.05, window=4,
                        topk_block_size=64, quant_block_size=32)
  if name == "adam_mini":
    return mo.adam_mini(3e-3, weight_decay=0.01)
  raise ValueError(f"unknown optimizer {name!r}")


def init_params() -> dict:
  key = jax.random.PRNGKey(0)
  k1, k2 = jax.random.split(key)
  return {"dense": {"kernel": jax.random.normal(k1, (24, 40)) * 0.2,
                    "bias": jnp.zeros((40,))},
          "head": {"kernel": (jax.random.normal(k2, (40, 3)) * 0.2
                              ).astype(jnp.bfloat16)}}


def loss_fn(params, step):
  x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(1), step),
                        (16, 24))
  h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
  out = h @ params["head"]["kernel"].astype(jnp.float32)
  return jnp.mean((out - jnp.sin(x[:, :3])) ** 2)


def train(tx, params, state, start, steps):
  @jax.jit
  def step_fn(params, state, step):
    grads = jax.grad(loss_fn)(params, step)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for step in range(start, start + steps):
    params, state = step_fn(params, state, step)
  return params, state


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("optimizer")
  parser.add_argument("steps", type=int)
  parser.add_argument("out")
  parser.add_argument("--restore", default=None)
  parser.add_argument("--save", default=None)
  parser.add_argument("--start", type=int, default=0)
  args = parser.parse_args(argv)
  tx = make_optimizer(args.optimizer)
  params = init_params()
  state = tx.init(params)
  ckpt = ocp.StandardCheckpointer()
  if args.restore:
    target = {"params": params, "opt_state": state}
    restored = ckpt.restore(args.restore, target)
    params, state = restored["params"], restored["opt_state"]
  params, state = train(tx, params, state, args.start, args.steps)
  if args.save:
    ckpt.save(args.save, {"params": params, "opt_state": state})
    ckpt.wait_until_finished()
  flat = {jax.tree_util.keystr(p): np.asarray(v.astype(jnp.float32))
          for p, v in jax.tree_util.tree_leaves_with_path(params)}
  np.savez(args.out, **flat)


if __name__ == "__main__":
  main()

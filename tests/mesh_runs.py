"""Mesh checks run in a fresh process by tests/test_sharding.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python tests/mesh_runs.py orbax_restore {explicit,auto} TMP_DIR
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python tests/mesh_runs.py nnx_train

Each prints ``OK`` when every assertion held.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import microadam_optax as mo

SHAPE = (64, 1024)
BLOCK = 1024


def orbax_restore(axis_type: str, tmp_dir: str) -> None:
  """MicroAdam's state saved on a (4, 2) mesh restores into it, exactly."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(
      AxisType.Explicit if axis_type == "explicit" else AxisType.Auto,) * 2)
  target = NamedSharding(mesh, P(None, ("x", "y")))
  tx = mo.microadam(1e-2, window=3, topk_block_size=BLOCK)
  params = jax.device_put(jnp.zeros(SHAPE), target)
  rng = np.random.default_rng(7)
  grads = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3)]
  with jax.set_mesh(mesh):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads[:2]:
      _, state = jax.block_until_ready(
          update(jax.device_put(g, target), state, params))
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(tx.init, params), mo.state_shardings(tx, params))
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckpt:
      ckpt.save(f"{tmp_dir}/state", args=ocp.args.StandardSave(state))
      restored = ckpt.restore(f"{tmp_dir}/state",
                              args=ocp.args.StandardRestore(abstract))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
      assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding,
                                                               b.sharding)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    g = jax.device_put(grads[2], target)
    u1, _ = update(g, state, params)
    u2, _ = update(g, restored, params)
  np.testing.assert_array_equal(np.asarray(u1), np.asarray(u2))


def nnx_train() -> None:
  """An NNX model with partitioning annotations trains under nnx.Optimizer
  on an Explicit mesh, its MicroAdam state sharded."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))

  class Mlp(nnx.Module):

    def __init__(self, rngs):
      init = nnx.initializers.lecun_normal()
      self.w1 = nnx.Param(nnx.with_partitioning(init, ("fsdp", None))(
          rngs.params(), (64, 1024)))
      self.w2 = nnx.Param(nnx.with_partitioning(init, (None, "fsdp"))(
          rngs.params(), (1024, 64)))

    def __call__(self, x):
      return jnp.tanh(x @ self.w1[...]) @ self.w2[...]

  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
  y = jnp.tanh(x[:, ::-1])

  with jax.set_mesh(mesh):

    @nnx.jit
    def create():
      model = Mlp(nnx.Rngs(0))
      state = nnx.state(model)
      specs = nnx.get_partition_spec(state)
      nnx.update(model, jax.tree.map(
          lambda v, s: jax.sharding.reshard(v, s), state, specs))
      return model

    model = create()
    optimizer = nnx.Optimizer(
        model, mo.microadam(3e-3, density=0.05, topk_block_size=BLOCK),
        wrt=nnx.Param)

    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def step(model, optimizer):
      loss, grads = nnx.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads)
      return loss

    evaluate = nnx.jit(loss_fn)
    first = float(evaluate(model))
    for _ in range(60):
      # One step at a time: with several collective programs in flight, the
      # 8 CPU devices' threads can each wait in a different program's
      # rendezvous (XLA then aborts after 40 s).
      jax.block_until_ready(step(model, optimizer))
    last = float(evaluate(model))
  assert last < 0.7 * first, (first, last)
  opt_state = nnx.state(optimizer, nnx.optimizer.OptState)
  windows = [v for v in jax.tree.leaves(opt_state) if v.ndim == 3]
  assert windows and all(v.sharding.spec[1] == "fsdp" for v in windows), [
      v.sharding for v in windows]
  assert model.w1[...].sharding.spec == P("fsdp", None)


if __name__ == "__main__":
  {"orbax_restore": orbax_restore, "nnx_train": nnx_train}[sys.argv[1]](
      *sys.argv[2:])
  print("OK")

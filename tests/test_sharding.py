"""MicroAdam on an 8-device CPU mesh: FSDP and data parallelism.

tests/conftest.py starts the CPU backend with eight devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import microadam_optax as mo

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
               "reduce-scatter")


@pytest.fixture(scope="module")
def mesh():
  if len(jax.devices()) < 8:
    raise RuntimeError("tests/conftest.py must provide 8 CPU devices")
  return Mesh(np.array(jax.devices()[:8]), ("fsdp",))


def _params(rng):
  return {"w": jnp.asarray(rng.standard_normal((1024, 96)), jnp.float32),
          "v": jnp.asarray(rng.standard_normal((8 * 512,)), jnp.bfloat16),
          "odd": jnp.asarray(rng.standard_normal((7, 5)), jnp.float32)}


def _tx():
  return mo.scale_by_microadam(density=0.02, window=3, topk_block_size=512,
                               quant_block_size=256)


def _shard_fsdp(mesh, params):
  specs = {"w": P("fsdp", None), "v": P("fsdp"), "odd": P()}
  return {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
          for k, v in params.items()}


def test_fsdp_state_is_sharded_like_its_param(mesh):
  params = _shard_fsdp(mesh, _params(np.random.default_rng(0)))
  state = _tx().init(params)
  for name in ("w", "v"):
    assert state.window_indices[name].sharding.spec == P(None, "fsdp", None)
    assert state.error_codes[name].sharding.spec == P("fsdp", None)
    assert state.error_min[name].sharding.spec == P("fsdp")
  assert state.window_values["odd"].sharding.spec == P()
  # Per-device bytes of the sharded leaves: a eighth of the total.
  for name in ("w", "v"):
    for leaf in (state.window_indices[name], state.window_values[name],
                 state.error_codes[name]):
      per_device = [s.data.nbytes for s in leaf.addressable_shards]
      assert len(per_device) == 8
      assert all(b * 8 == leaf.nbytes for b in per_device)


def test_fsdp_update_moves_no_parameter_and_matches_unsharded(mesh):
  rng = np.random.default_rng(1)
  host = _params(rng)
  params = _shard_fsdp(mesh, host)
  tx = _tx()
  state, state_host = tx.init(params), tx.init(host)
  update = jax.jit(tx.update)
  grads_host = [jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), host)
                for _ in range(4)]
  text = update.lower(params, state, params).compile().as_text()
  found = [c for c in COLLECTIVES if c in text]
  assert not found, f"the sharded update communicates: {found}"
  for g_host in grads_host:
    g = jax.tree.map(lambda x, p: jax.device_put(x, p.sharding), g_host,
                     params)
    u, state = update(g, state, params)
    u_host, state_host = update(g_host, state_host, host)
    for k in host:
      assert u[k].sharding.is_equivalent_to(params[k].sharding, u[k].ndim)
      np.testing.assert_allclose(np.asarray(u[k], np.float32),
                                 np.asarray(u_host[k], np.float32),
                                 rtol=1e-6, atol=1e-6)
  want = NamedSharding(mesh, P(None, "fsdp", None))
  assert state.window_values["w"].sharding.is_equivalent_to(want, 3)


def test_data_parallel_replicated_params(mesh):
  rng = np.random.default_rng(2)
  host = _params(rng)
  params = jax.device_put(host, NamedSharding(mesh, P()))
  tx = _tx()
  state = tx.init(params)
  assert state.error_codes["w"].sharding.spec == P()
  # A batch sharded over the mesh: the gradient of the mean loss is
  # all-reduced by XLA; the optimizer update itself is local.
  x = jax.device_put(jnp.asarray(rng.standard_normal((64, 1024)), jnp.float32),
                     NamedSharding(mesh, P("fsdp", None)))

  @jax.jit
  def step(params, state, x):
    grads = jax.grad(lambda p: jnp.mean(jnp.tanh(x @ p["w"]) ** 2)
                     + jnp.mean(p["v"].astype(jnp.float32) ** 2)
                     + jnp.mean(p["odd"] ** 2))(params)
    return tx.update(grads, state, params)

  u, state = step(params, state, x)
  assert u["w"].sharding.is_fully_replicated
  assert np.isfinite(np.asarray(u["w"])).all()

"""MicroAdam on an 8-device CPU mesh: any axis type, any sharding, no gathers.

tests/conftest.py starts the CPU backend with eight devices. The matrix is
(mesh axis type) x (sharding of the leaf) x (eager / jitted init) x
(implementation); each case checks the compiled update for collectives, the
updates' and the state's shardings, the state's bytes per device, and the
numbers: bit-identical to the unsharded run where each shard holds a
contiguous range of whole blocks, and to MicroAdam run on each device's
flattened shard by itself (blocks formed per shard) where the sharding splits
the parameter otherwise.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import microadam_optax as mo

HERE = pathlib.Path(__file__).parent

SHAPE = (64, 1024)
BLOCK = 1024

#: name -> (PartitionSpec on the (4, 2) mesh, whether shards are contiguous
#: ranges of the flattened leaf, i.e. hold the unsharded run's own blocks).
SHARDINGS = {
    "first_axis": (P(("x", "y"), None), True),
    "last_axis": (P(None, ("x", "y")), False),
    "two_axes": (P("x", "y"), False),
    "replicated": (P(), True),
}


def _mesh(axis_type):
  return jax.make_mesh((4, 2), ("x", "y"), axis_types=(axis_type,) * 2)


def _tx(implementation):
  return mo.scale_by_microadam(window=3, density=0.02, topk_block_size=BLOCK,
                               implementation=implementation)


def _grads(seed, steps=3):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(steps)]


def _reference_updates(tx, grads, local_shape, indices):
  """MicroAdam on each shard's data alone, on one device."""
  out = {}
  for index in indices:
    state = tx.init(jnp.zeros(local_shape, jnp.float32))
    us = []
    for g in grads:
      u, state = jax.jit(tx.update)(jnp.asarray(g[index]), state)
      us.append(np.asarray(u))
    out[_key(index)] = us
  return out


def _key(index):
  return tuple((s.start, s.stop) for s in index)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("init", ["eager", "jit"])
@pytest.mark.parametrize("sharding", list(SHARDINGS))
@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_update_is_local_and_exact(axis_type, sharding, init,
                                   implementation):
  mesh = _mesh(AxisType.Explicit if axis_type == "explicit" else
               AxisType.Auto)
  spec, contiguous = SHARDINGS[sharding]
  target = NamedSharding(mesh, spec)
  tx = _tx(implementation)
  grads = _grads(seed=zlib.crc32(f"{axis_type}-{sharding}-{init}".encode()))
  params = jax.device_put(jnp.zeros(SHAPE, jnp.float32), target)
  with jax.set_mesh(mesh):
    if init == "eager":
      state = tx.init(params)
    elif axis_type == "explicit":  # the sharding is in the params' types
      state = jax.jit(tx.init)(params)
    else:  # Auto axes: XLA cannot see it; the helper gives it
      state = jax.jit(tx.init, out_shardings=mo.state_shardings(
          tx, params))(params)
    update = jax.jit(tx.update)
    text = update.lower(params, state).compile().as_text()
    us = []
    for g in grads:
      u, state = update(jax.device_put(g, target), state)
      us.append(u)

  assert not mo.collectives(text), f"communicates: {mo.collectives(text)}"
  for u in us:
    assert u.sharding.is_equivalent_to(target, u.ndim), u.sharding
  num_shards = 1 if sharding == "replicated" else 8
  for leaf in jax.tree.leaves(state)[1:]:  # the count is a scalar
    per_device = [s.data.nbytes for s in leaf.addressable_shards]
    assert max(per_device) <= 1.2 * leaf.nbytes / num_shards, (
        leaf.shape, leaf.sharding, per_device)

  if contiguous:  # the unsharded run, bit for bit
    host_state = tx.init(jnp.zeros(SHAPE, jnp.float32))
    for g, u in zip(grads, us):
      want, host_state = jax.jit(tx.update)(jnp.asarray(g), host_state)
      np.testing.assert_array_equal(np.asarray(u), np.asarray(want))
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(host_state)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  else:  # blocks formed over each device's own shard
    shards = {_key(s.index): s.index for s in us[0].addressable_shards}
    local_shape = us[0].addressable_shards[0].data.shape
    want = _reference_updates(tx, grads, local_shape, list(shards.values()))
    for step, u in enumerate(us):
      for s in u.addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data),
                                      want[_key(s.index)][step])


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_microadam_mixed_is_local_and_exact(axis_type):
  """mo.microadam_mixed (MicroAdam on the matrix, dense Adam on the vectors)
  updates every leaf where it lives: no collective, the unsharded numbers."""
  mesh = _mesh(AxisType.Explicit if axis_type == "explicit" else
               AxisType.Auto)
  targets = {"w": NamedSharding(mesh, P(("x", "y"), None)),
             "scale": NamedSharding(mesh, P(("x", "y"))),
             "bias": NamedSharding(mesh, P())}
  shapes = {"w": SHAPE, "scale": (SHAPE[1],), "bias": (SHAPE[1],)}
  tx = mo.microadam_mixed(1e-3, window=3, density=0.02, topk_block_size=BLOCK,
                          dense_b2=0.95, weight_decay=0.1)
  rng = np.random.default_rng(zlib.crc32(f"mixed-{axis_type}".encode()))
  grads = [{k: rng.standard_normal(v).astype(np.float32)
            for k, v in shapes.items()} for _ in range(3)]
  host = {k: jnp.asarray(rng.standard_normal(v), jnp.float32)
          for k, v in shapes.items()}
  params = {k: jax.device_put(v, targets[k]) for k, v in host.items()}
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init, out_shardings=mo.state_shardings(tx, params))(
        params)
    update = jax.jit(tx.update)
    text = update.lower(params, state, params).compile().as_text()
    us = []
    for g in grads:
      g = {k: jax.device_put(v, targets[k]) for k, v in g.items()}
      u, state = update(g, state, params)
      us.append(u)
  assert not mo.collectives(text), f"communicates: {mo.collectives(text)}"
  host_state = tx.init(host)
  for g, u in zip(grads, us):
    want, host_state = jax.jit(tx.update)(
        jax.tree.map(jnp.asarray, g), host_state, host)
    for k in shapes:
      assert u[k].sharding.is_equivalent_to(targets[k], u[k].ndim), k
      np.testing.assert_array_equal(np.asarray(u[k]), np.asarray(want[k]))


@pytest.mark.parametrize("implementation,sharding", [
    *(("xla", s) for s in SHARDINGS),
    ("pallas", "first_axis"), ("pallas", "two_axes")])
@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_apply_gradients_is_local_and_exact(axis_type, sharding,
                                            implementation):
  """mo.apply_gradients updates a sharded parameter where it lives: no
  collective, the parameter keeps its sharding, and it is what the sharded
  ``update`` then ``optax.apply_updates`` give (the unsharded run's, bit for
  bit, where shards hold the unsharded run's blocks)."""
  mesh = _mesh(AxisType.Explicit if axis_type == "explicit" else
               AxisType.Auto)
  spec, contiguous = SHARDINGS[sharding]
  target = NamedSharding(mesh, spec)
  tx = mo.microadam(1e-2, weight_decay=0.1, window=3, density=0.02,
                    topk_block_size=BLOCK, implementation=implementation)
  seed = zlib.crc32(f"apply-{axis_type}-{sharding}".encode())
  grads = _grads(seed)
  host = jnp.asarray(np.random.default_rng(seed).standard_normal(SHAPE),
                     jnp.float32)
  params = jax.device_put(host, target)
  with jax.set_mesh(mesh):
    state = tx.init(params)
    step = jax.jit(tx.apply_gradients)
    update = jax.jit(tx.update)
    text = step.lower(params, state, params).compile().as_text()
    p_fused, s_fused, p_opt, s_opt = params, state, params, state
    for g in grads:
      g = jax.device_put(g, target)
      p_fused, s_fused = step(g, s_fused, p_fused)
      u, s_opt = update(g, s_opt, p_opt)
      p_opt = optax.apply_updates(p_opt, u)
  assert not mo.collectives(text), f"communicates: {mo.collectives(text)}"
  assert p_fused.sharding.is_equivalent_to(target, p_fused.ndim)
  for x, y in zip(jax.tree.leaves(s_fused), jax.tree.leaves(s_opt)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_allclose(np.asarray(p_fused), np.asarray(p_opt),
                             rtol=1e-6, atol=1e-7)
  if contiguous:  # the unsharded fused run, bit for bit
    p, s = host, tx.init(host)
    for g in grads:
      p, s = jax.jit(tx.apply_gradients)(jnp.asarray(g), s, p)
    np.testing.assert_array_equal(np.asarray(p_fused), np.asarray(p))


def test_collectives_reads_what_a_compiled_step_communicates():
  """A sharded array gathered to every device is an all-gather of the whole
  array; a sum over the sharded axis an all-reduce; a map that stays in its
  shards communicates nothing."""
  rows = int(np.random.default_rng().integers(1, 5)) * 8
  mesh = _mesh(AxisType.Explicit)
  x = jax.device_put(jnp.ones((rows, 96), jnp.float32),
                     NamedSharding(mesh, P(("x", "y"), None)))
  whole = NamedSharding(mesh, P())
  gather = jax.jit(lambda a: a * 2, out_shardings=whole)
  total = jax.jit(lambda a: jnp.sum(a, axis=0), out_shardings=whole)
  local = jax.jit(lambda a: a * 2)
  assert mo.collectives(gather.lower(x).compile()) == {
      "all-gather": rows * 96}
  assert "all-reduce" in mo.collectives(total.lower(x).compile().as_text())
  assert mo.collectives(local.lower(x).compile()) == {}


def test_state_shapes_do_not_depend_on_the_sharding():
  tx = _tx("xla")
  host = jax.eval_shape(tx.init, jnp.zeros(SHAPE))
  for axis_type in (AxisType.Explicit, AxisType.Auto):
    mesh = _mesh(axis_type)
    for spec, _ in SHARDINGS.values():
      params = jax.device_put(jnp.zeros(SHAPE), NamedSharding(mesh, spec))
      with jax.set_mesh(mesh):
        state = tx.init(params)
      assert jax.tree.map(jnp.shape, state) == jax.tree.map(jnp.shape, host)


def test_auto_axes_plain_jit_init_is_correct():
  """Without out_shardings XLA places a state made inside jit as it likes
  (optax.adam's too); the numbers are those of the eager init."""
  mesh = _mesh(AxisType.Auto)
  target = NamedSharding(mesh, SHARDINGS["first_axis"][0])
  tx = _tx("xla")
  params = jax.device_put(jnp.zeros(SHAPE), target)
  s1, s2 = tx.init(params), jax.jit(tx.init)(params)
  for g in _grads(3, 2):
    g = jax.device_put(g, target)
    u1, s1 = jax.jit(tx.update)(g, s1)
    u2, s2 = jax.jit(tx.update)(g, s2)
    np.testing.assert_array_equal(np.asarray(u1), np.asarray(u2))


def test_state_shardings_match_eager_init_for_a_chain():
  mesh = _mesh(AxisType.Auto)
  params = {
      "w": jax.device_put(jnp.zeros(SHAPE), NamedSharding(mesh, P(None, "x"))),
      "b": jax.device_put(jnp.zeros((SHAPE[1],)), NamedSharding(mesh, P())),
  }
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   mo.microadam(1e-3, weight_decay=0.1, window=2,
                                topk_block_size=BLOCK))
  shardings = mo.state_shardings(tx, params)
  state = tx.init(params)
  assert jax.tree.structure(shardings) == jax.tree.structure(state)
  for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(state)):
    if x.ndim:  # eager init leaves scalars (counts) on the default device
      assert s.is_equivalent_to(x.sharding, x.ndim), (s, x.sharding)
  assert state[1][0].window_indices["w"].sharding.spec == P(None, "x", None)


def test_state_shardings_rejects_unplaced_leaves():
  with pytest.raises(ValueError,
                     match=r"NamedSharding.*\['w'\] has sharding None"):
    mo.state_shardings(mo.microadam(1e-3), {"w": np.zeros((4, 4))})


def test_leaves_without_whole_blocks_per_shard_are_gathered_with_warning():
  mesh = _mesh(AxisType.Auto)
  target = NamedSharding(mesh, P(("x", "y")))
  params = jax.device_put(jnp.zeros((BLOCK,)), target)  # 128 per shard
  tx = _tx("xla")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state = tx.init(params)
    u, state = jax.jit(tx.update)(params + 1.0, state)
  assert any("does not hold whole blocks" in str(w.message) for w in caught)
  assert state.error_codes.sharding.is_fully_replicated
  assert u.sharding.is_equivalent_to(target, 1)
  want, _ = tx.update(jnp.ones((BLOCK,)), tx.init(jnp.zeros((BLOCK,))))
  np.testing.assert_array_equal(np.asarray(u), np.asarray(want))


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_apply_gradients_gathers_leaves_without_whole_blocks(axis_type):
  mesh = _mesh(AxisType.Explicit if axis_type == "explicit" else
               AxisType.Auto)
  target = NamedSharding(mesh, P(("x", "y")))
  host = jnp.asarray(np.random.default_rng(9).standard_normal(BLOCK),
                     jnp.float32)
  params = jax.device_put(host, target)  # 128 per shard
  tx = mo.microadam(1e-2, weight_decay=0.1, window=3, density=0.02,
                    topk_block_size=BLOCK, implementation="xla")
  with warnings.catch_warnings(record=True) as caught, jax.set_mesh(mesh):
    warnings.simplefilter("always")
    state = tx.init(params)
    new, state = jax.jit(tx.apply_gradients)(
        jax.device_put(jnp.ones((BLOCK,)), target), state, params)
  assert any("does not hold whole blocks" in str(w.message) for w in caught)
  assert new.sharding.is_equivalent_to(target, 1)
  want, _ = tx.apply_gradients(jnp.ones((BLOCK,)), tx.init(host), host)
  np.testing.assert_array_equal(np.asarray(new), np.asarray(want))


def _run_in_fresh_process(name, *args):
  """Runs ``tests/mesh_runs.py NAME ARGS`` on 8 CPU devices; asserts success.

  Orbax and the NNX training loop run in processes of their own, and their
  loops wait for each step: XLA's CPU collectives on 8 devices over 2 cores
  deadlocked when several collective steps were in flight at once (a
  rendezvous where one device never arrives).
  """
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  out = subprocess.run([sys.executable, str(HERE / "mesh_runs.py"), name,
                        *map(str, args)], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "OK" in out.stdout


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_orbax_restores_the_state_into_the_mesh(tmp_path, axis_type):
  pytest.importorskip("orbax.checkpoint")
  _run_in_fresh_process("orbax_restore", axis_type, tmp_path)


def test_nnx_model_with_partitioning_trains_under_explicit_mesh():
  pytest.importorskip("flax")
  _run_in_fresh_process("nnx_train")


def test_data_parallel_replicated_params_and_sharded_batch():
  mesh = _mesh(AxisType.Auto)
  rng = np.random.default_rng(2)
  params = jax.device_put(
      {"w": jnp.asarray(rng.standard_normal((1024, 96)), jnp.float32)},
      NamedSharding(mesh, P()))
  tx = _tx("xla")
  state = tx.init(params)
  x = jax.device_put(jnp.asarray(rng.standard_normal((64, 1024)), jnp.float32),
                     NamedSharding(mesh, P(("x", "y"), None)))

  @jax.jit
  def step(params, state, x):
    grads = jax.grad(lambda p: jnp.mean(jnp.tanh(x @ p["w"]) ** 2))(params)
    return tx.update(grads, state, params)

  u, state = step(params, state, x)
  assert u["w"].sharding.is_fully_replicated
  assert state.error_codes["w"].sharding.is_fully_replicated
  assert np.isfinite(np.asarray(u["w"])).all()


# ----------------------------------------------------------------------------
# Adam-mini under the same meshes


def _all_reduce_sizes(text):
  """Element counts of the arrays every all-reduce in the HLO moves."""
  sizes = []
  for line in text.splitlines():
    if " all-reduce(" not in line and " all-reduce-start(" not in line:
      continue
    shapes = re.findall(r"[a-z0-9]+\[([0-9,]*)\]", line.split("=", 1)[1]
                        .split("all-reduce", 1)[0])
    for dims in shapes:
      sizes.append(int(np.prod([int(d) for d in dims.split(",") if d] or [1])))
  return sizes


@pytest.mark.parametrize("sharding", ["first_axis", "last_axis", "two_axes"])
@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_adam_mini_is_local_but_for_v_sized_reductions(axis_type, sharding):
  mesh = _mesh(AxisType.Explicit if axis_type == "explicit" else
               AxisType.Auto)
  spec, _ = SHARDINGS[sharding]
  target = NamedSharding(mesh, spec)
  # One v per row of "embed" (64 values), one for the whole "w".
  partition = {"embed": (1,), "w": (0, 1)}
  tx = mo.adam_mini(1e-3, partition=partition)
  rng = np.random.default_rng(4)
  host = {k: rng.standard_normal(SHAPE).astype(np.float32)
          for k in ("embed", "w")}
  params = jax.device_put(host, {k: target for k in host})
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init, out_shardings=mo.state_shardings(tx, params))(
        params)
    update = jax.jit(tx.update)
    text = update.lower(params, state, params).compile().as_text()
    u, state = update(params, state, params)
  found = [c for c in mo.collectives(text) if c != "all-reduce"]
  assert not found, found
  assert all(n <= SHAPE[0] for n in _all_reduce_sizes(text)), (
      _all_reduce_sizes(text))
  for k in host:
    assert u[k].sharding.is_equivalent_to(target, 2)
    assert state[0].mu[k].sharding.is_equivalent_to(target, 2)
  want, _ = tx.update(host, tx.init(host), host)
  for k in host:
    np.testing.assert_allclose(np.asarray(u[k]), np.asarray(want[k]),
                               rtol=1e-5, atol=1e-6)



"""One JAX process of a multi-process run, started by tests/test_multihost.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      python tests/multihost_worker.py train,resume OUT SEED --ckpt DIR \
          --save --kill-mid-save --num-processes 2 --process-id I --port PORT
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python tests/multihost_worker.py train,resume OUT SEED --ckpt DIR \
          [--wait-for FILE]

With ``--num-processes 2`` the process joins a 2-process job through
``jax.distributed.initialize`` (CPU collectives over gloo); without it one
process holds all 8 devices. Either way the mesh is the same global (2, 4)
mesh, so both compute the same program.

Cases: MicroAdam (XLA; the Pallas kernels on one small leaf, Auto axes) and
Adam-mini, on Explicit and Auto axes, FSDP and tensor-parallel leaves; the
state made by ``jit(tx.init, out_shardings=mo.state_shardings(...))``, the
step compiled once.

MODES (comma-separated):

* ``train``: ``STEPS`` steps from the init (with ``--save``, step
  ``SAVE_AT`` checkpointed to ``--ckpt`` with Orbax, by every process).
* ``resume``: the latest checkpoint in ``--ckpt`` restored onto this run's
  mesh (by a new CheckpointManager, once ``--wait-for`` exists), then the
  steps after it.

Each process writes ``OUT/MODE.pI.npz`` (its own shards of every step's
parameters and of the last state, one replica each: nothing is gathered) and
``OUT/MODE.pI.json`` (where each shard lies; what each compiled step
communicates; the step restored). ``--kill-mid-save`` then starts saving the
last step and process 1 kills itself (SIGKILL) while the save is under way.

Every step is waited for before the next: XLA's CPU collectives deadlocked
in this repository with several collective programs in flight at once.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import orbax.checkpoint as ocp

import microadam_optax as mo

STEPS = 3
SAVE_AT = 2
MESH_SHAPE = (2, 4)
AXES = ("x", "y")
BLOCK = 1024
_START = time.monotonic()


def _log(what: str) -> None:
  """A progress line in the log (where a stuck job stopped, and when)."""
  print(f"[{time.monotonic() - _START:6.1f} s] {what}", flush=True)


def _parse(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("modes", help="train, resume or train,resume",
                      type=lambda v: v.split(","))
  parser.add_argument("out")
  parser.add_argument("seed", type=int)
  parser.add_argument("--ckpt", required=True)
  parser.add_argument("--save", action="store_true",
                      help="save step SAVE_AT to --ckpt while training")
  parser.add_argument("--kill-mid-save", action="store_true",
                      help="then start saving the last step and kill "
                           "process 1")
  parser.add_argument("--wait-for", default=None,
                      help="resume only once this file exists")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  return parser.parse_args(argv)


def _start(args) -> None:
  """Joins the job (several processes); nothing to do for one process."""
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.num_processes, process_id=args.process_id)
  assert jax.device_count() == 8, jax.devices()


#: leaf -> (shape, PartitionSpec on the (2, 4) mesh, made from process-local
#: data). "fsdp" splits rows over all 8 devices, so over both processes; each
#: process supplies its own rows (jax.make_array_from_process_local_data).
#: "tp" splits columns over "y" and is replicated over "x": each process holds
#: a whole replica, made with jax.make_array_from_callback.
LEAVES = {
    "fsdp": ((64, 1024), P(AXES, None), True),
    "tp": ((64, 1024), P(None, "y"), False),
}
#: The kernel path runs the Pallas kernels in interpret mode on CPU, slow to
#: compile: one small FSDP leaf (one 1024-block per device), on Auto axes
#: (where the per-shard update is a custom_partitioning op, partitioned
#: while each process compiles).
PALLAS_LEAVES = {"fsdp": ((8, 1024), P(AXES, None), False)}


def _optimizers():
  return {
      "microadam": (mo.microadam(1e-2, weight_decay=0.01, window=2,
                                 density=0.02, topk_block_size=BLOCK,
                                 implementation="xla"), LEAVES),
      "microadam_pallas": (mo.microadam(1e-2, window=2, density=0.02,
                                        topk_block_size=BLOCK,
                                        implementation="pallas"),
                           PALLAS_LEAVES),
      "adam_mini": (mo.adam_mini(1e-2, weight_decay=0.01,
                                 # one v per column of "fsdp" (reduced
                                 # over both processes), one for all of
                                 # "tp" (over the devices of a process)
                                 partition={"fsdp": (0,), "tp": (0, 1)}),
                    LEAVES),
  }


def _host_value(seed: int, name: str, shape, what: str, step: int = 0,
                dyadic: bool = False) -> np.ndarray:
  """The same float32 values in every process and every run.

  ``dyadic``: multiples of 1/8 in [-1, 1]. Their squares are multiples of
  1/64 up to 1, and any partial sum of up to 2**16 of them needs at most 22
  bits: exact in float32, so a sum over devices does not depend on the
  order it adds in.
  """
  rng = np.random.default_rng([seed, step, *map(ord, f"{name}/{what}")])
  if dyadic:
    return (rng.integers(-8, 9, shape) / 8).astype(np.float32)
  return rng.standard_normal(shape).astype(np.float32)


def _global(sharding, host: np.ndarray, local: bool = False) -> jax.Array:
  """``host`` as a global array: each process supplies only its shards."""
  if not local:
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda index: host[index])
  # The rows and columns this process's devices hold (a box: the sharding
  # gives each process a contiguous range on each axis).
  indices = sharding.addressable_devices_indices_map(host.shape).values()
  box = tuple(slice(min(i[d].start or 0 for i in indices),
                    max(host.shape[d] if i[d].stop is None else i[d].stop
                        for i in indices))
              for d in range(host.ndim))
  return jax.make_array_from_process_local_data(sharding, host[box],
                                                host.shape)


def _cases(seed: int) -> dict:
  """``axis_type/optimizer`` -> what one case needs, its parameters made."""
  out = {}
  for axis_type in ("explicit", "auto"):
    mesh = jax.make_mesh(MESH_SHAPE, AXES, axis_types=(
        AxisType.Explicit if axis_type == "explicit" else AxisType.Auto,) * 2)
    for opt, (tx, leaves) in _optimizers().items():
      if opt == "microadam_pallas" and axis_type == "explicit":
        continue
      shardings = {k: NamedSharding(mesh, spec)
                   for k, (_, spec, _) in leaves.items()}
      shapes = {k: shape for k, (shape, _, _) in leaves.items()}
      params = {k: _global(shardings[k], 0.1 * _host_value(
          seed, f"{opt}/{k}", shapes[k], "init"), local=local)
                for k, (_, _, local) in leaves.items()}
      out[f"{axis_type}/{opt}"] = dict(mesh=mesh, tx=tx, opt=opt,
                                       shardings=shardings, shapes=shapes,
                                       params=params)
  return out


def _data(seed: int, case: dict, step: int) -> dict:
  """Step ``step``'s data, from which the loss makes the gradients."""
  # Adam-mini sums each block's squared gradients over the devices that
  # split it. Across processes gloo adds the partial sums in another order
  # than one process's all-reduce does, so its data are dyadic: every sum is
  # exact, and the bits cannot depend on the order.
  return {k: _global(s, _host_value(seed, f"{case['opt']}/{k}",
                                    case["shapes"][k], "data", step,
                                    dyadic=case["opt"] == "adam_mini"))
          for k, s in case["shardings"].items()}


def _loss(params, data):
  # The gradient is the data: made here by each process from its own
  # shards, exactly the same in every run.
  return sum(jnp.sum(p * data[k]) for k, p in params.items())


def _step_fn(tx, param_shardings, state_shardings):
  def step(params, state, data):
    grads = jax.grad(_loss)(params, data)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, out_shardings=(param_shardings, state_shardings))


def _shards(prefix, tree, into, index):
  """Each leaf's shards held here (one replica of each), by ``prefix/path``.

  No gather: every process writes its own shards, and the test puts the
  whole arrays together. Values are kept as unsigned integers of their width,
  so comparisons are bit for bit (bfloat16 included).
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = f"{prefix}{jax.tree_util.keystr(path)}"
    for shard in leaf.addressable_shards:
      if shard.replica_id:
        continue
      data = np.array(shard.data)  # a copy, C-ordered (0-d stays 0-d)
      key = f"{name}#{len(index)}"
      into[key] = data.view(f"u{data.dtype.itemsize}")
      index[key] = dict(name=name, shape=list(leaf.shape),
                        index=[[s.start or 0, leaf.shape[d] if s.stop is None
                                else s.stop]
                               for d, s in enumerate(shard.index)])


def _manager(path):
  return ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(
          max_to_keep=None, enable_async_checkpointing=True))


def _abstract(tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def _prepare(case: dict) -> None:
  """The state made with mo.state_shardings, the step compiled once."""
  tx, params = case["tx"], case["params"]
  with jax.set_mesh(case["mesh"]):
    case["state_shardings"] = mo.state_shardings(tx, params)
    case["state"] = jax.block_until_ready(jax.jit(
        tx.init, out_shardings=case["state_shardings"])(params))
    step = _step_fn(tx, case["shardings"], case["state_shardings"])
    data = {k: jax.ShapeDtypeStruct(params[k].shape, jnp.float32, sharding=s)
            for k, s in case["shardings"].items()}
    case["step"] = step.lower(params, case["state"], data).compile()


def _train(seed: int, cases: dict, first: int, into: dict, index: dict,
           manager=None) -> None:
  """Steps ``first..STEPS`` of every case, one at a time; saves SAVE_AT."""
  for t in range(first, STEPS + 1):
    for name, case in cases.items():
      case["params"], case["state"] = jax.block_until_ready(case["step"](
          case["params"], case["state"], _data(seed, case, t)))
      _shards(f"{name}/step{t}/params", case["params"], into, index)
    _log(f"step {t}")
    if manager is not None and t == SAVE_AT:
      manager.save(t, args=ocp.args.StandardSave(_checkpoint(cases)))
      manager.wait_until_finished()
      _log(f"saved step {t}")
  for name, case in cases.items():
    _shards(f"{name}/state", case["state"], into, index)


def _checkpoint(cases: dict) -> dict:
  return {name: {"params": c["params"], "state": c["state"]}
          for name, c in cases.items()}


def _restore(manager, cases: dict) -> int:
  """The latest checkpoint, restored into each case's shardings."""
  step = manager.latest_step()
  target = {name: {"params": _abstract(c["params"], c["shardings"]),
                   "state": _abstract(c["state"], c["state_shardings"])}
            for name, c in cases.items()}
  restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  for name, case in cases.items():
    case["params"] = restored[name]["params"]
    case["state"] = restored[name]["state"]
  return step


def _write(out: pathlib.Path, mode: str, arrays: dict, meta: dict) -> None:
  pid = jax.process_index()
  np.savez(out / f"{mode}.p{pid}.npz", **arrays)
  (out / f"{mode}.p{pid}.json").write_text(json.dumps(meta))


def main(argv=None) -> None:
  args = _parse(argv)
  _start(args)
  out = pathlib.Path(args.out)
  _log(f"process {jax.process_index()} of {jax.process_count()}")
  cases = _cases(args.seed)
  for name, case in cases.items():
    _prepare(case)
    _log(f"compiled {name}")
  ckpt = os.path.abspath(args.ckpt)
  manager = _manager(ckpt) if args.save or args.kill_mid_save else None

  if "train" in args.modes:
    arrays, index = {}, {}
    _train(args.seed, cases, 1, arrays, index, manager)
    _write(out, "train", arrays, dict(index=index, collectives={
        name: mo.collectives(c["step"]) for name, c in cases.items()}))

  if "resume" in args.modes:
    if args.wait_for:
      _wait_for(pathlib.Path(args.wait_for))
    reader = _manager(ckpt)  # a new one: it knows only what is on disk
    arrays, index = {}, {}
    restored = _restore(reader, cases)
    _log(f"restored step {restored}")
    _train(args.seed, cases, restored + 1, arrays, index)
    _write(out, "resume", arrays, dict(index=index, restored_step=restored,
                                       steps=list(reader.all_steps())))
    reader.close()

  if args.kill_mid_save:
    if jax.process_index() == 1:
      _log("saving, then killing this process")
    manager.save(STEPS, args=ocp.args.StandardSave(_checkpoint(cases)))
    # The save is under way in Orbax's background thread: its files are
    # being written, the step is not committed yet. Stop at once.
    if jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGKILL)
    _log("saving")
    manager.wait_until_finished()  # waits for process 1: never returns
    raise AssertionError("the save finished without process 1")

  if manager is not None:
    manager.close()
  _log("OK")


def _wait_for(path: pathlib.Path, timeout_s: float = 300) -> None:
  deadline = time.monotonic() + timeout_s
  while not path.exists():
    if time.monotonic() > deadline:
      raise TimeoutError(f"{path} did not appear in {timeout_s} s")
    time.sleep(0.05)


if __name__ == "__main__":
  main()

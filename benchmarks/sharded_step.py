"""Sharded optimizer and training steps over every local device, side by side.

A GPT's parameters are split over a 1-D mesh of all local devices, along their
first axis (``--sharding fsdp``) or their last (``--sharding tp``), on a mesh
with Explicit axes (JAX's default) or Auto axes. For each optimizer, in one
process:

* the optimizer step alone (``tx.update`` + ``optax.apply_updates`` on
  sharded gradients, buffers donated): median time, and the collectives its
  compiled HLO holds, with the largest array an all-gather produces (a
  parameter-sized gather means the update is not local);
* the training step (loss, gradient, update, apply): median time, so the
  optimizer's share of a real step is visible;
* the state's bytes in total and on each device, each device's peak memory,
  compile times.

The state is made with ``jax.jit(tx.init, out_shardings=mo.state_shardings(
tx, params))``, the path a sharded training script takes.

  # ~1 B parameters over the GPUs of one host (issue: 2 x H200)
  python benchmarks/sharded_step.py --preset 1b --json sharded_step.json
  # the per-shard code on one GPU (a one-device mesh)
  python benchmarks/sharded_step.py --preset tiny --steps 3
  # a CPU check with 8 host devices
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python benchmarks/sharded_step.py --preset tiny --steps 2
  # one process per optimizer: they compile at once, then time in turn
  # (each process takes its share of device memory)
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
  python benchmarks/sharded_step.py --preset 1b --turns /tmp/turns:0/2 \
      --optimizers optax.adamw --json adamw.json &
  python benchmarks/sharded_step.py --preset 1b --turns /tmp/turns:1/2 \
      --optimizers mo.adam_mini --json adam_mini.json; wait
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import harness  # puts the checkout on sys.path
import microadam_optax as mo
from microadam_compare import models

PRESETS = {
    "tiny": models.GPTConfig(vocab_size=512, seq_len=64, d_model=128,
                             num_layers=2, num_heads=4),
    # 1.07 B parameters: 20 blocks of width 2048, a 32k vocabulary.
    "1b": models.GPTConfig(vocab_size=32768, seq_len=1024, d_model=2048,
                           num_layers=20, num_heads=16),
}


#: The optimizers compared, by name.
OPTIMIZERS = {
    "mo.microadam xla": lambda: mo.microadam(1e-4, weight_decay=0.1,
                                             implementation="xla"),
    "mo.microadam auto": lambda: mo.microadam(1e-4, weight_decay=0.1),
    "mo.adam_mini": lambda: mo.adam_mini(1e-4, weight_decay=0.1),
    "optax.adamw": lambda: optax.adamw(1e-4, weight_decay=0.1),
}

def param_spec(shape: tuple[int, ...], parts: int, sharding: str) -> P:
  """Split the first (fsdp) or last (tp) axis when it divides evenly."""
  axis = 0 if sharding == "fsdp" else len(shape) - 1
  if shape and shape[axis] % parts == 0:
    spec = [None] * len(shape)
    spec[axis] = "d"
    return P(*spec)
  return P()


def build(config: models.GPTConfig, mesh, dtype, sharding: str):
  """Random parameters of a GPT, created directly in their shards."""
  abstract = nnx.eval_shape(lambda: models.GPT(config, rngs=nnx.Rngs(0)))
  graphdef, shapes = models.split_params(abstract)
  parts = mesh.devices.size
  shardings = jax.tree.map(
      lambda s: NamedSharding(mesh, param_spec(s.shape, parts, sharding)),
      shapes)
  leaves, treedef = jax.tree.flatten(shapes)

  def init(key):
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([
        (0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype)
        for k, s in zip(keys, leaves)])

  params = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
  return graphdef, params, shardings


def peak_bytes_per_device() -> list[int] | None:
  stats = [d.memory_stats() for d in jax.local_devices()]
  if any(s is None for s in stats):
    return None
  return [int(s.get("peak_bytes_in_use", 0)) for s in stats]


def _median_ms(fn, steps: int) -> float:
  times = []
  for i in range(steps + 1):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    if i:  # the first call warms up
      times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


class Turns:
  """Processes started together compile at once and take the devices in turn.

  Compilation runs on the host, so N processes (one optimizer each) can
  compile in parallel; each then waits until all have compiled and the
  process before it has finished timing, so that no other process uses the
  devices while one is timed. A process that stops early (an error) still
  marks its turns, so the others do not wait for it.
  """

  def __init__(self, spec: str):
    try:
      directory, turn = spec.rsplit(":", 1)
      rank, world = (int(x) for x in turn.split("/"))
    except ValueError:
      raise ValueError(f"--turns must be DIR:I/N, got {spec!r}") from None
    if not 0 <= rank < world:
      raise ValueError(f"--turns {spec!r}: I must be in [0, N)")
    self.directory, self.rank, self.world = directory, rank, world
    os.makedirs(directory, exist_ok=True)

  def _mark(self, what: str, rank: int | None = None) -> str:
    return os.path.join(self.directory,
                        f"{what}.{self.rank if rank is None else rank}")

  def _wait_for(self, marks: list[str]) -> None:
    while not all(os.path.exists(m) for m in marks):
      time.sleep(0.2)

  def wait(self) -> None:
    """Marks this process compiled; returns when it may use the devices."""
    open(self._mark("compiled"), "w").close()
    self._wait_for([self._mark("compiled", r) for r in range(self.world)])
    if self.rank:
      self._wait_for([self._mark("timed", self.rank - 1)])

  def done(self) -> None:
    """Marks this process's timing (or its failure) finished."""
    open(self._mark("compiled"), "w").close()
    open(self._mark("timed"), "w").close()


def run(name, tx, graphdef, params, shardings, mesh, config, batch, steps,
        turns: Turns | None = None):
  """Times the optimizer step and the training step; returns a result row."""
  explicit = AxisType.Explicit in mesh.axis_types
  t0 = time.perf_counter()
  state_shardings = mo.state_shardings(tx, params)
  state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  per_device_state = dict.fromkeys(mesh.devices.flat, 0)
  for leaf in jax.tree.leaves(state):
    for shard in leaf.addressable_shards:
      per_device_state[shard.device] += shard.data.nbytes
  data_sharding = NamedSharding(mesh, P("d", None))
  rng = np.random.default_rng(0)

  def tokens():
    return jax.device_put(
        rng.integers(0, config.vocab_size, (batch, config.seq_len + 1),
                     dtype=np.int32), data_sharding)

  def loss_fn(params, tokens):
    logits = models.merge_params(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]).mean()

  def opt_step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def train_step(params, state, tokens):
    if explicit:
      # FSDP by hand: gather the weights, forward and backward on each
      # device's part of the batch (the model is not written for sharding in
      # types), average the gradients, keep each device's shard of them.
      full = jax.tree.map(lambda p: jax.sharding.reshard(p, P()), params)

      def local(full, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(full, tokens)
        return jax.lax.pmean((loss, grads), "d")

      loss, grads = jax.shard_map(
          local, mesh=mesh, in_specs=(P(), P("d", None)),
          out_specs=(P(), P()))(full, tokens)
      grads = jax.tree.map(lambda g, s: jax.sharding.reshard(g, s.spec),
                           grads, shardings)
    else:  # XLA partitions the step
      loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    params, state = opt_step(params, state, grads)
    return params, state, loss

  grads = jax.tree.map(lambda p: (1e-3 * jnp.ones_like(p)), params)
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    opt = jax.jit(opt_step, donate_argnums=(0, 1)).lower(
        params, state, grads).compile()
    opt_compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    train = jax.jit(train_step, donate_argnums=(0, 1)).lower(
        params, state, tokens()).compile()
    train_compile_s = time.perf_counter() - t0
  opt_collectives = mo.collectives(opt)
  print(f"[{name}] init {init_s:.1f} s, compile {opt_compile_s:.1f} + "
        f"{train_compile_s:.1f} s, optimizer-step collectives "
        f"{opt_collectives or 'none'}", flush=True)
  if turns is not None:
    turns.wait()
  box = {"params": params, "state": state}

  def one_opt():
    box["params"], box["state"] = opt(box["params"], box["state"], grads)
    return box["state"]

  opt_ms = _median_ms(one_opt, steps)
  losses = []

  def one_train():
    box["params"], box["state"], loss = train(box["params"], box["state"],
                                              tokens())
    losses.append(float(loss))
    return loss

  train_ms = _median_ms(one_train, steps)
  print(f"[{name}] optimizer step {opt_ms:.1f} ms, training step "
        f"{train_ms:.1f} ms", flush=True)
  largest_param = max(math.prod(p.shape) for p in jax.tree.leaves(params))
  row = {"optimizer": name, "state_bytes": mo.state_nbytes(state),
         "state_bytes_per_device": list(per_device_state.values()),
         "init_s": init_s, "opt_compile_s": opt_compile_s,
         "train_compile_s": train_compile_s,
         "opt_step_ms": opt_ms, "train_step_ms": train_ms,
         "opt_step_collectives": opt_collectives,
         "opt_step_largest_gather": opt_collectives.get("all-gather", 0),
         "largest_param_elements": largest_param,
         "first_loss": losses[0], "last_loss": losses[-1],
         "peak_bytes_per_device": peak_bytes_per_device()}
  del box, state
  return row


def main(argv=None) -> dict:
  """Runs the comparison; prints a table and optionally writes JSON."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  parser.add_argument("--batch", type=int, default=None,
                      help="global batch (default: 4 per device)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--dtype", choices=["bfloat16", "float32"],
                      default="bfloat16")
  parser.add_argument("--sharding", choices=["fsdp", "tp"], default="fsdp",
                      help="split each parameter's first (fsdp) or last (tp) "
                      "axis over the devices")
  parser.add_argument("--axis-type", choices=["explicit", "auto"],
                      default="explicit")
  parser.add_argument("--optimizers", default=None,
                      help="comma-separated subset of: " + ", ".join(OPTIMIZERS))
  parser.add_argument("--json", default=None)
  parser.add_argument("--turns", default=None, metavar="DIR:I/N",
                      help="run as process I of N started together: all "
                      "compile at once, then time one after another in "
                      "order of I (marks in DIR)")
  args = parser.parse_args(argv)
  names = (list(OPTIMIZERS) if args.optimizers is None
           else [n.strip() for n in args.optimizers.split(",") if n.strip()])
  unknown = [n for n in names if n not in OPTIMIZERS]
  if unknown or not names:
    parser.error(f"--optimizers must name some of {', '.join(OPTIMIZERS)}; "
                 f"got {args.optimizers!r}")
  devices = jax.local_devices()
  axis_type = AxisType.Explicit if args.axis_type == "explicit" else (
      AxisType.Auto)
  mesh = jax.make_mesh((len(devices),), ("d",), axis_types=(axis_type,),
                       devices=devices)
  config = PRESETS[args.preset]
  batch = args.batch or 4 * len(devices)
  dtype = jnp.dtype(args.dtype)
  try:
    turns = Turns(args.turns) if args.turns else None
  except ValueError as e:
    parser.error(str(e))
  if turns is not None and len(names) != 1:
    parser.error("--turns runs one optimizer per process; got --optimizers "
                 f"{args.optimizers!r}")
  rows = []
  try:
    for name in names:
      graphdef, params, shardings = build(config, mesh, dtype, args.sharding)
      n = models.num_params(params)
      rows.append(run(name, OPTIMIZERS[name](), graphdef, params, shardings,
                      mesh, config, batch, args.steps, turns))
      del params
      gc.collect()
  finally:
    if turns is not None:
      turns.done()
  print(f"\n{args.sharding} steps, {n / 1e9:.3f} B params ({args.dtype}) "
        f"over {len(devices)} x {devices[0].device_kind} ({args.axis_type} "
        f"axes), batch {batch} x {config.seq_len}, jax {jax.__version__}")
  print(f"{'optimizer':<18} {'opt ms':>8} {'train ms':>9} {'state GB':>9} "
        f"{'GB/dev':>7} {'peak GB/dev':>12} {'opt gather':>11} "
        f"{'loss':>14}")
  for r in rows:
    peak = r["peak_bytes_per_device"]
    peak_s = "n/a" if peak is None else "/".join(f"{p / 1e9:.1f}"
                                                  for p in peak)
    gather = r["opt_step_largest_gather"]
    print(f"{r['optimizer']:<18} {r['opt_step_ms']:8.1f} "
          f"{r['train_step_ms']:9.1f} {r['state_bytes'] / 1e9:9.3f} "
          f"{max(r['state_bytes_per_device']) / 1e9:7.3f} {peak_s:>12} "
          f"{gather:>11} {r['first_loss']:6.3f}->{r['last_loss']:6.3f}")
  print("opt gather: elements of the largest array an all-gather produces "
        "in the optimizer step alone (0: none); peak memory is the process's "
        "running maximum over all rows so far")
  result = {"preset": args.preset, "num_params": n, "devices": len(devices),
            "device_kind": devices[0].device_kind, "sharding": args.sharding,
            "axis_type": args.axis_type, "jax": jax.__version__,
            "batch": batch, "turns": args.turns, "rows": rows}
  return harness.write_json(result, args.json)


if __name__ == "__main__":
  main()

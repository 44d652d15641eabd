"""A transformer training step sharded FSDP-style over every local device.

Parameters (and MicroAdam's state, consistently) are split along their first
axis over a 1-D mesh; the batch is split too. The same jitted step (loss,
gradient, optimizer update, apply) runs with MicroAdam and with AdamW in one
process; per-device peak memory and the median step time are reported.

  # ~1 B parameters over the GPUs of one host (the recorded run: 2 x H200)
  python benchmarks/sharded_step.py --preset 1b --json sharded_step.json
  # a CPU check with 8 host devices
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python benchmarks/sharded_step.py --preset tiny --steps 2
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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
    "optax.adamw": lambda: optax.adamw(1e-4, weight_decay=0.1),
}


def fsdp_spec(shape: tuple[int, ...], parts: int) -> P:
  """Split the first axis when it divides evenly, else replicate."""
  if shape and shape[0] % parts == 0:
    return P("fsdp", *([None] * (len(shape) - 1)))
  return P()


def build(config: models.GPTConfig, mesh: Mesh, dtype):
  """Random parameters of a GPT, created directly in their shards."""
  abstract = nnx.eval_shape(lambda: models.GPT(config, rngs=nnx.Rngs(0)))
  graphdef, shapes = models.split_params(abstract)
  parts = mesh.devices.size
  shardings = jax.tree.map(
      lambda s: NamedSharding(mesh, fsdp_spec(s.shape, parts)), shapes)
  leaves, treedef = jax.tree.flatten(shapes)

  def init(key):
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([
        (0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype)
        for k, s in zip(keys, leaves)])

  params = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
  return graphdef, params


def peak_bytes_per_device() -> list[int] | None:
  stats = [d.memory_stats() for d in jax.local_devices()]
  if any(s is None for s in stats):
    return None
  return [int(s.get("peak_bytes_in_use", 0)) for s in stats]


def run(name, tx, graphdef, params, mesh, config, batch, steps):
  """Times ``steps`` sharded training steps; returns a result row."""
  t0 = time.perf_counter()
  state = tx.init(params)  # eager: MicroAdam shards its state like params
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  state_bytes = mo.state_nbytes(state)
  per_device_state = [0] * mesh.devices.size
  index = {d: i for i, d in enumerate(mesh.devices.flat)}
  for leaf in jax.tree.leaves(state):
    for shard in leaf.addressable_shards:
      per_device_state[index[shard.device]] += shard.data.nbytes
  data_sharding = NamedSharding(mesh, P("fsdp", None))

  def loss_fn(params, tokens):
    logits = models.merge_params(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]).mean()

  @jax.jit
  def step(params, state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  rng = np.random.default_rng(0)

  def tokens():
    return jax.device_put(
        rng.integers(0, config.vocab_size, (batch, config.seq_len + 1),
                     dtype=np.int32), data_sharding)

  t0 = time.perf_counter()
  compiled = step.lower(params, state, tokens()).compile()
  compile_s = time.perf_counter() - t0
  print(f"[{name}] init {init_s:.1f} s, compile {compile_s:.1f} s",
        flush=True)
  times, losses = [], []
  for i in range(steps + 1):
    t0 = time.perf_counter()
    params, state, loss = compiled(params, state, tokens())
    loss = float(loss)
    if i >= 1:  # the first call warms up
      times.append(time.perf_counter() - t0)
    losses.append(loss)
  print(f"[{name}] median step {1e3 * statistics.median(times):.1f} ms",
        flush=True)
  row = {"optimizer": name, "state_bytes": state_bytes,
         "init_s": init_s, "compile_s": compile_s,
         "state_bytes_per_device": per_device_state,
         "median_step_s": statistics.median(times),
         "first_loss": losses[0], "last_loss": losses[-1],
         "peak_bytes_per_device": peak_bytes_per_device()}
  del state
  return row, params


def main(argv=None) -> dict:
  """Runs the comparison; prints a table and optionally writes JSON."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
  parser.add_argument("--batch", type=int, default=None,
                      help="global batch (default: 4 per device)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--dtype", choices=["bfloat16", "float32"],
                      default="bfloat16")
  parser.add_argument("--optimizers", default=None,
                      help="comma-separated subset of: " + ", ".join(OPTIMIZERS))
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  names = (list(OPTIMIZERS) if args.optimizers is None
           else [n.strip() for n in args.optimizers.split(",") if n.strip()])
  unknown = [n for n in names if n not in OPTIMIZERS]
  if unknown or not names:
    parser.error(f"--optimizers must name some of {', '.join(OPTIMIZERS)}; "
                 f"got {args.optimizers!r}")
  devices = np.array(jax.local_devices())
  mesh = Mesh(devices, ("fsdp",))
  config = PRESETS[args.preset]
  batch = args.batch or 4 * devices.size
  dtype = jnp.dtype(args.dtype)
  rows = []
  for name in names:
    make = OPTIMIZERS[name]
    graphdef, params = build(config, mesh, dtype)
    n = models.num_params(params)
    row, params = run(name, make(), graphdef, params, mesh, config, batch,
                      args.steps)
    rows.append(row)
    del params
    gc.collect()
  print(f"\nFSDP step, {n / 1e9:.3f} B params ({args.dtype}) over "
        f"{devices.size} x {devices.flat[0].device_kind}, batch {batch} x "
        f"{config.seq_len}, jax {jax.__version__}")
  print(f"{'optimizer':<18} {'step ms':>9} {'state GB':>9} "
        f"{'state GB/dev':>13} {'peak GB/dev':>12} {'loss':>14}")
  for r in rows:
    peak = r["peak_bytes_per_device"]
    peak_s = "n/a" if peak is None else "/".join(f"{p / 1e9:.1f}"
                                                  for p in peak)
    print(f"{r['optimizer']:<18} {1e3 * r['median_step_s']:9.1f} "
          f"{r['state_bytes'] / 1e9:9.2f} "
          f"{max(r['state_bytes_per_device']) / 1e9:13.2f} {peak_s:>12} "
          f"{r['first_loss']:6.3f}->{r['last_loss']:6.3f}")
  print("(peak memory is the process's running maximum: AdamW runs last, "
        "so its figure includes MicroAdam's run only if that was higher)")
  result = {"preset": args.preset, "num_params": n, "devices": devices.size,
            "device_kind": devices.flat[0].device_kind,
            "jax": jax.__version__, "batch": batch, "rows": rows}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()

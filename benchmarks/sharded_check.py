"""MicroAdam's per-shard update on a mesh of the local devices, checked.

For meshes with Explicit and Auto axes, eager and jitted init, the default
implementation (Pallas kernels on GPU) runs a few steps on a sharded
Llama-sized matrix and is compared with the same optimizer on the unsharded
matrix (bit for bit: on one device, or with first-axis shards, the blocks are
the same) and with the XLA path. The compiled update is searched for
collectives and for the kernels' custom calls, so the table says whether the
per-shard code ran the kernels and stayed local.

  python benchmarks/sharded_check.py --json sharded_check.json   # the H200
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python benchmarks/sharded_check.py --rows 64 --cols 1024   # CPU
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import harness  # puts the checkout on sys.path
import microadam_optax as mo

#: Substrings of the custom calls Pallas kernels compile to (Triton on GPU,
#: Mosaic on GPU and TPU); XLA's own Triton fusions do not match them.
KERNEL_CALLS = ("xla.gpu.triton", "mosaic_gpu", "tpu_custom_call")


def check(axis_type: str, init: str, shape, dtype, steps: int) -> dict:
  """One case: the sharded update against the unsharded one."""
  devices = jax.local_devices()
  mesh = jax.make_mesh((len(devices),), ("d",), axis_types=(
      AxisType.Explicit if axis_type == "explicit" else AxisType.Auto,),
                       devices=devices)
  target = NamedSharding(mesh, P("d", None))
  tx = mo.microadam(1e-3)
  xla = mo.microadam(1e-3, implementation="xla")
  rng = np.random.default_rng(0)
  host = jnp.asarray(rng.standard_normal(shape), dtype)
  params = jax.device_put(host, target)
  with jax.set_mesh(mesh):
    if init == "eager":
      state = tx.init(params)
    else:
      state = jax.jit(tx.init, out_shardings=mo.state_shardings(
          tx, params))(params)
    update = jax.jit(tx.update)
    text = update.lower(params, state, params).compile().as_text()
  ref_state = tx.init(host)
  xla_state = xla.init(host)
  equal, max_vs_xla = True, 0.0
  for _ in range(steps):
    g = jnp.asarray(rng.standard_normal(shape), dtype)
    with jax.set_mesh(mesh):
      u, state = update(jax.device_put(g, target), state, params)
    want, ref_state = jax.jit(tx.update)(g, ref_state, host)
    other, xla_state = jax.jit(xla.update)(g, xla_state, host)
    equal &= bool(np.array_equal(np.asarray(u, np.float32),
                                 np.asarray(want, np.float32)))
    max_vs_xla = max(max_vs_xla, float(np.max(np.abs(
        np.asarray(u, np.float32) - np.asarray(other, np.float32)))))
  per_device = max(s.data.nbytes for leaf in jax.tree.leaves(state)
                   for s in leaf.addressable_shards)
  return {"axis_type": axis_type, "init": init, "devices": len(devices),
          "collectives": sorted(mo.collectives(text)),
          "kernel_calls": [c for c in KERNEL_CALLS if c in text],
          "bit_identical_to_unsharded": equal,
          "max_abs_diff_vs_xla": max_vs_xla,
          "update_sharding": str(u.sharding.spec),
          "largest_state_shard_bytes": per_device}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=4096)
  parser.add_argument("--cols", type=int, default=4096)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  rows = [check(a, i, (args.rows, args.cols), jnp.dtype(args.dtype),
                args.steps)
          for a in ("explicit", "auto") for i in ("eager", "jit")]
  dev = jax.local_devices()[0].device_kind
  print(f"MicroAdam per-shard update, ({args.rows}, {args.cols}) "
        f"{args.dtype}, {len(jax.local_devices())} x {dev}, jax "
        f"{jax.__version__}")
  print(f"{'axes':<9} {'init':<6} {'collectives':<12} {'kernels':<28} "
        f"{'== unsharded':<13} {'max |pallas-xla|':>16}")
  for r in rows:
    print(f"{r['axis_type']:<9} {r['init']:<6} "
          f"{','.join(r['collectives']) or 'none':<12} "
          f"{','.join(r['kernel_calls']) or 'none (XLA path)':<28} "
          f"{str(r['bit_identical_to_unsharded']):<13} "
          f"{r['max_abs_diff_vs_xla']:16.3g}")
  harness.write_json({"device_kind": dev, "jax": jax.__version__,
                      "shape": [args.rows, args.cols], "dtype": args.dtype,
                      "rows": rows}, args.json)
  return rows


if __name__ == "__main__":
  main()

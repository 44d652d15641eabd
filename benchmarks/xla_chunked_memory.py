"""MicroAdam's XLA path on a stacked leaf: temporaries and time, in groups
and in one piece, as the leaf grows.

For each number of layers L, a bf16 leaf ``[L, rows, cols]`` is updated by
the jitted, donated ``scale_by_microadam(implementation="xla").update``
in groups of ``--chunk`` entries (``KernelConfig.xla_chunk_elements``, 16-bit
arrays in place or not as ``KernelConfig.xla_16bit_in_place``'s default on
the back end) and in one piece; prints the compiled step's temporaries
(``memory_analysis().temp_size_in_bytes``) and its median time, and writes
JSON. In groups the temporaries must not grow with L (on CPU, where 16-bit
arrays cross the loop as integers, by ~2.2 bytes per entry).

  python benchmarks/xla_chunked_memory.py                      # CPU, tiny
  python benchmarks/xla_chunked_memory.py --layers 4,16,40 --rows 5120 \\
      --cols 13824 --block 4096 --chunk 16777216 --json chunked.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import harness  # puts the checkout on sys.path
import microadam_optax as mo
from pallas_kernels import dispatch


def measure(layers: int, rows: int, cols: int, block: int, chunk: int,
            iters: int) -> dict:
  """Temporaries and median step time of one configuration."""
  params = {"w": jnp.zeros((layers, rows, cols), jnp.bfloat16)}
  tx = mo.scale_by_microadam(
      topk_block_size=block, implementation="xla",
      kernel_config=dispatch.KernelConfig(xla_chunk_elements=chunk))
  step = jax.jit(tx.update, donate_argnums=(0, 1))
  state = tx.init(params)
  compiled = step.lower(params, state).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  times = []
  for _ in range(iters + 1):
    grads = jax.tree.map(jnp.ones_like, params)
    jax.block_until_ready(grads)
    t0 = time.perf_counter()
    u, state = step(grads, state)
    jax.block_until_ready(u)
    times.append(time.perf_counter() - t0)
  del u, state
  return {"layers": layers, "entries": layers * rows * cols,
          "chunk": chunk, "temp_bytes": temp,
          "median_s": statistics.median(times[1:])}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", default="4,16,64")
  parser.add_argument("--rows", type=int, default=64)
  parser.add_argument("--cols", type=int, default=256)
  parser.add_argument("--block", type=int, default=256)
  parser.add_argument("--chunk", type=int, default=8 * 256)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  rows = []
  for layers in map(int, args.layers.split(",")):
    for chunk in (args.chunk, 1 << 62):
      r = measure(layers, args.rows, args.cols, args.block, chunk,
                  args.iters)
      r["mode"] = "groups" if chunk == args.chunk else "one piece"
      rows.append(r)
      print(f"L={layers:4d} {r['mode']:9s} temporaries "
            f"{r['temp_bytes'] / 2**20:10.2f} MiB "
            f"({r['temp_bytes'] / r['entries']:6.2f} B/entry), "
            f"step {r['median_s'] * 1e3:9.1f} ms", flush=True)
  return harness.write_json({"backend": jax.default_backend(),
                             "jax": jax.__version__, "rows": rows}, args.json)


if __name__ == "__main__":
  main()

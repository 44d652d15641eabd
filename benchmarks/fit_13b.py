"""The fit AdamW cannot make: Llama-2-13B-shaped optimizer steps on one GPU.

bf16 parameters and gradients with Llama-2-13B shapes (13.0 B parameters,
26 GB each) stay on the device. MicroAdam (state ~ 11.8 GB) takes donated,
jitted update + apply steps; then optax.adamw with float32 moments (104 GB of
state) is attempted in the same process. The outcome (steps taken, or the
out-of-memory error) and the peak device memory are printed and written as
JSON.

  python benchmarks/fit_13b.py --json fit_13b.json          # one H200
  python benchmarks/fit_13b.py --layers 1 --steps 2         # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import harness  # puts the checkout on sys.path
import microadam_optax as mo


def peak_gb():
  stats = harness.memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use", 0) / 1e9


def attempt(name, make_tx, init_dtype, params, grads, steps):
  """Initializes the state and takes ``steps`` steps; returns a result row."""
  row = {"optimizer": name}
  try:
    tx = make_tx()
    init = jax.jit(lambda p: tx.init(jax.tree.map(
        lambda x: x.astype(init_dtype), p)))
    state = init(params)
    jax.block_until_ready(state)
    row["state_gb"] = mo.state_nbytes(state) / 1e9

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    times = []
    for i in range(steps + 1):
      t0 = time.perf_counter()
      params, state = step(params, state, grads)
      jax.block_until_ready((params, state))
      if i:
        times.append(time.perf_counter() - t0)
    row.update(outcome="ran", steps=steps,
               median_step_ms=1e3 * statistics.median(times))
    del state
  except Exception as e:  # pylint: disable=broad-except
    msg = f"{type(e).__name__}: {e}"
    row.update(outcome="out of memory" if "RESOURCE_EXHAUSTED" in msg
               or "out of memory" in msg.lower() else "error",
               error=msg[:400])
  row["peak_gb_so_far"] = peak_gb()
  gc.collect()
  return row, params


def main(argv=None) -> dict:
  """Runs both attempts; prints a table and optionally writes JSON."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=None,
                      help="keep only this many decoder layers")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  shapes = mo.model_shapes.llama2_shapes("llama2-13b", jnp.bfloat16,
                                         num_layers=args.layers)
  n = mo.model_shapes.num_params(shapes)
  params = mo.model_shapes.random_arrays(shapes, seed=0)
  grads = mo.model_shapes.random_arrays(shapes, seed=1)
  rows = []
  row, params = attempt("mo.microadam (m=10, 1 %, bf16 values, 4-bit)",
                        lambda: mo.microadam(1e-5), jnp.bfloat16, params,
                        grads, args.steps)
  rows.append(row)
  row, params = attempt("optax.adamw (fp32 moments)",
                        lambda: optax.adamw(1e-5), jnp.float32, params, grads,
                        args.steps)
  rows.append(row)
  device = jax.devices()[0]
  print(f"\nLlama-2-13B shapes: {n / 1e9:.2f} B params, bf16 params + grads "
        f"= {4 * n / 1e9:.1f} GB, on {device.device_kind}, jax "
        f"{jax.__version__}")
  print(f"{'optimizer':<46} {'outcome':<14} {'state GB':>9} {'step ms':>9} "
        f"{'peak GB':>9}")
  for r in rows:
    state = f"{r['state_gb']:.1f}" if "state_gb" in r else "-"
    step = f"{r['median_step_ms']:.1f}" if "median_step_ms" in r else "-"
    peak = "n/a" if r["peak_gb_so_far"] is None else (
        f"{r['peak_gb_so_far']:.1f}")
    print(f"{r['optimizer']:<46} {r['outcome']:<14} {state:>9} {step:>9} "
          f"{peak:>9}")
    if "error" in r:
      print(f"  {r['error'][:200]}")
  result = {"num_params": n, "device": device.device_kind,
            "jax": jax.__version__, "rows": rows}
  return harness.write_json(result, args.json)


if __name__ == "__main__":
  main()

"""Optimizer-state bytes per parameter on real model shapes (no allocation).

Every state is measured with ``jax.eval_shape(tx.init, params)``, so a
Llama-2-7B or 13B tree costs nothing to measure. Prints a table and writes
JSON.

  python benchmarks/state_memory.py --model llama2-7b --json state_memory.json
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import optax
import optax.contrib

import harness  # puts the checkout on sys.path
import microadam_optax as mo


def optimizers() -> dict[str, tuple[object, object]]:
  """name -> (transformation, dtype of the params it is measured on)."""
  out = {
      "optax.adamw (fp32 params, fp32 states)":
          (optax.adamw(1e-4), jnp.float32),
      "optax.adamw (bf16 params, bf16 states)":
          (optax.adamw(1e-4), jnp.bfloat16),
      "optax.adafactor (bf16 params)": (optax.adafactor(1e-4), jnp.bfloat16),
      "optax.contrib.muon (bf16 params)":
          (optax.contrib.muon(1e-4), jnp.bfloat16),
      "optax.contrib.galore rank 128 (bf16 params)":
          (optax.contrib.galore(1e-4, rank=128), jnp.bfloat16),
      "mo.microadam m=10, 1 %, bf16 values, 4-bit errors":
          (mo.microadam(1e-4), jnp.bfloat16),
      "mo.microadam m=10, 1 %, fp32 values":
          (mo.microadam(1e-4, values_dtype=jnp.float32), jnp.float32),
  }
  out["mo.adam_mini (fp32 params: fp32 m, fp32 v)"] = (
      mo.adam_mini(1e-4), jnp.float32)
  out["mo.adam_mini (bf16 params: bf16 m, fp32 v)"] = (
      mo.adam_mini(1e-4), jnp.bfloat16)
  return out


def main(argv=None) -> dict:
  """Measures every optimizer's state on the chosen model; returns the rows."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="llama2-7b",
                      choices=list(mo.model_shapes.MODEL_NAMES))
  parser.add_argument("--json", default=None, help="write results here")
  args = parser.parse_args(argv)
  rows = []
  for name, (tx, dtype) in optimizers().items():
    params = mo.model_shapes.llama2_shapes(args.model, dtype=dtype)
    n = mo.model_shapes.num_params(params)
    t0 = time.perf_counter()
    try:
      state = jax.eval_shape(tx.init, params)
    except Exception as e:  # pylint: disable=broad-except
      rows.append({"optimizer": name, "error": f"{type(e).__name__}: {e}"})
      continue
    nbytes = mo.state_nbytes(state)
    rows.append({"optimizer": name, "state_bytes": nbytes,
                 "bytes_per_param": nbytes / n, "num_params": n,
                 "seconds": time.perf_counter() - t0})
  ref = next(r["state_bytes"] for r in rows if r["optimizer"].startswith(
      "optax.adamw (fp32"))
  print(f"\nOptimizer state on {args.model} shapes "
        f"({rows[0]['num_params'] / 1e9:.2f} B params), jax {jax.__version__}")
  print(f"{'optimizer':<52} {'GB':>8} {'B/param':>8} {'vs adamw fp32':>13}")
  for r in rows:
    if "error" in r:
      print(f"{r['optimizer']:<52} error: {r['error'][:60]}")
      continue
    print(f"{r['optimizer']:<52} {r['state_bytes'] / 1e9:8.2f} "
          f"{r['bytes_per_param']:8.3f} {r['state_bytes'] / ref:13.3f}")
  result = {"model": args.model, "jax": jax.__version__,
            "optax": optax.__version__, "host": platform.node(), "rows": rows}
  return harness.write_json(result, args.json)


if __name__ == "__main__":
  main()

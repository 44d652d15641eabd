"""Step time and memory of ``mo.adam_mini`` against ``optax.adamw``.

Times one jitted optimizer step -- ``tx.update`` followed by
``optax.apply_updates``, with the parameters and the optimizer state donated
-- on Llama-2 shapes with bf16 parameters and gradients (random, not zeros),
for both optimizers in one process. Reports the median over ``--steps``
steps (each ended by ``block_until_ready``), the optimizer state in bytes per
parameter, XLA's compiled memory analysis of the step (every back end), and
the device's peak memory where ``jax.devices()[0].memory_stats()`` exists
(GPU/TPU). The peak is the process's peak so far: Adam-mini runs first, so
its peak is its own and AdamW's is the larger of the two.

  python benchmarks/adam_mini_step.py --model llama2-7b --json adam_mini.json
  python benchmarks/adam_mini_step.py --layers 1 --d-model 256 --vocab 1024 \\
      --steps 3    # a CPU-sized check

Learning rate and weight decay are the same for both optimizers; Adam-mini
decays its default mask (matrices, not biases/norms) and AdamW every leaf,
as ``optax.adamw`` does without a mask.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import harness  # puts the checkout on sys.path
import microadam_optax as mo

OPTIMIZERS = ("adam_mini", "adamw")


def model_shapes(model: str, layers: int | None, d_model: int | None,
                 ffn: int | None, vocab: int | None) -> dict[str, Any]:
  """Llama-2 bf16 shapes, optionally with fewer layers or narrower tensors."""
  tree = mo.model_shapes.llama2_shapes(model, dtype=jnp.bfloat16,
                                       num_layers=layers)
  if d_model is None and ffn is None and vocab is None:
    return tree
  full = mo.model_shapes.llama2_shapes(model, num_layers=1)
  v0, d0 = full["embed_tokens"]["embedding"].shape
  f0 = full["layers_0"]["mlp"]["gate_proj"]["kernel"].shape[1]
  d = d0 if d_model is None else d_model
  f = (ffn if ffn is not None else
       max(1, round(f0 * d / d0)) if d_model is not None else f0)
  v = v0 if vocab is None else vocab
  sizes = {d0: d, f0: f, v0: v}  # distinct in every Llama-2 model
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(tuple(sizes[n] for n in s.shape),
                                     s.dtype), tree)


def make_optimizer(name: str, lr: float, weight_decay: float):
  if name == "adam_mini":
    return mo.adam_mini(lr, weight_decay=weight_decay)
  if name == "adamw":
    return optax.adamw(lr, weight_decay=weight_decay)
  raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}.")


def device_memory() -> dict[str, int] | None:
  stats = harness.memory_stats()
  if not stats:
    return None
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use")
          if k in stats}


def compiled_memory(compiled) -> dict[str, int] | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes",
            "alias_size_in_bytes", "temp_size_in_bytes")
  return {f: int(getattr(m, f)) for f in fields if hasattr(m, f)}


def bench_one(name: str, shapes: Any, args: argparse.Namespace) -> dict:
  """Times ``args.steps`` donated steps of one optimizer."""
  n = mo.model_shapes.num_params(shapes)
  tx = make_optimizer(name, args.lr, args.weight_decay)
  params = mo.model_shapes.random_arrays(shapes, args.seed, 0.02)
  grads = mo.model_shapes.random_arrays(shapes, args.seed + 1, 1e-3)
  state = jax.jit(tx.init)(params)
  state_bytes = mo.state_nbytes(state)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, grads).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    params, state = compiled(params, state, grads)
  jax.block_until_ready((params, state))
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    params, state = compiled(params, state, grads)
    jax.block_until_ready((params, state))
    times.append(time.perf_counter() - t0)
  finite = all(bool(jnp.all(jnp.isfinite(p.astype(jnp.float32))))
               for p in jax.tree.leaves(params)[:4])
  row = {
      "optimizer": name,
      "median_ms": 1e3 * statistics.median(times),
      "min_ms": 1e3 * min(times),
      "steps_ms": [1e3 * t for t in times],
      "compile_s": compile_s,
      "state_bytes": state_bytes,
      "state_bytes_per_param": state_bytes / n,
      "compiled_memory": compiled_memory(compiled),
      "device_memory": device_memory(),
      "params_finite": finite,
  }
  del params, state, grads, compiled
  return row


def main(argv=None) -> dict:
  """Runs the benchmark; returns (and optionally writes) the results."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="llama2-7b",
                      choices=list(mo.model_shapes.MODEL_NAMES))
  parser.add_argument("--layers", type=int, default=None,
                      help="keep only this many decoder layers")
  parser.add_argument("--d-model", type=int, default=None,
                      help="override the model width (the MLP width scales "
                      "with it unless --ffn is given)")
  parser.add_argument("--ffn", type=int, default=None,
                      help="override the MLP width")
  parser.add_argument("--vocab", type=int, default=None,
                      help="override the vocabulary size")
  parser.add_argument("--steps", type=int, default=5,
                      help="timed steps (the median is reported)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--lr", type=float, default=1e-4)
  parser.add_argument("--weight-decay", type=float, default=1e-4)
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                      choices=OPTIMIZERS)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None, help="write results here")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")

  shapes = model_shapes(args.model, args.layers, args.d_model, args.ffn,
                        args.vocab)
  n = mo.model_shapes.num_params(shapes)
  rows = [bench_one(name, shapes, args) for name in args.optimizers]

  device = jax.devices()[0]
  print(f"\nOne optimizer step (update + apply_updates, donated) on "
        f"{args.model} shapes: {n / 1e9:.3f} B params in "
        f"{len(jax.tree.leaves(shapes))} bf16 tensors; {device.device_kind}, "
        f"jax {jax.__version__}, median of {args.steps}")
  print(f"{'optimizer':<12} {'median ms':>10} {'min ms':>9} {'state GB':>9} "
        f"{'B/param':>8} {'XLA temp GB':>12} {'peak GB':>8}")
  for r in rows:
    temp = (r["compiled_memory"] or {}).get("temp_size_in_bytes")
    peak = (r["device_memory"] or {}).get("peak_bytes_in_use")
    fmt = lambda x: "n/a" if x is None else f"{x / 1e9:.3f}"
    print(f"{r['optimizer']:<12} {r['median_ms']:10.2f} {r['min_ms']:9.2f} "
          f"{r['state_bytes'] / 1e9:9.3f} {r['state_bytes_per_param']:8.3f} "
          f"{fmt(temp):>12} {fmt(peak):>8}")
  if len(rows) == 2:
    print(f"adam_mini / adamw: time {rows[0]['median_ms'] / rows[1]['median_ms']:.3f}, "
          f"state {rows[0]['state_bytes'] / rows[1]['state_bytes']:.3f}")
  result = {
      "model": args.model, "layers": args.layers, "d_model": args.d_model,
      "ffn": args.ffn, "vocab": args.vocab, "num_params": n,
      "num_tensors": len(jax.tree.leaves(shapes)), "steps": args.steps,
      "lr": args.lr, "weight_decay": args.weight_decay,
      "device": str(device), "device_kind": device.device_kind,
      "backend": jax.default_backend(), "jax": jax.__version__,
      "optax": optax.__version__, "host": platform.node(), "rows": rows,
  }
  return harness.write_json(result, args.json)


if __name__ == "__main__":
  main()

"""One optimizer step on real model shapes: MicroAdam (kernels and XLA) vs AdamW.

Runs in one process, side by side, on bf16 parameters and random bf16
gradients of a Llama-2 model's shapes (``--layers`` keeps fewer decoder
layers; ``--model tiny`` is a few small tensors, for CPUs):

* ``optax.adamw`` with ``mu_dtype=bf16`` (bf16 parameters give bf16 ``nu`` as
  well: the "bf16 states" reference row);
* ``microadam_optax.microadam`` with ``implementation="auto"`` (the kernels:
  on GPU two Triton kernels per leaf, through jax-triton) and ``"xla"``,
  through ``update`` then ``optax.apply_updates``;
* the same kernels through ``mo.apply_gradients`` (rows ``fused`` and
  ``fused_wd``): the parameter updated inside the second kernel, without
  weight decay (only the window's entries of a parameter are touched) and
  with AdamW's default decay 1e-4 (a dense pass over the parameter).

Also measured in the same process: the device copy bandwidth (bytes read
plus written per second) and, from it, each row's bandwidth floor: the
bytes a step must move at least (gradient in, state in and out, parameters
in and out: AdamW 14 B/param, MicroAdam ~7.5 B/param if its update were
fused into the parameter write) over the copy bandwidth.

Each row times ``jit(update + apply_updates)`` with donated parameters and
state: the median of ``--steps`` steps after ``--warmup``, each synchronised
with ``block_until_ready``; the steps cycle through ``--grad-sets`` random
gradients. Peak device memory is read from
``memory_stats()`` after each row (rows run in increasing order of expected
memory, and the peak counter never decreases, so each reading is that row's
peak unless an earlier row's was higher), and XLA's own count of the
step's temporary buffers from ``compiled.memory_analysis()`` (what the step
needs beyond its arguments). ``--kernels`` adds per-kernel
timings on the largest MLP tensor (see ``benchmarks/kernels.py``).

  python benchmarks/microadam_step.py --model llama2-7b --rows auto,adamw \
      --json step.json
  python benchmarks/microadam_step.py --model tiny            # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import harness  # puts the checkout on sys.path
import microadam_optax as mo

LR = 1e-4
#: optax.adamw's default weight decay, also given to the fused_wd row.
ADAMW_WEIGHT_DECAY = 1e-4


def tiny_shapes(dtype=jnp.bfloat16) -> dict[str, Any]:
  """A few small tensors with awkward sizes (for CPU runs)."""
  s = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  return {"embed": s(300, 64), "w1": s(64, 200), "w2": s(200, 64),
          "norm": s(64), "odd": s(7, 13)}


def model_shapes(name: str, layers: int | None) -> dict[str, Any]:
  if name == "tiny":
    return tiny_shapes()
  return mo.model_shapes.llama2_shapes(name, num_layers=layers)


def memory_stats() -> dict[str, int]:
  """The device's in-use, peak and limit byte counters (``{}`` on CPU)."""
  return {k: int(v) for k, v in harness.memory_stats().items()
          if k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


def optax_step(tx) -> Callable:
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


def fused_step(tx) -> Callable:
  def step(params, state, grads):
    return mo.apply_gradients(tx, grads, state, params)
  return jax.jit(step, donate_argnums=(0, 1))


def floor_bytes(row: str, shapes: Any, state_bytes: int) -> int:
  """The fewest bytes one step of ``row`` moves through device memory."""
  params = mo.state_nbytes(shapes)  # bf16 parameters; gradients the same
  if row.startswith("optax"):
    # gradient in; moments in and out; parameters in and out.
    return params + 2 * state_bytes + 2 * params
  # gradient in; codes and window in and out (all rows of the window are
  # read, one is written: counted in and out, 0.4 B/param too many);
  # parameters in and out. A step whose update u goes through
  # apply_updates moves 4 B/param more (u written and read).
  return params + 2 * state_bytes + 2 * params


def run_row(name: str, init: Callable, step: Callable, shapes: Any,
            grad_sets: list, *, steps: int, warmup: int) -> dict:
  """Times one optimizer; frees its parameters and state afterwards.

  Step ``i`` uses ``grad_sets[i % len(grad_sets)]``: a fresh-looking gradient
  every step (reusing one gradient makes the error feedback pile up on the
  same entries, an unrealistic input for the Top-K search).
  """
  params = mo.model_shapes.random_arrays(shapes, seed=1, scale=0.02)
  state = init(params)
  jax.block_until_ready(state)
  state_bytes = mo.state_nbytes(state)
  t0 = time.perf_counter()
  step = step.lower(params, state, grad_sets[0]).compile()
  compile_s = time.perf_counter() - t0
  analysis = {}
  try:
    ma = step.memory_analysis()
    analysis = {f"xla_{k}": int(getattr(ma, k)) for k in (
        "temp_size_in_bytes", "argument_size_in_bytes",
        "output_size_in_bytes", "alias_size_in_bytes")}
  except Exception:  # pylint: disable=broad-except
    pass
  t0 = time.perf_counter()
  params, state = step(params, state, grad_sets[0])
  jax.block_until_ready((params, state))
  first = time.perf_counter() - t0
  times = []
  for i in range(warmup - 1 + steps):
    grads = grad_sets[(i + 1) % len(grad_sets)]
    t0 = time.perf_counter()
    params, state = step(params, state, grads)
    jax.block_until_ready((params, state))
    if i >= warmup - 1:
      times.append((time.perf_counter() - t0) * 1e3)
  finite = bool(all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))
                    for x in jax.tree.leaves(params)[:3]))
  mem = memory_stats()
  del params, state
  gc.collect()
  n = mo.model_shapes.num_params(shapes)
  row = {"optimizer": name, "median_ms": statistics.median(times),
         "min_ms": min(times), "times_ms": times,
         "compile_s": compile_s, "first_call_s": first,
         "state_bytes": state_bytes, **analysis,
         "state_bytes_per_param": state_bytes / n, "params_finite": finite,
         **{f"mem_{k}": v for k, v in mem.items()}}
  peak = mem.get("peak_bytes_in_use")
  temp = analysis.get("xla_temp_size_in_bytes")
  print(f"{name:<52} {row['median_ms']:9.2f} ms  state "
        f"{state_bytes / n:5.3f} B/param  peak "
        f"{(peak or 0) / 1e9:7.2f} GB  temporaries "
        f"{(temp or 0) / 1e9:6.2f} GB  (compile {compile_s:.1f} s)",
        flush=True)
  return row


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="llama2-7b",
                      choices=[*mo.model_shapes.MODEL_NAMES, "tiny"])
  parser.add_argument("--layers", type=int, default=None,
                      help="keep this many decoder layers (default: all)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--grad-sets", type=int, default=3,
                      help="random gradients cycled through, one per step")
  parser.add_argument("--xla-steps", type=int, default=3,
                      help="steps for the (slow) XLA MicroAdam row")
  parser.add_argument("--rows", default="auto,fused,fused_wd,xla,adamw",
                      help="comma list of auto (the kernels), fused, "
                      "fused_wd (the kernels through mo.apply_gradients, "
                      "without and with weight decay), xla, adamw")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)

  shapes = model_shapes(args.model, args.layers)
  n = mo.model_shapes.num_params(shapes)
  print(f"{args.model} layers={args.layers}: {n / 1e9:.3f} B params in "
        f"{len(jax.tree.leaves(shapes))} tensors; {jax.devices()[0]}; jax "
        f"{jax.__version__}", flush=True)
  grad_sets = [mo.model_shapes.random_arrays(shapes, seed=2 + i,
                                                scale=1e-3)
               for i in range(args.grad_sets)]
  result: dict[str, Any] = {
      "model": args.model, "layers": args.layers, "num_params": n,
      "num_tensors": len(jax.tree.leaves(shapes)),
      "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(), "jax": jax.__version__,
      "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
      "param_bytes": mo.state_nbytes(shapes), "grad_bytes": mo.state_nbytes(shapes),
      "grad_sets": args.grad_sets,
      "memory_before": memory_stats(), "rows": []}
  wanted = args.rows.split(",")
  ma_kw = dict(learning_rate=LR, weight_decay=0.0)
  rows = []
  for impl in ("auto", "xla"):
    if impl in wanted:
      tx = mo.microadam(implementation=impl, **ma_kw)
      rows.append((f'mo.microadam implementation="{impl}"', tx.init,
                   optax_step(tx), args.steps if impl == "auto"
                   else args.xla_steps))
  for row, wd in (("fused", 0.0), ("fused_wd", ADAMW_WEIGHT_DECAY)):
    if row in wanted:
      tx = mo.microadam(learning_rate=LR, weight_decay=wd)
      rows.append((f"mo.microadam via mo.apply_gradients, wd={wd:g}",
                   tx.init, fused_step(tx), args.steps))
  if "adamw" in wanted:
    tx = optax.adamw(LR, mu_dtype=jnp.bfloat16,
                     weight_decay=ADAMW_WEIGHT_DECAY)
    rows.append(("optax.adamw (mu_dtype=bf16; bf16 states)", tx.init,
                 optax_step(tx), args.steps))
  def dump():
    harness.write_json(result, args.json, indent=1)

  for name, init, step, steps in rows:
    try:
      result["rows"].append(run_row(name, init, step, shapes, grad_sets,
                                    steps=steps, warmup=args.warmup))
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name}: FAILED {type(e).__name__}: {str(e)[:2000]}",
            flush=True)
      result["rows"].append({"optimizer": name,
                             "error": f"{type(e).__name__}: {e}"[:4000]})
    gc.collect()
    dump()

  bw = harness.copy_bandwidth(4 << 30 if jax.default_backend() == "gpu" else 1 << 26)
  result["copy_bandwidth_GB_per_s"] = bw / 1e9
  print(f"copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
  for r in result["rows"]:
    if "error" not in r:
      r["floor_bytes"] = floor_bytes(r["optimizer"], shapes, r["state_bytes"])
      r["floor_ms"] = r["floor_bytes"] / bw * 1e3
      r["vs_floor"] = r["median_ms"] / r["floor_ms"]

  # Live during a step: the parameters, every gradient set, the state.
  base = result["param_bytes"] + args.grad_sets * result["grad_bytes"]
  adamw = [r for r in result["rows"] if r["optimizer"].startswith("optax")
           and "error" not in r]
  print(f"\n{'optimizer':<52} {'step ms':>9} {'vs AdamW':>8} {'floor ms':>8} "
        f"{'vs floor':>8} {'B/param':>8} {'peak GB':>8} {'peak-live GB':>12} "
        f"{'XLA temp GB':>11}")
  for r in result["rows"]:
    if "error" in r:
      print(f"{r['optimizer']:<52} error: {r['error'][:70]}")
      continue
    peak = r.get("mem_peak_bytes_in_use", 0)
    extra = peak - base - r["state_bytes"]
    temp = r.get("xla_temp_size_in_bytes", float("nan"))
    ratio = r["median_ms"] / adamw[0]["median_ms"] if adamw else float("nan")
    print(f"{r['optimizer']:<52} {r['median_ms']:9.2f} {ratio:8.2f} "
          f"{r['floor_ms']:8.2f} {r['vs_floor']:8.2f} "
          f"{r['state_bytes_per_param']:8.3f} {peak / 1e9:8.2f} "
          f"{extra / 1e9:12.2f} {temp / 1e9:11.2f}")
  dump()
  return result


if __name__ == "__main__":
  main()

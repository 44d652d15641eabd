"""Where a MicroAdam step's device time goes: kernel times from a JAX trace.

Runs the jitted ``update + apply_updates`` of ``mo.microadam`` (or
``optax.adamw``) on Llama-2 shapes a few times, records ``--steps`` more
under :func:`jax.profiler.trace`, and sums the device time of every kernel
by family (error feedback, window, the XLA fusions, copies, ...). Device
events come from the trace's GPU plane (CUPTI), so launch gaps show as the
difference between the step's wall time and the kernels' sum.

  python benchmarks/step_profile.py --json profile.json
  python benchmarks/step_profile.py --model tiny            # CPU smoke run
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

import microadam_optax as mo

import harness  # puts the checkout on sys.path
import microadam_step


def family(name: str) -> str:
  """A kernel's family from its name."""
  low = name.lower()
  for key in ("microadam_topk", "microadam_u", "error_feedback", "window",
              "block_topk", "quantize", "dequantize"):
    if key in low:
      return key
  for key in ("copy", "dynamic_update_slice", "dynamic-update-slice",
              "concatenate", "memset", "memcpy", "reduce", "fusion"):
    if key in low:
      return key
  return "other"


LINES_SEEN: dict[str, int] = {}


def device_events(path: str) -> list[tuple[str, float]]:
  """``(name, duration in µs)`` of every event on the device planes."""
  files = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
  out = []
  for f in files:
    data = jax.profiler.ProfileData.from_file(f)
    for plane in data.planes:
      if not plane.name.startswith("/device:"):
        continue
      for line in plane.lines:
        LINES_SEEN[f"{plane.name}|{line.name}"] = len(list(line.events))
        # XLA's per-stream lines hold the kernels; skip the op-level lines
        # ("XLA Ops", "XLA Modules", "Steps") which repeat the same time.
        if "stream" not in line.name.lower():
          continue
        for ev in line.events:
          out.append((ev.name, ev.duration_ns / 1e3))
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="llama2-7b",
                      choices=[*mo.model_shapes.MODEL_NAMES, "tiny"])
  parser.add_argument("--layers", type=int, default=None)
  parser.add_argument("--optimizer", default="pallas",
                      choices=["auto", "pallas", "xla", "adamw"])
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  shapes = microadam_step.model_shapes(args.model, args.layers)
  if args.optimizer == "adamw":
    tx = optax.adamw(microadam_step.LR, mu_dtype=jnp.bfloat16)
  else:
    tx = mo.microadam(microadam_step.LR, implementation=args.optimizer)
  step = microadam_step.optax_step(tx)
  params = mo.model_shapes.random_arrays(shapes, seed=1, scale=0.02)
  grads = [mo.model_shapes.random_arrays(shapes, seed=2 + i, scale=1e-3)
           for i in range(2)]
  state = tx.init(params)
  for i in range(3):
    params, state = step(params, state, grads[i % 2])
  jax.block_until_ready((params, state))
  tmp = tempfile.mkdtemp()
  t0 = time.perf_counter()
  with jax.profiler.trace(tmp):
    for i in range(args.steps):
      params, state = step(params, state, grads[i % 2])
      jax.block_until_ready((params, state))
  wall = (time.perf_counter() - t0) * 1e3 / args.steps
  events = device_events(tmp)
  by_family = collections.defaultdict(lambda: [0.0, 0])
  by_name = collections.defaultdict(lambda: [0.0, 0])
  for name, us in events:
    by_family[family(name)][0] += us / args.steps
    by_family[family(name)][1] += 1
    by_name[name][0] += us / args.steps
    by_name[name][1] += 1
  total = sum(v[0] for v in by_family.values())
  print(f"{args.optimizer} on {args.model}: wall {wall:.2f} ms per step "
        f"(traced), device kernels {total / 1e3:.2f} ms, "
        f"{len(events) // max(args.steps, 1)} kernels per step")
  for fam, (us, n) in sorted(by_family.items(), key=lambda x: -x[1][0]):
    print(f"  {fam:<24} {us / 1e3:9.3f} ms  {n // args.steps:6d} kernels")
  top = sorted(by_name.items(), key=lambda x: -x[1][0])[:25]
  print("top kernels:")
  for name, (us, n) in top:
    print(f"  {name[:60]:<60} {us / 1e3:9.3f} ms  x{n // args.steps}")
  print("trace lines:", LINES_SEEN)
  result = {"lines": LINES_SEEN, "optimizer": args.optimizer, "model": args.model,
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_ms_traced": wall, "kernels_ms": total / 1e3,
            "kernels_per_step": len(events) // max(args.steps, 1),
            "by_family_ms": {k: v[0] / 1e3 for k, v in by_family.items()},
            "top_kernels_ms": {k: v[0] / 1e3 for k, v in top}}
  return harness.write_json(result, args.json, indent=1)


if __name__ == "__main__":
  main()

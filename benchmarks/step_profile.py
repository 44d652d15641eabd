"""Where a MicroAdam step's device time goes: kernel times from a JAX trace.

Runs the jitted ``update + apply_updates`` of ``mo.microadam`` (or
``optax.adamw``) on Llama-2 shapes a few times, records ``--steps`` more
under :func:`jax.profiler.trace`, and sums the device time of every kernel
by family (error feedback, window, the XLA fusions, copies, ...). Device
events come from the trace's GPU plane (CUPTI), so launch gaps show as the
difference between the step's wall time and the kernels' sum; the device's
idle time between kernels is also summed by the family of the kernel that
ends each gap, and the host's events (the runtime's thunks) by name.
``--optimizer fused`` / ``fused_wd`` profile ``mo.apply_gradients``.

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
  return [(name, dur) for name, _, dur in timed_events(path)[0]]


def timed_events(path: str) -> tuple[list[tuple[str, float, float]],
                                     list[tuple[str, float, float]]]:
  """``(name, start µs, duration µs)`` of the device planes' kernels
  (XLA's per-stream lines) and of the host planes' events."""
  files = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
  device, host = [], []
  for f in files:
    data = jax.profiler.ProfileData.from_file(f)
    for plane in data.planes:
      on_device = plane.name.startswith("/device:")
      for line in plane.lines:
        LINES_SEEN[f"{plane.name}|{line.name}"] = len(list(line.events))
        # XLA's per-stream lines hold the kernels; skip the op-level lines
        # ("XLA Ops", "XLA Modules", "Steps") which repeat the same time.
        if on_device and "stream" not in line.name.lower():
          continue
        for ev in line.events:
          (device if on_device else host).append(
              (ev.name, ev.start_ns / 1e3, ev.duration_ns / 1e3))
  return device, host


def gaps(events: list[tuple[str, float, float]]) -> dict[str, list]:
  """Idle time on the device before each kernel, by the kernel's family:
  ``{family: [µs, count]}`` (the first kernel's gap is not counted)."""
  out = collections.defaultdict(lambda: [0.0, 0])
  end = None
  for name, start, dur in sorted(events, key=lambda e: e[1]):
    if end is not None and start > end:
      out[family(name)][0] += start - end
      out[family(name)][1] += 1
    end = max(end or 0.0, start + dur)
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="llama2-7b",
                      choices=[*mo.model_shapes.MODEL_NAMES, "tiny"])
  parser.add_argument("--layers", type=int, default=None)
  parser.add_argument("--optimizer", default="pallas",
                      choices=["auto", "pallas", "xla", "adamw", "fused",
                               "fused_wd"])
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  shapes = microadam_step.model_shapes(args.model, args.layers)
  if args.optimizer == "adamw":
    tx = optax.adamw(microadam_step.LR, mu_dtype=jnp.bfloat16,
                     weight_decay=microadam_step.ADAMW_WEIGHT_DECAY)
    step = microadam_step.optax_step(tx)
  elif args.optimizer.startswith("fused"):
    tx = mo.microadam(microadam_step.LR, weight_decay=(
        microadam_step.ADAMW_WEIGHT_DECAY if args.optimizer == "fused_wd"
        else 0.0))
    step = microadam_step.fused_step(tx)
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
  timed, host = timed_events(tmp)
  events = [(name, dur) for name, _, dur in timed]
  idle = gaps(timed)
  idle_total = sum(v[0] for v in idle.values()) / args.steps
  host_by_name = collections.defaultdict(lambda: [0.0, 0])
  for name, _, dur in host:
    if name.startswith("$"):  # Python frames
      continue
    host_by_name[name][0] += dur / args.steps
    host_by_name[name][1] += 1
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
  print(f"device idle between kernels: {idle_total / 1e3:.2f} ms per step; "
        "before kernels of each family:")
  for fam, (us, n) in sorted(idle.items(), key=lambda x: -x[1][0]):
    print(f"  {fam:<24} {us / 1e3 / args.steps:9.3f} ms  "
          f"{n // args.steps:6d} gaps")
  host_top = sorted(host_by_name.items(), key=lambda x: -x[1][0])[:25]
  print("host events (longest in sum):")
  for name, (us, n) in host_top:
    print(f"  {name[:60]:<60} {us / 1e3:9.3f} ms  x{n // args.steps}")
  print("trace lines:", LINES_SEEN)
  result = {"lines": LINES_SEEN, "optimizer": args.optimizer, "model": args.model,
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_ms_traced": wall, "kernels_ms": total / 1e3,
            "kernels_per_step": len(events) // max(args.steps, 1),
            "by_family_ms": {k: v[0] / 1e3 for k, v in by_family.items()},
            "top_kernels_ms": {k: v[0] / 1e3 for k, v in top},
            "idle_ms": idle_total / 1e3,
            "idle_before_family_ms": {k: v[0] / 1e3 / args.steps
                                      for k, v in idle.items()},
            "host_top_ms": {k: v[0] / 1e3 for k, v in host_top}}
  return harness.write_json(result, args.json, indent=1)


if __name__ == "__main__":
  main()

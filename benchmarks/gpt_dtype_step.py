"""The comparison's GPT trained in float32 and in bfloat16 mixed precision.

Runs the comparison's own LM task and training loop (``compare.run_optimizer``
at one fixed learning rate, no tuning) once per compute dtype, in one
process, and prints per optimizer and dtype: the step time, the compile time,
the device's peak memory and the final validation loss. It is the evidence
for the GPU preset's compute dtype (:attr:`models.GPTConfig.dtype`): a
preset trains in bfloat16 only if that is faster and reaches the same loss.

Run on the device (about 3 minutes for AdamW at the GPU preset)::

  PYTHONPATH=. python3 benchmarks/gpt_dtype_step.py --preset gpu \\
      --optimizers adamw:3e-4 --json dtype.json

``--steps`` shortens the runs (the loss is then not the preset's).
"""

from __future__ import annotations

import argparse
import time

import jax

import harness  # puts the checkout on sys.path
from microadam_compare import compare
from microadam_compare import optimizers as opt_lib
from microadam_compare import tasks


def _parse_optimizers(text: str) -> list[tuple[str, float]]:
  out = []
  for item in text.split(","):
    name, sep, lr = item.partition(":")
    if not sep:
      raise ValueError(
          f"--optimizers expects NAME:LR items, got {item!r} (e.g. adamw:3e-4).")
    opt_lib.get(name)
    out.append((name, float(lr)))
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="gpu", choices=("tiny", "cpu", "gpu"))
  parser.add_argument("--optimizers", default="adamw:3e-4",
                      help="comma-separated NAME:LR (default adamw:3e-4)")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--steps", type=int, default=None,
                      help="steps per run (default: the preset's lm steps)")
  parser.add_argument("--eval-every", type=int, default=None)
  parser.add_argument("--json", default=None, help="write the rows here")
  args = parser.parse_args(argv)

  from microadam_compare import cli  # the presets' run lengths
  preset_runs = cli.SCHEDULES[("lm", args.preset)]
  steps = args.steps or preset_runs["steps"]
  every = args.eval_every or min(preset_runs["eval_every"], steps)
  rows = []
  for dtype in args.dtypes.split(","):
    task = tasks.lm_task(args.preset, dtype=dtype)
    evaluate = compare.make_eval(task)
    for name, lr in _parse_optimizers(args.optimizers):
      config = compare.RunConfig(
          steps=steps, eval_every=every, tune=False, seeds=(0,),
          lr_grids={name: [lr]}, progress=False)
      start = time.perf_counter()
      res = compare.run_optimizer(task, opt_lib.get(name), config,
                                  evaluate=evaluate)
      row = dict(
          optimizer=name, dtype=dtype, lr=lr, steps=res.get("steps_run"),
          status=res.get("status"),
          step_time_ms=1e3 * (res.get("step_time_s") or float("nan")),
          compile_s=res.get("compile_s"),
          device_peak_gib=(res.get("device_peak_bytes") or 0) / 2**30,
          final_val_loss=res.get("final_val_loss"),
          wall_s=time.perf_counter() - start)
      rows.append(row)
      print(f"{name:10s} {dtype:9s} lr {lr:.0e}: step {row['step_time_ms']:7.1f}"
            f" ms  compile {row['compile_s'] or 0:5.1f} s  peak "
            f"{row['device_peak_gib']:5.1f} GiB  val loss "
            f"{row['final_val_loss']:.4f}  ({row['wall_s']:.0f} s)", flush=True)
  result = dict(preset=args.preset, steps=steps,
                device=str(jax.devices()[0].device_kind),
                jax=jax.__version__, rows=rows)
  return harness.write_json(result, args.json, indent=1)


if __name__ == "__main__":
  main()

"""Learning-rate and configuration sweeps of the comparison's optimizers.

Runs each entry of a JSON plan on a task of ``microadam-optax compare`` and
prints the validation-loss curve of every (optimizer, configuration, learning
rate), so that questions the default comparison is too short to answer --
how MicroAdam's gap to AdamW moves with the run length and the density, how
Gauss-Newton's iterations scale with the batch size and the inner solve --
have measured answers. Each configuration compiles once and runs all its
learning rates; every run starts from the task's initial parameters and sees
the same batches.

  python experiments/lm_sweeps.py experiments/sweeps/lm_lengths_and_gn.json \\
      --json lm_sweeps.json

A plan is a list of entries::

  {"opt": "microadam", "kw": {"density": 0.035}, "lrs": [1e-4, 3e-4],
   "steps": 2000, "every": 100, "task": "lm", "preset": "cpu", "batch": 8}

``opt`` is ``adamw`` / ``microadam`` (``kw`` goes to ``optax.adamw`` /
``mo.microadam``), ``gn`` (``kw``: ``inner`` = ``adam`` | ``muon`` | ``sgd``,
``ls`` = line-search sizes, the rest to ``mo.gauss_newton``; ``steps`` are
outer iterations) or any other name of the comparison's registry (``kw``
ignored). ``task``, ``preset`` and ``batch`` default to ``lm``, ``cpu`` and
the preset's batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
import microadam_optax as mo
from microadam_compare import compare
from microadam_compare import optimizers as opt_lib
from microadam_compare import tasks as task_lib
# pylint: enable=g-import-not-at-top


def make_builder(kind: str, kw: dict) -> opt_lib.Builder:
  """The builder ``(lr, context) -> GradientTransformation`` of an entry."""
  kw = dict(kw)
  if kind == "microadam":
    return lambda lr, ctx: mo.microadam(
        lr, weight_decay=ctx.decay(0.0), mask=opt_lib.decay_mask, **kw)
  if kind == "adamw":
    return lambda lr, ctx: optax.adamw(
        lr, weight_decay=ctx.decay(0.0), mask=opt_lib.decay_mask, **kw)
  if kind == "gn":
    inner = kw.pop("inner", "muon")
    linesearch = tuple(kw.pop("ls", mo.DEFAULT_LINESEARCH))

    def build(lr, ctx):
      make_inner = {
          "adam": lambda: optax.adam(lr),
          "muon": lambda: opt_lib.REGISTRY["muon"].build(
              lr, dataclasses.replace(ctx, weight_decay=0.0)),
          "sgd": lambda: optax.sgd(lr, momentum=0.9),
      }
      if inner not in make_inner:
        raise ValueError(f"inner must be one of {sorted(make_inner)}, got "
                         f"{inner!r}.")
      layers = {"layers": ctx.gn_layers} if kw.get("layerwise") else {}
      return mo.gauss_newton(make_inner[inner](), linesearch=linesearch,
                             **kw, **layers)
    return build
  return opt_lib.get(kind).build


def run_entry(entry: dict, cache: dict) -> list[dict]:
  """Runs one plan entry (all its learning rates); returns one row per rate."""
  entry = dict(entry)
  key = (entry.pop("task", "lm"), entry.pop("preset", "cpu"),
         entry.pop("batch", None))
  if key not in cache:
    cache[key] = task_lib.TASKS[key[0]](key[1], batch_size=key[2])
  task = cache[key]
  kind, kw = entry.pop("opt"), entry.pop("kw", {})
  lrs, steps, every = entry.pop("lrs"), entry.pop("steps"), entry.pop("every")
  if entry:
    raise ValueError(f"unknown plan keys {sorted(entry)}")
  base = opt_lib.get({"gn": "gn_layerwise" if kw.get("layerwise")
                      else "gn_full"}.get(kind, kind))
  spec = dataclasses.replace(base, name=kind, build=make_builder(kind, kw))
  evaluate = compare.make_eval(task)
  # No gradient clipping: the plans recorded in experiments/sweeps/ ran
  # without it (the comparison itself now clips to norm 1.0).
  runner = compare._Runner(  # pylint: disable=protected-access
      task, spec, evaluate, jax.tree.map(jnp.asarray, task.eval_batches),
      every, clip_norm=None)
  runner.compile(lrs[0], steps)
  rows = []
  for lr in lrs:
    t0 = time.perf_counter()
    rec = runner.run(task, lr, steps)
    state_bytes = rec.pop("state_bytes")
    chunks = rec["chunk_s"][1:] or rec["chunk_s"]
    row = {"task": task.name, "preset": key[1],
           "batch": task.metadata["batch_size"], "opt": kind, "kw": kw,
           "lr": lr, "steps": rec["steps"], "val_loss": rec["val_loss"],
           "val_acc": rec["val_acc"], "step_sizes": rec.get("step_sizes"),
           "step_s": float(np.median(chunks)) / every,
           "state_bytes_per_param": state_bytes / task.num_params,
           "wall_s": time.perf_counter() - t0}
    rows.append(row)
    print(f"{row['task']} b={row['batch']} {kind} {json.dumps(kw)} "
          f"lr={lr:.0e} | "
          + " ".join(f"{v:.3f}" for v in row["val_loss"])
          + f" | B/p {row['state_bytes_per_param']:.2f}, "
          f"{1e3 * row['step_s']:.1f} ms/step", flush=True)
  return rows


def main(argv=None) -> list[dict]:
  """Runs a plan; prints each curve and the final table; writes JSON."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("plan", help="JSON list of entries (see the docstring)")
  parser.add_argument("--json", default=None, help="write the rows here")
  args = parser.parse_args(argv)
  with open(args.plan, encoding="utf-8") as f:
    plan = json.load(f)
  rows, cache = [], {}
  for entry in plan:
    rows += run_entry(entry, cache)
    if args.json:
      with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"plan": args.plan, "device": str(jax.devices()[0]),
                   "jax": jax.__version__, "rows": rows}, f, indent=1)
  print(f"\n{'task':<6} {'batch':>5} {'optimizer':<10} {'config':<42} "
        f"{'lr':>6} {'steps':>5} {'final':>7} {'best':>7}")
  for r in rows:
    print(f"{r['task']:<6} {r['batch']:5d} {r['opt']:<10} "
          f"{json.dumps(r['kw']):<42} {r['lr']:6.0e} {r['steps'][-1]:5d} "
          f"{r['val_loss'][-1]:7.3f} {np.nanmin(r['val_loss']):7.3f}")
  return rows


if __name__ == "__main__":
  main()

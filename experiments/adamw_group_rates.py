"""How much of Muon's lead over AdamW comes from the rate of the non-hidden
parameters.

Muon (``optax.contrib.muon``, the comparison's Moonlight recipe) updates the
hidden matrices with orthogonalized momentum and leaves the embeddings, the
head and the norms to AdamW *at Muon's learning rate*, which the tuning puts
10-30x above AdamW's best single rate (GPU preset: 3e-3 against 3e-4; CPU
preset: 3e-2 against 1e-3). This script trains the comparison's LM task with
AdamW whose non-hidden parameters (``optimizers.is_hidden_matrix`` false) run
at ``mult`` times the rate of the hidden matrices, each multiplier tuned on
its own grid at the preset's full length, and prints the final validation
loss per multiplier next to Muon's; ``mult`` 1 is the comparison's AdamW.

Run (CPU preset, about 3 minutes on 2 idle cores)::

  python experiments/adamw_group_rates.py --preset cpu --mults 1,10,30 \\
      --json benchmarks/results/adamw_group_rates_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import jax
import optax

from microadam_compare import compare
from microadam_compare import optimizers as opt_lib
from microadam_compare import tasks


def group_rate_adamw(mult: float) -> opt_lib.Builder:
  """The comparison's AdamW with ``mult`` x the rate on non-hidden leaves."""
  def build(lr: Any, ctx: opt_lib.OptimizerContext):
    def labels(params):
      return jax.tree_util.tree_map_with_path(
          lambda p, x: "hidden" if opt_lib.is_hidden_matrix(p, x) else "other",
          params)
    other = (lambda count: mult * lr(count)) if callable(lr) else mult * lr
    adamw = opt_lib.REGISTRY["adamw"].build  # the comparison's own AdamW
    return optax.multi_transform(
        {"hidden": adamw(lr, ctx), "other": adamw(other, ctx)}, labels)
  return build


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="cpu", choices=("tiny", "cpu", "gpu"))
  parser.add_argument("--mults", default="1,10,30")
  parser.add_argument("--grid", default="3e-4,1e-3,3e-3",
                      help="first grid of the hidden matrices' rate")
  parser.add_argument("--muon", action="store_true",
                      help="also tune Muon (the comparison's) for scale")
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)

  from microadam_compare import cli  # the presets' run lengths
  schedule = cli.SCHEDULES[("lm", args.preset)]
  seeds = tuple(range(args.seeds))
  task = tasks.lm_task(args.preset)
  seed_tasks = [task.with_seed(seed=s) for s in seeds[1:]]
  evaluate = compare.make_eval(task)
  grid = [float(x) for x in args.grid.split(",")]
  specs = [dataclasses.replace(
      opt_lib.REGISTRY["adamw"], name=f"adamw_x{m}",
      label=f"AdamW, non-hidden x{m}", build=group_rate_adamw(float(m)))
           for m in args.mults.split(",")]
  if args.muon:
    specs.append(opt_lib.REGISTRY["muon"])
  rows = []
  for spec in specs:
    config = compare.RunConfig(
        steps=schedule["steps"], eval_every=schedule["eval_every"],
        seeds=seeds, progress=False,
        lr_grids=None if spec.name == "muon" else {spec.name: grid})
    start = time.perf_counter()
    res = compare.run_optimizer(task, spec, config, evaluate=evaluate,
                                seed_tasks=seed_tasks)
    row = dict(name=spec.name, label=spec.label, best_lr=res["best_lr"],
               at_edge=res["best_lr_at_grid_edge"],
               sweep=[(s["lr"], s["val_loss"]) for s in res["sweep"]],
               final_val_loss_mean=res["final_val_loss_mean"],
               final_val_loss_std=res["final_val_loss_std"],
               wall_s=time.perf_counter() - start)
    rows.append(row)
    sweep = ", ".join(f"{lr:.0e}: {loss:.4f}" for lr, loss in row["sweep"])
    print(f"{spec.label:26s} best {row['best_lr']:.0e}"
          f"{' (edge)' if row['at_edge'] else ''}  final "
          f"{row['final_val_loss_mean']:.4f} ± {row['final_val_loss_std']:.4f}"
          f"  [{sweep}]  {row['wall_s']:.0f} s", flush=True)
  result = dict(preset=args.preset, steps=schedule["steps"], seeds=seeds,
                device=str(jax.devices()[0].device_kind), rows=rows)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()

"""The gap table's harness (experiments/microadam_gap.py): a comparison's
results.json gives the table its AdamW, Adam-mini and MicroAdam rows."""

import json

import numpy as np

from experiments import microadam_gap


def _result(rng, name, bytes_per_param):
  """A result as `compare.run_optimizer` writes it (the fields kept)."""
  seeds = rng.uniform(0.5, 2.0, 3)
  return {"name": name, "label": name, "status": "ok", "seeds": [0, 1, 2],
          "lr_grid": [1e-4, 3e-4, 1e-3], "best_lr": 3e-4,
          "best_lr_at_grid_edge": False, "steps_run": 40, "eval_every": 10,
          "final_val_loss_per_seed": list(seeds),
          "final_val_loss_mean": float(np.mean(seeds)),
          "final_val_loss_std": float(np.std(seeds, ddof=1)),
          "state_bytes_per_param": bytes_per_param, "wall_s": 1.0,
          "step_time_s": 0.01}


def test_comparison_results_give_the_reference_rows(tmp_path):
  rng = np.random.default_rng()
  comparison = {
      "command": ["microadam-optax", "compare"], "preset": "gpu",
      "tasks": [{"task": "finetune", "description": "fake", "num_params": 10,
                 "seeds": [0, 1, 2],
                 "results": [_result(rng, "adamw", 8.0),
                             _result(rng, "microadam", 0.9),
                             _result(rng, "muon", 4.0),
                             dict(_result(rng, "adam_mini", 4.0),
                                  status="error")]}]}
  variant = dict(_result(rng, "microadam_d10_w1", 0.9),
                 label="MicroAdam 10 % m1")
  gap = {"preset": "gpu", "cells": {"finetune": {"microadam_d10_w1": variant}},
         "tasks": {"finetune": {"num_params": 10, "steps": 40}}}
  paths = []
  for name, report in (("results.json", comparison), ("gap.json", gap)):
    paths.append(str(tmp_path / name))
    with open(paths[-1], "w", encoding="utf-8") as f:
      json.dump(report, f)
  out = tmp_path / "merged.json"
  assert microadam_gap.main(
      ["--merge", *paths, "--out", str(out), "--tasks", "finetune",
       "--configs", "adamw,microadam_d1_w10,microadam_d10_w1"]) == 0
  with open(out, encoding="utf-8") as f:
    cells = json.load(f)["cells"]["finetune"]
  # AdamW and MicroAdam under the table's names; Muon is not a row, the
  # failed Adam-mini is left out.
  assert sorted(cells) == ["adamw", "microadam_d10_w1", "microadam_d1_w10"]
  assert cells["microadam_d1_w10"]["label"] == "MicroAdam 1 % m10"
  table = microadam_gap.format_summary(
      {"cells": {"finetune": cells}}, ["finetune"],
      ["microadam_d1_w10", "microadam_d10_w1"])
  ref = np.mean(comparison["tasks"][0]["results"][0]["final_val_loss_per_seed"])
  for name, r in (("MicroAdam 1 % m10", comparison["tasks"][0]["results"][1]),
                  ("MicroAdam 10 % m1", variant)):
    change = 100 * (np.mean(r["final_val_loss_per_seed"]) / ref - 1)
    row = next(line for line in table.splitlines() if name in line)
    assert f"{change:+.1f} %" in row, (row, change)

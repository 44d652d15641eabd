"""Terminal tables and the JSON file of a comparison."""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any, Optional, Sequence


def _fmt(x: Any, spec: str = ".4f", none: str = "-") -> str:
  if x is None:
    return none
  if isinstance(x, float) and not math.isfinite(x):
    return "nan" if math.isnan(x) else "inf"
  return format(x, spec)


def _mib(n: Optional[int]) -> str:
  return "n/a" if n is None else f"{n / 2**20:.1f}"


def format_table(task_result: dict) -> str:
  """One task's results as a fixed-width text table.

  Columns: optimizer, chosen learning rate (of the grid), steps run, final
  validation loss (and accuracy), steps and train-seconds to the target
  loss, optimizer-state bytes per parameter, median step time, compile time,
  the compiled step's memory (XLA's memory analysis: arguments + outputs +
  temporaries) and the device's peak memory where the back end reports it
  (``memory_stats()["peak_bytes_in_use"]``, not available on CPU; it is the
  process's running maximum, so it is per optimizer only for the first one
  or when each optimizer runs in its own process). Gauss-Newton "steps" are
  outer iterations.

  Args:
    task_result: one entry of :func:`compare.compare_task`.

  Returns:
    The table, lines joined by newlines (title and notes included).
  """
  target = task_result.get("target_loss")
  head = (f"{task_result['task']}: {task_result['description']}, "
          f"{task_result['num_params']:,} parameters; target loss "
          f"{_fmt(target)} {task_result.get('loss_unit', '')}")
  cols = ["optimizer", "lr", "steps", "val loss", "val acc", "steps→tgt",
          "s→tgt", "state B/p", "step ms", "compile s", "step MiB",
          "peak MiB"]
  rows = []
  notes = []
  for r in task_result["results"]:
    if r.get("status") != "ok":
      notes.append(f"  {r['label']}: not run ({r.get('status')}): "
                   f"{r.get('message')}")
      continue
    rows.append([
        r["label"] + (" *" if r.get("second_order") else ""),
        _fmt(r["best_lr"], ".0e") + ("!" if r.get("best_lr_at_grid_edge")
                                     else ""),
        str(r["steps_run"]),
        _fmt(r["final_val_loss"]),
        _fmt(r["final_val_acc"], ".3f"),
        _fmt(r.get("steps_to_target"), "d"),
        _fmt(r.get("time_to_target_s"), ".1f"),
        _fmt(r["state_bytes_per_param"], ".3f"),
        _fmt(1000 * r["step_time_s"], ".1f"),
        _fmt(r["compile_s"], ".1f"),
        _mib(r.get("step_memory_bytes")),
        _mib(r.get("device_peak_bytes")),
    ])
  widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c)
            for i, c in enumerate(cols)]
  line = lambda cells: "  ".join(
      c.ljust(w) if i == 0 else c.rjust(w)
      for i, (c, w) in enumerate(zip(cells, widths)))
  out = [head, line(cols), "  ".join("-" * w for w in widths)]
  out += [line(row) for row in rows]
  if any(r.get("second_order") and r.get("status") == "ok"
         for r in task_result["results"]):
    out.append("  * Gauss-Newton: one step = one outer iteration (inner "
               "solve + line search); its state excludes the inner "
               "optimizer's, re-made every outer step.")
  for r in task_result["results"]:
    sizes = [a for a in r.get("step_sizes") or () if a is not None]
    if r.get("status") == "ok" and sizes:
      zeros = sum(a == 0 for a in sizes)
      out.append(f"  {r['label']}: line-search step size median "
                 f"{statistics.median(sizes):g}, 0 (step rejected) in {zeros} "
                 f"of {len(sizes)} outer iterations.")
  if any(r.get("best_lr_at_grid_edge") for r in task_result["results"]):
    out.append("  ! the best learning rate is at an end of the grid "
               "(--lr-grid NAME=... to widen it).")
  out += notes
  return "\n".join(out)


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
    return _jsonable(x.item())
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)


def write_json(report: dict, path: str) -> str:
  """Writes ``report`` as indented JSON (non-finite floats become ``null``).

  Returns:
    ``path``.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(_jsonable(report), f, indent=1)
    f.write("\n")
  return path


def read_report(path: str) -> dict:
  """Reads a ``results.json`` written by ``microadam-optax compare``.

  Args:
    path: the file, or the folder holding ``results.json``.

  Returns:
    The report (``null`` losses read back as ``nan``).

  Raises:
    FileNotFoundError: when there is no such file.
    ValueError: when the file is not a comparison report.
  """
  if os.path.isdir(path):
    path = os.path.join(path, "results.json")
  with open(path, encoding="utf-8") as f:
    report = json.load(f)
  if not isinstance(report, dict) or not isinstance(report.get("tasks"), list):
    raise ValueError(
        f"{path} is not a report of `microadam-optax compare` (no 'tasks' "
        f"list).")
  for task in report["tasks"]:
    for r in task.get("results", ()):
      for key in ("val_loss", "val_acc"):
        if key in r:
          r[key] = [math.nan if v is None else v for v in r[key]]
      for key in ("final_val_loss", "final_val_acc", "best_val_loss"):
        if key in r and r[key] is None:
          r[key] = math.nan
  return report


def merge_reports(reports: Sequence[dict], names: Sequence[str]) -> dict:
  """Joins comparison reports of the same tasks run in separate processes.

  Optimizers of one task may run in different jobs (one GPU call each, say);
  this puts their results side by side, as if one run had made them. Tasks
  are matched by name and must agree on the model (description and number of
  parameters), so that the curves are comparable.

  Args:
    reports: the reports, as :func:`read_report` returns them.
    names: one label per report (its path), for error messages and the
      merged report's ``merged_from``.

  Returns:
    A report with one entry per task, its ``results`` concatenated in the
    order given (``target_loss`` is left to the caller to recompute).

  Raises:
    ValueError: when a task's model differs between reports, or an optimizer
      appears twice in one task.
  """
  if not reports:
    raise ValueError("merge_reports needs at least one report.")
  tasks: dict[str, dict] = {}
  task_origin: dict[str, str] = {}  # task -> the report that first had it
  origin: dict[tuple[str, str], str] = {}  # (task, optimizer) -> report
  for report, name in zip(reports, names):
    for task in report["tasks"]:
      key = task["task"]
      if key not in tasks:
        tasks[key] = dict(task, results=[])
        task_origin[key] = name
      merged = tasks[key]
      for field in ("description", "num_params"):
        if merged.get(field) != task.get(field):
          raise ValueError(
              f"Task {key!r} differs between reports: {field} is "
              f"{merged.get(field)!r} in {task_origin[key]} but "
              f"{task.get(field)!r} in {name}.")
      for r in task["results"]:
        if (key, r["name"]) in origin:
          raise ValueError(
              f"Optimizer {r['name']!r} of task {key!r} is in both "
              f"{origin[(key, r['name'])]} and {name}.")
        origin[(key, r["name"])] = name
        merged["results"].append(r)
  first = reports[0]
  return {**{k: v for k, v in first.items() if k != "tasks"},
          "command": None, "merged_from": list(names),
          "commands": [r.get("command") for r in reports],
          "tasks": list(tasks.values())}

"""Terminal tables and the JSON file of a comparison."""

from __future__ import annotations

import collections
import json
import math
import os
import statistics
from typing import Any, Optional, Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value); ``nan`` when a
  value is not finite (a diverged seed)."""
  if not values or not all(math.isfinite(v) for v in values):
    return math.nan, math.nan
  mean = statistics.fmean(values)
  return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_curve(curves: Sequence[Sequence[float]]) -> tuple[list, list]:
  """Point-wise mean and standard deviation of curves (``nan`` where a
  curve is missing or not finite)."""
  n = max(len(c) for c in curves)
  means, stds = [], []
  for i in range(n):
    mean, std = mean_std([c[i] if i < len(c) else math.nan for c in curves])
    means.append(mean)
    stds.append(std)
  return means, stds


def seed_summary(val_loss_per_seed: Sequence[Sequence[float]],
                 val_acc_per_seed: Sequence[Sequence[float]],
                 time_s_per_seed: Sequence[Sequence[float]]) -> dict:
  """The fields of a result that summarise its seeds, from their curves.

  One place for what a run over several seeds reports (``compare``'s
  ``run_optimizer``) and what joining runs of other seeds recomputes
  (:func:`join_seeds`): the per-seed curves and final values, their means
  and sample standard deviations, the mean curves and the best point of the
  mean validation curve.

  Args:
    val_loss_per_seed: each seed's validation-loss curve, in seed order.
    val_acc_per_seed: each seed's validation-accuracy curve.
    time_s_per_seed: each seed's training seconds at the evaluations.

  Returns:
    A ``dict`` of the result's fields (``final_val_loss_mean`` ...).
  """
  out = dict(val_loss_per_seed=[list(c) for c in val_loss_per_seed],
             val_acc_per_seed=[list(c) for c in val_acc_per_seed],
             time_s_per_seed=[list(c) for c in time_s_per_seed])
  for key, curves in (("final_val_loss", val_loss_per_seed),
                      ("final_val_acc", val_acc_per_seed)):
    finals = [c[-1] for c in curves]
    mean, std = mean_std(finals)
    out.update({key + "_per_seed": finals, key + "_mean": mean,
                key + "_std": std, key: mean})
  out["val_loss"], out["val_loss_std"] = mean_curve(val_loss_per_seed)
  out["val_acc"], out["val_acc_std"] = mean_curve(val_acc_per_seed)
  out["time_s"], _ = mean_curve(time_s_per_seed)
  finite = [v for v in out["val_loss"] if math.isfinite(v)]
  out["best_val_loss"] = min(finite) if finite else math.nan
  return out


def _fmt(x: Any, spec: str = ".4f", none: str = "-") -> str:
  if x is None:
    return none
  if isinstance(x, float) and not math.isfinite(x):
    return "nan" if math.isnan(x) else "inf"
  return format(x, spec)


def _mib(n: Optional[int]) -> str:
  return "n/a" if n is None else f"{n / 2**20:.1f}"


def _count(n: Optional[float]) -> str:
  """A count of tokens or examples in three digits: ``131k``, ``9.83M``.

  >>> _count(131072), _count(9_830_400), _count(640), _count(None)
  ('131k', '9.83M', '640', '-')
  """
  if n is None or (isinstance(n, float) and not math.isfinite(n)):
    return "-"
  for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(n) >= size:
      return f"{n / size:.3g}{suffix}"
  return f"{n:.0f}"


def _data_unit(results: Sequence[dict]) -> str:
  """What a task's results count (``tokens`` or ``examples``)."""
  return next((r["data_unit"] for r in results if r.get("data_unit")),
              "tokens")


def _mean_std(r: dict, key: str, spec: str) -> str:
  mean = r.get(f"{key}_mean", r.get(key))
  std = r.get(f"{key}_std")
  if std is None or mean is None or (isinstance(mean, float)
                                     and not math.isfinite(mean)):
    return _fmt(mean, spec)
  return f"{_fmt(mean, spec)} ± {_fmt(std, spec)}"


def did_not_learn(r: dict) -> bool:
  """Whether a result's mean final validation loss is not below its mean
  loss at step 0: at the rate its tuning chose, the run learnt nothing (a
  diverged run too: a non-finite final loss, ``nan`` in a fresh result,
  ``null`` once written to JSON), so its row is a failed tuning, not a
  measurement of the optimizer.

  >>> did_not_learn({"steps": [0, 50], "val_loss": [1.39, 2.07],
  ...                "final_val_loss_mean": 1.41})
  True
  >>> did_not_learn({"steps": [0, 50], "val_loss": [1.39, 1.1],
  ...                "final_val_loss_mean": 0.61})
  False
  """
  steps, curve = r.get("steps") or (), r.get("val_loss") or ()
  if not steps or steps[0] != 0 or not curve:
    return False
  start = curve[0]
  if start is None or not math.isfinite(start):
    return False
  final = r.get("final_val_loss_mean", r.get("final_val_loss"))
  return not (isinstance(final, (int, float)) and math.isfinite(final)
              and final < start)


def _versus(r: dict, reference: str) -> str:
  if r["name"] == reference:
    return "—"
  change = r.get("vs_reference")
  if change is None:
    return "-"
  text = f"{100 * change:+.1f} %"
  return f"tie ({text})" if r.get("tie_with_reference") else text


def _state(r: dict) -> str:
  text = _fmt(r["state_bytes_per_param"], ".3f")
  inner = r.get("transient_state_bytes_per_param")
  if inner is not None:
    text += f" (+{inner:.2f} inner)"
  return text


def legend(task_results: Sequence[dict]) -> str:
  """What the columns of :func:`format_table` mean (printed once under the
  tables)."""
  ok = [r for t in task_results for r in t["results"]
        if r.get("status") == "ok"]
  seeds = next((t.get("seeds") for t in task_results if t.get("seeds")),
               [0])
  extensions = max((r.get("max_grid_extensions") or 0 for r in ok), default=0)
  show_peak = any(r.get("device_peak_bytes") is not None for r in ok)
  lines = [
      "Columns:",
      f"  val loss / val acc: final validation values, mean ± sample std "
      f"over seeds {', '.join(map(str, seeds))} (each its own initial "
      f"parameters and batch order); every rate was tuned on seed "
      f"{seeds[0]} by runs as long as these, on the same schedule.",
      f"  lr / rates: the chosen learning rate and how many were tried; a "
      f"grid grows by half-decades while its best rate is at an end (at "
      f"most {extensions} times); ! = still at an end after that.",
      "  vs AdamW: change of the mean final loss; 'tie' when the means "
      "differ by at most 2 std over seeds (the larger of the two). (best): "
      "lowest mean; (= best): tied with it.",
      "  tokens / examples: the training data each run read (batch tokens "
      "for the language models, examples for the classifiers).",
      "  steps→tgt / tokens→tgt / s→tgt: the first evaluation at which the "
      "seed-mean validation loss reaches the target (AdamW's mean final "
      "loss unless --target-loss): its iteration (a first-order step, a "
      "Gauss-Newton outer iteration), the training tokens (examples) read "
      "before it and the training seconds before it (compilation and "
      "evaluation excluded); - = never. Tokens and seconds are the common "
      "scale across optimizers; iterations are not.",
      "  state B/p: optimizer-state bytes per parameter. step ms: median "
      "time of one step. step MiB: XLA's memory estimate of the compiled "
      "training chunk (arguments + outputs + temporaries of eval_every "
      "steps: parameters, state, batches, activations)"
      + ("; peak MiB: the device's peak since the process started."
         if show_peak else "; the device's peak is not reported on CPU."),
  ]
  if any(did_not_learn(r) for r in ok):
    lines.append(
        "  ✗: the mean final loss is not below the loss at step 0: at the "
        "rate its tuning chose, the optimizer learnt nothing (a failed "
        "tuning, not a measurement of the optimizer; try lower rates with "
        "--lr-grid NAME=LR,...).")
  if any(r.get("second_order") for r in ok):
    lines.append(
        "  * Gauss-Newton: steps are outer iterations, each linearizing the "
        "model once and running inner steps that each read a fresh "
        "training batch, then a line search on batches of its own (the "
        "paper's protocol; their tokens are listed under the table, not "
        "counted as training data); outer x inner steps read about as many "
        "training tokens as the first-order runs. Its state is what it "
        "keeps between outer steps (the inner optimizer's state and "
        "iterate)" + (
            ", '+X inner' the state of an inner optimizer re-made in every "
            "outer step (older runs)."
            if any(r.get("transient_state_bytes_per_param") for r in ok)
            else "."))
  notes = {r["label"]: r["note"] for r in ok if r.get("note")}
  if notes:
    lines.append("  hyper-parameters (the authors' recommendations; every "
                 "first-order optimizer clips the gradient to global norm "
                 "1.0): " + "; ".join(f"{k}: {v}" for k, v in notes.items())
                 + ".")
  return "\n".join(lines)


def format_table(task_result: dict) -> str:
  """One task's results as a fixed-width text table, with the notes that
  explain it.

  Columns: optimizer, chosen learning rate, rates tried, steps run, the
  training tokens (examples) they read, final validation loss (mean ± std
  over seeds) and its change against the reference (``tie`` within two
  standard deviations), accuracy, iterations, tokens (examples) and
  train-seconds to the target loss, optimizer-state bytes per parameter,
  median step time, compile time, the compiled step's memory (XLA's
  memory analysis) and, where the back end reports it, the device's peak
  memory. Gauss-Newton "steps" are outer iterations.

  Args:
    task_result: one entry of :func:`compare.compare_task`.

  Returns:
    The table, lines joined by newlines (title and the task's own notes
    included; :func:`legend` explains the columns).
  """
  target = task_result.get("target_loss")
  reference = task_result.get("reference", "adamw")
  ok = [r for r in task_result["results"] if r.get("status") == "ok"]
  seeds = task_result.get("seeds") or (ok[0].get("seeds") if ok else None)
  ref_label = next((r["label"] for r in ok if r["name"] == reference),
                   reference)
  head = (f"{task_result['task']}: {task_result['description']}, "
          f"{task_result['num_params']:,} parameters; "
          f"{len(seeds or [0])} seed(s); target loss {_fmt(target)} "
          f"{task_result.get('loss_unit', '')}")
  show_peak = any(r.get("device_peak_bytes") is not None for r in ok)
  unit = _data_unit(ok)
  cols = ["optimizer", "lr", "rates", "steps", unit, "val loss",
          f"vs {ref_label}", "val acc", "steps→tgt", f"{unit}→tgt", "s→tgt",
          "state B/p", "step ms", "compile s", "step MiB"] + (
              ["peak MiB"] if show_peak else [])
  rows = []
  notes = []
  for r in task_result["results"]:
    if r.get("status") != "ok":
      notes.append(f"  {r['label']}: not run ({r.get('status')}): "
                   f"{r.get('message')}")
      continue
    marks = (" *" if r.get("second_order") else "") + (
        " (best)" if r.get("is_best") else
        " (= best)" if r.get("tie_with_best") else "")
    row = [
        r["label"] + marks,
        _fmt(r["best_lr"], ".0e") + ("!" if r.get("best_lr_at_grid_edge")
                                     else ""),
        str(len(r.get("lr_grid") or ())),
        str(r["steps_run"]) + (" outer" if r.get("second_order") else ""),
        _count(r.get("tokens_run")),
        _mean_std(r, "final_val_loss", ".4f")
        + (" ✗" if did_not_learn(r) else ""),
        _versus(r, reference),
        _mean_std(r, "final_val_acc", ".3f"),
        _fmt(r.get("steps_to_target"), "d"),
        _count(r.get("tokens_to_target")),
        _fmt(r.get("time_to_target_s"), ".1f"),
        _state(r),
        _fmt(1000 * r["step_time_s"], ".1f"),
        _fmt(r["compile_s"], ".1f"),
        _mib(r.get("step_memory_bytes")),
    ]
    if show_peak:
      row.append(_mib(r.get("device_peak_bytes")))
    rows.append(row)
  widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c)
            for i, c in enumerate(cols)]
  line = lambda cells: "  ".join(
      c.ljust(w) if i == 0 else c.rjust(w)
      for i, (c, w) in enumerate(zip(cells, widths)))
  out = [head, line(cols), "  ".join("-" * w for w in widths)]
  out += [line(row) for row in rows]
  for r in ok:
    if r.get("second_order") and r.get("inner_steps"):
      n, m = r["inner_steps"], r.get("linesearch_batches")
      text = (f"  {r['label']}: {r['steps_run']} outer x {n} inner steps, "
              f"each inner step on a fresh batch ({_count(r['tokens_run'])} "
              f"{unit} of training)")
      if m:
        text += (f"; the line search read {m} batches of its own per outer "
                 f"step ({_count(r.get('linesearch_tokens_run'))} {unit} "
                 f"more, not counted above)")
      out.append(text + ".")
    sizes = [a for a in r.get("step_sizes") or () if a is not None]
    if sizes:
      counts = collections.Counter(round(a, 4) for a in sizes)
      chosen = ", ".join(f"{a:g} x{c}" for a, c in sorted(
          counts.items(), key=lambda kv: -kv[0]))
      out.append(f"  {r['label']}: line-search step sizes chosen: {chosen} "
                 f"(median {statistics.median(sizes):g}; {len(sizes)} outer "
                 f"iterations, seed {(seeds or [0])[0]}).")
  skipped = task_result.get("skipped_by_default")
  if skipped:
    out.append(f"  not run by default on this task and preset: "
               f"{', '.join(skipped)} (name it in --optimizers to run it).")
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


def batch_data(metadata: dict) -> tuple[int, str]:
  """How much data one training batch of a task holds, and in what, from
  its metadata: ``(batch tokens, "tokens")`` for the language-modelling
  tasks, ``(batch size, "examples")`` for the classification tasks (one
  label per image or window)."""
  if metadata.get("tokens_per_step"):
    return int(metadata["tokens_per_step"]), "tokens"
  return int(metadata["batch_size"]), "examples"


def _count_data(r: dict, metadata: dict) -> None:
  """Fills in the data a first-order result read (``tokens_seen`` ...) when
  it was written before results counted it: one batch of the task a step.

  Gauss-Newton results are left as they are (their inner steps per outer
  iteration were not recorded then)."""
  if r.get("status") != "ok" or "tokens_seen" in r or r.get("second_order"):
    return
  if not (metadata.get("tokens_per_step") or metadata.get("batch_size")):
    return
  per_step, unit = batch_data(metadata)
  r.update(data_unit=unit, tokens_per_batch=per_step,
           tokens_per_step=per_step,
           tokens_seen=[s * per_step for s in r["steps"]],
           tokens_run=r["steps_run"] * per_step)


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
      _count_data(r, task.get("metadata") or {})
      for key in ("val_loss", "val_acc", "val_loss_std", "val_acc_std",
                  "final_val_loss_per_seed", "final_val_acc_per_seed"):
        if key in r:
          r[key] = [math.nan if v is None else v for v in r[key]]
      if "val_loss_per_seed" in r:
        r["val_loss_per_seed"] = [[math.nan if v is None else v for v in c]
                                  for c in r["val_loss_per_seed"]]
      for key in ("final_val_loss", "final_val_acc", "best_val_loss",
                  "final_val_loss_mean", "final_val_loss_std",
                  "final_val_acc_mean", "final_val_acc_std"):
        if key in r and r[key] is None:
          r[key] = math.nan
  return report


#: Per-seed lists of a result, in the order of its ``seeds``.
_PER_SEED = ("final_val_loss_per_seed", "final_val_acc_per_seed",
             "val_loss_per_seed", "val_acc_per_seed", "time_s_per_seed")
#: What a seed join takes from the run that tuned the rate.
_TUNING = ("lr_grid", "initial_lr_grid", "grid_extensions",
           "max_grid_extensions", "sweep_steps", "sweep",
           "best_lr_at_grid_edge")


def join_seeds(a: dict, b: dict) -> dict:
  """One optimizer's result from two runs of it on other seeds, same rate.

  A long optimizer can be split over several jobs (for the device's limit on
  one command): tune it on the first seed (``--seeds 1``), then run the other
  seeds at the rate found (``--seed 1 --seeds 2 --no-tune --lr-grid
  NAME=LR``). The joined result is the one a single run over all the seeds
  would have written: per-seed lists in seed order, means and sample
  standard deviations recomputed from them, the tuning (grid, sweep, edge)
  of the run that tuned, the curves of the first seed's run.

  Args:
    a: a result entry (``run_optimizer``'s).
    b: another one of the same optimizer.

  Returns:
    The joined result (``a`` and ``b`` are not changed).

  Raises:
    ValueError: when the runs share a seed, differ in rate, length or
      evaluation steps, both tuned, or lack the per-seed lists (results
      written before they were recorded).
  """
  name = a.get("name")
  seeds_a, seeds_b = list(a.get("seeds") or ()), list(b.get("seeds") or ())
  if not seeds_a or not seeds_b or set(seeds_a) & set(seeds_b):
    raise ValueError(
        f"{name!r}: seed runs can be joined only when their seeds differ; "
        f"got {seeds_a} and {seeds_b}.")
  for field in ("status", "best_lr", "steps_run", "steps"):
    if a.get(field) != b.get(field):
      raise ValueError(
          f"{name!r}: seed runs must agree on {field}; got {a.get(field)!r} "
          f"and {b.get(field)!r} (run the other seeds with --no-tune "
          f"--lr-grid {name}=<the tuned rate>).")
  missing = [f for f in _PER_SEED for r in (a, b) if f not in r]
  if missing or a.get("status") != "ok":
    raise ValueError(
        f"{name!r}: cannot join seeds of results without "
        f"{sorted(set(missing)) or 'status ok'}; rerun with this version.")
  tuned = [r for r in (a, b) if r.get("sweep")]
  if len(tuned) > 1:
    raise ValueError(f"{name!r}: both runs tuned the rate; tune once.")
  order = sorted((s, r, i) for r in (a, b)
                 for i, s in enumerate(r["seeds"]))
  first = min((a, b), key=lambda r: min(r["seeds"]))
  out = dict(first)
  out["seeds"] = [s for s, _, _ in order]
  out.update(seed_summary(
      *([r[field][i] for _, r, i in order]
        for field in ("val_loss_per_seed", "val_acc_per_seed",
                      "time_s_per_seed"))))
  for field in _TUNING:
    if tuned and field in tuned[0]:
      out[field] = tuned[0][field]
  out["wall_s"] = sum(r.get("wall_s") or 0.0 for r in (a, b))
  return out


def merge_reports(reports: Sequence[dict], names: Sequence[str]) -> dict:
  """Joins comparison reports of the same tasks run in separate processes.

  Optimizers of one task may run in different jobs (one GPU call each, say);
  this puts their results side by side, as if one run had made them; runs of
  one optimizer on other seeds at the same rate are joined into one result
  (:func:`join_seeds`). Tasks are matched by name and must agree on the
  model (description and number of parameters), so that the curves are
  comparable.

  Args:
    reports: the reports, as :func:`read_report` returns them.
    names: one label per report (its path), for error messages and the
      merged report's ``merged_from``.

  Returns:
    A report with one entry per task, its ``results`` concatenated in the
    order given (``target_loss`` is left to the caller to recompute).

  Raises:
    ValueError: when a task's model differs between reports, or an optimizer
      appears twice in one task other than as runs of other seeds.
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
          at = [i for i, x in enumerate(merged["results"])
                if x["name"] == r["name"]][0]
          try:
            merged["results"][at] = join_seeds(merged["results"][at], r)
          except ValueError as e:
            raise ValueError(
                f"Optimizer {r['name']!r} of task {key!r} is in both "
                f"{origin[(key, r['name'])]} and {name}, and its runs are "
                f"not seeds of one run: {e}") from e
          continue
        origin[(key, r["name"])] = name
        merged["results"].append(r)
  first = reports[0]
  return {**{k: v for k, v in first.items() if k != "tasks"},
          "command": None, "merged_from": list(names),
          "commands": [r.get("command") for r in reports],
          "tasks": list(tasks.values())}

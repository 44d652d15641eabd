"""How far MicroAdam trails AdamW: density x window, windows, dense leaves.

The gap table of benchmarks/RESULTS.md ("MicroAdam's gap to AdamW"). Every
configuration runs through the comparison's own machinery
(:func:`microadam_compare.compare.run_optimizer`): the same tasks, seeds,
batches, warmup + cosine schedule, global-norm clipping at 1.0 and
full-length tuning of the learning rate (every rate of the grid as long as
the reported run, the grid extended by half-decades while its best rate is
at an end), the best rate rerun on the other seeds. Rows:

* ``adamw``, ``adam_mini``: the comparison's entries (authors' recipes).
* ``microadam_d{1,2,5}_w{10,20}``: the published MicroAdam (the authors'
  b2 0.999, wd 0) at density 1 / 2 / 5 % and window 10 / 20;
  ``microadam_d1_w10`` is the published default (and the comparison's
  ``microadam``).
* ``mixed_small``: :func:`microadam_optax.microadam_mixed`: MicroAdam
  (d 1 %, m 10) on the matrices, dense Adam (b2 0.95) on the leaves where
  compression saves nothing (fewer than 2 dimensions or 4096 entries:
  norms, biases, small heads).
* ``mixed_small_embed``: the same plus dense Adam on embeddings and output
  heads (by name).
* ``mixed_small_embed_mini``: the same leaves given to Adam-mini instead of
  Adam (one v per block: about half the dense state).
* ``mixed_small_embed_mini16``: the same with Adam-mini's first moment in
  bfloat16 (fits 1.2 B/param on the cpu preset, whose embeddings and head
  are 10 % of the parameters).
* ``microadam_d2_w5``, ``microadam_d3_w3``, ``microadam_d5_w2``,
  ``microadam_d10_w1``: shorter windows at the default's bytes (fewer rows
  of more entries; m = 1 is sign descent on the Top-K entries of the
  error-feedback accumulator).
* ``adam_mini_whole_value``: Adam-mini with one v per whole value matrix,
  its authors' advice for runs under 10-20 k steps (group
  ``adam_mini_short_run``, with ``adam_mini``).
* ``microadam_d16_w1``, ``microadam_d20_w1`` (group ``encoding_bound``): the
  density cheaper encodings (12-bit indices, fp8 values) would buy at the
  default's bytes, with today's encoding: an upper bound on their gain.
* ``mixed_<kind>_d<D>_w<M>``: a mixed variant with MicroAdam at D % and
  window M (the short windows above); group ``short_mixed``.
* ``microadam_d1_w10_wbc``: the published default with the bias correction
  spanning the window (``1 - b^min(t, m)``) instead of ``1 - b^t``. MicroAdam's
  direction is ``c1 M / (sqrt(c2 V) + eps)`` with scalar corrections, so this
  is its direction times ``(c1'/c1) / sqrt(c2'/c2)`` (exactly, with eps
  scaled by ``sqrt(c2'/c2)``, at most 7x at these lengths): a rescaling by a
  function of the step, i.e. a different learning-rate schedule, made with
  ``optax.scale_by_schedule`` and no change to MicroAdam.

The MicroAdam rows and the mixed rows start from MicroAdam's grid of the
comparison (per task; on finetune_cls from :data:`CLASSIFY_GRID`); AdamW and
Adam-mini from theirs.

  python experiments/microadam_gap.py                      # everything, cpu
  python experiments/microadam_gap.py --tasks lm,finetune --configs published
  python experiments/microadam_gap.py --preset gpu --tasks finetune \\
      --configs adamw,microadam_d1_w10,microadam_d10_w1 --out gpu_ft.json

Results are merged into ``--out`` cell by cell (task x config), after each
cell, so that a run can be split into several invocations or resumed;
``--merge a.json b.json --out c.json`` joins runs made apart (e.g. several
device calls); a ``microadam-optax compare`` results.json among them gives
its AdamW, Adam-mini and MicroAdam rows (:func:`from_comparison`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

import microadam_optax as mo
from microadam_compare import cli
from microadam_compare import compare
from microadam_compare import optimizers as opt_lib
from microadam_compare import tasks as task_lib

DEFAULT_OUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "benchmarks", "results", "microadam_gap_cpu.json")

#: Density (fraction) and window of the published-algorithm rows.
DENSITIES = (0.01, 0.02, 0.05)
WINDOWS = (10, 20)

#: Shorter windows at the same bytes as the default (density x window = 10
#: rows of 1 %): more entries per row, fewer rows.
SHORT_WINDOWS = ((0.02, 5), (0.03, 3), (0.05, 2), (0.1, 1))

#: One row of more than 10 %: the density that cheaper encodings would buy at
#: the default's bytes (12-bit block-relative indices packed in pairs and fp8
#: values take 2.5 bytes an entry against 4: 1.6x; the issue's "twice": 2x),
#: measured with today's encoding (1.18 and 1.35 B/param on the cpu GPT), so an upper bound on
#: what those encodings could give (fp8 would also round the values).
ENCODING_BOUND = ((0.16, 1), (0.2, 1))

#: The study's goal: state at most this many bytes per parameter, final loss
#: within 2 % of AdamW's when fine-tuning and within 5 % from scratch.
BUDGET_BYTES_PER_PARAM = 1.2
GOAL = {"lm": 0.05, "digits": 0.05, "finetune": 0.02, "finetune_cls": 0.02}


def _microadam(density: float, window: int) -> opt_lib.Builder:
  def build(lr, ctx):
    return mo.microadam(lr, b1=0.9, b2=0.999, eps=1e-8,
                        weight_decay=ctx.decay(0.0), mask=opt_lib.decay_mask,
                        window=window, density=density)
  return build


def _mixed(dense: str, embeddings: bool, mu_dtype: Any = None,
           density: float = 0.01, window: int = 10) -> opt_lib.Builder:
  def build(lr, ctx):
    return mo.microadam_mixed(
        lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=ctx.decay(0.0),
        mask=opt_lib.decay_mask, window=window, density=density, dense=dense,
        dense_b2=0.95, dense_mu_dtype=mu_dtype,
        dense_names=mo.EMBEDDING_NAMES if embeddings else None)
  return build


def window_bias_correction(b1: float, b2: float,
                           window: int) -> optax.GradientTransformation:
  """Rescales MicroAdam's direction from the ``1 - b^t`` bias correction to
  ``1 - b^min(t, window)`` (the span of the window)."""

  def factor(count):
    t = count.astype(jnp.float32) + 1.0
    s = jnp.minimum(t, float(window))
    c1 = (1.0 - b1**t) / (1.0 - b1**s)
    c2 = (1.0 - b2**t) / (1.0 - b2**s)
    return c1 / jnp.sqrt(c2)

  return optax.scale_by_schedule(factor)


def _microadam_wbc(lr, ctx):
  return optax.chain(
      mo.scale_by_microadam(b1=0.9, b2=0.999, eps=1e-8, window=10,
                            density=0.01),
      window_bias_correction(0.9, 0.999, 10),
      optax.add_decayed_weights(ctx.decay(0.0), opt_lib.decay_mask),
      optax.scale_by_learning_rate(lr))


#: MicroAdam's first grid on the classifier, centred on the rate that won
#: its tuning in the comparison (3e-3, reached from the registry's grid only
#: after two extensions, still at an end).
CLASSIFY_GRID = (1e-3, 3e-3, 1e-2)


def _configs() -> dict[str, opt_lib.OptimizerSpec]:
  reg = opt_lib.REGISTRY
  micro = reg["microadam"]
  micro = dataclasses.replace(micro, task_lr_grids={
      **micro.task_lr_grids, "finetune_cls": CLASSIFY_GRID})
  specs = {"adamw": reg["adamw"], "adam_mini": reg["adam_mini"]}
  pairs = ([(d, w) for w in WINDOWS for d in DENSITIES] + list(SHORT_WINDOWS)
           + list(ENCODING_BOUND))
  for density, window in pairs:
    name = f"microadam_d{round(100 * density)}_w{window}"
    specs[name] = dataclasses.replace(
        micro, name=name, label=f"MicroAdam {100 * density:g} % m{window}",
        build=_microadam(density, window),
        note=f"b2 0.999, m {window}, density {100 * density:g} %, wd 0")
  for (density, window) in ((0.01, 10),) + SHORT_WINDOWS:
    default = (density, window) == (0.01, 10)
    suffix = "" if default else f"_d{round(100 * density)}_w{window}"
    prefix = "MicroAdam" if default else (
        f"MicroAdam {100 * density:g} % m{window}")
    for kind, label, dense, embeddings, mu_dtype in MIXED_KINDS:
      name = f"mixed_{kind}{suffix}"
      specs[name] = dataclasses.replace(
          micro, name=name, label=f"{prefix} + {label}",
          build=_mixed(dense, embeddings, mu_dtype, density, window),
          requires="mo.microadam_mixed",
          note=(f"MicroAdam (b2 0.999, m {window}, {100 * density:g} %) on "
                f"matrices; {dense} "
                f"(b2 0.95{', bf16 m' if mu_dtype else ''}) on leaves < 2-D "
                f"or < 4096 entries"
                + (", embeddings and heads" if embeddings else "")))
  specs["adam_mini_whole_value"] = dataclasses.replace(
      reg["adam_mini"], name="adam_mini_whole_value",
      label="Adam-mini, one v per value matrix", build=functools.partial(reg["adam_mini"].build, whole_value=True),
      note="b2 0.95, wd 0.1, one v per head (q, k), per value matrix (v)")
  specs["microadam_d1_w10_wbc"] = dataclasses.replace(
      micro, name="microadam_d1_w10_wbc", label="MicroAdam 1 % m10, window BC",
      build=_microadam_wbc,
      note="b2 0.999, m 10, 1 %, wd 0, bias correction over the window")
  return specs


#: The mixed variants: (name, label, dense optimizer, embeddings and heads
#: dense too, dense first-moment dtype).
MIXED_KINDS = (
    ("small", "Adam small", "adam", False, None),
    ("small_embed", "Adam small+emb", "adam", True, None),
    ("small_embed_mini", "Adam-mini small+emb", "adam_mini", True, None),
    ("small_embed_mini16", "Adam-mini(bf16 m) small+emb", "adam_mini", True,
     jnp.bfloat16),
)

CONFIGS = _configs()
GROUPS = {
    "published": ["adamw", "adam_mini"] + [
        f"microadam_d{round(100 * d)}_w{w}" for w in WINDOWS
        for d in DENSITIES],
    "short_windows": [f"microadam_d{round(100 * d)}_w{w}"
                      for d, w in SHORT_WINDOWS],
    "adam_mini_short_run": ["adam_mini", "adam_mini_whole_value"],
    "encoding_bound": [f"microadam_d{round(100 * d)}_w{w}"
                       for d, w in ENCODING_BOUND],
    "variants": [f"mixed_{kind[0]}" for kind in MIXED_KINDS]
                + ["microadam_d1_w10_wbc"],
    "short_mixed": [f"mixed_{kind}_d{round(100 * d)}_w{w}"
                    for d, w in SHORT_WINDOWS
                    for kind in ("small", "small_embed_mini16")],
}
GROUPS["all"] = (GROUPS["published"] + GROUPS["variants"]
                 + GROUPS["short_windows"] + GROUPS["short_mixed"])
ALL_TASKS = ("lm", "finetune", "finetune_cls", "digits")

#: The fields of :func:`compare.run_optimizer`'s result kept in the JSON.
KEEP = ("name", "label", "note", "status", "message", "seeds", "lr_grid",
        "initial_lr_grid", "grid_extensions", "best_lr",
        "best_lr_at_grid_edge", "sweep", "steps_run", "eval_every", "steps",
        "val_loss", "val_loss_std", "final_val_loss_per_seed",
        "final_val_loss_mean", "final_val_loss_std",
        "final_val_acc_per_seed", "final_val_acc_mean", "final_val_acc_std",
        "state_bytes", "state_bytes_per_param", "step_time_s",
        "compile_s", "wall_s")


def _names(text: str) -> list[str]:
  names: list[str] = []
  for item in (s.strip() for s in text.split(",")):
    if not item:
      continue
    for n in GROUPS.get(item, [item]):
      if n not in CONFIGS:
        raise SystemExit(
            f"microadam_gap: unknown config {n!r}; known: "
            f"{', '.join(list(GROUPS) + list(CONFIGS))}.")
      if n not in names:
        names.append(n)
  return names


def _jsonable(x: Any) -> Any:
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


#: The comparison's optimizers that are rows of this table (by its name).
FROM_COMPARISON = {"adamw": "adamw", "adam_mini": "adam_mini",
                   "microadam": "microadam_d1_w10"}


def _load(path: str) -> dict:
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      report = json.load(f)
    if isinstance(report.get("tasks"), list):
      return from_comparison(report)
    return report
  return {"cells": {}}


def from_comparison(results: dict) -> dict:
  """A ``microadam-optax compare`` results.json as this table's cells.

  The comparison's AdamW, Adam-mini and MicroAdam are this table's
  ``adamw``, ``adam_mini`` and ``microadam_d1_w10``: the same
  :func:`compare.run_optimizer` on the same tasks, seeds and tuning, so a
  device run of the comparison need not be repeated here to give the
  table its reference (``--merge results.json``).

  Args:
    results: the comparison's report (``"tasks"``: a list of task results).

  Returns:
    This harness's report: ``cells`` (task -> config -> kept fields),
    ``tasks``, ``commands``, ``preset`` and ``environment``.
  """
  report: dict[str, Any] = {"cells": {}, "tasks": {}}
  for task in results["tasks"]:
    name = task["task"]
    for r in task["results"]:
      config = FROM_COMPARISON.get(r["name"])
      if config is None or r.get("status") != "ok":
        continue
      kept = {k: r[k] for k in KEEP if k in r}
      kept.update(name=config, label=CONFIGS[config].label)
      report["cells"].setdefault(name, {})[config] = kept
    if name in report["cells"]:
      first = task["results"][0]
      report["tasks"][name] = {
          "num_params": task["num_params"],
          "description": task["description"],
          "steps": first.get("steps_run"),
          "eval_every": first.get("eval_every"),
          "seeds": task.get("seeds") or first.get("seeds")}
  report["commands"] = [{"argv": results.get("command"),
                         "from_comparison": True}]
  for key in ("preset", "environment"):
    report[key] = results.get(key)
  return report


def _save(report: dict, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(_jsonable(report), f, indent=1)
  os.replace(tmp, path)


def _stat(r: dict, key: str = "final_val_loss") -> tuple[float, float]:
  mean, std = r.get(f"{key}_mean"), r.get(f"{key}_std")
  return (math.nan if mean is None else mean,
          math.nan if std is None else std)


def format_tables(report: dict, tasks: Sequence[str],
                  names: Sequence[str]) -> str:
  """One markdown table per task: rate, loss mean ± std, gap to AdamW
  (``tie`` within 2 std), distance to the issue's goal, state B/param."""
  out = []
  for task in tasks:
    cells = report["cells"].get(task, {})
    if not cells:
      continue
    ref = cells.get("adamw")
    meta = report.get("tasks", {}).get(task, {})
    goal = GOAL[task]
    out.append(
        f"| {task} ({meta.get('num_params', 0):,} params, "
        f"{meta.get('steps', '?')} steps) | lr (rates tried) | "
        f"val loss, mean ± std | vs AdamW | within goal ({100 * goal:g} %, "
        f"<= {BUDGET_BYTES_PER_PARAM} B/p)? | state B/p | wall s |")
    out.append("| --- | --- | ---: | ---: | --- | ---: | ---: |")
    for name in [n for n in names if n in cells] + [
        n for n in cells if n not in names]:
      r = cells[name]
      if r.get("status") != "ok":
        out.append(f"| {r.get('label', name)} | {r.get('status')}: "
                   f"{r.get('message', '')} | | | | | |")
        continue
      mean, std = _stat(r)
      rates = ", ".join(f"{x:g}" for x in r["lr_grid"])
      edge = " !" if r.get("best_lr_at_grid_edge") else ""
      vs, verdict = "—", ""
      if ref is not None and ref.get("status") == "ok" and name != "adamw":
        rmean, rstd = _stat(ref)
        gap = mean / rmean - 1
        tie = abs(mean - rmean) <= 2 * max(std, rstd)
        vs = f"{100 * gap:+.1f} %" + (" (tie)" if tie else "")
        bpp = r["state_bytes_per_param"]
        ok_loss = gap <= goal
        ok_mem = bpp <= BUDGET_BYTES_PER_PARAM + 1e-9
        verdict = ("yes" if ok_loss and ok_mem else
                   "no: " + ", ".join(
                       ([f"{100 * (gap - goal):.1f} points over"]
                        if not ok_loss else [])
                       + ([f"{bpp:.2f} B/p"] if not ok_mem else [])))
      out.append(
          f"| {r['label']} | {r['best_lr']:.0e}{edge} ({rates}) | "
          f"{mean:.4f} ± {std:.4f} | {vs} | {verdict} | "
          f"{r['state_bytes_per_param']:.3f} | {r.get('wall_s', 0):.0f} |")
    out.append("")
  return "\n".join(out)


def format_summary(report: dict, tasks: Sequence[str],
                   names: Sequence[str]) -> str:
  """One markdown table: per config, the state on the first task and the
  gap to AdamW on every task (``=``: a tie within 2 std; bold: the issue's
  goal met, loss and budget)."""
  tasks = [t for t in tasks if report["cells"].get(t)]
  head = f"| config | state B/p ({tasks[0]}) | " + " | ".join(
      f"{t} (goal {100 * GOAL[t]:g} %)" for t in tasks) + " |"
  out = [head, "| --- | ---: | " + " | ".join("---:" for _ in tasks) + " |"]
  for name in names:
    cells = [report["cells"][t].get(name) for t in tasks]
    if name == "adamw" or not any(c and c.get("status") == "ok"
                                  for c in cells):
      continue
    first = next(c for c in cells if c and c.get("status") == "ok")
    row = [first["label"], f"{first['state_bytes_per_param']:.3f}"]
    for t, r in zip(tasks, cells):
      ref = report["cells"][t].get("adamw")
      if not r or r.get("status") != "ok" or not ref:
        row.append("-")
        continue
      mean, std = _stat(r)
      rmean, rstd = _stat(ref)
      gap = mean / rmean - 1
      text = f"{100 * gap:+.1f} %"
      if abs(mean - rmean) <= 2 * max(std, rstd):
        text += " ="
      if (gap <= GOAL[t]
          and r["state_bytes_per_param"] <= BUDGET_BYTES_PER_PARAM + 1e-9):
        text = f"**{text}**"
      row.append(text)
    out.append("| " + " | ".join(row) + " |")
  return "\n".join(out) + "\n"


def _make_task(name: str, preset: str, seed: int, cache_dir: Optional[str],
               log) -> Any:
  kwargs: dict[str, Any] = dict(seed=seed)
  if name.startswith("finetune"):
    kwargs.update(cache_dir=cache_dir, log=log)
  return task_lib.TASKS[name](preset, **kwargs)


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", choices=("cpu", "gpu", "tiny"), default="cpu")
  p.add_argument("--tasks", default=",".join(ALL_TASKS),
                 help=f"comma-separated, of {', '.join(ALL_TASKS)}")
  p.add_argument("--configs", default="all",
                 help="comma-separated config names or groups ("
                      + ", ".join(GROUPS) + "); known configs: "
                      + ", ".join(CONFIGS))
  p.add_argument("--seeds", type=int, default=None,
                 help="seeds of the final runs (default: the comparison's, "
                      "2 on cpu, 3 on gpu)")
  p.add_argument("--steps", type=int, default=None,
                 help="override the preset's steps (smoke runs)")
  p.add_argument("--no-tune", action="store_true",
                 help="middle rate of each grid, no tuning (smoke runs)")
  p.add_argument("--cache-dir", default=None)
  p.add_argument("--out", default=None,
                 help=f"JSON file (default: {DEFAULT_OUT} for the cpu "
                      "preset, microadam_gap_<preset>.json beside it)")
  p.add_argument("--table-only", action="store_true",
                 help="print the table of --out and exit")
  p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                 help="merge these result files (e.g. separate device "
                      "runs) into --out cell by cell, print the table, exit")
  args = p.parse_args(argv)

  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  for t in tasks:
    if t not in ALL_TASKS:
      raise SystemExit(f"microadam_gap: unknown task {t!r}; known: "
                       f"{', '.join(ALL_TASKS)}.")
  names = _names(args.configs)
  out = args.out or DEFAULT_OUT.replace("_cpu.json", f"_{args.preset}.json")
  report = _load(out)
  if args.merge:
    for path in args.merge:
      other = _load(path)
      for task, cells in other.get("cells", {}).items():
        report.setdefault("cells", {}).setdefault(task, {}).update(cells)
      report.setdefault("tasks", {}).update(other.get("tasks", {}))
      report.setdefault("commands", []).extend(other.get("commands", []))
      for key in ("preset", "environment"):
        report.setdefault(key, other.get(key))
    _save(report, out)
  if args.table_only or args.merge:
    print(format_summary(report, tasks, names))
    print(format_tables(report, tasks, names))
    return 0

  num_seeds = args.seeds or cli.DEFAULT_SEEDS[args.preset]
  seeds = tuple(range(num_seeds))
  log = lambda s: print(s, flush=True)
  report.setdefault("cells", {})
  report.setdefault("tasks", {})
  report.update(
      preset=args.preset,
      environment={
          "python": platform.python_version(), "jax": jax.__version__,
          "optax": optax.__version__, "backend": jax.default_backend(),
          "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
          "platform": platform.platform()})
  report.setdefault("commands", []).append(
      {"argv": ["python", "experiments/microadam_gap.py",
                *(sys.argv[1:] if argv is None else argv)],
       "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
           timespec="seconds")})
  for task_name in tasks:
    sched = dict(cli.SCHEDULES[(task_name, args.preset)])
    sched.pop("skip", None)
    if args.steps:
      sched.update(steps=args.steps, eval_every=min(args.steps,
                                                    sched["eval_every"]))
    config = compare.RunConfig(**sched, seeds=seeds, tune=not args.no_tune,
                               progress=False)
    task = _make_task(task_name, args.preset, seeds[0], args.cache_dir, log)
    seed_tasks = [task.with_seed(seed=s) for s in seeds[1:]]
    evaluate = compare.make_eval(task)
    report["tasks"][task_name] = {
        "num_params": task.num_params, "description": task.description,
        "steps": config.steps, "eval_every": config.eval_every,
        "seeds": list(seeds)}
    log(f"== {task_name}: {task.description}; {task.num_params:,} params")
    for name in names:
      spec = CONFIGS[name]
      t0 = time.perf_counter()
      result = compare.run_optimizer(task, spec, config, evaluate, seed_tasks,
                                     log=log)
      result["wall_s"] = time.perf_counter() - t0
      kept = {k: result[k] for k in KEEP if k in result}
      report["cells"].setdefault(task_name, {})[name] = kept
      _save(report, out)
      if result["status"] == "ok":
        log(f"[{task_name}] {spec.label:<32} lr={result['best_lr']:.0e} "
            f"loss {result['final_val_loss_mean']:.4f} ± "
            f"{result['final_val_loss_std']:.4f}  "
            f"{result['state_bytes_per_param']:.3f} B/p  "
            f"({result['wall_s']:.0f} s)")
      else:
        log(f"[{task_name}] {spec.label}: {result['status']}: "
            f"{result.get('message')}")
  print()
  print(format_summary(report, tasks, names))
  print(format_tables(report, tasks, names))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

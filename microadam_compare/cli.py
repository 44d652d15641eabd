"""The ``microadam-optax`` command line.

  microadam-optax compare                 # every task, CPU-sized, 2 seeds
  microadam-optax compare --quick         # smoke run (runs/compare-quick)
  microadam-optax compare --task lm --preset gpu --out runs/gpu
  microadam-optax compare --optimizers adamw,microadam --steps 300 --seeds 3
  microadam-optax list                    # the optimizers and whether they run
  microadam-optax report runs/a runs/b --out runs/ab   # join separate runs
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np
import optax

import microadam_optax as mo
from microadam_compare import optimizers as opt_lib
from microadam_compare import report

#: Per (task, preset): first-order steps and steps between evaluations, then
#: Gauss-Newton's outer iterations, outer iterations between evaluations and
#: inner steps per outer iteration (each on a fresh batch), chosen so that
#: ``gn_steps * gn_inner_steps`` training batches match the first-order
#: ``steps`` (the line search reads as many batches again, counted apart,
#: as in the paper). Tuning runs are as long as the reported runs. ``skip``:
#: optimizers left out of ``--optimizers all`` there (named explicitly, they
#: run). ``tiny`` is what ``--quick`` uses.
SCHEDULES: dict[tuple[str, str], dict] = {
    ("lm", "tiny"): dict(steps=4, eval_every=2, gn_steps=2, gn_eval_every=1,
                         gn_inner_steps=2),
    ("digits", "tiny"): dict(steps=4, eval_every=2, gn_steps=2,
                             gn_eval_every=1, gn_inner_steps=2),
    ("finetune", "tiny"): dict(steps=4, eval_every=2, gn_steps=2,
                               gn_eval_every=1, gn_inner_steps=2),
    ("finetune_cls", "tiny"): dict(steps=4, eval_every=2, gn_steps=2,
                                   gn_eval_every=1, gn_inner_steps=2),
    ("lm", "cpu"): dict(steps=128, eval_every=16, gn_steps=8,
                        gn_eval_every=2, gn_inner_steps=16,
                        skip=("gn_layerwise",)),
    ("digits", "cpu"): dict(steps=200, eval_every=25, gn_steps=10,
                            gn_eval_every=2, gn_inner_steps=20),
    ("finetune", "cpu"): dict(steps=60, eval_every=20, gn_steps=4,
                              gn_eval_every=2, gn_inner_steps=15,
                              skip=("gn_layerwise",)),
    ("finetune_cls", "cpu"): dict(steps=60, eval_every=20, gn_steps=4,
                                  gn_eval_every=2, gn_inner_steps=15,
                                  skip=("gn_layerwise",)),
    ("lm", "gpu"): dict(steps=600, eval_every=50, gn_steps=20,
                        gn_eval_every=2, gn_inner_steps=30,
                        skip=("gn_layerwise",)),
    ("digits", "gpu"): dict(steps=1000, eval_every=50, gn_steps=50,
                            gn_eval_every=5, gn_inner_steps=20),
    ("finetune", "gpu"): dict(steps=300, eval_every=50, gn_steps=10,
                              gn_eval_every=2, gn_inner_steps=30,
                              skip=("gn_layerwise",)),
    ("finetune_cls", "gpu"): dict(steps=300, eval_every=50, gn_steps=10,
                                  gn_eval_every=2, gn_inner_steps=30,
                                  skip=("gn_layerwise",)),
}

#: What ``--task`` names run.
TASK_GROUPS = {"lm": ["lm"], "digits": ["digits"],
               "finetune": ["finetune", "finetune_cls"],
               "finetune_cls": ["finetune_cls"],
               "all": ["lm", "digits", "finetune", "finetune_cls"]}

#: Seeds of the final runs per preset (``--seeds``).
DEFAULT_SEEDS = {"tiny": 2, "cpu": 2, "gpu": 3}

DEFAULT_OUT = os.path.join("runs", "compare")
QUICK_OUT = os.path.join("runs", "compare-quick")

#: ``--quick`` compiles the training steps with XLA's cheapest backend
#: optimization: a smoke run's time is mostly compilation.
QUICK_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}

VERSION = (f"microadam-optax {mo.__version__} (jax {jax.__version__}, "
           f"optax {optax.__version__})")


def _parse_grid(items: Optional[Sequence[str]]) -> dict[str, list[float]]:
  """``["adamw=1e-3,3e-3", ...]`` -> ``{"adamw": [1e-3, 3e-3], ...}``."""
  grids = {}
  for item in items or ():
    name, sep, values = item.partition("=")
    try:
      grid = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
      grid = []
    if not sep or not grid:
      raise ValueError(f"--lr-grid expects NAME=LR[,LR...], got {item!r}.")
    grids[name.strip()] = grid
  return grids


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of ``microadam-optax`` (``compare`` and ``list``)."""
  parser = argparse.ArgumentParser(
      prog="microadam-optax",
      description="Training comparisons of memory-efficient and second-order "
                  "optimizers (MicroAdam, Adam-mini, Gauss-Newton, ...) on "
                  "real data.")
  parser.add_argument("--version", action="version", version=VERSION)
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.add_parser("list", help="list the optimizers and whether they can run",
                 description="List the registered optimizers, their "
                             "learning-rate grids and whether their code is "
                             "installed.")
  p = sub.add_parser(
      "compare", help="train every optimizer on real data and compare them",
      description=(
          "Train a byte-level GPT on the Python standard library's own "
          "sources (task lm), a CNN on scikit-learn's 8x8 digits (task "
          "digits), and fine-tune a GPT pre-trained with AdamW on held-out "
          "packages (task finetune: language modelling, and which package "
          "a window comes from) with each optimizer. Each optimizer's rate "
          "is tuned by runs as long as the reported one (the grid grows "
          "while its best rate is at an end), gradients clipped to norm "
          "1, each optimizer at its authors' hyper-parameters; the best "
          "rate is rerun on --seeds seeds. Same initial parameters and "
          "batches for all. Prints a table (mean ± std over seeds) and "
          "writes results.json, table.txt and PNG plots to --out. "
          "Gauss-Newton runs the paper's protocol: each outer iteration's "
          "inner steps read fresh batches, its line search batches of its "
          "own; outer x inner steps match the first-order steps in data, "
          "and the tables count iterations, tokens and seconds to the "
          "target. How long the defaults (every task, preset cpu, 2 "
          "seeds) take: benchmarks/RESULTS.md."),
      epilog="Optimizers: " + ", ".join(opt_lib.REGISTRY) + ".")
  p.add_argument("--task", choices=tuple(TASK_GROUPS), default="all",
                 help="which task(s) to run: lm (GPT from scratch), digits "
                      "(CNN), finetune (a pre-trained GPT fine-tuned on "
                      "held-out packages, and classifying which package a "
                      "window comes from), or all (default)")
  p.add_argument("--preset", choices=("cpu", "gpu", "tiny"), default="cpu",
                 help="model size (and default step counts): cpu ~1 M-param "
                      "GPT, gpu ~86 M-param GPT, tiny for smoke runs "
                      "(default: cpu)")
  p.add_argument("--optimizers", default="all",
                 help="comma-separated optimizer names, or 'all' (default; "
                      "lm and the fine-tuning tasks leave out gn_layerwise, "
                      "4-10x GN full's time, unless it is named)")
  p.add_argument("--steps", type=int, default=None,
                 help="first-order training steps of every run, tuning runs "
                      "included (default: per task and preset; cpu: lm 128, "
                      "digits 200, fine-tuning 60)")
  p.add_argument("--eval-every", type=int, default=None,
                 help="steps between evaluations (= steps per jitted call; "
                      "default: per task and preset)")
  p.add_argument("--gn-steps", type=int, default=None,
                 help="Gauss-Newton outer iterations of every run (default: "
                      "per task and preset, outer x inner steps matching "
                      "the first-order steps; cpu: lm 8, digits 10, "
                      "fine-tuning 4)")
  p.add_argument("--gn-eval-every", type=int, default=None,
                 help="Gauss-Newton outer iterations between evaluations")
  p.add_argument("--gn-inner-steps", type=int, default=None,
                 help="inner optimizer steps per Gauss-Newton outer "
                      "iteration, each on a fresh training batch (default: "
                      "per task and preset; cpu: lm 16, digits 20, "
                      "fine-tuning 15)")
  p.add_argument("--gn-linesearch-batches", type=int, default=None,
                 help="batches of its own the Gauss-Newton line search "
                      "averages the loss over, per outer iteration "
                      "(default: as many as inner steps, the paper's)")
  p.add_argument("--seeds", type=int, default=None,
                 help="seeds of the final runs (initial parameters and batch "
                      "order); tables give mean ± std (default: 2 on the cpu "
                      "preset, 3 on gpu)")
  p.add_argument("--seed", type=int, default=0,
                 help="the first seed (tunes the rate; default: 0)")
  p.add_argument("--lr-grid", action="append", metavar="NAME=LR,LR,...",
                 help="replace an optimizer's first learning-rate grid "
                      "(repeatable)")
  p.add_argument("--max-grid-extensions", type=int,
                 default=opt_lib.MAX_GRID_EXTENSIONS,
                 help="half-decades the tuning may add to a grid whose best "
                      "rate is at an end (default: "
                      f"{opt_lib.MAX_GRID_EXTENSIONS})")
  p.add_argument("--no-tune", action="store_true",
                 help="no tuning: the middle rate of each grid")
  p.add_argument("--batch-size", type=int, default=None,
                 help="batch size (default: per task and preset)")
  p.add_argument("--weight-decay", type=float, default=None,
                 help="decoupled weight decay of every optimizer, on "
                      "matrices only (default: each optimizer's authors' "
                      "value, see `microadam-optax list`)")
  p.add_argument("--clip-norm", type=float, default=1.0,
                 help="global-norm gradient clipping of every first-order "
                      "optimizer; 0: none (default: 1.0)")
  p.add_argument("--target-loss", type=float, default=None,
                 help="validation loss for 'steps to target' (default: "
                      "AdamW's final validation loss, mean over seeds)")
  p.add_argument("--cache-dir", default=None,
                 help="where the fine-tuning tasks' pre-trained GPT is "
                      "cached (default: $MICROADAM_COMPARE_CACHE or "
                      "~/.cache/microadam_compare)")
  p.add_argument("--out", default=None,
                 help="output folder for results.json, table.txt and PNGs "
                      f"(default: {DEFAULT_OUT}; with --quick {QUICK_OUT})")
  p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
  p.add_argument("--no-progress", action="store_true",
                 help="no progress bars")
  p.add_argument("--quick", action="store_true",
                 help="smoke run (about a minute, mostly compilation): tiny "
                      "models, a few files of the corpus, a handful of "
                      "steps, cheapest XLA optimization (overrides "
                      f"--preset; writes to {QUICK_OUT})")
  r = sub.add_parser(
      "report", help="join the results of separate compare runs",
      description=(
          "Join the results.json of several `compare` runs of the same "
          "task(s) -- e.g. optimizers run in separate jobs -- into one "
          "table, results.json and set of plots, as if one run had made "
          "them. Runs of one optimizer on other seeds at the same rate are "
          "joined into one result (tune with --seeds 1, then run the other "
          "seeds with --seed 1 --seeds N --no-tune --lr-grid NAME=LR). "
          "'Steps to target' is recomputed over the joined results."))
  r.add_argument("inputs", nargs="+", metavar="RUN",
                 help="a results.json, or a folder holding one")
  r.add_argument("--out", required=True,
                 help="output folder for the joined results.json, table.txt "
                      "and PNGs")
  r.add_argument("--target-loss", type=float, default=None,
                 help="validation loss for 'steps to target' (default: "
                      "AdamW's final validation loss)")
  r.add_argument("--no-plots", action="store_true", help="skip the PNGs")
  return parser


def _environment() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return {
      "python": platform.python_version(), "platform": platform.platform(),
      "microadam_optax": mo.__version__,
      "jax": jax.__version__, "optax": optax.__version__,
      "flax": flax.__version__, "numpy": np.__version__,
      "backend": jax.default_backend(), "device": str(dev),
      "device_kind": getattr(dev, "device_kind", None),
      "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
  }


def _select_optimizers(text: str, skip: Sequence[str] = ()) -> list[str]:
  if text.strip() == "all":
    return [n for n in opt_lib.REGISTRY if n not in skip]
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in opt_lib.REGISTRY]
  if unknown:
    raise SystemExit(
        f"microadam-optax: unknown optimizer(s) {', '.join(unknown)}; known: "
        f"{', '.join(opt_lib.REGISTRY)}.")
  return names


def run_list() -> int:
  """Prints the registry with each optimizer's availability."""
  for spec in opt_lib.REGISTRY.values():
    reason = opt_lib.unavailable_reason(spec)
    grid = ", ".join(f"{x:g}" for x in spec.lr_grid)
    for task, values in spec.task_lr_grids.items():
      grid += f"; {task}: " + ", ".join(f"{x:g}" for x in values)
    state = "ok" if reason is None else f"UNAVAILABLE: {reason}"
    print(f"{spec.name:<13} {spec.label:<15} {state:<3}  {spec.note}"
          f"{'' if spec.second_order else ', clip 1.0'}\n"
          f"{'':<13} first grid [{grid}]")
  return 0


def _write_outputs(tables: Sequence[str], results: dict, out_dir: str,
                   plot_files: Sequence[str], took: str = "") -> list[str]:
  """Prints the tables and writes ``table.txt`` and ``results.json`` to
  ``out_dir``; returns every file of the run, each once (``plot_files``
  last: tasks that share a figure, the pre-training curve, list it twice)."""
  text = "\n\n".join(tables)
  print("\n" + text)
  table_path = os.path.join(out_dir, "table.txt")
  with open(table_path, "w", encoding="utf-8") as f:
    f.write(text + "\n")
  json_path = report.write_json(results, os.path.join(out_dir, "results.json"))
  files = list(dict.fromkeys([json_path, table_path, *plot_files]))
  print(f"\nwrote {len(files)} files to {out_dir}/{took}: "
        + ", ".join(os.path.basename(f) for f in files))
  return files


#: What ``compare`` and ``report`` need beyond the library: the ``examples``
#: extra (module names, as imported).
EXTRA_MODULES = ("flax", "sklearn", "matplotlib", "orbax.checkpoint")
INSTALL_HINT = ("pip install 'microadam-optax[examples]' (or, in a clone, "
                "pip install '.[examples]')")


def missing_extra(modules: Sequence[str] = EXTRA_MODULES) -> list[str]:
  """The modules of the ``examples`` extra that cannot be imported here."""
  missing = []
  for name in modules:
    try:
      found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
      found = False
    if not found:
      missing.append(name.split(".")[0])
  return missing


def _require_extra(command: str,
                   modules: Sequence[str] = EXTRA_MODULES) -> bool:
  """Prints one line and returns False when the extra is not installed."""
  missing = missing_extra(modules)
  if missing:
    print(f"microadam-optax {command} needs the examples extra "
          f"({', '.join(missing)} not installed): {INSTALL_HINT}",
          file=sys.stderr)
    return False
  return True


def run_compare(args: argparse.Namespace) -> int:
  """Runs ``compare`` with parsed arguments; returns the exit status."""
  # Orbax only saves the fine-tuning tasks' pre-trained GPT.
  needs = [m for m in EXTRA_MODULES if m != "orbax.checkpoint"
           or any(t.startswith("finetune") for t in TASK_GROUPS[args.task])]
  if not _require_extra("compare", needs):
    return 2
  # Imported here, so that `--help` and `list` need neither Flax nor
  # matplotlib.
  # pylint: disable=g-import-not-at-top
  from microadam_compare import compare
  from microadam_compare import plots
  from microadam_compare import tasks as task_lib
  # pylint: enable=g-import-not-at-top

  t_start = time.perf_counter()
  preset = "tiny" if args.quick else args.preset
  task_names = TASK_GROUPS[args.task]
  grids = args.lr_grids
  for flag, value in (("--gn-inner-steps", args.gn_inner_steps),
                      ("--gn-linesearch-batches", args.gn_linesearch_batches)):
    if value is not None and value < 1:
      raise SystemExit(f"microadam-optax: {flag} must be at least 1, got "
                       f"{value}.")
  out_dir = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
  os.makedirs(out_dir, exist_ok=True)
  num_seeds = args.seeds if args.seeds is not None else DEFAULT_SEEDS[preset]
  if num_seeds < 1:
    raise SystemExit("microadam-optax: --seeds must be at least 1.")
  seeds = tuple(args.seed + i for i in range(num_seeds))
  log = lambda s: print(s, flush=True)

  task_results, tables, files, all_names = [], [], [], []
  for name in task_names:
    sched = dict(SCHEDULES[(name, preset)])
    skip = sched.pop("skip", ())
    names = _select_optimizers(args.optimizers, skip)
    all_names += [n for n in names if n not in all_names]
    for key in sched:
      value = getattr(args, key)
      if value is not None:
        sched[key] = value
    config = compare.RunConfig(
        **sched, tune=not args.no_tune,
        max_grid_extensions=args.max_grid_extensions, seeds=seeds,
        gn_linesearch_batches=args.gn_linesearch_batches,
        clip_norm=args.clip_norm or None, lr_grids=grids,
        target_loss=args.target_loss, progress=not args.no_progress,
        compiler_options=QUICK_COMPILER_OPTIONS if args.quick else None)
    kwargs = dict(seed=seeds[0], batch_size=args.batch_size,
                  gn_inner_steps=sched["gn_inner_steps"],
                  weight_decay=args.weight_decay)
    if name == "lm" and args.quick:
      kwargs["max_files"] = 40
    if name.startswith("finetune"):
      kwargs.update(cache_dir=args.cache_dir, log=log)
    task = task_lib.TASKS[name](preset, **kwargs)
    log(f"== {name}: {task.description}; {task.num_params:,} parameters; "
        f"seeds {', '.join(map(str, seeds))}")
    result = compare.compare_task(task, names, config, log=log)
    result["config"] = dataclasses.asdict(config)
    if skip:
      result["skipped_by_default"] = [n for n in skip if n not in names]
    task_results.append(result)
    tables.append(report.format_table(result))
    if not args.no_plots:
      files += [f for f in plots.plot_task(result, out_dir) if f not in files]

  wall = time.perf_counter() - t_start
  if not args.no_plots and len(task_results) > 1:
    path = os.path.join(out_dir, "loss_vs_state.png")
    plots.plot_loss_vs_state(task_results, path)
    files.append(path)
  tables.append(report.legend(task_results))
  _write_outputs(tables, {
      "command": ["microadam-optax", "compare"] + list(args.argv),
      "version": mo.__version__, "preset": preset, "seed": args.seed,
      "seeds": list(seeds), "optimizers": all_names,
      "environment": _environment(), "wall_s": wall, "tasks": task_results,
  }, out_dir, files, f" in {wall:.0f} s")
  failed = [r for t in task_results for r in t["results"]
            if r.get("status") == "error"]
  return 1 if failed else 0


def run_report(args: argparse.Namespace) -> int:
  """Runs ``report``: joins the given runs; returns the exit status."""
  if not _require_extra("report", ("flax", "matplotlib")):
    return 2
  # pylint: disable=g-import-not-at-top
  from microadam_compare import compare
  from microadam_compare import plots
  # pylint: enable=g-import-not-at-top
  try:
    reports = [report.read_report(path) for path in args.inputs]
    merged = report.merge_reports(reports, args.inputs)
  except (OSError, ValueError) as e:
    print(f"microadam-optax report: {e}", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  config = compare.RunConfig(target_loss=args.target_loss)
  tables, files = [], []
  for task in merged["tasks"]:
    task["target_loss"] = compare.add_targets(task["results"], config)
    tables.append(report.format_table(task))
    if not args.no_plots:
      files += plots.plot_task(task, args.out)
  if not args.no_plots and len(merged["tasks"]) > 1:
    path = os.path.join(args.out, "loss_vs_state.png")
    plots.plot_loss_vs_state(merged["tasks"], path)
    files.append(path)
  tables.append(report.legend(merged["tasks"]))
  _write_outputs(tables, merged, args.out, files)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of the ``microadam-optax`` console script.

  Args:
    argv: the arguments (without the program name); ``None``: ``sys.argv``.

  Returns:
    The exit status: 0 on success, 1 when an optimizer failed while running
    (optimizers whose code is not installed are skipped with a message), 2 on
    a usage error or, for ``report``, unreadable or mismatched inputs.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    return _main(argv)
  except BrokenPipeError:
    # `microadam-optax list | head`: the reader left; say nothing more.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


def _main(argv: list[str]) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  if args.command == "list":
    status = run_list()
    sys.stdout.flush()  # a closed pipe raises here, inside the try
    return status
  if args.command == "report":
    return run_report(args)
  args.argv = argv[1:]
  try:
    args.lr_grids = _parse_grid(args.lr_grid)
  except ValueError as e:
    parser.error(str(e))
  return run_compare(args)


if __name__ == "__main__":
  sys.exit(main())

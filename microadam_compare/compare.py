"""The comparison: every optimizer at its best learning rate, same data.

For each task and optimizer:

1. **Sweep**: a short run (``sweep_steps``, with the learning-rate schedule
   compressed to that length) per learning rate of the optimizer's grid;
   the rate with the lowest validation loss wins (a diverged run counts as
   ``inf``).
2. **Run**: the full run with the winner, evaluated every ``eval_every``
   steps, timed, its optimizer state measured.

Every run starts from the same initial parameters and sees the same batches
in the same order (batch ``s`` is a pure function of the seed and ``s``).
First-order optimizers follow a linear-warmup + cosine schedule (5 % warmup,
decay to 10 % of the peak). Gauss-Newton optimizers run ``gn_steps`` *outer*
iterations (each one a full inner solve plus a line search, so one of their
steps costs several first-order steps); their learning rate is the inner
optimizer's, constant, the line search setting the global step.

One jitted, buffer-donating function per optimizer runs ``eval_every`` steps
in a :func:`jax.lax.scan`; sweep and full run reuse the same executable (the
learning rate and the schedule's length are traced arguments), so each
optimizer compiles once per task.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import microadam_optax as mo
from microadam_compare import optimizers as opt_lib
from microadam_compare.tasks import Task

#: Share of the steps spent warming the learning rate up, and the floor of
#: the cosine decay (as a fraction of the peak).
WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How long each optimizer trains and how it is measured.

  Attributes:
    steps: training steps of the full run (first-order optimizers); rounded
      up to a multiple of ``eval_every``.
    eval_every: steps between evaluations (also the steps per jitted call).
    sweep_steps: steps of each learning-rate trial (multiple of
      ``eval_every``); ``0`` skips the sweep and takes the middle of the grid
      (the lower middle for an even grid).
    gn_steps: outer iterations of the Gauss-Newton full runs.
    gn_eval_every: outer iterations between their evaluations.
    gn_sweep_steps: outer iterations of their learning-rate trials.
    lr_grids: per optimizer name, a learning-rate grid replacing the
      registry's.
    target_loss: validation loss whose first crossing is reported;
      ``None``: the final validation loss of ``reference`` (or, without it,
      the median of the final losses).
    reference: the optimizer whose final loss is the default target.
    progress: show tqdm progress bars (on stderr).
    compiler_options: XLA options for compiling the training steps (e.g.
      ``{"xla_backend_optimization_level": 0}`` to compile smoke runs
      faster); ignored where the back end rejects them.
  """
  steps: int = 200
  eval_every: int = 20
  sweep_steps: int = 40
  gn_steps: int = 40
  gn_eval_every: int = 5
  gn_sweep_steps: int = 10
  lr_grids: Optional[dict[str, Sequence[float]]] = None
  target_loss: Optional[float] = None
  reference: str = "adamw"
  progress: bool = True
  compiler_options: Optional[dict[str, Any]] = None

  def steps_for(self, spec: opt_lib.OptimizerSpec) -> tuple[int, int, int]:
    """``(steps, eval_every, sweep_steps)`` of ``spec``, rounded to whole
    jitted chunks."""
    if spec.second_order:
      steps, every = self.gn_steps, self.gn_eval_every
      sweep = self.gn_sweep_steps
    else:
      steps, every, sweep = self.steps, self.eval_every, self.sweep_steps
    every = max(1, min(every, max(steps, 1)))
    round_up = lambda n: -(-max(n, 0) // every) * every
    return round_up(steps), every, round_up(sweep)

  def grid_for(self, spec: opt_lib.OptimizerSpec,
               task: Optional[str] = None) -> tuple[float, ...]:
    """The learning rates tried for ``spec`` on ``task``."""
    if self.lr_grids and spec.name in self.lr_grids:
      return tuple(float(x) for x in self.lr_grids[spec.name])
    return spec.grid_for(task)


def warmup_cosine(count: jax.Array, total_steps: jax.Array) -> jax.Array:
  """The learning-rate multiplier at step ``count`` of ``total_steps``:
  linear warmup over :data:`WARMUP_FRACTION` of the steps, then a cosine
  decay to :data:`FINAL_LR_FRACTION`. Both arguments may be traced."""
  count = jnp.asarray(count, jnp.float32)
  total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
  warmup = jnp.maximum(jnp.round(WARMUP_FRACTION * total), 1.0)
  ramp = jnp.minimum((count + 1.0) / warmup, 1.0)
  progress = jnp.clip((count - warmup) / jnp.maximum(total - warmup, 1.0),
                      0.0, 1.0)
  cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return ramp * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * cosine)


def _learning_rate(spec: opt_lib.OptimizerSpec, lr: Any,
                   total_steps: Any) -> optax.ScalarOrSchedule:
  if spec.second_order:
    return lr
  return lambda count: lr * warmup_cosine(count, total_steps)


def make_optimizer(spec: opt_lib.OptimizerSpec, task: Task, lr: Any,
                   total_steps: Any) -> optax.GradientTransformation:
  """``spec`` built for ``task`` with peak learning rate ``lr`` (the
  schedule of a first-order optimizer spans ``total_steps``)."""
  return spec.build(_learning_rate(spec, lr, total_steps), task.context)


def make_train_chunk(task: Task, spec: opt_lib.OptimizerSpec
                     ) -> Callable[..., Any]:
  """The jitted function running one chunk of training steps.

  ``chunk(params, opt_state, batches, lr, total_steps) -> (params, opt_state,
  (losses, step_sizes))``: a :func:`jax.lax.scan` over the leading axis of
  ``batches`` (``(inputs, targets)``), ``losses`` being each step's batch loss
  before its update and ``step_sizes`` the step size the Gauss-Newton line
  search chose (``nan`` for first-order optimizers). ``params`` and
  ``opt_state`` are donated.
  """

  def chunk(params, opt_state, batches, lr, total_steps):
    tx = make_optimizer(spec, task, lr, total_steps)

    def body(carry, batch):
      params, opt_state = carry
      inputs, targets = batch
      if spec.second_order:
        updates, opt_state = tx.update(
            None, opt_state, params,
            model_fn=lambda p: task.apply(p, inputs),
            loss_fn=lambda outputs: task.loss(outputs, targets))
        loss, step_size = opt_state.loss_before, opt_state.step_size
      else:
        loss, grads = jax.value_and_grad(
            lambda p: task.loss(task.apply(p, inputs), targets))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        step_size = jnp.nan
      params = optax.apply_updates(params, updates)
      return (params, opt_state), (jnp.asarray(loss, jnp.float32),
                                   jnp.asarray(step_size, jnp.float32))

    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state),
                                               batches)
    return params, opt_state, losses

  return jax.jit(chunk, donate_argnums=(0, 1))


def make_eval(task: Task) -> Callable[[Any, Any], tuple[jax.Array, jax.Array]]:
  """Jitted ``(params, eval_batches) -> (mean loss, mean accuracy)``."""

  def evaluate(params, batches):
    def one(batch):
      outputs = task.apply(params, batch[0])
      return task.loss(outputs, batch[1]), task.accuracy(outputs, batch[1])
    losses, accs = jax.lax.map(one, batches)
    return jnp.mean(losses), jnp.mean(accs)

  return jax.jit(evaluate)


def _memory_stats() -> Optional[dict]:
  try:
    return jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None


def _compiled_peak_bytes(compiled: Any) -> Optional[int]:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  peak = getattr(m, "peak_memory_in_bytes", None)
  if peak:
    return int(peak)
  return int(m.argument_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes + m.temp_size_in_bytes)


def _finite_or_inf(x: float) -> float:
  return x if math.isfinite(x) else math.inf


@dataclasses.dataclass
class _Runner:
  """Runs one optimizer on one task (compiled once)."""
  task: Task
  spec: opt_lib.OptimizerSpec
  evaluate: Callable[..., Any]
  eval_batches: Any
  every: int
  compiler_options: Optional[dict[str, Any]] = None

  def __post_init__(self):
    self.chunk = make_train_chunk(self.task, self.spec)
    self.compiled = None
    self.compile_s = 0.0
    self.step_memory_bytes = None

  def fresh(self, lr: float, total: int):
    params = jax.tree.map(jnp.asarray, self.task.init_params)
    tx = make_optimizer(self.spec, self.task, lr, total)
    # Fresh buffers for every leaf: an init that returns one array in several
    # fields could not be donated ("donate the same buffer twice").
    state = jax.tree.map(jnp.copy, tx.init(params))
    return params, state

  def _batches(self, start: int):
    return jax.tree.map(jnp.asarray, self.task.train_batches(start, self.every))

  def compile(self, lr: float, total: int) -> None:
    params, state = self.fresh(lr, total)
    t0 = time.perf_counter()
    lowered = self.chunk.lower(params, state, self._batches(0),
                               jnp.float32(lr), jnp.float32(total))
    self.compiled = None
    if self.compiler_options:
      try:
        self.compiled = lowered.compile(dict(self.compiler_options))
      except Exception:  # pylint: disable=broad-except
        self.compiled = None  # unknown option on this back end: defaults.
    if self.compiled is None:
      self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - t0
    self.step_memory_bytes = _compiled_peak_bytes(self.compiled)

  def run(self, lr: float, steps: int, *, evaluate_every_chunk: bool,
          bar: Any = None) -> dict:
    """Trains from the initial parameters for ``steps`` steps."""
    params, state = self.fresh(lr, steps)
    record = {"steps": [], "val_loss": [], "val_acc": [], "time_s": [],
              "train_loss": [], "chunk_s": []}
    if self.spec.second_order:
      record["step_sizes"] = []  # the line search's choice per outer step

    def do_eval(step, elapsed):
      loss, acc = self.evaluate(params, self.eval_batches)
      record["steps"].append(step)
      record["val_loss"].append(float(loss))
      record["val_acc"].append(float(acc))
      record["time_s"].append(elapsed)

    if evaluate_every_chunk:
      do_eval(0, 0.0)
    elapsed = 0.0
    diverged = False
    lr_arr, total_arr = jnp.float32(lr), jnp.float32(steps)
    for start in range(0, steps, self.every):
      batches = self._batches(start)
      jax.block_until_ready(batches)
      t0 = time.perf_counter()
      params, state, (losses, sizes) = self.compiled(
          params, state, batches, lr_arr, total_arr)
      losses = np.asarray(jax.block_until_ready(losses))
      dt = time.perf_counter() - t0
      elapsed += dt
      record["chunk_s"].append(dt)
      record["train_loss"].extend(float(x) for x in losses)
      if self.spec.second_order:
        record["step_sizes"].extend(float(x) for x in np.asarray(sizes))
      last = float(losses[-1])
      if bar is not None:
        bar.update(self.every)
        bar.set_postfix(lr=f"{lr:.0e}", loss=f"{last:.3f}", refresh=False)
      if not math.isfinite(last):
        diverged = True  # the rest of the run would be NaN as well.
        if bar is not None:
          bar.update(steps - start - self.every)
        break
      if evaluate_every_chunk or start + self.every >= steps:
        do_eval(start + self.every, elapsed)
    if diverged:
      record["steps"].append(len(record["train_loss"]))
      record["val_loss"].append(math.nan)
      record["val_acc"].append(math.nan)
      record["time_s"].append(elapsed)
    record["state"] = state
    return record


def first_crossing(steps: Sequence[float], values: Sequence[float],
                   target: float) -> Optional[float]:
  """The first ``steps[i]`` whose ``values[i] <= target`` (``None`` if
  never)."""
  for s, v in zip(steps, values):
    if math.isfinite(v) and v <= target:
      return s
  return None


def _progress_bar(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tqdm(total=total, desc=desc, leave=False, file=sys.stderr,
              dynamic_ncols=True)


def run_optimizer(task: Task, spec: opt_lib.OptimizerSpec, config: RunConfig,
                  evaluate: Optional[Callable[..., Any]] = None) -> dict:
  """Sweeps ``spec``'s learning rates on ``task``, then trains with the best.

  Returns:
    A JSON-ready ``dict``: the grid and its sweep losses, the chosen rate,
    the curves (``steps``, ``val_loss``, ``val_acc``, ``time_s``,
    ``train_loss``), final values, state bytes, step time, compile time and
    memory. ``status`` is ``"ok"``, ``"unavailable"`` or ``"error"`` (with
    ``message``).
  """
  result: dict[str, Any] = {
      "name": spec.name, "label": spec.label, "note": spec.note,
      "second_order": spec.second_order,
      "step_unit": "outer iteration" if spec.second_order else "step",
  }
  reason = opt_lib.unavailable_reason(spec)
  if reason is not None:
    result.update(status="unavailable", message=reason)
    return result
  steps, every, sweep_steps = config.steps_for(spec)
  grid = config.grid_for(spec, task.name)
  evaluate = evaluate or make_eval(task)
  eval_batches = jax.tree.map(jnp.asarray, task.eval_batches)
  total = (len(grid) if sweep_steps and len(grid) > 1 else 0) * sweep_steps
  bar = _progress_bar(total + steps, f"{task.name} {spec.label}",
                      config.progress)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=".*donated buffers.*")
      runner = _Runner(task, spec, evaluate, eval_batches, every,
                       config.compiler_options)
      runner.compile(grid[0], steps)
      sweep = []
      if sweep_steps and len(grid) > 1:
        for lr in grid:
          rec = runner.run(lr, sweep_steps, evaluate_every_chunk=False,
                           bar=bar)
          sweep.append({"lr": lr, "val_loss": rec["val_loss"][-1],
                        "train_loss_last": rec["train_loss"][-1]})
        best_lr = min(sweep, key=lambda r: _finite_or_inf(r["val_loss"]))["lr"]
      else:
        best_lr = grid[(len(grid) - 1) // 2]
      rec = runner.run(best_lr, steps, evaluate_every_chunk=True, bar=bar)
      mem = _memory_stats()
  except Exception as e:  # pylint: disable=broad-except
    if bar is not None:
      bar.close()
    result.update(status="error", message=f"{type(e).__name__}: {e}")
    return result
  if bar is not None:
    bar.close()
  state_bytes = mo.state_nbytes(rec.pop("state"))
  chunk_s = rec.pop("chunk_s")
  per_step = [c / every for c in chunk_s]
  finite = [v for v in rec["val_loss"] if math.isfinite(v)]
  result.update(
      status="ok", lr_grid=list(grid), sweep_steps=sweep_steps, sweep=sweep,
      best_lr=best_lr,
      best_lr_at_grid_edge=(len(sweep) >= 3
                            and best_lr in (min(grid), max(grid))),
      steps_run=len(rec["train_loss"]), **rec,
      final_val_loss=rec["val_loss"][-1], final_val_acc=rec["val_acc"][-1],
      best_val_loss=min(finite) if finite else math.nan,
      state_bytes=state_bytes,
      state_bytes_per_param=state_bytes / task.num_params,
      step_time_s=statistics.median(per_step) if per_step else math.nan,
      train_time_s=sum(chunk_s), compile_s=runner.compile_s,
      step_memory_bytes=runner.step_memory_bytes,
      device_peak_bytes=(mem or {}).get("peak_bytes_in_use"),
  )
  return result


def add_targets(results: list[dict], config: RunConfig) -> Optional[float]:
  """Fills in ``target_loss``, ``steps_to_target`` and ``time_to_target_s``
  of every successful result; returns the target."""
  ok = [r for r in results if r.get("status") == "ok"]
  target = config.target_loss
  if target is None:
    ref = [r for r in ok if r["name"] == config.reference
           and math.isfinite(r["final_val_loss"])]
    finals = sorted(r["final_val_loss"] for r in ok
                    if math.isfinite(r["final_val_loss"]))
    if ref:
      target = ref[0]["final_val_loss"]
    elif finals:
      target = statistics.median(finals)
  for r in ok:
    r["target_loss"] = target
    if target is None:
      r["steps_to_target"] = r["time_to_target_s"] = None
      continue
    r["steps_to_target"] = first_crossing(r["steps"], r["val_loss"], target)
    r["time_to_target_s"] = first_crossing(r["time_s"], r["val_loss"], target)
  return target


def compare_task(task: Task, names: Sequence[str], config: RunConfig,
                 log: Callable[[str], None] = print) -> dict:
  """Runs every optimizer of ``names`` on ``task``.

  Returns:
    ``{"task", "description", "num_params", "metadata", "target_loss",
    "results": [...]}`` (see :func:`run_optimizer`).
  """
  evaluate = make_eval(task)
  results = []
  for name in names:
    spec = opt_lib.get(name)
    t0 = time.perf_counter()
    result = run_optimizer(task, spec, config, evaluate)
    result["wall_s"] = time.perf_counter() - t0
    if result["status"] == "ok":
      log(f"[{task.name}] {spec.label:<15} lr={result['best_lr']:.0e}  "
          f"val loss {result['final_val_loss']:.4f}  "
          f"({result['wall_s']:.0f} s)")
    else:
      log(f"[{task.name}] {spec.label:<15} SKIPPED ({result['status']}): "
          f"{result['message']}")
    results.append(result)
  target = add_targets(results, config)
  return {"task": task.name, "description": task.description,
          "num_params": task.num_params, "loss_unit": task.loss_unit,
          "metadata": task.metadata, "target_loss": target,
          "results": results}

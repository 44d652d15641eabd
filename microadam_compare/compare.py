"""The comparison: every optimizer tuned at full length, seeded, same data.

For each task and optimizer:

1. **Tuning**: one run per learning rate of the optimizer's grid, each as
   long as the reported run and on the same schedule (``steps`` first-order
   steps, ``gn_steps`` Gauss-Newton outer iterations), on the first seed; the
   rate with the lowest final validation loss wins (a diverged run counts as
   ``inf``). While the winner is at an end of the grid, the grid grows by a
   half-decade on that side (1e-3 -> 3e-3 -> 1e-2), at most
   ``max_grid_extensions`` times; a winner still at an end is reported.
2. **Seeds**: the winner's tuning run is the first seed's final run; the
   other seeds (other initial parameters, other batch order) rerun it.
   Results are the mean and standard deviation over seeds.

Every run of a seed starts from the same initial parameters and reads the
same stream of training batches (batch ``s`` is a pure function of the seed
and ``s``). First-order optimizers clip the gradient's global norm to
``clip_norm`` (1.0) and follow a linear-warmup + cosine schedule (5 %
warmup, decay to 10 % of the peak); step ``s`` reads batch ``s``.

Gauss-Newton optimizers run the protocol of Abreu et al.'s code for
``gn_steps`` *outer* iterations of ``N = gn_inner_steps`` inner steps:
outer step ``t`` linearizes the model at its parameters, feeds its ``N``
inner steps the next ``N`` batches of the stream (one fresh batch
each) and its line search (the best of the step sizes ``1/sqrt(2)^i``,
``i < 5``, on the true loss) the ``M`` batches after them
(:func:`gauss_newton_batch_indices`; ``M = N`` as in the paper unless
``gn_linesearch_batches``). Their learning rate is the inner optimizer's,
on the first-order runs' warmup + cosine schedule spanning all ``gn_steps *
N`` inner steps of the run, the inner state and iterate kept across outer
steps. Data is counted: ``gn_steps * N`` training batches against the
first-order runs' ``steps`` (the line search's batches are reported
apart, as the paper does), so the presets pick ``gn_steps * N`` close to
``steps``. Every result records the tokens (examples, for the
classification tasks) each evaluation had seen, and the tokens to the
target beside the iterations and seconds.

One jitted, buffer-donating function per optimizer runs ``eval_every`` steps
in a :func:`jax.lax.scan`; every run reuses the same executable (the
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
from microadam_compare.report import batch_data as _batch_data
from microadam_compare.report import seed_summary as _seed_summary
from microadam_compare.tasks import Task

#: Share of the steps spent warming the learning rate up, and the floor of
#: the cosine decay (as a fraction of the peak).
WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How long each optimizer trains, how it is tuned and measured.

  Attributes:
    steps: training steps of every first-order run (tuning runs included);
      rounded up to a multiple of ``eval_every``.
    eval_every: steps between evaluations (also the steps per jitted call).
    gn_steps: outer iterations of every Gauss-Newton run (each of
      ``gn_inner_steps`` inner steps on fresh batches).
    gn_eval_every: outer iterations between their evaluations.
    gn_inner_steps: inner steps per Gauss-Newton outer iteration, each on a
      fresh batch; ``None``: the task's (``task.context.gn_inner_steps``).
    gn_linesearch_batches: batches of its own the Gauss-Newton line search
      averages the true loss over, per outer step; ``None``: as many as
      inner steps (the paper's).
    tune: run every rate of the grid (and extend it); ``False``: take the
      middle of the grid (the lower middle for an even grid), for smoke runs.
    max_grid_extensions: how many half-decades the tuning may add to a grid
      whose best rate is at an end (:data:`optimizers.MAX_GRID_EXTENSIONS`
      says why six).
    seeds: the seeds of the final runs; the first one also tunes.
    clip_norm: global-norm clipping of the gradient of every first-order
      optimizer (``None``: none).
    lr_grids: per optimizer name, a learning-rate grid replacing the
      registry's.
    target_loss: validation loss whose first crossing is reported;
      ``None``: the final validation loss of ``reference`` (or, without it,
      the median of the final losses).
    reference: the optimizer whose final loss is the default target and
      the baseline of the "vs" column.
    progress: show tqdm progress bars (on stderr).
    compiler_options: XLA options for compiling the training steps (e.g.
      ``{"xla_backend_optimization_level": 0}`` to compile smoke runs
      faster); ignored where the back end rejects them.
  """
  steps: int = 200
  eval_every: int = 20
  gn_steps: int = 40
  gn_eval_every: int = 5
  gn_inner_steps: Optional[int] = None
  gn_linesearch_batches: Optional[int] = None
  tune: bool = True
  max_grid_extensions: int = opt_lib.MAX_GRID_EXTENSIONS
  seeds: tuple[int, ...] = (0,)
  clip_norm: Optional[float] = 1.0
  lr_grids: Optional[dict[str, Sequence[float]]] = None
  target_loss: Optional[float] = None
  reference: str = "adamw"
  progress: bool = True
  compiler_options: Optional[dict[str, Any]] = None

  def steps_for(self, spec: opt_lib.OptimizerSpec) -> tuple[int, int]:
    """``(steps, eval_every)`` of ``spec``, rounded to whole jitted
    chunks."""
    if spec.second_order:
      steps, every = self.gn_steps, self.gn_eval_every
    else:
      steps, every = self.steps, self.eval_every
    every = max(1, min(every, max(steps, 1)))
    return -(-max(steps, 1) // every) * every, every

  def grid_for(self, spec: opt_lib.OptimizerSpec,
               task: Optional[str] = None) -> tuple[float, ...]:
    """The first learning rates tried for ``spec`` on ``task``."""
    if self.lr_grids and spec.name in self.lr_grids:
      grid = self.lr_grids[spec.name]
    else:
      grid = spec.grid_for(task)
    return tuple(sorted(float(x) for x in grid))


def half_decade(lr: float, up: bool) -> float:
  """The next rate of a 1-3-10 ladder above (``up``) or below ``lr``.

  >>> half_decade(1e-3, up=True), half_decade(1e-3, up=False)
  (0.003, 0.0003)
  >>> half_decade(3e-3, up=True), half_decade(3e-3, up=False)
  (0.01, 0.001)
  """
  exponent = math.floor(math.log10(lr) + 1e-9)
  mantissa = round(lr / 10**exponent, 6)
  ladder = {1.0: (0.3, 3.0), 3.0: (1.0, 10.0)}
  if mantissa in ladder:
    down_m, up_m = ladder[mantissa]
    return float(f"{(up_m if up else down_m) * 10**exponent:.3g}")
  return lr * 10**(0.5 if up else -0.5)


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


def gauss_newton_batch_indices(outer_step: int, inner_steps: int,
                               linesearch_batches: Optional[int] = None
                               ) -> tuple[range, range]:
  """Which batches of a task's training stream one Gauss-Newton outer step
  reads: its inner steps' and then its line search's, as the paper's code
  draws them from one iterator.

  Args:
    outer_step: the outer step ``t >= 0``.
    inner_steps: inner steps ``N >= 1`` per outer step (one batch each).
    linesearch_batches: the line search's batches ``M >= 1`` per outer
      step; ``None``: ``N``.

  Returns:
    ``(inner, linesearch)``: the stream indices ``[t (N + M), t (N + M) +
    N)`` and ``[t (N + M) + N, (t + 1)(N + M))``.

  Example:
    >>> from microadam_compare import compare
    >>> compare.gauss_newton_batch_indices(1, inner_steps=3)
    (range(6, 9), range(9, 12))
  """
  for name, value, low in (("outer_step", outer_step, 0),
                           ("inner_steps", inner_steps, 1),
                           ("linesearch_batches", linesearch_batches, 1)):
    if value is None and name == "linesearch_batches":
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
  m = inner_steps if linesearch_batches is None else linesearch_batches
  first = outer_step * (inner_steps + m)
  return (range(first, first + inner_steps),
          range(first + inner_steps, first + inner_steps + m))


def _learning_rate(spec: opt_lib.OptimizerSpec, task: Task, lr: Any,
                   total_steps: Any) -> optax.ScalarOrSchedule:
  # A Gauss-Newton optimizer's inner state is kept across outer steps, so
  # its schedule (of the inner step count) spans every inner step.
  total = (total_steps * task.context.gn_inner_steps if spec.second_order
           else total_steps)
  return lambda count: lr * warmup_cosine(count, total)


def make_optimizer(spec: opt_lib.OptimizerSpec, task: Task, lr: Any,
                   total_steps: Any, clip_norm: Optional[float] = 1.0
                   ) -> optax.GradientTransformation:
  """``spec`` built for ``task`` with peak learning rate ``lr`` on the
  warmup + cosine schedule of :func:`warmup_cosine`, spanning
  ``total_steps`` steps (Gauss-Newton: ``total_steps`` outer steps, the
  schedule of its inner optimizer spanning all their inner steps); a
  first-order optimizer's gradient is clipped to global norm ``clip_norm``
  first."""
  tx = spec.build(_learning_rate(spec, task, lr, total_steps), task.context)
  if clip_norm is not None and not spec.second_order:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  return tx


def make_train_chunk(task: Task, spec: opt_lib.OptimizerSpec,
                     clip_norm: Optional[float] = 1.0) -> Callable[..., Any]:
  """The jitted function running one chunk of training steps.

  ``chunk(params, opt_state, batches, lr, total_steps) -> (params, opt_state,
  (losses, step_sizes, linesearch_losses))``: a :func:`jax.lax.scan` over
  the leading axis of ``batches``. For a first-order optimizer ``batches``
  is ``(inputs, targets)`` (one batch per step) and ``losses`` each step's
  batch loss before its update. For Gauss-Newton it is ``(inner,
  linesearch)``, each ``(inputs, targets)`` with a second axis of ``N``
  (inner steps) and ``M`` batches (:func:`gauss_newton_batch_indices`);
  ``losses`` is the mean loss of the inner batches at the outer step's
  parameters, ``step_sizes`` the step size the line search chose and
  ``linesearch_losses`` the mean loss of the line search's batches after
  the step (both ``nan`` for first-order optimizers). ``params`` and
  ``opt_state`` are donated.
  """

  def model_fn(params, batch):
    return task.apply(params, batch[0])

  def loss_fn(outputs, batch):
    return task.loss(outputs, batch[1])

  def chunk(params, opt_state, batches, lr, total_steps):
    tx = make_optimizer(spec, task, lr, total_steps, clip_norm)

    def body(carry, batch):
      params, opt_state = carry
      if spec.second_order:
        inner, linesearch = batch
        updates, opt_state = tx.update(
            None, opt_state, params, model_fn=model_fn, loss_fn=loss_fn,
            batches=inner, linesearch_batches=linesearch)
        loss, step_size = opt_state.loss_before, opt_state.step_size
        search_loss = opt_state.loss_after
      else:
        loss, grads = jax.value_and_grad(
            lambda p: loss_fn(model_fn(p, batch), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        step_size = search_loss = jnp.nan
      params = optax.apply_updates(params, updates)
      return (params, opt_state), (jnp.asarray(loss, jnp.float32),
                                   jnp.asarray(step_size, jnp.float32),
                                   jnp.asarray(search_loss, jnp.float32))

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


def batch_data(task: Task) -> tuple[int, str]:
  """How much data one training batch of ``task`` holds, and in what
  (:func:`microadam_compare.report.batch_data` of its metadata)."""
  return _batch_data(task.metadata)


@dataclasses.dataclass
class _Runner:
  """Runs one optimizer on one task (compiled once, for every seed)."""
  task: Task
  spec: opt_lib.OptimizerSpec
  evaluate: Callable[..., Any]
  eval_batches: Any
  every: int
  clip_norm: Optional[float] = 1.0
  compiler_options: Optional[dict[str, Any]] = None
  linesearch_batches: Optional[int] = None

  def __post_init__(self):
    self.chunk = make_train_chunk(self.task, self.spec, self.clip_norm)
    self.compiled = None
    self.compile_s = 0.0
    self.step_memory_bytes = None
    # Batches each step reads: (training, line search).
    if self.spec.second_order:
      inner = int(self.task.context.gn_inner_steps)
      self.batches_per_step = (inner, inner if self.linesearch_batches is None
                               else int(self.linesearch_batches))
    else:
      self.batches_per_step = (1, 0)

  def fresh(self, task: Task, lr: float, total: int):
    params = jax.tree.map(jnp.asarray, task.init_params)
    tx = make_optimizer(self.spec, task, lr, total, self.clip_norm)
    # Fresh buffers for every leaf: an init that returns one array in several
    # fields could not be donated ("donate the same buffer twice").
    state = jax.tree.map(jnp.copy, tx.init(params))
    return params, state

  def _batches(self, task: Task, start: int):
    """The batches of steps ``start .. start + every - 1``, in one call of
    ``task.train_batches`` (Gauss-Newton: split per outer step into the
    inner steps' and the line search's, as
    :func:`gauss_newton_batch_indices` says)."""
    if not self.spec.second_order:
      return jax.tree.map(jnp.asarray, task.train_batches(start, self.every))
    n, m = self.batches_per_step
    stream = task.train_batches(start * (n + m), self.every * (n + m))
    per_step = jax.tree.map(
        lambda x: x.reshape((self.every, n + m) + x.shape[1:]), stream)
    return (jax.tree.map(lambda x: jnp.asarray(x[:, :n]), per_step),
            jax.tree.map(lambda x: jnp.asarray(x[:, n:]), per_step))

  def compile(self, lr: float, total: int) -> None:
    params, state = self.fresh(self.task, lr, total)
    t0 = time.perf_counter()
    lowered = self.chunk.lower(params, state, self._batches(self.task, 0),
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

  def run(self, task: Task, lr: float, steps: int, bar: Any = None,
          keep_params: bool = False) -> dict:
    """Trains ``task`` (one seed's parameters and batches) from its initial
    parameters for ``steps`` steps, evaluating every chunk (the final
    parameters under ``"params"`` with ``keep_params``)."""
    params, state = self.fresh(task, lr, steps)
    record = {"steps": [], "val_loss": [], "val_acc": [], "time_s": [],
              "train_loss": [], "chunk_s": []}
    if self.spec.second_order:
      record["step_sizes"] = []  # the line search's choice per outer step
      record["linesearch_loss"] = []  # its batches' mean loss after it

    def do_eval(step, elapsed):
      loss, acc = self.evaluate(params, self.eval_batches)
      record["steps"].append(step)
      record["val_loss"].append(float(loss))
      record["val_acc"].append(float(acc))
      record["time_s"].append(elapsed)

    do_eval(0, 0.0)
    elapsed = 0.0
    diverged = False
    lr_arr, total_arr = jnp.float32(lr), jnp.float32(steps)
    for start in range(0, steps, self.every):
      batches = self._batches(task, start)
      jax.block_until_ready(batches)
      t0 = time.perf_counter()
      params, state, (losses, sizes, search_losses) = self.compiled(
          params, state, batches, lr_arr, total_arr)
      losses = np.asarray(jax.block_until_ready(losses))
      dt = time.perf_counter() - t0
      elapsed += dt
      record["chunk_s"].append(dt)
      record["train_loss"].extend(float(x) for x in losses)
      if self.spec.second_order:
        record["step_sizes"].extend(float(x) for x in np.asarray(sizes))
        record["linesearch_loss"].extend(
            float(x) for x in np.asarray(search_losses))
      last = float(losses[-1])
      if bar is not None:
        bar.update(self.every)
        bar.set_postfix(lr=f"{lr:.0e}", loss=f"{last:.3f}", refresh=False)
      if not math.isfinite(last):
        diverged = True  # the rest of the run would be NaN as well.
        if bar is not None:
          bar.update(steps - start - self.every)
        break
      do_eval(start + self.every, elapsed)
    if diverged:
      record["steps"].append(len(record["train_loss"]))
      record["val_loss"].append(math.nan)
      record["val_acc"].append(math.nan)
      record["time_s"].append(elapsed)
    record["state_bytes"] = mo.state_nbytes(state)
    if keep_params:
      record["params"] = params
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


def tune(runner: _Runner, task: Task, grid: Sequence[float], steps: int,
         max_extensions: int, bar: Any = None,
         log: Optional[Callable[[str], None]] = None
         ) -> tuple[float, dict[float, dict], int, bool]:
  """Full-length runs of every rate of ``grid``, extended by half-decades
  while the best rate is at an end.

  Returns:
    ``(best_lr, records by rate, extensions made, best still at an end)``.
  """
  records: dict[float, dict] = {}

  def final(lr):
    return _finite_or_inf(records[lr]["val_loss"][-1])

  for lr in grid:
    records[lr] = runner.run(task, lr, steps, bar=bar)
  extensions = 0
  while True:
    rates = sorted(records)
    best = min(rates, key=final)
    at_edge = len(rates) > 1 and best in (rates[0], rates[-1])
    if not at_edge or extensions >= max_extensions:
      return best, records, extensions, at_edge
    new = half_decade(best, up=best == rates[-1])
    if log is not None:
      log(f"    best rate {best:.0e} at an end of the grid: trying {new:.0e}")
    if bar is not None:
      bar.total += steps
      bar.refresh()
    records[new] = runner.run(task, new, steps, bar=bar)
    extensions += 1


def run_optimizer(task: Task, spec: opt_lib.OptimizerSpec, config: RunConfig,
                  evaluate: Optional[Callable[..., Any]] = None,
                  seed_tasks: Sequence[Task] = (),
                  log: Optional[Callable[[str], None]] = None) -> dict:
  """Tunes ``spec``'s learning rate on ``task`` at full length, then reruns
  the best rate on the other seeds.

  Args:
    task: the task on the first seed (tuning and the first final run).
    spec: the optimizer.
    config: lengths, grid, seeds, clipping.
    evaluate: :func:`make_eval` of ``task`` (shared between optimizers).
    seed_tasks: the same task on each further seed of ``config.seeds``.
    log: where to say that a grid grows.

  Returns:
    A JSON-ready ``dict``: ``seeds``, ``final_val_loss_per_seed``,
    ``final_val_loss_mean``/``_std``, ``lr_grid`` (every rate tried),
    ``best_lr``, ``best_lr_at_grid_edge``, ``grid_extensions``,
    ``sweep_steps`` (= ``steps_run``), ``second_order``, the tuning runs'
    final losses (``sweep``), the curves averaged over seeds (``steps``,
    ``val_loss``, ``val_loss_std``, ``val_acc``, ``time_s``) and per seed,
    state bytes, step time, compile time and memory. The data: ``data_unit``
    (``"tokens"``, or ``"examples"`` for the classification tasks),
    ``tokens_per_batch``, ``tokens_per_step`` (training data of one step:
    one batch, or for Gauss-Newton its ``inner_steps`` batches),
    ``tokens_seen`` (per point of ``steps``) and ``tokens_run``; Gauss-Newton
    adds ``linesearch_batches``, ``linesearch_tokens_per_step``,
    ``linesearch_tokens_seen`` and ``linesearch_tokens_run`` (read by the
    line search, not counted as training data). ``status`` is ``"ok"``,
    ``"unavailable"`` or ``"error"`` (with ``message``).
  """
  seeds = list(config.seeds)
  result: dict[str, Any] = {
      "name": spec.name, "label": spec.label, "note": spec.note,
      "second_order": spec.second_order,
      "step_unit": "outer iteration" if spec.second_order else "step",
      "seeds": seeds,
  }
  reason = opt_lib.unavailable_reason(spec)
  if reason is not None:
    result.update(status="unavailable", message=reason)
    return result
  inner_steps = config.gn_inner_steps
  if spec.second_order and inner_steps is not None:
    # The run's inner steps, in the context the builders read.
    task, *seed_tasks = [
        dataclasses.replace(t, context=dataclasses.replace(
            t.context, gn_inner_steps=int(inner_steps)))
        for t in (task, *seed_tasks)]
  steps, every = config.steps_for(spec)
  grid = config.grid_for(spec, task.name)
  evaluate = evaluate or make_eval(task)
  eval_batches = jax.tree.map(jnp.asarray, task.eval_batches)
  tuning = config.tune and len(grid) > 1
  bar = _progress_bar(((len(grid) if tuning else 1) + len(seed_tasks))
                      * steps, f"{task.name} {spec.label}", config.progress)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=".*donated buffers.*")
      runner = _Runner(task, spec, evaluate, eval_batches, every,
                       config.clip_norm, config.compiler_options,
                       config.gn_linesearch_batches)
      runner.compile(grid[0], steps)
      if tuning:
        best_lr, records, extensions, at_edge = tune(
            runner, task, grid, steps, config.max_grid_extensions, bar, log)
      else:
        best_lr = grid[(len(grid) - 1) // 2]
        records = {best_lr: runner.run(task, best_lr, steps, bar=bar)}
        extensions, at_edge = 0, False
      runs = [records[best_lr]]
      for other in seed_tasks:
        runs.append(runner.run(other, best_lr, steps, bar=bar))
      mem = _memory_stats()
  except Exception as e:  # pylint: disable=broad-except
    if bar is not None:
      bar.close()
    result.update(status="error", message=f"{type(e).__name__}: {e}")
    return result
  if bar is not None:
    bar.close()
  first = runs[0]
  chunk_s = [c for r in runs for c in r["chunk_s"]]
  step_times = [c / every for c in chunk_s]
  state_bytes = first["state_bytes"]
  transient = None
  if spec.inner is not None:
    inner = spec.inner(best_lr, task.context)
    transient = mo.state_nbytes(jax.eval_shape(inner.init, task.init_params))
  rates = sorted(records)
  per_batch, unit = batch_data(task)
  train_batches, search_batches = runner.batches_per_step
  per_step = train_batches * per_batch
  result.update(
      data_unit=unit, tokens_per_batch=per_batch, tokens_per_step=per_step,
      tokens_seen=[s * per_step for s in first["steps"]],
      tokens_run=len(first["train_loss"]) * per_step)
  if spec.second_order:
    search = search_batches * per_batch
    result.update(
        inner_steps=train_batches, linesearch_batches=search_batches,
        linesearch_tokens_per_step=search,
        linesearch_tokens_seen=[s * search for s in first["steps"]],
        linesearch_tokens_run=len(first["train_loss"]) * search)
  result.update(
      status="ok", lr_grid=rates, initial_lr_grid=list(grid),
      grid_extensions=extensions,
      max_grid_extensions=config.max_grid_extensions if tuning else 0,
      sweep_steps=steps if tuning else 0,
      sweep=[{"lr": lr, "val_loss": records[lr]["val_loss"][-1],
              "train_loss_last": records[lr]["train_loss"][-1]}
             for lr in rates] if tuning else [],
      best_lr=best_lr, best_lr_at_grid_edge=bool(at_edge),
      steps_run=len(first["train_loss"]), eval_every=every,
      steps=first["steps"], train_loss=first["train_loss"],
      **_seed_summary([r["val_loss"] for r in runs],
                      [r["val_acc"] for r in runs],
                      [r["time_s"] for r in runs]),
      state_bytes=state_bytes,
      state_bytes_per_param=state_bytes / task.num_params,
      transient_state_bytes=transient,
      transient_state_bytes_per_param=(None if transient is None
                                       else transient / task.num_params),
      step_time_s=(statistics.median(step_times) if step_times
                   else math.nan),
      train_time_s=sum(first["chunk_s"]), compile_s=runner.compile_s,
      step_memory_bytes=runner.step_memory_bytes,
      device_peak_bytes=(mem or {}).get("peak_bytes_in_use"),
  )
  if spec.second_order:
    result["step_sizes"] = first["step_sizes"]
    result["linesearch_loss"] = first["linesearch_loss"]
  return result


def is_tie(a: dict, b: dict, width: float = 2.0) -> Optional[bool]:
  """Whether the mean final losses of ``a`` and ``b`` differ by at most
  ``width`` standard deviations over seeds (the larger of the two); ``None``
  with fewer than two seeds (no spread to compare with)."""
  if min(len(a.get("final_val_loss_per_seed") or ()),
         len(b.get("final_val_loss_per_seed") or ())) < 2:
    return None
  ma, mb = a["final_val_loss_mean"], b["final_val_loss_mean"]
  sa, sb = a["final_val_loss_std"], b["final_val_loss_std"]
  if not all(math.isfinite(x) for x in (ma, mb, sa, sb)):
    return False
  return abs(ma - mb) <= width * max(sa, sb)


def add_targets(results: list[dict], config: RunConfig) -> Optional[float]:
  """Fills in ``target_loss``, ``steps_to_target`` (first-order steps,
  Gauss-Newton outer iterations), ``tokens_to_target`` (``None`` for results
  without ``tokens_seen``), ``time_to_target_s`` (first crossings of the
  seed-mean validation curve) and the comparison
  with the reference and with the best (``vs_reference``,
  ``tie_with_reference``, ``tie_with_best``) of every successful result;
  returns the target."""
  ok = [r for r in results if r.get("status") == "ok"]
  for r in ok:  # reports written before the seeds carried one seed
    if "final_val_loss_per_seed" not in r:
      r["final_val_loss_per_seed"] = [r["final_val_loss"]]
      r["final_val_loss_mean"] = r["final_val_loss"]
      r["final_val_loss_std"] = 0.0
  target = config.target_loss
  ref = [r for r in ok if r["name"] == config.reference
         and math.isfinite(r["final_val_loss"])]
  if target is None:
    finals = sorted(r["final_val_loss"] for r in ok
                    if math.isfinite(r["final_val_loss"]))
    if ref:
      target = ref[0]["final_val_loss"]
    elif finals:
      target = statistics.median(finals)
  finite = [r for r in ok if math.isfinite(r["final_val_loss"])]
  best = min(finite, key=lambda r: r["final_val_loss"]) if finite else None
  for r in ok:
    r["target_loss"] = target
    r["vs_reference"] = (r["final_val_loss"] / ref[0]["final_val_loss"] - 1
                         if ref and math.isfinite(r["final_val_loss"])
                         else None)
    r["tie_with_reference"] = is_tie(r, ref[0]) if ref else None
    r["tie_with_best"] = is_tie(r, best) if best is not None else None
    r["is_best"] = r is best
    if target is None:
      r["steps_to_target"] = r["time_to_target_s"] = None
      r["tokens_to_target"] = None
      continue
    r["steps_to_target"] = first_crossing(r["steps"], r["val_loss"], target)
    r["tokens_to_target"] = (
        first_crossing(r["tokens_seen"], r["val_loss"], target)
        if r.get("tokens_seen") else None)
    r["time_to_target_s"] = first_crossing(r["time_s"], r["val_loss"], target)
  return target


def compare_task(task: Task, names: Sequence[str], config: RunConfig,
                 log: Callable[[str], None] = print) -> dict:
  """Runs every optimizer of ``names`` on ``task``.

  ``task`` is the task on the first seed of ``config.seeds``; the others are
  made with ``task.with_seed``.

  Returns:
    ``{"task", "description", "num_params", "metadata", "target_loss",
    "seeds", "results": [...]}`` (see :func:`run_optimizer`).
  """
  evaluate = make_eval(task)
  seeds = list(config.seeds)
  if len(seeds) > 1 and task.with_seed is None:
    raise ValueError(f"Task {task.name!r} cannot be re-made for other seeds.")
  seed_tasks = [task.with_seed(seed=s) for s in seeds[1:]]
  results = []
  for name in names:
    spec = opt_lib.get(name)
    t0 = time.perf_counter()
    result = run_optimizer(task, spec, config, evaluate, seed_tasks, log=log)
    result["wall_s"] = time.perf_counter() - t0
    if result["status"] == "ok":
      edge = " (at the grid's end)" if result["best_lr_at_grid_edge"] else ""
      log(f"[{task.name}] {spec.label:<15} lr={result['best_lr']:.0e}{edge} "
          f"val loss {result['final_val_loss_mean']:.4f} ± "
          f"{result['final_val_loss_std']:.4f} over {len(seeds)} seed(s)  "
          f"({result['wall_s']:.0f} s)")
    else:
      log(f"[{task.name}] {spec.label:<15} SKIPPED ({result['status']}): "
          f"{result['message']}")
    results.append(result)
  target = add_targets(results, config)
  return {"task": task.name, "description": task.description,
          "num_params": task.num_params, "loss_unit": task.loss_unit,
          "metadata": task.metadata, "target_loss": target, "seeds": seeds,
          "reference": config.reference, "results": results}

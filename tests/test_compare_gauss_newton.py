"""The comparison's Gauss-Newton entries run the paper's protocol.

Abreu et al.'s code (natalieabreu/full-gauss-newton) feeds every inner step
of an outer step a fresh batch, evaluates its line search on as many new
batches, runs the inner optimizer on one schedule across the whole run with
its state kept, and counts the data so that Gauss-Newton and the baselines
read the same training tokens. These tests hold the comparison to that, on
the tiny preset.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")

import microadam_optax as mo
from microadam_compare import cli
from microadam_compare import compare
from microadam_compare import optimizers
from microadam_compare import tasks

INNER = 3  # inner steps per outer step in the runner tests


def _recording(task: tasks.Task) -> tuple[tasks.Task, list[int]]:
  """``task`` whose ``train_batches`` logs every stream index it serves."""
  served: list[int] = []
  original = task.train_batches

  def train_batches(start, num):
    served.extend(range(start, start + num))
    return original(start, num)

  return dataclasses.replace(task, train_batches=train_batches), served


def _runner(task: tasks.Task, name: str = "gn_full", every: int = 1,
            lr: float = 1e-2, steps: int = 2) -> compare._Runner:
  runner = compare._Runner(
      task, optimizers.get(name), compare.make_eval(task),
      jax.tree.map(jnp.asarray, task.eval_batches), every)
  runner.compile(lr, steps)
  return runner


def _mean_loss(task: tasks.Task, params, indices) -> float:
  """Mean loss of ``params`` over the stream's batches ``indices``."""
  losses = []
  for i in indices:
    inputs, targets = task.train_batches(i, 1)
    losses.append(float(task.loss(task.apply(params, inputs[0]),
                                  targets[0])))
  return float(np.mean(losses))


@pytest.fixture(scope="module")
def digits():
  return tasks.digits_task("tiny", gn_inner_steps=INNER)


def test_batch_indices_follow_the_paper_layout():
  layout = [compare.gauss_newton_batch_indices(t, 4) for t in range(3)]
  assert layout[0] == (range(0, 4), range(4, 8))
  assert layout[2] == (range(16, 20), range(20, 24))
  served = [i for inner, search in layout for i in (*inner, *search)]
  assert served == list(range(24))  # contiguous, each batch once
  assert compare.gauss_newton_batch_indices(
      2, 4, linesearch_batches=1) == (range(10, 14), range(14, 15))
  with pytest.raises(ValueError, match=r"inner_steps must be .*>= 1.* 0"):
    compare.gauss_newton_batch_indices(0, 0)
  with pytest.raises(ValueError, match="linesearch_batches.*-2"):
    compare.gauss_newton_batch_indices(0, 2, linesearch_batches=-2)


def test_gn_reads_each_batch_of_the_stream_once(digits):
  task, served = _recording(digits)
  runner = _runner(task, every=2, steps=4)
  served.clear()  # compiling reads the first chunk's batches
  record = runner.run(task, 1e-2, 4)
  # 4 outer steps x (3 inner + 3 line-search) batches, each read once.
  assert sorted(served) == list(range(4 * 2 * INNER))
  assert len(record["train_loss"]) == 4
  first = compare._Runner(task, optimizers.get("adamw"), runner.evaluate,
                          runner.eval_batches, 2)
  assert first.batches_per_step == (1, 0)
  assert runner.batches_per_step == (INNER, INNER)


def test_inner_steps_use_fresh_batches_and_the_search_its_own(digits):
  """One outer step from the initial parameters, checked against the loss
  on the stream's batches computed here."""
  runner = _runner(digits, steps=1)
  record = runner.run(digits, 1e-2, 1, keep_params=True)
  theta0 = jax.tree.map(jnp.asarray, digits.init_params)
  inner, search = compare.gauss_newton_batch_indices(0, INNER)
  # The outer step's loss is the mean over its three inner batches: a run
  # that reused one batch for every inner step would report batch 0's.
  mean_inner = _mean_loss(digits, theta0, inner)
  assert record["train_loss"][0] == pytest.approx(mean_inner, rel=1e-5)
  assert abs(_mean_loss(digits, theta0, [0]) - mean_inner) > 1e-3
  # The line search chose the best step size on the batches after them.
  alpha = record["step_sizes"][0]
  assert alpha in [pytest.approx(a) for a in mo.SQRT2_LINESEARCH]
  theta1 = record["params"]
  delta = jax.tree.map(lambda a, b: (a - b) / alpha, theta1, theta0)
  trial = {a: _mean_loss(digits, jax.tree.map(
      lambda p, d, a=a: p + a * d, theta0, delta), search)
           for a in mo.SQRT2_LINESEARCH}
  assert min(trial, key=trial.get) == pytest.approx(alpha)
  assert record["linesearch_loss"][0] == pytest.approx(trial[alpha],
                                                       rel=1e-4)
  on_inner = _mean_loss(digits, theta1, inner)
  assert abs(on_inner - record["linesearch_loss"][0]) > 1e-4


def test_one_inner_schedule_and_state_across_outer_steps(digits):
  spec = optimizers.get("gn_full")
  outer = 2
  tx = compare.make_optimizer(spec, digits, 1e-2, outer)
  params = jax.tree.map(jnp.asarray, digits.init_params)
  state = tx.init(params)
  model_fn = lambda p, b: digits.apply(p, b[0])
  loss_fn = lambda z, b: digits.loss(z, b[1])
  for t in range(outer):
    inner, search = compare.gauss_newton_batch_indices(t, INNER)
    updates, state = tx.update(
        None, state, params, model_fn=model_fn, loss_fn=loss_fn,
        batches=digits.train_batches(inner.start, len(inner)),
        linesearch_batches=digits.train_batches(search.start, len(search)))
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  counts = [int(x) for path, x in jax.tree_util.tree_leaves_with_path(
      state.inner_state) if "count" in jax.tree_util.keystr(path)]
  assert counts and set(counts) == {outer * INNER}  # never reset
  assert jax.tree.leaves(state.inner_iterate)  # the iterate is kept too
  # The schedule is the first-order runs' warmup + cosine over all inner
  # steps of the run.
  schedule = compare._learning_rate(spec, digits, 1.0, outer)
  for k in range(outer * INNER + 1):
    assert float(schedule(k)) == pytest.approx(
        float(compare.warmup_cosine(k, outer * INNER)))


def test_run_config_inner_steps_replace_the_task_s(digits):
  config = compare.RunConfig(steps=4, eval_every=2, gn_steps=1,
                             gn_eval_every=1, gn_inner_steps=2, tune=False,
                             seeds=(0,), progress=False,
                             lr_grids={"gn_full": [1e-2]})
  result = compare.run_optimizer(digits, optimizers.get("gn_full"), config)
  assert result["status"] == "ok", result.get("message")
  assert result["inner_steps"] == 2 and result["linesearch_batches"] == 2
  assert result["tokens_run"] == 2 * digits.metadata["batch_size"]
  with pytest.raises(SystemExit, match="--gn-inner-steps must be at least 1"):
    cli.main(["compare", "--quick", "--gn-inner-steps", "0"])


# ---------------------------------------------------------------------------
# The command line on the tiny preset.


def _compare(out, task: str, *extra) -> dict:
  code = cli.main(["compare", "--quick", "--task", task, "--optimizers",
                   "adamw,gn_full", "--seeds", "1", "--no-progress", "--out",
                   str(out), *extra])
  assert code == 0
  with open(out / "results.json", encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("gn") / "lm"
  return out, _compare(out, "lm")


def test_results_count_tokens_for_every_optimizer(lm_run):
  out, results = lm_run
  (task,) = results["tasks"]
  by_name = {r["name"]: r for r in task["results"]}
  adamw, gn = by_name["adamw"], by_name["gn_full"]
  sched = cli.SCHEDULES[("lm", "tiny")]
  batch_tokens = task["metadata"]["tokens_per_step"]
  for r in (adamw, gn):
    assert r["data_unit"] == "tokens"
    assert r["tokens_per_batch"] == batch_tokens
    assert r["tokens_seen"] == [s * r["tokens_per_step"] for s in r["steps"]]
    assert r["tokens_run"] == r["steps_run"] * r["tokens_per_step"]
    assert "tokens_to_target" in r and "steps_to_target" in r
    assert "time_to_target_s" in r
    hits = [x for x, v in zip(r["tokens_seen"], r["val_loss"])
            if v is not None and v <= task["target_loss"]]
    assert r["tokens_to_target"] == (hits[0] if hits else None)
  assert adamw["tokens_per_step"] == batch_tokens
  assert gn["tokens_per_step"] == sched["gn_inner_steps"] * batch_tokens
  # Outer x inner steps read the first-order runs' training tokens.
  assert gn["steps_run"] == sched["gn_steps"]
  assert gn["tokens_run"] == adamw["tokens_run"] == (
      sched["steps"] * batch_tokens)
  # The line search's batches are counted apart.
  assert gn["linesearch_batches"] == gn["inner_steps"] == sched[
      "gn_inner_steps"]
  assert gn["linesearch_tokens_run"] == gn["tokens_run"]
  assert len(gn["linesearch_loss"]) == len(gn["step_sizes"]) == gn[
      "steps_run"]
  assert all(any(math.isclose(a, b, rel_tol=1e-6)
                 for b in mo.SQRT2_LINESEARCH) for a in gn["step_sizes"])
  # Tuned like the others: full-length runs, by outer iterations.
  assert gn["sweep_steps"] == gn["steps_run"]
  assert len(gn["lr_grid"]) >= 3
  table = (out / "table.txt").read_text(encoding="utf-8")
  for text in ("tokens→tgt", "steps→tgt", "s→tgt", "outer x 2 inner",
               "line search read 2 batches of its own", "Tokens and seconds"):
    assert text in table, text
  assert (out / "lm_loss_vs_tokens.png").stat().st_size > 0


def test_classification_counts_examples(tmp_path):
  results = _compare(tmp_path / "digits", "digits", "--no-plots")
  (task,) = results["tasks"]
  for r in task["results"]:
    assert r["data_unit"] == "examples"
    assert r["tokens_per_batch"] == task["metadata"]["batch_size"]
  table = (tmp_path / "digits" / "table.txt").read_text(encoding="utf-8")
  assert "examples→tgt" in table


def test_same_command_same_numbers(lm_run, tmp_path):
  _, first = lm_run
  again = _compare(tmp_path / "again", "lm", "--no-plots")
  for a, b in zip(first["tasks"][0]["results"], again["tasks"][0]["results"]):
    for key in ("val_loss", "train_loss", "sweep", "best_lr", "tokens_seen",
                "tokens_to_target", "steps_to_target", "step_sizes",
                "linesearch_loss"):
      assert a.get(key) == b.get(key), (a["name"], key)

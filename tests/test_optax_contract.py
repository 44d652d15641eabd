"""The Optax contract, for every optimizer of the library.

Modelled on optax's own ``optax/contrib/_common_test.py``: convergence on
small targets in one jitted ``lax.scan``, no recompilation, extra arguments,
``inject_hyperparams``, ``MultiSteps``, dtype preservation and stability,
optax wrappers, and parameters sharded over an 8-device CPU mesh
(``tests/conftest.py`` sets ``--xla_force_host_platform_device_count=8``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import microadam_optax as mo


@dataclasses.dataclass(frozen=True)
class Case:
  """An optimizer under test."""
  name: str
  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any]
  static_args: tuple[str, ...]
  lr: float  # a learning rate that converges on the targets below

  def make(self, learning_rate=None, **kwargs) -> optax.GradientTransformation:
    lr = self.lr if learning_rate is None else learning_rate
    return self.factory(lr, **{**self.kwargs, **kwargs})


CASES = {
    "adam_mini": Case("adam_mini", mo.adam_mini, {}, mo.ADAM_MINI_STATIC_ARGS,
                      lr=3e-3),
    # density=1.0: on these tiny tensors Top-K keeps every entry, so the
    # error feedback stays zero and what converges is the window's estimate
    # of Adam's moments. Near the optimum MicroAdam moves by about
    # (1-b1^m)/sqrt(1-b2^m) ~ 6.5 learning rates per step (its bias
    # correction uses 1-b^t over a window of m terms), so the learning rate
    # must be small for the 3e-2 tolerance.
    "microadam": Case("microadam", mo.microadam, {"density": 1.0},
                      mo.MICROADAM_STATIC_ARGS, lr=1e-3),
    # A compressing configuration (half the entries per step, error feedback
    # active) for every test but convergence: with k = 1 of 2 entries it does
    # not reach 3e-2 on Rosenbrock within 30 000 steps at this learning rate.
    "microadam_sparse": Case("microadam_sparse", mo.microadam,
                             {"density": 0.5, "window": 4},
                             mo.MICROADAM_STATIC_ARGS, lr=1e-3),
    # MicroAdam on the leaves of at least 16 entries, dense Adam on the rest
    # ("b"): both parts run on these small trees.
    "microadam_mixed": Case("microadam_mixed", mo.microadam_mixed,
                            {"density": 0.5, "window": 4, "min_size": 16},
                            mo.MICROADAM_STATIC_ARGS, lr=1e-3),
}
ALL = sorted(CASES)
# The compressing configuration runs where compression changes the code path
# (dtypes, sharding, tracing); the wrappers only need one of each optimizer.
DENSE = ["adam_mini", "microadam"]
CONVERGING = DENSE


# ----------------------------------------------------------------------------
# Targets (as in optax's common tests; the mixed one is a dict here)


def _parabola(dtype):
  final = jnp.array([1.0, -1.0, 1.0], dtype)
  return (jnp.array([-1.0, 10.0, 1.0], dtype), final,
          lambda p: jnp.sum(jnp.square(p - final)))


def _rosenbrock(dtype):
  a, b = 1.0, 100.0
  return (jnp.array([0.0, 0.0], dtype), jnp.array([a, a * a], dtype),
          lambda p: jnp.square(a - p[0]) + b * jnp.square(p[1] - p[0] ** 2))


def _matrix_parabola(dtype):
  final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
  return (jnp.zeros((2, 2), dtype), final,
          lambda p: jnp.sum(jnp.square(p - final)))


def _mixed_tree(dtype):
  final = {
      "vec": jnp.array([1.0, -1.0, 2.0], dtype),
      "mat": jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype),
      "cube": (jnp.arange(6, dtype=dtype).reshape(2, 1, 3) - 2.5) / 2,
      "scalar": jnp.array(0.5, dtype),
  }

  def obj(p):
    return sum(jnp.sum(jnp.square(p[k] - final[k])) for k in final)

  return jax.tree.map(jnp.zeros_like, final), final, obj


TARGETS = {"parabola": _parabola, "rosenbrock": _rosenbrock,
           "matrix_parabola": _matrix_parabola, "mixed_tree": _mixed_tree}


def _random_params(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  shapes = {"w": (16, 8), "b": (8,), "k": (4, 2, 8)}
  return {k: jnp.asarray(rng.standard_normal(s), dtype)
          for k, s in shapes.items()}


def _grads_like(seed, params):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=rtol, atol=atol)


def _abstract(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


# ----------------------------------------------------------------------------
# Convergence


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("name", CONVERGING)
def test_converges(name, target):
  opt = CASES[name].make()
  initial, final, obj = TARGETS[target](jnp.float32)
  state = opt.init(initial)
  state = optax.tree.map_params(opt, lambda v: v, state)  # a no-op map works

  @jax.jit
  def run(params, state):
    def step(carry, _):
      params, state = carry
      grads = jax.grad(obj)(params)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    (params, state), _ = jax.lax.scan(step, (params, state), length=30_000)
    return params, state

  params, state = run(initial, state)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(final)):
    np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2)


# ----------------------------------------------------------------------------
# Tracing, extra arguments, hyperparameters


@pytest.mark.parametrize("name", ALL)
def test_extra_args_and_no_recompilation(name):
  opt = CASES[name].make()
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(None)
    updates, state = opt.update(grads, state, params,
                                unexpected_extra_arg_your_optimizer_ignores=1)
    return optax.apply_updates(params, updates), state

  params = _random_params(0)
  state = opt.init(params)
  for i in range(3):
    new_params, state = step(params, state, _grads_like(i + 1, params))
    assert any(bool(jnp.any(a != b)) for a, b in zip(
        jax.tree.leaves(new_params), jax.tree.leaves(params)))
    params = new_params
  assert len(traces) == 1


@pytest.mark.parametrize("name", DENSE)
def test_inject_hyperparams(name):
  case = CASES[name]
  opt = case.make(1e-2)
  inject = optax.inject_hyperparams(
      case.factory, static_args=case.static_args)(learning_rate=1e-2,
                                                  **case.kwargs)
  params = _random_params(1)
  state, istate = opt.init(params), inject.init(params)

  @jax.jit
  def both(grads, state, istate):
    return opt.update(grads, state, params), inject.update(grads, istate,
                                                           params)

  for i in range(3):
    grads = _grads_like(10 + i, params)
    (updates, state), (iupdates, istate) = both(grads, state, istate)
    _assert_trees_close(iupdates, updates)
    _assert_trees_close(istate.inner_state, state, atol=1e-5)
  # The injected learning rate is live: halving it halves the update.
  grads = _grads_like(20, params)
  istate.hyperparams["learning_rate"] = jnp.asarray(5e-3, jnp.float32)
  (updates, _), (iupdates, _) = both(grads, state, istate)
  _assert_trees_close(iupdates, jax.tree.map(lambda u: u / 2, updates))


@pytest.mark.parametrize("name", DENSE)
def test_learning_rate_schedule(name):
  case = CASES[name]
  opt = case.make(1e-2)
  sched = case.make(optax.constant_schedule(1e-2))
  params = _random_params(2)
  s1, s2 = opt.init(params), sched.init(params)

  @jax.jit
  def both(grads, s1, s2):
    return opt.update(grads, s1, params), sched.update(grads, s2, params)

  for i in range(3):
    (u1, s1), (u2, s2) = both(_grads_like(30 + i, params), s1, s2)
    _assert_trees_close(u1, u2)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("learning_rate, match", [
    ("fast", r"learning_rate must be a real number or a schedule, got 'fast'"),
    (float("nan"), r"learning_rate must be a finite number, got nan"),
    (float("inf"), r"learning_rate must be a finite number, got inf"),
])
def test_invalid_learning_rate_is_refused(name, learning_rate, match):
  with pytest.raises(ValueError, match=match):
    CASES[name].make(learning_rate)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", DENSE)
def test_multisteps_accumulates(name, dtype):
  opt = CASES[name].make(1e-2)
  multi = optax.MultiSteps(opt, every_k_schedule=3)
  params = _random_params(3, jnp.dtype(dtype))
  grads = _grads_like(40, params)
  state = multi.init(params)
  update = jax.jit(multi.update)
  for _ in range(2):
    updates, state = update(grads, state, params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.dtype == p.dtype
      np.testing.assert_array_equal(np.asarray(u, np.float32), 0.0)
  updates, state = update(grads, state, params)  # k-th call: the mean of 3
  want, _ = jax.jit(opt.update)(grads, opt.init(params), params)
  _assert_trees_close(updates, want, rtol=2e-2, atol=1e-4)
  assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", ALL)
def test_updates_keep_params_dtype(name, dtype):
  opt = CASES[name].make()
  params = _random_params(4, jnp.dtype(dtype))
  state = opt.init(params)
  updates, state = jax.jit(opt.update)(_grads_like(50, params), state, params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.dtype == p.dtype and u.shape == p.shape
    assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32))))


@contextlib.contextmanager
def _enable_x64():
  """64-bit types inside the block, on JAX versions old and new."""
  enable = getattr(jax, "enable_x64", None)
  if enable is None:
    try:
      from jax.experimental import enable_x64 as enable  # pylint: disable=g-import-not-at-top
    except ImportError:
      enable = None
  if enable is not None:
    with enable(True):
      yield
    return
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", old)


@pytest.mark.parametrize("name, dtype", [
    (name, dtype) for name in DENSE
    for dtype in ("float16", "bfloat16", "float32", "float64")] + [
        ("microadam_sparse", "float16"), ("microadam_sparse", "bfloat16")])
def test_state_shape_dtype_stable(name, dtype):
  def check():
    dt = jnp.dtype(dtype)
    opt = CASES[name].make()
    params, _, obj = _mixed_tree(dt)
    params = jax.tree.map(lambda x: x + 0.25, params)

    @jax.jit
    def step(params, state):
      grads = jax.grad(obj)(params)
      # As optax's test: a lax.cond makes both branches' types agree.
      cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      updates, state = jax.lax.cond(
          cond, lambda: opt.update(grads, state, params),
          lambda: (jax.tree.map(jnp.zeros_like, params), state))
      return optax.apply_updates(params, updates), state

    state = opt.init(params)
    want = _abstract(state)
    for _ in range(3):
      params, state = step(params, state)
      assert _abstract(state) == want
      assert {jnp.result_type(x) for x in jax.tree.leaves(params)} == {dt}

  if dtype == "float64":
    with _enable_x64():
      check()
  else:
    check()


# ----------------------------------------------------------------------------
# Inside optax wrappers


@pytest.mark.parametrize("name", DENSE)
def test_chain(name):
  opt = CASES[name].make(1e-2)
  chained = optax.chain(optax.clip_by_global_norm(1.0), opt)
  params = _random_params(5)
  grads = _grads_like(60, params)
  norm = optax.tree.norm(grads)
  clipped = jax.tree.map(lambda g: g / norm, grads)

  @jax.jit
  def both(grads, clipped):
    return (chained.update(grads, chained.init(params), params)[0],
            opt.update(clipped, opt.init(params), params)[0])

  u1, u2 = both(grads, clipped)
  _assert_trees_close(u1, u2)


@pytest.mark.parametrize("name", DENSE)
def test_masked(name):
  opt = CASES[name].make(1e-2)
  masked = optax.masked(opt, {"w": True, "b": False, "k": True})
  params = _random_params(6)
  grads = _grads_like(70, params)
  sub = {k: params[k] for k in ("w", "k")}

  @jax.jit
  def both(grads):
    return (masked.update(grads, masked.init(params), params)[0],
            opt.update({k: grads[k] for k in sub}, opt.init(sub), sub)[0])

  updates, want = both(grads)
  np.testing.assert_array_equal(updates["b"], grads["b"])  # passed through
  _assert_trees_close({k: updates[k] for k in sub}, want)


@pytest.mark.parametrize("name", DENSE)
def test_multi_transform(name):
  opt = CASES[name].make(1e-2)
  multi = optax.multi_transform({"opt": opt, "sgd": optax.sgd(0.1)},
                                {"w": "opt", "b": "sgd", "k": "opt"})
  params = _random_params(7)
  grads = _grads_like(80, params)
  sub = {k: params[k] for k in ("w", "k")}

  @jax.jit
  def both(grads):
    return (multi.update(grads, multi.init(params), params)[0],
            opt.update({k: grads[k] for k in sub}, opt.init(sub), sub)[0])

  updates, want = both(grads)
  np.testing.assert_allclose(updates["b"], -0.1 * grads["b"], rtol=1e-6)
  _assert_trees_close({k: updates[k] for k in sub}, want)


@pytest.mark.parametrize("name", DENSE)
def test_apply_if_finite(name):
  opt = optax.apply_if_finite(CASES[name].make(1e-2), max_consecutive_errors=5)
  params = _random_params(8)
  state = opt.init(params)
  update = jax.jit(opt.update)
  updates, state = update(_grads_like(90, params), state, params)
  params = optax.apply_updates(params, updates)
  bad = _grads_like(91, params)
  bad["w"] = bad["w"].at[3, 2].set(jnp.nan)
  updates, bad_state = update(bad, state, params)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
  assert int(bad_state.notfinite_count) == 1
  _assert_trees_close(bad_state.inner_state, state.inner_state, 0, 0)
  updates, state = update(_grads_like(92, params), bad_state, params)
  assert int(state.notfinite_count) == 0
  assert all(bool(jnp.all(jnp.isfinite(u))) and bool(jnp.any(u != 0))
             for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", DENSE)
def test_sequence_params(name):
  """Tuples and lists of arrays are pytrees like dicts."""
  opt = CASES[name].make(1e-2)
  params = _random_params(9)
  grads = _grads_like(100, params)
  keys = sorted(params)

  @jax.jit
  def run(trees):  # one compilation for the three structures
    return [opt.update(g, opt.init(p), p)[0] for p, g in trees]

  want, *got = run([(params, grads)] + [
      (seq(params[k] for k in keys), seq(grads[k] for k in keys))
      for seq in (tuple, list)])
  for seq, out in zip((tuple, list), got):
    assert type(out) is seq
    _assert_trees_close(seq(want[k] for k in keys), out)


# ----------------------------------------------------------------------------
# Sharding


@pytest.mark.parametrize("name", ALL)
def test_sharded_params(name):
  devices = jax.devices()
  assert len(devices) >= 8, (
      "tests/conftest.py must set --xla_force_host_platform_device_count=8 "
      "before jax is imported")
  mesh = jax.sharding.Mesh(np.array(devices[:8]).reshape(4, 2),
                           ("data", "model"))
  specs = {"w": P("data", "model"), "b": P("model"), "k": P(None, None,
                                                            "data")}
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  opt = CASES[name].make(1e-2)
  params = _random_params(10)
  grads = _grads_like(110, params)

  @jax.jit
  def run(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), updates

  put = lambda t: jax.device_put(t, shardings)
  sharded_params = put(params)
  state = opt.init(sharded_params)  # as users do: init on the sharded params
  sharded, s_updates = run(sharded_params, state, put(grads))
  plain, p_updates = run(params, opt.init(params), grads)
  for k in specs:
    ndim = params[k].ndim
    assert s_updates[k].sharding.is_equivalent_to(shardings[k], ndim), (
        k, s_updates[k].sharding)
    assert sharded[k].sharding.is_equivalent_to(shardings[k], ndim), (
        k, sharded[k].sharding)
  _assert_trees_close(s_updates, p_updates)
  _assert_trees_close(sharded, plain)

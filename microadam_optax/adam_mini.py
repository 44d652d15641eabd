"""Adam-mini: Adam with one second-moment scalar per Hessian block.

Zhang et al., *Adam-mini: Use Fewer Learning Rates To Gain More*,
arXiv:2406.16793 (ICLR 2025).

The first moment ``m`` is kept in full; the second moment of a parameter is
kept per *block* (per token of an embedding, per attention head of a query or
key projection, per output neuron of other projections, one for a whole norm
scale), which halves Adam's state. Which entries form a block is decided by
the *partition* (:mod:`microadam_optax.adam_mini_blocks`): automatic (rules
on parameter names and shapes, translated from the authors' v1.1.1 code to
Flax layouts), a pytree of axes, or a function of the path and the leaf.

The partition of a leaf is stored in the shape of its ``nu``: ``nu`` has one
entry per block, and ``update`` reads the blocks back from that shape, so it
needs neither parameter names nor Python-side state. A leaf whose blocks
differ along one axis (a fused ``[q | k | v]`` kernel: one v per query head,
per key head, per value neuron) also has its ``segments`` in the state, as a
static leafless node (:class:`AdamMiniSegments`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import PartitionSpec as P

from microadam_optax import _sharding
from microadam_optax._alias import decoupled_alias
from microadam_optax._checks import check_float_leaves
from microadam_optax.adam_mini_blocks import ADAM_MINI_DEFAULT_RULES
from microadam_optax.adam_mini_blocks import AdamMiniRules
from microadam_optax.adam_mini_blocks import AdamMiniSpec
from microadam_optax.adam_mini_blocks import adam_mini_partition
from microadam_optax.adam_mini_blocks import _check_partition_arg
from microadam_optax.adam_mini_blocks import _default_decay_mask
from microadam_optax.adam_mini_blocks import _resolve

# What this module defines; the partition's names (imported above, still
# importable from here) are adam_mini_blocks'. The package's __all__ has both.
__all__ = [
    "ADAM_MINI_STATIC_ARGS",
    "AdamMiniSegments",
    "ScaleByAdamMiniState",
    "adam_mini",
    "scale_by_adam_mini",
]

#: Arguments of :func:`adam_mini` that are not numbers. Pass them as
#: ``static_args`` to :func:`optax.inject_hyperparams` (which would otherwise
#: take a callable ``partition``, ``mask`` or ``mu_dtype`` for a schedule).
ADAM_MINI_STATIC_ARGS = ("partition", "mask", "mu_dtype")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class AdamMiniSegments:
  """One leaf's ``segments`` in :class:`ScaleByAdamMiniState`, for ``update``.

  A static pytree node (no arrays: checkpoints, shardings and
  :func:`optax.tree` utilities see nothing), so ``update`` cuts the blocks
  of a fused query/key/value kernel from the state alone, as it reads the
  other leaves' blocks from the shape of their ``nu``.

  Attributes:
    segments: ``None``, or the leaf's ``AdamMiniSpec.segments``.
  """
  segments: Optional[tuple[Any, tuple[tuple[int, int], ...]]] = None


class ScaleByAdamMiniState(NamedTuple):
  """State of :func:`scale_by_adam_mini`.

  Attributes:
    count: number of updates so far, int32 scalar.
    mu: first moment, shaped like the params (their dtype, or ``mu_dtype``).
    nu: second moment, float32, one entry per block: for each leaf the
      ``v_shape`` of its :class:`AdamMiniSpec` (the leaf's shape with the
      averaged axes reduced to size 1; along an axis cut into ``segments``,
      the segments' blocks one after the other).
    segments: shaped like the params, an :class:`AdamMiniSegments` (static,
      no arrays) per leaf: the ``segments`` of its spec.
  """
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  segments: Any = None


# ----------------------------------------------------------------------------
# The update


def _block_mean(x: jax.Array, v_shape: tuple[int, ...]) -> jax.Array:
  """Mean of ``x`` over each block; the result has shape ``v_shape``."""
  shape = x.shape
  if all(s in (1, d) for s, d in zip(v_shape, shape)):
    axes = tuple(i for i, (s, d) in enumerate(zip(v_shape, shape)) if s != d)
    return jnp.mean(x, axis=axes, keepdims=True) if axes else x
  split = [n for s, d in zip(v_shape, shape) for n in (s, d // s)]
  return jnp.mean(x.reshape(split), axis=tuple(range(1, 2 * len(shape), 2)))


def _divide_blocks(m: jax.Array, denom: jax.Array) -> jax.Array:
  """``m / denom`` with ``denom`` (one entry per block) spread over blocks."""
  shape, v_shape = m.shape, denom.shape
  if all(s in (1, d) for s, d in zip(v_shape, shape)):
    return m / denom
  split = [n for s, d in zip(v_shape, shape) for n in (s, d // s)]
  ones = [n for s in v_shape for n in (s, 1)]
  return (m.reshape(split) / denom.reshape(ones)).reshape(shape)


def _segment_ids(segments: tuple[tuple[int, int], ...]) -> np.ndarray:
  """The block of each entry along a segmented axis (static)."""
  ids, first = [], 0
  for n, b in segments:
    ids.append(first + np.arange(n) // (n // b))
    first += b
  return np.concatenate(ids).astype(np.int32)


def _fold(x: jax.Array, src: int, dst: int) -> tuple[jax.Array, int]:
  """``x`` with axis ``src`` merged into axis ``dst`` (``src`` the major
  part), and where the merged axis is."""
  at = dst - 1 if src < dst else dst
  x = jnp.moveaxis(x, src, at)
  return x.reshape(x.shape[:at] + (x.shape[at] * x.shape[at + 1],)
                   + x.shape[at + 2:]), at


def _unfold(y: jax.Array, src: int, dst: int, n: int) -> jax.Array:
  """The inverse of :func:`_fold`, ``n`` the length of axis ``src``."""
  at = dst - 1 if src < dst else dst
  y = y.reshape(y.shape[:at] + (n, y.shape[at] // n) + y.shape[at + 1:])
  return jnp.moveaxis(y, at, src)


def _cut_segments(r: jax.Array, axis: int,
                  segments: tuple[tuple[int, int], ...]) -> jax.Array:
  """Each segment of ``r`` along ``axis`` averaged in its own groups."""
  full = list(r.shape)
  parts, start = [], 0
  for n, b in segments:
    part = jax.lax.slice_in_dim(r, start, start + n, axis=axis)
    full[axis] = b
    parts.append(_block_mean(part, tuple(full)))
    start += n
  return jnp.concatenate(parts, axis=axis)


def _segmented_block_mean(x: jax.Array, v: jax.Array, axis: Any,
                          segments: tuple[tuple[int, int], ...]) -> jax.Array:
  """Mean of ``x`` over each block of a segmented leaf; shaped like ``v``.

  The other axes are averaged first, so the segments are cut from an array
  as small as v but for ``axis``, placed like v (whole along ``axis``). A
  pair ``axis = (src, dst)`` cuts the segments from axis ``src`` folded into
  ``dst`` (Gemma's ``kv_einsum``: ``[k | v]`` on axis 0, heads' features on
  axis 3), and v has size 1 on ``src``.
  """
  full = list(v.shape)
  if isinstance(axis, tuple):
    src, dst = axis
    full[src], full[dst] = x.shape[src], x.shape[dst]
    r, at = _fold(_block_mean(x, tuple(full)), src, dst)
    return jnp.expand_dims(_cut_segments(r, at, segments), src)
  full[axis] = x.shape[axis]
  r = _sharding.keep_sharding(_block_mean(x, tuple(full)), v)
  return _cut_segments(r, axis, segments)


def _segmented_divide(m: jax.Array, denom: jax.Array, axis: Any,
                      segments: tuple[tuple[int, int], ...]) -> jax.Array:
  """``m / denom`` for a segmented leaf: denom spread along ``axis`` first."""
  ids = jnp.asarray(_segment_ids(segments))
  if isinstance(axis, tuple):  # segments of axis src folded into dst
    src, dst = axis
    den, at = _fold(denom, src, dst)
    spread = _unfold(jnp.take(den, ids, axis=at), src, dst, m.shape[src])
    return _divide_blocks(m, spread)
  spread = jnp.take(denom, ids, axis=axis)
  sharding = _sharding.known_sharding(m)
  if sharding is not None and _sharding.is_traced(spread):
    # Explicit axes: split the spread denominator like m along ``axis``.
    entry = (tuple(sharding.spec) + (None,) * m.ndim)[axis]
    spec = [None] * m.ndim
    spec[axis] = entry
    spread = _sharding.with_explicit_sharding(
        spread, jax.sharding.NamedSharding(sharding.mesh, P(*spec)))
  return _divide_blocks(m, spread)


def _nu_zeros(param: Any, v_shape: tuple[int, ...]) -> jax.Array:
  """Zeros for one v, split like ``param`` along the axes it keeps whole.

  An axis of v as long as the parameter's (one v per entry along it) takes
  the parameter's sharding there; the axes v averages over are replicated.
  """
  sharding = _sharding.known_sharding(param)
  if sharding is None:
    return jnp.zeros(v_shape, jnp.float32)
  spec = tuple(sharding.spec) + (None,) * (len(v_shape) - len(sharding.spec))
  keep = P(*(e if n == d else None
             for e, n, d in zip(spec, v_shape, jnp.shape(param))))
  return _sharding.zeros(v_shape, jnp.float32, param, sharding.mesh, keep)


def _check_hparams(**hparams: Any) -> None:
  """Raises ValueError for b1, b2, eps, weight_decay out of range."""
  ranges = {"b1": (0.0, 1.0, "[0, 1)"), "b2": (0.0, 1.0, "[0, 1)"),
            "eps": (0.0, math.inf, "[0, inf)"),
            "weight_decay": (0.0, math.inf, "[0, inf)")}
  for name, value in hparams.items():
    if callable(value) and name == "weight_decay":
      continue
    if _sharding.is_traced(value):
      continue  # injected hyperparameter: checked where it was a number.
    try:
      x = float(np.asarray(value))
    except (TypeError, ValueError):
      raise ValueError(
          f"{name} must be a real number, got {value!r}.") from None
    lo, hi, text = ranges[name]
    if not lo <= x < hi:
      raise ValueError(f"{name} must be in {text}, got {value!r}.")


def _canonical_mu_dtype(mu_dtype: Any) -> Any:
  if mu_dtype is None:
    return None
  try:
    dtype = jnp.dtype(mu_dtype)
  except TypeError:
    raise ValueError(
        f"mu_dtype must be None or a floating dtype, got {mu_dtype!r}."
    ) from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"mu_dtype must be None or a floating dtype, got {mu_dtype!r}.")
  return dtype


def scale_by_adam_mini(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    partition: Any = None,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by Adam-mini: Adam with one v per Hessian block.

  For each block :math:`b` of a parameter (its entries that share one
  second moment, see ``partition``) and step :math:`t`:

  .. math::

    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    v_{b,t} = \beta_2 v_{b,t-1} + (1-\beta_2)\,
      \tfrac{1}{|b|}\textstyle\sum_{i \in b} g_{t,i}^2, \\
    u_{t,i} &= \frac{m_{t,i} / (1-\beta_1^t)}
      {\sqrt{v_{b,t} / (1-\beta_2^t)} + \epsilon} \quad (i \in b).

  With one block per entry this is :func:`optax.scale_by_adam`; with the
  automatic partition ``nu`` is a few floats per row or column, so the state
  is about half of Adam's.

  A block shares its v, so one non-finite gradient entry makes the v of its
  whole block NaN (or inf), and with it the update of every entry of the
  block, at that step and, through the moving average, at every later step:
  a whole attention head, output neuron or token row, or the whole tensor
  for a norm scale, where Adam would lose one entry. Wrap the optimizer in
  :func:`optax.apply_if_finite` (``optax.apply_if_finite(mo.adam_mini(lr),
  max_consecutive_errors=...)``) to skip such steps and keep the state.

  Args:
    b1: decay of the first moment, in ``[0, 1)``.
    b2: decay of the second moment, in ``[0, 1)``.
    eps: added to the square root of the second moment, ``>= 0``.
    partition: which entries share a v. ``None``: the automatic rules
      (:data:`ADAM_MINI_DEFAULT_RULES`; see :func:`adam_mini_partition`),
      on the logical axis names of boxed params where they carry them (an
      NNX state whose ``nnx.Param`` have sharding names: ``nnx.Optimizer``'s
      case); for unboxed params with names, pass
      ``adam_mini_partition(params, axis_names=...)``. A pytree shaped like the params (or a prefix of it) whose leaves are
      tuples of the axes v is averaged over (``()``: plain Adam; all axes:
      one v for the tensor), :class:`AdamMiniSpec` (e.g. from
      :func:`adam_mini_partition`, edited; its ``segments`` cut one axis
      into parts with their own blocks, as in a fused query/key/value
      kernel) or ``None`` (automatic for that leaf). Or a function ``(path, leaf) -> axes | AdamMiniSpec | None`` of
      the ``/``-joined path (``"layers_0/mlp/up_proj/kernel"``) and the leaf,
      such as an :class:`AdamMiniRules`.
    mu_dtype: dtype of the first moment; ``None``: the params' dtype.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`ScaleByAdamMiniState`. ``nu`` is float32 whatever the params'
    dtype; its leaves have the params' tree structure but one entry per block
    (so :func:`optax.tree.map_params` also visits them).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import microadam_optax as mo
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    >>> tx = mo.scale_by_adam_mini(partition={"w": (0,), "b": ()})
    >>> state = tx.init(params)
    >>> jax.tree.map(jnp.shape, state.nu)
    {'b': (3,), 'w': (1, 3)}
    >>> updates, state = tx.update(params, state)
    >>> updates["w"]
    Array([[1., 1., 1.],
           [1., 1., 1.],
           [1., 1., 1.],
           [1., 1., 1.]], dtype=float32)

  References:
    Zhang et al., `Adam-mini: Use Fewer Learning Rates To Gain More
    <https://arxiv.org/abs/2406.16793>`_, ICLR 2025.
  """
  _check_hparams(b1=b1, b2=b2, eps=eps)
  mu_dtype = _canonical_mu_dtype(mu_dtype)
  if not (partition is None or callable(partition)):
    _check_partition_arg(partition)

  def init_fn(params):
    check_float_leaves(params, "Adam-mini")
    _, treedef, specs = _resolve(params, partition, warn=True)
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    nu = jax.tree_util.tree_unflatten(treedef, [
        _nu_zeros(p, s.v_shape) for p, s in zip(treedef.flatten_up_to(params),
                                                specs)])
    segments = jax.tree_util.tree_unflatten(
        treedef, [AdamMiniSegments(s.segments) for s in specs])
    return ScaleByAdamMiniState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu,
                                segments=segments)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    count = optax.safe_increment(state.count)
    # Decays in the dtype they multiply and bias corrections by an integer
    # power (exact at t = 1): at the first step m_hat = g and v_hat is the
    # block mean of g^2 to the last bit.
    b2f = jnp.asarray(b2, jnp.float32)
    bc2 = 1 - b2f ** count

    def leaf(g, m, v, segments):
      if g is None:
        return None, m, v
      g = g if hasattr(g, "dtype") else jnp.asarray(g)  # Python floats
      cdt = jnp.promote_types(g.dtype, jnp.float32)
      b1c = jnp.asarray(b1, cdt)
      gc = g.astype(cdt)
      m_new = b1c * m.astype(cdt) + (1 - b1c) * gc
      if g.size:
        sq = jnp.square(gc)
        mean = (_block_mean(sq, v.shape) if segments is None
                else _segmented_block_mean(sq, v, *segments))
        v_new = b2f * v + (1 - b2f) * mean.astype(jnp.float32)
        v_new = _sharding.keep_sharding(v_new, v)
      else:
        v_new = v
      # The update reads m as stored (as optax.adam does with bf16 params):
      # XLA then writes m in place without keeping the old m alive.
      m_new = m_new.astype(m.dtype)
      denom = jnp.sqrt(v_new / bc2).astype(cdt) + eps
      m_hat = m_new.astype(cdt) / (1 - b1c ** count)
      if segments is None:
        u = _divide_blocks(m_hat, denom)
      else:
        u = _segmented_divide(m_hat, denom, *segments)
      return u.astype(g.dtype), m_new, v_new

    is_none = lambda x: x is None
    treedef = jax.tree.structure(updates, is_leaf=is_none)
    try:
      leaves = [treedef.flatten_up_to(t)
                for t in (updates, state.mu, state.nu)]
    except ValueError as e:
      raise ValueError(
          "The updates' tree does not match Adam-mini's state (was the state "
          f"made by init() on the same params structure?): {e}") from e
    if state.segments is None:  # a state made without segments
      segments = [None] * len(leaves[0])
    else:
      try:
        segments = [getattr(x, "segments", None)
                    for x in treedef.flatten_up_to(state.segments)]
      except ValueError as e:
        raise ValueError(
            "The updates' tree does not match Adam-mini's state (was the "
            f"state made by init() on the same params structure?): {e}"
        ) from e
    out = [leaf(*args) for args in zip(*leaves, segments)]
    u, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
    return u, ScaleByAdamMiniState(count=count, mu=mu, nu=nu,
                                   segments=state.segments)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adam_mini(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    *,
    partition: Any = None,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam-mini with decoupled weight decay (AdamW-style).

  :func:`scale_by_adam_mini` followed by decoupled weight decay and the
  learning rate:

  .. math::

    \theta_{t+1} = \theta_t - \eta_t \left(u_t + \lambda\, \theta_t\right),

  where :math:`u_t` is the Adam-mini direction of :func:`scale_by_adam_mini`,
  :math:`\eta_t` the learning rate and :math:`\lambda` the weight decay.

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay of the first moment, in ``[0, 1)``.
    b2: decay of the second moment, in ``[0, 1)``.
    eps: added to the square root of the second moment, ``>= 0``.
    weight_decay: decoupled weight decay :math:`\lambda \ge 0` (or a
      schedule).
    mask: pytree (or callable returning one) of booleans selecting the leaves
      that weight decay applies to, as in :func:`optax.adamw`. ``None``: every
      leaf of rank >= 2 whose name rule (see :func:`adam_mini_partition`;
      the ``partition``'s rules when it is an :class:`AdamMiniRules`) is
      neither ``"bias"`` nor ``"norm"`` -- no decay on biases, norm scales
      and other vectors, as the authors do (unlike :func:`microadam` and
      :func:`optax.adamw`, whose ``None`` decays every leaf).
    partition: see :func:`scale_by_adam_mini`.
    mu_dtype: see :func:`scale_by_adam_mini`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`. With
    :func:`optax.inject_hyperparams`, pass
    ``static_args=ADAM_MINI_STATIC_ARGS``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import microadam_optax as mo
    >>> f = lambda p: jnp.sum((p["w"] - 1.0) ** 2) + jnp.sum(p["b"] ** 2)
    >>> params = {"w": jnp.zeros((8, 4)), "b": jnp.ones(4)}
    >>> tx = mo.adam_mini(learning_rate=0.1)
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda p, s: tx.update(jax.grad(f)(p), s, p))
    >>> for _ in range(100):
    ...   updates, state = step(params, state)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(f(params) < 1e-2)
    True

  References:
    Zhang et al., `Adam-mini: Use Fewer Learning Rates To Gain More
    <https://arxiv.org/abs/2406.16793>`_, ICLR 2025.
  """
  _check_hparams(weight_decay=weight_decay)
  if mask is None:
    mask = _default_decay_mask(partition)
  return decoupled_alias(
      scale_by_adam_mini(b1=b1, b2=b2, eps=eps, partition=partition,
                         mu_dtype=mu_dtype),
      learning_rate, weight_decay, mask)

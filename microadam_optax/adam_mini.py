"""Adam-mini: Adam with one second-moment scalar per Hessian block.

Zhang et al., *Adam-mini: Use Fewer Learning Rates To Gain More*,
arXiv:2406.16793 (ICLR 2025).

The first moment ``m`` is kept in full; the second moment of a parameter is
kept per *block* (per token of an embedding, per attention head of a query or
key projection, per output neuron of other projections, one for a whole norm
scale), which halves Adam's state. Which entries form a block is decided by
the *partition*: automatic (rules on parameter names and shapes, translated
from the authors' v1.1.1 code to Flax layouts), a pytree of axes, or a
function of the path and the leaf.

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
import re
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import numerics

from jax.sharding import PartitionSpec as P

from microadam_optax import _sharding
from microadam_optax._checks import check_float_leaves

__all__ = [
    "ADAM_MINI_DEFAULT_RULES",
    "ADAM_MINI_STATIC_ARGS",
    "AdamMiniRules",
    "AdamMiniSegments",
    "AdamMiniSpec",
    "ScaleByAdamMiniState",
    "adam_mini",
    "adam_mini_partition",
    "scale_by_adam_mini",
]

#: The kinds of block a rule can assign (Flax layouts: ``Dense`` kernels are
#: ``[in, out]``, embedding tables ``[vocab, d]``; with
#: ``AdamMiniRules(layout="out_in")``, 2-D kernels are ``[out, in]``, as in
#: Hugging Face's ``FlaxConv1D`` of GPT-2 and in PyTorch):
#:
#: * ``"embedding"``: one v per token (row of ``[vocab, d]``; averaged over
#:   every axis but the first). Tied input/output embeddings are one table
#:   and get this rule.
#: * ``"output"``: one v per output column of an untied head ``[d, vocab]``
#:   or of a classifier ``[d, classes]`` (averaged over every axis but the
#:   output axis).
#: * ``"head"``: one v per attention head. ``[d, heads, head_dim]``
#:   (``DenseGeneral``, linen/NNX ``MultiHeadAttention``): averaged over the
#:   first and the last axis. ``[d, heads * head_dim]``: one v per column, or
#:   per group of ``head_dim`` columns when :class:`AdamMiniRules` is given
#:   ``head_dim`` or ``num_heads``.
#: * ``"qkv"``: a fused query/key/value kernel ``[d, 3 * d]`` (GPT-2's
#:   ``c_attn``; ``[3 * d, d]`` out-first) whose output axis is ``[queries |
#:   keys | values]``: the query and key thirds as ``"head"``, the value
#:   third as ``"value"``, in one leaf (an :class:`AdamMiniSpec` with
#:   ``segments``). Only 2-D kernels whose output axis is three times the
#:   input axis (or, with an explicit ``layout``, a multiple of 3).
#: * ``"value"``: one v per output neuron of a kernel whose only input axis
#:   is the first (``[d, heads, head_dim]`` or ``[d, out]``); one v for the
#:   whole tensor with ``AdamMiniRules(whole_value=True)``.
#: * ``"neuron"``: one v per output neuron of a kernel whose output axis is
#:   the last (``[heads, head_dim, d]`` attention output, ``[d, ffn]`` MLP).
#: * ``"bias"``: plain Adam, one v per entry; no weight decay by default.
#: * ``"norm"``: one v for the whole tensor; no weight decay by default.
#: * ``"whole"``: one v for the whole tensor.
#: * ``"adam"``: plain Adam, one v per entry.
#:
#: ``embedding``, ``output``, ``head``, ``qkv``, ``value`` and ``neuron`` need
#: a leaf of at least two dimensions; on smaller leaves (and ``qkv`` on
#: leaves it cannot cut in three) the rule is passed over and the next
#: matching rule applies.
RULE_KINDS = ("embedding", "output", "head", "qkv", "value", "neuron", "bias",
              "norm", "whole", "adam")
_NEEDS_2D = ("embedding", "output", "head", "qkv", "value", "neuron")

#: Kernel layouts :class:`AdamMiniRules` knows (see its ``layout``).
LAYOUTS = ("auto", "in_out", "out_in")

#: A matrix at least this large (entries) that no rule names, and so gets one
#: v for the whole tensor, is named in a warning.
LARGE_WHOLE_TENSOR = 1 << 16

#: The automatic partition: ``(pattern, rule)`` pairs tried in order on the
#: ``/``-joined path of each leaf (``"layers_0/self_attn/q_proj/kernel"``);
#: the first pattern that matches and whose rule applies to the leaf's rank
#: wins; a leaf that no rule takes gets one v for the whole tensor
#: (``"whole"``), as in the authors' code, and is named in a warning when it
#: is a matrix of at least :data:`LARGE_WHOLE_TENSOR` entries. A pattern is a
#: regular expression (``re.search``, case-insensitive) or a tuple of
#: substrings (any of them, case-insensitive). The names are the authors'
#: v1.1.1 names (``embed``, ``embd``, ``wte``, ``lm_head``, ``output``,
#: ``q_proj``, ``wq``, ``v_proj``, ``o_proj``, ``wo``, ``attn.proj``,
#: ``mlp``, ``feed_forward``, ``linear``) plus their Flax counterparts
#: (``query``/``key``/``value``/``out`` of linen and NNX
#: ``MultiHeadAttention``, ``dense`` for ``nn.Linear``, ``scale`` and ``ln``
#: for norms), GPT-2's (Hugging Face ``FlaxGPT2``: ``wte``, ``wpe``, the
#: fused ``c_attn``, ``c_proj``, ``c_fc``, ``ln_1``), fused ``qkv`` /
#: ``qkv_proj`` / ``wqkv`` kernels in ``[q | k | v]`` order, and classifier
#: heads (``head``, ``classifier``, ``score``).
ADAM_MINI_DEFAULT_RULES: tuple[tuple[Any, Any], ...] = (
    (r"(^|/)bias$", "bias"),
    (r"norm|(^|/|_)ln(_\w+|\d+)?(/|$)|(^|/)scale$", "norm"),
    (r"embed|embd|wte|wpe", "embedding"),
    (r"(^|/)(lm_head|output|final_layer)(/|$)", "output"),
    (r"(^|/)(head|classifier|score)(/|$)", "output"),
    (r"(^|/)(c_attn|qkv|qkv_proj|wqkv)(/|$)", "qkv"),
    (r"(^|/)(q_proj|k_proj|wq|wk|query|key)(/|$)", "head"),
    (r"(^|/)(v_proj|wv|value)(/|$)", "value"),
    (r"(^|/)(o_proj|wo|out|out_proj|c_proj)(/|$)|attn/proj", "neuron"),
    (r"mlp|feed_forward|linear|dense|(^|/)c_fc(/|$)", "neuron"),
)

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
  segments: Optional[tuple[int, tuple[tuple[int, int], ...]]] = None


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


class AdamMiniSpec(NamedTuple):
  """How the second moment of one leaf is shared.

  Attributes:
    rule: the rule that chose the blocks (one of :data:`RULE_KINDS`,
      ``"custom"`` for a rule given as axes or a function, ``"user"`` for
      axes given in a ``partition``).
    axes: the axes v is averaged over: ``()`` is plain Adam, every axis one v
      for the tensor. Where ``v_shape[i]`` is neither 1 nor the leaf's size
      on axis ``i``, the average is over contiguous groups of
      ``shape[i] // v_shape[i]`` entries of that axis (a head of a 2-D
      query kernel).
    v_shape: the shape of the leaf's ``nu``, one entry per block.
    segments: ``None``, or ``(axis, ((length, blocks), ...))``: that axis is
      cut into consecutive segments of ``length`` entries, each averaged in
      ``blocks`` contiguous groups of ``length // blocks`` (its own grouping),
      and ``v_shape[axis]`` is the sum of the ``blocks``. A fused ``[d, 3d]``
      query/key/value kernel with heads of 4 columns has ``segments=(1, ((d,
      d // 4), (d, d // 4), (d, d)))``: one v per query head, per key head and
      per value neuron.
  """
  rule: str
  axes: tuple[int, ...]
  v_shape: tuple[int, ...]
  segments: Optional[tuple[int, tuple[tuple[int, int], ...]]] = None


# ----------------------------------------------------------------------------
# Paths and specs


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _path_keys(path: Sequence[Any]) -> tuple[str, ...]:
  """Key names of a JAX key path, without the ``.value`` of NNX Variables."""
  keys = list(path)
  while keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and (
      keys[-1].name == "value"):
    keys.pop()
  return tuple(_key_name(k) for k in keys)


def _path_str(keys: tuple[str, ...]) -> str:
  return "/".join(keys)


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in jnp.shape(leaf))


def _is_axes(x: Any) -> bool:
  return (isinstance(x, (tuple, list)) and not isinstance(x, AdamMiniSpec)
          and all(isinstance(a, (int, np.integer)) and not isinstance(a, bool)
                  for a in x))


def _v_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(1 if i in axes else d for i, d in enumerate(shape))


def _spec_from_axes(rule: str, axes: Any, shape: tuple[int, ...],
                    where: str) -> AdamMiniSpec:
  """Validates ``axes`` against ``shape`` and builds the spec."""
  ndim = len(shape)
  if not _is_axes(axes):
    raise ValueError(
        f"partition for {where} must be a tuple of int axes, got {axes!r}.")
  norm = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"partition for {where}: axis {a} is out of range for a leaf of "
          f"shape {shape} (valid: [{-ndim}, {ndim - 1}]).")
    norm.append(int(a) % ndim)
  if len(set(norm)) != len(norm):
    raise ValueError(f"partition for {where} repeats an axis: {tuple(axes)}.")
  norm = tuple(sorted(norm))
  return AdamMiniSpec(rule, norm, _v_shape(shape, norm))


def _segmented_spec(rule: str, shape: tuple[int, ...], v_shape: list[int],
                    axis: int, segments: Sequence[tuple[int, int]],
                    where: str) -> AdamMiniSpec:
  """The spec of a leaf whose ``axis`` is cut into ``segments``.

  ``v_shape[axis]`` is ignored (it is the sum of the segments' blocks).
  Segments that all group alike collapse to a plain ``v_shape``.
  """
  segs = tuple((int(n), int(b)) for n, b in segments)
  ok = (segs and all(n >= 1 and 1 <= b <= n and n % b == 0 for n, b in segs)
        and sum(n for n, _ in segs) == shape[axis])
  if not ok:
    raise ValueError(
        f"partition for {where}: segments {segs} do not cut axis {axis} of "
        f"the leaf's shape {shape} (the lengths must sum to {shape[axis]} "
        f"and each segment's blocks must divide its length).")
  v_shape = list(v_shape)
  groups = {n // b for n, b in segs}
  v_shape[axis] = sum(b for _, b in segs)
  v_shape = tuple(v_shape)
  if len(groups) == 1:  # one grouping along the whole axis: no segments.
    return _check_spec(AdamMiniSpec(rule, (), v_shape), shape, where)
  plain = _check_spec(
      AdamMiniSpec(rule, (), tuple(d if i == axis else s for i, (s, d) in
                                   enumerate(zip(v_shape, shape)))),
      shape, where)
  axes = tuple(sorted(set(plain.axes) | {axis}))
  return AdamMiniSpec(rule, axes, v_shape, (axis, segs))


def _check_spec(spec: AdamMiniSpec, shape: tuple[int, ...],
                where: str) -> AdamMiniSpec:
  """Validates a spec given by a user (e.g. an edited partition)."""
  v_shape = tuple(int(s) for s in spec.v_shape)
  segments = getattr(spec, "segments", None)
  if segments is not None:
    try:
      axis, segs = segments
      axis = int(axis)
      segs = tuple(tuple(x) for x in segs)
    except (TypeError, ValueError):
      raise ValueError(
          f"partition for {where}: segments must be None or (axis, ((length, "
          f"blocks), ...)), got {segments!r}.") from None
    if not (len(v_shape) == len(shape) and -len(shape) <= axis < len(shape)):
      raise ValueError(
          f"partition for {where}: segments axis {axis} or v_shape {v_shape} "
          f"does not fit the leaf's shape {shape}.")
    axis %= len(shape)
    want = sum(int(b) for _, b in segs) if segs else None
    if v_shape[axis] != want:
      raise ValueError(
          f"partition for {where}: v_shape[{axis}] = {v_shape[axis]} must be "
          f"the segments' blocks summed ({want}).")
    return _segmented_spec(str(spec.rule), shape, list(v_shape), axis, segs,
                           where)
  ok = len(v_shape) == len(shape) and all(
      s >= 1 and d % s == 0 for s, d in zip(v_shape, shape))
  if not ok:
    raise ValueError(
        f"partition for {where}: v_shape {v_shape} does not divide the "
        f"leaf's shape {shape} (each v_shape[i] must be >= 1 and divide "
        f"shape[i]).")
  axes = tuple(i for i, (s, d) in enumerate(zip(v_shape, shape)) if s < d)
  return AdamMiniSpec(str(spec.rule), axes, v_shape)


# ----------------------------------------------------------------------------
# Automatic rules


def _compile_pattern(pattern: Any) -> Callable[[str], bool]:
  if isinstance(pattern, str):
    try:
      regex = re.compile(pattern, re.IGNORECASE)
    except re.error as e:
      raise ValueError(
          f"rule pattern {pattern!r} is not a valid regular expression: "
          f"{e}.") from e
    return lambda path: regex.search(path) is not None
  if (isinstance(pattern, (tuple, list, frozenset, set)) and pattern
      and all(isinstance(p, str) for p in pattern)):
    subs = tuple(p.lower() for p in pattern)
    return lambda path: any(s in path.lower() for s in subs)
  raise ValueError(
      f"rule pattern must be a regular expression (str) or a non-empty tuple "
      f"of substrings, got {pattern!r}.")


def _head_width(cols: int, head_dim: Optional[int], num_heads: Optional[int],
                where: str, shape: tuple[int, ...]) -> Optional[int]:
  """Columns per head of ``cols`` query/key columns; None: no head info."""
  if head_dim is None and num_heads is None:
    return None
  hd = head_dim if head_dim is not None else cols // num_heads
  if hd < 1 or cols % hd or (num_heads is not None
                             and cols != hd * num_heads):
    raise ValueError(
        f"cannot cut the {cols} output columns of {where} (shape "
        f"{shape}) into heads of head_dim={head_dim}, "
        f"num_heads={num_heads}: the columns must be a multiple of "
        f"head_dim (or of num_heads). Use head_dim for grouped-query "
        f"attention, where keys have fewer heads than queries.")
  return hd


def _qkv_axis(shape: tuple[int, ...], layout: str) -> Optional[int]:
  """The output axis of a fused [q | k | v] kernel, or None."""
  if len(shape) != 2:
    return None
  rows, cols = shape
  if layout == "in_out":
    return 1 if cols % 3 == 0 else None
  if layout == "out_in":
    return 0 if rows % 3 == 0 else None
  if cols == 3 * rows:
    return 1
  if rows == 3 * cols:
    return 0
  return None  # "auto" cannot tell: the leaf falls to the next rule.


def _kind_spec(kind: str, shape: tuple[int, ...], rules: "AdamMiniRules",
               where: str) -> Optional[AdamMiniSpec]:
  """The spec a named rule gives a leaf, or None where it does not apply."""
  ndim = len(shape)
  if kind in _NEEDS_2D and ndim < 2:
    return None
  out_in = ndim == 2 and rules.layout == "out_in"
  out = 0 if out_in else ndim - 1  # the output axis of a 2-D kernel
  if kind in ("bias", "adam"):
    axes: tuple[int, ...] = ()
  elif kind in ("norm", "whole"):
    axes = tuple(range(ndim))
  elif kind == "embedding":
    axes = tuple(range(1, ndim))
  elif kind == "output" and ndim == 2 and (
      (shape[0] == rules._width) != (shape[1] == rules._width)):  # pylint: disable=protected-access
    # A head beside embeddings of width d: its other axis is the output,
    # whatever the layout of the tree's other kernels (a Dense classifier
    # on a FlaxConv1D GPT-2).
    axes = (0,) if shape[0] == rules._width else (1,)  # pylint: disable=protected-access
  elif kind in ("output", "neuron"):
    axes = (1,) if out_in else tuple(range(ndim - 1))
  elif kind == "value":
    axes = (tuple(range(ndim)) if rules.whole_value
            else (1,) if out_in else (0,))
  elif kind == "head":
    if ndim >= 3:
      axes = (0, ndim - 1)
    else:
      hd = _head_width(shape[out], rules.head_dim, rules.num_heads, where,
                       shape)
      if hd is None:
        axes = (1 - out,)  # no head information: one v per output column.
      else:
        v_shape = [1, 1]
        v_shape[out] = shape[out] // hd
        return AdamMiniSpec(kind, (0, 1), tuple(v_shape))
  elif kind == "qkv":
    axis = _qkv_axis(shape, rules.layout)
    if axis is None:
      return None
    third = shape[axis] // 3
    hd = _head_width(third, rules.head_dim, rules.num_heads, where, shape)
    qk = (third, third if hd is None else third // hd)
    v = (third, 1 if rules.whole_value else third)
    return _segmented_spec(kind, shape, [1, 1], axis, (qk, qk, v), where)
  else:  # pragma: no cover - guarded by the constructor.
    raise AssertionError(kind)
  return AdamMiniSpec(kind, axes, _v_shape(shape, axes))


def _validate_rules(rules: Any) -> tuple[tuple[Any, Any], ...]:
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
    raise ValueError(
        f"rules must be a sequence of (pattern, rule) pairs, got {rules!r}.")
  out = []
  for i, pair in enumerate(rules):
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
      raise ValueError(
          f"rules[{i}] must be a (pattern, rule) pair, got {pair!r}.")
    pattern, rule = pair
    _compile_pattern(pattern)
    if isinstance(rule, str):
      if rule not in RULE_KINDS:
        raise ValueError(
            f"rules[{i}]: rule must be one of {RULE_KINDS}, a tuple of axes "
            f"or a function of the leaf's shape, got {rule!r}.")
    elif not (_is_axes(rule) or callable(rule)):
      raise ValueError(
          f"rules[{i}]: rule must be one of {RULE_KINDS}, a tuple of axes or "
          f"a function of the leaf's shape, got {rule!r}.")
    out.append((pattern if isinstance(pattern, str) else tuple(pattern),
                tuple(rule) if _is_axes(rule) else rule))
  return tuple(out)


def _positive_or_none(name: str, value: Any) -> Optional[int]:
  if value is None:
    return None
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 1):
    raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}.")
  return int(value)


@dataclasses.dataclass(frozen=True, init=False)
class AdamMiniRules:
  """Adam-mini's automatic partition: rules on parameter paths and shapes.

  A callable ``(path, leaf) -> AdamMiniSpec``, so it can be passed as the
  ``partition`` of :func:`scale_by_adam_mini` / :func:`adam_mini` and as the
  ``rules`` of :func:`adam_mini_partition`.

  Attributes:
    rules: ``(pattern, rule)`` pairs tried in order (see
      :data:`ADAM_MINI_DEFAULT_RULES`). A rule is one of :data:`RULE_KINDS`,
      a tuple of axes, or a function of the leaf's shape returning a tuple of
      axes (or ``None`` to pass the leaf on to the next rule).
    head_dim: width of one attention head, to give 2-D ``[d, heads *
      head_dim]`` query/key kernels (and the query and key thirds of a fused
      ``"qkv"`` kernel) one v per head instead of one per column. Prefer it
      to ``num_heads`` with grouped-query attention. GPT-2 of every size has
      ``head_dim=64``.
    num_heads: number of heads of every 2-D query/key kernel (alternative to
      ``head_dim``).
    layout: which axis of a 2-D kernel is its output: ``"in_out"`` (Flax
      ``Dense``, ``[in, out]``), ``"out_in"`` (Hugging Face ``FlaxConv1D``
      of GPT-2, PyTorch ``Linear``: ``[out, in]``) or ``"auto"``: where
      the tree has fused ``"qkv"`` kernels, their shape (``[3d, d]`` or
      ``[d, 3d]``) decides for the whole tree (:func:`adam_mini_partition`
      and ``init`` look); otherwise ``"in_out"``. Kernels of 3 or more
      dimensions are read as Flax ``DenseGeneral`` kernels either way.
    whole_value: one v for each whole value matrix (``"value"`` leaves and
      the value third of ``"qkv"`` leaves) instead of one per output neuron:
      the authors' advice for runs shorter than 10-20 k steps, which "can
      converge faster initially". Measured on a tiny GPT-2-style model
      (``benchmarks/adam_mini_short_run.py``: 400 steps, 5 seeds, 3 learning
      rates; the README's Adam-mini section has the table) it did not
      converge faster: on a copy task the training loss averaged over the
      run was 0.002-0.012 higher at every rate (per-seed differences of both
      signs), on a bigram task the same to 1e-4. So the default stays the
      paper's one v per value neuron.

  Example:
    >>> import jax.numpy as jnp
    >>> import microadam_optax as mo
    >>> rules = mo.AdamMiniRules(
    ...     (("router", "whole"),) + mo.ADAM_MINI_DEFAULT_RULES, head_dim=2)
    >>> rules("layers_0/self_attn/q_proj/kernel", jnp.zeros((8, 8)))
    AdamMiniSpec(rule='head', axes=(0, 1), v_shape=(1, 4), segments=None)
    >>> spec = rules("h/0/attn/c_attn/kernel", jnp.zeros((4, 12)))  # [q|k|v]
    >>> spec.v_shape, spec.segments  # 2 query heads, 2 key heads, 4 values
    ((1, 8), (1, ((4, 2), (4, 2), (4, 4))))
  """
  rules: tuple[tuple[Any, Any], ...]
  head_dim: Optional[int]
  num_heads: Optional[int]
  layout: str
  whole_value: bool

  def __init__(self, rules: Sequence[tuple[Any, Any]] = ADAM_MINI_DEFAULT_RULES,
               *, head_dim: Optional[int] = None,
               num_heads: Optional[int] = None, layout: str = "auto",
               whole_value: bool = False):
    rules = _validate_rules(rules)
    head_dim = _positive_or_none("head_dim", head_dim)
    num_heads = _positive_or_none("num_heads", num_heads)
    if head_dim is not None and num_heads is not None:
      raise ValueError(
          f"give head_dim or num_heads, not both (got head_dim={head_dim}, "
          f"num_heads={num_heads}).")
    if layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    if not isinstance(whole_value, (bool, np.bool_)):
      raise ValueError(f"whole_value must be a bool, got {whole_value!r}.")
    object.__setattr__(self, "rules", rules)
    object.__setattr__(self, "head_dim", head_dim)
    object.__setattr__(self, "num_heads", num_heads)
    object.__setattr__(self, "layout", layout)
    object.__setattr__(self, "whole_value", bool(whole_value))
    object.__setattr__(self, "_matchers",
                       tuple(_compile_pattern(p) for p, _ in rules))
    # The model width (embedding tables' second axis) when a tree told it.
    object.__setattr__(self, "_width", None)

  def _replace(self, **changes: Any) -> "AdamMiniRules":
    kwargs = dict(head_dim=self.head_dim, num_heads=self.num_heads,
                  layout=self.layout, whole_value=self.whole_value)
    kwargs.update(changes)
    return AdamMiniRules(self.rules, **kwargs)

  def _match(self, path: str, shape: Sequence[int]
             ) -> tuple[AdamMiniSpec, bool]:
    """The spec of a leaf, and whether a rule (not the fallback) gave it."""
    shape = tuple(int(d) for d in shape)
    for matches, (_, rule) in zip(self._matchers, self.rules):  # pytype: disable=attribute-error
      if not matches(path):
        continue
      if isinstance(rule, str):
        got = _kind_spec(rule, shape, self, path)
        if got is not None:
          return got, True
        continue
      axes = rule(shape) if callable(rule) else rule
      if axes is None:
        continue
      if isinstance(axes, AdamMiniSpec):
        return _check_spec(axes, shape, path), True
      try:
        return _spec_from_axes("custom", axes, shape, path), True
      except ValueError:
        if _is_axes(rule) and not callable(rule):
          continue  # fixed axes that do not fit this leaf's rank: pass.
        raise
    return _kind_spec("whole", shape, self, path), False

  def spec(self, path: str, shape: Sequence[int]) -> AdamMiniSpec:
    """The spec of a leaf of ``shape`` at ``path`` (``"a/b/kernel"``)."""
    return self._match(path, shape)[0]

  def __call__(self, path: str, leaf: Any) -> AdamMiniSpec:
    return self.spec(path, _shape(leaf))


def _for_tree(rules: AdamMiniRules, wheres: Sequence[str],
              shapes: Sequence[tuple[int, ...]]) -> AdamMiniRules:
  """``rules`` with what the whole tree tells: layout and model width.

  ``layout="auto"`` is fixed by the tree's fused QKV kernels (``[3d, d]``:
  ``"out_in"``); the width ``d`` of its 2-D embedding tables lets a 2-D
  ``"output"`` head be read whatever its layout (the axis that is not ``d``
  is the output).
  """
  layouts, widths = set(), set()
  for where, shape in zip(wheres, shapes):
    rule = rules.spec(where, shape).rule
    if rule == "qkv":
      layouts.add("out_in" if _qkv_axis(shape, "auto") == 0 else "in_out")
    elif rule == "embedding" and len(shape) == 2:
      widths.add(shape[1])
  out = rules
  if rules.layout == "auto" and layouts == {"out_in"}:
    out = rules._replace(layout="out_in")
  if len(widths) == 1:
    if out is rules:
      out = rules._replace()
    object.__setattr__(out, "_width", widths.pop())
  return out


# ----------------------------------------------------------------------------
# Resolving a partition


_LAYER_RE = re.compile(r"(layers?|blocks?|^h)[_.]?(\d+)$", re.IGNORECASE)
_LAYER_PARENT_RE = re.compile(r"^(layers?|blocks?|h)$", re.IGNORECASE)


def _layer_ids(keys: tuple[str, ...]) -> set[tuple[str, ...]]:
  ids = set()
  for i, k in enumerate(keys):
    if _LAYER_RE.search(k) or (k.isdigit() and i > 0
                               and _LAYER_PARENT_RE.match(keys[i - 1])):
      ids.add(keys[:i + 1])
  return ids


def _warn_if_unmatched(paths: list[tuple[str, ...]], shapes, specs) -> None:
  """Warns when a transformer-looking tree met no embedding/attention rule."""
  big = sum(len(s) >= 2 for s in shapes)
  layers = set()
  for keys in paths:
    layers |= _layer_ids(keys)
  if big < 4 or len(layers) < 2:
    return
  rules = {s.rule for s in specs}
  missing = []
  if not rules & {"embedding", "output"}:
    missing.append("embedding or output head")
  if not rules & {"head", "qkv"}:
    missing.append("attention query/key")
  if missing:
    warnings.warn(
        f"Adam-mini found no {' and no '.join(missing)} parameters in a model "
        f"with {len(layers)} layers (it looks like a transformer): those "
        f"tensors fall back to coarser blocks, which can slow training. Name "
        f"them as in ADAM_MINI_DEFAULT_RULES, or pass rules / a partition "
        f"(see adam_mini_partition).",
        UserWarning, stacklevel=4)


def _flatten_partition(partition: Any) -> dict[tuple[str, ...], Any]:
  """A partition pytree as ``{path keys: axes | AdamMiniSpec | None}``."""
  is_leaf = lambda x: x is None or isinstance(x, AdamMiniSpec) or _is_axes(x)
  flat, _ = jax.tree_util.tree_flatten_with_path(partition, is_leaf=is_leaf)
  out = {}
  for path, entry in flat:
    keys = _path_keys(path)
    if not is_leaf(entry):
      raise ValueError(
          f"partition entry at {_path_str(keys) or '<root>'} must be a tuple "
          f"of int axes, an AdamMiniSpec or None, got {entry!r}.")
    out[keys] = entry
  return out


def _check_partition_arg(partition: Any) -> None:
  if partition is None or callable(partition):
    return
  _flatten_partition(partition)


def _warn_if_large_whole(unmatched: list[tuple[str, tuple[int, ...]]]
                         ) -> None:
  """Warns, naming them, about large matrices that no rule named."""
  large = [(w, s) for w, s in unmatched
           if len(s) >= 2 and math.prod(s) >= LARGE_WHOLE_TENSOR]
  if not large:
    return
  shown = ", ".join(f"{w!r} {s}" for w, s in large[:8])
  more = f" and {len(large) - 8} more" if len(large) > 8 else ""
  warnings.warn(
      f"Adam-mini's rules name none of these {len(large)} matrices of >= "
      f"{LARGE_WHOLE_TENSOR} entries, so each gets one v for the whole "
      f"tensor: {shown}{more}. Give them a rule (e.g. "
      f"mo.AdamMiniRules(((r'my_proj', 'neuron'),) + "
      f"mo.ADAM_MINI_DEFAULT_RULES); kinds: {RULE_KINDS}) or a partition "
      f"entry; a rule 'whole' keeps one v and silences this.",
      UserWarning, stacklevel=4)


def _resolve(params: Any, partition: Any, *, warn: bool):
  """Per-leaf specs of ``params`` as (flat path/leaf list, treedef, specs)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  if partition is None:
    partition = AdamMiniRules()
  automatic = isinstance(partition, AdamMiniRules)
  table = None if callable(partition) else _flatten_partition(partition)
  paths = [_path_keys(path) for path, _ in flat]
  wheres = [_path_str(keys) or "<root>" for keys in paths]
  shapes = [_shape(leaf) for _, leaf in flat]
  default = _for_tree(AdamMiniRules(), wheres, shapes)
  if automatic:
    partition = _for_tree(partition, wheres, shapes)
  specs, unmatched = [], []
  for (_, leaf), keys, where, shape in zip(flat, paths, wheres, shapes):
    rules = None
    if automatic:
      rules = partition
    elif table is None:
      entry = partition(_path_str(keys), leaf)
    else:
      for n in range(len(keys), -1, -1):  # longest prefix given
        if keys[:n] in table:
          entry = table[keys[:n]]
          break
      else:
        raise ValueError(
            f"partition has no entry for the parameter at {where!r}; give "
            f"axes (or None for the automatic rules) for every leaf.")
    if rules is None and entry is None:
      rules = default
    if rules is not None:
      spec, matched = rules._match(where, shape)  # pylint: disable=protected-access
      if not matched:
        unmatched.append((where, shape))
    elif isinstance(entry, AdamMiniSpec):
      spec = _check_spec(entry, shape, where)
    else:
      spec = _spec_from_axes("user", entry, shape, where)
    specs.append(spec)
  if warn and automatic:
    _warn_if_unmatched(paths, shapes, specs)
  if warn:
    _warn_if_large_whole(unmatched)
  return flat, treedef, specs


def adam_mini_partition(
    params: Any,
    rules: Optional[Union[AdamMiniRules, Sequence[tuple[Any, Any]]]] = None,
) -> Any:
  """Which blocks Adam-mini's automatic rules give each parameter.

  Applies ``rules`` to the ``/``-joined path and the shape of every leaf of
  ``params`` (arrays, ``jax.ShapeDtypeStruct``, a Flax NNX ``nnx.State``).
  With ``layout="auto"`` (the default) the fused query/key/value kernels of
  the tree, if any, decide which axis of its 2-D kernels is the output: a
  Hugging Face ``FlaxGPT2`` tree (``c_attn`` kernel ``[3d, d]``) is read
  ``[out, in]``, a Flax ``Dense`` port of nanoGPT (``[d, 3d]``) ``[in, out]``.

  Warns (``UserWarning``) once when a transformer-looking tree (several
  layers of 2-D+ tensors) matched no embedding/output rule or no query/key
  rule, as the authors' code does, and once, naming them, for the matrices
  of at least :data:`LARGE_WHOLE_TENSOR` entries that no rule named and that
  therefore get one v for the whole tensor. The result, edited or not, is a
  valid ``partition`` for :func:`scale_by_adam_mini`.

  Args:
    params: the parameters, or their shapes.
    rules: ``None`` (:data:`ADAM_MINI_DEFAULT_RULES`), a sequence of
      ``(pattern, rule)`` pairs, or an :class:`AdamMiniRules`.

  Returns:
    A pytree shaped like ``params`` whose leaves are :class:`AdamMiniSpec`
    ``(rule, axes, v_shape, segments)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import microadam_optax as mo
    >>> params = {"embed": {"embedding": jnp.zeros((100, 8))},
    ...           "mlp": {"kernel": jnp.zeros((8, 32)), "bias": jnp.zeros(32)},
    ...           "norm": {"scale": jnp.ones(8)}}
    >>> spec = mo.adam_mini_partition(params)
    >>> spec["embed"]["embedding"]
    AdamMiniSpec(rule='embedding', axes=(1,), v_shape=(100, 1), segments=None)
    >>> spec["mlp"]["kernel"].v_shape, spec["mlp"]["bias"].rule, spec["norm"]["scale"].rule
    ((1, 32), 'bias', 'norm')

    GPT-2 as Hugging Face's ``FlaxGPT2LMHeadModel`` stores it (``FlaxConv1D``
    kernels are ``[out, in]``; the head is tied to ``wte``), ``d = 8`` with
    heads of 4:

    >>> d = 8
    >>> block = {"attn": {"c_attn": {"kernel": jnp.zeros((3 * d, d))},
    ...                   "c_proj": {"kernel": jnp.zeros((d, d))}},
    ...          "mlp": {"c_fc": {"kernel": jnp.zeros((4 * d, d))},
    ...                  "c_proj": {"kernel": jnp.zeros((d, 4 * d))}}}
    >>> gpt2 = {"transformer": {"wte": {"embedding": jnp.zeros((50, d))},
    ...                         "h": {"0": block}}}
    >>> spec = mo.adam_mini_partition(gpt2, mo.AdamMiniRules(head_dim=4))
    >>> attn = spec["transformer"]["h"]["0"]["attn"]
    >>> attn["c_attn"]["kernel"].v_shape, attn["c_attn"]["kernel"].segments
    ((12, 1), (0, ((8, 2), (8, 2), (8, 8))))
    >>> attn["c_proj"]["kernel"].v_shape  # one v per output neuron (row)
    (8, 1)
  """
  if rules is None:
    rules = AdamMiniRules()
  elif not isinstance(rules, AdamMiniRules):
    rules = AdamMiniRules(rules)
  _, treedef, specs = _resolve(params, rules, warn=True)
  return jax.tree_util.tree_unflatten(treedef, specs)


def _default_decay_mask(partition: Any) -> Callable[[Any], Any]:
  """Weight decay on leaves of rank >= 2 whose name rule is not bias/norm."""
  rules = partition if isinstance(partition, AdamMiniRules) else AdamMiniRules()

  def mask(params):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for path, leaf in flat:
      shape = _shape(leaf)
      rule = rules.spec(_path_str(_path_keys(path)), shape).rule
      out.append(len(shape) >= 2 and rule not in ("bias", "norm"))
    return jax.tree_util.tree_unflatten(treedef, out)

  return mask


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


def _segmented_block_mean(x: jax.Array, v: jax.Array, axis: int,
                          segments: tuple[tuple[int, int], ...]) -> jax.Array:
  """Mean of ``x`` over each block of a segmented leaf; shaped like ``v``.

  The other axes are averaged first, so the segments are cut from an array
  as small as v but for ``axis``, placed like v (whole along ``axis``).
  """
  full = list(v.shape)
  full[axis] = x.shape[axis]
  r = _sharding.keep_sharding(_block_mean(x, tuple(full)), v)
  parts, start = [], 0
  for n, b in segments:
    part = jax.lax.slice_in_dim(r, start, start + n, axis=axis)
    full[axis] = b
    parts.append(_block_mean(part, tuple(full)))
    start += n
  return jnp.concatenate(parts, axis=axis)


def _segmented_divide(m: jax.Array, denom: jax.Array, axis: int,
                      segments: tuple[tuple[int, int], ...]) -> jax.Array:
  """``m / denom`` for a segmented leaf: denom spread along ``axis`` first."""
  spread = jnp.take(denom, jnp.asarray(_segment_ids(segments)), axis=axis)
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
    if isinstance(value, jax.core.Tracer):
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
      (:data:`ADAM_MINI_DEFAULT_RULES`; see :func:`adam_mini_partition`).
      A pytree shaped like the params (or a prefix of it) whose leaves are
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
    count = numerics.safe_increment(state.count)
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
      and other vectors, as the authors do.
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
  if not (callable(learning_rate) or isinstance(learning_rate, jax.core.Tracer)):
    try:
      lr = float(np.asarray(learning_rate))
    except (TypeError, ValueError):
      raise ValueError(
          f"learning_rate must be a real number or a schedule, got "
          f"{learning_rate!r}.") from None
    if not math.isfinite(lr):
      raise ValueError(
          f"learning_rate must be a finite number, got {learning_rate!r}.")
  _check_hparams(weight_decay=weight_decay)
  if mask is None:
    mask = _default_decay_mask(partition)
  return optax.chain(
      scale_by_adam_mini(b1=b1, b2=b2, eps=eps, partition=partition,
                         mu_dtype=mu_dtype),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )

"""Adam-mini's partition: which entries of each parameter share one v.

The rules on parameter names and shapes (translated from the authors' v1.1.1
code to Flax layouts), the specs they give (:class:`AdamMiniSpec`), their
validation, and :func:`adam_mini_partition`, which shows them. The optimizer
itself (:mod:`microadam_optax.adam_mini`) reads a leaf's blocks from its spec
and nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from microadam_optax._trees import path_keys as _path_keys

__all__ = [
    "ADAM_MINI_DEFAULT_RULES",
    "AdamMiniRules",
    "AdamMiniSpec",
    "adam_mini_partition",
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
               where: str, width: Optional[int] = None
               ) -> Optional[AdamMiniSpec]:
  """The spec a named rule gives a leaf, or None where it does not apply.

  ``width`` is the model width ``d`` when the tree tells it (its embedding
  tables' second axis; see :func:`_for_tree`), else ``None``.
  """
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
      (shape[0] == width) != (shape[1] == width)):
    # A head beside embeddings of width d: its other axis is the output,
    # whatever the layout of the tree's other kernels (a Dense classifier
    # on a FlaxConv1D GPT-2).
    axes = (0,) if shape[0] == width else (1,)
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

  @functools.cached_property
  def _matchers(self) -> tuple[Callable[[str], bool], ...]:
    return tuple(_compile_pattern(p) for p, _ in self.rules)

  def _replace(self, **changes: Any) -> "AdamMiniRules":
    kwargs = dict(head_dim=self.head_dim, num_heads=self.num_heads,
                  layout=self.layout, whole_value=self.whole_value)
    kwargs.update(changes)
    return AdamMiniRules(self.rules, **kwargs)

  def _match(self, path: str, shape: Sequence[int],
             width: Optional[int] = None) -> tuple[AdamMiniSpec, bool]:
    """The spec of a leaf, and whether a rule (not the fallback) gave it.

    ``width``: the tree's model width, if known (see :func:`_for_tree`).
    """
    shape = tuple(int(d) for d in shape)
    for matches, (_, rule) in zip(self._matchers, self.rules):
      if not matches(path):
        continue
      if isinstance(rule, str):
        got = _kind_spec(rule, shape, self, path, width)
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
    return _kind_spec("whole", shape, self, path, width), False

  def spec(self, path: str, shape: Sequence[int]) -> AdamMiniSpec:
    """The spec of a leaf of ``shape`` at ``path`` (``"a/b/kernel"``)."""
    return self._match(path, shape)[0]

  def __call__(self, path: str, leaf: Any) -> AdamMiniSpec:
    return self.spec(path, _shape(leaf))


def _for_tree(rules: AdamMiniRules, wheres: Sequence[str],
              shapes: Sequence[tuple[int, ...]]
              ) -> tuple[AdamMiniRules, Optional[int]]:
  """What the whole tree tells ``rules``: ``(rules with its layout, width)``.

  ``layout="auto"`` is fixed by the tree's fused QKV kernels (``[3d, d]``:
  ``"out_in"``); the width ``d`` of its 2-D embedding tables (``None`` unless
  they all agree) lets a 2-D ``"output"`` head be read whatever its layout
  (the axis that is not ``d`` is the output).
  """
  layouts, widths = set(), set()
  for where, shape in zip(wheres, shapes):
    rule = rules.spec(where, shape).rule
    if rule == "qkv":
      layouts.add("out_in" if _qkv_axis(shape, "auto") == 0 else "in_out")
    elif rule == "embedding" and len(shape) == 2:
      widths.add(shape[1])
  if rules.layout == "auto" and layouts == {"out_in"}:
    rules = rules._replace(layout="out_in")
  return rules, (widths.pop() if len(widths) == 1 else None)


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
  default, default_width = _for_tree(AdamMiniRules(), wheres, shapes)
  if automatic:
    partition, width = _for_tree(partition, wheres, shapes)
  specs, unmatched = [], []
  for (_, leaf), keys, where, shape in zip(flat, paths, wheres, shapes):
    rules, rules_width = None, None
    if automatic:
      rules, rules_width = partition, width
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
      rules, rules_width = default, default_width
    if rules is not None:
      spec, matched = rules._match(where, shape, rules_width)  # pylint: disable=protected-access
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

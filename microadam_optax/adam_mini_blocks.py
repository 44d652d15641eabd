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
import types
import warnings
from typing import (Any, Callable, Mapping, NamedTuple, Optional, Sequence,
                    Union)

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from microadam_optax import _trees
from microadam_optax._sharding import entry_axes
from microadam_optax._trees import path_keys as _path_keys

__all__ = [
    "ADAM_MINI_AXIS_ROLES",
    "ADAM_MINI_DEFAULT_AXIS_NAMES",
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
    (r"(^|/)(o_proj|wo|out|out_proj|c_proj|attn_vec_einsum)(/|$)|attn/proj",
     "neuron"),
    # Gemma's einsum kernels (their axes: ADAM_MINI_DEFAULT_AXIS_NAMES).
    (r"(^|/)q_einsum(/|$)", "head"),
    (r"(^|/)(kv_einsum|qkv_einsum)(/|$)", "qkv"),
    (r"(^|/)gating_einsum(/|$)", "value"),
    (r"mlp|feed_forward|linear|dense|(^|/)c_fc(/|$)", "neuron"),
)

#: What a logical axis name tells Adam-mini, by role:
#:
#: * ``"stacked"``: the axis indexes separate tensors (scanned or vmapped
#:   layers, pipeline stages, experts, the gate/up halves of a fused MLP
#:   kernel): never shared, each index has its own blocks.
#: * ``"fused"``: the ``[q | k | v]`` (or ``[k | v]``) axis of a fused
#:   attention kernel (MaxText's ``qkv``, Gemma's ``kv_einsum``): under a
#:   ``"qkv"`` rule, one v per query and key head and one per value neuron;
#:   otherwise as ``"stacked"``.
#: * ``"heads"``: attention heads: one v per head of a query/key kernel.
#: * ``"vocab"``: tokens: one v per token of an embedding table, per output
#:   column of an untied head.
#: * ``"embed"``: the model width, the axis a projection reads from (query,
#:   key, value, MLP input) or writes to (attention output, MLP output).
#: * ``"features"``: any other axis (head features, MLP neurons, a norm's
#:   width): averaged or kept as the rule says.
#:
#: The names are MaxText's (``layers``, ``stage``, ``exp``, ``embed``,
#: ``embed_no_exp``, ``mlp``, ``heads``, ``q_heads``, ``kv_heads``, ``kv``,
#: ``kv_head_dim``, ``qkv``, ``vocab``, ``norm``), T5X's (``embed``,
#: ``joined_kv``, ``heads``, ``kv``, ``mlp``, ``vocab``, ``relpos_buckets``,
#: ``layers``) and the ones :data:`ADAM_MINI_DEFAULT_AXIS_NAMES` gives
#: Gemma's kernels (``gating``, ``head_dim``). A name not listed is a
#: ``"features"`` axis; add yours with ``AdamMiniRules(axis_roles={"my_layers":
#: "stacked"})``.
ADAM_MINI_AXIS_ROLES: Mapping[str, str] = types.MappingProxyType({
    "layers": "stacked", "layer": "stacked", "stage": "stacked",
    "circular_repeats": "stacked", "exp": "stacked", "expert": "stacked",
    "experts": "stacked", "qkv": "fused", "gating": "stacked",
    "heads": "heads", "q_heads": "heads", "kv_heads": "heads",
    "vocab": "vocab",
    "embed": "embed", "embed_no_exp": "embed",
    "mlp": "features", "kv": "features", "head_dim": "features",
    "kv_head_dim": "features", "joined_kv": "features", "norm": "features",
    "relpos_buckets": "features",
})

#: The roles of :data:`ADAM_MINI_AXIS_ROLES`.
AXIS_ROLES = ("stacked", "fused", "heads", "vocab", "embed", "features")


def _gemma_gating_names(shape: tuple[int, ...], width: Optional[int]
                        ) -> Optional[tuple[str, ...]]:
  """Gemma's ``gating_einsum``: ``[2, ffn, d]`` or ``[2, d, ffn]``.

  The axis as long as the model width (the embedding tables') is ``embed``;
  without it, the longer axis is the MLP's (Gemma's ``hidden_dim`` is
  several times its ``embed_dim``).
  """
  if len(shape) < 3:
    return None
  a, b = shape[-2:]
  first_is_d = (a == width) if width in (a, b) and a != b else a < b
  return ("gating",) + (("embed", "mlp") if first_is_d else ("mlp", "embed"))


#: Logical names of the trailing axes of leaves that carry none, by path
#: (``(pattern, names)``, tried in order; ``names`` a tuple or a function of
#: the shape and the model width). Gemma's einsum kernels, whose axes are
#: not in ``Dense`` order (``BTD,NDH->BTNH``): ``q_einsum/w`` ``[heads, d,
#: head_dim]``, ``kv_einsum/w`` ``[2, kv_heads, d, head_dim]`` (keys then
#: values), ``qkv_einsum/w`` ``[3, heads, d, head_dim]``, ``attn_vec_einsum/w``
#: ``[heads, head_dim, d]``, ``mlp/gating_einsum`` ``[2, ffn, d]`` (or ``[2,
#: d, ffn]``; gate then up) and ``mlp/linear`` ``[ffn, d]``. Axes in front
#: of the named ones (Gemma's scanned layers) are ``"stacked"``.
ADAM_MINI_DEFAULT_AXIS_NAMES: tuple[tuple[Any, Any], ...] = (
    (r"(^|/)q_einsum/w$", ("heads", "embed", "head_dim")),
    (r"(^|/)kv_einsum/w$", ("qkv", "kv_heads", "embed", "head_dim")),
    (r"(^|/)qkv_einsum/w$", ("qkv", "heads", "embed", "head_dim")),
    (r"(^|/)attn_vec_einsum/w$", ("heads", "head_dim", "embed")),
    (r"(^|/)gating_einsum(/w)?$", _gemma_gating_names),
    (r"(^|/)mlp/linear(/w)?$", ("mlp", "embed")),
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
      per value neuron. ``axis`` may be a pair ``(src, dst)``: axis ``src``
      folded into axis ``dst`` (``src`` major) is cut, and ``v_shape[src]``
      is 1. Gemma's ``kv_einsum`` ``[2, kv_heads, d, head_dim]`` (keys, then
      values) has ``segments=((0, 3), ((head_dim, 1), (head_dim,
      head_dim)))`` and ``v_shape=(1, kv_heads, 1, 1 + head_dim)``: one v per
      key head and per value neuron.
  """
  rule: str
  axes: tuple[int, ...]
  v_shape: tuple[int, ...]
  segments: Optional[tuple[Any, tuple[tuple[int, int], ...]]] = None


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


def _folded_spec(rule: str, shape: tuple[int, ...], v_shape: tuple[int, ...],
                 segments: Any, where: str) -> AdamMiniSpec:
  """The spec of a leaf cut into segments along axis ``src`` folded into
  ``dst`` (``segments = ((src, dst), ((length, blocks), ...))``).

  The folded axis has ``shape[src] * shape[dst]`` entries, ``src`` major: a
  ``[k | v]`` axis of 2 folded into a head's features gives ``[key features
  | value features]``, cut like a fused ``c_attn``. v has size 1 on ``src``
  and the segments' blocks summed on ``dst``.
  """
  ndim = len(shape)
  try:
    (src, dst), segs = segments
    src, dst = int(src), int(dst)
    segs = tuple((int(n), int(b)) for n, b in segs)
  except (TypeError, ValueError):
    raise ValueError(
        f"partition for {where}: segments must be None or (axis, ((length, "
        f"blocks), ...)), axis an int or a (src, dst) pair, got "
        f"{segments!r}.") from None
  if not (len(v_shape) == ndim and -ndim <= src < ndim and -ndim <= dst < ndim
          and src % ndim != dst % ndim):
    raise ValueError(
        f"partition for {where}: segments axes ({src}, {dst}) or v_shape "
        f"{v_shape} do not fit the leaf's shape {shape}.")
  src, dst = src % ndim, dst % ndim
  folded = shape[src] * shape[dst]
  if not (segs and all(n >= 1 and 1 <= b <= n and n % b == 0 for n, b in segs)
          and sum(n for n, _ in segs) == folded):
    raise ValueError(
        f"partition for {where}: segments {segs} do not cut axis {src} "
        f"folded into axis {dst} of the leaf's shape {shape} (the lengths "
        f"must sum to {folded} and each segment's blocks must divide its "
        f"length).")
  want = sum(b for _, b in segs)
  others_ok = all(v_shape[i] >= 1 and shape[i] % v_shape[i] == 0
                  for i in range(ndim) if i not in (src, dst))
  if v_shape[src] != 1 or v_shape[dst] != want or not others_ok:
    raise ValueError(
        f"partition for {where}: v_shape {v_shape} must be 1 on axis {src}, "
        f"the segments' blocks summed ({want}) on axis {dst}, and divide the "
        f"leaf's shape {shape} elsewhere.")
  axes = sorted({i for i in range(ndim) if v_shape[i] < shape[i]}
                | {src, dst})
  return AdamMiniSpec(rule, tuple(axes), v_shape, ((src, dst), segs))


def _check_spec(spec: AdamMiniSpec, shape: tuple[int, ...],
                where: str) -> AdamMiniSpec:
  """Validates a spec given by a user (e.g. an edited partition)."""
  v_shape = tuple(int(s) for s in spec.v_shape)
  segments = getattr(spec, "segments", None)
  if (isinstance(segments, (tuple, list)) and segments
      and isinstance(segments[0], (tuple, list))):
    return _folded_spec(str(spec.rule), shape, v_shape, segments, where)
  if segments is not None:
    try:
      axis, segs = segments
      axis = int(axis)
      segs = tuple(tuple(x) for x in segs)
    except (TypeError, ValueError):
      raise ValueError(
          f"partition for {where}: segments must be None or (axis, ((length, "
          f"blocks), ...)), axis an int or a (src, dst) pair, got "
          f"{segments!r}.") from None
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


def _named_spec(kind: str, shape: tuple[int, ...], roles: tuple[str, ...],
                rules: "AdamMiniRules", where: str) -> Optional[AdamMiniSpec]:
  """The spec a named rule gives a leaf whose axes have logical roles.

  ``roles`` (one per axis, none ``"stacked"``: those are lifted out by
  :func:`_lift_stacked`) say which axes are heads, tokens and the model
  width, whatever their order: a ``"value"`` or ``"head"`` kernel reads from
  its ``embed`` axes, a ``"neuron"`` kernel writes to them when they are not
  first (``[heads, head_dim, embed]``, ``[mlp, embed]``) and reads from them
  otherwise (``[embed, mlp]``).
  """
  ndim = len(shape)
  if kind in _NEEDS_2D and ndim < 2:
    return None
  axes_of = lambda role: [i for i, r in enumerate(roles) if r == role]
  embed, vocab, heads = axes_of("embed"), axes_of("vocab"), axes_of("heads")
  fused = axes_of("fused")
  feats = [i for i in range(ndim) if i not in embed + heads + fused]
  if (kind == "qkv" and len(fused) == 1 and len(heads) == 1
      and len(feats) == 1 and shape[fused[0]] in (2, 3)):
    # [q | k | v] or [k | v] on the fused axis: one v per query and key head,
    # one per value neuron (per value head with whole_value: the coarsest
    # blocks the cut can give), the fused axis cut through the heads'
    # features.
    f, dst = fused[0], feats[0]
    hd = shape[dst]
    segs = ((hd, 1),) * (shape[f] - 1) + ((hd, 1 if rules.whole_value
                                           else hd),)
    v_shape = [1] * ndim
    v_shape[heads[0]] = shape[heads[0]]
    v_shape[dst] = sum(b for _, b in segs)
    return _folded_spec(kind, shape, tuple(v_shape), ((f, dst), segs), where)
  if kind == "qkv" and not fused and ndim == 2 and len(embed) == 1 and (
      shape[1 - embed[0]] % 3 == 0):
    # [q | k | v] joined on the output axis (GPT-2's c_attn), named.
    out = 1 - embed[0]
    third = shape[out] // 3
    hd = _head_width(third, rules.head_dim, rules.num_heads, where, shape)
    qk = (third, third if hd is None else third // hd)
    v = (third, 1 if rules.whole_value else third)
    return _segmented_spec(kind, shape, [1, 1], out, (qk, qk, v), where)
  if fused:  # otherwise each part has its own blocks, as a stacked axis.
    sub = _named_spec(kind, tuple(d for i, d in enumerate(shape)
                                  if i not in fused),
                      tuple(r for i, r in enumerate(roles) if i not in fused),
                      rules, where)
    return None if sub is None else _lift_stacked(sub, shape, tuple(fused))
  if kind in ("bias", "adam"):
    keep = list(range(ndim))
  elif kind in ("norm", "whole"):
    keep = []
  elif kind == "embedding":
    keep = vocab[:1] or [0]
  elif kind == "output":
    keep = vocab[-1:] or [ndim - 1]
  elif kind == "head" and heads:
    keep = heads
  elif kind in ("head", "qkv", "value") or (kind == "neuron" and embed
                                            and embed[0] == 0):
    keep = [i for i in range(ndim) if i not in embed] or [ndim - 1]
    if kind == "head" and len(keep) == 1:
      # Heads joined on one axis (T5X's joined_kv): groups of head_dim.
      out = keep[0]
      hd = _head_width(shape[out], rules.head_dim, rules.num_heads, where,
                       shape)
      if hd is not None:
        v_shape = [1] * ndim
        v_shape[out] = shape[out] // hd
        return AdamMiniSpec(kind, tuple(range(ndim)), tuple(v_shape))
  elif kind == "neuron":
    keep = embed or [ndim - 1]
  else:  # pragma: no cover - guarded by the constructor.
    raise AssertionError(kind)
  if kind in ("value", "qkv") and rules.whole_value:
    keep = []
  axes = tuple(i for i in range(ndim) if i not in keep)
  return AdamMiniSpec(kind, axes, _v_shape(shape, axes))


def _kind_from_roles(roles: tuple[str, ...]) -> str:
  """The rule of a leaf that no path rule named, from its axes' roles."""
  if "vocab" in roles:
    return "embedding" if roles.index("vocab") == 0 else "output"
  if len(roles) < 2:
    return "norm"
  if "heads" in roles and roles[0] == "embed":
    return "head"
  return "neuron"


def _lift_stacked(spec: AdamMiniSpec, shape: tuple[int, ...],
                  stacked: tuple[int, ...]) -> AdamMiniSpec:
  """A spec of the leaf without its stacked axes, on the whole leaf.

  The stacked axes are kept whole in v (each layer, stage or expert has its
  own blocks); the others are ``spec``'s, in order.
  """
  if not stacked:
    return spec
  rest = [i for i in range(len(shape)) if i not in stacked]
  v_shape = list(shape)
  for i, s in zip(rest, spec.v_shape):
    v_shape[i] = s
  axes = tuple(rest[a] for a in spec.axes)
  segments = None
  if spec.segments is not None:
    axis = spec.segments[0]
    segments = ((rest[axis[0]], rest[axis[1]]) if isinstance(axis, tuple)
                else rest[axis], spec.segments[1])
  return AdamMiniSpec(spec.rule, axes, tuple(v_shape), segments)


def _check_names(names: Any, shape: tuple[int, ...], where: str
                 ) -> tuple[tuple[str, ...], ...]:
  """Validates one leaf's logical axis names; one tuple of names per axis."""
  entries = None
  if isinstance(names, PartitionSpec):  # trailing axes may be left out
    names = tuple(names) + (None,) * (len(shape) - len(names))
  if isinstance(names, (tuple, list)) and not isinstance(names, str):
    entries = [entry_axes(e) for e in names]
  if entries is None or any(e is None for e in entries) or len(
      entries) != len(shape):
    raise ValueError(
        f"axis_names for {where} must give one logical name (str or None) "
        f"per axis of its shape {shape}, got {names!r}.")
  return tuple(entries)


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
      the value third of ``"qkv"`` leaves; one v per value head on a fused
      ``[q | k | v]`` axis) instead of one per output neuron:
      the authors' advice for runs shorter than 10-20 k steps, which "can
      converge faster initially". Measured on a tiny GPT-2-style model
      (``benchmarks/adam_mini_short_run.py``: 400 steps, 5 seeds, 3 learning
      rates; the README's Adam-mini section has the table) it did not
      converge faster: on a copy task the training loss averaged over the
      run was 0.002-0.012 higher at every rate (per-seed differences of both
      signs), on a bigram task the same to 1e-4. So the default stays the
      paper's one v per value neuron.
    axis_roles: ``(name, role)`` pairs: :data:`ADAM_MINI_AXIS_ROLES` updated
      with the ``axis_roles`` dict given (e.g. ``{"my_layers": "stacked"}``;
      roles: :data:`AXIS_ROLES`). With logical axis names (given to
      :func:`adam_mini_partition`, or read from boxed parameters), the rules
      see each leaf without its ``"stacked"`` axes, which keep one set of
      blocks per index, and read heads, tokens and the model width from the
      names whatever the axes' order.
    axis_name_rules: ``(pattern, names)`` pairs naming the trailing axes of
      leaves that carry no names (:data:`ADAM_MINI_DEFAULT_AXIS_NAMES`:
      Gemma's einsum kernels); leading axes beyond them are stacked.

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
  axis_roles: tuple[tuple[str, str], ...]
  axis_name_rules: tuple[tuple[Any, Any], ...]

  def __init__(self, rules: Sequence[tuple[Any, Any]] = ADAM_MINI_DEFAULT_RULES,
               *, head_dim: Optional[int] = None,
               num_heads: Optional[int] = None, layout: str = "auto",
               whole_value: bool = False,
               axis_roles: Optional[dict[str, str]] = None,
               axis_name_rules: Sequence[tuple[Any, Any]] = (
                   ADAM_MINI_DEFAULT_AXIS_NAMES)):
    rules = _validate_rules(rules)
    roles = dict(ADAM_MINI_AXIS_ROLES)
    for name, role in dict(axis_roles or {}).items():
      if not isinstance(name, str) or role not in AXIS_ROLES:
        raise ValueError(
            f"axis_roles must map axis names (str) to one of {AXIS_ROLES}; "
            f"got {name!r}: {role!r}.")
      roles[name] = role
    name_rules = []
    for i, pair in enumerate(axis_name_rules):
      if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and (
          callable(pair[1]) or (isinstance(pair[1], (tuple, list)) and all(
              isinstance(n, str) or n is None for n in pair[1])))):
        raise ValueError(
            f"axis_name_rules[{i}] must be a (pattern, names) pair, names a "
            f"tuple of str/None or a function of (shape, width); got "
            f"{pair!r}.")
      _compile_pattern(pair[0])
      name_rules.append((pair[0], pair[1] if callable(pair[1])
                         else tuple(pair[1])))
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
    object.__setattr__(self, "axis_roles", tuple(sorted(roles.items())))
    object.__setattr__(self, "axis_name_rules", tuple(name_rules))

  @functools.cached_property
  def _matchers(self) -> tuple[Callable[[str], bool], ...]:
    return tuple(_compile_pattern(p) for p, _ in self.rules)

  @functools.cached_property
  def _name_matchers(self) -> tuple[Callable[[str], bool], ...]:
    return tuple(_compile_pattern(p) for p, _ in self.axis_name_rules)

  @functools.cached_property
  def _roles(self) -> dict[str, str]:
    return dict(self.axis_roles)

  def _role(self, names: tuple[str, ...]) -> Optional[str]:
    """The role of one axis from its names; ``None`` for an unnamed axis."""
    for name in names:
      if name in self._roles:
        return self._roles[name]
    return "features" if names else None

  def _path_names(self, path: str, shape: tuple[int, ...],
                  width: Optional[int]) -> Optional[tuple[Any, ...]]:
    """Names :attr:`axis_name_rules` give a leaf (leading axes stacked)."""
    for matches, (_, names) in zip(self._name_matchers, self.axis_name_rules):
      if not matches(path):
        continue
      got = names(shape, width) if callable(names) else names
      if got is not None and len(got) <= len(shape):
        return ("layers",) * (len(shape) - len(got)) + tuple(got)
    return None

  def _replace(self, **changes: Any) -> "AdamMiniRules":
    kwargs = dict(head_dim=self.head_dim, num_heads=self.num_heads,
                  layout=self.layout, whole_value=self.whole_value,
                  axis_roles=dict(self.axis_roles),
                  axis_name_rules=self.axis_name_rules)
    kwargs.update(changes)
    return AdamMiniRules(self.rules, **kwargs)

  def _match(self, path: str, shape: Sequence[int],
             width: Optional[int] = None, names: Any = None
             ) -> tuple[AdamMiniSpec, bool]:
    """The spec of a leaf, and whether a rule (not the fallback) gave it.

    ``width``: the tree's model width, if known (see :func:`_for_tree`).
    ``names``: the leaf's logical axis names (one str, tuple of str or
    ``None`` per axis), if known; else :attr:`axis_name_rules` may give
    some. Its stacked axes are kept whole and the rules see the rest.
    """
    full = tuple(int(d) for d in shape)
    names = (((),) * len(full) if names is None
             else _check_names(names, full, path))
    roles = [self._role(n) for n in names]
    rest = [i for i, r in enumerate(roles) if r != "stacked"]
    if all(roles[i] is None for i in rest):  # no names but stacked ones
      more = self._path_names(path, tuple(full[i] for i in rest), width)
      for i, n in zip(rest, more or ()):
        roles[i] = self._role(entry_axes(n))
    stacked = tuple(i for i, r in enumerate(roles) if r == "stacked")
    shape = tuple(d for i, d in enumerate(full) if i not in stacked)
    roles = tuple(r for i, r in enumerate(roles) if i not in stacked)
    named = any(r is not None for r in roles)
    lift = lambda spec: _lift_stacked(spec, full, stacked)
    for matches, (_, rule) in zip(self._matchers, self.rules):
      if not matches(path):
        continue
      if isinstance(rule, str):
        got = (_named_spec(rule, shape, roles, self, path) if named
               else _kind_spec(rule, shape, self, path, width))
        if got is not None:
          return lift(got), True
        continue
      axes = rule(shape) if callable(rule) else rule
      if axes is None:
        continue
      if isinstance(axes, AdamMiniSpec):
        return lift(_check_spec(axes, shape, path)), True
      try:
        return lift(_spec_from_axes("custom", axes, shape, path)), True
      except ValueError:
        if _is_axes(rule) and not callable(rule):
          continue  # fixed axes that do not fit this leaf's rank: pass.
        raise
    if named:
      kind = _kind_from_roles(roles)
      return lift(_named_spec(kind, shape, roles, self, path)
                  or _kind_spec("whole", shape, self, path)), True
    return lift(_kind_spec("whole", shape, self, path, width)), False

  def spec(self, path: str, shape: Sequence[int],
           names: Any = None) -> AdamMiniSpec:
    """The spec of a leaf of ``shape`` at ``path`` (``"a/b/kernel"``).

    ``names``: its logical axis names, one per axis (see
    :data:`ADAM_MINI_AXIS_ROLES`), or ``None``.
    """
    return self._match(path, shape, names=names)[0]

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


def _box_names(box: Any) -> Optional[tuple[Any, ...]]:
  """The logical axis names a Flax box carries, if any.

  linen ``LogicallyPartitioned`` / ``Partitioned`` (``.names``) and NNX
  Variables (``out_sharding``, ``sharding_names`` or ``sharding`` in their
  metadata, by Flax version), read without importing Flax.
  """
  names = getattr(box, "names", None)
  if names is None and callable(getattr(box, "get_metadata", None)):
    meta = box.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
      if meta.get(key) is not None:
        names = meta[key]
        break
  if isinstance(names, PartitionSpec):
    return names
  if isinstance(names, (tuple, list)) and all(
      entry_axes(n) is not None for n in names):
    return tuple(names)
  return None


def _is_names(x: Any) -> bool:
  return x is None or (isinstance(x, (tuple, list, PartitionSpec))
                       and not isinstance(x, AdamMiniSpec)
                       and all(entry_axes(n) is not None for n in x))


def _leaf_names(params: Any, axis_names: Any, paths: list[tuple[str, ...]]
                ) -> list[Optional[tuple[Any, ...]]]:
  """Each leaf's logical axis names: ``axis_names``', else its box's."""
  items = jax.tree.leaves(params, is_leaf=_trees.is_wrapper)
  out = [_box_names(x) if _trees.is_wrapper(x) else None for x in items]
  if axis_names is None:
    return out
  flat, _ = jax.tree_util.tree_flatten_with_path(axis_names,
                                                 is_leaf=_is_names)
  table = {}
  for path, entry in flat:
    if not _is_names(entry):
      raise ValueError(
          f"axis_names at {_path_str(_path_keys(path)) or '<root>'} must be "
          f"a tuple of logical axis names (str or None per axis) or None, "
          f"got {entry!r}.")
    table[_path_keys(path)] = entry
  unknown = set(table) - set(paths)
  if unknown:
    raise ValueError(
        f"axis_names has entries for paths the params do not have: "
        f"{sorted(_path_str(k) for k in unknown)[:8]}.")
  given = [table.get(keys) for keys in paths]
  return [g if g is not None else box for g, box in zip(given, out)]


def _stacked_axes(paths: list[tuple[str, ...]], wheres: list[str],
                  shapes: list[tuple[int, ...]], rules: AdamMiniRules,
                  named: list[bool], warn: bool) -> dict[int, int]:
  """Stacked layer axes of leaves without names: ``{leaf: axis}``.

  A subtree under a ``layers`` / ``blocks`` key (not followed by a layer
  number: those are unrolled) whose leaves all have rank >= 2 and one axis
  (0, or 1 as MaxText's ``param_scan_axis``) of equal length is stacked
  when some of its norm or bias leaves (rank 1 per layer) have rank 2. Such
  a subtree without norms or biases to tell is named in a warning.
  """
  groups: dict[tuple[str, ...], list[int]] = {}
  for j, keys in enumerate(paths):
    if named[j]:
      continue
    for i, k in enumerate(keys[:-1]):
      if _LAYER_PARENT_RE.match(k) and not keys[i + 1].isdigit():
        groups.setdefault(keys[:i + 1], []).append(j)
        break
  out, unclear = {}, []
  for root, idxs in groups.items():
    if len(idxs) < 2 or any(len(shapes[j]) < 2 for j in idxs):
      continue
    axes = [a for a in (0, 1) if all(len(shapes[j]) > a for j in idxs)
            and len({shapes[j][a] for j in idxs}) == 1]
    told = any(rules.spec(wheres[j], shapes[j]).rule in ("norm", "bias")
               for j in idxs)
    if len(axes) == 1 and told:
      out.update({j: axes[0] for j in idxs})
    elif axes:
      unclear.append((root, idxs, axes))
  if warn and unclear:
    shown = "; ".join(
        f"{_path_str(root)!r} (axis {' or '.join(map(str, axes))} of length "
        f"{shapes[idxs[0]][axes[0]]}: "
        + ", ".join(f"{wheres[j]!r} {shapes[j]}" for j in idxs[:8])
        + (f" and {len(idxs) - 8} more" if len(idxs) > 8 else "") + ")"
        for root, idxs, axes in unclear[:4])
    warnings.warn(
        f"Adam-mini cannot tell whether these layer subtrees are stacked "
        f"(one axis of equal length on every leaf, no norm or bias to "
        f"tell): {shown}. If they are, their layers would share v's: give "
        f"their logical axis names (mo.adam_mini_partition(params, "
        f"axis_names=...) with 'layers' on the stacked axis, or boxed "
        f"params) and pass the result as partition.",
        UserWarning, stacklevel=4)
  return out


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


def _resolve(params: Any, partition: Any, *, warn: bool,
             axis_names: Any = None):
  """Per-leaf specs of ``params`` as (flat path/leaf list, treedef, specs).

  The automatic rules see each leaf's logical axis names: ``axis_names``',
  its box's, or (for stacked layers detected by :func:`_stacked_axes`)
  ``"layers"`` on the stacked axis.
  """
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
  names = _leaf_names(params, axis_names, paths)
  stacked = _stacked_axes(paths, wheres, shapes,
                          partition if automatic else default,
                          [n is not None for n in names], warn)
  for j, axis in stacked.items():
    names[j] = tuple("layers" if i == axis else None
                     for i in range(len(shapes[j])))
  specs, unmatched = [], []
  for (_, leaf), keys, where, shape, leaf_names in zip(flat, paths, wheres,
                                                      shapes, names):
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
      spec, matched = rules._match(where, shape, rules_width, leaf_names)  # pylint: disable=protected-access
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
    *,
    axis_names: Any = None,
) -> Any:
  """Which blocks Adam-mini's automatic rules give each parameter.

  Applies ``rules`` to the ``/``-joined path and the shape of every leaf of
  ``params`` (arrays, ``jax.ShapeDtypeStruct``, a Flax NNX ``nnx.State``).
  With ``layout="auto"`` (the default) the fused query/key/value kernels of
  the tree, if any, decide which axis of its 2-D kernels is the output: a
  Hugging Face ``FlaxGPT2`` tree (``c_attn`` kernel ``[3d, d]``) is read
  ``[out, in]``, a Flax ``Dense`` port of nanoGPT (``[d, 3d]``) ``[in, out]``.

  **Logical axis names.** Where a leaf's axes are named (``axis_names``, or
  the names its box carries: linen ``nn.LogicallyPartitioned`` /
  ``nn.Partitioned``, an NNX ``nnx.Param`` made with
  ``nnx.with_partitioning`` or ``sharding`` metadata), the blocks follow
  the names (:data:`ADAM_MINI_AXIS_ROLES`, extensible with
  ``AdamMiniRules(axis_roles=...)``): stacked axes (``layers``, ``stage``,
  ``exp``, ...) never share a v, head axes (``heads``, ``q_heads``,
  ``kv_heads``) give one v per head of a query/key kernel, ``vocab`` one
  per token, and a kernel's ``embed`` axis says which of its axes it reads
  from, whatever their order: MaxText's ``scan_layers`` kernels (the layer
  axis second), T5X's and NNX's ``nnx.vmap``-stacked ones are read as their
  names say. Gemma's einsum kernels get names by path
  (:data:`ADAM_MINI_DEFAULT_AXIS_NAMES`).

  **Stacked layers without names.** A subtree under a ``layers`` or
  ``blocks`` key (not followed by layer numbers) whose leaves share one axis
  of equal length (axis 0, or 1 as MaxText's) is read as stacked on it when
  its norm or bias leaves have one dimension too many (``[L, d]``); if
  nothing tells, a warning names its leaves (give ``axis_names``).

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
    axis_names: ``None``, or a pytree like ``params`` (or with some leaves
      left out or ``None``) whose leaves are tuples of logical axis names,
      one ``str`` (or ``None``) per axis, or ``PartitionSpec``s of them
      (trailing axes may be left out): what ``nn.get_partition_spec``,
      ``nnx.get_partition_spec`` or a model's ``kernel_axes`` give. They
      take precedence over the names of boxed leaves.

  Returns:
    A pytree shaped like ``params`` whose leaves are :class:`AdamMiniSpec`
    ``(rule, axes, v_shape, segments)``.

  Raises:
    ValueError: for ``axis_names`` that do not fit the params (a path they
      lack, a leaf's rank).

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

    MaxText's Llama with ``scan_layers``: the layer axis is second, named
    ``layers``; each layer keeps its own v per query head:

    >>> q = jnp.zeros((8, 3, 4, 2))  # [embed, layers, q_heads, kv]
    >>> spec = mo.adam_mini_partition(
    ...     {"decoder": {"layers": {"query": {"kernel": q}}}},
    ...     axis_names={"decoder": {"layers": {"query": {
    ...         "kernel": ("embed", "layers", "q_heads", "kv")}}}})
    >>> spec["decoder"]["layers"]["query"]["kernel"].v_shape
    (1, 3, 4, 1)
  """
  if rules is None:
    rules = AdamMiniRules()
  elif not isinstance(rules, AdamMiniRules):
    rules = AdamMiniRules(rules)
  _, treedef, specs = _resolve(params, rules, warn=True,
                               axis_names=axis_names)
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

"""Gauss-Newton preconditioning, full and layerwise, through JVPs.

Abreu, Vyas, Kakade, Morwani, *The Potential of Second-Order Optimization for
LLMs: A Study with Full Gauss-Newton*, arXiv:2510.09378 (2025).

One outer step linearizes the model around the current parameters, builds the
Gauss-Newton model of the batch loss in the step ``delta``, minimises it with
any Optax *inner* optimizer for a fixed number of steps (never forming a
matrix: every inner gradient is one Jacobian-vector product and one
vector-Jacobian product), and takes the best of a few step sizes on the true
batch loss. As in the paper, the inner steps can also each draw a fresh batch
(``batches``), the model being linearized at the same parameters on each, and
the line search can use batches of its own (``linesearch_batches``).
"""

from __future__ import annotations

import inspect
import math
from typing import (Any, Callable, Hashable, NamedTuple, Optional, Sequence,
                    Union)

import jax
import jax.numpy as jnp
import numpy as np
import optax

#: Default candidate step sizes of the line search. ``0.0`` is one of them, so
#: an outer step never increases the batch loss.
DEFAULT_LINESEARCH = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0)

#: The paper's step sizes: :math:`1/\sqrt2^{\,i}`, ``i < 5`` (1 ... 0.25). It
#: has no ``0.0``, so an outer step may increase the loss (the paper's choice).
#: (Its layerwise script defaults to ``i < 10``:
#: ``tuple(2 ** (-i / 2) for i in range(10))``.)
SQRT2_LINESEARCH = tuple(float(2.0 ** (-i / 2)) for i in range(5))

#: The inner problems :func:`gauss_newton` can solve.
VARIANTS = ("gn", "prox_linear")

LayerSpec = Union[None, int, Sequence[Hashable],
                  Callable[[Any, Any], Any]]


class GaussNewtonState(NamedTuple):
  """State of :func:`gauss_newton`.

  All fields but ``inner_state`` describe the last outer step, for logging.

  Attributes:
    count: number of outer steps so far, int32 scalar.
    step_size: the step size ``alpha`` the line search chose (float32).
    inner_decrease: ``L~(0) - L~(delta_hat)``, how much the inner optimizer
      decreased its objective (the Gauss-Newton model, or the linearized loss
      for ``variant="prox_linear"``; summed over layers when layerwise), on
      the batch, or with ``batches`` on the last inner batch. A negative value
      means the inner solve diverged.
    loss_before: the batch loss at ``theta_t`` (float32); with ``batches``,
      the mean of the inner batches' losses at ``theta_t`` (each measured
      before any step was taken on it).
    loss_after: the line-search loss at ``theta_t + alpha * delta_hat``
      (float32): on the batch, or with ``batches`` the mean over
      ``linesearch_batches`` (over ``batches`` when none are given); ``nan``
      when the line search is disabled (it is then not evaluated).
    inner_state: the inner optimizer's state when ``carry_inner_state=True``,
      else ``()`` (it is re-initialized at every outer step).
    inner_iterate: where the last inner solve ended, ``theta_t + delta_hat``
      (like ``params``), when ``carry_inner_iterate=True``, else ``()``.
  """
  count: jax.Array
  step_size: jax.Array
  inner_decrease: jax.Array
  loss_before: jax.Array
  loss_after: jax.Array
  inner_state: Any
  inner_iterate: Any = ()


def output_hvp(loss_fn: Callable[[Any], jax.Array], outputs: Any):
  r"""The loss, its gradient and its Hessian in the model outputs, as products.

  Linearizes :math:`\nabla_z \ell` at :math:`z`, so that each product
  :math:`v \mapsto \nabla_z^2 \ell(z)\, v` costs one Jacobian-vector product
  and no matrix is formed. For softmax cross-entropy averaged over ``B`` rows,
  the product is :math:`\tfrac1B (\mathrm{diag}(p) - p p^\top) v` per row.

  Args:
    loss_fn: ``outputs -> scalar``, the batch-mean loss.
    outputs: the model outputs ``z`` (any pytree of arrays).

  Returns:
    ``(loss, grad, hvp)``: the loss value, :math:`\nabla_z \ell` (a pytree like
    ``outputs``) and a linear function ``v -> H v``.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import microadam_optax as mo
    >>> loss_fn = lambda z: optax.softmax_cross_entropy_with_integer_labels(
    ...     z, jnp.array([0])).mean()
    >>> loss, grad, hvp = mo.output_hvp(loss_fn, jnp.zeros((1, 2)))
    >>> hvp(jnp.array([[1.0, 0.0]]))  # (diag(p) - p p^T) e_0 with p = 1/2
    Array([[ 0.25, -0.25]], dtype=float32)
  """
  loss, grad = jax.value_and_grad(loss_fn)(outputs)
  _, hvp = jax.linearize(jax.grad(loss_fn), outputs)
  return loss, grad, hvp


def global_cosine_schedule(
    learning_rate: float,
    outer_steps: int,
    inner_steps: int,
    *,
    warmup_fraction: float = 0.2,
    init_fraction: float = 0.1,
    end_value: float = 0.0,
) -> optax.Schedule:
  r"""One warmup-cosine schedule over all inner steps of all outer steps.

  The inner learning rate of the paper's ``global_cosine`` runs: with
  :math:`T = \texttt{outer\_steps} \cdot \texttt{inner\_steps}` inner steps
  in all and :math:`W = \lfloor \texttt{warmup\_fraction} \cdot T \rfloor`,

  .. math::

    \eta(k) = \begin{cases}
      \eta_0 + (\eta - \eta_0)\, k / W & k < W, \\
      \eta_T + \tfrac12 (\eta - \eta_T)\bigl(1 + \cos(\pi
        \tfrac{k - W}{T - W})\bigr) & W \le k \le T,
    \end{cases}
    \qquad \eta_0 = \texttt{init\_fraction} \cdot \eta,

  which is :func:`optax.warmup_cosine_decay_schedule`. It spans the outer
  steps only if the inner optimizer's step count does, so give the inner
  optimizer built with it to :func:`gauss_newton` with
  ``carry_inner_state=True`` (the paper keeps the inner state across outer
  steps).

  Args:
    learning_rate: the peak inner learning rate :math:`\eta > 0`.
    outer_steps: number of outer (Gauss-Newton) steps of the run, ``>= 1``.
    inner_steps: inner steps per outer step, ``>= 1``, as given to
      :func:`gauss_newton`.
    warmup_fraction: share of the :math:`T` inner steps spent warming up, in
      ``[0, 1)`` (paper: 0.2).
    init_fraction: the warmup starts at ``init_fraction * learning_rate``, in
      ``[0, 1]`` (paper: 0.1).
    end_value: the learning rate after :math:`T` inner steps, ``>= 0``
      (paper: 0).

  Returns:
    An :class:`optax.Schedule` of the inner step count.

  Examples:
    >>> import optax
    >>> import microadam_optax as mo
    >>> lr = mo.global_cosine_schedule(1e-3, outer_steps=4, inner_steps=10)
    >>> [round(float(lr(k)), 6) for k in (0, 8, 40)]  # start, peak, end
    [0.0001, 0.001, 0.0]
    >>> tx = mo.gauss_newton(optax.adamw(lr), inner_steps=10,
    ...                      carry_inner_state=True,
    ...                      linesearch=mo.SQRT2_LINESEARCH)

  References:
    Abreu, Vyas, Kakade, Morwani, `The Potential of Second-Order Optimization
    for LLMs: A Study with Full Gauss-Newton
    <https://arxiv.org/abs/2510.09378>`_, 2025.
  """
  for name, value in (("outer_steps", outer_steps),
                      ("inner_steps", inner_steps)):
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or value < 1):
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  for name, value, lo, hi, closed in (
      ("learning_rate", learning_rate, 0.0, math.inf, False),
      ("warmup_fraction", warmup_fraction, 0.0, 1.0, False),
      ("init_fraction", init_fraction, 0.0, 1.0, True),
      ("end_value", end_value, 0.0, math.inf, True)):
    ok = (not isinstance(value, bool)
          and isinstance(value, (int, float, np.integer, np.floating))
          and math.isfinite(value))
    if ok:
      ok = (lo <= value <= hi) if closed else (
          (lo < value) if name == "learning_rate" else (lo <= value < hi))
    if not ok:
      valid = {"learning_rate": "a finite number > 0",
               "warmup_fraction": "a number in [0, 1)",
               "init_fraction": "a number in [0, 1]",
               "end_value": "a finite number >= 0"}[name]
      raise ValueError(f"{name} must be {valid}, got {value!r}.")
  total = int(outer_steps) * int(inner_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=float(init_fraction) * float(learning_rate),
      peak_value=float(learning_rate),
      warmup_steps=int(float(warmup_fraction) * total),
      decay_steps=total,
      end_value=float(end_value))


# ---------------------------------------------------------------------------
# Layers.


def _key_name(key: Any) -> Hashable:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def _branch_depth(paths: Sequence[tuple]) -> int:
  """Length of the key prefix every path shares (``{"params": ...}``)."""
  if len(paths) < 2:
    return 0
  depth = 0
  while all(len(p) > depth + 1 for p in paths) and len(
      {_key_name(p[depth]) for p in paths}) == 1:
    depth += 1
  return depth


def _leaf_layer_ids(params: Any, layers: LayerSpec) -> tuple[list, list]:
  """Per leaf (flatten order) a layer id or a 1-D array of ids; all ids."""
  leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [p for p, _ in leaves_with_path]
  leaves = [x for _, x in leaves_with_path]
  if layers is None:
    d = _branch_depth(paths)
    ids = [tuple(_key_name(k) for k in p[:d + 1]) for p in paths]
  elif isinstance(layers, int) and not isinstance(layers, bool):
    ids = [tuple(_key_name(k) for k in p[:layers]) for p in paths]
  elif callable(layers):
    ids = []
    for p, x in zip(paths, leaves):
      lid = layers(p, x)
      if isinstance(lid, np.ndarray):
        if lid.ndim != 1 or np.ndim(x) < 1 or lid.shape[0] != np.shape(x)[0]:
          raise ValueError(
              f"layers returned an array of shape {lid.shape} for the leaf at "
              f"{jax.tree_util.keystr(p)} of shape {np.shape(x)}: a stacked "
              f"leaf needs one layer id per slice of its leading axis.")
        lid = list(lid.tolist())
      ids.append(lid)
  else:
    names = list(layers)
    d = _branch_depth(paths)
    tops = [_key_name(p[d]) if len(p) > d else None for p in paths]
    missing = [n for n in names if n not in tops]
    if missing:
      raise ValueError(
          f"layers names keys {missing!r} that are not in the params tree "
          f"(its keys at that level: {sorted(set(map(str, tops)))}).")
    ids = [(t,) if t in names else ("<rest>",) for t in tops]
  order = {}
  for lid in ids:
    for one in (lid if isinstance(lid, list) else [lid]):
      order.setdefault(one, len(order))
  index = [np.asarray([order[i] for i in lid], np.int32)
           if isinstance(lid, list) else order[lid] for lid in ids]
  return index, list(order)


def layer_partition(params: Any, layers: LayerSpec = None) -> dict:
  """Which parameters form each layer of layerwise Gauss-Newton.

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    layers: as in :func:`gauss_newton`.

  Returns:
    An ordered ``dict``: layer id -> list of ``jax.tree_util.keystr`` paths of
    its leaves (a stacked leaf appears under each of its layers, with the
    slice index appended as ``[i]``).

  Example:
    >>> import jax.numpy as jnp
    >>> import microadam_optax as mo
    >>> params = {"params": {"dense1": {"w": jnp.ones(2)},
    ...                      "dense2": {"w": jnp.ones(2)}}}
    >>> for layer, leaves in mo.layer_partition(params).items():
    ...   print(layer, leaves)
    ('params', 'dense1') ["['params']['dense1']['w']"]
    ('params', 'dense2') ["['params']['dense2']['w']"]
  """
  index, names = _leaf_layer_ids(params, layers)
  paths = [jax.tree_util.keystr(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  out = {n: [] for n in names}
  for path, idx in zip(paths, index):
    if isinstance(idx, np.ndarray):
      for i, k in enumerate(idx.tolist()):
        out[names[k]].append(f"{path}[{i}]")
    else:
      out[names[idx]].append(path)
  return out


# ---------------------------------------------------------------------------
# Small tree helpers (float32 accumulation).


def _tree_vdot(a: Any, b: Any) -> jax.Array:
  prods = jax.tree.leaves(jax.tree.map(
      lambda x, y: jnp.sum(x.astype(jnp.float32) * y.astype(jnp.float32)),
      a, b))
  return sum(prods, jnp.zeros([], jnp.float32))


def _tree_add(a: Any, b: Any) -> Any:
  return jax.tree.map(lambda x, y: (x + y).astype(x.dtype), a, b)


def _axpy(alpha: jax.Array, x: Any, y: Any) -> Any:
  """``y + alpha * x`` in ``y``'s dtypes, the same arithmetic as applying
  the update ``(alpha * x).astype(y.dtype)`` with ``optax.apply_updates``."""
  return jax.tree.map(
      lambda d, p: (p + (alpha * d).astype(p.dtype)).astype(p.dtype), x, y)


# ---------------------------------------------------------------------------
# Validation.


def _validate(*, inner_optimizer, inner_steps, layerwise, variant, linesearch,
              damping, layers, layer_batch_size, carry_inner_state,
              carry_inner_iterate) -> None:
  if not (hasattr(inner_optimizer, "init")
          and hasattr(inner_optimizer, "update")):
    raise ValueError(
        f"inner_optimizer must be an optax GradientTransformation (with init "
        f"and update), got {inner_optimizer!r}.")
  if (isinstance(inner_steps, bool)
      or not isinstance(inner_steps, (int, np.integer)) or inner_steps < 1):
    raise ValueError(
        f"inner_steps must be an integer >= 1, got {inner_steps!r}.")
  if not isinstance(layerwise, bool):
    raise ValueError(f"layerwise must be True or False, got {layerwise!r}.")
  for name, value in (("carry_inner_state", carry_inner_state),
                      ("carry_inner_iterate", carry_inner_iterate)):
    if not isinstance(value, bool):
      raise ValueError(f"{name} must be True or False, got {value!r}.")
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
  if linesearch is not None:
    try:
      sizes = tuple(float(a) for a in linesearch)
    except (TypeError, ValueError) as e:
      raise ValueError(
          f"linesearch must be None or a non-empty sequence of finite step "
          f"sizes >= 0, got {linesearch!r}.") from e
    if not sizes or any(not math.isfinite(a) or a < 0 for a in sizes):
      raise ValueError(
          f"linesearch must be None or a non-empty sequence of finite step "
          f"sizes >= 0, got {linesearch!r}.")
  if (isinstance(damping, bool)
      or not isinstance(damping, (int, float, np.integer, np.floating))
      or not math.isfinite(damping) or damping < 0):
    raise ValueError(f"damping must be a finite number >= 0, got {damping!r}.")
  if layers is not None and not callable(layers):
    if isinstance(layers, bool) or (
        isinstance(layers, int) and layers < 1):
      raise ValueError(
          f"layers must be None, an integer depth >= 1, a sequence of "
          f"top-level keys or a callable, got {layers!r}.")
    if not isinstance(layers, int):
      if isinstance(layers, (str, bytes)) or not isinstance(
          layers, (list, tuple)) or not layers:
        raise ValueError(
            f"layers must be None, an integer depth >= 1, a non-empty list "
            f"of top-level keys or a callable, got {layers!r}.")
  if layer_batch_size is not None and (
      isinstance(layer_batch_size, bool)
      or not isinstance(layer_batch_size, (int, np.integer))
      or layer_batch_size < 1):
    raise ValueError(
        f"layer_batch_size must be None or an integer >= 1, got "
        f"{layer_batch_size!r}.")


def _check_params(params: Any) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
          f"gauss_newton optimizes real floating-point parameters; the leaf "
          f"at {jax.tree_util.keystr(path)} has dtype "
          f"{jnp.result_type(leaf)}. Keep it out of the params passed to the "
          f"optimizer (e.g. nnx.split(model, nnx.Param, ...)).")


def _stacked_length(tree: Any, name: str) -> int:
  """The leading-axis length every leaf of ``tree`` shares; else an error."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not leaves:
    raise ValueError(
        f"{name} must be a pytree of arrays stacked along a leading axis, got "
        f"{tree!r} (no arrays).")
  shapes = [(jax.tree_util.keystr(p) or "<root>", np.shape(x))
            for p, x in leaves]
  lengths = {shape[0] if shape else None for _, shape in shapes}
  if None in lengths or len(lengths) > 1 or 0 in lengths:
    listing = ", ".join(f"{p}: {shape}" for p, shape in shapes)
    raise ValueError(
        f"{name} must be batches stacked along a leading axis that all its "
        f"leaves share, with at least one batch; got leaves of shapes "
        f"{listing}.")
  return int(lengths.pop())


def _check_arity(fn: Callable, name: str, nargs: int, hint: str) -> None:
  """Raise a ``TypeError`` naming ``fn`` if it cannot take ``nargs`` args."""
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):  # builtins etc.: let the call speak
    return
  try:
    signature.bind(*([None] * nargs))
  except TypeError as e:
    raise TypeError(
        f"{name} has the signature {name}{signature}, which cannot take "
        f"{nargs} positional argument{'s' if nargs > 1 else ''}: {hint}"
    ) from e


def _check_update_args(params, model_fn, loss_fn, batches, linesearch_batches,
                       inner_steps) -> None:
  for name, value in (("params", params), ("model_fn", model_fn),
                      ("loss_fn", loss_fn)):
    if value is None:
      raise TypeError(
          f"gauss_newton's update needs {name}: call tx.update(grads, "
          f"state, params, model_fn=model_fn, loss_fn=loss_fn) with "
          f"model_fn(params) -> outputs on the current batch and "
          f"loss_fn(outputs) -> batch-mean loss, or, streaming one batch "
          f"per inner step, with model_fn(params, batch), "
          f"loss_fn(outputs, batch) and batches=<stacked batches>.")
  if batches is None:
    if linesearch_batches is not None:
      raise ValueError(
          "linesearch_batches was given without batches: the line search "
          "over batches of its own calls model_fn(params, batch) and "
          "loss_fn(outputs, batch), the streaming form; pass the inner "
          "steps' batches too (batches=..., leading axis inner_steps).")
    _check_arity(model_fn, "model_fn", 1,
                 "without batches, model_fn(params) evaluates the model on "
                 "the batch (close over it); to stream batches, pass "
                 "batches=... and model_fn(params, batch).")
    _check_arity(loss_fn, "loss_fn", 1,
                 "without batches, loss_fn(outputs) is the batch-mean loss "
                 "(close over the targets); to stream batches, pass "
                 "batches=... and loss_fn(outputs, batch).")
    return
  length = _stacked_length(batches, "batches")
  if length != inner_steps:
    raise ValueError(
        f"batches holds {length} batches along its leading axis, but "
        f"inner_steps={inner_steps}: stack exactly one batch per inner step "
        f"(leading axis {inner_steps}).")
  if linesearch_batches is not None:
    _stacked_length(linesearch_batches, "linesearch_batches")
  _check_arity(model_fn, "model_fn", 2,
               "with batches, model_fn(params, batch) evaluates the model on "
               "one batch (a slice of batches along its leading axis).")
  _check_arity(loss_fn, "loss_fn", 2,
               "with batches, loss_fn(outputs, batch) is the batch-mean loss "
               "of model_fn(params, batch) on that batch.")


# ---------------------------------------------------------------------------
# The pieces of one outer step.


def _mask_to_layer(tree: Any, treedef: Any, leaf_ids: Sequence[Any],
                   k: jax.Array) -> Any:
  """``tree`` with every entry outside layer ``k`` zeroed.

  Args:
    tree: a pytree with the params' structure ``treedef``.
    treedef: the params' tree structure.
    leaf_ids: per leaf (flatten order) its layer index, or for a leaf
      stacked over layers a 1-D array of indices, one per slice of its leading
      axis (:func:`_leaf_layer_ids`).
    k: the layer index, an int32 scalar (traced or not); an index no leaf
      has selects nothing.

  Returns:
    ``tree`` with the leaves (slices of stacked leaves) of other layers zero.
  """
  out = []
  for leaf, ids in zip(treedef.flatten_up_to(tree), leaf_ids):
    if isinstance(ids, np.ndarray):
      keep = (jnp.asarray(ids) == k).reshape((-1,) + (1,) * (leaf.ndim - 1))
    else:
      keep = k == ids
    out.append(leaf * keep.astype(leaf.dtype))
  return treedef.unflatten(out)


def _block_diagonal(tangent_pass: Callable, params: Any, layers: LayerSpec,
                    layer_batch_size: Optional[int]) -> Callable:
  r"""The block-diagonal (layerwise) form of a tangent pass.

  With layers :math:`k = 1 \dots K` and :math:`P_k` the projection on layer
  ``k``'s entries, returns the pass

  .. math::

    \delta \mapsto \Bigl(\sum_k P_k\, g(P_k\delta),\;
      \sum_k o(P_k\delta)\Bigr)

  for ``tangent_pass(delta) = (g(delta), o(delta))``: each layer's tangent is
  ``delta`` masked to it, every other layer frozen. The layers run as one
  :func:`jax.lax.scan` over layer indices, ``layer_batch_size`` of them
  :func:`jax.vmap`-ed per scan step (the last chunk padded with indices that
  select nothing), so there is no Python loop over layers.

  Args:
    tangent_pass: ``(delta, with_grad) -> (grad or None, objective)``.
    params: the parameters (for the tree structure, dtypes and layers).
    layers: what a layer is, as in :func:`gauss_newton`.
    layer_batch_size: layers per scan step; ``None`` all at once.

  Returns:
    A pass with ``tangent_pass``'s signature.
  """
  leaf_ids, names = _leaf_layer_ids(params, layers)
  num_layers = len(names)
  chunk = num_layers if layer_batch_size is None else min(
      int(layer_batch_size), num_layers)
  num_chunks = -(-num_layers // chunk)
  treedef = jax.tree.structure(params)

  def block_pass(delta, with_grad):
    def one_layer(k):
      grad, obj = tangent_pass(_mask_to_layer(delta, treedef, leaf_ids, k),
                               with_grad)
      return ((_mask_to_layer(grad, treedef, leaf_ids, k) if with_grad
               else None), obj)

    def body(acc, ks):
      grads, objs = jax.vmap(one_layer)(ks)
      if with_grad:
        acc = jax.tree.map(
            lambda a, g: a + jnp.sum(g, 0).astype(a.dtype), acc, grads)
      return acc, jnp.sum(objs)

    # Padding indices >= num_layers select nothing (all-zero masks).
    ks = jnp.arange(num_chunks * chunk, dtype=jnp.int32).reshape(
        num_chunks, chunk)
    acc0 = jax.tree.map(jnp.zeros_like, params) if with_grad else None
    grad, objs = jax.lax.scan(body, acc0, ks)
    return grad, jnp.sum(objs)

  return block_pass


def _linearized_problem(
    model_fn: Callable[[Any], Any],
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    *,
    variant: str,
    damping: float,
    block: Optional[Callable[[Callable], Callable]] = None,
) -> tuple[jax.Array, Callable]:
  r"""The inner problem of one batch: the model linearized at ``params``.

  With :math:`z = f(\theta)` (``model_fn(params)``), :math:`J` its Jacobian
  and :math:`\ell` the loss, the objective is (see :func:`gauss_newton`)

  .. math::

    \tilde L(\delta) &= \nabla_z\ell^\top J\delta + \tfrac12 (J\delta)^\top
      \nabla_z^2\ell\, (J\delta) + \tfrac{\lambda}{2}\|\delta\|^2
      \quad (\texttt{"gn"}), \\
    \tilde L(\delta) &= \ell(z + J\delta) - \ell(z)
      + \tfrac{\lambda}{2}\|\delta\|^2 \quad (\texttt{"prox_linear"}),

  with gradient :math:`J^\top(\nabla_z\ell + \nabla_z^2\ell\,J\delta) +
  \lambda\delta` (resp. :math:`J^\top\nabla_z\ell(z + J\delta) +
  \lambda\delta`): one JVP (:func:`jax.linearize`), one VJP (its
  :func:`jax.linear_transpose`), the output Hessian as products
  (:func:`output_hvp`). The objective accumulates in float32.

  Args:
    model_fn: ``params -> outputs`` on the batch.
    loss_fn: ``outputs -> scalar`` batch-mean loss.
    params: the linearization point :math:`\theta`.
    variant: ``"gn"`` or ``"prox_linear"``.
    damping: :math:`\lambda \ge 0`.
    block: ``None`` for the full problem, or a map from a tangent pass to its
      block-diagonal form (:func:`_block_diagonal`) for the layerwise one.

  Returns:
    ``(loss0, objective_and_grad)``: the float32 batch loss at ``params`` and
    ``objective_and_grad(delta, with_grad=True) -> (grad or None,
    objective)``, the gradient a tree like ``params``.
  """
  outputs, jvp_fn = jax.linearize(model_fn, params)
  vjp_fn = jax.linear_transpose(jvp_fn, params)
  loss0, grad_z, hvp = output_hvp(loss_fn, outputs)
  loss0 = loss0.astype(jnp.float32)

  def output_terms(u):
    """Cotangent dL~/dz at J delta = u, and L~ without damping."""
    if variant == "gn":
      hu = hvp(u)
      return (_tree_add(grad_z, hu),
              _tree_vdot(grad_z, u) + 0.5 * _tree_vdot(u, hu))
    value, cot = jax.value_and_grad(loss_fn)(_tree_add(outputs, u))
    return cot, value.astype(jnp.float32) - loss0

  def tangent_pass(tangent, with_grad):
    cot, obj = output_terms(jvp_fn(tangent))
    return (vjp_fn(cot)[0] if with_grad else None), obj

  block_pass = tangent_pass if block is None else block(tangent_pass)

  def objective_and_grad(delta, with_grad=True):
    grad, obj = block_pass(delta, with_grad)
    if damping:
      obj = obj + 0.5 * damping * _tree_vdot(delta, delta)
      if with_grad:
        grad = jax.tree.map(
            lambda g, d: (g + damping * d).astype(g.dtype), grad, delta)
    return grad, obj

  return loss0, objective_and_grad


def _inner_solve(
    inner_optimizer: optax.GradientTransformation,
    problem: Callable[[Any], tuple[jax.Array, Callable]],
    params: Any,
    delta0: Any,
    inner_state: Any,
    inner_steps: int,
    batches: Any = None,
) -> tuple[Any, Any, jax.Array, jax.Array]:
  r"""``inner_steps`` steps of the inner optimizer on the inner problem.

  .. math::

    \delta_i = \delta_{i-1} + \mathrm{inner}\bigl(\nabla\tilde L_i
      (\delta_{i-1});\ \texttt{params} = \theta + \delta_{i-1}\bigr),
    \qquad i = 1 \dots N,

  one :func:`jax.lax.scan`. With one batch :math:`\tilde L_i = \tilde L` is
  linearized once, outside the scan; with ``batches`` step ``i`` linearizes on
  batch ``i`` inside the scan body, so one batch's linearization is alive at
  a time.

  Args:
    inner_optimizer: the Optax transformation taking the inner steps; it gets
      the iterate :math:`\theta + \delta` as ``params``.
    problem: ``batch -> (loss0, objective_and_grad)`` as returned by
      :func:`_linearized_problem`; called with ``None`` without ``batches``.
    params: :math:`\theta`.
    delta0: the starting step :math:`\delta_0`, a tree like ``params``.
    inner_state: the inner optimizer's starting state.
    inner_steps: ``N``; with ``batches`` it is their leading-axis length.
    batches: ``None``, or batches stacked along a leading axis of length
      ``N``, one per inner step.

  Returns:
    ``(delta, inner_state, loss0, final_objective)``: the step
    :math:`\hat\delta = \delta_N`, the inner state after it, the loss at
    ``params`` (with ``batches`` the mean over them) and
    :math:`\tilde L(\hat\delta)` (with ``batches`` on the last one).
  """
  def inner_update(delta, state, grad):
    iterate = _tree_add(params, delta)  # dead code unless the tx reads it
    step, state = inner_optimizer.update(grad, state, iterate)
    return optax.apply_updates(delta, step), state

  if batches is None:
    # One linearization, reused by every inner step.
    loss0, objective_and_grad = problem(None)

    def inner_step(carry, _):
      grad, _ = objective_and_grad(carry[0])
      return inner_update(*carry, grad), None

    (delta, inner_state), _ = jax.lax.scan(
        inner_step, (delta0, inner_state), None, length=inner_steps)
  else:
    def inner_step(carry, batch):
      batch_loss0, objective_and_grad = problem(batch)
      grad, _ = objective_and_grad(carry[0])
      return inner_update(*carry, grad), batch_loss0

    (delta, inner_state), batch_losses = jax.lax.scan(
        inner_step, (delta0, inner_state), batches)
    loss0 = jnp.mean(batch_losses)
    _, objective_and_grad = problem(jax.tree.map(lambda b: b[-1], batches))
  _, final_obj = objective_and_grad(delta, with_grad=False)
  return delta, inner_state, loss0, final_obj


def _line_search(
    step_sizes: Sequence[float],
    loss_at: Callable,
    params: Any,
    delta: Any,
    loss0: jax.Array,
    search_batches: Any = None,
    measure_zero: bool = False,
) -> tuple[jax.Array, jax.Array]:
  r"""The best step size on the true loss, and the loss it reaches.

  .. math::

    \alpha^\star = \arg\min_{\alpha \in \mathcal A} \bar L(\theta +
      \alpha\hat\delta), \qquad \bar L = L \text{ or }
      \tfrac1M \sum_{m=1}^M L(\cdot, B'_m),

  ties going to the first listed size, a ``nan`` loss counting as
  :math:`+\infty`. A size ``0.0`` costs nothing (its loss is ``loss0``)
  unless ``measure_zero``; each other size costs one forward pass per batch
  (a :func:`jax.lax.map` over sizes, inside a :func:`jax.lax.scan` over
  ``search_batches``).

  Args:
    step_sizes: the candidates :math:`\mathcal A`, Python floats.
    loss_at: ``p -> loss`` without ``search_batches``, else ``(p, batch) ->
      loss`` on one batch.
    params: :math:`\theta`.
    delta: :math:`\hat\delta`, a tree like ``params``.
    loss0: the loss at :math:`\alpha = 0`.
    search_batches: ``None``, or batches stacked along a leading axis to
      average the loss over.
    measure_zero: measure the loss at :math:`\alpha = 0` on
      ``search_batches`` instead of taking ``loss0`` (for batches other than
      those ``loss0`` was measured on).

  Returns:
    ``(alpha, loss_after)``, float32 scalars.
  """
  trial = [i for i, a in enumerate(step_sizes) if a != 0.0]
  zeros = [i for i, a in enumerate(step_sizes) if a == 0.0]
  measure_zero = measure_zero and bool(zeros)
  trial_sizes = jnp.asarray([step_sizes[i] for i in trial], jnp.float32)
  losses = jnp.full((len(step_sizes),), loss0)
  if search_batches is None:
    if trial:
      trial_losses = jax.lax.map(
          lambda a: loss_at(_axpy(a, delta, params)).astype(jnp.float32),
          trial_sizes)
      losses = losses.at[np.asarray(trial)].set(trial_losses)
  elif measure_zero or trial:
    def mean_losses(acc, batch):
      at = lambda p: loss_at(p, batch).astype(jnp.float32)
      parts = []
      if measure_zero:
        parts.append(at(params)[None])
      if trial:
        parts.append(jax.lax.map(lambda a: at(_axpy(a, delta, params)),
                                 trial_sizes))
      return acc + jnp.concatenate(parts), None

    count = int(measure_zero) + len(trial)
    sums, _ = jax.lax.scan(mean_losses, jnp.zeros([count], jnp.float32),
                           search_batches)
    means = sums / _stacked_length(search_batches, "linesearch_batches")
    if measure_zero:
      losses = losses.at[np.asarray(zeros)].set(means[0])
    if trial:
      losses = losses.at[np.asarray(trial)].set(means[int(measure_zero):])
  losses = jnp.where(jnp.isnan(losses), jnp.inf, losses)
  best = jnp.argmin(losses)
  return jnp.asarray(step_sizes, jnp.float32)[best], losses[best]


# ---------------------------------------------------------------------------
# The transformation.


def gauss_newton(
    inner_optimizer: optax.GradientTransformation,
    inner_steps: int = 10,
    *,
    layerwise: bool = False,
    variant: str = "gn",
    linesearch: Optional[Sequence[float]] = DEFAULT_LINESEARCH,
    damping: float = 0.0,
    layers: LayerSpec = None,
    layer_batch_size: Optional[int] = 1,
    carry_inner_state: bool = False,
    carry_inner_iterate: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Gauss-Newton steps whose inner problem an Optax optimizer solves.

  At :math:`\theta_t`, with the model outputs :math:`z_t = f(\theta_t)` on the
  batch, :math:`J = \partial f / \partial\theta (\theta_t)` and the batch-mean
  loss :math:`\ell(z)`, the inner optimizer minimises over the step
  :math:`\delta`, starting from :math:`\delta = 0`, for ``inner_steps`` steps,

  .. math::

    \tilde L(\delta) &= \nabla_z\ell^\top J\delta + \tfrac12 (J\delta)^\top
      \nabla_z^2\ell\, (J\delta) + \tfrac{\lambda}{2}\|\delta\|^2
      \quad (\texttt{variant="gn"}), \\
    \tilde L(\delta) &= \ell(z_t + J\delta) - \ell(z_t)
      + \tfrac{\lambda}{2}\|\delta\|^2 \quad (\texttt{variant="prox_linear"}),

  each inner gradient being :math:`J^\top(\nabla_z\ell + \nabla_z^2\ell\,
  J\delta) + \lambda\delta` (resp. :math:`J^\top \nabla_z\ell(z_t + J\delta) +
  \lambda\delta`): one Jacobian-vector product through the function
  :func:`jax.linearize` returns, one vector-Jacobian product through its
  :func:`jax.linear_transpose`, and :math:`\nabla_z^2\ell` only as products
  (:func:`output_hvp`). No matrix of size params² is ever formed. The result
  :math:`\hat\delta` is line-searched on the true batch loss,

  .. math::

    \alpha^\star = \arg\min_{\alpha \in \mathcal A}
      \ell(f(\theta_t + \alpha\hat\delta)), \qquad
    \theta_{t+1} = \theta_t + \alpha^\star\hat\delta,

  and the returned updates are :math:`\alpha^\star\hat\delta`, so that
  ``optax.apply_updates(params, updates)`` gives :math:`\theta_{t+1}`.

  **A batch per inner step** (the paper's protocol; ``update(...,
  batches=..., linesearch_batches=...)``): inner step :math:`i` draws its
  own batch :math:`B_i` and takes a step on the Gauss-Newton model of the
  loss on :math:`B_i`, the model being linearized at the same
  :math:`\theta_t`,

  .. math::

    \delta_i = \delta_{i-1} + \mathrm{inner}\bigl(J_i^\top(\nabla_z\ell_i
      + \nabla_z^2\ell_i\, J_i\delta_{i-1}) + \lambda\delta_{i-1}\bigr),
    \qquad J_i = \tfrac{\partial f(\cdot, B_i)}{\partial\theta}(\theta_t),

  (:math:`\ell_i` the loss on :math:`B_i`, its derivatives at
  :math:`z_{t,i} = f(\theta_t, B_i)`; for ``"prox_linear"``
  :math:`J_i^\top\nabla_z\ell_i(z_{t,i} + J_i\delta_{i-1})`; per layer
  when layerwise), and the line search minimises the
  true loss averaged over the batches :math:`B'_1, \dots, B'_M` of
  ``linesearch_batches``, :math:`\tfrac1M \sum_m
  \ell(f(\theta_t + \alpha\hat\delta, B'_m), B'_m)` (over the inner
  batches when none are given). Each inner step linearizes the model on its
  batch inside the :func:`jax.lax.scan` over ``batches`` (one forward pass
  more per inner step than with one batch), so memory holds the parameters,
  a few params-sized trees and one batch's linearization, whatever the
  number of batches; the line search, a scan over its batches, holds one
  forward pass.

  **Layerwise** (``layerwise=True``): the parameters are cut into layers
  :math:`\theta = (\theta_1, \dots, \theta_K)`, and each layer's block
  :math:`J_k` is solved with every other layer frozen (block-diagonal
  Gauss-Newton): :math:`\tilde L(\delta) = \sum_k \tilde L_k(\delta_k)` with
  :math:`\tilde L_k` the objective above with :math:`J_k\delta_k` in place of
  :math:`J\delta`. The inner optimizer runs once on the whole
  :math:`\delta`; for inner optimizers that treat leaves independently
  (SGD, Adam(W), Muon, Lion, ...) this is exactly one independent solve per
  layer, for those with a global statistic (``clip_by_global_norm``) the
  layers share it. The layer steps are joined and one line search is made.
  Each layer needs its own JVP and VJP per inner step, so an inner step costs
  ``K`` times a full one; they run without a Python loop over layers, as one
  :func:`jax.lax.scan` over layer indices in which layer ``k``'s tangent is
  :math:`\delta` masked to layer ``k`` (any mix of shapes works), with
  ``layer_batch_size`` layers :func:`jax.vmap`-ed per scan step.

  The inner optimizer's state is re-initialized at every outer step by
  default: each outer step poses a new problem (new linearization point and
  batch) and :math:`\delta` restarts from 0, so momentum from the previous
  problem would point the wrong way, and an inner schedule then spans the
  ``inner_steps`` of one solve. ``carry_inner_state=True`` keeps it instead
  (and stores it in the state), e.g. for one schedule across all outer steps
  (:func:`global_cosine_schedule`). The paper's runs keep it and the inner
  iterate (below), with a global cosine schedule and the line search
  :data:`SQRT2_LINESEARCH`: ``gauss_newton(optax.adamw(
  global_cosine_schedule(lr, T, N)), N, carry_inner_state=True,
  carry_inner_iterate=True, linesearch=SQRT2_LINESEARCH)``.

  ``carry_inner_iterate=True`` starts each inner solve where the previous one
  ended instead of at :math:`\delta = 0`: the inner iterate stays at
  :math:`\theta_{t-1} + \hat\delta_{t-1}`, so that :math:`\delta_0 =
  \theta_{t-1} + \hat\delta_{t-1} - \theta_t` (:math:`(1 -
  \alpha^\star)\hat\delta_{t-1}` when the updates are applied as
  returned), as in the paper's code, whose inner parameters persist across
  outer steps unless reset. It costs one params-sized tree of state and
  changes nothing when the line search takes :math:`\alpha = 1`.

  **In a chain**, ``gauss_newton`` ignores the updates it receives: it
  computes its own gradient :math:`J^\top\nabla_z\ell` (and the products
  above) from ``model_fn`` and ``loss_fn``, so a transformation before it in
  ``optax.chain(optax.clip_by_global_norm(1.0), gauss_newton(...))`` has no
  effect on the step. (Whether the incoming updates are the gradient it
  would compute cannot be checked without computing that gradient, so no
  error is raised.) To clip or otherwise transform the inner gradients, give
  the inner optimizer that chain, ``gauss_newton(optax.chain(
  optax.clip_by_global_norm(1.0), optax.sgd(lr)))``; transformations *after*
  it in a chain act on its returned step :math:`\alpha^\star\hat\delta` as
  usual.

  Args:
    inner_optimizer: any Optax transformation minimising the inner problem,
      e.g. ``optax.contrib.muon(lr)`` (the paper's choice), ``optax.adamw``,
      ``optax.sgd``. It gets the inner gradient and, as ``params``, the
      iterate :math:`\theta_t + \delta` (so decoupled weight decay acts on
      the weights, as in ordinary training).
    inner_steps: number ``N >= 1`` of inner steps per outer step (a
      :func:`jax.lax.scan`).
    layerwise: block-diagonal (per layer) instead of full Gauss-Newton.
    variant: ``"gn"`` (the quadratic Gauss-Newton model) or
      ``"prox_linear"`` (the loss of the linearized model, convex for convex
      losses).
    linesearch: the candidate step sizes :math:`\mathcal A`, a non-empty
      sequence of finite numbers ``>= 0``, evaluated on the true batch loss
      inside the compiled step (one forward pass per non-zero size, in a
      :func:`jax.lax.map`); ties go to the first listed. Keep ``0.0`` in it
      so a step never increases the batch loss. ``None``: no line search,
      :math:`\alpha = 1`. The paper's ladder is :data:`SQRT2_LINESEARCH`.
    damping: :math:`\lambda \ge 0`, Levenberg-Marquardt damping of the inner
      problem.
    layers: what a layer is (used when ``layerwise``): ``None`` -- each child
      of the top level of the params tree at which it first branches (the
      top-level keys; for linen's ``{"params": {...}}`` the keys below
      ``"params"``); an ``int`` ``d`` -- leaves sharing their first ``d`` path
      keys; a list of keys of that top level -- one layer each, all other
      leaves one more layer; a callable ``(path, leaf) -> id`` returning any
      hashable layer id, or, for a leaf stacked over layers (``nnx.scan`` /
      ``nn.scan`` blocks), a 1-D ``numpy`` array of ids, one per slice of its
      leading axis. :func:`layer_partition` shows the result.
    layer_batch_size: layers whose JVP/VJP are vmapped together (memory grows
      with it); ``None`` all at once.
    carry_inner_state: keep the inner optimizer's state across outer steps.
    carry_inner_iterate: start each inner solve from the previous one's final
      iterate instead of from :math:`\delta = 0`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`GaussNewtonState`. Its ``update(grads, state, params, *,
    model_fn, loss_fn, batches=None, linesearch_batches=None)`` needs
    ``params`` and the keyword arguments

    * one batch: ``model_fn`` (``params -> outputs`` on the current batch, a
      closure) and ``loss_fn`` (``outputs -> scalar`` batch-mean loss);
    * a batch per inner step: ``model_fn`` (``(params, batch) -> outputs``),
      ``loss_fn`` (``(outputs, batch) -> scalar``) and ``batches``, a pytree
      of arrays stacked along a leading axis of length ``inner_steps``
      (``batch`` is one slice of it); optionally ``linesearch_batches``,
      stacked the same way along a leading axis of any length ``M >= 1``.

    ``grads`` is not used (the inner problem computes
    :math:`J^\top\nabla_z\ell` itself; see "In a chain") and may be
    ``None``. The whole
    outer step is one traceable function: jit it once.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import microadam_optax as mo
    >>> x = jax.random.normal(jax.random.key(0), (32, 3))
    >>> y = jnp.tanh(x @ jnp.array([1.0, -2.0, 0.5]))
    >>> params = {"w": jnp.zeros(3)}
    >>> model_fn = lambda p: jnp.tanh(x @ p["w"])
    >>> loss_fn = lambda z: 0.5 * jnp.mean((z - y) ** 2)
    >>> tx = mo.gauss_newton(optax.sgd(1.0, momentum=0.9), inner_steps=50)
    >>> state = tx.init(params)
    >>> for _ in range(5):
    ...   updates, state = tx.update(None, state, params, model_fn=model_fn,
    ...                              loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(state.loss_after < 1e-6)
    True

    The paper's protocol: a fresh batch per inner step, the line search on
    batches of its own, the inner state (and schedule) and iterate kept
    across outer steps.

    >>> w_true = jnp.array([1.0, -2.0, 0.5])
    >>> def draw(key, count):  # count stacked batches of 16 examples
    ...   x = jax.random.normal(key, (count, 16, 3))
    ...   return {"x": x, "y": jnp.tanh(x @ w_true)}
    >>> model_fn = lambda p, batch: jnp.tanh(batch["x"] @ p["w"])
    >>> loss_fn = lambda z, batch: 0.5 * jnp.mean((z - batch["y"]) ** 2)
    >>> lr = mo.global_cosine_schedule(0.3, outer_steps=5, inner_steps=20)
    >>> tx = mo.gauss_newton(optax.adam(lr), inner_steps=20,
    ...                      carry_inner_state=True, carry_inner_iterate=True,
    ...                      linesearch=mo.SQRT2_LINESEARCH)
    >>> step = jax.jit(lambda p, s, b, ls: tx.update(
    ...     None, s, p, model_fn=model_fn, loss_fn=loss_fn, batches=b,
    ...     linesearch_batches=ls))
    >>> params, state = {"w": jnp.zeros(3)}, tx.init({"w": jnp.zeros(3)})
    >>> for key in jax.random.split(jax.random.key(1), 5):
    ...   inner_key, search_key = jax.random.split(key)
    ...   updates, state = step(params, state, draw(inner_key, 20),
    ...                         draw(search_key, 4))
    ...   params = optax.apply_updates(params, updates)
    >>> bool(state.loss_after < 1e-3), int(state.inner_state[0].count)
    (True, 100)

  References:
    Abreu, Vyas, Kakade, Morwani, `The Potential of Second-Order Optimization
    for LLMs: A Study with Full Gauss-Newton
    <https://arxiv.org/abs/2510.09378>`_, 2025.
  """
  _validate(inner_optimizer=inner_optimizer, inner_steps=inner_steps,
            layerwise=layerwise, variant=variant, linesearch=linesearch,
            damping=damping, layers=layers, layer_batch_size=layer_batch_size,
            carry_inner_state=carry_inner_state,
            carry_inner_iterate=carry_inner_iterate)
  inner_steps = int(inner_steps)
  damping = float(damping)
  step_sizes = None if linesearch is None else tuple(
      float(a) for a in linesearch)

  def init_fn(params):
    _check_params(params)
    inner_state = inner_optimizer.init(params) if carry_inner_state else ()
    # A copy, not params itself, so params and state can both be donated.
    inner_iterate = (jax.tree.map(jnp.copy, params) if carry_inner_iterate
                     else ())
    # One buffer per field, so the state can be donated to a jitted step.
    zero = lambda: jnp.zeros([], jnp.float32)
    return GaussNewtonState(
        count=jnp.zeros([], jnp.int32), step_size=zero(),
        inner_decrease=zero(), loss_before=zero(), loss_after=zero(),
        inner_state=inner_state, inner_iterate=inner_iterate)

  def update_fn(updates, state, params=None, *, model_fn=None, loss_fn=None,
                batches=None, linesearch_batches=None, **extra_args):
    del updates, extra_args  # see "In a chain" in the docstring
    _check_update_args(params, model_fn, loss_fn, batches, linesearch_batches,
                       inner_steps)
    _check_params(params)
    block = ((lambda tangent_pass: _block_diagonal(
        tangent_pass, params, layers, layer_batch_size)) if layerwise
             else None)
    if batches is None:
      problem = lambda _: _linearized_problem(
          model_fn, loss_fn, params, variant=variant, damping=damping,
          block=block)
    else:
      problem = lambda batch: _linearized_problem(
          lambda p: model_fn(p, batch), lambda z: loss_fn(z, batch), params,
          variant=variant, damping=damping, block=block)

    inner_state = (state.inner_state if carry_inner_state
                   else inner_optimizer.init(params))
    if carry_inner_iterate:
      delta0 = jax.tree.map(lambda w, p: (w - p).astype(p.dtype),
                            state.inner_iterate, params)
    else:
      delta0 = jax.tree.map(jnp.zeros_like, params)
    delta, inner_state, loss0, final_obj = _inner_solve(
        inner_optimizer, problem, params, delta0, inner_state, inner_steps,
        batches)

    if step_sizes is None:
      alpha = jnp.ones([], jnp.float32)
      loss_after = jnp.full([], jnp.nan, jnp.float32)
    elif batches is None:
      alpha, loss_after = _line_search(
          step_sizes, lambda p: loss_fn(model_fn(p)), params, delta, loss0)
    else:
      # The loss at alpha = 0 is loss0 on the inner batches themselves; on
      # batches of its own it is measured with the others.
      own = linesearch_batches is not None
      alpha, loss_after = _line_search(
          step_sizes, lambda p, batch: loss_fn(model_fn(p, batch), batch),
          params, delta, loss0,
          search_batches=linesearch_batches if own else batches,
          measure_zero=own)

    new_updates = jax.tree.map(
        lambda d, p: (alpha * d).astype(p.dtype), delta, params)
    new_state = GaussNewtonState(
        count=optax.safe_increment(state.count),
        step_size=alpha,
        inner_decrease=-final_obj,
        loss_before=loss0,
        loss_after=loss_after,
        inner_state=inner_state if carry_inner_state else (),
        inner_iterate=_tree_add(params, delta) if carry_inner_iterate else (),
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

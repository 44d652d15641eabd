"""MicroAdam: Adam with a window of Top-K-sparse gradients and 4-bit error feedback.

Modoranu et al., *MicroAdam: Accurate Adaptive Optimization with Low Space
Overhead and Provable Convergence*, NeurIPS 2024, arXiv:2405.15593.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from optax._src import numerics

from microadam_optax._layout import LeafLayout, leaf_layout
from pallas_kernels import quantize as quant_lib
from pallas_kernels import topk as topk_lib
from pallas_kernels import window as window_lib

#: Default elements per Top-K block and per quantization block. 4096 entries
#: (16 KiB of float32) fit one GPU program's registers/shared memory, give
#: ~1.6 M independent blocks on a 7B model, and keep the state at 0.902
#: byte/param (k = 41 per block, two float32 scales per 4096 entries).
DEFAULT_BLOCK_SIZE = 4096

#: Arguments of :func:`microadam` that fix array shapes. Pass them as
#: ``static_args`` to :func:`optax.inject_hyperparams`.
MICROADAM_STATIC_ARGS = (
    "window", "density", "topk_block_size", "quant_block_size", "error_bits",
    "values_dtype", "implementation",
)

_IMPLEMENTATIONS = ("auto", "xla", "pallas")


class MicroAdamState(NamedTuple):
  """State of :func:`scale_by_microadam`.

  Attributes:
    count: number of updates so far, int32 scalar.
    window_indices: per leaf, block-relative Top-K indices of the last
      ``window`` gradients, ``(window, num_blocks, k)`` int16 (int32 for
      blocks over 32768 elements).
    window_values: per leaf, the matching signed values,
      ``(window, num_blocks, k)`` in ``values_dtype``.
    error_codes: per leaf, the packed error-feedback codes,
      ``(num_quant_blocks, quant_block * error_bits / 8)`` uint8.
    error_min: per leaf, each quantization block's minimum (float32).
    error_max: per leaf, each quantization block's maximum (float32).
  """
  count: jax.Array
  window_indices: Any
  window_values: Any
  error_codes: Any
  error_min: Any
  error_max: Any


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _static_int(name: str, value: Any) -> Any:
  if value is None:
    return None
  if _is_traced(value):
    raise ValueError(
        f"{name} fixes the shape of MicroAdam's state and must be a Python "
        f"number, got a traced value. With optax.inject_hyperparams pass "
        f"static_args=microadam_optax.MICROADAM_STATIC_ARGS.")
  return value.item() if hasattr(value, "item") else value


def _validate(*, b1, b2, eps, window, density, topk_block_size,
              quant_block_size, error_bits, values_dtype, alpha,
              implementation) -> None:
  """Raises ValueError for arguments outside their valid range."""

  def concrete(x):
    return not _is_traced(x) and np.ndim(x) == 0

  if concrete(b1) and not 0.0 <= float(b1) < 1.0:
    raise ValueError(f"b1 must be in [0, 1), got {b1!r}.")
  if concrete(b2) and not 0.0 <= float(b2) < 1.0:
    raise ValueError(f"b2 must be in [0, 1), got {b2!r}.")
  if concrete(eps) and not float(eps) >= 0.0:
    raise ValueError(f"eps must be >= 0, got {eps!r}.")
  if (isinstance(window, bool) or not isinstance(window, (int, np.integer))
      or window < 1):
    raise ValueError(f"window must be an integer >= 1, got {window!r}.")
  if (isinstance(density, bool) or not isinstance(density, (int, float))
      or not 0.0 < density <= 1.0):
    raise ValueError(f"density must be in (0, 1], got {density!r}.")
  for name, value in (("topk_block_size", topk_block_size),
                      ("quant_block_size", quant_block_size)):
    if value is None:
      continue
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or value < 2 or value % 2):
      raise ValueError(
          f"{name} must be None or a positive even integer, got {value!r}.")
  if error_bits not in quant_lib.VALID_BITS:
    raise ValueError(
        f"error_bits must be one of {quant_lib.VALID_BITS}, got "
        f"{error_bits!r}.")
  try:
    vdt = jnp.dtype(values_dtype)
  except TypeError as e:
    raise ValueError(
        f"values_dtype must be bfloat16, float16 or float32, got "
        f"{values_dtype!r}.") from e
  if vdt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                 jnp.dtype(jnp.float32)):
    raise ValueError(
        f"values_dtype must be bfloat16, float16 or float32, got {vdt}.")
  if concrete(alpha) and not 0.0 <= float(alpha) < 1.0:
    raise ValueError(f"alpha must be in [0, 1), got {alpha!r}.")
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be one of {_IMPLEMENTATIONS}, got "
        f"{implementation!r}.")


def _resolve_implementation(implementation: str) -> str:
  """The implementation the kernels' dispatch receives (unchanged).

  ``"auto"`` is not resolved here from the host's back end: the kernel
  modules choose per *lowering* platform
  (:func:`pallas_kernels._backend.per_platform`), so that one traced update
  lowers to Triton kernels for GPU, Mosaic kernels for TPU and the XLA path
  for CPU. ``"pallas"`` does the same but interprets a kernel on CPU;
  ``"xla"`` is the XLA path everywhere.
  """
  return implementation


def _check_leaf(path: Any, leaf: Any) -> None:
  dtype = jnp.result_type(leaf)
  if not jnp.issubdtype(dtype, jnp.floating):
    kind = "complex" if jnp.issubdtype(dtype, jnp.complexfloating) else str(
        dtype)
    raise TypeError(
        f"MicroAdam optimizes real floating-point parameters; the leaf at "
        f"{jax.tree_util.keystr(path)} has dtype {kind}. Exclude it with "
        f"optax.masked / optax.multi_transform (or optax.set_to_zero).")


def _state_shardings(param: Any, lay: LeafLayout) -> Optional[tuple]:
  """Shardings of a leaf's five state arrays, consistent with ``param``'s.

  For a concrete parameter with a :class:`jax.sharding.NamedSharding` that
  splits only its first axis (FSDP), and whose shards hold whole Top-K and
  quantization blocks, the state is split the same way along its block axis:
  each device keeps the state of its own slice of the parameter, and the
  update moves nothing between devices. Other shardings give a state
  replicated over the mesh. Returns ``None`` for unsharded parameters and for
  tracers (inside ``jit``, where XLA places the state).
  """
  sharding = getattr(param, "sharding", None)
  if _is_traced(param) or not isinstance(sharding, NamedSharding):
    return None
  mesh = sharding.mesh
  spec = tuple(sharding.spec) + (None,) * max(0, param.ndim - len(
      sharding.spec))
  replicated = (NamedSharding(mesh, P()),) * 5
  if param.ndim == 0 or spec[0] is None or any(a is not None
                                               for a in spec[1:]):
    return replicated
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  parts = int(np.prod([mesh.shape[a] for a in axes]))
  shard = lay.size // parts
  if (lay.size % parts or shard % lay.topk_block or shard % lay.quant_block
      or lay.num_topk_blocks % parts or lay.num_quant_blocks % parts):
    return replicated
  window_spec = NamedSharding(mesh, P(None, spec[0], None))
  return (window_spec, window_spec,
          NamedSharding(mesh, P(spec[0], None)),
          NamedSharding(mesh, P(spec[0])), NamedSharding(mesh, P(spec[0])))


def _flat_padded(x: jax.Array, length: int) -> jax.Array:
  x = x.reshape(-1)
  return jnp.pad(x, (0, length - x.shape[0])) if length > x.shape[0] else x


def _unzip(fn: Callable[..., tuple], tree: Any, n: int, *rest: Any
           ) -> list[Any]:
  """Maps ``fn`` (returning an ``n``-tuple) over leaves; returns ``n`` trees."""
  treedef = jax.tree.structure(tree)
  leaves = [treedef.flatten_up_to(t) for t in (tree, *rest)]
  outs = [fn(*args) for args in zip(*leaves)]
  return [treedef.unflatten([o[i] for o in outs]) for i in range(n)]


class _Hyper(NamedTuple):
  b1: Any
  b2: Any
  eps: Any
  alpha: Any
  bits: int
  values_dtype: Any
  implementation: str


def _dequantize(codes, lo, hi, lay: LeafLayout, hp: _Hyper) -> jax.Array:
  """The dense float32 error ``(d,)`` held by the packed codes."""
  e = quant_lib.dequantize(codes, lo, hi, hp.bits, lay.quant_block,
                           implementation=hp.implementation)
  return e.reshape(-1)[:lay.size]


def _quantize(x: jax.Array, lay: LeafLayout, hp: _Hyper):
  """Packs the dense error ``(d,)`` into codes and per-block min/max."""
  x2 = _flat_padded(x, lay.quant_padded).reshape(lay.num_quant_blocks,
                                                  lay.quant_block)
  return quant_lib.quantize(x2, hp.bits, lay.last_quant_length,
                            implementation=hp.implementation)


def _leaf_update(g, idx_w, val_w, codes, lo, hi, count, lay: LeafLayout,
                 hp: _Hyper):
  """One MicroAdam step (Algorithm 1) for one flattened parameter.

  ``hp.implementation`` other than ``"xla"``: the dispatch functions of
  :mod:`pallas_kernels`, which choose per lowering platform (Triton kernels
  on GPU, Mosaic kernels on TPU; on CPU the XLA path under ``"auto"``, an
  interpreted kernel under ``"pallas"``). With coinciding Top-K and
  quantization blocks and 4-bit errors, steps 1-4 below are one fused
  kernel (:func:`pallas_kernels.error_feedback.error_feedback`); otherwise
  the separate kernels run.
  """
  from pallas_kernels import error_feedback as ef_lib  # pylint: disable=g-import-not-at-top
  window = idx_w.shape[0]
  kernels = hp.implementation != "xla"
  if kernels and lay.aligned and hp.bits == 4:
    # Steps 1-4 in one pass: dequantize + add, Top-K, zero, re-quantize.
    idx, vals, codes, lo, hi = ef_lib.error_feedback(
        g, codes, lo, hi, block_size=lay.topk_block, k=lay.k,
        last_block_k=lay.last_k, index_dtype=idx_w.dtype,
        values_dtype=val_w.dtype, implementation=hp.implementation)
  else:
    # a_t = g_t + Q^{-1}(e_t)
    a = g.reshape(-1).astype(jnp.float32) + _dequantize(codes, lo, hi, lay,
                                                        hp)
    # I_t, V_t = TopK(|a_t|) per block; a_t[I_t] = 0.
    a2 = _flat_padded(a, lay.topk_padded).reshape(lay.num_topk_blocks,
                                                   lay.topk_block)
    idx, vals = topk_lib.block_topk(
        a2, lay.k, last_block_length=lay.last_topk_length,
        last_block_k=lay.last_k, implementation=hp.implementation)
    slots = topk_lib.slot_mask(lay.num_topk_blocks, lay.k, lay.last_k)
    a = topk_lib.zero_selected(a2, idx, slots).reshape(-1)[:lay.size]
    # e_{t+1} = Q(a_t) with per-block min/max.
    codes, lo, hi = _quantize(a, lay, hp)
  # window[(t - 1) mod m] = (I_t, V_t)
  row = jnp.mod(count - 1, window)
  idx_w = jax.lax.dynamic_update_index_in_dim(
      idx_w, idx.astype(idx_w.dtype), row, 0)
  val_w = jax.lax.dynamic_update_index_in_dim(
      val_w, vals.astype(val_w.dtype), row, 0)
  # u_t = m_hat / (sqrt(v_hat) + eps)
  dense = not (isinstance(hp.alpha, (int, float)) and hp.alpha == 0)
  if kernels:
    u = window_lib.window_update(
        idx_w, val_w, count, block_size=lay.topk_block, b1=hp.b1, b2=hp.b2,
        eps=hp.eps, out_dtype=jnp.float32 if dense else g.dtype,
        implementation=hp.implementation)
  else:
    u = window_lib.window_update_reference(
        idx_w, val_w, count, block_size=lay.topk_block, b1=hp.b1, b2=hp.b2,
        eps=hp.eps)
  u = u.reshape(-1)[:lay.size]
  if dense:
    # Densify: u += alpha * Q^{-1}(e_{t+1}); keep (1 - alpha) of the error.
    err = _dequantize(codes, lo, hi, lay, hp)
    u = u + hp.alpha * err
    codes, lo, hi = _quantize((1 - hp.alpha) * err, lay, hp)
  return u.reshape(g.shape).astype(g.dtype), idx_w, val_w, codes, lo, hi


def scale_by_microadam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    window: int = 10,
    density: float = 0.01,
    topk_block_size: Optional[int] = None,
    quant_block_size: Optional[int] = None,
    error_bits: int = 4,
    values_dtype: Any = jnp.bfloat16,
    alpha: float = 0.0,
    implementation: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by MicroAdam's compressed estimate of Adam's moments.

  Every step the gradient plus the dequantized error feedback is compressed
  to its Top-K entries per block; what Top-K drops becomes the new error,
  stored on ``error_bits`` bits per entry; the last ``window`` compressed
  gradients rebuild Adam's moments (per parameter tensor, flattened row-major):

  .. math::

    a_t &= g_t + Q^{-1}(e_t), \quad (I_t, V_t) = \mathrm{TopK}(|a_t|), \quad
    e_{t+1} = Q(a_t - \mathrm{scatter}(I_t, V_t)), \\
    \hat m_t &= \tfrac{1-\beta_1}{1-\beta_1^t} \textstyle\sum_{i<\min(t,m)}
      \beta_1^{i} \,\mathrm{scatter}(I_{t-i}, V_{t-i}), \quad
    \hat v_t = \tfrac{1-\beta_2}{1-\beta_2^t} \textstyle\sum_{i<\min(t,m)}
      \beta_2^{i} \,\mathrm{scatter}(I_{t-i}, V_{t-i}^2), \\
    u_t &= \hat m_t / (\sqrt{\hat v_t} + \epsilon)
      \; [+\, \alpha\, Q^{-1}(e_{t+1}) \text{ and } e_{t+1} \leftarrow
      Q((1-\alpha) Q^{-1}(e_{t+1})) \text{ when } \alpha > 0].

  With the defaults (``window=10``, ``density=0.01``, bf16 values, int16
  indices, 4-bit errors) the state takes about 0.9 byte per parameter,
  against 8 for Adam with float32 moments. Entries outside every stored index
  get a zero update (the update is sparse unless ``alpha > 0``).

  Args:
    b1: decay of the first moment, in ``[0, 1)``.
    b2: decay of the second moment, in ``[0, 1)``.
    eps: added to the square root of the second moment, ``>= 0``.
    window: number ``m >= 1`` of compressed gradients kept.
    density: fraction ``k / B`` of each Top-K block kept, in ``(0, 1]``
      (``ceil(B * density)`` entries per block).
    topk_block_size: elements ``B`` per Top-K block of the flattened leaf
      (positive, even). ``None``: :data:`DEFAULT_BLOCK_SIZE`. The last block
      may be shorter (it keeps ``ceil(len * density)``); a leaf smaller than
      one block is one block.
    quant_block_size: elements ``q`` per quantization block (positive, even).
      ``None``: the Top-K block size, so that both block grids coincide.
    error_bits: bits per error-feedback code, 4 (the paper) or 8.
    values_dtype: dtype of the stored Top-K values: ``jnp.bfloat16`` (the
      paper), ``jnp.float16`` or ``jnp.float32``.
    alpha: in ``[0, 1)``; ``> 0`` densifies the update with that fraction of
      the error feedback (the authors' pre-training option).
    implementation: ``"xla"`` (pure XLA, every back end), ``"pallas"``
      (Pallas kernels) or ``"auto"`` (kernels on GPU/TPU, XLA elsewhere).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`MicroAdamState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import microadam_optax as mo
    >>> params = {"w": jnp.ones((64, 64)), "b": jnp.ones((64,))}
    >>> tx = optax.chain(mo.scale_by_microadam(density=0.05),
    ...                  optax.scale_by_learning_rate(1e-3))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(lambda p: 0.1 * p, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["w"].shape
    (64, 64)

  References:
    Modoranu et al., `MicroAdam: Accurate Adaptive Optimization with Low Space
    Overhead and Provable Convergence <https://arxiv.org/abs/2405.15593>`_,
    NeurIPS 2024.
  """
  window = _static_int("window", window)
  density = _static_int("density", density)
  topk_block_size = _static_int("topk_block_size", topk_block_size)
  quant_block_size = _static_int("quant_block_size", quant_block_size)
  error_bits = _static_int("error_bits", error_bits)
  _validate(b1=b1, b2=b2, eps=eps, window=window, density=density,
            topk_block_size=topk_block_size,
            quant_block_size=quant_block_size, error_bits=error_bits,
            values_dtype=values_dtype, alpha=alpha,
            implementation=implementation)
  bsize = DEFAULT_BLOCK_SIZE if topk_block_size is None else topk_block_size
  qsize = bsize if quant_block_size is None else quant_block_size
  vdtype = jnp.dtype(values_dtype)

  def layout(leaf) -> LeafLayout:
    return leaf_layout(int(np.prod(jnp.shape(leaf), dtype=np.int64)),
                       topk_block_size=bsize, quant_block_size=qsize,
                       density=density, error_bits=error_bits)

  def init_fn(params):
    jax.tree_util.tree_map_with_path(_check_leaf, params)

    def init_leaf(p):
      lay = layout(p)
      win = (window, lay.num_topk_blocks, lay.k)
      leaves = (jnp.zeros(win, lay.index_dtype),
                jnp.zeros(win, vdtype),
                jnp.zeros((lay.num_quant_blocks, lay.code_bytes), jnp.uint8),
                jnp.zeros((lay.num_quant_blocks,), jnp.float32),
                jnp.zeros((lay.num_quant_blocks,), jnp.float32))
      shardings = _state_shardings(p, lay)
      if shardings is None:
        return leaves
      return tuple(jax.device_put(x, s) for x, s in zip(leaves, shardings))

    return MicroAdamState(jnp.zeros([], jnp.int32),
                          *_unzip(init_leaf, params, 5))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    hp = _Hyper(b1=b1, b2=b2, eps=eps, alpha=alpha, bits=error_bits,
                values_dtype=vdtype,
                implementation=_resolve_implementation(implementation))
    count = numerics.safe_increment(state.count)

    def leaf(g, iw, vw, codes, lo, hi):
      lay = layout(g)
      if lay.size == 0:
        return (jnp.zeros_like(g), iw, vw, codes, lo, hi)
      return _leaf_update(g, iw, vw, codes, lo, hi, count, lay, hp)

    grads_tree = jax.tree.structure(updates)
    state_tree = jax.tree.structure(state.window_indices)
    if grads_tree != state_tree:
      raise ValueError(
          "The gradients' tree does not match MicroAdam's state (was the "
          "state made by init() on params of the same structure?): gradients "
          f"{grads_tree}, state {state_tree}.")
    parts = _unzip(leaf, updates, 6, state.window_indices,
                   state.window_values, state.error_codes, state.error_min,
                   state.error_max)
    return parts[0], MicroAdamState(count, *parts[1:])

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def microadam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    *,
    window: int = 10,
    density: float = 0.01,
    topk_block_size: Optional[int] = None,
    quant_block_size: Optional[int] = None,
    error_bits: int = 4,
    values_dtype: Any = jnp.bfloat16,
    alpha: float = 0.0,
    implementation: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  r"""MicroAdam with decoupled weight decay (AdamW-style).

  :func:`scale_by_microadam` followed by decoupled weight decay and the
  learning rate, i.e. :math:`\theta_{t+1} = \theta_t - \eta_t (u_t + \lambda
  \theta_t)`, the update of the authors' code.

  Args:
    learning_rate: a float or an optax schedule.
    b1: decay of the first moment, in ``[0, 1)``.
    b2: decay of the second moment, in ``[0, 1)``.
    eps: added to the square root of the second moment.
    weight_decay: decoupled weight decay ``lambda``.
    mask: pytree (or callable returning one) of booleans selecting the leaves
      that weight decay applies to, as in :func:`optax.adamw`.
    window: see :func:`scale_by_microadam`.
    density: see :func:`scale_by_microadam`.
    topk_block_size: see :func:`scale_by_microadam`.
    quant_block_size: see :func:`scale_by_microadam`.
    error_bits: see :func:`scale_by_microadam`.
    values_dtype: see :func:`scale_by_microadam`.
    alpha: see :func:`scale_by_microadam`.
    implementation: see :func:`scale_by_microadam`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import microadam_optax as mo
    >>> f = lambda x: jnp.sum((x - 1.0) ** 2)
    >>> params = jnp.zeros(1000)
    >>> tx = mo.microadam(learning_rate=0.01, density=0.1)
    >>> state = tx.init(params)
    >>> for _ in range(300):
    ...   updates, state = tx.update(jax.grad(f)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(f(params) < f(jnp.zeros(1000)))
    True

  References:
    Modoranu et al., `MicroAdam: Accurate Adaptive Optimization with Low Space
    Overhead and Provable Convergence <https://arxiv.org/abs/2405.15593>`_,
    NeurIPS 2024.
  """
  return optax.chain(
      scale_by_microadam(
          b1=b1, b2=b2, eps=eps, window=window, density=density,
          topk_block_size=topk_block_size, quant_block_size=quant_block_size,
          error_bits=error_bits, values_dtype=values_dtype, alpha=alpha,
          implementation=implementation),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )

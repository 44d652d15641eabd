"""MicroAdam: Adam with a window of Top-K-sparse gradients and 4-bit error feedback.

Modoranu et al., *MicroAdam: Accurate Adaptive Optimization with Low Space
Overhead and Provable Convergence*, NeurIPS 2024, arXiv:2405.15593.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Union
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from microadam_optax import _per_shard
from microadam_optax import _sharding
from microadam_optax import _trees
from microadam_optax import fused
from microadam_optax._alias import decoupled_alias
from microadam_optax._checks import check_float_leaves
from microadam_optax._layout import LeafLayout, leaf_layout
from pallas_kernels import dispatch
from pallas_kernels import quantize as quant_lib

#: Default elements per Top-K block and per quantization block. 4096 entries
#: (16 KiB of float32) fit one GPU program's registers/shared memory, give
#: ~1.6 M independent blocks on a 7B model, and keep the state at 0.902
#: byte/param (k = 41 per block, two float32 scales per 4096 entries).
DEFAULT_BLOCK_SIZE = 4096

#: Arguments of :func:`microadam` that fix array shapes. Pass them as
#: ``static_args`` to :func:`optax.inject_hyperparams`.
MICROADAM_STATIC_ARGS = (
    "window", "density", "topk_block_size", "quant_block_size", "error_bits",
    "values_dtype", "implementation", "kernel_config",
)

class ScaleByMicroAdamState(NamedTuple):
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


# Old names kept for user code and pickles. Checkpoints store no class names
# (Orbax and flax.serialization restore into the state that ``init`` makes);
# a pickle names its class by module and name, so an old name resolves here
# as well as in the package.
_DEPRECATED_ALIASES = {"MicroAdamState": "ScaleByMicroAdamState"}


def deprecated_alias(module: str, name: str) -> Any:
  """What the old ``name`` of ``module`` is, with a ``DeprecationWarning``.

  The body of the ``__getattr__`` of this module and of the package.

  Raises:
    AttributeError: when ``name`` is not an old name.
  """
  if name not in _DEPRECATED_ALIASES:
    raise AttributeError(f"module {module!r} has no attribute {name!r}")
  new_name = _DEPRECATED_ALIASES[name]
  warnings.warn(
      f"{module}.{name} is deprecated: it is {module}.{new_name} (the optax "
      f"naming of states, as optax.ScaleByAdamState), the same class.",
      DeprecationWarning, stacklevel=3)
  return globals()[new_name]


def __getattr__(name: str) -> Any:
  return deprecated_alias(__name__, name)


_is_traced = _sharding.is_traced


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
  dispatch.check_implementation(implementation)


class _Hyper(NamedTuple):
  b1: Any
  b2: Any
  eps: Any
  alpha: Any
  bits: int
  implementation: str
  config: dispatch.KernelConfig = dispatch.DEFAULT_CONFIG
  # The parameter's update, where the step applies it (apply_gradients).
  learning_rate: Any = None
  weight_decay: Any = 0.0


def _leaf_update(g, idx_w, val_w, codes, lo, hi, count, lay: LeafLayout,
                 hp: _Hyper, param=None):
  """One MicroAdam step (Algorithm 1) for one flattened parameter.

  Steps 1-5 (error feedback, Top-K, re-quantization, the window's new row and
  the update direction) are :func:`pallas_kernels.dispatch.leaf_step`, which
  decides which implementation runs; the densification of ``alpha > 0``
  follows in XLA. Given ``param``, the result is the updated parameter
  (:func:`pallas_kernels.dispatch.apply_update`, fused into the step's last
  kernel on GPU when ``alpha == 0``) in place of ``u``.
  """
  dense = not (isinstance(hp.alpha, (int, float)) and hp.alpha == 0)
  in_kernel = param is not None and not dense  # the update applied there
  u, idx_w, val_w, codes, lo, hi = dispatch.leaf_step(
      g, idx_w, val_w, codes, lo, hi, count, layout=lay, b1=hp.b1, b2=hp.b2,
      eps=hp.eps, bits=hp.bits,
      out_dtype=jnp.float32 if dense or param is not None else g.dtype,
      implementation=hp.implementation, config=hp.config,
      param=param if in_kernel else None, learning_rate=hp.learning_rate,
      weight_decay=hp.weight_decay)
  if dense:
    # Densify: u += alpha * Q^{-1}(e_{t+1}); keep (1 - alpha) of the error.
    err = dispatch.dequantize_leaf(codes, lo, hi, lay, hp.bits)
    u = u + hp.alpha * err
    codes, lo, hi = dispatch.quantize_leaf((1 - hp.alpha) * err, lay,
                                           hp.bits)
  if param is None:
    return u.reshape(g.shape).astype(g.dtype), idx_w, val_w, codes, lo, hi
  if not in_kernel:
    u = dispatch.apply_update(param.reshape(-1), u, hp.learning_rate,
                              hp.weight_decay)
  return u.reshape(param.shape), idx_w, val_w, codes, lo, hi


# ----------------------------------------------------------------------------
# Sharded parameters: the update runs on each device's local shard.
#
# The state's shapes depend on the parameter's shape alone (its global block
# layout, :func:`leaf_layout`), so a checkpoint restores into any mesh. A
# sharded leaf is updated locally when each of its shards holds a whole number
# of Top-K and quantization blocks: the state's block axis is then split over
# the mesh axes that split the parameter, shard i of the state belonging to
# shard i of the parameter, and each device runs the update on its own
# flattened shard, blocks formed over that shard (what the authors' FSDP code
# does on each rank's flat shard). When the shards are contiguous ranges of
# the flattened parameter (first-axis sharding) these are exactly the
# unsharded run's blocks, so the results are bit-identical to it. Leaves whose
# shards do not hold whole blocks (a bias split 8 ways, uneven shardings) keep
# a replicated state and are gathered for their update, with a warning.
# :mod:`microadam_optax._per_shard` runs the update per shard; what is
# MicroAdam's (the test of a shard grid, the state's specs) is here.


def _holds_whole_blocks(lay: LeafLayout, grid: _sharding.ShardGrid) -> bool:
  """Whether each shard of ``grid`` holds whole blocks of ``lay``."""
  local = math.prod(grid.local_shape)
  return local % lay.topk_block == 0 and local % lay.quant_block == 0


def _state_specs(axes_entry: Any) -> tuple[P, ...]:
  """PartitionSpecs of a leaf's five state arrays, split over ``axes_entry``."""
  return (P(None, axes_entry, None), P(None, axes_entry, None),
          P(axes_entry, None), P(axes_entry), P(axes_entry))


#: The state's dimensions as sharding-rule factors (window, Top-K blocks, k;
#: quantization blocks, code bytes): the indices and values share theirs, as
#: do the codes and their scales.
_STATE_FACTORS = ("w n k", "w n k", "q c", "q", "q")


def _warn_gather(shape: tuple[int, ...], spec: Any, lay: LeafLayout) -> None:
  warnings.warn(
      f"MicroAdam: a parameter of shape {shape} sharded as {spec} does not "
      f"hold whole blocks on each shard (Top-K block {lay.topk_block}, "
      f"quantization block {lay.quant_block} elements): it is gathered for "
      f"its update and its state is replicated. Replicate such small leaves, "
      f"or pick block sizes that divide each shard's size.", stacklevel=5)


def _init_leaf(p: Any, *, window: int, vdtype: Any, lay: LeafLayout
               ) -> tuple[jax.Array, ...]:
  """The zero state of one leaf, placed like the plan of its parameter."""
  shapes = ((window, lay.num_topk_blocks, lay.k),
            (window, lay.num_topk_blocks, lay.k),
            (lay.num_quant_blocks, lay.code_bytes),
            (lay.num_quant_blocks,), (lay.num_quant_blocks,))
  dtypes = (lay.index_dtype, vdtype, jnp.uint8, jnp.float32, jnp.float32)
  plan = _per_shard.plan(p, functools.partial(_holds_whole_blocks, lay))
  if plan.sharding is None:
    return tuple(jnp.zeros(s, d) for s, d in zip(shapes, dtypes))
  entry = plan.grid.axes_entry if plan.mode == "local" else None
  return tuple(_sharding.zeros(s, d, p, plan.sharding.mesh, spec)
               for s, d, spec in zip(shapes, dtypes, _state_specs(entry)))


def _distributed_leaf_update(g, state: tuple, count, layout: Callable[
    [Any], LeafLayout], hp: _Hyper, param=None):
  """:func:`_leaf_update` for one leaf, on its local shards where sharded
  (the parameter, if given, split like the gradient)."""
  lay = layout(g)
  shard_ok = functools.partial(_holds_whole_blocks, lay)
  plan = _per_shard.plan(g, shard_ok)
  if plan.mode == "global":
    return _leaf_update(g, *state, count, lay, hp, param)
  dyn, rebuild = _per_shard.split_traced(
      hp, ("b1", "b2", "eps", "alpha", "learning_rate", "weight_decay"))
  partners = () if param is None else (param,)

  def per_shard(g, *args):  # args: the partners, the state, the operands
    *p, iw, vw, codes, lo, hi, count1, dyn = args
    return _leaf_update(g, iw, vw, codes, lo, hi, count1[0], layout(g),
                        rebuild(dyn), *p)

  return _per_shard.run(
      per_shard, plan, g, state, (jnp.reshape(count, (1,)), dyn),
      shard_ok=shard_ok, state_specs=_state_specs,
      state_factors=_STATE_FACTORS,
      on_gather=lambda shape, spec: _warn_gather(shape, spec, lay),
      partners=partners)


def _microadam_fns(*, b1, b2, eps, window, density, topk_block_size,
                   quant_block_size, error_bits, values_dtype, alpha,
                   implementation, kernel_config):
  """MicroAdam's direction as a transformation, and its step function.

  The arguments are :func:`scale_by_microadam`'s, checked here.

  Returns:
    ``(transformation, step)``: :func:`scale_by_microadam`'s transformation,
    and ``step(grads, state, params=None, learning_rate=None,
    weight_decays=None) -> (out, state)``, its update, where ``out`` is
    ``u`` without ``params``, else the updated parameters
    (``weight_decays``: one per leaf, Python numbers or traced).
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
  if kernel_config is None:
    config = dispatch.DEFAULT_CONFIG
  elif isinstance(kernel_config, dispatch.KernelConfig):
    config = kernel_config
  else:
    raise ValueError(
        f"kernel_config must be None or a pallas_kernels.dispatch."
        f"KernelConfig, got {kernel_config!r}.")
  bsize = DEFAULT_BLOCK_SIZE if topk_block_size is None else topk_block_size
  qsize = bsize if quant_block_size is None else quant_block_size
  vdtype = jnp.dtype(values_dtype)

  def layout(leaf) -> LeafLayout:
    return leaf_layout(int(np.prod(jnp.shape(leaf), dtype=np.int64)),
                       topk_block_size=bsize, quant_block_size=qsize,
                       density=density, error_bits=error_bits)

  def init_fn(params):
    check_float_leaves(params, "MicroAdam")

    # The state is built on the tree around wrappers such as nnx.Variable:
    # its arrays are not shaped like their parameter, so they must not carry
    # its metadata (sharding names).
    leaves, outer, _ = _trees.flatten(params)
    per_leaf = [_init_leaf(p, window=window, vdtype=vdtype, lay=layout(p))
                for p in leaves]
    fields = [outer.unflatten([s[i] for s in per_leaf]) for i in range(5)]
    return ScaleByMicroAdamState(jnp.zeros([], jnp.int32), *fields)

  def step_fn(updates, state, params=None, learning_rate=None,
              weight_decays=None):
    # "auto" is passed on as it is: pallas_kernels.dispatch chooses per
    # lowering platform, so one traced update lowers to the Triton kernel
    # for GPU, the Mosaic kernels for TPU and XLA for CPU.
    hp = _Hyper(b1=b1, b2=b2, eps=eps, alpha=alpha, bits=error_bits,
                implementation=implementation, config=config,
                learning_rate=learning_rate)
    count = optax.safe_increment(state.count)

    def leaf(g, p, wd, iw, vw, codes, lo, hi):
      g = g if hasattr(g, "reshape") else jnp.asarray(g)  # Python floats
      if g.size == 0:
        return (jnp.zeros_like(g) if p is None else p, iw, vw, codes, lo, hi)
      return _distributed_leaf_update(g, (iw, vw, codes, lo, hi), count,
                                      layout, hp._replace(weight_decay=wd),
                                      p)

    grads, grads_tree, rewrap = _trees.flatten(updates)
    state_tree = jax.tree.structure(state.window_indices)
    if grads_tree != state_tree:
      raise ValueError(
          "The gradients' tree does not match MicroAdam's state (was the "
          "state made by init() on params of the same structure?): gradients "
          f"{grads_tree}, state {state_tree}.")
    if params is None:
      ps, wds = [None] * len(grads), [0.0] * len(grads)
    else:
      ps, params_tree, rewrap = _trees.flatten(params)
      if params_tree != grads_tree:
        raise ValueError(
            "params must have the gradients' tree structure: params "
            f"{params_tree}, gradients {grads_tree}.")
      wds = list(weight_decays)
    fields = [state_tree.flatten_up_to(f) for f in state[1:]]
    outs = [leaf(g, p, wd, *s) for g, p, wd, *s in zip(grads, ps, wds,
                                                       *fields)]
    out = grads_tree.unflatten([r(o[0]) for r, o in zip(rewrap, outs)])
    return out, ScaleByMicroAdamState(count, *(
        state_tree.unflatten([o[i] for o in outs]) for i in range(1, 6)))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return step_fn(updates, state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn), step_fn


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
    kernel_config: Optional[dispatch.KernelConfig] = None,
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
    implementation: ``"auto"`` (the kernels where the lowering platform has
      them: one Triton kernel per leaf on GPU, which needs ``jax-triton``,
      the Mosaic kernels on TPU; XLA elsewhere), ``"xla"`` (pure XLA, every
      back end) or ``"pallas"`` (as ``"auto"``, and on CPU the Mosaic
      kernels in Pallas' interpreter). :mod:`pallas_kernels.dispatch`
      decides; layouts whose Top-K and quantization blocks differ, and
      8-bit codes, take the XLA path everywhere.
    kernel_config: the kernels' tuning knobs, a
      :class:`pallas_kernels.dispatch.KernelConfig` (``None``: its defaults),
      among them how large a leaf the XLA path updates in one piece.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`ScaleByMicroAdamState`.

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
  return _microadam_fns(
      b1=b1, b2=b2, eps=eps, window=window, density=density,
      topk_block_size=topk_block_size, quant_block_size=quant_block_size,
      error_bits=error_bits, values_dtype=values_dtype, alpha=alpha,
      implementation=implementation, kernel_config=kernel_config)[0]


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
    kernel_config: Optional[dispatch.KernelConfig] = None,
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
      that weight decay applies to, as in :func:`optax.adamw`. ``None``: every
      leaf, as :func:`optax.adamw` does (unlike :func:`adam_mini`, whose
      ``None`` skips biases and norm scales, as its authors do).
    window, density, topk_block_size, quant_block_size, error_bits,
      values_dtype, alpha, implementation, kernel_config: see
      :func:`scale_by_microadam`.

  Returns:
    A :class:`microadam_optax.FusedGradientTransformation`: an
    :class:`optax.GradientTransformationExtraArgs` (``init``, ``update``)
    whose ``apply_gradients(grads, state, params)`` (or
    :func:`microadam_optax.apply_gradients`) returns the new parameters and
    state at once. On GPU the parameter is then updated inside the step's
    last kernel: no ``u`` is written and :func:`optax.apply_updates` does
    not re-read the parameters (donate them to the jitted step). The result
    is ``update`` then ``apply_updates`` computed in float32 and rounded
    once to the parameter's dtype (optax rounds the update to the
    gradient's dtype first). With ``alpha > 0`` or a weight-decay schedule
    the update is applied in XLA.

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
  direction, step_fn = _microadam_fns(
      b1=b1, b2=b2, eps=eps, window=window, density=density,
      topk_block_size=topk_block_size, quant_block_size=quant_block_size,
      error_bits=error_bits, values_dtype=values_dtype, alpha=alpha,
      implementation=implementation, kernel_config=kernel_config)
  tx = decoupled_alias(direction, learning_rate, weight_decay, mask)
  rate = optax.scale_by_learning_rate(learning_rate)

  def apply_gradients(grads, state, params, **extra_args):
    if callable(weight_decay):  # a schedule: optax's own two passes
      updates, state = tx.update(grads, state, params, **extra_args)
      return optax.apply_updates(params, updates), state
    direction_state, decay_state, rate_state = state
    # -lr at this step, and the rate's next state, from optax itself.
    neg_lr, rate_state = rate.update(jnp.ones([], jnp.float32), rate_state)
    decays = _leaf_decays(weight_decay, mask, params)
    params, direction_state = step_fn(grads, direction_state, params,
                                      -neg_lr, decays)
    return params, (direction_state, decay_state, rate_state)

  return fused.FusedGradientTransformation(tx.init, tx.update,
                                           apply_gradients)


def _leaf_decays(weight_decay: Any, mask: Any, params: Any) -> list[Any]:
  """Per array of ``params`` (wrappers counting as their array), the weight
  decay that ``optax.add_decayed_weights(weight_decay, mask)`` applies to
  it: ``weight_decay`` where the mask is true, 0.0 where it is false."""
  if mask is None:
    return [weight_decay] * len(_trees.flatten(params)[0])
  tree = mask(params) if callable(mask) else mask
  flags, mask_def = jax.tree.flatten(tree)
  decays = []
  for flag, sub in zip(flags, mask_def.flatten_up_to(params)):
    if isinstance(flag, (bool, np.bool_)):
      wd = weight_decay if flag else 0.0
    else:
      wd = jnp.where(flag, weight_decay, 0.0)
    decays += [wd] * len(_trees.flatten(sub)[0])
  return decays

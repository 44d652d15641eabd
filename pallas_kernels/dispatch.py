"""Which implementation of MicroAdam's per-leaf step runs, decided in one place.

The optimizer calls :func:`leaf_step` once per leaf and step. It chooses,
per *lowering* platform (:func:`jax.lax.platform_dependent`, so one traced
function lowers for GPU, TPU and CPU) and from the leaf's block layout, its
dtypes and the code width:

======================  ==================================================
where                   what runs
======================  ==================================================
GPU (``cuda``)          the two Triton kernels
                        (:func:`pallas_kernels.gpu.step.microadam_step_gpu`,
                        through jax-triton), any leaf size; given the
                        parameter, its update fused into the second
TPU                     the Mosaic TPU kernels: error feedback, then the
                        window (:mod:`pallas_kernels.tpu.error_feedback`,
                        :mod:`pallas_kernels.tpu.window`)
CPU, ``"auto"``         the XLA reference, :func:`leaf_step_reference` (in
                        groups of blocks for large leaves,
                        :func:`leaf_step_chunked`)
CPU, ``"pallas"``       the Mosaic TPU kernels in Pallas' interpreter
anywhere, ``"xla"``     the XLA reference
======================  ==================================================

The kernels need coinciding Top-K and quantization blocks
(``layout.aligned``) and 4-bit codes; other layouts (a user's different
block sizes, 8-bit codes) take the reference on every platform. On GPU the
kernel needs ``jax_triton`` (``pip install 'microadam-optax[gpu]'``);
without it the reference runs and a warning says so.

Tuning knobs live in :class:`KernelConfig`, a frozen dataclass passed
explicitly (nothing is read from the environment while tracing).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable
import warnings

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import quantize as quant_lib
from pallas_kernels import topk as topk_lib
from pallas_kernels import window as window_lib
from pallas_kernels.gpu import step as gpu_step
from pallas_kernels.tpu import error_feedback as tpu_error_feedback
from pallas_kernels.tpu import window as tpu_window

IMPLEMENTATIONS = ("auto", "xla", "pallas")


def _power_of_two_up_to(value: Any, high: int) -> bool:
  """Whether ``value`` is an int (not a bool) that is a power of two in
  ``[1, high]``."""
  return (isinstance(value, int) and not isinstance(value, bool)
          and 1 <= value <= high and not value & (value - 1))


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tuning knobs of MicroAdam's kernels.

  Attributes:
    gpu_num_warps: warps per program of the GPU's Top-K kernel (``None``:
      one per 1024 entries of a block, see
      :func:`pallas_kernels.gpu.step.default_num_warps`).
    gpu_sub_per_thread: entries per thread in the sub-tiles of the GPU's
      Top-K kernel (a power of two in [1, 64]; default
      :data:`pallas_kernels.gpu.step.SUB_PER_THREAD`, 8): fewer mean fewer
      registers, so more programs per SM, and more passes over the block.
    tpu_interpret: how ``implementation="pallas"`` runs the Mosaic kernels
      where there is no TPU: ``None`` (Pallas' generic interpreter, which
      also runs inside ``custom_partitioning`` and ``shard_map``) or a
      :class:`pltpu.InterpretParams` (the TPU interpreter, which checks
      more of what a TPU would, but whose callbacks
      ``custom_partitioning`` does not accept).
    xla_chunk_elements: the XLA path updates a leaf of more entries in
      groups of about this many (whole blocks, a loop over the groups,
      :func:`leaf_step_chunked`), so that its temporaries are a few groups'
      worth (default ``2**24``: ~0.4 GB), not the leaf's, with or without
      donated gradients and state. Results are the same: blocks are
      independent.
    xla_16bit_in_place: whether that loop updates 16-bit float arrays (a
      bf16 gradient and update, bf16 window values) in place. ``None``: on
      every platform but CPU. XLA:CPU computes 16-bit floats in float32, so
      there each group's update is a pass over the whole array (the step's
      time grows with the square of the leaf); without it the arrays go
      through the loop as integers, at the cost of one copy of each
      (~2.2 bytes per entry of a bf16 leaf).
  """
  gpu_num_warps: int | None = None
  gpu_sub_per_thread: int = gpu_step.SUB_PER_THREAD
  tpu_interpret: Any = None
  xla_chunk_elements: int = 1 << 24
  xla_16bit_in_place: bool | None = None

  def __post_init__(self):
    w = self.gpu_num_warps
    if w is not None and not _power_of_two_up_to(w, 32):
      raise ValueError(
          f"gpu_num_warps must be None or a power of two in [1, 32], got "
          f"{w!r}.")
    if not _power_of_two_up_to(self.gpu_sub_per_thread, 64):
      raise ValueError(
          f"gpu_sub_per_thread must be a power of two in [1, 64], got "
          f"{self.gpu_sub_per_thread!r}.")
    c = self.xla_chunk_elements
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
      raise ValueError(
          f"xla_chunk_elements must be a positive integer, got {c!r}.")
    if self.xla_16bit_in_place is not None and not isinstance(
        self.xla_16bit_in_place, bool):
      raise ValueError(
          f"xla_16bit_in_place must be None, True or False, got "
          f"{self.xla_16bit_in_place!r}.")
    if self.tpu_interpret is not None and not isinstance(
        self.tpu_interpret, pltpu.InterpretParams):
      raise ValueError(
          f"tpu_interpret must be None or a pltpu.InterpretParams, got "
          f"{self.tpu_interpret!r}.")


DEFAULT_CONFIG = KernelConfig()


def check_implementation(implementation: str) -> str:
  """Returns ``implementation`` after checking that it is a valid one."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be one of {IMPLEMENTATIONS}, got "
        f"{implementation!r}.")
  return implementation


def has_kernels(layout: Any, bits: int) -> bool:
  """Whether a leaf of ``layout`` with ``bits``-bit codes has kernels."""
  return bool(layout.aligned) and bits == 4


def _flat_padded(x: jax.Array, length: int) -> jax.Array:
  x = x.reshape(-1)
  return jnp.pad(x, (0, length - x.shape[0])) if length > x.shape[0] else x


def dequantize_leaf(codes, lo, hi, layout, bits: int) -> jax.Array:
  """The dense float32 error ``(d,)`` held by a leaf's packed codes."""
  e = quant_lib.dequantize_reference(codes, lo, hi, bits, layout.quant_block)
  return e.reshape(-1)[:layout.size]


def quantize_leaf(x: jax.Array, layout, bits: int):
  """Packs a leaf's dense error ``(d,)`` into codes and per-block min/max."""
  x2 = _flat_padded(x, layout.quant_padded).reshape(layout.num_quant_blocks,
                                                    layout.quant_block)
  return quant_lib.quantize_reference(x2, bits, layout.last_quant_length)


def apply_update(param, u, learning_rate, weight_decay):
  """The parameter after one step: :math:`\\theta - \\eta (u + \\lambda
  \\theta)`.

  Computed in float32 from the float32 ``u`` and rounded once to
  ``param``'s dtype, as the GPU kernel does (where ``optax.apply_updates``
  after :func:`optax.scale_by_learning_rate` rounds the update itself to the
  gradient's dtype first).

  Args:
    param: the parameter, any shape.
    u: the update direction, ``param.size`` elements, any float dtype.
    learning_rate: :math:`\\eta` (positive; may be traced).
    weight_decay: :math:`\\lambda` (may be traced).

  Returns:
    The new parameter, shaped and typed like ``param``.

  Example:
    >>> import jax.numpy as jnp
    >>> from pallas_kernels import dispatch
    >>> p = jnp.array([1.0, -2.0], jnp.bfloat16)
    >>> new = dispatch.apply_update(p, jnp.array([0.5, 0.0]), 0.1, 0.01)
    >>> str(new.dtype), new.astype(jnp.float32).tolist()  # -1.998 rounds
    ('bfloat16', [0.94921875, -2.0])
  """
  p = param.astype(jnp.float32)
  u = u.reshape(p.shape).astype(jnp.float32)
  lr = jnp.asarray(learning_rate, jnp.float32)
  if isinstance(weight_decay, (int, float)) and weight_decay == 0:
    return (p - lr * u).astype(param.dtype)
  wd = jnp.asarray(weight_decay, jnp.float32)
  return (p - lr * (u + wd * p)).astype(param.dtype)


def leaf_step_reference(grad, window_indices, window_values, codes, block_min,
                        block_max, count, param=None, *, layout, b1, b2, eps,
                        bits: int, out_dtype, learning_rate=None,
                        weight_decay=0.0):
  """MicroAdam's per-leaf step (Algorithm 1, steps 1-5) in plain XLA.

  .. math::

    a = g + Q^{-1}(e), \\quad (I, V) = \\mathrm{TopK}_B(|a|), \\quad
    e' = Q(a - a[I]), \\quad W_{(t-1) \\bmod m} = (I, V), \\quad
    u = \\hat m / (\\sqrt{\\hat v} + \\epsilon),

  and given ``param`` the parameter's update from the float32 ``u``
  (:func:`apply_update`) in place of ``u``.

  Args:
    grad: the gradient, any shape.
    window_indices, window_values: the window ``(m, num_blocks, k)``.
    codes, block_min, block_max: the packed error and its per-block range.
    count: the step ``t >= 1``.
    layout: the leaf's block layout (a :class:`LeafLayout`).
    b1, b2, eps: Adam's hyper-parameters.
    bits: 4 or 8.
    out_dtype: dtype of ``u``.
    param: the parameter (``grad.size`` elements), or ``None``.
    learning_rate, weight_decay: :math:`\\eta` and :math:`\\lambda` of
      :func:`apply_update`, with ``param``.

  Returns:
    ``(u (d,), window_indices, window_values, codes, block_min,
    block_max)``; with ``param``, the new parameter ``(d,)`` in its dtype in
    place of ``u``.
  """
  lay = layout
  a = grad.reshape(-1).astype(jnp.float32) + dequantize_leaf(
      codes, block_min, block_max, lay, bits)
  a2 = _flat_padded(a, lay.topk_padded).reshape(lay.num_topk_blocks,
                                                 lay.topk_block)
  idx, vals = topk_lib.block_topk_reference(
      a2, lay.k, last_block_length=lay.last_topk_length,
      last_block_k=lay.last_k)
  slots = topk_lib.slot_mask(lay.num_topk_blocks, lay.k, lay.last_k)
  a = topk_lib.zero_selected(a2, idx, slots).reshape(-1)[:lay.size]
  codes, block_min, block_max = quantize_leaf(a, lay, bits)
  window_indices, window_values = _write_row(window_indices, window_values,
                                             idx, vals, count)
  u = window_lib.window_update_reference(
      window_indices, window_values, count, block_size=lay.topk_block, b1=b1,
      b2=b2, eps=eps)
  u = u.reshape(-1)[:lay.size]
  if param is None:
    u = u.astype(out_dtype)
  else:
    u = apply_update(param.reshape(-1), u, learning_rate, weight_decay)
  return u, window_indices, window_values, codes, block_min, block_max


def _blocks_layout(layout, num_blocks: int, last: bool):
  """The layout of ``num_blocks`` consecutive blocks of an aligned ``layout``
  (``last``: they end with the leaf's last block)."""
  b = layout.topk_block
  size = (num_blocks - 1) * b + (layout.last_topk_length if last else b)
  return dataclasses.replace(
      layout, size=size, num_topk_blocks=num_blocks, num_quant_blocks=num_blocks,
      last_topk_length=layout.last_topk_length if last else b,
      last_k=layout.last_k if last else layout.k,
      last_quant_length=layout.last_quant_length if last else b)


def leaf_step_chunked(grad, window_indices, window_values, codes, block_min,
                      block_max, count, param=None, *, layout,
                      chunk_blocks: int, in_place_16bit: bool | None = None,
                      **kwargs):
  """:func:`leaf_step_reference` over groups of ``chunk_blocks`` blocks.

  Blocks are independent, so the results are those of
  :func:`leaf_step_reference`, bit for bit; only the temporaries differ.
  The last, possibly shorter, group (with the ragged last block) is updated
  first, then a loop (:func:`jax.lax.fori_loop`) takes the whole groups one
  at a time. Each output is updated in place: ``u`` over the gradient where
  their dtypes agree (else in a buffer of its own), the state over the
  state's buffers. The temporaries are then a few groups' worth whatever
  the leaf's size (~25 bytes per entry of a group on XLA:CPU), with or
  without donation: a step whose gradients and state are donated
  (``jax.jit(step, donate_argnums=...)``) needs no leaf-sized buffer beyond
  them; without donation XLA copies the inputs into the outputs, once.
  Needs an aligned layout.

  XLA:CPU computes every operation on 16-bit floats in float32, in-place
  updates included: the update of one group becomes a pass over the whole
  array. So on CPU by default (``in_place_16bit=None``) 16-bit float arrays
  (a bf16 gradient and ``u``, bf16 window values) go through the loop as
  unsigned integers of their width: the time stays linear in the leaf, at
  the cost of one copy of each array (XLA shares no buffer between element
  types; ~2.2 bytes per entry of a bf16 leaf). Arrays of 32-bit floats and
  integers are updated in place on every platform.

  In-place updates need every read of a buffer ordered before its writes.
  XLA orders by data dependences alone (``optimization_barrier`` is gone
  before XLA:CPU inserts copies) and copies the whole buffer where it
  cannot prove the order. So no group is read from a buffer after a write
  that does not feed the read:

  * the loop carries the next group's inputs, read at the end of each
    iteration from the buffers that iteration wrote;
  * the tail's results are written inside the loop, in its first iteration
    (a :func:`jax.lax.cond`): the loop then depends on them, hence on every
    read of the tail's inputs. Written before the loop, the tail's reads of
    a donated buffer race with that write; written after it, with the
    loop's first writes.

  Given ``param``, its update (:func:`apply_update`) is written over it,
  group by group, in place of ``u``.

  Args: as :func:`leaf_step_reference`, plus
    chunk_blocks: blocks per group, at least 1.
    in_place_16bit: whether 16-bit float arrays are updated in place as
      floats; ``None``: on every platform but CPU
      (:attr:`KernelConfig.xla_16bit_in_place`).

  Returns:
    As :func:`leaf_step_reference`.
  """
  args = (grad, window_indices, window_values, codes, block_min, block_max,
          count) + (() if param is None else (param,))
  if in_place_16bit is None:
    chunked = functools.partial(leaf_step_chunked, layout=layout,
                                chunk_blocks=chunk_blocks, **kwargs)
    return jax.lax.platform_dependent(
        *args, cpu=functools.partial(chunked, in_place_16bit=False),
        default=functools.partial(chunked, in_place_16bit=True))
  lay = layout
  nb, b = lay.num_topk_blocks, lay.topk_block
  groups = (nb - 1) // chunk_blocks  # whole groups before the tail
  tail = groups * chunk_blocks  # the tail's first block
  g = grad.reshape(-1)
  state = (window_indices, window_values, codes, block_min, block_max)
  if param is None:
    out_dtype = jnp.dtype(kwargs["out_dtype"])
    in_grad = out_dtype == g.dtype  # u written over the gradient
    first = g if in_grad else jnp.zeros((lay.size,), out_dtype)
  else:  # the new parameter written over the parameter
    out_dtype, in_grad, first = param.dtype, False, param.reshape(-1)
  outs = (first,) + state
  carried_params = param is not None
  # The step's inputs: the gradient, the state, the parameter (read from
  # outs[0]); per input its dtype, entries per block and block axis (the
  # outputs' are the first six).
  dtypes = ((g.dtype,) + tuple(x.dtype for x in state)
            + ((param.dtype,) if carried_params else ()))
  per_block = (b,) + (1,) * 5 + (b,) * carried_params
  axes = (0, 1, 1, 0, 0, 0) + (0,) * carried_params

  def carried(x):  # an array as the loop holds it
    if in_place_16bit or x.dtype not in (jnp.bfloat16, jnp.float16):
      return x
    return jax.lax.bitcast_convert_type(x, jnp.uint16)

  outs = tuple(map(carried, outs))
  grad_source = None if in_grad else carried(g)  # else read from outs[0]

  def step(*pieces, layout):
    return leaf_step_reference(*pieces[:6], count, *pieces[6:],
                               layout=layout, **kwargs)

  def sources(outs):  # the arrays the step's inputs are read from
    grads = outs[0] if in_grad else grad_source
    return (grads,) + outs[1:] + outs[:1] * carried_params

  def group(outs, blk):  # the step's inputs, blocks [blk, blk + chunk_blocks)
    return tuple(jax.lax.bitcast_convert_type(
        jax.lax.dynamic_slice_in_dim(x, blk * n, chunk_blocks * n, a), t)
                 for x, n, a, t in zip(sources(outs), per_block, axes, dtypes))

  def put(outs, pieces, blk):
    return tuple(jax.lax.dynamic_update_slice_in_dim(x, carried(y), blk * n, a)
                 for x, y, n, a in zip(outs, pieces, per_block, axes))

  tail_in = (jax.lax.bitcast_convert_type(
      jax.lax.slice_in_dim(x, tail * n, x.shape[a], axis=a), t)
             for x, n, a, t in zip(sources(outs), per_block, axes, dtypes))
  tail_out = step(*tail_in, layout=_blocks_layout(lay, nb - tail, last=True))
  if not groups:
    return tail_out
  full = _blocks_layout(lay, chunk_blocks, last=False)

  def body(i, carry):
    outs, pieces = carry
    blk = i * chunk_blocks
    outs = jax.lax.cond(i == 0, lambda o: put(o, tail_out, tail),
                        lambda o: o, outs)
    outs = put(outs, step(*pieces, layout=full), blk)
    return outs, group(outs, blk + chunk_blocks)

  outs, _ = jax.lax.fori_loop(0, groups, body, (outs, group(outs, 0)))
  return tuple(jax.lax.bitcast_convert_type(x, t)
               for x, t in zip(outs, (out_dtype,) + dtypes[1:6]))


def _write_row(window_indices, window_values, idx, vals, count):
  """The window with row ``(count - 1) mod m`` replaced by ``(idx, vals)``."""
  row = jnp.mod(jnp.asarray(count, jnp.int32) - 1, window_indices.shape[0])
  window_indices = jax.lax.dynamic_update_index_in_dim(
      window_indices, idx.astype(window_indices.dtype), row, 0)
  window_values = jax.lax.dynamic_update_index_in_dim(
      window_values, vals.astype(window_values.dtype), row, 0)
  return window_indices, window_values


def _leaf_step_mosaic(grad, window_indices, window_values, codes, block_min,
                      block_max, count, param=None, *, layout, b1, b2, eps,
                      out_dtype, interpret, learning_rate=None,
                      weight_decay=0.0):
  """The step with the Mosaic TPU kernels (error feedback, then window);
  the parameter's update, if any, in XLA."""
  lay = layout
  idx, vals, codes, block_min, block_max = tpu_error_feedback.error_feedback_mosaic(
      grad, codes, block_min, block_max, block_size=lay.topk_block, k=lay.k,
      last_block_k=lay.last_k, index_dtype=window_indices.dtype,
      values_dtype=window_values.dtype, interpret=interpret)
  window_indices, window_values = _write_row(window_indices, window_values,
                                             idx, vals, count)
  u = tpu_window.window_update_mosaic(
      window_indices, window_values, jnp.asarray(count, jnp.int32),
      block_size=lay.topk_block, b1=b1, b2=b2, eps=eps,
      out_dtype=out_dtype if param is None else jnp.float32,
      interpret=interpret)
  u = u.reshape(-1)[:lay.size]
  if param is not None:
    u = apply_update(param.reshape(-1), u, learning_rate, weight_decay)
  return u, window_indices, window_values, codes, block_min, block_max


def _leaf_step_gpu(grad, window_indices, window_values, codes, block_min,
                   block_max, count, param=None, *, layout, b1, b2, eps,
                   out_dtype, num_warps, sub_per_thread, learning_rate=None,
                   weight_decay=0.0):
  """The step with the GPU's Triton kernels (the parameter's update, if
  any, fused into the second)."""
  lay = layout
  u, window_indices, window_values, codes, block_min, block_max = (
      gpu_step.microadam_step_gpu(
          grad, codes, block_min, block_max, window_indices, window_values,
          count, block_size=lay.topk_block, k=lay.k, last_block_k=lay.last_k,
          b1=b1, b2=b2, eps=eps, out_dtype=out_dtype, num_warps=num_warps,
          sub_per_thread=sub_per_thread, param=param,
          learning_rate=learning_rate, weight_decay=weight_decay))
  return u, window_indices, window_values, codes, block_min, block_max


_warned_no_triton = []


def _warn_no_triton() -> None:
  if not _warned_no_triton and jax.default_backend() == "gpu":
    _warned_no_triton.append(True)
    warnings.warn(
        "MicroAdam on GPU runs its XLA path (several times slower, with "
        "leaf-sized temporaries): jax_triton is not installed. Install it "
        "with `pip install 'microadam-optax[gpu]'`.", stacklevel=3)


def leaf_step(grad, window_indices, window_values, codes, block_min,
              block_max, count, *, layout, b1, b2, eps, bits: int, out_dtype,
              implementation: str = "auto",
              config: KernelConfig = DEFAULT_CONFIG, param=None,
              learning_rate=None, weight_decay=0.0):
  """One MicroAdam step of one leaf, with the implementation chosen here.

  Given ``param``, the step also updates the parameter
  (:func:`apply_update`) and returns it in place of ``u``: on GPU inside
  the second kernel, in place (no ``u`` is written, and without weight
  decay only the window's entries of the parameter are touched); elsewhere
  in XLA after ``u``.

  Args: as :func:`leaf_step_reference`, plus
    implementation: ``"auto"`` (kernels where the lowering platform has
      them, see the module docstring), ``"xla"`` (the reference everywhere)
      or ``"pallas"`` (as ``"auto"``, and on CPU the Mosaic TPU kernels in
      the TPU interpreter).
    config: the kernels' tuning knobs.

  Returns:
    As :func:`leaf_step_reference`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from microadam_optax._layout import leaf_layout
    >>> from pallas_kernels import dispatch
    >>> lay = leaf_layout(1000, topk_block_size=256, quant_block_size=256,
    ...                   density=0.05, error_bits=4)
    >>> m, nb, k = 3, lay.num_topk_blocks, lay.k
    >>> state = (jnp.zeros((m, nb, k), jnp.int16),
    ...          jnp.zeros((m, nb, k), jnp.bfloat16),
    ...          jnp.zeros((nb, lay.code_bytes), jnp.uint8),
    ...          jnp.zeros((nb,)), jnp.zeros((nb,)))
    >>> g = jnp.linspace(-1.0, 1.0, 1000)
    >>> u, *state = dispatch.leaf_step(g, *state, 1, layout=lay, b1=0.9,
    ...                                b2=0.999, eps=1e-8, bits=4,
    ...                                out_dtype=jnp.float32)
    >>> int((u != 0).sum())  # 13 entries of each full block, 12 of the last
    51
  """
  check_implementation(implementation)
  if param is not None:
    if param.size != grad.size:
      raise ValueError(
          f"param must have as many elements as grad ({grad.size}), got "
          f"shape {param.shape}.")
    if learning_rate is None:
      raise ValueError("learning_rate must be given with param, got None.")
  args = (grad, window_indices, window_values, codes, block_min, block_max,
          jnp.asarray(count, jnp.int32)) + (() if param is None else (param,))
  hyper = dict(layout=layout, b1=b1, b2=b2, eps=eps, out_dtype=out_dtype)
  if param is not None:
    hyper.update(learning_rate=learning_rate, weight_decay=weight_decay)
  chunk_blocks = max(1, config.xla_chunk_elements // layout.topk_block)
  if layout.aligned and layout.num_topk_blocks > chunk_blocks:
    reference = functools.partial(
        leaf_step_chunked, bits=bits, chunk_blocks=chunk_blocks,
        in_place_16bit=config.xla_16bit_in_place, **hyper)
  else:
    reference = functools.partial(leaf_step_reference, bits=bits, **hyper)

  if implementation == "xla" or not has_kernels(layout, bits):
    return reference(*args)
  mosaic = functools.partial(_leaf_step_mosaic, **hyper)
  if gpu_step.available():
    gpu: Callable = functools.partial(_leaf_step_gpu,
                                      num_warps=config.gpu_num_warps,
                                      sub_per_thread=config.gpu_sub_per_thread,
                                      **hyper)
  else:
    _warn_no_triton()
    gpu = reference

  def other(*a):
    if implementation == "auto":
      return reference(*a)
    return mosaic(*a, interpret=config.tpu_interpret or True)

  return jax.lax.platform_dependent(
      *args, cuda=gpu, tpu=functools.partial(mosaic, interpret=None),
      default=other)


__all__ = ["IMPLEMENTATIONS", "KernelConfig", "apply_update", "has_kernels",
           "leaf_step", "leaf_step_chunked", "leaf_step_reference"]

"""MicroAdam on the large tensors, a dense optimizer where it saves nothing.

MicroAdam's state is about 0.9 byte per parameter on a large matrix, but its
update moves at most ``window * k`` entries of a tensor per window, each by a
sign-like step: norms, biases and embeddings -- where the published
algorithm loses most against AdamW -- are a small share of a large model's
parameters, so giving them dense Adam (or Adam-mini) costs little memory.
:func:`microadam_mixed` labels each leaf (:func:`microadam_labels`) and runs
:func:`optax.partition` over the two optimizers; the published MicroAdam is
unchanged on the leaves labelled ``"microadam"``.

Measured on the comparison's CPU tasks (``benchmarks/RESULTS.md``, the
MicroAdam gap study): dense Adam-mini on norms, biases and embeddings takes
MicroAdam's language model from +22 % to +6 % of AdamW's loss, and with the
same bytes of window spent on one row of 10 % (``window=1, density=0.1``)
instead of ten of 1 %, to -4.6 % at 1.05 byte per parameter (+0.3 %, a tie, at
four times the length).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from microadam_optax import _trees
from microadam_optax._alias import decoupled_alias
from microadam_optax.adam_mini import scale_by_adam_mini
from microadam_optax.memory import state_nbytes
from microadam_optax.microadam import scale_by_microadam
from pallas_kernels import dispatch

#: Label of the leaves given to MicroAdam.
MICROADAM_LABEL = "microadam"
#: Label of the leaves given to the dense optimizer.
DENSE_LABEL = "dense"

#: Path pattern of embeddings and output heads: Flax linen/NNX ports of
#: nanoGPT (``embed``, ``pos_embed``, ``lm_head``), Hugging Face GPT-2
#: (``wte``, ``wpe``) and Llama (``embed_tokens``), classifier heads
#: (``head``, ``classifier``, ``output``). Matched against the ``/``-joined
#: path of each leaf (``"transformer/wte/embedding"``).
EMBEDDING_NAMES = (r"(^|/)(embed|embedding|embeddings|embed_tokens|pos_embed|"
                   r"wte|wpe|lm_head|head|classifier|output)(/|$)")

#: Leaves with fewer entries than this go to the dense optimizer by default:
#: one default MicroAdam Top-K block (4096 entries).
DEFAULT_MIN_SIZE = 4096

_DENSE_KINDS = ("adam", "adam_mini")


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in jnp.shape(leaf))


def _num_entries(tree: Any) -> int:
  """Number of scalar entries of the array leaves of ``tree``."""
  return sum(int(np.prod(_shape(x), dtype=np.int64))
             for x in jax.tree.leaves(tree))


def _check_labels_args(min_size: Any, dense_names: Any) -> Optional[Any]:
  if (isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer))
      or min_size < 0):
    raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}.")
  if dense_names is None:
    return None
  try:
    return re.compile(dense_names)
  except (re.error, TypeError) as e:
    raise ValueError(
        f"dense_names must be None or a regular expression (a str or a "
        f"compiled pattern), got {dense_names!r}: {e}.") from e


def microadam_labels(
    params: Any,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    dense_names: Optional[Union[str, re.Pattern]] = None,
) -> Any:
  """Which optimizer :func:`microadam_mixed` gives each leaf of ``params``.

  A leaf is labelled :data:`DENSE_LABEL` (``"dense"``) when it has fewer than
  two dimensions (norm scales, biases), fewer than ``min_size`` entries, or a
  ``/``-joined path matched by ``dense_names`` (``re.search``); every other
  leaf is labelled :data:`MICROADAM_LABEL` (``"microadam"``). A leaf wrapped
  in a metadata node (``nnx.Variable``, linen's ``Partitioned``) gets one
  label in place of the wrapper, so the labels are a prefix of ``params``,
  as :func:`optax.partition` accepts.

  Args:
    params: the parameters, their gradients or their shapes
      (``jax.ShapeDtypeStruct``); dicts, linen variables, an NNX
      ``nnx.State``.
    min_size: leaves with fewer entries go to the dense optimizer (``>= 0``;
      0: by rank and name only).
    dense_names: ``None``, or a regular expression on the path of the leaves
      to give the dense optimizer whatever their size, e.g.
      :data:`EMBEDDING_NAMES`.

  Returns:
    A pytree of the strings ``"dense"`` and ``"microadam"``, a prefix of
    ``params``.

  Raises:
    ValueError: for a negative or non-integer ``min_size`` or an invalid
      ``dense_names``.

  Example:
    >>> import jax.numpy as jnp
    >>> import microadam_optax as mo
    >>> params = {"embed": {"embedding": jnp.zeros((256, 64))},
    ...           "dense": {"kernel": jnp.zeros((64, 256)),
    ...                     "bias": jnp.zeros((256,))}}
    >>> labels = mo.microadam_labels(params)
    >>> labels["dense"], labels["embed"]
    ({'bias': 'dense', 'kernel': 'microadam'}, {'embedding': 'microadam'})
    >>> mo.microadam_labels(params, dense_names=mo.EMBEDDING_NAMES)["embed"]
    {'embedding': 'dense'}
  """
  pattern = _check_labels_args(min_size, dense_names)

  def label(path: Any, leaf: Any) -> str:
    shape = _shape(leaf)
    if len(shape) < 2 or int(np.prod(shape, dtype=np.int64)) < min_size:
      return DENSE_LABEL
    if pattern is not None and pattern.search("/".join(_trees.path_keys(path))):
      return DENSE_LABEL
    return MICROADAM_LABEL

  return jax.tree_util.tree_map_with_path(label, params,
                                          is_leaf=_trees.is_wrapper)


def state_bytes_per_param(tx: optax.GradientTransformation,
                          params: Any) -> float:
  """Bytes of ``tx``'s state per parameter of ``params``, without allocating.

  Args:
    tx: any Optax transformation.
    params: the parameters or their shapes (``jax.ShapeDtypeStruct``).

  Returns:
    ``state_nbytes(jax.eval_shape(tx.init, params)) / number of parameters``
    (a ``float``; ``nan`` for parameters without entries).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import microadam_optax as mo
    >>> params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
    >>> round(mo.state_bytes_per_param(optax.adam(1e-3), params), 3)
    8.0
  """
  n = _num_entries(params)
  total = state_nbytes(jax.eval_shape(tx.init, params))
  return total / n if n else float("nan")


def _dense_transform(dense: str, b1: float, b2: float, eps: float,
                     mu_dtype: Any) -> optax.GradientTransformation:
  if dense == "adam":
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
  # Norms and biases get one v per tensor; embeddings and heads by the
  # authors' rules (one v per token row / output).
  return scale_by_adam_mini(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)


def scale_by_microadam_mixed(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    dense: str = "adam",
    dense_b1: Optional[float] = None,
    dense_b2: Optional[float] = None,
    dense_eps: Optional[float] = None,
    dense_mu_dtype: Optional[Any] = None,
    min_size: int = DEFAULT_MIN_SIZE,
    dense_names: Optional[Union[str, re.Pattern]] = None,
    max_state_bytes_per_param: Optional[float] = None,
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
  r"""MicroAdam's direction on the large tensors, Adam's on the others.

  Each leaf labelled by :func:`microadam_labels` (``min_size``,
  ``dense_names``) is rescaled either by :func:`scale_by_microadam` (labels
  ``"microadam"``, the published algorithm, unchanged) or by a dense
  optimizer (labels ``"dense"``): :func:`optax.scale_by_adam` (``dense=
  "adam"``; :math:`u = \hat m / (\sqrt{\hat v} + \epsilon)` with dense
  moments, 8 bytes per entry in float32) or :func:`scale_by_adam_mini`
  (``dense="adam_mini"``; one v per block, about 4 bytes per entry). Built
  on :func:`optax.partition`; the state is its ``PartitionState`` with one
  inner state per label.

  Args:
    b1: MicroAdam's first-moment decay, in ``[0, 1)``.
    b2: MicroAdam's second-moment decay, in ``[0, 1)``.
    eps: MicroAdam's epsilon, ``>= 0``.
    dense: the dense leaves' optimizer, ``"adam"`` or ``"adam_mini"``.
    dense_b1: its first-moment decay (``None``: ``b1``).
    dense_b2: its second-moment decay (``None``: ``b2``; AdamW's GPT recipe
      uses 0.95).
    dense_eps: its epsilon (``None``: ``eps``).
    dense_mu_dtype: dtype of its first moment (``None``: the parameter's;
      ``jnp.bfloat16`` halves it).
    min_size: see :func:`microadam_labels`.
    dense_names: see :func:`microadam_labels`.
    max_state_bytes_per_param: ``None``, or a budget: ``init`` raises
      ``ValueError`` when the state takes more bytes per parameter.
    window, density, topk_block_size, quant_block_size, error_bits,
      values_dtype, alpha, implementation, kernel_config: MicroAdam's, see
      :func:`scale_by_microadam`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for an unknown ``dense``, a budget that is not a positive
      number, invalid ``min_size`` / ``dense_names`` (here) or MicroAdam
      arguments (from :func:`scale_by_microadam`); from ``init``, a state
      over ``max_state_bytes_per_param``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import microadam_optax as mo
    >>> params = {"w": jnp.ones((128, 64)), "b": jnp.ones((64,))}
    >>> tx = mo.scale_by_microadam_mixed(dense_b2=0.95)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(lambda p: 0.1 * p, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> [round(float(x), 4) for x in updates["b"][:2]]  # Adam's first step
    [1.0, 1.0]
  """
  if dense not in _DENSE_KINDS:
    raise ValueError(f"dense must be one of {_DENSE_KINDS}, got {dense!r}.")
  if max_state_bytes_per_param is not None and (
      isinstance(max_state_bytes_per_param, bool)
      or not isinstance(max_state_bytes_per_param, (int, float))
      or not max_state_bytes_per_param > 0):
    raise ValueError(
        f"max_state_bytes_per_param must be None or a number > 0, got "
        f"{max_state_bytes_per_param!r}.")
  _check_labels_args(min_size, dense_names)
  labels = functools.partial(microadam_labels, min_size=min_size,
                             dense_names=dense_names)
  inner = optax.partition(
      {MICROADAM_LABEL: scale_by_microadam(
          b1=b1, b2=b2, eps=eps, window=window, density=density,
          topk_block_size=topk_block_size, quant_block_size=quant_block_size,
          error_bits=error_bits, values_dtype=values_dtype, alpha=alpha,
          implementation=implementation, kernel_config=kernel_config),
       DENSE_LABEL: _dense_transform(
           dense, b1 if dense_b1 is None else dense_b1,
           b2 if dense_b2 is None else dense_b2,
           eps if dense_eps is None else dense_eps, dense_mu_dtype)},
      labels)

  def init_fn(params):
    state = inner.init(params)
    if max_state_bytes_per_param is not None:
      n = _num_entries(params)
      used = state_nbytes(state) / max(n, 1)
      if used > max_state_bytes_per_param:
        tree = labels(params)
        dense_n = sum(
            _num_entries(sub)
            for lab, sub in zip(jax.tree.leaves(tree),
                                jax.tree.structure(tree).flatten_up_to(params))
            if lab == DENSE_LABEL)
        raise ValueError(
            f"max_state_bytes_per_param={max_state_bytes_per_param!r} is "
            f"exceeded: the state takes {used:.3f} bytes per parameter "
            f"({dense_n:,} of {n:,} parameters on dense {dense}). Valid: a "
            f"budget >= {used:.3f}, or fewer dense leaves (lower min_size, "
            f"dense_names=None), dense='adam_mini', dense_mu_dtype="
            f"jnp.bfloat16, or a smaller window / density.")
    return state

  return optax.GradientTransformationExtraArgs(init_fn, inner.update)


def microadam_mixed(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    *,
    dense: str = "adam",
    dense_b1: Optional[float] = None,
    dense_b2: Optional[float] = None,
    dense_eps: Optional[float] = None,
    dense_mu_dtype: Optional[Any] = None,
    min_size: int = DEFAULT_MIN_SIZE,
    dense_names: Optional[Union[str, re.Pattern]] = None,
    max_state_bytes_per_param: Optional[float] = None,
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
  r"""MicroAdam on the large tensors, dense Adam on the rest, with weight decay.

  :func:`scale_by_microadam_mixed` followed by decoupled weight decay and the
  learning rate: :math:`\theta_{t+1} = \theta_t - \eta_t (u_t + \lambda
  \theta_t)`, one learning rate for both optimizers.

  Args:
    learning_rate: a float or an optax schedule.
    weight_decay: decoupled weight decay ``lambda``.
    mask: pytree (or callable returning one) of booleans selecting the leaves
      that weight decay applies to, as in :func:`optax.adamw`. ``None``: every
      leaf, as :func:`microadam` and :func:`optax.adamw`.
    b1, b2, eps, dense, dense_b1, dense_b2, dense_eps, dense_mu_dtype,
      min_size, dense_names, max_state_bytes_per_param, window, density,
      topk_block_size, quant_block_size, error_bits, values_dtype, alpha,
      implementation, kernel_config: see :func:`scale_by_microadam_mixed`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import microadam_optax as mo
    >>> params = {"embed": jnp.zeros((256, 32)), "w": jnp.zeros((32, 256)),
    ...           "b": jnp.zeros((256,))}
    >>> tx = mo.microadam_mixed(1e-2, dense_b2=0.95,
    ...                         dense_names=mo.EMBEDDING_NAMES,
    ...                         max_state_bytes_per_param=5.0)
    >>> round(mo.state_bytes_per_param(tx, params), 2)
    4.51
    >>> f = lambda p: sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(p))
    >>> state = tx.init(params)
    >>> for _ in range(100):
    ...   updates, state = tx.update(jax.grad(f)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(f(params) < 0.5 * 2 * 256 * 33)
    True

  References:
    Modoranu et al., `MicroAdam: Accurate Adaptive Optimization with Low Space
    Overhead and Provable Convergence <https://arxiv.org/abs/2405.15593>`_,
    NeurIPS 2024.
  """
  return decoupled_alias(
      scale_by_microadam_mixed(
          b1=b1, b2=b2, eps=eps, dense=dense, dense_b1=dense_b1,
          dense_b2=dense_b2, dense_eps=dense_eps,
          dense_mu_dtype=dense_mu_dtype, min_size=min_size,
          dense_names=dense_names,
          max_state_bytes_per_param=max_state_bytes_per_param,
          window=window, density=density, topk_block_size=topk_block_size,
          quant_block_size=quant_block_size, error_bits=error_bits,
          values_dtype=values_dtype, alpha=alpha,
          implementation=implementation, kernel_config=kernel_config),
      learning_rate, weight_decay, mask)

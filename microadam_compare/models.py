"""Flax NNX models of the comparison: a small GPT and a digits CNN.

Layer names follow the conventions that name-based optimizers rely on
(Adam-mini's partition rules, Muon/GaLore's choice of matrices): ``embed`` and
``pos_embed`` (``nnx.Embed``), attention projections ``query``/``key``/
``value``/``out``, MLP ``Linear``s under ``mlp``, ``LayerNorm``s ``ln1``/
``ln2``/``ln_f`` and an untied ``lm_head``; the CNN's classifier is ``output``.
Neither model holds anything but ``nnx.Param`` (no dropout, no batch
statistics), so ``nnx.split`` gives a graph definition and a parameter tree,
and a training step is a pure function of the parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Shape of a decoder-only transformer on bytes.

  Attributes:
    vocab_size: number of token ids (256 for bytes).
    seq_len: context length (tokens per window).
    d_model: width of the residual stream.
    num_layers: number of transformer blocks.
    num_heads: attention heads per block (``d_model`` must divide evenly).
    mlp_ratio: width of the MLP hidden layer, in multiples of ``d_model``.
    dtype: the dtype activations and matrix products are computed in
      (``"float32"`` or ``"bfloat16"``: mixed precision, as GPT-2-sized
      models are trained on accelerators). Parameters, gradients and every
      optimizer's arithmetic stay ``float32``; attention's softmax, the
      LayerNorm statistics and the loss are computed in ``float32``.
  """
  vocab_size: int = 256
  seq_len: int = 128
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  dtype: str = "float32"

  def __post_init__(self):
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(
          f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}.")
    if self.d_model % self.num_heads:
      raise ValueError(
          f"d_model ({self.d_model}) must be a multiple of num_heads "
          f"({self.num_heads}).")

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.d_model // self.num_heads

  def num_params(self) -> int:
    """Number of parameters of :class:`GPT` with this configuration."""
    d, f = self.d_model, self.mlp_ratio * self.d_model
    block = 4 * d * d + 2 * d * f + 4 * d
    return ((self.vocab_size + self.seq_len) * d + self.num_layers * block
            + 2 * d + d * self.vocab_size)


#: Model sizes: ``tiny`` for smoke tests (~42 k parameters), ``cpu`` for the
#: default comparison on a two-core CPU (~1.0 M), ``gpu`` for one
#: accelerator (~86 M, GPT-2-small-like, bfloat16 mixed precision: on one
#: H200 its step takes 43 ms against 84 ms in float32, for the same loss,
#: ``benchmarks/gpt_dtype_step.py``).
GPT_PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(seq_len=32, d_model=32, num_layers=2, num_heads=2),
    "cpu": GPTConfig(seq_len=128, d_model=160, num_layers=3, num_heads=5),
    "gpu": GPTConfig(seq_len=512, d_model=768, num_layers=12, num_heads=12,
                     dtype="bfloat16"),
}


def _normal(std: float) -> Callable[..., jax.Array]:
  return nnx.initializers.normal(stddev=std)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with explicit ``query``/``key``/
  ``value``/``out`` projections (2-D ``[d_model, d_model]`` kernels).

  Written with ``einsum`` and ``softmax`` only, so it has JVP and transpose
  rules everywhere (Gauss-Newton linearizes it).
  """

  def __init__(self, d_model: int, num_heads: int, *, out_std: float,
               rngs: nnx.Rngs, dtype: Any = jnp.float32):
    self.num_heads = num_heads
    init = _normal(0.02)
    self.query = nnx.Linear(d_model, d_model, use_bias=False,
                            kernel_init=init, dtype=dtype, rngs=rngs)
    self.key = nnx.Linear(d_model, d_model, use_bias=False, kernel_init=init,
                          dtype=dtype, rngs=rngs)
    self.value = nnx.Linear(d_model, d_model, use_bias=False,
                            kernel_init=init, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(d_model, d_model, use_bias=False,
                          kernel_init=_normal(out_std), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.num_heads
    q = self.query(x).reshape(b, t, h, d // h)
    k = self.key(x).reshape(b, t, h, d // h)
    v = self.value(x).reshape(b, t, h, d // h)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    logits = jnp.where(causal, logits.astype(jnp.float32),
                       jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
    return self.out(y)


class MLP(nnx.Module):
  """Two ``Linear`` layers with a GELU between them."""

  def __init__(self, d_model: int, hidden: int, *, out_std: float,
               rngs: nnx.Rngs, dtype: Any = jnp.float32):
    self.fc_in = nnx.Linear(d_model, hidden, use_bias=False,
                            kernel_init=_normal(0.02), dtype=dtype, rngs=rngs)
    self.fc_out = nnx.Linear(hidden, d_model, use_bias=False,
                             kernel_init=_normal(out_std), dtype=dtype,
                             rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc_out(jax.nn.gelu(self.fc_in(x)))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    out_std = 0.02 / math.sqrt(2 * config.num_layers)
    dtype = jnp.dtype(config.dtype)
    self.ln1 = nnx.LayerNorm(config.d_model, dtype=dtype, rngs=rngs)
    self.attn = CausalSelfAttention(config.d_model, config.num_heads,
                                    out_std=out_std, rngs=rngs, dtype=dtype)
    self.ln2 = nnx.LayerNorm(config.d_model, dtype=dtype, rngs=rngs)
    self.mlp = MLP(config.d_model, config.mlp_ratio * config.d_model,
                   out_std=out_std, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class _Backbone(nnx.Module):
  """What :class:`GPT` and :class:`GPTClassifier` share, under the names of
  :data:`BACKBONE`: token and position embeddings, blocks, a final
  LayerNorm; its parameters are made first, in that order."""

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    self.embed = nnx.Embed(config.vocab_size, config.d_model,
                           embedding_init=_normal(0.02), dtype=dtype, rngs=rngs)
    self.pos_embed = nnx.Embed(config.seq_len, config.d_model,
                               embedding_init=_normal(0.01), dtype=dtype,
                               rngs=rngs)
    self.blocks = nnx.List(
        [Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.ln_f = nnx.LayerNorm(config.d_model, dtype=dtype, rngs=rngs)

  def hidden_states(self, tokens: jax.Array) -> jax.Array:
    """``int32`` tokens ``[batch, time]`` to the normalised final hidden
    states ``[batch, time, d_model]``."""
    t = tokens.shape[-1]
    x = self.embed(tokens) + self.pos_embed(jnp.arange(t))
    for block in self.blocks:
      x = block(x)
    return self.ln_f(x)


class GPT(_Backbone):
  """A decoder-only transformer: token and position embeddings, blocks, an
  untied ``lm_head``. Maps ``int32`` tokens ``[batch, time]`` to logits
  ``[batch, time, vocab_size]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from microadam_compare import models
    >>> model = models.GPT(models.GPT_PRESETS["tiny"], rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 32), jnp.int32)).shape
    (2, 32, 256)
  """

  def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    self.lm_head = nnx.Linear(config.d_model, config.vocab_size,
                              use_bias=False, kernel_init=_normal(0.02),
                              dtype=jnp.dtype(config.dtype), rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.lm_head(self.hidden_states(tokens))


class GPTClassifier(_Backbone):
  """A :class:`GPT` backbone (``embed``, ``pos_embed``, ``blocks``,
  ``ln_f``) with a sequence-classification head (``output``) on the mean of
  the final hidden states. Maps ``int32`` tokens ``[batch, time]`` to logits
  ``[batch, num_classes]``; the backbone's parameters have the GPT's names,
  so a pre-trained GPT's (minus ``lm_head``) drop in.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from microadam_compare import models
    >>> model = models.GPTClassifier(models.GPT_PRESETS["tiny"], 6,
    ...                              rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 32), jnp.int32)).shape
    (2, 6)
  """

  def __init__(self, config: GPTConfig, num_classes: int, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    self.output = nnx.Linear(config.d_model, num_classes,
                             kernel_init=_normal(0.02),
                             dtype=jnp.dtype(config.dtype), rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.output(jnp.mean(self.hidden_states(tokens), axis=-2))


#: The parameters a :class:`GPTClassifier` takes from a pre-trained GPT.
BACKBONE = ("embed", "pos_embed", "blocks", "ln_f")


def gpt_layer_id(path: tuple, leaf: Any) -> Hashable:
  """The Gauss-Newton layer of a :class:`GPT` parameter.

  One layer per transformer block, one for both embeddings, one for the final
  norm and the head: ``num_layers + 2`` layers. Pass as ``layers=`` to
  ``mo.gauss_newton(..., layerwise=True)``.

  Args:
    path: the leaf's key path in the parameter tree (pure ``dict``).
    leaf: the leaf (unused).

  Returns:
    ``("blocks", i)``, ``"embedding"`` or ``"head"``.
  """
  del leaf
  names = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
           for k in path]
  if names and names[0] == "blocks":
    return ("blocks", int(names[1]))
  if names and names[0] in ("embed", "pos_embed"):
    return "embedding"
  return "head"


@dataclasses.dataclass(frozen=True)
class CNNConfig:
  """Shape of :class:`DigitsCNN`.

  Attributes:
    channels: output channels of the two convolutions.
    hidden: width of the hidden ``Linear`` layer.
    num_classes: number of classes.
    image_size: height and width of the (square, one-channel) images.
  """
  channels: tuple[int, int] = (16, 32)
  hidden: int = 128
  num_classes: int = 10
  image_size: int = 8


CNN_PRESETS: dict[str, CNNConfig] = {
    "tiny": CNNConfig(channels=(4, 8), hidden=16),
    "cpu": CNNConfig(),
    "gpu": CNNConfig(channels=(64, 128), hidden=512),
}


class DigitsCNN(nnx.Module):
  """Two 3x3 convolutions (the second with stride 2), a hidden ``Linear``
  (``dense1``) and the classifier (``output``). Maps images
  ``[batch, 8, 8, 1]`` to logits ``[batch, num_classes]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from microadam_compare import models
    >>> model = models.DigitsCNN(models.CNNConfig(), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((5, 8, 8, 1))).shape
    (5, 10)
  """

  def __init__(self, config: CNNConfig, *, rngs: nnx.Rngs):
    c1, c2 = config.channels
    self.config = config
    # He-normal kernels (ReLU network), not truncated: cheap to initialize.
    init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
    self.conv1 = nnx.Conv(1, c1, kernel_size=(3, 3), kernel_init=init,
                          rngs=rngs)
    self.conv2 = nnx.Conv(c1, c2, kernel_size=(3, 3), strides=(2, 2),
                          kernel_init=init, rngs=rngs)
    side = -(-config.image_size // 2)
    self.dense1 = nnx.Linear(side * side * c2, config.hidden, kernel_init=init,
                             rngs=rngs)
    self.output = nnx.Linear(
        config.hidden, config.num_classes,
        kernel_init=nnx.initializers.variance_scaling(1.0, "fan_in", "normal"),
        rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.conv1(images))
    x = jax.nn.relu(self.conv2(x))
    x = x.reshape(x.shape[0], -1)
    return self.output(jax.nn.relu(self.dense1(x)))


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
  """``nnx.split`` a model that holds only ``nnx.Param`` into its graph
  definition and a pure ``dict`` of parameter arrays.

  A pure dict has plain ``/``-joinable paths (``blocks/0/attn/query/kernel``)
  that every Optax optimizer and name-based partition understands.

  Raises:
    ValueError: if the model holds variables other than parameters.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(
        "split_params expects a model whose only variables are nnx.Param; "
        f"it also holds {jax.tree.map(jnp.shape, rest)}.")
  return graphdef, nnx.to_pure_dict(params)


def merge_params(graphdef: nnx.GraphDef, params: dict) -> nnx.Module:
  """Rebuilds the module of :func:`split_params` from a parameter ``dict``
  (traceable: call it inside ``jax.jit``/``jax.linearize``)."""
  return nnx.merge(graphdef, params)


def num_params(params: Any) -> int:
  """Number of scalar parameters in a pytree of arrays."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))

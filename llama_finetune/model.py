"""A Llama decoder in Flax NNX, laid out like Hugging Face's ``LlamaForCausalLM``.

The maths is Hugging Face's (``transformers/models/llama/modeling_llama.py``),
so their checkpoints load without any permutation (:mod:`checkpoint`):

* RMSNorm: ``scale * (x / sqrt(mean(x**2) + eps))``, statistics in float32;
* rotary embeddings in the ``rotate_half`` layout: frequencies
  ``theta**(-2j/head_dim)`` for ``j < head_dim/2``, repeated once
  (``cos``/``sin`` of width ``head_dim``), ``q' = q*cos + rotate_half(q)*sin``
  with ``rotate_half([a, b]) = [-b, a]``;
* grouped-query attention: ``num_heads`` query heads share
  ``num_kv_heads`` key/value heads, causal, scaled by ``1/sqrt(head_dim)``;
* SwiGLU MLP: ``down(silu(gate(x)) * up(x))``;
* a tied (the embedding's transpose) or untied ``lm_head``.

Parameter names follow Hugging Face's (``embed_tokens``, ``self_attn/q_proj``,
``mlp/gate_proj``, ``input_layernorm``, ...) with Flax's ``[in, out]`` kernels,
so name-based optimizer rules (Adam-mini's partition, GaLore's and Muon's
choice of matrices) apply. The layers are either ``unrolled`` (an
``nnx.List``; the parameters ``layers/{i}/...``) or ``stacked``: created with
``nnx.vmap`` (each parameter ``layers/...`` with a leading layer axis) and run
with ``nnx.scan``, which compiles one layer instead of ``num_layers``.
``remat`` recomputes each layer's activations in the backward pass (only the
residual stream between layers is kept).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import microadam_optax as mo

# nnx.List (flax >= 0.12) marks a list attribute as a container of modules;
# older flax versions take a plain list.
_ModuleList = getattr(nnx, "List", list)

LAYOUTS = ("stacked", "unrolled")
_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a Llama decoder.

  Attributes:
    vocab_size: number of token ids.
    hidden_size: width of the residual stream ``d``.
    intermediate_size: width of the SwiGLU hidden layer.
    num_layers: decoder layers.
    num_heads: query heads.
    num_kv_heads: key/value heads (``num_heads`` for multi-head attention; a
      divisor of it for grouped-query attention).
    head_dim: width of one head (``None``: ``hidden_size // num_heads``).
    rms_norm_eps: RMSNorm's epsilon.
    rope_theta: base of the rotary frequencies.
    tie_word_embeddings: the output head is the embedding's transpose.
    param_dtype: dtype of the parameters (``"float32"`` or ``"bfloat16"``).
    dtype: dtype of activations and matrix products (norm statistics,
      softmax and logits are float32 whatever it is).
    layout: ``"stacked"`` (``nnx.vmap`` + ``nnx.scan``) or ``"unrolled"``.
    remat: recompute each layer in the backward pass.
  """
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 176
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: Optional[int] = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  layout: str = "stacked"
  remat: bool = False

  def __post_init__(self):
    for name in ("param_dtype", "dtype"):
      value = getattr(self, name)
      if value not in _DTYPES:
        raise ValueError(f"{name} must be one of {_DTYPES}, got {value!r}.")
    if self.layout not in LAYOUTS:
      raise ValueError(
          f"layout must be one of {LAYOUTS}, got {self.layout!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads}).")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size ({self.hidden_size}) must be a multiple of num_heads "
          f"({self.num_heads}) when head_dim is not given.")
    if self.dim_per_head % 2:
      raise ValueError(
          f"head_dim must be even for rotary embeddings, got "
          f"{self.dim_per_head}.")

  @property
  def dim_per_head(self) -> int:
    """The head width (``head_dim``, or ``hidden_size // num_heads``)."""
    return self.head_dim or self.hidden_size // self.num_heads

  def num_params(self) -> int:
    """Number of parameters of :class:`Llama` with this configuration."""
    d, f, hd = self.hidden_size, self.intermediate_size, self.dim_per_head
    attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
    layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * layer + d + head

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "LlamaConfig":
    """The configuration of a Hugging Face ``config.json`` (a ``dict``).

    Args:
      hf: the parsed ``config.json`` of a ``LlamaForCausalLM`` checkpoint.
      **overrides: fields to set here (``param_dtype``, ``layout``, ...).

    Raises:
      ValueError: naming a missing key, or a rope scaling this model does not
        implement.
    """
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                           "num_hidden_layers", "num_attention_heads")
               if k not in hf]
    if missing:
      raise ValueError(f"config.json lacks {missing} (a Llama config has "
                       "them all).")
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (
        None, "default"):
      raise ValueError(
          f"rope_scaling {scaling!r} is not implemented (only the default "
          "rotary embeddings are).")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
      raise ValueError("attention_bias / mlp_bias checkpoints are not "
                       "supported (Llama has no biases).")
    fields = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        num_kv_heads=int(hf.get("num_key_value_heads")
                         or hf["num_attention_heads"]),
        head_dim=hf.get("head_dim"),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
    fields.update(overrides)
    return cls(**fields)

  def to_hf(self) -> dict:
    """This configuration as a Hugging Face ``config.json`` ``dict``."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.dim_per_head, "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "tie_word_embeddings": self.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": self.param_dtype}


def _from_model_shapes(name: str) -> LlamaConfig:
  # Llama-2 sizes are defined once, in microadam_optax.model_shapes; Llama-2
  # uses 128-wide heads and multi-head attention at 7B and 13B.
  tree = mo.model_shapes.llama2_shapes(name, num_layers=1)
  vocab, d = tree["embed_tokens"]["embedding"].shape
  ffn = tree["layers_0"]["mlp"]["gate_proj"]["kernel"].shape[1]
  layers = sum(1 for k in mo.model_shapes.llama2_shapes(name) if
               k.startswith("layers_"))
  return LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ffn,
                     num_layers=layers, num_heads=d // 128,
                     num_kv_heads=d // 128)


#: Model sizes for benchmarks: ``llama2-7b`` and ``llama2-13b`` (from
#: :mod:`microadam_optax.model_shapes`), ``llama-1b`` (TinyLlama-1.1B's shape:
#: Llama-2's architecture with grouped-query attention, 1.10 B parameters)
#: and ``tiny`` (CPU tests). Parameters and activations are bfloat16, layers
#: stacked and rematerialised (``dataclasses.replace`` to change it).
PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176,
                        num_layers=2, num_heads=4, num_kv_heads=2),
    "llama-1b": LlamaConfig(vocab_size=32000, hidden_size=2048,
                            intermediate_size=5632, num_layers=22,
                            num_heads=32, num_kv_heads=4),
    "llama2-7b": _from_model_shapes("llama2-7b"),
    "llama2-13b": _from_model_shapes("llama2-13b"),
}
PRESETS = {k: dataclasses.replace(v, param_dtype="bfloat16",
                                  dtype="bfloat16", remat=True)
           for k, v in PRESETS.items()}


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float
                 ) -> tuple[jax.Array, jax.Array]:
  """Hugging Face's rotary tables: ``cos``, ``sin`` of ``[T, head_dim]``
  (float32), each frequency appearing twice (``concat(f, f)``)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32)
                              / head_dim))
  freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """``x * cos + rotate_half(x) * sin`` on ``x`` of ``[B, T, heads, hd]``."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  out = x.astype(jnp.float32) * c + rotated.astype(jnp.float32) * s
  return out.astype(x.dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square normalisation with a learned ``scale`` (ones)."""

  def __init__(self, dim: int, *, eps: float, param_dtype: Any):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def _linear(din: int, dout: int, config: LlamaConfig, rngs: nnx.Rngs,
            std: float = 0.02) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=False, dtype=jnp.dtype(config.dtype),
                    param_dtype=jnp.dtype(config.param_dtype),
                    kernel_init=nnx.initializers.normal(stddev=std),
                    rngs=rngs)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with rotary embeddings."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, hd = config.hidden_size, config.dim_per_head
    self.num_heads, self.num_kv_heads, self.head_dim = (
        config.num_heads, config.num_kv_heads, hd)
    self.q_proj = _linear(d, config.num_heads * hd, config, rngs)
    self.k_proj = _linear(d, config.num_kv_heads * hd, config, rngs)
    self.v_proj = _linear(d, config.num_kv_heads * hd, config, rngs)
    self.o_proj = _linear(config.num_heads * hd, d, config, rngs)

  def __call__(self, x, cos, sin):
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nnx.Module):
  """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = _linear(d, f, config, rngs)
    self.up_proj = _linear(d, f, config, rngs)
    self.down_proj = _linear(f, d, config, rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm attention and MLP, each with a residual connection."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(config.param_dtype)
    self.input_layernorm = RMSNorm(config.hidden_size,
                                   eps=config.rms_norm_eps, param_dtype=pd)
    self.self_attn = Attention(config, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(
        config.hidden_size, eps=config.rms_norm_eps, param_dtype=pd)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, cos, sin):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin)
    return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nnx.Module):
  """A Llama decoder: ``Llama(config, rngs=...)(tokens) -> logits``.

  Args:
    config: the :class:`LlamaConfig`.
    rngs: the initialisation's random streams (normal(0.02) kernels and
      embedding, unit norm scales).

  Calling it on ``int32`` tokens ``[B, T]`` returns float32 logits
  ``[B, T, vocab_size]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from llama_finetune import model
    >>> llama = model.Llama(model.PRESETS["tiny"], rngs=nnx.Rngs(0))
    >>> llama(jnp.zeros((2, 8), jnp.int32)).shape
    (2, 8, 256)

  References:
    Touvron et al., "Llama 2: Open Foundation and Fine-Tuned Chat Models",
    2023, https://arxiv.org/abs/2307.09288
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    pd = jnp.dtype(config.param_dtype)
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=jnp.dtype(config.dtype),
        param_dtype=pd, embedding_init=nnx.initializers.normal(stddev=0.02),
        rngs=rngs)
    if config.layout == "stacked":
      @nnx.split_rngs(splits=config.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return DecoderLayer(config, rngs=rngs)
      self.layers = make(rngs)
    else:
      self.layers = _ModuleList([DecoderLayer(config, rngs=rngs)
                                 for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                        param_dtype=pd)
    if not config.tie_word_embeddings:
      self.lm_head = _linear(config.hidden_size, config.vocab_size, config,
                             rngs)

  def rope(self, length: int) -> tuple[jax.Array, jax.Array]:
    """The rotary tables of positions ``0 .. length - 1``."""
    return rope_cos_sin(jnp.arange(length), self.config.dim_per_head,
                        self.config.rope_theta)

  def head(self, x: jax.Array) -> jax.Array:
    """Final norm and output head: float32 logits of the residual ``x``."""
    x = self.norm(x)
    if self.config.tie_word_embeddings:
      logits = self.embed_tokens.attend(x)
    else:
      logits = self.lm_head(x)
    return logits.astype(jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    config = self.config
    x = self.embed_tokens(tokens)
    cos, sin = self.rope(tokens.shape[1])

    def layer_fn(layer, x):
      return layer(x, cos, sin)

    if config.remat:
      layer_fn = nnx.remat(layer_fn)
    if config.layout == "stacked":
      x = nnx.scan(layer_fn, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(
          self.layers, x)
    else:
      for layer in self.layers:
        x = layer_fn(layer, x)
    return self.head(x)


def lm_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of float logits ``[B, T, V]``."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets))


def abstract_params(config: LlamaConfig) -> tuple[nnx.GraphDef, dict]:
  """The graph definition and the parameters' ``jax.ShapeDtypeStruct``
  (a pure ``dict``) of :class:`Llama`, without allocating them."""
  from microadam_compare import models  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  return models.split_params(abstract)


def layer_graphdef(config: LlamaConfig) -> nnx.GraphDef:
  """The graph definition of one :class:`DecoderLayer`: with a slice of the
  stacked ``params["layers"]``, ``nnx.merge`` gives that layer."""
  return nnx.split(nnx.eval_shape(
      lambda: DecoderLayer(config, rngs=nnx.Rngs(0))))[0]


def init_params(config: LlamaConfig, seed: int = 0) -> tuple[nnx.GraphDef,
                                                              dict]:
  """A randomly initialised :class:`Llama`'s graph definition and
  parameters (a pure ``dict``), created inside one ``jax.jit`` (on the
  default device, never on the host)."""
  from microadam_compare import models  # pylint: disable=g-import-not-at-top
  graphdef, _ = abstract_params(config)

  @jax.jit
  def make():
    return models.split_params(Llama(config, rngs=nnx.Rngs(seed)))[1]
  return graphdef, make()


def apply(graphdef: nnx.GraphDef, params: dict, tokens: jax.Array
          ) -> jax.Array:
  """The logits of the model ``(graphdef, params)`` on ``tokens``
  (traceable)."""
  return nnx.merge(graphdef, params)(tokens)

"""Parameter shapes of real models, as Flax-layout pytrees of abstract arrays.

Used to measure optimizer-state sizes with :func:`jax.eval_shape` (no
allocation) and to benchmark optimizers on the tensors they meet in practice.
Names follow Flax conventions (``Dense`` kernels are ``[in, out]``, embeddings
``[vocab, d]``) and the Hugging Face Llama names (``q_proj``, ``gate_proj``,
...), so name-based rules such as Adam-mini's partition apply to them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

_LLAMA2 = {
    # name: (layers, d_model, d_ffn, vocab)
    "llama2-7b": (32, 4096, 11008, 32000),
    "llama2-13b": (40, 5120, 13824, 32000),
    # A Llama-2-shaped model of 100.4 M parameters, for CPU measurements.
    "llama-100m": (12, 640, 1728, 32000),
}

#: The model names :func:`llama2_shapes` accepts.
MODEL_NAMES = tuple(_LLAMA2)


def llama2_shapes(name: str = "llama2-7b", dtype: Any = jnp.bfloat16,
                  num_layers: int | None = None) -> dict[str, Any]:
  """The parameters of a Llama-2 model as ``jax.ShapeDtypeStruct`` leaves.

  Llama-2-7B has 6 738 415 616 parameters in 291 tensors: per layer four
  ``[4096, 4096]`` attention projections, ``gate_proj``/``up_proj``
  ``[4096, 11008]``, ``down_proj`` ``[11008, 4096]`` and two RMSNorm scales;
  plus the ``[32000, 4096]`` embedding, a final norm and an untied
  ``[4096, 32000]`` output head.

  Args:
    name: ``"llama2-7b"``, ``"llama2-13b"`` or ``"llama-100m"`` (the same
      architecture at width 640, 12 layers: 100.4 M parameters).
    dtype: dtype of every leaf (bf16 by default, as in mixed-precision runs).
    num_layers: keep only this many decoder layers (default: all), for runs
      that must fit a smaller device or a CPU.

  Returns:
    A nested dict of ``jax.ShapeDtypeStruct``; materialise it with
    ``jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)`` or random
    values when the arrays are needed.

  Example:
    >>> import microadam_optax as mo
    >>> import jax, numpy as np
    >>> tree = mo.model_shapes.llama2_shapes("llama2-7b")
    >>> leaves = jax.tree.leaves(tree)
    >>> len(leaves), sum(int(np.prod(x.shape)) for x in leaves)
    (291, 6738415616)
  """
  if name not in _LLAMA2:
    raise ValueError(
        f"name must be one of {sorted(_LLAMA2)}, got {name!r}.")
  layers, d, ffn, vocab = _LLAMA2[name]
  if num_layers is not None:
    if not 0 <= num_layers <= layers:
      raise ValueError(
          f"num_layers must be in [0, {layers}] for {name}, got {num_layers}.")
    layers = num_layers

  def s(*shape):
    return jax.ShapeDtypeStruct(shape, dtype)

  tree: dict[str, Any] = {"embed_tokens": {"embedding": s(vocab, d)}}
  for i in range(layers):
    tree[f"layers_{i}"] = {
        "self_attn": {
            "q_proj": {"kernel": s(d, d)},
            "k_proj": {"kernel": s(d, d)},
            "v_proj": {"kernel": s(d, d)},
            "o_proj": {"kernel": s(d, d)},
        },
        "mlp": {
            "gate_proj": {"kernel": s(d, ffn)},
            "up_proj": {"kernel": s(d, ffn)},
            "down_proj": {"kernel": s(ffn, d)},
        },
        "input_layernorm": {"scale": s(d)},
        "post_attention_layernorm": {"scale": s(d)},
    }
  tree["norm"] = {"scale": s(d)}
  tree["lm_head"] = {"kernel": s(d, vocab)}
  return tree


def num_params(tree: Any) -> int:
  """Number of scalar parameters in a pytree of arrays or abstract arrays."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    n = 1
    for dim in leaf.shape:
      n *= int(dim)
    total += n
  return total


def random_arrays(shapes: Any, seed: int = 0, scale: float = 0.02) -> Any:
  """Normal(0, ``scale``) arrays with the shapes and dtypes of ``shapes``.

  Generated on the default device leaf by leaf (one compilation per distinct
  shape), so a 13 B-parameter tree never passes through the host. Never
  zeros: benchmarks on zeros hide unwritten outputs and can run faster than
  real data.

  Args:
    shapes: a pytree of ``jax.ShapeDtypeStruct`` (or arrays).
    seed: the random seed.
    scale: the standard deviation.

  Returns:
    A pytree of arrays like ``shapes``.
  """
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  make = jax.jit(lambda k, shape, dtype: (scale * jax.random.normal(
      k, shape, jnp.float32)).astype(dtype), static_argnums=(1, 2))
  return treedef.unflatten([make(k, tuple(s.shape), jnp.dtype(s.dtype))
                            for k, s in zip(keys, leaves)])

"""Hugging Face Llama checkpoints: ``config.json`` and ``*.safetensors``.

A checkpoint directory holds ``config.json`` and either one
``model.safetensors`` or several shards named by
``model.safetensors.index.json`` (its ``weight_map``). Tensors carry Hugging
Face's names and torch's ``[out, in]`` layout::

  model.embed_tokens.weight                       [vocab, d]
  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
  model.layers.{i}.mlp.{gate,up,down}_proj.weight
  model.layers.{i}.input_layernorm.weight         [d]
  model.layers.{i}.post_attention_layernorm.weight
  model.norm.weight                               [d]
  lm_head.weight                                  [vocab, d] (untied only)

:func:`load` maps them onto :class:`model.Llama`'s parameters (kernels
transposed to Flax's ``[in, out]``, layers stacked along a leading axis for
the stacked layout); Hugging Face's ``q_proj``/``k_proj`` rows are already in
the ``rotate_half`` order the model uses, so nothing is permuted. Missing,
unexpected and misshapen tensors are errors that name the tensor.
:func:`save` writes the inverse (for tests and for exporting a fine-tuned
model back to Hugging Face).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_finetune import model as model_lib

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# Hugging Face name (after "model.layers.{i}.") -> path inside a layer, and
# whether the tensor is a torch Linear weight ([out, in], transposed here).
_LAYER_TENSORS = {
    f"self_attn.{p}.weight": (("self_attn", p, "kernel"), True)
    for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
_LAYER_TENSORS.update({
    f"mlp.{p}.weight": (("mlp", p, "kernel"), True)
    for p in ("gate_proj", "up_proj", "down_proj")})
_LAYER_TENSORS.update({
    f"{n}.weight": ((n, "scale"), False)
    for n in ("input_layernorm", "post_attention_layernorm")})
_TOP_TENSORS = {
    "model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
    "model.norm.weight": (("norm", "scale"), False),
    "lm_head.weight": (("lm_head", "kernel"), True),
}
# Buffers some older checkpoints carry that are not parameters.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def load_config(directory: str, **overrides) -> model_lib.LlamaConfig:
  """The :class:`model.LlamaConfig` of ``directory/config.json``.

  Args:
    directory: a Hugging Face checkpoint directory.
    **overrides: fields set on top (``param_dtype``, ``layout``, ``remat``).
  """
  path = os.path.join(directory, CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {CONFIG} in checkpoint directory "
                            f"{directory!r}.")
  with open(path, encoding="utf-8") as f:
    return model_lib.LlamaConfig.from_hf(json.load(f), **overrides)


def safetensors_files(directory: str) -> list[str]:
  """The ``*.safetensors`` files of a checkpoint: those of its index's
  ``weight_map`` when there is an index, else ``model.safetensors`` (or
  every ``*.safetensors`` file), sorted."""
  index = os.path.join(directory, INDEX)
  if os.path.exists(index):
    with open(index, encoding="utf-8") as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(directory, SINGLE)):
    names = [SINGLE]
  else:
    names = sorted(n for n in os.listdir(directory)
                   if n.endswith(".safetensors"))
  if not names:
    raise FileNotFoundError(f"No .safetensors files in {directory!r}.")
  missing = [n for n in names if not os.path.exists(os.path.join(directory,
                                                                 n))]
  if missing:
    raise FileNotFoundError(f"{INDEX} in {directory!r} names shards that are "
                            f"not there: {missing}.")
  return [os.path.join(directory, n) for n in names]


def _target(name: str, config: model_lib.LlamaConfig
            ) -> Optional[tuple[Optional[int], tuple[str, ...], bool]]:
  """(layer index or None, path, transpose) for a Hugging Face tensor name;
  None for a name the model has no parameter for."""
  if name in _TOP_TENSORS:
    if name == "lm_head.weight" and config.tie_word_embeddings:
      return None
    path, transpose = _TOP_TENSORS[name]
    return None, path, transpose
  m = _LAYER.match(name)
  if m and m.group(2) in _LAYER_TENSORS and int(m.group(1)) < (
      config.num_layers):
    path, transpose = _LAYER_TENSORS[m.group(2)]
    return int(m.group(1)), path, transpose
  return None


def _get(tree: dict, path: tuple) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path: tuple, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def load(directory: str, **overrides) -> tuple[model_lib.LlamaConfig,
                                               nnx.GraphDef, dict]:
  """Loads a Hugging Face Llama checkpoint.

  Tensors are read one at a time (memory-mapped by ``safetensors``), cast to
  the configuration's ``param_dtype`` and, for the stacked layout, stacked
  per parameter; the result is placed on the default device.

  Args:
    directory: the checkpoint directory (``config.json`` and safetensors).
    **overrides: :class:`model.LlamaConfig` fields (``param_dtype``,
      ``layout``, ``remat``, ``dtype``).

  Returns:
    ``(config, graphdef, params)``: ``model.apply(graphdef, params, tokens)``
    gives the checkpoint's logits.

  Raises:
    ValueError: naming the tensors that are missing, unexpected (not a
      parameter of the configured model) or of the wrong shape.

  Examples:
    >>> import tempfile
    >>> from llama_finetune import checkpoint, model
    >>> d = tempfile.mkdtemp()
    >>> config = model.PRESETS["tiny"]
    >>> _, params = model.init_params(config)
    >>> checkpoint.save(d, config, params)
    >>> config2, graphdef, params2 = checkpoint.load(d, layout="unrolled")
    >>> config2.num_layers, params2["layers"][1]["mlp"]["up_proj"]["kernel"].shape
    (2, (64, 176))
  """
  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open
  # pylint: enable=g-import-not-at-top
  config = load_config(directory, **overrides)
  graphdef, abstract = model_lib.abstract_params(config)
  dtype = jnp.dtype(config.param_dtype)
  layers: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
  params: dict = {}
  seen, unexpected, misshapen = set(), [], []
  tied_head = None
  for path in safetensors_files(directory):
    with safe_open(path, framework="numpy") as f:
      for name in f.keys():
        target = _target(name, config)
        if target is None:
          if name == "lm_head.weight" and config.tie_word_embeddings:
            tied_head = f.get_tensor(name)
          elif not _IGNORED.match(name):
            unexpected.append(name)
          continue
        if name in seen:
          raise ValueError(f"Tensor {name!r} appears twice (in {path!r}).")
        seen.add(name)
        layer, where, transpose = target
        value = f.get_tensor(name)
        stacked = layer is not None and config.layout == "stacked"
        if layer is None:
          shape = _get(abstract, where).shape
        elif stacked:
          shape = _get(abstract, ("layers",) + where).shape[1:]
        else:
          shape = _get(abstract, ("layers", layer) + where).shape
        file_shape = tuple(shape[::-1]) if transpose else tuple(shape)
        if tuple(value.shape) != file_shape:
          misshapen.append(f"{name} is {tuple(value.shape)} in {path!r}, "
                           f"config.json needs {file_shape}")
          continue
        value = value.T if transpose else value
        value = np.asarray(value).astype(dtype)
        if layer is None:
          _set(params, where, value)
        elif stacked:
          layers.setdefault(where, {})[layer] = value
        else:
          _set(params, ("layers", layer) + where, value)
  expected = set(_TOP_TENSORS) - (
      {"lm_head.weight"} if config.tie_word_embeddings else set())
  expected |= {f"model.layers.{i}.{n}" for i in range(config.num_layers)
               for n in _LAYER_TENSORS}
  missing = sorted(expected - seen)
  problems = []
  if missing:
    problems.append(f"missing tensors {missing}")
  if unexpected:
    problems.append(f"unexpected tensors {sorted(unexpected)} (not "
                    f"parameters of a {config.num_layers}-layer Llama"
                    + (" with tied embeddings" if config.tie_word_embeddings
                       else "") + ")")
  if misshapen:
    problems.append("shape mismatches: " + "; ".join(misshapen))
  if problems:
    raise ValueError(f"Checkpoint {directory!r} does not match its "
                     f"config.json: " + "; ".join(problems) + ".")
  if tied_head is not None and not np.array_equal(
      tied_head, _get(params, ("embed_tokens", "embedding"))):
    raise ValueError(
        "config.json ties the embeddings (tie_word_embeddings) but "
        "lm_head.weight differs from model.embed_tokens.weight.")
  for where, per_layer in layers.items():
    _set(params, ("layers",) + where,
         np.stack([per_layer[i] for i in range(config.num_layers)]))
  return config, graphdef, jax.device_put(params)


def to_hf_tensors(config: model_lib.LlamaConfig, params: dict
                  ) -> dict[str, np.ndarray]:
  """The inverse of :func:`load`: Hugging Face names, torch layouts."""
  out = {}

  def put(name, value, transpose):
    value = np.asarray(value)
    out[name] = np.ascontiguousarray(value.T if transpose else value)

  for name, (where, transpose) in _TOP_TENSORS.items():
    if not (name == "lm_head.weight" and config.tie_word_embeddings):
      put(name, _get(params, where), transpose)
  for i in range(config.num_layers):
    for suffix, (where, transpose) in _LAYER_TENSORS.items():
      value = (np.asarray(_get(params, ("layers",) + where))[i]
               if config.layout == "stacked"
               else _get(params, ("layers", i) + where))
      put(f"model.layers.{i}.{suffix}", value, transpose)
  return out


def save(directory: str, config: model_lib.LlamaConfig, params: dict,
         max_shard_bytes: Optional[int] = None) -> None:
  """Writes ``params`` as a Hugging Face checkpoint (``config.json`` and
  safetensors; sharded with an index when ``max_shard_bytes`` is given)."""
  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file
  # pylint: enable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG), "w", encoding="utf-8") as f:
    json.dump(config.to_hf(), f, indent=1)
  tensors = to_hf_tensors(config, params)
  if max_shard_bytes is None:
    save_file(tensors, os.path.join(directory, SINGLE))
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, value in tensors.items():
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = value
    size += value.nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, fname))
    weight_map.update({name: fname for name in shard})
  with open(os.path.join(directory, INDEX), "w", encoding="utf-8") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)

"""Adam-mini on the parameter layouts of real JAX LLM codebases.

Each tree is built with the shapes (and, where the codebase has them, the
logical axis names) that MaxText, Gemma, Hugging Face's Flax Llama and an NNX
model with ``nnx.vmap``-stacked layers create. The expectation is written by
hand per leaf: which entries form one *true* block (the paper's: one per
head of a query/key kernel, per output neuron of value/output/MLP kernels,
per token of an embedding, one per norm, each separately in every layer).
The gradient gets one random scale per true block; Adam-mini's first update
must then have RMS 1 over every true block, and its state must hold exactly
one v per true block, equal to (1 - b2) times the block's mean squared
gradient (computed here in float64 NumPy).
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import microadam_optax as mo

B2 = 0.999
L, D, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 3, 16, 4, 2, 4, 32, 40


def _ids(shape, key):
  """Block number of every entry: ``key(np.indices(shape))`` made dense."""
  idx = np.indices(shape)
  parts = key(idx)
  parts = parts if isinstance(parts, tuple) else (parts,)
  stacked = np.stack([np.broadcast_to(p, shape).ravel() for p in parts]
                     + [np.zeros(int(np.prod(shape)), int)])
  _, inverse = np.unique(stacked, axis=1, return_inverse=True)
  return inverse.reshape(shape)


def _check_first_step(params, blocks, partition=None, tx_params=None):
  """One Adam-mini step on a gradient with one random scale per true block.

  ``blocks`` maps '/'-joined paths to ``(shape, key)``: ``key`` gives an
  entry's true block from its indices.
  """
  rng = np.random.default_rng(7)
  flat = {"/".join(str(getattr(k, "key", getattr(k, "name", k)))
                   for k in path if getattr(k, "name", None) != "value"): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert set(flat) == set(blocks), set(flat) ^ set(blocks)
  grads, ids = {}, {}
  for where, (shape, key) in blocks.items():
    assert tuple(np.shape(flat[where])) == shape, where
    ids[where] = _ids(shape, key)
    scale = np.exp(rng.uniform(-3, 3, ids[where].max() + 1))
    grads[where] = (rng.standard_normal(shape) * scale[ids[where]])
  treedef = jax.tree.structure(params)
  paths = list(flat)
  g_tree = jax.tree.unflatten(treedef, [jnp.asarray(grads[w], jnp.float32)
                                        for w in paths])
  tx = mo.scale_by_adam_mini(b2=B2, eps=0.0, partition=partition)
  p = tx_params if tx_params is not None else jax.tree.unflatten(
      treedef, [jnp.zeros(blocks[w][0]) for w in paths])
  state = tx.init(p)
  u, state = jax.jit(tx.update)(g_tree, state)
  u_flat = dict(zip(paths, jax.tree.leaves(u)))
  nu_flat = dict(zip(paths, jax.tree.leaves(state.nu)))
  for where in paths:
    g, b, uu = grads[where], ids[where].ravel(), np.asarray(u_flat[where],
                                                          np.float64).ravel()
    n = b.max() + 1
    count = np.bincount(b, minlength=n)
    rms = np.sqrt(np.bincount(b, uu * uu, minlength=n) / count)
    np.testing.assert_allclose(rms, 1.0, rtol=1e-4, err_msg=where)
    want_v = (1 - B2) * np.bincount(b, g.ravel() ** 2, minlength=n) / count
    got_v = np.asarray(nu_flat[where], np.float64).ravel()
    assert got_v.size == n, (where, got_v.size, n)
    np.testing.assert_allclose(np.sort(got_v), np.sort(want_v), rtol=1e-4,
                               err_msg=where)


# ----------------------------------------------------------------------------
# MaxText llama2, scan_layers=True: layers on axis 1 (param_scan_axis)

MAXTEXT = {
    "token_embedder/embedding": ((VOCAB, D), ("vocab", "embed"),
                                 lambda i: i[0]),
    "decoder/layers/self_attention/query/kernel": (
        (D, L, HEADS, HEAD_DIM), ("embed", "layers", "q_heads", "kv"),
        lambda i: (i[1], i[2])),
    "decoder/layers/self_attention/key/kernel": (
        (D, L, KV_HEADS, HEAD_DIM), ("embed", "layers", "kv_heads",
                                     "kv_head_dim"),
        lambda i: (i[1], i[2])),
    "decoder/layers/self_attention/value/kernel": (
        (D, L, KV_HEADS, HEAD_DIM), ("embed", "layers", "kv_heads",
                                     "kv_head_dim"),
        lambda i: (i[1], i[2], i[3])),
    "decoder/layers/self_attention/out/kernel": (
        (HEADS, L, HEAD_DIM, D), ("heads", "layers", "kv", "embed"),
        lambda i: (i[1], i[3])),
    "decoder/layers/mlp/wi_0/kernel": ((D, L, FFN), ("embed", "layers", "mlp"),
                                       lambda i: (i[1], i[2])),
    "decoder/layers/mlp/wi_1/kernel": ((D, L, FFN), ("embed", "layers", "mlp"),
                                       lambda i: (i[1], i[2])),
    "decoder/layers/mlp/wo/kernel": ((FFN, L, D), ("mlp", "layers", "embed"),
                                     lambda i: (i[1], i[2])),
    "decoder/layers/pre_self_attention_layer_norm/scale": (
        (D, L), ("norm", "layers"), lambda i: i[1]),
    "decoder/layers/post_self_attention_layer_norm/scale": (
        (D, L), ("norm", "layers"), lambda i: i[1]),
    "decoder/decoder_norm/scale": ((D,), ("norm",), lambda i: 0 * i[0]),
    "decoder/logits_dense/kernel": ((D, VOCAB), ("embed", "vocab"),
                                    lambda i: i[1]),
}


def _nest(flat):
  out = {}
  for where, leaf in flat.items():
    node = out
    *parents, last = where.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[last] = leaf
  return out


def _blocks(table):
  return {w: (shape, key) for w, (shape, _, key) in table.items()}


@pytest.mark.parametrize("source", ["axis_names", "boxed", "partitioned",
                                    "unnamed"])
def test_maxtext_llama2_scan_layers(source):
  params = _nest({w: jnp.zeros(s) for w, (s, _, _) in MAXTEXT.items()})
  names = _nest({w: n for w, (_, n, _) in MAXTEXT.items()})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    if source == "axis_names":
      partition = mo.adam_mini_partition(params, axis_names=names)
    elif source in ("boxed", "partitioned"):  # nn.with_(logical_)partitioning
      box = nn.LogicallyPartitioned if source == "boxed" else nn.Partitioned
      boxed = _nest({w: box(jnp.zeros(s), n)
                     for w, (s, n, _) in MAXTEXT.items()})
      partition = mo.adam_mini_partition(boxed)
    else:  # no names: the layer axis is found from the [d, L] norm scales
      partition = mo.adam_mini_partition(params)
  _check_first_step(params, _blocks(MAXTEXT), partition)


class _LinenLayer(nn.Module):
  """A MaxText-style layer: DenseGeneral kernels with logical names."""

  @nn.compact
  def __call__(self, x, _):
    lp, init = nn.with_logical_partitioning, nn.initializers.lecun_normal()
    q = nn.DenseGeneral((HEADS, HEAD_DIM), use_bias=False, name="query",
                        kernel_init=lp(init, ("embed", "q_heads", "kv")))(x)
    o = nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="out",
                        kernel_init=lp(init, ("heads", "kv", "embed")))(q)
    h = nn.Dense(FFN, use_bias=False, name="wi_0",
                 kernel_init=lp(init, ("embed", "mlp")))(o)
    y = nn.Dense(D, use_bias=False, name="wo",
                 kernel_init=lp(init, ("mlp", "embed")))(h)
    y = nn.RMSNorm(name="pre_self_attention_layer_norm",
                   scale_init=lp(nn.initializers.ones, ("norm",)))(y)
    return y, None


class _LinenScanned(nn.Module):
  """MaxText's scan: params stacked on axis 1, ``layers`` in their names."""

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_LinenLayer, variable_axes={"params": 1},
                   split_rngs={"params": True}, length=L,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    return scan(name="layers")(x, None)[0]


@pytest.mark.parametrize("source", ["boxed", "get_partition_spec"])
def test_linen_scan_over_axis_1_with_logical_names(source):
  boxed = _LinenScanned().init(jax.random.key(0), jnp.zeros((1, 2, D)))
  boxed = boxed["params"]
  params = nn.unbox(boxed)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    partition = (mo.adam_mini_partition(boxed) if source == "boxed" else
                 mo.adam_mini_partition(
                     params, axis_names=nn.get_partition_spec(boxed)))
  blocks = {
      "layers/query/kernel": ((D, L, HEADS, HEAD_DIM),
                              lambda i: (i[1], i[2])),
      "layers/out/kernel": ((HEADS, L, HEAD_DIM, D), lambda i: (i[1], i[3])),
      "layers/wi_0/kernel": ((D, L, FFN), lambda i: (i[1], i[2])),
      "layers/wo/kernel": ((FFN, L, D), lambda i: (i[1], i[2])),
      "layers/pre_self_attention_layer_norm/scale": ((D, L),
                                                     lambda i: i[1]),
  }
  _check_first_step(params, blocks, partition)


def test_t5x_joined_kv_names():
  """T5X keeps heads joined (``joined_kv``): one v per head_dim group."""
  hk = HEADS * HEAD_DIM
  table = {"token_embedder/embedding": ((VOCAB, D), ("vocab", "embed"),
                                        lambda i: i[0]),
           "decoder/decoder_norm/scale": ((D,), ("embed",),
                                          lambda i: 0 * i[0]),
           "decoder/logits_dense/kernel": ((D, VOCAB), ("embed", "vocab"),
                                           lambda i: i[1])}
  per_layer = {
      "self_attention/query/kernel": ((D, hk), ("embed", "joined_kv"),
                                      lambda i: i[1] // HEAD_DIM),
      "self_attention/key/kernel": ((D, hk), ("embed", "joined_kv"),
                                    lambda i: i[1] // HEAD_DIM),
      "self_attention/value/kernel": ((D, hk), ("embed", "joined_kv"),
                                      lambda i: i[1]),
      "self_attention/out/kernel": ((hk, D), ("joined_kv", "embed"),
                                    lambda i: i[1]),
      "mlp/wi/kernel": ((D, FFN), ("embed", "mlp"), lambda i: i[1]),
      "mlp/wo/kernel": ((FFN, D), ("mlp", "embed"), lambda i: i[1]),
      "pre_self_attention_layer_norm/scale": ((D,), ("embed",),
                                              lambda i: 0 * i[0]),
  }
  for n in range(2):
    for name, entry in per_layer.items():
      table[f"decoder/layers_{n}/{name}"] = entry
  params = _nest({w: jnp.zeros(s) for w, (s, _, _) in table.items()})
  names = _nest({w: n for w, (_, n, _) in table.items()})
  partition = mo.adam_mini_partition(
      params, mo.AdamMiniRules(head_dim=HEAD_DIM), axis_names=names)
  _check_first_step(params, _blocks(table), partition)


# ----------------------------------------------------------------------------
# Gemma (linen, unrolled layer_i; and scanned: a leading layer axis)

def _gemma(stacked):
  lead = (L,) if stacked else ()

  def layer(key):
    if not stacked:
      return key
    def with_layer(i):
      got = key(i[1:])
      return (i[0],) + (got if isinstance(got, tuple) else (got,))
    return with_layer
  layer_blocks = {
      "attn/q_einsum/w": ((HEADS, D, HEAD_DIM), layer(lambda i: i[0])),
      # [k | v]: one v per key head, one per value neuron.
      "attn/kv_einsum/w": ((2, KV_HEADS, D, HEAD_DIM), layer(
          lambda i: (i[0], i[1], np.where(i[0] == 1, i[3], -1)))),
      "attn/attn_vec_einsum/w": ((HEADS, HEAD_DIM, D), layer(lambda i: i[2])),
      "mlp/gating_einsum": ((2, FFN, D), layer(lambda i: (i[0], i[1]))),
      "mlp/linear": ((FFN, D), layer(lambda i: i[1])),
      "pre_attention_norm/scale": ((D,), layer(lambda i: 0 * i[0])),
      "pre_ffw_norm/scale": ((D,), layer(lambda i: 0 * i[0])),
  }
  blocks = {"embedder/input_embedding": ((VOCAB, D), lambda i: i[0]),
            "final_norm/scale": ((D,), lambda i: 0 * i[0])}
  for name, (shape, key) in layer_blocks.items():
    if stacked:
      blocks[f"layers/{name}"] = (lead + shape, key)
    else:
      for n in range(L):
        blocks[f"layer_{n}/{name}"] = (shape, key)
  return blocks


@pytest.mark.parametrize("stacked", [False, True])
def test_gemma_einsum_layouts(stacked):
  blocks = _gemma(stacked)
  params = _nest({w: jnp.zeros(s) for w, (s, _) in blocks.items()})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    spec = mo.adam_mini_partition(params)
  _check_first_step(params, blocks)
  root = spec["layers"] if stacked else spec["layer_0"]
  assert root["mlp"]["gating_einsum"].rule == "value"
  assert root["attn"]["q_einsum"]["w"].rule == "head"


def test_gemma_gating_einsum_either_layout():
  """[2, d, ffn] (the other einsum order) is read by the embedding width."""
  params = {"embedder": {"input_embedding": jnp.zeros((VOCAB, D))},
            "layer_0": {"mlp": {"gating_einsum": jnp.zeros((2, D, FFN)),
                                "linear": jnp.zeros((FFN, D))}}}
  spec = mo.adam_mini_partition(params)["layer_0"]["mlp"]["gating_einsum"]
  assert spec.v_shape == (2, 1, FFN)


def test_fused_qkv_kernels_of_gemma_and_maxtext():
  """[q | k | v] on their own axis: one v per query and key head, one per
  value neuron (Gemma's qkv_einsum; MaxText's fused_qkv, layers scanned)."""
  qkv = lambda i, s: (i[s], np.where(i[s] == 2, i[-1], -1))
  blocks = {
      "attn/qkv_einsum/w": ((3, HEADS, D, HEAD_DIM),
                            lambda i: (i[0], i[1], np.where(
                                i[0] == 2, i[3], -1))),
      "decoder/layers/self_attention/qkv_proj/kernel": (
          (D, L, 3, HEADS, HEAD_DIM),
          lambda i: (i[1], i[3]) + qkv(i, 2)),
  }
  params = _nest({w: jnp.zeros(s) for w, (s, _) in blocks.items()})
  names = {"decoder": {"layers": {"self_attention": {"qkv_proj": {
      "kernel": ("embed", "layers", "qkv", "heads", "kv")}}}}}
  partition = mo.adam_mini_partition(params, axis_names=names)
  spec = partition["attn"]["qkv_einsum"]["w"]
  assert spec.v_shape == (1, HEADS, 1, 2 + HEAD_DIM)
  assert spec.segments == ((0, 3), ((HEAD_DIM, 1),) * 2 + ((HEAD_DIM,
                                                            HEAD_DIM),))
  _check_first_step(params, blocks, partition)


# ----------------------------------------------------------------------------
# Hugging Face Flax Llama: unrolled layers/0.., q_proj .. down_proj


def test_hf_flax_llama_unrolled():
  blocks = {"model/embed_tokens/embedding": ((VOCAB, D), lambda i: i[0]),
            "model/norm/weight": ((D,), lambda i: 0 * i[0]),
            "lm_head/kernel": ((D, VOCAB), lambda i: i[1])}
  per_layer = {
      "self_attn/q_proj/kernel": ((D, HEADS * HEAD_DIM),
                                  lambda i: i[1] // HEAD_DIM),
      "self_attn/k_proj/kernel": ((D, KV_HEADS * HEAD_DIM),
                                  lambda i: i[1] // HEAD_DIM),
      "self_attn/v_proj/kernel": ((D, KV_HEADS * HEAD_DIM), lambda i: i[1]),
      "self_attn/o_proj/kernel": ((HEADS * HEAD_DIM, D), lambda i: i[1]),
      "mlp/gate_proj/kernel": ((D, FFN), lambda i: i[1]),
      "mlp/up_proj/kernel": ((D, FFN), lambda i: i[1]),
      "mlp/down_proj/kernel": ((FFN, D), lambda i: i[1]),
      "input_layernorm/weight": ((D,), lambda i: 0 * i[0]),
      "post_attention_layernorm/weight": ((D,), lambda i: 0 * i[0]),
  }
  for n in range(L):
    for name, b in per_layer.items():
      blocks[f"model/layers/{n}/{name}"] = b
  params = _nest({w: jnp.zeros(s) for w, (s, _) in blocks.items()})
  _check_first_step(params, blocks, mo.AdamMiniRules(head_dim=HEAD_DIM))


# ----------------------------------------------------------------------------
# NNX: layers stacked by nnx.vmap, names from nnx.with_partitioning


class _NnxBlock(nnx.Module):

  def __init__(self, rngs):
    part, init = nnx.with_partitioning, nnx.initializers.lecun_normal()
    self.query = nnx.LinearGeneral(
        D, (HEADS, HEAD_DIM), use_bias=False, rngs=rngs,
        kernel_init=part(init, ("embed", "heads", "head_dim")))
    self.value = nnx.LinearGeneral(
        D, (HEADS, HEAD_DIM), use_bias=False, rngs=rngs,
        kernel_init=part(init, ("embed", "heads", "head_dim")))
    self.out = nnx.LinearGeneral(
        (HEADS, HEAD_DIM), D, axis=(-2, -1), use_bias=False, rngs=rngs,
        kernel_init=part(init, ("heads", "head_dim", "embed")))
    self.up = nnx.Linear(D, FFN, use_bias=False, rngs=rngs,
                         kernel_init=part(init, ("embed", "mlp")))
    self.down = nnx.Linear(FFN, D, use_bias=False, rngs=rngs,
                           kernel_init=part(init, ("mlp", "embed")))
    self.norm = nnx.RMSNorm(
        D, rngs=rngs, scale_init=part(nnx.initializers.ones_init(), ("norm",)))


class _NnxStackedLM(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(
        VOCAB, D, rngs=rngs, embedding_init=nnx.with_partitioning(
            nnx.initializers.normal(), ("vocab", "embed")))

    @nnx.vmap(in_axes=0, out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(key):
      return _NnxBlock(nnx.Rngs(key))

    self.layers = make(jax.random.split(rngs.params(), L))


NNX_BLOCKS = {
    "embed/embedding": ((VOCAB, D), lambda i: i[0]),
    "layers/query/kernel": ((L, D, HEADS, HEAD_DIM), lambda i: (i[0], i[2])),
    "layers/value/kernel": ((L, D, HEADS, HEAD_DIM),
                            lambda i: (i[0], i[2], i[3])),
    "layers/out/kernel": ((L, HEADS, HEAD_DIM, D), lambda i: (i[0], i[3])),
    "layers/up/kernel": ((L, D, FFN), lambda i: (i[0], i[2])),
    "layers/down/kernel": ((L, FFN, D), lambda i: (i[0], i[2])),
    "layers/norm/scale": ((L, D), lambda i: i[0]),
}


def test_nnx_vmap_stacked_with_partitioning_names():
  with nnx.use_eager_sharding(False):
    model = _NnxStackedLM(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  meta = params["layers"]["query"]["kernel"].get_metadata()
  assert "layers" in str(meta)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    spec = mo.adam_mini_partition(params)  # names read from the Params
  assert spec["layers"]["query"]["kernel"].v_shape == (L, 1, HEADS, 1)
  # The optimizer reads the same names from the state nnx.Optimizer gives.
  _check_first_step(params, NNX_BLOCKS, None, tx_params=params)


# ----------------------------------------------------------------------------
# Stacked trees without names


def _issue_tree(with_norms):
  t = {"embed": {"embedding": jnp.zeros((VOCAB, D))},
       "layers": {"wq": jnp.zeros((L, D, D)), "wk": jnp.zeros((L, D, D)),
                  "wv": jnp.zeros((L, D, D)), "wo": jnp.zeros((L, D, D)),
                  "mlp": {"w_gate": jnp.zeros((L, D, FFN)),
                          "w_up": jnp.zeros((L, D, FFN)),
                          "w_down": jnp.zeros((L, FFN, D))}}}
  if with_norms:
    t["layers"]["attention_norm"] = jnp.zeros((L, D))
    t["layers"]["ffn_norm"] = jnp.zeros((L, D))
  return t


def test_stacked_without_names_is_read_by_its_norms():
  params = _issue_tree(with_norms=True)
  blocks = {"embed/embedding": ((VOCAB, D), lambda i: i[0]),
            "layers/wq": ((L, D, D), lambda i: (i[0], i[2] // HEAD_DIM)),
            "layers/wk": ((L, D, D), lambda i: (i[0], i[2] // HEAD_DIM)),
            "layers/wv": ((L, D, D), lambda i: (i[0], i[2])),
            "layers/wo": ((L, D, D), lambda i: (i[0], i[2])),
            "layers/mlp/w_gate": ((L, D, FFN), lambda i: (i[0], i[2])),
            "layers/mlp/w_up": ((L, D, FFN), lambda i: (i[0], i[2])),
            "layers/mlp/w_down": ((L, FFN, D), lambda i: (i[0], i[2])),
            "layers/attention_norm": ((L, D), lambda i: i[0]),
            "layers/ffn_norm": ((L, D), lambda i: i[0])}
  _check_first_step(params, blocks, mo.AdamMiniRules(head_dim=HEAD_DIM))


def test_stacked_without_names_or_norms_warns_naming_leaves():
  params = _issue_tree(with_norms=False)
  with pytest.warns(UserWarning, match=r"'layers'.*'layers/wq' \(3, 16, 16\)"
                    r".*axis_names"):
    mo.adam_mini_partition(params)


def test_bad_axis_names_raise():
  params = {"w": jnp.zeros((4, 3))}
  with pytest.raises(ValueError, match=r"axis_names for w .*\(4, 3\)"):
    mo.adam_mini_partition(params, axis_names={"w": ("embed",)})
  with pytest.raises(ValueError, match="paths the params do not have"):
    mo.adam_mini_partition(params, axis_names={"x": ("embed", "mlp")})
  with pytest.raises(ValueError, match="axis_roles"):
    mo.AdamMiniRules(axis_roles={"layers": "stack"})
  kv = {"kv": jnp.zeros((2, 2, 8, 4))}
  bad = mo.AdamMiniSpec("qkv", (0, 2, 3), (1, 2, 1, 5), ((0, 3), ((4, 1),
                                                                 (3, 3))))
  with pytest.raises(ValueError, match=r"segments .* do not cut axis 0 "
                     r"folded into axis 3"):
    mo.scale_by_adam_mini(partition={"kv": bad}).init(kv)


def test_user_axis_role_extends_the_vocabulary():
  params = {"blocks": {"mlp": {"kernel": jnp.zeros((L, D, FFN))}}}
  names = {"blocks": {"mlp": {"kernel": ("my_layers", "embed", "mlp")}}}
  plain = mo.adam_mini_partition(params, axis_names=names)
  assert plain["blocks"]["mlp"]["kernel"].v_shape[0] == 1  # layers share
  rules = mo.AdamMiniRules(axis_roles={"my_layers": "stacked"})
  spec = mo.adam_mini_partition(params, rules, axis_names=names)
  assert spec["blocks"]["mlp"]["kernel"].v_shape == (L, 1, FFN)


# ----------------------------------------------------------------------------
# The partition on a mesh: a stacked leaf split over its layer axis


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_stacked_leaf_sharded_over_layers_keeps_v_local(axis_type):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  kind = AxisType.Explicit if axis_type == "explicit" else AxisType.Auto
  mesh = jax.make_mesh((8,), ("stage",), axis_types=(kind,))
  layers = 8
  rng = np.random.default_rng(3)
  host = {"layers": {
      "mlp": {"kernel": rng.standard_normal((layers, D, FFN), np.float32)},
      "norm": {"scale": rng.standard_normal((layers, D), np.float32)},
      "attn": {"kv_einsum": {"w": rng.standard_normal(
          (layers, 2, KV_HEADS, D, HEAD_DIM), np.float32)}}}}
  names = {"layers": {"mlp": {"kernel": ("layers", "embed", "mlp")},
                      "norm": {"scale": ("layers", "norm")}}}
  partition = mo.adam_mini_partition(host, axis_names=names)
  assert partition["layers"]["attn"]["kv_einsum"]["w"].v_shape == (
      layers, 1, KV_HEADS, 1, 1 + HEAD_DIM)
  tx = mo.adam_mini(1e-3, partition=partition)
  params = jax.device_put(host, jax.tree.map(
      lambda _: NamedSharding(mesh, P("stage")), host))
  with jax.set_mesh(mesh):
    shardings = mo.state_shardings(tx, params)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    step = jax.jit(tx.update)
    compiled = step.lower(params, state, params).compile()
    u, state = step(params, state, params)
  assert "all-gather" not in mo.collectives(compiled)
  nu = state[0].nu["layers"]
  assert nu["mlp"]["kernel"].shape == (layers, 1, FFN)
  assert nu["norm"]["scale"].shape == (layers, 1)
  for leaf in (nu["mlp"]["kernel"], nu["norm"]["scale"],
               nu["attn"]["kv_einsum"]["w"]):
    assert leaf.sharding.spec[0] == "stage"
    assert leaf.addressable_shards[0].data.shape[0] == 1
  want, _ = tx.update(host, tx.init(host), host)
  for got, ref in zip(jax.tree.leaves(u), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5,
                               atol=1e-8)

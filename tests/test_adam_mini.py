"""Tests of Adam-mini against an independent float64 NumPy reference.

The reference below is written from ALGORITHMS.md section 2, not from the
library: it assigns every entry a block number with ``np.indices`` and
averages squared gradients per block with ``np.bincount``.
"""

from __future__ import annotations

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import microadam_optax as mo

# ----------------------------------------------------------------------------
# Reference


def _block_ids(shape, v_shape):
  """Block number of every entry: coordinate // group size on each axis."""
  if not shape:
    return np.zeros((), np.int64)
  idx = np.indices(shape)
  coords = [idx[i] // (shape[i] // v_shape[i]) for i in range(len(shape))]
  return np.ravel_multi_index(coords, v_shape)


class AdamMiniReference:
  """Adam-mini (+ decoupled weight decay and learning rate) in float64."""

  def __init__(self, shapes, v_shapes, *, b1=0.9, b2=0.999, eps=1e-8,
               lr=None, weight_decay=0.0, decay=None):
    self.b1, self.b2, self.eps = b1, b2, eps
    self.lr, self.wd = lr, weight_decay
    self.decay = decay or {k: False for k in shapes}
    self.ids = {k: _block_ids(shapes[k], v_shapes[k]) for k in shapes}
    self.v_shapes = v_shapes
    self.m = {k: np.zeros(s) for k, s in shapes.items()}
    self.v = {k: np.zeros(int(np.prod(v_shapes[k]))) for k in shapes}
    self.t = 0

  def step(self, grads, params=None):
    self.t += 1
    out = {}
    for k, g in grads.items():
      g = np.asarray(g, np.float64)
      ids = self.ids[k].ravel()
      n = len(self.v[k])
      mean_sq = (np.bincount(ids, weights=(g * g).ravel(), minlength=n)
                 / np.bincount(ids, minlength=n))
      self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
      self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * mean_sq
      m_hat = self.m[k] / (1 - self.b1 ** self.t)
      v_hat = (self.v[k] / (1 - self.b2 ** self.t))[ids].reshape(g.shape)
      u = m_hat / (np.sqrt(v_hat) + self.eps)
      if self.lr is not None:
        if self.decay[k]:
          u = u + self.wd * np.asarray(params[k], np.float64)
        u = -self.lr * u
      out[k] = u
    return out

  def nu(self, k):
    return self.v[k].reshape(self.v_shapes[k])


def _v_shape(shape, axes):
  return tuple(1 if i in axes else d for i, d in enumerate(shape))


def _random_tree(rng, shapes, scale=1.0):
  return {k: (scale * rng.standard_normal(s)).astype(np.float32)
          for k, s in shapes.items()}


SHAPES = {"a": (5, 6), "b": (4, 3, 2), "c": (7,), "d": ()}

PARTITIONS = {
    "plain_adam": {"a": (), "b": (), "c": (), "d": ()},
    "whole_tensor": {"a": (0, 1), "b": (0, 1, 2), "c": (0,), "d": ()},
    "mixed_axes": {"a": (1,), "b": (0, 2), "c": (), "d": ()},
    "negative_axes": {"a": (-2,), "b": (-1, 0), "c": (-1,), "d": ()},
}


def _axes_v_shapes(partition):
  return {k: _v_shape(SHAPES[k], tuple(a % max(len(SHAPES[k]), 1)
                                       for a in partition[k]))
          for k in SHAPES}


# ----------------------------------------------------------------------------
# Against the reference


def _run_scale_by(tx, ref, rng, steps):
  params = _random_tree(rng, SHAPES)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(steps):
    grads = _random_tree(rng, SHAPES, scale=rng.uniform(0.1, 3.0))
    updates, state = update(grads, state, params)
    want = ref.step(grads)
    for k in SHAPES:
      np.testing.assert_allclose(np.asarray(updates[k]), want[k], rtol=1e-4,
                                 atol=1e-6, err_msg=k)
  return state


@pytest.mark.parametrize("name", sorted(PARTITIONS))
def test_scale_by_adam_mini_matches_reference(name):
  rng = np.random.default_rng(0)
  partition = PARTITIONS[name]
  v_shapes = _axes_v_shapes(partition)
  tx = mo.scale_by_adam_mini(b1=0.8, b2=0.95, eps=1e-6, partition=partition)
  ref = AdamMiniReference(SHAPES, v_shapes, b1=0.8, b2=0.95, eps=1e-6)
  state = _run_scale_by(tx, ref, rng, steps=20)
  assert int(state.count) == 20 and state.count.dtype == jnp.int32
  for k in SHAPES:
    assert state.nu[k].shape == v_shapes[k]
    assert state.nu[k].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(state.nu[k]), ref.nu(k), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(state.mu[k]), ref.m[k], rtol=1e-4,
                               atol=1e-6)


def test_grouped_blocks_match_reference():
  """v shared by contiguous groups along an axis (heads of a 2-D kernel)."""
  rng = np.random.default_rng(1)
  v_shapes = {"a": (1, 3), "b": (2, 3, 1), "c": (7,), "d": ()}
  partition = {k: mo.AdamMiniSpec("custom", (), v) for k, v in v_shapes.items()}
  tx = mo.scale_by_adam_mini(partition=partition)
  ref = AdamMiniReference(SHAPES, v_shapes)
  state = _run_scale_by(tx, ref, rng, steps=20)
  assert state.nu["a"].shape == (1, 3) and state.nu["b"].shape == (2, 3, 1)


def test_adam_mini_matches_reference_with_weight_decay():
  rng = np.random.default_rng(2)
  partition = PARTITIONS["mixed_axes"]
  v_shapes = _axes_v_shapes(partition)
  lr, wd = 3e-2, 0.1
  tx = mo.adam_mini(lr, weight_decay=wd, partition=partition)
  # Default mask: weight decay on rank >= 2 leaves only (no name rule here).
  decay = {k: len(s) >= 2 for k, s in SHAPES.items()}
  ref = AdamMiniReference(SHAPES, v_shapes, lr=lr, weight_decay=wd,
                          decay=decay)
  params = _random_tree(rng, SHAPES)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(20):
    grads = _random_tree(rng, SHAPES)
    updates, state = update(grads, state, params)
    want = ref.step(grads, params)
    for k in SHAPES:
      np.testing.assert_allclose(np.asarray(updates[k]), want[k], rtol=1e-4,
                                 atol=1e-7, err_msg=k)
    params = jax.tree.map(np.asarray, optax.apply_updates(params, updates))


def test_plain_partition_equals_optax_adam():
  rng = np.random.default_rng(3)
  tx = mo.scale_by_adam_mini(partition=())  # one prefix entry for all leaves
  adam = optax.scale_by_adam()
  params = _random_tree(rng, SHAPES)
  s1, s2 = tx.init(params), adam.init(params)
  for _ in range(5):
    grads = _random_tree(rng, SHAPES)
    u1, s1 = tx.update(grads, s1)
    u2, s2 = adam.update(grads, s2)
    for k in SHAPES:
      np.testing.assert_allclose(u1[k], u2[k], rtol=1e-5, atol=1e-6)


def test_mu_dtype():
  rng = np.random.default_rng(4)
  params = _random_tree(rng, {"w": (4, 5)})
  tx = mo.scale_by_adam_mini(mu_dtype=jnp.bfloat16)
  state = tx.init(params)
  updates, state = tx.update(_random_tree(rng, {"w": (4, 5)}), state)
  assert state.mu["w"].dtype == jnp.bfloat16
  assert state.nu["w"].dtype == jnp.float32
  assert updates["w"].dtype == jnp.float32
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  state = tx.init(bf16)
  updates, state = tx.update(bf16, state)
  assert updates["w"].dtype == jnp.bfloat16
  assert state.nu["w"].dtype == jnp.float32


# ----------------------------------------------------------------------------
# Automatic partition on Flax models

D, HEADS, HEAD_DIM, FFN, VOCAB, SEQ = 8, 2, 4, 16, 11, 6


def _expected(path: str, shape):
  """The ALGORITHMS.md table, written out for the test models' names."""
  leaf = path.rsplit("/", 1)[-1]
  if leaf == "bias":
    return "bias", ()
  if leaf == "scale":
    return "norm", tuple(range(len(shape)))
  if leaf == "embedding":
    return "embedding", (1,)
  if "lm_head" in path:
    return "output", (0,)
  if re.search(r"/(query|key)/kernel$", path):
    return "head", (0, 2)
  if path.endswith("/value/kernel"):
    return "value", (0,)
  if path.endswith("/out/kernel"):
    return "neuron", (0, 1)
  if "mlp" in path.lower():
    return "neuron", (0,)
  raise AssertionError(f"unexpected parameter {path}")


def _named_leaves(tree):
  is_spec = lambda x: isinstance(x, (mo.AdamMiniSpec, mo.AdamMiniSegments))
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=is_spec)[0]:
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
            for k in path]
    if keys and keys[-1] == "value" and isinstance(
        path[-1], jax.tree_util.GetAttrKey):
      keys = keys[:-1]
    out["/".join(keys)] = leaf
  return out


class LinenMlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(D)(nn.gelu(nn.Dense(FFN)(x)))


class LinenBlock(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(h, h)
    return x + LinenMlp()(nn.LayerNorm()(x))


class LinenLM(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, name="embed")(tokens)
    for i in range(2):
      x = LinenBlock(name=f"layers_{i}")(x)
    return nn.Dense(VOCAB, name="lm_head")(nn.LayerNorm(name="final_norm")(x))


class NnxMlp(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(D, FFN, rngs=rngs)
    self.fc2 = nnx.Linear(FFN, D, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.gelu(self.fc1(x)))


class NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.ln1 = nnx.LayerNorm(D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D,
                                       decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(D, rngs=rngs)
    self.mlp = NnxMlp(rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class NnxLM(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.layers = nnx.List([NnxBlock(rngs) for _ in range(2)])
    self.final_norm = nnx.LayerNorm(D, rngs=rngs)
    self.lm_head = nnx.Linear(D, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(self.final_norm(x))


@pytest.fixture(scope="module")
def linen_params():
  tokens, _ = _tokens(0)
  return jax.jit(LinenLM().init)(jax.random.key(0), tokens)["params"]


def _tokens(seed, batch=8):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, VOCAB, (batch, SEQ))
  return jnp.asarray(x), jnp.asarray((3 * x + 1) % VOCAB)


def _loss(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         targets).mean()


def _check_partition(params, specs, nu):
  named_params = _named_leaves(params)
  named_specs = _named_leaves(specs)
  named_nu = _named_leaves(nu)
  assert named_params.keys() == named_specs.keys() == named_nu.keys()
  rules = set()
  for path, p in named_params.items():
    rule, axes = _expected(path, p.shape)
    spec = named_specs[path]
    assert (spec.rule, spec.axes) == (rule, axes), path
    assert spec.v_shape == _v_shape(p.shape, axes), path
    assert named_nu[path].shape == spec.v_shape, path
    rules.add(rule)
  assert rules == {"bias", "norm", "embedding", "output", "head", "value",
                   "neuron"}


def test_automatic_partition_linen(linen_params):
  params = linen_params
  assert params["layers_0"]["MultiHeadDotProductAttention_0"]["query"][
      "kernel"].shape == (D, HEADS, HEAD_DIM)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    specs = mo.adam_mini_partition(params)
    state = mo.adam_mini(1e-3).init(params)
  _check_partition(params, specs, state[0].nu)


def test_automatic_partition_nnx():
  model = NnxLM(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  assert params["layers"][0]["attn"]["out"]["kernel"].shape == (
      HEADS, HEAD_DIM, D)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    specs = mo.adam_mini_partition(params)
    opt = nnx.Optimizer(model, mo.adam_mini(1e-3), wrt=nnx.Param)
  _check_partition(params, specs, nnx.as_pure(opt.opt_state)[0].nu)


def test_partition_round_trips_and_can_be_edited(linen_params):
  """adam_mini_partition's result, edited, is a partition (linen and NNX)."""
  specs = mo.adam_mini_partition(linen_params)
  attn = specs["layers_1"]["MultiHeadDotProductAttention_0"]
  attn["value"]["kernel"] = (0, 1, 2)  # the authors' short-run choice
  state = mo.scale_by_adam_mini(partition=specs).init(linen_params)
  nu = state.nu["layers_1"]["MultiHeadDotProductAttention_0"]
  assert nu["value"]["kernel"].shape == (1, 1, 1)
  assert nu["query"]["kernel"].shape == (1, HEADS, 1)
  nu0 = state.nu["layers_0"]["MultiHeadDotProductAttention_0"]
  assert nu0["value"]["kernel"].shape == (1, HEADS, HEAD_DIM)
  model = NnxLM(nnx.Rngs(0))
  nnx_params = nnx.state(model, nnx.Param)
  nnx_specs = mo.adam_mini_partition(nnx_params)
  tx = mo.adam_mini(1e-3, partition=nnx_specs)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  auto = nnx.Optimizer(model, mo.adam_mini(1e-3), wrt=nnx.Param)
  assert (jax.tree.map(jnp.shape, nnx.as_pure(opt.opt_state)[0].nu) ==
          jax.tree.map(jnp.shape, nnx.as_pure(auto.opt_state)[0].nu))
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  assert isinstance(mo.scale_by_adam_mini(),
                    optax.GradientTransformationExtraArgs)


def test_llama_partition_and_head_dim_rules():
  tree = mo.model_shapes.llama2_shapes(num_layers=2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    specs = mo.adam_mini_partition(tree)
    grouped = mo.adam_mini_partition(tree, mo.AdamMiniRules(head_dim=128))
  attn = specs["layers_1"]["self_attn"]
  assert attn["q_proj"]["kernel"] == mo.AdamMiniSpec("head", (0,), (1, 4096))
  assert attn["v_proj"]["kernel"] == mo.AdamMiniSpec("value", (0,), (1, 4096))
  assert attn["o_proj"]["kernel"] == mo.AdamMiniSpec("neuron", (0,),
                                                     (1, 4096))
  assert specs["layers_1"]["mlp"]["down_proj"]["kernel"].v_shape == (1, 4096)
  assert specs["layers_1"]["mlp"]["up_proj"]["kernel"].v_shape == (1, 11008)
  assert specs["embed_tokens"]["embedding"] == mo.AdamMiniSpec(
      "embedding", (1,), (32000, 1))
  assert specs["lm_head"]["kernel"] == mo.AdamMiniSpec("output", (0,),
                                                       (1, 32000))
  assert specs["norm"]["scale"] == mo.AdamMiniSpec("norm", (0,), (1,))
  assert specs["layers_0"]["input_layernorm"]["scale"].rule == "norm"
  gattn = grouped["layers_0"]["self_attn"]
  assert gattn["q_proj"]["kernel"] == mo.AdamMiniSpec("head", (0, 1), (1, 32))
  assert gattn["k_proj"]["kernel"].v_shape == (1, 32)
  assert gattn["v_proj"]["kernel"].v_shape == (1, 4096)
  state = jax.eval_shape(
      mo.scale_by_adam_mini(partition=mo.AdamMiniRules(num_heads=32)).init,
      tree)
  assert state.nu["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (1, 32)


def test_grouped_2d_heads_equal_3d_heads():
  """A [d, H*hd] kernel with head_dim rules = a [d, H, hd] kernel per head."""
  rng = np.random.default_rng(5)
  g2 = [rng.standard_normal((D, HEADS * HEAD_DIM)).astype(np.float32)
        for _ in range(4)]
  tx2 = mo.scale_by_adam_mini(partition=mo.AdamMiniRules(head_dim=HEAD_DIM))
  tx3 = mo.scale_by_adam_mini()
  p2 = {"attn": {"q_proj": {"kernel": g2[0]}}}
  p3 = {"attn": {"query": {"kernel": g2[0].reshape(D, HEADS, HEAD_DIM)}}}
  s2, s3 = tx2.init(p2), tx3.init(p3)
  assert s2.nu["attn"]["q_proj"]["kernel"].shape == (1, HEADS)
  assert s3.nu["attn"]["query"]["kernel"].shape == (1, HEADS, 1)
  for g in g2[1:]:
    u2, s2 = tx2.update({"attn": {"q_proj": {"kernel": g}}}, s2)
    u3, s3 = tx3.update(
        {"attn": {"query": {"kernel": g.reshape(D, HEADS, HEAD_DIM)}}}, s3)
    np.testing.assert_allclose(
        np.asarray(u2["attn"]["q_proj"]["kernel"]),
        np.asarray(u3["attn"]["query"]["kernel"]).reshape(D, -1), rtol=1e-6)


def test_state_half_of_adamw_on_llama2_7b():
  tree = mo.model_shapes.llama2_shapes("llama2-7b")  # bf16 leaves
  mini = jax.eval_shape(mo.adam_mini(1e-3).init, tree)
  adamw = jax.eval_shape(optax.adamw(1e-3).init, tree)
  ratio = mo.state_nbytes(mini) / mo.state_nbytes(adamw)
  assert ratio <= 0.51, ratio
  assert ratio >= 0.5  # m in full, in the params' dtype
  mu_dtypes = {x.dtype for x in jax.tree.leaves(mini[0].mu)}
  nu_dtypes = {x.dtype for x in jax.tree.leaves(mini[0].nu)}
  assert mu_dtypes == {jnp.dtype(jnp.bfloat16)}
  assert nu_dtypes == {jnp.dtype(jnp.float32)}


# ----------------------------------------------------------------------------
# Training with Flax


def test_nnx_optimizer_training_lowers_loss():
  model = NnxLM(nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, mo.adam_mini(1e-2, weight_decay=1e-4),
                            wrt=nnx.Param)
  tokens, targets = _tokens(1)

  @nnx.jit
  def train_step(model, optimizer, tokens, targets):
    loss, grads = nnx.value_and_grad(
        lambda m: _loss(m(tokens), targets))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer, tokens, targets))
            for _ in range(40)]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(optimizer.step[...]) == 40


def _train_linen(model, params, tokens, targets, tx, steps=40):
  """Trains a linen model through a ``TrainState``; the losses per step."""
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx)

  @jax.jit
  def train_step(state):
    def loss_fn(p):
      return _loss(state.apply_fn({"params": p}, tokens), targets)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(steps):
    state, loss = train_step(state)
    losses.append(float(loss))
  return losses


def test_linen_train_state_training_lowers_loss():
  tokens, targets = _tokens(2)
  model = LinenLM()
  params = jax.jit(model.init)(jax.random.key(2), tokens)["params"]
  losses = _train_linen(model, params, tokens, targets,
                        mo.adam_mini(1e-2, weight_decay=1e-4))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------
# Weight decay mask, arguments, callable partition, warning


def test_default_weight_decay_mask(linen_params):
  params = linen_params
  rng = np.random.default_rng(3)
  grads = jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  lr, wd = 0.1, 0.5

  def diff(mask):
    with_wd = mo.adam_mini(lr, weight_decay=wd, mask=mask)
    no_wd = mo.adam_mini(lr, weight_decay=0.0, mask=mask)

    @jax.jit
    def both(grads, params):
      return (with_wd.update(grads, with_wd.init(params), params)[0],
              no_wd.update(grads, no_wd.init(params), params)[0])

    u1, u0 = both(grads, params)
    return _named_leaves(jax.tree.map(lambda a, b: a - b, u1, u0))

  named_params = _named_leaves(params)
  decayed = 0
  for path, d in diff(None).items():
    rule, _ = _expected(path, named_params[path].shape)
    want_decay = rule not in ("bias", "norm")
    want = -lr * wd * np.asarray(named_params[path]) * want_decay
    np.testing.assert_allclose(np.asarray(d), want, rtol=1e-4, atol=1e-7,
                               err_msg=path)
    decayed += want_decay
  assert decayed == 2 * 6 + 2  # 6 kernels per layer, embedding and lm_head
  # A user mask overrides the default: decay everywhere.
  for path, d in diff(lambda p: jax.tree.map(lambda _: True, p)).items():
    np.testing.assert_allclose(
        np.asarray(d), -lr * wd * np.asarray(named_params[path]), rtol=1e-4,
        atol=1e-7, err_msg=path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(b1=1.0), r"b1 must be in \[0, 1\), got 1\.0"),
    (dict(b1=-0.1), r"b1 must be in \[0, 1\), got -0\.1"),
    (dict(b2=1.5), r"b2 must be in \[0, 1\), got 1\.5"),
    (dict(eps=-1e-8), r"eps must be in \[0, inf\), got -1e-08"),
    (dict(weight_decay=-0.1), r"weight_decay must be in \[0, inf\), got -0\.1"),
    (dict(learning_rate="fast"), r"learning_rate must be .*got 'fast'"),
    (dict(learning_rate=float("nan")), r"learning_rate must be .*got nan"),
    (dict(mu_dtype=jnp.int32), r"mu_dtype must be .*int32"),
    (dict(mu_dtype="no-such-dtype"), r"mu_dtype must be .*no-such-dtype"),
    (dict(partition={"w": ("a",)}), r"partition entry at w/0 .*got 'a'"),
    (dict(partition={"w": 3}), r"partition entry at w .*got 3"),
])
def test_bad_arguments_raise_at_construction(kwargs, match):
  alias_only = "learning_rate" in kwargs or "weight_decay" in kwargs
  kwargs = dict(kwargs)
  lr = kwargs.pop("learning_rate", 1e-3)
  with pytest.raises(ValueError, match=match):
    mo.adam_mini(lr, **kwargs)
  if not alias_only:
    with pytest.raises(ValueError, match=match):
      mo.scale_by_adam_mini(**kwargs)


@pytest.mark.parametrize("partition, match", [
    ({"w": (2,)}, r"axis 2 is out of range .*\(4, 5\)"),
    ({"w": (0, -2)}, r"repeats an axis"),
    ({"v": ()}, r"no entry for the parameter at 'w'"),
    ({"w": mo.AdamMiniSpec("custom", (0,), (1, 3))},
     r"v_shape \(1, 3\) does not divide .*\(4, 5\)"),
    (mo.AdamMiniRules(((r"w", "head"),), head_dim=3),
     r"cannot cut the 5 output columns of w"),
])
def test_bad_partition_raises_at_init(partition, match):
  tx = mo.scale_by_adam_mini(partition=partition)
  with pytest.raises(ValueError, match=match):
    tx.init({"w": jnp.ones((4, 5))})


@pytest.mark.parametrize("kwargs, match", [
    (dict(rules=(("x", "bogus"),)), r"rule must be one of .*'bogus'"),
    (dict(rules=(("(", "whole"),)), r"pattern '\(' is not a valid"),
    (dict(rules=(("x",),)), r"rules\[0\] must be a \(pattern, rule\) pair"),
    (dict(rules="embed"), r"rules must be a sequence"),
    (dict(head_dim=0), r"head_dim must be None or an integer >= 1, got 0"),
    (dict(num_heads=2.5), r"num_heads must be .*2\.5"),
    (dict(head_dim=4, num_heads=2), r"not both"),
])
def test_bad_rules_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mo.AdamMiniRules(**kwargs)


def test_callable_partition():
  rng = np.random.default_rng(6)
  params = {"enc": {"kernel": rng.standard_normal((6, 4)).astype(np.float32),
                    "bias": rng.standard_normal(4).astype(np.float32)},
            "w": rng.standard_normal((3, 2, 5)).astype(np.float32)}
  seen = []

  def partition(path, leaf):
    seen.append((path, tuple(leaf.shape)))
    if path == "enc/kernel":
      return (1,)
    if path == "enc/bias":
      return None  # automatic rules: bias -> plain Adam
    return mo.AdamMiniSpec("mine", (), (3, 1, 1))

  tx = mo.scale_by_adam_mini(partition=partition)
  tree_tx = mo.scale_by_adam_mini(partition={"enc": {"kernel": (1,),
                                                     "bias": ()},
                                             "w": (1, 2)})
  state, tree_state = tx.init(params), tree_tx.init(params)
  assert sorted(seen) == [("enc/bias", (4,)), ("enc/kernel", (6, 4)),
                          ("w", (3, 2, 5))]
  assert jax.tree.map(jnp.shape, state.nu) == {
      "enc": {"kernel": (6, 1), "bias": (4,)}, "w": (3, 1, 1)}
  for _ in range(3):
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(
        np.float32), params)
    u, state = tx.update(grads, state)
    v, tree_state = tree_tx.update(grads, tree_state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 u, v)
  assert len(seen) == 3  # the update reads the blocks from nu, not paths


def _unnamed_transformer():
  s = jax.ShapeDtypeStruct
  return {f"blocks_{i}": {"mix": {"kernel": s((8, 8), jnp.float32)},
                          "proj": {"kernel": s((8, 16), jnp.float32)}}
          for i in range(3)}


def test_warns_once_for_unmatched_transformer():
  tree = _unnamed_transformer()
  with pytest.warns(UserWarning, match="no embedding or output head and no "
                    "attention query/key") as record:
    specs = mo.adam_mini_partition(tree)
  assert len(record) == 1
  assert {s.rule for s in jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, mo.AdamMiniSpec))} == {"whole"}
  with pytest.warns(UserWarning) as record:
    jax.eval_shape(mo.adam_mini(1e-3).init, tree)
  assert len(record) == 1
  # Named trees, explicit partitions and small models do not warn.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    mo.adam_mini_partition(mo.model_shapes.llama2_shapes(num_layers=2))
    jax.eval_shape(mo.scale_by_adam_mini(partition=(0,)).init, tree)
    mo.adam_mini_partition({"w": jnp.ones((3, 3)), "b": jnp.ones(3)})


def test_update_on_another_tree_raises():
  tx = mo.scale_by_adam_mini()
  state = tx.init({"w": jnp.ones((3, 4))})
  with pytest.raises(ValueError, match="does not match Adam-mini's state"):
    tx.update({"v": jnp.ones((3, 4))}, state)


# ----------------------------------------------------------------------------
# Fused query/key/value kernels, GPT-2 names, classifier heads

GD, GHD = 8, 4  # GPT-2-style width and head size: 2 heads


class FusedQkvReference:
  """Adam-mini on one fused [q | k | v] kernel, in float64, by hand.

  The output axis holds ``3 * d`` entries: the query heads, the key heads
  (``hd`` entries each) and the value neurons. v has one entry per query
  head, per key head and per value neuron (or one for the whole value third
  with ``whole_value``), computed by explicit loops over heads and columns.
  """

  def __init__(self, d, hd, out_axis, *, whole_value=False, b1=0.9,
               b2=0.999, eps=1e-8):
    self.d, self.hd, self.axis = d, hd, out_axis
    self.whole_value = whole_value
    self.b1, self.b2, self.eps = b1, b2, eps
    self.m, self.v, self.t = None, None, 0

  def blocks(self):
    """(first, last) output indices of every block, in v's order."""
    d, hd = self.d, self.hd
    out = [(s + h * hd, s + (h + 1) * hd) for s in (0, d)
           for h in range(d // hd)]
    if self.whole_value:
      return out + [(2 * d, 3 * d)]
    return out + [(2 * d + j, 2 * d + j + 1) for j in range(d)]

  def step(self, g):
    g = np.asarray(g, np.float64)
    go = g if self.axis == 1 else g.T  # [in, out]
    blocks = self.blocks()
    mean_sq = np.array([np.mean(go[:, a:b] ** 2) for a, b in blocks])
    if self.m is None:
      self.m, self.v = np.zeros_like(go), np.zeros(len(blocks))
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * go
    self.v = self.b2 * self.v + (1 - self.b2) * mean_sq
    v_hat = self.v / (1 - self.b2 ** self.t)
    denom = np.empty(go.shape[1])
    for (a, b), vb in zip(blocks, v_hat):
      denom[a:b] = np.sqrt(vb) + self.eps
    u = self.m / (1 - self.b1 ** self.t) / denom[None, :]
    return u if self.axis == 1 else u.T


@pytest.mark.parametrize("whole_value", [False, True])
@pytest.mark.parametrize("shape, out_axis", [((GD, 3 * GD), 1),
                                             ((3 * GD, GD), 0)])
def test_fused_qkv_matches_hand_reference(shape, out_axis, whole_value):
  rng = np.random.default_rng(10)
  params = {"h": {"0": {"attn": {"c_attn": {
      "kernel": rng.standard_normal(shape).astype(np.float32)}}}}}
  rules = mo.AdamMiniRules(head_dim=GHD, whole_value=whole_value)
  tx = mo.scale_by_adam_mini(b1=0.8, b2=0.95, eps=1e-6, partition=rules)
  ref = FusedQkvReference(GD, GHD, out_axis, whole_value=whole_value, b1=0.8,
                          b2=0.95, eps=1e-6)
  state = tx.init(params)
  nu = state.nu["h"]["0"]["attn"]["c_attn"]["kernel"]
  blocks = 2 * (GD // GHD) + (1 if whole_value else GD)
  assert nu.shape == ((1, blocks) if out_axis == 1 else (blocks, 1))
  seg = state.segments["h"]["0"]["attn"]["c_attn"]["kernel"]
  assert seg.segments[0] == out_axis
  assert jax.tree.leaves(state.segments) == []  # static: no arrays
  update = jax.jit(tx.update)
  for _ in range(12):
    g = (rng.uniform(0.1, 3.0) * rng.standard_normal(shape)).astype(
        np.float32)
    g[:, :GHD] *= 10.0  # heads of very different scales
    updates, state = update(
        {"h": {"0": {"attn": {"c_attn": {"kernel": g}}}}}, state)
    np.testing.assert_allclose(
        np.asarray(updates["h"]["0"]["attn"]["c_attn"]["kernel"]),
        ref.step(g), rtol=1e-4, atol=1e-6)
  nu = state.nu["h"]["0"]["attn"]["c_attn"]["kernel"]
  np.testing.assert_allclose(np.asarray(nu).ravel(), ref.v, rtol=1e-4)
  # optax.tree.map_params rebuilds the state from a placeholder init: the
  # static segments survive it.
  mapped = optax.tree.map_params(tx, lambda x: x, state)
  assert mapped.segments == state.segments


def test_segmented_spec_is_a_partition_and_is_checked():
  """A user's AdamMiniSpec with segments, and what is wrong with bad ones."""
  rng = np.random.default_rng(11)
  w = rng.standard_normal((4, 10)).astype(np.float32)
  # Columns: 4 in one block, 6 in blocks of 2 (GQA-like unequal segments).
  spec = mo.AdamMiniSpec("custom", (), (1, 4), (1, ((4, 1), (6, 3))))
  tx = mo.scale_by_adam_mini(partition={"w": spec})
  state = tx.init({"w": w})
  assert state.nu["w"].shape == (1, 4)
  assert state.segments == {"w": mo.AdamMiniSegments((1, ((4, 1), (6, 3))))}
  updates, state = tx.update({"w": w}, state)
  sq = w.astype(np.float64) ** 2
  want_v = [sq[:, :4].mean()] + [sq[:, a:a + 2].mean() for a in (4, 6, 8)]
  np.testing.assert_allclose(np.asarray(state.nu["w"]).ravel(),
                             0.001 * np.asarray(want_v), rtol=1e-4)
  # Segments with one grouping collapse to a plain v_shape.
  plain = mo.AdamMiniSpec("custom", (), (1, 5), (1, ((4, 2), (6, 3))))
  state = mo.scale_by_adam_mini(partition={"w": plain}).init({"w": w})
  assert state.nu["w"].shape == (1, 5)
  assert state.segments == {"w": mo.AdamMiniSegments(None)}
  for bad, match in [
      (mo.AdamMiniSpec("c", (), (1, 4), (1, ((4, 1), (5, 3)))),
       r"segments \(\(4, 1\), \(5, 3\)\) do not cut axis 1 .*sum to 10"),
      (mo.AdamMiniSpec("c", (), (1, 5), (1, ((4, 1), (6, 3)))),
       r"v_shape\[1\] = 5 must be the segments' blocks summed \(4\)"),
      (mo.AdamMiniSpec("c", (), (1, 5), (1, ((4, 1), (6, 4)))),
       r"segments .* each segment's blocks must divide its length"),
      (mo.AdamMiniSpec("c", (), (1, 4), 3), r"segments must be None or"),
  ]:
    with pytest.raises(ValueError, match=match):
      mo.scale_by_adam_mini(partition={"w": bad}).init({"w": w})


def _hf_gpt2_tree(layers=2, d=GD, vocab=23, positions=16, classes=None):
  """Shapes as Hugging Face's FlaxGPT2 keeps them: FlaxConv1D is [out, in]."""
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  ln = lambda: {"scale": s(d), "bias": s(d)}
  block = lambda: {
      "ln_1": ln(),
      "attn": {"c_attn": {"kernel": s(3 * d, d), "bias": s(3 * d)},
               "c_proj": {"kernel": s(d, d), "bias": s(d)}},
      "ln_2": ln(),
      "mlp": {"c_fc": {"kernel": s(4 * d, d), "bias": s(4 * d)},
              "c_proj": {"kernel": s(d, 4 * d), "bias": s(d)}}}
  tree = {"transformer": {"wte": {"embedding": s(vocab, d)},
                          "wpe": {"embedding": s(positions, d)},
                          "h": {str(i): block() for i in range(layers)},
                          "ln_f": ln()}}
  if classes is not None:  # a linen Dense head on top: [in, out]
    tree["score"] = {"kernel": s(d, classes)}
  return tree


def test_partition_hf_flax_gpt2_tree():
  """HF FlaxGPT2 naming; the lm head is tied to wte (no leaf of its own)."""
  tree = _hf_gpt2_tree(classes=3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    specs = mo.adam_mini_partition(tree, mo.AdamMiniRules(head_dim=GHD))
    plain = mo.adam_mini_partition(tree)
  t = specs["transformer"]
  assert t["wte"]["embedding"] == mo.AdamMiniSpec("embedding", (1,), (23, 1))
  assert t["wpe"]["embedding"] == mo.AdamMiniSpec("embedding", (1,), (16, 1))
  assert t["ln_f"]["scale"].rule == "norm" and t["ln_f"]["bias"].rule == "bias"
  for i in ("0", "1"):
    h = t["h"][i]
    assert h["ln_1"]["scale"] == mo.AdamMiniSpec("norm", (0,), (1,))
    qkv = h["attn"]["c_attn"]["kernel"]
    heads = GD // GHD
    assert qkv == mo.AdamMiniSpec(
        "qkv", (0, 1), (2 * heads + GD, 1),
        (0, ((GD, heads), (GD, heads), (GD, GD))))
    assert h["attn"]["c_attn"]["bias"].rule == "bias"
    # FlaxConv1D kernels are [out, in]: one v per row.
    assert h["attn"]["c_proj"]["kernel"] == mo.AdamMiniSpec(
        "neuron", (1,), (GD, 1))
    assert h["mlp"]["c_fc"]["kernel"] == mo.AdamMiniSpec(
        "neuron", (1,), (4 * GD, 1))
    assert h["mlp"]["c_proj"]["kernel"] == mo.AdamMiniSpec(
        "neuron", (1,), (GD, 1))
  # The Dense classifier on top stays [in, out]: one v per class.
  assert specs["score"]["kernel"] == mo.AdamMiniSpec("output", (0,), (1, 3))
  # Without head_dim the query/key thirds get one v per row (no segments).
  assert plain["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"] == (
      mo.AdamMiniSpec("qkv", (1,), (3 * GD, 1)))
  # The state follows the partition; init and update trace without names.
  rules = mo.AdamMiniRules(head_dim=GHD)
  state = jax.eval_shape(mo.adam_mini(1e-3, partition=rules).init, tree)
  nu = state[0].nu["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
  assert nu.shape == (2 * (GD // GHD) + GD, 1)
  segs = _named_leaves(state[0].segments)
  assert segs["transformer/h/1/attn/c_attn/kernel"].segments[0] == 0
  assert segs["transformer/h/1/attn/c_proj/kernel"].segments is None


@pytest.mark.parametrize("name", ["score", "classifier", "head"])
def test_classifier_heads_get_one_v_per_class(name):
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  tree = {"embed": {"embedding": s(50, 16)}, name: {"kernel": s(16, 5),
                                                     "bias": s(5)}}
  spec = mo.adam_mini_partition(tree)[name]
  assert spec["kernel"] == mo.AdamMiniSpec("output", (0,), (1, 5))
  assert spec["bias"].rule == "bias"
  # Stored [classes, d] (converted from PyTorch): still one v per class.
  tree[name]["kernel"] = s(5, 16)
  assert mo.adam_mini_partition(tree)[name]["kernel"] == mo.AdamMiniSpec(
      "output", (1,), (5, 1))


class LinenGpt2Block(nn.Module):
  """nanoGPT ported to linen: Dense kernels [in, out], fused c_attn."""

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(nn.Dense(3 * d, name="c_attn")(
        nn.LayerNorm(name="ln_1")(x)), 3, axis=-1)
    heads = lambda y: y.reshape(b, t, d // GHD, GHD)
    att = nn.dot_product_attention(heads(q), heads(k), heads(v))
    x = x + nn.Dense(d, name="c_proj")(att.reshape(b, t, d))
    h = nn.LayerNorm(name="ln_2")(x)
    h = nn.Dense(d, name="mlp_c_proj")(nn.gelu(nn.Dense(4 * d,
                                                        name="c_fc")(h)))
    return x + h


class LinenGpt2(nn.Module):
  """Tied embeddings (wte.attend) and, for classification, a `head`."""
  classes: int = 0

  @nn.compact
  def __call__(self, tokens):
    wte = nn.Embed(VOCAB, GD, name="wte")
    x = wte(tokens) + nn.Embed(SEQ, GD, name="wpe")(jnp.arange(SEQ))
    for i in range(2):
      x = LinenGpt2Block(name=f"h_{i}")(x)
    x = nn.LayerNorm(name="ln_f")(x)
    if self.classes:
      return nn.Dense(self.classes, name="head")(x.mean(axis=1))
    return wte.attend(x)


def test_linen_gpt2_partition_and_training():
  tokens, targets = _tokens(7)
  model = LinenGpt2()
  params = jax.jit(model.init)(jax.random.key(7), tokens)["params"]
  rules = mo.AdamMiniRules(head_dim=GHD)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    specs = mo.adam_mini_partition(params, rules)
  assert specs["wte"]["embedding"].v_shape == (VOCAB, 1)
  assert specs["wpe"]["embedding"].v_shape == (SEQ, 1)
  h = specs["h_0"]
  assert h["c_attn"]["kernel"].segments == (
      1, ((GD, GD // GHD), (GD, GD // GHD), (GD, GD)))
  assert h["c_proj"]["kernel"] == mo.AdamMiniSpec("neuron", (0,), (1, GD))
  assert h["c_fc"]["kernel"] == mo.AdamMiniSpec("neuron", (0,), (1, 4 * GD))
  losses = _train_linen(model, params, tokens, targets,
                        mo.adam_mini(1e-2, partition=rules))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses
  # A classifier head on the same body: one v per class.
  clf = LinenGpt2(classes=3)
  cparams = clf.init(jax.random.key(8), tokens)["params"]
  cspec = mo.adam_mini_partition(cparams, rules)["head"]["kernel"]
  assert cspec == mo.AdamMiniSpec("output", (0,), (1, 3))


class NnxGpt2Block(nnx.Module):

  def __init__(self, rngs):
    self.ln_1 = nnx.LayerNorm(GD, rngs=rngs)
    self.c_attn = nnx.Linear(GD, 3 * GD, rngs=rngs)
    self.c_proj = nnx.Linear(GD, GD, rngs=rngs)
    self.ln_2 = nnx.LayerNorm(GD, rngs=rngs)
    self.c_fc = nnx.Linear(GD, 4 * GD, rngs=rngs)
    self.mlp_proj = nnx.Linear(4 * GD, GD, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(self.c_attn(self.ln_1(x)), 3, axis=-1)
    heads = lambda y: y.reshape(b, t, d // GHD, GHD)
    att = nnx.dot_product_attention(heads(q), heads(k), heads(v))
    x = x + self.c_proj(att.reshape(b, t, d))
    return x + self.mlp_proj(nnx.gelu(self.c_fc(self.ln_2(x))))


class NnxGpt2Classifier(nnx.Module):

  def __init__(self, rngs, classes=3):
    self.wte = nnx.Embed(VOCAB, GD, rngs=rngs)
    self.h = nnx.List([NnxGpt2Block(rngs) for _ in range(2)])
    self.ln_f = nnx.LayerNorm(GD, rngs=rngs)
    self.classifier = nnx.Linear(GD, classes, rngs=rngs)

  def __call__(self, tokens):
    x = self.wte(tokens)
    for block in self.h:
      x = block(x)
    return self.classifier(self.ln_f(x).mean(axis=1))


def test_nnx_gpt2_classifier_partition_and_training():
  model = NnxGpt2Classifier(nnx.Rngs(3))
  params = nnx.state(model, nnx.Param)
  rules = mo.AdamMiniRules(head_dim=GHD)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    specs = mo.adam_mini_partition(params, rules)
  named = _named_leaves(specs)
  assert named["h/0/c_attn/kernel"].segments == (
      1, ((GD, GD // GHD), (GD, GD // GHD), (GD, GD)))
  assert named["h/1/c_proj/kernel"] == mo.AdamMiniSpec("neuron", (0,),
                                                       (1, GD))
  assert named["classifier/kernel"] == mo.AdamMiniSpec("output", (0,), (1, 3))
  assert named["wte/embedding"].v_shape == (VOCAB, 1)
  optimizer = nnx.Optimizer(model, mo.adam_mini(1e-2, partition=rules),
                            wrt=nnx.Param)
  tokens, _ = _tokens(9)
  labels = tokens[:, 0] % 3

  @nnx.jit
  def train_step(model, optimizer):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(
          m(tokens), labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(40)]
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses
  opt_state = nnx.as_pure(optimizer.opt_state)[0]
  nu = _named_leaves(opt_state.nu)
  assert nu["h/0/c_attn/kernel"].shape == (1, 2 * (GD // GHD) + GD)
  segs = _named_leaves(opt_state.segments)
  assert sum(x.segments is not None for x in segs.values()) == 2


def test_warns_naming_large_matrices_with_one_v():
  s = jax.ShapeDtypeStruct
  tree = {"encoder": {"mixer": {"kernel": s((256, 256), jnp.float32)},
                      "small": {"kernel": s((16, 16), jnp.float32)}},
          "attn": {"c_attn": {"kernel": s((256, 600), jnp.float32)}},
          "mlp": {"kernel": s((256, 1024), jnp.float32)}}
  with pytest.warns(UserWarning) as record:
    specs = mo.adam_mini_partition(tree)
  assert len(record) == 1
  text = str(record[0].message)
  # Both unnamed large matrices are named, with their shapes; the fused
  # kernel that cannot be cut in three falls to one v and is named too.
  assert "'encoder/mixer/kernel' (256, 256)" in text
  assert "'attn/c_attn/kernel' (256, 600)" in text
  assert "small" not in text and "mlp" not in text
  assert specs["attn"]["c_attn"]["kernel"].rule == "whole"
  with pytest.warns(UserWarning, match="encoder/mixer/kernel"):
    jax.eval_shape(mo.adam_mini(1e-3).init, tree)
  # A rule that asks for one v, or explicit axes, silences it.
  rules = mo.AdamMiniRules(((r"mixer|c_attn", "whole"),)
                           + mo.ADAM_MINI_DEFAULT_RULES)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    mo.adam_mini_partition(tree, rules)
    jax.eval_shape(mo.scale_by_adam_mini(partition=(0,)).init, tree)
  # A partition entry None means automatic for that leaf: warned as well.
  with pytest.warns(UserWarning, match="encoder/mixer/kernel"):
    jax.eval_shape(mo.scale_by_adam_mini(
        partition={"encoder": None, "attn": (0,), "mlp": (0,)}).init, tree)


def test_short_run_whole_value_option():
  """The authors' advice for short runs: one v for each whole value matrix."""
  tree = {"attn": {"value": {"kernel": jnp.ones((GD, 2, GHD))},
                   "v_proj": {"kernel": jnp.ones((GD, GD))},
                   "c_attn": {"kernel": jnp.ones((GD, 3 * GD))}}}
  rules = mo.AdamMiniRules(head_dim=GHD, whole_value=True)
  specs = mo.adam_mini_partition(tree, rules)["attn"]
  assert specs["value"]["kernel"] == mo.AdamMiniSpec("value", (0, 1, 2),
                                                     (1, 1, 1))
  assert specs["v_proj"]["kernel"].v_shape == (1, 1)
  assert specs["c_attn"]["kernel"].segments == (
      1, ((GD, 2), (GD, 2), (GD, 1)))
  with pytest.raises(ValueError, match="whole_value must be a bool, got 1"):
    mo.AdamMiniRules(whole_value=1)
  with pytest.raises(ValueError, match=r"layout must be one of .*'io'"):
    mo.AdamMiniRules(layout="io")


def test_one_nan_poisons_its_block_and_apply_if_finite_skips_it():
  rng = np.random.default_rng(12)
  w = rng.standard_normal((GD, 3 * GD)).astype(np.float32)
  params = {"c_attn": {"kernel": w}}
  rules = mo.AdamMiniRules(head_dim=GHD)
  tx = mo.scale_by_adam_mini(partition=rules)
  state = tx.init(params)
  g = rng.standard_normal(w.shape).astype(np.float32)
  g[3, 1] = np.nan  # one entry of the first query head
  u, state = tx.update({"c_attn": {"kernel": g}}, state)
  u = np.asarray(u["c_attn"]["kernel"])
  assert np.isnan(u[:, :GHD]).all()  # the whole head, every row
  assert np.isfinite(u[:, GHD:]).all()
  v = np.asarray(state.nu["c_attn"]["kernel"]).ravel()
  assert np.isnan(v[0]) and np.isfinite(v[1:]).all()
  # Later finite gradients do not heal the head: v keeps the NaN.
  u, state = tx.update({"c_attn": {"kernel": np.ones_like(g)}}, state)
  assert np.isnan(np.asarray(u["c_attn"]["kernel"])[:, :GHD]).all()
  # optax.apply_if_finite skips the step and keeps the state finite.
  safe = optax.apply_if_finite(mo.adam_mini(1e-3, partition=rules), 3)
  s = safe.init(params)
  u, s = safe.update({"c_attn": {"kernel": g}}, s, params)
  assert int(s.notfinite_count) == 1
  assert np.all(np.asarray(u["c_attn"]["kernel"]) == 0)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(s))


@pytest.mark.parametrize("split", ["columns", "rows"])
@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_fused_qkv_on_a_mesh(axis_type, split):
  """c_attn split over 8 devices: same updates, state placed like init's."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  kind = AxisType.Explicit if axis_type == "explicit" else AxisType.Auto
  mesh = jax.make_mesh((8,), ("x",), axis_types=(kind,))
  rng = np.random.default_rng(13)
  d = 16
  host = {"c_attn": {"kernel": rng.standard_normal((d, 3 * d)).astype(
      np.float32)}}
  rules = mo.AdamMiniRules(head_dim=4)
  tx = mo.adam_mini(1e-3, partition=rules)
  spec = P(None, "x") if split == "columns" else P("x", None)
  params = jax.device_put(host, NamedSharding(mesh, spec))
  with jax.set_mesh(mesh):
    shardings = mo.state_shardings(tx, params)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    update = jax.jit(tx.update)
    for _ in range(2):
      u, state = update(params, state, params)
  want_state = tx.init(host)
  for _ in range(2):
    want, want_state = tx.update(host, want_state, host)
  np.testing.assert_allclose(np.asarray(u["c_attn"]["kernel"]),
                             np.asarray(want["c_attn"]["kernel"]),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(state[0].nu["c_attn"]["kernel"]),
                             np.asarray(want_state[0].nu["c_attn"]["kernel"]),
                             rtol=1e-5)
  assert state[0].segments == want_state[0].segments
  assert u["c_attn"]["kernel"].sharding.is_equivalent_to(
      NamedSharding(mesh, spec), 2)

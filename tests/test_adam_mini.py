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
  is_spec = lambda x: isinstance(x, mo.AdamMiniSpec)
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


def test_linen_train_state_training_lowers_loss():
  tokens, targets = _tokens(2)
  model = LinenLM()
  params = jax.jit(model.init)(jax.random.key(2), tokens)["params"]
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=mo.adam_mini(1e-2, weight_decay=1e-4))

  @jax.jit
  def train_step(state):
    def loss_fn(p):
      return _loss(state.apply_fn({"params": p}, tokens), targets)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(40):
    state, loss = train_step(state)
    losses.append(float(loss))
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

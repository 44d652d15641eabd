"""microadam_mixed: which leaves go where, and each side's update.

The dense leaves are checked against a float64 NumPy Adam(W) written here;
the MicroAdam leaves against ``mo.scale_by_microadam`` run on those leaves
alone (the published algorithm, unchanged: its own float64 reference lives
in test_microadam.py).
"""

from __future__ import annotations

import re
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import microadam_optax as mo
from pallas_kernels import dispatch
from trajectories import assert_same_steps

D, M = "dense", "microadam"


def _rng(name: str) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(name.encode()))


def _paths(labels) -> dict[str, str]:
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  out = {}
  for path, label in flat:
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
            for k in path]
    out["/".join(keys)] = label
  return out


# ---------------------------------------------------------------------------
# Labels.


class _LinenLM(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.Embed(1000, 64)(x)
    h = nn.LayerNorm()(h)
    h = nn.Dense(256)(h)
    h = nn.Dense(64, use_bias=False)(nn.gelu(h))
    return nn.Dense(10, name="head")(h)


def test_labels_linen_tree():
  params = _LinenLM().init(jax.random.PRNGKey(0),
                           jnp.zeros((2, 3), jnp.int32))
  got = _paths(mo.microadam_labels(params))
  assert got == {
      "params/Embed_0/embedding": M,      # 64,000 entries
      "params/LayerNorm_0/bias": D, "params/LayerNorm_0/scale": D,
      "params/Dense_0/kernel": M, "params/Dense_0/bias": D,
      "params/Dense_1/kernel": M,         # 16,384 entries
      "params/head/kernel": D,            # 640 < 4096 entries
      "params/head/bias": D,
  }
  got = _paths(mo.microadam_labels(params, dense_names=mo.EMBEDDING_NAMES,
                                   min_size=0))
  assert got["params/Embed_0/embedding"] == D  # nn.Embed's "embedding"
  assert got["params/head/kernel"] == D        # by name
  assert got["params/Dense_1/kernel"] == M
  assert got["params/LayerNorm_0/scale"] == D  # 1-D, whatever min_size
  got = _paths(mo.microadam_labels(params, dense_names=r"^params/Dense_1/"))
  assert got["params/Embed_0/embedding"] == M
  assert got["params/Dense_1/kernel"] == D


class _NnxLM(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(512, 32, rngs=rngs)
    self.ln = nnx.LayerNorm(32, rngs=rngs)
    self.fc = nnx.Linear(32, 256, rngs=rngs)
    self.lm_head = nnx.Linear(256, 512, use_bias=False, rngs=rngs)


def test_labels_nnx_state_are_a_prefix_with_one_label_per_variable():
  state = nnx.state(_NnxLM(nnx.Rngs(0)), nnx.Param)
  labels = mo.microadam_labels(state, dense_names=mo.EMBEDDING_NAMES)
  got = _paths(labels)
  assert got == {"embed/embedding": D, "ln/scale": D, "ln/bias": D,
                 "fc/kernel": M, "fc/bias": D, "lm_head/kernel": D}
  # A prefix: one label in place of each nnx.Param, not one inside it.
  assert all(isinstance(x, str) for x in jax.tree.leaves(labels))
  assert len(jax.tree.leaves(labels)) == len(jax.tree.leaves(state))


def _gpt2_shapes(layers=2, d=768, vocab=50257, ctx=1024):
  f = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  block = lambda: {
      "ln_1": {"scale": f(d), "bias": f(d)},
      "attn": {"c_attn": {"kernel": f(3 * d, d), "bias": f(3 * d)},
               "c_proj": {"kernel": f(d, d), "bias": f(d)}},
      "ln_2": {"scale": f(d), "bias": f(d)},
      "mlp": {"c_fc": {"kernel": f(4 * d, d), "bias": f(4 * d)},
              "c_proj": {"kernel": f(d, 4 * d), "bias": f(d)}}}
  return {"transformer": {
      "wte": {"embedding": f(vocab, d)}, "wpe": {"embedding": f(ctx, d)},
      "h": {str(i): block() for i in range(layers)},
      "ln_f": {"scale": f(d), "bias": f(d)}}}


def test_labels_gpt2_tree_and_state_bytes():
  shapes = _gpt2_shapes()
  got = _paths(mo.microadam_labels(shapes, dense_names=mo.EMBEDDING_NAMES))
  for path, label in got.items():
    name = path.split("/")
    if name[1] in ("wte", "wpe") or name[-1] in ("scale", "bias"):
      assert label == D, path
    else:
      assert label == M, path
  # Bytes: Adam's float32 mu and nu (8 B) on every dense entry, plus
  # MicroAdam's own state on the rest, plus two int32 counts.
  n = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  dense = {p: x for p, x in zip(got, jax.tree.leaves(shapes)) if got[p] == D}
  micro = [x for p, x in zip(got, jax.tree.leaves(shapes)) if got[p] == M]
  micro_bytes = mo.state_nbytes(jax.eval_shape(mo.scale_by_microadam().init,
                                               micro)) - 4
  expected = (8 * n(list(dense.values())) + micro_bytes + 8) / n(shapes)
  tx = mo.scale_by_microadam_mixed(dense_names=mo.EMBEDDING_NAMES)
  assert mo.state_bytes_per_param(tx, shapes) == pytest.approx(expected,
                                                              rel=1e-12)
  # Small leaves only: near MicroAdam's 0.9 byte per parameter.
  small = mo.state_bytes_per_param(mo.scale_by_microadam_mixed(), shapes)
  assert 0.9 < small < 1.0, small


def test_labels_reject_bad_arguments():
  with pytest.raises(ValueError, match=r"min_size.*-1"):
    mo.microadam_labels({"w": jnp.zeros((4, 4))}, min_size=-1)
  with pytest.raises(ValueError, match=r"dense_names.*'\('"):
    mo.microadam_labels({"w": jnp.zeros((4, 4))}, dense_names="(")
  with pytest.raises(ValueError, match=r"dense must be one of.*'sgd'"):
    mo.scale_by_microadam_mixed(dense="sgd")
  with pytest.raises(ValueError, match=r"max_state_bytes_per_param.*-1"):
    mo.scale_by_microadam_mixed(max_state_bytes_per_param=-1.0)


# ---------------------------------------------------------------------------
# Updates.


def _adamw_reference(grads, params, lr, b1, b2, eps, wd):
  """float64 NumPy AdamW: returns the parameters after each step."""
  p = np.asarray(params, np.float64).copy()
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  out = []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    p = p - lr * (u + wd * p)
    out.append(p.copy())
  return out


def _tree(rng, dense_shapes, micro_shapes):
  return ({k: rng.standard_normal(s).astype(np.float32)
           for k, s in dense_shapes.items()},
          {k: rng.standard_normal(s).astype(np.float32)
           for k, s in micro_shapes.items()})


@pytest.mark.parametrize("dense_b2", [0.95, 0.999])
def test_update_dense_is_adam_and_rest_is_microadam_under_jit(dense_b2):
  name = f"update-{dense_b2}"
  rng = _rng(name)
  dense_shapes = {"bias": (96,), "scale": (1, 96), "small": (40, 50)}
  micro_shapes = {"w1": (96, 128), "w2": (130, 70)}
  steps, b1, b2, eps = 6, 0.9, 0.999, 1e-8
  kwargs = dict(window=3, density=0.05, topk_block_size=512)
  tx = mo.scale_by_microadam_mixed(b1, b2, eps, dense_b2=dense_b2, **kwargs)
  ref_micro = mo.scale_by_microadam(b1, b2, eps, **kwargs)
  params = {**_tree(rng, dense_shapes, {})[0],
            **_tree(rng, {}, micro_shapes)[1]}
  assert _paths(mo.microadam_labels(params)) == {
      **{k: D for k in dense_shapes}, **{k: M for k in micro_shapes}}
  state = tx.init(params)
  micro_state = ref_micro.init({k: params[k] for k in micro_shapes})
  update = jax.jit(tx.update)
  grads = [_tree(rng, dense_shapes, micro_shapes) for _ in range(steps)]
  m = {k: np.zeros(s) for k, s in dense_shapes.items()}
  v = {k: np.zeros(s) for k, s in dense_shapes.items()}
  for t, (gd, gm) in enumerate(grads, start=1):
    updates, state = update({**gd, **gm}, state, params)
    want, micro_state = ref_micro.update(gm, micro_state)
    for k in micro_shapes:
      np.testing.assert_allclose(updates[k], want[k], rtol=1e-6, atol=1e-7)
    for k in dense_shapes:
      g = gd[k].astype(np.float64)
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = dense_b2 * v[k] + (1 - dense_b2) * g * g
      u = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - dense_b2**t)) + eps)
      np.testing.assert_allclose(updates[k], u, rtol=2e-5, atol=1e-6)
    assert any(float(jnp.abs(updates[k]).max()) > 0 for k in micro_shapes)


def test_alias_in_chain_with_clipping_and_weight_decay():
  """optax.chain(clip, microadam_mixed) over a few steps, jitted: dense
  parameters follow a float64 AdamW on clipped gradients; MicroAdam ones
  follow scale_by_microadam on the same clipped gradients."""
  rng = _rng("alias-chain")
  dense_shapes = {"ln_scale": (64,), "embed": (300, 64)}
  micro_shapes = {"kernel": (64, 192)}
  lr, b1, b2, eps, wd, clip, steps = 3e-2, 0.9, 0.999, 1e-8, 0.1, 1.0, 5
  kwargs = dict(window=4, density=0.02, topk_block_size=1024)
  tx = optax.chain(
      optax.clip_by_global_norm(clip),
      mo.microadam_mixed(lr, b1, b2, eps, weight_decay=wd, dense_b2=0.95,
                         dense_names=r"(^|/)embed$", **kwargs))
  dense0, micro0 = _tree(rng, dense_shapes, micro_shapes)
  params = {**dense0, **micro0}
  state = tx.init(params)
  ref_micro = mo.scale_by_microadam(b1, b2, eps, **kwargs)
  micro_state = ref_micro.init(micro0)
  grads = [_tree(rng, dense_shapes, micro_shapes) for _ in range(steps)]
  clipped = []
  for gd, gm in grads:
    norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                       for x in [*gd.values(), *gm.values()]))
    scale = min(1.0, clip / norm)
    clipped.append(({k: x * scale for k, x in gd.items()},
                    {k: x * scale for k, x in gm.items()}))
  dense_ref = {k: _adamw_reference([c[0][k] for c in clipped], dense0[k],
                                   lr, b1, 0.95, eps, wd)[-1]
               for k in dense_shapes}
  micro_ref = {k: micro0[k].astype(np.float64) for k in micro_shapes}

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  for (gd, gm), (_, cm) in zip(grads, clipped):
    params, state = step(params, state, {**gd, **gm})
    u, micro_state = ref_micro.update(
        {k: jnp.asarray(x, jnp.float32) for k, x in cm.items()}, micro_state)
    for k in micro_shapes:
      micro_ref[k] = micro_ref[k] - lr * (np.asarray(u[k], np.float64)
                                          + wd * micro_ref[k])
  for k in dense_shapes:
    np.testing.assert_allclose(params[k], dense_ref[k], rtol=1e-5, atol=1e-6)
  for k in micro_shapes:
    np.testing.assert_allclose(params[k], micro_ref[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(params[k], micro0[k])


def test_adam_mini_on_the_dense_leaves():
  """dense="adam_mini": a norm/bias leaf gets one v for the whole tensor
  (float64 reference), and the state is smaller than with Adam."""
  rng = _rng("adam-mini-dense")
  params = {"ln": {"scale": rng.standard_normal(64).astype(np.float32)},
            "w": rng.standard_normal((64, 256)).astype(np.float32)}
  b1, b2, eps = 0.9, 0.95, 1e-8
  tx = mo.scale_by_microadam_mixed(dense="adam_mini", dense_b2=b2)
  state = tx.init(params)
  m, v = np.zeros(64), 0.0
  for t in range(1, 4):
    g = rng.standard_normal(64).astype(np.float32)
    grads = {"ln": {"scale": g},
             "w": rng.standard_normal((64, 256)).astype(np.float32)}
    updates, state = tx.update(grads, state, params)
    g = g.astype(np.float64)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * np.mean(g * g)
    u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    np.testing.assert_allclose(updates["ln"]["scale"], u, rtol=2e-5)
  adam = mo.scale_by_microadam_mixed(dense_names="w")
  mini = mo.scale_by_microadam_mixed(dense="adam_mini", dense_names="w")
  assert (mo.state_bytes_per_param(mini, params)
          < 0.6 * mo.state_bytes_per_param(adam, params))


def test_budget_is_checked_at_init():
  params = {"embed": jnp.zeros((256, 64)), "w": jnp.zeros((64, 1024)),
            "b": jnp.zeros((1024,))}
  ok = mo.scale_by_microadam_mixed(max_state_bytes_per_param=1.2)
  ok.init(params)
  assert mo.state_bytes_per_param(ok, params) <= 1.2
  over = mo.scale_by_microadam_mixed(dense_names=mo.EMBEDDING_NAMES,
                                     max_state_bytes_per_param=1.2)
  with pytest.raises(ValueError,
                     match=re.escape("max_state_bytes_per_param=1.2 is "
                                     "exceeded")) as e:
    over.init(params)
  assert "17,408 of 82,944 parameters on dense adam" in str(e.value)
  with pytest.raises(ValueError, match="exceeded"):
    jax.jit(over.init)(params)  # shapes are static: also under jit


def test_kernel_config_reaches_the_microadam_leaves():
  """A kernel_config whose XLA groups are smaller than the MicroAdam leaf
  makes that leaf's update a loop over groups (a scan in the traced step,
  absent with the default config) with the one-piece results, bit for bit;
  an invalid kernel_config is refused by both functions."""
  rng = _rng("kernel-config")
  params = {"w": jnp.asarray(rng.standard_normal((64, 256)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((64,)), jnp.float32)}
  configs = {"groups": dispatch.KernelConfig(xla_chunk_elements=4 * 256),
             "default": None}
  txs = {c: mo.microadam_mixed(1e-2, window=2, density=0.05,
                               topk_block_size=256, implementation="xla",
                               kernel_config=cfg)
         for c, cfg in configs.items()}
  assert mo.microadam_labels(params) == {"w": M, "b": D}
  states = {c: tx.init(params) for c, tx in txs.items()}
  for c, tx in txs.items():
    jaxpr = str(jax.make_jaxpr(tx.update)(params, states[c], params))
    assert ("scan[" in jaxpr) == (c == "groups"), c
  out = assert_same_steps(txs, params, rng, with_params=True)
  assert float(jnp.abs(out["groups"]["w"]).max()) > 0
  for make in (mo.scale_by_microadam_mixed,
               lambda **kw: mo.microadam_mixed(1e-3, **kw)):
    with pytest.raises(ValueError, match="kernel_config must be None or"):
      make(kernel_config={"xla_chunk_elements": 256})


def test_nnx_optimizer_trains_with_dense_norms():
  model = _NnxLM(nnx.Rngs(1))
  tx = mo.microadam_mixed(1e-2, dense_names=mo.EMBEDDING_NAMES,
                          dense_b2=0.95)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.asarray(_rng("nnx").integers(0, 512, (8, 6)))

  def loss_fn(model):
    h = model.fc(model.ln(model.embed(x)))
    logits = model.lm_head(jax.nn.gelu(h))
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], x[:, 1:]).mean()

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  scale0 = np.asarray(model.ln.scale[...]).copy()
  first = float(loss_fn(model))
  for _ in range(30):
    step(model, optimizer)
  assert float(loss_fn(model)) < first - 0.5
  # The norm's scale moves densely (every entry), as Adam moves it.
  assert np.all(np.asarray(model.ln.scale[...]) != scale0)

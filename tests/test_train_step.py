"""The whole-training-step benchmark (``benchmarks/train_step.py``) at the
tiny size on CPU, and the per-layer optimizer mapping it relies on."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("flax")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from llama_finetune import model as model_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from llama_finetune import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from llama_finetune import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_tiny_benchmark_runs_in_process(tmp_path):
  out = tmp_path / "step.json"
  result = train_step.main(
      ["--tiny", "--optimizers", "adamw_bf16,adamw_fp32", "--batch", "2",
       "--seq", "16", "--steps", "2", "--warmup", "1", "--layers", "1",
       "--in-process",
       "--json", str(out)])
  rows = {r["optimizer"]: r for r in result["rows"]}
  assert set(rows) == {"adamw_bf16", "adamw_fp32"}
  n = dataclasses.replace(model_lib.PRESETS["tiny"], num_layers=1).num_params()
  for r in rows.values():
    assert r["outcome"] == "ran", r.get("error")
    assert r["num_params"] == n and r["param_bytes"] == 2 * n   # bf16
    assert r["tokens_per_s"] == pytest.approx(2 * 16 / (r["median_ms"] / 1e3))
    assert r["losses_finite"] and r["peak_bytes"] >= r["param_bytes"]
    assert r["peak_source"] == "memory_analysis"   # CPU: no device counter
  # AdamW's mu and nu in the parameters' bf16 (4 bytes per parameter) or in
  # float32 (8), plus scale_by_adam's int32 step count (a constant rate: no
  # schedule count).
  assert rows["adamw_bf16"]["state_bytes"] == 4 * n + 4
  assert rows["adamw_fp32"]["state_bytes"] == 8 * n + 4
  saved = json.loads(out.read_text())
  assert saved["largest_trained"] == {"adamw_bf16": "tiny", "adamw_fp32": "tiny"}


def test_table_reports_out_of_memory_and_the_largest_size():
  ran = dict(outcome="ran", median_ms=100.0, tokens_per_s=80.0,
             peak_bytes=10 * train_step.GIB, peak_bytes_per_param=2.0,
             state_bytes=train_step.GIB, peak_source="peak_bytes_in_use")
  rows = [dict(ran, size="llama-1b", optimizer="adamw_fp32"),
          dict(size="llama2-7b", optimizer="adamw_fp32",
               outcome="out of memory"),
          dict(ran, size="llama-1b", optimizer="microadam"),
          dict(ran, size="llama2-7b", optimizer="microadam")]
  assert train_step.largest_trained(rows) == {"adamw_fp32": "llama-1b",
                                              "microadam": "llama2-7b"}
  text = train_step.table(rows, 78.0)
  assert "out of memory" in text and "within 78 GiB" in text
  assert text.splitlines()[-2].split() == ["adamw_fp32", "llama-1b"]


def test_out_of_memory_is_a_row_not_a_crash(monkeypatch):
  def boom(*a, **k):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                       "allocate 1.00GiB.")
  monkeypatch.setattr(model_lib, "init_params", boom)
  row = train_step.measure("tiny", "adamw_bf16", batch=1, seq=8,
                           layout="stacked")
  assert row["outcome"] == "out of memory" and row["stage"] == "init"


@pytest.mark.parametrize("name", ["adam_mini", "adafactor"])
def test_per_layer_optimizer_on_stacked_equals_unrolled(name):
  """A per-matrix optimizer on stacked layers gives each layer the update it
  gets on the unrolled layout (one leaf per layer)."""
  base = dataclasses.replace(model_lib.PRESETS["tiny"], param_dtype="float32",
                             dtype="float32")
  unrolled_cfg = dataclasses.replace(base, layout="unrolled")
  stacked_cfg = dataclasses.replace(base, layout="stacked")
  _, unrolled = model_lib.init_params(unrolled_cfg, seed=0)
  rng = np.random.default_rng()

  def stack(tree):
    layers = [tree["layers"][i] for i in range(base.num_layers)]
    return dict({k: v for k, v in tree.items() if k != "layers"},
                layers=jax.tree.map(lambda *x: jnp.stack(x), *layers))

  grads = [jax.tree.map(lambda x: jnp.asarray(
      rng.standard_normal(x.shape), jnp.float32), unrolled) for _ in range(2)]
  results = []
  for cfg, to_layout in ((unrolled_cfg, lambda t: t), (stacked_cfg, stack)):
    tx = optim.build(name, 1e-2, cfg)
    params = to_layout(unrolled)
    state = jax.jit(tx.init)(params)
    for g in grads:
      updates, state = jax.jit(tx.update)(to_layout(g), state, params)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
    results.append(params)
  want, got = stack(results[0]), results[1]
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want),
                          jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5,
                               atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert not np.allclose(np.asarray(want["layers"]["mlp"]["up_proj"]["kernel"]),
                         np.asarray(stack(unrolled)["layers"]["mlp"][
                             "up_proj"]["kernel"]))


def test_per_layer_writes_updates_of_another_dtype():
  """bf16 gradients, float32 moments: float32 updates, equal to the
  unrolled ones."""
  import optax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng()
  layers = [{"w": jnp.asarray(rng.standard_normal((3, 5)), jnp.bfloat16)}
            for _ in range(4)]
  head = {"w": jnp.asarray(rng.standard_normal(7), jnp.bfloat16)}
  stacked = {"layers": jax.tree.map(lambda *x: jnp.stack(x), *layers),
             "head": head}
  tx = optax.scale_by_adam()
  f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  wrapped = optim.per_layer(tx)
  got, _ = jax.jit(wrapped.update)(stacked, wrapped.init(f32(stacked)),
                                   stacked)
  for i, layer in enumerate(layers):
    want, _ = jax.jit(tx.update)(layer, tx.init(f32(layer)), layer)
    assert got["layers"]["w"].dtype == want["w"].dtype == jnp.float32
    np.testing.assert_allclose(got["layers"]["w"][i], want["w"], rtol=1e-6)
  want, _ = jax.jit(tx.update)(head, tx.init(f32(head)), head)
  np.testing.assert_allclose(got["head"]["w"], want["w"], rtol=1e-6)


def test_microadam_takes_stacked_leaves_whole():
  # Its GPU kernel indexes leaves of any size (Llama-2-13B's stacked MLP
  # matrices hold 2.8 G entries): no per-layer mapping at any size.
  for size in ("llama2-7b", "llama2-13b"):
    tx = optim.build("microadam", 1e-5, model_lib.PRESETS[size])
    state = jax.eval_shape(tx.init, model_lib.abstract_params(
        dataclasses.replace(model_lib.PRESETS[size], num_layers=2))[1])
    assert not isinstance(state, optim.PerLayerState), size


@pytest.mark.parametrize("name,tied", [("microadam", True)])
def test_layerwise_step_equals_the_plain_step(name, tied):
  """Updating each layer inside the backward pass gives the parameters of
  the plain step (whole gradient, then the per-layer optimizer)."""
  from microadam_compare import optimizers as registry  # pylint: disable=g-import-not-at-top
  from llama_finetune import layerwise  # pylint: disable=g-import-not-at-top
  config = dataclasses.replace(
      model_lib.PRESETS["tiny"], param_dtype="float32", dtype="float32",
      layout="stacked", remat=True, num_layers=3, tie_word_embeddings=tied)
  graphdef, params = model_lib.init_params(config, seed=1)
  tx = registry.build(name, 1e-2, registry.OptimizerContext(weight_decay=0.1))
  wrapped = optim.per_layer(tx)
  rng = np.random.default_rng()
  batches = [jnp.asarray(rng.integers(0, 256, (2, 17)), jnp.int32)
             for _ in range(3)]
  plain_step = train_step.make_step(graphdef, wrapped)
  lw_step = layerwise.make_layerwise_step(graphdef, config, tx)
  copy = lambda t: jax.tree.map(jnp.array, t)
  p1, s1 = copy(params), wrapped.init(params)
  p2, s2 = copy(params), wrapped.init(params)
  for b in batches:
    p1, s1, l1 = plain_step(p1, s1, b)
    p2, s2, l2 = lw_step(p2, s2, b)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(p1),
                               jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4,
                               atol=2e-5, err_msg=jax.tree_util.keystr(path))
  moved = np.abs(np.asarray(p1["layers"]["mlp"]["up_proj"]["kernel"])
                 - np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"]))
  assert moved.max() > 1e-3

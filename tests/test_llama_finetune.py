"""The Llama fine-tuning example: model, Hugging Face loading, training, resume.

A tiny random checkpoint is written with ``safetensors.numpy.save_file`` under
Hugging Face's names and torch's ``[out, in]`` layout (no network), loaded
with :func:`llama_finetune.checkpoint.load`, and its logits compared with a
float64 NumPy forward pass of Hugging Face's Llama maths written here from
the tensors alone (RMSNorm, rotate_half RoPE, grouped-query causal
attention, SwiGLU). Then the command line's ``main`` trains a few steps with
gradient accumulation, stops, resumes, and must end at the parameters of an
uninterrupted run.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("safetensors")
pytest.importorskip("orbax.checkpoint")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top,wrong-import-position

from llama_finetune import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from llama_finetune import model as model_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": 256, "hidden_size": 48, "intermediate_size": 80,
    "num_hidden_layers": 3, "num_attention_heads": 6,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 500.0,
    "tie_word_embeddings": False, "hidden_act": "silu",
}


def random_hf_tensors(cfg: dict, seed: int) -> dict[str, np.ndarray]:
  """Random float32 tensors of a Llama checkpoint, Hugging Face names and
  torch layouts (norm scales away from 1, so a dropped scale shows)."""
  rng = np.random.default_rng(seed)
  d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  hd = d // cfg["num_attention_heads"]
  kv = cfg["num_key_value_heads"] * hd
  w = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)
  t = {"model.embed_tokens.weight": w(v, d),
       "model.norm.weight": (1 + w(d)).astype(np.float32)}
  if not cfg["tie_word_embeddings"]:
    t["lm_head.weight"] = w(v, d)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    t.update({p + "self_attn.q_proj.weight": w(d, d),
              p + "self_attn.k_proj.weight": w(kv, d),
              p + "self_attn.v_proj.weight": w(kv, d),
              p + "self_attn.o_proj.weight": w(d, d),
              p + "mlp.gate_proj.weight": w(f, d),
              p + "mlp.up_proj.weight": w(f, d),
              p + "mlp.down_proj.weight": w(d, f),
              p + "input_layernorm.weight": (1 + w(d)).astype(np.float32),
              p + "post_attention_layernorm.weight":
                  (1 + w(d)).astype(np.float32)})
  return t


def write_checkpoint(directory, cfg: dict, tensors: dict, shards: int = 1):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as fh:
    json.dump(cfg, fh)
  if shards == 1:
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    return
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: tensors[n] for n in names[s::shards]}
    save_file(part, os.path.join(directory, fname))
    weight_map.update(dict.fromkeys(part, fname))
  with open(os.path.join(directory, "model.safetensors.index.json"),
            "w") as fh:
    json.dump({"metadata": {}, "weight_map": weight_map}, fh)


def reference_logits(cfg: dict, t: dict, tokens: np.ndarray) -> np.ndarray:
  """Hugging Face's LlamaForCausalLM forward pass in float64 NumPy."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  d = cfg["hidden_size"]
  hd, eps = d // nh, cfg["rms_norm_eps"]
  b, n = tokens.shape

  def rms(x, w):
    return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)

  def rotate_half(x):
    return np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)

  inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
  ang = np.arange(n)[:, None] * inv[None]
  ang = np.concatenate([ang, ang], -1)                    # [T, hd]
  cos, sin = np.cos(ang)[None, None], np.sin(ang)[None, None]
  causal = np.tril(np.ones((n, n), bool))
  x = t["model.embed_tokens.weight"][tokens]
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = rms(x, t[p + "input_layernorm.weight"])
    heads = lambda y, k: y.reshape(b, n, k, hd).transpose(0, 2, 1, 3)
    q = heads(h @ t[p + "self_attn.q_proj.weight"].T, nh)
    k = heads(h @ t[p + "self_attn.k_proj.weight"].T, nkv)
    v = heads(h @ t[p + "self_attn.v_proj.weight"].T, nkv)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k = np.repeat(k, nh // nkv, axis=1)                   # repeat_kv
    v = np.repeat(v, nh // nkv, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    s = np.where(causal, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    a = (s / s.sum(-1, keepdims=True)) @ v                # [B, H, T, hd]
    a = a.transpose(0, 2, 1, 3).reshape(b, n, d)
    x = x + a @ t[p + "self_attn.o_proj.weight"].T
    h = rms(x, t[p + "post_attention_layernorm.weight"])
    g = h @ t[p + "mlp.gate_proj.weight"].T
    u = h @ t[p + "mlp.up_proj.weight"].T
    x = x + (g / (1 + np.exp(-g)) * u) @ t[p + "mlp.down_proj.weight"].T
  x = rms(x, t["model.norm.weight"])
  head = (t["model.embed_tokens.weight"] if cfg["tie_word_embeddings"]
          else t["lm_head.weight"])
  return x @ head.T


@pytest.mark.parametrize("layout,tied,shards,remat", [
    ("stacked", False, 1, False),
    ("unrolled", False, 3, True),
    ("stacked", True, 2, True),
])
def test_loaded_checkpoint_matches_float64_reference(tmp_path, layout, tied,
                                                     shards, remat):
  seed = np.random.SeedSequence().entropy % 2**32
  cfg = dict(HF_CONFIG, tie_word_embeddings=tied)
  tensors = random_hf_tensors(cfg, seed)
  write_checkpoint(tmp_path, cfg, tensors, shards)
  tokens = np.random.default_rng(seed + 1).integers(0, 256, (2, 11))
  config, graphdef, params = checkpoint.load(str(tmp_path), layout=layout,
                                             remat=remat)
  assert config.num_kv_heads == 2 and config.layout == layout
  logits = jax.jit(lambda p, x: model_lib.apply(graphdef, p, x))(
      params, jnp.asarray(tokens, jnp.int32))
  want = reference_logits(cfg, tensors, tokens)
  np.testing.assert_allclose(np.asarray(logits), want, rtol=2e-4, atol=2e-4,
                             err_msg=f"seed {seed}")


def test_bf16_params_load_as_bf16(tmp_path):
  tensors = random_hf_tensors(HF_CONFIG, 0)
  write_checkpoint(tmp_path, HF_CONFIG, tensors)
  _, _, params = checkpoint.load(str(tmp_path), param_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
  np.testing.assert_array_equal(
      np.asarray(params["norm"]["scale"], np.float32),
      np.asarray(jnp.asarray(tensors["model.norm.weight"], jnp.bfloat16),
                 np.float32))


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     "missing tensors ['model.layers.1.mlp.up_proj.weight']"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias":
                         np.zeros(48, np.float32)}),
     "unexpected tensors ['model.layers.0.self_attn.q_proj.bias']"),
    (lambda t: t.update({"model.layers.2.self_attn.k_proj.weight":
                         np.zeros((48, 48), np.float32)}),
     "model.layers.2.self_attn.k_proj.weight is (48, 48)"),
])
def test_mismatched_checkpoint_names_the_tensor(tmp_path, edit, message):
  tensors = random_hf_tensors(HF_CONFIG, 0)
  edit(tensors)
  write_checkpoint(tmp_path, HF_CONFIG, tensors)
  with pytest.raises(ValueError, match="does not match") as info:
    checkpoint.load(str(tmp_path))
  assert message in str(info.value)


def test_save_then_load_round_trips(tmp_path):
  tensors = random_hf_tensors(HF_CONFIG, 3)
  write_checkpoint(tmp_path / "a", HF_CONFIG, tensors)
  config, _, params = checkpoint.load(str(tmp_path / "a"))
  checkpoint.save(str(tmp_path / "b"), config, params, max_shard_bytes=20000)
  assert os.path.exists(tmp_path / "b" / "model.safetensors.index.json")
  back = checkpoint.to_hf_tensors(
      config, checkpoint.load(str(tmp_path / "b"))[2])
  assert sorted(back) == sorted(tensors)
  for name, value in tensors.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_presets_match_the_library_shapes():
  import microadam_optax as mo  # pylint: disable=g-import-not-at-top
  for name in ("llama2-7b", "llama2-13b"):
    want = mo.model_shapes.num_params(mo.model_shapes.llama2_shapes(name))
    assert model_lib.PRESETS[name].num_params() == want
  _, abstract = model_lib.abstract_params(model_lib.PRESETS["llama-1b"])
  assert mo.model_shapes.num_params(abstract) == 1_100_048_384


@pytest.fixture
def compilation_cache(tmp_path):
  """A persistent compilation cache for one test: the runs of a resume test
  compile the same programs, so only the first pays for them."""
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  names = ("jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path / "jax_cache"))
  jax.config.update(names[1], 0.0)
  jax.config.update(names[2], 0)
  cc.reset_cache()
  yield
  for n, v in saved.items():
    jax.config.update(n, v)
  cc.reset_cache()


def _flat(params):
  return {jax.tree_util.keystr(p): np.asarray(v, np.float32)
          for p, v in jax.tree_util.tree_leaves_with_path(params)}


def test_cli_trains_stops_and_resumes_to_the_uninterrupted_params(
    tmp_path, compilation_cache):  # pylint: disable=redefined-outer-name,unused-argument
  from llama_finetune import train  # pylint: disable=g-import-not-at-top
  tensors = random_hf_tensors(HF_CONFIG, 5)
  write_checkpoint(tmp_path / "hf", HF_CONFIG, tensors, shards=2)
  text = tmp_path / "corpus.jsonl"
  rng = np.random.default_rng(0)
  with open(text, "w") as fh:
    for i in range(40):
      words = " ".join(f"w{int(x)}" for x in rng.integers(0, 50, 30))
      fh.write(json.dumps({"text": f"record {i}: {words}"}) + "\n")
  common = ["--checkpoint", str(tmp_path / "hf"), "--data", str(text),
            "--optimizer", "microadam", "--lr", "1e-3", "--steps", "4",
            "--warmup", "1", "--accum", "2", "--batch", "2", "--seq", "16",
            "--param-dtype", "float32", "--eval-every", "2",
            "--save-every", "2", "--no-progress"]
  full = train.main(common + ["--out", str(tmp_path / "full"),
                              "--export", str(tmp_path / "exported")])
  part = train.main(common + ["--out", str(tmp_path / "part"),
                              "--stop-after", "2"])
  assert part["last_step"] == 2 and len(part["history"]) == 2
  resumed = train.main(common + ["--out", str(tmp_path / "part"),
                                 "--resume"])
  assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
  np.testing.assert_allclose([h["loss"] for h in resumed["history"]],
                             [h["loss"] for h in full["history"]])
  want, got = _flat(full["params"]), _flat(resumed["params"])
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  # Training moved the checkpoint's parameters (four optimizer steps).
  start = checkpoint.load(str(tmp_path / "hf"))[2]
  moved = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(_flat(start)), jax.tree.leaves(want))]
  assert all(moved)
  # The outputs: the log, the loss curve, and a loadable HF export.
  with open(tmp_path / "full" / "log.json") as fh:
    log = json.load(fh)
  assert len(log["history"]) == 4 and [e["step"] for e in log["eval"]] == [2, 4]
  assert log["tokens_per_step"] == 2 * 2 * 16
  assert os.path.getsize(tmp_path / "full" / "loss.png") > 1000
  exported = _flat(checkpoint.load(str(tmp_path / "exported"))[2])
  for name in want:
    np.testing.assert_array_equal(exported[name], want[name], err_msg=name)

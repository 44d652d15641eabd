"""Cost of one Gauss-Newton outer step on a GPT, against AdamW and plain steps.

Times one jitted outer step of ``mo.gauss_newton`` (full and layerwise, with
Muon as the inner optimizer) on a decoder-only Flax NNX transformer with
next-token cross-entropy, as a multiple of one AdamW training step, and its
peak memory as a multiple of a plain training step (forward, backward, SGD
update; no optimizer state). Every mode runs in its own subprocess, so that
``jax.devices()[0].memory_stats()["peak_bytes_in_use"]`` (GPU/TPU; absent on
CPU) is that mode's own peak; XLA's compiled memory analysis (arguments +
outputs + temporaries - aliased) is reported on every back end.

The model is a self-contained pre-LayerNorm GPT (tied embeddings, learned
positions, causal attention written with einsum so that it has a JVP rule).
``--preset 100m`` is ~110 M parameters (d 768, 12 layers, 12 heads, vocab
32768, context 1024, batch 8); ``--preset tiny`` runs on a CPU in seconds.

  python benchmarks/gauss_newton_step.py --preset tiny
  python benchmarks/gauss_newton_step.py --preset 100m --inner-steps 10 \\
      --json gauss_newton_step.json

A layerwise step costs about (number of layers) times a full step per inner
step: each layer's block needs its own JVP and VJP (see ``mo.gauss_newton``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
from flax import nnx

import harness  # puts the checkout on sys.path
import microadam_optax as mo

PRESETS = {
    # name: (d_model, layers, heads, vocab, seq_len, batch)
    "tiny": (64, 2, 4, 256, 32, 4),
    "small": (256, 4, 4, 4096, 128, 8),
    "100m": (768, 12, 12, 32768, 1024, 8),
}
MODES = ("sgd", "adamw", "gn_full", "gn_layerwise")


# ---------------------------------------------------------------------------
# The model.


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: causal self-attention and a GELU MLP."""

  def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False, rngs=rngs)
    self.proj = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc = nnx.Linear(d, 4 * d, rngs=rngs)
    self.out = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.heads
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    q, k, v = (a.reshape(b, t, h, d // h) for a in (q, k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    x = x + self.proj(att.reshape(b, t, d))
    return x + self.out(jax.nn.gelu(self.fc(self.ln2(x))))


class GPT(nnx.Module):
  """Decoder-only transformer with tied input/output embeddings."""

  def __init__(self, d: int, layers: int, heads: int, vocab: int,
               seq_len: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, d)))
    self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(layers)])
    self.ln_f = nnx.LayerNorm(d, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos[:tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.ln_f(x))


def block_layers(path, leaf) -> object:
  """Layerwise GN layers: each transformer block, and each other top-level
  module (embedding, positions, final norm)."""
  del leaf
  names = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
           for k in path]
  return tuple(names[:2]) if names[0] == "blocks" else names[0]


# ---------------------------------------------------------------------------
# One measured mode.


def _memory_analysis_bytes(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes
               + m.temp_size_in_bytes - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def run_mode(mode: str, args) -> dict:
  d, layers, heads, vocab, seq_len, batch = PRESETS[args.preset]
  d = args.d_model or d
  layers = args.layers or layers
  heads = args.heads or heads
  vocab = args.vocab or vocab
  seq_len = args.seq_len or seq_len
  batch = args.batch or batch
  dtype = jnp.dtype(args.dtype)
  model = GPT(d, layers, heads, vocab, seq_len, nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, vocab, (batch, seq_len + 1)), jnp.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def model_fn(p):
    return nnx.merge(graphdef, p, rest)(inputs).astype(jnp.float32)

  def loss_fn(logits):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  if mode in ("sgd", "adamw"):
    tx = optax.sgd(1e-3) if mode == "sgd" else optax.adamw(3e-4)

    def step(p, s):
      loss, g = jax.value_and_grad(lambda q: loss_fn(model_fn(q)))(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss
  else:
    inner = optax.contrib.muon(args.inner_lr)
    tx = mo.gauss_newton(
        inner, args.inner_steps, layerwise=mode == "gn_layerwise",
        layers=block_layers, layer_batch_size=args.layer_batch_size)

    def step(p, s):
      u, s = tx.update(None, s, p, model_fn=model_fn, loss_fn=loss_fn)
      return optax.apply_updates(p, u), s, s.loss_after

  state = tx.init(params)
  jitted = jax.jit(step, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled = jitted.lower(params, state).compile()
  compile_s = time.perf_counter() - t0
  times = []
  loss = None
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    params, state, loss = compiled(params, state)
    jax.block_until_ready((params, loss))
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  stats = harness.memory_stats()
  row = {
      "mode": mode, "num_params": num_params, "compile_s": compile_s,
      "step_s": statistics.median(times), "step_s_all": times,
      "loss": float(loss),
      "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
      "compiled_bytes": _memory_analysis_bytes(compiled),
      "shape": dict(d_model=d, layers=layers, heads=heads, vocab=vocab,
                    seq_len=seq_len, batch=batch, dtype=str(dtype)),
  }
  if mode.startswith("gn"):
    row["inner_steps"] = args.inner_steps
    row["inner_optimizer"] = f"optax.contrib.muon({args.inner_lr})"
    row["step_size"] = float(state.step_size)
    if mode == "gn_layerwise":
      row["num_layers"] = len(mo.layer_partition(params, block_layers))
      row["layer_batch_size"] = args.layer_batch_size
  return row


# ---------------------------------------------------------------------------
# Driver.


def _ratio(a, b):
  return None if a is None or not b else a / b


def main(argv=None) -> dict:
  """Measures every mode (each in a fresh process); prints and returns."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
  for name in ("d-model", "layers", "heads", "vocab", "seq-len", "batch"):
    parser.add_argument(f"--{name}", type=int, default=None,
                        help="override the preset")
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"], help="params dtype")
  parser.add_argument("--inner-steps", type=int, default=10)
  parser.add_argument("--inner-lr", type=float, default=0.02)
  parser.add_argument("--layer-batch-size", type=int, default=1,
                      help="layers vmapped together in layerwise GN")
  parser.add_argument("--steps", type=int, default=3, help="timed steps")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--modes", default=",".join(MODES),
                      help=f"comma-separated subset of {MODES}")
  parser.add_argument("--json", default=None, help="write results here")
  parser.add_argument("--in-process", action="store_true",
                      help="run every mode in this process (peak memory is "
                      "then cumulative)")
  parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.only:  # child process: one mode, JSON on the last stdout line
    print(json.dumps(run_mode(args.only, args)))
    return {}

  modes = [m for m in args.modes.split(",") if m]
  unknown = set(modes) - set(MODES)
  if unknown:
    parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
  rows = []
  for mode in modes:
    if args.in_process:
      rows.append(run_mode(mode, args))
      continue
    child_argv = [f"--{k.replace('_', '-')}={v}"
                  for k, v in vars(args).items()
                  if v is not None and k not in ("json", "in_process", "only")]
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *child_argv,
         "--only", mode], capture_output=True, text=True, check=False)
    if proc.returncode:
      rows.append({"mode": mode, "error": proc.stderr.strip()[-2000:]})
      print(f"{mode}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
      continue
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

  by_mode = {r["mode"]: r for r in rows if "error" not in r}
  adamw, plain = by_mode.get("adamw"), by_mode.get("sgd")
  for r in rows:
    if "error" in r:
      continue
    r["time_vs_adamw"] = _ratio(r["step_s"], adamw and adamw["step_s"])
    for key in ("peak_bytes_in_use", "compiled_bytes"):
      r[f"{key}_vs_plain"] = _ratio(r[key], plain and plain[key])

  first = next(iter(by_mode.values()), None)
  device = jax.devices()[0]
  print(f"\nGauss-Newton outer step on a {first['num_params'] / 1e6:.1f} M "
        f"parameter GPT {first['shape']}" if first else "\nno results")
  print(f"device {device.device_kind} ({jax.default_backend()}), jax "
        f"{jax.__version__}; GN inner optimizer Muon, {args.inner_steps} "
        f"inner steps; line search over {mo.DEFAULT_LINESEARCH}")
  print(f"{'mode':<14} {'step ms':>10} {'x adamw':>8} {'peak GB':>8} "
        f"{'x plain':>8} {'XLA GB':>8} {'x plain':>8} {'compile s':>9}")

  def fmt(x, spec):
    return format(x, spec) if x is not None else "n/a".rjust(
        int(spec.split(".")[0]))

  for r in rows:
    if "error" in r:
      print(f"{r['mode']:<14} error")
      continue
    gb = lambda b: None if b is None else b / 1e9
    print(f"{r['mode']:<14} {r['step_s'] * 1e3:10.2f} "
          f"{fmt(r['time_vs_adamw'], '8.2f')} "
          f"{fmt(gb(r['peak_bytes_in_use']), '8.3f')} "
          f"{fmt(r['peak_bytes_in_use_vs_plain'], '8.2f')} "
          f"{fmt(gb(r['compiled_bytes']), '8.3f')} "
          f"{fmt(r['compiled_bytes_vs_plain'], '8.2f')} "
          f"{r['compile_s']:9.1f}")
  if first and first["peak_bytes_in_use"] is None:
    print("note: this back end reports no memory_stats() (CPU): 'peak' is "
          "n/a; 'XLA GB' is the compiled step's arguments + outputs + "
          "temporaries - aliased buffers.")
  result = {"preset": args.preset, "jax": jax.__version__,
            "optax": optax.__version__, "backend": jax.default_backend(),
            "device": device.device_kind, "host": platform.node(),
            "inner_steps": args.inner_steps, "inner_lr": args.inner_lr,
            "linesearch": list(mo.DEFAULT_LINESEARCH), "rows": rows}
  return harness.write_json(result, args.json)


if __name__ == "__main__":
  main()

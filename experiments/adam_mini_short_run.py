"""Adam-mini's short-run advice, measured: one v per value neuron or per matrix.

The authors (Zhang et al., 2024, Adam-mini v1.1.1 notes) advise, for runs
shorter than 10-20 k steps, one v for the whole value matrix, which "can
converge faster initially". This script trains a tiny GPT-2-style model
(fused ``c_attn``, tied ``wte``; the names of Hugging Face's FlaxGPT2) for a
few hundred steps on two synthetic tasks, over several seeds and learning
rates, with:

* ``per-neuron v``: ``mo.AdamMiniRules(head_dim=...)`` (the paper's partition),
* ``whole value``: the same with ``whole_value=True`` (the short-run advice),
* AdamW, for scale.

Tasks (fresh batches every step; held-out evaluation batch):

* ``copy``: 16 random tokens then the same 16 again; the loss is on the
  second half, which needs attention (an induction head).
* ``markov``: a fixed sparse random bigram chain over 32 tokens.

Run (CPU; about 15 minutes at the defaults on 2 shared cores)::

  python experiments/adam_mini_short_run.py --steps 400 --seeds 5

It prints, per task and optimizer, the best learning rate's held-out loss
(mean and standard deviation over seeds), the step at which the mean
training loss first fell below a threshold, and per learning rate the
held-out loss and the training loss averaged over the run (the measure of
"faster initially"), with the per-seed differences between the two
partitions. The README's Adam-mini section quotes one run (400 steps, 5
seeds: 870 s on 2 shared CPU cores): one v per value matrix was no faster.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import microadam_optax as mo

D, HEADS, LAYERS, SEQ, BATCH = 64, 4, 2, 32, 32


def init_params(key, vocab):
  keys = iter(jax.random.split(key, 64))
  normal = lambda *shape, std=0.02: std * jax.random.normal(next(keys), shape)
  zeros = lambda *shape: jnp.zeros(shape)
  ln = lambda: {"scale": jnp.ones(D), "bias": zeros(D)}
  proj_std = 0.02 / math.sqrt(2 * LAYERS)
  block = lambda: {
      "ln_1": ln(),
      "attn": {"c_attn": {"kernel": normal(D, 3 * D), "bias": zeros(3 * D)},
               "c_proj": {"kernel": normal(D, D, std=proj_std),
                          "bias": zeros(D)}},
      "ln_2": ln(),
      "mlp": {"c_fc": {"kernel": normal(D, 4 * D), "bias": zeros(4 * D)},
              "c_proj": {"kernel": normal(4 * D, D, std=proj_std),
                         "bias": zeros(D)}}}
  return {"transformer": {"wte": {"embedding": normal(vocab, D)},
                          "wpe": {"embedding": normal(SEQ, D, std=0.01)},
                          "h": {str(i): block() for i in range(LAYERS)},
                          "ln_f": ln()}}


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def forward(params, tokens):
  t = params["transformer"]
  b, n = tokens.shape
  x = t["wte"]["embedding"][tokens] + t["wpe"]["embedding"][:n]
  hd = D // HEADS
  for i in range(LAYERS):
    h = t["h"][str(i)]
    a = h["attn"]
    qkv = _layer_norm(x, h["ln_1"]) @ a["c_attn"]["kernel"] + a["c_attn"][
        "bias"]
    q, k, v = (y.reshape(b, n, HEADS, hd) for y in jnp.split(qkv, 3, -1))
    att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + att.reshape(b, n, D) @ a["c_proj"]["kernel"] + a["c_proj"]["bias"]
    m = h["mlp"]
    y = jax.nn.gelu(_layer_norm(x, h["ln_2"]) @ m["c_fc"]["kernel"]
                    + m["c_fc"]["bias"])
    x = x + y @ m["c_proj"]["kernel"] + m["c_proj"]["bias"]
  x = _layer_norm(x, t["ln_f"])
  return x @ t["wte"]["embedding"].T  # tied head


class Task:
  """Batches of ``SEQ + 1`` tokens and the positions the loss is taken on."""

  def __init__(self, name, seed):
    self.name = name
    rng = np.random.default_rng(1000 + seed)
    if name == "copy":
      self.vocab = 16
    else:
      self.vocab = 32
      # Each token has 3 likely successors.
      logits = np.full((self.vocab, self.vocab), -6.0)
      for i in range(self.vocab):
        logits[i, rng.choice(self.vocab, 3, replace=False)] = rng.normal(
            1.0, 0.5, 3)
      self.trans = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    self.rng = rng
    self.eval = self.batch(256)

  def batch(self, size=BATCH):
    rng = self.rng
    if self.name == "copy":
      half = (SEQ + 1) // 2 + 1
      first = rng.integers(0, self.vocab, (size, half))
      seq = np.concatenate([first, first], 1)[:, :SEQ + 1]
      weight = np.zeros((size, SEQ), np.float32)
      weight[:, half - 1:] = 1.0  # targets in the repeated half
    else:
      seq = np.empty((size, SEQ + 1), np.int64)
      seq[:, 0] = rng.integers(0, self.vocab, size)
      cum = self.trans.cumsum(1)
      for t in range(SEQ):
        u = rng.random(size)[:, None]
        seq[:, t + 1] = (u > cum[seq[:, t]]).sum(1)
      weight = np.ones((size, SEQ), np.float32)
    return (jnp.asarray(seq[:, :-1]), jnp.asarray(seq[:, 1:]),
            jnp.asarray(weight))


def loss_fn(params, batch):
  tokens, targets, weight = batch
  losses = optax.softmax_cross_entropy_with_integer_labels(
      forward(params, tokens), targets)
  return (losses * weight).sum() / weight.sum()


def make_optimizer(kind, steps):
  """The optimizer at a peak learning rate of 1 (``run`` scales its updates:
  one compilation serves every learning rate)."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, steps // 10, steps,
                                                0.1)
  if kind == "adamw":
    return optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1)
  rules = mo.AdamMiniRules(head_dim=D // HEADS,
                           whole_value=(kind == "whole value"))
  return mo.adam_mini(schedule, b1=0.9, b2=0.95, weight_decay=0.1,
                      partition=rules)


def run(task_name, kind, lrs, seeds, steps):
  """{lr: (training losses [seeds, steps], held-out losses [seeds])}.

  The seeds run side by side (vmap), each with its own initialisation and
  data; the learning rate multiplies the updates (weight decay included, as
  in ``optax.adamw``), so one compiled step serves every rate.
  """
  stack = lambda batches: jax.tree.map(lambda *x: jnp.stack(x), *batches)
  tx = make_optimizer(kind, steps)

  def one(params, state, batch, lr):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    updates = jax.tree.map(lambda u: lr * u, updates)
    return optax.apply_updates(params, updates), state, loss

  step = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None)))
  held_out_fn = jax.jit(jax.vmap(loss_fn))
  out = {}
  for lr in lrs:
    tasks = [Task(task_name, s) for s in range(seeds)]
    vocab = tasks[0].vocab
    params = jax.vmap(lambda k: init_params(k, vocab))(
        jax.vmap(jax.random.key)(jnp.arange(seeds)))
    state = jax.vmap(tx.init)(params)
    losses = []
    for _ in range(steps):
      params, state, loss = step(params, state,
                                 stack([t.batch() for t in tasks]),
                                 jnp.float32(lr))
      losses.append(np.asarray(loss))
    held_out = held_out_fn(params, stack([t.eval for t in tasks]))
    out[lr] = (np.stack(losses, 1), np.asarray(held_out))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--tasks", default="copy,markov")
  parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
  args = parser.parse_args(argv)
  kinds = ("per-neuron v", "whole value", "adamw")
  lrs = [float(x) for x in args.lrs.split(",")]
  start = time.time()
  print(f"{args.steps} steps, seeds 0..{args.seeds - 1}, lrs {lrs}; "
        f"held-out loss at the end (mean +- std over seeds) at each "
        f"optimizer's best lr; 'reach': first step where the seed-mean "
        f"training loss (20-step average) is below the threshold")
  for task in args.tasks.split(","):
    table = {}
    for kind in kinds:
      for lr, result in run(task, kind, lrs, args.seeds, args.steps).items():
        table[kind, lr] = result
    # Threshold: halfway from the first loss to AdamW's best final loss.
    best = {k: min(lrs, key=lambda lr: table[k, lr][1].mean()) for k in kinds}
    first = table["adamw", best["adamw"]][0][:, :5].mean()
    target = 0.5 * (first + table["adamw", best["adamw"]][1].mean())
    print(f"\ntask {task} (reach threshold: loss < {target:.3f})")
    print(f"{'optimizer':<14} {'best lr':>8} {'held-out':>17} {'reach':>6}"
          f"   per lr: held-out / mean training loss over the run")
    for kind in kinds:
      curve, final = table[kind, best[kind]]
      smooth = np.convolve(curve.mean(0), np.ones(20) / 20, "valid")
      below = np.nonzero(smooth < target)[0]
      reach = str(below[0] + 20) if len(below) else "-"
      per_lr = "  ".join(f"{lr:g}: {table[kind, lr][1].mean():.4f} / "
                         f"{table[kind, lr][0].mean():.4f}" for lr in lrs)
      print(f"{kind:<14} {best[kind]:>8g} {final.mean():>9.4f} +- "
            f"{final.std():.4f} {reach:>6}   {per_lr}")
    for lr in lrs:
      held = table["whole value", lr][1] - table["per-neuron v", lr][1]
      area = (table["whole value", lr][0].mean(1)
              - table["per-neuron v", lr][0].mean(1))
      print(f"whole value - per-neuron v at lr {lr:g}, per seed: held-out "
            f"{' '.join(f'{x:+.4f}' for x in held)}; mean training loss "
            f"{' '.join(f'{x:+.4f}' for x in area)}")
  print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
  main()

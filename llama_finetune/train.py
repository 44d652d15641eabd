"""Fine-tunes a Llama checkpoint with any first-order optimizer of the registry.

  python -m llama_finetune --checkpoint DIR --data FILE --optimizer microadam

One optimizer step is ``--accum`` micro-batches of ``--batch`` windows of
``--seq`` tokens (``optax.MultiSteps``); the accumulated gradient is clipped
to global norm ``--clip``, then the optimizer (:func:`optim.build`) applies a
linear-warmup + cosine learning rate (``--lr`` peak, ``--warmup`` steps, down
to 10 % at ``--steps``). Parameters and optimizer state are donated to the
jitted step. Every ``--save-every`` steps (and at the end) the parameters and
the whole optimizer state go to an Orbax checkpoint in ``OUT/checkpoints``;
``--resume`` continues from the latest one, and since batches are functions
of the step (:mod:`data`) the resumed run ends with the parameters of an
uninterrupted one. ``OUT/log.json`` holds the configuration and the loss
curve, ``OUT/loss.png`` its plot; ``--export DIR`` writes the fine-tuned
model back as a Hugging Face checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from microadam_compare import data as compare_data
from microadam_compare import optimizers as registry
from llama_finetune import checkpoint as ckpt_lib
from llama_finetune import data as data_lib
from llama_finetune import model as model_lib
from llama_finetune import optim

FINAL_LR_FRACTION = 0.1


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m llama_finetune",
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  src = p.add_mutually_exclusive_group()
  src.add_argument("--checkpoint", help="a Hugging Face Llama checkpoint "
                   "directory (config.json + *.safetensors)")
  src.add_argument("--preset", choices=sorted(model_lib.PRESETS),
                   help="a randomly initialised model of this size instead")
  p.add_argument("--data", default=None, help="a .jsonl or text file "
                 "(default: the Python standard library's sources)")
  p.add_argument("--text-field", default="text",
                 help="the JSONL field holding the text")
  p.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer "
                 "name or directory (needs transformers); default: bytes")
  p.add_argument("--max-files", type=int, default=None,
                 help="read only this many stdlib files (smoke runs)")
  p.add_argument("--optimizer", default="microadam",
                 choices=[k for k, s in registry.REGISTRY.items()
                          if not s.second_order])
  p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
  p.add_argument("--weight-decay", type=float, default=None,
                 help="default: the optimizer's own")
  p.add_argument("--steps", type=int, default=200, help="optimizer steps")
  p.add_argument("--warmup", type=int, default=20, help="warmup steps")
  p.add_argument("--batch", type=int, default=8, help="windows per micro-batch")
  p.add_argument("--seq", type=int, default=512, help="tokens per window")
  p.add_argument("--accum", type=int, default=1,
                 help="micro-batches per optimizer step")
  p.add_argument("--clip", type=float, default=1.0,
                 help="global-norm clipping of the accumulated gradient "
                 "(0: none)")
  p.add_argument("--param-dtype", default="bfloat16",
                 choices=["bfloat16", "float32"])
  p.add_argument("--layout", default="stacked", choices=model_lib.LAYOUTS)
  p.add_argument("--no-remat", dest="remat", action="store_false",
                 help="keep every layer's activations (faster, more memory)")
  p.add_argument("--seed", type=int, default=0, help="the data seed")
  p.add_argument("--eval-every", type=int, default=50,
                 help="validation loss every this many steps (0: never)")
  p.add_argument("--eval-batches", type=int, default=4)
  p.add_argument("--save-every", type=int, default=100,
                 help="Orbax checkpoint every this many steps")
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in OUT")
  p.add_argument("--stop-after", type=int, default=None,
                 help="stop (checkpointed) after this many steps of the "
                 "schedule of --steps; --resume continues")
  p.add_argument("--out", default="runs/llama_finetune")
  p.add_argument("--export", default=None,
                 help="write the fine-tuned model here as a Hugging Face "
                 "checkpoint")
  p.add_argument("--no-progress", dest="progress", action="store_false")
  return p


def schedule(lr: float, steps: int, warmup: int) -> optax.Schedule:
  """Linear warmup from 0 to ``lr`` over ``warmup`` steps, then a cosine
  decay to ``FINAL_LR_FRACTION * lr`` at ``steps``."""
  warmup = min(max(warmup, 1), max(steps - 1, 1))
  return optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup, max(steps, warmup + 1), end_value=FINAL_LR_FRACTION * lr)


def make_optimizer(args: argparse.Namespace, config: model_lib.LlamaConfig
                   ) -> optax.MultiSteps:
  """Clipping + the registry's optimizer on the schedule, accumulated over
  ``args.accum`` micro-batches."""
  inner = optim.build(args.optimizer,
                      schedule(args.lr, args.steps, args.warmup), config,
                      weight_decay=args.weight_decay)
  if args.clip:
    inner = optax.chain(optax.clip_by_global_norm(args.clip), inner)
  return optax.MultiSteps(inner, every_k_schedule=args.accum)


def make_step(graphdef, tx: optax.GradientTransformation):
  """The jitted micro-step ``(params, state, inputs, targets) -> (params,
  state, loss)``, parameters and state donated."""
  def step(params, opt_state, inputs, targets):
    def loss_fn(p):
      return model_lib.lm_loss(model_lib.apply(graphdef, p, inputs), targets)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1))


def make_eval(graphdef):
  @jax.jit
  def evaluate(params, inputs, targets):
    return jax.lax.map(lambda b: model_lib.lm_loss(
        model_lib.apply(graphdef, params, b[0]), b[1]), (inputs, targets)
                       ).mean()
  return evaluate


def _model(args) -> tuple[model_lib.LlamaConfig, Any, dict]:
  overrides = dict(param_dtype=args.param_dtype, dtype=args.param_dtype,
                   layout=args.layout, remat=args.remat)
  if args.checkpoint:
    return ckpt_lib.load(args.checkpoint, **overrides)
  config = dataclasses.replace(model_lib.PRESETS[args.preset or "tiny"],
                               **overrides)
  graphdef, params = model_lib.init_params(config)
  return config, graphdef, params


def _tokenizer(args):
  if not args.tokenizer:
    return None, None
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  tok = AutoTokenizer.from_pretrained(args.tokenizer)
  return (lambda s: tok.encode(s, add_special_tokens=False)), tok.eos_token_id


def plot_loss(history: list[dict], evals: list[dict], path: str,
              title: str) -> None:
  """The training (and validation) loss against the step, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([h["step"] for h in history], [h["loss"] for h in history],
          label="training")
  if evals:
    ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-",
            label="validation")
  ax.set_xlabel("optimizer step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def train(args: argparse.Namespace) -> dict:
  """Runs (or resumes) the fine-tuning ``args`` describe; returns the log
  (also written to ``OUT/log.json``) with the final ``params``."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if args.accum < 1 or args.steps < 1:
    raise ValueError(f"--accum and --steps must be >= 1, got {args.accum} "
                     f"and {args.steps}.")
  config, graphdef, params = _model(args)
  tokenize, eos = _tokenizer(args)
  streams = data_lib.load_tokens(args.data, text_field=args.text_field,
                                 tokenizer=tokenize, separator_id=eos,
                                 max_files=args.max_files)
  top = int(max(streams.train.max(), streams.val.max()))
  if top >= config.vocab_size:
    raise ValueError(f"token id {top} of {streams.source} is outside the "
                     f"model's vocabulary ({config.vocab_size}).")
  tx = make_optimizer(args, config)
  opt_state = jax.jit(tx.init)(params)
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  manager = ocp.CheckpointManager(
      os.path.join(out, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  log_path = os.path.join(out, "log.json")
  history, evals, start = [], [], 0
  if args.resume and manager.latest_step() is not None:
    start = manager.latest_step()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {"params": params, "opt_state": opt_state})
    restored = manager.restore(start, args=ocp.args.StandardRestore(target))
    params, opt_state = restored["params"], restored["opt_state"]
    with open(log_path, encoding="utf-8") as f:
      old = json.load(f)
    history = [h for h in old["history"] if h["step"] <= start]
    evals = [e for e in old["eval"] if e["step"] <= start]
  step_fn = make_step(graphdef, tx)
  evaluate = make_eval(graphdef)
  eval_data = (compare_data.lm_eval_batches(
      streams.val, args.eval_batches, args.batch, args.seq)
               if args.eval_every else None)
  lr_at = schedule(args.lr, args.steps, args.warmup)
  end = args.steps if args.stop_after is None else min(args.steps,
                                                       args.stop_after)
  log = {"config": {k: v for k, v in vars(args).items()},
         "model": dataclasses.asdict(config),
         "num_params": config.num_params(), "data": streams.source,
         "train_tokens": int(streams.train.size),
         "tokens_per_step": args.batch * args.seq * args.accum,
         "device": str(jax.devices()[0].device_kind),
         "jax": jax.__version__,
         "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}

  def save(step):
    manager.save(step, args=ocp.args.StandardSave(
        {"params": params, "opt_state": opt_state}), force=True)
    manager.wait_until_finished()
    log.update(history=history, eval=evals, last_step=step)
    with open(log_path, "w", encoding="utf-8") as f:
      json.dump(log, f, indent=1)

  bar = None
  if args.progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=end, initial=start, desc=f"{args.optimizer}",
               file=sys.stderr)
  t0 = time.perf_counter()
  for step in range(start, end):
    losses = []
    for micro in range(args.accum):
      inputs, targets = compare_data.lm_batch(
          streams.train, step * args.accum + micro, args.batch, args.seq,
          args.seed)
      params, opt_state, loss = step_fn(params, opt_state, inputs, targets)
      losses.append(loss)
    loss = float(np.mean(jax.device_get(losses)))
    history.append({"step": step + 1, "loss": loss,
                    "lr": float(lr_at(step)),
                    "time_s": time.perf_counter() - t0})
    if args.eval_every and ((step + 1) % args.eval_every == 0
                            or step + 1 == args.steps):
      evals.append({"step": step + 1, "val_loss": float(
          evaluate(params, *eval_data))})
    if bar is not None:
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.3f}")
    if (step + 1) % args.save_every == 0 and step + 1 != end:
      save(step + 1)
  if bar is not None:
    bar.close()
  if end > start or manager.latest_step() is None:
    save(end)
  manager.close()
  if history:
    plot_loss(history, evals, os.path.join(out, "loss.png"),
              f"{args.optimizer} on {os.path.basename(streams.source)}")
  if args.export:
    ckpt_lib.save(args.export, config, jax.device_get(params))
  return dict(log, params=params)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """The command line: parses ``argv`` and runs :func:`train`."""
  return train(build_parser().parse_args(argv))

"""The whole training step of a Llama decoder, measured per optimizer.

One step is the forward pass, the backward pass, the optimizer's update and
``apply_updates`` of a :class:`model.Llama` (bf16 parameters and activations,
stacked-and-scanned or unrolled layers, remat on by default), jitted with the
parameters and the optimizer state donated, on random tokens. Each optimizer
runs in a subprocess of its own, so a peak or an out-of-memory belongs to that
optimizer alone; ``--mem-budget GiB`` sets ``XLA_PYTHON_CLIENT_MEM_FRACTION``
of those subprocesses so that a larger device behaves like one of that size
(78 GiB: an H100's usable memory on an H200).

Reported per size and optimizer: the median step time of ``--steps`` steps
after ``--warmup`` (each synchronised with ``block_until_ready``), tokens/s,
the peak device memory (``memory_stats()["peak_bytes_in_use"]``; on a CPU,
which keeps no such counter, the compiled step's ``memory_analysis()``:
arguments + outputs - aliased + temporaries), the optimizer state's bytes,
and whether it fits (an out-of-memory is a row, not a crash).
``--update layerwise`` measures the layer-by-layer step instead
(:mod:`layerwise`: each layer's update applied inside the backward pass, so
the full gradient buffer never exists). The table ends
with the largest size each optimizer trains. Rows marked "per layer" ran the
optimizer in a loop over the stacked layers (:func:`optim.per_layer`: the
optimizers defined per matrix); on XLA:CPU that loop copies the stacked
gradients and state it carries (the compiled step's temporaries grow by
their size), so ``--layout unrolled`` measures those optimizers without it.

  PYTHONPATH=. python3 benchmarks/train_step.py --sizes llama2-7b \\
      --batch 4 --seq 2048 --mem-budget 78 --json train_step_7b.json
  PYTHONPATH=. python3 benchmarks/train_step.py --tiny     # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

import microadam_optax as mo
from microadam_compare import compare
from llama_finetune import layerwise
from llama_finetune import model as model_lib
from llama_finetune import optim

#: The benchmarked optimizers: row name -> (registry name, dtype its moments
#: are initialised in; None: the parameters' dtype, bf16 here).
OPTIMIZERS: dict[str, tuple[str, Optional[str]]] = {
    "microadam": ("microadam", None),
    "adam_mini": ("adam_mini", None),
    "adamw_bf16": ("adamw", None),
    "adamw_fp32": ("adamw", "float32"),
    "adafactor": ("adafactor", None),
    "galore": ("galore", None),
}

#: Sizes in increasing order (``tiny`` is for CPUs).
SIZES = ("tiny", "llama-1b", "llama2-7b", "llama2-13b")
LEARNING_RATE = 1e-5
GIB = 2**30


def size_config(size: str, layout: str, remat: bool,
                layers: Optional[int] = None) -> model_lib.LlamaConfig:
  """The benchmarked model: the preset ``size`` (bf16), ``layout``,
  ``remat``, optionally with fewer ``layers``."""
  if size not in model_lib.PRESETS:
    raise ValueError(f"size must be one of {sorted(model_lib.PRESETS)}, got "
                     f"{size!r}.")
  config = dataclasses.replace(model_lib.PRESETS[size], layout=layout,
                               remat=remat)
  if layers is not None:
    config = dataclasses.replace(config, num_layers=layers)
  return config


def _is_oom(e: BaseException) -> bool:
  msg = f"{type(e).__name__}: {e}"
  return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()


def make_step(graphdef, tx: optax.GradientTransformation):
  """``jit((params, state, tokens) -> (params, state, loss))``, parameters
  and state donated; the loss is next-token cross-entropy of ``tokens``.
  The update is :func:`microadam_optax.apply_gradients` (MicroAdam's
  parameters updated inside its last kernel on GPU; ``update`` then
  ``optax.apply_updates`` for the others)."""
  def step(params, opt_state, tokens):
    def loss_fn(p):
      logits = model_lib.apply(graphdef, p, tokens[:, :-1])
      return model_lib.lm_loss(logits, tokens[:, 1:])
    loss, grads = jax.value_and_grad(loss_fn)(params)
    params, opt_state = mo.apply_gradients(tx, grads, opt_state, params)
    return params, opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1))


def measure(size: str, optimizer: str, *, batch: int, seq: int, layout: str,
            remat: bool = True, steps: int = 5, warmup: int = 2,
            layers: Optional[int] = None, update: str = "plain") -> dict:
  """Measures one optimizer's whole training step in this process.

  Args:
    size: a key of :data:`model.PRESETS`.
    optimizer: a key of :data:`OPTIMIZERS`.
    batch: sequences per step.
    seq: tokens per sequence (the model sees ``seq``; the targets are the
      next tokens of ``seq + 1`` random ones).
    layout: ``"stacked"`` or ``"unrolled"``.
    remat: recompute each layer in the backward pass.
    steps: timed steps (the median is reported).
    warmup: untimed steps after the first (compiling) call.
    layers: keep only this many decoder layers.
    update: ``"plain"`` (the whole gradient, then the optimizer) or
      ``"layerwise"`` (each layer updated inside the backward pass,
      :mod:`layerwise`; stacked layout).

  Returns:
    A JSON-ready row: ``outcome`` (``"ran"``, ``"out of memory"`` or
    ``"error"``), and for a run ``median_ms``, ``tokens_per_s``,
    ``peak_bytes`` (with ``peak_source``), ``state_bytes``, ...
  """
  config = size_config(size, layout, remat, layers)
  name, moments = OPTIMIZERS[optimizer]
  n = config.num_params()
  row: dict[str, Any] = {
      "size": size, "optimizer": optimizer, "registry_name": name,
      "moments_dtype": moments or config.param_dtype, "layout": layout,
      "update": update,
      "remat": remat, "batch": batch, "seq": seq, "num_layers":
      config.num_layers, "num_params": n,
      "param_bytes": n * jnp.dtype(config.param_dtype).itemsize,
      "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(), "jax": jax.__version__}
  stage = "init"
  try:
    graphdef, params = model_lib.init_params(config, seed=0)
    if update == "layerwise":
      layer_tx = optim.registry_optimizer(name, LEARNING_RATE, config)
      tx = optim.per_layer(layer_tx)
      make = lambda: layerwise.make_layerwise_step(graphdef, config, layer_tx)
    else:
      tx = optim.build(name, LEARNING_RATE, config)
      make = lambda: make_step(graphdef, tx)
    cast = (lambda p: p) if moments is None else (
        lambda p: jax.tree.map(lambda x: x.astype(moments), p))
    # The cast parameters only shape the zeros of the state: XLA drops them.
    state = jax.jit(lambda p: tx.init(cast(p)))(params)
    jax.block_until_ready(state)
    row["state_bytes"] = mo.state_nbytes(state)
    row["per_layer"] = isinstance(state, optim.PerLayerState)
    keys = jax.random.split(jax.random.key(1), 2)
    batches = [jax.random.randint(k, (batch, seq + 1), 0, config.vocab_size,
                                  jnp.int32) for k in keys]
    stage = "compile"
    t0 = time.perf_counter()
    step = make().lower(params, state, batches[0]).compile()
    row["compile_s"] = time.perf_counter() - t0
    compiled_peak = compare._compiled_peak_bytes(step)  # pylint: disable=protected-access
    try:
      row["xla_temp_bytes"] = int(step.memory_analysis().temp_size_in_bytes)
    except Exception:  # pylint: disable=broad-except
      row["xla_temp_bytes"] = None
    stage = "run"
    losses, times = [], []
    for i in range(1 + warmup + steps):
      t0 = time.perf_counter()
      params, state, loss = step(params, state, batches[i % 2])
      jax.block_until_ready((params, state, loss))
      if i > warmup:
        times.append(time.perf_counter() - t0)
      losses.append(float(loss))
    stats = compare._memory_stats() or {}  # pylint: disable=protected-access
    peak = stats.get("peak_bytes_in_use")
    median = statistics.median(times)
    row.update(
        outcome="ran", median_ms=1e3 * median, min_ms=1e3 * min(times),
        times_ms=[1e3 * t for t in times], tokens_per_s=batch * seq / median,
        peak_bytes=int(peak if peak else compiled_peak or 0),
        peak_source="peak_bytes_in_use" if peak else "memory_analysis",
        compiled_peak_bytes=compiled_peak,
        bytes_limit=stats.get("bytes_limit"),
        first_loss=losses[0], last_loss=losses[-1],
        losses_finite=all(map(lambda x: x == x and abs(x) < 1e30, losses)))
    row["peak_bytes_per_param"] = row["peak_bytes"] / n
    del params, state
  except Exception as e:  # pylint: disable=broad-except
    row.update(outcome="out of memory" if _is_oom(e) else "error",
               stage=stage, error=f"{type(e).__name__}: {e}"[:2000])
    stats = compare._memory_stats() or {}  # pylint: disable=protected-access
    row["bytes_limit"] = stats.get("bytes_limit")
  gc.collect()
  return row


def device_bytes() -> Optional[int]:
  """The accelerator's memory in bytes, read by a subprocess that leaves it
  unallocated (so this process never initialises the device); ``None`` on
  CPUs."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
             XLA_PYTHON_CLIENT_MEM_FRACTION="1.0")
  code = ("import jax; d = jax.devices()[0]; s = d.memory_stats() or {}; "
          "print(s.get('bytes_limit', 0) if d.platform != 'cpu' else 0)")
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  value = int(out[-1]) if out else 0
  return value or None


def _subprocess_row(args: argparse.Namespace, size: str, optimizer: str,
                    fraction: Optional[float]) -> dict:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  if fraction is not None:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.4f}"
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "row.json")
    cmd = [sys.executable, "-m", "llama_finetune.train_step", "--one",
           optimizer, "--row-json", out, "--sizes", size,
           "--batch", str(args.batch), "--seq", str(args.seq),
           "--layout", args.layout, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--update", args.update]
    cmd += [] if args.remat else ["--no-remat"]
    cmd += [] if args.layers is None else ["--layers", str(args.layers)]
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                            timeout=args.timeout)
    except subprocess.TimeoutExpired:
      return {"size": size, "optimizer": optimizer, "outcome": "timeout",
              "error": f"no result within {args.timeout} s"}
    if os.path.exists(out):
      with open(out, encoding="utf-8") as f:
        return json.load(f)
    tail = (proc.stderr or proc.stdout or "")[-2000:]
    return {"size": size, "optimizer": optimizer,
            "outcome": "out of memory" if "RESOURCE_EXHAUSTED" in tail
            else "error", "error": f"exit {proc.returncode}: {tail}"}


def largest_trained(rows: Sequence[dict]) -> dict[str, Optional[str]]:
  """Per optimizer, the largest size (in :data:`SIZES` order) it ran."""
  best: dict[str, Optional[str]] = {}
  for r in rows:
    best.setdefault(r["optimizer"], None)
    if r.get("outcome") == "ran":
      cur = best[r["optimizer"]]
      if cur is None or SIZES.index(r["size"]) > SIZES.index(cur):
        best[r["optimizer"]] = r["size"]
  return best


def table(rows: Sequence[dict], budget_gib: Optional[float]) -> str:
  """The result table (per size and optimizer) and the largest size each
  optimizer trains."""
  lines = [f"{'size':<11} {'optimizer':<11} {'step ms':>9} {'tokens/s':>10} "
           f"{'peak GiB':>9} {'B/param':>8} {'state GiB':>9}  fits"]
  for r in rows:
    if r.get("outcome") != "ran":
      lines.append(f"{r['size']:<11} {r['optimizer']:<11} {'-':>9} {'-':>10} "
                   f"{'-':>9} {'-':>8} {'-':>9}  {r.get('outcome', '?')}")
      continue
    peak = r["peak_bytes"] / GIB
    fits = "yes" if budget_gib is None or peak <= budget_gib else (
        "over budget")
    src = "" if r["peak_source"] == "peak_bytes_in_use" else " (compiled)"
    src += (" (layerwise update)" if r.get("update") == "layerwise"
            else " (per layer)" if r.get("per_layer") else "")
    lines.append(
        f"{r['size']:<11} {r['optimizer']:<11} {r['median_ms']:9.1f} "
        f"{r['tokens_per_s']:10.0f} {peak:9.2f} "
        f"{r['peak_bytes_per_param']:8.2f} {r['state_bytes'] / GIB:9.2f}  "
        f"{fits}{src}")
  lines.append("")
  lines.append("largest size trained"
               + (f" within {budget_gib:g} GiB" if budget_gib else "") + ":")
  for opt, size in largest_trained(rows).items():
    lines.append(f"  {opt:<11} {size or 'none'}")
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="llama2-7b",
                 help=f"comma list of {', '.join(SIZES)}")
  p.add_argument("--tiny", action="store_true",
                 help="the tiny size (CPU): same as --sizes tiny")
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                 help=f"comma list of {', '.join(OPTIMIZERS)}")
  p.add_argument("--layout", default="stacked", choices=model_lib.LAYOUTS)
  p.add_argument("--no-remat", dest="remat", action="store_false")
  p.add_argument("--update", default="plain", choices=["plain", "layerwise"],
                 help="layerwise: each layer's update inside the backward "
                 "pass (stacked layout; no full gradient buffer)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--layers", type=int, default=None,
                 help="keep only this many decoder layers")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--mem-budget", type=float, default=None,
                 help="GiB each subprocess may use on the device "
                 "(XLA_PYTHON_CLIENT_MEM_FRACTION)")
  p.add_argument("--in-process", action="store_true",
                 help="measure every row in this process (tests; peaks "
                 "then accumulate)")
  p.add_argument("--timeout", type=float, default=900,
                 help="seconds per subprocess")
  p.add_argument("--json", default=None)
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)
  p.add_argument("--row-json", default=None, help=argparse.SUPPRESS)
  return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Measures every (size, optimizer) pair; prints the table last."""
  args = build_parser().parse_args(argv)
  sizes = ["tiny"] if args.tiny else args.sizes.split(",")
  optimizers = args.optimizers.split(",")
  for o in optimizers:
    if o not in OPTIMIZERS:
      raise ValueError(f"--optimizers: {o!r} is not one of "
                       f"{sorted(OPTIMIZERS)}.")
  for s in sizes:
    if s not in SIZES:
      raise ValueError(f"--sizes: {s!r} is not one of {list(SIZES)}.")
  sizes.sort(key=SIZES.index)
  kw = dict(batch=args.batch, seq=args.seq, layout=args.layout,
            remat=args.remat, steps=args.steps, warmup=args.warmup,
            layers=args.layers, update=args.update)
  if args.one:
    row = measure(sizes[0], args.one, **kw)
    with open(args.row_json, "w", encoding="utf-8") as f:
      json.dump(row, f, indent=1)
    return row
  fraction = None
  total = None if args.in_process else device_bytes()
  if args.mem_budget is not None and total:
    fraction = min(args.mem_budget * GIB / total, 1.0)
  result: dict[str, Any] = {
      "args": vars(args), "sizes": sizes, "device_bytes": total,
      "mem_fraction": fraction,
      "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
      "rows": []}
  for size in sizes:
    for opt in optimizers:
      t0 = time.perf_counter()
      row = (measure(size, opt, **kw) if args.in_process
             else _subprocess_row(args, size, opt, fraction))
      row["wall_s"] = time.perf_counter() - t0
      result["rows"].append(row)
      peak = row.get("peak_bytes")
      print(f"{size} {opt}: {row.get('outcome')}"
            + (f", {row['median_ms']:.1f} ms, peak {peak / GIB:.2f} GiB"
               if row.get("outcome") == "ran" else
               f" ({row.get('error', '')[:160]})")
            + f" [{row['wall_s']:.0f} s]", flush=True)
      if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
          json.dump(result, f, indent=1)
  result["largest_trained"] = largest_trained(result["rows"])
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  print()
  print(table(result["rows"], args.mem_budget))
  return result


if __name__ == "__main__":
  main()

"""The pre-trained GPT of the fine-tuning tasks, made once and cached.

:func:`pretrained_gpt` trains the preset's byte-level GPT with AdamW (b2
0.95, weight decay 0.1, global-norm clipping 1.0, warmup + cosine) on the
standard library's sources *minus* :data:`data.HELD_OUT_PACKAGES`, saves
its parameters with Orbax in a cache directory keyed by everything that
determines them (configuration, corpus files, versions), and loads them on
later calls. The training is deterministic (fixed seed, batches a pure
function of the step), so a cache made elsewhere with the same key holds
the same model up to the floating-point differences between machines.

The cache directory is ``--cache-dir``, else ``$MICROADAM_COMPARE_CACHE``,
else ``~/.cache/microadam_compare``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import optax

from microadam_compare import data
from microadam_compare import models

#: Bumped when the pre-training changes in a way the key does not see.
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """How the fine-tuning tasks' GPT is pre-trained.

  Attributes:
    steps: AdamW steps.
    eval_every: steps between evaluations of the curve.
    learning_rate: peak learning rate (warmup + cosine).
    batch_size: sequences per batch.
    max_files: files of the corpus read (smoke runs); ``None``: all.
    seed: initial parameters and batch order.
  """
  steps: int
  eval_every: int
  learning_rate: float
  batch_size: int
  max_files: Optional[int] = None
  seed: int = 0


#: Per model preset.
PRETRAIN_PRESETS: dict[str, PretrainConfig] = {
    "tiny": PretrainConfig(steps=20, eval_every=10, learning_rate=3e-3,
                           batch_size=4, max_files=40),
    "cpu": PretrainConfig(steps=300, eval_every=50, learning_rate=3e-3,
                          batch_size=8),
    "gpu": PretrainConfig(steps=2000, eval_every=200, learning_rate=6e-4,
                          batch_size=32),
}


def default_cache_dir() -> str:
  """``$MICROADAM_COMPARE_CACHE``, else ``~/.cache/microadam_compare``."""
  return os.environ.get("MICROADAM_COMPARE_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "microadam_compare")


def cache_key(preset: str, config: PretrainConfig) -> dict:
  """Everything the pre-trained parameters depend on."""
  corpus = data.stdlib_corpus(max_files=config.max_files,
                              exclude_packages=data.HELD_OUT_PACKAGES)
  files = hashlib.sha256("\n".join(corpus.train_files).encode()).hexdigest()
  content = hashlib.sha256(corpus.train.tobytes()).hexdigest()
  return {
      "format": FORMAT_VERSION, "preset": preset,
      "model": dataclasses.asdict(models.GPT_PRESETS[preset]),
      "pretrain": dataclasses.asdict(config),
      "optimizer": "adamw b1 0.9 b2 0.95 wd 0.1 clip 1.0 warmup-cosine",
      "held_out_packages": list(data.HELD_OUT_PACKAGES),
      "corpus_files_sha256": files, "corpus_bytes_sha256": content,
      "jax": jax.__version__, "optax": optax.__version__,
  }


def checkpoint_dir(preset: str, cache_dir: Optional[str] = None,
                   config: Optional[PretrainConfig] = None) -> str:
  """The folder of ``preset``'s checkpoint: ``<cache>/pretrained/<preset>-
  <first 16 hex digits of the key's SHA-256>``."""
  config = config or PRETRAIN_PRESETS[preset]
  key = json.dumps(cache_key(preset, config), sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return os.path.join(os.path.abspath(cache_dir or default_cache_dir()),
                      "pretrained", f"{preset}-{digest}")


def _train(preset: str, config: PretrainConfig) -> tuple[dict, dict]:
  # pylint: disable=g-import-not-at-top
  from microadam_compare import compare
  from microadam_compare import optimizers as opt_lib
  from microadam_compare import tasks
  # pylint: enable=g-import-not-at-top
  task = tasks.lm_task(preset, seed=config.seed, batch_size=config.batch_size,
                       max_files=config.max_files, weight_decay=0.1,
                       exclude_packages=data.HELD_OUT_PACKAGES)
  every = min(config.eval_every, config.steps)
  runner = compare._Runner(  # pylint: disable=protected-access
      task, opt_lib.get("adamw"), compare.make_eval(task),
      jax.tree.map(jax.numpy.asarray, task.eval_batches), every, 1.0)
  steps = -(-config.steps // every) * every
  runner.compile(config.learning_rate, steps)
  t0 = time.perf_counter()
  record = runner.run(task, config.learning_rate, steps, keep_params=True)
  params = jax.tree.map(np.asarray, record.pop("params"))
  curve = {k: record[k] for k in ("steps", "val_loss", "val_acc", "time_s")}
  curve["train_s"] = time.perf_counter() - t0
  curve["compile_s"] = runner.compile_s
  curve["description"] = task.description
  curve["num_params"] = task.num_params
  return params, curve


def pretrained_gpt(preset: str = "cpu", *, cache_dir: Optional[str] = None,
                   config: Optional[PretrainConfig] = None,
                   log: Optional[Callable[[str], None]] = None
                   ) -> tuple[dict, dict]:
  """The pre-trained GPT of ``preset``: loaded from the cache, or trained
  and saved there on first use.

  Args:
    preset: a key of :data:`models.GPT_PRESETS` (and
      :data:`PRETRAIN_PRESETS`).
    cache_dir: the cache's root (``None``: :func:`default_cache_dir`).
    config: replaces the preset's :class:`PretrainConfig`.
    log: where to say what happens (``None``: silent).

  Returns:
    ``(params, info)``: the parameters (a pure ``dict`` of NumPy arrays, the
    :class:`models.GPT`'s) and a JSON-ready ``dict`` with the key, the
    curve (``steps``, ``val_loss`` on the pre-training validation files),
    ``path`` and ``cached`` (whether it was loaded).
  """
  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp
  from flax import nnx
  # pylint: enable=g-import-not-at-top
  config = config or PRETRAIN_PRESETS[preset]
  path = checkpoint_dir(preset, cache_dir, config)
  info_path = os.path.join(path, "info.json")
  graph_model = models.GPT(models.GPT_PRESETS[preset], rngs=nnx.Rngs(0))
  _, template = models.split_params(graph_model)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          template)
  checkpointer = ocp.StandardCheckpointer()
  if os.path.exists(info_path):
    with open(info_path, encoding="utf-8") as f:
      info = json.load(f)
    params = checkpointer.restore(os.path.join(path, "params"), abstract)
    params = jax.tree.map(np.asarray, params)
    if log is not None:
      log(f"pre-trained GPT ({preset}) loaded from {path}")
    return params, dict(info, path=path, cached=True)
  if log is not None:
    log(f"pre-training the {preset} GPT with AdamW for {config.steps} steps "
        f"(once; cached in {path}) ...")
  params, curve = _train(preset, config)
  tmp = path + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  checkpointer.save(os.path.join(tmp, "params"), params)
  checkpointer.wait_until_finished()
  info = {"key": cache_key(preset, config), **curve}
  with open(os.path.join(tmp, "info.json"), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=1)
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)  # complete checkpoints only: info.json is the mark
  if log is not None:
    log(f"pre-trained GPT ({preset}): validation loss "
        f"{curve['val_loss'][0]:.3f} -> {curve['val_loss'][-1]:.3f} in "
        f"{curve['train_s']:.0f} s")
  return params, dict(info, path=path, cached=False)

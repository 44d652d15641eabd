"""The training problems of the comparison, as pure functions of params.

A :class:`Task` bundles data, a Flax NNX model split into a graph definition
and a parameter ``dict``, and the functions a training step needs:
``apply(params, inputs) -> outputs`` (the model on a batch),
``loss(outputs, targets) -> scalar`` (batch mean) and
``accuracy(outputs, targets)``. Every optimizer -- first-order ones through
``jax.grad`` of ``loss(apply(params, x), y)``, Gauss-Newton through
``model_fn = lambda p, batch: apply(p, batch[0])`` and ``loss_fn = lambda
z, batch: loss(z, batch[1])``, a fresh ``batch = (x, y)`` per inner step --
uses these same functions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from microadam_compare import data
from microadam_compare import models
from microadam_compare.optimizers import OptimizerContext

Batch = tuple[np.ndarray, np.ndarray]

#: Per model preset: sequences (LM) or images (digits) per training batch.
LM_BATCH_SIZE = {"tiny": 4, "cpu": 8, "gpu": 32}
DIGITS_BATCH_SIZE = {"tiny": 32, "cpu": 64, "gpu": 128}
#: Per model preset: evaluation batches of the LM validation set.
LM_EVAL_BATCHES = {"tiny": 2, "cpu": 10, "gpu": 16}
#: Per model preset: fine-tuning batch size and evaluation batches. The gpu
#: preset's 300 steps of 8 x 512 bytes read the held-out packages' training
#: files about once (1.2 MB on CPython 3.12): at 32 sequences a batch (four
#: passes) the 86 M-parameter GPT overfit them, its validation loss rose with
#: the rate and every optimizer's best rate fell to the bottom of its grid
#: (H200, 2026-12-01; benchmarks/RESULTS.md).
FINETUNE_BATCH_SIZE = {"tiny": 4, "cpu": 8, "gpu": 8}
FINETUNE_EVAL_BATCHES = {"tiny": 2, "cpu": 10, "gpu": 16}
#: Per model preset: files read per held-out package (``None``: all).
FINETUNE_MAX_FILES = {"tiny": 3, "cpu": None, "gpu": None}


@dataclasses.dataclass(frozen=True)
class Task:
  """A model, its data and its loss.

  Attributes:
    name: ``"lm"``, ``"digits"``, ``"finetune"`` or ``"finetune_cls"``.
    description: one line for reports.
    graphdef: the model's ``nnx.GraphDef``.
    init_params: the initial parameters (pure ``dict`` of NumPy arrays, so
      that every run starts from a fresh copy).
    apply: ``(params, inputs) -> outputs``.
    loss: ``(outputs, targets) -> scalar``, the batch-mean loss.
    accuracy: ``(outputs, targets) -> scalar``.
    train_batches: ``(start_step, num_steps) -> (inputs, targets)`` stacked
      over ``num_steps``; a pure function of the step indices and the seed.
    eval_batches: fixed validation batches, stacked.
    context: what the optimizers need to know about the model.
    loss_unit: how the loss is measured, for labels.
    metadata: sizes and counts for the report.
    with_seed: ``with_seed(seed=s) -> Task``, the same task with another seed's initial
      parameters and batch order (``None``: cannot be re-made).
  """
  name: str
  description: str
  graphdef: Any
  init_params: dict
  apply: Callable[[Any, Any], Any]
  loss: Callable[[Any, Any], jax.Array]
  accuracy: Callable[[Any, Any], jax.Array]
  train_batches: Callable[[int, int], Batch]
  eval_batches: Batch
  context: OptimizerContext
  loss_unit: str
  metadata: dict
  with_seed: Optional[Callable[[int], "Task"]] = None

  @property
  def num_params(self) -> int:
    """Number of scalar parameters of the model."""
    return models.num_params(self.init_params)


def _as_numpy(params: Any) -> Any:
  return jax.tree.map(np.asarray, params)


def _apply_fn(graphdef: Any) -> Callable[[Any, Any], Any]:
  def apply(params, inputs):
    return models.merge_params(graphdef, params)(inputs)
  return apply


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy (nats) over every position of the batch."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets).mean()


def accuracy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Share of positions whose arg-max logit is the target."""
  return jnp.mean(jnp.argmax(logits, -1) == targets)


def lm_task(preset: str = "cpu", *, seed: int = 0,
            batch_size: Optional[int] = None, max_files: Optional[int] = None,
            eval_batches: Optional[int] = None, gn_inner_steps: int = 10,
            weight_decay: Optional[float] = None,
            exclude_packages: tuple[str, ...] = (),
            dtype: Optional[str] = None) -> Task:
  """Byte-level language modelling of the standard library's sources.

  Args:
    preset: model size, a key of :data:`models.GPT_PRESETS`.
    seed: seeds the parameters and the order of the training batches.
    batch_size: sequences per batch; ``None``: :data:`LM_BATCH_SIZE`.
    max_files: read only this many files (smoke runs); ``None``: all.
    eval_batches: validation batches; ``None``: :data:`LM_EVAL_BATCHES`.
    gn_inner_steps: Gauss-Newton inner steps.
    weight_decay: decoupled weight decay of every optimizer (``None``: each
      optimizer's own).
    exclude_packages: top-level packages left out of the corpus (the
      pre-training of the fine-tuning tasks).
    dtype: the model's compute dtype (:attr:`models.GPTConfig.dtype`);
      ``None``: the preset's.

  Returns:
    A :class:`Task`.
  """
  config = models.GPT_PRESETS[preset]
  if dtype is not None:
    config = dataclasses.replace(config, dtype=dtype)
  batch_size = batch_size or LM_BATCH_SIZE[preset]
  corpus = data.stdlib_corpus(max_files=max_files,
                              exclude_packages=tuple(exclude_packages))
  model = models.GPT(config, rngs=nnx.Rngs(seed))
  graphdef, params = models.split_params(model)
  seq = config.seq_len

  def train_batches(start, num):
    return data.lm_batches(corpus.train, start, num, batch_size, seq, seed)

  evals = data.lm_eval_batches(
      corpus.val, eval_batches or LM_EVAL_BATCHES[preset], batch_size, seq)
  context = _gpt_context(config, gn_inner_steps, weight_decay)
  return Task(
      name="lm",
      description=(f"byte-level GPT on the Python stdlib sources ({preset}: "
                   f"d={config.d_model}, {config.num_layers} layers, "
                   f"context {seq}, batch {batch_size}"
                   + ("" if config.dtype == "float32" else f", {config.dtype}")
                   + ")"),
      graphdef=graphdef, init_params=_as_numpy(params),
      apply=_apply_fn(graphdef), loss=cross_entropy, accuracy=accuracy,
      train_batches=train_batches, eval_batches=evals, context=context,
      loss_unit="nats/byte",
      metadata={
          "preset": preset, "model": dataclasses.asdict(config),
          "batch_size": batch_size, "tokens_per_step": batch_size * seq,
          "train_files": len(corpus.train_files),
          "val_files": len(corpus.val_files),
          "train_bytes": int(corpus.train.size),
          "val_bytes": int(corpus.val.size),
          "eval_tokens": int(evals[0].size), "corpus_root": corpus.root,
          "seed": seed,
      },
      with_seed=functools.partial(
          lm_task, preset, batch_size=batch_size, max_files=max_files,
          eval_batches=eval_batches, gn_inner_steps=gn_inner_steps,
          weight_decay=weight_decay, exclude_packages=exclude_packages,
          dtype=dtype))


def digits_task(preset: str = "cpu", *, seed: int = 0,
                batch_size: Optional[int] = None, gn_inner_steps: int = 10,
                weight_decay: Optional[float] = None) -> Task:
  """Classification of scikit-learn's 8x8 digits with a small CNN.

  Args:
    preset: model size, a key of :data:`models.CNN_PRESETS`.
    seed: seeds the parameters and the order of the training batches.
    batch_size: images per batch; ``None``: :data:`DIGITS_BATCH_SIZE`.
    gn_inner_steps: Gauss-Newton inner steps.
    weight_decay: decoupled weight decay of every optimizer (``None``: each
      optimizer's own).

  Returns:
    A :class:`Task` whose validation set is the whole held-out split.
  """
  config = models.CNN_PRESETS[preset]
  batch_size = batch_size or DIGITS_BATCH_SIZE[preset]
  dataset = data.digits_dataset()
  model = models.DigitsCNN(config, rngs=nnx.Rngs(seed))
  graphdef, params = models.split_params(model)

  def train_batches(start, num):
    return data.image_batches(dataset, start, num, batch_size, seed)

  evals = (dataset.x_val[None], dataset.y_val[None])
  context = OptimizerContext(
      weight_decay=weight_decay, head_dim=None, gn_layers=None,
      gn_inner_steps=gn_inner_steps, galore_rank=max(4, config.hidden // 8))
  return Task(
      name="digits",
      description=(f"CNN on sklearn 8x8 digits ({preset}: channels "
                   f"{config.channels}, hidden {config.hidden}, batch "
                   f"{batch_size})"),
      graphdef=graphdef, init_params=_as_numpy(params),
      apply=_apply_fn(graphdef), loss=cross_entropy, accuracy=accuracy,
      train_batches=train_batches, eval_batches=evals, context=context,
      loss_unit="nats",
      metadata={
          "preset": preset, "model": dataclasses.asdict(config),
          "batch_size": batch_size, "train_images": int(dataset.y_train.size),
          "val_images": int(dataset.y_val.size), "seed": seed,
      },
      with_seed=functools.partial(
          digits_task, preset, batch_size=batch_size,
          gn_inner_steps=gn_inner_steps, weight_decay=weight_decay))


def _gpt_context(config: models.GPTConfig, gn_inner_steps: int,
                 weight_decay: Optional[float]) -> OptimizerContext:
  return OptimizerContext(
      weight_decay=weight_decay, head_dim=config.head_dim,
      gn_layers=models.gpt_layer_id, gn_inner_steps=gn_inner_steps,
      galore_rank=max(4, config.d_model // 4))


def finetune_task(preset: str = "cpu", *, seed: int = 0,
                  batch_size: Optional[int] = None, gn_inner_steps: int = 10,
                  weight_decay: Optional[float] = None,
                  cache_dir: Optional[str] = None,
                  log: Optional[Callable[[str], None]] = None) -> Task:
  """Fine-tuning a pre-trained byte-level GPT on held-out packages.

  The GPT of :func:`pretrain.pretrained_gpt` (AdamW on the standard library
  minus :data:`data.HELD_OUT_PACKAGES`, made on first use and cached) is
  trained further on those packages' training files and evaluated on their
  validation files: a domain shift, every optimizer starting from the same
  pre-trained weights.

  Args:
    preset: model size (the pre-trained model's).
    seed: seeds the order of the training batches (the initial parameters
      are the pre-trained ones for every seed).
    batch_size: sequences per batch; ``None``: :data:`FINETUNE_BATCH_SIZE`.
    gn_inner_steps: Gauss-Newton inner steps.
    weight_decay: decoupled weight decay (``None``: each optimizer's own).
    cache_dir: where the pre-trained checkpoint lives.
    log: where to say that the checkpoint is being made.

  Returns:
    A :class:`Task` named ``"finetune"``; its metadata carries the
    pre-training run (``pretrain``: configuration, curve, cache path).
  """
  from microadam_compare import pretrain  # pylint: disable=g-import-not-at-top
  config = models.GPT_PRESETS[preset]
  batch_size = batch_size or FINETUNE_BATCH_SIZE[preset]
  params, info = pretrain.pretrained_gpt(preset, cache_dir=cache_dir, log=log)
  graphdef, _ = models.split_params(models.GPT(config, rngs=nnx.Rngs(0)))
  corpus = data.package_corpus(max_files_per_package=FINETUNE_MAX_FILES[preset])
  train = data.concatenate(corpus.train)
  val = data.concatenate(corpus.val)
  seq = config.seq_len

  def train_batches(start, num):
    return data.lm_batches(train, start, num, batch_size, seq, seed)

  evals = data.lm_eval_batches(val, FINETUNE_EVAL_BATCHES[preset], batch_size,
                               seq)
  return Task(
      name="finetune",
      description=(f"pre-trained byte-level GPT ({preset}: d={config.d_model},"
                   f" {config.num_layers} layers) fine-tuned on held-out "
                   f"packages {', '.join(corpus.packages)} (batch "
                   f"{batch_size})"),
      graphdef=graphdef, init_params=params, apply=_apply_fn(graphdef),
      loss=cross_entropy, accuracy=accuracy, train_batches=train_batches,
      eval_batches=evals,
      context=_gpt_context(config, gn_inner_steps, weight_decay),
      loss_unit="nats/byte",
      metadata={
          "preset": preset, "model": dataclasses.asdict(config),
          "batch_size": batch_size, "tokens_per_step": batch_size * seq,
          "packages": list(corpus.packages),
          "train_bytes": int(train.size), "val_bytes": int(val.size),
          "eval_tokens": int(evals[0].size), "seed": seed, "pretrain": info,
      },
      with_seed=functools.partial(
          finetune_task, preset, batch_size=batch_size,
          gn_inner_steps=gn_inner_steps, weight_decay=weight_decay,
          cache_dir=cache_dir))


def classify_task(preset: str = "cpu", *, seed: int = 0,
                  batch_size: Optional[int] = None, gn_inner_steps: int = 10,
                  weight_decay: Optional[float] = None,
                  cache_dir: Optional[str] = None,
                  log: Optional[Callable[[str], None]] = None) -> Task:
  """Sequence classification on the pre-trained backbone: which held-out
  package a window of source comes from.

  A :class:`models.GPTClassifier` whose backbone is the pre-trained GPT's
  (:func:`finetune_task`) and whose head (``output``, on the mean hidden
  state) is fresh; every parameter is trained, the GLUE-like regime.

  Args:
    preset: model size (the pre-trained model's).
    seed: seeds the head and the order of the training batches.
    batch_size: windows per batch; ``None``: :data:`FINETUNE_BATCH_SIZE`.
    gn_inner_steps: Gauss-Newton inner steps.
    weight_decay: decoupled weight decay (``None``: each optimizer's own).
    cache_dir: where the pre-trained checkpoint lives.
    log: where to say that the checkpoint is being made.

  Returns:
    A :class:`Task` named ``"finetune_cls"`` (class-balanced validation
    windows from the packages' validation files).
  """
  from microadam_compare import pretrain  # pylint: disable=g-import-not-at-top
  config = models.GPT_PRESETS[preset]
  batch_size = batch_size or FINETUNE_BATCH_SIZE[preset]
  backbone, info = pretrain.pretrained_gpt(preset, cache_dir=cache_dir,
                                           log=log)
  corpus = data.package_corpus(max_files_per_package=FINETUNE_MAX_FILES[preset])
  num_classes = len(corpus.packages)
  model = models.GPTClassifier(config, num_classes, rngs=nnx.Rngs(seed))
  graphdef, params = models.split_params(model)
  params = _as_numpy(params)
  for key in models.BACKBONE:
    params[key] = backbone[key]
  seq = config.seq_len

  def train_batches(start, num):
    return data.package_batches(corpus.train, start, num, batch_size, seq,
                                seed)

  evals = data.package_eval_batches(corpus.val, FINETUNE_EVAL_BATCHES[preset],
                                    batch_size, seq)
  return Task(
      name="finetune_cls",
      description=(f"pre-trained GPT backbone ({preset}) + fresh head: which "
                   f"of {num_classes} held-out packages a {seq}-byte window "
                   f"comes from (batch {batch_size})"),
      graphdef=graphdef, init_params=params, apply=_apply_fn(graphdef),
      loss=cross_entropy, accuracy=accuracy, train_batches=train_batches,
      eval_batches=evals,
      context=_gpt_context(config, gn_inner_steps, weight_decay),
      loss_unit="nats",
      metadata={
          "preset": preset, "model": dataclasses.asdict(config),
          "batch_size": batch_size, "packages": list(corpus.packages),
          "num_classes": num_classes, "eval_windows": int(evals[1].size),
          "seed": seed, "pretrain": info,
      },
      with_seed=functools.partial(
          classify_task, preset, batch_size=batch_size,
          gn_inner_steps=gn_inner_steps, weight_decay=weight_decay,
          cache_dir=cache_dir))


#: Task factories by name.
TASKS: dict[str, Callable[..., Task]] = {
    "lm": lm_task, "digits": digits_task, "finetune": finetune_task,
    "finetune_cls": classify_task}

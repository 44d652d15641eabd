"""The optimizers of the comparison, as a registry of named builders.

Each :class:`OptimizerSpec` builds an Optax transformation from a learning
rate (a float, a traced scalar or a schedule) and an
:class:`OptimizerContext` (what a builder needs to know about the model).
Optimizers whose code is missing from the installed ``optax`` or from
``microadam_optax`` stay in the registry but report why they cannot run
(:func:`unavailable_reason`), so a comparison can skip them with a clear
message instead of failing halfway.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import optax

import microadam_optax as mo

#: Names of parameters that Muon and GaLore leave to Adam although they are
#: matrices: embeddings and output heads (as the authors of both do).
NON_HIDDEN_PATTERN = re.compile(
    r"(^|/)(embed|pos_embed|wte|wpe|lm_head|output)(/|$)")


def _path_str(path: Sequence[Any]) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def is_hidden_matrix(path: Sequence[Any], leaf: Any) -> bool:
  """Whether a parameter is a hidden-layer matrix (2-D, not an embedding or
  an output head): the leaves Muon orthogonalizes and GaLore projects."""
  return getattr(leaf, "ndim", 0) == 2 and not NON_HIDDEN_PATTERN.search(
      _path_str(path))


def decay_mask(params: Any) -> Any:
  """Weight decay on parameters of rank >= 2 only (no biases, no norms)."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


@dataclasses.dataclass(frozen=True)
class OptimizerContext:
  """What builders may need to know about the model and the run.

  Attributes:
    weight_decay: decoupled weight decay (on matrices only, see
      :func:`decay_mask`); ``None``: each optimizer's own
      (:attr:`OptimizerSpec.weight_decay`, its authors' recommendation).
    head_dim: attention head width, for Adam-mini's one-v-per-head rule on
      2-D query/key kernels; ``None`` for models without attention.
    gn_layers: the ``layers`` argument of ``mo.gauss_newton`` (layerwise).
    gn_inner_steps: inner steps per Gauss-Newton outer step (in the
      comparison each on a fresh training batch).
    galore_rank: rank of GaLore's projection.
    galore_update_proj_gap: steps between GaLore's SVDs (the authors' 200).
  """
  weight_decay: Optional[float] = None
  head_dim: Optional[int] = None
  gn_layers: Any = None
  gn_inner_steps: int = 10
  galore_rank: int = 32
  galore_update_proj_gap: int = 200

  def decay(self, default: float) -> float:
    """The weight decay to use: the context's, else ``default``."""
    return default if self.weight_decay is None else self.weight_decay


Builder = Callable[[optax.ScalarOrSchedule, OptimizerContext],
                   optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """A named optimizer of the comparison.

  Attributes:
    name: registry key (``--optimizers`` value).
    label: how plots and tables call it.
    build: ``(learning_rate, context) -> GradientTransformation``.
    lr_grid: learning rates tried by the sweep (for Gauss-Newton: of the
      inner optimizer).
    task_lr_grids: per task name, a grid replacing ``lr_grid`` (see
      :meth:`grid_for`).
    requires: the attribute path the builder needs (``"mo.adam_mini"``,
      ``"optax.contrib.galore"``), checked by :func:`unavailable_reason`.
    second_order: a Gauss-Newton optimizer: its ``update`` takes
      ``model_fn``/``loss_fn`` instead of gradients, and one step is one outer
      iteration.
    note: one line on the configuration (the authors' recommended
      hyper-parameters it uses), for the report.
    weight_decay: the decoupled weight decay its authors recommend (used
      unless ``--weight-decay`` overrides it).
    inner: for a Gauss-Newton optimizer that re-makes its inner optimizer
      in every outer step, the builder of that inner optimizer, whose state
      exists during each outer step (reported as transient state). ``None``
      when the inner state is kept across outer steps (the registry's
      entries): it is then part of the reported state.
  """
  name: str
  label: str
  build: Builder
  lr_grid: tuple[float, ...]
  requires: str
  second_order: bool = False
  note: str = ""
  task_lr_grids: Mapping[str, tuple[float, ...]] = dataclasses.field(
      default_factory=dict)
  weight_decay: float = 0.0
  inner: Optional[Builder] = None

  def grid_for(self, task: Optional[str] = None) -> tuple[float, ...]:
    """The learning-rate grid for ``task`` (``None``: the default grid)."""
    return tuple(self.task_lr_grids.get(task, self.lr_grid))


def _resolve(requires: str) -> Any:
  root, *attrs = requires.split(".")
  obj = {"mo": mo, "optax": optax}[root]
  for attr in attrs:
    if obj is optax and attr == "contrib":
      obj = importlib.import_module("optax.contrib")
    else:
      obj = getattr(obj, attr)
  return obj


def unavailable_reason(spec: OptimizerSpec) -> Optional[str]:
  """Why ``spec`` cannot run here (``None`` when it can).

  Example:
    >>> from microadam_compare import optimizers
    >>> optimizers.unavailable_reason(optimizers.REGISTRY["adamw"]) is None
    True
  """
  try:
    _resolve(spec.requires)
  except AttributeError:
    where = ("microadam_optax (not exported by microadam_optax/__init__.py)"
             if spec.requires.startswith("mo.")
             else f"the installed optax {optax.__version__}")
    return f"{spec.requires} is not available in {where}."
  return None


# ---------------------------------------------------------------------------
# Builders.


def _adamw(lr, ctx):
  # GPT-2/3 recipe (Radford et al.; Brown et al.): b2 0.95, weight decay 0.1.
  return optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8,
                     weight_decay=ctx.decay(0.1), mask=decay_mask)


def _microadam(lr, ctx):
  # The authors' defaults (ISTA-DASLab/MicroAdam): betas (0.9, 0.999),
  # eps 1e-8, m = 10 gradients, 1 % density, no weight decay.
  return mo.microadam(lr, b1=0.9, b2=0.999, eps=1e-8,
                      weight_decay=ctx.decay(0.0), mask=decay_mask, window=10,
                      density=0.01)


def _adam_mini(lr, ctx, whole_value: bool = False):
  # The authors' GPT-2 recipe: AdamW's (b2 0.95, weight decay 0.1), with one v
  # per attention head of the 2-D query/key kernels (without head_dim they
  # would get one v per column); whole_value: one v per value matrix, the
  # authors' advice for runs under 10-20 k steps.
  partition = (None if ctx.head_dim is None and not whole_value
               else mo.AdamMiniRules(head_dim=ctx.head_dim,
                                     whole_value=whole_value))
  return mo.adam_mini(lr, b1=0.9, b2=0.95, weight_decay=ctx.decay(0.1),
                      partition=partition)


def _adafactor(lr, ctx):
  # Shazeer & Stern's defaults as optax has them (decay 0.8, update clipping
  # 1.0, relative step scaled by the parameter's RMS, no momentum, no weight
  # decay); matrices from 32 rows factored (the small models' widths).
  wd = ctx.decay(0.0)
  return optax.adafactor(lr, min_dim_size_to_factor=32,
                         weight_decay_rate=wd or None,
                         weight_decay_mask=decay_mask)


def _hidden_matrices(make: Callable[[], Any]) -> Callable[[Any], Any]:
  def dims(params):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: make() if is_hidden_matrix(p, x) else None, params)
  return dims


def _galore(lr, ctx):
  # The authors' pre-training recipe: rank d/4, SVD every 200 steps, scale
  # 0.25, Adam inside, no weight decay.
  contrib = importlib.import_module("optax.contrib")
  return contrib.galore(
      lr, rank=ctx.galore_rank, update_proj_gap=ctx.galore_update_proj_gap,
      scale=0.25, weight_decay=ctx.decay(0.0), mask=decay_mask,
      weight_dimension_numbers=_hidden_matrices(contrib.GaLoreDimensionNumbers))


def _muon(lr, ctx):
  # Moonlight's recipe (Liu et al. 2025): Nesterov momentum 0.95, 5
  # Newton-Schulz steps, update RMS matched to AdamW's (0.2) so that AdamW's
  # rate and weight decay (0.1) transfer; AdamW on embeddings, head, norms.
  contrib = importlib.import_module("optax.contrib")
  wd = ctx.decay(0.1)
  return contrib.muon(
      lr, beta=0.95, nesterov=True, weight_decay=wd, adam_weight_decay=wd,
      adam_b2=0.95,
      muon_weight_dimension_numbers=_hidden_matrices(
          contrib.MuonDimensionNumbers),
      consistent_rms=0.2)


def _gn_inner(lr, ctx):
  # The paper's inner optimizer: Muon on the hidden matrices, Adam on the
  # rest, no weight decay (the inner problem is the Gauss-Newton model).
  return _muon(lr, dataclasses.replace(ctx, weight_decay=0.0))


def _gauss_newton(layerwise: bool) -> Builder:
  # The paper's protocol (natalieabreu/full-gauss-newton): the inner state
  # (so one schedule over every inner step of the run, given as ``lr``) and
  # the inner iterate persist across outer steps, and the line search keeps
  # the best of the step sizes 1/sqrt(2)^i, i < 5. The comparison feeds each
  # inner step a fresh batch and the line search batches of its own.
  def build(lr, ctx):
    return mo.gauss_newton(
        _gn_inner(lr, ctx), inner_steps=ctx.gn_inner_steps,
        layerwise=layerwise, variant="gn", linesearch=mo.SQRT2_LINESEARCH,
        damping=0.0, carry_inner_state=True, carry_inner_iterate=True,
        **({"layers": ctx.gn_layers} if layerwise else {}))
  return build


#: Every optimizer the comparison knows, in the order of its tables, with
#: its authors' recommended hyper-parameters (``note``) and the first grid
#: of its tuning: three rates, half a decade apart, centred on the rates
#: that won the full-length tuning of the CPU defaults (the table in
#: benchmarks/RESULTS.md lists every rate tried; Gauss-Newton's, of its inner
#: Muon, re-centred for the paper's protocol, where its inner loop trains on
#: fresh batches like a first-order run). The tuning extends
#: a grid by half-decades while its best rate is at an end
#: (:class:`compare.RunConfig`'s ``max_grid_extensions``). MicroAdam's update
#: is larger than Adam's for the same rate (about 4-6x once the window is
#: full: its bias correction spans t steps, its window only m), so its grid
#: sits lower; GaLore's scale 0.25 puts its grid higher. Adam-mini's grids
#: are AdamW's (its authors use AdamW's rates): on the gpu preset's
#: classifier a grid from 1e-3 up failed at every rate and its tuning, led
#: by noise among failed runs, grew upwards (benchmarks/RESULTS.md).
_FINETUNE = "finetune"
_CLASSIFY = "finetune_cls"

#: How many half-decades the tuning may add to a grid whose best rate is at
#: an end (:class:`compare.RunConfig`, ``--max-grid-extensions``): three
#: decades. The grids above are centred on the CPU preset's winners; a run far
#: from it moves a sparse optimizer's best rate much further than a dense
#: one's. On the tiny preset at 40 steps (a 42 k-parameter GPT) MicroAdam's
#: best lm rate is 1e-1 against 1e-3 on the CPU preset (AdamW's moves half a
#: decade, to 1e-2): with 1 % of each block's entries chosen per step, most
#: entries are chosen a handful of times in 40 steps, and a larger rate makes
#: up for it. Reaching that rate and seeing one beyond it takes four
#: extensions (GaLore's fine-tuning rate four, Gauss-Newton's classifier rate
#: three), so the former cap of two reported grid-edge winners. Extensions
#: run only while the best rate is at an end, one run each.
MAX_GRID_EXTENSIONS = 6

REGISTRY: dict[str, OptimizerSpec] = {s.name: s for s in (
    OptimizerSpec("adamw", "AdamW", _adamw, (3e-4, 1e-3, 3e-3),
                  "optax.adamw", weight_decay=0.1,
                  note="b1 0.9, b2 0.95, wd 0.1 (GPT-2/3)",
                  task_lr_grids={"digits": (1e-2, 3e-2, 1e-1),
                                 _FINETUNE: (3e-4, 1e-3, 3e-3),
                                 _CLASSIFY: (3e-4, 1e-3, 3e-3)}),
    OptimizerSpec("microadam", "MicroAdam", _microadam, (3e-4, 1e-3, 3e-3),
                  "mo.microadam",
                  note="b2 0.999, m 10, density 1 %, wd 0 (authors')",
                  task_lr_grids={"digits": (1e-2, 3e-2, 1e-1),
                                 _FINETUNE: (3e-4, 1e-3, 3e-3),
                                 _CLASSIFY: (1e-3, 3e-3, 1e-2)}),
    OptimizerSpec("adam_mini", "Adam-mini", _adam_mini, (3e-4, 1e-3, 3e-3),
                  "mo.adam_mini", weight_decay=0.1,
                  note="b2 0.95, wd 0.1, one v per head (authors' GPT-2)",
                  task_lr_grids={"digits": (1e-2, 3e-2, 1e-1),
                                 _FINETUNE: (3e-4, 1e-3, 3e-3),
                                 _CLASSIFY: (3e-4, 1e-3, 3e-3)}),
    OptimizerSpec("adafactor", "Adafactor", _adafactor, (1e-2, 3e-2, 1e-1),
                  "optax.adafactor",
                  note="decay 0.8, clip 1, parameter scale (authors')",
                  task_lr_grids={"digits": (3e-2, 1e-1, 3e-1),
                                 _FINETUNE: (1e-2, 3e-2, 1e-1),
                                 _CLASSIFY: (1e-2, 3e-2, 1e-1)}),
    OptimizerSpec("galore", "GaLore", _galore, (1e-2, 3e-2, 1e-1),
                  "optax.contrib.galore",
                  note="rank d/4, gap 200, scale 0.25, wd 0 (authors')",
                  task_lr_grids={"digits": (1e-2, 3e-2, 1e-1),
                                 _FINETUNE: (3e-4, 1e-3, 3e-3),
                                 _CLASSIFY: (3e-4, 1e-3, 3e-3)}),
    OptimizerSpec("muon", "Muon", _muon, (1e-2, 3e-2, 1e-1),
                  "optax.contrib.muon", weight_decay=0.1,
                  note="momentum 0.95 Nesterov, RMS 0.2, wd 0.1 (Moonlight)",
                  task_lr_grids={"digits": (1e-2, 3e-2, 1e-1),
                                 _FINETUNE: (1e-3, 3e-3, 1e-2),
                                 _CLASSIFY: (1e-3, 3e-3, 1e-2)}),
    OptimizerSpec("gn_full", "GN (full)", _gauss_newton(False),
                  (3e-3, 1e-2, 3e-2), "mo.gauss_newton", second_order=True,
                  note="inner Muon, a fresh batch per inner step, state "
                       "kept across outer steps; line search 1/√2^i, i<5, "
                       "on batches of its own (paper's)",
                  task_lr_grids={"digits": (3e-3, 1e-2, 3e-2),
                                 _FINETUNE: (1e-3, 3e-3, 1e-2),
                                 _CLASSIFY: (1e-2, 3e-2, 1e-1)}),
    OptimizerSpec("gn_layerwise", "GN (layerwise)", _gauss_newton(True),
                  (3e-3, 1e-2, 3e-2), "mo.gauss_newton", second_order=True,
                  note="GN (full)'s protocol, one block per layer (paper's)",
                  task_lr_grids={"digits": (1e-3, 3e-3, 1e-2),
                                 _FINETUNE: (1e-3, 3e-3, 1e-2),
                                 _CLASSIFY: (1e-2, 3e-2, 1e-1)}),
)}


def get(name: str) -> OptimizerSpec:
  """The spec registered as ``name``.

  Raises:
    KeyError: with the list of known names.
  """
  try:
    return REGISTRY[name]
  except KeyError:
    raise KeyError(
        f"Unknown optimizer {name!r}; known: {', '.join(REGISTRY)}.") from None


def build(name: str, learning_rate: optax.ScalarOrSchedule,
          context: Optional[OptimizerContext] = None
          ) -> optax.GradientTransformation:
  """Builds the optimizer registered as ``name``.

  Args:
    name: a key of :data:`REGISTRY`.
    learning_rate: a float, a traced scalar or a schedule (for the
      Gauss-Newton entries, the inner optimizer's learning rate).
    context: model and run details; ``None``: :class:`OptimizerContext()`.

  Returns:
    An Optax transformation.

  Raises:
    RuntimeError: when the optimizer's code is not installed
      (:func:`unavailable_reason`).

  Example:
    >>> import jax.numpy as jnp
    >>> from microadam_compare import optimizers
    >>> tx = optimizers.build("adamw", 1e-3)
    >>> state = tx.init({"w": jnp.zeros((4, 4))})
  """
  spec = get(name)
  reason = unavailable_reason(spec)
  if reason is not None:
    raise RuntimeError(f"Optimizer {name!r} cannot be built: {reason}")
  return spec.build(learning_rate, context or OptimizerContext())

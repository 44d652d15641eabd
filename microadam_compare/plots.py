"""PNG figures of a comparison (matplotlib, no display needed)."""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

_STYLES = {
    "adamw": ("tab:blue", "-"),
    "microadam": ("tab:red", "-"),
    "adam_mini": ("tab:orange", "-"),
    "adafactor": ("tab:green", "-"),
    "galore": ("tab:purple", "-"),
    "muon": ("tab:brown", "-"),
    "gn_full": ("black", "--"),
    "gn_layerwise": ("tab:gray", "--"),
}


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  if not os.environ.get("MPLBACKEND") and "inline" not in str(
      matplotlib.get_backend()):
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _ok(task_result: dict) -> list[dict]:
  return [r for r in task_result["results"] if r.get("status") == "ok"]


def _finite(values) -> list[float]:
  return [v for v in values if v is not None and math.isfinite(v)]


def _curve(ax, r: dict, x_key: str, y_key: str) -> None:
  """Mean curve over seeds, with a band of one std where there is one."""
  color, style = _STYLES.get(r["name"], (None, "-"))
  std_key = f"{y_key}_std"
  stds = r.get(std_key) or [None] * len(r[y_key])
  pts = [(x, y, s) for x, y, s in zip(r[x_key], r[y_key], stds)
         if y is not None and math.isfinite(y)]
  if not pts:
    return
  xs, ys, ss = zip(*pts)
  label = f"{r['label']} (lr {r['best_lr']:.0e})"
  ax.plot(xs, ys, style, color=color, marker="o", markersize=3, label=label)
  if all(s is not None and math.isfinite(s) for s in ss) and any(ss):
    ax.fill_between(xs, [y - s for y, s in zip(ys, ss)],
                    [y + s for y, s in zip(ys, ss)], color=color, alpha=0.15,
                    lw=0)


def _maybe_log(ax, results: list[dict]) -> None:
  """Log scale when the losses span more than a factor of five."""
  values = [v for r in results for v in _finite(r["val_loss"]) if v > 0]
  if values and max(values) > 5 * min(values):
    ax.set_yscale("log")


def _target(ax, task_result: dict) -> None:
  target = task_result.get("target_loss")
  if target is not None:
    ax.axhline(target, color="0.6", lw=0.8, ls=":", label="target")


def _seeds_text(task_result: dict) -> str:
  seeds = task_result.get("seeds") or []
  return f", mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else ""


def _accuracy_limits(ax, results: list[dict]) -> None:
  """Y range of the accuracy curves' second half (not 0-1), so that the
  differences between optimizers show."""
  values = []
  for r in results:
    n = len(r["val_acc"])
    stds = r.get("val_acc_std") or [0.0] * n
    for acc, std in zip(r["val_acc"][n // 2:], stds[n // 2:]):
      std = std if std is not None and math.isfinite(std) else 0.0
      values += _finite([acc - std, acc + std])
  if values:
    lo, hi = min(values), max(values)
    pad = max(0.01, 0.1 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))


def _plot_by_axis(task_result: dict, path: str, show: bool, *, y_key: str,
                  ylabel: str, title: str, accuracy: bool) -> Optional[Any]:
  """First-order optimizers against steps on the left, Gauss-Newton against
  outer iterations on the right (never on one axis)."""
  plt = _pyplot()
  ok = _ok(task_result)
  first = [r for r in ok if not r.get("second_order")]
  second = [r for r in ok if r.get("second_order")]
  panels = [(first, "step")] + ([(second, "Gauss-Newton outer iteration")]
                                if second else [])
  fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5),
                           sharey=True, squeeze=False)
  for ax, (results, xlabel) in zip(axes[0], panels):
    for r in results:
      _curve(ax, r, "steps", y_key)
    if accuracy:
      _accuracy_limits(ax, ok)
    else:
      _target(ax, task_result)
      _maybe_log(ax, ok)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if results:
      ax.legend(fontsize=8)
  axes[0][0].set_ylabel(ylabel)
  fig.suptitle(f"{task_result['task']}: {title}{_seeds_text(task_result)}")
  fig.tight_layout()
  return _finish(plt, fig, path, show)


def plot_loss_vs_step(task_result: dict, path: str, show: bool = False
                      ) -> Optional[Any]:
  """Validation loss against step; Gauss-Newton against outer iterations,
  on its own axis (:func:`plot_loss_vs_tokens` puts every optimizer on
  one axis of data)."""
  return _plot_by_axis(
      task_result, path, show, y_key="val_loss",
      ylabel=f"validation loss ({task_result.get('loss_unit', '')})",
      title="validation loss", accuracy=False)


def plot_loss_vs_tokens(task_result: dict, path: str, show: bool = False
                        ) -> Optional[Any]:
  """Validation loss against the training tokens read (examples for the
  classification tasks), every optimizer on one axis: a Gauss-Newton outer
  iteration counts the batches of its inner steps (its line search's are
  not training data), so it lands where the first-order runs' steps would
  have read the same data.

  Args:
    task_result: one entry of :func:`compare.compare_task` (results without
      ``tokens_seen``, from older runs, are left out).
    path: where to write the PNG (``None``: nowhere).
    show: show the figure instead of closing it (and return it).

  Returns:
    The figure when ``show``, else ``None``.

  Example:
    >>> import tempfile, os
    >>> from microadam_compare import plots
    >>> result = {"task": "lm", "loss_unit": "nats/byte", "results": [
    ...     {"name": "adamw", "label": "AdamW", "status": "ok",
    ...      "best_lr": 1e-3, "data_unit": "tokens",
    ...      "tokens_seen": [0, 512, 1024], "val_loss": [5.0, 3.0, 2.5]}]}
    >>> with tempfile.TemporaryDirectory() as d:
    ...   plots.plot_loss_vs_tokens(result, os.path.join(d, "lm.png"))
    ...   os.path.getsize(os.path.join(d, "lm.png")) > 0
    True
  """
  plt = _pyplot()
  ok = [r for r in _ok(task_result) if r.get("tokens_seen")]
  unit = next((r["data_unit"] for r in ok if r.get("data_unit")), "tokens")
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in ok:
    _curve(ax, r, "tokens_seen", "val_loss")
  _target(ax, task_result)
  _maybe_log(ax, ok)
  ax.set_xlabel(f"training {unit} read (Gauss-Newton: its inner steps' "
                "batches)")
  ax.set_ylabel(f"validation loss ({task_result.get('loss_unit', '')})")
  ax.set_title(f"{task_result['task']}: validation loss per training {unit}"
               f"{_seeds_text(task_result)}")
  ax.grid(alpha=0.3)
  if ok:
    ax.legend(fontsize=8)
  return _finish(plt, fig, path, show)


def plot_loss_vs_time(task_result: dict, path: str, show: bool = False
                      ) -> Optional[Any]:
  """Validation loss against training wall-clock seconds (compile and
  evaluation excluded); every optimizer on one axis."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in _ok(task_result):
    _curve(ax, r, "time_s", "val_loss")
  _target(ax, task_result)
  _maybe_log(ax, _ok(task_result))
  ax.set_xlabel("training time (s)")
  ax.set_ylabel(f"validation loss ({task_result.get('loss_unit', '')})")
  ax.set_title(f"{task_result['task']}: validation loss per wall-second"
               f"{_seeds_text(task_result)}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _finish(plt, fig, path, show)


def plot_accuracy_vs_step(task_result: dict, path: str, show: bool = False
                          ) -> Optional[Any]:
  """Validation accuracy against step (Gauss-Newton: outer iteration, own
  axis), the y range fitted to the curves' second half."""
  return _plot_by_axis(task_result, path, show, y_key="val_acc",
                       ylabel="validation accuracy",
                       title="validation accuracy", accuracy=True)


def plot_state_bytes(task_result: dict, path: str, show: bool = False
                     ) -> Optional[Any]:
  """Optimizer-state bytes per parameter, one bar per optimizer;
  Gauss-Newton's bar stacks the inner optimizer's state (hatched), which
  exists during each outer step."""
  plt = _pyplot()
  ok = _ok(task_result)
  fig, ax = plt.subplots(figsize=(7, 4))
  for i, r in enumerate(ok):
    color = _STYLES.get(r["name"], ("tab:blue", "-"))[0]
    kept = r["state_bytes_per_param"]
    inner = r.get("transient_state_bytes_per_param") or 0.0
    ax.bar(i, kept, color=color)
    text = f"{kept:.2f}"
    if inner:
      ax.bar(i, inner, bottom=kept, color="white", edgecolor=color,
             hatch="//")
      text = f"{kept:.2f} kept\n+{inner:.2f} inner"
    ax.annotate(text, (i, kept + inner), ha="center", va="bottom",
                fontsize=7)
  ax.set_xticks(range(len(ok)))
  ax.set_xticklabels([r["label"] for r in ok], rotation=30, ha="right")
  ax.set_ylabel("optimizer state (bytes / parameter)")
  ax.set_title(f"{task_result['task']}: optimizer state "
               f"({task_result['num_params']:,} parameters)")
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  return _finish(plt, fig, path, show)


def plot_lr_sweep(task_result: dict, path: str, show: bool = False
                  ) -> Optional[Any]:
  """Each optimizer's tuning: final validation loss of a full-length run
  against its learning rate (the chosen rate circled)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in _ok(task_result):
    pts = [(s["lr"], s["val_loss"]) for s in r.get("sweep", [])
           if s["val_loss"] is not None and math.isfinite(s["val_loss"])]
    if not pts:
      continue
    color, style = _STYLES.get(r["name"], (None, "-"))
    xs, ys = zip(*pts)
    ax.plot(xs, ys, style, color=color, marker="o", label=r["label"])
    best = [y for x, y in pts if x == r["best_lr"]]
    if best:
      ax.plot([r["best_lr"]], best, "o", ms=10, mfc="none", color=color)
  ax.set_xscale("log")
  ax.set_xlabel("learning rate (Gauss-Newton: inner optimizer's)")
  ax.set_ylabel("final validation loss (tuning seed)")
  ax.set_title(f"{task_result['task']}: learning-rate tuning, full-length "
               "runs")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _finish(plt, fig, path, show)


def plot_loss_vs_state(task_results: Sequence[dict], path: str,
                       show: bool = False) -> Optional[Any]:
  """Final validation loss (mean, error bars: std over seeds) against
  optimizer-state bytes per parameter, one panel per task. Gauss-Newton is
  placed at its kept + inner state."""
  plt = _pyplot()
  tasks = [t for t in task_results if _ok(t)]
  fig, axes = plt.subplots(1, max(1, len(tasks)),
                           figsize=(4.5 * max(1, len(tasks)), 4),
                           squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for r in _ok(task):
      mean = r.get("final_val_loss_mean", r.get("final_val_loss"))
      if mean is None or not math.isfinite(mean):
        continue
      std = r.get("final_val_loss_std") or 0.0
      x = r["state_bytes_per_param"] + (
          r.get("transient_state_bytes_per_param") or 0.0)
      color = _STYLES.get(r["name"], ("tab:blue", "-"))[0]
      ax.errorbar([x], [mean], yerr=[std if math.isfinite(std) else 0.0],
                  fmt="s" if r.get("second_order") else "o", color=color,
                  capsize=3, label=r["label"])
      ax.annotate(r["label"], (x, mean), textcoords="offset points",
                  xytext=(4, 4), fontsize=7)
    ax.set_xlabel("optimizer state (bytes / parameter)")
    ax.set_ylabel(f"final validation loss ({task.get('loss_unit', '')})")
    ax.set_title(task["task"])
    ax.grid(alpha=0.3)
  fig.suptitle("final loss vs optimizer state (error bars: std over seeds)")
  fig.tight_layout()
  return _finish(plt, fig, path, show)


def _finish(plt, fig, path: Optional[str], show: bool):
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
  if show:
    plt.show()
    return fig
  plt.close(fig)
  return None


def plot_task(task_result: dict, out_dir: str) -> list[str]:
  """Every figure of one task, as ``<task>_<figure>.png`` in ``out_dir``
  (accuracy for the classification tasks).

  Returns:
    The paths written.
  """
  name = task_result["task"]
  figures = [("loss_vs_tokens", plot_loss_vs_tokens),
             ("loss_vs_step", plot_loss_vs_step),
             ("loss_vs_time", plot_loss_vs_time),
             ("state_bytes", plot_state_bytes),
             ("lr_sweep", plot_lr_sweep),
             ("loss_vs_state", lambda t, p: plot_loss_vs_state([t], p))]
  if task_result.get("loss_unit") == "nats":  # classification
    figures.append(("accuracy_vs_step", plot_accuracy_vs_step))
  paths = []
  for suffix, fn in figures:
    path = os.path.join(out_dir, f"{name}_{suffix}.png")
    fn(task_result, path)
    paths.append(path)
  pre = (task_result.get("metadata") or {}).get("pretrain")
  if pre and pre.get("val_loss"):
    path = os.path.join(out_dir, "pretrain_curve.png")  # one per run
    plot_pretrain(pre, path)
    paths.append(path)
  return paths


def plot_pretrain(info: dict, path: str, show: bool = False) -> Optional[Any]:
  """The pre-training curve of the fine-tuning tasks' GPT (AdamW)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(info["steps"], info["val_loss"], "o-", color="tab:blue",
          markersize=3)
  ax.set_xlabel("pre-training step (AdamW)")
  ax.set_ylabel("validation loss (nats/byte, stdlib minus held-out)")
  ax.set_title("pre-training of the fine-tuning GPT")
  ax.grid(alpha=0.3)
  return _finish(plt, fig, path, show)

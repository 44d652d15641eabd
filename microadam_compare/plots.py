"""PNG figures of a comparison (matplotlib, no display needed)."""

from __future__ import annotations

import math
import os
from typing import Any, Optional

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


def _curve(ax, r: dict, x_key: str, y_key: str) -> None:
  color, style = _STYLES.get(r["name"], (None, "-"))
  pts = [(x, y) for x, y in zip(r[x_key], r[y_key])
         if y is not None and math.isfinite(y)]
  if not pts:
    return
  xs, ys = zip(*pts)
  label = f"{r['label']} (lr {r['best_lr']:.0e})"
  ax.plot(xs, ys, style, color=color, marker="o", markersize=3, label=label)


def _maybe_log(ax, task_result: dict) -> None:
  """Log scale when the losses span more than a factor of five."""
  values = [v for r in _ok(task_result) for v in r["val_loss"]
            if v is not None and math.isfinite(v) and v > 0]
  if values and max(values) > 5 * min(values):
    ax.set_yscale("log")


def _target(ax, task_result: dict, horizontal: bool = True) -> None:
  target = task_result.get("target_loss")
  if target is not None and horizontal:
    ax.axhline(target, color="0.6", lw=0.8, ls=":", label="target")


def _plot_curves(task_result: dict, path: str, show: bool, *, x_key: str,
                 y_key: str, xlabel: str, ylabel: str, title: str,
                 with_target: bool) -> Optional[Any]:
  """One curve per optimizer of ``y_key`` against ``x_key``."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in _ok(task_result):
    _curve(ax, r, x_key, y_key)
  if with_target:
    _target(ax, task_result)
    _maybe_log(ax, task_result)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(f"{task_result['task']}: {title}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _finish(plt, fig, path, show)


def plot_loss_vs_step(task_result: dict, path: str, show: bool = False
                      ) -> Optional[Any]:
  """Validation loss against step (outer iteration for Gauss-Newton)."""
  return _plot_curves(
      task_result, path, show, x_key="steps", y_key="val_loss",
      xlabel="step (Gauss-Newton: outer iteration)",
      ylabel=f"validation loss ({task_result.get('loss_unit', '')})",
      title="validation loss per step", with_target=True)


def plot_loss_vs_time(task_result: dict, path: str, show: bool = False
                      ) -> Optional[Any]:
  """Validation loss against training wall-clock seconds (compile and
  evaluation excluded)."""
  return _plot_curves(
      task_result, path, show, x_key="time_s", y_key="val_loss",
      xlabel="training time (s)",
      ylabel=f"validation loss ({task_result.get('loss_unit', '')})",
      title="validation loss per wall-second", with_target=True)


def plot_accuracy_vs_step(task_result: dict, path: str, show: bool = False
                          ) -> Optional[Any]:
  """Validation accuracy against step."""
  return _plot_curves(
      task_result, path, show, x_key="steps", y_key="val_acc",
      xlabel="step (Gauss-Newton: outer iteration)",
      ylabel="validation accuracy", title="validation accuracy per step",
      with_target=False)


def plot_state_bytes(task_result: dict, path: str, show: bool = False
                     ) -> Optional[Any]:
  """Optimizer-state bytes per parameter, one bar per optimizer."""
  plt = _pyplot()
  ok = _ok(task_result)
  fig, ax = plt.subplots(figsize=(7, 4))
  labels = [r["label"] for r in ok]
  values = [r["state_bytes_per_param"] for r in ok]
  colors = [_STYLES.get(r["name"], ("tab:blue", "-"))[0] for r in ok]
  bars = ax.bar(range(len(ok)), values, color=colors)
  for b, v in zip(bars, values):
    ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v),
                ha="center", va="bottom", fontsize=8)
  ax.set_xticks(range(len(ok)))
  ax.set_xticklabels(labels, rotation=30, ha="right")
  ax.set_ylabel("optimizer state (bytes / parameter)")
  ax.set_title(f"{task_result['task']}: optimizer state "
               f"({task_result['num_params']:,} parameters)")
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  return _finish(plt, fig, path, show)


def plot_lr_sweep(task_result: dict, path: str, show: bool = False
                  ) -> Optional[Any]:
  """Each optimizer's sweep: validation loss against learning rate."""
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
  ax.set_xscale("log")
  ax.set_xlabel("learning rate (Gauss-Newton: inner optimizer's)")
  ax.set_ylabel("validation loss after the sweep run")
  ax.set_title(f"{task_result['task']}: learning-rate sweep")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
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
  """Every figure of one task, as ``<task>_<figure>.png`` in ``out_dir``.

  Returns:
    The paths written.
  """
  name = task_result["task"]
  figures = [("loss_vs_step", plot_loss_vs_step),
             ("loss_vs_time", plot_loss_vs_time),
             ("state_bytes", plot_state_bytes),
             ("lr_sweep", plot_lr_sweep)]
  if name == "digits":
    figures.append(("accuracy_vs_step", plot_accuracy_vs_step))
  paths = []
  for suffix, fn in figures:
    path = os.path.join(out_dir, f"{name}_{suffix}.png")
    fn(task_result, path)
    paths.append(path)
  return paths

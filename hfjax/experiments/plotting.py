"""Loss curves for the training script and the ablation, drawn with matplotlib's Agg backend.

Each figure has two panels: loss against training wall time (evaluation and compilation
excluded) and against examples processed (see :mod:`hfjax.experiments.train` for the
definition), so that a method that is fast per example but slow per second shows up as such.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

from matplotlib import pyplot as plt  # noqa: E402  (the backend must be chosen first)

Record = Mapping[str, Any]


def _eval_points(records: Sequence[Record], key: str) -> tuple[list, list, list]:
  rows = [r for r in records if r.get(key) is not None]
  return (
    [r["wall_time"] for r in rows],
    [r["examples_processed"] for r in rows],
    [r[key] for r in rows],
  )


def _finish(fig, axes, title: str, path: str | os.PathLike[str], log_y: bool) -> None:
  axes[0].set_xlabel("training wall time (s)")
  axes[1].set_xlabel("examples processed")
  axes[0].set_ylabel("loss")
  for ax in axes:
    ax.grid(True, alpha=0.3)
    if log_y:
      ax.set_yscale("log")
  handles, labels = axes[0].get_legend_handles_labels()
  # Many methods: one legend to the right of both panels rather than over the curves.
  fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def plot_run(
  records: Sequence[Record], path: str | os.PathLike[str], title: str, *, log_y: bool = False
) -> None:
  """Plots one run's per-step metrics (``metrics.jsonl`` records) to a PNG.

  Draws the batch loss of every step faintly, and the training-set and test losses of the
  evaluation steps as lines.
  """
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  steps = [r for r in records if r.get("train_loss") is not None]
  for ax, x_key in zip(axes, ("wall_time", "examples_processed"), strict=True):
    ax.plot(
      [r[x_key] for r in steps],
      [r["train_loss"] for r in steps],
      color="0.7",
      lw=0.8,
      label="batch loss",
    )
  for key, style in (("eval_train_loss", "C0-o"), ("test_loss", "C1-s")):
    times, examples, values = _eval_points(records, key)
    label = "training loss" if key == "eval_train_loss" else "test loss"
    axes[0].plot(times, values, style, ms=3, label=label)
    axes[1].plot(examples, values, style, ms=3, label=label)
  _finish(fig, axes, title, path, log_y)


def plot_comparison(
  runs: Mapping[str, Sequence[Sequence[Record]]],
  path: str | os.PathLike[str],
  title: str,
  *,
  key: str = "eval_train_loss",
  target: float | None = None,
  log_y: bool = False,
) -> None:
  """Plots one loss (``key``) of several methods, every seed of a method in one colour.

  Args:
    runs: ``{label: [records of seed 0, records of seed 1, ...]}``.
    path: the PNG to write.
    title: figure title.
    key: the metric to plot, at the evaluation steps.
    target: a loss to mark with a dashed line (the ablation's target).
    log_y: logarithmic loss axis.
  """
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (label, seeds) in enumerate(runs.items()):
    color = cycle[i % len(cycle)]
    style = "-" if i < len(cycle) else "--"
    for j, records in enumerate(seeds):
      times, examples, values = _eval_points(records, key)
      name = label if j == 0 else None
      axes[0].plot(times, values, style, color=color, lw=1, alpha=0.8, label=name)
      axes[1].plot(examples, values, style, color=color, lw=1, alpha=0.8, label=name)
  if target is not None:
    for ax in axes:
      ax.axhline(target, color="k", ls=":", lw=1)
  _finish(fig, axes, title, path, log_y)

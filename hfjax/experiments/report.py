"""The ablation's report, computed from its runs' records: tables, checked goals and what
each acceleration pays.

Every number and every verdict in the report is computed here from the records
(``metrics.jsonl``) of the runs; the goals are data (:data:`SPEEDUP_GOAL`,
:data:`FINAL_LOSS_TOLERANCE`) checked against them, and the accelerations compared are
:data:`hfjax.experiments.ablation_config.ACCELERATIONS`.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import ml_collections

from hfjax.experiments.ablation_config import ACCELERATIONS, BASELINE, PAPER, Method
from hfjax.experiments.train import first_below

Runs = dict[str, list[list[dict]]]  # method key -> one list of records per seed

# Sainath et al. (2013) report 1.5x (50 h Broadcast News) to 2.3x (300 h Switchboard) for
# L-BFGS preconditioning with sampling over the baseline HF, at no loss in final quality.
SPEEDUP_GOAL = 1.5
FINAL_LOSS_TOLERANCE = 1.01  # "no worse": a final training loss within 1% of the baseline's

COLUMNS = (
  "method",
  "reached",
  "time to target (s)",
  "examples to target (M)",
  "speed-up (time / examples)",
  "total CG steps",
  "final train loss",
  "final test loss",
)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  """A GitHub markdown table of ``str(cell)``; every row must have a cell per column."""
  lines = [header, ["---"] * len(header), *rows]
  for line in lines:
    if len(line) != len(header):
      raise ValueError(f"a row of {len(line)} cells under {len(header)} columns: {line!r}.")
  rule = "|" + "|".join(lines[1]) + "|"
  cells = ["| " + " | ".join(str(cell) for cell in line) + " |" for line in lines]
  return "\n".join([cells[0], rule, *cells[2:]])


def mean_std(values: Sequence[float], digits: int = 3) -> str:
  """``mean ± standard deviation`` (0 for one value), or ``—`` for none."""
  if not values:
    return "—"
  mean = statistics.fmean(values)
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{mean:.{digits}g} ± {spread:.2g}"


def baseline_target(task_name: str, runs: Runs) -> float:
  """The highest final training loss of the baseline's seeds: every one of them reaches it."""
  if BASELINE not in runs:
    raise ValueError(f"{task_name}: set target_loss, or include the {BASELINE!r} baseline.")
  return max(seed[-1]["eval_train_loss"] for seed in runs[BASELINE])


def _hits(seeds: list[list[dict]], target: float) -> list[dict]:
  return [hit for hit in (first_below(records, target) for records in seeds) if hit is not None]


def _to_target(seeds: list[list[dict]], target: float) -> tuple[float, float] | None:
  """Mean time (s) and examples processed to the target, or ``None`` unless every seed
  reaches it."""
  found = [first_below(records, target) for records in seeds]
  if not found or any(hit is None for hit in found):
    return None
  return (
    statistics.fmean(hit["wall_time"] for hit in found),
    statistics.fmean(hit["examples_processed"] for hit in found),
  )


def _reached(label: str, seeds: list[list[dict]], target: float) -> str:
  return f"{label} reaches the target in {len(_hits(seeds, target))}/{len(seeds)} seeds"


def _row(method: Method, seeds: list[list[dict]], hits: list[dict], base: dict | None) -> list:
  times = [h["wall_time"] for h in hits]
  examples = [h["examples_processed"] / 1e6 for h in hits]
  speedup = "—"
  if hits and base:
    speedup = (
      f"{base['time'] / statistics.fmean(times):.2f}x / "
      f"{base['examples'] / statistics.fmean(examples):.2f}x"
    )
  cg = [sum(r.get("cg_steps", 0) for r in records) for records in seeds]
  return [
    method.label,
    f"{len(hits)}/{len(seeds)}",
    mean_std(times),
    mean_std(examples),
    speedup,
    mean_std(cg, 4) if method.family == "hf" else "—",
    mean_std([records[-1]["eval_train_loss"] for records in seeds], 4),
    mean_std([records[-1]["test_loss"] for records in seeds], 4),
  ]


def summarise(
  task_name: str, rows: Sequence[Method], runs: Runs, target: float | None
) -> tuple[str, float]:
  """The markdown table of one task and the target it used (the baseline's when ``None``)."""
  if target is None:
    target = baseline_target(task_name, runs)
  base_hits = _hits(runs.get(BASELINE, []), target)
  base = None
  if base_hits:
    base = {
      "time": statistics.fmean(h["wall_time"] for h in base_hits),
      "examples": statistics.fmean(h["examples_processed"] / 1e6 for h in base_hits),
    }
  table = [_row(m, runs[m.key], _hits(runs[m.key], target), base) for m in rows]
  return markdown_table(COLUMNS, table), target


class Check(NamedTuple):
  """A goal checked on the runs: ``measured`` against ``goal``, or ``None`` when unmeasured."""

  claim: str
  measured: float | None
  goal: str
  met: bool
  note: str = ""

  def line(self) -> str:
    value = "not measured" if self.measured is None else f"{self.measured:.3g}"
    note = f"; {self.note}" if self.note else ""
    return f"{self.claim}: {value} (goal {self.goal}): {'met' if self.met else 'missed'}{note}."


def checks(runs: Runs, rows: Sequence[Method], target: float) -> list[Check]:
  """The paper's claims and HF against Optax, checked on one task's runs.

  A method reaches the target only if every seed does; its time is then the mean over seeds.
  """
  labels = _labels(rows)

  def mean_time(key):
    means = _to_target(runs[key], target)
    return None if means is None else means[0]

  def reached(key):
    return _reached(labels[key], runs[key], target)

  def final(key):
    return statistics.fmean(records[-1]["eval_train_loss"] for records in runs[key])

  found = []
  if BASELINE in runs and PAPER in runs:
    base, paper = mean_time(BASELINE), mean_time(PAPER)
    speedup = None if base is None or paper is None else base / paper
    found.append(
      Check(
        f"{labels[PAPER]} vs {labels[BASELINE]}, speed-up in time to target",
        speedup,
        f">= {SPEEDUP_GOAL:g}",
        speedup is not None and speedup >= SPEEDUP_GOAL,
        "" if speedup is not None else f"{reached(PAPER)}, {reached(BASELINE)}",
      )
    )
    paper_final, base_final = final(PAPER), final(BASELINE)
    found.append(
      Check(
        f"{labels[PAPER]} vs {labels[BASELINE]}, ratio of final training losses",
        paper_final / base_final if base_final else None,
        f"<= {FINAL_LOSS_TOLERANCE:g}",
        paper_final <= base_final * FINAL_LOSS_TOLERANCE,
        f"{paper_final:.4g} vs {base_final:.4g}",
      )
    )
  peers = [m.key for m in rows if m.family == "optax"]
  if peers:
    hf_best = _fastest([m.key for m in rows if m.family == "hf"], mean_time)
    peer_best = _fastest(peers, mean_time)
    speedup = None if hf_best is None or peer_best is None else peer_best[0] / hf_best[0]
    fastest = [
      f"{family}: {labels[best[1]]} at {best[0]:.3g} s" if best else f"{family}: none"
      for family, best in (("HF", hf_best), ("Optax peer", peer_best))
    ]
    found.append(
      Check(
        "Fastest HF vs fastest Optax peer, speed-up in time to target",
        speedup,
        "> 1",
        hf_best is not None and (peer_best is None or hf_best[0] < peer_best[0]),
        "fastest to reach the target in every seed: " + ", ".join(fastest),
      )
    )
  return found


def _fastest(keys: Sequence[str], mean_time) -> tuple[float, str] | None:
  times = [(time, key) for key in keys if (time := mean_time(key)) is not None]
  return min(times, default=None)


def goals(runs: Runs, rows: Sequence[Method], target: float) -> list[str]:
  """The lines of :func:`checks`, one per goal."""
  return [check.line() for check in checks(runs, rows, target)]


def _labels(rows: Sequence[Method]) -> dict[str, str]:
  return {m.key: m.label.removeprefix("+ ") for m in rows}


def _speedup(runs: Runs, base: str, key: str, target: float) -> tuple[float, float] | None:
  """``base``'s mean time and examples to the target over ``key``'s; ``None`` unless every
  seed of both reaches it."""
  ours, theirs = _to_target(runs[base], target), _to_target(runs[key], target)
  if ours is None or theirs is None:
    return None
  return ours[0] / theirs[0], ours[1] / theirs[1]


def _compared(
  runs: Runs,
  labels: dict[str, str],
  named: Sequence[tuple[str, str, str]],
  target: float,
  template: str = "{name} pays {time:.2f}x / {examples:.2f}x",
) -> tuple[list[str], dict[str, float]]:
  """``template`` filled per ``(name, base, key)`` (the speed-ups of ``key`` over ``base``),
  and the time speed-ups measured, by name."""
  parts, measured = [], {}
  for name, base, key in named:
    speedup = _speedup(runs, base, key, target)
    if speedup is None:
      missed = [k for k in (base, key) if _to_target(runs[k], target) is None]
      reached = ", ".join(_reached(labels[k], runs[k], target) for k in missed)
      parts.append(f"{name} not measured ({reached})")
    else:
      parts.append(template.format(name=name, time=speedup[0], examples=speedup[1]))
      measured[name] = speedup[0]
  return parts, measured


def _which_pays(measured: dict[str, float], names: Sequence[str]) -> str:
  """Which of ``names`` pays in time (a speed-up above 1), in words."""
  paying = sorted((measured[n], n) for n in names if measured.get(n, 0.0) > 1)
  if len(paying) > 1:
    verdict = f"both pay, {paying[-1][1]} more"
  elif paying:
    verdict = f"only {paying[0][1]} pays"
  else:
    verdict = "neither pays"
  missing = [n for n in names if n not in measured]
  if missing:
    verdict += f" ({' and '.join(missing)} not measured)"
  return f"in time, {verdict}"


def accelerations(runs: Runs, rows: Sequence[Method], target: float) -> list[str]:
  """What the paper's two accelerations pay over each base of
  :data:`~hfjax.experiments.ablation_config.ACCELERATIONS` that ran, and what K-FAC pays in
  place of no preconditioner.

  A speed-up divides the base's mean time (examples processed) to the target by the
  variant's, over seeds that all reach it; an acceleration "pays" when it is above 1.
  """
  labels = _labels(rows)
  lines = []
  for group in ACCELERATIONS:
    named = [
      (name, group.base, key)
      for name, key in (
        ("L-BFGS", group.lbfgs),
        ("sampling", group.sampling),
        ("L-BFGS + sampling", group.both),
      )
      if key in runs
    ]
    if group.base not in runs or not named:
      continue
    against = f"With {group.underneath} underneath, speed-up in time / examples to target against"
    if _to_target(runs[group.base], target) is None:
      reached = _reached(labels[group.base], runs[group.base], target)
      lines.append(f"{against} {labels[group.base]}: not measured ({reached}).")
      continue
    parts, measured = _compared(runs, labels, named, target)
    verdict = _which_pays(measured, ("L-BFGS", "sampling"))
    lines.append(f"{against} {labels[group.base]}: {', '.join(parts)}; {verdict}.")
  plain, kfac = ACCELERATIONS
  named = [
    (name, without, structured)
    for name, without, structured in zip(
      ("alone", "with L-BFGS", "with sampling", "with both"), plain[1:], kfac[1:], strict=True
    )
    if without in runs and structured in runs
  ]
  if named:
    template = "{name} {time:.2f}x / {examples:.2f}x"
    parts, _ = _compared(runs, labels, named, target, template)
    lines.append(
      "K-FAC in place of no preconditioner, speed-up in time / examples to target against the "
      f"same variant without it: {', '.join(parts)}."
    )
  return lines


def describe(
  task: ml_collections.ConfigDict,
  seeds: Sequence[int],
  target: float,
  rows: Sequence[Method] = (),
) -> str:
  """One paragraph on a task: data, model, budget, target, seeds, sample sizes and damping,
  and K-FAC's settings when ``rows`` hold a K-FAC variant."""
  base = task.base
  data = ", ".join(f"{k}={v}" for k, v in base.dataset.items() if k != "name")
  budget = f"{base.budget_examples / 1e6:g}M examples processed"
  if base.budget_seconds:
    budget += f" or {base.budget_seconds:g} s of training, whichever comes first"
  grow, opt = task.sampling, base.optimizer
  kfac = ""
  if any(m.optimizer.get("preconditioner", "").startswith("kfac") for m in rows):
    kfac = (
      f" K-FAC factors refreshed every {opt.kfac.update_every} step(s), moving-average decay "
      f"{opt.kfac.decay:g}, on unflattened parameters."
    )
  return (
    f"{base.dataset.name} ({data}), {base.model.kind} {_model_shape(base)}. Budget per run: "
    f"{budget} (HF at most {base.num_steps} steps). Target training "
    f"loss {target:.4g}. Seeds {tuple(seeds)}. HF samples: gradient "
    f"{task.gradient_sample or 'all'}, curvature {task.curvature_sample}; growing ones "
    f"start at {grow.gradient_start}/{grow.curvature_start} and grow {grow.factor}x per "
    f"step; damping from {opt.initial_damping:g}, rho by damping.ratio={opt.damping.ratio!r}."
    f"{kfac} Adam and SGD minibatch {task.batch_size}."
  )


def _model_shape(base: ml_collections.ConfigDict) -> str:
  if base.model.kind == "autoencoder":
    sizes = tuple(base.model.encoder_sizes)
    return "-".join(str(s) for s in (*sizes, *reversed(sizes[:-1]))) + " (mirrored)"
  return "hidden " + "-".join(str(s) for s in base.model.hidden_sizes)

"""Checks of the equal-wall-time comparison (benchmarks/compare_optimizers.py) at tiny sizes.

None needs kfac-jax: the peer's virtualenv is pointed at a path that does not exist, which
the comparison must report and skip.
"""

import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax
import pytest

import hfjax
from benchmarks import compare_optimizers as compare
from hfjax.experiments import models

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = {"num_train": 64, "data_seed": 0, "eval_size": 32, "seed": 0, "encoder": (8, 3)}


@pytest.fixture(scope="module")
def problem():
  return compare.load_problem(**TINY)


def test_problem_is_the_same_for_the_same_seeds_and_differs_otherwise(problem):
  again = compare.load_problem(**TINY)
  other = compare.load_problem(**{**TINY, "seed": 1})
  assert again.fingerprint == problem.fingerprint
  assert other.fingerprint != problem.fingerprint
  assert problem.train.shape == (64, 784)
  assert jnp.array_equal(problem.eval_inputs, problem.train[:32])


def test_eval_size_beyond_the_training_set_is_rejected():
  with pytest.raises(ValueError, match="eval_size"):
    compare.load_problem(**{**TINY, "eval_size": 65})


def test_eval_times_are_the_grid_the_report_times_and_the_end():
  assert compare.eval_times(30.0, 10.0, [15.0, 30.0]) == [10.0, 15.0, 20.0, 30.0]
  assert compare.eval_times(25.0, 10.0, [150.0]) == [10.0, 20.0, 25.0]
  assert compare.report_times(30.0, ["150", "600", "10"]) == [10.0, 30.0]


def test_run_timed_counts_steps_and_subtracts_compilation():
  pause = 0.01

  def step(carry):
    time.sleep(pause)
    # A new function each step: a compilation inside the timed region, to be subtracted.
    return jax.jit(lambda x: x + 1.0)(carry)

  records = compare.run_timed(
    "sleep",
    step,
    jnp.zeros(()),
    params_of=lambda carry: carry,
    evaluate=float,
    times=[0.05, 0.1],
    log=lambda line: None,
  )
  assert [r["steps"] for r in records][0] == 0
  for r in records:
    # Each step adds one to the carry, so the evaluation shows the steps taken.
    assert r["eval_loss"] == r["steps"]
    assert r["compiles"] == r["steps"]
    assert r["seconds"] >= pause * r["steps"] - 1e-3
  assert records[1]["seconds"] >= 0.05 and records[2]["seconds"] >= 0.1


def test_summary_ratios_are_to_the_best_peer_at_each_time():
  def run(method, losses):
    return [
      {"method": method, "seconds": t, "steps": 10 * i, "eval_loss": loss}
      for i, (t, loss) in enumerate(zip((0.0, 5.2, 10.4), losses, strict=True))
    ]

  results = {
    "adam lr=0.001": run("adam lr=0.001", [100.0, 60.0, 50.0]),
    "adam lr=0.01": run("adam lr=0.01", [100.0, 80.0, 40.0]),
    "hf": run("hf", [100.0, 30.0, 45.0]),
    "kfac_jax": run("kfac_jax", [100.0, 70.0, 20.0])[:2],
  }
  rows = compare.summarize(results, [5.0, 10.0])
  by_method = {row["method"]: row for row in rows}
  assert by_method["hf"][5.0] == (30.0, 10, 5.2)
  assert by_method["hf"][("ratio", 5.0)] == pytest.approx(30.0 / 60.0)
  assert by_method["hf"][("ratio", 10.0)] == pytest.approx(45.0 / 40.0)
  # kfac_jax stopped before 10 s: no entry there, and not counted as a peer there.
  assert by_method["kfac_jax"][10.0] is None
  assert by_method["kfac_jax"][("ratio", 10.0)] is None
  table = compare.markdown_table(rows, [5.0, 10.0])
  assert "| hf | 30.00 (5.2 s) | 10 | 0.50 | 45.00 (10.4 s) | 20 | 1.12 |" in table
  assert "| kfac_jax | 70.00 (5.2 s) | 10 | 1.17 | - | - | - |" in table
  on_time = compare.markdown_table(compare.summarize(results, [5.2]), [5.2])
  assert "| hf | 30.00 | 10 | 0.50 |" in on_time


def test_hf_options_merge_flags_json_and_configs():
  options = compare.hf_options(
    '{"damping": {"increase": 2.0}, "cg_tol": 1e-3}', preconditioner="none"
  )
  assert options == {
    "damping": hfjax.DampingConfig(increase=2.0),
    "cg_tol": 1e-3,
    "preconditioner": "none",
  }
  options = compare.hf_options('{"kfac": {"update_every": 3, "decay": 0.5}}')
  assert options == {"kfac": hfjax.KFACConfig(update_every=3, decay=0.5)}
  with pytest.raises(ValueError, match="both"):
    compare.hf_options('{"max_cg_steps": 5}', max_cg_steps=10)
  with pytest.raises(ValueError, match="JSON object"):
    compare.hf_options("[1]")


def test_hf_step_passes_an_equal_curvature_batch_once(problem):
  """A curvature batch of the gradient batch's size is the same examples: the step equals
  one given both batches explicitly, with one loss evaluation less (backtracking's loss at
  the chosen iterate is the gradient-batch loss)."""
  tx = hfjax.hessian_free(
    problem.apply_fn, models.sigmoid_cross_entropy, max_cg_steps=3, initial_damping=1.0
  )
  params = problem.params
  state = tx.init(params)
  indices = jnp.arange(16)
  new_params, new_state = jax.jit(compare.hf_step(problem, tx))(params, state, indices, indices)

  images = problem.train[indices]
  loss, grads = jax.value_and_grad(compare.batch_loss(problem))(params, images)
  updates, explicit_state = tx.update(
    grads, state, params, batch=(images, images), curvature_batch=(images, images), loss=loss
  )
  expected = optax.apply_updates(params, updates)
  for got, want in zip(jax.tree.leaves(new_params), jax.tree.leaves(expected), strict=True):
    assert jnp.allclose(got, want, rtol=1e-4, atol=1e-5)
  evaluations = lambda s: int(optax.tree.get(s, "backtracking_evaluations"))
  assert evaluations(new_state) == evaluations(explicit_state) - 1


@pytest.mark.slow
def test_adam_and_hf_lower_the_loss_from_the_same_start(problem):
  adam = compare.run_adam(problem, 1e-2, batch_size=16, seed=0, times=[0.3])
  hf = compare.run_hf(
    problem,
    {"max_cg_steps": 5},
    gradient_batch=0,
    curvature_batch=16,
    seed=0,
    times=[0.3],
  )
  assert adam[0]["eval_loss"] == hf[0]["eval_loss"]
  for records in (adam, hf):
    assert records[-1]["steps"] > 0
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    assert records[-1]["compiles"] == 0
  assert 0 < hf[-1]["total_cg_steps"] <= 5 * hf[-1]["steps"]


@pytest.mark.slow
def test_command_line_writes_table_and_json_and_skips_missing_kfac_jax(tmp_path):
  out = tmp_path / "compare.json"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.compare_optimizers",
      "--seconds=0.5",
      "--eval_every=0.25",
      "--num_train=64",
      "--eval_size=32",
      "--encoder=8,3",
      "--adam_lrs=1e-3",
      "--adam_batch=16",
      "--hf_curvature_batch=16",
      "--hf_max_cg_steps=3",
      f"--kfac_python={tmp_path / 'missing' / 'python'}",
      f"--out={out}",
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert "| adam lr=0.001 |" in result.stdout and "| hf |" in result.stdout
  assert "kfac_jax skipped" in result.stdout
  assert "best Adam at 0.5 s: adam lr=0.001." in result.stdout
  summary = json.loads(out.read_text())
  assert set(summary["results"]) == {"adam lr=0.001", "hf"}
  assert summary["flags"]["hf_max_cg_steps"] == 3
  assert summary["report_seconds"] == [0.5]
  for records in summary["results"].values():
    assert records[-1]["seconds"] >= 0.5

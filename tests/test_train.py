"""End-to-end checks of the training script and the ablation runner, at tiny sizes."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import hfjax
from hfjax.experiments import ablation, optimizers, train
from hfjax.experiments import config as config_lib
from hfjax.experiments import report as report_lib
from hfjax.experiments import task as task_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# A one-hidden-layer classifier on sklearn's digits: compiles and trains in seconds.
TINY = {"model.hidden_sizes": (16,), "optimizer.curvature_schedule.start": 100, "eval_every": 2}


def _config(name: str, **overrides):
  spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.progress = False
  config.update_from_flattened_dict(
    {**TINY, **overrides} if name == "digits_classifier" else overrides
  )
  return config


def _cli(
  *args: str, module: str = "hfjax.experiments.train", cwd: pathlib.Path = REPO
) -> subprocess.CompletedProcess:
  # PYTHONPATH: from another directory too, this checkout is the hfjax that runs.
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    capture_output=True,
    text=True,
    cwd=cwd,
    env=env,
    timeout=300,
  )


def _records(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_and_writes_metrics_summary_and_plot(tmp_path):
  result = _cli(
    "--config",
    str(CONFIGS / "digits_classifier.py"),
    "--workdir",
    str(tmp_path),
    "--config.model.hidden_sizes=(16,)",
    "--config.optimizer.curvature_schedule.start=100",
    "--config.num_steps=4",
    "--config.eval_every=2",
  )
  assert result.returncode == 0, result.stderr
  assert "summary:" in result.stdout
  records = _records(tmp_path)
  assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
  assert [r["step"] for r in records if "test_loss" in r] == [0, 2, 4]
  for key in ("damping", "rho", "cg_steps", "accepted", "consecutive_rejections"):
    assert key in records[1], key
  assert records[1]["gradient_batch_size"] == 1437 and records[1]["curvature_batch_size"] == 100
  examples = [r["examples_processed"] for r in records]
  assert examples == sorted(examples) and examples[1] > 2 * 1437
  walls = [r["wall_time"] for r in records]
  assert walls == sorted(walls)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["steps"] == 4
  assert summary["final_train_loss"] < records[0]["eval_train_loss"]
  assert summary["total_cg_steps"] == sum(r.get("cg_steps", 0) for r in records)
  assert (tmp_path / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ["--config", "configs/digits_classifier.py", "--config.optimizer.name=rmsprop"],
      "error: config.optimizer.name='rmsprop'; choose one of",
    ),
    (
      ["--config", "configs/mnist_autoencoder.py", "--config.dataset.path=/no/such/mnist.npz"],
      "error: No MNIST data at '/no/such/mnist.npz'",
    ),
  ],
  ids=["bad-optimizer-name", "missing-mnist-file"],
)
def test_cli_reports_bad_input_in_one_line(tmp_path, args, message):
  result = _cli(*args, "--workdir", str(tmp_path))
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(message), result.stderr


@pytest.mark.parametrize(
  "module, args, message",
  [
    (
      "hfjax.experiments.train",
      ["--config", str(CONFIGS / "digits_classifier.py"), "--config.optimizer.name=rmsprop"],
      "error: config.optimizer.name='rmsprop'; choose one of",
    ),
    (
      "hfjax.experiments.ablation",
      ["--config", str(CONFIGS / "ablation_curves_large.py"), "--config.variants=hf,newton"],
      "error: unknown variants ['newton']",
    ),
  ],
  ids=["train", "ablation"],
)
def test_cli_loads_configs_by_path_from_another_directory(tmp_path, module, args, message):
  # The configs load their siblings (default.py, curves_autoencoder.py, ablation.py) by path,
  # not through the working directory: the run gets as far as checking the overridden value.
  result = _cli(*args, "--workdir", str(tmp_path / "run"), module=module, cwd=tmp_path)
  assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(message), result.stderr


_LOAD_CONFIGS = """
import importlib.util, json, pathlib, sys

def keys(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from keys(value, f"{prefix}{key}.")
    else:
      yield prefix + key

loaded = {}
for path in map(pathlib.Path, sys.argv[1:]):  # loaded by path, as --config loads them
  spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config().to_dict()
  # A training config (under ""), or an ablation config's task configs ("base" of each).
  tasks = {k: v["base"] for k, v in config.items() if isinstance(v, dict) and "base" in v}
  loaded[path.stem] = {name: sorted(keys(base)) for name, base in (tasks or {"": config}).items()}
print(json.dumps({"configs": loaded, "modules": sorted(sys.modules)}))
"""


def test_configs_start_from_default_and_never_import_the_trainer(tmp_path):
  result = subprocess.run(
    [sys.executable, "-c", _LOAD_CONFIGS, *map(str, sorted(CONFIGS.glob("*.py")))],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    env={**os.environ, "PYTHONPATH": str(REPO)},
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  out = json.loads(result.stdout)
  for module in ("train", "optimizers", "task", "ablation", "main"):
    assert f"hfjax.experiments.{module}" not in out["modules"], module
  configs = out["configs"]
  default = sorted(_flat_keys(config_lib.default_config().to_dict()))
  assert configs["default"] == {"": default}
  assert set(configs["ablation"]) == {"curves", "digits", "mnist"}
  assert set(configs["ablation_curves_large"]) == {"curves", "digits", "mnist"}
  # Every training config has exactly the default's keys; only the data set's differ.
  expected = [key for key in default if not key.startswith("dataset.")]
  for name, tasks in configs.items():
    for task, keys in tasks.items():
      assert [key for key in keys if not key.startswith("dataset.")] == expected, (name, task)


def _flat_keys(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat_keys(value, f"{prefix}{key}.")
    else:
      yield prefix + key


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"optimizer.gradient_schedule.kind": "cubic"}, "config.optimizer.gradient_schedule.kind"),
    ({"optimizer.curvature_schedule.start": 5000}, "optimizer.curvature_schedule.start=5000"),
    ({"optimizer.preconditioner": "cholesky"}, "unknown preconditioner 'cholesky'"),
    ({"optimizer.preconditioner": "kfac"}, "set --config.flatten_params=False"),
    ({"optimizer.kfac.decay": 1.0}, "kfac.decay must be in"),
    ({"optimizer.damping.ratio": "curvature"}, "unknown damping.ratio 'curvature'"),
    ({"model.kind": "autoencoder"}, "has labels"),
    ({"optimizer.curvature_matmul_dtype": "int8"}, "curvature_matmul_dtype must be None or a"),
  ],
)
def test_bad_config_values_raise_value_errors(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(_config("digits_classifier", **overrides), tmp_path)


def test_mnist_without_a_path_names_the_flag(tmp_path):
  with pytest.raises(ValueError, match="--config.dataset.path"):
    train.train_and_evaluate(_config("mnist_autoencoder"), tmp_path)


@pytest.mark.parametrize("name", ["adam", "sgd", "lbfgs"])
def test_optax_peers_train(tmp_path, name):
  config = _config(
    "digits_classifier",
    **{"optimizer.name": name, "optimizer.learning_rate": 0.05, "num_steps": 6},
  )
  summary = train.train_and_evaluate(config, tmp_path)
  records = _records(tmp_path)
  assert summary["final_train_loss"] < records[0]["eval_train_loss"]
  if name != "lbfgs":
    assert records[1]["examples_processed"] == 2 * config.optimizer.batch_size
  assert "damping" not in records[1]


def test_interrupted_run_saves_a_checkpoint_and_resumes(tmp_path, monkeypatch):
  pytest.importorskip("orbax.checkpoint")
  original = train._stop_reason

  def interrupt_after_two(config, step, *args):
    if step == 2:
      raise KeyboardInterrupt
    return original(config, step, *args)

  config = _config("digits_classifier", num_steps=4)
  monkeypatch.setattr(train, "_stop_reason", interrupt_after_two)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, tmp_path)
  monkeypatch.setattr(train, "_stop_reason", original)
  assert (tmp_path / "checkpoints").is_dir()
  summary = train.train_and_evaluate(config, tmp_path, resume=True)
  assert summary["steps"] == 4
  records = _records(tmp_path)
  assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
  assert records[3]["examples_processed"] > records[2]["examples_processed"]


def test_runs_on_a_one_device_mesh(tmp_path):
  pytest.importorskip("hfjax.sharding")
  config = _config("digits_classifier", num_steps=2, mesh_shape=(1,))
  summary = train.train_and_evaluate(config, tmp_path)
  assert summary["steps"] == 2


def test_hf_example_count_follows_its_definition():
  info = {
    "gradient_batch_size": 1000,
    "curvature_batch_size": 100,
    "cg_steps": 10,
    # Three recorded iterates walked on the curvature sample (the second newest won, the
    # third stopped the walk), then the chosen one on the gradient sample.
    "backtracking_evaluations": 4,
    "line_search_evaluations": 2,  # t = 0.8 and 0.8**2 after t = 1
  }
  count = optimizers._hf_examples(info, "martens", variance_test=False)
  gradient, linearise, products = 2 * 1000, 100, 2 * 100 * 11
  backtracking, step_and_search, martens = 3 * 100, 3 * 1000, 2 * 100
  assert count == gradient + linearise + products + backtracking + step_and_search + martens


def test_default_config_holds_the_library_defaults_of_damping_and_kfac():
  opt = config_lib.default_config().optimizer
  assert opt.damping.to_dict() == hfjax.DampingConfig()._asdict()
  assert opt.kfac.to_dict() == hfjax.KFACConfig()._asdict()


def test_hf_options_reach_hessian_free(monkeypatch):
  seen, hessian_free = {}, hfjax.hessian_free

  def spy(*args, **kwargs):
    seen.update(kwargs)
    return hessian_free(*args, **kwargs)

  monkeypatch.setattr(optimizers.hfjax, "hessian_free", spy)
  overrides = {
    "flatten_params": False,
    "optimizer.preconditioner": "kfac+lbfgs",
    "optimizer.lbfgs_pairs": "previous",
    "optimizer.kfac.update_every": 3,
    "optimizer.kfac.decay": 0.5,
    "optimizer.kfac.loss": "softmax_cross_entropy",
    "optimizer.kfac.inverse_every": 5,
    "optimizer.damping.ratio": "martens",
    "optimizer.damping.minimum": 1e-3,
    "optimizer.adaptive_warm_start": True,
    "optimizer.curvature_matmul_dtype": "bfloat16",
  }
  config = _config("digits_classifier", **overrides)
  task = task_lib.load_task(config)
  sampler = hfjax.BatchSampler((task.data.x_train, task.data.y_train), seed=0)
  optimizers.build_optimizer(config, task, sampler)
  assert seen["preconditioner"] == "kfac+lbfgs" and seen["lbfgs_pairs"] == "previous"
  assert seen["kfac"] == hfjax.KFACConfig(
    update_every=3, decay=0.5, loss="softmax_cross_entropy", inverse_every=5
  )
  assert seen["damping"] == hfjax.DampingConfig(ratio="martens", minimum=1e-3)
  assert seen["warm_start_decay"] == "adaptive"
  assert seen["curvature_matmul_dtype"] == "bfloat16"


def test_equal_samples_pass_the_curvature_batch_once(monkeypatch):
  """With equal gradient and curvature samples the trainer passes one batch: the step equals
  ``update`` given both batches explicitly, with one loss evaluation less."""
  made, hessian_free = [], hfjax.hessian_free

  def spy(*args, **kwargs):
    made.append((args, kwargs))
    return hessian_free(*args, **kwargs)

  monkeypatch.setattr(optimizers.hfjax, "hessian_free", spy)
  size = 300
  config = _config(
    "digits_classifier",
    **{
      "optimizer.gradient_schedule.start": size,
      "optimizer.curvature_schedule.start": size,
      "optimizer.max_cg_steps": 5,
    },
  )
  task = task_lib.load_task(config)
  data = (task.data.x_train, task.data.y_train)
  optimizer = optimizers.build_optimizer(config, task, hfjax.BatchSampler(data, seed=0))
  optimizer.sync(optimizer.state)
  params, state, _ = optimizer.run(task.params, optimizer.state, lambda tree: tree)

  args, kwargs = made[0]
  tx = hessian_free(*args, **kwargs)
  batch, curvature_batch = hfjax.BatchSampler(data, seed=0).sample_pair(size, size)
  loss, grads = jax.value_and_grad(optimizers.batch_loss(task))(task.params, batch)

  @jax.jit
  def explicit(params, state):
    return tx.update(grads, state, params, batch=batch, curvature_batch=curvature_batch, loss=loss)

  updates, explicit_state = explicit(task.params, optimizer.state)
  expected = optax.apply_updates(task.params, updates)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
    assert jnp.allclose(got, want, rtol=1e-4, atol=1e-5)
  evaluations = lambda s: int(optax.tree.get(s, "backtracking_evaluations"))
  assert evaluations(state) == evaluations(explicit_state) - 1


def test_kfac_run_finds_its_layers_and_counts_its_refreshes(tmp_path):
  config = _config(
    "digits_classifier",
    **{
      "flatten_params": False,
      "optimizer.preconditioner": "kfac",
      "optimizer.kfac.update_every": 2,
      # rho on the gradient batch: no loss at the incoming parameters on the curvature sample.
      "optimizer.damping.ratio": "gradient",
      "num_steps": 3,
    },
  )
  with warnings.catch_warnings():
    # K-FAC warns when a leaf falls back to a diagonal: every leaf here is in a dense layer.
    warnings.simplefilter("error", UserWarning)
    summary = train.train_and_evaluate(config, tmp_path)
  records = _records(tmp_path)
  assert summary["final_train_loss"] < records[0]["eval_train_loss"]
  n_g, n_c = 1437, 100
  for before, record in zip(records, records[1:], strict=False):
    spent = record["examples_processed"] - before["examples_processed"]
    walk = record["backtracking_evaluations"] - 1
    expected = (
      2 * n_g  # gradient
      + n_c * (1 + 2 * (record["cg_steps"] + 1))  # linearisation, warm start and CG products
      + walk * n_c  # recorded iterates walked on the curvature sample
      + (1 + record["line_search_evaluations"]) * n_g  # chosen step and line search
      + (2 * n_c if record["step"] in (1, 3) else 0)  # K-FAC refreshes at counts 0 and 2
    )
    assert spent == expected, record["step"]


def test_hf_example_count_skips_unbuilt_preconditioners():
  info = {
    "gradient_batch_size": 1000,
    "curvature_batch_size": 100,
    "cg_steps": 10,
    "backtracking_evaluations": 4,
    "line_search_evaluations": 2,
  }
  plain = optimizers._hf_examples(info, "none", variance_test=False)
  assert optimizers._hf_examples(info, "kfac", variance_test=False) == plain + 2 * 100
  assert optimizers._hf_examples(info, "kfac+lbfgs", variance_test=False, built=False) == plain


def test_ablation_writes_its_table_and_plots(tmp_path):
  spec = importlib.util.spec_from_file_location("config_ablation", CONFIGS / "ablation.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict(
    {
      "seeds": (0, 1),
      "tasks": "digits",
      "variants": "hf,adam",
      "compilation_cache": False,
      "digits.adam_learning_rates": (1e-2,),
      "digits.base.budget_examples": 40_000,
      "digits.base.num_steps": 3,
      **{f"digits.base.{key}": value for key, value in TINY.items()},
    }
  )
  report = ablation.run_ablation(config, tmp_path)
  assert report == (tmp_path / "RESULTS.md").read_text()
  rows = [line for line in report.splitlines() if line.startswith("| ")]
  assert rows[0].startswith("| method |")
  assert [row.split(" | ")[0] for row in rows[1:]] == [
    "| HF baseline (no preconditioner, fixed samples)",
    "| Adam (lr 0.01)",
  ]
  assert "| 2/2 |" in rows[1]  # the automatic target is reached by every baseline seed
  for name in ("digits_train_loss.png", "digits_test_loss.png"):
    assert (tmp_path / name).stat().st_size > 1000
  assert len(list(tmp_path.glob("digits/*/seed*/summary.json"))) == 4


def test_ablation_rejects_unknown_variants(tmp_path):
  result = _cli(
    "--config",
    "configs/ablation.py",
    "--config.variants=hf,newton",
    "--workdir",
    str(tmp_path),
    module="hfjax.experiments.ablation",
  )
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "error: unknown variants ['newton']" in result.stderr


def test_markdown_table_writes_each_row_under_its_columns():
  table = report_lib.markdown_table(("a", "b"), [(1, "x"), (2.5, "—")])
  assert table == "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | — |"
  with pytest.raises(ValueError, match="a row of 1 cells under 2 columns"):
    report_lib.markdown_table(("a", "b"), [(1,)])


def _runs(times: dict[str, list[float]], finals: dict[str, float]) -> dict:
  """Per method, one run per seed: loss 10 at 0 s, then ``finals[key]`` at each seed's time."""
  return {
    key: [
      [
        {"step": 0, "wall_time": 0.0, "examples_processed": 0, "eval_train_loss": 10.0},
        {"step": 1, "wall_time": t, "examples_processed": 1000, "eval_train_loss": finals[key]},
      ]
      for t in seed_times
    ]
    for key, seed_times in times.items()
  }


@pytest.mark.parametrize(
  "times, finals, expected",
  [
    # speed-up 4/2 >= 1.5 with the same final loss; the fastest HF (2 s) beats Adam (3 s).
    (
      {"hf": [4, 4], "hf_lbfgs_geometric": [2, 2], "adam_0.001": [3, 3]},
      {"hf": 0.5, "hf_lbfgs_geometric": 0.5, "adam_0.001": 0.5},
      [(2.0, True), (1.0, True), (1.5, True)],
    ),
    # speed-up 4/3 < 1.5, a final loss 1.2x the baseline's, Adam (1 s) faster than HF.
    (
      {"hf": [4, 4], "hf_lbfgs_geometric": [3, 3], "adam_0.001": [1, 1]},
      {"hf": 0.5, "hf_lbfgs_geometric": 0.6, "adam_0.001": 0.5},
      [(4 / 3, False), (1.2, False), (1 / 3, False)],
    ),
    # The paper's method misses the target (loss 2 > 1): no speed-up; no peer reaches it.
    (
      {"hf": [4, 4], "hf_lbfgs_geometric": [2, 2], "adam_0.001": [1, 1]},
      {"hf": 0.5, "hf_lbfgs_geometric": 2.0, "adam_0.001": 3.0},
      [(None, False), (4.0, False), (None, True)],
    ),
  ],
)
def test_ablation_goals_are_computed_from_the_numbers(times, finals, expected):
  task = ablation.task_config(config_lib.default_config(), adam_learning_rates=(1e-3,))
  rows = ablation.methods(task, ["hf", "hf_lbfgs_geometric", "adam"])
  checks = report_lib.checks(_runs(times, finals), rows, target=1.0)
  assert [(c.measured, c.met) for c in checks] == [
    (pytest.approx(value) if value is not None else None, met) for value, met in expected
  ]
  lines = report_lib.goals(_runs(times, finals), rows, target=1.0)
  verdicts = [re.search(r"\(goal [^)]*\): (met|missed)[;.]", line) for line in lines]
  assert [v and v[1] for v in verdicts] == ["met" if met else "missed" for _, met in expected]


def _timed_runs(spec: dict[str, tuple[float, int, float]], seeds: int = 2) -> dict:
  """Per method, ``seeds`` equal runs: loss 10 at 0 s, then ``final`` at ``(time, examples)``."""
  return {
    key: [
      [
        {"step": 0, "wall_time": 0.0, "examples_processed": 0, "eval_train_loss": 10.0},
        {"step": 1, "wall_time": t, "examples_processed": n, "eval_train_loss": final},
      ]
    ]
    * seeds
    for key, (t, n, final) in spec.items()
  }


def test_ablation_says_what_each_acceleration_pays_from_the_numbers():
  runs = _timed_runs(
    {
      "hf": (12, 6000, 0.5),
      "hf_lbfgs": (10, 5000, 0.5),
      "hf_geometric": (6, 3000, 0.5),
      "hf_lbfgs_geometric": (3, 1000, 2.0),  # misses the target 1
      "hf_kfac": (8, 4000, 0.5),
      "hf_kfac_lbfgs": (10, 4000, 0.5),
      "hf_kfac_geometric": (4, 1000, 0.5),
      "hf_kfac_lbfgs_geometric": (5, 2000, 0.5),
    }
  )
  task = ablation.task_config(config_lib.default_config())
  rows = ablation.methods(task, list(runs))
  lines = report_lib.accelerations(runs, rows, target=1.0)
  header = "speed-up in time / examples to target against"
  assert lines == [
    f"With no preconditioner underneath, {header} HF baseline (no preconditioner, fixed "
    "samples): L-BFGS pays 1.20x / 1.20x, sampling pays 2.00x / 2.00x, L-BFGS + sampling not "
    "measured (L-BFGS + geometric sampling (Sainath et al.) reaches the target in 0/2 seeds); "
    "in time, both pay, sampling more.",
    f"With K-FAC underneath, {header} K-FAC: L-BFGS pays 0.80x / 1.00x, sampling pays 2.00x / "
    "4.00x, L-BFGS + sampling pays 1.60x / 2.00x; in time, only sampling pays.",
    f"K-FAC in place of no preconditioner, {header} the same variant without it: alone 1.50x / "
    "1.50x, with L-BFGS 1.00x / 1.25x, with sampling 1.50x / 3.00x, with both not measured "
    "(L-BFGS + geometric sampling (Sainath et al.) reaches the target in 0/2 seeds).",
  ]
  subset = {key: runs[key] for key in ("hf_kfac", "hf_kfac_geometric")}
  assert report_lib.accelerations(subset, ablation.methods(task, list(subset)), 1.0) == [
    f"With K-FAC underneath, {header} K-FAC: sampling pays 2.00x / 4.00x; in time, only "
    "sampling pays (L-BFGS not measured)."
  ]
  missed = {**subset, "hf_kfac": _timed_runs({"hf_kfac": (8, 4000, 2.0)})["hf_kfac"]}
  assert report_lib.accelerations(missed, ablation.methods(task, list(missed)), 1.0) == [
    f"With K-FAC underneath, {header} K-FAC: not measured (K-FAC reaches the target in 0/2 seeds)."
  ]


def test_ablation_runs_the_kfac_variants_on_unflattened_parameters(tmp_path):
  spec = importlib.util.spec_from_file_location("config_ablation", CONFIGS / "ablation.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  # K-FAC alone, and under both accelerations (L-BFGS with K-FAC as H0, growing samples).
  kfac_variants = ["hf_kfac", "hf_kfac_lbfgs_geometric"]
  config.update_from_flattened_dict(
    {
      "seeds": (0,),
      "tasks": "digits",
      "variants": ",".join(["hf", *kfac_variants]),
      "compilation_cache": False,
      "digits.base.budget_examples": 40_000,
      "digits.base.num_steps": 3,
      **{f"digits.base.{key}": value for key, value in TINY.items()},
    }
  )
  report = ablation.run_ablation(config, tmp_path)
  rows = [line for line in report.splitlines() if line.startswith("| ")]
  assert [row.split(" | ")[0] for row in rows[2:]] == [
    "| + K-FAC",
    "| + K-FAC + L-BFGS + geometric sampling",
  ]
  assert "- With K-FAC underneath, speed-up in time / examples to target against K-FAC:" in report
  for key in kfac_variants:
    run = json.loads((tmp_path / "digits" / key / "seed0" / "config.json").read_text())
    assert run["flatten_params"] is False and run["optimizer"]["preconditioner"].startswith("kfac")
    assert len(_records(tmp_path / "digits" / key / "seed0")) > 1
  hf = json.loads((tmp_path / "digits" / "hf" / "seed0" / "config.json").read_text())
  assert hf["flatten_params"] is True


@pytest.mark.parametrize(
  "gradient, curvature",
  [
    (hfjax.geometric_schedule(100, 20000, 1.15), hfjax.geometric_schedule(10, 2000, 1.15)),
    (hfjax.geometric_schedule(1250, 5000, 1.2, 1.5), hfjax.fixed_schedule(125)),
    (hfjax.geometric_schedule(7, 4000, 2.0), hfjax.geometric_schedule(3, 300, 1.07, 1.3)),
  ],
  ids=["curves", "grid-1.5", "factor-2"],
)
def test_host_follows_the_sample_sizes_the_step_computes(gradient, curvature):
  # The step's own update of the sizes, jitted as in the step, is the oracle.
  from hfjax import sampling

  update = jax.jit(lambda state: sampling.sampling_update(state, gradient, curvature))
  state = sampling.sampling_init(gradient, curvature)
  host = optimizers.HostSchedule(gradient, curvature)
  seen = set()
  for _ in range(120):
    sizes = (int(state.gradient_sample_size), int(state.curvature_sample_size))
    assert host.sizes(None) == sizes
    seen.add(sizes)
    state = update(state)
    host.advance()
  assert len(seen) >= 4 and max(seen)[0] == gradient.maximum


@pytest.fixture
def device_to_host_guard(monkeypatch):
  """``jax.transfer_guard_device_to_host`` made to fire on the CPU backend too.

  The CPU backend never fires it (its arrays are host memory), so jax.Array's host value,
  the path of ``float()``, ``int()``, ``np.asarray`` and ``jax.device_get``, raises wherever
  the guard says ``"disallow"``. Yields the shapes of the reads allowed.
  """
  from jax._src import array

  host_value = array.ArrayImpl._value
  reads = []

  def value(self):
    if str(jax.transfer_guard_device_to_host.value).startswith("disallow"):
      raise AssertionError(f"a device-to-host read between reads, shape {self.shape}")
    reads.append(self.shape)
    return host_value.fget(self)

  monkeypatch.setattr(array.ArrayImpl, "_value", property(value))
  with pytest.raises(AssertionError, match="device-to-host read"):
    with jax.transfer_guard_device_to_host("disallow"):
      float(jax.numpy.ones(()) + 1)  # the negative control: the old per-step read
  yield reads


def test_steps_between_reads_make_no_device_to_host_transfer(tmp_path, device_to_host_guard):
  geometric = {"kind": "geometric", "start": 719, "maximum": 1437, "factor": 1.5}
  overrides = {
    "num_steps": 7,
    "eval_every": 3,
    **{f"optimizer.gradient_schedule.{k}": v for k, v in geometric.items()},
  }
  for log_every in (4, 1):
    config = _config("digits_classifier", log_every=log_every, **overrides)
    train.train_and_evaluate(config, tmp_path / str(log_every))
  assert device_to_host_guard  # reads happen, at the read points
  grouped, each = _records(tmp_path / "4"), _records(tmp_path / "1")
  # One record per step and the same steps, whether read in groups or one by one.
  assert [r["step"] for r in grouped] == list(range(8))
  assert [r["step"] for r in grouped if "test_loss" in r] == [0, 3, 6, 7]
  # Sizes drawn as the step grows them, without reading them: 719 * 1.5 rounds up to all.
  assert [r["gradient_batch_size"] for r in grouped[1:]] == [719] + [1437] * 6
  timeless = lambda r: {k: v for k, v in r.items() if k != "wall_time"}
  assert list(map(timeless, grouped)) == list(map(timeless, each))
  walls = [r["wall_time"] for r in grouped]
  assert walls == sorted(walls)


def test_variance_test_sampling_reads_only_its_sizes_between_reads(tmp_path, device_to_host_guard):
  # The variance test decides the next sizes on the device: the one read allowed in between.
  variance = {"kind": "variance", "start": 1437, "maximum": 1437}
  overrides = {f"optimizer.gradient_schedule.{k}": v for k, v in variance.items()}
  config = _config("digits_classifier", num_steps=3, eval_every=0, log_every=3, **overrides)
  train.train_and_evaluate(config, tmp_path)
  assert [r["step"] for r in _records(tmp_path)] == [0, 1, 2, 3]

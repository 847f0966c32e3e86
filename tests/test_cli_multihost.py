"""The training CLI as two JAX processes of 4 CPU devices each, against one process.

Both processes run ``python -m hfjax.experiments.train`` with ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (gloo CPU collectives on localhost): the run is
data-parallel over all 8 devices, each process placing only its own share of every batch.
Only process 0 writes the metrics and the summary and prints; both write the checkpoints
through Orbax, and both restore them: the two processes stop after half the steps and are
started again with ``--resume``. The per-step losses, the evaluations and the final
parameters must match a one-device run of the same config to a relative 1e-5 (float32; the
reductions over examples are split differently, so not bitwise).
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

REPO = pathlib.Path(__file__).resolve().parents[1]
DEVICES_PER_PROCESS, NUM_PROCESSES, NUM_STEPS = 4, 2, 4
# Batches that the 8 devices divide. One recorded CG iterate: CG backtracking chooses among
# iterates whose losses can tie to round-off, a choice that another reduction order flips.
OVERRIDES = {
  "dataset.num_train": 512,
  "dataset.num_test": 128,
  "model.encoder_sizes": (16, 4),
  "optimizer.gradient_schedule.start": 256,
  "optimizer.curvature_schedule.start": 64,
  "optimizer.num_recorded_iterates": 1,
  "num_steps": NUM_STEPS,
  "eval_every": 2,
  "eval_train_examples": 0,
  "checkpoint_every": 2,
  "log_every": 2,
  "progress": False,
  "plot": False,
}


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def _start(workdir: pathlib.Path, env: dict, *flags: str, num_steps=NUM_STEPS) -> subprocess.Popen:
  overrides = {**OVERRIDES, "num_steps": num_steps}
  args = [f"--config.{key}={value}".replace(" ", "") for key, value in overrides.items()]
  command = [sys.executable, "-m", "hfjax.experiments.train", f"--config={REPO}/configs/default.py"]
  return subprocess.Popen(
    [*command, *args, f"--workdir={workdir}", *flags],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _finish(process: subprocess.Popen) -> tuple[str, str]:
  try:
    out, err = process.communicate(timeout=300)
  finally:
    process.kill()
  err = "\n".join(line for line in err.splitlines() if "[Gloo]" not in line)
  assert process.returncode == 0, err[-3000:]
  return out, err


def _final_params(workdir: pathlib.Path):
  """The parameters of the last checkpoint, restored onto this process's one device."""
  import hfjax
  from hfjax import checkpoint
  from hfjax.experiments import config as config_lib
  from hfjax.experiments import optimizers
  from hfjax.experiments import task as task_lib

  config = config_lib.default_config()
  config.update_from_flattened_dict(OVERRIDES)
  task = task_lib.load_task(config)
  sampler = hfjax.BatchSampler((task.data.x_train, task.data.y_train))
  like = optimizers.build_optimizer(config, task, sampler).state
  step, params, _, _ = checkpoint.restore_checkpoint(
    workdir / "checkpoints", task.unravel(task.params), like
  )
  assert step == NUM_STEPS
  return params


def test_two_processes_train_as_one(tmp_path):
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": re.sub(
      r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    ),
  }
  one = _start(tmp_path / "one", env)
  several = {
    **env,
    "JAX_NUM_CPU_DEVICES": str(DEVICES_PER_PROCESS),
    "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
    # The second start finds the programs the first compiled.
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }

  def start_both(*flags: str, num_steps: int) -> list[str]:
    port = _free_port()
    processes = [
      _start(
        tmp_path / "two",
        several,
        f"--coordinator_address=localhost:{port}",
        f"--num_processes={NUM_PROCESSES}",
        f"--process_id={index}",
        *flags,
        num_steps=num_steps,
      )
      for index in range(NUM_PROCESSES)
    ]
    return [_finish(process) for process in processes]

  start_both(num_steps=NUM_STEPS // 2)
  assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["2"]
  (out0, err0), (out1, _) = start_both("--resume", num_steps=NUM_STEPS)
  assert "no checkpoint" not in err0  # resumed from step 2
  _finish(one)
  # Only process 0 prints and writes; the metrics hold each step once.
  assert "summary:" in out0 and "summary:" not in out1
  records = {
    name: [
      json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]
    for name in ("one", "two")
  }
  assert [r["step"] for r in records["two"]] == list(range(NUM_STEPS + 1))
  keys = ("train_loss", "eval_train_loss", "test_loss")
  for expected, record in zip(records["one"], records["two"], strict=True):
    for key in keys:
      if key in expected:
        assert record[key] == pytest.approx(expected[key], rel=1e-5), (record["step"], key)
  summary = json.loads((tmp_path / "two" / "summary.json").read_text())
  assert summary["steps"] == NUM_STEPS
  assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["2", "4"]
  import jax

  expected, got = _final_params(tmp_path / "one"), _final_params(tmp_path / "two")
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
    scale = np.max(np.abs(a))
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) <= 1e-5 * scale

"""The training CLI killed with SIGKILL at any moment and resumed ends as if never stopped.

Real subprocesses of ``python -m hfjax.experiments.train`` are killed during a step, during an
evaluation, between writing a step's records and its checkpoint, and while Orbax writes a
checkpoint (an outside kill as soon as its temporary directory appears), and each time
restarted with ``--resume``; the per-step training losses must equal, bit for bit, those of a
run that never stopped. The aimed kills use the trainer's test hook ``HFJAX_CRASH_AT``.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("orbax.checkpoint")  # checkpoints are an optional dependency

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECKPOINT_EVERY, NUM_STEPS = 2, 8
# A small CURVES autoencoder; geometric gradient samples and L-BFGS pairs kept between solves,
# so that the sampler, the schedule's targets and the L-BFGS memory must all resume.
ARGS = (
  "--config=" + str(REPO / "configs" / "default.py"),
  "--config.dataset.num_train=512",
  "--config.dataset.num_test=128",
  "--config.model.encoder_sizes=(16,4)",
  "--config.optimizer.gradient_schedule.kind=geometric",
  "--config.optimizer.gradient_schedule.start=128",
  "--config.optimizer.gradient_schedule.maximum=512",
  "--config.optimizer.gradient_schedule.factor=1.5",
  "--config.optimizer.curvature_schedule.start=64",
  "--config.optimizer.lbfgs_pairs=previous",
  "--config.optimizer.max_cg_steps=20",
  f"--config.num_steps={NUM_STEPS}",
  "--config.eval_every=3",
  "--config.log_every=3",  # steps read in groups: at 2, 3, 4, 6 and 8
  "--config.eval_train_examples=0",
  f"--config.checkpoint_every={CHECKPOINT_EVERY}",
  "--config.progress=False",
  "--config.plot=False",
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  # One persistent XLA cache for every run here: only the first compiles.
  return {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "JAX_PLATFORMS": "cpu",
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }


def _command(workdir: pathlib.Path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "hfjax.experiments.train", *ARGS, f"--workdir={workdir}", *extra]


def _train(env: dict, workdir: pathlib.Path, *extra: str, crash_at: str = "") -> str:
  """Runs the CLI; with ``crash_at`` it must die by SIGKILL. Returns its stderr."""
  result = subprocess.run(
    _command(workdir, *extra),
    env={**env, "HFJAX_CRASH_AT": crash_at},
    capture_output=True,
    text=True,
    timeout=300,
  )
  expected = -signal.SIGKILL if crash_at else 0
  assert result.returncode == expected, result.stderr[-3000:]
  return result.stderr


def _kill_while_checkpointing(env: dict, workdir: pathlib.Path, step: int) -> pathlib.Path:
  """Resumes and kills the run from outside as soon as checkpoint ``step`` is being written."""
  tmp = workdir / "checkpoints" / f"{step}.orbax-checkpoint-tmp"
  process = subprocess.Popen(
    _command(workdir, "--resume"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  try:
    while not tmp.exists():
      assert process.poll() is None, "the run ended without writing the checkpoint"
      time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
  finally:
    process.kill()
    process.wait()
  return tmp


def _metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(workdir: pathlib.Path) -> list[str]:
  directory = workdir / "checkpoints"
  return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _losses(records: list[dict]) -> list[tuple]:
  """Each step's training loss and each evaluation, as exact floats (JSON keeps every bit)."""
  keys = ("step", "train_loss", "eval_train_loss", "test_loss")
  return [tuple(record.get(key) for key in keys) for record in records]


def test_killed_anywhere_and_resumed_ends_with_the_same_losses(env, tmp_path):
  # The run that never stops goes alongside the killed ones.
  straight = tmp_path / "straight"
  reference = subprocess.Popen(
    _command(straight), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  run = tmp_path / "killed"
  # 1. During the first step, before any checkpoint: --resume starts from step 0.
  _train(env, run, crash_at="step:1")
  assert _checkpoints(run) == []
  stderr = _train(env, run, "--resume", crash_at="evaluation:2")
  assert "no checkpoint" in stderr and "starting from step 0" in stderr
  # 2. Killed in the evaluation of step 3: checkpoint 2 holds, records 0-2 are written.
  assert _checkpoints(run) == ["2"]
  assert [r["step"] for r in _metrics(run)] == [0, 1, 2]
  # 3. A kill in the middle of a write leaves a torn line; it is dropped on resume. Then the
  # run is killed after writing the records of steps 5 and 6 but before checkpoint 6.
  with (run / "metrics.jsonl").open("a") as log:
    log.write('{"step": 3, "wall_t')
  _train(env, run, "--resume", crash_at="records:3")
  assert _checkpoints(run) == ["2", "4"]
  assert [r["step"] for r in _metrics(run)] == list(range(7))
  # 4. Killed while Orbax writes checkpoint 6: the temporary directory is never restored.
  tmp = _kill_while_checkpointing(env, run, step=6)
  assert tmp.exists() and "6" not in _checkpoints(run)
  from hfjax import checkpoint

  assert checkpoint.latest_step(run / "checkpoints") == 4
  # 5. Runs to the end, redoing steps 5 and 6.
  _train(env, run, "--resume")
  assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
  expected = _losses(_metrics(straight))
  assert [step for step, *_ in expected] == list(range(NUM_STEPS + 1))
  resumed = _metrics(run)
  assert _losses(resumed) == expected
  summary = json.loads((run / "summary.json").read_text())
  assert summary["steps"] == NUM_STEPS
  assert summary["final_train_loss"] == expected[-1][2]
  assert not list(run.glob(".*.tmp*"))
  # Saving step 6 again replaced the unfinished directory; Orbax kept the newest three.
  assert _checkpoints(run) == ["4", "6", "8"]

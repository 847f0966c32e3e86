"""A long run: 500 outer steps of hessian_free with geometric sampling on a small model.

Over the run the parameters and the optimizer state stay finite, the jitted step compiles
once per batch shape the schedules visit (counted from JAX's compilation events), and the
resident memory of the process stops growing once every shape is compiled. A step that
retraced (a state dtype drifting, a weak type, a Python value baked into the program) would
compile again; one that leaked host or device buffers would grow the resident memory.
"""

import resource
import sys
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
import toy

import hfjax

NUM_STEPS = 500
WARM_UP = 100  # steps after the last new shape before resident memory is expected flat
# Largest growth of the resident memory allowed between the end of the warm-up and the end of
# the run. Measured with ``python tests/test_long_run.py [steps [leak]]`` on the 2-core CPU:
# +0.02 to +0.21 MiB over those ~400 steps, +0.27 MiB over 1,400 (about what this loop's own
# lists of sizes and losses take); keeping each step's batches alive (``leak``) adds +8.1 MiB
# over 400 steps.
RSS_GROWTH_BOUND_MIB = 2.0

GRADIENT = hfjax.geometric_schedule(32, 128, factor=1.3)
CURVATURE = hfjax.geometric_schedule(16, 64, factor=1.3)


def resident_mib() -> float:
  """The process's resident set size in MiB: ``VmRSS`` of ``/proc/self/status``, or where
  there is no ``/proc`` the peak (which stops growing when the resident size does)."""
  try:
    with open("/proc/self/status") as status:
      return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
  except FileNotFoundError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, else KiB
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class Run(NamedTuple):
  """What the long run recorded.

  Attributes:
    sizes: ``(gradient, curvature)`` batch sizes of each step.
    compiled: ``(step, function name)`` of each XLA compilation during the run.
    first_seen: step at which each batch shape first appeared.
    resident: resident memory after each step, MiB.
    losses: loss before each step.
    state: the last optimizer state.
    params: the last parameters.
    seconds: wall time of the run.
  """

  sizes: list[tuple[int, int]]
  compiled: list[tuple[int, str]]
  first_seen: dict[tuple[int, int], int]
  resident: np.ndarray
  losses: np.ndarray
  state: Any
  params: Any
  seconds: float


def long_run(num_steps: int = NUM_STEPS, preconditioner: str = "kfac", leak: bool = False) -> Run:
  """``num_steps`` jitted outer steps drawing batches of the schedules' sizes; ``leak`` keeps
  every step's batches on the device (the measurement's negative control)."""
  tx = hfjax.hessian_free(
    toy.apply_fn,
    toy.loss_fn,
    preconditioner=preconditioner,
    max_cg_steps=10,
    gradient_schedule=GRADIENT,
    curvature_schedule=CURVATURE,
  )
  step = toy.make_step(tx)
  sampler = hfjax.BatchSampler(toy.regression_data(GRADIENT.maximum), seed=0)
  params = toy.init_params()
  state = tx.init(params)
  compiled, sizes, first_seen, resident, losses, leaked = [], [], {}, [], [], []

  def on_event(event: str, duration: float, **kwargs: Any) -> None:
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append((len(sizes) - 1, kwargs.get("fun_name", "?")))

  jax.monitoring.register_event_duration_secs_listener(on_event)
  start = time.perf_counter()
  try:
    for i in range(num_steps):
      pair = hfjax.sample_sizes(state)
      first_seen.setdefault(pair, i)
      sizes.append(pair)
      batches = jax.device_put(sampler.sample_pair(*pair))
      params, state = step(params, state, *batches)
      if leak:
        leaked.append(batches)
      losses.append(float(state.info.loss_before))
      resident.append(resident_mib())
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  seconds = time.perf_counter() - start
  return Run(
    sizes, compiled, first_seen, np.array(resident), np.array(losses), state, params, seconds
  )


def test_500_steps_stay_finite_compile_once_per_size_and_stop_growing():
  # One run for the three checks (a module fixture would run once per xdist worker).
  run = long_run()
  _check_finite_and_trained(run)
  _check_compiled_once_per_grid_size(run)
  _check_resident_memory_flat(run)


def _check_finite_and_trained(run: Run) -> None:
  assert hfjax._tree.all_finite(run.params)
  assert hfjax._tree.all_finite(optax.tree.get(run.state, "warm_start"))
  assert np.all(np.isfinite(run.losses))
  assert np.isfinite(float(run.state.damping))
  assert int(run.state.count) == NUM_STEPS
  assert run.losses[-1] < 0.1 * run.losses[0], run.losses[[0, -1]]


def _check_compiled_once_per_grid_size(run: Run) -> None:
  shapes = sorted(run.first_seen)
  # The schedules reached their maxima and every size came from their grids.
  assert shapes[-1] == (GRADIENT.maximum, CURVATURE.maximum)
  assert {g for g, _ in shapes} == set(GRADIENT.grid())
  assert {c for _, c in shapes} <= set(CURVATURE.grid())
  # The step compiled exactly when a new shape came. Tracing the first step also compiles,
  # once per process, K-FAC's probe of the loss and an operation it evaluates eagerly.
  steps = [i for i, name in run.compiled if name == "jit(step)"]
  assert steps == sorted(run.first_seen.values()), run.compiled
  assert all(i == 0 for i, name in run.compiled if name != "jit(step)"), run.compiled
  # Both grids moved together, so the shapes are few: one per gradient size.
  assert len(shapes) == len(GRADIENT.grid())


def _check_resident_memory_flat(run: Run) -> None:
  settled = max(run.first_seen.values()) + WARM_UP
  assert settled < NUM_STEPS // 2, run.first_seen
  growth = run.resident[-1] - run.resident[settled]
  assert growth < RSS_GROWTH_BOUND_MIB, (growth, run.resident[[0, settled, -1]])


if __name__ == "__main__":
  # The measurement behind RSS_GROWTH_BOUND_MIB: python tests/test_long_run.py [steps [leak]]
  steps = int(sys.argv[1]) if len(sys.argv) > 1 else NUM_STEPS
  result = long_run(steps, leak=sys.argv[2:] == ["leak"])
  settled = max(result.first_seen.values()) + WARM_UP
  marks = sorted({0, *result.first_seen.values(), settled, *range(0, steps, 100), steps - 1})
  print(f"{steps} steps in {result.seconds:.1f} s; shapes first seen {result.first_seen}")
  print(f"compiled: {result.compiled}")
  print("step  rss_MiB  loss")
  for i in marks:
    print(f"{i:5d}  {result.resident[i]:8.2f}  {result.losses[i]:.3g}")
  tail = result.resident[settled:]
  print(
    f"after step {settled}: growth {tail[-1] - tail[0]:+.2f} MiB, "
    f"range {tail.min():.2f}-{tail.max():.2f} MiB"
  )

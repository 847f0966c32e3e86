"""Cost and memory of :func:`hfjax.cg` on the damped Gauss-Newton system of the MNIST autoencoder.

Run as ``python -m benchmarks.bench_cg`` (absl flags, e.g. ``--parts=a --memories-a=10,5``;
``--help`` lists them). The system is ``(G + lambda I) x = b`` with ``G`` the
Gauss-Newton matrix of the autoencoder on a batch of random [0, 1] inputs and ``b`` minus the
gradient on the same batch. Every timed function is jitted as ``(params, batch, b) -> ...``
and linearises the model itself, once, so all of them pay the same one-off linearisation.

* Part a: the cost of a CG step beyond its matvec. ``hfjax.cg`` runs exactly ``--steps``
  steps (``tol=0``, ``residual_tol=0``) and is compared with a ``lax.fori_loop`` of as many
  products with the same matrix; the difference, per step, is divided by the cost of one
  product (the slope between loops of 1 and ``--steps`` products). Beside it, the floor of
  any L-BFGS preconditioner: a loop that only reads the memory as often as a product must
  (twice), timed per step against the same matvec. L-BFGS with a callable initial matrix
  (``initial_preconditioner``, here a diagonal) is timed for the ``--memories-h0`` sizes.
* Part b: steps and time to a relative residual ``--residual-tol`` against
  :func:`jax.scipy.sparse.linalg.cg` (same matrix, same cap). jax's CG reports no step
  count, so a separate untimed run counts its matvec calls with a host callback.
* Part c: peak memory of a solve from XLA's compiled memory analysis, in parameter vectors,
  over L-BFGS memory sizes and iterate-recording budgets. The model's linearisation (the
  residuals of ``jax.linearize``) is not the solver's: a function that only linearises and
  applies one product is measured as the baseline and subtracted. A last table has the
  in-solve L-BFGS with a callable (diagonal) initial matrix, which also keeps ``H0 y``.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.flatten_util
import optax
from absl import app, flags

import hfjax
from benchmarks import common

_PARTS = flags.DEFINE_string("parts", "abc", "which parts to run, e.g. 'ac'")
_BATCH_SIZE = flags.DEFINE_integer("batch-size", 1000, "curvature batch size")
_DAMPING = flags.DEFINE_float("damping", 1.0, "lambda of G + lambda I")
_STEPS = flags.DEFINE_integer("steps", 10, "a: CG steps per timed solve", lower_bound=2)
_REPEATS = flags.DEFINE_integer("repeats", 5, "a: interleaved timing rounds")
_MEMORIES_A = flags.DEFINE_list("memories-a", ["10", "5"], "a: L-BFGS memory sizes m")
_MEMORIES_H0 = flags.DEFINE_list(
  "memories-h0", ["10"], "a: memory sizes also timed with a callable (diagonal) initial matrix"
)
_RESIDUAL_TOL = flags.DEFINE_float("residual-tol", 0.1, "b: relative residual")
_MAX_STEPS = flags.DEFINE_integer("max-steps", 250, "b: step cap of both solvers")
_REPEATS_B = flags.DEFINE_integer("repeats-b", 3, "b: interleaved timing rounds")
_MEMORIES = flags.DEFINE_list("memories", ["0", "5", "10", "20"], "c: L-BFGS memory sizes m")
_RECORDED = flags.DEFINE_integer("recorded", 4, "c: num_recorded besides None")
_MEMORY_MAX_STEPS = flags.DEFINE_integer("memory-max-steps", 250, "c: max_steps")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the parameters and the batch")

for _sizes in (_MEMORIES_A, _MEMORIES_H0, _MEMORIES):
  flags.register_validator(
    _sizes.name,
    lambda sizes: all(size.isdigit() for size in sizes),
    message="memory sizes are non-negative integers, comma separated",
  )


def damped_matvec(params, batch, damping):
  matvec = common.gn_matvec(params, batch)
  return lambda u: optax.tree.add_scale(matvec(u), damping, u)


def diagonal_initial(b, damping):
  """A callable diagonal H0 with a realistic spread: ``v / (b * b + lambda) ** 0.75``."""
  return hfjax.diagonal_preconditioner(optax.tree.mul(b, b), damping)


def cg_solver(damping, *, memory=0, update=True, initial=False, **cg_kwargs):
  """A jitted ``(params, batch, b[, state]) -> (x, num_steps, stop_reason)``.

  ``memory`` > 0 preconditions with an L-BFGS memory of that size: an empty one created in
  the solve, or the one passed as a fourth argument; ``initial`` gives it the callable
  :func:`diagonal_initial` as its initial matrix.
  """

  def solve(params, batch, b, state=None):
    if memory and state is None:
      state = hfjax.lbfgs_init(b, memory)
    result = hfjax.cg(
      damped_matvec(params, batch, damping),
      b,
      preconditioner=state if memory else None,
      update_preconditioner=update,
      initial_preconditioner=diagonal_initial(b, damping) if initial else None,
      **cg_kwargs,
    )
    return result.x, result.num_steps, result.stop_reason

  return jax.jit(solve)


def jax_cg_solver(damping, *, residual_tol, max_steps):
  def solve(params, batch, b):
    x, _ = jax.scipy.sparse.linalg.cg(
      damped_matvec(params, batch, damping), b, tol=residual_tol, atol=0.0, maxiter=max_steps
    )
    return x

  return jax.jit(solve)


def jax_cg_steps(params, batch, b, damping, *, residual_tol, max_steps) -> int:
  """Steps jax's CG takes: its matvec calls, counted on the host, minus the one for ``r0``."""
  calls = []

  def counted(params, batch, b):
    matvec = damped_matvec(params, batch, damping)

    def counting_matvec(u):
      jax.debug.callback(lambda: calls.append(1))
      return matvec(u)

    x, _ = jax.scipy.sparse.linalg.cg(
      counting_matvec, b, tol=residual_tol, atol=0.0, maxiter=max_steps
    )
    return x

  jax.block_until_ready(jax.jit(counted)(params, batch, b))
  jax.effects_barrier()
  return len(calls) - 1


def relative_residual(params, batch, b, x, damping) -> float:
  r = optax.tree.sub(b, damped_matvec(params, batch, damping)(x))
  return float(optax.tree.norm(r) / optax.tree.norm(b))


def memory_passes(m: int, steps: int):
  """A jitted loop of ``steps`` rounds of ``S^T r``, ``Y^T r`` and ``S u + Y w`` on flat
  ``(m, n)`` memories: the memory traffic of one L-BFGS product, without its arithmetic."""

  def run(s, y, r):
    def body(_, r):
      u, w = s @ r, y @ r
      return 0.5 * r + 1e-3 * (u @ s + w @ y)

    return jax.lax.fori_loop(0, steps, body, r)

  return jax.jit(run)


def part_a(args, params, batch, b) -> None:
  n, lam = args.steps, args.damping
  print(f"\n## a. CG cost per step beyond the matvec: {n} steps, lambda={lam}")
  loop_1, loop_n = common.matvec_loop(1, damping=lam), common.matvec_loop(n, damping=lam)
  exact = dict(tol=0.0, residual_tol=0.0, max_steps=n)
  variants = {"none": dict()}
  for m in args.memories_a:
    variants[f"lbfgs{m}_in_solve"] = dict(memory=m)
    variants[f"lbfgs{m}_fixed"] = dict(memory=m, update=False)
  for m in args.memories_h0:
    variants[f"lbfgs{m}_h0_in_solve"] = dict(memory=m, initial=True)
    variants[f"lbfgs{m}_h0_fixed"] = dict(memory=m, update=False, initial=True)
  solvers = {name: cg_solver(lam, **options, **exact) for name, options in variants.items()}
  # The fixed (Morales-Nocedal) policy applies a memory from an earlier solve: take the pairs
  # of an in-solve run so that it works on real pairs.
  pairs = {
    m: jax.jit(
      lambda p, bt, rhs, m=m: (
        hfjax.cg(
          damped_matvec(p, bt, lam), rhs, preconditioner=hfjax.lbfgs_init(rhs, m), **exact
        ).preconditioner_state
      )
    )(params, batch, b)
    for m in {*args.memories_a, *args.memories_h0}
  }
  fixed_memory = lambda options: () if options.get("update", True) else (pairs[options["memory"]],)
  calls = {
    name: functools.partial(solvers[name], params, batch, b, *fixed_memory(options))
    for name, options in variants.items()
  }
  fns = {"loop_1": lambda: loop_1(params, batch, b), f"loop_{n}": lambda: loop_n(params, batch, b)}
  fns |= {f"cg_{name}": call for name, call in calls.items()}
  # The least any L-BFGS product can cost: one pass over each half of the memory for the
  # inner products with r, one for the sums, with nothing else in the loop.
  floors = {m: memory_passes(m, n) for m in args.memories_a}
  flat_b = jax.flatten_util.ravel_pytree(b)[0]
  memories = {m: jax.random.normal(jax.random.key(1), (2, m, flat_b.size)) for m in floors}
  fns |= {f"passes_{m}": functools.partial(floors[m], *memories[m], flat_b) for m in floors}
  for name, call in calls.items():
    _, steps, stop = call()
    stop_name = hfjax.CGStopReason(int(stop)).name
    print(f"# cg {name}: {int(steps)} steps, stop reason {stop_name}")
    if int(steps) != n:
      print(f"#   WARNING: {name} stopped after {int(steps)} < {n} steps; its overhead is off")
  # Every solver has just run once (compiled); the loops compile here.
  jax.block_until_ready((loop_1(params, batch, b), loop_n(params, batch, b)))
  samples = common.time_interleaved(fns, args.repeats, warmup=0)
  print("\n### raw times, ms: median [min, max]")
  for name, times in samples.items():
    print(f"{name:>24} {common.spread(times)}")

  print("\n### per-step overhead / one matvec, formed within each round: median [min, max]")
  slopes = [(samples[f"loop_{n}"][r] - samples["loop_1"][r]) / (n - 1) for r in range(args.repeats)]
  print(f"{'matvec (slope), ms':>24} {1e3 * common.median(slopes):.1f}")
  fastest = {name: min(times) for name, times in samples.items()}
  fastest_slope = (fastest[f"loop_{n}"] - fastest["loop_1"]) / (n - 1)
  for name in solvers:
    ratios = [
      (samples[f"cg_{name}"][r] - samples[f"loop_{n}"][r]) / (n * slopes[r])
      for r in range(args.repeats)
    ]
    med = common.median(ratios)
    from_fastest = (fastest[f"cg_{name}"] - fastest[f"loop_{n}"]) / (n * fastest_slope)
    verdict = "met" if med <= 0.15 else "MISSED"
    print(
      f"{name:>24} {100 * med:6.1f}% [{100 * min(ratios):.1f}%, {100 * max(ratios):.1f}%]"
      f"  fastest times: {100 * from_fastest:.1f}%  goal <= 15%: {verdict}"
    )
  print("\n### the floor: 4 passes over an L-BFGS memory of m pairs alone, per step / one matvec")
  for m in floors:
    ratios = [samples[f"passes_{m}"][r] / (n * slopes[r]) for r in range(args.repeats)]
    low, high = 100 * min(ratios), 100 * max(ratios)
    print(f"{'m = ' + str(m):>24} {100 * common.median(ratios):6.1f}% [{low:.1f}%, {high:.1f}%]")


def part_b(args, params, batch, b) -> None:
  lam, tol, cap = args.damping, args.residual_tol, args.max_steps
  print(f"\n## b. against jax.scipy.sparse.linalg.cg: lambda={lam}, residual_tol={tol}, cap={cap}")
  to_tol = dict(tol=0.0, residual_tol=tol, max_steps=cap)
  hf = {
    "hfjax none (flexible beta)": cg_solver(lam, **to_tol),
    "hfjax none (standard beta)": cg_solver(lam, beta="standard", **to_tol),
    "hfjax lbfgs10 in-solve": cg_solver(lam, memory=10, **to_tol),
  }
  jax_solve = jax_cg_solver(lam, residual_tol=tol, max_steps=cap)
  steps, residuals = {}, {}
  for name, solver in hf.items():
    x, num_steps, _ = solver(params, batch, b)
    steps[name] = int(num_steps)
    residuals[name] = relative_residual(params, batch, b, x, lam)
  jax_name = "jax.scipy cg"
  steps[jax_name] = jax_cg_steps(params, batch, b, lam, residual_tol=tol, max_steps=cap)
  residuals[jax_name] = relative_residual(params, batch, b, jax_solve(params, batch, b), lam)
  # jax's CG spends one matvec on r0 = b - A x0 even for x0 = 0; hfjax skips it.
  matvecs = dict(steps) | {jax_name: steps[jax_name] + 1}
  fns = {name: functools.partial(solver, params, batch, b) for name, solver in hf.items()}
  fns[jax_name] = functools.partial(jax_solve, params, batch, b)
  loop_1 = common.matvec_loop(1, damping=lam)
  baseline = "linearise + 1 matvec"
  fns[baseline] = functools.partial(loop_1, params, batch, b)
  # Every solver has run (and compiled) once above; only the baseline compiles here.
  jax.block_until_ready(fns[baseline]())
  samples = common.time_interleaved(fns, args.repeats_b, warmup=0)
  rounds = range(args.repeats_b)
  base = samples[baseline]

  def per_step(name):
    # Beyond the linearisation and first matvec, each remaining matvec comes with one step.
    return [(samples[name][r] - base[r]) / max(matvecs[name] - 1, 1) for r in rounds]

  print(
    "\n| solver | steps | matvecs | true rel. residual | solve ms, median [min, max] "
    "| solve / jax's | ms per step | per step / jax's |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for name in [*hf, jax_name]:
    total = common.median([samples[name][r] / samples[jax_name][r] for r in rounds])
    step = per_step(name)
    relative = common.median([a / j for a, j in zip(step, per_step(jax_name), strict=True)])
    print(
      f"| {name} | {steps[name]} | {matvecs[name]} | {residuals[name]:.2e} | "
      f"{common.spread(samples[name]).strip()} | {total:.3f} | {1e3 * common.median(step):.1f} "
      f"| {relative:.3f} |"
    )
  print(
    f"({baseline}: {common.spread(base).strip()} ms. Per step = (solve - {baseline}) / "
    "(matvecs - 1): one matvec and the vector work of one step, for both solvers.)"
  )


def peak_bytes(fn, *example) -> tuple[int, dict]:
  stats = jax.jit(fn).lower(*example).compile().memory_analysis()
  parts = {
    "temp": stats.temp_size_in_bytes,
    "arguments": stats.argument_size_in_bytes,
    "outputs": stats.output_size_in_bytes,
    "aliased": stats.alias_size_in_bytes,
  }
  return parts["temp"] + parts["arguments"] + parts["outputs"] - parts["aliased"], parts


def part_c(args, params, batch, b) -> None:
  lam, cap = args.damping, args.memory_max_steps
  vector = common.vector_bytes(params)
  print(
    f"\n## c. peak memory of a solve (XLA memory analysis), in parameter vectors of "
    f"{vector / 2**20:.2f} MiB; max_steps={cap}"
  )

  def baseline(p, bt, rhs):
    return damped_matvec(p, bt, lam)(rhs)

  base, parts = peak_bytes(baseline, params, batch, b)
  print(
    f"# baseline (linearise + 1 matvec): {base / vector:.2f} vectors "
    f"({', '.join(f'{k} {v / vector:.2f}' for k, v in parts.items())})"
  )
  schedule_slots = len(hfjax.martens_record_steps(cap)) + 1
  print("\n| L-BFGS m | num_recorded | slots | solve peak | minus baseline | goal | verdict |")
  print("|---|---|---|---|---|---|---|")
  for memory in args.memories:
    for recorded in (None, args.recorded):
      slots = schedule_slots if recorded is None else min(recorded, schedule_slots)

      def solve(p, bt, rhs, memory=memory, recorded=recorded):
        result = hfjax.cg(
          damped_matvec(p, bt, lam),
          rhs,
          preconditioner=hfjax.lbfgs_init(rhs, memory) if memory else None,
          max_steps=cap,
          num_recorded=recorded,
        )
        return result

      peak, _ = peak_bytes(solve, params, batch, b)
      extra = (peak - base) / vector
      goal = 2 * memory + slots + 8
      verdict = "met" if extra <= goal else "MISSED"
      print(
        f"| {memory} | {recorded} | {slots} | {peak / vector:.2f} | {extra:.2f} | {goal} "
        f"| {verdict} |"
      )
  # A fixed preconditioner (pairs of an earlier solve, an argument) collects the solve's own
  # pairs in a second memory: 4m vectors of memory, so the goal above does not apply.
  print(
    "\n| fixed L-BFGS m | num_recorded | slots | solve peak | minus baseline | minus 4m + slots |"
  )
  print("|---|---|---|---|---|---|")
  slots = min(args.recorded, schedule_slots)
  for memory in [m for m in args.memories if m]:

    def solve_fixed(p, bt, rhs, state):
      return hfjax.cg(
        damped_matvec(p, bt, lam),
        rhs,
        preconditioner=state,
        update_preconditioner=False,
        max_steps=cap,
        num_recorded=args.recorded,
      )

    peak, _ = peak_bytes(solve_fixed, params, batch, b, hfjax.lbfgs_init(b, memory))
    extra = (peak - base) / vector
    print(
      f"| {memory} | {args.recorded} | {slots} | {peak / vector:.2f} | {extra:.2f} "
      f"| {extra - 4 * memory - slots:.2f} |"
    )
  # With a callable initial matrix the in-solve memory also keeps H0 y: 3m vectors.
  print(
    "\n| in-solve L-BFGS m, diagonal H0 | num_recorded | slots | solve peak | minus baseline "
    "| minus (3m + slots) |"
  )
  print("|---|---|---|---|---|---|")
  for memory in [m for m in args.memories if m]:

    def solve_h0(p, bt, rhs, memory=memory):
      return hfjax.cg(
        damped_matvec(p, bt, lam),
        rhs,
        preconditioner=hfjax.lbfgs_init(rhs, memory),
        initial_preconditioner=diagonal_initial(rhs, lam),
        max_steps=cap,
        num_recorded=args.recorded,
      )

    peak, _ = peak_bytes(solve_h0, params, batch, b)
    extra = (peak - base) / vector
    print(
      f"| {memory} | {args.recorded} | {slots} | {peak / vector:.2f} | {extra:.2f} "
      f"| {extra - 3 * memory - slots:.2f} |"
    )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  sizes = lambda holder: [int(size) for size in holder.value]
  args = types.SimpleNamespace(
    parts=_PARTS.value,
    batch_size=_BATCH_SIZE.value,
    damping=_DAMPING.value,
    steps=_STEPS.value,
    repeats=_REPEATS.value,
    memories_a=sizes(_MEMORIES_A),
    memories_h0=sizes(_MEMORIES_H0),
    residual_tol=_RESIDUAL_TOL.value,
    max_steps=_MAX_STEPS.value,
    repeats_b=_REPEATS_B.value,
    memories=sizes(_MEMORIES),
    recorded=_RECORDED.value,
    memory_max_steps=_MEMORY_MAX_STEPS.value,
    seed=_SEED.value,
  )
  common.print_header("bench_cg: hfjax.cg on the damped Gauss-Newton system", args)
  params, batch, _ = common.setup(args.seed, args.batch_size)
  b = optax.tree.scale(-1.0, jax.jit(jax.grad(common.batch_loss))(params, batch))
  print(
    f"# params: {common.num_params(params):,}; batch: {args.batch_size}; float32; "
    f"|b| = {float(optax.tree.norm(b)):.4g}"
  )
  if "a" in args.parts:
    part_a(args, params, batch, b)
  if "b" in args.parts:
    part_b(args, params, batch, b)
  if "c" in args.parts:
    part_c(args, params, batch, b)


if __name__ == "__main__":
  app.run(main)

"""Data parallelism on a mesh of 8 CPU devices, checked against one device.

The multi-device checks run in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (this file is its script), so the rest
of the test session keeps its single device. Each subprocess compiles the unchanged jitted
update for one device and for the mesh, runs a few outer steps on both and reads the
compiled HLO.

What XLA makes of the update (batch sharded over "data", params and state replicated), as
the compiled HLO shows:

- The CG loop body holds exactly one all-reduce: the ``J^T`` half of the Gauss-Newton
  product sums the per-device parameter gradients, and XLA combines the reductions of all
  parameter leaves into one tuple all-reduce of ``num_params`` elements. The CG vectors are
  replicated, so every dot product, the L-BFGS products and the L-BFGS memory
  update are local: the scalar reductions of CG need no communication at all.
- Before the loop: the loss and the gradient share one all-reduce (``1 + num_params``
  elements), and the initial residual ``b - A x0`` of the warm start takes one more
  (``num_params``).
- CG backtracking and the Armijo line search evaluate the loss once per iteration: one
  scalar all-reduce each.
- Martens' diagonal preconditioner sums squared per-example gradients over the batch, a
  chunk at a time: one more all-reduce of ``num_params`` elements (per chunk when the batch
  has several chunks; merged into the warm-start one when it has one). No example may be
  gathered from another device for it (``all_gather_ops == 0``).

So a step on ``D`` devices communicates ``(cg_steps + 2) * num_params`` floats plus a few
scalars (plus ``num_params`` per chunk with Martens' preconditioner).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

DEVICES = 8
MAX_CG_STEPS = 37  # the CG while loop is the one carrying f32[MAX_CG_STEPS + 1] (phi values)
STEPS = 4
BATCH = 64
SIZES = (8, 16, 4)

# ----------------------------------------------------------------------------------------
# HLO reading


def _computations(hlo: str) -> dict[str, list[str]]:
  """The instruction lines of each computation of an HLO module's text, by name."""
  computations, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if header:
      current = header.group(1)
      computations[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None:
      computations[current].append(line)
  return computations


_CALLED = re.compile(
  r"\b(?:condition|body|calls|to_apply|branch_computations|true_computation|false_computation)="
  r"(\{[^}]*\}|%[\w.\-]+)"
)


def _called(line: str) -> list[str]:
  return [name for group in _CALLED.findall(line) for name in re.findall(r"%([\w.\-]+)", group)]


def _closure(computations: dict[str, list[str]], root: str) -> set[str]:
  seen, todo = set(), [root]
  while todo:
    name = todo.pop()
    if name not in seen:
      seen.add(name)
      todo.extend(c for line in computations[name] for c in _called(line))
  return seen


def _all_reduce_sizes(lines: list[str]) -> list[int]:
  """Elements reduced by each all-reduce in ``lines`` (a tuple all-reduce counts once)."""
  sizes = []
  for line in lines:
    found = re.search(r"=\s*(.*?)\s+all-reduce(?:-start)?\(", line)
    if found:
      shapes = re.findall(r"[a-z]\w*\[([\d,]*)\]", found.group(1))
      sizes.append(sum(math.prod(int(d) for d in s.split(",") if d) for s in shapes))
  return sizes


def _while_bodies(lines: list[str]) -> list[str]:
  return [re.search(r"\bbody=%([\w.\-]+)", line).group(1) for line in lines if " while(" in line]


def collective_report(hlo: str, cg_marker: str) -> dict:
  """Where a compiled update communicates: the elements of each all-reduce in the CG loop
  body, in loops nested in it, outside every loop and in
  the other loops (backtracking, line search, per-example sums), plus all-gather count."""
  computations = _computations(hlo)
  cg_bodies = [
    re.search(r"\bbody=%([\w.\-]+)", line).group(1)
    for lines in computations.values()
    for line in lines
    if " while(" in line and cg_marker in line.split(" while(")[0]
  ]
  assert len(cg_bodies) == 1, f"expected one CG while loop carrying {cg_marker}: {cg_bodies}"
  in_cg = _closure(computations, cg_bodies[0])
  nested = set()
  for name in in_cg:
    for body in _while_bodies(computations[name]):
      nested |= _closure(computations, body)
  entry = re.search(r"^ENTRY %([\w.\-]+)", hlo, re.M).group(1)
  in_loops = set()
  for name in _closure(computations, entry):
    for body in _while_bodies(computations[name]):
      in_loops |= _closure(computations, body)

  def sizes(names):
    return [s for name in sorted(names) for s in _all_reduce_sizes(computations[name])]

  outside = _closure(computations, entry) - in_loops
  return {
    "cg_body": sizes(in_cg - nested),
    "cg_nested_loops": sizes(nested),
    "outside_loops": sizes(outside),
    "other_loops": sorted(sizes(in_loops - in_cg)),
    "all_reduce_ops": len(sizes(computations)),
    "all_gather_ops": len(re.findall(r"\ball-gather(?:-start)?\(", hlo)),
  }


# ----------------------------------------------------------------------------------------
# The subprocess


def _worker(variant: str) -> dict:
  """``variant``: a preconditioner, optionally with ``:dtype`` for ``curvature_matmul_dtype``."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import hfjax
  from hfjax import sharding

  assert jax.device_count() == DEVICES

  def apply_fn(params, inputs):
    hidden = jnp.tanh(inputs @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]

  def loss_fn(outputs, targets):
    return 0.5 * jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))

  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {
    "w1": 0.5 * jax.random.normal(k1, SIZES[:2]),
    "b1": jnp.zeros(SIZES[1]),
    "w2": 0.5 * jax.random.normal(k2, SIZES[1:]),
    "b2": jnp.zeros(SIZES[2]),
  }
  num_params = sum(x.size for x in jax.tree.leaves(params))
  inputs = jax.random.normal(k3, (STEPS, BATCH, SIZES[0]))
  batches = [(x, jnp.sin(x[:, : SIZES[2]])) for x in inputs]
  preconditioner, _, matmul_dtype = variant.partition(":")
  # chunk_size < BATCH: Martens' per-example sum runs over several chunks of the batch.
  tx = hfjax.hessian_free(
    apply_fn,
    loss_fn,
    preconditioner=preconditioner,
    max_cg_steps=MAX_CG_STEPS,
    chunk_size=16,
    curvature_matmul_dtype=matmul_dtype or None,
  )

  def step(params, state, batch):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(apply_fn(p, batch[0]), batch[1]))(params)
    updates, state = tx.update(grads, state, params, batch=batch, loss=loss)
    return optax.apply_updates(params, updates), state

  def run(compiled, params, state, put_batch):
    trace = []
    for batch in batches:
      params, state = compiled(params, state, put_batch(batch))
      info = state.info
      trace.append(
        (
          float(state.damping),
          int(info.cg_steps),
          int(info.chosen_iterate),
          float(info.line_search_step),
          bool(info.accepted),
        )
      )
    return params, state, trace

  def compile_for(params, state, batch):
    return jax.jit(step).lower(params, state, batch).compile()

  state = tx.init(params)
  single = compile_for(params, state, batches[0])
  ref_params, ref_state, ref_trace = run(single, params, state, lambda b: b)

  def compare(new_params, new_state, trace):
    diff = jax.tree.map(
      lambda a, b: float(jnp.max(jnp.abs(np.asarray(a) - np.asarray(b)))),
      (new_params, new_state.warm_start),
      (ref_params, ref_state.warm_start),
    )
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref_params))
    return {"max_diff": max(jax.tree.leaves(diff)), "scale": scale, "trace": trace}

  results = {"num_params": num_params, "reference": ref_trace}
  # Data parallel: batch over 8 devices, params and state replicated. The compiled program
  # only accepts arguments with the shardings it was compiled for, so running it step after
  # step also shows that the outputs come back replicated (no recompilation).
  mesh = sharding.make_mesh()
  dp_params, dp_state = sharding.replicate(params, mesh), sharding.replicate(state, mesh)
  parallel = compile_for(dp_params, dp_state, sharding.shard_batch(batches[0], mesh))
  new_params, new_state, trace = run(
    parallel, dp_params, dp_state, lambda b: sharding.shard_batch(b, mesh)
  )
  results["data"] = compare(new_params, new_state, trace)
  results["data"]["params_replicated"] = all(
    x.sharding.is_fully_replicated for x in jax.tree.leaves(new_params)
  )
  results["hlo"] = collective_report(parallel.as_text(), f"f32[{MAX_CG_STEPS + 1}]")
  results["bf16_arrays"] = "bf16[" in parallel.as_text()

  errors = {}
  for name, call in {
    "indivisible": lambda: sharding.shard_batch(batches[0][0][:60], mesh),
    "mesh_shape": lambda: sharding.make_mesh((3,)),
    "scalar_leaf": lambda: sharding.shard_batch((jnp.ones(()),), mesh),
    "indivisible_local": lambda: sharding.shard_local_batch(batches[0][0][:60], mesh),
  }.items():
    try:
      call()
      errors[name] = ""
    except ValueError as err:
      errors[name] = str(err)
  results["errors"] = errors
  # With one process, this process's share is the whole batch.
  local, whole = (
    sharding.shard_local_batch(batches[0], mesh),
    sharding.shard_batch(batches[0], mesh),
  )
  results["local_equals_global"] = all(
    a.sharding == b.sharding and bool(jnp.array_equal(a, b))
    for a, b in zip(jax.tree.leaves(local), jax.tree.leaves(whole), strict=True)
  )

  if variant == "lbfgs":
    # Data and model parallel: params, warm start and L-BFGS memory split over "model".
    mesh = sharding.make_mesh((4, 2), ("data", "model"))
    p_sh = sharding.param_sharding(params, mesh, shard_params=True)
    s_sh = sharding.state_sharding(state, params, mesh, shard_params=True)
    mp_params, mp_state = sharding.place(params, p_sh), sharding.place(state, s_sh)
    compiled = (
      jax.jit(step, out_shardings=(p_sh, s_sh))
      .lower(mp_params, mp_state, sharding.shard_batch(batches[0], mesh))
      .compile()
    )
    new_params, new_state, trace = run(
      compiled, mp_params, mp_state, lambda b: sharding.shard_batch(b, mesh)
    )
    results["model"] = compare(new_params, new_state, trace)
    results["model"]["specs"] = {k: list(v.sharding.spec) for k, v in new_params.items()}
    results["model"]["warm_start_spec"] = list(new_state.warm_start["w1"].sharding.spec)
    previous = hfjax.hessian_free(
      apply_fn, loss_fn, preconditioner="lbfgs", lbfgs_pairs="previous", memory_size=5
    )
    memory = sharding.state_sharding(previous.init(params), params, mesh, True).lbfgs
    results["model"]["memory_specs"] = {k: list(v.spec) for k, v in memory.s_memory.items()}
    results["model"]["memory_specs"]["sy"] = list(memory.sy_products.spec)
    hlo = compiled.as_text()
    results["model"]["collectives"] = {
      op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo))
      for op in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    }
  return results


def _run_worker(preconditioner: str) -> dict:
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "")
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [sys.executable, __file__, preconditioner],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_matches_single_device(result: dict) -> None:
  assert result["trace"] is not None
  assert result["max_diff"] <= 1e-5 * max(1.0, result["scale"]), result


@pytest.mark.parametrize("preconditioner", ["lbfgs", "martens", "lbfgs:bfloat16"])
def test_data_parallel_update_matches_one_device(preconditioner):
  """``lbfgs:bfloat16``: Gauss-Newton products on bfloat16 operands shard the same way, with
  no more communication (the rounding is per operand, the all-reduces stay float32)."""
  results = _run_worker(preconditioner)
  assert results["bf16_arrays"] == preconditioner.endswith(":bfloat16")
  p = results["num_params"]
  data = results["data"]
  # Damping, CG steps and acceptance are discrete: equal step for step. Params to float
  # tolerance (the batch sums are reduced in another order).
  assert data["trace"] == results["reference"]
  assert any(accepted for *_, accepted in data["trace"])
  _check_matches_single_device(data)
  assert data["params_replicated"]

  hlo = results["hlo"]
  print(f"\ncollectives ({preconditioner}, {DEVICES} devices, {p} params): {hlo}")
  # One all-reduce per Gauss-Newton product in the CG loop, of the parameter gradient;
  # the dot products and the L-BFGS recursion (nested loops) are local.
  assert hlo["cg_body"] == [p]
  assert hlo["cg_nested_loops"] == []
  # Everywhere else: the loss and gradient (1 + p), the warm-start residual (p), one scalar
  # per loss evaluation in backtracking and in the line search and, for Martens'
  # preconditioner, its per-example squared-gradient sum (p), however XLA combines them.
  elsewhere = hlo["outside_loops"] + hlo["other_loops"]
  extra = p if preconditioner == "martens" else 0
  assert sum(elsewhere) == 1 + 2 * p + 2 + extra
  assert hlo["other_loops"].count(1) == 2
  # The batch stays where it is: no device gathers another's examples.
  assert hlo["all_gather_ops"] == 0, (
    "the update gathers the sharded batch: hfjax.curvature.per_example_sum splits a "
    "data-sharded batch into contiguous chunks, so each chunk lives on few devices"
  )

  errors = results["errors"]
  assert re.search(r"60 examples, not divisible by the 8 devices", errors["indivisible"])
  assert re.search(r"holds 3 devices, but there are 8", errors["mesh_shape"])
  assert re.search(r"scalar", errors["scalar_leaf"])
  assert re.search(
    r"60 examples, not divisible by the 8 devices of this process", errors["indivisible_local"]
  )
  assert results["local_equals_global"]

  if preconditioner == "lbfgs":
    model = results["model"]
    assert model["trace"] == results["reference"]
    _check_matches_single_device(model)
    assert model["specs"] == {
      "w1": [None, "model"],
      "b1": ["model"],
      "w2": ["model"],
      "b2": ["model"],
    }
    assert model["warm_start_spec"] == [None, "model"]
    # The L-BFGS memory (5, *shape) is split like its parameter, behind the memory axis.
    assert model["memory_specs"] == {
      "w1": [None, None, "model"],
      "b1": [None, "model"],
      "w2": [None, "model"],
      "b2": [None, "model"],
      "sy": [],
    }
    print(f"collectives with params split over 'model' (4 x 2 mesh): {model['collectives']}")


def test_make_mesh_on_one_device():
  import jax

  from hfjax import sharding

  mesh = sharding.make_mesh()
  assert mesh.shape == {"data": jax.device_count()}
  assert sharding.local_share(mesh) == (0, 1)
  with pytest.raises(ValueError, match="product of the shape must equal the device count"):
    sharding.make_mesh((jax.device_count() + 1,))
  with pytest.raises(ValueError, match="differ in length"):
    sharding.make_mesh((1,), ("data", "model"))
  with pytest.raises(ValueError, match="no 'data' axis"):
    sharding.batch_sharding(sharding.make_mesh(axis_names=("model",)))


def test_place_on_one_device():
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from hfjax import sharding

  mesh = sharding.make_mesh()
  tree = {"w": jnp.arange(6.0).reshape(3, 2), "key": jax.random.key(3)}
  one = NamedSharding(mesh, P())
  for shardings in (one, {"w": one, "key": one}):
    placed = sharding.place(tree, shardings)
    assert all(leaf.sharding == one for leaf in jax.tree.leaves(placed))
    assert jnp.array_equal(placed["w"], tree["w"])
    assert jnp.array_equal(jax.random.key_data(placed["key"]), jax.random.key_data(tree["key"]))


def test_param_sharding_rules():
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  from hfjax import sharding

  mesh = sharding.make_mesh((1, 1), ("data", "model"))
  params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros((3,))}
  for shard in (False, True):  # a model axis of one device leaves everything replicated
    assert all(s.spec == P() for s in sharding.param_sharding(params, mesh, shard).values())
  assert sharding._spec((6, 4), 2) == P("model")
  assert sharding._spec((4, 4), 2) == P(None, "model")
  assert sharding._spec((3, 5), 2) == P()
  assert sharding._spec((3, 5), 1) == P()


if __name__ == "__main__":
  print(json.dumps(_worker(sys.argv[1])))

#!/usr/bin/env bash
# The accelerator check: install, list the devices, run the benchmarks in a quick form, the
# no-host-sync and long-run tests, and one CLI training, each part under its own time limit.
#
#   benchmarks/accelerator_check.sh            # from the repository root, on a GPU machine
#
# Every part writes its output to ${OUT:-runs/accelerator_check}/<part>.txt; summary.md there
# lists the parts with their exit status and seconds, the machine, and the outputs, ready to
# become a section of benchmarks/RESULTS.md. A failed part makes the script exit nonzero, but
# the later parts still run. Budget: about 8 minutes on one H200 (most of it compiling).
#
# Environment:
#   OUT                        output folder (default runs/accelerator_check)
#   PYTHON                     interpreter (default python)
#   HFJAX_CHECK_SKIP_INSTALL=1 use the environment as it is (no pip)
#   HFJAX_CHECK_JAX_EXTRA      the jax extra that brings the accelerator (default cuda12; tpu on
#                              a TPU VM); installed at the installed jax's version, and only
#                              when jax does not already see an accelerator
#   HFJAX_CHECK_SMALL=1        small sizes and no accelerator required: a dry run on a CPU, e.g.
#                              HFJAX_CHECK_SKIP_INSTALL=1 HFJAX_CHECK_SMALL=1 JAX_PLATFORMS=cpu \
#                                HFJAX_CHECK_TIME_SCALE=8 benchmarks/accelerator_check.sh
#   HFJAX_CHECK_TIME_SCALE     multiplies every part's time limit (default 1; a loaded CPU
#                              needs several times the accelerator's limits)
#   HFJAX_CHECK_BUDGET         seconds for the whole check, install included (default 480 times
#                              the scale): a part gets at most what is left, and a part with
#                              under 20 s left is not started (and counts as failed)

set -u -o pipefail
cd "$(dirname "$0")/.."

out="${OUT:-runs/accelerator_check}"
python="${PYTHON:-python}"
small="${HFJAX_CHECK_SMALL:-0}"
extra="${HFJAX_CHECK_JAX_EXTRA:-cuda12}"
scale="${HFJAX_CHECK_TIME_SCALE:-1}"
deadline=$(($(date +%s) + ${HFJAX_CHECK_BUDGET:-$((480 * scale))}))
mkdir -p "$out"
summary="$out/summary.md"
status=0
names=()
rows=()

# run_part NAME SECONDS COMMAND...: runs COMMAND under `timeout` (SECONDS times the scale, at
# most the budget left), its output to $out/NAME.txt, and adds a row to the summary.
run_part() {
  local name="$1" limit=$(($2 * scale)) left=$((deadline - $(date +%s)))
  shift 2
  local shown rc start seconds
  shown=$(printf '%s' "$*" | tr '\n' ' ' | cut -c1-240)
  names+=("$name")
  if [ "$left" -lt 20 ]; then
    status=1
    echo "== $name: not started, ${left}s of the budget left" | tee "$out/$name.txt"
    rows+=("| $name | not started (budget) | 0 | \`$shown\` |")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $shown"
  {
    echo "\$ $shown"
    timeout --kill-after=10 "$limit" "$@"
  } >"$out/$name.txt" 2>&1
  rc=$?
  seconds=$(($(date +%s) - start))
  if [ "$rc" -ne 0 ]; then
    status=1
    echo "   FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out')) after ${seconds}s; tail:"
    tail -n 15 "$out/$name.txt" | sed 's/^/   | /'
  else
    echo "   ok in ${seconds}s"
  fi
  rows+=("| $name | $rc | $seconds | \`$shown\` |")
}

# 1. Install (skipped on request, or when jax already sees an accelerator).
if [ "${HFJAX_CHECK_SKIP_INSTALL:-0}" != 1 ]; then
  run_part install 240 bash -c "
    set -e
    $python -m pip install --quiet -e '.[test]'
    if $python -c 'import jax, sys; sys.exit(jax.default_backend() == \"cpu\")' 2>/dev/null; then
      echo 'jax already sees an accelerator; $extra not installed'
    else
      version=\$($python -c 'import jax; print(jax.__version__)')
      $python -m pip install --quiet \"jax[$extra]==\$version\"
    fi
    $python -m pip list 2>/dev/null | grep -i -E '^(jax|jaxlib|jax-cuda|libtpu|optax|flax) '
  "
fi

# 2. The devices, and a refusal to time a CPU as if it were the accelerator.
require_accelerator=$([ "$small" = 1 ] && echo False || echo True)
run_part devices 60 "$python" -c "import jax, platform, sys
print('jax', jax.__version__, 'backend', jax.default_backend())
print('devices', jax.devices())
print('host', platform.node(), platform.machine(), platform.python_version())
if $require_accelerator and jax.default_backend() == 'cpu':
  sys.exit('no accelerator: jax.default_backend() is cpu')"
command -v nvidia-smi >/dev/null && nvidia-smi >"$out/nvidia_smi.txt" 2>&1

# 3. Benchmarks, quick forms of the commands in benchmarks/RESULTS.md.
if [ "$small" = 1 ]; then
  batch=(--batch-size=32)
  cg_steps=(--cg-steps=5)
  cg_parts=(--parts=ab --steps=3 --memories-a=5 --memories-h0=5 --max-steps=20)
  kfac_extra=(--loop=3 --size=100)
  memory_extra=(--batch-size=16 --max-cg-steps=20)
  train_extra=(--config.num_steps=3 --config.dataset.num_train=500 --config.dataset.num_test=200
    --config.eval_train_examples=200
    --config.optimizer.gradient_schedule.start=100 --config.optimizer.gradient_schedule.maximum=400
    --config.optimizer.curvature_schedule.start=10 --config.optimizer.curvature_schedule.maximum=40)
else
  batch=(--batch-size=1000)
  cg_steps=(--cg-steps=50)
  cg_parts=(--parts=ab --max-steps=100)
  kfac_extra=(--size=1000)
  memory_extra=()
  train_extra=(--config.num_steps=15)
fi
run_part bench_curvature 90 "$python" -m benchmarks.bench_curvature "${batch[@]}" --repeats=3
run_part bench_optimizer 90 "$python" -m benchmarks.bench_optimizer "${batch[@]}" \
  "${cg_steps[@]}" --repeats=3
run_part bench_kfac 90 "$python" -m benchmarks.bench_kfac "${batch[@]}" "${kfac_extra[@]}" \
  --repeats=3 --decompositions
run_part bench_cg 120 "$python" -m benchmarks.bench_cg "${batch[@]}" "${cg_parts[@]}" \
  --repeats=3 --repeats-b=2

# 4. One CLI training run (the README's CURVES job, shortened).
rm -rf "$out/train_curves"
run_part train_curves 150 "$python" -m hfjax.experiments.train \
  --config configs/curves_autoencoder.py --workdir "$out/train_curves" "${train_extra[@]}"

# 5. The step makes no host transfer, and a long run neither recompiles nor leaks (on an
#    accelerator the device-to-host guard is the one that fires for a host callback). Two
#    processes share the accelerator, so neither preallocates most of its memory.
run_part tests 150 env XLA_PYTHON_CLIENT_PREALLOCATE=false "$python" -m pytest -q -n 2 \
  -p no:cacheprovider tests/test_transfer_guard.py tests/test_long_run.py

# 6. Peak memory of one outer step, from the compiled program (nothing runs).
run_part bench_memory 60 "$python" -m benchmarks.bench_memory "${memory_extra[@]}"

# 7. The summary, in the form of a benchmarks/RESULTS.md section.
{
  echo "## Accelerator check (\`benchmarks/accelerator_check.sh\`)"
  echo
  settings=$(env | grep -E '^(OUT|PYTHON|JAX_PLATFORMS|HFJAX_CHECK_[A-Z_]+)=' | sort | tr '\n' ' ')
  echo "Command: \`${settings}benchmarks/accelerator_check.sh\`" \
    "($(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null ||
      echo unknown))."
  echo "Machine: $(grep -h -E '^(jax|devices|host) ' "$out/devices.txt" 2>/dev/null |
    tr '\n' ';')"
  echo
  echo "| part | exit | seconds | command |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  for name in "${names[@]}"; do
    echo
    echo "### $name"
    echo
    echo '```'
    grep -v -E '^(I|W)[0-9]{4} ' "$out/$name.txt"
    echo '```'
  done
} >"$summary"
echo "summary: $summary (exit $status)"
exit "$status"

#!/usr/bin/env bash
# Builds .venv-kfac, the virtualenv in which benchmarks/peer_kfac_jax.py runs kfac-jax.
#
# kfac-jax 0.0.8 works with jax 0.8.2, older than the jax hfjax is developed against, so it
# gets its own virtualenv and stays out of hfjax's dependencies. hfjax is installed into it from
# this checkout without its dependencies (--no-deps), so the pinned jax is never upgraded and the
# peer trains on exactly the data and model code that benchmarks/compare_optimizers.py uses.
#
# Usage (from anywhere; only PyPI is needed):
#   bash benchmarks/kfac_jax_setup.sh
# Re-running it is cheap: pip leaves what is already installed at the pinned versions alone.
# PYTHON=python3.12 picks another interpreter for a new virtualenv (default: python3);
# JAX_EXTRA=cuda12 installs jax[cuda12]==0.8.2, for a GPU (default: the CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-kfac
PYTHON="${PYTHON:-python3}"
JAX="jax${JAX_EXTRA:+[$JAX_EXTRA]}"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)

# The pins that must hold together: kfac-jax 0.0.8 on jax 0.8.2. The rest is whatever pip
# finds compatible with that jax (the constraints file keeps every install from moving it):
# flax, optax, chex and numpy for hfjax's model and CURVES data, absl-py for the flags.
CONSTRAINTS="$VENV/constraints.txt"
printf 'jax==0.8.2\njaxlib==0.8.2\nkfac-jax==0.0.8\n' >"$CONSTRAINTS"
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install -c "$CONSTRAINTS" \
  "$JAX" jaxlib kfac-jax optax flax chex numpy absl-py
"${PIP[@]}" install -c "$CONSTRAINTS" --no-deps -e .

"$VENV/bin/python" - <<'EOF'
import jax, kfac_jax, flax, optax, hfjax
from hfjax.experiments import models, datasets
print(f"{__import__('sys').prefix}: jax {jax.__version__}, kfac-jax {kfac_jax.__version__}, "
      f"flax {flax.__version__}, optax {optax.__version__}, hfjax {hfjax.__version__} "
      f"from {hfjax.__file__}")
EOF

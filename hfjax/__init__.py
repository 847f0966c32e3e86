"""hfjax: Hessian-free (truncated Gauss-Newton) optimization for JAX and Optax."""

from hfjax import kfac, layers, sharding
from hfjax.curvature import (
  gauss_newton_diagonal_estimate,
  gauss_newton_matvec,
  hessian_matvec,
  per_example_sum,
  squared_gradient_sum,
)
from hfjax.optimizer import (
  DampingConfig,
  HessianFreeInfo,
  HessianFreeState,
  KFACConfig,
  LBFGSPairs,
  LineSearchConfig,
  PreconditionerName,
  hessian_free,
)
from hfjax.preconditioners import (
  LBFGSState,
  diagonal_preconditioner,
  lbfgs_apply,
  lbfgs_init,
  lbfgs_update,
)
from hfjax.sampling import (
  BatchSampler,
  SampleSchedule,
  SamplingState,
  fixed_schedule,
  geometric_schedule,
  held_out_schedule,
  sample_sizes,
  variance_test_schedule,
)
from hfjax.solvers import CGResult, CGStopReason, cg, martens_record_steps

__version__ = "0.1.0"

__all__ = (
  "BatchSampler",
  "DampingConfig",
  "HessianFreeInfo",
  "HessianFreeState",
  "KFACConfig",
  "LBFGSPairs",
  "PreconditionerName",
  "LineSearchConfig",
  "SampleSchedule",
  "SamplingState",
  "fixed_schedule",
  "geometric_schedule",
  "held_out_schedule",
  "hessian_free",
  "sample_sizes",
  "variance_test_schedule",
  "CGResult",
  "CGStopReason",
  "LBFGSState",
  "cg",
  "diagonal_preconditioner",
  "gauss_newton_diagonal_estimate",
  "gauss_newton_matvec",
  "hessian_matvec",
  "lbfgs_apply",
  "lbfgs_init",
  "lbfgs_update",
  "martens_record_steps",
  "per_example_sum",
  "kfac",
  "layers",
  "sharding",
  "squared_gradient_sum",
)

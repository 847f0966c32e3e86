"""Dense reference implementations that several test modules check hfjax against."""

import numpy as np


def dense_bfgs_inverse(pairs, n, memory, initial_diagonal=None, initial_matrix=None):
  """H from the BFGS inverse recursion (Nocedal & Wright eq. 7.19) on the newest ``memory``
  acceptable pairs, oldest first, from H0 = initial_matrix, diag(initial_diagonal) or gamma I."""
  pairs = [
    (s, y) for s, y in pairs if np.all(np.isfinite(s)) and np.all(np.isfinite(y)) and s @ y > 0
  ][-memory:]
  if initial_matrix is not None:
    h = np.array(initial_matrix, dtype=float)
  elif initial_diagonal is not None:
    h = np.diag(initial_diagonal)
  elif pairs:
    s, y = pairs[-1]
    h = (s @ y) / (y @ y) * np.eye(n)
  else:
    h = np.eye(n)
  for s, y in pairs:
    rho = 1.0 / (s @ y)
    v = np.eye(n) - rho * np.outer(y, s)
    h = v.T @ h @ v + rho * np.outer(s, s)
  return h

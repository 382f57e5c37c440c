"""Standalone solvers (jax + numpy only): ``solvers.sparse_simplex`` and ``solvers.prox``."""

"""Standalone solvers (jax + numpy only): ``solvers.sparse_simplex``, ``solvers.prox`` and
``solvers.penalty_path`` (the exact-penalty threshold λ* and the batched λ path)."""

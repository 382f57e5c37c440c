"""Weighting strategies: retrieved task prototypes → composition weights.

Given the target prototype z and the prototypes z_1 … z_k of the k retrieved adapters,
with squared distances d_i² = ‖z − z_i‖²:

* ``avg``:      w_i = 1/k                                      (AdapterSoup)
* ``sim``:      w = softmax(−λ1 · d²)                          (LoraRetriever-style)
* ``lin``:      argmin_w ‖z − Σ w_i z_i‖²      s.t. Σ w_i = 1   (negative weights allowed)
* ``sparse``:   argmin_w ‖z − Σ w_i z_i‖² + λ2‖w‖₁  s.t. Σ w_i = 1   (the seeds' method)
* ``simplex``:  argmin_w ‖z − Σ w_i z_i‖²      s.t. Σ w_i = 1, w ≥ 0  (convex hull)
* ``nearest``:  w = e_argmin d²                                 (k = 1 baseline)

``lin``, ``sparse`` and ``simplex`` are solved by :mod:`solvers.sparse_simplex`. Everything
is batched over leading target axes: ``refs [..., k, d]`` (or one shared ``[k, d]``) and
``target [..., d]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from solvers import sparse_simplex

STRATEGIES = ("avg", "sim", "lin", "sparse", "simplex", "nearest")
DEFAULT_LAM2 = {"vision": 10.0, "language": 1.0}


class Weights(NamedTuple):
  """Composition weights and the account of how they were obtained.

  Attributes:
    weights: [..., k] weights, Σ_i w_i = 1.
    sqdist: [..., k] squared distances ‖z − z_i‖² of the target to each reference.
    error: [...] reconstruction error ‖z − Σ_i w_i z_i‖².
    status: [...] solver status codes (``solvers.sparse_simplex`` constants); strategies
      with a closed form report CONVERGED.
    strategy: the strategy name.
  """

  weights: jax.Array
  sqdist: jax.Array
  error: jax.Array
  status: jax.Array
  strategy: str


def check_strategy(strategy: str) -> str:
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
  return strategy


def _broadcast(refs, target):
  refs = jnp.asarray(refs)
  target = jnp.asarray(target)
  if refs.ndim < 2:
    raise ValueError(f"refs must be [..., k, d], got shape {refs.shape}")
  if target.ndim < 1:
    raise ValueError(f"target must be [..., d], got shape {target.shape}")
  if refs.shape[-1] != target.shape[-1]:
    raise ValueError(f"refs have dimension {refs.shape[-1]} but target has "
                     f"{target.shape[-1]}")
  if refs.shape[-2] == 0:
    raise ValueError("refs is empty (k = 0): at least one reference prototype is needed")
  batch = jnp.broadcast_shapes(refs.shape[:-2], target.shape[:-1])
  refs = jnp.broadcast_to(refs, batch + refs.shape[-2:])
  target = jnp.broadcast_to(target, batch + target.shape[-1:])
  return refs, target


def squared_distances(refs: jax.Array, target: jax.Array) -> jax.Array:
  """‖z − z_i‖² for refs [..., k, d] and target [..., d], computed from differences.

  Differences (not ‖z‖² − 2 z·z_i + ‖z_i‖²) keep float32 accurate when all prototypes
  share a large common offset, as real task prototypes do.
  """
  diff = refs - target[..., None, :]
  return jnp.sum(diff * diff, axis=-1)


def reconstruction_error(refs: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
  """‖z − Σ_i w_i z_i‖², evaluated as ‖Σ_i w_i (z_i − z)‖² (exact when Σ w = 1)."""
  residual = jnp.einsum("...k,...kd->...d", weights, refs - target[..., None, :])
  return jnp.sum(residual * residual, axis=-1)


def compute_weights(refs, target, strategy: str = "sparse", *, lam1: float = 1.0,
                    lam2: float = 10.0, sqdist=None, tol=None, max_iter=None) -> Weights:
  """Weights for composing the adapters whose prototypes are ``refs``.

  Args:
    refs: [..., k, d] reference prototypes z_i (a shared [k, d] broadcasts over targets).
    target: [..., d] target prototype(s) z.
    strategy: one of ``avg``, ``sim``, ``lin``, ``sparse``, ``simplex``, ``nearest``.
    lam1: temperature of ``sim`` (w ∝ exp(−λ1 d²)).
    lam2: ℓ1 weight of ``sparse`` (the seeds use 10 for vision, 1 for language).
    sqdist: optional [..., k] squared distances already computed by retrieval; reused
      instead of recomputed.
    tol, max_iter: passed to the solver.

  Returns:
    :class:`Weights`.
  """
  check_strategy(strategy)
  if lam1 < 0 or lam2 < 0:
    raise ValueError(f"lam1 and lam2 must be >= 0, got lam1={lam1}, lam2={lam2}")
  refs, target = _broadcast(refs, target)
  k = refs.shape[-2]
  batch = refs.shape[:-2]
  if sqdist is None:
    sqdist = squared_distances(refs, target)
  else:
    sqdist = jnp.broadcast_to(jnp.asarray(sqdist, refs.dtype), batch + (k,))
  converged = jnp.full(batch, sparse_simplex.CONVERGED, jnp.int32)
  nonfinite = ~jnp.all(jnp.isfinite(sqdist), axis=-1)

  if strategy == "avg":
    weights = jnp.full(batch + (k,), 1.0 / k, refs.dtype)
    status = converged
  elif strategy == "sim":
    weights = jax.nn.softmax(-lam1 * sqdist, axis=-1)
    status = converged
  elif strategy == "nearest":
    weights = jax.nn.one_hot(jnp.argmin(sqdist, axis=-1), k, dtype=refs.dtype)
    status = converged
  else:
    constraint = "simplex" if strategy == "simplex" else "affine"
    lam = lam2 if strategy == "sparse" else 0.0
    solution = sparse_simplex.solve(refs, target, lam, constraint=constraint, tol=tol,
                                    max_iter=max_iter)
    weights, status = solution.weights, solution.status
  status = jnp.where(nonfinite, sparse_simplex.NONFINITE, status).astype(jnp.int32)
  error = reconstruction_error(refs, target, weights)
  return Weights(weights, sqdist, error, status, strategy)

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

A scale-free λ2. Under Σw = 1, ‖w‖₁ = 1 + 2Σ(wᵢ)₋ is an exact penalty: past the threshold
λ* of a problem (:mod:`solvers.penalty_path`) ``sparse`` *is* ``simplex``, and λ* scales
with the squared prototype distances, i.e. with the encoder. ``lam2_rel=c`` sets
λ2 = c·λ* per problem: c = 0 is ``lin``, c ≥ 1 is ``simplex``, and c in between is the
same fraction of the path for every encoder. :func:`lambda_path` solves a whole path.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from solvers import penalty_path, sparse_simplex

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
    lam2: [...] the λ2 each problem was solved with (``sparse`` only, else None).
    lam_star: [...] the exact-penalty threshold λ* of each problem (``sparse`` and
      ``simplex``, else None): λ2 ≥ λ* gives the ``simplex`` weights, and lam2 / lam_star
      says where on the path a ``sparse`` solution lies.
  """

  weights: jax.Array
  sqdist: jax.Array
  error: jax.Array
  status: jax.Array
  strategy: str
  lam2: jax.Array | None = None
  lam_star: jax.Array | None = None


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


def _check_lam2(lam2, lam2_rel):
  if lam2 is not None and lam2_rel is not None:
    raise ValueError(f"pass lam2 (absolute, got {lam2}) or lam2_rel (a multiple of each "
                     f"problem's threshold λ*, got {lam2_rel}), not both")
  for name, value in (("lam2", lam2), ("lam2_rel", lam2_rel)):
    if value is not None and not (np.isfinite(value) and value >= 0):
      raise ValueError(f"{name} must be a finite number >= 0, got {value}")
  return DEFAULT_LAM2["vision"] if lam2 is None and lam2_rel is None else lam2


def compute_weights(refs, target, strategy: str = "sparse", *, lam1: float = 1.0,
                    lam2: float | None = None, lam2_rel: float | None = None, sqdist=None,
                    tol=None, max_iter=None) -> Weights:
  """Weights for composing the adapters whose prototypes are ``refs``.

  Args:
    refs: [..., k, d] reference prototypes z_i (a shared [k, d] broadcasts over targets).
    target: [..., d] target prototype(s) z.
    strategy: one of ``avg``, ``sim``, ``lin``, ``sparse``, ``simplex``, ``nearest``.
    lam1: temperature of ``sim`` (w ∝ exp(−λ1 d²)).
    lam2: absolute ℓ1 weight of ``sparse`` (the seeds use 10 for vision, 1 for language;
      default 10 when neither lam2 nor lam2_rel is given).
    lam2_rel: scale-free ℓ1 weight of ``sparse``: λ2 = lam2_rel·λ* per problem, λ* the
      exact-penalty threshold (0 → ``lin``, ≥ 1 → ``simplex``). Passing both lam2 and
      lam2_rel is an error. Other strategies ignore lam2 and lam2_rel.
    sqdist: optional [..., k] squared distances already computed by retrieval; reused
      instead of recomputed.
    tol, max_iter: passed to the solver.

  Returns:
    :class:`Weights`; for ``sparse`` and ``simplex`` it carries λ* (``lam_star``) and for
    ``sparse`` the λ2 used (``lam2``). ``sparse`` with λ* costs one extra batched simplex
    solve; with lam2_rel ≥ 1 that solve *is* the answer.

  Example:
    >>> import numpy as np
    >>> refs = np.array([[0., 0.], [1., 0.], [0., 1.]]); z = np.array([.6, .6])
    >>> w = compute_weights(refs, z, "sparse", lam2_rel=0.5)
    >>> w.weights.shape, bool(w.lam2 == 0.5 * w.lam_star)
    ((3,), True)
  """
  check_strategy(strategy)
  lam2 = _check_lam2(lam2, lam2_rel)
  if lam1 < 0:
    raise ValueError(f"lam1 must be >= 0, got lam1={lam1}")
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
  elif strategy == "lin":
    solution = sparse_simplex.solve(refs, target, 0.0, tol=tol, max_iter=max_iter)
    weights, status = solution.weights, solution.status
  else:
    th = penalty_path.exact_penalty_threshold(refs, target, tol=tol, max_iter=max_iter)
    lam_star = th.lam_star
    weights, status = th.weights, th.status
    if strategy == "sparse":
      lam2 = jnp.full(batch, lam2, refs.dtype) if lam2_rel is None else lam2_rel * lam_star
      # For λ2 ≥ λ* the simplex solution is the answer (exact penalty): no second solve.
      if lam2_rel is None or lam2_rel < 1:
        solution = sparse_simplex.solve(refs, target, lam2, tol=tol, max_iter=max_iter)
        above = lam2 >= lam_star
        weights = jnp.where(above[..., None], weights, solution.weights)
        status = jnp.where(above, status, solution.status)
  status = jnp.where(nonfinite, sparse_simplex.NONFINITE, status).astype(jnp.int32)
  error = reconstruction_error(refs, target, weights)
  if strategy == "sparse":
    return Weights(weights, sqdist, error, status, strategy, lam2, lam_star)
  if strategy == "simplex":
    return Weights(weights, sqdist, error, status, strategy, None, lam_star)
  return Weights(weights, sqdist, error, status, strategy)


class LambdaPath(NamedTuple):
  """``sparse`` weights along a path of λ2 values (batch shape [...], n values each).

  Attributes:
    lam: [..., n] the absolute λ2 of each solve.
    lam_star: [...] the exact-penalty threshold λ* of each problem (the path's x-axis is
      lam / lam_star; past 1 every solution is the ``simplex`` one).
    weights: [..., n, k] the weights w(λ).
    error: [..., n] reconstruction error ‖z − Σ wᵢzᵢ‖².
    l1: [..., n] ‖w‖₁ = 1 + 2·(negative mass).
    status: [..., n] solver status codes.
  """

  lam: jax.Array
  lam_star: jax.Array
  weights: jax.Array
  error: jax.Array
  l1: jax.Array
  status: jax.Array


def lambda_path(refs, target, lams, *, relative: bool = False, warm_start: bool = False,
                tol=None, max_iter=None) -> LambdaPath:
  """The ``sparse`` solution for every λ2 in ``lams``, solved as ONE batched solve.

  min_w ‖z − Σ wᵢzᵢ‖² + λ‖w‖₁ s.t. Σw = 1, for each λ in lams; λ* comes from one batched
  simplex solve (:func:`solvers.penalty_path.exact_penalty_threshold`).

  Args:
    refs: [..., k, d] reference prototypes (a shared [k, d] broadcasts over targets).
    target: [..., d] target prototype(s).
    lams: [n] (or [..., n]) λ2 values ≥ 0; absolute, or multiples of each problem's λ* when
      ``relative`` (then 0 → ``lin``, 1 → ``simplex``).
    warm_start: solve every λ by the active-set method started from the simplex solution
      (falling back to the cold solver where it does not finish); else (the default) every
      λ by the FISTA solver from w = 1/k. Both give the same weights; the cold solve was
      as fast or faster in every measured configuration (the active-set method changes one
      index per round and the batch waits for its slowest member: docs/lambda_path_speed.md,
      benchmarks/lambda_path_speed.py).
    tol, max_iter: passed to the solver.

  Returns:
    :class:`LambdaPath`.

  Example:
    >>> import numpy as np
    >>> refs = np.array([[0., 0.], [1., 0.], [0., 1.]]); z = np.array([2., 2.])
    >>> path = lambda_path(refs, z, np.linspace(0, 1.5, 4), relative=True)
    >>> path.weights.shape, [round(float(x), 6) for x in path.l1]
    ((4, 3), [7.0, 4.0, 1.0, 1.0])
  """
  refs, target = _broadcast(refs, target)
  lams = jnp.asarray(lams, refs.dtype)
  if lams.ndim < 1 or lams.shape[-1] == 0:
    raise ValueError(f"lams must hold at least one λ2 value ([n] or [..., n]), got shape {lams.shape}")
  if not bool(jnp.all(jnp.isfinite(lams) & (lams >= 0))):
    raise ValueError("lams must be finite and >= 0")
  th = penalty_path.exact_penalty_threshold(refs, target, tol=tol, max_iter=max_iter)
  if relative:
    lams = lams * th.lam_star[..., None]
  path = penalty_path.solve_path(refs, target, lams, init=th.weights if warm_start else None,
                                 tol=tol, max_iter=max_iter)
  error = reconstruction_error(refs[..., None, :, :], target[..., None, :], path.weights)
  return LambdaPath(path.lam, th.lam_star, path.weights, error, jnp.abs(path.weights).sum(-1),
                    path.status)

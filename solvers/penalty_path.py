"""The exact-penalty threshold λ* of the sparse affine weight problem, and its λ path.

Problem (``solvers.sparse_simplex``), f(w) = ‖z − Σᵢ wᵢ zᵢ‖²:

  affine ℓ1:  min_w f(w) + λ‖w‖₁   s.t. Σw = 1.

Under Σw = 1, ‖w‖₁ = 1 + 2Σᵢ(wᵢ)₋, so λ‖w‖₁ is an exact penalty for w ≥ 0: past a finite
threshold λ* the affine solution *is* the simplex solution w_s = argmin {f : Σw = 1, w ≥ 0}.

The threshold. With g = ∇f(w_s) = 2(G w_s − c) (G = ZZᵀ, c = Zz) the simplex KKT conditions
say gᵢ = ν on the support S of w_s and gᵢ ≥ ν off it. w_s solves the affine ℓ1 problem iff
some multiplier ν' and subgradient sᵢ ∈ ∂|wᵢ| give gᵢ + λsᵢ = ν': on S (sᵢ = 1) this fixes
ν' = ν + λ, and off S (sᵢ ∈ [−1, 1]) it asks gᵢ ∈ [ν, ν + 2λ]. Hence

  λ* = max_{i ∉ S} (gᵢ − ν)/2 = (max g − min g)/2,

the second form because ν = min g and gᵢ − ν = 0 on S. It needs no support (no threshold
on "wᵢ > 0"), which makes it robust to the rounding of w_s. Below λ* the affine solution
has a negative weight (if it were non-negative it would be simplex-feasible with objective
f + λ ≤ f(w_s) + λ, so it would be w_s, which is not optimal there), so λ* is also the
smallest λ at which the affine solution has no negative weight. A scale-free λ is
λ = c·λ*: c = 0 is ``lin``, c ≥ 1 is ``simplex``, and c in between is the same fraction
of the path whatever the scale of the prototypes.

Computed from vectors, g = −2 Z r with r = z − Σⱼ wⱼ zⱼ = −Σⱼ wⱼ (zⱼ − z), so
λ* = maxᵢ (zᵢ − z)·r − minᵢ (zᵢ − z)·r: differences of vectors (a common offset of all
prototypes cancels, as float32 needs), O(kd) per problem once w_s is known.

The path. ``solve_path`` solves the affine problem for n values of λ per problem as one
batch: cold, every λ by ``sparse_simplex.solve`` from w = 1/k; or warm, every λ by the
primal active-set method (``solvers.active_set.polish``) started from a given point — the
simplex solution, exact for all λ ≥ λ* and one support change away from the path just
below it — with a cold solve for the members that the active-set method does not finish.

Example:
  >>> import numpy as np, jax
  >>> from solvers import penalty_path
  >>> Z = np.array([[0., 0.], [1., 0.], [0., 1.]]); z = np.array([2., 2.])
  >>> with jax.enable_x64(True):
  ...   th = penalty_path.exact_penalty_threshold(Z, z)
  >>> round(float(th.lam_star), 6), [round(float(x), 6) for x in th.weights]
  (1.5, [0.0, 0.5, 0.5])
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from solvers import sparse_simplex
from solvers.active_set import polish


class Threshold(NamedTuple):
  """The exact-penalty threshold of each problem (batch shape [...]).

  Attributes:
    lam_star: [...] λ* ≥ 0: for λ ≥ λ* the affine ℓ1 solution is ``weights``.
    weights: [..., k] the simplex solution w_s it was computed from.
    status: [...] the simplex solve's status (``sparse_simplex`` codes); λ* is exact to
      rounding when CONVERGED, NaN when NONFINITE.
  """

  lam_star: jax.Array
  weights: jax.Array
  status: jax.Array


class Path(NamedTuple):
  """The affine ℓ1 solutions along λ (batch shape [...], n values of λ each).

  Attributes:
    lam: [..., n] the λ of each solve.
    weights: [..., n, k] the solutions w(λ).
    objective: [..., n] F(w) = ‖z − Σ wᵢzᵢ‖² + λ‖w‖₁.
    status: [..., n] ``sparse_simplex`` status codes.
    warm: [..., n] True where the warm-started active-set method finished the member (no
      cold solve was needed); all False for a cold path.
  """

  lam: jax.Array
  weights: jax.Array
  objective: jax.Array
  status: jax.Array
  warm: jax.Array


def _vectors(refs, target):
  refs, target = jnp.asarray(refs), jnp.asarray(target)
  if not jnp.issubdtype(refs.dtype, jnp.floating):
    refs = refs.astype(jnp.result_type(float))
  if not jnp.issubdtype(target.dtype, jnp.floating):
    target = target.astype(jnp.result_type(float))
  if refs.ndim < 2 or target.ndim < 1 or refs.shape[-1] != target.shape[-1] or refs.shape[-2] < 1:
    raise ValueError(f"refs must be [..., k >= 1, d] and target [..., d], got {refs.shape} and {target.shape}")
  dtype = jnp.result_type(refs.dtype, target.dtype)
  return refs.astype(dtype), target.astype(dtype)


def threshold_from_simplex(refs, target, weights) -> jax.Array:
  """λ* = maxᵢ (zᵢ − z)·r − minᵢ (zᵢ − z)·r, r = z − Σⱼ wⱼzⱼ, from the simplex solution w.

  Exact when ``weights`` is the exact simplex solution (module docstring); batched over
  the leading axes of refs [..., k, d], target [..., d], weights [..., k]. A value below
  the rounding floor 16·k·eps·maxᵢ‖zᵢ − z‖² is returned as 0.
  """
  refs, target = _vectors(refs, target)
  diff = refs - target[..., None, :]
  hi = lax.Precision.HIGHEST
  r = -jnp.einsum("...k,...kd->...d", weights, diff, precision=hi)
  p = jnp.einsum("...kd,...d->...k", diff, r, precision=hi)
  spread = p.max(-1) - p.min(-1)
  # An interior w_s (target's affine projection inside the hull) has λ* = 0; rounding
  # leaves a spread of about eps·‖zᵢ − z‖², which is returned as exactly 0 so that c·λ*
  # is λ = 0 (``lin``) there rather than a tiny positive λ.
  floor = 16 * refs.shape[-2] * jnp.finfo(refs.dtype).eps * (diff * diff).sum(-1).max(-1)
  return jnp.where(spread > floor, spread, 0)


def exact_penalty_threshold(refs, target, *, tol=None, max_iter=None) -> Threshold:
  """The exact-penalty threshold λ* of each problem, from one batched simplex solve.

  Args:
    refs: [..., k, d] reference prototypes zᵢ.
    target: [..., d] target prototypes z (batch axes broadcast with refs').
    tol, max_iter: passed to ``sparse_simplex.solve``.

  Returns: a :class:`Threshold`; the affine ℓ1 solution for every λ ≥ ``lam_star`` is
  ``weights``, and for every λ < ``lam_star`` it has a negative weight.
  """
  refs, target = _vectors(refs, target)
  sol = sparse_simplex.solve(refs, target, 0.0, constraint="simplex", tol=tol, max_iter=max_iter)
  lam_star = threshold_from_simplex(refs, target, sol.weights)
  return Threshold(lam_star, sol.weights, sol.status)


def solve_path(refs, target, lams, *, init=None, tol=None, max_iter=None) -> Path:
  """Affine ℓ1 solutions for n values of λ per problem, as one batched solve.

  Args:
    refs: [..., k, d] reference prototypes.
    target: [..., d] target prototypes.
    lams: [..., n] (or [n], shared) values of λ ≥ 0.
    init: None for a cold path (``sparse_simplex.solve`` on the [..., n] batch, every member
      from w = 1/k); or starting weights for a warm path, [..., k] shared by a problem's n
      values of λ or [..., n, k] (the full batch shape) one per member — e.g. the simplex
      solution (``exact_penalty_threshold(...).weights``), exact for λ ≥ λ*. Warm: the
      primal active-set
      method runs on all n·batch members at once from ``init``; the members it does not
      finish (non-optimal face after 2k rounds, singular face) are solved cold, in one
      solve taken only if there is any.
    tol, max_iter: passed to ``sparse_simplex.solve``.

  Returns: a :class:`Path`. Both paths solve the same problems; a warm member's weights are
  the KKT point of its optimal face (exact to rounding, like the cold solver's polish).
  """
  refs, target = _vectors(refs, target)
  lams = jnp.asarray(lams, refs.dtype)
  if lams.ndim < 1:
    raise ValueError(f"lams must be [..., n] (n values of λ), got shape {lams.shape}")
  if not isinstance(lams, jax.core.Tracer) and bool(jnp.any(~(lams >= 0))):
    raise ValueError("lams must be finite and >= 0")
  k, d = refs.shape[-2:]
  batch = jnp.broadcast_shapes(refs.shape[:-2], target.shape[:-1], lams.shape[:-1])
  n = lams.shape[-1]
  lams = jnp.broadcast_to(lams, batch + (n,))
  refs = jnp.broadcast_to(refs, batch + (k, d))[..., None, :, :]
  target = jnp.broadcast_to(target, batch + (d,))[..., None, :]
  opts = dict(tol=tol, max_iter=max_iter)
  if init is None:
    sol = sparse_simplex.solve(refs, target, lams, constraint="affine", **opts)
    return Path(lams, sol.weights, sol.objective, sol.status, jnp.zeros(lams.shape, bool))
  init = jnp.asarray(init, refs.dtype)
  if init.ndim == len(batch) + 2:  # one start per member
    init = jnp.broadcast_to(init, batch + (n, k))
  else:  # one start per problem, shared by its n values of λ
    init = jnp.broadcast_to(init, batch + (k,))[..., None, :]
  return _warm_path(refs, target, lams, init, tuple(sorted(opts.items())))


def _centred_gram(refs, target):
  m = refs.mean(-2, keepdims=True)
  zr, zt = refs - m, target - m[..., 0, :]
  hi = lax.Precision.HIGHEST
  return jnp.einsum("...kd,...jd->...kj", zr, zr, precision=hi), jnp.einsum("...kd,...d->...k", zr, zt, precision=hi)


def _objective(refs, target, w, lam):
  diff = refs - target[..., None, :]
  r = jnp.einsum("...k,...kd->...d", w, diff, precision=lax.Precision.HIGHEST)
  return (r * r).sum(-1) + lam * jnp.abs(w).sum(-1)


@functools.partial(jax.jit, static_argnums=(4,))
def _warm_path(refs, target, lams, init, opts):
  # refs [..., 1, k, d], target [..., 1, d], lams [..., n], init [..., 1 or n, k]
  n, k = lams.shape[-1], refs.shape[-2]
  batch = lams.shape
  G, c = _centred_gram(refs, target)  # [..., 1, k, k], [..., 1, k]: formed once per problem
  G = jnp.broadcast_to(G, batch + (k, k)).reshape(-1, k, k)
  c = jnp.broadcast_to(c, batch + (k,)).reshape(-1, k)
  w0 = jnp.broadcast_to(init, batch + (k,)).reshape(-1, k)
  w, ok, done = polish(G, c, lams.reshape(-1), w0, False)
  good = ok & done & jnp.all(jnp.isfinite(w), -1)
  w = w.reshape(batch + (k,))
  good = good.reshape(batch)

  def cold(_):
    sol = sparse_simplex.solve(refs, target, lams, constraint="affine", **dict(opts))
    return sol.weights, sol.objective, sol.status

  F = _objective(refs, target, w, lams)

  def warm(_):
    return w, F, jnp.zeros(batch, jnp.int32)

  # The cold solve runs (on the whole batch: one compile, no gather) only if some member needs it.
  cw, cF, cs = lax.cond(jnp.all(good), warm, cold, None)
  sel = good[..., None]
  return Path(lams, jnp.where(sel, w, cw), jnp.where(good, F, cF),
              jnp.where(good, sparse_simplex.CONVERGED, cs).astype(jnp.int32), good)

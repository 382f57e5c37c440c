"""Exact proximal operators on the affine set {Σw = 1}, batched over leading axes.

Two operators, both of the form w = h(v − μ) with one scalar shift μ per vector:

* ``prox_l1_affine(v, τ)`` = argmin_w ½‖w − v‖² + τ‖w‖₁  s.t. Σw = 1.
  KKT: w = soft(v − μ, τ) (soft(x, τ) = sign(x)·max(|x| − τ, 0)), with μ the root of
  φ(μ) = Σᵢ soft(vᵢ − μ, τ) = 1. φ is continuous, piecewise linear, non-increasing, with
  the 2k breakpoints pᵢ = vᵢ − τ and qᵢ = vᵢ + τ; its slope on a piece is −n(μ),
  n(μ) = #{pᵢ > μ} + #{qᵢ < μ}, and it goes from +∞ to −∞, so the root is unique.
  (Computed in the shift ν = μ + τ, which keeps large τ exact; see
  ``l1_affine_shift_sorted``.)
* ``project_simplex(v)`` = argmin_w ½‖w − v‖²  s.t. Σw = 1, w ≥ 0:
  w = max(v − μ, 0), μ the root of Σᵢ max(vᵢ − μ, 0) = 1 (breakpoints vᵢ).

Exactness. The root is found on its linear piece: by the sorted breakpoints
(``*_shift_sorted``, O(k log k)), or by Newton's method from a warm start
(``*_shift_warm``, what the solver uses: O(k) per step, usually one or two steps because
consecutive solver iterates share their active set). On a piecewise-linear φ a Newton
step from μ lands on the root exactly when no breakpoint lies between μ and the step,
i.e. exactly when the active sets at both ends agree; that is the acceptance test, and a
vector that has not passed it after a few steps is solved by the sorted method. Either
way μ is finally recomputed from the active set A it defines,
μ = (Σ_{A₊} pᵢ + Σ_{A₋} qᵢ − 1)/|A|, and the rounding left in Σw is spread over A, so
Σw = 1 to rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_NEWTON_STEPS = 6


def soft_threshold(x, tau):
  """sign(x)·max(|x| − τ, 0)."""
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - tau, 0)


def _col(tau, v):
  return jnp.broadcast_to(jnp.asarray(tau, v.dtype), v.shape[:-1])[..., None]


# --------------------------------------------------------------------------- affine + ℓ1


def _l1_sets(v, tau, nu):
  up = v > nu[..., None]
  dn = v + 2 * tau < nu[..., None]
  n = up.sum(-1) + dn.sum(-1)
  tot = jnp.where(up, v, 0).sum(-1) + jnp.where(dn, v + 2 * tau, 0).sum(-1)
  return up, dn, n, tot


def l1_affine_shift_sorted(v, tau):
  """The shift ν = μ + τ of ``prox_l1_affine`` from the 2k sorted breakpoints (exact).

  In ν the breakpoints are vᵢ (where wᵢ leaves A₊) and vᵢ + 2τ (where it joins A₋), and
  w = max(v − ν, 0) + min(v − ν + 2τ, 0): no τ enters the positive part, so a huge τ
  costs no precision. Left of the smallest breakpoint every entry is in A₊, so
  φ(b₁) = Σ(vᵢ − b₁); each breakpoint passed changes the slope by +1 (one leaves A₊) or
  −1 (one joins A₋), so φ at all breakpoints is a cumulative sum. ν lies on the piece
  right of the last breakpoint with φ ≥ 1 (or left of all of them), where φ is linear.
  """
  tau = _col(tau, v)
  k = v.shape[-1]
  p, q = v, v + 2 * tau
  b = jnp.concatenate([p, q], -1)
  step = jnp.concatenate([jnp.ones_like(p), -jnp.ones_like(q)], -1)
  b, step = lax.sort((b, step), dimension=b.ndim - 1, num_keys=1)
  n = k - jnp.cumsum(step, -1)  # slope magnitude right of each breakpoint
  phi0 = (p - b[..., :1]).sum(-1, keepdims=True)
  drop = n[..., :-1] * jnp.diff(b, axis=-1)
  phi = jnp.concatenate([phi0, phi0 - jnp.cumsum(drop, -1)], -1)
  m = (phi >= 1).sum(-1) - 1  # φ is non-increasing: last index with φ ≥ 1
  mi = jnp.maximum(m, 0)[..., None]
  bm = jnp.take_along_axis(b, mi, -1)[..., 0]
  phim = jnp.take_along_axis(phi, mi, -1)[..., 0]
  nm = jnp.take_along_axis(n, mi, -1)[..., 0]
  mu_in = bm + (phim - 1) / jnp.maximum(nm, 1)
  mu_left = (p.sum(-1) - 1) / k
  return jnp.where(m >= 0, mu_in, mu_left)


def l1_affine_shift_warm(v, tau, mu0):
  """The shift ν of ``prox_l1_affine`` by Newton from ``mu0`` (exact; see module)."""
  tau = _col(tau, v)
  p, q = v, v + 2 * tau

  def counts(mu):
    up, dn = p > mu[..., None], q < mu[..., None]
    tot = jnp.where(up, p, 0).sum(-1) + jnp.where(dn, q, 0).sum(-1)
    return up.sum(-1) + dn.sum(-1), tot

  def same(mu_a, mu_b):
    a, b = mu_a[..., None], mu_b[..., None]
    return jnp.all(((p > a) == (p > b)) & ((q < a) == (q < b)), -1)

  return _newton_loop(v, p, mu0, counts, same, lambda: l1_affine_shift_sorted(v, tau[..., 0]))


def _newton_loop(v, p, mu0, counts, same, fallback):
  def cond(state):
    j, _, ok = state
    return (j < _NEWTON_STEPS) & ~jnp.all(ok)

  def body(state):
    j, mu, ok = state
    n, tot = counts(mu)
    # n = 0: μ sits where φ = 0 < 1; max(p) − 1 is left of the root (φ ≥ 1 there).
    mu_new = jnp.where(n > 0, (tot - 1) / jnp.maximum(n, 1), jnp.max(p, -1) - 1)
    return j + 1, jnp.where(ok, mu, mu_new), ok | (same(mu, mu_new) & (n > 0))

  mu0 = jnp.broadcast_to(jnp.asarray(mu0, v.dtype), v.shape[:-1])
  mu0 = jnp.where(jnp.isfinite(mu0), mu0, v.mean(-1) - 1 / v.shape[-1])
  _, mu, ok = lax.while_loop(cond, body, (0, mu0, jnp.zeros(mu0.shape, bool)))
  return lax.cond(jnp.all(ok), lambda: mu, lambda: jnp.where(ok, mu, fallback()))


def l1_affine_from_shift(v, tau, nu):
  """w = soft(v − μ, τ) = max(v − ν, 0) + min(v − ν + 2τ, 0), ν = μ + τ recomputed on the
  active set it defines, the rounding left in Σw spread over that set (Σw = 1)."""
  tau = _col(tau, v)
  up, dn, n, tot = _l1_sets(v, tau, nu)
  nu = jnp.where(n > 0, (tot - 1) / jnp.maximum(n, 1), nu)
  w = jnp.where(up, v - nu[..., None], 0) + jnp.where(dn, v + 2 * tau - nu[..., None], 0)
  fix = (1 - w.sum(-1)) / jnp.maximum(n, 1)
  return w + jnp.where(up | dn, fix[..., None], 0), nu


def prox_l1_affine(v, tau):
  """argmin_w ½‖w − v‖² + τ‖w‖₁ s.t. Σw = 1 over the last axis (exact, sorted)."""
  v = jnp.asarray(v)
  return l1_affine_from_shift(v, tau, l1_affine_shift_sorted(v, tau))[0]


def prox_l1_affine_warm(v, tau, mu0):
  """``prox_l1_affine`` from a warm shift ν = μ + τ; returns (w, ν) for the next warm start."""
  return l1_affine_from_shift(v, tau, l1_affine_shift_warm(v, tau, mu0))


# --------------------------------------------------------------------------- simplex


def simplex_shift_sorted(v):
  """μ of ``project_simplex`` by sorting (the classic O(k log k) algorithm)."""
  u = -jnp.sort(-v, axis=-1)
  css = jnp.cumsum(u, -1) - 1
  j = jnp.arange(1, v.shape[-1] + 1, dtype=v.dtype)
  rho = (u - css / j > 0).sum(-1)  # ≥ 1: the largest entry is always active
  return jnp.take_along_axis(css, jnp.maximum(rho - 1, 0)[..., None], -1)[..., 0] / rho


def simplex_shift_warm(v, mu0):
  """μ of ``project_simplex`` by Newton from ``mu0`` (exact; see module)."""
  def counts(mu):
    up = v > mu[..., None]
    return up.sum(-1), jnp.where(up, v, 0).sum(-1)

  def same(mu_a, mu_b):
    return jnp.all((v > mu_a[..., None]) == (v > mu_b[..., None]), -1)

  return _newton_loop(v, v, mu0, counts, same, lambda: simplex_shift_sorted(v))


def simplex_from_shift(v, mu):
  """w = max(v − μ, 0) with μ recomputed on its active set; Σw = 1 to rounding, w ≥ 0."""
  up = v > mu[..., None]
  n = up.sum(-1)
  mu = jnp.where(n > 0, (jnp.where(up, v, 0).sum(-1) - 1) / jnp.maximum(n, 1), mu)
  w = jnp.where(up, jnp.maximum(v - mu[..., None], 0), 0)
  fix = (1 - w.sum(-1)) / jnp.maximum(n, 1)
  return jnp.maximum(w + jnp.where(up, fix[..., None], 0), 0), mu


def project_simplex(v):
  """Euclidean projection onto {w ≥ 0, Σw = 1} over the last axis (exact, sorted)."""
  v = jnp.asarray(v)
  return simplex_from_shift(v, simplex_shift_sorted(v))[0]


def project_simplex_warm(v, mu0):
  """``project_simplex`` from a warm shift; returns (w, μ) for the next warm start."""
  return simplex_from_shift(v, simplex_shift_warm(v, mu0))

"""The face KKT system of the sparse affine / simplex weight problem, and the two
active-set methods built on it, block principal pivoting (``pivot``) and the primal active
set (``polish``): the polish of ``solvers.sparse_simplex``, whose module docstring gives the
problem and the notation (centred Gram form G̃, c, support S, signs σ).

On a face (S, σ) the objective is a quadratic; its minimiser solves
  2(G̃ + ρ11ᵀ)_SS w_S = 2c_S − λσ_S + ν1,  1ᵀw_S = 1
(ρ11ᵀ adds the constant ρ to f on the affine set and makes the block positive definite
whenever the problem restricted to S is strictly convex). The same system, with other
right-hand sides, gives the implicit derivatives of the weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def mv(G, w):
  """G w for batches of k×k matrices, at full precision."""
  return jnp.einsum("...ij,...j->...i", G, w, precision=lax.Precision.HIGHEST)


def where_members(mask, a, b):
  """``jnp.where`` with one flag per member: mask [B] picks a or b over each member's
  trailing axes (a, b: [B, ...], or scalars)."""
  n = max(jnp.ndim(a), jnp.ndim(b))
  return jnp.where(mask.reshape(mask.shape + (1,) * (n - mask.ndim)), a, b)


def kkt_factor(G, w, simplex):
  """Cholesky of 2(G̃ + ρ11ᵀ) + δI on the support of w (identity elsewhere), H, support, signs.

  The tiny ridge δ lets a singular block (k > d, duplicates) factor; one step of iterative
  refinement against the unridged H in ``_kkt_solve`` removes its bias where H is regular.
  """
  S = w > 0 if simplex else w != 0
  return kkt_factor_on(G, S), S, jnp.sign(w)


def kkt_factor_on(G, S):
  """(Cholesky of the ridged block, H) of ``kkt_factor`` for an explicit support S."""
  k = G.shape[-1]
  rho = jnp.trace(G, axis1=-2, axis2=-1) / k
  H = jnp.where(S[..., :, None] & S[..., None, :], 2 * (G + rho[..., None, None]), 0)
  delta = 64 * jnp.finfo(G.dtype).eps * jnp.abs(H).max((-1, -2)) + jnp.finfo(G.dtype).tiny
  eye = jnp.eye(k, dtype=G.dtype)
  Hr = H + jnp.where(S, delta[..., None], 1)[..., None] * eye
  return jax.scipy.linalg.cho_factor(Hr, lower=True), H


def _refined_solve(cf, S, Y):
  """X with H X = Y on S (columns of Y [..., k, m]), one step of iterative refinement."""
  (cf, H) = cf
  Y = jnp.where(S[..., None], Y, 0)
  X = jax.scipy.linalg.cho_solve(cf, Y)
  X = X + jax.scipy.linalg.cho_solve(cf, Y - jnp.einsum("...ij,...jm->...im", H, X, precision=lax.Precision.HIGHEST))
  return jnp.where(S[..., None], X, 0)


def _kkt_solve(cf, S, rhs):
  """x with H x = r + ν1 on S, 1ᵀx_S = t (rhs = (r, t)), x = 0 off S.

  Both right-hand sides go through one chain of triangular solves: jaxlib's batched LAPACK
  kernels block a thread-pool worker while they fan out, and two independent solves
  scheduled side by side on a 2-thread CPU pool deadlock (seen with jax 0.10.2).
  """
  r, t = rhs
  X = _refined_solve(cf, S, jnp.stack([r, jnp.ones_like(r)], -1))
  a, b = X[..., 0], X[..., 1]
  nu = (t - a.sum(-1)) / b.sum(-1)
  return a + nu[..., None] * b


def kkt_solve_linear(cf, S, r):
  """``_kkt_solve`` with t = 0, written so that it is linear in r (reverse mode transposes
  it): the 1-column solve is a constant, sequenced before the r solve by a data dependency
  so the two LAPACK chains never run side by side (see ``_kkt_solve``; ``optimization_barrier``
  would say it better but has no transpose rule here)."""
  b = _refined_solve(cf, S, jnp.ones_like(r)[..., None])[..., 0]
  r = r + 0 * b  # a data dependency (XLA keeps 0·x for floats): the r solve waits for b
  a = _refined_solve(cf, S, r[..., None])[..., 0]
  return a - (a.sum(-1) / b.sum(-1))[..., None] * b


def polish(G, c, lam, w, simplex):
  """A primal active-set method started from w's support and signs (S, σ).

  Each round solves the KKT system on the face (S, σ) (``_polish_step``):
  * if the face's minimiser breaks a sign, step towards it up to the first sign change and
    drop that index (the objective decreases along the step);
  * otherwise move to it and, if some index off S violates optimality by more than
    rounding (affine: |gᵢ − ν| > λ; simplex: gᵢ < ν), add the worst one with the sign
    that decreases the objective, and go on; with no violation the point is optimal.
  So a support far larger than the optimum's (k > d with a tiny λ: an LP-like problem
  whose flat directions FISTA crawls along at λ/L per step) is pruned, and one that is a
  few indices off is completed, in one polish. Rounds stop when every member is optimal or
  fails (or after 2k rounds, against cycling on degenerate faces), so a batch whose
  supports FISTA has already found pays for one round.
  Returns (point, usable, optimal face reached).
  """
  k = w.shape[-1]
  S = w > 0 if simplex else w != 0
  sig = jnp.where(S, 1.0, 0.0).astype(w.dtype) if simplex else jnp.sign(w)
  w, S, sig, ok, done = _polish_step(G, c, lam, w, S, sig, simplex)

  def cond(carry):
    r, _, _, _, ok, done = carry
    return (r < 2 * k) & jnp.any(ok & ~done)

  def body(carry):
    r, w, S, sig, ok, done = carry
    wn, Sn, sign, okn, donen = _polish_step(G, c, lam, w, S, sig, simplex)
    step = (ok & ~done & okn)
    sel = functools.partial(where_members, step)
    return r + 1, sel(wn, w), sel(Sn, S), sel(sign, sig), ok, done | ~okn | step & donen

  _, w, _, _, ok, done = lax.while_loop(cond, body, (jnp.ones((), jnp.int32), w, S, sig, ok, done))
  return w, ok, done


def _face_minimiser(G, c, lam, S, sig, simplex):
  """The minimiser of the quadratic on the face (S, σ): the KKT solve above."""
  # λσ = λ1 − 2λ[σ < 0]; the λ1 part only moves ν, and dropping it keeps a huge λ exact.
  r = 2 * c if simplex else 2 * c + 2 * lam[..., None] * (sig < 0)
  return _kkt_solve(kkt_factor_on(G, S), S, (r, jnp.ones_like(lam)))


def _deviation(G, c, lam, w, S, sig, simplex):
  """(g, ν, g − ν) at w: the gradient g = 2(G̃w − c), the face's multiplier ν (the mean of
  g + λσ over S; simplex: of g) and each index's deviation from it."""
  g = 2 * (mv(G, w) - c)
  gs = g if simplex else g + lam[..., None] * sig
  nu = jnp.where(S, gs, 0).sum(-1) / jnp.maximum(S.sum(-1), 1)
  return g, nu, g - nu[..., None]


def _polish_step(G, c, lam, w, S, sig, simplex):
  """One active-set round on the face (S, σ) (see ``polish``).

  Returns (point, support, signs, usable, optimal)."""
  wp = _face_minimiser(G, c, lam, S, sig, simplex)
  cross = S & (sig * wp < 0)
  ti = jnp.where(cross, w / jnp.where(cross, w - wp, 1), 1)
  t = jnp.clip(ti.min(-1), 0, 1)
  full = ~jnp.any(cross, -1)
  wn = jnp.where(full[..., None], wp, w + t[..., None] * (wp - w))
  leave = cross & (ti <= t[..., None])  # the index that hits zero leaves
  wn = jnp.where(leave, 0, wn)
  keep = S & ~leave
  n = keep.sum(-1)
  moved = keep & (wn != 0)  # Σw = 1 to rounding; a just-added index still at 0 stays there
  wn = jnp.where(keep, wn + jnp.where(moved, ((1 - wn.sum(-1)) / jnp.maximum(moved.sum(-1), 1))[..., None], 0), 0)
  # optimality off the face at the face minimiser: gᵢ − ν against λ (ν from the face)
  g, nu, dev = _deviation(G, c, lam, wn, keep, sig, simplex)
  viol = jnp.where(keep, -jnp.inf, -dev if simplex else jnp.abs(dev) - lam[..., None])
  scale = lam + jnp.abs(g).max(-1) + jnp.abs(nu)
  j = jnp.argmax(viol, -1)
  add = full & (jnp.take_along_axis(viol, j[..., None], -1)[..., 0] > jnp.sqrt(jnp.finfo(w.dtype).eps) * scale)
  onehot = add[..., None] & (jnp.arange(w.shape[-1]) == j[..., None])
  Sn = keep | onehot
  sign = jnp.where(onehot, 1.0 if simplex else -jnp.sign(dev), jnp.where(keep, sig, 0)).astype(w.dtype)
  ok = jnp.all(jnp.isfinite(wn), -1) & (n > 0)
  if simplex:
    ok &= jnp.all(wn >= 0, -1)
  return jnp.where(ok[..., None], wn, w), Sn, sign, ok, full & ~add


# --------------------------------------------------------------------------- pivoting


def _face(G, c, lam, S, sig, simplex):
  """The face minimiser on (S, σ) and g − ν there (ν from the face)."""
  w = _face_minimiser(G, c, lam, S, sig, simplex)
  return w, _deviation(G, c, lam, w, S, sig, simplex)[2]


def _infeasible(w, dev, S, sig, lam, simplex):
  """(signs broken on S, optimality violated off S) at a face minimiser; the tolerance is
  √eps · (λ + max|g − ν|) (``_polish_step``'s add test scales by λ + max|g| + |ν|)."""
  tol = jnp.sqrt(jnp.finfo(w.dtype).eps) * (lam + jnp.abs(dev).max(-1))
  broken = S & (sig * w < 0)
  excess = -dev if simplex else jnp.abs(dev) - lam[..., None]
  return broken, ~S & (excess > tol[..., None])


def _pivot_round(G, c, lam, simplex, carry):
  """One block-pivoting round (see ``pivot``) on carry (S, σ, best, p, stop, optimal, point)."""
  S, sig, best, p, stop, opt, w = carry
  k = S.shape[-1]
  idx = jnp.arange(k)
  wf, dev = _face(G, c, lam, S, sig, simplex)
  broken, viol = _infeasible(wf, dev, S, sig, lam, simplex)
  bad = broken | viol
  n = bad.sum(-1)
  full = (n < best) | (p > 0)
  p = jnp.where(n < best, 3, p - full)
  best = jnp.minimum(best, n)
  last = idx == jnp.argmax(jnp.where(bad, idx, -1), -1)[..., None]
  swap = bad & (full[..., None] | last)
  Sn = S ^ swap
  optn = jnp.all(jnp.isfinite(wf), -1) & (n == 0)
  moving = ~stop & ~optn & jnp.all(jnp.isfinite(wf), -1) & jnp.any(Sn, -1)
  sign = jnp.where(viol, 1.0 if simplex else -jnp.sign(dev), sig)
  mv_ = moving[..., None]
  return (jnp.where(mv_, Sn, S), jnp.where(mv_, jnp.where(Sn, sign, 0), sig), best, p, stop | ~moving,
          opt | (~stop & optn), jnp.where((~stop & optn)[..., None], wf, w))


def pivot(G, c, lam, w, simplex, rounds):
  """Block principal pivoting from w's support and signs: a guess of the optimal face.

  Each round solves the face system on (S, σ); every index of S whose face weight broke
  its sign leaves S, and every index off S that violates optimality (affine |gᵢ − ν| > λ,
  simplex gᵢ < ν) joins it with the sign that lowers the objective, all at once. While the
  number of infeasible indices falls (or for 3 rounds after it last fell) all are exchanged,
  otherwise only the last one (Júdice & Pires 1994; Kim & Park 2011, NNLS), which rules out
  cycling where the LCP's matrix is a P-matrix. Unlike ``polish`` one round can drop or add
  many indices (from a FISTA iterate with a far too large support: 4–7 rounds where the
  primal active set needs 30+), but the objective is not monotone, so it is a guess:
  a member that reaches a face with no infeasible index (``optimal``) holds the exact KKT
  point; the others are left to ``polish``. At most ``rounds`` rounds; G is [B, k, k] (one
  batch axis), and once at most half the members still move, only they are iterated
  (``_pivot_members``). Returns (point, optimal).
  """
  k = w.shape[-1]
  S = w > 0 if simplex else w != 0
  sig = jnp.where(S, 1.0, 0.0).astype(w.dtype) if simplex else jnp.sign(w)
  B = w.shape[:-1]
  carry = (S, sig, jnp.full(B, k + 1), jnp.full(B, 3), jnp.zeros(B, bool), jnp.zeros(B, bool), w)
  carry, _ = _pivot_members(G, c, lam, simplex, carry, jnp.zeros((), jnp.int32), rounds,
                            _NARROWINGS)
  return carry[6], carry[5]


_MIN_MEMBERS = 8
# Each narrowing is one more compiled copy of the round: 2 keeps most of the saving (the
# members left after two halvings are few) at a compile time close to no narrowing at all.
_NARROWINGS = 2


def _pivot_members(G, c, lam, simplex, carry, r, rounds, narrowings):
  """Pivoting rounds on a batch [b, k, k]; once at most half its members are still moving,
  they are gathered into a batch of b/2 (a round costs one batched Cholesky per member,
  moving or not), at most ``narrowings`` times."""
  b = G.shape[0]
  h = b // 2
  small = h < _MIN_MEMBERS or narrowings == 0

  def cond(rc):
    n_open = (~rc[1][4]).sum()
    return (rc[0] < rounds) & ((n_open > 0) if small else (n_open > h))

  body = lambda rc: (rc[0] + 1, _pivot_round(G, c, lam, simplex, rc[1]))
  r, carry = lax.while_loop(cond, body, (r, carry))
  if small:
    return carry, r
  order = jnp.argsort(carry[4], stable=True)[:h]  # the moving members first
  pick = lambda a: a[order]
  sub, r = _pivot_members(pick(G), pick(c), pick(lam), simplex, jax.tree.map(pick, carry), r,
                          rounds, narrowings - 1)
  return jax.tree.map(lambda a, s: a.at[order].set(s), carry, sub), r

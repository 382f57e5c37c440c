"""Batched, certified solver for sparse affine (and simplex) combination weights.

For a target z and references z₁ … z_k (rows of Z), with f(w) = ‖z − Σᵢ wᵢ zᵢ‖²:

  affine:   min_w F(w) = f(w) + λ‖w‖₁   s.t. Σw = 1          (negative weights allowed)
  simplex:  min_w F(w) = f(w) + λ‖w‖₁   s.t. Σw = 1, w ≥ 0

In simplex mode ‖w‖₁ = 1 on the feasible set, so λ only adds the constant λ to F: it is
accepted, has no effect on the weights, and is included in the reported objective (so
the objective of a large-λ affine problem, whose solution *is* the simplex solution,
matches the simplex objective).

Gram form. Only f(w) = wᵀGw − 2cᵀw + s matters (G = ZZᵀ, c = Zz, s = ‖z‖²). Under Σw = 1,
f is translation invariant, so every vector is first centred on the reference mean m
(``solve`` centres the vectors; ``solve_gram`` centres the Gram form exactly:
G̃ = PGP, c̃ = P(c − G1/k), s̃ = s − 2·1ᵀc/k + 1ᵀG1/k², P = I − 11ᵀ/k). After centring the
uniform point w = 1/k has f = s̃, and the plane Σw = 0 carries all the curvature.

Iteration. FISTA with gradient-based adaptive restart (O'Donoghue & Candès) or plain
projected gradient, step 1/L with L = 2·λ_max(PG̃P) from power iterations in the plane;
the proximal step is the exact prox of (λ/L)‖·‖₁ + ι{Σw = 1} or the exact simplex
projection (``solvers.prox``), warm-started by the previous shift. G̃w is carried, so one
batched k×k mat-vec per iteration gives both the next gradient and the certificate.

Certificates (the ``gap`` field, a certified upper bound on F(w) − F*):

* simplex: the Frank–Wolfe gap ∇f(w)ᵀw − minᵢ ∇f(w)ᵢ ≥ F(w) − F* by convexity.
* affine: write f(w) = ‖y − Aw‖² (y = z̃, A = Z̃ᵀ) and h(w) = λ‖w‖₁ + ι{1ᵀw = 1}. Since
  ‖r‖² = max_θ 2θᵀr − ‖θ‖², weak duality gives, for every θ,
      F* ≥ D(θ) = 2θᵀy − ‖θ‖² − h*(2Aᵀθ),
  and h*(u) = sup_{1ᵀw=1} uᵀw − λ‖w‖₁ = max(u) − λ if max(u) − min(u) ≤ 2λ, else +∞
  (an LP: the inner minimum is the largest ν with ‖u − ν1‖_∞ ≤ λ).
  Take θ = α·r, r = y − Aw the residual, α ≥ 0. With g = ∇f(w) = 2(Gw − c) one has
  2Aᵀr = −g, ‖r‖² = f(w), yᵀr = s − cᵀw, hence, in Gram form only,
      D(α) = α·(2(s − cᵀw) + min g) − α²·f(w) + λ,   feasible iff α·(max g − min g) ≤ 2λ.
  The concave D is maximised over α ∈ [0, 2λ/(max g − min g)] in closed form. At α = 1 it
  equals the linearisation bound f(w) + min_{1ᵀu=1} gᵀ(u − w) + λ‖u‖₁, and at the
  optimum (KKT: gᵢ = ν − λ·sign wᵢ on the support, |gᵢ − ν| ≤ λ off it) the gap is 0.
  At λ = 0 the bound degenerates to the trivial F* ≥ 0 (α = 0), so there convergence is
  judged by the gradient-mapping residual ‖PG∇f‖_∞/L instead (the polish makes the
  answer exact: it solves the KKT system [2G 1; 1ᵀ 0]).

Polish. Once every live member's relative gap is below 1e-3, every 100 iterations in any
case, and (k ≥ 32) at iteration 10, the active set is solved for directly; for k ≥ 32 in
two stages (below k = 32 the second alone: few indices are wrong there, and the first
would only cost compile time):

* block principal pivoting (``solvers.active_set.pivot``) from each member's support S and
  signs σ: solve the KKT system on the face,
      2(G̃ + ρ11ᵀ)_SS w_S = 2c_S − λσ_S + ν1,  1ᵀw_S = 1,
  then let every index whose face weight broke its sign (σᵢwᵢ < 0) leave S and every index
  off S that violates optimality (|gᵢ − ν| > λ; simplex gᵢ < ν) join it, all at once (one
  at a time when that stops reducing the number of infeasible indices: Júdice & Pires'
  backup rule), until no index is infeasible: that face's minimiser is the KKT point.
  From a FISTA iterate whose support is far too large (ill-conditioned members: after 10
  iterations ~35 of 64 indices wrong) this takes 4–7 rounds, where a one-index-per-round
  method needs 30+; it is what lets the first polish come at iteration 10, not 100.
* members that pivoting leaves unfinished (it is not monotone in F; 16 rounds at most) get
  the primal active-set method from their FISTA iterate: on the same face system, if the
  face's minimiser breaks a sign it steps to the first sign change and drops that index,
  otherwise it adds the index that violates optimality most, until no index does (F
  decreases at every step). This is what makes LP-like problems (k > d, tiny λ) finish.

(ρ11ᵀ adds the constant ρ to f on the affine set and makes the block positive definite
whenever the problem restricted to S is strictly convex; a tiny ridge plus one step of
iterative refinement handles singular blocks.) The polished point is kept if it is finite,
feasible and neither its objective nor its gap is worse; the certificate then decides
convergence.

Gradients. ``weights`` and ``objective`` carry a custom JVP: implicit differentiation of
the same active-set KKT system (dw_S solves it with right side −2(dG w)_S + 2dc_S − dλσ_S,
1ᵀdw = 0; dw = 0 off S), and dF = wᵀdGw − 2dcᵀw + ds + dλ‖w‖₁ (envelope theorem). Both
are linear in the tangents, so reverse mode works too. Undefined where the active set is
degenerate (a zero weight exactly at its threshold) or the S-block is singular.

Batching and failures. Any leading batch axes; all members are iterated together (one
compile per shape) in chunks, and a member stops moving once it has converged. NaN/Inf in
a member's input gives it status NONFINITE and NaN outputs; the others are unaffected.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from solvers import prox
from solvers.active_set import kkt_factor, kkt_solve_linear, mv as _mv, pivot as _pivot, polish as _polish
from solvers.active_set import where_members as _where_members

CONVERGED, MAX_ITER, NONFINITE = 0, 1, 2
STATUS_NAMES = ("converged", "max_iter", "nonfinite")
CONSTRAINTS = ("affine", "simplex")
METHODS = ("fista", "pgd")

_POWER_STEPS = 12
_POLISH_START = 1e-3  # first polish once every live member's relative gap is below this
# ...and in any case every this many iterations. A polish is an active-set method (one
# batched Cholesky per round, about 12 iterations' worth) that finishes a member whose
# support FISTA has nearly found; measured on ill-conditioned prototypes (B=1000, k=64,
# d=768, "subspace" in benchmarks/solver_speed.py) every 10 iterations cost 2.6 ms/problem,
# every 50 1.06, every 100 0.53, every 200 0.68 (the member's own FISTA then finishes).
_POLISH_EVERY = 100
# ...and once at this iteration: block pivoting finishes ill-conditioned members from any
# early iterate in 4-7 rounds (a round ~ 15 iterations' cost), so waiting buys little; on
# "subspace" (benchmarks/solver_speed.py, B=1000, k=64, d=768, float32) this took the median
# from 100 iterations to 10 and the time from 3.5-3.7x the Gram floor to 1.8-2.0x (noisy
# 2-core machine). Well-conditioned members ("indep", "offset") are done before it.
_POLISH_FIRST = 10
_PIVOT_ROUNDS = 16  # then the primal active set takes over (see module docstring)
# Block pivoting (and the polish at _POLISH_FIRST) from this many references on: the
# primal active set's rounds grow with the number of wrong indices, which grows with k; at
# small k it needs few rounds and the pivoting loop would only add compile time (one more
# while loop and its narrowed copies: +1-6 s on the first call of a shape).
_PIVOT_MIN_K = 32
_GRAM_BYTES = 2 << 20  # vectors per chunk when forming Gram matrices (cache-sized)
_SOLVE_BYTES = 2 << 20  # Gram matrices per chunk while iterating (cache-sized)


class Solution(NamedTuple):
  """Per-problem results; every field has the batch shape (weights: batch + [k])."""

  weights: jax.Array
  objective: jax.Array  # F(w) = ‖z − Σ wᵢzᵢ‖² + λ‖w‖₁
  gap: jax.Array  # certified upper bound on F(w) − F* (see module docstring)
  residual: jax.Array  # ‖w − prox(w − ∇f(w)/L)‖_∞, the fixed-point residual
  iterations: jax.Array
  status: jax.Array  # CONVERGED / MAX_ITER / NONFINITE


class _Config(NamedTuple):
  constraint: str
  method: str
  tol: float
  max_iter: int
  polish: bool


def status_name(status):
  """The name of a status code ("converged", "max_iter", "nonfinite"); arrays map elementwise."""
  names = np.asarray(STATUS_NAMES)[np.asarray(status)]
  return str(names) if names.ndim == 0 else names


# --------------------------------------------------------------------------- Gram form


def _centred_gram(refs, target):
  """(G̃, c̃, s̃) of the vectors centred on the reference mean (differentiable, dense)."""
  m = refs.mean(-2, keepdims=True)
  zr, zt = refs - m, target - m[..., 0, :]
  hi = lax.Precision.HIGHEST
  G = jnp.einsum("...kd,...jd->...kj", zr, zr, precision=hi)
  return G, jnp.einsum("...kd,...d->...k", zr, zt, precision=hi), (zt * zt).sum(-1)


def centre_gram(gram, corr, sqnorm):
  """Centre a Gram form on the reference mean: (PGP, P(c − G1/k), s − 2·mean c + mean G)."""
  rm = gram.mean(-1)
  G = gram - rm[..., :, None] - rm[..., None, :] + rm.mean(-1)[..., None, None]
  c = corr - rm
  c = c - c.mean(-1, keepdims=True)
  return G, c, sqnorm - 2 * corr.mean(-1) + rm.mean(-1)


def _map_chunks(fn, args, chunk):
  """fn over the leading axis in chunks (fori_loop); the last chunk overlaps the previous."""
  n = args[0].shape[0]
  if n <= chunk:
    return fn(*args)
  slc = lambda x, s: lax.dynamic_slice_in_dim(x, s, chunk, 0)
  shapes = jax.eval_shape(fn, *[jax.ShapeDtypeStruct((chunk,) + a.shape[1:], a.dtype) for a in args])
  outs = jax.tree.map(lambda sd: jnp.zeros((n,) + sd.shape[1:], sd.dtype), shapes)

  def body(i, outs):
    s = jnp.minimum(i * chunk, n - chunk)
    res = fn(*[slc(a, s) for a in args])
    return jax.tree.map(lambda o, r: lax.dynamic_update_slice_in_dim(o, r, s, 0), outs, res)

  return lax.fori_loop(0, -(-n // chunk), body, outs)


def _chunk(n_bytes, per_problem):
  return max(1, int(n_bytes // max(per_problem, 1)))


# --------------------------------------------------------------------------- pieces


def _lipschitz(G):
  """L = 2·λ_max(PG̃P) by power iteration in the plane Σw = 0, and a 'flat' flag.

  ‖PG̃x‖ for the final unit x under-estimates λ_max slightly; it is inflated by 5% and
  capped by the Frobenius norm (a true upper bound). A member whose plane curvature is
  at rounding level (identical references) is flat: f is constant on the feasible set.
  """
  k = G.shape[-1]
  x = jnp.cos(jnp.arange(k, dtype=G.dtype) * 2.3 + 0.7)
  x = jnp.broadcast_to(x - x.mean(), G.shape[:-1])

  def body(_, x):
    y = _mv(G, x)
    y = y - y.mean(-1, keepdims=True)
    return y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), jnp.finfo(G.dtype).tiny)

  x = lax.fori_loop(0, _POWER_STEPS, body, body(0, x))
  y = _mv(G, x)
  est = jnp.linalg.norm(y - y.mean(-1, keepdims=True), axis=-1)
  fro = jnp.sqrt((G * G).sum((-1, -2)))
  L = 2 * jnp.minimum(1.05 * est, fro)
  flat = L <= 32 * k * jnp.finfo(G.dtype).eps * jnp.abs(G).max((-1, -2))
  return jnp.where(flat, 1, L), flat


def _certificate(w, Gw, c, s, lam, gabs, simplex):
  """(F(w), gap(w), variable part of F, rounding scale) from G̃w (module docstring).

  λ is cancelled analytically (‖w‖₁ − 1 = 2Σ(wᵢ)₋ under Σw = 1), so the gap and the
  variable part f + λ(‖w‖₁ − 1) of F keep their accuracy however large λ is.
  """
  g = 2 * (Gw - c)
  wg, cw = (w * Gw).sum(-1), (c * w).sum(-1)
  l1 = jnp.abs(w).sum(-1)
  f = wg - 2 * cw + s
  extra = 2 * lam * jnp.maximum(-w, 0).sum(-1)
  gmin, gmax = g.min(-1), g.max(-1)
  if simplex:
    gap = (g * w).sum(-1) - gmin
  else:
    a = 2 * (s - cw) + gmin
    spread = gmax - gmin
    amax = jnp.where(spread > 0, 2 * lam / jnp.where(spread > 0, spread, 1), jnp.inf)
    astar = jnp.where(f > 0, a / jnp.where(f > 0, 2 * f, 1), jnp.where(a > 0, jnp.inf, 0))
    alpha = jnp.clip(astar, 0, amax)
    alpha = jnp.where(jnp.isfinite(alpha), alpha, 0)
    gap = f + extra - alpha * a + alpha * alpha * f  # F(w) − D(α)
  # What rounding alone can leave in f and the gap: the size of the terms that cancel.
  scale = s + l1 * l1 * gabs + 2 * l1 * jnp.abs(c).max(-1)
  return f + lam * l1, jnp.maximum(gap, 0), jnp.maximum(f + extra, 0), scale


def _prox(v, tau, mu, simplex):
  return prox.project_simplex_warm(v, mu) if simplex else prox.prox_l1_affine_warm(v, tau, mu)


# --------------------------------------------------------------------------- iteration


class _State(NamedTuple):
  it: jax.Array
  w: jax.Array
  w_prev: jax.Array
  Gw: jax.Array
  Gw_prev: jax.Array
  t: jax.Array
  mu: jax.Array
  F: jax.Array
  gap: jax.Array
  res0: jax.Array
  done: jax.Array
  iters: jax.Array
  thr: jax.Array
  polished: jax.Array


def _solve_centred(G, c, s, lam, cfg: _Config):
  """The solver on one chunk of centred Gram forms: G [B, k, k], c [B, k], s, lam [B]."""
  B, k = c.shape
  dt = c.dtype
  simplex = cfg.constraint == "simplex"
  lam0 = (lam == 0) & (not simplex)  # λ = 0 affine: judged by the residual (see module)
  bad = ~(jnp.all(jnp.isfinite(G), (-1, -2)) & jnp.all(jnp.isfinite(c), -1) & jnp.isfinite(s) & jnp.isfinite(lam))
  G = jnp.where(bad[:, None, None], 0, G)
  c, s, lam = jnp.where(bad[:, None], 0, c), jnp.where(bad, 0, s), jnp.where(bad, 0, lam)
  L, flat = _lipschitz(G)
  gabs = jnp.abs(G).max((-1, -2))
  inv_L = jnp.where(flat, 0, 1 / L)
  tau = lam * inv_L
  eps = jnp.finfo(dt).eps

  def measures(w, Gw):
    F, gap, Fv, scale = _certificate(w, Gw, c, s, lam, gabs, simplex)
    g = 2 * (Gw - c)
    res0 = jnp.abs(g - g.mean(-1, keepdims=True)).max(-1) * inv_L
    floor = 8 * eps * scale
    conv = jnp.where(lam0, res0 <= cfg.tol * jnp.maximum(jnp.abs(w).max(-1), 1), gap <= cfg.tol * Fv + floor)
    progress = jnp.where(lam0, res0, gap / jnp.maximum(Fv, floor))
    return F, gap, res0, conv | flat | bad, progress

  pivoting = k >= _PIVOT_MIN_K  # static: the shapes decide

  def face_point(st):
    if not pivoting:
      return _polish(G, c, lam, st.w, simplex)
    # block pivoting first; the primal active set only if some member needs it
    wb, opt = _pivot(G, c, lam, st.w, simplex, _PIVOT_ROUNDS)

    def rest(_):
      wp, ok, full = _polish(G, c, lam, st.w, simplex)
      sel = functools.partial(_where_members, opt)
      return sel(wb, wp), ok | opt, full | opt

    return lax.cond(jnp.all(opt | st.polished), lambda _: (wb, opt, opt), rest, None)

  def polish(st):
    wp, ok, full = face_point(st)
    Gwp = _mv(G, wp)
    Fp, gapp, res0p, convp, _ = measures(wp, Gwp)
    ok &= ~st.polished & (Fp <= st.F + 4 * eps * jnp.abs(st.F)) & ((gapp <= st.gap) | lam0 | ~full)
    sel = functools.partial(_where_members, ok)
    w, Gw = sel(wp, st.w), sel(Gwp, st.Gw)
    _, _, _, conv, progress = measures(w, Gw)
    done = st.done | conv
    thr = jnp.where(done, st.thr, 1e-2 * jnp.minimum(st.thr, progress))
    return st._replace(w=w, w_prev=w, Gw=Gw, Gw_prev=Gw, t=jnp.where(ok, 1, st.t),
                       F=sel(Fp, st.F), gap=sel(gapp, st.gap), res0=sel(res0p, st.res0),
                       done=done, thr=thr, polished=st.polished | (ok & full))

  def body(st):
    if cfg.method == "fista":
      t_next = (1 + jnp.sqrt(1 + 4 * st.t * st.t)) / 2
      beta = ((st.t - 1) / t_next)[:, None]
    else:
      t_next, beta = st.t, jnp.zeros((B, 1), dt)
    y = st.w + beta * (st.w - st.w_prev)
    Gy = st.Gw + beta * (st.Gw - st.Gw_prev)
    v = y - 2 * (Gy - c) * inv_L[:, None]
    w, mu = _prox(v, tau, st.mu, simplex)
    Gw = _mv(G, w)
    restart = ((y - w) * (w - st.w)).sum(-1) > 0
    F, gap, res0, conv, progress = measures(w, Gw)
    live = ~st.done
    keep = functools.partial(_where_members, live)
    st = _State(st.it + 1, keep(w, st.w), keep(st.w, st.w_prev), keep(Gw, st.Gw), keep(st.Gw, st.Gw_prev),
                keep(jnp.where(restart, 1, t_next), st.t), keep(mu, st.mu), keep(F, st.F), keep(gap, st.gap),
                keep(res0, st.res0), st.done | (live & conv), st.iters + live, st.thr, st.polished)
    if not cfg.polish:
      return st
    ready = jnp.all(st.done | (progress <= st.thr)) | (st.it % _POLISH_EVERY == 0)
    if pivoting:
      ready |= st.it == _POLISH_FIRST
    return lax.cond(ready & ~jnp.all(st.done), polish, lambda x: x, st)

  w0 = jnp.full((B, k), 1 / k, dt)
  Gw0 = _mv(G, w0)
  F0, gap0, res00, conv0, _ = measures(w0, Gw0)
  st = _State(jnp.zeros((), jnp.int32), w0, w0, Gw0, Gw0, jnp.ones((B,), dt), jnp.full((B,), jnp.nan, dt),
              F0, gap0, res00, conv0, jnp.zeros((B,), jnp.int32), jnp.full((B,), _POLISH_START, dt), bad | flat)
  st = lax.while_loop(lambda st: (st.it < cfg.max_iter) & ~jnp.all(st.done), body, st)
  if cfg.polish:
    # converged members that the loop never polished get their exact KKT point now
    st = lax.cond(jnp.all(st.polished), lambda x: x, polish, st)
  # fixed-point residual ‖w − T(w)‖_∞ with T the proximal-gradient map
  tw, _ = _prox(st.w - 2 * (st.Gw - c) * inv_L[:, None], tau, st.mu, simplex)
  res = jnp.where(flat, 0, jnp.abs(st.w - tw).max(-1))
  status = jnp.where(bad, NONFINITE, jnp.where(st.done, CONVERGED, MAX_ITER)).astype(jnp.int32)
  nan = functools.partial(_where_members, bad, jnp.nan)
  return nan(st.w), nan(st.F), nan(st.gap), nan(res), st.iters, status


# --------------------------------------------------------------------------- derivatives


def _tangents(G, c, lam, w, dG, dc, ds, dlam, constraint):
  """(dw, dF) by implicit differentiation of the active-set KKT system (module docstring)."""
  simplex = constraint == "simplex"
  cf, S, sig = kkt_factor(G, w, simplex)
  r = 2 * dc - 2 * _mv(dG, w)
  if not simplex:
    r = r + 2 * dlam[..., None] * (sig < 0)  # dλσ up to a multiple of 1 (absorbed by dν)
  dw = kkt_solve_linear(cf, S, r)
  dF = (w * _mv(dG, w)).sum(-1) - 2 * (dc * w).sum(-1) + ds + dlam * jnp.abs(w).sum(-1)
  return dw, dF


def _with_jvp(tangent_inputs):
  """Wrap a solver f(*args, cfg) -> tuple with the implicit JVP; tangent_inputs maps
  (args, arg tangents) to the centred (G, c), their tangents (dG, dc, ds), lam and dlam."""

  def wrap(fun):
    f = jax.custom_jvp(fun, nondiff_argnums=(0,))

    @f.defjvp
    def _(cfg, primals, tangents):
      out = f(cfg, *primals)
      w, F = out[0], out[1]
      (G, c, lam), (dG, dc, ds, dlam) = tangent_inputs(primals, tangents)
      dw, dF = _tangents(G, c, lam, w, dG, dc, ds, dlam, cfg.constraint)
      zero = lambda a: (jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.inexact)
                        else np.zeros(a.shape, jax.dtypes.float0))
      return out, (dw.astype(w.dtype), dF.astype(F.dtype)) + tuple(zero(a) for a in out[2:])

    return f

  return wrap


def _vec_tangents(primals, tangents):
  refs, target, lam = primals
  (G, c, _), (dG, dc, ds) = jax.jvp(_centred_gram, primals[:2], tangents[:2])
  return (G, c, lam), (dG, dc, ds, tangents[2])


def _gram_tangents(primals, tangents):
  gram, corr, sqnorm, lam = primals
  (G, c, _), (dG, dc, ds) = jax.jvp(centre_gram, primals[:3], tangents[:3])
  return (G, c, lam), (dG, dc, ds, tangents[3])


@_with_jvp(_vec_tangents)
def _solve_vectors(cfg, refs, target, lam):
  n, k, d = refs.shape
  item = refs.dtype.itemsize
  G, c, s = _map_chunks(_centred_gram, (refs, target), _chunk(_GRAM_BYTES, (k + 1) * d * item))
  return _map_chunks(lambda *a: _solve_centred(*a, cfg), (G, c, s, lam), _chunk(_SOLVE_BYTES, k * k * item))


@_with_jvp(_gram_tangents)
def _solve_gram(cfg, gram, corr, sqnorm, lam):
  k = corr.shape[-1]
  G, c, s = centre_gram((gram + jnp.swapaxes(gram, -1, -2)) / 2, corr, sqnorm)
  return _map_chunks(lambda *a: _solve_centred(*a, cfg), (G, c, s, lam),
                     _chunk(_SOLVE_BYTES, k * k * gram.dtype.itemsize))


# --------------------------------------------------------------------------- public API


def _float(x, name):
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating) or x.dtype == bool:
    raise ValueError(f"{name} must be real floating point, got dtype {x.dtype}")
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


def _config(constraint, method, tol, max_iter, polish, dtype):
  if constraint not in CONSTRAINTS:
    raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}")
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if tol is None:
    tol = 1e-12 if jnp.finfo(dtype).bits >= 64 else 1e-6
  if not (isinstance(tol, (int, float)) and np.isfinite(tol) and tol > 0):
    raise ValueError(f"tol must be a positive finite number, got {tol!r}")
  if max_iter is None:
    max_iter = 5000
  if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
    raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
  return _Config(constraint, method, float(tol), int(max_iter), bool(polish))


def _lam(lam, dtype, batch, k):
  lam = _float(lam, "lam").astype(dtype)
  try:
    lam = jnp.broadcast_to(lam, batch)
  except ValueError:
    raise ValueError(f"lam of shape {lam.shape} does not broadcast to the batch shape {batch}") from None
  if not isinstance(lam, jax.core.Tracer) and bool(jnp.any(lam < 0)):
    raise ValueError("lam must be >= 0")
  return lam


def _batch(*shapes, names):
  try:
    return jnp.broadcast_shapes(*shapes)
  except ValueError:
    raise ValueError(f"batch shapes of {' and '.join(names)} do not broadcast: {shapes}") from None


def _finish(out, batch, k):
  w, F, gap, res, it, st = out
  return Solution(w.reshape(batch + (k,)), F.reshape(batch), gap.reshape(batch), res.reshape(batch),
                  it.reshape(batch), st.reshape(batch))


def solve(refs, target, lam=0.0, *, constraint="affine", method="fista", tol=None, max_iter=None,
          polish=True) -> Solution:
  """Weights w of target ≈ Σᵢ wᵢ·refsᵢ: min ‖target − wᵀrefs‖² + lam·‖w‖₁, Σw = 1 (w ≥ 0 if simplex).

  Args:
    refs: [..., k, d] reference vectors (k ≥ 1).
    target: [..., d] target vectors; batch axes broadcast with refs'.
    lam: ℓ1 weight ≥ 0, a scalar or broadcast over the batch. Simplex: a constant (no effect
      on the weights, included in the objective).
    constraint: "affine" (negative weights allowed) or "simplex" (w ≥ 0).
    method: "fista" (adaptive restart) or "pgd".
    tol: relative tolerance on the certified gap: stop when gap ≤ tol·(F − λ) + a rounding
      floor (F − λ = f + λ(‖w‖₁ − 1) ≥ 0 is the part of F that w can change); at λ = 0,
      affine, when the residual ‖P∇f‖_∞/L ≤ tol·max(1, ‖w‖_∞). Default 1e-12 (float64) /
      1e-6 (float32). A gap of ε bounds the weight error by about √ε, hence the polish.
    max_iter: iteration cap (default 5000).
    polish: solve the KKT system on the active set near the end (exact to rounding).

  Returns: a ``Solution`` with batch shape broadcast(refs.shape[:-2], target.shape[:-1], lam).
  """
  refs, target = _float(refs, "refs"), _float(target, "target")
  if refs.ndim < 2:
    raise ValueError(f"refs must have shape [..., k, d], got {refs.shape}")
  if target.ndim < 1:
    raise ValueError(f"target must have shape [..., d], got {target.shape}")
  k, d = refs.shape[-2:]
  if k < 1:
    raise ValueError("refs must hold at least one reference (k >= 1)")
  if d < 1 or target.shape[-1] != d:
    raise ValueError(f"target's last axis ({target.shape[-1]}) must equal refs' d ({d} >= 1)")
  dtype = jnp.result_type(refs.dtype, target.dtype)
  lam_shape = jnp.shape(lam)
  batch = _batch(refs.shape[:-2], target.shape[:-1], lam_shape, names=("refs", "target", "lam"))
  lam = _lam(lam, dtype, batch, k)
  cfg = _config(constraint, method, tol, max_iter, polish, dtype)
  return _solve_jit(refs.astype(dtype), target.astype(dtype), lam, cfg)


@functools.partial(jax.jit, static_argnums=(3,))
def _solve_jit(refs, target, lam, cfg):
  batch = lam.shape
  k, d = refs.shape[-2:]
  n = int(np.prod(batch, dtype=np.int64))
  refs = jnp.broadcast_to(refs, batch + (k, d)).reshape(n, k, d)
  target = jnp.broadcast_to(target, batch + (d,)).reshape(n, d)
  return _finish(_solve_vectors(cfg, refs, target, lam.reshape(n)), batch, k)


def solve_gram(gram, corr, sqnorm, lam=0.0, *, constraint="affine", method="fista", tol=None,
               max_iter=None, polish=True) -> Solution:
  """``solve`` from the Gram form: gram = Z Zᵀ [..., k, k], corr = Z z [..., k], sqnorm = ‖z‖² [...].

  For callers that already hold inner products (retrieval computes cᵢ and ‖zᵢ‖² for its
  distances). The form is centred exactly (``centre_gram``); its float32 accuracy is that of
  the given numbers, so prefer ``solve`` when the vectors share a large common offset.
  """
  gram, corr, sqnorm = _float(gram, "gram"), _float(corr, "corr"), _float(sqnorm, "sqnorm")
  if gram.ndim < 2 or gram.shape[-1] != gram.shape[-2]:
    raise ValueError(f"gram must have shape [..., k, k], got {gram.shape}")
  k = gram.shape[-1]
  if k < 1:
    raise ValueError("gram must describe at least one reference (k >= 1)")
  if corr.ndim < 1 or corr.shape[-1] != k:
    raise ValueError(f"corr must have shape [..., {k}], got {corr.shape}")
  dtype = jnp.result_type(gram.dtype, corr.dtype, sqnorm.dtype)
  batch = _batch(gram.shape[:-2], corr.shape[:-1], sqnorm.shape, jnp.shape(lam),
                 names=("gram", "corr", "sqnorm", "lam"))
  lam = _lam(lam, dtype, batch, k)
  cfg = _config(constraint, method, tol, max_iter, polish, dtype)
  return _solve_gram_jit(gram.astype(dtype), corr.astype(dtype), sqnorm.astype(dtype), lam, cfg)


@functools.partial(jax.jit, static_argnums=(4,))
def _solve_gram_jit(gram, corr, sqnorm, lam, cfg):
  batch = lam.shape
  k = corr.shape[-1]
  n = int(np.prod(batch, dtype=np.int64))
  gram = jnp.broadcast_to(gram, batch + (k, k)).reshape(n, k, k)
  corr = jnp.broadcast_to(corr, batch + (k,)).reshape(n, k)
  sqnorm = jnp.broadcast_to(sqnorm, batch).reshape(n)
  return _finish(_solve_gram(cfg, gram, corr, sqnorm, lam.reshape(n)), batch, k)

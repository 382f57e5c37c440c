"""Speed and accuracy of solvers.sparse_simplex against generic solvers and the Gram floor.

Problem per batch member: min ‖z − Σ wᵢ zᵢ‖² + λ‖w‖₁ s.t. Σw = 1 (affine), and the simplex
variant, with k prototypes of dimension d. Data kinds:

* ``indep``: zᵢ, z ~ N(0, I).
* ``offset``: zᵢ = 30·u + εᵢ, z = 30·u + ε (the issue's correlated prototypes: a large
  common offset u, 30× the spread, as real task prototypes have).
* ``subspace``: zᵢ = 10·u + A hᵢ + 0.3·εᵢ (the offset plus a shared 16-dim subspace with
  decaying scales and a little noise): harder than ``offset``, the centred Gram has a
  condition number of about 10³ in the plane Σw = 0, so every first-order method needs
  hundreds of iterations.

λ = 0.01 × the mean squared centred norm of the references (a sparse, well-posed regime).

Methods, all timed end-to-end from vectors to weights where they can be (``time/prob``),
compile/first call apart, medians of --reps runs after a warm-up:

* ``ours``: ``solve(refs, target, lam)`` (and ``constraint="simplex"``).
* ``cvxpy-*``: a DPP-parameterised problem (Parameter A = centred refsᵀ, y, λ), re-solved
  in a Python loop with Clarabel / OSQP / ECOS on the first --cvxpy-subset members; the
  per-problem time is extrapolated to the batch (stated in the notes).
* ``jaxopt-pg-fixed``: jaxopt.ProximalGradient(acceleration=True) with our exact prox and
  our step 1/L (the problem is scaled by 1/L so stepsize=1), jit+vmap, on the centred Gram
  (``-raw``: on the uncentred Gram, as a user would hand it). Run with tol=0 and maxiter
  doubling from 8 until its worst relative objective excess is ≤ the target accuracy
  (max of ours and 1e-6 float32 / 1e-10 float64); the time of that run is reported.
* ``jaxopt-pg-backtrack``: its default line search, run in a subprocess under
  --time-limit seconds; the outcome is reported.
* ``jaxopt-projgrad``: jaxopt.ProjectedGradient with jaxopt's simplex projection, our step
  (simplex rows), same accuracy protocol.
* ``jaxopt-boxosqp``, ``qpax``: the QP form (w, t: −t ≤ w ≤ t, 1ᵀw = 1) on the centred
  Gram, jit+vmap on the first --peer-subset members, extrapolated.
* ``gram-*``: the floor, forming the batched Gram matrices alone: jit einsum, numpy matmul,
  torch.bmm. ``ours/gram-*`` is our end-to-end time over each.

Accuracy: relative objective excess (F(w) − F_ref)/F_ref with F evaluated in float64 on the
given (dtype-rounded) data, F_ref from our float64 solve (certified gap ≤ 1e-12 relative;
checked against Clarabel on the cvxpy subset, ``ref_vs_clarabel``), |Σw − 1|, min w.

  python benchmarks/solver_speed.py --quick
  python benchmarks/solver_speed.py --key        # B=10000, k=64, d=768, float32, every kind
  python benchmarks/solver_speed.py              # the full grid (hours; memory-capped)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # float32 configs still run in float32

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from solvers import prox  # noqa: E402
from solvers import sparse_simplex as ss  # noqa: E402


# --------------------------------------------------------------------------- data

KINDS = ("indep", "offset", "subspace")


def make_data(B, k, d, kind, dtype, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "indep":
    Z = rng.standard_normal((B, k, d), dtype=np.float32)
    z = rng.standard_normal((B, d), dtype=np.float32)
  elif kind == "offset":
    u = (30 * rng.standard_normal(d)).astype(np.float32)
    Z = rng.standard_normal((B, k, d), dtype=np.float32) + u
    z = rng.standard_normal((B, d), dtype=np.float32) + u
  elif kind == "subspace":
    u = 10 * rng.standard_normal(d)
    A = rng.standard_normal((d, 16)) * (0.7 ** np.arange(16))
    Z = (u + rng.standard_normal((B, k, 16)) @ A.T + 0.3 * rng.standard_normal((B, k, d))).astype(np.float32)
    z = (u + rng.standard_normal((B, 16)) @ A.T + 0.3 * rng.standard_normal((B, d))).astype(np.float32)
  else:
    raise ValueError(f"unknown data kind {kind!r}; one of {KINDS}")
  Z, z = Z.astype(dtype), z.astype(dtype)
  Zc = Z.astype(np.float64) - Z.astype(np.float64).mean(1, keepdims=True)
  lam = 0.01 * float(np.mean(np.sum(Zc[: min(B, 256)] ** 2, -1)))
  return Z, z, lam


def centred_gram64(Z, z):
  """Float64 centred Gram form of the given data, chunked (the accuracy oracle's input)."""
  B, k, _ = Z.shape
  G, c, s = np.empty((B, k, k)), np.empty((B, k)), np.empty(B)
  for i in range(0, B, 512):
    Zi, zi = Z[i:i + 512].astype(np.float64), z[i:i + 512].astype(np.float64)
    m = Zi.mean(1, keepdims=True)
    Zi, zi = Zi - m, zi - m[:, 0]
    G[i:i + 512] = Zi @ Zi.transpose(0, 2, 1)
    c[i:i + 512] = np.einsum("bkd,bd->bk", Zi, zi)
    s[i:i + 512] = (zi * zi).sum(-1)
  return G, c, s


def objective64(gram, w, lam):
  G, c, s = gram
  n = len(w)
  w = np.asarray(w, np.float64)
  return np.einsum("bk,bkj,bj->b", w, G[:n], w) - 2 * (c[:n] * w).sum(-1) + s[:n] + lam * np.abs(w).sum(-1)


def accuracy(gram, w, lam, F_ref):
  w = np.asarray(w, np.float64)
  F = objective64(gram, w, lam)
  ex = (F - F_ref[: len(w)]) / np.maximum(np.abs(F_ref[: len(w)]), 1e-300)
  return dict(excess_med=float(np.median(ex)), excess_max=float(np.max(ex)),
              viol=float(np.max(np.abs(w.sum(-1) - 1))), wmin=float(w.min()))


# --------------------------------------------------------------------------- timing


def timed(fn, reps):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  med = float(np.median(ts))
  return out, med, max(first - med, 0.0)


# --------------------------------------------------------------------------- peers


def cvxpy_loop(Z, z, lam, solver, n, constraint="affine"):
  import cvxpy as cp
  k, d = Z.shape[1:]
  A, y, la = cp.Parameter((d, k)), cp.Parameter(d), cp.Parameter(nonneg=True)
  w = cp.Variable(k)
  cons = [cp.sum(w) == 1] + ([w >= 0] if constraint == "simplex" else [])
  prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ w - y) + la * cp.norm1(w)), cons)
  W = np.zeros((n, k))
  t0 = time.perf_counter()
  for i in range(n):
    Zi, zi = Z[i].astype(np.float64), z[i].astype(np.float64)
    m = Zi.mean(0)
    A.value, y.value, la.value = (Zi - m).T, zi - m, lam
    if solver == "CLARABEL":
      prob.solve(solver=solver, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    elif solver == "OSQP":
      prob.solve(solver=solver, eps_abs=1e-8, eps_rel=1e-8, max_iter=100000)
    else:
      prob.solve(solver=solver, abstol=1e-9, reltol=1e-9, feastol=1e-9)
    W[i] = w.value
  return W, (time.perf_counter() - t0) / n


def ours_lipschitz(G):
  return jax.jit(lambda G: ss._lipschitz(G)[0])(G)


def jaxopt_fixed(G, c, lam, L, maxiter, simplex=False):
  import jaxopt

  def one(G, c, L):
    fun = lambda w, G, c, L: (w @ G @ w - 2 * c @ w) / L
    if simplex:
      solver = jaxopt.ProjectedGradient(fun=fun, projection=jaxopt.projection.projection_simplex, stepsize=1.0,
                                        maxiter=maxiter, tol=0.0, acceleration=True, implicit_diff=False)
      return solver.run(jnp.full(G.shape[-1], 1 / G.shape[-1], G.dtype), G=G, c=c, L=L).params
    solver = jaxopt.ProximalGradient(fun=fun, prox=lambda x, hp, s=1.0: prox.prox_l1_affine(x, hp * s), stepsize=1.0,
                                     maxiter=maxiter, tol=0.0, acceleration=True, implicit_diff=False)
    return solver.run(jnp.full(G.shape[-1], 1 / G.shape[-1], G.dtype), lam / L, G=G, c=c, L=L).params

  return jax.jit(jax.vmap(one))


def jaxopt_backtrack(G, c, lam, maxiter=500):
  import jaxopt

  def one(G, c):
    fun = lambda w, G, c: w @ G @ w - 2 * c @ w
    solver = jaxopt.ProximalGradient(fun=fun, prox=lambda x, hp, s=1.0: prox.prox_l1_affine(x, hp * s),
                                     maxiter=maxiter, tol=1e-6, acceleration=True, implicit_diff=False)
    return solver.run(jnp.full(G.shape[-1], 1 / G.shape[-1], G.dtype), lam, G=G, c=c).params

  return jax.jit(jax.vmap(one))


def qp_form(G, c, lam):
  """x = [w, t]: min xᵀQx/2 + qᵀx, Cx rows: w − t ≤ 0, −w − t ≤ 0, 1ᵀw = 1."""
  B, k = c.shape
  dt = G.dtype
  Q = jnp.zeros((B, 2 * k, 2 * k), dt).at[:, :k, :k].set(2 * G)
  q = jnp.concatenate([-2 * c, jnp.full((B, k), lam, dt)], -1)
  I = jnp.eye(k, dtype=dt)
  Gin = jnp.block([[I, -I], [-I, -I]])
  Aeq = jnp.concatenate([jnp.ones((1, k), dt), jnp.zeros((1, k), dt)], -1)
  return Q, q, Gin, Aeq


def boxosqp(G, c, lam):
  import jaxopt
  # jaxopt's BoxOSQP mixes dtypes in a lax.cond on float32 input under x64: run it in float64
  G, c = G.astype(jnp.float64), c.astype(jnp.float64)
  Q, q, Gin, Aeq = qp_form(G, c, lam)
  k = c.shape[-1]
  A = jnp.concatenate([Gin, Aeq], 0)
  lo = jnp.concatenate([jnp.full(2 * k, -jnp.inf, G.dtype), jnp.ones(1, G.dtype)])
  hi = jnp.concatenate([jnp.zeros(2 * k, G.dtype), jnp.ones(1, G.dtype)])
  solver = jaxopt.BoxOSQP(tol=1e-6, maxiter=4000)
  f = jax.jit(jax.vmap(lambda Q, q: solver.run(params_obj=(Q, q), params_eq=A, params_ineq=(lo, hi)).params.primal[0][:k]))
  return lambda: f(Q, q)


def qpax_fn(G, c, lam):
  import qpax
  Q, q, Gin, Aeq = qp_form(G, c, lam)
  k = c.shape[-1]
  h = jnp.zeros(2 * k, G.dtype)
  b = jnp.ones(1, G.dtype)
  f = jax.jit(jax.vmap(lambda Q, q: qpax.solve_qp(Q, q, Aeq, b, Gin, h, solver_tol=1e-8)[0][:k]))
  return lambda: f(Q, q)


# --------------------------------------------------------------------------- one config


def run_config(B, k, d, kind, dtype, args):
  rows = []
  def note(**kw):
    rows.append(dict(B=B, k=k, d=d, kind=kind, dtype=dtype, **kw))
    t = kw.get("t_prob")
    print(f"  {kw['method']}: " + (f"{t * 1e3:.4g} ms/problem" if t else kw.get("notes", "")), flush=True)

  Z, z, lam = make_data(B, k, d, kind, dtype)
  gram = centred_gram64(Z, z)
  Zj, zj = jnp.asarray(Z), jnp.asarray(z)
  print("  float64 reference solves ...", flush=True)
  # reference: our float64 solve on the same (dtype-rounded) numbers
  ref = ss.solve_gram(*gram, lam)  # centred float64 Gram: an independent route from solve()
  ref_s = ss.solve_gram(*gram, lam, constraint="simplex")
  F_ref, F_ref_s = np.asarray(ref.objective), np.asarray(ref_s.objective)
  F_ref_s = F_ref_s - lam  # simplex objectives below are compared without the constant λ

  def record(method, w, t, compile_s, iters=None, notes="", simplex=False, timed_on=B):
    acc = accuracy(gram, w, lam if not simplex else 0.0, F_ref_s if simplex else F_ref)
    note(method=method, t_prob=t / timed_on if timed_on else t, probs_per_s=timed_on / t if t else None,
         compile_s=compile_s, iters_med=None if iters is None else float(np.median(iters)),
         iters_max=None if iters is None else int(np.max(iters)), notes=notes, **acc)

  sol, t, comp = timed(lambda: ss.solve(Zj, zj, lam), args.reps)
  record("ours", sol.weights, t, comp, sol.iterations,
         notes=f"status {dict(zip(*np.unique(ss.status_name(sol.status), return_counts=True)))}")
  t_ours = t
  ours_excess = rows[-1]["excess_max"]
  sols, ts, comps = timed(lambda: ss.solve(Zj, zj, lam, constraint="simplex"), args.reps)
  record("ours-simplex", sols.weights, ts, comps, sols.iterations, simplex=True)
  ours_excess_s = rows[-1]["excess_max"]

  # the Gram floor
  ein = jax.jit(lambda Z: jnp.einsum("bkd,bjd->bkj", Z, Z))
  _, t, comp = timed(lambda: ein(Zj), args.reps)
  note(method="gram-einsum", t_prob=t / B, probs_per_s=B / t, compile_s=comp, ours_ratio=t_ours / t)
  ts_np = []
  for _ in range(args.reps):
    t0 = time.perf_counter()
    np.matmul(Z, Z.transpose(0, 2, 1))
    ts_np.append(time.perf_counter() - t0)
  t = float(np.median(ts_np))
  note(method="gram-numpy", t_prob=t / B, probs_per_s=B / t, ours_ratio=t_ours / t)
  try:
    import torch
    Zt = torch.from_numpy(np.ascontiguousarray(Z))
    torch.bmm(Zt, Zt.transpose(1, 2))
    ts_t = []
    for _ in range(args.reps):
      t0 = time.perf_counter()
      torch.bmm(Zt, Zt.transpose(1, 2))
      ts_t.append(time.perf_counter() - t0)
    t = float(np.median(ts_t))
    note(method="gram-torch-bmm", t_prob=t / B, probs_per_s=B / t, ours_ratio=t_ours / t,
         notes=f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  except ImportError:
    note(method="gram-torch-bmm", notes="torch not installed")

  # cvxpy DPP loops on a subset
  n = min(B, args.cvxpy_subset)
  for solver in ("CLARABEL", "OSQP", "ECOS"):
    try:
      W, tp = cvxpy_loop(Z, z, lam, solver, n)
      acc = accuracy(gram, W, lam, F_ref)
      note(method=f"cvxpy-{solver.lower()}", t_prob=tp, probs_per_s=1 / tp, ours_ratio=(t_ours / B) / tp,
           notes=f"timed on {n} problems, per-problem time extrapolated", **acc)
    except Exception as e:  # a solver that is not installed or fails
      note(method=f"cvxpy-{solver.lower()}", notes=f"failed: {type(e).__name__}: {e}"[:200])
  if rows[-3]["method"] == "cvxpy-clarabel" and "excess_max" in rows[-3]:
    rows[0]["ref_vs_clarabel"] = rows[-3]["excess_max"]

  # jaxopt with our prox and step, equal accuracy by maxiter doubling
  Gc, cc, _ = jax.jit(lambda Z, z: ss._centred_gram(Z, z))(Zj, zj)
  L = ours_lipschitz(Gc)
  floor = 1e-6 if dtype == "float32" else 1e-10
  raw = lambda: (jnp.einsum("bkd,bjd->bkj", Zj, Zj), jnp.einsum("bkd,bd->bk", Zj, zj))
  for method, gram_of, simplex, target in (
      ("jaxopt-pg-fixed", lambda: (Gc, cc), False, max(ours_excess, floor)),
      ("jaxopt-pg-fixed-raw", raw, False, max(ours_excess, floor)),
      ("jaxopt-projgrad", lambda: (Gc, cc), True, max(ours_excess_s, floor))):
    if not args.peers:
      break
    Gx, cx = gram_of()
    spent, it, res = 0.0, 8, None
    budget = args.raw_budget if method.endswith("-raw") else args.jaxopt_budget
    while spent < budget:
      f = jaxopt_fixed(Gx, cx, lam, L, it, simplex)
      w, t, comp = timed(lambda: f(Gx, cx, L), 1)
      spent += t + comp
      acc = accuracy(gram, w, 0.0 if simplex else lam, F_ref_s if simplex else F_ref)
      res = (it, t, comp, acc)
      if acc["excess_max"] <= target:
        break
      it *= 2
    it, t, comp, acc = res
    reached = acc["excess_max"] <= target
    # the Gram formation is part of its end-to-end time too (same as ours)
    tg = rows[[r["method"] for r in rows].index("gram-einsum")]["t_prob"] * B
    note(method=method, t_prob=(t + tg) / B, probs_per_s=B / (t + tg), compile_s=comp, iters_med=it, iters_max=it,
         ours_ratio=(ts if simplex else t_ours) / (t + tg),
         notes=(f"reached target excess {target:.1e} at maxiter={it}" if reached else
                f"NOT reached target {target:.1e} within budget (last maxiter={it})") + "; + einsum Gram time", **acc)

  if args.peers:
    # default backtracking line search, in a subprocess with a time limit
    cmd = [sys.executable, __file__, "--_backtrack", f"{B},{k},{d},{kind},{dtype}"]
    t0 = time.perf_counter()
    try:
      out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.time_limit)
      msg = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
      note(method="jaxopt-pg-backtrack", notes=f"finished in {time.perf_counter() - t0:.1f}s wall (incl. start-up): {msg}")
    except subprocess.TimeoutExpired:
      note(method="jaxopt-pg-backtrack", notes=f"did not return within {args.time_limit}s (killed)")
    # QP solvers on a subset
    nsub = min(B, args.peer_subset)
    for method, build in (("jaxopt-boxosqp", boxosqp), ("qpax", qpax_fn)):
      try:
        fn = build(Gc[:nsub], cc[:nsub], lam)
        w, t, comp = timed(fn, 1)
        acc = accuracy(gram, w, lam, F_ref)
        note(method=method, t_prob=t / nsub, probs_per_s=nsub / t, compile_s=comp, ours_ratio=(t_ours / B) / (t / nsub),
             notes=f"jit+vmap on {nsub} problems (centred Gram, not counted), extrapolated"
             + ("; run in float64" if method == "jaxopt-boxosqp" else ""), **acc)
      except Exception as e:
        note(method=method, notes=f"failed: {type(e).__name__}: {e}"[:200])
  return rows


def backtrack_child(spec):
  B, k, d, kind, dtype = spec.split(",")
  B, k, d = int(B), int(k), int(d)
  Z, z, lam = make_data(B, k, d, kind, dtype)
  gram = centred_gram64(Z, z)
  F_ref = np.asarray(ss.solve_gram(*gram, lam).objective)
  Gc, cc, _ = ss._centred_gram(jnp.asarray(Z), jnp.asarray(z))
  f = jaxopt_backtrack(Gc, cc, lam)
  t0 = time.perf_counter()
  w = jax.block_until_ready(f(Gc, cc))
  t1 = time.perf_counter() - t0
  acc = accuracy(gram, w, lam, F_ref)
  print(f"returned after {t1:.2f}s (compile included), max excess {acc['excess_max']:.2e}, |Σw−1| {acc['viol']:.1e}")


# --------------------------------------------------------------------------- report


def fmt(x, spec=".3g"):
  return "" if x is None else format(x, spec)


def table(rows):
  head = "| B | k | kind | dtype | method | time/prob | probs/s | compile s | iters med/max | excess med / max | \\|Σw−1\\| | ours/this | notes |"
  lines = [head, "|" + "---|" * 13]
  for r in rows:
    it = "" if r.get("iters_med") is None else f"{r['iters_med']:.0f}/{r['iters_max']}"
    ex = "" if r.get("excess_max") is None else f"{r['excess_med']:.1e} / {r['excess_max']:.1e}"
    lines.append(f"| {r['B']} | {r['k']} | {r['kind']} | {r['dtype']} | {r['method']} | {fmt(r.get('t_prob'))} s | "
                 f"{fmt(r.get('probs_per_s'), '.4g')} | {fmt(r.get('compile_s'), '.2f')} | {it} | {ex} | "
                 f"{fmt(r.get('viol'), '.1e')} | {fmt(r.get('ours_ratio'), '.3g')} | {r.get('notes', '')} |")
  return "\n".join(lines)


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  configs = sorted({(r["B"], r["k"], r["kind"], r["dtype"]) for r in rows})
  if not configs:
    return
  fig, axes = plt.subplots(len(configs), 1, figsize=(10, 3.2 * len(configs)), squeeze=False)
  for ax, cfg in zip(axes[:, 0], configs):
    rs = [r for r in rows if (r["B"], r["k"], r["kind"], r["dtype"]) == cfg and r.get("probs_per_s")]
    ax.barh([r["method"] for r in rs], [r["probs_per_s"] for r in rs],
            color=["C3" if r["method"].startswith("ours") else "C0" for r in rs])
    ax.set_xscale("log")
    ax.set_title(f"B={cfg[0]} k={cfg[1]} {cfg[2]} {cfg[3]}: problems/s (higher is better)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__)
  p.add_argument("--quick", action="store_true", help="B=100, k=8 and 64, float32, every kind")
  p.add_argument("--key", action="store_true", help="B=10000, k=64, float32, every kind (the done-when config)")
  p.add_argument("--batches", type=int, nargs="+", default=[1, 100, 10000])
  p.add_argument("--ks", type=int, nargs="+", default=[8, 64, 256])
  p.add_argument("--d", type=int, default=768)
  p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
  p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--cvxpy-subset", type=int, default=20)
  p.add_argument("--peer-subset", type=int, default=100)
  p.add_argument("--jaxopt-budget", type=float, default=120.0, help="seconds per jaxopt maxiter sweep")
  p.add_argument("--raw-budget", type=float, default=60.0,
                 help="seconds for the sweep on the uncentred Gram (in float32 it may never reach the target)")
  p.add_argument("--time-limit", type=float, default=120.0, help="seconds for the backtracking subprocess")
  p.add_argument("--no-peers", dest="peers", action="store_false", help="only ours, the floor and cvxpy")
  p.add_argument("--max-gb", type=float, default=4.0, help="skip configs whose refs exceed this")
  p.add_argument("--out", default=str(RESULTS / "solver_speed"))
  p.add_argument("--_backtrack", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._backtrack:
    return backtrack_child(args._backtrack)
  if args.quick:
    args.batches, args.ks, args.dtypes, args.reps = [100], [8, 64], ["float32"], 3
    args.jaxopt_budget, args.time_limit = 30.0, 30.0
  if args.key:
    args.batches, args.ks, args.dtypes = [10000], [64], ["float32"]
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  meta = dict(jax=jax.__version__, devices=str(jax.devices()), argv=sys.argv[1:])
  rows = []

  def save(final):
    # written after every configuration, so a run stopped part-way keeps what it measured
    out.with_suffix(".md").write_text(table(rows) + "\n")
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows, complete=final), indent=1,
                                                   default=float))
    plot([r for r in rows if r.get("probs_per_s")], out.with_suffix(".png"))

  for dtype in args.dtypes:
    for B in args.batches:
      for k in args.ks:
        for kind in args.kinds:
          gb = B * k * args.d * np.dtype(dtype).itemsize / 1e9
          if gb > args.max_gb:
            rows.append(dict(B=B, k=k, d=args.d, kind=kind, dtype=dtype, method="(skipped)",
                             notes=f"refs {gb:.1f} GB > --max-gb {args.max_gb}"))
            continue
          print(f"# B={B} k={k} d={args.d} {kind} {dtype}", flush=True)
          rows += run_config(B, k, args.d, kind, dtype, args)
          print(table([r for r in rows if (r["B"], r["k"], r["kind"], r["dtype"]) == (B, k, kind, dtype)]), flush=True)
          save(final=False)
  save(final=True)
  print("\n" + table(rows))
  print(f"wrote {out}.md/.json/.png")


if __name__ == "__main__":
  main()

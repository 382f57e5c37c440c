"""solvers.sparse_simplex against cvxpy + Clarabel, closed forms and metamorphic relations."""
import subprocess
import sys

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solvers import sparse_simplex as ss


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


# --------------------------------------------------------------------------- oracles


def objective(Z, z, w, lam):
  """F(w) in float64 numpy, on vectors centred on the reference mean (exact under Σw = 1)."""
  Z, z, w = (np.asarray(a, np.float64) for a in (Z, z, w))
  m = Z.mean(0)
  r = (z - m) - w @ (Z - m)
  return float(r @ r + lam * np.abs(w).sum())


class Clarabel:
  """A DPP-parameterised cvxpy problem per (k, d, constraint), solved by Clarabel, tight."""

  def __init__(self):
    self.problems = {}

  def __call__(self, Z, z, lam, constraint):
    k, d = Z.shape
    key = (k, d, constraint)
    if key not in self.problems:
      A, y, la = cp.Parameter((d, k)), cp.Parameter(d), cp.Parameter(nonneg=True)
      w = cp.Variable(k)
      cons = [cp.sum(w) == 1] + ([w >= 0] if constraint == "simplex" else [])
      prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ w - y) + la * cp.norm1(w)), cons)
      self.problems[key] = (prob, A, y, la, w)
    prob, A, y, la, w = self.problems[key]
    m = Z.mean(0)
    A.value, y.value, la.value = (Z - m).T, z - m, float(lam)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-14, tol_gap_rel=1e-14, tol_feas=1e-13, tol_ktratio=1e-12,
               max_iter=400)
    wv = np.asarray(w.value, np.float64)
    if constraint == "simplex":
      wv = np.maximum(wv, 0)
      wv = wv / wv.sum()
    else:
      wv = wv + (1 - wv.sum()) / k
    return objective(Z, z, wv, lam), wv


@pytest.fixture(scope="module")
def clarabel():
  return Clarabel()


def make_problems(rng, n, k, d, kind):
  """n problems [n, k, d], [n, d] of a kind: random, near (target ≈ a few refs), offset, dups."""
  Z = rng.normal(size=(n, k, d))
  z = rng.normal(size=(n, d))
  if kind == "near":
    W = rng.normal(size=(n, k)) * (rng.random((n, k)) < 0.3)
    W[:, 0] += 1 - W.sum(-1)
    z = np.einsum("nk,nkd->nd", W, Z) + 0.05 * z
  if kind == "offset":
    u = 1e3 * rng.normal(size=(n, 1, d))
    Z, z = Z + u, z + u[:, 0]
  if kind == "dups" and k > 1:
    Z[:, k // 2:] = Z[:, : k - k // 2]
  return Z, z


LAMS = (0.0, 1e-4, 1e-2, 1.0, 1e2, 1e6)  # times the mean squared centred norm


def lam_grid(Z, n):
  scale = np.mean(np.sum((Z - Z.mean(-2, keepdims=True)) ** 2, -1), -1)
  lam = np.array([LAMS[i % len(LAMS)] for i in range(n)])
  return np.where(scale > 0, lam * scale, lam)


def check_against_clarabel(clarabel, Z, z, lam, constraint, sol):
  """Every member converged, within 1e-9·max(1, |P*|) of Clarabel, feasible, certified."""
  lam = np.broadcast_to(lam, z.shape[:1])
  for i in range(len(z)):
    p_star, _ = clarabel(Z[i], z[i], lam[i], constraint)
    w = np.asarray(sol.weights[i])
    ours = objective(Z[i], z[i], w, lam[i])
    tol = 1e-9 * max(1.0, abs(p_star))
    assert int(sol.status[i]) == ss.CONVERGED, (i, ss.status_name(sol.status[i]), lam[i])
    assert abs(ours - p_star) <= tol, (i, ours, p_star, lam[i])
    assert abs(float(sol.objective[i]) - ours) <= tol, (i, float(sol.objective[i]), ours)
    assert abs(w.sum() - 1) <= 1e-12
    if constraint == "simplex":
      assert w.min() >= -1e-15
    # the certificate is an upper bound on the true excess
    assert ours - p_star <= float(sol.gap[i]) + tol


# --------------------------------------------------------------------------- fast tier


def test_import_pulls_in_jax_and_numpy_only():
  code = ("import sys, solvers.sparse_simplex\n"
          "bad = sorted({m.split('.')[0] for m in sys.modules} & {'flax', 'torch', 'rpe_jax', 'models', 'optax'})\n"
          "print(','.join(bad))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "", out.stdout


@pytest.mark.parametrize("constraint", ["affine", "simplex"])
def test_matches_clarabel_k8_d16(clarabel, constraint):
  rng = np.random.default_rng(0)
  parts = [make_problems(rng, 12, 8, 16, kind) for kind in ("random", "near", "offset", "dups")]
  Z, z = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
  lam = lam_grid(Z, len(z)) if constraint == "affine" else 0.0
  sol = ss.solve(Z, z, lam, constraint=constraint)
  check_against_clarabel(clarabel, Z, z, lam, constraint, sol)


def test_lam0_is_the_kkt_closed_form():
  rng = np.random.default_rng(1)
  Z, z = make_problems(rng, 48, 8, 16, "random")
  sol = ss.solve(Z, z)
  for i in range(len(z)):
    G, c = Z[i] @ Z[i].T, Z[i] @ z[i]  # raw, uncentred: an independent route
    M = np.block([[2 * G, np.ones((8, 1))], [np.ones((1, 8)), np.zeros((1, 1))]])
    w = np.linalg.solve(M, np.r_[2 * c, 1.0])[:8]
    np.testing.assert_allclose(sol.weights[i], w, atol=1e-9)
  assert np.median(sol.iterations) <= 30


def test_large_lam_is_the_simplex_solution():
  rng = np.random.default_rng(2)
  Z, z = make_problems(rng, 48, 8, 16, "random")
  scale = np.mean(np.sum((Z - Z.mean(-2, keepdims=True)) ** 2, -1), -1)
  lam = 1e3 * scale
  aff = ss.solve(Z, z, lam)
  sim = ss.solve(Z, z, lam, constraint="simplex")  # λ: a constant in simplex mode
  np.testing.assert_allclose(aff.weights, sim.weights, atol=1e-9)
  np.testing.assert_allclose(aff.objective, sim.objective, rtol=1e-12)
  sim0 = ss.solve(Z, z, 0.0, constraint="simplex")
  np.testing.assert_allclose(sim0.weights, sim.weights, atol=1e-12)
  np.testing.assert_allclose(sim.objective - sim0.objective, lam, rtol=1e-9)


def test_metamorphic_translation_rotation_scaling_permutation():
  rng = np.random.default_rng(3)
  Z, z = make_problems(rng, 48, 8, 16, "near")
  lam = lam_grid(Z, 48)
  base = ss.solve(Z, z, lam)
  # translation of every vector
  u = 50 * rng.normal(size=(48, 1, 16))
  tr = ss.solve(Z + u, z + u[:, 0], lam)
  np.testing.assert_allclose(tr.weights, base.weights, atol=1e-8)
  np.testing.assert_allclose(tr.objective, base.objective, rtol=1e-9)
  # rotation
  Q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
  ro = ss.solve(Z @ Q, z @ Q, lam)
  np.testing.assert_allclose(ro.weights, base.weights, atol=1e-8)
  # scaling by α with λ → α²λ
  a = 7.5
  sc = ss.solve(a * Z, a * z, a * a * lam)
  np.testing.assert_allclose(sc.weights, base.weights, atol=1e-8)
  np.testing.assert_allclose(sc.objective, a * a * base.objective, rtol=1e-9)
  # permutation of the references
  perm = rng.permutation(8)
  pe = ss.solve(Z[:, perm], z, lam)
  np.testing.assert_allclose(pe.weights, base.weights[:, perm], atol=1e-8)


def test_batched_equals_looped_and_batch_shapes():
  rng = np.random.default_rng(4)
  Z, z = make_problems(rng, 48, 8, 16, "random")
  lam = lam_grid(Z, 48)
  batched = ss.solve(Z, z, lam)
  for i in (0, 5, 17, 40):
    one = ss.solve(Z[i], z[i], lam[i])
    assert one.weights.shape == (8,) and one.objective.shape == ()
    np.testing.assert_allclose(one.weights, batched.weights[i], atol=1e-10)
  # two batch axes and a broadcast scalar λ
  two = ss.solve(Z.reshape(6, 8, 8, 16), z.reshape(6, 8, 16), 1.0)
  flat = ss.solve(Z, z, 1.0)
  assert two.weights.shape == (6, 8, 8) and two.status.shape == (6, 8)
  np.testing.assert_allclose(two.weights.reshape(48, 8), flat.weights, atol=1e-10)


def test_solve_gram_matches_solve():
  rng = np.random.default_rng(5)
  Z, z = make_problems(rng, 48, 8, 16, "random")
  lam = lam_grid(Z, 48)
  G, c, s = np.einsum("nkd,njd->nkj", Z, Z), np.einsum("nkd,nd->nk", Z, z), np.einsum("nd,nd->n", z, z)
  a, b = ss.solve(Z, z, lam), ss.solve_gram(G, c, s, lam)
  np.testing.assert_allclose(b.weights, a.weights, atol=1e-8)
  np.testing.assert_allclose(b.objective, a.objective, rtol=1e-8)


def test_pgd_reaches_the_same_optimum():
  rng = np.random.default_rng(6)
  Z, z = make_problems(rng, 48, 8, 16, "near")
  lam = lam_grid(Z, 48)
  f, p = ss.solve(Z, z, lam), ss.solve(Z, z, lam, method="pgd", polish=False)
  assert np.all(np.asarray(p.status) == ss.CONVERGED)
  np.testing.assert_allclose(p.objective, f.objective, rtol=1e-9)


def test_k1_and_identical_references_are_finite_and_correct():
  rng = np.random.default_rng(7)
  Z1, z = rng.normal(size=(4, 1, 16)), rng.normal(size=(4, 16))
  sol = ss.solve(Z1, z, 2.0)
  np.testing.assert_array_equal(sol.weights, np.ones((4, 1)))
  np.testing.assert_allclose(sol.objective, ((z - Z1[:, 0]) ** 2).sum(-1) + 2.0, rtol=1e-12)
  Zs = np.repeat(Z1, 5, axis=1)
  for lam, con in ((0.0, "affine"), (3.0, "affine"), (0.0, "simplex")):
    sol = ss.solve(Zs, z, lam, constraint=con)
    assert np.all(np.isfinite(sol.weights)) and np.all(np.asarray(sol.status) == ss.CONVERGED)
    np.testing.assert_allclose(sol.weights.sum(-1), 1, atol=1e-12)
    np.testing.assert_allclose(sol.objective, ((z - Z1[:, 0]) ** 2).sum(-1) + lam, rtol=1e-10)


def test_nonfinite_member_is_isolated():
  rng = np.random.default_rng(8)
  Z, z = make_problems(rng, 6, 8, 16, "random")
  clean = ss.solve(Z, z, 1.0)
  Zb, lam = Z.copy(), np.ones(6)
  Zb[1, 3, 2] = np.nan
  zb = z.copy()
  zb[3, 0] = np.inf
  lam[4] = np.nan
  sol = ss.solve(Zb, zb, lam)
  bad = np.array([False, True, False, True, True, False])
  assert list(ss.status_name(sol.status)[bad]) == ["nonfinite"] * 3
  assert np.all(np.isnan(sol.weights[bad]))
  np.testing.assert_array_equal(sol.status[~bad], ss.CONVERGED)
  np.testing.assert_allclose(sol.weights[~bad], clean.weights[~bad], atol=1e-12)
  assert ss.status_name(ss.MAX_ITER) == "max_iter"


def test_bad_arguments_raise_naming_the_argument():
  Z, z = np.ones((3, 4)), np.ones(4)
  cases = [
      (lambda: ss.solve(np.ones(4), z), "refs"),
      (lambda: ss.solve(np.ones((0, 4)), z), "refs"),
      (lambda: ss.solve(Z, np.ones(5)), "target"),
      (lambda: ss.solve(Z, z, -1.0), "lam"),
      (lambda: ss.solve(np.ones((2, 3, 4)), np.ones((2, 4)), np.ones(3)), "lam"),
      (lambda: ss.solve(Z, z, constraint="box"), "constraint"),
      (lambda: ss.solve(Z, z, method="newton"), "method"),
      (lambda: ss.solve(Z, z, tol=0.0), "tol"),
      (lambda: ss.solve(Z, z, max_iter=0), "max_iter"),
      (lambda: ss.solve(Z.astype(complex), z), "refs"),
      (lambda: ss.solve(np.ones((2, 3, 4)), np.ones((3, 4))), "batch"),
      (lambda: ss.solve_gram(np.ones((3, 4)), np.ones(3), 1.0), "gram"),
      (lambda: ss.solve_gram(np.eye(3), np.ones(4), 1.0), "corr"),
  ]
  for fn, name in cases:
    with pytest.raises(ValueError, match=name):
      fn()


def test_gradients_match_finite_differences():
  rng = np.random.default_rng(9)
  Z, z = make_problems(rng, 1, 8, 16, "near")
  Z, z = Z[0], z[0]
  scale = np.mean(np.sum((Z - Z.mean(0)) ** 2, -1))
  lam = 0.05 * scale
  sol = ss.solve(Z, z, lam)
  assert 1 < np.count_nonzero(sol.weights) < 8  # a genuinely sparse active set

  def fun(Z, z, lam):
    s = ss.solve(Z, z, lam)
    return s.weights, s.objective

  (w, F), (dw, dF) = jax.jvp(fun, (Z, z, lam), (dZ := rng.normal(size=Z.shape), dz := rng.normal(size=z.shape), 1.0))
  h = 1e-6
  (wp, Fp), (wm, Fm) = fun(Z + h * dZ, z + h * dz, lam + h), fun(Z - h * dZ, z - h * dz, lam - h)
  np.testing.assert_allclose(dw, (wp - wm) / (2 * h), atol=1e-6)
  np.testing.assert_allclose(dF, (Fp - Fm) / (2 * h), rtol=1e-6)
  # reverse mode agrees with forward mode
  g = jax.grad(lambda Z, z, lam: fun(Z, z, lam)[0] @ np.arange(8.0), argnums=(0, 1, 2))(Z, z, lam)
  fwd = np.asarray(dw) @ np.arange(8.0)
  rev = float(np.sum(g[0] * dZ) + np.sum(g[1] * dz) + g[2])
  np.testing.assert_allclose(rev, fwd, rtol=1e-8)
  # solve_gram: d weights / d(gram, corr)
  G, c, s = Z @ Z.T, Z @ z, z @ z
  dG = rng.normal(size=G.shape)
  dG = dG + dG.T
  dc = rng.normal(size=c.shape)
  fg = lambda G, c: ss.solve_gram(G, c, s, lam).weights
  _, dwg = jax.jvp(fg, (G, c), (dG, dc))
  np.testing.assert_allclose(dwg, (fg(G + h * dG, c + h * dc) - fg(G - h * dG, c - h * dc)) / (2 * h), atol=1e-6)


def test_float32_on_offset_data(clarabel):
  rng = np.random.default_rng(10)
  with jax.enable_x64(False):
    n, k, d = 8, 64, 768
    spread = rng.normal(size=(n, k, d))
    u = 30 * rng.normal(size=(n, 1, d))  # common offset 30× the spread
    Z = (spread + u).astype(np.float32)
    z = (np.einsum("nk,nkd->nd", rng.dirichlet(np.ones(k), n), spread) + u[:, 0]
         + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    for lam, con in ((0.0, "affine"), (30.0, "affine"), (0.0, "simplex")):
      sol = ss.solve(Z, z, lam, constraint=con)
      assert sol.weights.dtype == jnp.float32
      for i in range(n):
        p_star, _ = clarabel(Z[i].astype(np.float64), z[i].astype(np.float64), lam, con)
        excess = (objective(Z[i], z[i], sol.weights[i], lam) - p_star) / p_star
        assert excess <= 1e-5, (lam, con, i, excess)


def subspace_problems(rng, n, k, d):
  """benchmarks/solver_speed.py's "subspace" kind: offset + a shared 16-dim subspace with
  decaying scales + a little noise; the centred Gram's condition number in Σw = 0 is ~10³."""
  u = 10 * rng.normal(size=d)
  A = rng.normal(size=(d, 16)) * 0.7 ** np.arange(16)
  Z = u + rng.normal(size=(n, k, 16)) @ A.T + 0.3 * rng.normal(size=(n, k, d))
  z = u + rng.normal(size=(n, 16)) @ A.T + 0.3 * rng.normal(size=(n, d))
  Zc = Z - Z.mean(1, keepdims=True)
  return Z, z, 0.01 * np.mean(np.sum(Zc ** 2, -1))


@pytest.mark.parametrize("constraint", ["affine", "simplex"])
def test_ill_conditioned_batch_is_certified_in_few_iterations(clarabel, constraint):
  """The pivoting polish at iteration 10 finishes ill-conditioned members that FISTA alone
  would take hundreds of iterations on (and the old schedule, a polish every 100, 100):
  same certified optimum as Clarabel, and 10 iterations, not 100."""
  rng = np.random.default_rng(17)
  Z, z, lam = subspace_problems(rng, 12, 64, 768)
  sol = ss.solve(Z, z, lam, constraint=constraint)
  check_against_clarabel(clarabel, Z, z, lam, constraint, sol)
  assert np.max(sol.iterations) <= 30, np.asarray(sol.iterations)
  # FISTA alone is far from done there (what made the old schedule wait for iteration 100)
  fista = ss.solve(Z, z, lam, constraint=constraint, polish=False, max_iter=30)
  assert np.all(np.asarray(fista.status) == ss.MAX_ITER)


# --------------------------------------------------------------------------- slow tier


SHAPES = [(1, 16), (2, 16), (3, 16), (64, 16), (300, 16), (8, 768), (64, 768)]


@pytest.mark.slow
@pytest.mark.parametrize("k,d", SHAPES)
@pytest.mark.parametrize("constraint", ["affine", "simplex"])
def test_matches_clarabel_sweep(clarabel, k, d, constraint):
  rng = np.random.default_rng(k * 1000 + d)
  # k = 300 > d: each member runs many active-set polishes of a 300-wide KKT system
  # (≈0.5 s a member on CPU), so fewer members there; λ still cycles through the grid.
  n = 6 if d < 768 and k < 300 else (2 if k >= 300 else 3)
  kinds = ("random", "near", "offset", "dups")
  parts = [make_problems(rng, n, k, d, kind) for kind in kinds]
  Z, z = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
  lam = lam_grid(Z, len(z)) if constraint == "affine" else 0.0
  sol = ss.solve(Z, z, lam, constraint=constraint)
  check_against_clarabel(clarabel, Z, z, lam, constraint, sol)  # k > d included (LP-like)


@pytest.mark.slow
def test_matches_clarabel_k300_d768(clarabel):
  rng = np.random.default_rng(11)
  Z, z = make_problems(rng, 3, 300, 768, "near")
  scale = np.mean(np.sum((Z - Z.mean(-2, keepdims=True)) ** 2, -1), -1)
  lam = np.array([0.0, 1e-2, 1.0]) * scale
  check_against_clarabel(clarabel, Z, z, lam, "affine", ss.solve(Z, z, lam))


@pytest.mark.slow
def test_median_iterations_well_posed():
  rng = np.random.default_rng(12)
  for k in (8, 64):
    Z, z = make_problems(rng, 64, k, 768, "near")
    scale = np.mean(np.sum((Z - Z.mean(-2, keepdims=True)) ** 2, -1), -1)
    for lam in (0.0, 1e-3, 1e-1):
      sol = ss.solve(Z, z, lam * scale)
      assert np.all(np.asarray(sol.status) == ss.CONVERGED)
      assert np.median(sol.iterations) <= 30, (k, lam, np.median(sol.iterations))


@pytest.mark.slow
def test_large_ill_conditioned_batch_finishes():
  """A batch big enough that jaxlib fans its batched LAPACK kernels out over the CPU thread
  pool, solved twice in a fresh process: with two independent triangular solves side by
  side in the polish this deadlocked every time on a 2-core machine (jax 0.10.2). Run in a
  subprocess so a deadlock fails the test instead of hanging the suite."""
  code = """
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
from solvers import sparse_simplex as ss
rng = np.random.default_rng(0)
B, k, d = 1000, 64, 768
u = 10 * rng.standard_normal(d)
A = rng.standard_normal((d, 16)) * (0.7 ** np.arange(16))
Z = u + rng.standard_normal((B, k, 16)) @ A.T + 0.3 * rng.standard_normal((B, k, d))
z = u + rng.standard_normal((B, 16)) @ A.T + 0.3 * rng.standard_normal((B, d))
Zc = Z - Z.mean(1, keepdims=True)
lam = 0.01 * np.mean(np.sum(Zc ** 2, -1))
for _ in range(2):
  sol = ss.solve(Z, z, lam)
print(int((np.asarray(sol.status) == ss.CONVERGED).sum()))
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] == "1000", out.stdout


def test_forced_max_iter_is_reported_and_leaves_the_other_members_untouched():
  """max_iter=1 without the polish: the member that needs iterations reports MAX_ITER after
  exactly one; members done at the start (target = the references' mean at λ = 0: w = 1/k)
  are identical, bit for bit, to a solve without the unfinished member."""
  rng = np.random.default_rng(7)
  Z = rng.normal(size=(4, 6, 20))
  z = rng.normal(size=(4, 20))
  z[[0, 2, 3]] = Z[[0, 2, 3]].mean(1)
  lam = np.array([0.0, 1.0, 0.0, 0.0])
  sol = ss.solve(Z, z, lam, max_iter=1, polish=False)
  assert list(ss.status_name(sol.status)) == ["converged", "max_iter", "converged",
                                              "converged"]
  assert int(sol.iterations[1]) == 1
  # The unfinished member is not optimal: the tight reference solve is far better.
  full = ss.solve(Z[1], z[1], 1.0)
  assert float(sol.objective[1]) > float(full.objective) + 1e-3
  alone = ss.solve(Z[[0, 2, 3]], z[[0, 2, 3]], lam[[0, 2, 3]], max_iter=1, polish=False)
  for field in ("weights", "objective", "gap", "residual", "iterations", "status"):
    np.testing.assert_array_equal(np.asarray(getattr(sol, field))[[0, 2, 3]],
                                  np.asarray(getattr(alone, field)), err_msg=field)
  np.testing.assert_allclose(np.asarray(sol.weights)[[0, 2, 3]], 1 / 6, rtol=0, atol=1e-12)

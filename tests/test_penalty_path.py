"""solvers.penalty_path: λ* against a bisection of Clarabel's affine-ℓ1 solution, the path
against one solve per λ (cold and warm), in float64."""

import cvxpy as cp
import jax
import numpy as np
import pytest

from solvers import penalty_path, sparse_simplex


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _clarabel(refs, target, lam):
  """Affine ℓ1 weights by Clarabel on vectors centred on the reference mean (exact under Σw = 1)."""
  k = refs.shape[0]
  m = refs.mean(0)
  w = cp.Variable(k)
  prob = cp.Problem(cp.Minimize(cp.sum_squares((refs - m).T @ w - (target - m)) + lam * cp.norm1(w)),
                    [cp.sum(w) == 1])
  prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-13, tol_gap_rel=1e-13, tol_feas=1e-13, max_iter=400)
  return np.asarray(w.value)


def _bisect_nonneg(refs, target, tol=1e-7):
  """The smallest λ at which Clarabel's affine solution has no weight below −tol (bisection)."""
  nonneg = lambda lam: _clarabel(refs, target, lam).min() >= -tol
  lo, hi = 0.0, 1.0
  while not nonneg(hi):
    lo, hi = hi, 2 * hi
  while hi - lo > 1e-7 * hi:
    mid = (lo + hi) / 2
    lo, hi = (lo, mid) if nonneg(mid) else (mid, hi)
  return (lo + hi) / 2


def _problems(seed, n=3, k=6, d=12, offset=3.0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, k, d)) + offset, rng.normal(size=(n, d)) + offset


def test_threshold_equals_bisection_of_clarabel_nonnegativity():
  refs, target = _problems(0)
  th = penalty_path.exact_penalty_threshold(refs, target)
  assert np.all(np.asarray(th.status) == sparse_simplex.CONVERGED)
  for i in range(len(refs)):
    expected = _bisect_nonneg(refs[i], target[i])
    assert expected > 0.1  # the test needs a real threshold
    np.testing.assert_allclose(th.lam_star[i], expected, rtol=1e-4)


def test_threshold_is_exact_penalty_on_both_sides():
  # just above λ*: affine solution = simplex solution; just below: a negative weight
  refs, target = _problems(1, n=2)
  th = penalty_path.exact_penalty_threshold(refs, target)
  for i in range(2):
    lam = float(th.lam_star[i])
    np.testing.assert_allclose(_clarabel(refs[i], target[i], 1.001 * lam), th.weights[i], atol=1e-6)
    assert _clarabel(refs[i], target[i], 0.99 * lam).min() < -1e-6


def test_threshold_is_zero_when_target_projects_inside_the_hull():
  rng = np.random.default_rng(2)
  refs = rng.normal(size=(5, 12))
  target = np.full(5, 0.2) @ refs + 1e-3 * rng.normal(size=12)
  th = penalty_path.exact_penalty_threshold(refs, target)
  assert float(th.lam_star) == 0.0
  np.testing.assert_allclose(th.weights, _clarabel(refs, target, 0.0), atol=1e-6)


def test_threshold_is_invariant_to_a_common_offset():
  refs, target = _problems(3, n=1)
  th = penalty_path.exact_penalty_threshold(refs, target)
  shifted = penalty_path.exact_penalty_threshold(refs + 100.0, target + 100.0)
  np.testing.assert_allclose(shifted.lam_star, th.lam_star, rtol=1e-7)


@pytest.mark.parametrize("warm", [False, True])
def test_path_equals_one_solve_per_lambda(warm):
  refs, target = _problems(4)
  th = penalty_path.exact_penalty_threshold(refs, target)
  lams = np.asarray(th.lam_star)[:, None] * np.linspace(0, 1.4, 8)
  path = penalty_path.solve_path(refs, target, lams, init=th.weights if warm else None)
  assert path.weights.shape == (3, 8, 6)
  assert np.all(np.asarray(path.status) == sparse_simplex.CONVERGED)
  for i in range(3):
    for j in range(8):
      one = sparse_simplex.solve(refs[i], target[i], lams[i, j])
      np.testing.assert_allclose(path.weights[i, j], one.weights, atol=1e-9)
      np.testing.assert_allclose(path.objective[i, j], one.objective, rtol=1e-10)
      np.testing.assert_allclose(path.weights[i, j], _clarabel(refs[i], target[i], lams[i, j]), atol=1e-6)
  if warm:
    assert np.all(np.asarray(path.warm))


def test_warm_path_falls_back_to_cold_for_nonfinite_members():
  refs, target = _problems(5, n=2)
  target[1, 0] = np.nan
  path = penalty_path.solve_path(refs, target, np.array([0.0, 1.0]), init=np.full((2, 6), 1 / 6))
  np.testing.assert_array_equal(path.status[1], sparse_simplex.NONFINITE)
  np.testing.assert_array_equal(path.status[0], sparse_simplex.CONVERGED)
  assert np.all(np.isnan(np.asarray(path.weights[1])))


def test_path_rejects_negative_lambda():
  refs, target = _problems(6, n=1)
  with pytest.raises(ValueError, match="lams"):
    penalty_path.solve_path(refs, target, np.array([0.0, -1.0]))


def test_per_member_starts():
  # [..., n, k] starts, one per member (here uniform weights and the lin weights)
  refs, target = _problems(7, n=2)
  lams = np.array([0.0, 0.5, 2.0])
  starts = np.stack([np.full((2, 6), 1 / 6), np.asarray(sparse_simplex.solve(refs, target, 0.0).weights),
                     np.full((2, 6), 1 / 6)], 1)
  path = penalty_path.solve_path(refs, target, lams, init=starts)
  cold = penalty_path.solve_path(refs, target, lams)
  np.testing.assert_allclose(path.weights, cold.weights, atol=1e-9)
  assert np.all(np.asarray(path.status) == sparse_simplex.CONVERGED)

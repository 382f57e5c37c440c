"""Weighting strategies against independent numpy / cvxpy computations."""

import cvxpy as cp
import jax
import numpy as np
import pytest

from rpe_jax import weighting
from solvers import sparse_simplex


def _problem(seed, k=6, d=20, offset=0.0):
  rng = np.random.default_rng(seed)
  refs = rng.normal(size=(k, d)) + offset
  target = rng.normal(size=d) + offset
  return refs, target


def _cvxpy_weights(refs, target, lam, nonneg=False):
  w = cp.Variable(refs.shape[0], nonneg=nonneg)
  objective = cp.sum_squares(target - refs.T @ w) + lam * cp.norm1(w)
  problem = cp.Problem(cp.Minimize(objective), [cp.sum(w) == 1])
  problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
  return w.value, problem.value


def test_avg_sim_nearest_match_numpy():
  refs, target = _problem(0)
  sqdist = ((refs - target) ** 2).sum(-1)
  with jax.enable_x64(True):
    avg = weighting.compute_weights(refs, target, "avg")
    sim = weighting.compute_weights(refs, target, "sim", lam1=0.05)
    near = weighting.compute_weights(refs, target, "nearest")
  np.testing.assert_allclose(avg.weights, np.full(6, 1 / 6), rtol=1e-15)
  logits = -0.05 * sqdist
  expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
  np.testing.assert_allclose(sim.weights, expected, rtol=1e-12)
  np.testing.assert_allclose(near.weights, np.eye(6)[np.argmin(sqdist)])
  np.testing.assert_allclose(avg.sqdist, sqdist, rtol=1e-12)
  for result in (avg, sim, near):
    recon = ((target - np.asarray(result.weights) @ refs) ** 2).sum()
    np.testing.assert_allclose(result.error, recon, rtol=1e-10)


@pytest.mark.parametrize("strategy,lam,nonneg", [("lin", 0.0, False), ("sparse", 0.3, False),
                                                 ("simplex", 0.0, True)])
def test_solver_strategies_match_cvxpy(strategy, lam, nonneg):
  for seed in range(5):
    refs, target = _problem(seed, offset=3.0)
    w_ref, p_ref = _cvxpy_weights(refs, target, lam, nonneg)
    with jax.enable_x64(True):
      result = weighting.compute_weights(refs, target, strategy, lam2=lam)
    w = np.asarray(result.weights)
    objective = ((target - w @ refs) ** 2).sum() + lam * np.abs(w).sum()
    assert objective <= p_ref + 1e-8 * max(1.0, abs(p_ref))
    np.testing.assert_allclose(result.weights, w_ref, atol=1e-5)
    assert abs(w.sum() - 1.0) < 1e-12
    assert int(result.status) == sparse_simplex.CONVERGED


def test_lin_equals_kkt_closed_form():
  refs, target = _problem(3, k=4, d=30)
  gram = refs @ refs.T
  kkt = np.block([[2 * gram, np.ones((4, 1))], [np.ones((1, 4)), np.zeros((1, 1))]])
  rhs = np.concatenate([2 * refs @ target, [1.0]])
  expected = np.linalg.solve(kkt, rhs)[:4]
  with jax.enable_x64(True):
    result = weighting.compute_weights(refs, target, "lin")
  np.testing.assert_allclose(result.weights, expected, atol=1e-9)


def test_batched_targets_share_refs_and_equal_looped():
  refs, _ = _problem(1)
  targets = np.random.default_rng(9).normal(size=(7, 20))
  with jax.enable_x64(True):
    batched = weighting.compute_weights(refs, targets, "sparse", lam2=0.5)
    looped = [weighting.compute_weights(refs, t, "sparse", lam2=0.5) for t in targets]
  assert batched.weights.shape == (7, 6)
  np.testing.assert_allclose(batched.weights, np.stack([r.weights for r in looped]), atol=1e-10)


def test_precomputed_sqdist_is_used():
  refs, target = _problem(2)
  fake = np.arange(6.0)[::-1]
  result = weighting.compute_weights(refs, target, "nearest", sqdist=fake)
  np.testing.assert_array_equal(result.weights, np.eye(6)[5])


def test_nonfinite_target_is_flagged_not_converged():
  refs, _ = _problem(4)
  targets = np.random.default_rng(0).normal(size=(3, 20))
  targets[1, 2] = np.nan
  for strategy in weighting.STRATEGIES:
    result = weighting.compute_weights(refs, targets, strategy)
    status = np.asarray(result.status)
    assert status[1] == sparse_simplex.NONFINITE, strategy
    assert status[0] == status[2] == sparse_simplex.CONVERGED, strategy


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="median"), "unknown strategy 'median'"),
    (dict(lam1=-1.0), "lam1"),
])
def test_bad_arguments(kwargs, match):
  refs, target = _problem(0)
  with pytest.raises(ValueError, match=match):
    weighting.compute_weights(refs, target, **kwargs)


def test_shape_errors_name_the_argument():
  with pytest.raises(ValueError, match="dimension"):
    weighting.compute_weights(np.ones((3, 4)), np.ones(5), "avg")
  with pytest.raises(ValueError, match="k = 0"):
    weighting.compute_weights(np.ones((0, 4)), np.ones(4), "avg")


def test_solver_max_iter_reaches_the_weights_status():
  """A solve that cannot finish (one iteration, a tolerance no solve reaches) is reported as
  MAX_ITER per target, next to a NONFINITE target and a closed-form strategy's CONVERGED."""
  refs, target = _problem(3)
  targets = np.stack([target, target + 0.5, np.full_like(target, np.nan)])
  with jax.enable_x64(True):
    w = weighting.compute_weights(refs, targets, "lin", tol=1e-300, max_iter=1)
    direct = sparse_simplex.solve(refs, targets[:2], 0.0, tol=1e-300, max_iter=1)
    avg = weighting.compute_weights(refs, targets[:2], "avg", tol=1e-300, max_iter=1)
  assert list(sparse_simplex.status_name(w.status)) == ["max_iter", "max_iter", "nonfinite"]
  # The weights are the solver's (not re-solved or replaced), and still sum to one.
  np.testing.assert_allclose(w.weights[:2], direct.weights, rtol=0, atol=1e-12)
  np.testing.assert_allclose(np.asarray(w.weights[:2]).sum(-1), 1.0, atol=1e-12)
  assert list(sparse_simplex.status_name(avg.status)) == ["converged", "converged"]


# --------------------------------------------------------------------------- scale-free λ2


def test_lam2_rel_zero_is_lin_and_one_is_simplex_against_clarabel():
  rng = np.random.default_rng(11)
  refs = rng.normal(size=(4, 6, 20)) + 3.0
  targets = rng.normal(size=(4, 20)) * 3 + 3.0  # spread out: most affine projections leave the hull
  with jax.enable_x64(True):
    lin = weighting.compute_weights(refs, targets, "sparse", lam2_rel=0.0)
    simplex = weighting.compute_weights(refs, targets, "sparse", lam2_rel=1.0)
    beyond = weighting.compute_weights(refs, targets, "sparse", lam2_rel=3.0)
  for i in range(4):
    np.testing.assert_allclose(lin.weights[i], _cvxpy_weights(refs[i], targets[i], 0.0)[0], atol=1e-6)
    np.testing.assert_allclose(simplex.weights[i], _cvxpy_weights(refs[i], targets[i], 0.0, True)[0], atol=1e-6)
  np.testing.assert_allclose(beyond.weights, simplex.weights, atol=1e-12)
  np.testing.assert_array_equal(lin.lam2, 0.0)
  np.testing.assert_allclose(simplex.lam2, simplex.lam_star)
  assert np.all(np.asarray(simplex.lam_star) > 0)  # lin and simplex differ on every problem
  assert np.all(np.abs(np.asarray(lin.weights) - np.asarray(simplex.weights)).max(-1) > 1e-2)
  assert np.all(np.asarray(lin.status) == sparse_simplex.CONVERGED)


def test_lam2_rel_between_is_the_absolute_lambda_per_problem():
  # λ2 = c·λ* differs per problem; each problem equals Clarabel at its own absolute λ2
  rng = np.random.default_rng(12)
  refs = rng.normal(size=(3, 5, 15)) * np.array([1.0, 3.0, 10.0])[:, None, None]
  targets = rng.normal(size=(3, 15)) * np.array([1.0, 3.0, 10.0])[:, None]
  with jax.enable_x64(True):
    result = weighting.compute_weights(refs, targets, "sparse", lam2_rel=0.5)
  lam_star = np.asarray(result.lam_star)
  assert lam_star[2] > 10 * lam_star[0]  # the scale moves λ*, which is the point
  np.testing.assert_allclose(result.lam2, 0.5 * lam_star, rtol=1e-12)
  for i in range(3):
    np.testing.assert_allclose(result.weights[i], _cvxpy_weights(refs[i], targets[i], 0.5 * lam_star[i])[0],
                               atol=1e-6)


def test_simplex_and_absolute_sparse_report_lam_star():
  refs, target = _problem(5, offset=3.0)
  with jax.enable_x64(True):
    simplex = weighting.compute_weights(refs, target, "simplex")
    sparse = weighting.compute_weights(refs, target, "sparse", lam2=0.3)
    lin = weighting.compute_weights(refs, target, "lin")
  np.testing.assert_allclose(sparse.lam_star, simplex.lam_star, rtol=1e-10)
  np.testing.assert_allclose(sparse.lam2, 0.3)
  assert simplex.lam2 is None and lin.lam_star is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(lam2=1.0, lam2_rel=0.5), "not both"),
    (dict(lam2_rel=-0.5), "lam2_rel"),
    (dict(lam2_rel=float("nan")), "lam2_rel"),
    (dict(lam2=-1.0), "lam2"),
])
def test_bad_lam2(kwargs, match):
  refs, target = _problem(0)
  with pytest.raises(ValueError, match=match):
    weighting.compute_weights(refs, target, "sparse", **kwargs)


# --------------------------------------------------------------------------- the λ path


@pytest.mark.parametrize("warm_start", [True, False])
def test_lambda_path_equals_one_solve_per_lambda(warm_start):
  rng = np.random.default_rng(13)
  refs = rng.normal(size=(6, 20)) + 3.0
  targets = rng.normal(size=(2, 20)) * 3 + 3.0
  rel = np.linspace(0.0, 1.5, 7)
  with jax.enable_x64(True):
    path = weighting.lambda_path(refs, targets, rel, relative=True, warm_start=warm_start)
    assert path.weights.shape == (2, 7, 6)
    assert np.all(np.asarray(path.lam_star) > 0)
    for i in range(2):
      for j, c in enumerate(rel):
        lam = float(path.lam_star[i]) * c
        one = weighting.compute_weights(refs, targets[i], "sparse", lam2=lam)
        np.testing.assert_allclose(path.weights[i, j], one.weights, atol=1e-9)
        np.testing.assert_allclose(path.lam[i, j], lam, rtol=1e-12)
        w = np.asarray(path.weights[i, j])
        np.testing.assert_allclose(path.error[i, j], ((targets[i] - w @ refs) ** 2).sum(), rtol=1e-9)
        np.testing.assert_allclose(path.l1[i, j], np.abs(w).sum(), rtol=1e-12)
  l1 = np.asarray(path.l1)
  assert np.all(np.diff(l1, axis=-1) <= 1e-9)  # ‖w‖₁ shrinks along the path ...
  np.testing.assert_allclose(l1[:, rel >= 1], 1.0, atol=1e-9)  # ... to 1 at λ*
  assert np.all(np.asarray(path.status) == sparse_simplex.CONVERGED)


def test_lambda_path_absolute_and_errors():
  refs, target = _problem(7, offset=3.0)
  with jax.enable_x64(True):
    path = weighting.lambda_path(refs, target, [0.0, 0.3])
    one = weighting.compute_weights(refs, target, "sparse", lam2=0.3)
  np.testing.assert_allclose(path.weights[1], one.weights, atol=1e-9)
  with pytest.raises(ValueError, match="lams"):
    weighting.lambda_path(refs, target, [])
  with pytest.raises(ValueError, match="lams"):
    weighting.lambda_path(refs, target, [0.1, -1.0])

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

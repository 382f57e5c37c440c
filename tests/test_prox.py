"""solvers.prox against brute force over sign patterns / supports (float64)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solvers import prox


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def brute_l1_affine(v, tau):
  """argmin ½‖w − v‖² + τ‖w‖₁, Σw = 1 by enumerating sign patterns and keeping the best
  candidate that is consistent (signs as assumed); an independent oracle for small k."""
  best, best_val = None, np.inf
  for pat in itertools.product((-1, 0, 1), repeat=len(v)):
    pat = np.array(pat)
    act = pat != 0
    if not act.any():
      continue
    mu = (np.sum(v[act] - tau * pat[act]) - 1) / act.sum()
    w = np.where(act, v - mu - tau * pat, 0.0)
    if np.any(np.sign(w[act]) * pat[act] < 0):
      continue
    val = 0.5 * np.sum((w - v) ** 2) + tau * np.abs(w).sum()
    if val < best_val - 1e-15:
      best, best_val = w, val
  return best


def brute_simplex(v):
  best, best_val = None, np.inf
  for mask in itertools.product((0, 1), repeat=len(v)):
    act = np.array(mask, bool)
    if not act.any():
      continue
    mu = (v[act].sum() - 1) / act.sum()
    w = np.where(act, v - mu, 0.0)
    if np.any(w < 0):
      continue
    val = np.sum((w - v) ** 2)
    if val < best_val:
      best, best_val = w, val
  return best


def _cases(rng, k, n):
  for _ in range(n):
    v = rng.normal(size=k) * rng.choice([0.01, 1.0, 30.0])
    if k > 1 and rng.random() < 0.3:
      v[1] = v[0]  # ties
    yield v, float(rng.choice([0.0, 1e-3, 0.2, 1.0, 50.0]))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_prox_l1_affine_matches_brute_force(k):
  rng = np.random.default_rng(k)
  cases = list(_cases(rng, k, 40))
  V = np.stack([v for v, _ in cases])
  T = np.array([t for _, t in cases])
  ref = np.stack([brute_l1_affine(v, t) for v, t in cases])
  np.testing.assert_allclose(prox.prox_l1_affine(V, T), ref, atol=1e-12)
  # warm starts from anywhere (and NaN = none) give the same exact answer
  for mu0 in (rng.normal(size=len(V)) * 100, np.full(len(V), np.nan), np.zeros(len(V))):
    w, _ = prox.prox_l1_affine_warm(V, T, mu0)
    np.testing.assert_allclose(w, ref, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_project_simplex_matches_brute_force(k):
  rng = np.random.default_rng(10 + k)
  V = np.stack([v for v, _ in _cases(rng, k, 40)])
  ref = np.stack([brute_simplex(v) for v in V])
  np.testing.assert_allclose(prox.project_simplex(V), ref, atol=1e-12)
  w, _ = prox.project_simplex_warm(V, rng.normal(size=len(V)) * 10)
  np.testing.assert_allclose(w, ref, atol=1e-12)


def test_large_k_sum_and_optimality_conditions():
  rng = np.random.default_rng(0)
  V = rng.normal(size=(3, 5, 300)) * 10  # two leading batch axes
  tau = 0.3
  w = np.asarray(prox.prox_l1_affine(V, tau))
  assert w.shape == V.shape
  assert np.abs(w.sum(-1) - 1).max() <= 1e-12
  # KKT of the prox: v − w − τ·∂|w| = μ·1, read μ off the support
  act = w != 0
  r = V - w - tau * np.sign(w)
  mu = np.array([r[i, j][act[i, j]].mean() for i in range(3) for j in range(5)]).reshape(3, 5)
  np.testing.assert_allclose(np.where(act, r, mu[..., None]), np.broadcast_to(mu[..., None], V.shape), atol=1e-9)
  assert np.all(np.abs(V - mu[..., None])[~act] <= tau + 1e-9)
  p = np.asarray(prox.project_simplex(V))
  assert np.abs(p.sum(-1) - 1).max() <= 1e-12 and p.min() >= 0


def test_prox_with_huge_tau_is_simplex_projection():
  # ‖w‖₁ ≥ 1 on Σw = 1 with equality iff w ≥ 0: a large enough τ forces the simplex.
  rng = np.random.default_rng(1)
  V = rng.normal(size=(20, 7))
  np.testing.assert_allclose(prox.prox_l1_affine(V, 1e3), np.stack([brute_simplex(v) for v in V]), atol=1e-12)

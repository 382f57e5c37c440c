"""Med-LEGO merge and the merging baselines, against dense float64 numpy and PEFT's TIES."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft.utils.merge_utils import ties as peft_ties

from oracles import dense, rel
from models.lora import LoRA, SVDLoRA, from_flat, to_flat
from rpe_jax.merge import lora_average, medlego_merge, task_arithmetic, ties_merge

SHAPES = {"layers.0.q": (20, 13), "layers.0.v": (20, 13), "out": (13, 9)}


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def rand_adapter(rng, rank, kind="svd", orthonormal=False):
  flat = {}
  for path, (n_in, n_out) in SHAPES.items():
    a, b = rng.standard_normal((n_in, rank)), rng.standard_normal((rank, n_out))
    if orthonormal:   # a true SVD form: orthonormal factors, sorted positive e
      a, b = np.linalg.qr(a)[0], np.linalg.qr(b.T)[0].T
    e = np.sort(rng.uniform(0.5, 3.0, rank))[::-1]
    flat[path] = (SVDLoRA(jnp.asarray(a), jnp.asarray(e.copy()), jnp.asarray(b))
                  if kind == "svd" else LoRA(jnp.asarray(a), jnp.asarray(b)))
  return from_flat(flat)




def test_medlego_of_identical_adapters_returns_that_adapter():
  original = rand_adapter(np.random.default_rng(0), 4, orthonormal=True)
  for merged in (medlego_merge([original] * 5, energy=1.0),
                 medlego_merge([original] * 5, rank=4)):
    for p, leaf in to_flat(original).items():
      got = to_flat(merged)[p]
      assert isinstance(got, SVDLoRA) and got.rank == 4
      np.testing.assert_allclose(got.e, leaf.e, rtol=1e-10)
      # the same singular vectors, up to the sign of each pair
      signs = np.sign(np.sum(np.asarray(got.a) * np.asarray(leaf.a), axis=0))
      np.testing.assert_allclose(np.asarray(got.a) * signs, leaf.a, atol=1e-10)
      np.testing.assert_allclose(np.asarray(got.b) * signs[:, None], leaf.b, atol=1e-10)


@pytest.mark.parametrize("v", [0.5, 0.9, 1.0])
def test_medlego_equals_dense_average_svd_with_cumulative_threshold(v):
  rng = np.random.default_rng(1)
  adapters = [rand_adapter(rng, 4), rand_adapter(rng, 2), rand_adapter(rng, 3, "lora")]
  merged = to_flat(medlego_merge(adapters, energy=v))
  for p in SHAPES:
    avg = sum(dense(to_flat(a)[p]) for a in adapters) / 3
    u, s, vt = np.linalg.svd(avg, full_matrices=False)
    s9 = s[:9]                                   # the average has rank ≤ 4 + 2 + 3
    r = int(np.argmax(np.cumsum(s9) / s9.sum() >= v - 1e-12)) + 1
    assert merged[p].rank == r
    assert rel(dense(merged[p]), (u[:, :r] * s[:r]) @ vt[:r]) < 1e-10
  # under jit with a static cap: the same update
  capped = jax.jit(lambda ads: medlego_merge(ads, energy=v, rank=9))(adapters)
  for p in SHAPES:
    assert rel(dense(to_flat(capped)[p]), dense(merged[p])) < 1e-10


def test_medlego_without_threshold_is_the_exact_average():
  rng = np.random.default_rng(2)
  adapters = [rand_adapter(rng, 3), rand_adapter(rng, 5)]
  merged = to_flat(medlego_merge(adapters))
  for p in SHAPES:
    want = (dense(to_flat(adapters[0])[p]) + dense(to_flat(adapters[1])[p])) / 2
    assert rel(dense(merged[p]), want) < 1e-12


def test_task_arithmetic_is_exact_scaled_sum():
  rng = np.random.default_rng(3)
  adapters = [rand_adapter(rng, 2, "lora"), rand_adapter(rng, 3)]
  out = to_flat(task_arithmetic(adapters, 0.4, weights=jnp.asarray([1.0, -2.0])))
  for p in SHAPES:
    want = 0.4 * (dense(to_flat(adapters[0])[p]) - 2.0 * dense(to_flat(adapters[1])[p]))
    assert rel(dense(out[p]), want) < 1e-12


def test_lora_average_is_the_factorwise_baseline_with_cross_terms():
  rng = np.random.default_rng(4)
  adapters = [rand_adapter(rng, 3, "lora") for _ in range(3)]
  out = to_flat(lora_average(adapters))
  for p in SHAPES:
    leaves = [to_flat(a)[p] for a in adapters]
    a_bar = sum(np.asarray(l.a) for l in leaves) / 3
    b_bar = sum(np.asarray(l.b) for l in leaves) / 3
    assert rel(dense(out[p]), a_bar @ b_bar) < 1e-12
    exact = sum(dense(l) for l in leaves) / 3
    assert rel(dense(out[p]), exact) > 0.1       # the cross terms are real
  svd = [rand_adapter(rng, 2), rand_adapter(rng, 2)]
  out = to_flat(lora_average(svd, weights=jnp.asarray([0.25, 0.75])))
  leaves = [to_flat(a)["out"] for a in svd]
  want = SVDLoRA(*(0.25 * np.asarray(getattr(leaves[0], f)) + 0.75 * np.asarray(getattr(leaves[1], f))
                   for f in ("a", "e", "b")))
  assert rel(dense(out["out"]), dense(want)) < 1e-12
  with pytest.raises(ValueError, match="one kind and one rank"):
    lora_average([rand_adapter(rng, 2, "lora"), rand_adapter(rng, 3, "lora")])


@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_ties_merge_matches_peft_on_dense_deltas(majority):
  rng = np.random.default_rng(5)
  adapters = [rand_adapter(rng, 3, "lora"), rand_adapter(rng, 2), rand_adapter(rng, 4, "lora")]
  weights = np.array([0.5, 1.5, -0.7])
  full = to_flat(ties_merge(adapters, 0.3, scale=0.8, weights=jnp.asarray(weights),
                            majority=majority, rank=13))
  capped = to_flat(ties_merge(adapters, 0.3, scale=0.8, weights=jnp.asarray(weights),
                              majority=majority))
  for p in SHAPES:
    deltas = [torch.from_numpy(dense(to_flat(a)[p])) for a in adapters]
    want = 0.8 * peft_ties(deltas, torch.tensor(weights), 0.3, majority).numpy()
    assert rel(dense(full[p]), want) < 1e-12   # rank ≥ min(in, out): nothing truncated
    assert capped[p].rank == 9                  # default: Σ r_i
    u, s, vt = np.linalg.svd(want, full_matrices=False)
    assert rel(dense(capped[p]), (u[:, :9] * s[:9]) @ vt[:9]) < 1e-10


def test_merge_bad_arguments():
  a = rand_adapter(np.random.default_rng(6), 2)
  with pytest.raises(ValueError, match="density"):
    ties_merge([a, a], 0.0)
  with pytest.raises(ValueError, match="majority"):
    ties_merge([a, a], 0.5, majority="mean")
  with pytest.raises(ValueError, match="empty"):
    medlego_merge([], energy=0.9)
  with pytest.raises(ValueError, match="energy"):
    medlego_merge([a, a], energy=2.0)

"""LoRA / SVD-LoRA leaf algebra and the adapted Linear layer, against dense float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oracles import dense, rel
from models.lora import (LoRA, SVDLoRA, Linear, check_leaf, compact, concat,
                         orthogonality_penalty, total_orthogonality_penalty, truncate)

IN, OUT = 24, 17


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def rand_leaf(rng, r, kind="lora", n_in=IN, n_out=OUT, dtype=np.float64):
  a = rng.standard_normal((n_in, r))
  b = rng.standard_normal((r, n_out))
  if kind == "lora":
    return LoRA(jnp.asarray(a, dtype), jnp.asarray(b, dtype))
  e = rng.standard_normal(r)
  return SVDLoRA(jnp.asarray(a, dtype), jnp.asarray(e, dtype), jnp.asarray(b, dtype))




def test_delta_rank_dtype_shape_scale():
  rng = np.random.default_rng(0)
  lo, sv = rand_leaf(rng, 3), rand_leaf(rng, 4, "svd")
  assert (lo.rank, sv.rank, lo.shape, sv.shape) == (3, 4, (IN, OUT), (IN, OUT))
  assert lo.dtype == jnp.float64
  assert rel(lo.delta(), dense(lo)) < 1e-13
  assert rel(sv.delta(), dense(sv)) < 1e-13
  assert rel(lo.scale(-2.5).delta(), -2.5 * dense(lo)) < 1e-13
  assert rel(sv.scale(-0.5).delta(), -0.5 * dense(sv)) < 1e-13
  assert rel(sv.to_lora().delta(), dense(sv)) < 1e-13
  assert isinstance(sv.to_lora(), LoRA)


def test_concat_exact_mixed_kinds_ranks_negative_weights():
  rng = np.random.default_rng(1)
  leaves = [rand_leaf(rng, 2), rand_leaf(rng, 5, "svd"), rand_leaf(rng, 1), rand_leaf(rng, 3, "svd")]
  w = np.array([0.7, -1.3, 2.0, -0.25])
  out = concat(leaves, jnp.asarray(w))
  assert isinstance(out, LoRA) and out.rank == 11
  want = sum(wi * dense(l) for wi, l in zip(w, leaves))
  assert rel(dense(out), want) < 1e-12
  # all SVD-LoRA stays SVD-LoRA, weights land on e
  svds = [rand_leaf(rng, 2, "svd"), rand_leaf(rng, 6, "svd")]
  out = concat(svds, jnp.asarray([-1.0, 0.5]))
  assert isinstance(out, SVDLoRA) and out.rank == 8
  assert rel(dense(out), -dense(svds[0]) + 0.5 * dense(svds[1])) < 1e-12
  # no weights = plain sum
  assert rel(dense(concat(svds)), dense(svds[0]) + dense(svds[1])) < 1e-12


def test_concat_bf16_storage():
  rng = np.random.default_rng(2)
  leaves = [rand_leaf(rng, 4, dtype=jnp.bfloat16), rand_leaf(rng, 2, "svd", dtype=jnp.bfloat16)]
  w = np.array([0.6, -0.4])
  out = concat(leaves, jnp.asarray(w, jnp.float32))
  assert out.a.dtype == jnp.bfloat16 and out.b.dtype == jnp.bfloat16
  # oracle from the stored bf16 values in float64; the only error is bf16 rounding of w·e·b
  want = sum(wi * dense(l) for wi, l in zip(w, leaves))
  assert rel(dense(out), want) < 1e-2


def np_truncation(d, r):
  u, s, vt = np.linalg.svd(d, full_matrices=False)
  return s, (u[:, :r] * s[:r]) @ vt[:r]


@pytest.mark.parametrize("kind", ["lora", "svd"])
@pytest.mark.parametrize("ranks,r", [((3, 4, 2), 5), ((20, 10), 7), ((1,), 1)])
def test_truncate_equals_dense_svd(kind, ranks, r):
  rng = np.random.default_rng(sum(ranks) + r)
  leaf = concat([rand_leaf(rng, q, kind) for q in ranks], jnp.asarray(rng.standard_normal(len(ranks))))
  s_ref, d_ref = np_truncation(dense(leaf), r)
  out = truncate(leaf, rank=r)
  assert isinstance(out, SVDLoRA) and out.rank == r
  np.testing.assert_allclose(out.e, s_ref[:r], rtol=1e-10, atol=1e-10 * s_ref[0])
  assert rel(dense(out), d_ref) < 1e-10
  # the factors are orthonormal, the singular values sorted and non-negative
  np.testing.assert_allclose(out.a.T @ out.a, np.eye(r), atol=1e-10)
  np.testing.assert_allclose(out.b @ out.b.T, np.eye(r), atol=1e-10)
  assert np.all(np.diff(np.asarray(out.e)) <= 0) and np.all(np.asarray(out.e) >= 0)


def test_truncate_rank_capped_by_available_rank_and_to_svd_exact():
  rng = np.random.default_rng(3)
  leaf = rand_leaf(rng, 4)
  assert truncate(leaf, rank=50).rank == 4
  full = leaf.to_svd()
  assert isinstance(full, SVDLoRA) and full.rank == 4
  assert rel(dense(full), dense(leaf)) < 1e-12
  np.testing.assert_allclose(full.e, np.linalg.svd(dense(leaf), compute_uv=False)[:4], rtol=1e-10)
  # rank larger than in/out: at most min(in, out) directions
  wide = rand_leaf(rng, 30, n_in=6, n_out=9)
  assert truncate(wide).rank == 6 and rel(dense(truncate(wide)), dense(wide)) < 1e-12


def np_energy_rank(s, v):
  """Med-LEGO: the smallest r with Σ_{i≤r} s_i ≥ v Σ s_i."""
  c = np.cumsum(s) / np.sum(s)
  return int(np.argmax(c >= v - 1e-12)) + 1


@pytest.mark.parametrize("v", [0.3, 0.75, 0.95, 1.0])
def test_truncate_energy_eager_and_masked_under_jit(v):
  rng = np.random.default_rng(4)
  leaf = concat([rand_leaf(rng, 3, "svd"), rand_leaf(rng, 5)], jnp.asarray([1.0, -0.3]))
  s_ref = np.linalg.svd(dense(leaf), compute_uv=False)
  r = np_energy_rank(s_ref[:8], v)
  eager = truncate(leaf, energy=v)
  assert eager.rank == r
  assert rel(dense(eager), np_truncation(dense(leaf), r)[1]) < 1e-10
  # under jit: static cap, directions past the threshold zeroed, same update
  masked = jax.jit(lambda l: truncate(l, rank=6, energy=v))(leaf)
  assert masked.rank == 6
  assert np.count_nonzero(np.asarray(masked.e)) == min(r, 6)
  assert rel(dense(masked), np_truncation(dense(leaf), min(r, 6))[1]) < 1e-10
  assert compact(masked).rank == min(r, 6)
  assert rel(dense(compact(masked)), dense(masked)) < 1e-14


def test_truncate_energy_drops_numerically_zero_directions():
  rng = np.random.default_rng(5)
  leaf = rand_leaf(rng, 3, "svd")
  # four copies: rank 12 concatenation of a rank-3 update
  assert truncate(concat([leaf] * 4, jnp.full((4,), 0.25)), energy=1.0).rank == 3


def test_truncate_energy_without_rank_under_jit_raises():
  leaf = rand_leaf(np.random.default_rng(6), 3)
  with pytest.raises(ValueError, match="static rank"):
    jax.jit(lambda l: truncate(l, energy=0.9))(leaf)


@pytest.mark.parametrize("bad", [dict(rank=0), dict(rank=2.5), dict(energy=0.0), dict(energy=1.5)])
def test_truncate_rejects_bad_arguments(bad):
  leaf = rand_leaf(np.random.default_rng(7), 3)
  with pytest.raises(ValueError, match="rank|energy"):
    truncate(leaf, **bad)


def test_truncate_bf16_storage_computes_in_float32():
  rng = np.random.default_rng(8)
  leaf = concat([rand_leaf(rng, 4, dtype=jnp.bfloat16), rand_leaf(rng, 4, dtype=jnp.bfloat16)])
  out = truncate(leaf, rank=3)
  assert out.a.dtype == out.e.dtype == out.b.dtype == jnp.bfloat16
  s_ref, d_ref = np_truncation(dense(leaf), 3)
  np.testing.assert_allclose(np.asarray(out.e, np.float64), s_ref[:3], rtol=1e-2)
  assert rel(dense(out), d_ref) < 2e-2


def test_orthogonality_penalty():
  rng = np.random.default_rng(9)
  leaf = rand_leaf(rng, 4, "svd")
  a, b = np.asarray(leaf.a), np.asarray(leaf.b)
  want = np.sum((a.T @ a - np.eye(4)) ** 2) + np.sum((b @ b.T - np.eye(4)) ** 2)
  np.testing.assert_allclose(orthogonality_penalty(leaf), want, rtol=1e-12)
  ortho = leaf.to_svd()   # orthonormal factors: penalty 0
  assert float(orthogonality_penalty(ortho)) < 1e-20
  tree = {"x": {"q": leaf, "v": ortho}, "y": rand_leaf(rng, 2)}   # LoRA leaves are skipped
  np.testing.assert_allclose(total_orthogonality_penalty(tree), want, rtol=1e-12)
  g = jax.grad(lambda l: orthogonality_penalty(l))(leaf)
  np.testing.assert_allclose(g.a, 4 * a @ (a.T @ a - np.eye(4)), rtol=1e-10)


def test_bad_leaves_and_concat_inputs_raise():
  rng = np.random.default_rng(10)
  with pytest.raises(ValueError, match="factors"):
    check_leaf(LoRA(jnp.ones((4, 2)), jnp.ones((3, 5))))
  with pytest.raises(ValueError, match="e must"):
    check_leaf(SVDLoRA(jnp.ones((4, 2)), jnp.ones(3), jnp.ones((2, 5))))
  with pytest.raises(TypeError):
    check_leaf(jnp.ones((3, 3)))
  with pytest.raises(ValueError, match=r"leaves\[1\] has shape"):
    concat([rand_leaf(rng, 2), rand_leaf(rng, 2, n_in=5)])
  with pytest.raises(ValueError, match="weights"):
    concat([rand_leaf(rng, 2), rand_leaf(rng, 2)], jnp.ones(3))
  with pytest.raises(ValueError, match="empty"):
    concat([])


# --- the adapted Linear layer ---

def make_linear(n_in=IN, n_out=OUT):
  layer = Linear(n_in, n_out, rngs=nnx.Rngs(0), dtype=jnp.float64)
  layer.bias = nnx.Param(jnp.asarray(np.random.default_rng(11).standard_normal(n_out)))
  return layer


def test_linear_forward_with_concatenated_composition_equals_merged_kernel():
  rng = np.random.default_rng(12)
  layer = make_linear()
  w0, b0 = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
  comp = concat([rand_leaf(rng, 3), rand_leaf(rng, 7, "svd"), rand_leaf(rng, 2)],
                jnp.asarray([0.5, -1.0, 2.0]))
  x = rng.standard_normal((5, IN))
  layer.set_adapter(comp)
  assert layer.adapter.rank == 12
  y_unmerged = np.asarray(layer(jnp.asarray(x)))
  want = x @ (w0 + dense(comp)) + b0
  assert rel(y_unmerged, want) < 1e-12
  layer.merge()
  assert layer.adapter is None and layer.lora_a is None
  np.testing.assert_allclose(layer.kernel[...], w0 + dense(comp), rtol=1e-12, atol=1e-13)
  assert rel(layer(jnp.asarray(x)), want) < 1e-12


def test_linear_svd_adapter_forward_and_shape_check():
  rng = np.random.default_rng(13)
  layer = make_linear()
  sv = rand_leaf(rng, 4, "svd")
  layer.set_adapter(sv)
  assert isinstance(layer.adapter, SVDLoRA)
  x = rng.standard_normal((3, IN))
  want = x @ (np.asarray(layer.kernel[...]) + dense(sv)) + np.asarray(layer.bias[...])
  assert rel(layer(jnp.asarray(x)), want) < 1e-12
  with pytest.raises(ValueError, match="does not match"):
    layer.set_adapter(rand_leaf(rng, 4, n_in=OUT, n_out=IN))
  layer.set_adapter(None)
  assert layer.adapter is None


# --- truncate on the fast (CholeskyQR) path and its fallbacks, float32 vs the float64 oracle ---

def _f32_leaves(rng, k, r, n_in=64, n_out=48):
  return [LoRA(jnp.asarray(rng.standard_normal((n_in, r)), jnp.float32),
               jnp.asarray(rng.standard_normal((r, n_out)), jnp.float32)) for _ in range(k)]


def _check_truncation(out, leaf, r, tol):
  """out against the float64 dense SVD of leaf's δW: update, singular values, orthonormality
  of the factors on the directions it keeps (s > 0)."""
  s_ref, d_ref = np_truncation(dense(leaf), r)
  assert out.a.dtype == jnp.float32 and out.rank == r
  assert rel(dense(out), d_ref) < tol
  np.testing.assert_allclose(np.asarray(out.e, np.float64), s_ref[:r], atol=tol * s_ref[0])
  live = np.asarray(out.e) > tol * s_ref[0]
  a, b = np.asarray(out.a, np.float64)[:, live], np.asarray(out.b, np.float64)[live]
  np.testing.assert_allclose(a.T @ a, np.eye(live.sum()), atol=tol)
  np.testing.assert_allclose(b @ b.T, np.eye(live.sum()), atol=tol)


@pytest.mark.parametrize("case", ["generic", "weights_1e6_range", "near_collinear",
                                  "duplicated", "zero_adapter", "zero_weight", "svd_mixed"])
def test_truncate_float32_fast_path_and_fallbacks_match_float64_oracle(case):
  """Each case exercises one branch of `truncate`: one CholeskyQR pass (generic, any weight
  range: the column scaling makes κ independent of w), two passes (κ(a) ≈ 30), Householder
  (duplicated adapters: a singular Gram), exact zero columns (zero adapter / weight)."""
  rng = np.random.default_rng(11)
  leaves = _f32_leaves(rng, 4, 3)
  w = jnp.asarray([0.7, -1.3, 2.0, 0.4], jnp.float32)
  if case == "weights_1e6_range":
    w = jnp.asarray([1.0, 1e-3, -1e-6, 3e2], jnp.float32)
  elif case == "near_collinear":
    a0 = leaves[0].a
    leaves[1] = LoRA(a0 + 3e-2 * leaves[1].a, leaves[1].b)
  elif case == "duplicated":
    leaves[2] = leaves[0]
  elif case == "zero_adapter":
    leaves[1] = LoRA(jnp.zeros_like(leaves[1].a), leaves[1].b)
    leaves[3] = LoRA(leaves[3].a, jnp.zeros_like(leaves[3].b))
  elif case == "zero_weight":
    w = w.at[2].set(0.0)
  elif case == "svd_mixed":
    leaves[1] = leaves[1].to_svd()
  leaf = concat(leaves, w)
  for r in (5, 12):
    _check_truncation(jax.jit(lambda l: truncate(l, rank=r))(leaf), leaf, r, 2e-5)


def test_gram_factor_condition_bound_is_an_upper_bound():
  """κ̂² from the R × R Cholesky factor bounds κ(x̂)² of the column-scaled factor from above
  (the acceptance test of the fast path relies on it); numpy's cond is the oracle."""
  from models.lora import _gram_factor
  rng = np.random.default_rng(12)
  for spread in (0.0, 1e-1, 1e-2, 1e-3):
    x = rng.standard_normal((200, 12)) * rng.uniform(1e-3, 1e3, 12)
    x[:, 1] = x[:, 0] * 2.0 + spread * rng.standard_normal(200) * np.abs(x[:, 0]).max()
    t, r, kappa2 = _gram_factor(jnp.asarray(x.T @ x))
    xs = x / np.linalg.norm(x, axis=0)
    assert float(kappa2) >= np.linalg.cond(xs) ** 2 * (1 - 1e-6) or spread == 0.0
    if spread:   # x = (x T) R with x T orthonormal
      q = x @ np.asarray(t)
      np.testing.assert_allclose(q @ np.asarray(r), x, rtol=0, atol=1e-9 * np.abs(x).max())


def test_truncate_bf16_equals_float32_to_bf16_precision():
  """bf16 factors are upcast: the result is the float32 result of the same stored values,
  rounded to bf16."""
  rng = np.random.default_rng(13)
  leaves = _f32_leaves(rng, 3, 4)
  w = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)
  bf = [jax.tree.map(lambda x: x.astype(jnp.bfloat16), l) for l in leaves]
  f32 = [jax.tree.map(lambda x: x.astype(jnp.float32), l) for l in bf]
  out_bf = truncate(concat(bf, w), rank=6)
  out_32 = truncate(concat(f32, w), rank=6)
  assert out_bf.a.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out_bf.e, np.float64), np.asarray(out_32.e, np.float64),
                             rtol=1e-2)
  assert rel(dense(out_bf), dense(out_32)) < 1e-2

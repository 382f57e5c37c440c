"""LoRA and SVD-LoRA adapter leaves, their exact algebra, and the adapted linear layer.

Canonical form (Flax kernel layout [in, out]):

* ``LoRA(a, b)``:        a [in, r], b [r, out],          δW = a @ b
* ``SVDLoRA(a, e, b)``:  a [in, r], e [r], b [r, out],   δW = a @ diag(e) @ b

Both are registered pytree dataclasses whose children are the arrays, so
``jax.tree.map(f, adapter, is_leaf=is_lora)`` visits whole leaves while optax and
``jax.tree.leaves`` see the factor arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRA:
  """A low-rank update δW = a @ b with a [in, r] and b [r, out]."""

  a: jax.Array
  b: jax.Array

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def dtype(self):
    return self.a.dtype

  @property
  def shape(self) -> tuple[int, int]:
    """The shape (in, out) of the dense update."""
    return (self.a.shape[-2], self.b.shape[-1])

  def delta(self) -> jax.Array:
    """The dense update a @ b (for tests and merging; composition never needs it)."""
    return self.a @ self.b

  def scale(self, w) -> "LoRA":
    """w · δW, exactly: the weight goes on one factor only."""
    return LoRA(self.a, (w * self.b).astype(self.b.dtype))

  def to_lora(self) -> "LoRA":
    return self

  def to_svd(self) -> "SVDLoRA":
    """The exact SVD form (orthonormal a, b; e sorted, non-negative); see `truncate`."""
    return truncate(self)

  def truncate(self, rank: int | None = None, energy: float | None = None) -> "SVDLoRA":
    """Best rank-``rank`` / energy-``energy`` approximation; see the function `truncate`."""
    return truncate(self, rank=rank, energy=energy)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SVDLoRA:
  """An SVD-shaped update δW = a @ diag(e) @ b (Med-LEGO), a [in, r], e [r], b [r, out]."""

  a: jax.Array
  e: jax.Array
  b: jax.Array

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def dtype(self):
    return self.a.dtype

  @property
  def shape(self) -> tuple[int, int]:
    return (self.a.shape[-2], self.b.shape[-1])

  def delta(self) -> jax.Array:
    return (self.a * self.e[..., None, :]) @ self.b

  def scale(self, w) -> "SVDLoRA":
    """w · δW, exactly: the weight goes on e (a negative w leaves e negative)."""
    return SVDLoRA(self.a, (w * self.e).astype(self.e.dtype), self.b)

  def to_lora(self) -> LoRA:
    """The same update as a plain LoRA, e folded into b: b ← diag(e) b."""
    return LoRA(self.a, (self.e[..., :, None] * self.b).astype(self.b.dtype))

  def to_svd(self) -> "SVDLoRA":
    """The exact SVD form (orthonormal a, b; e sorted, non-negative); see `truncate`."""
    return truncate(self)

  def truncate(self, rank: int | None = None, energy: float | None = None) -> "SVDLoRA":
    """Best rank-``rank`` / energy-``energy`` approximation; see the function `truncate`."""
    return truncate(self, rank=rank, energy=energy)


Adapter = Union[LoRA, SVDLoRA]


def is_lora(x) -> bool:
  """``is_leaf`` predicate: True for LoRA and SVDLoRA leaves."""
  return isinstance(x, (LoRA, SVDLoRA))


def check_leaf(leaf, where: str = "adapter") -> None:
  """Raise a ValueError naming ``where`` unless ``leaf`` is a well-formed 2-D LoRA/SVDLoRA."""
  if not is_lora(leaf):
    raise TypeError(f"{where}: expected a LoRA or SVDLoRA leaf, got {type(leaf).__name__}")
  a, b = leaf.a, leaf.b
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
    raise ValueError(f"{where}: factors must be a [in, r] and b [r, out], "
                     f"got a {tuple(a.shape)} and b {tuple(b.shape)}")
  if isinstance(leaf, SVDLoRA) and tuple(leaf.e.shape) != (a.shape[1],):
    raise ValueError(f"{where}: e must have shape ({a.shape[1]},), got {tuple(leaf.e.shape)}")


def _compute_dtype(dtype):
  """Linear algebra runs in float32 or wider, whatever the storage dtype."""
  return jnp.promote_types(dtype, jnp.float32)


def concat(leaves: Sequence[Adapter], weights=None) -> Adapter:
  """Σ_i w_i δW_i exactly, as one leaf of rank Σ_i r_i (rank concatenation).

  a = [a_1 … a_k] and b = [w_1 b_1; …; w_k b_k], so a @ b = Σ_i w_i a_i b_i: no cross
  terms, any ranks, any sign of w. All SVD-LoRA → SVD-LoRA with e = [w_1 e_1, …, w_k e_k];
  otherwise → LoRA with each e_i folded into its b_i. ``weights`` ([k], may be traced;
  None means all ones). The result is stored in the common dtype of the inputs.
  """
  leaves = list(leaves)
  if not leaves:
    raise ValueError("concat: leaves is empty")
  for i, leaf in enumerate(leaves):
    check_leaf(leaf, f"concat: leaves[{i}]")
  shape = leaves[0].shape
  for i, leaf in enumerate(leaves):
    if leaf.shape != shape:
      raise ValueError(f"concat: leaves[{i}] has shape {leaf.shape}, leaves[0] has {shape}")
  if weights is None:
    weights = jnp.ones((len(leaves),), jnp.float32)
  weights = jnp.asarray(weights)
  if weights.shape != (len(leaves),):
    raise ValueError(f"concat: weights must have shape ({len(leaves)},), "
                     f"got {tuple(weights.shape)}")
  dtype = jnp.result_type(*[x for leaf in leaves for x in jax.tree.leaves(leaf)])
  a = jnp.concatenate([leaf.a.astype(dtype) for leaf in leaves], axis=1)
  if all(isinstance(leaf, SVDLoRA) for leaf in leaves):
    e = jnp.concatenate([(w * leaf.e).astype(dtype) for w, leaf in zip(weights, leaves)])
    b = jnp.concatenate([leaf.b.astype(dtype) for leaf in leaves], axis=0)
    return SVDLoRA(a, e, b)
  bs = []
  for w, leaf in zip(weights, leaves):
    bw = w * leaf.b if isinstance(leaf, LoRA) else (w * leaf.e)[:, None] * leaf.b
    bs.append(bw.astype(dtype))
  return LoRA(a, jnp.concatenate(bs, axis=0))


def energy_count(s: np.ndarray, energy: float, eps: float) -> int:
  """Med-LEGO's rank rule: the smallest r with Σ_{i≤r} s_i ≥ v · Σ_i s_i (at least 1).

  s: concrete singular values sorted descending (numpy; read eagerly, outside jit).
  energy: the threshold v in (0, 1]. eps: the machine epsilon of the dtype s was computed
  in (see `energy_keep`). The number of True entries of ``energy_keep``, floored at 1.
  """
  return max(1, int(np.sum(energy_keep(s, energy, eps, np))))


def energy_keep(s, energy: float, eps: float, xp=jnp):
  """Mask of the singular values Med-LEGO's threshold v keeps (s sorted descending).

  Keep i while the sum *before* it is still short of v · Σ s:
    keep_i = Σ_{j<i} s_j < v · Σ s − len(s) · eps · Σ s.
  The slack (len(s) · eps) · Σ s absorbs rounding, so v = 1 keeps the exact rank and drops
  numerically-zero directions. Traceable with ``xp=jnp`` (a static shape: use it to zero the
  dropped values under jit, as ``truncate(rank=..., energy=...)`` does); ``xp=np`` for
  numpy input.
  """
  total = xp.sum(s)
  before = xp.cumsum(s) - s
  return before < energy * total - len(s) * eps * total


# Acceptance bounds on κ̂² (an upper bound on κ(x̂)² of a column-scaled factor x̂, see
# `_gram_factor`): one Cholesky pass below _ONE_PASS (factor orthogonal to ~_ONE_PASS · u),
# a second CholeskyQR pass below 1 / (_TWO_PASS · u), Householder QR above.
_ONE_PASS = 128.0
_TWO_PASS = 64.0


def _gram_factor(g):
  """A factor of a tall x [n, R] (n ≥ R) from its Gram g = xᵀx alone, in float32 or wider.

  Jacobi scaling first: d = √diag(g), x̂ = x D⁻¹ has unit columns and the Gram ĝ = D⁻¹ g D⁻¹
  (a zero column gets d = 0 and a unit diagonal entry, so it drops out exactly). With the
  Cholesky factor ĝ = L Lᵀ:  x = Q R,  R = Lᵀ D,  Q = x T,  T = D⁺ L⁻ᵀ.
  Returns (T, R, κ̂²) with κ̂² = ‖ĝ‖_∞ ‖ĝ⁻¹‖_∞ ≥ κ(x̂)² (NaN if the Cholesky failed).
  """
  d = jnp.sqrt(jnp.diagonal(g))
  live = d > 0
  dinv = jnp.where(live, 1 / jnp.where(live, d, 1), 0)
  gs = g * dinv[:, None] * dinv[None, :] + jnp.diag(jnp.where(live, 0, 1).astype(g.dtype))
  l = jnp.linalg.cholesky(gs)
  linv = jax.scipy.linalg.solve_triangular(l, jnp.eye(g.shape[0], dtype=g.dtype), lower=True)
  kappa2 = (jnp.max(jnp.sum(jnp.abs(gs), axis=1))
            * jnp.max(jnp.sum(jnp.abs(linv.T @ linv), axis=1)))
  return dinv[:, None] * linv.T, l.T * d[None, :], kappa2


def _second_pass(x, t, r, *, transpose: bool):
  """CholeskyQR2's refinement: Q₁ = x T₁, Q₁ᵀQ₁ = L₂L₂ᵀ, so Q = Q₁ L₂⁻ᵀ: T ← T₁ L₂⁻ᵀ, R ← L₂ᵀ R₁.
  ``transpose``: x is given as xᵀ [R, n] (the b factor), so the Gram is taken row-wise."""
  q1 = t.T @ x if transpose else x @ t
  g2 = q1 @ q1.T if transpose else q1.T @ q1
  l2 = jnp.linalg.cholesky(g2)
  l2inv = jax.scipy.linalg.solve_triangular(l2, jnp.eye(g2.shape[0], dtype=g2.dtype), lower=True)
  return t @ l2inv.T, l2.T @ r


def _core_svd(ra, rb, e):
  """SVD of the small core Ra C Rbᵀ (C = diag(e) for SVD-LoRA, else I)."""
  if e is not None:
    ra = ra * e
  return jnp.linalg.svd(ra @ rb.T, full_matrices=False)


def _householder(a, b, e, r):
  """The reference method: thin Householder QRs a = Qa Ra, bᵀ = Qb Rb (any shapes, any rank)."""
  qa, ra = jnp.linalg.qr(a)
  qb, rb = jnp.linalg.qr(b.T)
  u, s, vt = _core_svd(ra, rb, e)
  return qa @ u[:, :r], s, vt[:r] @ qb.T


def _cholesky_qr(a, b, e, r, fa, fb):
  """The fast method: factors from the Grams (`_gram_factor`), a second CholeskyQR pass on a
  side whose κ̂² exceeds _ONE_PASS, and only the r output columns are ever formed."""
  (ta, ra, ka), (tb, rb, kb) = fa, fb
  ta, ra = jax.lax.cond(ka <= _ONE_PASS, lambda: (ta, ra),
                        lambda: _second_pass(a, ta, ra, transpose=False))
  tb, rb = jax.lax.cond(kb <= _ONE_PASS, lambda: (tb, rb),
                        lambda: _second_pass(b, tb, rb, transpose=True))
  u, s, vt = _core_svd(ra, rb, e)
  return a @ (ta @ u[:, :r]), s, (vt[:r] @ tb.T) @ b


def truncate(leaf: Adapter, rank: int | None = None, energy: float | None = None) -> "SVDLoRA":
  """Truncated SVD of δW computed from the factors only; δW is never formed.

  With a [in, R], core C (diag(e) or I) and b [R, out]:
    a = Qa Ra,  bᵀ = Qb Rb                          (thin QR, O((in + out) R²))
    Ra C Rbᵀ = U diag(s) Vᵀ                          (SVD of an R × R matrix)
    δW = (Qa U) diag(s) (Vᵀ Qbᵀ)                     (an exact SVD of δW)
  and the top r triplets are kept: SVDLoRA(Qa U[:, :r], s[:r], Vᵀ[:r] Qbᵀ), the best
  rank-r approximation (Eckart–Young).

  How the QRs are computed (u = the unit roundoff of the compute dtype). When R ≤ min(in,
  out), by CholeskyQR from the Grams aᵀa and b bᵀ: each side is column-scaled to unit
  norms (Jacobi; exact zero columns — zero adapters, zero weights — drop out), Cholesky-
  factored, and the bound κ̂² ≥ κ(scaled factor)² is read off the R × R factor:
    * κ̂² ≤ 128:           one pass (Qa = a Ra⁻¹ loses orthogonality as κ̂² u);
    * κ̂² ≤ 1 / (64 u):    a second CholeskyQR pass (CholeskyQR2; then as κ̂ u);
    * otherwise — NaN included — or R > min(in, out) (rank-deficient stacks: duplicated
      adapters, ranks beyond the layer's size): Householder QR, backward stable.
  Qa is never formed: the result is a @ (Ra⁻¹ U[:, :r]), so the work is the two Grams plus
  the two [n, R] × [R, r] output products (the floor of any factored method) and R × R
  linear algebra. Guarantee: the result is the rank-r truncated SVD of δW up to a
  perturbation ε·‖a‖‖C‖‖b‖, its factors orthonormal to ε, with ε = O(u) (Householder),
  O(κ̂² u) ≤ O(128 u) (one pass) or O(κ̂ u) ≤ O(√(u / 64)) (two passes) — in float32 about
  1e-5 and 4e-5. The column scaling makes κ̂ independent of the weights and of the
  adapters' scales, so only near-collinear factors (not weights spanning decades) leave
  the one-pass path.

  rank: static cap on the result's rank (a Python int; the result has rank
    min(rank, R, in, out)). None keeps every direction (the exact SVD form of δW).
  energy: Med-LEGO's threshold v in (0, 1]: keep the smallest r with
    Σ_{i≤r} s_i ≥ v Σ_i s_i. The number kept depends on the values, so:
    * with ``rank`` given, the result has the static rank ``rank`` and the singular values
      beyond the threshold are set to zero (works under jit/vmap; `compact` drops them
      afterwards, eagerly);
    * without ``rank``, the cut is eager: the values must be concrete (outside jit).
  QR and SVD run in float32 or wider (bf16 factors are upcast); the factors are cast back
  to the leaf's dtype.

  Example::

    >>> leaves = [LoRA(jnp.ones((64, 4)), jnp.ones((4, 32))) for _ in range(3)]
    >>> truncate(concat(leaves, jnp.array([0.5, -1.0, 2.0])), rank=2).e.shape
    (2,)
  """
  check_leaf(leaf, "truncate")
  if rank is not None and (not isinstance(rank, (int, np.integer)) or isinstance(rank, bool)
                           or rank < 1):
    raise ValueError(f"truncate: rank must be a static int >= 1, got {rank!r}")
  if energy is not None:
    if not isinstance(energy, (float, int, np.floating)) or not 0.0 < float(energy) <= 1.0:
      raise ValueError(f"truncate: energy must be a number in (0, 1], got {energy!r}")
    energy = float(energy)
  dtype = leaf.dtype
  ct = _compute_dtype(jnp.result_type(*jax.tree.leaves(leaf)))
  a, b = leaf.a.astype(ct), leaf.b.astype(ct)
  e = leaf.e.astype(ct) if isinstance(leaf, SVDLoRA) else None
  (n_in, big_r), n_out = a.shape, b.shape[1]
  full = min(big_r, n_in, n_out)                # the number of singular values
  r = full if rank is None else min(int(rank), full)
  if big_r <= min(n_in, n_out):
    fa, fb = _gram_factor(a.T @ a), _gram_factor(b @ b.T)
    ok = jnp.maximum(fa[2], fb[2]) <= 1.0 / (_TWO_PASS * float(jnp.finfo(ct).eps))
    qu, s, vq = jax.lax.cond(ok, lambda: _cholesky_qr(a, b, e, r, fa, fb),
                             lambda: _householder(a, b, e, r))
  else:
    qu, s, vq = _householder(a, b, e, r)
  if energy is not None:
    eps = float(jnp.finfo(ct).eps)
    if rank is None:
      if isinstance(s, jax.core.Tracer):
        raise ValueError(
            "truncate: energy without rank needs concrete values; under jit/vmap pass a "
            "static rank= cap (components beyond the threshold are then zeroed)")
      r = min(r, energy_count(np.asarray(s), energy, eps))
    else:
      s = jnp.where(energy_keep(s, energy, eps), s, 0)
  return SVDLoRA(qu[:, :r].astype(dtype), s[:r].astype(dtype), vq[:r].astype(dtype))


def compact(leaf: Adapter, tol: float = 0.0) -> Adapter:
  """Drop the directions whose |e| <= tol (eager; e.g. after a masked energy truncation)."""
  check_leaf(leaf, "compact")
  if not isinstance(leaf, SVDLoRA):
    return leaf
  keep = np.abs(np.asarray(leaf.e, dtype=np.float64)) > tol
  if not keep.any():
    keep[0] = True   # keep the shape meaningful: a rank-1 zero update
  idx = np.nonzero(keep)[0]
  return SVDLoRA(leaf.a[:, idx], leaf.e[idx], leaf.b[idx])


def orthogonality_penalty(leaf: Adapter) -> jax.Array:
  """Med-LEGO's regulariser ‖aᵀa − I‖²_F + ‖b bᵀ − I‖²_F (in float32 or wider).

  In the paper's notation (Δ = B E A, B [out, r], A [r, in]) this is ‖BᵀB − I‖² + ‖AAᵀ − I‖²;
  with our a = Aᵀ and b = Bᵀ both Gram matrices are r × r.
  """
  check_leaf(leaf, "orthogonality_penalty")
  ct = _compute_dtype(leaf.dtype)
  a, b = leaf.a.astype(ct), leaf.b.astype(ct)
  eye = jnp.eye(a.shape[1], dtype=ct)
  return jnp.sum((a.T @ a - eye) ** 2) + jnp.sum((b @ b.T - eye) ** 2)


def total_orthogonality_penalty(adapter) -> jax.Array:
  """Σ of `orthogonality_penalty` over the SVD-LoRA leaves of an adapter tree (plain LoRA
  leaves carry no orthogonality constraint and are skipped)."""
  leaves = [x for x in jax.tree.leaves(adapter, is_leaf=is_lora) if isinstance(x, SVDLoRA)]
  return sum((orthogonality_penalty(x) for x in leaves), jnp.zeros((), jnp.float32))


class LoRAParam(nnx.Param):
  """Trainable adapter factors; the base weights are plain ``nnx.Param``.

  A distinct Variable type lets training select adapters with ``nnx.state(model, LoRAParam)``
  and freeze everything else.
  """


class LoRAGate(nnx.Variable):
  """A per-sample gate g [B, r] on an adapted layer's rank axis (see `Linear`).

  Deliberately not a ``LoRAParam`` (nor an ``nnx.Param``): it is data a mixture fixes, not
  a weight, so ``nnx.state(model, LoRAParam)`` — what training selects — never holds it.
  """


def gate_rows(h: jax.Array, g: jax.Array, fold: int = 1) -> jax.Array:
  """h ⊙ g with sample b's gate row on every row of h that belongs to sample b.

  h [N, ..., r] (N = B · fold, sample-major: rows b·fold … b·fold + fold − 1 are sample b),
  g [B, r]. Every axis between the leading one and the rank axis (tokens, grid, prompts)
  shares its sample's gate: h[n, ..., j] · g[n // fold, j].
  """
  if h.ndim < 2:
    raise ValueError("a per-sample gate needs an input [N, ..., in] with a leading batch "
                     "axis, got a single vector")
  n, batch = h.shape[0], g.shape[0]
  if n != batch * fold:
    rows = f"{batch} samples" if fold == 1 else f"{batch} samples × {fold} rows per sample"
    raise ValueError(f"per-sample gate batch mismatch: the gate has {rows} = {batch * fold} "
                     f"rows, but the layer's input has leading axis {n}; build the mixture "
                     f"with one weight row per input (with_mixture(model, adapters, "
                     f"weights [B, n]))")
  g = g.astype(h.dtype).reshape((batch, 1) + (1,) * (h.ndim - 2) + (g.shape[-1],))
  return (h.reshape((batch, fold) + h.shape[1:]) * g).reshape(h.shape)


class Linear(nnx.Module):
  """A linear layer y = x @ W + bias that can carry an adapter leaf unmerged.

  With an adapter the forward pass is x @ W + bias + (x @ a) @ b (SVD-LoRA: ((x @ a) · e) @ b),
  for any rank, so a rank-concatenated composition runs without forming δW.

  With a per-sample gate g [B, r] as well (`set_gate`; ``rpe_jax.compose.mixture`` sets it)
  the rank axis is scaled per input: y_b = x_b W + bias + ((x_b a) ⊙ g_b) b. With a the
  rank concatenation [a_1 … a_n] of n adapters and g_b = [w_b1 1_{r_1}, …, w_bn 1_{r_n}],
  that is x_b (W + Σ_i w_bi a_i b_i): each input gets its own exact composition.
  ``batch_fold``: how many leading rows of this layer's input each sample owns, sample-major
  (1 almost everywhere; SAM's windowed attention sees [B · windows, ...]).
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               dtype=jnp.float32, rngs: nnx.Rngs, batch_fold: int = 1):
    init = nnx.initializers.lecun_normal()
    self.in_features = in_features
    self.out_features = out_features
    self.batch_fold = int(batch_fold)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))
    self.bias = nnx.data(nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None)
    # Adapter slots are data attributes even while empty, so one can be installed later.
    self.lora_a = nnx.data(None)
    self.lora_e = nnx.data(None)
    self.lora_b = nnx.data(None)
    self.lora_g = nnx.data(None)

  @property
  def adapter(self) -> Adapter | None:
    """The adapter leaf this layer carries, or None."""
    if self.lora_a is None:
      return None
    if self.lora_e is None:
      return LoRA(self.lora_a[...], self.lora_b[...])
    return SVDLoRA(self.lora_a[...], self.lora_e[...], self.lora_b[...])

  @property
  def gate(self) -> jax.Array | None:
    """The per-sample gate g [B, r] this layer carries, or None."""
    return None if self.lora_g is None else self.lora_g[...]

  def set_adapter(self, adapter: Adapter | None) -> None:
    """Install (or with None remove) an adapter leaf, checking its shape against the kernel.
    Any per-sample gate is removed too: it belonged to the previous adapter's rank axis."""
    self.lora_g = None
    if adapter is None:
      self.lora_a = self.lora_e = self.lora_b = None
      return
    check_leaf(adapter, "set_adapter")
    if adapter.shape != (self.in_features, self.out_features):
      raise ValueError(
          f"adapter shape {adapter.shape} does not match the layer's kernel "
          f"({self.in_features}, {self.out_features})")
    self.lora_a = LoRAParam(adapter.a)
    self.lora_b = LoRAParam(adapter.b)
    self.lora_e = LoRAParam(adapter.e) if isinstance(adapter, SVDLoRA) else None

  def set_gate(self, gate: jax.Array | None) -> None:
    """Install (or with None remove) a per-sample gate g [B, r] on the adapter's rank axis."""
    if gate is None:
      self.lora_g = None
      return
    if self.lora_a is None:
      raise ValueError("set_gate: the layer carries no adapter to gate")
    gate = jnp.asarray(gate)
    rank = self.lora_a[...].shape[-1]
    if gate.ndim != 2 or gate.shape[1] != rank or gate.shape[0] < 1:
      raise ValueError(f"set_gate: the gate must be [B, r={rank}] (the adapter's rank), "
                       f"got shape {tuple(gate.shape)}")
    self.lora_g = LoRAGate(gate)

  def merge(self) -> None:
    """Fold the adapter into the kernel (W ← W + δW, computed in float32 or wider) and drop it.

    The kernel Variable is replaced, not written in place, so a model that shares the old
    Variable (``nnx.merge(..., copy=False)``) keeps its kernel; metadata is carried over.
    A per-sample mixture (a gated adapter) has no one kernel to fold into: it raises.
    """
    adapter = self.adapter
    if adapter is None:
      return
    if self.lora_g is not None:
      raise ValueError("merge: the layer carries a per-sample mixture (a gated adapter); "
                       "each input has its own update, so there is no one kernel to merge")
    self.add_to_kernel(adapter)
    self.set_adapter(None)

  def add_to_kernel(self, adapter: Adapter) -> None:
    """W ← W + δW of ``adapter`` (in float32 or wider, cast back to the kernel's dtype)."""
    check_leaf(adapter, "add_to_kernel")
    if adapter.shape != (self.in_features, self.out_features):
      raise ValueError(
          f"adapter shape {adapter.shape} does not match the layer's kernel "
          f"({self.in_features}, {self.out_features})")
    kernel = self.kernel[...]
    ct = _compute_dtype(jnp.result_type(kernel, *jax.tree.leaves(adapter)))
    delta = jax.tree.map(lambda t: t.astype(ct), adapter).delta()
    self.kernel = self.kernel.replace((kernel.astype(ct) + delta).astype(kernel.dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x @ self.kernel[...]
    if self.bias is not None:
      y = y + self.bias[...]
    if self.lora_a is not None:
      h = x @ self.lora_a[...]
      if self.lora_e is not None:
        h = h * self.lora_e[...]
      if self.lora_g is not None:
        h = gate_rows(h, self.lora_g[...], self.batch_fold)
      y = y + h @ self.lora_b[...]
    return y


def _path_name(path) -> str:
  return ".".join(str(p) for p in path)


def adapted_layers(model: nnx.Module) -> dict[str, Linear]:
  """Every adaptable ``Linear`` in ``model``, keyed by its dotted module path."""
  return {_path_name(path): node for path, node in nnx.iter_graph(model)
          if isinstance(node, Linear)}


def matches(path: str, targets) -> bool:
  """True when a module path ends with one of ``targets`` (PEFT's ``target_modules`` rule).

  A target matches the last path component exactly (``"query"``) or a dotted suffix
  (``"attention.query"``).
  """
  return any(path == t or path.endswith("." + t) for t in targets)


def init_adapters(model: nnx.Module, targets=("query", "value"), rank: int = 8, *,
                  kind: str = "lora", rngs: nnx.Rngs, dtype=jnp.float32) -> dict[str, Linear]:
  """Install fresh adapters on the layers whose path matches ``targets``.

  As in PEFT, ``a`` is Kaiming-uniform-like random and ``b`` is zero, so δW = 0 at the
  start. For ``kind="svd"`` (Med-LEGO's SVD-LoRA) ``e`` starts at zero and ``a``, ``b``
  are random orthonormal-ish so the orthogonality penalty starts small.
  Returns the layers that received an adapter; raises if none matched.
  """
  if kind not in ("lora", "svd"):
    raise ValueError(f"kind must be 'lora' or 'svd', got {kind!r}")
  if rank < 1:
    raise ValueError(f"rank must be >= 1, got {rank}")
  layers = {p: m for p, m in adapted_layers(model).items() if matches(p, targets)}
  if not layers:
    raise ValueError(f"no linear layer matches targets {tuple(targets)}; "
                     f"candidates: {sorted(adapted_layers(model))[:8]} ...")
  for _, layer in sorted(layers.items()):
    n_in, n_out = layer.in_features, layer.out_features
    if kind == "lora":
      bound = 1.0 / jnp.sqrt(n_in)
      a = jax.random.uniform(rngs.params(), (n_in, rank), dtype, -bound, bound)
      layer.set_adapter(LoRA(a, jnp.zeros((rank, n_out), dtype)))
    else:
      a = jax.random.orthogonal(rngs.params(), max(n_in, rank))[:n_in, :rank].astype(dtype)
      b = jax.random.orthogonal(rngs.params(), max(n_out, rank))[:rank, :n_out].astype(dtype)
      layer.set_adapter(SVDLoRA(a, jnp.zeros((rank,), dtype), b))
  return layers


# --- The exchange form: a nested dict keyed by module path, leaves LoRA / SVDLoRA. ---

def to_flat(adapter) -> dict[str, Adapter]:
  """{"layers": {"0": {"query": leaf}}} → {"layers.0.query": leaf}."""
  flat = {}

  def walk(node, prefix):
    if is_lora(node):
      flat[prefix] = node
    elif isinstance(node, dict):
      for key, child in node.items():
        key = str(key)
        if "." in key:
          raise ValueError(f"adapter path component {key!r} contains '.'")
        walk(child, f"{prefix}.{key}" if prefix else key)
    else:
      raise TypeError(f"adapter node at {prefix or '<root>'!r} is a {type(node).__name__}, "
                      "expected a dict or a LoRA/SVDLoRA leaf")

  walk(adapter, "")
  return flat


def from_flat(flat: dict[str, Adapter]) -> dict:
  """{"layers.0.query": leaf} → {"layers": {"0": {"query": leaf}}}."""
  tree: dict = {}
  for path, leaf in sorted(flat.items()):
    *parents, last = path.split(".")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
      if not isinstance(node, dict):
        raise ValueError(f"adapter path {path!r} runs through a leaf")
    if last in node:
      raise ValueError(f"adapter path {path!r} given twice or is a prefix of another")
    node[last] = leaf
  return tree

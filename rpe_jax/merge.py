"""Merging adapters into one: Med-LEGO and the baselines it is compared with.

* `medlego_merge` (Med-LEGO, the seeds' method): the exact average (1/N) Σ_i δW_i of N
  SVD-LoRA specialists, re-truncated by SVD to the top singular values whose cumulative
  sum reaches a threshold v. Factored: δW is never formed (see ``models.lora.truncate``).
* `task_arithmetic` (Ilharco et al. 2023): λ Σ_i δW_i, exact.
* `lora_average`: the *approximate* factor-wise baseline (Σ w_i a_i)(Σ w_i b_i), as
  LoRA-soup style merges and PEFT's ``linear`` combination do. It adds the cross terms
  w_i w_j a_i b_j (i ≠ j); it is here only to be compared against.
* `ties_merge` (Yadav et al. 2023): trim / elect sign / disjoint mean. TIES acts
  elementwise on δW, so it is inherently dense: each layer's δW_i is formed and the
  merged dense update is factorised back to a bounded rank by a dense SVD.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from models.lora import LoRA, SVDLoRA, is_lora
from rpe_jax.compose import check_weights, check_same_structure, combine, truncate_tree


def medlego_merge(adapters: Sequence, *, energy: float | None = None,
                  rank: int | None = None):
  """Med-LEGO: SVD((1/N) Σ_i a_i diag(e_i) b_i), keeping the top singular triplets.

  energy: the threshold v in (0, 1]: per layer, keep the smallest r with
    Σ_{j≤r} s_j ≥ v Σ_j s_j (eager unless ``rank`` is given; see ``models.lora.truncate``).
  rank: a static cap on every layer's rank.
  With neither, the result is the exact SVD form of the average (rank ≤ Σ_i r_i).
  Inputs may be SVD-LoRA (as in the paper) or plain LoRA; the result is SVD-LoRA.
  """
  adapters = list(adapters)
  if not adapters:
    raise ValueError("medlego_merge: adapters is empty")
  n = len(adapters)
  average = combine(adapters, jnp.full((n,), 1.0 / n))
  return truncate_tree(average, rank=rank, energy=energy)


def task_arithmetic(adapters: Sequence, scale: float = 1.0, *, weights=None,
                    rank: int | None = None, energy: float | None = None):
  """Task arithmetic: scale · Σ_i w_i δW_i (w_i = 1 by default), exact by concatenation,
  optionally re-truncated (factored)."""
  adapters = list(adapters)
  if not adapters:
    raise ValueError("task_arithmetic: adapters is empty")
  w = jnp.ones((len(adapters),)) if weights is None else check_weights(weights, len(adapters))
  return combine(adapters, scale * w, rank=rank, energy=energy)


def lora_average(adapters: Sequence, weights=None):
  """The approximate baseline: average the factors separately.

  LoRA:     (Σ w_i a_i, Σ w_i b_i)            SVD-LoRA: (Σ w_i a_i, Σ w_i e_i, Σ w_i b_i)
  with w_i = 1/N by default. Its product is NOT Σ w_i a_i b_i (cross terms); every layer
  must have the same kind and rank across adapters.
  """
  adapters = list(adapters)
  if not adapters:
    raise ValueError("lora_average: adapters is empty")
  check_same_structure(adapters)
  n = len(adapters)
  w = jnp.full((n,), 1.0 / n) if weights is None else check_weights(weights, n)

  def one_layer(*leaves):
    kinds = {type(leaf).__name__ for leaf in leaves}
    ranks = {leaf.rank for leaf in leaves}
    if len(kinds) > 1 or len(ranks) > 1:
      raise ValueError(f"lora_average: factor-wise averaging needs one kind and one rank per "
                       f"layer, got kinds {sorted(kinds)} and ranks {sorted(ranks)}")
    mean = lambda xs: sum(wi * x for wi, x in zip(w, xs)).astype(xs[0].dtype)
    if isinstance(leaves[0], SVDLoRA):
      return SVDLoRA(mean([l.a for l in leaves]), mean([l.e for l in leaves]),
                     mean([l.b for l in leaves]))
    return LoRA(mean([l.a for l in leaves]), mean([l.b for l in leaves]))

  return jax.tree.map(one_layer, *adapters, is_leaf=is_lora)


def _trim(delta: jax.Array, density: float) -> jax.Array:
  """Keep the int(density · n) largest-magnitude entries (PEFT's magnitude pruning)."""
  flat = delta.reshape(-1)
  k = int(density * flat.size)
  if k == 0:
    return jnp.zeros_like(delta)
  _, idx = jax.lax.top_k(jnp.abs(flat), k)
  return jnp.zeros_like(flat).at[idx].set(flat[idx]).reshape(delta.shape)


def ties_dense(deltas: Sequence[jax.Array], weights, density: float,
               majority: str = "total") -> jax.Array:
  """TIES on dense task vectors of one layer, in PEFT's order of operations.

  1. trim: δ̂_i = the top-``density`` fraction of δW_i by magnitude (int(density · n) kept);
  2. elect: γ = sign(Σ_i δ̂_i) ("total") or sign(Σ_i sign(δ̂_i)) ("frequency"), 0 as +;
  3. disjoint merge: Σ_i m_i w_i δ̂_i / max(1, Σ_i m_i) with m_i = [sign(δ̂_i) = γ].
  The weights enter after the election, as in PEFT's ``merge_utils.ties``.
  """
  trimmed = jnp.stack([_trim(d, density) for d in deltas])
  signs = jnp.sign(trimmed)
  votes = trimmed.sum(0) if majority == "total" else signs.sum(0)
  elected = jnp.where(votes >= 0, 1, -1).astype(signs.dtype)
  agree = signs == elected
  weighted = trimmed * weights.reshape((-1,) + (1,) * (trimmed.ndim - 1))
  count = jnp.maximum(agree.sum(0), 1).astype(trimmed.dtype)
  return jnp.where(agree, weighted, 0).sum(0) / count


def ties_merge(adapters: Sequence, density: float = 0.2, *, scale: float = 1.0,
               weights=None, majority: str = "total", rank: int | None = None):
  """TIES-merging of LoRA adapters, on the dense per-layer deltas (see `ties_dense`).

  The merged scale · δW is dense and generally full rank; it is returned as the SVD-LoRA
  of its top ``rank`` singular triplets (default: Σ_i r_i of that layer), from a dense
  SVD in float32 or wider. This is the one place a dense [in, out] matrix is formed, by
  the nature of TIES.
  """
  adapters = list(adapters)
  if not adapters:
    raise ValueError("ties_merge: adapters is empty")
  if not 0.0 < float(density) <= 1.0:
    raise ValueError(f"ties_merge: density must be in (0, 1], got {density!r}")
  if majority not in ("total", "frequency"):
    raise ValueError(f"ties_merge: majority must be 'total' or 'frequency', got {majority!r}")
  if rank is not None and (not isinstance(rank, int) or rank < 1):
    raise ValueError(f"ties_merge: rank must be an int >= 1, got {rank!r}")
  check_same_structure(adapters)
  n = len(adapters)
  w = jnp.ones((n,)) if weights is None else check_weights(weights, n)

  def one_layer(*leaves):
    dtype = jnp.result_type(*[x for leaf in leaves for x in jax.tree.leaves(leaf)])
    ct = jnp.promote_types(dtype, jnp.float32)
    deltas = [jax.tree.map(lambda t: t.astype(ct), leaf).delta() for leaf in leaves]
    merged = scale * ties_dense(deltas, w.astype(ct), density, majority)
    u, s, vt = jnp.linalg.svd(merged, full_matrices=False)
    r = min(sum(leaf.rank for leaf in leaves) if rank is None else rank, s.shape[0])
    return SVDLoRA(u[:, :r].astype(dtype), s[:r].astype(dtype), vt[:r].astype(dtype))

  return jax.tree.map(one_layer, *adapters, is_leaf=is_lora)

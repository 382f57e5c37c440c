"""Exact top-k retrieval of prototypes by squared L2 distance, jit-compiled.

For a target z and references z_i,

    d_i² = ‖z‖² − 2 z·z_i + ‖z_i‖²,

so ranking needs one matrix product (the floor) and a top-k of z·z_i − ‖z_i‖²/2 (‖z‖² is
constant per target). The index stores the augmented rows [z_i, −‖z_i‖²/2], so the score
comes straight out of one product with [z, 1] — no extra pass over the [B, N] scores
before the top-k. The k winners are then re-measured directly, d_i² = Σ (z − z_i)², which
is exact where the expanded form cancels, and sorted by (distance, index): ties go to the
smaller index, deterministically.

The result carries what the weighting step's Gram form needs — c_i = z·z_i, ‖z_i‖², ‖z‖²
and the k reference vectors — so it never has to touch the whole library again.

Shapes are bucketed so the compiled function is reused as the library grows: the
reference count is padded to a power of two (to 1024) or a multiple of 1024, the
padding rows have ‖z_i‖² = +inf and can never be chosen; the batch is padded to a power
of two.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class RetrievalError(ValueError):
  """Bad retrieval input: wrong shape, non-finite values, k out of range."""


class PrototypeIndex(NamedTuple):
  """Device-resident prototypes of one encoder.

  ``augmented`` [N_pad, d + 1] holds the rows [z_i, −‖z_i‖²/2] (padding rows: [0, −inf]).
  """

  names: np.ndarray        # [N] str (object array), row order of the matrix
  augmented: jax.Array

  @property
  def size(self) -> int:
    return len(self.names)

  @property
  def rows(self) -> int:
    return int(self.augmented.shape[0])

  @property
  def dim(self) -> int:
    return int(self.augmented.shape[1]) - 1


class Retrieval(NamedTuple):
  """The k nearest references per target, nearest first ([k] fields for a single target).

  names [B, k] (numpy str), distances [B, k] = ‖z − z_i‖², indices [B, k] (rows of the
  index, i.e. positions in ``Library.prototypes(encoder).names``), inner [B, k] = z·z_i,
  ref_sqnorm [B, k] = ‖z_i‖², target_sqnorm [B] = ‖z‖², references [B, k, d] = z_i.
  """

  names: np.ndarray
  distances: jax.Array
  indices: jax.Array
  inner: jax.Array
  ref_sqnorm: jax.Array
  target_sqnorm: jax.Array
  references: jax.Array


def padded_rows(n: int) -> int:
  """Bucket for n references: powers of two up to 1024, then multiples of 1024."""
  if n <= 1024:
    return max(8, 1 << max(0, n - 1).bit_length())
  return -(-n // 1024) * 1024


def build_index(names: Sequence[str], matrix, *, device=None) -> PrototypeIndex:
  """Put an [N, d] float32 prototype matrix on the device, augmented and padded."""
  matrix = np.asarray(matrix, np.float32)
  if matrix.ndim != 2 or matrix.shape[0] != len(names):
    raise RetrievalError(f"prototype matrix must be [{len(names)}, d], got {list(matrix.shape)}")
  n, d = matrix.shape
  augmented = np.zeros((padded_rows(n), d + 1), np.float32)
  augmented[:n, :d] = matrix
  augmented[:n, d] = -0.5 * np.einsum("nd,nd->n", matrix, matrix, dtype=np.float64)
  augmented[n:, d] = -np.inf
  return PrototypeIndex(np.asarray(list(names), dtype=object),
                        jax.device_put(augmented, device))


def distance_matrix_product(matrix: jax.Array, queries: jax.Array) -> jax.Array:
  """The floor: the [B, N] products z·z_i alone (what any exact search must compute)."""
  return jnp.matmul(queries, matrix.T, precision=jax.lax.Precision.HIGHEST)


BLOCK = 128


def _blocked_top_k(score: jax.Array, k: int) -> jax.Array:
  """Indices of the k largest entries per row, exactly as ``lax.top_k`` (ties to the lower
  index), at the cost of one max-reduction pass.

  Split each row into blocks of ``BLOCK``; the k blocks with the largest maxima (ties to
  the lower block) hold the answer: every block holding one of the top k has a maximum
  ≥ the k-th value t, at most k blocks have a maximum > t or are needed for ties at t, and
  those are taken in index order. Then top-k over the k·BLOCK candidates, kept in index
  order so the inner top-k breaks ties the same way. XLA's CPU top-k is a partial sort per
  row: ~6× slower than this on [64, 1e5].
  """
  rows, n = score.shape
  blocks = score.reshape(rows, n // BLOCK, BLOCK)
  _, best = jax.lax.top_k(blocks.max(axis=-1), k)
  best = jnp.sort(best, axis=-1)
  candidates = jnp.take_along_axis(blocks, best[..., None], axis=1).reshape(rows, k * BLOCK)
  _, pos = jax.lax.top_k(candidates, k)
  return jnp.take_along_axis(best, pos // BLOCK, axis=1) * BLOCK + pos % BLOCK


@functools.partial(jax.jit, static_argnames=("k", "approx", "squeeze"))
def _search(augmented, queries, mask, *, k: int, approx: bool, squeeze: bool):
  d = queries.shape[1]
  # [z, 1]·[z_i, −‖z_i‖²/2] = (‖z‖² − d_i²)/2: larger is nearer; padding rows score −inf.
  ones = jnp.ones((queries.shape[0], 1), queries.dtype)
  score = distance_matrix_product(augmented, jnp.concatenate([queries, ones], axis=1))
  if mask is not None:
    score = jnp.where(mask, -jnp.inf, score)
  if approx:
    _, idx = jax.lax.approx_max_k(score, k, recall_target=0.95)
  elif score.shape[1] % BLOCK == 0 and score.shape[1] // BLOCK >= 8 * k:
    idx = _blocked_top_k(score, k)
  else:
    _, idx = jax.lax.top_k(score, k)
  rows = augmented[idx]                                           # [B, k, d + 1]
  refs = rows[..., :d]
  dist = jnp.sum(jnp.square(queries[:, None, :] - refs), axis=-1)
  order = jnp.broadcast_to(jnp.arange(k), idx.shape)
  _, idx, order = jax.lax.sort((dist, idx, order), dimension=-1, num_keys=2)
  refs = jnp.take_along_axis(refs, order[..., None], axis=1)
  dist = jnp.take_along_axis(dist, order, axis=1)
  ref_sqnorm = -2.0 * jnp.take_along_axis(rows[..., d], order, axis=1)
  inner = jnp.einsum("bkd,bd->bk", refs, queries, precision=jax.lax.Precision.HIGHEST)
  out = dist, idx, inner, ref_sqnorm, jnp.sum(jnp.square(queries), axis=-1), refs
  return tuple(o[0] for o in out) if squeeze else out


def exclusion_mask(index: PrototypeIndex, exclude, batch: int) -> np.ndarray | None:
  """[1 or B, N_pad] bool mask from names to leave out (one list for all targets, or one per
  target); unknown names are an error."""
  if exclude is None or (not isinstance(exclude, str) and len(exclude) == 0):
    return None
  position = {n: i for i, n in enumerate(index.names)}
  per_target = not isinstance(exclude, str) and all(
      not isinstance(e, str) for e in exclude)
  groups = list(exclude) if per_target else [[exclude] if isinstance(exclude, str) else exclude]
  if per_target and len(groups) != batch:
    raise RetrievalError(f"exclude has {len(groups)} per-target lists for {batch} targets")
  mask = np.zeros((len(groups), index.rows), bool)
  for row, names in enumerate(groups):
    for name in names:
      if name not in position:
        raise RetrievalError(f"exclude names {name!r}, which is not among the "
                             f"{index.size} prototypes searched")
      mask[row, position[name]] = True
  return mask


def search(index: PrototypeIndex, prototypes, k: int, *, exclude=(),
           approx: bool = False) -> Retrieval:
  """The k nearest prototypes of ``index`` to each target in ``prototypes`` ([d] or [B, d]).

  ``exclude``: names left out for every target, or one sequence of names per target
  (leave-one-out). ``approx=True`` uses ``jax.lax.approx_max_k`` (approximate on TPU,
  exact elsewhere).
  """
  z = np.asarray(prototypes, dtype=np.float32)
  single = z.ndim == 1
  if single:
    z = z[None]
  if z.ndim != 2 or z.shape[1] != index.dim or z.shape[0] == 0:
    raise RetrievalError(
        f"prototypes must be [{index.dim}] or [B, {index.dim}], got {list(np.shape(prototypes))}")
  if not np.isfinite(z).all():
    raise RetrievalError("prototypes contain NaN or Inf")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise RetrievalError(f"k must be a positive integer, got {k!r}")
  batch = z.shape[0]
  mask = exclusion_mask(index, exclude, batch)
  candidates = index.size - (int(mask.sum(axis=1).max()) if mask is not None else 0)
  if k > candidates:
    raise RetrievalError(f"k={k} exceeds the {candidates} candidate prototypes "
                         f"({index.size} in the index, "
                         f"{index.size - candidates} excluded)")
  rows = 1 << max(0, batch - 1).bit_length()
  if rows != batch:
    z = np.concatenate([z, np.zeros((rows - batch, z.shape[1]), np.float32)])
    if mask is not None and mask.shape[0] == batch and batch > 1:
      mask = np.concatenate([mask, np.zeros((rows - batch, mask.shape[1]), bool)])
  out = _search(index.augmented, jnp.asarray(z),
                None if mask is None else jnp.asarray(mask), k=int(k), approx=approx,
                squeeze=single)
  if rows != batch:
    out = tuple(o[:batch] for o in out)
  return Retrieval(index.names[np.asarray(out[1])], *out)

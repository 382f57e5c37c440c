"""Operations on a device mesh: exact composition of a sharded adapter library, TSQR
re-truncation of sharded factors, and the weight solver with its batch axis sharded.

The placements they start from (meshes, partition rules, stacked libraries) come from
``rpe_jax.parallel.sharding``; each operation is one ``jax.jit`` with explicit ``in_shardings`` /
``out_shardings`` (what ``pjit`` became), so the result has exactly the requested sharding.

* ``sharded_combine`` composes a placed, stacked library exactly,
  Σ_i w_i a_i b_i = [a_1 … a_k] · [w_1 b_1; …; w_k b_k], and optionally re-truncates with
  TSQR on the sharded factors (local QR per device, one all-gather of the small R blocks,
  the small core SVD replicated), so no dense [in, out] matrix and no gathered factor.
  ``combine_on_mesh`` is ``compose.combine`` on a mesh (stack, place, combine).
* ``sharded_solve`` runs the batched weight solver with the batch axis sharded.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.lora import LoRA, SVDLoRA, energy_count, energy_keep, from_flat, is_lora, to_flat
from rpe_jax.parallel.sharding import adapter_shardings, place_library, replicated, stack_adapters

# --- Exact composition of a sharded library ---------------------------------------------------

def _concat_stacked(leaf, w):
  """A stacked leaf [k, ...] → its rank concatenation with the weights on b (or e):
  a = [a_1 … a_k] [in, k·r], b = [w_1 b_1; …; w_k b_k] [k·r, out] (``models.lora.concat``)."""
  k, n_in, r = leaf.a.shape
  dtype = jnp.result_type(*jax.tree.leaves(leaf))
  a = jnp.moveaxis(leaf.a, 0, 1).reshape(n_in, k * r).astype(dtype)
  b = leaf.b.reshape(k * r, leaf.b.shape[-1]).astype(dtype)
  if isinstance(leaf, SVDLoRA):
    return SVDLoRA(a, (w[:, None] * leaf.e).astype(dtype).reshape(k * r), b)
  return LoRA(a, (w[:, None, None] * leaf.b).astype(dtype).reshape(k * r, -1))


def _row_axes(rows: int, mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes (in mesh order) over which ``rows`` rows split evenly, greedily."""
  axes, size = [], 1
  for name in mesh.axis_names:
    if rows % (size * mesh.shape[name]) == 0:
      axes.append(name)
      size *= mesh.shape[name]
  return tuple(axes)


def tsqr(x: jax.Array, mesh: Mesh, axes: tuple[str, ...] | None = None):
  """Thin QR of a tall matrix whose rows are sharded over ``axes`` (TSQR).

  Each device factors its row block X_j = Q_j R_j; the small R_j are all-gathered and
  factored once more, [R_1; …; R_p] = Q' R (replicated); then Q = diag(Q_j) Q', so
  X = Q R with Q's rows sharded like X's and only the c × K blocks R_j communicated.
  """
  axes = _row_axes(x.shape[0], mesh) if axes is None else tuple(axes)
  if not axes:
    return jnp.linalg.qr(x)

  def local(xb):
    q1, r1 = jnp.linalg.qr(xb)
    stacked = jax.lax.all_gather(r1, axes, tiled=True)
    q2, r = jnp.linalg.qr(stacked)
    block = jax.lax.dynamic_slice_in_dim(q2, jax.lax.axis_index(axes) * r1.shape[0],
                                         r1.shape[0])
    return q1 @ block, r

  return jax.shard_map(local, mesh=mesh, in_specs=P(axes, None),
                       out_specs=(P(axes, None), P()), check_vma=False)(x)


def _truncate_sharded(leaf, mesh: Mesh, rank: int | None, energy: float | None):
  """``models.lora.truncate`` with the two QRs done by TSQR on the sharded factors and the
  small core SVD replicated: a = Qa Ra, bᵀ = Qb Rb, Ra C Rbᵀ = U S Vᵀ → (Qa U, S, Vᵀ Qbᵀ)."""
  dtype = leaf.dtype
  ct = jnp.promote_types(jnp.result_type(*jax.tree.leaves(leaf)), jnp.float32)
  qa, ra = tsqr(leaf.a.astype(ct), mesh)
  qb, rb = tsqr(leaf.b.astype(ct).T, mesh)
  if isinstance(leaf, SVDLoRA):
    ra = ra * leaf.e.astype(ct)
  u, s, vt = jnp.linalg.svd(ra @ rb.T, full_matrices=False)
  r = s.shape[0] if rank is None else min(rank, s.shape[0])
  if energy is not None and rank is not None:
    s = jnp.where(energy_keep(s, energy, float(jnp.finfo(ct).eps)), s, 0)
  return SVDLoRA((qa @ u[:, :r]).astype(dtype), s[:r].astype(dtype),
                 (vt[:r] @ qb.T).astype(dtype))


def _compose_stack(stack, w, mesh, rank, energy):
  """The jitted body of `sharded_combine`: concatenate every layer, then maybe truncate."""
  w = w.astype(jnp.promote_types(w.dtype, jnp.float32))

  def one(leaf):
    leaf = _concat_stacked(leaf, w)
    if rank is None and energy is None:
      return leaf
    return _truncate_sharded(leaf, mesh, rank, energy)

  return jax.tree.map(one, stack, is_leaf=is_lora)


def _out_shardings(out_sharding, shapes, mesh: Mesh, model_type, preset):
  if out_sharding is None and model_type is not None:
    return adapter_shardings(shapes, mesh, model_type=model_type, preset=preset)
  if out_sharding is None:
    out_sharding = replicated(mesh)
  if isinstance(out_sharding, P):
    out_sharding = NamedSharding(mesh, out_sharding)
  if isinstance(out_sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda _: out_sharding, shapes)
  return out_sharding


def sharded_combine(stack, weights, mesh: Mesh, *, rank: int | None = None,
                    energy: float | None = None, out_sharding=None,
                    model_type=None, preset: str = "tp"):
  """Σ_i w_i δθ_i over a placed, stacked library, compiled with explicit shardings.

  stack: from ``stack_adapters`` + ``place_library`` (leaves [k, ...], k sharded on a mesh
    axis); its arrays' shardings are the ``in_shardings``.
  weights: [k] (replicated); padded library entries are zero adapters (any weight).
  rank, energy: re-truncation as ``rpe_jax.compose.combine`` (see ``models.lora.truncate``):
    a static ``rank`` cap, Med-LEGO's ``energy`` threshold (with ``rank``: masked, static
    shape; without: the rank per layer is read from the singular values, then cut).
  out_sharding: the ``out_shardings`` — None (replicated, or by the adapter rules of
    ``model_type`` / ``preset`` when given), one ``NamedSharding`` / ``PartitionSpec`` for
    every array, or a tree like the result (e.g. from ``sharding.adapter_shardings``).
  model_type: whose partition rules (``sharding.partition_rules``): "vit" / "llama" /
    "sam", the base model, or its config.
  Returns the composed adapter (rank-concatenated LoRA / SVD-LoRA, or truncated SVD-LoRA)
  with exactly the requested shardings.
  """
  flat = to_flat(stack)
  if not flat:
    raise ValueError("sharded_combine: stack is empty")
  k = next(iter(flat.values())).a.shape[0]
  for path, leaf in flat.items():
    if leaf.a.ndim != 3 or leaf.a.shape[0] != k:
      raise ValueError(f"sharded_combine: stack leaf {path!r} has a {tuple(leaf.a.shape)}; "
                       f"expected [k={k}, in, r] (build it with stack_adapters)")
  in_sh = jax.tree.map(lambda x: getattr(x, "sharding", None), stack)
  for x in jax.tree.leaves(in_sh):
    if not isinstance(x, NamedSharding) or x.mesh != mesh:
      raise ValueError("sharded_combine: the stack is not placed on this mesh; "
                       "call place_library(stack, mesh) first")
  weights = jnp.asarray(weights)
  if weights.shape != (k,):
    raise ValueError(f"sharded_combine: weights must have shape ({k},) for a stack of {k}, "
                     f"got {tuple(weights.shape)}")
  if not bool(jnp.all(jnp.isfinite(weights))):
    raise ValueError(f"sharded_combine: weights must be finite, got {np.asarray(weights)}")
  if rank is not None and (not isinstance(rank, (int, np.integer)) or rank < 1):
    raise ValueError(f"sharded_combine: rank must be an int >= 1, got {rank!r}")
  if energy is not None and not 0.0 < float(energy) <= 1.0:
    raise ValueError(f"sharded_combine: energy must be in (0, 1], got {energy!r}")
  static = (mesh, None if rank is None else int(rank), None if energy is None else float(energy))
  shapes = jax.eval_shape(lambda s, w: _compose_stack(s, w, *static), stack, weights)
  out_sh = _out_shardings(out_sharding, shapes, mesh, model_type, preset)
  # A module-level function with static options: repeated calls reuse the compilation.
  out = jax.jit(_compose_stack, static_argnums=(2, 3, 4), in_shardings=(in_sh, replicated(mesh)),
                out_shardings=out_sh)(stack, weights, *static)
  if energy is None or rank is not None:
    return out
  # Energy without a rank cap: the cut depends on the singular values, read per layer.
  eps = float(jnp.finfo(jnp.promote_types(jax.tree.leaves(out)[0].dtype, jnp.float32)).eps)
  cut = {p: energy_count(np.asarray(leaf.e, np.float64), float(energy), eps)
         for p, leaf in to_flat(out).items()}

  def take(tree):
    return from_flat({p: SVDLoRA(l.a[:, :cut[p]], l.e[:cut[p]], l.b[:cut[p]])
                      for p, l in to_flat(tree).items()})

  return jax.jit(take, out_shardings=out_sh)(out)


def combine_on_mesh(adapters: Sequence, weights, mesh: Mesh, *, axis: str = "data",
                    rank: int | None = None, energy: float | None = None, out_sharding=None,
                    model_type=None, preset: str = "tp"):
  """``compose.combine`` on a mesh: stack (padded to split over ``axis``), place, and
  `sharded_combine` (the padded entries get weight 0). Without an ``axis`` axis in the
  mesh the library goes on the mesh's first axis."""
  axis = axis if axis in mesh.shape else mesh.axis_names[0]
  adapters = list(adapters)
  weights = jnp.asarray(weights)
  if weights.shape != (len(adapters),):
    raise ValueError(f"combine_on_mesh: weights must have shape ({len(adapters)},), "
                     f"got {tuple(weights.shape)}")
  stack = stack_adapters(adapters, multiple_of=mesh.shape.get(axis, 1))
  k = jax.tree.leaves(stack)[0].shape[0]
  placed = place_library(stack, mesh, axis, model_type=model_type, preset=preset)
  return sharded_combine(placed, jnp.pad(weights, (0, k - len(adapters))), mesh, rank=rank,
                         energy=energy, out_sharding=out_sharding, model_type=model_type,
                         preset=preset)


# --- The solver with its batch axis sharded ---------------------------------------------------

def sharded_solve(refs, targets, lam, mesh: Mesh, *, axis: str = "data",
                  independent: bool = False, solve: Callable | None = None, **solve_kwargs):
  """``solvers.sparse_simplex.solve`` for T targets with the batch axis over ``axis``.

  refs: [k, d] shared (replicated) or [T, k, d] (sharded with the targets); targets [T, d];
  T must split evenly over ``axis``; lam: one scalar λ for all targets. Compiled as
  ``jax.jit`` with ``in_shardings`` / ``out_shardings`` on the batch axis; returns the ``Solution`` with every field's batch
  axis sharded over ``axis``.

  independent=False: one SPMD program over the whole batch; the loop's batch-wide tests
  (stop, polish) are all-reduced each iteration, so the result is the single-device one.
  independent=True: a ``shard_map`` in which each device runs the solver on its own
  problems to their own convergence (no per-iteration sync; a vmapped while-loop runs to
  the slowest member of its batch): equal to solving each device's block on its own.
  ``solve`` replaces the solver (same signature; default ``solvers.sparse_simplex.solve``).
  """
  if solve is None:
    from solvers.sparse_simplex import solve
  refs, targets = jnp.asarray(refs), jnp.asarray(targets)
  if targets.ndim != 2:
    raise ValueError(f"sharded_solve: targets must be [T, d], got {tuple(targets.shape)}")
  if refs.ndim not in (2, 3) or refs.shape[-1] != targets.shape[-1] or (
      refs.ndim == 3 and refs.shape[0] != targets.shape[0]):
    raise ValueError(f"sharded_solve: refs must be [k, d] or [T, k, d] matching targets "
                     f"{tuple(targets.shape)}, got {tuple(refs.shape)}")
  if axis not in mesh.shape:
    raise ValueError(f"sharded_solve: axis {axis!r} is not a mesh axis {mesh.axis_names}")
  if targets.shape[0] % mesh.shape[axis]:
    raise ValueError(f"sharded_solve: {targets.shape[0]} targets do not split over mesh axis "
                     f"{axis!r} of size {mesh.shape[axis]}; pad the batch")
  if jnp.ndim(lam) != 0:
    raise ValueError(f"sharded_solve: lam must be a scalar (one λ for every target), got "
                     f"shape {jnp.shape(lam)}")
  program = _solve_program(mesh, axis, refs.ndim == 3, bool(independent), solve,
                           tuple(sorted(solve_kwargs.items())))
  return program(refs, targets, jnp.asarray(lam))


@functools.lru_cache(maxsize=64)
def _solve_program(mesh, axis, per_target_refs, independent, solve, kwargs):
  """The compiled `sharded_solve`, built once per configuration (so calls reuse it)."""
  refs_spec = P(axis) if per_target_refs else P()

  def body(refs, targets, lam):
    refs = jnp.broadcast_to(refs, targets.shape[:-1] + refs.shape[-2:])
    return solve(refs, targets, lam, **dict(kwargs))

  if independent:
    body = jax.shard_map(body, mesh=mesh, in_specs=(refs_spec, P(axis), P()),
                         out_specs=P(axis), check_vma=False)
  batch = NamedSharding(mesh, P(axis))
  return jax.jit(body, in_shardings=(NamedSharding(mesh, refs_spec), batch, replicated(mesh)),
                 out_shardings=batch)

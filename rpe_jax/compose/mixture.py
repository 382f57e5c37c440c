"""Per-sample mixtures: one batched forward pass in which every input runs its own exact
composition, without materialising one adapter per input.

Input b of a batch retrieved its own adapters and weights. With U = the union of the n
adapters retrieved in the batch and W [B, n] the weights (w_bi = 0 where b did not retrieve
adapter i; any sign), every adapted layer carries U's rank-concatenated factors and a gate:

  A_U = [a_1 … a_n] [in, Σr],   B_U = [b_1; …; b_n] [Σr, out],
  G = expand(W) [B, Σr]         (column block i of row b is w_bi repeated r_i times),

and computes, for input b,

  y_b = x_b W0 + ((x_b A_U) ⊙ G_b) B_U = x_b (W0 + Σ_i w_bi a_i b_i),

which is exactly the forward of ``with_adapter(model, combine(U, W[b]))`` on x_b:
δW_b = Σ_i w_bi a_i b_i, never a factor-wise average. SVD-LoRA leaves keep e as a factor
(A_U diag(e_U) B_U with the gate applied after e); mixed kinds are brought to one form as
``combine`` does (``models.lora.concat``).

``set_mixture_weights`` gives a mixture new weights (same union, any batch size) by
replacing the gates alone, for callers that keep one union across batches.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.lora import adapted_layers, concat, is_lora, to_flat
from rpe_jax.compose import _copy, _targets, check_same_structure, floating_finite


def mixture_weights(names_per_input: Sequence[Sequence[Hashable]],
                    weights) -> tuple[list, np.ndarray]:
  """Scatter each input's retrieved weights into the columns of the batch's union.

  names_per_input: [B, k] adapter names (ids) retrieved for each input (rows may differ in
    length); weights: [B, k] their weights, row by row.
  Returns (union, W): the union's names in order of first appearance, and W [B, |union|]
  with W[b, j] = the weight input b gave union[j], 0 where b did not retrieve it. Pure numpy.
  """
  names = [list(row) for row in names_per_input]
  given = [np.asarray(row) for row in weights]
  rows = [row.astype(np.float64) for row in given]
  if len(rows) != len(names):
    raise ValueError(f"mixture_weights: {len(names)} rows of names but {len(rows)} rows of "
                     f"weights")
  union, column = [], {}
  for b, (row_names, row_w) in enumerate(zip(names, rows)):
    if row_w.shape != (len(row_names),):
      raise ValueError(f"mixture_weights: input {b} has {len(row_names)} names but weights of "
                       f"shape {row_w.shape}")
    if not np.all(np.isfinite(row_w)):
      raise ValueError(f"mixture_weights: input {b} has non-finite weights {row_w}")
    if len(set(row_names)) != len(row_names):
      raise ValueError(f"mixture_weights: input {b} retrieved an adapter twice: {row_names}")
    for name in row_names:
      if name not in column:
        column[name] = len(union)
        union.append(name)
  # float32 at least; float64 weights stay float64.
  floats = [r.dtype for r in given if np.issubdtype(r.dtype, np.floating)]
  dtype = np.result_type(np.float32, *floats)
  out = np.zeros((len(names), len(union)), dtype)
  for b, (row_names, row_w) in enumerate(zip(names, rows)):
    out[b, [column[name] for name in row_names]] = row_w
  return union, out


def check_mixture_weights(weights, n: int) -> jax.Array:
  """weights as a floating [B, n] array (B ≥ 1), finite when concrete (it may be traced)."""
  weights = jnp.asarray(weights)
  if weights.ndim != 2 or weights.shape[1] != n or weights.shape[0] < 1:
    raise ValueError(f"with_mixture: weights must have shape [B, {n}] (one row per input, "
                     f"one column per adapter), got {tuple(weights.shape)}")
  return floating_finite(weights, "with_mixture: weights")


def expand(weights: jax.Array, ranks: Sequence[int]) -> jax.Array:
  """The gate G [B, Σ r_i] of weights [B, n]: column block i is weights[:, i] repeated r_i
  times (the ranks are static; the weights may be traced)."""
  return jnp.repeat(weights, np.asarray(ranks), axis=1, total_repeat_length=int(sum(ranks)))


def with_mixture(model: nnx.Module, adapters: Sequence, weights) -> nnx.Module:
  """A model whose input b runs ``combine(adapters, weights[b])``, all in one forward pass.

  adapters: the n exchange-form adapters of the union U, with the same paths and layer
    shapes (ranks and LoRA/SVD-LoRA kinds may differ), checked as ``combine`` does.
  weights: [B, n], any sign, zeros for adapters an input did not retrieve (see
    `mixture_weights`); may be traced.
  Each layer gets U's rank concatenation (``concat`` with unit weights: SVD-LoRA when every
  adapter is one, else LoRA with each e_i folded into b_i) and the gate expand(weights), so
  for input b:  δW_b = Σ_i w_bi a_i b_i  exactly (see the module docstring).
  The model's inputs must then come in batches of exactly B, in the order of the weights'
  rows (a mismatch raises when the model runs). Returns a new model; the base arrays are
  shared and ``model`` is not modified; any adapter it carried is replaced.
  """
  adapters = list(adapters)
  if not adapters:
    raise ValueError("with_mixture: adapters is empty")
  check_same_structure(adapters)
  weights = check_mixture_weights(weights, len(adapters))
  flats = [to_flat(a) for a in adapters]
  ranks = {path: [f[path].rank for f in flats] for path in flats[0]}
  union = jax.tree.map(lambda *leaves: concat(leaves), *adapters, is_leaf=is_lora)
  new = _copy(model)
  flat, layers = _targets(new, union)
  for layer in layers.values():
    layer.set_adapter(None)
  for path, leaf in flat.items():
    layers[path].set_adapter(leaf)
    layers[path].set_gate(expand(weights, ranks[path]))
  return new


def set_mixture_weights(mixed: nnx.Module, adapters: Sequence, weights) -> nnx.Module:
  """``mixed`` with new per-input weights: the same as ``with_mixture(model, adapters,
  weights)`` when ``mixed = with_mixture(model, adapters, old_weights)``, but only the gates
  are replaced — the union's concatenated factors are reused, not rebuilt.

  For a caller whose union stays fixed across batches (``pipeline.predict_per_sample``:
  the dataset's union) this is the per-batch step; building the mixture concatenates
  every layer's n factors again (tens of eager ops per layer), a swap is one gate per
  layer (ViT-S, 32 rank-8 adapters on query and value, 2 CPU cores: ~110 ms to build,
  ~25 ms to swap, nnx.split included; benchmarks/per_sample_speed.py).
  adapters: the union, in the order ``mixed`` was built with (only their ranks are read:
  each gated layer must carry rank Σ r_i over exactly the adapters' paths).
  weights: [B, n], any B (the batch size may change). Returns a new model sharing every
  array with ``mixed``; ``mixed`` is not modified.
  """
  adapters = list(adapters)
  if not adapters:
    raise ValueError("set_mixture_weights: adapters is empty")
  weights = check_mixture_weights(weights, len(adapters))
  flats = [to_flat(a) for a in adapters]
  new = _copy(mixed)
  layers = {path: layer for path, layer in adapted_layers(new).items()
            if layer.gate is not None}
  if set(layers) != set(flats[0]):
    raise ValueError(f"set_mixture_weights: the model's gated layers "
                     f"({len(layers)}) are not the adapters' {len(flats[0])} paths; build "
                     f"the mixture with with_mixture(model, adapters, weights) first")
  gates: dict[tuple, jax.Array] = {}    # one expand per distinct rank pattern
  for path, layer in layers.items():
    ranks = tuple(f[path].rank for f in flats)
    if layer.adapter.rank != sum(ranks):
      raise ValueError(f"set_mixture_weights: layer {path!r} carries rank "
                       f"{layer.adapter.rank}, but the adapters' ranks there sum to "
                       f"{sum(ranks)}: not the mixture of these adapters")
    if ranks not in gates:
      gates[ranks] = expand(weights, ranks)
    layer.set_gate(gates[ranks])
  return new

"""Adapter-tree arithmetic: exact weighted composition and installing adapters on models.

An adapter here is the exchange form of ``models.lora``: a nested dict keyed by module
path whose leaves (under ``is_leaf=is_lora``) are ``LoRA(a, b)`` / ``SVDLoRA(a, e, b)``.

Composition is exact, layer by layer:

  δW_trg = Σ_i w_i δW_i = [a_1 … a_k] · [w_1 b_1; …; w_k b_k]        (rank concatenation)

never (Σ w_i a_i)(Σ w_i b_i), which adds cross terms a_i b_j. The optional re-truncation
is the factored one of ``models.lora.truncate`` (QR of the stacked factors, SVD of the
small Σr × Σr core), so no dense [in, out] matrix is ever formed.

Per-sample mixtures — each input of a batch with its own composition, in one forward pass —
are ``rpe_jax.compose.mixture``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.lora import (Adapter, Linear, adapted_layers, check_leaf, concat, from_flat,
                         is_lora, to_flat, truncate)


def signature(adapter) -> dict[str, tuple[int, int]]:
  """{dotted path: (in, out)} of an exchange-form adapter, each leaf checked."""
  flat = to_flat(adapter)
  for path, leaf in flat.items():
    check_leaf(leaf, f"adapter leaf {path!r}")
  return {path: leaf.shape for path, leaf in flat.items()}


def structure_differences(reference: dict[str, tuple], other: dict[str, tuple]) -> list[str]:
  """Human-readable differences between two `signature`s (empty when they agree)."""
  diffs = [f"missing {p}" for p in sorted(set(reference) - set(other))]
  diffs += [f"extra {p}" for p in sorted(set(other) - set(reference))]
  diffs += [f"shape {p}: {other[p]} vs {reference[p]}"
            for p in sorted(set(reference) & set(other)) if other[p] != reference[p]]
  return diffs


def check_same_structure(adapters: Sequence) -> dict[str, tuple[int, int]]:
  """Raise a ValueError listing every differing path unless all adapters have the same
  paths and (in, out) shapes (ranks and kinds may differ). Returns the common signature."""
  sigs = [signature(a) for a in adapters]
  lines = []
  for i, sig in enumerate(sigs[1:], start=1):
    lines += [f"  adapters[{i}]: {d}" for d in structure_differences(sigs[0], sig)]
  if lines:
    raise ValueError("adapters differ in structure from adapters[0]:\n" + "\n".join(lines))
  return sigs[0]


def floating_finite(weights, what: str = "weights") -> jax.Array:
  """``weights`` as a floating array (float32 unless already floating), finite when concrete
  (traced weights are not checked); ``ValueError`` naming ``what`` otherwise."""
  if not jnp.issubdtype(weights.dtype, jnp.floating):
    weights = weights.astype(jnp.float32)
  if not isinstance(weights, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(weights))):
    raise ValueError(f"{what} must be finite, got {np.asarray(weights)}")
  return weights


def check_weights(weights, k: int) -> jax.Array:
  weights = jnp.asarray(weights)
  if weights.shape != (k,):
    raise ValueError(f"weights must have shape ({k},) for {k} adapters, "
                     f"got {tuple(weights.shape)}")
  return floating_finite(weights)


def combine(adapters: Sequence, weights, *, rank: int | None = None,
            energy: float | None = None):
  """Σ_i w_i δθ_i exactly, for whole adapter trees.

  adapters: k exchange-form adapters with the same paths and layer shapes; ranks and
    LoRA/SVD-LoRA kinds may differ.
  weights: [k], any sign; may be traced (jit, vmap over weights, grad).
  rank, energy: optional re-truncation of every layer (see ``models.lora.truncate``);
    under jit/vmap use a static ``rank`` (with ``energy`` too, it is the cap and the
    directions beyond the threshold are zeroed).
  Returns one adapter tree: per layer the rank-Σr_i concatenation (SVD-LoRA when every
  input is one, LoRA otherwise), or the truncated SVD-LoRA.
  """
  adapters = list(adapters)
  if not adapters:
    raise ValueError("combine: adapters is empty")
  check_same_structure(adapters)
  weights = check_weights(weights, len(adapters))

  def one_layer(*leaves):
    leaf = concat(leaves, weights)
    if rank is None and energy is None:
      return leaf
    return truncate(leaf, rank=rank, energy=energy)

  return jax.tree.map(one_layer, *adapters, is_leaf=is_lora)


def scale(adapter, w):
  """w · δθ for a whole adapter tree (the weight goes on b, or on e for SVD-LoRA)."""
  return jax.tree.map(lambda leaf: leaf.scale(w), adapter, is_leaf=is_lora)


def truncate_tree(adapter, rank: int | None = None, energy: float | None = None):
  """``models.lora.truncate`` applied to every layer of an adapter tree."""
  return jax.tree.map(lambda leaf: truncate(leaf, rank=rank, energy=energy), adapter,
                      is_leaf=is_lora)


def _copy(model: nnx.Module) -> nnx.Module:
  """A new model object with new Variables that share the (immutable) arrays: no kernel is
  copied, and replacing a Variable in the copy leaves the original untouched."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, state, copy=True)


def _targets(model: nnx.Module, adapter) -> tuple[dict[str, Adapter], dict[str, Linear]]:
  """The adapter's leaves and the model's adaptable layers, checked to fit each other."""
  flat = to_flat(adapter)
  layers = adapted_layers(model)
  problems = [f"  {p}: not an adaptable Linear of {type(model).__name__}"
              for p in sorted(set(flat) - set(layers))]
  for path in sorted(set(flat) & set(layers)):
    leaf, layer = flat[path], layers[path]
    check_leaf(leaf, f"adapter leaf {path!r}")
    if leaf.shape != (layer.in_features, layer.out_features):
      problems.append(f"  {path}: adapter shape {leaf.shape} vs kernel "
                      f"{(layer.in_features, layer.out_features)}")
  if problems:
    near = ", ".join(sorted(layers)[:6]) + (" ..." if len(layers) > 6 else "")
    raise ValueError("adapter does not fit the model:\n" + "\n".join(problems)
                     + f"\n(the model's adaptable layers: {near})")
  return flat, layers


def with_adapter(model: nnx.Module, adapter) -> nnx.Module:
  """A model that carries ``adapter`` unmerged (and no other adapter).

  Returns a new model object; the base arrays are shared with ``model`` (nothing is
  copied) and ``model`` itself is not modified. Each layer runs x@W + (x@a)@b for any
  rank, so a rank-concatenated composition from `combine` runs as is.
  """
  new = _copy(model)
  flat, layers = _targets(new, adapter)
  for layer in layers.values():
    layer.set_adapter(None)
  for path, leaf in flat.items():
    layers[path].set_adapter(leaf)
  return new


def merge_into(model: nnx.Module, adapter) -> nnx.Module:
  """A model whose kernels are W + δW for every layer in ``adapter`` (in float32 or wider,
  cast back to the kernel dtype). Other layers, and any adapter ``model`` already carries,
  are kept and shared; ``model`` itself is not modified."""
  new = _copy(model)
  flat, layers = _targets(new, adapter)
  for path, leaf in flat.items():
    layers[path].add_to_kernel(leaf)
  return new


def adapter_of(model: nnx.Module) -> dict:
  """The exchange-form tree of the adapters ``model`` carries (empty dict when none).

  A per-sample mixture (``rpe_jax.compose.mixture.with_mixture``) has no one adapter:
  each input has its own, so it raises rather than return the ungated union."""
  layers = adapted_layers(model)
  gated = sorted(path for path, layer in layers.items() if layer.gate is not None)
  if gated:
    raise ValueError(f"adapter_of: the model carries a per-sample mixture (gated layers: "
                     f"{', '.join(gated[:3])}{' ...' if len(gated) > 3 else ''}); each input "
                     f"has its own adapter, combine(adapters, weights[b]) is input b's")
  return from_flat({path: layer.adapter for path, layer in layers.items()
                    if layer.adapter is not None})

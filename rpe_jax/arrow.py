"""Arrow prototypes: data-free adapter prototypes read from the weights.

Arrow (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of
LoRAs"; PEFT ``tuners/lora/arrow.py``) takes as an adapter's prototype in each adapted
layer the top singular direction of its update in the layer's *input* space, with no
training data at all. In rpe_jax's layout (kernels [in, out]) that is, per layer,

  ΔW = a b  (LoRA)  or  a diag(e) b  (SVD-LoRA),  a [in, r], b [r, out],
  v = the top LEFT singular vector of ΔW (∈ ℝ^in) = the top right singular vector of
      PEFT's ΔW = B A [out, in] (the transpose), unique up to sign.

From the factors, never the dense ΔW: a = Q_a R_a and bᵀ = Q_b R_b (reduced QR), so
ΔW = Q_a (R_a diag(e) R_bᵀ) Q_bᵀ; with the small core C = R_a diag(e) R_bᵀ = U S Vᵀ
(≤ r × r), ΔW = (Q_a U) S (Q_b V)ᵀ is an SVD, and v = Q_a U[:, 0], σ₁ = S₀. Cost O((in +
out) r² + r³) per layer (PEFT runs 15 power iterations on aᵀ(bᵀb)a instead: approximate,
and slow when σ₁ ≈ σ₂). The sign is fixed so that v's largest-magnitude entry is positive
(a canonical choice; every similarity below ignores the sign, as Arrow's does).

One prototype per adapter. PEFT's Arrow never merges layers: each adapted layer routes
each token x by Arrow's sign-agnostic score |⟨x, v_ℓ⟩| against that layer's own vectors.
rpe_jax composes ONE weighted adapter per target for all layers, so it needs one score per
(adapter, target). We keep the layers side by side — the prototype is the concatenation of
the L unit vectors in the exchange form's path order, each divided by √L (unit overall; a
mean over layers of unit vectors in different input spaces would mix unrelated bases) — and
compare layer by layer with Arrow's score, averaged over the layers:

  s_i = (1/L) Σ_ℓ |⟨x̂_ℓ, v_iℓ⟩|,    x̂_ℓ = x_ℓ / ‖x_ℓ‖ the target's vector at layer ℓ,

reported as the squared distance retrieval and ``sim`` use (``arrow_sqdist``):

  d_i² = (1/L) Σ_ℓ min_± ‖x̂_ℓ ∓ v_iℓ‖² = 2 − 2 s_i ∈ [0, 2].

Each layer weighs the same whatever its width and its σ₁ (Arrow's routing is per layer and
ignores σ₁ too). The target's x_ℓ (e.g. the mean input of layer ℓ over the target data, or
another adapter's prototype for adapter-to-adapter retrieval) is the caller's choice.

Example:
  >>> import numpy as np
  >>> from models.lora import LoRA
  >>> a = np.array([[1., 0.], [0., 1.], [0., 0.]]); b = np.array([[0., 2.], [1., 0.]])
  >>> v, s = top_input_direction(LoRA(a, b))
  >>> [round(float(x), 6) for x in v], round(float(s), 6)
  ([1.0, 0.0, 0.0], 2.0)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.lora import SVDLoRA, check_leaf, is_lora, to_flat


class ArrowPrototype(NamedTuple):
  """An adapter's Arrow prototype.

  Attributes:
    vector: [D] the layers' unit input directions, each divided by √L, concatenated in
      ``paths`` order (D = Σ_ℓ in_ℓ, ‖vector‖ = 1).
    paths: the L layer paths (exchange form, sorted).
    sizes: the L input widths in_ℓ (the segments of ``vector``).
    sigma: [L] the top singular value σ₁ of each layer's ΔW.
  """

  vector: jax.Array
  paths: tuple[str, ...]
  sizes: tuple[int, ...]
  sigma: jax.Array


def top_input_direction(leaf) -> tuple[jax.Array, jax.Array]:
  """(v, σ₁): the top singular direction of a leaf's ΔW in its input space, from the factors.

  v [..., in] is the top left singular vector of ΔW = a (diag e) b in the [in, out] layout
  (PEFT's top right singular vector), unit norm, largest-|·| entry positive; σ₁ [...] its
  singular value. Leading axes of stacked leaves are batched. Linear algebra in float32 or
  wider (bf16 factors are upcast); the result keeps that compute dtype.
  """
  a, b = jnp.asarray(leaf.a), jnp.asarray(leaf.b)  # canonical dtypes (float64 → 32 unless x64)
  dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
  a, b = a.astype(dtype), b.astype(dtype)
  qa, ra = jnp.linalg.qr(a)  # a = qa ra
  qb, rb = jnp.linalg.qr(jnp.swapaxes(b, -1, -2))  # bᵀ = qb rb
  del qb  # ΔW's output-space factor: not needed for the input direction
  if isinstance(leaf, SVDLoRA):
    ra = ra * jnp.asarray(leaf.e, dtype)[..., None, :]
  core = ra @ jnp.swapaxes(rb, -1, -2)  # [≤r, ≤r]
  u, s, _ = jnp.linalg.svd(core, full_matrices=False)
  v = jnp.einsum("...ir,...r->...i", qa, u[..., :, 0], precision=jax.lax.Precision.HIGHEST)
  big = jnp.take_along_axis(v, jnp.argmax(jnp.abs(v), -1)[..., None], -1)
  return v * jnp.where(big < 0, -1, 1).astype(dtype), s[..., 0]


def arrow_prototype(adapter) -> ArrowPrototype:
  """The Arrow prototype of an adapter (exchange-form dict or a single leaf); see the module.

  Raises ValueError for a malformed leaf or an empty adapter.
  """
  flat = {"": adapter} if is_lora(adapter) else to_flat(adapter)
  if not flat:
    raise ValueError("the adapter has no LoRA / SVDLoRA layers: no Arrow prototype")
  paths = tuple(sorted(flat))
  vectors, sigmas = [], []
  for path in paths:
    check_leaf(flat[path], where=f"adapter layer {path!r}")
    v, s = top_input_direction(flat[path])
    vectors.append(v)
    sigmas.append(s)
  L = len(paths)
  dtype = jnp.result_type(*vectors)
  vector = jnp.concatenate([v.astype(dtype) for v in vectors]) / np.sqrt(L)
  return ArrowPrototype(vector, paths, tuple(int(v.shape[-1]) for v in vectors), jnp.stack(sigmas))


def arrow_sqdist(prototypes, targets, sizes) -> jax.Array:
  """d² = 2 − (2/L) Σ_ℓ |⟨x̂_ℓ, v_iℓ⟩|, the sign-agnostic layer-wise distance of the module.

  Args:
    prototypes: [N, D] Arrow prototype vectors (``ArrowPrototype.vector`` stacked; any
      per-layer scale is removed, so unnormalised per-layer vectors work too).
    targets: [..., D] the target's per-layer vectors x_ℓ, concatenated in the same layout.
    sizes: the L segment widths (``ArrowPrototype.sizes``).

  Returns:
    [..., N] squared distances in [0, 2] (hand them to ``weighting.compute_weights`` as
    ``sqdist`` and to retrieval's top-k). A zero target segment counts as cosine 0.
  """
  prototypes, targets = jnp.asarray(prototypes), jnp.asarray(targets)
  sizes = tuple(int(n) for n in sizes)
  D = sum(sizes)
  if not sizes or min(sizes) < 1:
    raise ValueError(f"sizes must be positive layer widths, got {sizes}")
  if prototypes.ndim != 2 or prototypes.shape[-1] != D or targets.shape[-1:] != (D,):
    raise ValueError(f"prototypes must be [N, {D}] and targets [..., {D}] (D = sum of sizes), "
                     f"got {prototypes.shape} and {targets.shape}")
  bounds = np.cumsum((0,) + sizes)

  def unit(x):
    n = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.where(n > 0, n, 1)

  score = 0
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    p, t = unit(prototypes[:, lo:hi]), unit(targets[..., lo:hi])
    score = score + jnp.abs(jnp.einsum("...d,nd->...n", t, p, precision=jax.lax.Precision.HIGHEST))
  return 2 - 2 * score / len(sizes)

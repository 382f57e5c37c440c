"""Layers the ports share where kernels and precision matter: the fused attention kernel
and its selection, a float32 layer norm, and the exact GELU.

Attention, per head, with an optional additive bias B and a boolean mask M::

  out = softmax(s · q kᵀ + B, masked where ¬M) v          s = 1/√d unless given

with the logits and the softmax in float32 whatever the activation dtype. Each port keeps
its own written-out matmul + softmax as the reference and selects the kernel by its
config's ``attention_impl``:

* ``"reference"``: the port's written-out attention (the HF parity oracle's twin);
* ``"fused"``: ``fused_attention`` = ``jax.nn.dot_product_attention``: cuDNN flash attention
  on a GPU when the inputs are bf16/fp16 and cuDNN accepts them, XLA's kernel elsewhere;
* ``"auto"`` (the configs' default): ``"fused"`` on an accelerator, ``"reference"`` on CPU,
  decided when the function is traced (``jax.default_backend()``); on XLA:CPU the written-out
  form measured as fast or faster (docs/accelerators.md).

Layout of ``fused_attention``: q [B, T, N, H], k and v [B, S, K, H] with N a multiple of K
(grouped-query attention: query head n reads key/value head n // (N / K)); bias and mask
broadcast to [B, N, T, S].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

ATTENTION_IMPLS = ("auto", "fused", "reference")


def check_attention_impl(impl: str) -> str:
  """``impl`` if it is one of ``ATTENTION_IMPLS``, else a ValueError naming it."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
  return impl


def resolve_attention_impl(impl: str) -> str:
  """``"auto"`` → ``"fused"`` on GPU/TPU, ``"reference"`` on CPU; other values unchanged."""
  check_attention_impl(impl)
  if impl == "auto":
    return "reference" if jax.default_backend() == "cpu" else "fused"
  return impl


def _cudnn_ok(q) -> bool:
  # cuDNN's flash attention takes fp16/bf16 only; anything else goes to XLA.
  return jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)


def fused_attention(q, k, v, *, bias=None, mask=None, scale=None, is_causal=False):
  """``jax.nn.dot_product_attention``: cuDNN on GPU for half-precision inputs (falling back
  to XLA when cuDNN refuses the shapes at trace time), XLA otherwise."""
  dtype = q.dtype
  k, v = k.astype(dtype), v.astype(dtype)
  if bias is not None:
    bias = bias.astype(jnp.float32 if dtype == jnp.float32 else dtype)
  kw = dict(bias=bias, mask=mask, scale=scale, is_causal=is_causal)
  if _cudnn_ok(q):
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kw)
    except Exception:  # noqa: BLE001  (unsupported shape/version: the XLA kernel is exact too)
      pass
  return jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)


def gelu_exact(x: jax.Array) -> jax.Array:
  """The exact (erf) GELU, ``x · Φ(x) = ½ x (1 + erf(x / √2))``: HF's ``"gelu"``.

  Written with ``erf`` as PyTorch does, not as ``jax.nn.gelu(approximate=False)``, whose
  ``erfc`` form lowers to a piecewise rational approximation with selects: on XLA:CPU that
  one is ~7× slower forward and ~2.5× slower backward (an [1576, 3072] float32 activation,
  ViT-B/16 at batch 8: 21 → 2.8 ms and 23 → 9.3 ms on one core) for the same function to
  float32 rounding (largest difference 4.8e-7 on N(0, 1) inputs).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class LayerNorm(nnx.LayerNorm):
  """``nnx.LayerNorm`` computed in float32 (statistics and the affine map), cast back to the
  input's dtype: what torch's LayerNorm does for bf16 inputs, and params may be bf16."""

  def __init__(self, num_features: int, *, epsilon: float, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    # Two-pass variance, as torch computes it (the fast E[x²]−E[x]² form loses digits).
    super().__init__(num_features, epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype,
                     use_fast_variance=False, rngs=rngs)

  def __call__(self, x, *args, **kwargs):
    return super().__call__(x, *args, **kwargs).astype(x.dtype)


def set_attention_impl(model: nnx.Module, impl: str) -> nnx.Module:
  """Switch every attention layer of ``model`` (in place) to ``impl``; returns ``model``.

  Each attention module keeps its kernel in a static ``attention_impl`` attribute and each
  config that records it (a frozen dataclass with an ``attention_impl`` field) is replaced,
  so a model loaded with ``models.hf.load`` can be switched without reloading.
  """
  check_attention_impl(impl)
  for _, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Module):
      continue
    if hasattr(node, "attention_impl"):
      node.attention_impl = impl
    for name in ("config", "cfg"):
      cfg = getattr(node, name, None)
      if dataclasses.is_dataclass(cfg) and any(
          f.name == "attention_impl" for f in dataclasses.fields(cfg)):
        setattr(node, name, dataclasses.replace(cfg, attention_impl=impl))
  return model

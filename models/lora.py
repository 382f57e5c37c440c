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
from typing import Union

import jax
import jax.numpy as jnp
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
    return SVDLoRA(self.a, (w * self.e).astype(self.e.dtype), self.b)


Adapter = Union[LoRA, SVDLoRA]


def is_lora(x) -> bool:
  """``is_leaf`` predicate: True for LoRA and SVDLoRA leaves."""
  return isinstance(x, (LoRA, SVDLoRA))


class LoRAParam(nnx.Param):
  """Trainable adapter factors; the base weights are plain ``nnx.Param``.

  A distinct Variable type lets training select adapters with ``nnx.state(model, LoRAParam)``
  and freeze everything else.
  """


class Linear(nnx.Module):
  """A linear layer y = x @ W + bias that can carry an adapter leaf unmerged.

  With an adapter the forward pass is x @ W + bias + (x @ a) @ b (SVD-LoRA: ((x @ a) · e) @ b),
  for any rank, so a rank-concatenated composition runs without forming δW.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               dtype=jnp.float32, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.in_features = in_features
    self.out_features = out_features
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))
    self.bias = nnx.data(nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None)
    # Adapter slots are data attributes even while empty, so one can be installed later.
    self.lora_a = nnx.data(None)
    self.lora_e = nnx.data(None)
    self.lora_b = nnx.data(None)

  @property
  def adapter(self) -> Adapter | None:
    """The adapter leaf this layer carries, or None."""
    if self.lora_a is None:
      return None
    if self.lora_e is None:
      return LoRA(self.lora_a[...], self.lora_b[...])
    return SVDLoRA(self.lora_a[...], self.lora_e[...], self.lora_b[...])

  def set_adapter(self, adapter: Adapter | None) -> None:
    """Install (or with None remove) an adapter leaf, checking its shape against the kernel."""
    if adapter is None:
      self.lora_a = self.lora_e = self.lora_b = None
      return
    if not is_lora(adapter):
      raise TypeError(f"expected a LoRA or SVDLoRA leaf, got {type(adapter).__name__}")
    if adapter.shape != (self.in_features, self.out_features):
      raise ValueError(
          f"adapter shape {adapter.shape} does not match the layer's kernel "
          f"({self.in_features}, {self.out_features})")
    self.lora_a = LoRAParam(adapter.a)
    self.lora_b = LoRAParam(adapter.b)
    self.lora_e = LoRAParam(adapter.e) if isinstance(adapter, SVDLoRA) else None

  def merge(self) -> None:
    """Fold the adapter into the kernel (W ← W + δW, computed in float32) and drop it."""
    adapter = self.adapter
    if adapter is None:
      return
    kernel = self.kernel[...]
    delta = jax.tree.map(lambda t: t.astype(jnp.promote_types(t.dtype, jnp.float32)),
                         adapter).delta()
    self.kernel = nnx.Param((kernel.astype(delta.dtype) + delta).astype(kernel.dtype))
    self.set_adapter(None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x @ self.kernel[...]
    if self.bias is not None:
      y = y + self.bias[...]
    if self.lora_a is not None:
      h = x @ self.lora_a[...]
      if self.lora_e is not None:
        h = h * self.lora_e[...]
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

"""Tiny models, random adapters and sharding assertions shared by tests/test_sharding.py and
tests/test_sharded_ops.py (helpers only: the oracles are dense float64 numpy, hand-written
partition specs and single-device results)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from models.llama import LlamaConfig
from models.lora import LoRA, SVDLoRA, adapted_layers, from_flat
from models.vit import ViTConfig

TOL = 1e-6
WEIGHTS = jnp.asarray([0.6, -0.3, 0.5, 0.2], jnp.float32)

VIT = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, image_size=8, patch_size=4, num_channels=3,
                labels=("a", "b", "c"))
LLAMA = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
VIT_TARGETS = ("query", "value", "output", "fc1", "fc2")
LLAMA_TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def np64(x):
  return np.asarray(x, np.float64)


def assert_shardings(tree, wanted):
  """Every array of ``tree`` sits exactly as the NamedSharding tree ``wanted`` says."""
  got = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, tree))
  want = jax.tree.leaves(wanted)
  assert len(got) == len(want) > 0
  for x, (g, w) in zip(jax.tree.leaves(tree), zip(got, want)):
    assert isinstance(g, NamedSharding) and g.mesh == w.mesh, (g, w)
    assert g.is_equivalent_to(w, x.ndim), (g.spec, w.spec)


def assert_close(x, y, tol=TOL):
  x, y = np64(x), np64(y)
  np.testing.assert_allclose(x, y, rtol=tol, atol=tol * max(1.0, np.abs(y).max()))


def random_adapter(model, targets, rank, seed, kind="lora", scale=0.1):
  """A random exchange-form adapter on the layers of ``model`` whose path ends in a target."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, layer in adapted_layers(model).items():
    if path.rsplit(".", 1)[-1] not in targets:
      continue
    a = jnp.asarray(scale * rng.normal(size=(layer.in_features, rank)), jnp.float32)
    b = jnp.asarray(scale * rng.normal(size=(rank, layer.out_features)), jnp.float32)
    if kind == "svd":
      flat[path] = SVDLoRA(a, jnp.asarray(rng.uniform(0.5, 2.0, rank), jnp.float32), b)
    else:
      flat[path] = LoRA(a, b)
  return from_flat(flat)


def library(model, targets, ranks, kinds=None, seed=0):
  """len(ranks) random adapters for ``model`` (kinds: "lora" / "svd" per adapter)."""
  kinds = kinds or ["lora"] * len(ranks)
  return [random_adapter(model, targets, r, seed + i, kind)
          for i, (r, kind) in enumerate(zip(ranks, kinds))]

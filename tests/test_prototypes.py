"""Task prototypes: streamed, masked, one compile, float64 accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.vit import ViTConfig, ViTForImageClassification
from rpe_jax import prototypes
from models.preprocessing import Normalization
from rpe_jax.tasks.images import ImageDataset


def _dataset(n=37, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
  return ImageDataset(images, rng.integers(0, 3, n), 3, "rand", ("a", "b", "c"))


W = np.random.default_rng(1).normal(size=(64, 5)).astype(np.float32)


def _numpy_features(images):
  x = images.reshape(len(images), -1).astype(np.float64) / 255.0
  return np.tanh(x @ W.astype(np.float64) - 3.0) * 10.0 + 100.0   # a large common offset


def test_prototype_equals_numpy_mean_with_one_compile():
  ds = _dataset(37)
  traces = []

  def features(x):
    traces.append(x.shape)
    return jnp.tanh(x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0 @ W - 3.0) * 10.0 + 100.0

  z, n = prototypes.prototype(None, ds, features_fn=features, batch_size=8)   # 5 batches
  assert n == 37 and z.dtype == np.float32 and z.shape == (5,)
  np.testing.assert_allclose(z, _numpy_features(ds.images).mean(0), rtol=1e-6)
  assert traces == [(8, 8, 8, 1)]   # one trace, one compile, for 4 full batches + a ragged tail


def test_prototype_does_not_depend_on_batch_size():
  ds = _dataset(50, seed=2)
  fn = lambda x: jnp.sin(x.reshape(x.shape[0], -1)[:, :7].astype(jnp.float32))
  want = np.sin(ds.images.reshape(50, -1)[:, :7].astype(np.float64)).mean(0)
  for b in (1, 7, 16, 50, 128):
    s, n = prototypes.feature_sum(None, ds, features_fn=fn, batch_size=b)
    assert n == 50
    np.testing.assert_allclose(s / n, want, atol=1e-6)


def _tiny_vit():
  config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, image_size=16, patch_size=4, num_channels=1,
                     labels=("a", "b", "c"))
  return ViTForImageClassification(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_vit_prototype_matches_all_features_at_once(pooling):
  model = _tiny_vit()
  ds = _dataset(21, seed=3)
  norm = Normalization.for_model(model)
  before = prototypes._model_features._cache_size()
  z, n = prototypes.prototype(model, ds, pooling, batch_size=8)
  assert prototypes._model_features._cache_size() == before + 1   # one compile for 3 batches
  # Oracle: features of every image in one un-batched call, averaged in float64 by numpy.
  # Normalization resizes 8x8 → 16x16 and maps [0, 255] → [-1, 1].
  feats = np.asarray(model.features(norm(ds.images), pooling), np.float64)
  assert n == 21
  np.testing.assert_allclose(z, feats.mean(0), atol=1e-6)


def test_errors():
  ds = _dataset(4)
  fn = lambda x: x.reshape(x.shape[0], -1).astype(jnp.float32)
  with pytest.raises(ValueError, match="exactly one of model and features_fn"):
    prototypes.prototype(None, ds)
  with pytest.raises(ValueError, match="is empty"):
    prototypes.prototype(None, ds.subset(slice(0, 0)), features_fn=fn)
  with pytest.raises(ValueError, match="not finite"):
    prototypes.prototype(None, ds, features_fn=lambda x: fn(x) * jnp.nan)
  with pytest.raises(ValueError, match="features must be \\[batch, d\\]"):
    prototypes.prototype(None, ds, features_fn=lambda x: fn(x)[0])
  # A bare image array works too.
  z, n = prototypes.prototype(None, ds.images, features_fn=fn, batch_size=3)
  np.testing.assert_allclose(z, ds.images.reshape(4, -1).mean(0), atol=1e-4)

"""Task prototypes: the mean pooled encoder feature of a dataset.

    z = (1/n) Σ_{x ∈ D} E(x, θ)            E = the model's pooled encoder features

streamed over the dataset in fixed-size batches. The last, ragged batch is padded to the
same shape and its padding rows are masked out of the sum, so the feature function is traced
and compiled once. Per-batch features come back as float32 and are summed on the host in
float64, so the result does not depend on the batch size beyond float32 feature rounding.

The prototype of an adapter's training set is computed with the *frozen base* model θ0
(pass the model without adapters); this module uses whatever model it is given.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.preprocessing import Normalization
from rpe_jax.batching import Arrays, batches


class Prototype(NamedTuple):
  """z float32 [d], the mean feature; n, the number of examples it averages."""

  z: np.ndarray
  n: int


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling", "normalization"))
def _model_features(graphdef, state, images, *, pooling, normalization):
  model = nnx.merge(graphdef, state)
  x = normalization(images) if normalization is not None else images.astype(jnp.float32)
  return model.features(x, pooling).astype(jnp.float32)


def _images(dataset):
  if hasattr(dataset, "images") and hasattr(dataset, "labels"):
    return dataset
  images = np.asarray(dataset)
  if images.ndim != 4:
    raise ValueError(f"dataset must be an ImageDataset or images [N, H, W, C], got shape "
                     f"{images.shape}")
  return Arrays(images, np.zeros(len(images), np.int32))


def _feature_batches(model, dataset, pooling, *, batch_size, features_fn, normalization,
                     progress, what):
  """Yield (features [batch, d] float32 numpy, real-row mask) per fixed-size batch."""
  ds = _images(dataset)
  if len(ds) == 0:
    raise ValueError(f"dataset {ds.name!r} is empty: a {what} needs at least one example")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if (model is None) == (features_fn is None):
    raise ValueError("pass exactly one of model and features_fn")
  if features_fn is not None:
    jitted = jax.jit(lambda x: features_fn(normalization(x) if normalization else x))
    compute = lambda images: jitted(images)
  else:
    if normalization is None:
      normalization = Normalization.for_model(model)
    graphdef, state = nnx.split(model)
    compute = lambda images: _model_features(graphdef, state, images, pooling=pooling,
                                             normalization=normalization)
  # Never more padding than needed: a small dataset runs as one batch of its own size.
  batch_size = min(batch_size, len(ds))
  it = batches(ds, batch_size, tail="pad", prefetch=2)
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(it, total=-(-len(ds) // batch_size), desc=f"{what} {ds.name}", unit="batch")
  for batch in it:
    feats = np.asarray(compute(batch.images))
    if feats.ndim != 2 or feats.shape[0] != batch_size:
      raise ValueError(f"features must be [batch, d] = [{batch_size}, d], got {feats.shape}")
    if not np.all(np.isfinite(feats[batch.mask])):
      raise ValueError(f"features of dataset {ds.name!r} are not finite (NaN or Inf)")
    yield feats, np.asarray(batch.mask)


def feature_sum(model: nnx.Module | None, dataset, pooling: str = "cls", *,
                batch_size: int = 64, features_fn: Callable | None = None,
                normalization: Normalization | None = None,
                progress: bool = False) -> tuple[np.ndarray, int]:
  """(Σ_x E(x) in float64 [d], n): the streamed sum that ``prototype`` divides by n.

  Sums of disjoint shards add, so a prototype of a dataset too large for one pass is
  Σ sums / Σ n. See ``prototype`` for the arguments.
  """
  total, n = None, 0
  for feats, mask in _feature_batches(model, dataset, pooling, batch_size=batch_size,
                                      features_fn=features_fn, normalization=normalization,
                                      progress=progress, what="prototype"):
    part = feats[mask].astype(np.float64).sum(axis=0)
    total = part if total is None else total + part
    n += int(mask.sum())
  return total, n


def features(model: nnx.Module | None, dataset, pooling: str = "cls", *,
             batch_size: int = 64, features_fn: Callable | None = None,
             normalization: Normalization | None = None,
             progress: bool = False) -> np.ndarray:
  """The pooled feature of every example, float32 [N, d] in dataset order: each input's
  own prototype for per-sample composition (``prototype`` is their mean). Arguments as
  ``prototype``'s."""
  return np.concatenate([feats[mask] for feats, mask in _feature_batches(
      model, dataset, pooling, batch_size=batch_size, features_fn=features_fn,
      normalization=normalization, progress=progress, what="features")]).astype(np.float32)


def prototype(model: nnx.Module | None, dataset, pooling: str = "cls", *,
              batch_size: int = 64, features_fn: Callable | None = None,
              normalization: Normalization | None = None,
              progress: bool = False) -> Prototype:
  """The task prototype z = mean of pooled features over ``dataset`` (and its size n).

  Args:
    model: an NNX model with ``features(pixel_values, pooling)`` (e.g. the ViT), or None
      when ``features_fn`` is given.
    dataset: an ``ImageDataset`` or an array of images [N, H, W, C].
    pooling: passed to ``model.features`` ("cls" or "mean" for the ViT).
    batch_size: rows per jit call; the ragged tail is padded and masked (one compile).
    features_fn: instead of a model, any function images [B, H, W, C] → features [B, d].
    normalization: preprocessing applied inside the compiled call; with a model it
      defaults to ``Normalization.for_model(model)`` (resize + mean/std 0.5), with a
      ``features_fn`` to none.
  Returns:
    ``Prototype(z, n)``, z float32 [d] (accumulated in float64).
  """
  total, n = feature_sum(model, dataset, pooling, batch_size=batch_size,
                         features_fn=features_fn, normalization=normalization,
                         progress=progress)
  return Prototype((total / n).astype(np.float32), n)

"""Image preprocessing of a model: HF image-processor normalisation as one jit-able function."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Normalization:
  """HF image-processor preprocessing as one jit-able function of a batch of images.

  uint8 images are rescaled by ``rescale`` (1/255) — float images are taken as already in
  [0, 1] — resized (bilinear) to ``image_size``, given ``num_channels`` (gray is repeated to
  RGB), then normalised (x − mean) / std. ViT's default mean = std = 0.5 maps to [−1, 1].
  """

  image_size: int | tuple[int, int]
  num_channels: int = 3
  mean: tuple[float, ...] | None = None   # None: 0.5 per channel (HF ViT's default)
  std: tuple[float, ...] | None = None
  rescale: float = 1.0 / 255.0

  def __post_init__(self):
    size = self.image_size
    size = (size, size) if isinstance(size, (int, np.integer)) else tuple(int(t) for t in size)
    object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
    for name in ("mean", "std"):
      value = getattr(self, name)
      value = (0.5,) * self.num_channels if value is None else tuple(float(v) for v in value)
      object.__setattr__(self, name, value)
      if len(getattr(self, name)) != self.num_channels:
        raise ValueError(f"Normalization: {name} {getattr(self, name)} has "
                         f"{len(getattr(self, name))} entries for {self.num_channels} channels")
    if not all(s > 0 for s in self.std):
      raise ValueError(f"Normalization: std must be positive, got {self.std}")

  @classmethod
  def for_model(cls, model_or_config, mean=None, std=None) -> "Normalization":
    """From a model (or config) with ``image_size`` and ``num_channels``; ViT's defaults."""
    config = getattr(model_or_config, "config", model_or_config)
    c = int(getattr(config, "num_channels", 3))
    return cls(config.image_size, c, tuple(mean or (0.5,) * c), tuple(std or (0.5,) * c))

  @classmethod
  def from_hf(cls, folder: str, num_channels: int = 3) -> "Normalization":
    """From an HF ``preprocessor_config.json`` (image_mean, image_std, size, rescale_factor)."""
    path = os.path.join(folder, "preprocessor_config.json")
    try:
      with open(path) as f:
        cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: cannot read the image processor config ({e})") from e
    size = cfg.get("size", 224)
    if isinstance(size, dict):
      if "height" not in size or "width" not in size:
        raise ValueError(f"{path}: size {size} has no height/width (only fixed-size resizing "
                           "is supported)")
      size = (size["height"], size["width"])
    mean = tuple(cfg.get("image_mean", (0.5,) * num_channels)) if cfg.get("do_normalize", True) \
        else (0.0,) * num_channels
    std = tuple(cfg.get("image_std", (0.5,) * num_channels)) if cfg.get("do_normalize", True) \
        else (1.0,) * num_channels
    rescale = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0
    return cls(size, num_channels, mean, std, float(rescale))

  def __call__(self, images):
    x = jnp.asarray(images)
    if x.ndim != 4:
      raise ValueError(f"images must be [N, H, W, C], got shape {x.shape}")
    scale = self.rescale if x.dtype == jnp.uint8 else 1.0
    x = x.astype(jnp.float32) * scale
    c = x.shape[-1]
    if c != self.num_channels:
      if c != 1:
        raise ValueError(f"images have {c} channels; the model expects {self.num_channels}")
      x = jnp.repeat(x, self.num_channels, axis=-1)
    if tuple(x.shape[1:3]) != self.image_size:
      x = jax.image.resize(x, (x.shape[0], *self.image_size, x.shape[-1]), "bilinear")
    return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)

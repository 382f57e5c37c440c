"""Segmentation with SAM adapters: a built-in multi-site family, Dice + BCE adapter training,
DICE evaluation and prototypes from mean-pooled image embeddings.

The built-in family (``SITES``) mimics multi-site prostate MRI: every image holds one
organ-like target (a smooth star-shaped blob, random size, aspect, orientation and lobes,
with internal texture) inside a body outline, next to a dark round distractor ("bladder"),
over low-frequency tissue texture. Each site applies its own acquisition shift (resolution,
point spread, intensity response, coil bias field, inverted contrast, Rician noise,
positioning) to the images; the ground-truth masks move only with geometric shifts.

Training minimises, per batch of upsampled mask logits s and ground truth g ∈ {0, 1},

    L = BCE(s, g) + (1 − Dice),   Dice = (2 Σ σ(s)·g + ε) / (Σ σ(s) + Σ g + ε)

over the adapter factors only (``models.lora.LoRAParam``) with AdamW, or over all weights
(``trainable="all"``) to build the small frozen base. Prompts: ``"box"`` — the ground-truth
bounding box (jittered by a few pixels while training), or ``"none"`` — SAM's fixed default
prompt (no sparse prompt), which makes the model find the organ by itself.
Evaluation thresholds the logits at 0 and reports the mean per-image DICE.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.lora import LoRAParam, init_adapters
from models.sam import DECODER_TARGETS, ENCODER_TARGETS, SamConfig, SamModel
from models.sam_decoder import SamMaskDecoderConfig, SamPromptEncoderConfig
from models.sam_encoder import SamVisionConfig
from rpe_jax.tasks.contract import Task, Trained
from rpe_jax.tasks.seg_data import (  # noqa: F401  (re-exported: the task's data)
    SegDataset, SiteSplits, _anatomy, _require_masks, apply_site, check_dataset, load_site)
from rpe_jax.tasks.sites import SITES  # noqa: F401  (re-exported)
from rpe_jax.training import OptimConfig, fit

PROMPTS = ("box", "none")

# The data (the dataset type and the built-in family) lives in ``rpe_jax.tasks.seg_data``.


def base_config(size: int = 32) -> SamConfig:
  """The tiny SAM used with the built-in family: patch 4, 2 layers (windowed then global),
  width 32; its low-resolution masks (4 × the 8×8 grid) have the image's resolution."""
  if size % 16:
    raise ValueError(f"size must be a multiple of 16, got {size}")
  grid = size // 4
  return SamConfig(
      SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2,
                      num_attention_heads=2, num_channels=3, image_size=size, patch_size=4,
                      mlp_dim=64, window_size=grid // 2, global_attn_indexes=(1,),
                      num_pos_feats=16),
      SamPromptEncoderConfig(hidden_size=32, image_size=size, patch_size=4,
                             mask_input_channels=8),
      SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=2,
                           num_attention_heads=2, iou_head_hidden_dim=32))


# --- the model on images ------------------------------------------------------------------------

def model_input(model: SamModel, images: jax.Array) -> jax.Array:
  """Grey images [B, H, W, 1] in [0, 1] → the model's pixels: channels tiled to what the
  encoder takes, centred and scaled to about unit range."""
  c = model.config.vision.num_channels
  if images.shape[-1] not in (1, c):
    raise ValueError(f"images have {images.shape[-1]} channels; the model takes {c} (or 1)")
  x = jnp.broadcast_to(images, images.shape[:-1] + (c,)) if images.shape[-1] == 1 else images
  return (x - 0.5) / 0.25


def boxes_from_masks(masks: np.ndarray, jitter: float = 0.0, rng=None) -> np.ndarray:
  """Ground-truth boxes [N, 1, 4] (x1, y1, x2, y2) in pixels, optionally each side moved by
  up to ``jitter`` pixels. An empty mask gets the whole image."""
  masks = np.asarray(masks, bool)
  n, h, w = masks.shape
  boxes = np.tile(np.array([0, 0, w - 1, h - 1], np.float32), (n, 1))
  for i in range(n):
    ys, xs = np.nonzero(masks[i])
    if len(ys):
      boxes[i] = (xs.min(), ys.min(), xs.max(), ys.max())
  if jitter:
    boxes = boxes + (rng or np.random.default_rng(0)).uniform(-jitter, jitter, boxes.shape)
    boxes = np.clip(boxes, 0, [w - 1, h - 1, w - 1, h - 1])
  return boxes[:, None, :].astype(np.float32)


def mask_logits(model: SamModel, images: jax.Array, boxes: jax.Array | None) -> jax.Array:
  """Single-mask logits [B, H, W] at the images' resolution (bilinear from SAM's 4h × 4w)."""
  out = model(model_input(model, images), boxes=boxes, multimask_output=False)
  logits = out.pred_masks[:, 0, 0]
  h, w = images.shape[1:3]
  if logits.shape[1:] != (h, w):
    logits = jax.image.resize(logits, (logits.shape[0], h, w), "bilinear")
  return logits


def dice_bce_loss(logits: jax.Array, masks: jax.Array, eps: float = 1.0) -> jax.Array:
  """BCE(s, g) + 1 − soft Dice, both averaged over the batch (see the module docstring)."""
  g = masks.astype(logits.dtype)
  bce = optax.sigmoid_binary_cross_entropy(logits, g).mean()
  p = jax.nn.sigmoid(logits)
  axes = tuple(range(1, logits.ndim))
  dice = (2 * (p * g).sum(axes) + eps) / (p.sum(axes) + g.sum(axes) + eps)
  return bce + 1 - dice.mean()


def dice_scores(pred: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Per-image DICE 2|P∩G| / (|P| + |G|) of binary predictions (1 when both are empty)."""
  pred, masks = np.asarray(pred, bool), np.asarray(masks, bool)
  inter = (pred & masks).sum(axis=(1, 2))
  total = pred.sum(axis=(1, 2)) + masks.sum(axis=(1, 2))
  return np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))


@functools.partial(jax.jit, static_argnames=("graphdef", "use_boxes"))
def _predict(graphdef, state, images, boxes, *, use_boxes):
  model = nnx.merge(graphdef, state)
  return mask_logits(model, images, boxes if use_boxes else None) > 0


def _check_prompt(prompt: str) -> str:
  if prompt not in PROMPTS:
    raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
  return prompt


def _padded(x: np.ndarray, rows: int) -> np.ndarray:
  return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)]) if len(x) < rows else x


def predict(model: SamModel, ds: SegDataset, *, prompt: str = "box",
            batch_size: int = 64, progress: bool = False, mesh=None) -> np.ndarray:
  """Binary masks [N, H, W] (logit > 0), in fixed-size batches (one compile); with a
  ``mesh`` each batch is split over its ``data`` axis."""
  from rpe_jax.tasks.contract import TaskModel
  where = TaskModel(model, mesh=mesh)
  ds = check_dataset(ds)
  _check_prompt(prompt)
  if prompt == "box":
    _require_masks(ds, "prompt 'box' derives boxes from masks", " — use prompt 'none'")
  graphdef, state = nnx.split(model)
  # Without box prompts the boxes are never read: zeros keep the compiled shapes the same.
  boxes = (boxes_from_masks(ds.masks) if prompt == "box"
           else np.zeros((len(ds.images), 1, 4), np.float32))
  bs = where.batch_size(batch_size, len(ds.images))
  out = []
  starts = range(0, len(ds.images), bs)
  if progress:
    from tqdm.auto import tqdm
    starts = tqdm(starts, desc=f"predict {ds.name}", unit="batch")
  for s in starts:
    imgs, bx = _padded(ds.images[s:s + bs], bs), _padded(boxes[s:s + bs], bs)
    pred = _predict(graphdef, state, where.place(imgs), where.place(bx),
                    use_boxes=prompt == "box")
    out.append(np.asarray(pred)[:min(bs, len(ds.images) - s)])
  return np.concatenate(out)


def evaluate_dice(model: SamModel, ds: SegDataset, *, prompt: str = "box",
                  batch_size: int = 64) -> float:
  """Mean per-image DICE of ``model`` on ``ds``."""
  ds = check_dataset(ds)
  _require_masks(ds, "DICE compares predictions with ground-truth masks")
  return float(dice_scores(predict(model, ds, prompt=prompt, batch_size=batch_size),
                           ds.masks).mean())


def normalization(model: SamModel):
  """``model_input`` as a ``models.preprocessing.Normalization`` (gray tiled, (x − 0.5) / 0.25)."""
  from models.preprocessing import Normalization
  v = model.config.vision
  return Normalization(v.image_size, v.num_channels, (0.5,) * v.num_channels,
                       (0.25,) * v.num_channels)


def prototype(model: SamModel, ds: SegDataset, *, batch_size: int = 64) -> np.ndarray:
  """The task prototype z = mean over the images of the mean-pooled image embedding [C]
  (``rpe_jax.prototypes``, computed with whatever ``model`` is given: pass the frozen base)."""
  from rpe_jax.prototypes import prototype as mean_features
  ds = check_dataset(ds)
  return mean_features(model, ds.images, "mean", batch_size=batch_size,
                       normalization=normalization(model)).z


# --- training -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SegTrainConfig:
  """Hyper-parameters of one segmentation training run."""

  steps: int = 300
  batch_size: int = 16
  lr: float = 3e-3
  weight_decay: float = 1e-4
  rank: int = 4
  kind: str = "lora"
  targets: tuple[str, ...] = ENCODER_TARGETS + DECODER_TARGETS
  prompt: str = "box"
  box_jitter: float = 2.0      # pixels, training only
  seed: int = 0

  def __post_init__(self):
    _check_prompt(self.prompt)
    if self.steps < 1 or self.batch_size < 1:
      raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
    if not self.lr > 0:
      raise ValueError(f"lr must be > 0, got {self.lr}")


class SegTrainResult(NamedTuple):
  model: SamModel
  losses: np.ndarray      # per step


def _copy(model: nnx.Module) -> nnx.Module:
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, state, copy=True)


@dataclasses.dataclass(frozen=True)
class SegLoss:
  """Dice + BCE of the predicted mask logits on a batch {images, masks, boxes}."""

  use_boxes: bool

  def __call__(self, model, batch):
    logits = mask_logits(model, batch["images"], batch["boxes"] if self.use_boxes else None)
    return dice_bce_loss(logits, batch["masks"]), {}


def _sampler(ds: SegDataset, config: SegTrainConfig):
  """``config.steps`` batches: a seeded permutation, re-drawn when it runs out; training
  boxes are jittered by the same generator."""
  rng = np.random.default_rng(config.seed)
  n, bs = len(ds.images), min(config.batch_size, len(ds.images))
  order, pos = rng.permutation(n), 0
  for _ in range(config.steps):
    if pos + bs > n:
      order, pos = rng.permutation(n), 0
    idx = order[pos:pos + bs]
    pos += bs
    boxes = boxes_from_masks(ds.masks[idx], config.box_jitter, rng)
    yield {"images": ds.images[idx], "masks": ds.masks[idx], "boxes": boxes}


def train(model: SamModel, ds: SegDataset, config: SegTrainConfig = SegTrainConfig(), *,
          trainable: str = "adapter") -> SegTrainResult:
  """Train on ``ds`` with Dice + BCE (``rpe_jax.training``: AdamW, cosine decay, clipping at
  1); returns a new model (``model`` is not modified).

  ``trainable="adapter"``: fresh adapters on ``config.targets`` (zero-initialised b, so the
  start is the frozen model) and only their factors train. ``"all"``: every weight trains
  (used to build the small frozen base of the built-in family).
  """
  ds = check_dataset(ds)
  _require_masks(ds, "training fits ground-truth masks")
  if trainable not in ("adapter", "all"):
    raise ValueError(f"trainable must be 'adapter' or 'all', got {trainable!r}")
  model = _copy(model)
  if trainable == "adapter":
    init_adapters(model, config.targets, config.rank, kind=config.kind,
                  rngs=nnx.Rngs(config.seed))
  optim = OptimConfig(lr=config.lr, weight_decay=config.weight_decay, clip_norm=1.0,
                      schedule="cosine")
  result = fit(model, LoRAParam if trainable == "adapter" else nnx.Param,
               SegLoss(config.prompt == "box"), lambda epoch: _sampler(ds, config),
               epochs=1, steps_per_epoch=config.steps, config=optim)
  if not np.all(np.isfinite(result.losses)):
    raise FloatingPointError(f"training on {ds.name!r} diverged (non-finite loss)")
  return SegTrainResult(result.model, result.losses)


def pretrain_base(sites=("clean",), *, size: int = 32, steps: int = 400, prompt: str = "box",
                  n_train: int = 96, seed: int = 0) -> SamModel:
  """The small frozen base of the built-in family: a tiny SAM trained in full on ``sites``
  (stand-in for a pretrained SAM, which cannot be downloaded here)."""
  parts = [load_site(s, size=size, n_train=n_train, seed=seed).train for s in sites]
  ds = SegDataset(np.concatenate([p.images for p in parts]),
                  np.concatenate([p.masks for p in parts]), "+".join(sites))
  model = SamModel(base_config(size), rngs=nnx.Rngs(seed))
  config = SegTrainConfig(steps=steps, lr=2e-3, prompt=prompt, seed=seed)
  return train(model, ds, config, trainable="all").model


# --- the task contract ------------------------------------------------------------------------

class SegmentationTask(Task):
  """SAM segmentation behind ``rpe_jax.tasks.contract.Task``: data by
  ``rpe_jax.tasks.seg_data`` URIs, mean-pooled image embeddings, binary masks, mean DICE.

  Prompts: ``"box"`` (default) derives each image's box from its ground-truth mask, the
  usual SAM evaluation protocol, so it needs masks; ``"none"`` uses no prompt at all."""

  name = "segmentation"
  metric = "dice"
  pooling = "mean"
  EPOCHS, LR, BATCH_SIZE = 20, 3e-3, 16

  def load(self, uri, split="test", *, data_root=None, seed=0) -> SegDataset:
    from rpe_jax.tasks import seg_data
    return seg_data.load(uri, split, data_root=data_root, seed=seed)

  def labeled(self, ds) -> bool:
    return ds.masks is not None

  def size(self, ds) -> int:
    return len(ds.images)

  def features(self, tm, ds, *, pooling=None, progress=False) -> np.ndarray:
    from rpe_jax.prototypes import features
    ds = check_dataset(ds)
    return features(tm.model, ds.images, pooling or self.pooling,
                    normalization=normalization(tm.model), progress=progress)

  def subset(self, ds, index) -> SegDataset:
    index = np.asarray(index)
    return SegDataset(ds.images[index], None if ds.masks is None else ds.masks[index], ds.name)

  def prototype(self, tm, ds, *, pooling=None, progress=False):
    from rpe_jax.prototypes import prototype as mean_features
    ds = check_dataset(ds)
    return mean_features(tm.model, ds.images, pooling or self.pooling,
                         normalization=normalization(tm.model), progress=progress)

  def train(self, tm, uri, options, *, data_root=None, progress=False):
    from rpe_jax.tasks import seg_data
    from rpe_jax.compose import adapter_of
    if options.checkpoint_dir or options.resume:
      raise ValueError("--checkpoint-dir / --resume: only classification training keeps "
                       "checkpoints")
    splits = seg_data.load_splits(uri, data_root=data_root, seed=options.seed)
    if splits.train.masks is None:
      raise ValueError(f"--data {uri}: training needs masks (give a masks folder)")
    n = len(splits.train.images)
    batch_size = min(options.batch_size or self.BATCH_SIZE, n)
    epochs = options.epochs or self.EPOCHS
    config = SegTrainConfig(steps=epochs * -(-n // batch_size), batch_size=batch_size,
                            lr=options.lr or self.LR, rank=options.rank, kind=options.kind,
                            targets=options.targets or SegTrainConfig.targets,
                            prompt=options.prompt, seed=options.seed)
    before = evaluate_dice(tm.model, splits.val, prompt=options.prompt)
    result = train(tm.model, splits.train, config)
    return Trained(adapter_of(result.model), None, result.model, {
        "metric": self.metric, "initial_val": before,
        "val": evaluate_dice(result.model, splits.val, prompt=options.prompt),
        "test": evaluate_dice(result.model, splits.test, prompt=options.prompt),
        "steps": config.steps, "n_train": n, "prompt": options.prompt,
        "final_loss": float(result.losses[-1])}, splits.train)

  def predict(self, tm, ds, *, progress=False, prompt="box", **options) -> np.ndarray:
    return predict(tm.model, ds, prompt=prompt, progress=progress, mesh=tm.mesh)

  def score(self, predictions, ds, **options) -> dict | None:
    if ds.masks is None:
      return None
    return {"dice": float(dice_scores(predictions, ds.masks).mean())}

  def write_predictions(self, predictions, ds, folder) -> list:
    """``masks.npz``: ``masks`` bool [N, H, W], one per image in dataset order."""
    from pathlib import Path
    path = Path(folder) / "masks.npz"
    np.savez_compressed(path, masks=np.asarray(predictions, bool))
    return [path]

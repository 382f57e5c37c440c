"""Image classification with a ViT: the classification task.

* data: labeled image datasets by URI (``rpe_jax.tasks.images``);
* features: the frozen encoder's pooled feature (CLS or mean) — ``rpe_jax.prototypes``;
* loss: masked cross-entropy (``ClassificationLoss``), trained by ``rpe_jax.training``:

    L = Σ_i m_i · CE(f(x_i; θ0 + δθ), y_i) / Σ_i m_i  (+ Med-LEGO's orthogonality penalty)

  minimised by AdamW with linear warm-up + cosine decay after global-norm clipping; the
  trainable parameters are the adapter factors (``LoRAParam``) plus, when the dataset's
  label set differs from the model's, a fresh classification head. Validation accuracy is
  measured after every epoch and the best epoch's adapter is returned (Med-LEGO);
* predict / score: argmax labels, top-1 accuracy (``evaluate``).

Determinism: the adapter initialisation is seeded by ``seed`` and the batch order of epoch t
is a permutation seeded by (seed, t), so a run resumed from an orbax checkpoint replays
exactly the computation of an uninterrupted one.

``pretrain_foundation`` trains the small built-in ViT the demo adapts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.lora import Linear, LoRAParam, init_adapters
from models.preprocessing import Normalization
from models.vit import ViTConfig, ViTForImageClassification
from rpe_jax import batching, training
from rpe_jax.compose import adapter_of, with_adapter
from rpe_jax.tasks import images as data_lib
from rpe_jax.tasks.contract import Task, Trained
from rpe_jax.tasks.images import ImageDataset
from rpe_jax.training import OptimConfig


class TrainConfig(NamedTuple):
  """Hyper-parameters of one adapter training run."""

  rank: int = 8
  kind: str = "lora"                       # "lora" or "svd" (Med-LEGO's SVD-LoRA)
  targets: tuple[str, ...] = ("query", "value")
  epochs: int = 10
  batch_size: int = 64
  lr: float = 3e-3
  weight_decay: float = 1e-4
  warmup_fraction: float = 0.1             # of all steps, linear from 0 to lr
  clip_norm: float = 1.0                   # global-norm gradient clipping
  ortho_weight: float | None = None        # None: 0.1 for svd, 0 for lora (Med-LEGO
                                           # gives no value)
  train_head: bool | None = None           # None: a fresh head only when labels differ
  seed: int = 0
  eval_batch_size: int = 256


class TrainResult(NamedTuple):
  """The best-by-validation adapter (exchange form), its head and the run's history."""

  adapter: dict                 # {} when only a full model was trained (pretraining)
  head: dict | None             # {"kernel": [d, c], "bias": [c]} numpy, when a head was trained
  model: nnx.Module             # the model carrying the best adapter (and head)
  history: list                 # per epoch: loss, train/val accuracy, lr, seconds
  best_epoch: int
  best_val_accuracy: float
  initial_val_accuracy: float   # the model before training (δθ = 0)


def _check_config(config: TrainConfig) -> None:
  if config.kind not in ("lora", "svd"):
    raise ValueError(f"kind must be 'lora' or 'svd', got {config.kind!r}")
  for name in ("rank", "epochs", "batch_size", "eval_batch_size"):
    if int(getattr(config, name)) < 1:
      raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
  if not config.lr > 0:
    raise ValueError(f"lr must be > 0, got {config.lr}")
  if not 0 <= config.warmup_fraction < 1:
    raise ValueError(f"warmup_fraction must be in [0, 1), got {config.warmup_fraction}")


def _labels_differ(config, dataset: ImageDataset) -> bool:
  labels = getattr(config, "labels", None)
  if labels is None or len(labels) != dataset.num_classes:
    return True
  generic = tuple(f"LABEL_{i}" for i in range(len(labels)))   # HF's unnamed labels
  return tuple(labels) not in (tuple(dataset.class_names), generic)


def _fresh_head(model: nnx.Module, dataset: ImageDataset, seed: int) -> None:
  if not isinstance(getattr(model, "classifier", None), Linear):
    raise ValueError(f"{type(model).__name__} has no linear classifier head to train; "
                     "use a classification model (e.g. ViTForImageClassification)")
  old = model.classifier
  dtype = old.kernel[...].dtype
  head = Linear(old.in_features, dataset.num_classes, dtype=dtype, rngs=nnx.Rngs(seed))
  # As HF initialises classifiers: N(0, 0.02²) weights, zero bias.
  head.kernel = nnx.Param(0.02 * jax.random.normal(
      jax.random.key(seed + 7919), (old.in_features, dataset.num_classes), dtype))
  model.classifier = head
  model.config = dataclasses.replace(model.config, labels=tuple(dataset.class_names))


@dataclasses.dataclass(frozen=True)
class ClassificationLoss:
  """Masked mean cross-entropy of a classifier on a ``rpe_jax.batching.Batch``; aux: the
  batch's real-example count ``n`` and its number of correct predictions. Hashable, so runs
  with the same preprocessing share one compiled step."""

  normalization: Normalization

  def __call__(self, model, batch):
    logits = model(self.normalization(batch.images)).logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels)
    mask = batch.mask.astype(jnp.float32)
    loss = jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch.labels) * mask)
    return loss, {"n": jnp.sum(mask), "accuracy": correct}


@functools.partial(jax.jit, static_argnames=("graphdef", "normalization"))
def _correct(graphdef, state, images, labels, mask, normalization):
  logits = nnx.merge(graphdef, state)(normalization(images)).logits
  return jnp.sum((jnp.argmax(logits, -1) == labels) * mask)


def evaluate(model: nnx.Module, dataset: ImageDataset, *, batch_size: int = 256,
             normalization: Normalization | None = None) -> float:
  """Top-1 accuracy of a classification model on ``dataset``."""
  normalization = normalization or Normalization.for_model(model)
  graphdef, state = nnx.split(model)
  batch_size = min(batch_size, len(dataset))
  correct = sum(float(_correct(graphdef, state, b.images, b.labels, b.mask, normalization))
                for b in batching.batches(dataset, batch_size, tail="pad"))
  return correct / len(dataset)


def _ortho_weight(config: TrainConfig) -> float:
  if config.ortho_weight is not None:
    return float(config.ortho_weight)
  return 0.1 if config.kind == "svd" else 0.0


def _fit(model, train, val, config: TrainConfig, trainable, *, normalization, checkpoint_dir,
         resume, progress, stop_after, desc, ortho):
  """``rpe_jax.training.fit`` on the classification loss, best epoch by ``val`` accuracy."""
  batch_size = min(config.batch_size, len(train))
  steps = batching.num_batches(len(train), batch_size)
  optim = OptimConfig(lr=config.lr, weight_decay=config.weight_decay,
                      clip_norm=config.clip_norm,
                      warmup_steps=int(round(config.warmup_fraction * config.epochs * steps)),
                      schedule="warmup_cosine", ortho_weight=ortho)
  result = training.fit(
      model, trainable, ClassificationLoss(normalization),
      lambda epoch: batching.batches(train, batch_size, shuffle=True, seed=config.seed,
                                     epoch=epoch, tail="pad"),
      epochs=config.epochs, steps_per_epoch=steps, config=optim,
      evaluate=lambda m: evaluate(m, val, batch_size=config.eval_batch_size,
                                  normalization=normalization),
      score_name="val_accuracy", checkpoint_dir=checkpoint_dir, resume=resume,
      identity={"config": _jsonable(config)}, stop_after=stop_after, progress=progress,
      desc=desc)
  return result.model, {"history": result.history, "best_epoch": result.best_epoch,
                        "best_val_accuracy": result.best_score,
                        "initial_val_accuracy": result.initial_score}


def _jsonable(config: TrainConfig) -> dict:
  return json.loads(json.dumps(config._asdict()))


def train_adapter(model: nnx.Module, train: ImageDataset, val: ImageDataset,
                  config: TrainConfig = TrainConfig(), *, init_adapter: dict | None = None,
                  normalization: Normalization | None = None,
                  checkpoint_dir: str | None = None, resume: bool = False,
                  progress: bool = False, stop_after: int | None = None) -> TrainResult:
  """Fine-tune an adapter on ``train``, keeping the best epoch by accuracy on ``val``.

  Args:
    model: a classification model (e.g. ``ViTForImageClassification``); not modified. Any
      adapter it carries is removed first.
    config: see ``TrainConfig``.
    init_adapter: start from this exchange-form adapter (e.g. a Med-LEGO merge) instead of
      a fresh one; it fixes the targets, ranks and kinds.
    normalization: image preprocessing inside the step; default
      ``Normalization.for_model(model)``.
    checkpoint_dir: save (adapter, head, optimizer state, epoch, best) after every epoch.
    resume: continue from the latest checkpoint in ``checkpoint_dir`` if there is one.
    stop_after: return after this many epochs of this call (the checkpoint lets a later
      call with ``resume=True`` finish the run).
  """
  _check_config(config)
  if len(train) == 0 or len(val) == 0:
    raise ValueError(f"train ({len(train)}) and val ({len(val)}) must both be non-empty")
  if train.num_classes != val.num_classes:
    raise ValueError(f"train has {train.num_classes} classes but val {val.num_classes}")
  normalization = normalization or Normalization.for_model(model)
  model = with_adapter(model, {})   # a private copy (shared base arrays), no adapters
  head = config.train_head if config.train_head is not None else \
      _labels_differ(model.config, train)
  if not head and _labels_differ(model.config, train) and \
      model.config.num_labels != train.num_classes:
    raise ValueError(f"the model has {model.config.num_labels} labels but the dataset "
                     f"{train.num_classes}: train a fresh head (train_head=True or None)")
  if head:
    _fresh_head(model, train, config.seed)
  if init_adapter is not None:
    model = with_adapter(model, init_adapter)
  else:
    init_adapters(model, config.targets, config.rank, kind=config.kind,
                  rngs=nnx.Rngs(config.seed))
  trainable = (nnx.Any(LoRAParam, nnx.All(nnx.Param, nnx.PathContains("classifier")))
               if head else LoRAParam)
  best, record = _fit(model, train, val, config, trainable, normalization=normalization,
                      checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
                      stop_after=stop_after, desc=f"train {train.name}",
                      ortho=_ortho_weight(config))
  head_params = ({"kernel": np.asarray(best.classifier.kernel[...]),
                  "bias": np.asarray(best.classifier.bias[...])} if head else None)
  adapter = jax.tree.map(np.asarray, adapter_of(best))
  return TrainResult(adapter, head_params, best, **record)


# --- the built-in foundation model ----------------------------------------------------------

FOUNDATION_SITES = ("clean", "blur", "lowcontrast")


def foundation_config(image_size: int = 32) -> ViTConfig:
  """The small ViT of the demo: 32×32 gray images, 8×8 patches (16 tokens + CLS: the digit
  scans are 8×8 at source, so finer patches only cost time), 4 layers of width 64."""
  return ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                   intermediate_size=128, image_size=image_size, patch_size=8,
                   num_channels=1, labels=tuple(str(i) for i in range(10)))


def pretrain_foundation(sites=FOUNDATION_SITES, *, epochs: int = 8, lr: float = 2e-3,
                        batch_size: int = 64, seed: int = 0, image_size: int = 32,
                        model_config: ViTConfig | None = None,
                        progress: bool = False) -> tuple[ViTForImageClassification, TrainResult]:
  """Pre-train the small built-in ViT on the built-in digits of a few ``sites``, briefly.

  All weights are trained (AdamW, warmup + cosine) on the union of the sites' train splits;
  the best epoch by the union of their val splits is kept. The other sites' shifts are left
  for adapters to learn. ``model_config`` replaces ``foundation_config(image_size)`` (e.g. an
  even smaller ViT for tests). Returns (model, record).
  """
  splits = [data_lib.load_splits(f"sites:digits/{s}:{image_size}", seed=seed) for s in sites]
  cat = lambda parts, name: dataclasses.replace(
      parts[0], images=np.concatenate([d.images for d in parts]),
      labels=np.concatenate([d.labels for d in parts]), name=name)
  train = cat([s.train for s in splits], "foundation[train]")
  val = cat([s.val for s in splits], "foundation[val]")
  model = ViTForImageClassification(model_config or foundation_config(image_size),
                                    rngs=nnx.Rngs(seed))
  config = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                       weight_decay=1e-4, warmup_fraction=0.1)
  best, record = _fit(model, train, val, config, nnx.Param,
                      normalization=Normalization.for_model(model), checkpoint_dir=None,
                      resume=False, progress=progress, stop_after=None,
                      desc="pretrain foundation", ortho=0.0)
  return best, TrainResult({}, None, best, **record)


# --- the task contract ------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef", "normalization"))
def _argmax(graphdef, state, images, normalization):
  return jnp.argmax(nnx.merge(graphdef, state)(normalization(images)).logits, -1)


def predict_labels(model: nnx.Module, dataset: ImageDataset, *, batch_size: int = 256,
                   normalization: Normalization | None = None,
                   progress: bool = False, mesh=None) -> np.ndarray:
  """Argmax class indices [N] of a classification model, in dataset order (fixed-size
  batches, the ragged tail padded: one compile). With a ``mesh`` each batch is split over
  its ``data`` axis (the model's weights stay where they are: see
  ``rpe_jax.parallel.sharding.shard_model``)."""
  from rpe_jax.tasks.contract import TaskModel
  where = TaskModel(model, mesh=mesh)
  normalization = normalization or Normalization.for_model(model)
  graphdef, state = nnx.split(model)
  batch_size = where.batch_size(batch_size, len(dataset))
  it = batching.batches(dataset, batch_size, tail="pad")
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(it, total=batching.num_batches(len(dataset), batch_size),
              desc=f"predict {dataset.name}", unit="batch")
  out = [np.asarray(_argmax(graphdef, state, where.place(b.images), normalization))[
      np.asarray(b.mask)] for b in it]
  return np.concatenate(out).astype(np.int64)


def _all_splits(splits) -> ImageDataset:
  """The union of a dataset's splits, train then val then test."""
  parts = list(splits)
  name = parts[0].name.rsplit("[", 1)[0]
  return dataclasses.replace(parts[0], images=np.concatenate([p.images for p in parts]),
                             labels=np.concatenate([p.labels for p in parts]),
                             name=f"{name}[all]")


class ClassificationTask(Task):
  """Image classification with a ViT behind ``rpe_jax.tasks.contract.Task``: data by
  ``rpe_jax.tasks.images`` URIs, CLS (or mean) features, argmax labels, top-1 accuracy."""

  name = "classification"
  metric = "accuracy"
  pooling = "cls"

  def load(self, uri, split="test", *, data_root=None, seed=0) -> ImageDataset:
    if split == "all":
      return _all_splits(data_lib.load_splits(uri, data_root=data_root, seed=seed))
    return data_lib.load(uri, split, data_root=data_root, seed=seed)

  def labeled(self, ds) -> bool:
    return True   # an ImageDataset always carries labels

  def size(self, ds) -> int:
    return len(ds)

  def features(self, tm, ds, *, pooling=None, progress=False) -> np.ndarray:
    from rpe_jax import prototypes
    return prototypes.features(tm.model, ds, pooling or self.pooling,
                               normalization=tm.normalization, progress=progress)

  def subset(self, ds, index) -> ImageDataset:
    return ds.subset(np.asarray(index))

  def prototype(self, tm, ds, *, pooling=None, progress=False):
    from rpe_jax import prototypes
    return prototypes.prototype(tm.model, ds, pooling or self.pooling,
                                normalization=tm.normalization, progress=progress)

  def train(self, tm, uri, options, *, data_root=None, progress=False):
    splits = data_lib.load_splits(uri, data_root=data_root, seed=options.seed)
    default = TrainConfig()
    config = TrainConfig(rank=options.rank, kind=options.kind,
                         targets=options.targets or default.targets,
                         epochs=options.epochs or default.epochs,
                         lr=options.lr or default.lr,
                         batch_size=options.batch_size or default.batch_size,
                         seed=options.seed, ortho_weight=options.ortho_weight)
    result = train_adapter(tm.model, splits.train, splits.val, config,
                           normalization=tm.normalization,
                           checkpoint_dir=options.checkpoint_dir, resume=options.resume,
                           progress=progress)
    test = evaluate(result.model, splits.test, normalization=tm.normalization)
    return Trained(result.adapter, result.head, result.model, {
        "metric": self.metric, "initial_val": result.initial_val_accuracy,
        "val": result.best_val_accuracy, "test": test,
        "best_epoch": result.best_epoch, "head_trained": result.head is not None,
        "n_train": len(splits.train), "history": result.history}, splits.train)

  def predict(self, tm, ds, *, progress=False, **options) -> np.ndarray:
    return predict_labels(tm.model, ds, normalization=tm.normalization, progress=progress,
                          mesh=tm.mesh)

  def score(self, predictions, ds, **options) -> dict:
    return {"accuracy": float(np.mean(np.asarray(predictions) == ds.labels))}

  def write_predictions(self, predictions, ds, folder) -> list:
    """``predictions.csv``: index, predicted class index, its class name, one row per image."""
    import csv
    from pathlib import Path
    path = Path(folder) / "predictions.csv"
    with open(path, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["index", "prediction", "class_name"])
      names = ds.class_names
      for i, p in enumerate(np.asarray(predictions)):
        writer.writerow([i, int(p), names[int(p)] if int(p) < len(names) else ""])
    return [path]

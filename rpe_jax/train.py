"""Fine-tune LoRA / SVD-LoRA adapters (and, when needed, a fresh head) with optax.

The base model is frozen: the trainable parameters are the adapter factors (``LoRAParam``)
plus, when the dataset's label set differs from the model's, a fresh classification head.
Objective, per fixed-size batch B with padding mask m:

    L = Σ_i m_i · CE(f(x_i; θ0 + δθ), y_i) / Σ_i m_i  +  λ_⊥ Σ_layers ‖aᵀa − I‖² + ‖b bᵀ − I‖²

(the second term is Med-LEGO's orthogonality penalty, on SVD-LoRA leaves only), minimised by
AdamW with a linear-warmup + cosine learning-rate schedule after global-norm clipping.
The step is one ``jax.jit`` over pure functions of (graphdef, state); validation accuracy is
measured after every epoch and the best epoch's adapter is what is returned (Med-LEGO).

Determinism: the adapter initialisation is seeded by ``seed`` and the batch order of epoch t
is a permutation seeded by (seed, t), so no RNG state needs carrying; a run resumed from an
orbax checkpoint replays exactly the same computation as an uninterrupted one.

``pretrain_foundation`` trains the small built-in ViT the demo adapts; ``configure``/``run``
are the ``python -m rpe_jax train`` command.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.lora import Linear, LoRAParam, init_adapters, total_orthogonality_penalty
from models.vit import ViTConfig, ViTForImageClassification
from models.preprocessing import Normalization
from rpe_jax import batching
from rpe_jax.tasks import images as data_lib
from rpe_jax.compose import adapter_of, with_adapter
from rpe_jax.tasks.images import ImageDataset


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


# --- the compiled steps ---------------------------------------------------------------------

def _loss(graphdef, p_tree, rest, images, labels, mask, normalization, ortho_weight):
  model = nnx.merge(graphdef, p_tree, rest)
  logits = model(normalization(images)).logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  mask = mask.astype(jnp.float32)
  loss = jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  if ortho_weight:
    loss = loss + ortho_weight * total_orthogonality_penalty(adapter_of(model))
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
  return loss, correct


class _Static(NamedTuple):
  """Everything the compiled steps close over; hashable, so equal runs share one compile
  (e.g. adapters for several sites of the same size and model)."""

  graphdef: object
  treedef: object
  normalization: Normalization
  weight_decay: float
  clip_norm: float
  ortho_weight: float


def _optimizer(static: _Static) -> optax.GradientTransformation:
  """AdamW without its learning rate: the scheduled rate is an argument of the step, so the
  schedule (which depends on the run's length) does not force a recompile."""
  return optax.chain(optax.clip_by_global_norm(static.clip_norm), optax.scale_by_adam(),
                     optax.add_decayed_weights(static.weight_decay))


def _unflatten(static: _Static, p: dict):
  return jax.tree.unflatten(static.treedef, [p[k] for k in sorted(p)])


@functools.partial(jax.jit, static_argnums=0)
def _train_step(static: _Static, p, opt_state, rest, lr, images, labels, mask):
  def f(p):
    return _loss(static.graphdef, _unflatten(static, p), rest, images, labels, mask,
                 static.normalization, static.ortho_weight)
  (loss, correct), grads = jax.value_and_grad(f, has_aux=True)(p)
  updates, opt_state = _optimizer(static).update(grads, opt_state, p)
  p = jax.tree.map(lambda w, u: w - lr * u, p, updates)   # = optax.adamw at rate lr
  return p, opt_state, loss, correct


@functools.partial(jax.jit, static_argnums=0)
def _eval_step(static: _Static, p, rest, images, labels, mask):
  model = nnx.merge(static.graphdef, _unflatten(static, p), rest)
  logits = model(static.normalization(images)).logits
  return jnp.sum((jnp.argmax(logits, -1) == labels) * mask)


def _accuracy(static, p, rest, dataset, batch_size) -> float:
  batch_size = min(batch_size, len(dataset))
  correct = sum(float(_eval_step(static, p, rest, b.images, b.labels, b.mask))
                for b in batching.batches(dataset, batch_size, tail="pad"))
  return correct / len(dataset)


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


# --- checkpoints ----------------------------------------------------------------------------

def _manager(directory: str):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def _save(manager, epoch, state, meta) -> None:
  import orbax.checkpoint as ocp
  manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              meta=ocp.args.JsonSave(meta)))


def _restore(manager, template, expect: dict, directory: str):
  """(state, meta) of the latest checkpoint, or None; refuses one written for another run."""
  import orbax.checkpoint as ocp
  step = manager.latest_step()
  if step is None:
    return None
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  if any(meta.get(k) != v for k, v in expect.items()):
    raise ValueError(f"checkpoint in {directory} was written for another model or "
                     "configuration; use a fresh --checkpoint-dir or drop --resume")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract))).state
  return state, meta


# --- the training loop ----------------------------------------------------------------------

def _epoch(static, p, opt_state, rest, train, epoch, batch_size, schedule, config, progress,
           desc):
  """One pass over ``train`` in the order seeded by (seed, epoch); (p, opt_state, mean loss,
  train accuracy)."""
  steps = batching.num_batches(len(train), batch_size)
  it = batching.batches(train, batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                        tail="pad")
  if progress:
    from tqdm.auto import tqdm
    it = tqdm(it, total=steps, desc=f"{desc} epoch {epoch + 1}/{config.epochs}", unit="step",
              leave=False)
  sums = []   # kept on device: no host sync inside the epoch
  for i, b in enumerate(it):
    lr = np.float32(schedule(epoch * steps + i))
    p, opt_state, loss, correct = _train_step(static, p, opt_state, rest, lr, b.images,
                                              b.labels, b.mask)
    sums.append((loss * b.mask.sum(), correct))
  loss_sum, correct = (float(sum(t)) for t in zip(*sums))
  return p, opt_state, loss_sum / len(train), correct / len(train)


def _fit(model, train, val, config: TrainConfig, trainable, *, normalization, checkpoint_dir,
         resume, progress, stop_after, desc) -> tuple[nnx.Module, dict]:
  """Train the ``trainable`` variables of ``model`` (already a private copy); returns the
  model with the best-by-validation parameters and the run's record."""
  graphdef, params, rest = nnx.split(model, trainable, ...)
  leaves, treedef = jax.tree.flatten(params)
  if not leaves:
    raise ValueError("nothing to train: the model has no trainable parameters")
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  keys = [f"p{i:04d}" for i in range(len(leaves))]   # orbax-friendly names, in tree order
  p = dict(zip(keys, leaves))

  batch_size = min(config.batch_size, len(train))
  steps_per_epoch = batching.num_batches(len(train), batch_size)
  total = config.epochs * steps_per_epoch
  warmup = int(round(config.warmup_fraction * total))
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(total, warmup + 1))
  ortho = config.ortho_weight if config.ortho_weight is not None else (
      0.1 if config.kind == "svd" else 0.0)
  static = _Static(graphdef, treedef, normalization, float(config.weight_decay),
                   float(config.clip_norm), float(ortho))
  opt_state = _optimizer(static).init(p)

  start, best_p, best_acc, best_epoch, history = 0, p, -1.0, -1, []
  initial = _accuracy(static, p, rest, val, config.eval_batch_size)
  manager = _manager(checkpoint_dir) if checkpoint_dir else None
  try:
    identity = {"paths": paths, "config": _jsonable(config)}
    if manager is not None and not resume and manager.latest_step() is not None:
      raise ValueError(f"checkpoint dir {checkpoint_dir} already holds checkpoints (up to "
                       f"epoch {manager.latest_step() + 1}); resume them or use a fresh dir")
    restored = _restore(manager, {"p": p, "opt": opt_state, "best": p}, identity,
                        checkpoint_dir) if manager is not None and resume else None
    if restored is not None:
      state, meta = restored
      p, opt_state, best_p = state["p"], state["opt"], state["best"]
      start, best_acc, best_epoch = meta["epoch"] + 1, meta["best_acc"], meta["best_epoch"]
      history = meta["history"]
    end = config.epochs if stop_after is None else min(config.epochs, start + stop_after)
    for epoch in range(start, end):
      t0 = time.perf_counter()
      p, opt_state, loss, train_acc = _epoch(static, p, opt_state, rest, train, epoch,
                                             batch_size, schedule, config, progress, desc)
      val_acc = _accuracy(static, p, rest, val, config.eval_batch_size)
      if val_acc > best_acc:   # strictly better: the earliest best epoch wins ties
        best_p, best_acc, best_epoch = p, val_acc, epoch
      history.append({"epoch": epoch, "loss": loss, "train_accuracy": train_acc,
                      "val_accuracy": val_acc,
                      "lr": float(schedule((epoch + 1) * steps_per_epoch - 1)),
                      "seconds": time.perf_counter() - t0})
      if progress:
        print(f"{desc} epoch {epoch + 1}/{config.epochs}: loss {history[-1]['loss']:.4f} "
              f"val acc {val_acc:.4f}", file=sys.stderr, flush=True)
      if manager is not None:
        _save(manager, epoch, {"p": p, "opt": opt_state, "best": best_p},
              {"epoch": epoch, "best_acc": best_acc, "best_epoch": best_epoch,
               "history": history, **identity})
  finally:
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
  best = nnx.merge(graphdef, jax.tree.unflatten(treedef, [best_p[k] for k in keys]), rest)
  return best, {"history": history, "best_epoch": best_epoch, "best_val_accuracy": best_acc,
                "initial_val_accuracy": initial}


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
                      stop_after=stop_after, desc=f"train {train.name}")
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
                      desc="pretrain foundation")
  return best, TrainResult({}, None, best, **record)


# --- CLI: python -m rpe_jax train -----------------------------------------------------------

BUILTIN_MODELS = ("tiny-foundation",)


def configure(parser) -> None:
  parser.add_argument("--data", required=True, help="dataset URI (medmnist:, tfds:, folder:, "
                      "sites:digits/<site>, tasks:digits/<task>)")
  parser.add_argument("--data-root", default=None, help="folder holding the dataset files")
  parser.add_argument("--model", default="tiny-foundation",
                      help="an HF checkpoint folder or 'tiny-foundation' (pre-trained here on "
                           f"the built-in sites {', '.join(FOUNDATION_SITES)})")
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--kind", choices=("lora", "svd"), default="lora")
  parser.add_argument("--targets", default="query,value",
                      help="comma-separated module-name patterns (default query,value)")
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--ortho-weight", type=float, default=None,
                      help="Med-LEGO orthogonality weight (default 0.1 for svd, 0 for lora)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="write the best adapter here (.safetensors; "
                      "a trained head goes next to it as <name>.head.safetensors)")
  parser.add_argument("--checkpoint-dir", default=None, help="orbax checkpoints, every epoch")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the latest checkpoint in --checkpoint-dir")
  parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _load_model(name: str, seed: int, progress: bool):
  if name in BUILTIN_MODELS:
    model, _ = pretrain_foundation(seed=seed, progress=progress)
    return model, Normalization.for_model(model)
  if not os.path.isdir(name):
    raise ValueError(f"--model {name!r} is neither a folder nor one of {BUILTIN_MODELS}")
  from models import hf
  model = hf.load(name)
  if os.path.isfile(os.path.join(name, "preprocessor_config.json")):
    return model, Normalization.from_hf(name, model.config.num_channels)
  return model, Normalization.for_model(model)


def run(args) -> int:
  if args.resume and not args.checkpoint_dir:
    raise ValueError("--resume needs --checkpoint-dir")
  splits = data_lib.load_splits(args.data, data_root=args.data_root, seed=args.seed)
  model, normalization = _load_model(args.model, args.seed, progress=not args.json)
  targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
  config = TrainConfig(rank=args.rank, kind=args.kind, targets=targets, epochs=args.epochs,
                       lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                       ortho_weight=args.ortho_weight)
  result = train_adapter(model, splits.train, splits.val, config, normalization=normalization,
                         checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                         progress=not args.json)
  test_acc = evaluate(result.model, splits.test, normalization=normalization)
  if args.out:
    from rpe_jax.library.adapter_file import save_adapter
    save_adapter(args.out, result.adapter, {"data": args.data, "model": args.model,
                                            "kind": args.kind, "rank": str(args.rank),
                                            "best_epoch": str(result.best_epoch)})
    if result.head is not None:
      from safetensors.numpy import save_file
      stem = args.out[:-len(".safetensors")] if args.out.endswith(".safetensors") else args.out
      save_file(result.head, f"{stem}.head.safetensors")
  summary = {"data": args.data, "model": args.model, "best_epoch": result.best_epoch,
             "initial_val_accuracy": result.initial_val_accuracy,
             "best_val_accuracy": result.best_val_accuracy, "test_accuracy": test_acc,
             "head_trained": result.head is not None, "out": args.out,
             "history": result.history}
  if args.json:
    print(json.dumps(summary, indent=2))
  else:
    print(f"{args.data}: val accuracy {result.initial_val_accuracy:.4f} → "
          f"{result.best_val_accuracy:.4f} (epoch {result.best_epoch + 1}), "
          f"test {test_acc:.4f}" + (f"; adapter → {args.out}" if args.out else ""))
  return 0

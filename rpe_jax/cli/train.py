"""`rpe train`: fine-tune a LoRA / SVD-LoRA adapter on a dataset, for any task.

The model's config picks the task (``rpe_jax.tasks.contract``): a ViT trains a
classification adapter on an image dataset, a SAM a segmentation adapter on images with
masks, a Llama a report adapter on findings → impressions. ``--out`` writes the adapter
file; ``--add LIB --name NAME`` stores it in a library with its task prototype (the mean
feature of the train split under the frozen base) and its task.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rpe_jax.cli.model_spec import resolve_model
from rpe_jax.tasks.classification import FOUNDATION_SITES
from rpe_jax.tasks.contract import TrainOptions


def configure(parser) -> None:
  parser.description = ("Fine-tune a LoRA / SVD-LoRA adapter on a dataset (any task: the "
                        "model picks it), write it and/or add it to a library.")
  parser.add_argument("--data", required=True, help="dataset URI — classification: "
                      "medmnist:, tfds:, folder:, sites:digits/<site>, tasks:digits/<task>; "
                      "segmentation: masks:<images>:<masks>, tfds-masks:, sites:organs/<site>; "
                      "report: jsonl:<file>, reports:<modality>")
  parser.add_argument("--data-root", default=None, help="folder holding the dataset files")
  parser.add_argument("--model", default="tiny-foundation",
                      help="an HF checkpoint folder or Hub id (ViT, SAM or Llama with its "
                           "tokenizer), demo:classification|segmentation|report, or "
                           "'tiny-foundation' (a ViT pre-trained here on the built-in sites "
                           f"{', '.join(FOUNDATION_SITES)})")
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--kind", choices=("lora", "svd"), default="lora")
  parser.add_argument("--targets", default=None,
                      help="comma-separated module-name patterns (default: the task's — "
                      "query,value for ViT; every attention and MLP projection for SAM and "
                      "Llama)")
  parser.add_argument("--epochs", type=int, default=None,
                      help="passes over the train split (default: 10 classification, 20 "
                      "segmentation, 10 report)")
  parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3)")
  parser.add_argument("--batch-size", type=int, default=None,
                      help="default 64 classification, 16 segmentation and report")
  parser.add_argument("--ortho-weight", type=float, default=None,
                      help="Med-LEGO orthogonality weight (default 0.1 for svd, 0 for lora)")
  parser.add_argument("--prompt", choices=("box", "none"), default="box",
                      help="segmentation prompt while training and scoring (default box)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="write the best adapter here (.safetensors; "
                      "a trained head goes next to it as <name>.head.safetensors)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing --out file (and its .head.safetensors)")
  parser.add_argument("--add", metavar="LIBRARY", default=None,
                      help="also store the adapter in this library (created if missing) with "
                      "its task prototype and task")
  parser.add_argument("--name", default=None, help="the library entry's name (with --add)")
  parser.add_argument("--base-model", default=None,
                      help="the library's base-model id (with --add; default: --model)")
  parser.add_argument("--encoder", default=None,
                      help="the library's encoder id (with --add; default <base-model>/<pooling>)")
  parser.add_argument("--replace", action="store_true",
                      help="with --add: replace an existing entry of the same name")
  parser.add_argument("--checkpoint-dir", default=None,
                      help="orbax checkpoints, every epoch (classification)")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the latest checkpoint in --checkpoint-dir")
  parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _out_paths(out: str) -> tuple[Path, Path]:
  stem = out[:-len(".safetensors")] if out.endswith(".safetensors") else out
  return Path(out), Path(f"{stem}.head.safetensors")


def _write_atomic(path: Path, data: bytes) -> None:
  tmp = path.with_name(f".tmp-{path.name}")
  try:
    tmp.write_bytes(data)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def _check_args(args) -> None:
  """Everything that can be refused before hours of training."""
  if args.resume and not args.checkpoint_dir:
    raise ValueError("--resume needs --checkpoint-dir")
  for name in ("rank", "epochs", "batch_size"):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
  if args.lr is not None and not args.lr > 0:
    raise ValueError(f"--lr must be > 0, got {args.lr}")
  if args.out and not args.overwrite:
    existing = [str(p) for p in _out_paths(args.out) if p.exists()]
    if existing:
      raise ValueError(f"--out: {existing[0]} exists; pass --overwrite to replace it")
  if (args.name or args.replace) and not args.add:
    raise ValueError("--name and --replace go with --add LIBRARY")
  if args.add:
    if not args.name:
      raise ValueError("--add needs --name (the library entry's name)")
    from rpe_jax.library.catalog import Library
    if Path(args.add, "catalog.sqlite").exists():
      with Library.open(args.add, readonly=True) as lib:
        if args.name in lib and not args.replace:
          raise ValueError(f"--add: library {args.add} already has an adapter named "
                           f"{args.name!r}; pass --replace to replace it")


def _add_to_library(args, task, tm, trained) -> dict:
  """Store the adapter with the train split's prototype under the frozen base model."""
  from rpe_jax.library.catalog import Library
  if trained.head is not None:
    raise ValueError("--add: this adapter needs the fresh classification head it was "
                     "trained with, which a library cannot compose; train on a dataset with "
                     "the model's own labels")
  proto = task.prototype(tm, trained.train_data, progress=not args.json)
  base = args.base_model or args.model
  encoder = args.encoder or f"{base}/{task.pooling}"
  lib = Library.open(args.add) if Path(args.add, "catalog.sqlite").exists() \
      else Library.create(args.add)
  with lib:
    entry = lib.add(args.name, trained.adapter, proto.z, base_model=base, encoder=encoder,
                    n_samples=proto.n, pooling=task.pooling, replace=args.replace,
                    metadata={"task": task.name, "data": args.data, "model": args.model,
                              "kind": args.kind, "rank": args.rank,
                              f"val_{task.metric}": trained.summary["val"]})
  return {"library": str(Path(args.add)), "name": entry.name, "base_model": base,
          "encoder": encoder, "n_samples": proto.n}


def run(args) -> int:
  from rpe_jax.tasks import registry as contract
  _check_args(args)
  contract.task_of_uri(args.data)   # a bad URI fails before the model loads
  tm = resolve_model(args.model, seed=args.seed, progress=not args.json)
  task = contract.check_data_fits(args.data, tm.model)
  targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) \
      if args.targets else None
  options = TrainOptions(
      rank=args.rank, kind=args.kind, targets=targets, epochs=args.epochs, lr=args.lr,
      batch_size=args.batch_size, seed=args.seed, ortho_weight=args.ortho_weight,
      prompt=args.prompt, checkpoint_dir=args.checkpoint_dir, resume=args.resume)
  trained = task.train(tm, args.data, options, data_root=args.data_root,
                       progress=not args.json)
  added = _add_to_library(args, task, tm, trained) if args.add else None
  if args.out:
    from rpe_jax.library.adapter_file import serialize
    adapter_path, head_path = _out_paths(args.out)
    _write_atomic(adapter_path, serialize(trained.adapter, {
        "data": args.data, "model": args.model, "task": task.name, "kind": args.kind,
        "rank": str(args.rank), **({"best_epoch": str(trained.summary["best_epoch"])}
                                   if "best_epoch" in trained.summary else {})}))
    if trained.head is not None:
      from safetensors.numpy import save
      _write_atomic(head_path, save(trained.head))
  s, metric = trained.summary, task.metric
  summary = {"data": args.data, "model": args.model, "task": task.name, "metric": metric,
             f"initial_val_{metric}": s["initial_val"], f"val_{metric}": s["val"],
             f"test_{metric}": s["test"], "head_trained": trained.head is not None,
             "out": args.out, "library": added,
             **{k: v for k, v in s.items()
                if k not in ("metric", "initial_val", "val", "test", "head_trained")}}
  if args.json:
    print(json.dumps(summary, indent=2))
  else:
    print(f"{args.data}: val {metric} {s['initial_val']:.4f} → {s['val']:.4f}, test "
          f"{s['test']:.4f}" + (f"; adapter → {args.out}" if args.out else "")
          + (f"; added {args.name!r} to {args.add}" if added else ""))
  return 0

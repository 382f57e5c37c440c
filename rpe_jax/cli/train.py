"""`rpe train`: fine-tune a LoRA / SVD-LoRA adapter on a dataset (to build a library)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rpe_jax.cli.model_spec import resolve_model
from rpe_jax.tasks import images as data_lib
from rpe_jax.tasks.classification import (FOUNDATION_SITES, TrainConfig, evaluate,
                                          train_adapter)


def configure(parser) -> None:
  parser.add_argument("--data", required=True, help="dataset URI (medmnist:, tfds:, folder:, "
                      "sites:digits/<site>, tasks:digits/<task>)")
  parser.add_argument("--data-root", default=None, help="folder holding the dataset files")
  parser.add_argument("--model", default="tiny-foundation",
                      help="an HF checkpoint folder or Hub id (org/name[@revision]), 'demo' "
                           "(the demo's cached foundation) or "
                           "'tiny-foundation' (pre-trained here on the built-in sites "
                           f"{', '.join(FOUNDATION_SITES)})")
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
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing --out file (and its .head.safetensors)")
  parser.add_argument("--checkpoint-dir", default=None, help="orbax checkpoints, every epoch")
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


def run(args) -> int:
  if args.resume and not args.checkpoint_dir:
    raise ValueError("--resume needs --checkpoint-dir")
  if args.out and not args.overwrite:   # before hours of training, not after
    existing = [str(p) for p in _out_paths(args.out) if p.exists()]
    if existing:
      raise ValueError(f"--out: {existing[0]} exists; pass --overwrite to replace it")
  splits = data_lib.load_splits(args.data, data_root=args.data_root, seed=args.seed)
  model, normalization = resolve_model(args.model, seed=args.seed, progress=not args.json)
  targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
  config = TrainConfig(rank=args.rank, kind=args.kind, targets=targets, epochs=args.epochs,
                       lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                       ortho_weight=args.ortho_weight)
  result = train_adapter(model, splits.train, splits.val, config, normalization=normalization,
                         checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                         progress=not args.json)
  test_acc = evaluate(result.model, splits.test, normalization=normalization)
  if args.out:
    from rpe_jax.library.adapter_file import serialize
    adapter_path, head_path = _out_paths(args.out)
    _write_atomic(adapter_path, serialize(result.adapter, {
        "data": args.data, "model": args.model, "kind": args.kind, "rank": str(args.rank),
        "best_epoch": str(result.best_epoch)}))
    if result.head is not None:
      from safetensors.numpy import save
      _write_atomic(head_path, save(result.head))
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

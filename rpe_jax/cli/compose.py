"""`python -m rpe_jax.compose` (also `rpe compose`): the main job's command line.

prototype → retrieve → weigh → compose (``rpe_jax.pipeline``) for one or many unlabeled
targets, then the outputs: the composed adapter (our safetensors, a PEFT folder or an orbax
checkpoint), optionally the merged model, and a report (table, or JSON with ``--json``).

With no arguments (or ``--demo [options]``) it runs the demo on the embedded default
(``rpe_jax.demo``). Bad input exits with code 2 and one line, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from rpe_jax import pipeline
from rpe_jax.cli import guarded, outputs
from rpe_jax.cli.model_spec import resolve_model
from rpe_jax.weighting import STRATEGIES

FORMATS = ("safetensors", "peft", "orbax")
WRITTEN_BY = "rpe_jax.compose"   # the report's mark: a folder holding it is the tool's
_PREDICTION_FILES = ("predictions.csv", "masks.npz", "predictions.jsonl", "per_sample.npz")
_OUTPUT_NAME = re.compile(
    r"(report\.json|composed|target-\d+|lambda_path-\d+\.png|\.tmp-compose-.*|"
    r"predictions\.csv|masks\.npz|predictions\.jsonl|per_sample\.npz)\Z")
_ADAPTER_FOLDER = re.compile(r"(composed|target-\d+)\Z")
_PLOT = re.compile(r"lambda_path-\d+\.png\Z")
_OWNED = ("report.json, composed/, target-N/, lambda_path-N.png and the predictions "
          "(predictions.csv, masks.npz, predictions.jsonl, per_sample.npz)")


def configure(parser: argparse.ArgumentParser) -> None:
  parser.description = ("Compose the library's adapters for new, unlabeled target datasets: "
                        "prototype → retrieve → weigh → compose. With no arguments, run the "
                        "demo on the built-in data.")
  parser.add_argument("--library", help="adapter library directory (see `rpe library`), or "
                      "demo:TASK for a demo's cached library")
  parser.add_argument("--model", help="base model: an HF checkpoint folder or Hub id, or "
                      "demo:classification|segmentation|report for a demo's base ('demo' = "
                      "demo:classification); needed with --data, --predict, --merge and "
                      "--format peft. Its config picks the task")
  target = parser.add_mutually_exclusive_group()
  target.add_argument("--data", action="append", metavar="URI",
                      help="target dataset URI — classification: medmnist:, tfds:, folder:, "
                      "sites:digits/<site>, tasks:; segmentation: masks:<images>[:<masks>], "
                      "tfds-masks:, sites:organs/<site>; report: jsonl:<file>, "
                      "reports:<modality>. Repeat for several targets; its prototype uses the "
                      "model's encoder")
  target.add_argument("--prototype", action="append", metavar="FILE.npy",
                      help="target prototype file: [d] or a batch [B, d]; repeatable")
  parser.add_argument("--data-root", help="folder holding dataset files (medmnist npz, tfds)")
  parser.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                      help="which split of --data is the unlabeled target (default test; "
                      "all: the whole dataset)")
  parser.add_argument("--encoder", help="library encoder id (default: the only one)")
  parser.add_argument("--pooling", default=None, choices=("cls", "mean"),
                      help="feature pooling for --data (default: the encoder's)")
  parser.add_argument("--k", type=int, default=4, help="adapters to retrieve (default 4)")
  parser.add_argument("--strategy", default="sparse", choices=STRATEGIES,
                      help="weighting strategy (default sparse)")
  parser.add_argument("--lam1", type=float, default=1.0, help="temperature of 'sim'")
  lam2 = parser.add_mutually_exclusive_group()
  lam2.add_argument("--lam2", type=float, default=None,
                    help="absolute ℓ1 weight of 'sparse' (default 10; seeds: 10 vision, 1 "
                    "language)")
  lam2.add_argument("--lam2-rel", type=float, default=None, metavar="C",
                    help="scale-free ℓ1 weight of 'sparse': λ2 = C·λ* per target, λ* the "
                    "exact-penalty threshold (0: lin, >= 1: simplex)")
  parser.add_argument("--path", action="store_true",
                      help="also solve the whole λ path (λ2/λ* in [0, 1.5]) per target and, "
                      "with --out, draw it to lambda_path-<i>.png")
  parser.add_argument("--exclude", action="append", default=[], metavar="NAME",
                      help="library adapter to leave out (repeatable; leave-one-out)")
  parser.add_argument("--rank", type=int, help="re-truncate the composition to this rank")
  parser.add_argument("--energy", type=float,
                      help="re-truncate keeping singular values up to this cumulative share")
  parser.add_argument("--base-model", help="compose only adapters of this base model (a "
                      "library mixing base models needs it)")
  parser.add_argument("--out", help="output folder (nothing is written without it); an "
                      "existing non-empty folder is written into only if this tool wrote it")
  parser.add_argument("--overwrite", action="store_true",
                      help="write into an existing non-empty --out folder the tool did not "
                      "write; only report.json, composed/, target-N/ and lambda_path-N.png "
                      "are replaced")
  parser.add_argument("--format", default="safetensors", choices=FORMATS,
                      help="adapter output format (default safetensors)")
  parser.add_argument("--merge", action="store_true",
                      help="also write the base model with the adapter merged (HF layout)")
  parser.add_argument("--predict", action="store_true",
                      help="run the composed model on each --data target and write its "
                      "predictions under --out: predictions.csv (classes), masks.npz "
                      "(segmentation) or predictions.jsonl (impressions)")
  parser.add_argument("--eval", action="store_true",
                      help="score the predictions against the target's labels (accuracy, mean "
                      "DICE, ROUGE-L F1): printed and in report.json under \"metrics\"")
  parser.add_argument("--per-sample", action="store_true",
                      help="with --predict/--eval: every input gets its own weights (its own "
                      "feature as prototype, its own k nearest adapters, all in one batched "
                      "solve) and the batch runs them in one forward; writes per_sample.npz "
                      "(union, weights [N, |union|]) instead of a composed adapter")
  parser.add_argument("--prompt", default="box", choices=("box", "none"),
                      help="segmentation prompt: box (from the target's masks, the usual SAM "
                      "evaluation; needs masks) or none (default box)")
  parser.add_argument("--max-new-tokens", type=int, default=32,
                      help="report generation: impression length cap (default 32)")
  parser.add_argument("--bertscore-model", metavar="DIR",
                      help="report --eval: also BERTScore F1 with this local HF encoder folder")
  parser.add_argument("--json", action="store_true", help="print the report as JSON")
  from rpe_jax.parallel import distributed   # --mesh and the multi-host flags (docs/multihost.md)
  distributed.add_mesh_args(parser)


def _check_args(args) -> None:
  if not args.library:
    raise ValueError("--library is required (or run with no arguments for the demo)")
  if not (args.data or args.prototype):
    raise ValueError("give the target as --data URI or --prototype FILE.npy")
  if args.k < 1:
    raise ValueError(f"--k must be >= 1, got {args.k}")
  if args.lam1 < 0 or (args.lam2 is not None and args.lam2 < 0) or (
      args.lam2_rel is not None and args.lam2_rel < 0):
    raise ValueError("--lam1, --lam2 and --lam2-rel must be >= 0")
  if args.rank is not None and args.rank < 1:
    raise ValueError(f"--rank must be >= 1, got {args.rank}")
  if args.energy is not None and not 0 < args.energy <= 1:
    raise ValueError(f"--energy must be in (0, 1], got {args.energy}")
  if (args.predict or args.eval) and not args.data:
    raise ValueError("--predict and --eval need the target as --data URI")
  if args.predict and not args.out:
    raise ValueError("--predict writes the predictions under --out: give --out")
  if args.per_sample:
    if not (args.predict or args.eval):
      raise ValueError("--per-sample composes per input while predicting: add --predict or "
                       "--eval")
    conflicts = [name for name, on in (("--merge", args.merge), ("--path", args.path),
                                        ("--rank", args.rank is not None),
                                        ("--energy", args.energy is not None),
                                        ("--format", args.format != "safetensors"))
                 if on]
    if conflicts:
      raise ValueError(f"--per-sample writes no composed adapter: it does not combine with "
                       f"{', '.join(conflicts)}")
  if args.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  needs_model = args.data or args.merge or (args.out and args.format == "peft")
  if needs_model and not args.model:
    raise ValueError("--model is required with --data, --merge or --format peft")
  if (args.merge or args.format != "safetensors") and not args.out:
    raise ValueError("--merge and --format need --out")
  if args.out:
    outputs.check_folder(args.out, option="--out", overwrite=args.overwrite, owned=_ours,
                         names=_OWNED)


def _ours(folder: Path) -> bool:
  """Does ``folder`` hold only what this command writes, with its report?"""
  from rpe_jax.library import untrusted
  names = [p.name for p in folder.iterdir()]
  if "report.json" not in names or not all(_OUTPUT_NAME.match(n) for n in names):
    return False
  try:
    report = untrusted.read_json(folder / "report.json")
  except ValueError:
    return False
  return isinstance(report, dict) and report.get("written_by") == WRITTEN_BY


def _write_outputs(args, out: Path, target_names, composed, model, report,
                   path=None, predicted=None) -> None:
  """Write everything under a temporary folder first, then move it into ``out`` (the
  report last); in a folder of an earlier run, its other adapter folders go too."""
  from rpe_jax.library import adapter_file
  # Checked again: time has passed since _check_args.
  outputs.check_folder(out, option="--out", overwrite=args.overwrite, owned=_ours,
                       names=_OWNED)
  owned = out.is_dir() and _ours(out)
  with outputs.staged(out, prefix=".tmp-compose-") as staging:
    folders = []
    for i, (name, adapter) in enumerate(zip(target_names, composed)):
      folder = staging / (f"target-{i}" if len(composed) > 1 else "composed")
      folder.mkdir()
      if args.format == "safetensors":
        adapter_file.save_adapter(folder / "adapter.safetensors", adapter,
                                  {"target": name, "strategy": args.strategy})
      elif args.format == "peft":
        from rpe_jax.library import peft_io
        peft_io.write_peft(adapter, model, folder / "peft")
      else:
        import orbax.checkpoint as ocp
        tensors = adapter_file.as_tensors(adapter)
        with ocp.StandardCheckpointer() as ckpt:
          ckpt.save((folder / "orbax").absolute(), tensors)
      if args.merge:
        from models import hf
        from rpe_jax.compose import merge_into
        hf.save(merge_into(model, adapter), folder / "merged")
      folders.append(folder)
    if predicted is not None:   # beside the adapter folders (or target-i/ folders)
      task, predictions, datasets, mixtures = predicted
      for i, (p, ds) in enumerate(zip(predictions, datasets)):
        where = staging if len(predictions) == 1 else staging / f"target-{i}"
        if not where.exists():
          where.mkdir()
          folders.append(where)
        written = task.write_predictions(p, ds, where)
        if mixtures is not None:   # --per-sample: who used which adapter, how much
          union, mixture = mixtures[i]
          np.savez(where / "per_sample.npz", union=np.asarray(union, dtype=str),
                   weights=mixture.astype(np.float32))
          written.append(where / "per_sample.npz")
        if len(predictions) == 1:
          folders += written
    if path is not None:   # the λ path of each target, drawn (``--path``)
      from rpe_jax.weight_path_plot import plot_lambda_path
      for b, t in enumerate(report["targets"]):
        png = staging / f"lambda_path-{b}.png"
        plot_lambda_path(path, png, index=b, names=t["retrieved"],
                         title=f"λ path: {t['target']}")
        folders.append(png)
    (staging / "report.json").write_text(json.dumps(report, indent=2))
    new = {f.name for f in folders}
    stale = sorted(p.name for p in out.iterdir()
                   if owned and p.name not in new and (
                       _ADAPTER_FOLDER.match(p.name) or _PLOT.match(p.name)
                       or p.name in _PREDICTION_FILES))
    outputs.install(staging, out, folders + [staging / "report.json"], stale=stale)


def _library_path(spec: str) -> str:
  """``demo:TASK`` → the demo's cached library (built on first use); else ``spec``."""
  if spec == "demo" or spec.startswith("demo:"):
    from rpe_jax import demo
    return str(demo.library_path(spec.partition(":")[2] or "classification"))
  return spec


def format_table(name, names, sqdist, weights) -> str:
  """The seeds' weight table: adapter, squared prototype distance, weight."""
  width = max([len("adapter")] + [len(n) for n in names])
  lines = [f"target: {name}", f"| {'adapter':<{width}} | distance² | weight |",
           f"|{'-' * (width + 2)}|-----------|--------|"]
  for n, d, w in zip(names, sqdist, weights):
    lines.append(f"| {n:<{width}} | {d:9.4g} | {w:6.3f} |")
  return "\n".join(lines)


def _report(args, task, targets, **fields) -> dict:
  """The report of a run (printed with ``--json``, written as ``report.json``): its
  settings, the mode's ``fields``, the targets and, with ``--eval``, their metrics."""
  report = {
      "library": str(Path(args.library).absolute()),
      "strategy": args.strategy, "k": args.k, "lam1": args.lam1,
      "lam2": args.lam2 if args.lam2 is not None or args.lam2_rel is not None else 10.0,
      "lam2_rel": args.lam2_rel, "exclude": args.exclude, **fields,
      "base_model": args.base_model, "written_by": WRITTEN_BY,
      "task": None if task is None else task.name, "split": args.split if args.data else None,
      "targets": targets, "timings_s": {},
  }
  if args.eval:
    report["metrics"] = {t["target"]: t["metrics"] for t in targets}
  return report


def _write_report(args, clock, report, write_outputs) -> None:
  """With ``--out`` (process 0 only): ``write_outputs()``, timed, then ``report.json``
  rewritten atomically with the final timings; the timings go into ``report`` either way."""
  from rpe_jax.parallel import distributed
  write = args.out and distributed.is_primary()
  if write:
    with clock("write"):
      write_outputs()
  report["timings_s"] = {k: round(v, 4) for k, v in clock.seconds.items()}
  if write:
    outputs.atomic_write_text(Path(args.out) / "report.json", json.dumps(report, indent=2))


def _predict_options(args) -> dict:
  """The tasks' prediction and scoring options (each task reads its own)."""
  return {"prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
          "bertscore_model": args.bertscore_model}


def _print_metrics(metrics) -> None:
  if metrics:
    print("| metric | value |\n|---|---|")
    for name, value in metrics.items():
      print(f"| {name} | {value:.4f} |")


def _run_per_sample(args, library, task, tm, datasets, encoder, clock, mesh) -> int:
  """``--per-sample``: one weight vector per input (``pipeline.predict_per_sample``)."""
  from solvers import sparse_simplex
  options = _predict_options(args)
  targets, predictions, mixtures = [], [], []
  for uri, ds in zip(args.data, datasets):
    result, metrics = pipeline.predict_per_sample(
        library, task, tm, ds, k=args.k, strategy=args.strategy, lam1=args.lam1,
        lam2=args.lam2, lam2_rel=args.lam2_rel, encoder=encoder, exclude=args.exclude,
        base_model=args.base_model, pooling=args.pooling, evaluate=args.eval,
        progress=not args.json, clock=clock, mesh=mesh, **options)
    status = [sparse_simplex.status_name(int(x)) for x in np.atleast_1d(result.weights.status)]
    targets.append({"target": uri, "n_samples": len(result.mixture), "per_sample": {
        **result.stats, "solver_status": {n: status.count(n) for n in sorted(set(status))},
        "reconstruction_error_mean": float(np.mean(result.weights.error))},
        "metrics": metrics})
    predictions.append(result.predictions)
    mixtures.append((result.union, result.mixture))
  report = _report(args, task, targets, per_sample=True)
  _write_report(args, clock, report, lambda: _write_outputs(
      args, Path(args.out), [], [], tm.model, report,
      predicted=(task, predictions, datasets, mixtures)))
  if args.json:
    print(json.dumps(report, indent=2))
  else:
    for t in targets:
      ps = t["per_sample"]
      print(f"target: {t['target']} ({ps['inputs']} inputs, per-sample weights)\n"
            f"adapters used: {len(ps['union'])} in all; per batch of {ps['batch_size']}: "
            f"{ps['distinct_adapters_per_batch']}\n"
            f"non-zero weights per input: mean {ps['nonzero_weights_per_input']['mean']:.2f} "
            f"(min {ps['nonzero_weights_per_input']['min']}, max "
            f"{ps['nonzero_weights_per_input']['max']}); weights in "
            f"[{ps['weight']['min']:.3f}, {ps['weight']['max']:.3f}], "
            f"{100 * ps['negative_fraction']:.1f}% negative; solver {ps['solver_status']}")
      print("| adapter | inputs |\n|---|---|")
      for name, count in ps["inputs_per_adapter"].items():
        print(f"| {name} | {count} |")
      _print_metrics(t.get("metrics"))
      print()
    if args.out:
      print(f"wrote {args.out}")
  return 0


def run(args) -> int:
  """``rpe compose`` / ``python -m rpe_jax.compose`` with parsed arguments."""
  import jax
  from rpe_jax.parallel import distributed
  from solvers import sparse_simplex
  _check_args(args)
  # Multi-host: join before anything touches a device; process 0 alone writes files.
  distributed.maybe_initialize_distributed(args)
  mesh = distributed.mesh_from_args(args) if getattr(args, "mesh", None) else None
  if args.out and args.format == "orbax" and jax.process_count() > 1:
    raise ValueError("--format orbax is not supported in a multi-process run; use "
                     "safetensors or peft (written by process 0)")
  clock = pipeline.Clock()
  library = pipeline.open_library(_library_path(args.library))
  encoder = args.encoder
  # Read the datasets before the (slower) model so that a bad URI fails fast.
  task, datasets = (pipeline.load_datasets(args.data, args.split, args.data_root)
                    if args.data else (None, None))
  unlabeled = [u for u, ds in zip(args.data, datasets) if not task.labeled(ds)] \
      if datasets is not None else []
  if args.eval and unlabeled:
    raise ValueError(f"--eval: {unlabeled[0]} carries no labels to score against")
  if (args.predict or args.eval) and task.name == "segmentation" and args.prompt == "box" \
      and unlabeled:
    raise ValueError(f"--prompt box derives each box from the target's masks; {unlabeled[0]} "
                     "has none: pass --prompt none")
  tm = None
  with clock("model"):
    if args.model and (args.data or args.merge or args.format == "peft"):
      tm = resolve_model(args.model)
  model = None if tm is None else tm.model
  if datasets is not None:
    from rpe_jax.tasks import registry as contract
    for uri in args.data:
      contract.check_data_fits(uri, model)
  known = library.encoders()
  if encoder is None and len(known) != 1:
    raise ValueError(f"the library has encoders {sorted(known)}; name one with --encoder")
  encoder = encoder if encoder is not None else next(iter(known))
  if encoder not in known:
    raise ValueError(f"--encoder {encoder!r} is not in the library; it has {sorted(known)}")
  if model is not None:
    from rpe_jax.tasks.contract import model_task_name
    pipeline.check_library_task(library, encoder, model_task_name(model))
  if args.per_sample:
    return _run_per_sample(args, library, task, tm, datasets, encoder, clock, mesh)
  sizes = None
  with clock("prototype"):
    if args.prototype:
      target_names, z = pipeline.targets_from_prototypes(args.prototype)
    else:
      pooling = args.pooling or known[encoder]["pooling"]
      target_names = list(args.data)
      z, sizes = pipeline.dataset_prototypes(task, tm, datasets, pooling,
                                             progress=not args.json)
  if z.shape[1] != known[encoder]["dim"]:
    raise ValueError(f"target prototype dimension {z.shape[1]} does not match encoder "
                     f"{encoder!r} of the library ({known[encoder]['dim']}-dimensional): "
                     "a prototype of another encoder?")
  found, w, composed, kept = pipeline.compose_targets(
      library, z, k=args.k, strategy=args.strategy, lam1=args.lam1, lam2=args.lam2,
      lam2_rel=args.lam2_rel,
      encoder=encoder, exclude=args.exclude, rank=args.rank, energy=args.energy, clock=clock,
      mesh=mesh, base_model=args.base_model)
  status_names = [sparse_simplex.status_name(int(s)) for s in np.atleast_1d(w.status)]
  targets = []
  for b, name in enumerate(target_names):
    targets.append({
        "target": name,
        "n_samples": None if sizes is None else sizes[b],
        "retrieved": [str(n) for n in found.names[b]],
        "sqdist": [float(x) for x in np.asarray(w.sqdist[b])],
        "weights": [float(x) for x in np.asarray(w.weights[b])],
        "composed": kept[b],
        "reconstruction_error": float(w.error[b]),
        "solver_status": status_names[b],
        "lam2": None if w.lam2 is None else float(np.asarray(w.lam2)[b]),
        "lam_star": None if w.lam_star is None else float(np.asarray(w.lam_star)[b]),
    })
  predicted, metrics = None, [None] * len(targets)
  if args.predict or args.eval:
    options = _predict_options(args)
    predictions, metrics = pipeline.predict_targets(task, tm, datasets, composed,
                                                    evaluate=args.eval, progress=not args.json,
                                                    clock=clock, mesh=mesh, **options)
    predicted = (task, predictions, datasets, None) if args.predict else None
    for t, m in zip(targets, metrics):
      t["metrics"] = m
  path = None
  if args.path:
    from rpe_jax import weighting
    with clock("path"):
      path = weighting.lambda_path(found.references, z, np.linspace(0.0, 1.5, 31),
                                   relative=True)
    for b, t in enumerate(targets):
      t["lambda_path"] = {
          "lam": np.asarray(path.lam[b]).tolist(), "lam_star": float(path.lam_star[b]),
          "weights": np.asarray(path.weights[b]).tolist(),
          "error": np.asarray(path.error[b]).tolist(), "l1": np.asarray(path.l1[b]).tolist(),
          "status": [sparse_simplex.status_name(int(s)) for s in np.asarray(path.status[b])]}
  report = _report(args, task, targets, rank=args.rank, energy=args.energy)
  _write_report(args, clock, report, lambda: _write_outputs(
      args, Path(args.out), target_names, composed, model, report, path, predicted))
  if args.json:
    print(json.dumps(report, indent=2))
  else:
    for t in targets:
      print(format_table(t["target"], t["retrieved"], t["sqdist"], t["weights"]))
      print(f"reconstruction error {t['reconstruction_error']:.4g}, solver "
            f"{t['solver_status']}")
      _print_metrics(t.get("metrics"))
      print()
    if args.out:
      print(f"wrote {args.out}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """Entry point of ``python -m rpe_jax.compose``."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] == "--demo":
    from rpe_jax import demo
    return guarded(lambda: demo.main(argv[1:]))
  parser = argparse.ArgumentParser(prog="python -m rpe_jax.compose")
  configure(parser)
  parser.add_argument("--traceback", action="store_true", help="full traceback on errors")
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:
    return int(e.code or 0)
  return guarded(lambda: run(args), traceback=args.traceback)

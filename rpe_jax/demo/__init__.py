"""The embedded default: ``python -m rpe_jax.compose`` with no arguments.

On first run it builds, and caches in the user cache directory:

* a small ViT "foundation" pre-trained on real digit scans (scikit-learn's digits) from
  the built-in acquisition sites ``clean``, ``blur`` and ``lowcontrast``;
* a library with one LoRA (query/value) per built-in site, each stored with its task
  prototype (the mean CLS feature of the site's training images under the frozen model).

Then it holds one site out (``scanner`` by default: a mixture of the other sites' shifts),
retrieves and composes the other sites' adapters with every weighting strategy — without
using a single label of the held-out site — and prints the held-out test accuracy of each,
next to the pretrained model and the held-out site's own fine-tuned adapter (SFT, the
upper reference), with the weights each strategy gave.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CACHE_VERSION = "demo-v1"
ENCODER = "rpe-demo-vit/cls"
BASE_MODEL = "rpe-demo-vit"
HELD_OUT = "scanner"
STRATEGIES = ("nearest", "avg", "sim", "lin", "sparse")
ADAPTER_EPOCHS = 6
SEED = 0
# Test-only: RPE_JAX_DEMO_SIZE=tiny runs this same code path at a reduced size (16-px images,
# a 2-layer width-32 ViT, one epoch each) so that tests/test_demo.py takes seconds; the size
# is part of the recipe key, so it never shares a cache folder with the real demo.
SIZE_ENV = "RPE_JAX_DEMO_SIZE"


def _size() -> dict:
  """The demo's sizes: image side, foundation ViT config (None: the default), epochs."""
  if os.environ.get(SIZE_ENV, "") == "tiny":
    import dataclasses
    from rpe_jax.tasks.classification import foundation_config
    config = dataclasses.replace(foundation_config(16), hidden_size=32, num_hidden_layers=2,
                                 intermediate_size=64)
    return {"image_size": 16, "model_config": config, "foundation_epochs": 1,
            "adapter_epochs": 1}
  return {"image_size": 32, "model_config": None, "foundation_epochs": 8,
          "adapter_epochs": ADAPTER_EPOCHS}


def _recipe_key() -> str:
  """A short hash of everything that shapes the cached models, so a change rebuilds them."""
  from rpe_jax.tasks import images as data
  from rpe_jax.tasks.classification import FOUNDATION_SITES, foundation_config
  size = _size()
  recipe = repr((foundation_config(), FOUNDATION_SITES, sorted(data.SITES.items()),
                 ADAPTER_EPOCHS, SEED) + ((size,) if size["model_config"] else ()))
  return hashlib.sha256(recipe.encode()).hexdigest()[:10]


def cache_dir() -> Path:
  """``$RPE_JAX_CACHE``, else ``$XDG_CACHE_HOME/rpe_jax``, else ``~/.cache/rpe_jax``; one
  sub-folder per recipe."""
  return cache_root() / f"{CACHE_VERSION}-{_recipe_key()}"


def cache_root() -> Path:
  """Where every demo caches its models: ``$RPE_JAX_CACHE``, else
  ``$XDG_CACHE_HOME/rpe_jax``, else ``~/.cache/rpe_jax``."""
  return Path(os.environ.get("RPE_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rpe_jax"))


def tiny() -> bool:
  """Test-only: ``RPE_JAX_DEMO_SIZE=tiny`` shrinks every demo (same code path)."""
  return os.environ.get(SIZE_ENV, "") == "tiny"


def recipe_folder(task: str, recipe) -> Path:
  """A demo's cache folder: one per task and hash of its recipe, so a change rebuilds."""
  key = hashlib.sha256(repr(recipe).encode()).hexdigest()[:10]
  return cache_root() / f"{CACHE_VERSION}-{task}-{key}"


def _site_uri(site: str) -> str:
  image_size = _size()["image_size"]
  return f"sites:digits/{site}" + (f":{image_size}" if image_size != 32 else "")


def _build_atomically(final: Path, build) -> Path:
  """Run ``build(tmp_folder)`` and rename the folder into place only when it succeeded, so
  an interrupted build never leaves a half-built cache."""
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
  try:
    build(tmp)
    try:
      os.replace(tmp, final)
    except OSError:
      # Another process finished the same build first: keep its (equivalent) result.
      if not final.is_dir():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def foundation():
  """The demo's foundation ViT, pre-trained once and then loaded from the cache."""
  from models import hf
  folder = cache_dir() / "foundation"
  if not (folder / "config.json").exists():
    from rpe_jax.tasks.classification import pretrain_foundation

    def build(tmp):
      size = _size()
      model, record = pretrain_foundation(seed=SEED, progress=True,
                                          epochs=size["foundation_epochs"],
                                          image_size=size["image_size"],
                                          model_config=size["model_config"])
      hf.save(model, tmp)
      (tmp / "record.json").write_text(json.dumps(
          {"best_val_accuracy": record.best_val_accuracy, "best_epoch": record.best_epoch}))

    _build_atomically(folder, build)
  return hf.load(folder)


def library(model):
  """The demo library: one LoRA per built-in site with its prototype (built once)."""
  from rpe_jax import prototypes
  from rpe_jax.tasks import images as data
  from rpe_jax.library.catalog import Library
  from rpe_jax.tasks.classification import TrainConfig, train_adapter
  folder = cache_dir() / "library"
  if not (folder / "catalog.sqlite").exists():

    def build(tmp):
      lib = Library.create(tmp)
      config = TrainConfig(rank=4, epochs=_size()["adapter_epochs"], lr=3e-3, seed=SEED)
      for site in data.SITES:
        splits = data.load_splits(_site_uri(site), seed=SEED)
        result = train_adapter(model, splits.train, splits.val, config, progress=True)
        proto = prototypes.prototype(model, splits.train, "cls")
        lib.add(site, result.adapter, proto.z, base_model=BASE_MODEL, encoder=ENCODER,
                n_samples=proto.n, pooling="cls",
                metadata={"data": _site_uri(site), "task": "classification",
                          "val_accuracy": result.best_val_accuracy,
                          "initial_val_accuracy": result.initial_val_accuracy})
      lib.close()

    _build_atomically(folder, build)
  return Library.open(folder, readonly=True)


def held_out_rows(task, tm, lib, target, held_out: str, *, k: int, lam1: float,
                  lam2: float, predict_options: dict | None = None,
                  per_sample: bool = False) -> list[dict]:
  """The demo's table for any task: the held-out ``target`` scored for the pretrained
  model, the composition of the other members' adapters by each of the demo's
  ``STRATEGIES`` (weights from the target's prototype alone: no label of it is used) and
  the member's own adapter (SFT). ``per_sample``: each strategy's row also gets
  ``"per_sample"``, its score when every input is weighed on its own
  (``rpe_jax.pipeline.predict_per_sample``, the same k and λ)."""
  from rpe_jax.compose import combine, with_adapter
  from rpe_jax.pipeline import compose_targets
  options = predict_options or {}
  k = min(k, len(lib.names()) - 1)

  def score(model):
    predictions = task.predict(tm._replace(model=model), target, **options)
    return task.score(predictions, target, **options)[task.metric]

  z = task.prototype(tm, target).z
  features = task.features(tm, target) if per_sample else None   # one pass for every row
  rows = [{"method": "pretrained", task.metric: score(tm.model), "weights": {}}]
  for strategy in STRATEGIES:
    found, w, composed, kept = compose_targets(
        lib, z[None], k=k, strategy=strategy, lam1=lam1, lam2=lam2, exclude=[held_out])
    rows.append({"method": strategy, task.metric: score(with_adapter(tm.model, composed[0])),
                 "weights": {str(n): float(x) for n, x in
                             zip(found.names[0], np.asarray(w.weights[0]))},
                 "sqdist": {str(n): float(x) for n, x in
                            zip(found.names[0], np.asarray(w.sqdist[0]))}})
    if per_sample:
      from rpe_jax.pipeline import predict_per_sample
      result, metrics = predict_per_sample(lib, task, tm, target, k=k, strategy=strategy,
                                           lam1=lam1, lam2=lam2, exclude=[held_out],
                                           evaluate=True, features=features, **options)
      rows[-1]["per_sample"] = metrics[task.metric]
      rows[-1]["per_sample_inputs_per_adapter"] = result.stats["inputs_per_adapter"]
  own = combine([lib.load(held_out)], np.ones(1, np.float32))
  rows.append({"method": "SFT (held-out member's own adapter)",
               task.metric: score(with_adapter(tm.model, own)), "weights": {}})
  return rows


def target_uri(uri_of, held_out: str, target: str | None) -> str:
  """The demo's target: the held-out member's URI, or ``target`` = members joined by '+'
  (a mixed-site target in equal proportions, ``rpe_jax.tasks.images.mixed_sites``)."""
  return uri_of(target or held_out)


def run_demo(held_out: str = HELD_OUT, k: int = 4, lam1: float = 1.0, lam2: float = 10.0,
             target: str | None = None, per_sample: bool = False):
  """Hold ``held_out`` out, compose the others with every strategy, evaluate on the test
  set of ``target`` (default: the held-out site; 'a+b+…' mixes sites)."""
  from rpe_jax.tasks.classification import ClassificationTask
  t0 = time.perf_counter()
  tm = base_model("classification")
  lib = library(tm.model)
  if held_out not in lib.names():
    raise ValueError(f"unknown held-out site {held_out!r}; sites: {', '.join(lib.names())}")
  build_s = time.perf_counter() - t0
  task = ClassificationTask()
  uri = target_uri(_site_uri, held_out, target)
  target = task.load(uri, "test", seed=SEED)
  rows = held_out_rows(task, tm, lib, target, held_out, k=k, lam1=lam1, lam2=lam2,
                       per_sample=per_sample)
  return {"task": task.name, "metric": task.metric, "held_out": held_out, "target": uri,
          "k": k,
          "lam1": lam1, "lam2": lam2, "library": str(cache_dir() / "library"),
          "n_target": len(target), "build_or_load_s": round(build_s, 2),
          "total_s": round(time.perf_counter() - t0, 2), "results": rows}


def member_library(demo_module, task, tm, options):
  """The library of a task demo (``rpe_jax.demo.segmentation`` / ``.report``): one adapter
  per ``demo_module.MEMBERS``, trained through the task contract with ``options`` and stored
  with its prototype (the member's train split under the frozen base) and its task; built
  once under ``demo_module.cache_folder()``."""
  from rpe_jax.library.catalog import Library
  folder = demo_module.cache_folder() / "library"
  if not (folder / "catalog.sqlite").exists():

    def build(tmp):
      lib = Library.create(tmp)
      for member in demo_module.MEMBERS:
        print(f"training the {member!r} adapter ...", file=sys.stderr)
        uri = demo_module._uri(member)
        trained = task.train(tm, uri, options)
        proto = task.prototype(tm, trained.train_data)
        lib.add(member, trained.adapter, proto.z, base_model=demo_module.BASE_MODEL,
                encoder=demo_module.ENCODER, n_samples=proto.n, pooling=task.pooling,
                metadata={"data": uri, "task": task.name,
                          f"val_{task.metric}": trained.summary["val"],
                          f"initial_val_{task.metric}": trained.summary["initial_val"]})
      lib.close()

    _build_atomically(folder, build)
  return Library.open(folder, readonly=True)


def run_member_demo(demo_module, task, *, held_out: str, k: int, lam1: float, lam2: float,
                    target: str | None, per_sample: bool, member: str, members: str,
                    predict_options: dict, **extra) -> dict:
  """A task demo's run: build or load its base and library, hold ``held_out`` out and score
  the table (``held_out_rows``) on the test split of ``target`` (default: the held-out
  member). ``member`` / ``members`` name a member in messages; ``extra`` goes into the
  report."""
  t0 = time.perf_counter()
  tm = demo_module.base()
  lib = demo_module.library(tm)
  if held_out not in lib.names():
    raise ValueError(f"unknown held-out {member} {held_out!r}; {members}: "
                     f"{', '.join(lib.names())}")
  build_s = time.perf_counter() - t0
  uri = target_uri(demo_module._uri, held_out, target)
  target = task.load(uri, "test", seed=SEED)
  rows = held_out_rows(task, tm, lib, target, held_out, k=k, lam1=lam1, lam2=lam2,
                       predict_options=predict_options, per_sample=per_sample)
  return {"task": task.name, "metric": task.metric, "target": uri, "member": member,
          "held_out": held_out, "k": min(k, len(lib.names()) - 1), "lam1": lam1,
          "lam2": lam2, **extra, "library": str(demo_module.cache_folder() / "library"),
          "n_target": task.size(target), "build_or_load_s": round(build_s, 2),
          "total_s": round(time.perf_counter() - t0, 2), "results": rows}


def member_demo_main(demo_module, argv, *, description: str, member: str, members: str,
                     example: str | None) -> int:
  """``python -m rpe_jax.compose --demo TASK`` for a task demo module (its ``run``)."""
  name = demo_module.__name__.rsplit(".", 1)[1]
  parser = argparse.ArgumentParser(prog=f"python -m rpe_jax.compose --demo {name}",
                                   description=description)
  parser.add_argument("--held-out", default=demo_module.HELD_OUT, choices=demo_module.MEMBERS,
                      help=f"{member} to hold out ({demo_module.HELD_OUT})")
  parser.add_argument("--k", type=int, default=4)
  parser.add_argument("--lam1", type=float, default=1.0)
  parser.add_argument("--lam2", type=float, default=demo_module.LAM2)
  add_target_args(parser, members, example)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  print(f"rpe_jax {name} demo — cache: {demo_module.cache_folder()}", file=sys.stderr)
  report = demo_module.run(args.held_out, args.k, args.lam1, args.lam2,
                           getattr(args, "target", None), args.per_sample)
  print(json.dumps(report, indent=2) if args.json else format_report(report))
  return 0


def format_report(report) -> str:
  metric = report.get("metric", "accuracy")
  members = sorted({n for r in report["results"] for n in r["weights"]})
  per = any("per_sample" in r for r in report["results"])
  head = f"| method | {metric} | " + (f"per-sample {metric} | " if per else "") \
      + " | ".join(members) + " |"
  what = {"classification": "test images", "segmentation": "test images",
          "report": "test reports"}.get(report.get("task"), "examples")
  lines = [f"Held-out {report.get('member', 'site')} {report['held_out']!r} "
           f"({report['n_target']} {what}, no labels used to weigh); k = {report['k']}, "
           f"λ1 = {report['lam1']}, λ2 = {report['lam2']}.",
           f"Columns after {metric}: the weight each strategy gave each member's adapter.",
           "", head, "|" + "---|" * (2 + per + len(members))]
  if "+" in report.get("target", ""):
    lines.insert(1, f"Target: {report['target']} (test split), a mixture of sites in equal "
                    "proportions.")
  for r in report["results"]:
    cells = [f"{r['weights'][s]:+.3f}" if s in r["weights"] else "" for s in members]
    extra = (f"{r['per_sample']:.3f} | " if "per_sample" in r else " | ") if per else ""
    lines.append(f"| {r['method']} | {r[metric]:.3f} | " + extra + " | ".join(cells) + " |")
  lines.append("")
  lines.append(f"library: {report['library']} (built or loaded in "
               f"{report['build_or_load_s']} s; total {report['total_s']} s)")
  return "\n".join(lines)


def base_model(task: str = "classification"):
  """A demo's base model with its preprocessing (``rpe_jax.tasks.contract.TaskModel``),
  built on first use and cached."""
  from rpe_jax.tasks.registry import task_model
  if task == "classification":
    return task_model(foundation())
  return _demo_module(task).base()


def library_path(task: str = "classification") -> Path:
  """The folder of a demo's cached library (built on first use)."""
  if task == "classification":
    library(foundation()).close()
    return cache_dir() / "library"
  module = _demo_module(task)
  module.library(module.base()).close()
  return module.cache_folder() / "library"


def _demo_module(task: str):
  from rpe_jax.tasks.contract import TASK_NAMES
  if task not in TASK_NAMES:
    raise ValueError(f"unknown demo {task!r}; demos: {', '.join(TASK_NAMES)}")
  import importlib
  return importlib.import_module(f"rpe_jax.demo.{task}")


DEMOS = ("classification", "segmentation", "report")


def add_target_args(parser, members: str, example: str | None) -> None:
  """The demos' --target and --per-sample options."""
  if example is not None:
    parser.add_argument("--target", default=None, metavar="A+B+…",
                        help=f"score on the test split of these {members} mixed in equal "
                        f"proportions (e.g. {example}) instead of the held-out one's alone; "
                        "the held-out adapter stays out of the library")
  parser.add_argument("--per-sample", action="store_true",
                      help="also weigh every input on its own (per-sample composition) and "
                      "show its score beside each strategy's dataset-level one")


def main(argv: list[str] | None = None) -> int:
  argv = [] if argv is None else list(argv)
  task = argv.pop(0) if argv and not argv[0].startswith("-") else "classification"
  if task not in DEMOS:
    raise ValueError(f"--demo {task}: unknown demo; demos: {', '.join(DEMOS)}")
  if task != "classification":
    return _demo_module(task).main(argv)
  parser = argparse.ArgumentParser(
      prog="python -m rpe_jax.compose --demo [classification]",
      description="The demo on the embedded default (built-in digit sites). Other demos: "
                  "--demo segmentation, --demo report.")
  parser.add_argument("--held-out", default=HELD_OUT, help=f"site to hold out ({HELD_OUT})")
  parser.add_argument("--k", type=int, default=4)
  parser.add_argument("--lam1", type=float, default=1.0)
  parser.add_argument("--lam2", type=float, default=10.0)
  add_target_args(parser, "sites", "scanner+blur+noisy")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  print(f"rpe_jax demo — cache: {cache_dir()}", file=sys.stderr)
  report = run_demo(args.held_out, args.k, args.lam1, args.lam2, args.target, args.per_sample)
  print(json.dumps(report, indent=2) if args.json else format_report(report))
  return 0

"""``python -m rpe_jax.compose --demo segmentation``: the demo on built-in organ images.

On first run it builds, and caches beside the classification demo:

* a tiny SAM base trained in full on the built-in organ family's ``clean`` site
  (``rpe_jax.tasks.segmentation.pretrain_base``: no pretrained SAM can be downloaded here),
  on phantoms of another seed than the library's and the target's, so that it has seen none
  of their images;
* a library with one LoRA per member site (``MEMBERS``), trained through the task contract
  (``SegmentationTask.train``) and stored with its prototype (the mean-pooled image
  embedding of the site's train images under the frozen base) and its task.

Then it holds ``scanner`` out, weighs and composes the other sites' adapters with every
strategy from the held-out images alone, and prints the held-out mean DICE of each next to
the base and the site's own adapter. Prompts are boxes from the ground-truth masks, the
usual SAM evaluation protocol: the weights never see a mask, the prompts do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from rpe_jax import demo

MEMBERS = ("clean", "blur", "lowcontrast", "noisy", "bias", "scanner")
HELD_OUT = "scanner"
BASE_SITES = ("clean",)
BASE_MODEL = "rpe-demo-sam"
ENCODER = "rpe-demo-sam/mean"
PROMPT = "box"
LAM2 = 10.0          # the seeds' vision default
BASE_SEED = 1        # the base's phantoms: not the members' (seed 0)


def _size() -> dict:
  if demo.tiny():
    return {"image_size": 16, "base_steps": 10, "adapter_epochs": 1, "rank": 2}
  return {"image_size": 32, "base_steps": 200, "adapter_epochs": 13, "rank": 4}


def _uri(site: str) -> str:
  return f"sites:organs/{site}:{_size()['image_size']}"


def cache_folder():
  return demo.recipe_folder("segmentation", (MEMBERS, BASE_SITES, PROMPT, demo.SEED,
                                             BASE_SEED, sorted(_size().items())))


def base():
  """The demo's frozen SAM (``TaskModel``), trained once and then loaded from the cache."""
  from models import hf
  from rpe_jax.tasks.registry import task_model
  folder = cache_folder() / "base"
  if not (folder / "config.json").exists():
    from rpe_jax.tasks.segmentation import pretrain_base

    def build(tmp):
      size = _size()
      print(f"building the demo's SAM base ({size['base_steps']} steps) ...", file=sys.stderr)
      model = pretrain_base(BASE_SITES, size=size["image_size"], steps=size["base_steps"],
                            prompt=PROMPT, seed=BASE_SEED)
      hf.save(model, tmp)

    demo._build_atomically(folder, build)
  return task_model(hf.load(folder), folder)


def library(tm):
  """The demo library: one LoRA per member site with its prototype (built once)."""
  from rpe_jax.library.catalog import Library
  from rpe_jax.tasks.contract import TrainOptions
  from rpe_jax.tasks.segmentation import SegmentationTask
  folder = cache_folder() / "library"
  if not (folder / "catalog.sqlite").exists():
    task = SegmentationTask()

    def build(tmp):
      lib = Library.create(tmp)
      size = _size()
      options = TrainOptions(rank=size["rank"], epochs=size["adapter_epochs"], prompt=PROMPT,
                             seed=demo.SEED)
      for site in MEMBERS:
        print(f"training the {site!r} adapter ...", file=sys.stderr)
        trained = task.train(tm, _uri(site), options)
        proto = task.prototype(tm, task.load(_uri(site), "train", seed=demo.SEED))
        lib.add(site, trained.adapter, proto.z, base_model=BASE_MODEL, encoder=ENCODER,
                n_samples=proto.n, pooling=task.pooling,
                metadata={"data": _uri(site), "task": task.name, "val_dice":
                          trained.summary["val"],
                          "initial_val_dice": trained.summary["initial_val"]})
      lib.close()

    demo._build_atomically(folder, build)
  return Library.open(folder, readonly=True)


def run(held_out: str = HELD_OUT, k: int = 4, lam1: float = 1.0, lam2: float = LAM2,
        target: str | None = None, per_sample: bool = False) -> dict:
  from rpe_jax.tasks.segmentation import SegmentationTask
  t0 = time.perf_counter()
  tm = base()
  lib = library(tm)
  if held_out not in lib.names():
    raise ValueError(f"unknown held-out site {held_out!r}; sites: {', '.join(lib.names())}")
  build_s = time.perf_counter() - t0
  task = SegmentationTask()
  uri = demo.target_uri(_uri, held_out, target)
  target = task.load(uri, "test", seed=demo.SEED)
  rows = demo.held_out_rows(task, tm, lib, target, held_out, k=k, lam1=lam1, lam2=lam2,
                            predict_options={"prompt": PROMPT},
                            per_sample=per_sample)
  return {"task": task.name, "metric": task.metric, "target": uri, "member": "site",
          "held_out": held_out,
          "k": min(k, len(lib.names()) - 1), "lam1": lam1, "lam2": lam2, "prompt": PROMPT,
          "library": str(cache_folder() / "library"), "n_target": task.size(target),
          "build_or_load_s": round(build_s, 2),
          "total_s": round(time.perf_counter() - t0, 2), "results": rows}


def main(argv) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m rpe_jax.compose --demo segmentation",
      description="The segmentation demo: a tiny SAM and one LoRA per built-in organ site.")
  parser.add_argument("--held-out", default=HELD_OUT, choices=MEMBERS,
                      help=f"site to hold out ({HELD_OUT})")
  parser.add_argument("--k", type=int, default=4)
  parser.add_argument("--lam1", type=float, default=1.0)
  parser.add_argument("--lam2", type=float, default=LAM2)
  demo.add_target_args(parser, "sites", "scanner+blur+noisy")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  print(f"rpe_jax segmentation demo — cache: {cache_folder()}", file=sys.stderr)
  report = run(args.held_out, args.k, args.lam1, args.lam2, getattr(args, "target", None),
               args.per_sample)
  print(json.dumps(report, indent=2) if args.json else demo.format_report(report))
  return 0

"""Leave-one-out adapter composition for SAM segmentation across acquisition sites (DICE).

    .venv/bin/python benchmarks/segmentation_task.py            # 8 sites, 25 epochs each
    .venv/bin/python benchmarks/segmentation_task.py --quick    # 5 sites, the demo's sizes

The built-in organ family (``sites:organs/<site>[:<size>]``, ``rpe_jax.tasks.seg_data``:
160 phantoms per site, 96 / 32 / 32 train / val / test) through the task contract and the
pipeline's public API, exactly as ``python -m rpe_jax.compose --demo segmentation`` builds
its base and library:

* the frozen base is a tiny SAM trained in full on ``--base-sites``
  (``rpe_jax.tasks.segmentation.pretrain_base``; no pretrained SAM can be downloaded here),
  on phantoms of seed + 1 — another draw than the members' (seed), so that it has seen no
  member's test image — and cached as an HF folder under ``<out>/loo_cache/``;
* one LoRA per site (encoder fused qkv + decoder attention q/v, Dice + BCE) trained by
  ``SegmentationTask.train`` and stored in a ``Library`` (cached beside the base) with its
  prototype: the mean-pooled SAM image embedding of its train images under the base;
* for each held-out site, its unlabeled test images give the target prototype; every
  strategy of ``rpe_jax.weighting`` weighs and composes the other sites' adapters
  (``rpe_jax.pipeline.compose_targets``, the site excluded), and
  ``rpe_jax.pipeline.predict_targets`` scores the composition by mean DICE on those test
  images. Rows ``base`` (no adapter) and ``own`` (the site's own library adapter: an upper
  reference the composition never sees) frame the strategies;
* ``sparse`` also at scale-free λ2 = c·λ* (``--lam2-rel``), and the controls of
  ``benchmarks/controls.py`` (unless ``--no-controls``): ``random`` (``--control-k`` of the
  others drawn uniformly, uniform weights, mean of ``--random-draws`` draws), ``avg
  (top-k)``, and ``arrow`` (Arrow prototypes of the adapters against the mean input of each
  adapted layer over the held-out test images, in the same forward pass as prediction —
  with box prompts those boxes come from the target's masks, as every prediction's do).

Prompts: ``box`` derives each image's box from its ground-truth mask (the usual SAM
evaluation protocol: the weights never see a mask, the prompts do); ``none`` uses no prompt.

Hook for ``benchmarks/leave_one_out.py --task segmentation``: ``add_arguments(parser)`` then
``run(args)`` (returns {row: {site: DICE}}). Writes
``<out>/segmentation_task[_quick].{md,json,png}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
  if str(_p) not in sys.path:
    sys.path.insert(0, str(_p))

from rpe_jax.tasks import segmentation as seg  # noqa: E402
from rpe_jax.tasks.sites import GRADED_SITES, SITES  # noqa: E402
from task_leave_one_out import (build_library, cached, held_out_scores,  # noqa: E402
                                options_key, write_outputs)

QUICK_SITES = ["clean", "lowcontrast", "noisy", "bias", "scanner"]
QUICK = {"base_steps": 200, "epochs": 13}     # the segmentation demo's sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--family", default="organs", choices=("organs", "organs-graded"),
                 help="the members' family: sites:organs (SITES) or sites:organs-graded "
                      "(GRADED_SITES, mixtures of three base shifts)")
  p.add_argument("--sites", nargs="+", default=None,
                 choices=sorted(set(SITES) | set(GRADED_SITES)),
                 help="the members (at least 3; default all of the family's)")
  p.add_argument("--base-sites", nargs="+", default=["clean"], choices=list(SITES),
                 help="sites whose phantoms (another draw: seed + 1) train the base")
  p.add_argument("--prompt", default="box", choices=seg.PROMPTS,
                 help="box: ground-truth boxes; none: SAM's fixed default prompt")
  p.add_argument("--size", type=int, default=32, help="image size (multiple of 16)")
  p.add_argument("--base-steps", type=int, default=400, help="full training of the base")
  p.add_argument("--epochs", type=int, default=25,
                 help="adapter epochs (6 steps each: 96 train images, batch 16)")
  p.add_argument("--lr", type=float, default=None, help="adapter lr (task default 3e-3)")
  p.add_argument("--rank", type=int, default=4)
  p.add_argument("--k", type=int, default=None,
                 help="adapters retrieved per held-out site (default: all the others)")
  p.add_argument("--lam1", type=float, default=1.0, help="sim temperature")
  p.add_argument("--lam2", type=float, default=10.0, help="sparse l1 weight (vision: 10)")
  p.add_argument("--lam2-rel", type=float, nargs="*", default=[0.5],
                 help="scale-free sparse rows: λ2 = c·λ* per target (default 0.5)")
  p.add_argument("--control-k", type=int, default=3,
                 help="k of the random, avg (top-k) and arrow (top-k) controls")
  p.add_argument("--random-draws", type=int, default=20)
  p.add_argument("--arrow-lam1", type=float, default=None,
                 help="sim temperature on Arrow distances (default --lam1)")
  p.add_argument("--no-controls", action="store_true", help="skip the control rows")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--seeds", type=int, nargs="+", default=None,
                 help="one run per seed (base, phantoms, adapters) and mean ± SE over them")
  p.add_argument("--quick", action="store_true",
                 help=f"sites {' '.join(QUICK_SITES)} (organs, unless --sites; "
                 "organs-graded: all 7); "
                 f"{QUICK['base_steps']} base steps, {QUICK['epochs']} adapter epochs")
  p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")


def _uri(site: str, size: int, family: str = "organs") -> str:
  return f"sites:{family}/{site}" + (f":{size}" if size != 32 else "")


def base(args) -> tuple:
  """(TaskModel, key): the frozen SAM, trained once per option set, cached as an HF folder."""
  from models import hf
  from rpe_jax.tasks.registry import task_model
  options = {"task": "segmentation", "base_sites": sorted(args.base_sites), "size": args.size,
             "steps": args.base_steps, "prompt": args.prompt, "seed": args.seed, "v": 1}
  key = options_key(options)

  def build(tmp):
    print(f"training the SAM base on {args.base_sites} ({args.base_steps} steps) ...",
          flush=True)
    model = seg.pretrain_base(tuple(args.base_sites), size=args.size, steps=args.base_steps,
                              prompt=args.prompt, seed=args.seed + 1)
    hf.save(model, tmp)

  folder = cached(args.out / "loo_cache" / f"segmentation-base-{key}", build)
  return task_model(hf.load(folder), folder), key


def arrow_forward(prompt: str):
  """(tm, target) → a forward pass of the frozen SAM over the target's images with the
  prompts of prediction (what ``controls.mean_layer_inputs`` records)."""
  import jax.numpy as jnp

  def forward(tm, target):
    boxes = seg.boxes_from_masks(target.masks) if prompt == "box" else None

    def run():
      for s in range(0, len(target.images), 16):
        seg.mask_logits(tm.model, jnp.asarray(target.images[s:s + 16]),
                        None if boxes is None else jnp.asarray(boxes[s:s + 16]))

    return run

  return forward


def run(args) -> dict:
  """One seed (``--seed``), or with ``--seeds`` one run per seed and the tables over seeds
  (``benchmarks/seed_summary.py``) in ``<stem>_seeds.md``; returns the (last) DICE table."""
  if not args.seeds:
    return run_one(args)[0]
  import copy
  import seed_summary
  t0 = time.perf_counter()
  reports = []
  for seed in args.seeds:
    one = copy.copy(args)
    one.seed = seed
    scores, result, members, stem = run_one(one, suffix=f"_seed{seed}")
    reports.append({"seed": seed, "accuracy": scores, "held_out": list(members),
                    "sites": list(members), "k": result["k"], "control_k": args.control_k,
                    "random": result["random"], "lambda_path": {}})
  stem = Path(str(stem).rsplit("_seed", 1)[0] + "_seeds")
  refs = [f"sparse (λ2={c:g}·λ*)" for c in args.lam2_rel]
  text = (seed_summary.seeds_text(reports, time.perf_counter() - t0, refs)
          + "\n")
  stem.with_suffix(".md").write_text(text)
  print("\n" + text + f"\nwrote {stem}.md")
  return scores


def run_one(args, suffix: str = "") -> tuple:
  """One seed: (DICE table, held_out_scores' result, members, output stem)."""
  from rpe_jax.tasks.contract import TrainOptions
  from rpe_jax.tasks.registry import task_named
  if args.quick:
    if args.sites is None and args.family == "organs":
      args.sites = QUICK_SITES
    args.base_steps = min(args.base_steps, QUICK["base_steps"])
    args.epochs = min(args.epochs, QUICK["epochs"])
  table = SITES if args.family == "organs" else GRADED_SITES
  sites = list(dict.fromkeys(args.sites or table))
  unknown = [s for s in sites if s not in table]
  if unknown:
    raise SystemExit(f"--sites: {unknown} are not sites of {args.family} ({', '.join(table)})")
  if len(sites) < 3:
    raise SystemExit("--sites: need at least 3 (2 to compose, 1 held out)")
  t0 = time.perf_counter()
  task = task_named("segmentation")
  tm, base_key = base(args)
  t_base = time.perf_counter()
  members = {s: _uri(s, args.size, args.family) for s in sites}
  options = TrainOptions(rank=args.rank, epochs=args.epochs, lr=args.lr, prompt=args.prompt,
                         seed=args.seed)
  lib_key = options_key({"base": base_key, "members": members, **options._asdict()})
  lib = build_library(task, tm, members, options,
                      args.out / "loo_cache" / f"segmentation-library-{lib_key}",
                      base_model=f"loo-sam-{base_key}")
  t_lib = time.perf_counter()
  controls = None if args.no_controls else {
      "k": args.control_k, "draws": args.random_draws, "arrow_forward": arrow_forward(args.prompt),
      "arrow_lam1": args.lam1 if args.arrow_lam1 is None else args.arrow_lam1}
  result = held_out_scores(task, tm, lib, members, k=args.k, lam1=args.lam1,
                           lam2=args.lam2, seed=args.seed,
                           predict_options={"prompt": args.prompt}, lam2_rel=args.lam2_rel,
                           controls=controls)
  lib.close()
  t_end = time.perf_counter()
  seconds = {"base": round(t_base - t0, 1), "library": round(t_lib - t_base, 1),
             "held_out": round(t_end - t_lib, 1), "total": round(t_end - t0, 1)}
  stem = args.out / (("segmentation_task_quick" if args.quick else "segmentation_task")
                     + ("" if args.family == "organs" else "_graded") + suffix)
  write_outputs(stem, args, task, members, result, seconds, ylabel="DICE (held-out site)",
                ylim=(0, 1), note=f"Prompt {args.prompt}; base trained on "
                f"{', '.join(args.base_sites)} (phantoms of seed {args.seed + 1}); "
                f"{args.epochs} adapter epochs, rank {args.rank}, λ1 = {args.lam1}, "
                f"λ2 = {args.lam2}.")
  return result["scores"][task.metric], result, members, stem


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(p)
  run(p.parse_args(argv))


if __name__ == "__main__":
  main()

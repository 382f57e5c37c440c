"""Leave-one-out adapter composition for SAM segmentation across acquisition sites (DICE).

    .venv/bin/python benchmarks/segmentation_task.py            # 8 sites, 150 steps each
    .venv/bin/python benchmarks/segmentation_task.py --quick    # 5 sites, fewer steps/images

The built-in multi-site family of ``rpe_jax.tasks.segmentation`` (organ-like shapes under
site-specific acquisition shifts, like the prostate MRI sites). A tiny SAM trained in full
on the ``clean`` site stands in for the frozen foundation model (no weights can be
downloaded here; it is cached under --out). One LoRA per site (encoder fused qkv + decoder
attention q/v) is trained with Dice + BCE. For each held-out site, the other sites' adapters
are weighted from their prototypes (mean-pooled SAM image embeddings of their training
images, by the frozen base) against the held-out site's prototype (its unlabeled test
images), with every strategy of ``rpe_jax.weighting``; composed exactly
(``rpe_jax.compose.combine``), merged, and scored by mean DICE on the held-out test images.
Rows ``base`` (frozen, no adapter) and ``own`` (the held-out site's own adapter: an upper
bound the composition does not see) frame the strategies.

Hook for ``benchmarks/leave_one_out.py --task segmentation``: ``add_arguments(parser)`` then
``run(args)`` (returns {row: {site: DICE}}). Writes benchmarks/results/segmentation_task.json
and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from held_out_table import markdown_table, plot_bars  # noqa: E402
from models import hf, sam  # noqa: E402
from rpe_jax.tasks import segmentation as seg  # noqa: E402
from rpe_jax.compose import adapter_of, combine, merge_into  # noqa: E402
from rpe_jax.weighting import STRATEGIES, compute_weights  # noqa: E402

QUICK_SITES = ["clean", "lowcontrast", "noisy", "bias", "scanner"]


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--sites", nargs="+", default=list(seg.SITES), choices=list(seg.SITES))
  p.add_argument("--prompt", default="box", choices=seg.PROMPTS,
                 help="box: ground-truth boxes; none: SAM's fixed default prompt")
  p.add_argument("--size", type=int, default=32, help="image size (multiple of 16)")
  p.add_argument("--n-train", type=int, default=96, help="training images per site")
  p.add_argument("--n-test", type=int, default=64, help="held-out test images per site")
  p.add_argument("--base-steps", type=int, default=400, help="full training of the base")
  p.add_argument("--steps", type=int, default=150, help="adapter training steps")
  p.add_argument("--rank", type=int, default=4)
  p.add_argument("--lam1", type=float, default=1.0, help="sim temperature")
  p.add_argument("--lam2", type=float, default=10.0, help="sparse l1 weight (vision: 10)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true",
                 help=f"sites {' '.join(QUICK_SITES)}; 64 train / 32 test images; "
                 "200 base steps, 80 adapter steps")
  p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")


def _base(args) -> sam.SamModel:
  """The frozen base, trained once per (size, steps, prompt, seed) and cached as an HF folder."""
  folder = args.out / (f"segmentation_base_s{args.size}_n{args.base_steps}_{args.prompt}"
                       f"_seed{args.seed}")
  if (folder / "model.safetensors").exists():
    return sam.from_pretrained(folder)
  base = seg.pretrain_base(("clean",), size=args.size, steps=args.base_steps,
                           prompt=args.prompt, n_train=args.n_train, seed=args.seed)
  hf.save(base, folder)
  return base


def run(args) -> dict:
  if args.quick:
    if args.sites == list(seg.SITES):
      args.sites = QUICK_SITES
    args.n_train, args.n_test = min(args.n_train, 64), min(args.n_test, 32)
    args.base_steps, args.steps = min(args.base_steps, 200), min(args.steps, 80)
  sites = list(dict.fromkeys(args.sites))
  if len(sites) < 3:
    raise SystemExit("--sites: need at least 3 (2 to compose, 1 held out)")
  args.out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  data = {s: seg.load_site(s, size=args.size, n_train=args.n_train, n_test=args.n_test,
                           seed=args.seed) for s in sites}
  base = _base(args)
  print(f"base ready ({time.perf_counter() - t0:.0f} s)", flush=True)

  config = seg.SegTrainConfig(steps=args.steps, rank=args.rank, prompt=args.prompt,
                              seed=args.seed)
  adapters, protos = {}, {}
  for s in sites:
    result = seg.train(base, data[s].train, config)
    adapters[s] = adapter_of(result.model)
    protos[s] = seg.prototype(base, data[s].train)
    print(f"trained {s}: loss {result.losses[:5].mean():.3f} → {result.losses[-5:].mean():.3f}"
          f" ({time.perf_counter() - t0:.0f} s)", flush=True)

  scores: dict[str, dict[str, float]] = {}
  weights: dict[str, dict[str, dict]] = {}

  def score(row, held, model):
    scores.setdefault(row, {})[held] = seg.evaluate_dice(model, data[held].test,
                                                         prompt=args.prompt)

  for held in sites:
    lib = [s for s in sites if s != held]
    z = seg.prototype(base, data[held].test)          # unlabeled target images
    refs = np.stack([protos[s] for s in lib])
    score("base", held, base)
    score("own", held, merge_into(base, adapters[held]))
    for strategy in STRATEGIES:
      w = np.asarray(compute_weights(refs, z, strategy, lam1=args.lam1, lam2=args.lam2).weights)
      weights.setdefault(strategy, {})[held] = dict(zip(lib, w.astype(float).round(4).tolist()))
      score(strategy, held, merge_into(base, combine([adapters[s] for s in lib], w)))
    print(f"held out {held}: " + ", ".join(f"{r} {scores[r][held]:.3f}" for r in scores),
          flush=True)

  table = markdown_table(scores, sites)
  print(f"\nDICE on the held-out site, prompt={args.prompt} (rows: composition strategy)\n")
  print(table)
  seconds = time.perf_counter() - t0
  print(f"\ntotal {seconds:.0f} s")

  stem = args.out / "segmentation_task"
  meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
          if k != "func"}
  stem.with_suffix(".json").write_text(json.dumps(
      {"args": meta, "dice": scores, "weights": weights, "table": table, "seconds": seconds},
      indent=2))
  plot_bars(scores, sites, stem.with_suffix(".png"), ylabel="DICE (held-out site)",
            width_in=9.0, ylim=(0, 1))
  print(f"wrote {stem}.json and .png")
  return scores


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(p)
  run(p.parse_args(argv))


if __name__ == "__main__":
  main()

"""Leave-one-out, dataset-level against per-sample composition (issue 19).

    .venv/bin/python benchmarks/leave_one_out.py --per-sample                 # classification
    .venv/bin/python benchmarks/leave_one_out.py --per-sample --task segmentation
    .venv/bin/python benchmarks/leave_one_out.py --per-sample --quick         # 3 held-out sites

The demos' cached base models and libraries (``rpe_jax.demo``: the digit sites for
classification, the organ sites for segmentation; built on first use). For each held-out
site, two targets, without any of their labels:

* single-site: the held-out site's test split;
* mixed-site: the test splits of the held-out site and two others (the i-th and next of the
  others in the library's order, for the i-th held-out site), in equal proportions (``sites:<family>/a+b+c``) — a target that is not one
  distribution, as a hospital's scans from several scanners are not.

For every strategy, the held-out site's adapter left out of the library:

* dataset-level: one prototype (the mean feature of the target), one weight vector, one
  composed adapter (``rpe_jax.pipeline.compose_targets`` + ``predict_targets``);
* per-sample: each input's feature is its prototype, its own k nearest adapters and weights
  in one batched solve, one forward per batch (``rpe_jax.pipeline.predict_per_sample``).

The same k (4) and λ (the demos' λ2; plus sparse with a scale-free λ2 = 0.5·λ*) for both.
Writes benchmarks/results/per_sample_loo_<task>[_quick].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
  if str(_p) not in sys.path:
    sys.path.insert(0, str(_p))

import numpy as np  # noqa: E402

# (row name, strategy, λ2, λ2/λ*)
ROWS = (("nearest", "nearest", None, None), ("avg", "avg", None, None),
        ("sim", "sim", None, None), ("lin", "lin", None, None),
        ("simplex", "simplex", None, None), ("sparse (λ2 = 0.5·λ*)", "sparse", None, 0.5))


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--task", default="classification", choices=("classification", "segmentation"))
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--quick", action="store_true", help="3 held-out sites")
  p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")


def _setup(task_name: str):
  """(task, task model, library, site → URI, sites, predict options) of a demo."""
  from rpe_jax import demo
  from rpe_jax.tasks.registry import task_named
  if task_name == "classification":
    tm = demo.base_model("classification")
    lib = demo.library(tm.model)
    return task_named(task_name), tm, lib, demo._site_uri, list(lib.names()), {}
  from rpe_jax.demo import segmentation as seg_demo
  tm = seg_demo.base()
  lib = seg_demo.library(tm)
  return (task_named(task_name), tm, lib, seg_demo._uri, list(lib.names()),
          {"prompt": seg_demo.PROMPT})


def _scores(task, tm, lib, target, held, k, options) -> dict[str, tuple[float, float]]:
  """{row: (dataset-level score, per-sample score)} on one target."""
  from rpe_jax import pipeline
  z = task.prototype(tm, target).z[None]
  features = task.features(tm, target)   # every input's own prototype, once per target
  out = {}
  for row, strategy, lam2, lam2_rel in ROWS:
    kw = dict(k=k, strategy=strategy, lam2=lam2, lam2_rel=lam2_rel, exclude=[held])
    _, _, composed, _ = pipeline.compose_targets(lib, z, **kw)
    _, dataset_level = pipeline.predict_targets(task, tm, [target], composed, evaluate=True,
                                                **options)
    _, per_sample = pipeline.predict_per_sample(lib, task, tm, target, evaluate=True,
                                                features=features, **kw, **options)
    out[row] = (dataset_level[0][task.metric], per_sample[task.metric])
  return out


def run(args) -> dict:
  t0 = time.perf_counter()
  task, tm, lib, uri, sites, options = _setup(args.task)
  held_out = sites[:3] if args.quick else sites
  results = {}
  for i, held in enumerate(held_out):
    others = [s for s in sites if s != held]
    turn = i % len(others)
    mix = "+".join([held] + (others[turn:] + others[:turn])[:2])
    for kind, name in (("single", held), ("mixed", mix)):
      target = task.load(uri(name), "test")
      results.setdefault(kind, {})[held] = _scores(task, tm, lib, target, held, args.k,
                                                   options)
    print(f"held out {held} ({time.perf_counter() - t0:.0f} s)", flush=True)
  report = {"task": args.task, "metric": task.metric, "k": args.k, "sites": held_out,
            "rows": [r[0] for r in ROWS], "results": {
                kind: {h: {row: list(v) for row, v in per.items()} for h, per in res.items()}
                for kind, res in results.items()},
            "total_s": round(time.perf_counter() - t0, 1)}
  text = format_report(report)
  print(text)
  args.out.mkdir(parents=True, exist_ok=True)
  stem = args.out / f"per_sample_loo_{args.task}{'_quick' if args.quick else ''}"
  stem.with_suffix(".md").write_text(text + "\n")
  stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
  print(f"wrote {stem}.json and .md")
  return report


def format_report(report) -> str:
  """Means over held-out sites, and per site, of dataset-level vs per-sample scores."""
  m = report["metric"]
  lines = [f"{report['task']}: {m} on held-out targets, k = {report['k']}, held-out sites "
           f"{', '.join(report['sites'])} ({report['total_s']} s).", "",
           f"| strategy | single: dataset | single: per-sample | mixed: dataset | "
           f"mixed: per-sample |", "|---|---:|---:|---:|---:|"]
  res = report["results"]
  for row in report["rows"]:
    cells = []
    for kind in ("single", "mixed"):
      vals = np.array([res[kind][h][row] for h in report["sites"]])
      cells += [f"{vals[:, 0].mean():.3f}", f"{vals[:, 1].mean():.3f}"]
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  lines += ["", "Per held-out site (dataset / per-sample):", "",
            "| strategy | " + " | ".join(f"{h} single | {h} mixed" for h in report["sites"])
            + " |", "|---|" + "---:|" * (2 * len(report["sites"]))]
  for row in report["rows"]:
    cells = [f"{res[kind][h][row][0]:.3f} / {res[kind][h][row][1]:.3f}"
             for h in report["sites"] for kind in ("single", "mixed")]
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(p)
  return run(p.parse_args(argv))


if __name__ == "__main__":
  main()

"""Leave-one-out adapter composition: the seeds' main experiment (RPE Tables 3/5/6, Fig. 3).

    .venv/bin/python benchmarks/leave_one_out.py                 # the 8 built-in digit sites
    .venv/bin/python benchmarks/leave_one_out.py --quick         # 3 held-out sites, one λ2
    .venv/bin/python benchmarks/leave_one_out.py \\
        --data medmnist:organamnist --data medmnist:organcmnist --data medmnist:organsmnist \\
        --data-root ~/medmnist                                   # real data: one URI per site
    .venv/bin/python benchmarks/leave_one_out.py --task report   # the Llama report task hook
    .venv/bin/python benchmarks/leave_one_out.py --task segmentation   # the SAM hook
    .venv/bin/python benchmarks/leave_one_out.py --per-sample    # dataset vs per-sample
    .venv/bin/python benchmarks/leave_one_out.py --data sites:digits-graded --seeds 0 1 2 \
        --lam2 10 --lam2-rel 0.25 0.5 0.75 --path-site rot --no-ablations   # graded sites

One LoRA per site is trained on the frozen foundation and stored in an adapter library with
the site's task prototype (mean CLS feature of its train images). Then, for each site held
out, without any of its labels: the target prototype is the mean feature of its (unlabeled)
test images, the other sites' adapters are retrieved (k = all others), weighted by each
strategy and composed exactly (``rpe_jax.pipeline.compose_targets``), and the composed model
is evaluated on the held-out test set. Rows:

* ``pretrained`` (δθ = 0) and ``SFT`` (the held-out site's own adapter: the upper reference);
* ``nearest``, ``avg``, ``sim`` (λ1), ``lin``, ``simplex`` and ``sparse`` for each λ2 and
  for each scale-free λ2 = c·λ* (``--lam2-rel``; λ* each target's exact-penalty threshold);
* controls (``benchmarks/controls.py``), at k = ``--control-k`` (3): ``random`` (k of the
  others drawn uniformly, uniform weights; the mean of ``--random-draws`` draws, their
  spread in a table of its own), its like-for-like ``avg (top-k)`` (the k nearest by
  prototype, uniform weights), and ``arrow`` (retrieval and ``sim`` weights from Arrow's
  data-free prototypes: the top input direction of each adapted layer's ΔW, against the
  mean input of each adapted layer over the target's unlabeled test images) at k and at
  k = all others;
* ablations (seeds' Table 6): ``k=1`` (nearest adapter only; every strategy gives it weight
  1) and ``+own: <strategy>`` (the pool includes the held-out site's own SFT adapter).

Also the single-adapter transfer matrix (site j's adapter on site i's test set) and, per
held-out site, the rank of each other adapter by prototype distance against its rank by
transfer accuracy, with Spearman's ρ (the seeds' Figure 3). ``--path-site`` solves the whole
``sparse`` path of a held-out site (``weighting.lambda_path``, λ2/λ* from 0 to 1.5), scores
every point and draws it (``weight_path_plot.plot_lambda_path``).

``--seeds`` repeats everything per seed (data draws and adapter training; the foundation is
the same) and adds the tables over seeds (``benchmarks/seed_summary.py``): each row's mean
over held-out sites as mean ± standard error over the seeds, per site, and paired
differences of every scale-free ``sparse`` row against every other row (per site for
c = 0.5).

With the default data and training options the demo's cached foundation and library
(``rpe_jax.demo``) are reused; other configurations build their library once under
``benchmarks/results/loo_cache/<hash>/``. When the sites' label set differs from the base
model's (e.g. MedMNIST on the demo ViT), a head is first fitted on ``--head-site``'s train
split (with a LoRA merged into the kernels), which then becomes the frozen base; that site's
held-out numbers are marked as biased.

Writes benchmarks/results/leave_one_out[_quick]<tag>.{json,md} and *_accuracy.png,
*_rank.png, *_path_<site>.png (the figures from the first seed).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
  if str(_p) not in sys.path:
    sys.path.insert(0, str(_p))

import numpy as np  # noqa: E402

import controls  # noqa: E402
import seed_summary  # noqa: E402

DEFAULT_DATA = "sites:digits"
PATH_POINTS = np.linspace(0.0, 1.5, 16)    # λ2/λ* of the path rows (1: simplex from there)
HOOKS = {"report": "report_task", "segmentation": "segmentation_task"}
ENCODER_POOLING = "cls"


# --- arguments ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See the module doc.",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--task", default="classification",
                 choices=("classification",) + tuple(HOOKS),
                 help="classification (here), or dispatch to benchmarks/<task>_task.py; the "
                      "remaining options then go to that script")
  p.add_argument("--data", action="append", metavar="URI",
                 help="one site per URI (repeat), or a family URI (default sites:digits); "
                      "all sites must share one label set")
  p.add_argument("--data-root", default=None, help="folder with the dataset files (medmnist npz)")
  p.add_argument("--model", default="demo",
                 help="'demo' (the demo's foundation ViT) or an HF ViT classification folder")
  p.add_argument("--head-site", default=None,
                 help="site whose train split fits a new head when the label set differs "
                      "from the model's (default: the first site)")
  p.add_argument("--rank", type=int, default=4)
  p.add_argument("--targets", default="query,value",
                 help="comma-separated adapted modules (default query,value, as the demo)")
  p.add_argument("--epochs", type=int, default=6)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--lam1", type=float, default=1.0, help="temperature of 'sim'")
  p.add_argument("--lam2", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0],
                 help="ℓ1 weights of 'sparse' to run (seeds' default: 10 for vision)")
  p.add_argument("--lam2-rel", type=float, nargs="*", default=[0.5],
                 help="scale-free ℓ1 weights of 'sparse' to run: λ2 = c·λ* per target, λ* "
                      "its exact-penalty threshold (0: lin, 1: simplex; default 0.5)")
  p.add_argument("--seeds", type=int, nargs="+", default=None,
                 help="run the whole experiment once per seed (data draws, adapter training; "
                      "the foundation stays the demo's) and report mean ± standard error "
                      "over the seeds (default: --seed only)")
  p.add_argument("--control-k", type=int, default=3,
                 help="k of the 'random' control (k adapters drawn uniformly, uniform "
                      "weights), of its like-for-like 'avg (top-k)' row and of 'arrow (top-k)'")
  p.add_argument("--random-draws", type=int, default=controls.RANDOM_DRAWS,
                 help="draws of the 'random' control per held-out site")
  p.add_argument("--arrow-lam1", type=float, default=None,
                 help="temperature of 'arrow' (sim weights on Arrow distances in [0, 2]; "
                      "default: --lam1)")
  p.add_argument("--no-ablations", action="store_true",
                 help="skip the seeds' Table 6 ablations (k=1, +own)")
  p.add_argument("--path-site", nargs="*", default=[],
                 help="held-out sites whose whole λ2 path (weights, error, accuracy against "
                      "λ2/λ*) is solved, scored and drawn (*_path_<site>.png)")
  p.add_argument("--tag", default="", help="suffix of the output files' names")
  p.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                 help="run nothing: rewrite the tables and figures of a saved run's JSON")
  p.add_argument("--held-out", nargs="+", default=None, help="only these sites (names)")
  p.add_argument("--quick", action="store_true",
                 help="3 held-out sites and λ2 in {0.1, 10} only (the library is still "
                      "built in full)")
  p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
  return p


def site_name(uri: str) -> str:
  """A library name for a site URI: the built-in member, else the dataset part."""
  scheme, _, rest = uri.partition(":")
  if scheme in ("sites", "tasks"):
    rest = rest.split("/", 1)[-1]
  elif scheme == "folder":
    rest = Path(rest).name
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", rest).strip("_") or "site"


def site_uris(data: list[str] | None) -> list[str]:
  from rpe_jax.tasks import images as data_lib
  uris = [m for uri in (data or [DEFAULT_DATA]) for m in data_lib.members(uri)]
  if len(uris) < 3:
    raise SystemExit(f"--data: leave-one-out needs at least 3 sites (one URI per site, or a "
                     f"family URI); got {uris}")
  names = [site_name(u) for u in uris]
  if len(set(names)) != len(names):
    raise SystemExit(f"--data: sites must have distinct names, got {names}")
  return uris


# --- the base model and the library ---------------------------------------------------------

def _uses_demo_cache(args, uris) -> bool:
  from rpe_jax.tasks import images as data_lib
  from rpe_jax import demo
  return (args.model == "demo" and uris == data_lib.members(DEFAULT_DATA)
          and _targets(args) == ("query", "value")
          and (args.rank, args.epochs, args.lr, args.seed) == (4, demo.ADAPTER_EPOCHS, 3e-3,
                                                               demo.SEED))


def _targets(args) -> tuple[str, ...]:
  return tuple(t.strip() for t in args.targets.split(",") if t.strip())


def _cache_folder(args, uris) -> Path:
  key = json.dumps({"uris": uris, "model": str(args.model), "rank": args.rank,
                    "targets": _targets(args),
                    "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
                    "head_site": args.head_site, "v": 1}, sort_keys=True)
  return args.out / "loo_cache" / hashlib.sha1(key.encode()).hexdigest()[:12]


def _with_head(model, splits, seed, epochs, rank, targets):
  """The base with a head for the sites' labels: head + LoRA trained on one site, the LoRA
  merged into the kernels, so that the result is again a plain frozen base."""
  from rpe_jax.compose import merge_into, with_adapter
  from rpe_jax.tasks.classification import TrainConfig, train_adapter
  result = train_adapter(model, splits.train, splits.val,
                         TrainConfig(rank=rank, epochs=epochs, seed=seed, targets=targets,
                                     train_head=True),
                         progress=True)
  return with_adapter(merge_into(result.model, result.adapter), {})


def base_and_library(args, uris, splits):
  """(model, library, head_site or None); builds (once) what the configuration needs."""
  from models import hf
  from rpe_jax import demo, prototypes
  from rpe_jax.library.catalog import Library
  from rpe_jax import load_model
  from rpe_jax.tasks.classification import TrainConfig, train_adapter
  if _uses_demo_cache(args, uris):
    model = demo.foundation()
    return model, demo.library(model), None
  folder = _cache_folder(args, uris)
  head_site = None
  if (folder / "library" / "catalog.sqlite").exists():
    meta = json.loads((folder / "base.json").read_text())
    return (hf.load(folder / "base"), Library.open(folder / "library", readonly=True),
            meta["head_site"])
  # A run stopped half-way leaves a partial folder: start it again from nothing.
  shutil.rmtree(folder, ignore_errors=True)
  folder.mkdir(parents=True)
  model = load_model(args.model)
  first = splits[uris[0]].train
  if getattr(model.config, "num_labels", None) != first.num_classes:
    head_site = args.head_site or site_name(uris[0])
    by_name = {site_name(u): u for u in uris}
    if head_site not in by_name:
      raise SystemExit(f"--head-site {head_site!r} is not one of the sites {list(by_name)}")
    model = _with_head(model, splits[by_name[head_site]], args.seed, args.epochs, args.rank,
                       _targets(args))
  hf.save(model, folder / "base")
  (folder / "base.json").write_text(json.dumps({"head_site": head_site}))
  lib = Library.create(folder / "library")
  # One shared head: the site adapters are LoRA only, so that they compose.
  config = TrainConfig(rank=args.rank, epochs=args.epochs, lr=args.lr, seed=args.seed,
                       targets=_targets(args), train_head=False)
  for uri in uris:
    result = train_adapter(model, splits[uri].train, splits[uri].val, config, progress=True)
    proto = prototypes.prototype(model, splits[uri].train, ENCODER_POOLING)
    lib.add(site_name(uri), result.adapter, proto.z, base_model=f"loo-{folder.name}",
            encoder=f"loo-{folder.name}/cls", n_samples=proto.n, pooling=ENCODER_POOLING,
            metadata={"data": uri, "val_accuracy": result.best_val_accuracy})
  lib.close()
  return model, Library.open(folder / "library", readonly=True), head_site


# --- the experiment -------------------------------------------------------------------------

def strategies(args) -> list[tuple[str, str, float | None, float | None]]:
  """(row label, strategy, λ2, λ2/λ*) of the composed rows."""
  rows = [("nearest", "nearest", 0.0, None), ("avg", "avg", 0.0, None),
          (f"sim (λ1={args.lam1:g})", "sim", 0.0, None), ("lin", "lin", 0.0, None),
          ("simplex", "simplex", 0.0, None)]
  return (rows + [(f"sparse (λ2={lam:g})", "sparse", lam, None) for lam in args.lam2]
          + [(rel_label(c), "sparse", None, c) for c in args.lam2_rel])


def rel_label(c: float) -> str:
  return f"sparse (λ2={c:g}·λ*)"


def accuracy_with(model, adapter, test) -> float:
  """Test accuracy of ``model`` + ``adapter``, the adapter merged into the kernels: the
  same function as running it unmerged, but every adapter gives the same graph, so one
  compiled evaluation serves all ranks (a composition's rank varies with its weights)."""
  from rpe_jax.compose import merge_into
  from rpe_jax.tasks.classification import evaluate
  return evaluate(merge_into(model, adapter) if adapter else model, test)


def _compose_eval(model, lib, z, test, strategy, k, lam1, lam2, exclude, lam2_rel=None):
  from rpe_jax.pipeline import compose_targets
  found, w, composed, kept = compose_targets(lib, z[None], k=k, strategy=strategy, lam1=lam1,
                                             lam2=None if lam2_rel is not None else lam2,
                                             lam2_rel=lam2_rel, exclude=exclude)
  names = [str(n) for n in found.names[0]]
  weights = dict(zip(names, np.asarray(w.weights[0], float).round(4).tolist()))
  return accuracy_with(model, composed[0], test), weights, float(w.error[0])


def _ranks(values, descending=False) -> np.ndarray:
  from scipy.stats import rankdata
  v = -np.asarray(values, float) if descending else np.asarray(values, float)
  return rankdata(v, method="average")


def run_classification(args) -> dict:
  """One seed (``args.seed``) of the experiment: every row for every held-out site."""
  from scipy.stats import spearmanr

  from rpe_jax.tasks import images as data_lib
  from rpe_jax import prototypes
  from rpe_jax.tasks.classification import evaluate
  t0 = time.perf_counter()
  uris = site_uris(args.data)
  names = [site_name(u) for u in uris]
  splits = {u: data_lib.load_splits(u, data_root=args.data_root, seed=args.seed) for u in uris}
  model, lib, head_site = base_and_library(args, uris, splits)
  build_s = time.perf_counter() - t0
  held = args.held_out or (names[-3:] if args.quick else names)
  unknown = sorted(set(held) - set(names))
  if unknown:
    raise SystemExit(f"--held-out: unknown sites {unknown}; sites: {names}")
  if args.quick:
    args.lam2 = [0.1, 10.0]
  adapters = {n: lib.load(n) for n in names}
  tests = {n: splits[u].test for n, u in zip(names, uris)}
  # Target prototypes from the unlabeled held-out test images, as the demo does.
  z = {n: prototypes.prototype(model, tests[n], ENCODER_POOLING).z for n in names}
  lib_z = dict(zip(lib.prototypes().names, lib.prototypes().matrix))

  # Single-adapter transfer: site j's adapter on site i's test set (diagonal = SFT).
  transfer = {i: {j: accuracy_with(model, adapters[j], tests[i]) for j in names}
              for i in held}
  sqdist = {i: {j: float(np.sum((z[i] - lib_z[j]) ** 2)) for j in names} for i in held}
  acc: dict[str, dict[str, float]] = {}
  weights: dict[str, dict[str, dict]] = {}
  errors: dict[str, dict[str, float]] = {}

  def put(row, site, value, w=None, err=None):
    acc.setdefault(row, {})[site] = value
    if w is not None:
      weights.setdefault(row, {})[site] = w
      errors.setdefault(row, {})[site] = err

  k = len(names) - 1
  ck = min(args.control_k, k)
  arrow_lib = controls.arrow_library(adapters)
  arrow_lam1 = args.lam1 if args.arrow_lam1 is None else args.arrow_lam1
  random_runs, arrow_d2 = {}, {}
  for i in held:
    put("pretrained", i, evaluate(model, tests[i]))
    put("SFT (own adapter)", i, transfer[i][i])
    for label, strategy, lam2, rel in strategies(args):
      put(label, i, *_compose_eval(model, lib, z[i], tests[i], strategy, k, args.lam1, lam2,
                                   [i], lam2_rel=rel))
    # Controls: like-for-like retrieval at k = control k, random subsets, Arrow prototypes.
    put(f"avg (top-{ck})", i,
        *_compose_eval(model, lib, z[i], tests[i], "avg", ck, args.lam1, 0.0, [i]))
    others = [j for j in names if j != i]
    random_runs[i] = controls.random_control(
        lambda a: accuracy_with(model, a, tests[i]), adapters, others, k=ck,
        draws=args.random_draws, seed=args.seed, site=i)
    put(f"random (k={ck})", i, random_runs[i]["mean"])
    x = controls.mean_layer_inputs(model, arrow_lib.paths,
                                   controls.classification_forward(model, tests[i].images))
    for kk in dict.fromkeys((ck, k)):
      chosen, w, d2 = controls.arrow_weights(arrow_lib, x, k=kk, lam1=arrow_lam1, exclude=[i])
      if kk == k:
        arrow_d2[i] = dict(zip(chosen, d2.round(5).tolist()))
      put(f"arrow (top-{kk})" if kk < k else "arrow (all)", i,
          accuracy_with(model, controls.combine_named(adapters, chosen, w), tests[i]),
          dict(zip(chosen, w.round(4).tolist())), float("nan"))
    if not args.no_ablations:
      # Ablations (seeds' Table 6).
      put("ablation k=1 (nearest only)", i,
          *_compose_eval(model, lib, z[i], tests[i], "avg", 1, args.lam1, 0.0, [i]))
      for label, strategy, lam2, rel in strategies(args)[1:]:
        put(f"ablation +own: {label}", i,
            *_compose_eval(model, lib, z[i], tests[i], strategy, k + 1, args.lam1, lam2, [],
                           lam2_rel=rel))
    print(f"seed {args.seed} held out {i}: " + ", ".join(
        f"{r} {acc[r][i]:.3f}" for r in acc if not r.startswith("ablation")), flush=True)
  paths = {i: lambda_path_scores(model, lib, adapters, z[i], tests[i], [i], k)
           for i in args.path_site if i in held}

  # Prototype-distance rank vs single-adapter transfer rank (seeds' Figure 3).
  rank_pairs, rho = {}, {}
  for i in held:
    others = [j for j in names if j != i]
    dr = _ranks([sqdist[i][j] for j in others])
    tr = _ranks([transfer[i][j] for j in others], descending=True)
    rank_pairs[i] = {"others": others, "distance_rank": dr.tolist(),
                     "transfer_rank": tr.tolist()}
    r = spearmanr(dr, tr).statistic
    rho[i] = None if not np.isfinite(r) else float(r)
  all_d = np.concatenate([rank_pairs[i]["distance_rank"] for i in held])
  all_t = np.concatenate([rank_pairs[i]["transfer_rank"] for i in held])
  pooled = float(spearmanr(all_d, all_t).statistic)
  pooled = pooled if np.isfinite(pooled) else None
  return {"seed": args.seed, "sites": names, "uris": uris, "held_out": held, "k": k,
          "control_k": ck, "lam1": args.lam1, "arrow_lam1": arrow_lam1,
          "lam2": args.lam2, "lam2_rel": args.lam2_rel, "head_site": head_site,
          "accuracy": acc, "weights": weights,
          "reconstruction_error": errors, "random": random_runs, "arrow_sqdist": arrow_d2,
          "lambda_path": paths,
          "transfer": transfer, "sqdist": sqdist, "rank_pairs": rank_pairs,
          "spearman": {"per_site": rho, "pooled": pooled},
          "n_test": {i: len(tests[i]) for i in held},
          "library_build_or_load_s": round(build_s, 1),
          "total_s": round(time.perf_counter() - t0, 1)}


def lambda_path_scores(model, lib, adapters, z, test, exclude, k) -> dict:
  """The whole ``sparse`` path of one target (``weighting.lambda_path`` at ``PATH_POINTS``
  × λ*, k = all others), each point composed exactly and scored: {"rel", "lam", "lam_star",
  "names", "weights", "error", "l1", "accuracy"}."""
  from rpe_jax import weighting
  found = lib.query(z[None], k, exclude=exclude)
  path = weighting.lambda_path(found.references[0], z, PATH_POINTS, relative=True)
  names = [str(n) for n in found.names[0]]
  w = np.asarray(path.weights, np.float64)
  return {"rel": PATH_POINTS.tolist(), "lam": np.asarray(path.lam).tolist(),
          "lam_star": float(path.lam_star), "names": names, "weights": w.round(5).tolist(),
          "error": np.asarray(path.error).tolist(), "l1": np.asarray(path.l1).tolist(),
          "accuracy": [accuracy_with(model, controls.combine_named(adapters, names, row), test)
                       for row in w]}


# --- tables and figures ---------------------------------------------------------------------

def accuracy_table(report) -> str:
  held = report["held_out"]
  mark = lambda s: f"{s}*" if s == report["head_site"] else s
  lines = ["| method | " + " | ".join(mark(s) for s in held) + " | mean |",
           "|---|" + "---:|" * (len(held) + 1)]
  for row, per in report["accuracy"].items():
    vals = [per[s] for s in held]
    lines.append(f"| {row} | " + " | ".join(f"{v:.3f}" for v in vals)
                 + f" | **{np.mean(vals):.3f}** |")
  return "\n".join(lines)


def weights_table(report, rows=("sim", "lin", "simplex", "sparse (λ2=0.1)",
                                "sparse (λ2=10)")) -> str:
  """Per held-out site: squared prototype distance and the weights of a few strategies."""
  out = []
  labels = [r for r in report["weights"] if not r.startswith("ablation")
            and any(r.startswith(p) for p in rows)]
  for i in report["held_out"]:
    others = [j for j in report["sites"] if j != i]
    out.append(f"held out **{i}**\n")
    out.append("| adapter | distance² | transfer acc | " + " | ".join(labels) + " |")
    out.append("|---|---:|---:|" + "---:|" * len(labels))
    for j in sorted(others, key=lambda j: report["sqdist"][i][j]):
      cells = [f"{report['weights'][r][i].get(j, 0.0):+.3f}" for r in labels]
      out.append(f"| {j} | {report['sqdist'][i][j]:.3g} | {report['transfer'][i][j]:.3f} | "
                 + " | ".join(cells) + " |")
    out.append("")
  return "\n".join(out)


def transfer_table(report) -> str:
  sites = report["sites"]
  lines = ["| held out \\ adapter | " + " | ".join(sites) + " |",
           "|---|" + "---:|" * len(sites)]
  for i in report["held_out"]:
    lines.append(f"| {i} | " + " | ".join(f"{report['transfer'][i][j]:.3f}" for j in sites)
                 + " |")
  sp = report["spearman"]
  per = ", ".join(f"{s} {v:+.2f}" if v is not None else f"{s} n/a"
                  for s, v in sp["per_site"].items())
  pooled = "n/a" if sp["pooled"] is None else f"{sp['pooled']:+.3f}"
  lines += ["", f"Spearman ρ (distance rank vs transfer rank): pooled {pooled}; "
            f"per site: {per}."]
  return "\n".join(lines)


def weight_summary_table(report) -> str:
  """Per strategy, means over held-out sites: ‖z − Σ w_i z_i‖², ‖w‖₁, adapters with w ≠ 0."""
  held = report["held_out"]
  lines = ["| strategy | reconstruction error ‖z − Σ w_i z_i‖² | ‖w‖₁ | non-zero weights | "
           "negative weights |", "|---|---:|---:|---:|---:|"]
  for row, per in report["weights"].items():
    if row.startswith("ablation"):
      continue
    ws = [np.asarray(list(per[s].values())) for s in held]
    err = np.mean([report["reconstruction_error"][row][s] for s in held])
    err = "–" if not np.isfinite(err) else f"{err:.3g}"   # arrow: not a reconstruction
    lines.append(f"| {row} | {err} | {np.mean([np.abs(w).sum() for w in ws]):.2f} | "
                 f"{np.mean([np.count_nonzero(w) for w in ws]):.1f} | "
                 f"{np.mean([np.sum(w < 0) for w in ws]):.1f} |")
  d = [v for i in held for j, v in report["sqdist"][i].items() if j != i]
  lines += ["", f"Squared prototype distances to the other sites: median {np.median(d):.3g}, "
            f"range {min(d):.3g}–{max(d):.3g}."]
  return "\n".join(lines)


def plot_path(path: dict, file, site: str, seed: int) -> None:
  """``rpe_jax.weight_path_plot.plot_lambda_path`` of a stored path (one seed)."""
  from rpe_jax.weight_path_plot import plot_lambda_path
  from rpe_jax.weighting import LambdaPath
  n = len(path["rel"])
  lp = LambdaPath(np.asarray(path["lam"]), np.float64(path["lam_star"]),
                  np.asarray(path["weights"]), np.asarray(path["error"]),
                  np.asarray(path["l1"]), np.zeros(n, np.int32))
  plot_lambda_path(lp, file, names=path["names"],
                   title=f"held out {site} (seed {seed}): sparse weights along λ2/λ*")


def plot_accuracy(report, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  held = report["held_out"]
  rows = [r for r in report["accuracy"] if not r.startswith("ablation")]
  fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(held) + 2), 4))
  width = 0.85 / len(rows)
  x = np.arange(len(held) + 1)
  cmap = plt.get_cmap("tab20")
  for n, row in enumerate(rows):
    vals = [report["accuracy"][row][s] for s in held]
    ax.bar(x + n * width, vals + [np.mean(vals)], width, label=row, color=cmap(n % 20))
  ax.set_xticks(x + 0.425 - width / 2, held + ["mean"])
  ax.set_ylabel("held-out test accuracy")
  ax.set_ylim(0, 1.05)
  ax.set_title(f"Leave-one-out composition (k = {report['k']}, no target labels)")
  ax.legend(fontsize=7, ncol=5, loc="lower center", bbox_to_anchor=(0.5, -0.42))
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def plot_ranks(report, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rng = np.random.default_rng(0)
  fig, ax = plt.subplots(figsize=(5.2, 4.6))
  cmap = plt.get_cmap("tab10")
  for n, i in enumerate(report["held_out"]):
    p = report["rank_pairs"][i]
    d = np.asarray(p["distance_rank"]) + rng.uniform(-0.12, 0.12, len(p["distance_rank"]))
    t = np.asarray(p["transfer_rank"]) + rng.uniform(-0.12, 0.12, len(p["transfer_rank"]))
    ax.scatter(d, t, s=22, color=cmap(n % 10), label=i, alpha=0.85)
  m = len(report["sites"]) - 1
  ax.plot([1, m], [1, m], "k--", lw=0.8)
  ax.set_xlabel("rank by prototype distance (1 = nearest)")
  ax.set_ylabel("rank by single-adapter transfer accuracy (1 = best)")
  pooled = report["spearman"]["pooled"]
  ax.set_title("Spearman ρ = " + ("n/a" if pooled is None else f"{pooled:+.2f}") + " (pooled)")
  ax.legend(fontsize=7, title="held out", title_fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --- entry point ----------------------------------------------------------------------------

def _dispatch(task: str, argv: list[str]):
  """Hand the remaining arguments to the task's own script (imported only now)."""
  try:
    module = importlib.import_module(HOOKS[task])
  except ImportError as e:
    raise SystemExit(f"--task {task}: benchmarks/{HOOKS[task]}.py is not importable ({e})")
  if not (hasattr(module, "add_arguments") and hasattr(module, "run")):
    raise SystemExit(f"--task {task}: benchmarks/{HOOKS[task]}.py has no add_arguments/run")
  parser = argparse.ArgumentParser(prog=f"leave_one_out.py --task {task}",
                                   description=(module.__doc__ or "").split("\n\n")[0])
  module.add_arguments(parser)
  return module.run(parser.parse_args(argv))


def run_seeds(args) -> list[dict]:
  """``run_classification`` once per seed of ``--seeds`` (else ``--seed``)."""
  reports = []
  for seed in args.seeds or [args.seed]:
    one = copy.copy(args)
    one.seed, one.lam2 = seed, list(args.lam2)
    reports.append(run_classification(one))
  return reports


def seed_text(report) -> str:
  """The one-seed tables (as before the seeds option existed)."""
  head = (f"\nNote: the head was fitted on {report['head_site']!r} (marked *): its column is "
          "biased.\n" if report["head_site"] else "")
  return "\n\n".join([
      f"Seed {report['seed']}. Sites: {', '.join(report['sites'])}; k = {report['k']}; "
      f"λ1 = {report['lam1']}; controls at k = {report['control_k']}; library built/loaded in "
      f"{report['library_build_or_load_s']} s, total {report['total_s']} s." + head,
      "### Held-out test accuracy\n\n" + accuracy_table(report),
      "### The random control: spread over its draws\n\n" + seed_summary.random_table(report),
      "### Single-adapter transfer (rows: held-out test set; columns: adapter)\n\n"
      + transfer_table(report),
      "### Weights: summary (means over held-out sites)\n\n" + weight_summary_table(report),
      "### Weights per held-out site\n\n" + weights_table(report)])


def main(argv: list[str] | None = None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--per-sample" in argv:   # dataset-level vs per-sample: benchmarks/per_sample_loo.py
    import per_sample_loo
    return per_sample_loo.main([a for a in argv if a != "--per-sample"])
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--task", default="classification")
  known, rest = pre.parse_known_args(argv)
  if known.task in HOOKS:
    return _dispatch(known.task, rest)
  args = build_parser().parse_args(argv)
  t0 = time.perf_counter()
  if args.from_json:
    saved = json.loads(args.from_json.read_text())
    reports, seconds = saved.get("seeds", [saved]), saved.get("seconds")
    stem = args.from_json.with_suffix("")
  else:
    reports = run_seeds(args)
    seconds = time.perf_counter() - t0
    stem = args.out / (("leave_one_out_quick" if args.quick else "leave_one_out") + args.tag)
  stem.parent.mkdir(parents=True, exist_ok=True)
  parts = []
  if len(reports) > 1:
    seconds = seconds or sum(r["total_s"] for r in reports)
    parts.append(seed_summary.seeds_text(reports, seconds,
                                         [rel_label(c) for c in reports[0]["lam2_rel"]]))
  parts += [seed_text(r) for r in reports]
  text = "\n\n".join(parts)
  print(text)
  stem.with_suffix(".md").write_text(text + "\n")
  stem.with_suffix(".json").write_text(json.dumps(
      reports[0] if len(reports) == 1 else {"seeds": reports, "seconds": seconds}, indent=2))
  plot_accuracy(reports[0], f"{stem}_accuracy.png")
  plot_ranks(reports[0], f"{stem}_rank.png")
  for site, path in reports[0]["lambda_path"].items():
    plot_path(path, f"{stem}_path_{site}.png", site, reports[0]["seed"])
  print(f"\nwrote {stem}.json, .md, _accuracy.png, _rank.png"
        + "".join(f", _path_{s}.png" for s in reports[0]["lambda_path"]))
  return reports[0] if len(reports) == 1 else reports


if __name__ == "__main__":
  main()

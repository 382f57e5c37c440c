"""The leave-one-out loop of the task hooks, written once against the task contract.

``segmentation_task.py`` and ``report_task.py`` each build their frozen base with their
task's own builder and hand it here, with the members (name → dataset URI):

* ``cached``: a folder built once, atomically (a stopped run leaves no half-built cache);
* ``build_library``: one adapter per member, trained by ``task.train(tm, uri, options)`` and
  stored in a real ``Library`` with the prototype of its train split under the frozen base
  (``task.prototype``) and ``metadata["task"]``;
* ``held_out_scores``: for each held-out member, its test split is the target; its
  prototype alone (no label) weighs the other members' adapters with every strategy of
  ``rpe_jax.weighting.STRATEGIES`` (``pipeline.compose_targets``, the member excluded), and
  ``pipeline.predict_targets`` scores each composition, the base (no adapter) and the
  member's own library adapter (``own``: an upper reference the composition never sees);
  with ``lam2_rel`` also ``sparse`` at each scale-free λ2 = c·λ*, and with ``controls``
  the rows of ``benchmarks/controls.py``: ``random`` (k of the others drawn uniformly,
  uniform weights; mean over the draws), ``avg (top-k)`` and ``arrow`` (Arrow prototypes
  against the mean input of each adapted layer over the target, from ``arrow_forward``);
* ``write_outputs``: the markdown table, the JSON and the bar plot.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from held_out_table import markdown_table, plot_bars


def options_key(options: dict) -> str:
  """A short hash of everything that shapes a cached folder, so a change rebuilds it."""
  return hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]


def cached(folder: Path, build) -> Path:
  """``folder``, made by ``build(tmp)`` the first time: into a fresh sibling folder that is
  renamed into place only once ``build`` succeeded."""
  folder = Path(folder)
  if folder.is_dir():
    return folder
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
  try:
    build(tmp)
    os.replace(tmp, folder)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return folder


def build_library(task, tm, members: dict[str, str], options, folder: Path, *,
                  base_model: str):
  """The library of ``members`` (name → dataset URI) under ``tm``'s frozen base, built once
  in ``folder`` and opened read-only: per member, ``task.train``'s adapter, the prototype of
  the train split it was trained on, and metadata (task, data URI, training summary)."""
  from rpe_jax.library.catalog import Library
  t0 = time.perf_counter()

  def build(tmp):
    lib = Library.create(tmp)
    for name, uri in members.items():
      trained = task.train(tm, uri, options)
      proto = task.prototype(tm, trained.train_data)
      lib.add(name, trained.adapter, proto.z, base_model=base_model,
              encoder=f"{base_model}/{task.pooling}", n_samples=proto.n,
              pooling=task.pooling,
              metadata={"task": task.name, "data": uri, "train": trained.summary})
      s = trained.summary
      print(f"trained {name}: val {task.metric} {s['initial_val']:.3f} → {s['val']:.3f} "
            f"({s['steps']} steps, {time.perf_counter() - t0:.0f} s)", flush=True)
    lib.close()

  cached(folder, build)
  return Library.open(folder, readonly=True)


def held_out_scores(task, tm, lib, members: dict[str, str], *, k: int | None, lam1: float,
                    lam2: float, seed: int, predict_options: dict, lam2_rel=(),
                    controls: dict | None = None) -> dict:
  """Every held-out member's scores (see the module docstring).

  ``controls``: None, or {"k": k of the controls, "draws": random draws, "arrow_forward":
  None or a function (tm, target) → a no-argument forward pass of ``tm.model`` over the
  target (its adapted layers' inputs give Arrow's target vector), "arrow_lam1"}.

  Returns {"scores": {metric: {row: {member: value}}}, "weights": {strategy: {member:
  {adapter: w}}}, "reconstruction_error": {strategy: {member: ‖z − Σ w_i z_i‖²}}, "k",
  "random": {member: the random control's draws}}.
  """
  from rpe_jax.pipeline import compose_targets, predict_targets
  from rpe_jax.weighting import STRATEGIES
  k = len(lib.names()) - 1 if k is None else min(k, len(lib.names()) - 1)
  rows = [(s, s, lam2, None) for s in STRATEGIES] + [
      (f"sparse (λ2={c:g}·λ*)", "sparse", None, c) for c in lam2_rel]
  adapters = {n: lib.load(n) for n in members} if controls else {}
  scores: dict[str, dict] = {}
  weights: dict[str, dict] = {}
  errors: dict[str, dict] = {}
  random_runs: dict[str, dict] = {}
  for held, uri in members.items():
    target = task.load(uri, "test", seed=seed)
    z = task.prototype(tm, target).z

    def score(adapter) -> dict:
      _, metrics = predict_targets(task, tm, [target], [adapter], evaluate=True,
                                   **predict_options)
      return {m: float(v) for m, v in metrics[0].items()}

    def put(row, adapter=None, values=None):
      for metric, value in (values or score(adapter)).items():
        scores.setdefault(metric, {}).setdefault(row, {})[held] = value

    def composed(row, strategy, kk, lam2_abs, rel):
      result = compose_targets(lib, z[None], k=kk, strategy=strategy, lam1=lam1,
                               lam2=lam2_abs, lam2_rel=rel, exclude=[held])
      names = [str(n) for n in result.retrieval.names[0]]
      w = np.asarray(result.weights.weights[0], float)
      weights.setdefault(row, {})[held] = dict(zip(names, w.round(4).tolist()))
      errors.setdefault(row, {})[held] = float(result.weights.error[0])
      put(row, result.adapters[0])

    put("base", {})
    put("own", lib.load(held))
    for row, strategy, lam2_abs, rel in rows:
      composed(row, strategy, k, lam2_abs, rel)
    if controls:
      _control_rows(task, tm, target, held, adapters, k, controls, seed, score, put,
                    composed, weights, random_runs)
    per = scores[task.metric]
    print(f"held out {held}: " + ", ".join(f"{r} {per[r][held]:.3f}" for r in per), flush=True)
  return {"scores": scores, "weights": weights, "reconstruction_error": errors, "k": k,
          "random": random_runs}


def _control_rows(task, tm, target, held, adapters, k, controls, seed, score, put, composed,
                  weights, random_runs) -> None:
  """The rows of ``benchmarks/controls.py`` for one held-out member (see held_out_scores)."""
  import controls as ctl
  ck = min(controls["k"], k)
  others = [n for n in adapters if n != held]
  composed(f"avg (top-{ck})", "avg", ck, 0.0, None)
  subsets = ctl.random_subsets(others, ck, controls["draws"], seed=seed, site=held)
  per_draw = [score(ctl.uniform_composition(adapters, s)) for s in subsets]
  headline = [d[task.metric] for d in per_draw]
  random_runs[held] = {"mean": float(np.mean(headline)),
                       "std": float(np.std(headline, ddof=1)) if len(headline) > 1 else 0.0,
                       "scores": headline, "subsets": [list(s) for s in subsets]}
  put(f"random (k={ck})", values={m: float(np.mean([d[m] for d in per_draw]))
                                  for m in per_draw[0]})
  if controls.get("arrow_forward") is None:
    return
  arrow_lib = ctl.arrow_library(adapters)
  x = ctl.mean_layer_inputs(tm.model, arrow_lib.paths, controls["arrow_forward"](tm, target))
  for kk in dict.fromkeys((ck, k)):
    chosen, w, _ = ctl.arrow_weights(arrow_lib, x, k=kk, lam1=controls["arrow_lam1"],
                                     exclude=[held])
    row = f"arrow (top-{kk})" if kk < k else "arrow (all)"
    weights.setdefault(row, {})[held] = dict(zip(chosen, w.round(4).tolist()))
    put(row, ctl.combine_named(adapters, chosen, w))


def write_outputs(stem: Path, args, task, members, result: dict, seconds: dict, *,
                  ylabel: str, ylim=None, note: str = "") -> str:
  """Print and write ``stem``.md (one table per metric), .json (everything) and .png (the
  headline metric's bars); returns the headline table."""
  columns = list(members)
  tables = {m: markdown_table(per, columns) for m, per in result["scores"].items()}
  spread = result.get("random") or {}
  spread_text = ([f"The random control ({task.metric}, over its draws): " + "; ".join(
      f"{m} {r['mean']:.3f} ± {r['std']:.3f} (std, {len(r['scores'])} draws; "
      f"{min(r['scores']):.3f} – {max(r['scores']):.3f})" for m, r in spread.items()) + "."]
      if spread else [])
  text = "\n\n".join(
      [f"{task.name}: held-out {metric} (rows: base, own adapter, composition strategy; "
       f"k = {result['k']})\n\n{table}" for metric, table in tables.items()]
      + spread_text + ([note] if note else [])
      + ["seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())])
  print("\n" + text)
  meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
  stem.parent.mkdir(parents=True, exist_ok=True)
  stem.with_suffix(".md").write_text(text + "\n")
  stem.with_suffix(".json").write_text(json.dumps(
      {"args": meta, "task": task.name, "metric": task.metric, "members": members,
       **result["scores"], "weights": result["weights"],
       "reconstruction_error": result["reconstruction_error"], "k": result["k"],
       "random": spread,
       "table": tables[task.metric], "seconds": seconds}, indent=2))
  plot_bars(result["scores"][task.metric], columns, stem.with_suffix(".png"), ylabel=ylabel,
            width_in=max(8.0, 1.4 * len(columns) + 2), ylim=ylim)
  print(f"wrote {stem}.md, .json and .png")
  return tables[task.metric]

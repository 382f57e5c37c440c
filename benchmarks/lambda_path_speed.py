"""Speed of ``weighting.lambda_path``: warm-started vs cold, against one solve per λ.

Problems: B targets, k reference prototypes of dimension d, prototype-like (``offset``:
zᵢ = 30·u + εᵢ, z = 30·u + 3·ε, a large common offset, targets mostly outside the hull so
λ* > 0), n values of λ2 = c·λ* with c evenly spaced on [0, 1.5].

Methods (each end-to-end from vectors to the path, λ* included; medians of --reps runs
after a warm-up call that also compiles, ``block_until_ready`` on every output):

* ``warm``: ``lambda_path(..., warm_start=True)``: one batched simplex solve for λ*, then the
  active-set method on all B·n members at once from the simplex solution (cold fallback
  only for members it does not finish; the ``warm%`` column says how many it finished).
  The active-set method changes one index per round and a batch runs to its slowest
  member, so its time grows with the number of support changes along the path (≈ k − |S|).
* ``cold``: ``lambda_path(..., warm_start=False)``: the same λ*, then ONE batched FISTA
  solve of all B·n members from w = 1/k.
* ``per-λ``: the peer a user writes today: n calls of ``compute_weights(..., "sparse",
  lam2=λ_j)`` (each batched over the B targets; λ_j differs per target, so λ* once, then one
  batched affine solve per λ index).

Agreement: the largest |w_warm − w_cold| and |w_warm − w_per-λ| over the path.

  python benchmarks/lambda_path_speed.py --quick
  python benchmarks/lambda_path_speed.py            # the default grid
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rpe_jax import weighting  # noqa: E402
from solvers import penalty_path, sparse_simplex  # noqa: E402


def problems(B, k, d, seed=0):
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(1, d))
  refs = 30 * u + rng.normal(size=(B, k, d))
  target = 30 * u[0] + 3 * rng.normal(size=(B, d))
  return refs.astype(np.float32), target.astype(np.float32)


def timed(fn, reps):
  out = jax.block_until_ready(fn())  # warm-up (compiles)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def per_lambda(refs, target, rel):
  th = penalty_path.exact_penalty_threshold(refs, target)
  ws = [sparse_simplex.solve(refs, target, c * th.lam_star).weights for c in rel]
  return np.stack([np.asarray(w) for w in ws], -2)


def run(B, k, d, n, reps):
  refs, target = problems(B, k, d)
  rel = np.linspace(0, 1.5, n)
  t_warm, warm = timed(lambda: weighting.lambda_path(refs, target, rel, relative=True, warm_start=True), reps)
  t_cold, cold = timed(lambda: weighting.lambda_path(refs, target, rel, relative=True, warm_start=False), reps)
  t_loop, loop = timed(lambda: per_lambda(refs, target, rel), reps)
  # how many members the warm active-set finished (no cold fallback)
  lams = np.asarray(warm.lam)
  th = penalty_path.exact_penalty_threshold(refs, target)
  warm_frac = float(np.mean(np.asarray(penalty_path.solve_path(refs, target, lams, init=th.weights).warm)))
  ww, wc = np.asarray(warm.weights), np.asarray(cold.weights)
  return dict(B=B, k=k, d=d, n=n, warm_s=t_warm, cold_s=t_cold, per_lambda_s=t_loop,
              cold_over_warm=t_cold / t_warm, per_lambda_over_warm=t_loop / t_warm, warm_finished=warm_frac,
              max_diff_warm_cold=float(np.abs(ww - wc).max()), max_diff_warm_per_lambda=float(np.abs(ww - loop).max()),
              status_ok=bool(np.all(np.asarray(warm.status) == 0) and np.all(np.asarray(cold.status) == 0)),
              lam_star_median=float(np.median(np.asarray(warm.lam_star))))


def table(rows, load):
  head = ("| B | k | d | n λ | warm ms | cold ms | per-λ ms | cold/warm | per-λ/warm | warm% | "
          "max|warm−cold| | max|warm−per-λ| | all converged |\n|" + "---|" * 13)
  lines = [head]
  for r in rows:
    lines.append(f"| {r['B']} | {r['k']} | {r['d']} | {r['n']} | {1e3 * r['warm_s']:.1f} | {1e3 * r['cold_s']:.1f} | "
                 f"{1e3 * r['per_lambda_s']:.1f} | {r['cold_over_warm']:.2f} | {r['per_lambda_over_warm']:.2f} | "
                 f"{100 * r['warm_finished']:.0f} | {r['max_diff_warm_cold']:.1e} | {r['max_diff_warm_per_lambda']:.1e} | "
                 f"{'yes' if r['status_ok'] else 'NO'} |")
  lines.append(f"\nfloat32, CPU ({jax.devices()[0].platform}), load average at start / end: {load[0]} / {load[1]}")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="one small configuration")
  p.add_argument("--reps", type=int, default=5)
  args = p.parse_args()
  grid = [(1, 8, 64, 32)] if args.quick else [(1, 8, 256, 32), (64, 8, 256, 32), (64, 32, 256, 32),
                                              (256, 16, 256, 16)]
  load0 = os.getloadavg()[0]
  rows = []
  for B, k, d, n in grid:
    rows.append(run(B, k, d, n, args.reps))
    print(json.dumps(rows[-1]), flush=True)
  text = table(rows, (f"{load0:.1f}", f"{os.getloadavg()[0]:.1f}"))
  print(text)
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "lambda_path_speed.json").write_text(json.dumps(rows, indent=1))
  (RESULTS / "lambda_path_speed.md").write_text(text + "\n")


if __name__ == "__main__":
  main()

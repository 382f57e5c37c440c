"""Ways to form a batch of k×k Gram matrices Z_b Z_bᵀ from jax on this CPU, against torch.bmm.

The weight solver's float32 time is bounded by forming these Grams (issue 17, item 3). This
times, in one process and interleaved (each repetition runs every variant once), on the same
[B, k, d] float32 batch:

* ``torch.bmm``                 the peer (MKL / oneDNN batched GEMM);
* ``einsum``                    one XLA batched dot over the whole batch;
* ``solver chunks``             what ``solvers.sparse_simplex`` does: centred Grams and
                                correlations, a few problems per ``fori_loop`` step (cache-sized);
* ``lax.map``                   one un-batched ``dot_general`` per problem in a loop;
* ``lax.map, batch_size=2``     two problems per loop step;
* ``lax.map, 1-thread Eigen``   the same, compiled with ``xla_cpu_multi_thread_eigen=False``;
* ``lax.map, oneDNN``           compiled with ``xla_cpu_use_onednn=True``;
* ``numpy.matmul``              host BLAS, for scale (not usable inside a jitted solver).

Compiler options are passed per call (``.compile(compiler_options=...)``), which is how a
library could set them for its own programs only. Every variant's result is checked against a
float64 product before it is timed.

  python benchmarks/gram_floor.py                  # B=1000, k=64, d=768
  python benchmarks/gram_floor.py --quick          # B=100
  python benchmarks/gram_floor.py --batch 10000 --json

Writes benchmarks/results/gram_floor.{md,json,png} (``--out`` changes the stem).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from solvers import sparse_simplex as ss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _gram(z):
  """z zᵀ for one [k, d] problem, contracting d in place (no transposed copy)."""
  return lax.dot_general(z, z, (((1,), (1,)), ((), ())))


def variants(Z, z):
  """name -> (zero-argument callable returning the [B, k, k] Grams, compile seconds)."""
  B, k, d = Z.shape
  chunk = ss._chunk(ss._GRAM_BYTES, (k + 1) * d * Z.dtype.itemsize)
  jitted = {
      "einsum": (lambda Z: jnp.einsum("bkd,bjd->bkj", Z, Z), {}),
      "solver chunks": (lambda Z: ss._map_chunks(ss._centred_gram, (Z, z), chunk)[0], {}),
      "lax.map": (lambda Z: lax.map(_gram, Z), {}),
      "lax.map, batch_size=2": (lambda Z: lax.map(_gram, Z, batch_size=2), {}),
      "lax.map, 1-thread Eigen": (lambda Z: lax.map(_gram, Z), {"xla_cpu_multi_thread_eigen": False}),
      "lax.map, oneDNN": (lambda Z: lax.map(_gram, Z), {"xla_cpu_use_onednn": True}),
  }
  out = {}
  for name, (fn, options) in jitted.items():
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(Z).compile(compiler_options=options)
    out[name] = ((lambda c=compiled: c(Z)), time.perf_counter() - t0)
  host = np.asarray(Z)
  out["numpy.matmul"] = (lambda: host @ host.transpose(0, 2, 1), 0.0)
  try:
    import torch
    Zt = torch.from_numpy(host)
    out["torch.bmm"] = (lambda: torch.bmm(Zt, Zt.transpose(1, 2)), 0.0)
  except ImportError:
    pass
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=1000)
  p.add_argument("--k", type=int, default=64)
  p.add_argument("--d", type=int, default=768)
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--quick", action="store_true", help="B=100, 3 repetitions")
  p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
  p.add_argument("--out", default=str(RESULTS / "gram_floor"), help="stem of the .md/.json/.png written")
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.reps = 100, 3
  if min(args.batch, args.k, args.d, args.reps) < 1:
    p.error("--batch, --k, --d and --reps must be positive")
  rng = np.random.default_rng(0)
  Zh = rng.standard_normal((args.batch, args.k, args.d), dtype=np.float32)
  Z, z = jnp.asarray(Zh), jnp.asarray(rng.standard_normal((args.batch, args.d), dtype=np.float32))
  fns = variants(Z, z)
  # Correctness first: every variant against float64 on a few members (the solver's Grams are
  # of the centred vectors, so its oracle is centred too).
  sub = Zh[:4].astype(np.float64)
  centred = sub - sub.mean(-2, keepdims=True)
  oracle = {False: sub @ sub.transpose(0, 2, 1), True: centred @ centred.transpose(0, 2, 1)}
  errors = {}
  for name, (fn, _) in fns.items():
    got = np.asarray(fn())[:4]
    want = oracle[name == "solver chunks"]
    errors[name] = float(np.abs(got - want).max() / np.abs(want).max())
    if errors[name] > 1e-5:
      raise SystemExit(f"{name}: relative error {errors[name]:.1e} against float64")
  times = {name: [] for name in fns}
  for _ in range(args.reps):   # interleaved, so drift in the machine's speed hits every variant
    for name, (fn, _) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  ref = float(np.median(times["torch.bmm"])) if "torch.bmm" in times else None
  rows = []
  for name, ts in times.items():
    t = float(np.median(ts))
    rows.append(dict(method=name, us_per_problem=1e6 * t / args.batch, min_us=1e6 * min(ts) / args.batch,
                     over_torch_bmm=t / ref if ref else None, compile_s=fns[name][1],
                     rel_error=errors[name]))
  meta = dict(batch=args.batch, k=args.k, d=args.d, reps=args.reps, jax=jax.__version__,
              gflop_per_problem=2 * args.k * args.k * args.d / 1e9)
  lines = [f"B={args.batch} k={args.k} d={args.d} float32, median of {args.reps} interleaved runs", "",
           "| method | µs / problem (median) | min | / torch.bmm | compile s | rel. error vs f64 |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    ratio = f"{r['over_torch_bmm']:.2f}" if r["over_torch_bmm"] else "—"
    lines.append(f"| {r['method']} | {r['us_per_problem']:.1f} | {r['min_us']:.1f} | {ratio} | "
                 f"{r['compile_s']:.2f} | {r['rel_error']:.1e} |")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
  _plot(rows, meta, out.with_suffix(".png"))
  print(json.dumps(dict(meta=meta, rows=rows), indent=1) if args.json else "\n".join(lines))
  return 0


def _plot(rows, meta, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 3.2))
  names = [r["method"] for r in rows]
  ax.barh(names, [r["us_per_problem"] for r in rows], color=["C1" if n == "torch.bmm" else "C0" for n in names])
  ax.invert_yaxis()
  ax.set_xlabel("µs per problem (median)")
  ax.set_title(f"batched Gram, B={meta['batch']} k={meta['k']} d={meta['d']} float32")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  sys.exit(main())

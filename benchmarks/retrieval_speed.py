"""Retrieval speed: rpe_jax exact top-k vs faiss IndexFlatL2 vs numpy, and the floor.

For N prototypes (d = 768, float32) and batches of B targets, k nearest by squared L2:

* ``rpe_jax``  — ``retrieval.search`` on a ``PrototypeIndex`` (what ``Library.query`` runs):
                 one jit product with the augmented rows [z_i, −‖z_i‖²/2], block-max top-k,
                 exact re-measure of the k winners; host in, host out (names looked up);
* ``floor``    — the bare [B, N] product z·z_i (jit matmul), no top-k: what any exact
                 search must at least compute;
* ``faiss``    — ``IndexFlatL2.search`` with ``distance_compute_blas_threshold = 20`` (its
                 default 128 000 sends a 64-query batch down its slow non-BLAS path);
* ``numpy``    — ‖z_i‖² − 2 Z z, argpartition, sort.

All run in the same process on the same data (medians after warm-up, ``block_until_ready``);
the neighbours of rpe_jax and faiss are compared at every N and B. Add throughput of small
adapters into a fresh library is measured too.

    .venv/bin/python benchmarks/retrieval_speed.py            # N = 1e4, 1e5, 1e6
    .venv/bin/python benchmarks/retrieval_speed.py --quick    # N = 1e4, 1e5, fewer repeats

Writes benchmarks/results/retrieval_speed.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rpe_jax import retrieval  # noqa: E402
from rpe_jax.library.catalog import Library  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved_times(fns: dict, *, rounds: int, budget_s: float, warmup: int = 1) -> dict:
  """Median and min seconds per function, timed in interleaved rounds.

  Other processes share the cores, so load drifts during a run; timing the contenders in
  alternation exposes them to the same drift, which keeps their ratios meaningful.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  start = time.perf_counter()
  for r in range(rounds):
    for name, fn in fns.items():
      # OpenMP / OpenBLAS worker threads spin for a while after a call; let them settle so
      # they do not steal a core from whichever contender runs next.
      time.sleep(0.05)
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
    if r >= 2 and time.perf_counter() - start > budget_s:
      break
  return {name: (statistics.median(t), min(t), len(t)) for name, t in times.items()}


def numpy_search(matrix, sqnorm, queries, k):
  score = sqnorm[None, :] - 2.0 * (queries @ matrix.T)
  part = np.argpartition(score, k - 1, axis=1)[:, :k]
  order = np.argsort(np.take_along_axis(score, part, 1), axis=1, kind="stable")
  idx = np.take_along_axis(part, order, 1)
  return idx


BARE_FLOOR_MAX_BYTES = 1 << 30


def bench_queries(n, d, k, batches, *, repeats, budget_s, on_row=None, seed=0):
  rng = np.random.default_rng(seed)
  queries = rng.standard_normal((max(batches), d), dtype=np.float32)
  # Memory: at N = 1e6 each copy is 3 GB and the machine is shared (a run holding four
  # copies was OOM-killed). Keep the index and faiss's own copy; numpy works on a
  # zero-copy view of the index. The floor gets its own bare [N, d] copy up to 1 GB;
  # above that it runs over the index's [N_pad, d + 1] rows with queries [z, 0]
  # (at N = 1e6: 0.05 % padding rows, 0.13 % extra column).
  index = retrieval.build_index([f"a{i}" for i in range(n)],
                                rng.standard_normal((n, d), dtype=np.float32))
  data = np.asarray(index.augmented)[:n, :d]  # zero-copy on CPU; strided rows
  flat = faiss.IndexFlatL2(d)
  for start in range(0, n, 65536):
    flat.add(np.ascontiguousarray(data[start:start + 65536]))
  bare_floor = n * d * 4 <= BARE_FLOOR_MAX_BYTES
  floor_matrix = jax.device_put(np.ascontiguousarray(data)) if bare_floor else index.augmented
  floor = jax.jit(retrieval.distance_matrix_product)
  sqnorm = np.einsum("nd,nd->n", data, data)
  rows = []
  threads = faiss.omp_get_max_threads()

  def faiss_single_thread(q):
    faiss.omp_set_num_threads(1)
    try:
      return flat.search(q, k)
    finally:
      faiss.omp_set_num_threads(threads)

  for b in batches:
    q = queries[:b]
    qj = jax.device_put(q if bare_floor else np.pad(q, ((0, 0), (0, 1))))
    t = interleaved_times({
        "floor": lambda: floor(floor_matrix, qj).block_until_ready(),
        "rpe": lambda: jax.block_until_ready(retrieval.search(index, q, k)),
        "faiss": lambda: flat.search(q, k),
        "faiss_1thread": lambda: faiss_single_thread(q),
        "numpy": lambda: numpy_search(data, sqnorm, q, k),
    }, rounds=repeats, budget_s=budget_s)
    # faiss gets the better of its thread settings (OpenMP spins badly on shared cores).
    faiss_key = min(("faiss", "faiss_1thread"), key=lambda key: t[key][0])
    ours = np.asarray(retrieval.search(index, q, k).indices)
    _, theirs = flat.search(q, k)
    same_sets = np.mean([set(a) == set(b_) for a, b_ in zip(ours, theirs)])
    same_order = float(np.mean(ours == theirs))
    same_numpy = float(np.mean(ours == numpy_search(data, sqnorm, q, k)))
    med = {key: v[0] for key, v in t.items()}
    rows.append(dict(
        n=n, batch=b, k=k, d=d, rounds=t["rpe"][2], floor_ms=med["floor"] * 1e3,
        floor_matrix="bare [N, d]" if bare_floor else "index [N_pad, d+1]",
        rpe_ms=med["rpe"] * 1e3, faiss_ms=med[faiss_key] * 1e3, faiss_setting=faiss_key,
        faiss_threads_ms=med["faiss"] * 1e3, faiss_1thread_ms=med["faiss_1thread"] * 1e3,
        numpy_ms=med["numpy"] * 1e3, min_ms={key: v[1] * 1e3 for key, v in t.items()},
        rpe_over_floor=med["rpe"] / med["floor"],
        rpe_over_floor_min=t["rpe"][1] / t["floor"][1],
        faiss_over_rpe=med[faiss_key] / med["rpe"], rpe_qps=b / med["rpe"],
        faiss_qps=b / med[faiss_key], same_neighbour_sets_as_faiss=float(same_sets),
        same_ranked_indices_as_faiss=same_order, same_ranked_indices_as_numpy=same_numpy,
        loadavg=os.getloadavg()[0]))
    r = rows[-1]
    print(f"  N={n:>8} B={b:>3}: floor {r['floor_ms']:8.2f}  rpe {r['rpe_ms']:8.2f}  "
          f"faiss {r['faiss_ms']:8.2f} ({faiss_key})  numpy {r['numpy_ms']:8.2f} ms  "
          f"rpe/floor {r['rpe_over_floor']:.2f} (min-based {r['rpe_over_floor_min']:.2f})  "
          f"same-as-faiss {same_sets:.3f}  load {r['loadavg']:.1f}", flush=True)
    if on_row is not None:
      on_row(rows)
  del index, floor_matrix, flat, data
  return rows


def bench_add(count, *, layers=4, d=768, rank=8, proto_dim=768):
  """Adds per second of small adapters (``layers`` × rank-``rank`` [d, d] LoRA layers)."""
  rng = np.random.default_rng(0)
  adapters = [{f"layers.{l}.attention.{p}.{f}": rng.standard_normal(
      (d, rank) if f == "a" else (rank, d), dtype=np.float32)
      for l in range(layers // 2) for p in ("query", "value") for f in ("a", "b")}
      for _ in range(min(count, 8))]
  size = sum(v.nbytes for v in adapters[0].values())
  with tempfile.TemporaryDirectory() as tmp:
    lib = Library.create(Path(tmp) / "lib")
    start = time.perf_counter()
    for i in range(count):
      lib.add(f"a{i}", adapters[i % len(adapters)], rng.standard_normal(proto_dim),
              base_model="bench", encoder="enc", n_samples=100)
    elapsed = time.perf_counter() - start
    lib.close()
  return dict(count=count, adapter_bytes=size, seconds=elapsed, adds_per_s=count / elapsed)


def markdown(rows) -> str:
  lines = ["| N | batch | floor (ms) | rpe_jax (ms) | faiss flat (ms) | numpy (ms) | "
           "rpe/floor (median; min) | faiss/rpe | rpe q/s | same neighbours as faiss |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    threads = "1 thr" if r["faiss_setting"] == "faiss_1thread" else "omp"
    lines.append(f"| {r['n']:,} | {r['batch']} | {r['floor_ms']:.2f} | {r['rpe_ms']:.2f} | "
                 f"{r['faiss_ms']:.2f} ({threads}) | {r['numpy_ms']:.2f} | "
                 f"{r['rpe_over_floor']:.2f}; {r['rpe_over_floor_min']:.2f} | "
                 f"{r['faiss_over_rpe']:.2f} | {r['rpe_qps']:,.0f} | "
                 f"{r['same_neighbour_sets_as_faiss']:.3f} |")
  return "\n".join(lines)


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  batches = sorted({r["batch"] for r in rows})
  fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
  for ax, b in zip(axes[0], batches):
    sel = [r for r in rows if r["batch"] == b]
    for key, label in (("floor_ms", "floor (jit matmul)"), ("rpe_ms", "rpe_jax"),
                       ("faiss_ms", "faiss IndexFlatL2"), ("numpy_ms", "numpy")):
      ax.loglog([r["n"] for r in sel], [r[key] for r in sel], "o-", label=label)
    ax.set(title=f"batch {b}, k={sel[0]['k']}, d={sel[0]['d']}", xlabel="prototypes N",
           ylabel="latency (ms, median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="N = 1e4, 1e5 and fewer repeats")
  parser.add_argument("--sizes", type=float, nargs="+", help="override the N values")
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
  parser.add_argument("-k", type=int, default=8)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--repeats", type=int, default=None, help="max timed runs per cell")
  parser.add_argument("--adds", type=int, default=None, help="adapters added for add speed")
  parser.add_argument("--out", type=Path, default=RESULTS / "retrieval_speed.json")
  args = parser.parse_args(argv)
  sizes = [int(s) for s in (args.sizes or ([1e4, 1e5] if args.quick else [1e4, 1e5, 1e6]))]
  repeats = args.repeats or (5 if args.quick else 11)
  faiss.cvar.distance_compute_blas_threshold = 20
  env = dict(jax=jax.__version__, faiss=faiss.__version__, numpy=np.__version__,
             device=str(jax.devices()[0]), cpu_count=os.cpu_count(),
             faiss_threads=faiss.omp_get_max_threads(), machine=platform.machine(),
             loadavg=os.getloadavg())
  print(f"environment: {env}", flush=True)
  rows, adds = [], None
  args.out.parent.mkdir(parents=True, exist_ok=True)

  def save_partial(current):  # after every row: a run cut short (OOM) keeps its results
    args.out.write_text(json.dumps(dict(environment=env, queries=rows + current, add=None,
                                        partial=True), indent=2))

  for n in sizes:
    rows += bench_queries(n, args.dim, args.k, args.batches, repeats=repeats,
                          budget_s=(4.0 if args.quick else 30.0), on_row=save_partial)
  adds = bench_add(args.adds or (10 if args.quick else 50))
  table = markdown(rows)
  print("\n" + table)
  print(f"\nadd: {adds['count']} adapters of {adds['adapter_bytes'] / 1024:.0f} KiB: "
        f"{adds['adds_per_s']:.1f} adds/s ({adds['seconds'] / adds['count'] * 1e3:.1f} ms each)")
  args.out.write_text(json.dumps(dict(environment=env, queries=rows, add=adds,
                                      loadavg_after=os.getloadavg()), indent=2))
  plot(rows, args.out.with_suffix(".png"))
  print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

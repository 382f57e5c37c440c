"""Factored re-truncation of a composed LoRA adapter vs the PEFT way (dense ΔW + full SVD).

Per Llama-8B-shaped layer (in × out = 4096 × 4096 and 4096 × 14336) and k rank-r adapters
with random weights, the composed update Σ_i w_i a_i b_i is truncated to rank r:

* ours:  ``truncate(concat(leaves, w), rank=r)`` under jax.jit, float32 — QR of the stacked
  factors, SVD of the (k·r × k·r) core; δW is never formed.
* PEFT:  what ``LoraModel._svd_generalized_task_arithmetic_weighted_adapter`` does, in
  torch float32: ΔW_i = (B_i @ A_i) · scaling, PEFT's own ``merge_utils.task_arithmetic``
  (stack, weigh, sum), ``torch.linalg.svd(ΔW, full_matrices=True)``, keep the top r.
  When PEFT's k dense deltas + stacks (3·k·in·out·4 bytes) would exceed --peft-mem-gb the
  dense sum is accumulated in place instead ("accum" mode: cheaper than real PEFT).

Both paths run with --threads BLAS/LAPACK/OpenMP/XLA threads (default 1, for both).
Every measurement runs in a fresh subprocess (MALLOC_MMAP_THRESHOLD_=65536 so freed
buffers leave the resident set). Peak extra memory = the rise of the process's peak RSS
(VmHWM, reset through /proc/self/clear_refs) over its RSS just before the measured call,
after warm-up; inputs are already resident and not counted, outputs are. For ours, XLA's
own figure (temp + output buffers from ``compiled.memory_analysis()``) is reported too,
as is XLA's figure for a dense-SVD JAX program (compiled, not run).

Also: the time to concatenate (exact composition, no truncation) and to merge the
concatenated adapter into a kernel (W + a @ b). Differences: ‖ΔW_ours − ΔW_peft‖_F /
‖ΔW_peft‖_F of the truncated updates and max |s_ours − s_peft| / s_1, in float64.

  python benchmarks/compose_speed.py --quick
  python benchmarks/compose_speed.py --shapes 4096x4096 --ks 5
  python benchmarks/compose_speed.py            # the full grid (dense SVDs take minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def make_factors(n_in: int, n_out: int, k: int, r: int, seed: int):
  """k random rank-r adapters in the canonical layout (a [in, r], b [r, out]) and weights."""
  rng = np.random.default_rng(seed)
  a = [(rng.standard_normal((n_in, r)) / np.sqrt(n_in)).astype(np.float32) for _ in range(k)]
  b = [(rng.standard_normal((r, n_out)) * rng.uniform(0.2, 2.0)).astype(np.float32)
       for _ in range(k)]
  w = rng.standard_normal(k).astype(np.float32)
  return a, b, w


def _status() -> dict[str, int]:
  out = {}
  for line in open("/proc/self/status"):
    if line.startswith(("VmHWM", "VmRSS")):
      key, val = line.split(":")
      out[key] = int(val.split()[0]) * 1024
  return out


def peak_extra_bytes(fn) -> tuple[object, int]:
  """Run fn once; return (result, peak RSS above the RSS just before the call)."""
  open("/proc/self/clear_refs", "w").write("5")     # reset the peak to the current RSS
  before = _status()["VmRSS"]
  result = fn()
  return result, _status()["VmHWM"] - before


def timed(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


# --- workers (each in its own process) ---

def worker_ours(args) -> dict:
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, str(ROOT))
  from models.lora import LoRA, concat, truncate

  a, b, w = make_factors(args.n_in, args.n_out, args.k, args.rank, args.seed)
  leaves = [LoRA(jnp.asarray(x), jnp.asarray(y)) for x, y in zip(a, b)]
  w = jnp.asarray(w)
  r = args.rank
  trunc = jax.jit(lambda ls, w: truncate(concat(ls, w), rank=r))
  cat = jax.jit(lambda ls, w: concat(ls, w))
  merge = jax.jit(lambda kern, leaf: kern + leaf.delta())
  kernel = jnp.asarray(np.random.default_rng(1).standard_normal((args.n_in, args.n_out),
                                                                dtype=np.float32))
  compiled = trunc.lower(leaves, w).compile()
  mem = compiled.memory_analysis()
  xla_ours = mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  dense_svd = jax.jit(lambda ls, w: jnp.linalg.svd(concat(ls, w).delta(), full_matrices=False))
  dmem = dense_svd.lower(leaves, w).compile().memory_analysis()
  xla_dense = dmem.temp_size_in_bytes + dmem.output_size_in_bytes - dmem.alias_size_in_bytes

  run = lambda: jax.block_until_ready(compiled(leaves, w))
  for _ in range(3):
    run()
  out, extra = peak_extra_bytes(run)
  t_trunc = timed(run, args.repeats)
  composed = jax.block_until_ready(cat(leaves, w))
  t_cat = timed(lambda: jax.block_until_ready(cat(leaves, w)), args.repeats)
  jax.block_until_ready(merge(kernel, composed))
  t_merge = timed(lambda: jax.block_until_ready(merge(kernel, composed)), args.repeats)
  np.savez(args.tmp, a=np.asarray(out.a), e=np.asarray(out.e), b=np.asarray(out.b))
  return dict(ours_ms=1e3 * statistics.median(t_trunc), ours_extra_bytes=extra,
              ours_xla_bytes=int(xla_ours), xla_dense_bytes=int(xla_dense),
              concat_ms=1e3 * statistics.median(t_cat),
              merge_ms=1e3 * statistics.median(t_merge), ours_repeats=args.repeats)


def worker_dense(args) -> dict:
  import torch
  from peft.utils.merge_utils import task_arithmetic

  a, b, w = make_factors(args.n_in, args.n_out, args.k, args.rank, args.seed)
  lora_a = [torch.from_numpy(x.T.copy()) for x in a]   # PEFT lora_A [r, in] = aᵀ
  lora_b = [torch.from_numpy(y.T.copy()) for y in b]   # PEFT lora_B [out, r] = bᵀ
  torch.set_num_threads(args.threads)
  r, scaling = args.rank, 1.0
  mode = "peft" if 3 * args.k * args.n_in * args.n_out * 4 <= args.peft_mem_gb * 2**30 else "accum"

  def run():
    if mode == "peft":   # PEFT: get_delta_weight per adapter, then merge_utils.task_arithmetic
      deltas = [(bb @ aa) * scaling for aa, bb in zip(lora_a, lora_b)]
      delta = task_arithmetic(deltas, torch.tensor(w))
      del deltas
    else:                # the same sum, accumulated in place (fewer dense temporaries)
      delta = torch.zeros((args.n_out, args.n_in))
      for wi, aa, bb in zip(w, lora_a, lora_b):
        delta.addmm_(bb * float(wi) * scaling, aa)
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)   # PEFT's default call
    u = u[:, :r] @ torch.diag(s[:r])
    return u.clone(), vh[:r].clone(), s[:r].clone()

  x = torch.randn(64, 48)   # warm-up: LAPACK, thread pools
  torch.linalg.svd(x @ x.T, full_matrices=True)
  t0 = time.perf_counter()
  (u, vh, s), extra = peak_extra_bytes(run)      # the measured run is also the first timing
  times = [time.perf_counter() - t0] + timed(run, args.dense_repeats - 1)

  ours = np.load(args.tmp)
  d_ours = (ours["a"].astype(np.float64) * ours["e"]) @ ours["b"].astype(np.float64)
  d_peft = (u.numpy().astype(np.float64) @ vh.numpy().astype(np.float64)).T
  s_peft = s.numpy().astype(np.float64)
  return dict(dense_ms=1e3 * statistics.median(times), dense_extra_bytes=extra,
              dense_mode=mode, dense_repeats=len(times),
              rel_diff=float(np.linalg.norm(d_ours - d_peft) / np.linalg.norm(d_peft)),
              sv_rel_diff=float(np.max(np.abs(ours["e"] - s_peft)) / s_peft[0]))


def spawn(kind: str, args, n_in: int, n_out: int, k: int, tmp: str) -> dict:
  threads = str(args.threads)
  env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", JAX_PLATFORMS="cpu",
             OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
  if args.threads == 1:   # XLA's own (Eigen) intra-op pool, too
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                        "intra_op_parallelism_threads=1").strip()
  cmd = [sys.executable, __file__, "--worker", kind, "--n-in", str(n_in), "--n-out", str(n_out),
         "--k", str(k), "--rank", str(args.rank), "--seed", str(args.seed), "--tmp", tmp,
         "--repeats", str(args.repeats), "--dense-repeats", str(args.dense_repeats),
         "--peft-mem-gb", str(args.peft_mem_gb), "--threads", threads]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"{kind} worker failed for {n_in}x{n_out} k={k}:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
  mb = lambda x: f"{x / 2**20:.1f}"
  head = ("| in × out | k | ours (ms) | PEFT dense (ms) | speed-up | ours extra RSS (MB) "
          "| ours XLA (MB) | dense extra RSS (MB) | mem ratio (max ours / dense) | rel diff ΔW | rel diff σ "
          "| concat (ms) | merge (ms) | dense mode |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    lines.append(
        f"| {r['n_in']}×{r['n_out']} | {r['k']} | {r['ours_ms']:.2f} | {r['dense_ms']:.0f} "
        f"| {r['speedup']:.0f}× | {mb(r['ours_extra_bytes'])} | {mb(r['ours_xla_bytes'])} "
        f"| {mb(r['dense_extra_bytes'])} | {r['mem_ratio']:.4f} | {r['rel_diff']:.1e} "
        f"| {r['sv_rel_diff']:.1e} | {r['concat_ms']:.3f} | {r['merge_ms']:.1f} "
        f"| {r['dense_mode']} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
  for shape in sorted({(r["n_in"], r["n_out"]) for r in rows}):
    sel = sorted((r for r in rows if (r["n_in"], r["n_out"]) == shape), key=lambda r: r["k"])
    ks = [r["k"] for r in sel]
    label = f"{shape[0]}×{shape[1]}"
    ax_t.plot(ks, [r["ours_ms"] for r in sel], "o-", label=f"factored {label}")
    ax_t.plot(ks, [r["dense_ms"] for r in sel], "s--", label=f"PEFT dense SVD {label}")
    ax_m.plot(ks, [max(r["ours_extra_bytes"], 1) / 2**20 for r in sel], "o-",
              label=f"factored {label}")
    ax_m.plot(ks, [r["ours_xla_bytes"] / 2**20 for r in sel], "^:",
              label=f"factored {label} (XLA buffers)")
    ax_m.plot(ks, [r["dense_extra_bytes"] / 2**20 for r in sel], "s--", label=f"dense {label}")
  for ax, title in ((ax_t, "truncation time (ms)"), (ax_m, "peak extra memory (MB): RSS rise, XLA buffers")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("k adapters (rank 16 each)")
    ax.set_title(title)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default="4096x4096,4096x14336",
                 help="comma-separated in×out layer shapes (default: Llama-8B q/o and up/gate)")
  p.add_argument("--ks", default="2,5,16,64", help="numbers of adapters to compose")
  p.add_argument("--rank", type=int, default=16, help="rank of each adapter and of the result")
  p.add_argument("--repeats", type=int, default=20, help="timed runs of the factored path")
  p.add_argument("--dense-repeats", type=int, default=1, help="timed runs of the dense path")
  p.add_argument("--peft-mem-gb", type=float, default=6.0,
                 help="above this estimated PEFT footprint, accumulate ΔW in place instead")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=1,
                 help="BLAS/LAPACK/OpenMP/XLA threads for both paths (default 1: on a shared, "
                      "oversubscribed CPU, threaded LAPACK was 10-50x slower for both)")
  p.add_argument("--quick", action="store_true",
                 help="small shapes (1024×1024, 1024×3584) and k ∈ {2, 5}")
  p.add_argument("--out", default=str(RESULTS), help="directory for JSON and PNG")
  p.add_argument("--worker", choices=["ours", "dense"], help=argparse.SUPPRESS)
  p.add_argument("--n-in", type=int, help=argparse.SUPPRESS)
  p.add_argument("--n-out", type=int, help=argparse.SUPPRESS)
  p.add_argument("--k", type=int, help=argparse.SUPPRESS)
  p.add_argument("--tmp", help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.worker:
    result = (worker_ours if args.worker == "ours" else worker_dense)(args)
    print(json.dumps(result))
    return 0

  if args.quick:
    args.shapes, args.ks = "1024x1024,1024x3584", "2,5"
  shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
  ks = [int(k) for k in args.ks.split(",")]
  rows = []
  with tempfile.TemporaryDirectory() as tmpdir:
    for n_in, n_out in shapes:
      for k in ks:
        tmp = os.path.join(tmpdir, f"ours_{n_in}_{n_out}_{k}.npz")
        row = dict(n_in=n_in, n_out=n_out, k=k, rank=args.rank)
        row.update(spawn("ours", args, n_in, n_out, k, tmp))
        row.update(spawn("dense", args, n_in, n_out, k, tmp))
        row["speedup"] = row["dense_ms"] / row["ours_ms"]
        # the larger of our two memory figures: the RSS rise can miss buffers the XLA
        # runtime reuses between calls, XLA's figure misses LAPACK workspace (tiny here)
        row["mem_ratio"] = (max(row["ours_extra_bytes"], row["ours_xla_bytes"])
                            / max(row["dense_extra_bytes"], 1))
        rows.append(row)
        print(f"{n_in}x{n_out} k={k}: ours {row['ours_ms']:.2f} ms, dense "
              f"{row['dense_ms']:.0f} ms ({row['dense_mode']}), rel diff {row['rel_diff']:.1e}",
              file=sys.stderr, flush=True)
  md = table(rows)
  print(md)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  tag = "quick" if args.quick else "_".join(f"{a}x{b}" for a, b in shapes) + "_k" + "-".join(map(str, ks))
  meta = dict(rank=args.rank, repeats=args.repeats, dense_repeats=args.dense_repeats,
              cpu_count=os.cpu_count(), threads=args.threads, load_avg=os.getloadavg(), memory_method=(
                  "peak RSS rise (VmHWM after /proc/self/clear_refs) in a fresh subprocess, "
                  "after warm-up, MALLOC_MMAP_THRESHOLD_=65536; inputs not counted, outputs counted"))
  (out / f"compose_speed_{tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
  (out / f"compose_speed_{tag}.md").write_text(md + "\n")
  plot(rows, out / f"compose_speed_{tag}.png")
  print(f"wrote {out}/compose_speed_{tag}.{{json,md,png}}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

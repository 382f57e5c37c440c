"""Factored re-truncation of a composed LoRA adapter vs the PEFT way (dense ΔW + full SVD).

Per Llama-8B-shaped layer (in × out = 4096 × 4096 and 4096 × 14336) and k rank-r adapters
with random weights, the composed update Σ_i w_i a_i b_i is truncated to rank r:

* ours:  ``truncate(concat(leaves, w), rank=r)`` under jax.jit, float32 — QR of the stacked
  factors (CholeskyQR from the Grams, Householder when they are ill-conditioned), SVD of
  the (k·r × k·r) core; δW is never formed.
* floor: the products no factored method avoids, as plain jitted matmuls in the same
  process, interleaved with ours: the Grams aᵀa, b bᵀ of the stacked factors and the two
  [n, k·r] × [k·r, r] output products. "ours / floor" is the ratio of the medians.
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

The whole model (``--whole``): k = 5 rank-16 adapters on all seven projections of the 32
Llama-3-8B layers (q, o 4096×4096; k, v 4096×1024; gate, up 4096×14336; down 14336×4096),
composed and re-truncated to rank 16 — ours on every layer (``whole_model()``, also what a
device check imports); PEFT's own ``add_weighted_adapter(..., combination_type="svd")`` on
real PEFT objects and the dense rebuild (ΣΔW in place + thin SVD) on --peft-projections of
one layer (q, k, gate by default; o, v, up, down have the same dense SVD as one of them),
extrapolated to 32 layers (the table says so).

  python benchmarks/compose_speed.py --quick
  python benchmarks/compose_speed.py --whole
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
  # the floor of any factored method: the Grams aᵀa, b bᵀ of the stacked factors and the
  # two [n, R] × [R, r] output products, as plain jitted matmuls
  stacked = cat(leaves, w)
  m = jnp.asarray(np.random.default_rng(2).standard_normal((stacked.rank, r), np.float32))
  floor = jax.jit(lambda a, b, m: (a.T @ a, b @ b.T, a @ m, m.T @ b))
  run_floor = lambda: jax.block_until_ready(floor(stacked.a, stacked.b, m))
  run_floor()
  t_trunc, t_floor = [], []
  for _ in range(args.repeats):    # interleaved, so both see the same load
    t_trunc += timed(run, 1)
    t_floor += timed(run_floor, 1)
  composed = jax.block_until_ready(cat(leaves, w))
  t_cat = timed(lambda: jax.block_until_ready(cat(leaves, w)), args.repeats)
  jax.block_until_ready(merge(kernel, composed))
  t_merge = timed(lambda: jax.block_until_ready(merge(kernel, composed)), args.repeats)
  np.savez(args.tmp, a=np.asarray(out.a), e=np.asarray(out.e), b=np.asarray(out.b))
  return dict(ours_ms=1e3 * statistics.median(t_trunc), floor_ms=1e3 * statistics.median(t_floor),
              ours_min_ms=1e3 * min(t_trunc), floor_min_ms=1e3 * min(t_floor),
              ours_extra_bytes=extra,
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
  return _spawn(kind, args, ["--n-in", str(n_in), "--n-out", str(n_out), "--k", str(k),
                             "--tmp", tmp])


def _spawn(kind: str, args, extra: list[str]) -> dict:
  threads = str(args.threads)
  env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", JAX_PLATFORMS="cpu",
             OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
  if args.threads == 1:   # XLA's own (Eigen) intra-op pool, too
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                        "intra_op_parallelism_threads=1").strip()
  cmd = [sys.executable, __file__, "--worker", kind, *extra, "--rank", str(args.rank),
         "--seed", str(args.seed), "--repeats", str(args.repeats),
         "--dense-repeats", str(args.dense_repeats), "--peft-mem-gb", str(args.peft_mem_gb),
         "--threads", threads]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"{kind} worker failed ({' '.join(extra)}):\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
  mb = lambda x: f"{x / 2**20:.1f}"
  head = ("| in × out | k | ours (ms) | floor (ms) | ours / floor | PEFT dense (ms) | speed-up "
          "| ours extra RSS (MB) "
          "| ours XLA (MB) | dense extra RSS (MB) | mem ratio (max ours / dense) | rel diff ΔW | rel diff σ "
          "| concat (ms) | merge (ms) | dense mode |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    lines.append(
        f"| {r['n_in']}×{r['n_out']} | {r['k']} | {r['ours_ms']:.2f} | {r['floor_ms']:.2f} "
        f"| {r['ours_ms'] / r['floor_ms']:.2f}× | {r['dense_ms']:.0f} "
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


# --- the whole model: five rank-16 adapters on every projection of Llama-3-8B ---------------

# (in, out) of the seven adapted projections of one Llama-3-8B layer (32 layers)
LLAMA3_8B = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024),
             "o_proj": (4096, 4096), "gate_proj": (4096, 14336), "up_proj": (4096, 14336),
             "down_proj": (14336, 4096)}
LLAMA3_8B_LAYERS = 32


def _device_peak_bytes() -> int | None:
  """Peak bytes in use on the default device (GPU/TPU allocators report it; CPU: None)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def random_adapters(k: int, *, layers: int = LLAMA3_8B_LAYERS, rank: int = 16,
                    dtype="float32", seed: int = 0, shapes=None) -> list[dict]:
  """k exchange-form adapters {"layers": {"i": {proj: LoRA}}} with random factors, made on
  the default device (nothing is staged through the host)."""
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, str(ROOT))
  from models.lora import LoRA

  shapes = LLAMA3_8B if shapes is None else shapes
  adapters = []
  key = jax.random.key(seed)
  for _ in range(k):
    layer_trees = {}
    for i in range(layers):
      layer = {}
      for name, (n_in, n_out) in shapes.items():
        key, ka, kb = jax.random.split(key, 3)
        a = jax.random.normal(ka, (n_in, rank), jnp.float32) / float(np.sqrt(n_in))
        b = jax.random.normal(kb, (rank, n_out), jnp.float32)
        layer[name] = LoRA(a.astype(dtype), b.astype(dtype))
      layer_trees[str(i)] = layer
    adapters.append({"layers": layer_trees})
  return adapters


def whole_model(*, layers: int = LLAMA3_8B_LAYERS, k: int = 5, rank: int = 16,
                dtype: str = "float32", repeats: int = 3, seed: int = 0,
                check: bool = True, shapes: dict | None = None) -> dict:
  """Compose k random rank-``rank`` adapters on all seven projections of ``layers``
  Llama-3-8B-shaped layers and re-truncate every layer to ``rank``, on the default device.
  ``shapes``: {projection: (in, out)} instead of Llama-3-8B's (for a quick smoke run).

  ``combine``'s per-layer algebra (``truncate(concat(leaves, w), rank)``), one jitted call
  per layer (seven compiled shapes), dispatched asynchronously and waited for at the end.
  Returns a dict: ``seconds`` (median of ``repeats`` warm runs), ``all_seconds``,
  ``compile_seconds`` (the first, compiling run), ``adapters_bytes`` (the k inputs),
  ``output_bytes``, ``peak_extra_bytes`` (host: the rise of peak RSS over RSS before the
  timed run; None when the device is not the host CPU), ``device_peak_bytes`` (the device
  allocator's peak since start, None on CPU), ``peak_ratio`` (inputs + extra, or the device
  peak, over the inputs' size), ``rel_err`` (one k/v-shaped layer against a float64 dense
  SVD oracle when ``check``), ``device``, ``layers``, ``k``, ``rank``, ``dtype``.
  """
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, str(ROOT))
  from models.lora import concat, to_flat, truncate

  adapters = random_adapters(k, layers=layers, rank=rank, dtype=dtype, seed=seed, shapes=shapes)
  flats = [to_flat(ad) for ad in adapters]
  w = jnp.asarray(np.random.default_rng(seed).standard_normal(k).astype(np.float32))
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  adapters_bytes = nbytes(adapters)
  jax.block_until_ready(adapters)
  trunc = jax.jit(lambda leaves, w: truncate(concat(leaves, w), rank=rank))
  paths = sorted(flats[0])

  def run():
    out = {p: trunc([f[p] for f in flats], w) for p in paths}
    return jax.block_until_ready(out)

  t0 = time.perf_counter()
  out = run()
  compile_s = time.perf_counter() - t0
  del out
  on_host = jax.devices()[0].platform == "cpu"
  if on_host:
    out, extra = peak_extra_bytes(run)
  else:
    out, extra = run(), None
  output_bytes = nbytes(out)
  times = timed(run, repeats)
  device_peak = _device_peak_bytes()
  peak_ratio = ((adapters_bytes + extra) / adapters_bytes if extra is not None else
                (device_peak / adapters_bytes if device_peak else None))
  rel_err = None
  if check:   # one layer (the smallest: k_proj) against the dense float64 SVD
    p = min(paths, key=lambda q: flats[0][q].shape[0] * flats[0][q].shape[1])
    dw = sum(float(wi) * np.asarray(f[p].a, np.float64) @ np.asarray(f[p].b, np.float64)
             for wi, f in zip(w, flats))
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    want = (u[:, :rank] * s[:rank]) @ vt[:rank]
    got = out[p]
    mine = (np.asarray(got.a, np.float64) * np.asarray(got.e, np.float64)) @ np.asarray(got.b, np.float64)
    rel_err = float(np.linalg.norm(mine - want) / np.linalg.norm(want))
  return dict(seconds=statistics.median(times), all_seconds=times, compile_seconds=compile_s,
              adapters_bytes=int(adapters_bytes), output_bytes=int(output_bytes),
              peak_extra_bytes=extra, device_peak_bytes=device_peak, peak_ratio=peak_ratio,
              rel_err=rel_err, device=str(jax.devices()[0]), layers=layers, k=k, rank=rank,
              dtype=str(dtype), n_layer_calls=len(paths))


# a projection not timed takes the time of one with the same dense SVD (down_proj: the
# transposed shape of gate_proj: the same thin SVD, and with PEFT's full_matrices=True the
# same 14336² factor)
SAME_COST = {"o_proj": "q_proj", "v_proj": "k_proj", "up_proj": "gate_proj",
             "down_proj": "gate_proj"}


def _per_layer(seconds: dict[str, float]) -> float:
  """One layer's time from the projections timed (see SAME_COST)."""
  return sum(seconds[p] if p in seconds else seconds[SAME_COST[p]] for p in LLAMA3_8B)


def worker_whole_peft(args) -> dict:
  """PEFT's own add_weighted_adapter(..., combination_type="svd") on real PEFT objects: for
  each projection in ``--peft-projections``, a model holding that one Llama-3-8B projection
  (bias-free Linear, uninitialised weight) with k rank-r adapters (PEFT's random init)."""
  import torch
  from torch import nn
  from peft import LoraConfig, get_peft_model

  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  weights = np.random.default_rng(args.seed).standard_normal(args.k).tolist()
  names = [f"a{i}" for i in range(args.k)]
  x = torch.randn(64, 48)
  torch.linalg.svd(x @ x.T, full_matrices=True)     # warm-up: LAPACK, thread pools
  seconds, extras = {}, {}
  for proj in args.peft_projections.split(","):
    n_in, n_out = LLAMA3_8B[proj]
    model = nn.ModuleDict({proj: nn.Linear(n_in, n_out, bias=False, device="meta")})
    model = model.to_empty(device="cpu")
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=[proj],
                        init_lora_weights=False)
    model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
      model.add_adapter(name, config)
    t0 = time.perf_counter()
    _, extras[proj] = peak_extra_bytes(lambda: model.add_weighted_adapter(
        names, weights, "merged", combination_type="svd", svd_rank=args.rank))
    seconds[proj] = time.perf_counter() - t0
    del model
    print(f"peft {proj}: {seconds[proj]:.1f} s", file=sys.stderr, flush=True)
  return dict(peft_layer_seconds=_per_layer(seconds), peft_seconds_by_projection=seconds,
              peft_extra_bytes=max(extras.values()), peft_threads=args.threads)


def worker_whole_dense(args) -> dict:
  """The dense rebuild: ΔW = Σ w_i B_i A_i accumulated in place, then a thin SVD
  (torch.linalg.svd(full_matrices=False)), top r kept; the ``--peft-projections``."""
  import torch

  torch.set_num_threads(args.threads)
  rng = np.random.default_rng(args.seed)
  weights = rng.standard_normal(args.k)
  x = torch.randn(64, 48)
  torch.linalg.svd(x @ x.T, full_matrices=False)
  seconds, extras = {}, {}
  for proj in args.peft_projections.split(","):
    n_in, n_out = LLAMA3_8B[proj]
    pairs = [(torch.from_numpy(rng.standard_normal((args.rank, n_in), np.float32)),
              torch.from_numpy(rng.standard_normal((n_out, args.rank), np.float32)))
             for _ in range(args.k)]

    def run():
      delta = torch.zeros((n_out, n_in))
      for wi, (la, lb) in zip(weights, pairs):
        delta.addmm_(lb * float(wi), la)
      u, s, vh = torch.linalg.svd(delta, full_matrices=False)
      return (u[:, :args.rank] * s[:args.rank]).clone(), vh[:args.rank].clone()

    t0 = time.perf_counter()
    _, extras[proj] = peak_extra_bytes(run)
    seconds[proj] = time.perf_counter() - t0
    print(f"dense {proj}: {seconds[proj]:.1f} s", file=sys.stderr, flush=True)
  return dict(dense_layer_seconds=_per_layer(seconds), dense_seconds_by_projection=seconds,
              dense_extra_bytes=max(extras.values()))


def worker_whole_ours(args) -> dict:
  return whole_model(layers=args.layers, k=args.k, rank=args.rank, dtype=args.dtype,
                     repeats=args.repeats, seed=args.seed)


def whole_table(r: dict) -> str:
  gb = lambda x: f"{x / 2**30:.2f}"
  n = r["layers"]
  peft_whole = r["peft_layer_seconds"] * n
  dense_whole = r["dense_layer_seconds"] * n
  timed_p = ", ".join(r["peft_seconds_by_projection"])
  lines = [
      f"Llama-3-8B shapes, {n} layers × 7 projections, k = {r['k']} rank-{r['rank']} adapters "
      f"({r['dtype']}), composed and re-truncated to rank {r['rank']}; threads = "
      f"{r['threads']}; load average {r['load_avg'][0]:.1f}.",
      "",
      "| path | measured | time, whole model (s) | vs ours | peak extra memory (GB) | "
      "peak / adapters' size |",
      "|---|---|---|---|---|---|",
      f"| ours (factored, CholeskyQR) | all {n} layers, median of {len(r['all_seconds'])} "
      f"| {r['seconds']:.2f} | 1× | {gb(r['peak_extra_bytes'] or 0)} "
      f"| {r['peak_ratio']:.2f} |",
      f"| PEFT add_weighted_adapter(svd) | {timed_p} of one layer; extrapolated "
      f"| {peft_whole:.0f} | {peft_whole / r['seconds']:.0f}× | "
      f"{gb(r['peft_extra_bytes'])} (one projection at a time) | — |",
      f"| dense rebuild (ΣΔW in place, thin SVD) | {timed_p} of one layer; extrapolated "
      f"| {dense_whole:.0f} | {dense_whole / r['seconds']:.0f}× | "
      f"{gb(r['dense_extra_bytes'])} (one projection at a time) | — |",
      "",
      f"Adapters' own size: {gb(r['adapters_bytes'])} GB (k inputs), output "
      f"{gb(r['output_bytes'])} GB; ours' first (compiling) run {r['compile_seconds']:.1f} s; "
      f"ours' smallest layer (k_proj) vs float64 dense SVD: relative error {r['rel_err']:.1e}.",
      "",
      "Extrapolation (PEFT, dense): one layer = the seven projections, each projection not "
      "timed taking the time of the timed one with the same dense SVD (o ← q, v ← k, up and "
      "down ← gate), times " + str(n) + " layers. Seconds per timed projection: PEFT "
      + ", ".join(f"{p} {t:.1f}" for p, t in r["peft_seconds_by_projection"].items())
      + "; dense " + ", ".join(f"{p} {t:.1f}" for p, t in r["dense_seconds_by_projection"].items())
      + ".",
  ]
  return "\n".join(lines)


def main_whole(args) -> int:
  k = args.k or 5
  row = dict(threads=args.threads, load_avg=os.getloadavg(), cpu_count=os.cpu_count())
  for kind in ("whole_ours", "whole_peft", "whole_dense"):
    row.update(_spawn(kind, args, ["--k", str(k), "--layers", str(args.layers),
                                   "--peft-projections", args.peft_projections,
                                   "--dtype", args.dtype]))
    print(f"{kind} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
  row["load_avg_end"] = os.getloadavg()
  md = whole_table(row)
  print(md)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  tag = f"whole_{args.layers}l_k{k}_{args.dtype}"
  (out / f"compose_speed_{tag}.json").write_text(json.dumps(row, indent=1))
  (out / f"compose_speed_{tag}.md").write_text(md + "\n")
  print(f"wrote {out}/compose_speed_{tag}.{{json,md}}", file=sys.stderr)
  return 0


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
  p.add_argument("--whole", action="store_true",
                 help="the whole-model benchmark: k adapters on all 7 projections of every "
                      "Llama-3-8B layer (ours on all layers; PEFT and dense on --peft-projections, "
                      "extrapolated)")
  p.add_argument("--layers", type=int, default=LLAMA3_8B_LAYERS, help="--whole: layers")
  p.add_argument("--peft-projections", default="q_proj,k_proj,gate_proj",
                 help="--whole: projections of one layer timed for PEFT and the dense rebuild "
                      "(the others take the time of the one with the same dense SVD)")
  p.add_argument("--dtype", default="float32", help="--whole: adapter dtype (ours)")
  p.add_argument("--worker", choices=["ours", "dense", "whole_ours", "whole_peft", "whole_dense"],
                 help=argparse.SUPPRESS)
  p.add_argument("--n-in", type=int, help=argparse.SUPPRESS)
  p.add_argument("--n-out", type=int, help=argparse.SUPPRESS)
  p.add_argument("--k", type=int, help=argparse.SUPPRESS)
  p.add_argument("--tmp", help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.worker:
    result = dict(ours=worker_ours, dense=worker_dense, whole_ours=worker_whole_ours,
                  whole_peft=worker_whole_peft, whole_dense=worker_whole_dense)[args.worker](args)
    print(json.dumps(result))
    return 0
  if args.whole:
    return main_whole(args)

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

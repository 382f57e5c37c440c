"""Per-sample composition throughput: images/s (Llama: sequences/s) of the per-sample path
against one dataset-level composed adapter and the bare base model, per batch size and k.

    .venv/bin/python benchmarks/per_sample_speed.py                  # ViT-S/16 and the Llama
    .venv/bin/python benchmarks/per_sample_speed.py --model vit-s --batches 64 --ks 16
    .venv/bin/python benchmarks/per_sample_speed.py --quick          # a smoke run, < 2 min
    .venv/bin/python benchmarks/per_sample_speed.py --model llama --generate 32 --ks 16

``--generate N`` (Llama) times what the report task predicts with — greedy KV-cache
generation of N new tokens after the prompt — in place of one forward, for the base, the
fixed and the per-sample paths; the features stay one base forward over the prompt, so
their share falls as N grows. It writes per_sample_speed_<model>-generate<N>.json / .png.

Setup: a random-init model (``--model``: vit-ti, vit-s, vit-b = ViT-Ti/S/B-16 at 224×224,
10 classes; llama = 4 layers, hidden 512, 8 heads / 4 KV heads, vocab 4096, sequences of
``--seq-len`` tokens; llama-tiny for smoke runs), float32. A real ``Library`` in a temporary
folder holds ``--library-size`` random rank-``--rank`` LoRA adapters (a and b both random
and non-zero) on the attention query and value projections, each with a prototype in the
model's feature space: the mean feature of a random subset of a setup batch plus noise,
so that queries land among the prototypes as real ones would.

Per (batch B, k), on one fixed batch of random inputs, interleaved per round so that all
paths see the same machine load, medians over up to ``--repeats`` rounds (at least 3;
none starts after ``--budget`` seconds) after one warm-up round that compiles. Compile
is excluded from the table; the first call of each path (compile + one run, where the
shapes are new) is in the JSON — the batched solve compiles once per (B, k), seconds
on CPU:

* base:      the jitted forward of the model without an adapter;
* fixed:     the dataset-level path's forward: one composed adapter (the batch mean
             feature's k nearest adapters and their ``sparse`` weights, ``combine`` → rank
             k·r → ``with_adapter``); forward only;
* per-sample, split into
  - features:  the base encoder's pooled feature of every input (ViT CLS, Llama mean
               hidden state), jitted, copied to the host as the pipeline does;
  - retrieval: ``Library.query(z, k)`` — top-k of all B features in one call (the raw
               ``retrieval.search`` on the cached index is timed too: the Library's share);
  - solve:     one batched ``compute_weights(..., "sparse")`` over the B problems, reusing
               retrieval's distances;
  - mix build: ``mixture_weights`` + ``with_mixture`` over the batch's union + the
               ``nnx.split`` the jitted forward takes (concatenates every layer's factors);
  - gate swap: the same with ``set_mixture_weights`` on an already-mixed model (only the
               gates change: what a caller that keeps the union fixed pays per batch, as
               ``pipeline.predict_per_sample`` does);
  - forward:   the jitted forward of the mixture (rank Σ_U r, gated per input).
  The per-sample total is features + retrieval + solve + gate swap + forward; the mix
  build is reported beside it (add build − swap for a caller that rebuilds every batch).

The union is the batch's (``--union batch``: at B ≥ 16 with k = 16 it is usually the whole
library) or always the whole library (``--union library``: the pipeline's dataset union
when the dataset's inputs retrieve every adapter). The forward compiles once per union
rank, so a stream whose batch unions differ in size recompiles; a fixed union does not.

Goals (issue 19, on CPU, at B = 64, k = 16): solve + retrieval ≤ 10 % of the per-sample
forward; the per-sample total ≤ 1.5 × the fixed composed forward. The features pass is a
whole base forward, so the second goal is read against it: the last column compares the
per-sample total with the dataset-level path including its own prototype pass (features
of the same inputs + the fixed forward).

Writes benchmarks/results/per_sample_speed_<model>.json and .png.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PARTS = ("features", "retrieval", "search", "solve", "mix_build", "gate_swap", "forward")


# --- Models ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Bench:
  """A model under test: how to build it, make a batch, and which layers carry adapters."""

  name: str
  unit: str                  # "images" or "sequences"
  build: Callable[[], nnx.Module]
  inputs: Callable[[int, int], jax.Array]      # (batch, seed) → model input
  targets: tuple[str, ...]
  pooling: str


def _vit(hidden, layers, heads):
  from models.vit import ViTConfig, ViTForImageClassification
  config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden, labels=tuple(str(i) for i in range(10)))
  return lambda: ViTForImageClassification(config, rngs=nnx.Rngs(0))


def _images(batch: int, seed: int) -> jax.Array:
  """Random 224×224 images, each with its own brightness and contrast (varied features)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 224, 224, 3), dtype=np.float32)
  x = x * rng.uniform(0.2, 1.0, (batch, 1, 1, 1)) + rng.uniform(-1, 1, (batch, 1, 1, 3))
  return jnp.asarray(x.astype(np.float32))


def _llama(hidden, layers, heads, kv_heads, vocab):
  from models import llama
  config = llama.LlamaConfig(vocab_size=vocab, hidden_size=hidden,
                             intermediate_size=int(2.75 * hidden), num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads,
                             head_dim=hidden // heads, max_position_embeddings=4096)
  return lambda: llama.LlamaForCausalLM(config, rngs=nnx.Rngs(0))


def _tokens(vocab: int, seq_len: int):
  def make(batch: int, seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, (batch, seq_len)),
                       jnp.int32)
  return make


def benches(seq_len: int) -> dict[str, Bench]:
  vit_targets, llama_targets = ("query", "value"), ("q_proj", "v_proj")
  return {
      "vit-ti": Bench("ViT-Ti/16 224", "images", _vit(192, 12, 3), _images, vit_targets, "cls"),
      "vit-s": Bench("ViT-S/16 224", "images", _vit(384, 12, 6), _images, vit_targets, "cls"),
      "vit-b": Bench("ViT-B/16 224", "images", _vit(768, 12, 12), _images, vit_targets, "cls"),
      "llama": Bench(f"Llama 4×512 (vocab 4096), {seq_len} tokens", "sequences",
                     _llama(512, 4, 8, 4, 4096), _tokens(4096, seq_len), llama_targets,
                     "mean"),
      "llama-tiny": Bench(f"Llama 2×128 (vocab 512), {seq_len} tokens", "sequences",
                          _llama(128, 2, 4, 2, 512), _tokens(512, seq_len), llama_targets,
                          "mean"),
  }


# --- Jitted calls (the graphdef is static: one compile per model structure and shapes) ---

@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, x):
  return nnx.merge(graphdef, state)(x).logits


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling"))
def _features(graphdef, state, x, pooling):
  model = nnx.merge(graphdef, state)
  return model.features(x, pooling=pooling).astype(jnp.float32)


def forward(model_split, x):
  return jax.block_until_ready(_forward(*model_split, x))


def generate(model_split, x, new_tokens: int):
  """Greedy KV-cache decoding of ``new_tokens`` tokens (the report task's prediction; the
  full budget, no EOS), the prompt's prefill included."""
  from models import llama
  return jax.block_until_ready(llama.generate(nnx.merge(*model_split), x, new_tokens,
                                              eos_token_id=()))


def features(model_split, x, pooling) -> np.ndarray:
  return np.asarray(_features(*model_split, x, pooling))


# --- The library -----------------------------------------------------------------------------

def random_adapter(model, targets, rank: int, rng) -> dict:
  """Random non-zero rank-``rank`` LoRA factors on every layer matching ``targets``."""
  from models.lora import LoRA, adapted_layers, from_flat, matches
  flat = {}
  for path, layer in sorted(adapted_layers(model).items()):
    if matches(path, targets):
      n_in, n_out = layer.in_features, layer.out_features
      a = rng.standard_normal((n_in, rank)) / np.sqrt(n_in)
      b = 0.1 * rng.standard_normal((rank, n_out)) / np.sqrt(rank)
      flat[path] = LoRA(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  return from_flat(flat)


def random_prototypes(setup_features: np.ndarray, count: int, rng) -> np.ndarray:
  """``count`` prototypes among the features: means of random subsets of 8 setup features,
  plus noise of half the features' per-dimension spread."""
  spread = setup_features.std(axis=0) + 1e-6
  protos = [setup_features[rng.choice(len(setup_features), 8, replace=False)].mean(0)
            + 0.5 * spread * rng.standard_normal(setup_features.shape[1])
            for _ in range(count)]
  return np.asarray(protos, np.float32)


def build_library(folder, bench: Bench, model, size: int, rank: int):
  """A real Library of ``size`` adapters; returns (library, {name: adapter}, load seconds)."""
  from rpe_jax.library.catalog import Library
  rng = np.random.default_rng(0)
  split = nnx.split(model)
  setup = features(split, bench.inputs(32, 1000), bench.pooling)
  protos = random_prototypes(setup, size, rng)
  library = Library.create(Path(folder) / "library")
  for i, z in enumerate(protos):
    library.add(f"adapter{i:03d}", random_adapter(model, bench.targets, rank, rng), z,
                base_model="bench", encoder="bench-encoder", n_samples=100,
                pooling=bench.pooling)
  start = time.perf_counter()
  adapters = {name: library.load(name) for name in library.names()}
  return library, adapters, time.perf_counter() - start


# --- One (batch, k) cell --------------------------------------------------------------------

class Timer:
  """Seconds per named call, ``out = timer("solve", fn, *args)``: kept per round while
  ``recording``; before that, the first call of each name (compile + one run) in ``first``."""

  def __init__(self):
    self.times: dict[str, list[float]] = {}
    self.first: dict[str, float] = {}
    self.recording = False

  def __call__(self, name, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    elapsed = time.perf_counter() - start
    if not self.recording:
      self.first.setdefault(name, elapsed)
    else:
      self.times.setdefault(name, []).append(elapsed)
    return out

  def median(self, name) -> float:
    return statistics.median(self.times[name])


def _query(library, z, k):
  found = library.query(z, k)
  jax.block_until_ready(found.references)
  return found


def _search(library, z, k):
  from rpe_jax import retrieval
  return jax.block_until_ready(retrieval.search(library.index(), z, k).references)


def _solve(found, z):
  from rpe_jax.weighting import compute_weights
  w = compute_weights(found.references, z, "sparse", sqdist=found.distances)
  return np.asarray(jax.block_until_ready(w.weights))


def _gates(found, weights, union_mode, all_names):
  """(union names, W [B, |union|]) for the batch's union or the whole library's."""
  from rpe_jax.compose.mixture import mixture_weights
  names = np.asarray(found.names)
  if union_mode == "batch":
    return mixture_weights(names, weights)
  column = {name: j for j, name in enumerate(all_names)}   # the library's order
  w = np.zeros((len(names), len(all_names)), np.float32)
  for b, row in enumerate(names):
    w[b, [column[str(n)] for n in row]] = weights[b]
  return list(all_names), w


def _mix_build(model, adapters, found, weights, union_mode):
  from rpe_jax.compose.mixture import with_mixture
  union, w = _gates(found, weights, union_mode, list(adapters))
  mixed = with_mixture(model, [adapters[n] for n in union], w)
  return union, mixed, jax.block_until_ready(nnx.split(mixed))


def _gate_swap(mixed, adapters, found, weights, union_mode):
  from rpe_jax.compose.mixture import set_mixture_weights
  union, w = _gates(found, weights, union_mode, list(adapters))
  swapped = set_mixture_weights(mixed, [adapters[n] for n in union], w)
  return jax.block_until_ready(nnx.split(swapped))


def fixed_composed(model, library, adapters, z, k):
  """The dataset-level path's model: the batch mean's k nearest adapters, sparse weights,
  combined (rank k·r; zero weights kept so the rank is k·r) and installed unmerged."""
  from rpe_jax.compose import combine, with_adapter
  mean = z.mean(axis=0)
  found = library.query(mean, k)
  w = _solve(found, mean)
  composed = combine([adapters[str(n)] for n in found.names], jnp.asarray(w, jnp.float32))
  return nnx.split(with_adapter(model, composed))


def measure_cell(bench, model, library, adapters, batch, k, *, repeats, budget, union_mode,
                 rank, run=forward) -> dict:
  """Every path on one batch: a warm-up round (compiles), then interleaved rounds —
  ``repeats`` of them, or fewer (at least 3) once ``budget`` seconds are spent; medians."""
  x = bench.inputs(batch, batch)
  base = nnx.split(model)
  timer = Timer()
  z = timer("features", features, base, x, bench.pooling)
  fixed = fixed_composed(model, library, adapters, z, k)
  mixed = None
  union = []
  rounds, start = 0, None
  while rounds < repeats and not (rounds >= 3 and time.perf_counter() - start > budget):
    timer.recording = start is not None
    timer("base", run, base, x)
    timer("fixed", run, fixed, x)
    z = timer("features", features, base, x, bench.pooling)
    found = timer("retrieval", _query, library, z, k)
    timer("search", _search, library, z, k)
    w = timer("solve", _solve, found, z)
    union, built, mixed_split = timer("mix_build", _mix_build, model, adapters, found, w,
                                      union_mode)
    mixed = built if mixed is None else mixed
    mixed_split = timer("gate_swap", _gate_swap, mixed, adapters, found, w, union_mode)
    timer("forward", run, mixed_split, x)
    if start is None:
      start = time.perf_counter()
    else:
      rounds += 1
  med = {name: timer.median(name) for name in timer.times}
  total = sum(med[p] for p in ("features", "retrieval", "solve", "gate_swap", "forward"))
  return dict(batch=batch, k=k, union=len(union), union_rank=len(union) * rank,
              seconds={n: med[n] for n in med}, first_call_s=timer.first, total_s=total,
              rate_base=batch / med["base"], rate_fixed=batch / med["fixed"],
              rate_per_sample=batch / total,
              solve_retrieval_over_forward=(med["solve"] + med["retrieval"]) / med["forward"],
              per_sample_over_fixed=total / med["fixed"],
              per_sample_over_dataset_level=total / (med["features"] + med["fixed"]),
              library_share_of_retrieval=1 - med["search"] / med["retrieval"],
              repeats=rounds)


# --- Report ---------------------------------------------------------------------------------

def markdown(rows, unit: str) -> str:
  u = "img/s" if unit == "images" else "seq/s"
  lines = [f"| batch | k | union | base {u} | fixed {u} | per-sample {u} | features ms | "
           "retrieval ms | solve ms | mix build ms | gate swap ms | forward ms | "
           "(solve+retr)/fwd | per-sample/fixed | per-sample/(features+fixed) |",
           "|---:|---:|---:|" + "---:|" * 12]
  for r in rows:
    s = {n: 1e3 * v for n, v in r["seconds"].items()}
    lines.append(
        f"| {r['batch']} | {r['k']} | {r['union']} | {r['rate_base']:.1f} | "
        f"{r['rate_fixed']:.1f} | {r['rate_per_sample']:.1f} | {s['features']:.1f} | "
        f"{s['retrieval']:.2f} | {s['solve']:.2f} | {s['mix_build']:.1f} | "
        f"{s['gate_swap']:.1f} | {s['forward']:.1f} | "
        f"{100 * r['solve_retrieval_over_forward']:.1f}% | {r['per_sample_over_fixed']:.2f} | "
        f"{r['per_sample_over_dataset_level']:.2f} |")
  return "\n".join(lines)


def goals(rows) -> list[str]:
  cell = next((r for r in rows if r["batch"] == 64 and r["k"] == 16), None)
  if cell is None:
    return ["goals: batch 64, k = 16 not measured"]
  share, ratio = cell["solve_retrieval_over_forward"], cell["per_sample_over_fixed"]
  return [f"goal (batch 64, k=16) solve + retrieval ≤ 10% of the forward: "
          f"{'PASS' if share <= 0.10 else 'FAIL'} ({100 * share:.1f}%)",
          f"goal (batch 64, k=16) per-sample total ≤ 1.5× the fixed composed forward: "
          f"{'PASS' if ratio <= 1.5 else 'FAIL'} ({ratio:.2f}×; against features + fixed "
          f"forward, the dataset-level path with its prototype pass: "
          f"{cell['per_sample_over_dataset_level']:.2f}×)"]


def plot(rows, path: Path, title: str, unit: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
  ks = sorted({r["k"] for r in rows})
  base = {r["batch"]: r["rate_base"] for r in rows if r["k"] == ks[0]}
  ax.plot(list(base), list(base.values()), "k-o", label="base (no adapter)")
  for k, style in zip(ks, ("-", "--", ":")):
    sel = [r for r in rows if r["k"] == k]
    ax.plot([r["batch"] for r in sel], [r["rate_fixed"] for r in sel], "s" + style,
            color="tab:blue", label=f"fixed composed, k={k}")
    ax.plot([r["batch"] for r in sel], [r["rate_per_sample"] for r in sel], "^" + style,
            color="tab:red", label=f"per-sample, k={k}")
  ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel=f"{unit} / s (median)",
         title=title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  sel = [r for r in rows if r["k"] == ks[-1]]
  idx = np.arange(len(sel))
  bottom = np.zeros(len(sel))
  for part in ("features", "retrieval", "solve", "gate_swap", "forward"):
    share = np.array([r["seconds"][part] / r["total_s"] for r in sel])
    bx.bar(idx, share, bottom=bottom, label=part)
    bottom += share
  bx.set_xticks(idx, [str(r["batch"]) for r in sel])
  bx.set(xlabel="batch size", ylabel="share of the per-sample time",
         title=f"per-sample time split, k={ks[-1]}")
  bx.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# --- Main -----------------------------------------------------------------------------------

def run_model(key: str, args) -> list[dict]:
  bench = benches(args.seq_len)[key]
  run = forward
  if args.generate and bench.unit == "sequences":
    run = functools.partial(generate, new_tokens=args.generate)
    bench = dataclasses.replace(bench, name=f"{bench.name}, generating {args.generate} tokens")
    key = f"{key}-generate{args.generate}"
  print(f"\n## {bench.name}: library of {args.library_size} rank-{args.rank} LoRA adapters "
        f"on {', '.join(bench.targets)}, union = {args.union}", flush=True)
  model = bench.build()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    library, adapters, load_s = build_library(tmp, bench, model, args.library_size, args.rank)
    print(f"   (loading all {len(adapters)} adapters from the library: {load_s:.2f} s, once "
          f"per dataset, not in the table)", flush=True)
    for batch in args.batches:
      for k in args.ks:
        start = time.perf_counter()
        row = measure_cell(bench, model, library, adapters, batch, k, repeats=args.repeats,
                           budget=args.budget, union_mode=args.union, rank=args.rank, run=run)
        rows.append(row)
        print(f"   batch {batch:4d} k {k:2d}: {row['rate_per_sample']:.1f} {bench.unit}/s "
              f"per-sample, {row['rate_fixed']:.1f} fixed; {row['repeats']} repeats, "
              f"first solve call (compile) {row['first_call_s']['solve']:.1f} s, cell "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        save(rows, key, bench, args, partial=True)
    library.close()
  print()
  print(markdown(rows, bench.unit))
  print()
  print("\n".join(goals(rows)))
  query = statistics.median(1e3 * r["seconds"]["retrieval"] for r in rows)
  raw = statistics.median(1e3 * r["seconds"]["search"] for r in rows)
  print(f"retrieval, median over cells: Library.query {query:.2f} ms, the raw "
        f"retrieval.search on its cached index {raw:.2f} ms (the catalog's version check)")
  save(rows, key, bench, args, partial=False)
  plot(rows, args.out / f"per_sample_speed_{key}.png", bench.name, bench.unit)
  print(f"wrote {args.out}/per_sample_speed_{key}.json and .png", flush=True)
  return rows


def save(rows, key, bench, args, *, partial: bool) -> None:
  args.out.mkdir(parents=True, exist_ok=True)
  meta = {n: (str(v) if isinstance(v, Path) else v) for n, v in vars(args).items()}
  env = dict(jax=jax.__version__, device=str(jax.devices()[0]), cpu_count=os.cpu_count(),
             loadavg=os.getloadavg())
  (args.out / f"per_sample_speed_{key}.json").write_text(json.dumps(
      dict(model=bench.name, unit=bench.unit, args=meta, environment=env, rows=rows,
           goals=goals(rows), partial=partial), indent=2))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", nargs="+", default=["vit-s", "llama"],
                 choices=sorted(benches(0)))
  p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
  p.add_argument("--ks", type=int, nargs="+", default=[4, 16])
  p.add_argument("--library-size", type=int, default=32)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=64, help="Llama tokens per sequence")
  p.add_argument("--union", choices=("batch", "library"), default="batch")
  p.add_argument("--generate", type=int, default=0, metavar="N",
                 help="Llama: time greedy generation of N new tokens (the report task's "
                      "prediction) instead of one forward, for base, fixed and per-sample")
  p.add_argument("--repeats", type=int, default=7, help="timed rounds per cell, at most")
  p.add_argument("--budget", type=float, default=60.0,
                 help="seconds of timed rounds per cell after which no new round starts "
                      "(at least 3 rounds run)")
  p.add_argument("--quick", action="store_true",
                 help="vit-ti and llama-tiny, batches 1 and 64, k = 16, 3 repeats (a smoke "
                      "run)")
  p.add_argument("--out", type=Path, default=RESULTS)
  args = p.parse_args(argv)
  if args.quick:
    explicit = any(a == "--model" or a.startswith("--model=") for a in (argv or sys.argv[1:]))
    args.model = args.model if explicit else ["vit-ti", "llama-tiny"]
    args.batches, args.ks, args.repeats = [1, 64], [16], 3
  if max(args.ks) > args.library_size:
    p.error(f"k up to {max(args.ks)} needs --library-size ≥ that, got {args.library_size}")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f}; medians of up to {args.repeats} repeats "
        f"({args.budget:.0f} s per cell, at least 3) after a compiling warm-up", flush=True)
  start = time.perf_counter()
  for key in args.model:
    run_model(key, args)
  print(f"total {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())

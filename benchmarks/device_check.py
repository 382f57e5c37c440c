"""One prepared accelerator check: everything a session lent a GPU should measure, in one run.

    python benchmarks/device_check.py                 # on the accelerator (< 8 min on one H200)
    python benchmarks/device_check.py --demo          # + `python -m rpe_jax.compose --demo`
    python benchmarks/device_check.py --quick         # tiny sizes on CPU (< 60 s; CI runs it)
    python benchmarks/device_check.py --quick --out /tmp/x --doc /tmp/x/accelerators.md

Sections (each in its own try/except: an error is recorded in the table, never aborts the
run; the JSON and the markdown are rewritten after every section, so a run cut short by the
device lease still leaves its results):

1. ``numerics``: ViT-B/16, Llama (1B-shaped, fewer layers) and SAM-B forward in float32 and
   bfloat16 with the same weights and inputs on the accelerator and on the host CPU:
   max |Δ| (and relative to max |ref|); bf16 against f32 on the device; the fused attention
   kernel against the written-out one. On a CPU-only machine the comparison is CPU vs CPU.
2. ``vit``: ViT-B/16 (random weights, real shapes) forward images/s at batch 1/64/256, base
   and with a composed rank-64 adapter (4 × rank 16, ``models.lora.concat``) unmerged on
   query/value; bf16 and f32; fused vs reference attention at batch 64.
3. ``llama``: Llama-3.2-1B-shaped greedy decode tokens/s (``models.llama.generate``, bf16).
4. ``solver``: ``solvers.sparse_simplex.solve`` problems/s at B = 10⁵, k ∈ {16, 64}, d = 768
   (float32, λ > 0, affine); goal ≥ 10⁶ problems/s at k = 16 on an H100-class GPU.
5. ``retrieval``: ``rpe_jax.retrieval.search`` latency over N = 10⁶ prototypes (d = 768).
6. ``compose_8b``: the whole-Llama-8B-shaped composition of ``benchmarks/compose_speed.py``
   (``benchmarks.compose_speed.whole_model``).
7. ``demo``: ``python -m rpe_jax.compose --demo`` end to end as a subprocess (``--demo``;
   it builds its cache on first run).

Timings: warm-up (compile) first, ``block_until_ready``, the median of ``--reps`` runs.
Writes ``--doc`` (default docs/accelerators.md) and ``--out``/device_check_<tag>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

SECTIONS = ("numerics", "vit", "llama", "solver", "retrieval", "compose_8b", "demo")
TITLES = {
    "numerics": "Forward numerics: accelerator vs CPU, bf16 vs f32, fused vs reference",
    "vit": "ViT-B/16 forward throughput",
    "llama": "Llama-1B-shaped greedy decode",
    "solver": "Weight solver throughput",
    "retrieval": "Retrieval latency",
    "compose_8b": "Whole-Llama-8B-shaped composition",
    "demo": "`python -m rpe_jax.compose --demo` end to end",
}


def row(case, value, unit, note="", status="ok"):
  return dict(case=case, value=None if value is None else float(value), unit=unit, note=note,
              status=status)


def timed(fn, reps: int) -> float:
  """Median seconds of ``fn()`` (which blocks) over ``reps`` runs, after one warm-up."""
  fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def ready(x):
  return jax.block_until_ready(x)


# --- model configs ---------------------------------------------------------------------------

def vit_config(quick):
  from models.vit import ViTConfig
  if quick:
    return ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, image_size=32, patch_size=8)
  return ViTConfig()   # ViT-B/16 at 224


def llama_config(quick, layers=None):
  from models.llama import LlamaConfig
  if quick:
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=layers or 2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16)
  # Llama-3.2-1B: 16 layers, d 2048, 32 q / 8 kv heads of 64, MLP 8192, vocab 128256.
  return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=layers or 16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                     max_position_embeddings=131072, tie_word_embeddings=True)


def sam_config(quick):
  from models.sam import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig
  if quick:
    return SamConfig(
        SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2,
                        num_attention_heads=2, image_size=64, patch_size=8, window_size=3,
                        global_attn_indexes=(1,), num_pos_feats=8, mlp_dim=64),
        SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8,
                               mask_input_channels=8),
        SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_attention_heads=2,
                             iou_head_hidden_dim=16))
  return SamConfig()   # SAM-B at 1024


# --- 1. numerics -----------------------------------------------------------------------------

def _forward_fns(quick):
  """(name, build(dtype) → model, inputs on the host, f(model, *inputs) → array)."""
  from models import llama, sam, vit
  rng = np.random.default_rng(0)
  vc, lc, sc = vit_config(quick), llama_config(quick, layers=2 if quick else 4), sam_config(quick)
  px = rng.standard_normal((2 if quick else 4, *vc.image_size, 3)).astype(np.float32)
  ids = rng.integers(0, lc.vocab_size, (2, 16 if quick else 64)).astype(np.int32)
  s = sc.vision.image_size
  sam_px = rng.standard_normal((1, s, s, 3)).astype(np.float32)
  points = np.array([[[[0.3 * s, 0.4 * s], [0.7 * s, 0.2 * s]]]], np.float32)
  return [
      ("ViT-B/16" if not quick else "ViT (tiny)",
       lambda dt: vit.ViTModel(vc, dtype=dt, rngs=nnx.Rngs(0)), (px,),
       lambda m, x: m(x).last_hidden_state),
      ("Llama-1B-shaped, 4 layers" if not quick else "Llama (tiny)",
       lambda dt: llama.LlamaForCausalLM(lc, dtype=dt, rngs=nnx.Rngs(0)), (ids,),
       lambda m, x: m(x).logits),
      ("SAM-B" if not quick else "SAM (tiny)",
       lambda dt: sam.SamModel(sc, dtype=dt, rngs=nnx.Rngs(0)), (sam_px, points),
       lambda m, x, p: m(x, points=p).pred_masks),
  ]


def _run_on(device, graphdef, state, inputs, f):
  state = jax.device_put(state, device)
  inputs = [jax.device_put(x, device) for x in inputs]
  fn = jax.jit(lambda s, *a: f(nnx.merge(graphdef, s), *a))
  return np.asarray(ready(fn(state, *inputs)), np.float32)


def _diff(a, b):
  d = float(np.abs(a - b).max())
  return d, d / max(float(np.abs(b).max()), 1e-30)


def _cast_like(model32, model16):
  """model16 with model32's weights cast to model16's parameter dtypes (same numbers)."""
  src = dict(nnx.to_flat_state(nnx.state(model32)))
  graphdef, state = nnx.split(model16)
  return nnx.merge(graphdef, nnx.from_flat_state(
      [(p, v.replace(jnp.asarray(src[p].get_value(), v.get_value().dtype)))
       for p, v in nnx.to_flat_state(state)]))


def section_numerics(args):
  from models.layers import resolve_attention_impl, set_attention_impl
  cpu = jax.devices("cpu")[0]
  dev = jax.devices()[0]
  on_cpu_only = dev.platform == "cpu"
  versus = ("CPU vs CPU: no accelerator, the same computation (0 by construction)"
            if on_cpu_only else f"{dev.platform} vs CPU")
  rows = []
  for name, build, inputs, f in _forward_fns(args.quick):
    with jax.default_device(cpu):
      model32 = build(jnp.float32)
      models = {jnp.float32: model32,
                jnp.bfloat16: _cast_like(model32, nnx.eval_shape(lambda: build(jnp.bfloat16)))}
    outs = {}
    for dt, model in models.items():
      graphdef, state = nnx.split(model)
      ref = _run_on(cpu, graphdef, state, inputs, f)
      outs[dt] = ref if on_cpu_only else _run_on(dev, graphdef, state, inputs, f)
      d, rel = _diff(outs[dt], ref)
      rows.append(row(f"{name} {jnp.dtype(dt).name}: device vs CPU max abs diff", d, "abs",
                      f"{versus}; relative to max |CPU| {rel:.2e}"))
    # The kernel "auto" did not pick, against the one it did (same device, float32).
    picked = resolve_attention_impl(model32.config.attention_impl)
    other = "reference" if picked == "fused" else "fused"
    set_attention_impl(model32, other)
    graphdef, state = nnx.split(model32)
    d, rel = _diff(_run_on(dev, graphdef, state, inputs, f), outs[jnp.float32])
    rows.append(row(f"{name} float32: {other} vs {picked} attention (device) max abs diff", d,
                    "abs", f"relative {rel:.2e}"))
    d, rel = _diff(outs[jnp.bfloat16], outs[jnp.float32])
    rows.append(row(f"{name}: bf16 vs f32 (device, same weights) max abs diff", d, "abs",
                    f"relative to max |f32| {rel:.2e}"))
  return rows


# --- 2. ViT throughput -----------------------------------------------------------------------

def _install_composed_adapter(model, rank_each=16, k=4):
  """A composition of k random rank-16 LoRAs (exact rank concatenation) on query/value."""
  from models.lora import LoRA, adapted_layers, concat, matches
  key = jax.random.key(1)
  dtype = model.embeddings.cls_token[...].dtype
  weights = jnp.asarray([0.4, 0.3, 0.2, 0.1][:k], jnp.float32)
  for path, layer in adapted_layers(model).items():
    if not matches(path, ("query", "value")):
      continue
    leaves = []
    for _ in range(k):
      key, ka, kb = jax.random.split(key, 3)
      leaves.append(LoRA(0.02 * jax.random.normal(ka, (layer.in_features, rank_each), dtype),
                         0.02 * jax.random.normal(kb, (rank_each, layer.out_features), dtype)))
    layer.set_adapter(concat(leaves, weights))
  return model


def section_vit(args):
  from models.layers import set_attention_impl
  from models.vit import ViTModel
  cfg = vit_config(args.quick)
  from models.layers import resolve_attention_impl
  batches = (1, 4) if args.quick else (1, 64, 256)
  auto = f"attention auto → {resolve_attention_impl('auto')}"
  rows = []
  for dt, batch_list in ((jnp.bfloat16, batches), (jnp.float32, batches[1:2])):
    for adapted in (False, True):
      model = ViTModel(cfg, dtype=dt, rngs=nnx.Rngs(0))
      if adapted:
        _install_composed_adapter(model)
      graphdef, state = nnx.split(model)
      fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
      for b in batch_list:
        x = jnp.asarray(np.random.default_rng(b).standard_normal((b, *cfg.image_size, 3)), dt)
        t = timed(lambda: ready(fn(state, x)), args.reps)
        rows.append(row(f"{jnp.dtype(dt).name} batch {b} "
                        f"{'+ rank-64 adapter (unmerged)' if adapted else 'base'}", b / t,
                        "images/s", f"{t * 1e3:.2f} ms/batch; {auto}"))
  b = batches[1]
  x = jnp.asarray(np.random.default_rng(0).standard_normal((b, *cfg.image_size, 3)),
                  jnp.bfloat16)
  for impl in ("reference", "fused"):
    model = set_attention_impl(ViTModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), impl)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
    t = timed(lambda: ready(fn(state, x)), args.reps)
    rows.append(row(f"bfloat16 batch {b} base, attention={impl}", b / t, "images/s",
                    f"{t * 1e3:.2f} ms/batch"))
  return rows


# --- 3. Llama decode -------------------------------------------------------------------------

def section_llama(args):
  from models import llama
  from models.layers import resolve_attention_impl
  cfg = llama_config(args.quick)
  model = llama.LlamaForCausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  prompt, new = (8, 16) if args.quick else (128, 128)
  rows = []
  for batch in ((1, 4) if args.quick else (1, 16)):
    ids = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, prompt))
    t = timed(lambda: ready(llama.generate(model, ids, new, eos_token_id=())),
              max(1, args.reps // 2))
    rows.append(row(f"bf16 batch {batch}, prompt {prompt}, {new} new tokens", batch * new / t,
                    "tokens/s", f"{t:.3f} s per generate (prefill included); "
                    f"{cfg.num_hidden_layers} layers, d {cfg.hidden_size}, attention auto → "
                    f"{resolve_attention_impl(cfg.attention_impl)}"))
  return rows


# --- 4. solver -------------------------------------------------------------------------------

def section_solver(args):
  from solvers import sparse_simplex as ss
  B, d = (256, 32) if args.quick else (100_000, 768)
  rows = []
  for k in ((16,) if args.quick else (16, 64)):   # quick: one compile, not two
    key = jax.random.key(k)
    refs = jax.random.normal(key, (B, k, d), jnp.float32)
    target = jax.random.normal(jax.random.fold_in(key, 1), (B, d), jnp.float32)
    lam = 0.01 * d   # ~1% of a centred squared norm: a sparse, active ℓ1 term
    sol = ready(ss.solve(refs, target, lam))
    t = timed(lambda: ready(ss.solve(refs, target, lam)), max(1, args.reps // 2))
    ok = float(np.mean(np.asarray(ss.status_name(sol.status)) == "converged"))
    goal = ("; goal ≥ 1e6/s on an H100-class GPU: " + ("met" if B / t >= 1e6 else "NOT met")
            if k == 16 and jax.default_backend() == "gpu" else "")
    rows.append(row(f"B={B}, k={k}, d={d}, float32, affine, λ>0", B / t, "problems/s",
                    f"{t:.3f} s per batch; converged fraction {ok:.4f}{goal}"))
    del refs, target, sol
  return rows


# --- 5. retrieval ----------------------------------------------------------------------------

def section_retrieval(args):
  from rpe_jax import retrieval
  N, d = (10_000, 32) if args.quick else (1_000_000, 768)
  rng = np.random.default_rng(0)
  matrix = rng.standard_normal((N, d), dtype=np.float32)
  t0 = time.perf_counter()
  index = retrieval.build_index([f"a{i}" for i in range(N)], matrix)
  ready(index.augmented)
  build_s = time.perf_counter() - t0
  rows = [row(f"build_index N={N}, d={d}", build_s, "s", "host → device, once")]
  for batch in (1, 64):
    q = rng.standard_normal((batch, d), dtype=np.float32)
    t = timed(lambda: ready(retrieval.search(index, q, 16).distances), args.reps)
    rows.append(row(f"search N={N}, d={d}, k=16, {batch} quer{'y' if batch == 1 else 'ies'}",
                    t * 1e3, "ms", "exact top-k, end to end (host query in, device result)"))
  return rows


# --- 6/7. subprocess sections ----------------------------------------------------------------

def _subprocess(cmd, timeout):
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
  return proc, time.perf_counter() - t0


def section_compose_8b(args):
  """``benchmarks.compose_speed.whole_model``: five rank-16 adapters on every projection of
  32 Llama-3-8B-shaped layers, composed and re-truncated to rank 16 on the default device
  (``--quick``: two small layers)."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  from compose_speed import whole_model
  quick = {"q_proj": (64, 64), "k_proj": (64, 16), "v_proj": (64, 16), "o_proj": (64, 64),
           "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
  r = whole_model(layers=2 if args.quick else 32, repeats=1 if args.quick else 3,
                  shapes=quick if args.quick else None)
  label = "whole-Llama-8B-shaped composition" + (" (quick: 2 small layers)" if args.quick else "")
  return [row(label, r["seconds"], "s",
              f"peak/inputs {r['peak_ratio']}, rel err {r['rel_err']}, "
              f"compile {r['compile_seconds']:.1f} s, device {r['device']}")]


def section_demo(args):
  if not args.demo:
    return [row("python -m rpe_jax.compose --demo", None, "s", "skipped: pass --demo",
                status="skipped")]
  proc, wall = _subprocess([sys.executable, "-m", "rpe_jax.compose", "--demo", "--json"],
                           args.sub_timeout)
  if proc.returncode:
    raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-400:]}")
  report = json.loads(proc.stdout)
  best = max(report["results"], key=lambda r: r["accuracy"]) if "results" in report else None
  note = f"total_s {report.get('total_s')}, build_or_load_s {report.get('build_or_load_s')}"
  if best:
    note += f"; best {best['method']} accuracy {best['accuracy']:.3f}"
  return [row("python -m rpe_jax.compose --demo (subprocess)", wall, "s", note)]


RUNNERS = {"numerics": section_numerics, "vit": section_vit, "llama": section_llama,
           "solver": section_solver, "retrieval": section_retrieval,
           "compose_8b": section_compose_8b, "demo": section_demo}


# --- report ----------------------------------------------------------------------------------

def _fmt(v):
  if v is None:
    return "—"
  if v == 0 or 1e-3 <= abs(v) < 1e5:
    return f"{v:.4g}"
  return f"{v:.3e}"


def markdown(report) -> str:
  m = report["meta"]
  lines = [
      "## Latest run", "",
      f"`python benchmarks/device_check.py{' --quick' if m['quick'] else ''}` on "
      f"**{m['device']}** ({m['backend']}), {m['date']}; jax {m['jax']}, "
      f"{m['cpu_count']} CPUs, load {m['load_avg']}.", "",
  ]
  if m["backend"] == "cpu":
    lines += ["No accelerator was present: every 'device vs CPU' figure below compares the "
              "CPU with itself, and the throughputs are CPU figures.", ""]
  for name in SECTIONS:
    sec = report["sections"].get(name)
    lines.append(f"### {name}: {TITLES[name]}")
    lines.append("")
    if sec is None:
      lines += ["not run yet", ""]
      continue
    lines.append(f"status: {sec['status']} ({sec['seconds']:.1f} s)")
    lines.append("")
    lines += ["| case | value | unit | note |", "|---|---|---|---|"]
    for r in sec["rows"]:
      note = r["note"].replace("|", "\\|")   # a bare pipe would split the cell
      lines.append(f"| {r['case']} | {_fmt(r['value'])} | {r['unit']} | {note} |")
    lines.append("")
  return "\n".join(lines)


BEGIN, END = "<!-- device_check: begin -->", "<!-- device_check: end -->"


def write(report, args):
  """The JSON, and the table into ``args.doc`` between the BEGIN/END markers (the text
  around them, written by hand, is kept; a file without them is replaced)."""
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  tag = "quick" if args.quick else report["meta"]["backend"]
  (out / f"device_check_{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
  doc = Path(args.doc)
  doc.parent.mkdir(parents=True, exist_ok=True)
  old = doc.read_text() if doc.exists() else ""
  body = f"{BEGIN}\n{markdown(report)}\n{END}"
  if BEGIN in old and END in old:
    head, rest = old.split(BEGIN, 1)
    body = head + body + rest.split(END, 1)[1]
  doc.write_text(body if body.endswith("\n") else body + "\n")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny sizes (CPU, < 60 s)")
  p.add_argument("--demo", action="store_true",
                 help="also run `python -m rpe_jax.compose --demo` (builds its cache once)")
  p.add_argument("--sections", default=",".join(SECTIONS),
                 help=f"comma-separated subset of {','.join(SECTIONS)}")
  p.add_argument("--reps", type=int, default=5, help="timed runs per case (median)")
  p.add_argument("--sub-timeout", type=float, default=300.0,
                 help="seconds allowed to each subprocess section")
  p.add_argument("--budget", type=float, default=450.0,
                 help="seconds; sections not started by then are skipped (default 450)")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                 help="folder for device_check_<tag>.json")
  p.add_argument("--doc", default=str(ROOT / "docs" / "accelerators.md"),
                 help="markdown report path")
  args = p.parse_args(argv)
  if args.quick:
    args.reps = min(args.reps, 2)
  chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
  bad = sorted(set(chosen) - set(SECTIONS))
  if bad:
    p.error(f"unknown sections {bad}; choose from {list(SECTIONS)}")

  dev = jax.devices()[0]
  report = dict(meta=dict(
      device=getattr(dev, "device_kind", str(dev)), backend=jax.default_backend(),
      device_count=jax.device_count(), date=datetime.datetime.now(datetime.timezone.utc)
      .strftime("%Y-%m-%d %H:%M UTC"), jax=jax.__version__, python=platform.python_version(),
      cpu_count=os.cpu_count(), load_avg=[round(v, 2) for v in os.getloadavg()],
      quick=args.quick, argv=sys.argv[1:] if argv is None else list(argv)), sections={})
  start = time.perf_counter()
  for name in chosen:
    t0 = time.perf_counter()
    if t0 - start > args.budget:
      sec = dict(status="skipped", rows=[row(name, None, "", f"skipped: the {args.budget:.0f} s "
                                             "budget was spent", status="skipped")])
    else:
      try:
        rows = RUNNERS[name](args)
        status = "ok" if all(r["status"] == "ok" for r in rows) else rows[0]["status"]
        sec = dict(status=status, rows=rows)
      except Exception as e:  # noqa: BLE001  (recorded in the table; the run goes on)
        msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")[:500]
        sec = dict(status="error", rows=[row(name, None, "", msg, status="error")],
                   traceback=traceback.format_exc()[-2000:])
    sec["seconds"] = time.perf_counter() - t0
    report["sections"][name] = sec
    report["meta"]["total_s"] = round(time.perf_counter() - start, 1)
    write(report, args)
    print(f"[{report['meta']['total_s']:7.1f} s] {name}: {sec['status']}", file=sys.stderr,
          flush=True)
  print(markdown(report))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""Model throughput: our Flax NNX port (jit) against HF PyTorch, forward and LoRA train step.

    .venv/bin/python benchmarks/model_speed.py                 # ViT-B/16, batch 32
    .venv/bin/python benchmarks/model_speed.py --quick         # batch 4, fewer repeats
    .venv/bin/python benchmarks/model_speed.py --model vit --batch 8 --reps 5

Both sides get the same weights (the torch model is saved with ``save_pretrained`` and
loaded with ``models.hf.load``) and the same adapter (a PEFT LoRA with random non-zero
lora_B, read with ``rpe_jax.library.peft_io.read_peft``), so the table also reports the largest
output difference. Cases: no adapter, the adapter unmerged (x W + (x a) b), the adapter
merged into the kernels; then one LoRA train step (AdamW, adapter only trainable) on both
sides. The two sides are timed alternately, ``--reps`` pairs after ``--warmup`` pairs, and
the ratio is the median of the per-pair ratios, so both see the same machine load (ours:
compiled and ``block_until_ready``; torch: ``no_grad``/eval, ``torch.set_num_threads``).

Adding a model: write ``<name>_cases(args) -> list[Row]`` and add it to ``MODELS``.
Writes benchmarks/results/model_speed_<model>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


class Row(NamedTuple):
  case: str
  ours_s: float             # median seconds per call
  torch_s: float
  ratio: float              # median over alternating pairs of ours / torch time
  items: int                # images (or sequences) per call
  max_abs_diff: float | None


def paired_times(ours: Callable[[], object], theirs: Callable[[], object], reps: int,
                 warmup: int) -> tuple[float, float, float, object, object]:
  """Time ``ours`` and ``theirs`` alternately (both must block until done).

  The machine is shared, so load drifts: alternating the two and taking the median of the
  per-pair ratios compares them under the same load. Returns (median ours s, median theirs
  s, median of ours/theirs per pair, last outputs of each).
  """
  for _ in range(warmup):
    ours()
    theirs()
  t_ours, t_theirs, out_ours, out_theirs = [], [], None, None
  for _ in range(reps):
    t0 = time.perf_counter()
    out_ours = ours()
    t1 = time.perf_counter()
    out_theirs = theirs()
    t2 = time.perf_counter()
    t_ours.append(t1 - t0)
    t_theirs.append(t2 - t1)
  ratio = statistics.median(a / b for a, b in zip(t_ours, t_theirs))
  return (statistics.median(t_ours), statistics.median(t_theirs), ratio, out_ours, out_theirs)


def _ready(tree):
  return jax.block_until_ready(tree)


# --- ViT ------------------------------------------------------------------------------------

def vit_cases(args) -> list[Row]:
  import optax
  import peft
  import torch
  import transformers
  from flax import nnx

  from models import hf
  from models.lora import LoRAParam, adapted_layers, to_flat
  from rpe_jax.library.peft_io import read_peft

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  size = 64 if args.tiny else 224
  hf_config = transformers.ViTConfig(image_size=size, patch_size=16, num_labels=10)
  if args.tiny:  # a smoke-test shape for CI-like checks of the script itself
    hf_config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, image_size=size, patch_size=16,
                                       num_labels=10)
  theirs = transformers.ViTForImageClassification(hf_config).eval()
  x_t = torch.randn(args.batch, 3, size, size)
  y_t = torch.randint(0, 10, (args.batch,))
  x = jnp.asarray(x_t.permute(0, 2, 3, 1).numpy())
  y = jnp.asarray(y_t.numpy())

  with tempfile.TemporaryDirectory() as tmp:
    theirs.save_pretrained(f"{tmp}/base")
    ours = hf.load(f"{tmp}/base")
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(
        r=args.rank, lora_alpha=args.rank, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
      for name, p in theirs.named_parameters():
        if "lora_B" in name:
          p.copy_(0.02 * torch.randn_like(p))
    theirs.save_pretrained(f"{tmp}/adapter")
    adapter = to_flat(read_peft(f"{tmp}/adapter", ours))

  layers = adapted_layers(ours)

  def jit_forward(model):
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, px: nnx.merge(graphdef, s)(px).logits)
    return lambda: _ready(fwd(state, x))

  def torch_forward(model):
    def run():
      with torch.no_grad():
        return model(x_t).logits
    return run

  rows = []

  def forward_row(case, ours_fn, torch_fn):
    t_ours, t_torch, ratio, out, ref = paired_times(ours_fn, torch_fn, args.reps, args.warmup)
    diff = float(np.abs(np.asarray(out) - ref.numpy()).max())
    rows.append(Row(case, t_ours, t_torch, ratio, args.batch, diff))
    print(f"  {case}: ours {t_ours * 1e3:.1f} ms, torch {t_torch * 1e3:.1f} ms", flush=True)

  with theirs.disable_adapter():
    forward_row("forward, no adapter", jit_forward(ours), torch_forward(theirs))
  for path, leaf in adapter.items():
    layers[path].set_adapter(leaf)
  forward_row(f"forward, unmerged LoRA r={args.rank} (q,v)", jit_forward(ours),
              torch_forward(theirs))

  # Train step: the adapter only, AdamW, cross-entropy on the logits.
  graphdef, lora_state, rest = nnx.split(ours, LoRAParam, ...)
  opt = optax.adamw(1e-4)
  opt_state = opt.init(lora_state)

  @jax.jit   # the frozen weights are an argument, not closed-over constants
  def step(lora_state, opt_state, rest, px, labels):
    def loss_fn(ls):
      logits = nnx.merge(graphdef, ls, rest)(px).logits
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(lora_state)
    updates, opt_state = opt.update(grads, opt_state, lora_state)
    return optax.apply_updates(lora_state, updates), opt_state, loss

  train_state = [lora_state, opt_state]

  def ours_train():
    train_state[0], train_state[1], loss = step(train_state[0], train_state[1], rest, x, y)
    return _ready(loss)

  snapshot = {n: t.detach().clone() for n, t in theirs.named_parameters() if t.requires_grad}
  theirs.train()
  torch_opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4)

  def torch_train():
    torch_opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(theirs(x_t).logits, y_t)
    loss.backward()
    torch_opt.step()
    return loss

  t_ours, t_torch, ratio, _, _ = paired_times(ours_train, torch_train, args.reps, args.warmup)
  rows.append(Row(f"train step, LoRA r={args.rank} (q,v)", t_ours, t_torch, ratio, args.batch,
                  None))
  print(f"  train: ours {t_ours * 1e3:.1f} ms, torch {t_torch * 1e3:.1f} ms", flush=True)
  theirs.eval()
  with torch.no_grad():  # undo torch's training steps (ours trained a copy of the state)
    for n, t in theirs.named_parameters():
      if n in snapshot:
        t.copy_(snapshot[n])

  # Merged: fold the adapter into the kernels on both sides.
  for path in adapter:
    layers[path].merge()
  merged = theirs.merge_and_unload()
  forward_row("forward, merged", jit_forward(ours), torch_forward(merged))
  return rows


def llama_cases(args) -> list[Row]:
  """Decode speed of the Llama port against HF generate (benchmarks/llama_speed.py)."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  from llama_speed import llama_cases as cases
  return cases(args)


MODELS = {"vit": vit_cases, "llama": llama_cases}


# --- Report ---------------------------------------------------------------------------------

def _ratio(r) -> float | None:
  # Rows from other scripts (benchmarks/llama_speed.py) may lack the paired ratio.
  paired = getattr(r, "ratio", None)
  return paired if paired is not None else (r.ours_s / r.torch_s if r.torch_s else None)


def table(rows) -> str:
  lines = ["| case | ours ms | torch ms | ours items/s | torch items/s | ours/torch time "
           "| max abs diff |", "|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    diff = "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"
    torch_ms = "-" if not r.torch_s else f"{r.torch_s * 1e3:.1f}"
    torch_rate = "-" if not r.torch_s else f"{r.items / r.torch_s:.1f}"
    ratio = "-" if _ratio(r) is None else f"{_ratio(r):.2f}"
    lines.append(f"| {r.case} | {r.ours_s * 1e3:.1f} | {torch_ms} | {r.items / r.ours_s:.1f} "
                 f"| {torch_rate} | {ratio} | {diff} |")
  return "\n".join(lines)


def plot(rows, path: Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 3.5))
  idx = np.arange(len(rows))
  ax.barh(idx - 0.2, [r.items / r.ours_s for r in rows], 0.4, label="ours (JAX, jit)")
  ax.barh(idx + 0.2, [r.items / r.torch_s if r.torch_s else 0 for r in rows], 0.4,
          label="HF PyTorch")
  ax.set_yticks(idx, [r.case for r in rows])
  ax.set_xlabel("items / s (higher is better)")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=sorted(MODELS), default="vit")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--rank", type=int, default=16, help="LoRA rank on q and v")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--threads", type=int, default=os.cpu_count(),
                 help="torch.set_num_threads (default: all cores, as XLA uses)")
  p.add_argument("--quick", action="store_true", help="batch 4, 3 repeats, 2 warm-ups")
  p.add_argument("--tiny", action="store_true", help="a tiny model shape (smoke test)")
  p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.reps, args.warmup = min(args.batch, 4), 3, 2
  print(f"{args.model}: batch {args.batch}, {args.reps} reps, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, {os.cpu_count()} cores", flush=True)
  rows = MODELS[args.model](args)
  print()
  print(table(rows))
  fwd = [r for r in rows if r.case.startswith("forward")]
  if fwd:
    print(f"\nours/PyTorch forward time (no adapter, median of paired ratios): "
          f"{_ratio(fwd[0]):.2f}")
  args.out.mkdir(parents=True, exist_ok=True)
  stem = args.out / f"model_speed_{args.model}"
  meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
  stem.with_suffix(".json").write_text(json.dumps(
      {"args": meta, "cores": os.cpu_count(), "rows": [r._asdict() for r in rows]}, indent=2))
  plot(rows, stem.with_suffix(".png"), f"{args.model}, batch {args.batch}")
  print(f"wrote {stem}.json and .png")


if __name__ == "__main__":
  main()

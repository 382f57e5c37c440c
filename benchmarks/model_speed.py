"""Model throughput: our Flax NNX port (jit) against HF PyTorch, forward and LoRA train step.

    .venv/bin/python benchmarks/model_speed.py                 # ViT-B/16, batch 32
    .venv/bin/python benchmarks/model_speed.py --quick         # batch 4, fewer repeats
    .venv/bin/python benchmarks/model_speed.py --model vit --batch 8 --reps 5
    .venv/bin/python benchmarks/model_speed.py --model sam --batch 1 --reps 3   # SAM ViT-B, 1024²
    .venv/bin/python benchmarks/model_speed.py --model llama --batch 8         # decode + train
    .venv/bin/python benchmarks/model_speed.py --model gemm --batch 8 --reps 20  # matmuls alone

Both sides get the same weights (the torch model is saved with ``save_pretrained`` and
loaded with ``models.hf.load``) and the same adapter (a PEFT LoRA with random non-zero
lora_B, read with ``rpe_jax.library.peft_io.read_peft``), so the table also reports the largest
output difference. Cases: no adapter, the adapter unmerged (x W + (x a) b), the adapter
merged into the kernels; then one LoRA train step (AdamW, adapter only trainable) on both
sides: ours is one step of the product's training core (``rpe_jax.training.fit``), theirs
the PEFT model's ``backward`` + ``clip_grad_norm_`` + ``torch.optim.AdamW`` (``train_row``).
SAM: forward and train step with a LoRA on the image encoder's ``qkv``; Llama: the decode
cases of benchmarks/llama_speed.py and a train step with a LoRA on q and v. The two sides are timed alternately, ``--reps`` pairs after ``--warmup`` pairs, and
the ratio is the median of the per-pair ratios, so both see the same machine load (ours:
compiled and ``block_until_ready``; torch: ``no_grad``/eval, ``torch.set_num_threads``).

Adding a model: write ``<name>_cases(args) -> list[Row]`` and add it to ``MODELS``.
Writes benchmarks/results/model_speed_<model>.json and .png.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from rpe_jax.compose import with_adapter  # noqa: E402


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


# --- the LoRA train step, shared by every model -------------------------------------------
#
# Ours is one step of the product's training core: ``rpe_jax.training.fit`` for one epoch of
# one step (its per-call set-up included: the copy of the trainable leaves, the optimiser
# init, the loss read back), the LoRA leaves trainable, AdamW with global-norm clipping at
# 1, the frozen weights an argument of the compiled step. Theirs: the PEFT model in train
# mode, ``zero_grad`` → forward → loss → ``backward`` → ``clip_grad_norm_(1)`` → AdamW.


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
  """Mean cross-entropy of a classifier's logits (a hashable ``fit`` loss)."""

  def __call__(self, model, batch):
    import optax
    logits = model(batch["pixels"]).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(), {}


@dataclasses.dataclass(frozen=True)
class NextTokenLoss:
  """Mean next-token cross-entropy of a causal LM on ``batch["ids"]``."""

  def __call__(self, model, batch):
    import optax
    ids = batch["ids"]
    logits = model(ids).logits[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean(), {}


@dataclasses.dataclass(frozen=True)
class MaskBCE:
  """Mean binary cross-entropy of SAM's single-mask logits against ``batch["masks"]``."""

  def __call__(self, model, batch):
    import optax
    logits = model(batch["pixels"], boxes=batch["boxes"], multimask_output=False).pred_masks
    return optax.sigmoid_binary_cross_entropy(logits[:, 0, 0], batch["masks"]).mean(), {}


def train_row(case: str, ours, loss_fn, batch: dict, theirs, torch_loss: Callable, args) -> Row:
  """Time one LoRA train step on both sides (paired), and undo torch's updates after."""
  import torch

  from models.lora import LoRAParam
  from rpe_jax.training import OptimConfig, fit

  config = OptimConfig(lr=1e-4, weight_decay=1e-4, clip_norm=1.0, schedule="cosine")

  def ours_train():
    result = fit(ours, LoRAParam, loss_fn, lambda epoch: [batch], epochs=1, steps_per_epoch=1,
                 config=config)
    return result.losses

  trainable = [p for p in theirs.parameters() if p.requires_grad]
  snapshot = {n: t.detach().clone() for n, t in theirs.named_parameters() if t.requires_grad}
  was_training = theirs.training
  theirs.train()
  torch_opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4)

  def torch_train():
    torch_opt.zero_grad(set_to_none=True)
    loss = torch_loss(theirs)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    torch_opt.step()
    return loss

  t_ours, t_torch, ratio, _, _ = paired_times(ours_train, torch_train, args.reps, args.warmup)
  theirs.train(was_training)
  with torch.no_grad():  # undo torch's training steps (fit trained a copy of ours)
    for n, t in theirs.named_parameters():
      if n in snapshot:
        t.copy_(snapshot[n])
  print(f"  {case}: ours {t_ours * 1e3:.1f} ms, torch {t_torch * 1e3:.1f} ms", flush=True)
  return Row(case, t_ours, t_torch, ratio, len(next(iter(batch.values()))), None)


# --- ViT ------------------------------------------------------------------------------------

def vit_cases(args) -> list[Row]:
  import torch
  import transformers
  from flax import nnx

  from models.lora import adapted_layers, to_flat

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

  ours, theirs, adapter = _peft_pair(theirs, ["q_proj", "v_proj"], args.rank)

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
  ours = with_adapter(ours, adapter)
  forward_row(f"forward, unmerged LoRA r={args.rank} (q,v)", jit_forward(ours),
              torch_forward(theirs))

  # Train step: the adapter only, AdamW, cross-entropy on the logits.
  rows.append(train_row(f"train step, LoRA r={args.rank} (q,v)", ours, CrossEntropy(),
                        {"pixels": x, "labels": y}, theirs,
                        lambda m: torch.nn.functional.cross_entropy(m(x_t).logits, y_t),
                        args))

  # Merged: fold the adapter into the kernels on both sides.
  layers = adapted_layers(ours)
  for path in to_flat(adapter):
    layers[path].merge()
  merged = theirs.merge_and_unload()
  forward_row("forward, merged", jit_forward(ours), torch_forward(merged))
  return rows


def _peft_pair(theirs, targets, rank):
  """(ours, theirs as a PeftModel, the adapter as read by ``read_peft``): the same random
  non-zero LoRA (PEFT-made, lora_B redrawn), not yet set on ours (``with_adapter`` does)."""
  import peft
  import torch

  from models import hf
  from rpe_jax.library.peft_io import read_peft
  with tempfile.TemporaryDirectory() as tmp:
    theirs.save_pretrained(f"{tmp}/base")
    ours = hf.load(f"{tmp}/base")
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=rank, lora_alpha=rank,
                                                         target_modules=list(targets)))
    with torch.no_grad():
      for name, p in theirs.named_parameters():
        if "lora_B" in name:
          p.copy_(0.02 * torch.randn_like(p))
    theirs.save_pretrained(f"{tmp}/adapter")
    adapter = read_peft(f"{tmp}/adapter", ours)
  return ours, theirs, adapter


def sam_cases(args) -> list[Row]:
  """SAM (HF ``SamConfig()``: ViT-B image encoder at 1024², ``--tiny``: a 64² toy) with one
  box per image: forward without and with a LoRA on every encoder ``qkv``, and the train
  step of that LoRA on the BCE of the single-mask logits against a random mask."""
  import torch
  import transformers

  from flax import nnx

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  if args.tiny:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_sam import tiny_hf_config
    hf_config = tiny_hf_config()
  else:
    hf_config = transformers.SamConfig()
  ours, theirs, adapter = _peft_pair(transformers.SamModel(hf_config).eval(), ["qkv"],
                                     args.rank)
  ours = with_adapter(ours, adapter)
  size = hf_config.vision_config.image_size
  low_res = 4 * hf_config.prompt_encoder_config.image_embedding_size
  x_t = torch.randn(args.batch, 3, size, size)
  boxes_t = torch.tensor([[size / 4, size / 4, 3 * size / 4, 3 * size / 4]]).repeat(
      args.batch, 1, 1)
  masks_t = (torch.rand(args.batch, low_res, low_res) > 0.5).float()
  x = jnp.asarray(x_t.permute(0, 2, 3, 1).numpy())
  boxes, masks = jnp.asarray(boxes_t.numpy()), jnp.asarray(masks_t.numpy())

  def theirs_masks(model):
    return model(pixel_values=x_t, input_boxes=boxes_t, multimask_output=False).pred_masks

  graphdef, state = nnx.split(ours)
  fwd = jax.jit(lambda s: nnx.merge(graphdef, s)(x, boxes=boxes, multimask_output=False)
                .pred_masks)
  rows = []

  def forward_row(case, model_torch):
    def run_torch():
      with torch.no_grad():
        return theirs_masks(model_torch)
    t_ours, t_torch, ratio, out, ref = paired_times(lambda: _ready(fwd(state)), run_torch,
                                                    args.reps, args.warmup)
    diff = float(np.abs(np.asarray(out) - ref.numpy()).max())
    rows.append(Row(case, t_ours, t_torch, ratio, args.batch, diff))
    print(f"  {case}: ours {t_ours * 1e3:.1f} ms, torch {t_torch * 1e3:.1f} ms", flush=True)

  forward_row(f"forward, unmerged LoRA r={args.rank} (qkv)", theirs)
  rows.append(train_row(
      f"train step, LoRA r={args.rank} (qkv)", ours, MaskBCE(),
      {"pixels": x, "boxes": boxes, "masks": masks}, theirs,
      lambda m: torch.nn.functional.binary_cross_entropy_with_logits(
          theirs_masks(m)[:, 0, 0], masks_t), args))
  return rows


def llama_cases(args) -> list:
  """Decode speed of the Llama port against HF generate (benchmarks/llama_speed.py), then
  the train step of a LoRA on q and v (next-token loss on ``--batch`` × 128 random tokens),
  on the same shape (8 layers, hidden 512, vocab 4096; ``--tiny``: 2 layers, hidden 64)."""
  import torch
  import transformers

  sys.path.insert(0, str(ROOT / "benchmarks"))
  from llama_speed import hf_config
  from llama_speed import llama_cases as decode_cases
  rows = decode_cases(args)
  torch.manual_seed(0)
  config = hf_config(args.tiny)
  ours, theirs, adapter = _peft_pair(transformers.LlamaForCausalLM(config).eval(),
                                     ["q_proj", "v_proj"], args.rank)
  ours = with_adapter(ours, adapter)
  ids_t = torch.randint(3, config.vocab_size, (args.batch, 128))

  def torch_loss(m):
    logits = m(input_ids=ids_t).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             ids_t[:, 1:].reshape(-1))

  rows.append(train_row(f"train step {args.batch}x128, LoRA r={args.rank} (q,v)", ours,
                        NextTokenLoss(), {"ids": jnp.asarray(ids_t.numpy())}, theirs,
                        torch_loss, args))
  return rows


def gemm_cases(args) -> list[Row]:
  """The floor under every row above: the float32 matmuls of a ViT-B/16 layer at
  ``--batch`` images (197 tokens each) — q/k/v/o, fc1, fc2 and the backward's transposed
  products — as one jitted ``x @ w`` against ``torch.matmul`` on the same arrays, paired."""
  import torch
  torch.set_num_threads(args.threads)
  m = args.batch * 197
  rows = []
  for name, k, n, transposed in (("q/k/v/o: [m,768]@[768,768]", 768, 768, False),
                                 ("fc1: [m,768]@[768,3072]", 768, 3072, False),
                                 ("fc2: [m,3072]@[3072,768]", 3072, 768, False),
                                 ("fc1 backward dx: [m,3072]@[768,3072]^T", 3072, 768, True)):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if transposed else (k, n), dtype=np.float32)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    mm = jax.jit((lambda x, y: x @ y.T) if transposed else (lambda x, y: x @ y))
    t_ours, t_torch, ratio, out, ref = paired_times(
        lambda: _ready(mm(ja, jb)), lambda: (ta @ tb.T) if transposed else (ta @ tb),
        args.reps, args.warmup)
    diff = float(np.abs(np.asarray(out) - ref.numpy()).max())
    rows.append(Row(f"{name}, m={m}", t_ours, t_torch, ratio, args.batch, diff))
    print(f"  {name}: ours {t_ours * 1e3:.2f} ms, torch {t_torch * 1e3:.2f} ms "
          f"({2 * m * k * n / t_ours / 1e9:.0f} vs {2 * m * k * n / t_torch / 1e9:.0f} GFLOP/s)",
          flush=True)
  return rows


MODELS = {"vit": vit_cases, "sam": sam_cases, "llama": llama_cases, "gemm": gemm_cases}


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
    print(f"\nours/PyTorch time, {fwd[0].case} (median of paired ratios): "
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

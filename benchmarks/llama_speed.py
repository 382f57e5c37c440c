"""Llama decode speed: our jit KV-cache ``generate`` against HF PyTorch ``generate``.

    .venv/bin/python benchmarks/llama_speed.py            # 8 layers, hidden 512, batch 8
    .venv/bin/python benchmarks/llama_speed.py --quick    # batch 2, 16 tokens, 3 repeats
    .venv/bin/python benchmarks/llama_speed.py --tiny     # 2 layers, hidden 64 (smoke test)

Both sides get the same weights (torch ``save_pretrained`` → ``models.hf.load``) and the
same PEFT LoRA on q/k/v/o (random non-zero lora_B, read by ``rpe_jax.library.peft_io``). Cases:
prefill (one forward over the prompt), greedy decode of ``--new-tokens`` tokens without an
adapter and with the adapter unmerged (HF: ``PeftModel``). Decode always runs the full
budget (no EOS), and the greedy tokens of the two sides are compared. Medians over
``--reps`` after ``--warmup`` (ours compiled and ``block_until_ready``).

Hook for ``benchmarks/model_speed.py --model llama``: ``MODELS["llama"] = llama_cases``
(it reads args.batch, reps, warmup, threads, rank, tiny and, if present, prompt_len and
new_tokens). Standalone it writes benchmarks/results/llama_speed.json.
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
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402


class Row(NamedTuple):  # the same fields as model_speed.Row
  case: str
  ours_s: float
  torch_s: float | None
  items: int                # tokens per call
  max_abs_diff: float | None


def median_time(fn, reps, warmup):
  for _ in range(warmup):
    fn()
  times, out = [], None
  for _ in range(reps):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def hf_config(tiny: bool, vocab: int = 4096):
  import transformers
  if tiny:
    return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, initializer_range=0.1)
  return transformers.LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1408,
                                  num_hidden_layers=8, num_attention_heads=8,
                                  num_key_value_heads=2, initializer_range=0.05,
                                  max_position_embeddings=4096)


def llama_cases(args) -> list:
  import peft
  import torch
  from models import hf as hf_io
  from models import llama
  from rpe_jax.compose import with_adapter
  from rpe_jax.library.peft_io import read_peft

  torch.set_num_threads(args.threads)
  prompt_len = getattr(args, "prompt_len", 32)
  new_tokens = getattr(args, "new_tokens", 32)
  torch.manual_seed(0)
  cfg = hf_config(args.tiny)
  ref = __import__("transformers").LlamaForCausalLM(cfg).eval()
  ids = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(args.batch, prompt_len))
  t_ids = torch.tensor(ids)
  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(Path(tmp) / "base")
    ours = hf_io.load(Path(tmp) / "base")
    tuned = peft.get_peft_model(ref, peft.LoraConfig(
        r=args.rank, lora_alpha=args.rank, target_modules=["q_proj", "k_proj", "v_proj",
                                                           "o_proj"]))
    for name, p in tuned.named_parameters():
      if "lora_B" in name:
        torch.nn.init.normal_(p, std=0.02)
    tuned.save_pretrained(Path(tmp) / "adapter")
    ours_lora = with_adapter(ours, read_peft(Path(tmp) / "adapter", ours))
  tuned.eval()
  rows = []

  from flax import nnx
  forward = nnx.jit(lambda m, x: m(x).logits)
  with tuned.disable_adapter():
    t_s, t_out = median_time(lambda: _no_grad(lambda: ref(t_ids).logits), args.reps, args.warmup)
  o_s, o_out = median_time(lambda: jax.block_until_ready(forward(ours, ids)), args.reps,
                           args.warmup)
  rows.append(Row(f"prefill {args.batch}x{prompt_len}", o_s, t_s, args.batch * prompt_len,
                      float(np.abs(np.asarray(o_out) - t_out.numpy()).max())))

  def ours_decode(model):
    return lambda: jax.block_until_ready(llama.generate(model, ids, new_tokens, eos_token_id=()))

  def torch_decode(model):
    return lambda: _no_grad(lambda: model.generate(
        input_ids=t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0))

  for case, mine, theirs in (("decode greedy", ours, None), ("decode greedy, LoRA unmerged",
                                                             ours_lora, tuned)):
    if theirs is None:
      with tuned.disable_adapter():
        t_s, t_out = median_time(torch_decode(ref), args.reps, args.warmup)
    else:
      t_s, t_out = median_time(torch_decode(theirs), args.reps, args.warmup)
    o_s, o_out = median_time(ours_decode(mine), args.reps, args.warmup)
    same = np.mean(np.asarray(o_out) == t_out[:, prompt_len:].numpy())
    print(f"{case}: {100 * same:.1f}% of greedy tokens identical to HF", flush=True)
    rows.append(Row(f"{case} {args.batch}x{new_tokens} tok", o_s, t_s,
                        args.batch * new_tokens, None))
  return rows


def _no_grad(fn):
  import torch
  with torch.no_grad():
    return fn()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--quick", action="store_true", help="batch 2, 16 new tokens, 3 repeats")
  p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.new_tokens, args.reps = min(args.batch, 2), 16, 3
  print(f"llama decode: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new "
        f"tokens, {args.reps} reps, jax {jax.__version__}, {os.cpu_count()} cores", flush=True)
  rows = llama_cases(args)
  lines = ["| case | ours ms | torch ms | ours tok/s | torch tok/s | ours/torch time | "
           "max abs diff |", "|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    diff = "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"
    lines.append(f"| {r.case} | {r.ours_s * 1e3:.1f} | {r.torch_s * 1e3:.1f} | "
                 f"{r.items / r.ours_s:.0f} | {r.items / r.torch_s:.0f} | "
                 f"{r.ours_s / r.torch_s:.2f} | {diff} |")
  print("\n" + "\n".join(lines))
  args.out.mkdir(parents=True, exist_ok=True)
  path = args.out / "llama_speed.json"
  meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
  path.write_text(json.dumps({"args": meta, "rows": [r._asdict() for r in rows]}, indent=2))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()

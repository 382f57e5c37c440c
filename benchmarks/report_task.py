"""Leave-one-out adapter composition on the report → impression task (RPE's language setup).

    .venv/bin/python benchmarks/report_task.py            # 4 modalities, 150 steps each
    .venv/bin/python benchmarks/report_task.py --quick    # fewer reports and steps

A tiny Llama (random base, as there are no weights to download) and a byte-level BPE
trained locally on synthetic radiology reports of the modalities in
``rpe_jax.tasks.report.MODALITIES``. One LoRA per modality is trained on impression tokens only.
For each held-out modality, the other modalities' adapters are weighted from their
findings prototypes (every strategy of ``rpe_jax.weighting``), composed exactly
(``rpe_jax.compose.combine``), and the greedy impressions of the held-out test reports are
scored by ROUGE-L F1. Rows ``base`` (no adapter) and ``own`` (the held-out modality's own
adapter: an upper bound the composition does not see) frame the strategies.

Hook for ``benchmarks/leave_one_out.py --task report``: ``add_arguments(parser)`` then
``run(args)``. Writes benchmarks/results/report_task.json and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from held_out_table import markdown_table, plot_bars  # noqa: E402
from models import llama  # noqa: E402
from rpe_jax.tasks import report as text  # noqa: E402
from rpe_jax.compose import combine, with_adapter  # noqa: E402


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--modalities", nargs="+", default=sorted(text.MODALITIES),
                 choices=sorted(text.MODALITIES))
  p.add_argument("--n-train", type=int, default=96, help="training reports per modality")
  p.add_argument("--n-test", type=int, default=32, help="held-out test reports")
  p.add_argument("--steps", type=int, default=150, help="adapter training steps")
  p.add_argument("--rank", type=int, default=4)
  p.add_argument("--hidden", type=int, default=64, help="tiny Llama hidden size")
  p.add_argument("--vocab", type=int, default=768, help="BPE vocabulary size")
  p.add_argument("--max-new-tokens", type=int, default=16)
  p.add_argument("--lam1", type=float, default=1.0, help="sim temperature")
  p.add_argument("--lam2", type=float, default=1.0, help="sparse l1 weight (language: 1)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--bertscore-model", default=None, metavar="DIR",
                 help="a local HF BERT-like folder: also report BERTScore F1 with it")
  p.add_argument("--quick", action="store_true", help="48 train / 16 test reports, 60 steps")
  p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")


def _weights_fn():
  """rpe_jax.weighting when importable; otherwise plain averaging (said on stdout)."""
  try:
    from rpe_jax.weighting import STRATEGIES, compute_weights
  except ImportError as e:
    print(f"rpe_jax.weighting is not importable ({e}); composing with 'avg' only")
    return ("avg",), lambda refs, z, strategy, **kw: np.full(len(refs), 1 / len(refs))
  return STRATEGIES, lambda *a, **kw: np.asarray(compute_weights(*a, **kw).weights)


def run(args) -> dict:
  if args.quick:
    args.n_train, args.n_test, args.steps = min(args.n_train, 48), min(args.n_test, 16), 60
  mods = list(args.modalities)
  if len(mods) < 3:
    raise SystemExit("--modalities: need at least 3 (2 to compose, 1 held out)")
  t0 = time.perf_counter()
  train = {m: text.synthetic_reports(m, args.n_train, seed=args.seed) for m in mods}
  test = {m: text.synthetic_reports(m, args.n_test, seed=args.seed + 1) for m in mods}
  corpus = [s for m in mods for r in train[m] for s in r]
  corpus += [text.format_prompt("", t) for t in text.TEMPLATES]
  codec = text.train_tokenizer(corpus, args.vocab)
  cfg = llama.LlamaConfig(vocab_size=codec.vocab_size, hidden_size=args.hidden,
                          intermediate_size=2 * args.hidden, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=args.hidden // 4,
                          eos_token_id=(codec.eos_id,), pad_token_id=codec.pad_id)
  base = llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(args.seed))
  config = text.TextTrainConfig(steps=args.steps, batch_size=8, lr=1e-2, rank=args.rank,
                                seed=args.seed)
  adapters, protos = {}, {}
  for m in mods:
    result = text.train_adapter(base, text.encode_examples(codec, train[m], 64, seed=args.seed),
                                config)
    adapters[m] = result.adapter
    protos[m] = text.findings_prototype(base, codec, [r.findings for r in train[m]]).z
    print(f"trained {m}: loss {result.losses[:5].mean():.2f} → {result.losses[-5:].mean():.2f}"
          f" ({time.perf_counter() - t0:.0f} s)", flush=True)

  strategies, weights_fn = _weights_fn()
  scores: dict[str, dict[str, float]] = {}
  bertscores: dict[str, dict[str, float]] = {}
  weights: dict[str, dict[str, list]] = {}

  def score(row, held, model):
    pred = text.generate_impressions(model, codec, [r.findings for r in test[held]],
                                     max_new_tokens=args.max_new_tokens)
    truth = [r.impression for r in test[held]]
    scores.setdefault(row, {})[held] = text.rouge_l(pred, truth).f1
    if args.bertscore_model:
      bertscores.setdefault(row, {})[held] = text.bert_score(pred, truth,
                                                             args.bertscore_model).f1

  for held in mods:
    lib = [m for m in mods if m != held]
    z = text.findings_prototype(base, codec, [r.findings for r in test[held]]).z
    refs = np.stack([protos[m] for m in lib])
    score("base", held, base)
    score("own", held, with_adapter(base, adapters[held]))
    for s in strategies:
      w = weights_fn(refs, z, s, lam1=args.lam1, lam2=args.lam2)
      weights.setdefault(s, {})[held] = dict(zip(lib, np.asarray(w, float).round(4).tolist()))
      score(s, held, with_adapter(base, combine([adapters[m] for m in lib], w)))
    print(f"held out {held}: " + ", ".join(f"{r} {scores[r][held]:.3f}" for r in scores),
          flush=True)

  table = markdown_table(scores, mods)
  print("\nROUGE-L F1 on the held-out modality (rows: composition strategy)\n")
  print(table)
  if bertscores:
    print("\nBERTScore F1 on the held-out modality\n")
    for row, per in bertscores.items():
      print(f"| {row} | " + " | ".join(f"{per[m]:.3f}" for m in mods)
            + f" | {np.mean([per[m] for m in mods]):.3f} |")
  print(f"\ntotal {time.perf_counter() - t0:.0f} s")

  args.out.mkdir(parents=True, exist_ok=True)
  stem = args.out / "report_task"
  meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
          if k != "func"}
  stem.with_suffix(".json").write_text(json.dumps(
      {"args": meta, "rouge_l": scores, "bertscore_f1": bertscores, "weights": weights,
       "table": table}, indent=2))
  plot_bars(scores, mods, stem.with_suffix(".png"), ylabel="ROUGE-L F1 (held out)")
  print(f"wrote {stem}.json and .png")
  return scores


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(p)
  run(p.parse_args(argv))


if __name__ == "__main__":
  main()

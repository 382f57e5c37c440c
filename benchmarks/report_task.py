"""Leave-one-out adapter composition on the report → impression task (RPE's language setup).

    .venv/bin/python benchmarks/report_task.py            # 4 modalities, 25 epochs each
    .venv/bin/python benchmarks/report_task.py --quick    # the demo's sizes

The built-in synthetic reports (``reports:<modality>``, ``rpe_jax.tasks.report_data``: 160
per modality, 96 / 32 / 32 train / val / test) through the task contract and the pipeline's
public API, exactly as ``python -m rpe_jax.compose --demo report`` builds its base and
library:

* the frozen base is a byte-level BPE (``rpe_jax.tasks.report.train_tokenizer``, on the
  train reports of the members and base modalities) and a small Llama *pretrained* in full
  on the train reports of ``--base-modalities`` (``rpe_jax.tasks.report.pretrain_base``; no
  pretrained language model can be downloaded here), cached as an HF folder with its
  ``tokenizer.json`` under ``<out>/loo_cache/``;
* one LoRA per modality (every attention and MLP projection, impression tokens only)
  trained by ``ReportTask.train`` and stored in a ``Library`` (cached beside the base) with
  its prototype: the mean last hidden state over the findings tokens of its train reports;
* for each held-out modality, the findings of its test reports (no impression) give the
  target prototype; every strategy of ``rpe_jax.weighting`` weighs and composes the other
  modalities' adapters (``rpe_jax.pipeline.compose_targets``, the modality excluded), and
  ``rpe_jax.pipeline.predict_targets`` scores the greedy impressions by ROUGE-L F1 (and
  BERTScore F1 with ``--bertscore-model``). Rows ``base`` (no adapter) and ``own`` (the
  modality's own library adapter: an upper reference the composition never sees) frame
  the strategies.

Hook for ``benchmarks/leave_one_out.py --task report``: ``add_arguments(parser)`` then
``run(args)`` (returns {row: {modality: ROUGE-L F1}}). Writes
``<out>/report_task[_quick].{md,json,png}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
  if str(_p) not in sys.path:
    sys.path.insert(0, str(_p))

from rpe_jax.tasks import report  # noqa: E402
from task_leave_one_out import (build_library, cached, held_out_scores,  # noqa: E402
                                options_key, write_outputs)

MODALITIES = sorted(report.MODALITIES)
QUICK = {"base_steps": 300, "epochs": 12}     # the report demo's sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--modalities", nargs="+", default=MODALITIES, choices=MODALITIES,
                 help="the members (at least 3; default all 4)")
  p.add_argument("--base-modalities", nargs="+", default=["ct_chest", "us_abdomen"],
                 choices=MODALITIES, help="modalities whose train reports pretrain the base")
  p.add_argument("--vocab", type=int, default=512, help="BPE vocabulary size")
  p.add_argument("--hidden", type=int, default=64, help="Llama hidden size")
  p.add_argument("--layers", type=int, default=2, help="Llama layers")
  p.add_argument("--base-steps", type=int, default=600, help="full training of the base")
  p.add_argument("--epochs", type=int, default=25,
                 help="adapter epochs (6 steps each: 96 train reports, batch 16)")
  p.add_argument("--lr", type=float, default=None, help="adapter lr (task default 3e-3)")
  p.add_argument("--rank", type=int, default=4)
  p.add_argument("--max-new-tokens", type=int, default=20)
  p.add_argument("--k", type=int, default=None,
                 help="adapters retrieved per held-out modality (default: all the others)")
  p.add_argument("--lam1", type=float, default=1.0, help="sim temperature")
  p.add_argument("--lam2", type=float, default=1.0, help="sparse l1 weight (language: 1)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--bertscore-model", default=None, metavar="DIR",
                 help="a local HF BERT-like folder: also report BERTScore F1 with it")
  p.add_argument("--quick", action="store_true",
                 help=f"{QUICK['base_steps']} base steps, {QUICK['epochs']} adapter epochs")
  p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")


def _uri(modality: str) -> str:
  return f"reports:{modality}"


def base(args, modalities) -> tuple:
  """(TaskModel, key): the tokenizer and the pretrained Llama, built once per option set,
  cached as an HF folder with ``tokenizer.json``."""
  from models import hf
  from rpe_jax.tasks.registry import task_model
  from rpe_jax.tasks.report_data import load
  corpus_modalities = sorted(set(modalities) | set(args.base_modalities))
  options = {"task": "report", "corpus": corpus_modalities,
             "base_modalities": sorted(args.base_modalities), "vocab": args.vocab,
             "hidden": args.hidden, "layers": args.layers, "steps": args.base_steps,
             "seed": args.seed, "v": 1}
  key = options_key(options)

  def build(tmp):
    train = {m: list(load(_uri(m), "train", seed=args.seed).reports)
             for m in corpus_modalities}
    corpus = [text for reports in train.values() for r in reports
              for text in (r.findings, r.impression)]
    corpus += [report.format_prompt("", t) for t in report.TEMPLATES]
    codec = report.train_tokenizer(corpus, args.vocab)
    print(f"pretraining the Llama base on {args.base_modalities} ({args.base_steps} "
          "steps) ...", flush=True)
    model = report.pretrain_base(codec, [r for m in args.base_modalities for r in train[m]],
                                 hidden=args.hidden, layers=args.layers,
                                 steps=args.base_steps, seed=args.seed)
    hf.save(model, tmp)
    report.save_codec(codec, tmp)

  folder = cached(args.out / "loo_cache" / f"report-base-{key}", build)
  return task_model(hf.load(folder), folder), key


def run(args) -> dict:
  from rpe_jax.tasks.contract import TrainOptions
  from rpe_jax.tasks.registry import task_named
  if args.quick:
    args.base_steps = min(args.base_steps, QUICK["base_steps"])
    args.epochs = min(args.epochs, QUICK["epochs"])
  mods = list(dict.fromkeys(args.modalities))
  if len(mods) < 3:
    raise SystemExit("--modalities: need at least 3 (2 to compose, 1 held out)")
  t0 = time.perf_counter()
  task = task_named("report")
  tm, base_key = base(args, mods)
  t_base = time.perf_counter()
  members = {m: _uri(m) for m in mods}
  options = TrainOptions(rank=args.rank, epochs=args.epochs, lr=args.lr, seed=args.seed)
  lib_key = options_key({"base": base_key, "members": members, **options._asdict()})
  lib = build_library(task, tm, members, options,
                      args.out / "loo_cache" / f"report-library-{lib_key}",
                      base_model=f"loo-llama-{base_key}")
  t_lib = time.perf_counter()
  predict_options = {"max_new_tokens": args.max_new_tokens}
  if args.bertscore_model:
    predict_options["bertscore_model"] = args.bertscore_model
  result = held_out_scores(task, tm, lib, members, k=args.k, lam1=args.lam1,
                           lam2=args.lam2, seed=args.seed, predict_options=predict_options)
  lib.close()
  t_end = time.perf_counter()
  seconds = {"base": round(t_base - t0, 1), "library": round(t_lib - t_base, 1),
             "held_out": round(t_end - t_lib, 1), "total": round(t_end - t0, 1)}
  stem = args.out / ("report_task_quick" if args.quick else "report_task")
  write_outputs(stem, args, task, members, result, seconds,
                ylabel="ROUGE-L F1 (held out)", ylim=(0, 1),
                note=f"Base: a {args.layers}-layer, width-{args.hidden} Llama pretrained "
                f"{args.base_steps} steps on {', '.join(args.base_modalities)}; "
                f"{args.epochs} adapter epochs, rank {args.rank}, "
                f"{args.max_new_tokens} new tokens, λ1 = {args.lam1}, λ2 = {args.lam2}.")
  return result["scores"][task.metric]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(p)
  run(p.parse_args(argv))


if __name__ == "__main__":
  main()

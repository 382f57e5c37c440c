"""Med-LEGO: merging SVD-LoRA specialists, against LoRA averaging, task arithmetic and TIES.

    .venv/bin/python benchmarks/medlego.py            # the 5 built-in digit tasks
    .venv/bin/python benchmarks/medlego.py --quick    # fewer epochs, one data fraction
    .venv/bin/python benchmarks/medlego.py --data medmnist:pathmnist \\
        --data medmnist:dermamnist --data medmnist:bloodmnist --data-root ~/medmnist

1. One SVD-LoRA specialist per task (``train_adapter(kind="svd")``, Med-LEGO's orthogonality
   penalty, a fresh classification head per task) on the frozen foundation (the demo's ViT,
   ``rpe_jax.demo.foundation``).
2. The specialists merged into one adapter by
   * Med-LEGO: the exact average (1/N) Σ_i δW_i, re-truncated by SVD to the top singular
     values reaching the cumulative share v (``rpe_jax.merge.medlego_merge``);
   * LoRA averaging: factor-wise means (Σ a_i/N, Σ e_i/N, Σ b_i/N), with its cross terms;
   * task arithmetic: λ Σ_i δW_i;
   * TIES: trim (density 0.2) / elect sign / disjoint mean, times λ.
   λ of task arithmetic and TIES is chosen on the tasks' validation splits (mean accuracy)
   from a small grid, as their papers do; Med-LEGO and averaging have nothing to tune.
3. Every merged adapter is evaluated on every task's test split with that task's own head
   (Med-LEGO's Table 1: rows = method, columns = tasks + mean), next to the individual
   specialists and the heads alone (δθ = 0).
4. Transfer: a new task (``--new-task``, not among the merged ones) trained from the Med-LEGO
   merge of the other specialists (``init_adapter=``) against a fresh SVD-LoRA of the same
   training budget, on all and on a fraction of its training data; validation accuracy per
   epoch (a PNG).

Writes benchmarks/results/medlego[_quick].{json,md,png}.
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

DEFAULT_DATA = "tasks:digits"
GRID = (0.2, 0.4, 0.6, 0.8, 1.0)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--data", action="append", metavar="URI",
                 help="one task per URI (repeat) or a family (default tasks:digits)")
  p.add_argument("--data-root", default=None, help="folder with the dataset files")
  p.add_argument("--model", default="demo",
                 help="'demo' (the demo's foundation ViT) or an HF ViT classification folder")
  p.add_argument("--new-task", default=None,
                 help="task held out of the merge for the transfer experiment (default: last)")
  p.add_argument("--rank", type=int, default=4)
  p.add_argument("--targets", default="query,value,fc1,fc2",
                 help="adapted modules (comma-separated)")
  p.add_argument("--epochs", type=int, default=8, help="epochs per specialist")
  p.add_argument("--transfer-epochs", type=int, default=8)
  p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.2],
                 help="fractions of the new task's train split for the transfer runs")
  p.add_argument("--lr", type=float, default=1e-2)
  p.add_argument("--energy", type=float, nargs="+", default=[0.9, 1.0],
                 help="Med-LEGO thresholds v (1.0: the exact average, untruncated)")
  p.add_argument("--density", type=float, default=0.2, help="TIES density")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true",
                 help="3 epochs per run, one data fraction, v = 0.9 only")
  p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
  return p


def _name(uri: str) -> str:
  from leave_one_out import site_name   # the same naming as the sites benchmark
  return site_name(uri)


def task_uris(data) -> list[str]:
  from rpe_jax.tasks import images as data_lib
  uris = [m for uri in (data or [DEFAULT_DATA]) for m in data_lib.members(uri)]
  if len(uris) < 3:
    raise SystemExit(f"--data: need at least 3 tasks (2 to merge, 1 new), got {uris}")
  return uris


def _config(args, **kw):
  from rpe_jax.tasks.classification import TrainConfig
  targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
  return TrainConfig(rank=args.rank, kind="svd", targets=targets, lr=args.lr, seed=args.seed,
                     train_head=True, **kw)


def train_specialists(model, names, splits, args):
  """{task: TrainResult}: one SVD-LoRA + head per task."""
  from rpe_jax.tasks.classification import train_adapter
  out = {}
  for n in names:
    t0 = time.perf_counter()
    out[n] = train_adapter(model, splits[n].train, splits[n].val,
                           _config(args, epochs=args.epochs))
    print(f"specialist {n}: val {out[n].best_val_accuracy:.3f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
  return out


def head_model(specialist):
  """The frozen base with the specialist's head and no adapter."""
  from rpe_jax.compose import with_adapter
  return with_adapter(specialist.model, {})


def evaluate_merged(adapter, tasks, specialists, splits, split="test") -> dict[str, float]:
  """Accuracy of ``adapter`` on each task's ``split``, with that task's own head.

  The adapter is merged into the kernels: the same function as running it unmerged, but
  one compiled evaluation per head serves every merge (whatever its ranks)."""
  from rpe_jax.compose import merge_into
  from rpe_jax.tasks.classification import evaluate
  return {t: evaluate(merge_into(head_model(specialists[t]), adapter) if adapter else
                      head_model(specialists[t]), getattr(splits[t], split)) for t in tasks}


def _tuned(make, tasks, specialists, splits):
  """(λ, adapter): the grid value with the best mean validation accuracy."""
  scored = []
  for lam in GRID:
    adapter = make(lam)
    val = evaluate_merged(adapter, tasks, specialists, splits, "val")
    scored.append((float(np.mean(list(val.values()))), lam, adapter))
  best = max(scored, key=lambda s: s[0])
  return best[1], best[2]


def merge_table(model, tasks, specialists, splits, args) -> tuple[dict, dict]:
  """{row: {task: test accuracy}} and {row: notes} for the Table-1 comparison."""
  from rpe_jax.merge import lora_average, medlego_merge, task_arithmetic, ties_merge
  from models.lora import is_lora, to_flat
  import jax
  adapters = [specialists[t].adapter for t in tasks]
  rows, notes = {}, {}
  rows["individual specialist"] = {
      t: evaluate_merged(specialists[t].adapter, [t], specialists, splits)[t] for t in tasks}
  rows["heads only (δθ = 0)"] = evaluate_merged({}, tasks, specialists, splits)

  def rank_note(adapter):
    ranks = [leaf.rank for leaf in jax.tree.leaves(adapter, is_leaf=is_lora)]
    return f"rank {min(ranks)}–{max(ranks)} over {len(to_flat(adapter))} layers"

  avg = lora_average(adapters)
  rows["LoRA averaging (factor-wise)"] = evaluate_merged(avg, tasks, specialists, splits)
  notes["LoRA averaging (factor-wise)"] = rank_note(avg)
  lam, ta = _tuned(lambda s: task_arithmetic(adapters, s), tasks, specialists, splits)
  rows[f"task arithmetic (λ={lam:g})"] = evaluate_merged(ta, tasks, specialists, splits)
  notes[f"task arithmetic (λ={lam:g})"] = rank_note(ta) + "; λ tuned on val"
  lam, ties = _tuned(lambda s: ties_merge(adapters, args.density, scale=s), tasks,
                     specialists, splits)
  label = f"TIES (density {args.density:g}, λ={lam:g})"
  rows[label] = evaluate_merged(ties, tasks, specialists, splits)
  notes[label] = rank_note(ties) + "; λ tuned on val"
  for v in args.energy:
    merged = medlego_merge(adapters, energy=v)
    label = f"Med-LEGO (v={v:g})" + (" = exact average" if v >= 1.0 else "")
    rows[label] = evaluate_merged(merged, tasks, specialists, splits)
    notes[label] = rank_note(merged)
  return rows, notes


def transfer(model, new, others, specialists, splits, args) -> dict:
  """Val accuracy per epoch on the new task: from the Med-LEGO merge of ``others`` vs fresh."""
  from rpe_jax.merge import medlego_merge
  from rpe_jax.tasks.classification import evaluate, train_adapter
  v = min(args.energy)
  start = medlego_merge([specialists[t].adapter for t in others], energy=v)
  start = __import__("jax").tree.map(np.asarray, start)
  out = {"merged_from": others, "energy": v, "runs": {}}
  for frac in args.fractions:
    train = splits[new].train
    if frac < 1.0:
      keep = np.random.default_rng(args.seed).permutation(len(train))[:max(
          10, int(round(frac * len(train))))]
      train = train.subset(np.sort(keep))
    for arm, init in (("from Med-LEGO merge", start), ("from pretrained (fresh SVD-LoRA)",
                                                       None)):
      t0 = time.perf_counter()
      r = train_adapter(model, train, splits[new].val,
                        _config(args, epochs=args.transfer_epochs), init_adapter=init)
      curve = [r.initial_val_accuracy] + [h["val_accuracy"] for h in r.history]
      out["runs"][f"{arm} @ {frac:g}"] = {
          "fraction": frac, "n_train": len(train), "val_per_epoch": curve,
          "best_epoch": r.best_epoch + 1, "test_accuracy": evaluate(r.model, splits[new].test),
          "seconds": round(time.perf_counter() - t0, 1)}
      print(f"transfer {arm} @ {frac:g}: val {np.round(curve, 3).tolist()}", flush=True)
  return out


def table_md(rows, notes, tasks) -> str:
  lines = ["| method | " + " | ".join(tasks) + " | mean | note |",
           "|---|" + "---:|" * (len(tasks) + 1) + "---|"]
  for row, per in rows.items():
    vals = [per[t] for t in tasks]
    lines.append(f"| {row} | " + " | ".join(f"{v:.3f}" for v in vals)
                 + f" | **{np.mean(vals):.3f}** | {notes.get(row, '')} |")
  return "\n".join(lines)


def transfer_md(tr, new) -> str:
  lines = [f"New task **{new}**, started from the Med-LEGO merge (v = {tr['energy']:g}) of "
           f"{', '.join(tr['merged_from'])} or from a fresh SVD-LoRA.", "",
           "| start | train images | val acc per epoch (0 = before training) | best epoch | "
           "test acc |", "|---|---:|---|---:|---:|"]
  for label, r in tr["runs"].items():
    curve = " ".join(f"{v:.2f}" for v in r["val_per_epoch"])
    lines.append(f"| {label.split(' @ ')[0]} | {r['n_train']} | {curve} | {r['best_epoch']} | "
                 f"{r['test_accuracy']:.3f} |")
  return "\n".join(lines)


def plot_transfer(tr, new, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  styles = {"from Med-LEGO merge": "-", "from pretrained (fresh SVD-LoRA)": "--"}
  colors = plt.get_cmap("tab10")
  fracs = sorted({r["fraction"] for r in tr["runs"].values()}, reverse=True)
  for label, r in tr["runs"].items():
    arm = label.split(" @ ")[0]
    ax.plot(range(len(r["val_per_epoch"])), r["val_per_epoch"], styles[arm], marker="o",
            ms=3, color=colors(fracs.index(r["fraction"])),
            label=f"{arm}, {r['n_train']} train images")
  ax.set_xticks(range(max(len(r["val_per_epoch"]) for r in tr["runs"].values())))
  ax.set_xlabel("epoch (0 = before training)")
  ax.set_ylabel(f"validation accuracy on '{new}'")
  ax.set_title("New task: Med-LEGO merge as the starting point")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  args = build_parser().parse_args(argv)
  if args.quick:
    args.epochs = args.transfer_epochs = 3
    args.fractions, args.energy = args.fractions[:1], [0.9]
  from rpe_jax.tasks import images as data_lib
  from rpe_jax import load_model
  t0 = time.perf_counter()
  uris = task_uris(args.data)
  names = [_name(u) for u in uris]
  new = args.new_task or names[-1]
  if new not in names:
    raise SystemExit(f"--new-task {new!r} is not one of the tasks {names}")
  splits = {n: data_lib.load_splits(u, data_root=args.data_root, seed=args.seed)
            for n, u in zip(names, uris)}
  model = load_model(args.model)
  specialists = train_specialists(model, names, splits, args)
  t_train = time.perf_counter() - t0
  rows, notes = merge_table(model, names, specialists, splits, args)
  others = [n for n in names if n != new]
  tr = transfer(model, new, others, specialists, splits, args)
  total = time.perf_counter() - t0
  text = "\n\n".join([
      f"Tasks: {', '.join(f'{n} ({splits[n].train.num_classes} classes)' for n in names)}; "
      f"SVD-LoRA rank {args.rank} on {args.targets}, {args.epochs} epochs each; "
      f"specialists trained in {t_train:.0f} s, total {total:.0f} s.",
      "### Merged adapters, each task evaluated with its own head (test accuracy)\n\n"
      + table_md(rows, notes, names),
      "### A new task from the merge\n\n" + transfer_md(tr, new)])
  print(text)
  stem = args.out / ("medlego_quick" if args.quick else "medlego")
  args.out.mkdir(parents=True, exist_ok=True)
  stem.with_suffix(".md").write_text(text + "\n")
  meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
  stem.with_suffix(".json").write_text(json.dumps(
      {"args": meta, "tasks": names, "uris": uris, "accuracy": rows, "notes": notes,
       "transfer": tr, "specialist_history": {n: s.history for n, s in specialists.items()},
       "seconds": {"specialists": round(t_train, 1), "total": round(total, 1)}}, indent=2))
  plot_transfer(tr, new, stem.with_suffix(".png"))
  print(f"\nwrote {stem}.json, .md, .png")
  return rows


if __name__ == "__main__":
  main()

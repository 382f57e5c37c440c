"""The leave-one-out score table and bar plot shared by the task benchmarks.

``scores`` is {row (a strategy): {column (a held-out site or modality): score}}.
"""

from __future__ import annotations

import numpy as np


def markdown_table(scores: dict[str, dict[str, float]], columns) -> str:
  """One row per strategy, one column per held-out member, and the mean."""
  lines = ["| strategy | " + " | ".join(columns) + " | mean |",
           "|---|" + "---:|" * (len(columns) + 1)]
  for row, per in scores.items():
    vals = [per[c] for c in columns]
    lines.append(f"| {row} | " + " | ".join(f"{v:.3f}" for v in vals)
                 + f" | {np.mean(vals):.3f} |")
  return "\n".join(lines)


def plot_bars(scores: dict[str, dict[str, float]], columns, path, *, ylabel: str,
              width_in: float = 8.0, ylim=None) -> None:
  """Grouped bars: for each held-out member, one bar per strategy."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = list(scores)
  fig, ax = plt.subplots(figsize=(width_in, 3.5))
  width = 0.8 / len(rows)
  x = np.arange(len(columns))
  for i, row in enumerate(rows):
    ax.bar(x + i * width, [scores[row][c] for c in columns], width, label=row)
  ax.set_xticks(x + 0.4 - width / 2, columns)
  ax.set_ylabel(ylabel)
  if ylim is not None:
    ax.set_ylim(*ylim)
  # Below the axes: scores near 1 (the own adapter, a saturated base) would hide under it.
  ax.legend(fontsize=7, ncol=len(rows), loc="upper center", bbox_to_anchor=(0.5, -0.1))
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)

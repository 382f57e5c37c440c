"""Leave-one-out results over several seeds: means, standard errors and paired differences.

Each seed's report holds ``accuracy`` {row: {held-out site: value}} for the same rows and
sites. A seed's score of a row is its mean over the held-out sites; across seeds we report
mean ± standard error (SE = sample standard deviation / √n, ddof = 1). Comparisons of two
rows are *paired*: the per-seed difference of their site means, then its mean ± SE (the
seeds share data draws and adapters, so pairing removes what the rows have in common).
With 3 seeds an SE is itself rough (it can be off by a factor of ~2): read a difference
of less than about 2 SE as no difference.
"""

from __future__ import annotations

import numpy as np


def mean_se(values) -> tuple[float, float]:
  """(mean, standard error of the mean); SE is 0 for a single value."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def fmt(m: float, se: float, digits: int = 3) -> str:
  return f"{m:.{digits}f} ± {se:.{digits}f}"


def rows_of(reports, skip=("ablation",)) -> list[str]:
  return [r for r in reports[0]["accuracy"] if not r.startswith(skip)]


def site_means(report, row) -> float:
  return float(np.mean([report["accuracy"][row][s] for s in report["held_out"]]))


def summary_table(reports) -> str:
  """One row per method: its site mean per seed, then mean ± SE over the seeds."""
  seeds = [r["seed"] for r in reports]
  lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± SE |",
           "|---|" + "---:|" * (len(seeds) + 1)]
  for row in rows_of(reports):
    vals = [site_means(r, row) for r in reports]
    lines.append(f"| {row} | " + " | ".join(f"{v:.3f}" for v in vals)
                 + f" | **{fmt(*mean_se(vals))}** |")
  return "\n".join(lines)


def per_site_table(reports) -> str:
  """One row per method, one column per held-out site: mean ± SE over the seeds."""
  held = reports[0]["held_out"]
  lines = ["| method | " + " | ".join(held) + " |", "|---|" + "---:|" * len(held)]
  for row in rows_of(reports):
    cells = [fmt(*mean_se([r["accuracy"][row][s] for r in reports])) for s in held]
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def paired_table(reports, refs, against) -> str:
  """Each row of ``refs`` minus each row of ``against`` (one column per ref): the
  difference of site means as mean ± SE over seeds, and, over every (seed, site) pair, how
  often the ref is ahead / level / behind."""
  held = reports[0]["held_out"]
  refs = [r for r in refs if r in reports[0]["accuracy"]]
  lines = ["| minus | " + " | ".join(refs) + " |", "|---|" + "---:|" * len(refs)]
  for row in against:
    if row in refs or row not in reports[0]["accuracy"]:
      continue
    cells = []
    for ref in refs:
      diffs = [site_means(r, ref) - site_means(r, row) for r in reports]
      each = np.array([r["accuracy"][ref][s] - r["accuracy"][row][s] for r in reports
                       for s in held])
      m, se = mean_se(diffs)
      cells.append(f"{m:+.3f} ± {se:.3f} ({np.sum(each > 1e-9)}/{np.sum(np.abs(each) <= 1e-9)}"
                   f"/{np.sum(each < -1e-9)})")
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def per_site_paired_table(reports, ref: str, against) -> str:
  """``ref`` minus each row of ``against``, per held-out site: mean ± SE over seeds."""
  held = reports[0]["held_out"]
  against = [a for a in against if a != ref and a in reports[0]["accuracy"]]
  lines = ["| held out | " + " | ".join(against) + " |", "|---|" + "---:|" * len(against)]
  for s in held:
    cells = [mean_se([r["accuracy"][ref][s] - r["accuracy"][a][s] for r in reports])
             for a in against]
    lines.append(f"| {s} | " + " | ".join(f"{m:+.3f} ± {se:.3f}" for m, se in cells) + " |")
  return "\n".join(lines)


def path_table(reports, site: str) -> str:
  """Accuracy along the λ2 path of one held-out site: mean ± SE over seeds per λ2/λ*."""
  paths = [r["lambda_path"][site] for r in reports if site in r["lambda_path"]]
  rel = paths[0]["rel"]
  lines = ["| λ2 / λ* | accuracy | ‖w‖₁ | ‖z − Σ wᵢzᵢ‖² |", "|---:|---:|---:|---:|"]
  for n, c in enumerate(rel):
    lines.append(f"| {c:.2f} | {fmt(*mean_se([p['accuracy'][n] for p in paths]))} | "
                 f"{np.mean([p['l1'][n] for p in paths]):.2f} | "
                 f"{np.mean([p['error'][n] for p in paths]):.3g} |")
  return "\n".join(lines)


def random_spread(reports) -> str:
  """Per held-out site: the random control's mean and its spread over draws, averaged over
  seeds (std over the draws of one seed; min–max over all draws)."""
  held = reports[0]["held_out"]
  lines = ["| held out | random mean | std over draws | min – max |", "|---|---:|---:|---:|"]
  for s in held:
    runs = [r["random"][s] for r in reports]
    every = [v for run in runs for v in run["scores"]]
    lines.append(f"| {s} | {np.mean([run['mean'] for run in runs]):.3f} | "
                 f"{np.mean([run['std'] for run in runs]):.3f} | "
                 f"{min(every):.3f} – {max(every):.3f} |")
  return "\n".join(lines)


def random_table(report) -> str:
  """The random control per held-out site: mean and standard deviation over its draws."""
  lines = ["| held out | draws | mean | std | min – max |", "|---|---:|---:|---:|---:|"]
  for i in report["held_out"]:
    run = report["random"][i]
    lines.append(f"| {i} | {len(run['scores'])} | {run['mean']:.3f} | {run['std']:.3f} | "
                 f"{min(run['scores']):.3f} – {max(run['scores']):.3f} |")
  return "\n".join(lines)


def seeds_text(reports, seconds: float, refs=()) -> str:
  """The tables over seeds: summary, per site, paired differences of the rows ``refs``
  (the scale-free sparse rows) against the others, the random spread, the λ paths."""
  first = reports[0]
  rows = rows_of(reports)
  parts = [f"## {len(reports)} seeds ({', '.join(str(r['seed']) for r in reports)}): "
           f"{', '.join(first['sites'])}; k = {first['k']}, controls at k = "
           f"{first['control_k']}; {seconds:.0f} s in all",
           "### Mean over held-out sites, per seed and mean ± SE over seeds\n\n"
           + summary_table(reports),
           "### Per held-out site (mean ± SE over seeds)\n\n" + per_site_table(reports)]
  if refs:
    parts.append("### Paired differences: each scale-free sparse row minus each other row "
                 f"(mean ± SE over seeds; in brackets, of the {len(reports)} × "
                 f"{len(first['held_out'])} seed × site pairs, how many it is ahead / level "
                 "/ behind)\n\n" + paired_table(reports, refs, rows))
  if refs:
    ref = next((r for r in refs if "=0.5·" in r), refs[0])   # the pre-chosen c = 0.5
    references = ("SFT (own adapter)", "pretrained", "own", "base")   # not compositions
    against = [r for r in rows if not r.startswith("sparse") and r not in references]
    parts.append(f"### Per held-out site: {ref} minus each row (mean ± SE over seeds)\n\n"
                 + per_site_paired_table(reports, ref, against))
  parts.append("### The random control's spread\n\n" + random_spread(reports))
  for site in first["lambda_path"]:
    parts.append(f"### Accuracy along the λ2 path, held out {site} (mean ± SE over seeds)\n\n"
                 + path_table(reports, site))
  return "\n\n".join(parts)

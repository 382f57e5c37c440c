"""Report datasets by URI (the Llama task's data; ``rpe_jax.tasks.images`` is the
classification counterpart and shares its ``DatasetError``).

URIs (``load(uri, split)`` / ``load_splits(uri)``):

* ``jsonl:<file>`` — one JSON object per line, ``{"findings": str, "impression": str}``
  (``read_jsonl``); a relative file is resolved against ``data_root``
  when one is given. Leave "impression" out of every line for an unlabeled dataset
  (``impressions`` None: a target to compose for); a file where some lines have one and
  others not is an error naming the line. Blank lines are skipped. The reports, in file
  order, are divided 70/15/15 by a permutation seeded by ``seed``.
* ``reports:<modality>`` — built-in: ``PER_MODALITY`` synthetic reports of one
  ``MODALITIES`` entry (``report.synthetic_reports``, seeded by ``seed``), divided
  60/20/20. ``reports:synthetic`` is the family of all of them.

``split`` is "train", "val", "test" or "all" (the whole dataset, in file order). A family URI
names several datasets: ``members(uri)`` lists them. Everything malformed raises
``DatasetError`` (a ``ValueError``) with one line naming the file and line, or the URI.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from rpe_jax.tasks.images import DatasetError, parse_uri, seeded_parts

# --- Reports and JSONL ---------------------------------------------------------------


class Report(NamedTuple):
  findings: str
  impression: str | None    # None: an unlabeled report (a target to compose for)


def _jsonl_lines(path: Path):
  """(line number, text) of the non-blank lines of a UTF-8 JSONL file.

  Lines end at "\n" only: ``str.splitlines`` would also cut at U+2028 and other separators
  that JSON allows inside a string.
  """
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    raise ValueError(f"{path}: no such file") from None
  except OSError as e:
    raise ValueError(f"{path}: cannot read ({e.strerror})") from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise ValueError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x})") from None
  return [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]


def read_jsonl(path, *, require_impression: bool = True) -> list[Report]:
  """Reports from a JSONL file of {"findings": str, "impression": str} objects.

  With ``require_impression=False`` the impressions may be left out, in every line (an
  unlabeled dataset: impressions None) or in none: a file mixing the two is an error naming
  the first line that differs, as a half-labeled dataset is most likely a mistake.
  """
  path = Path(path)
  reports, first_labeled = [], None
  for n, line in _jsonl_lines(path):
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
      raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
    labeled = "impression" in row
    for key in ("findings", "impression") if require_impression or labeled else ("findings",):
      if not isinstance(row.get(key), str) or not row[key].strip():
        raise ValueError(f"{path}:{n}: {key!r} must be a non-empty string")
    if first_labeled is None:
      first_labeled = (labeled, n)
    elif labeled != first_labeled[0]:
      has, other = ("an", "none") if labeled else ("no", "one")
      raise ValueError(f"{path}:{n}: has {has} 'impression' but line {first_labeled[1]} has "
                       f"{other}; give every report an impression or none")
    reports.append(Report(row["findings"], row.get("impression")))
  if not reports:
    raise ValueError(f"{path}: no reports")
  return reports


def write_jsonl(path, reports: Sequence[Report]) -> Path:
  """One JSON object per line; an unlabeled report (impression None) has no "impression"."""
  path = Path(path)
  rows = ({"findings": r.findings} if r.impression is None
          else {"findings": r.findings, "impression": r.impression} for r in reports)
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return path


# --- Synthetic report modalities ------------------------------------------------------

# Each modality: (exam, sites, abnormalities, filler sentences). Impressions share one
# phrasing across modalities, so what one modality's adapter learns transfers in part.
MODALITIES = {
    "ct_chest": ("CT of the chest", ("right upper lobe", "left lower lobe", "lingula",
                                     "right middle lobe"),
                 ("nodule", "consolidation", "ground glass opacity", "mass"),
                 ("The heart size is normal.", "No pleural effusion.",
                  "The airways are patent.")),
    "mri_brain": ("MRI of the brain", ("left frontal lobe", "right parietal lobe",
                                       "cerebellum", "left temporal lobe"),
                  ("lesion", "infarct", "hemorrhage", "mass"),
                  ("The ventricles are normal in size.", "No midline shift.",
                   "The orbits are unremarkable.")),
    "us_abdomen": ("Ultrasound of the abdomen", ("liver", "right kidney", "gallbladder",
                                                 "spleen"),
                   ("cyst", "stone", "lesion", "mass"),
                   ("The pancreas is obscured by bowel gas.", "No free fluid.",
                    "The aorta is normal in caliber.")),
    "xr_knee": ("Radiograph of the knee", ("medial compartment", "patella",
                                           "lateral compartment", "tibial plateau"),
                ("fracture", "effusion", "osteophyte", "lesion"),
                ("Bone mineralization is normal.", "No soft tissue swelling.",
                 "Alignment is anatomic.")),
}
_SIZES = ("small", "moderate", "large")


def synthetic_reports(modality: str, n: int, seed: int = 0) -> list[Report]:
  """``n`` synthetic (findings, impression) pairs of one ``MODALITIES`` entry."""
  if modality not in MODALITIES:
    raise ValueError(f"unknown modality {modality!r}; choose one of {sorted(MODALITIES)}")
  exam, sites, kinds, fillers = MODALITIES[modality]
  rng = np.random.default_rng((seed, sorted(MODALITIES).index(modality)))
  reports = []
  for _ in range(n):
    extra = " ".join(rng.permutation(fillers)[:2])
    if rng.random() < 0.2:
      reports.append(Report(f"{exam}. No abnormality is seen. {extra}",
                            "No acute abnormality."))
      continue
    size, site, kind = rng.choice(_SIZES), rng.choice(sites), rng.choice(kinds)
    reports.append(Report(f"{exam}. There is a {size} {kind} in the {site}. {extra}",
                          f"{size.capitalize()} {kind} in the {site}."))
  return reports


# --- Datasets ------------------------------------------------------------------------

SCHEMES = ("jsonl", "reports")
SPLITS = ("train", "val", "test", "all")
FAMILY = "synthetic"
PER_MODALITY = 160      # synthetic reports per built-in modality: 96 / 32 / 32
_FILE_FRACTIONS = (0.7, 0.15)    # train, val; test is the rest
_BUILTIN_FRACTIONS = (0.6, 0.2)


@dataclasses.dataclass(frozen=True)
class ReportDataset:
  """Reports (findings, and impressions on a labeled dataset) and a name."""

  reports: tuple[Report, ...]
  name: str

  def __post_init__(self):
    labeled = {r.impression is not None for r in self.reports}
    if len(labeled) > 1:
      raise DatasetError(f"dataset {self.name!r} mixes reports with and without impressions")

  def __len__(self) -> int:
    return len(self.reports)

  @property
  def findings(self) -> list[str]:
    return [r.findings for r in self.reports]

  @property
  def impressions(self) -> list[str] | None:
    """The reference impressions; None for an unlabeled dataset."""
    if self.reports and self.reports[0].impression is None:
      return None
    return [r.impression for r in self.reports]

  def subset(self, index, name: str) -> "ReportDataset":
    return ReportDataset(tuple(self.reports[i] for i in index), name)


class ReportSplits(NamedTuple):
  train: ReportDataset
  val: ReportDataset
  test: ReportDataset


def _split(ds: ReportDataset, fractions, seed: int) -> ReportSplits:
  """Train/val/test by a seeded permutation (``images.seeded_parts``, every task's draw)."""
  return ReportSplits(*(ds.subset(p, f"{ds.name}[{s}]") for p, s in
                        zip(seeded_parts(len(ds), fractions, seed), ReportSplits._fields)))


# --- URIs ----------------------------------------------------------------------------------

def _scheme(uri: str) -> tuple[str, str]:
  return parse_uri(uri, SCHEMES, "report")


def _read(uri: str, data_root: str | None, seed: int) -> tuple[ReportDataset, tuple]:
  """The whole dataset ``uri`` names and its split fractions."""
  scheme, rest = _scheme(uri)
  if scheme == "jsonl":
    path = rest if os.path.isabs(rest) or data_root is None else os.path.join(data_root, rest)
    try:
      reports = read_jsonl(path, require_impression=False)
    except ValueError as e:   # already one line naming path:line
      raise DatasetError(str(e)) from e
    return ReportDataset(tuple(reports), uri), _FILE_FRACTIONS
  if rest == FAMILY:
    raise DatasetError(f"{uri!r} is a family of modalities; load one of: "
                       f"{', '.join(members(uri))}")
  if rest not in MODALITIES:
    raise DatasetError(f"{uri!r}: unknown modality {rest!r}; modalities: "
                       f"{', '.join(sorted(MODALITIES))}")
  reports = synthetic_reports(rest, PER_MODALITY, seed)
  return ReportDataset(tuple(reports), uri), _BUILTIN_FRACTIONS


def load_splits(uri: str, *, data_root: str | None = None, seed: int = 0) -> ReportSplits:
  """The train/val/test splits of the dataset ``uri`` names (see the module docstring)."""
  ds, fractions = _read(uri, data_root, seed)
  return _split(ds, fractions, seed)


def load(uri: str, split: str = "test", *, data_root: str | None = None,
         seed: int = 0) -> ReportDataset:
  """One split ("train", "val", "test", or "all": every report, in file order) of ``uri``."""
  if split not in SPLITS:
    raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
  if split == "all":
    return _read(uri, data_root, seed)[0]
  return getattr(load_splits(uri, data_root=data_root, seed=seed), split)


def members(uri: str) -> list[str]:
  """The dataset URIs of a family (``reports:synthetic`` → one per modality); ``[uri]``
  otherwise."""
  scheme, rest = _scheme(uri)
  if scheme == "reports" and rest == FAMILY:
    return [f"reports:{m}" for m in sorted(MODALITIES)]
  return [uri]

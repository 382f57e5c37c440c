"""Report datasets by URI (the Llama task's data; ``rpe_jax.tasks.images`` is the
classification counterpart and shares its ``DatasetError``).

URIs (``load(uri, split)`` / ``load_splits(uri)``):

* ``jsonl:<file>`` — one JSON object per line, ``{"findings": str, "impression": str}``
  (``rpe_jax.tasks.report.read_jsonl``); a relative file is resolved against ``data_root``
  when one is given. Leave "impression" out of every line for an unlabeled dataset
  (``impressions`` None: a target to compose for); a file where some lines have one and
  others not is an error naming the line. Blank lines are skipped. The reports, in file
  order, are divided 70/15/15 by a permutation seeded by ``seed``.
* ``reports:<modality>`` — built-in: ``PER_MODALITY`` synthetic reports of one
  ``report.MODALITIES`` entry (``report.synthetic_reports``, seeded by ``seed``), divided
  60/20/20. ``reports:synthetic`` is the family of all of them.

``split`` is "train", "val", "test" or "all" (the whole dataset, in file order). A family URI
names several datasets: ``members(uri)`` lists them. Everything malformed raises
``DatasetError`` (a ``ValueError``) with one line naming the file and line, or the URI.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import numpy as np

from rpe_jax.tasks import report
from rpe_jax.tasks.images import DatasetError
from rpe_jax.tasks.report import Report

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
  """Train/val/test by a seeded permutation: the same draw as ``images._split_fractions``."""
  n = len(ds)
  perm = np.random.default_rng(seed).permutation(n)
  n_train, n_val = int(round(fractions[0] * n)), int(round(fractions[1] * n))
  parts = (perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:])
  return ReportSplits(*(ds.subset(np.sort(p), f"{ds.name}[{s}]")
                        for p, s in zip(parts, ReportSplits._fields)))


# --- URIs ----------------------------------------------------------------------------------

def _scheme(uri: str) -> tuple[str, str]:
  if not isinstance(uri, str) or ":" not in uri:
    raise DatasetError(f"report dataset URI {uri!r} has no scheme; expected one of "
                       f"{', '.join(s + ':' for s in SCHEMES)}")
  scheme, rest = uri.split(":", 1)
  if scheme not in SCHEMES:
    raise DatasetError(f"unknown report dataset URI scheme {scheme!r} in {uri!r}; "
                       f"expected one of {', '.join(s + ':' for s in SCHEMES)}")
  if not rest:
    raise DatasetError(f"dataset URI {uri!r} names no dataset")
  return scheme, rest


def _read(uri: str, data_root: str | None, seed: int) -> tuple[ReportDataset, tuple]:
  """The whole dataset ``uri`` names and its split fractions."""
  scheme, rest = _scheme(uri)
  if scheme == "jsonl":
    path = rest if os.path.isabs(rest) or data_root is None else os.path.join(data_root, rest)
    try:
      reports = report.read_jsonl(path, require_impression=False)
    except ValueError as e:   # already one line naming path:line
      raise DatasetError(str(e)) from e
    return ReportDataset(tuple(reports), uri), _FILE_FRACTIONS
  if rest == FAMILY:
    raise DatasetError(f"{uri!r} is a family of modalities; load one of: "
                       f"{', '.join(members(uri))}")
  if rest not in report.MODALITIES:
    raise DatasetError(f"{uri!r}: unknown modality {rest!r}; modalities: "
                       f"{', '.join(sorted(report.MODALITIES))}")
  reports = report.synthetic_reports(rest, PER_MODALITY, seed)
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
    return [f"reports:{m}" for m in sorted(report.MODALITIES)]
  return [uri]

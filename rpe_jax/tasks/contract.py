"""The task contract: what every task implements, and which task a model or a dataset is.

A task is one small object (``Task``) with the same six operations for classification
(ViT), segmentation (SAM) and report generation (Llama):

    load(uri, split)                  a dataset URI → a dataset (labels / masks /
                                      impressions optional: ``labeled(ds)`` says)
    features(tm, ds, pooling)         the frozen encoder's pooled feature of every example
                                      [N, d] (each input's own prototype, per-sample)
    prototype(tm, ds, pooling)        the task prototype z = their mean over ds
                                      (``rpe_jax.prototypes``)
    train(tm, uri, options)           one adapter on the train split (``rpe_jax.training``),
                                      best by the val split's metric where the task keeps one
    predict(tm, ds)                   labels; masks; greedy-decoded impressions
    score(predictions, ds)            {metric: value} when ds is labeled, else None
    write_predictions(p, ds, folder)  predictions.csv; masks.npz; predictions.jsonl

``tm`` is a ``TaskModel``: the model and what it needs beside its weights (the image
normalization, or the tokenizer). The model's config picks the task (``task_for_model``);
a dataset URI's scheme picks it too (``task_of_uri``), so a dataset of the wrong kind for
a model is refused before any work. Library entries record their task under
``metadata["task"]``.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

TASK_NAMES = ("classification", "segmentation", "report")


class TaskModel(NamedTuple):
  """A model with what it needs beside its weights, and where it runs."""

  model: Any                  # the Flax NNX model
  normalization: Any = None   # image preprocessing (``models.preprocessing.Normalization``)
  codec: Any = None           # the tokenizer of a language model (``tasks.report.Codec``)
  mesh: Any = None            # a device mesh: batches go over its ``data`` axis (the model's
                              # weights are placed by ``rpe_jax.parallel.sharding``)

  @property
  def data_shards(self) -> int:
    """How many ways a batch is split: the mesh's ``data`` axis size (1 without a mesh)."""
    if self.mesh is None or "data" not in self.mesh.axis_names:
      return 1
    return int(self.mesh.shape["data"])

  def batch_size(self, wanted: int, n: int) -> int:
    """min(wanted, n) rounded up to a multiple of ``data_shards`` (the pad rows are
    dropped after), so that every batch splits evenly over the devices."""
    d = self.data_shards
    return -(-min(wanted, n) // d) * d

  def place(self, x):
    """A batch [B, ...] on the mesh, its leading axis over ``data`` (as is without one)."""
    if self.mesh is None:
      return x
    import jax
    from rpe_jax.parallel.sharding import batch_sharding
    return jax.device_put(x, batch_sharding(self.mesh))


class TrainOptions(NamedTuple):
  """The hyper-parameters ``rpe train`` exposes, the same for every task. ``targets``
  None: the task's default adapted layers; ``epochs`` passes over the train split; None
  for ``epochs``, ``lr`` or ``batch_size``: the task's default."""

  rank: int = 8
  kind: str = "lora"
  targets: tuple[str, ...] | None = None
  epochs: int | None = None
  lr: float | None = None
  batch_size: int | None = None
  seed: int = 0
  ortho_weight: float | None = None
  prompt: str = "box"            # segmentation only
  checkpoint_dir: str | None = None   # classification only
  resume: bool = False


class Trained(NamedTuple):
  """What ``Task.train`` returns."""

  adapter: dict             # exchange form
  head: dict | None         # a trained classification head, else None
  model: Any                # the model carrying the adapter (and head)
  summary: dict             # JSON-able: "metric"; "initial_val" (the base's val score);
                            # "val", the returned adapter's (classification: the best
                            # epoch's; segmentation and report: after the last step);
                            # "test"; epochs, steps ...
  train_data: Any = None    # the train split it was trained on (its prototype's data)


class Task(abc.ABC):
  """One task behind the contract (see the module docstring)."""

  name: str                       # one of TASK_NAMES
  metric: str                     # the headline metric's key in ``score``
  pooling: str                    # the prototype's default feature pooling
  predict_batch: int = 64         # rows per compiled prediction call (``predict`` runs
                                  # a dataset of exactly this size as one batch)

  @abc.abstractmethod
  def load(self, uri: str, split: str = "test", *, data_root: str | None = None,
           seed: int = 0):
    """The ``split`` ("train", "val", "test" or "all") of the dataset ``uri`` names."""

  @abc.abstractmethod
  def labeled(self, ds) -> bool:
    """Does ``ds`` carry what ``score`` compares with (labels, masks, impressions)?"""

  @abc.abstractmethod
  def features(self, tm: TaskModel, ds, *, pooling: str | None = None,
               progress: bool = False):
    """The pooled feature of every example of ``ds`` under ``tm``'s encoder, [N, d]."""

  @abc.abstractmethod
  def subset(self, ds, index):
    """The examples ``index`` (an integer array) of ``ds``, in that order."""

  @abc.abstractmethod
  def prototype(self, tm: TaskModel, ds, *, pooling: str | None = None,
                progress: bool = False):
    """``rpe_jax.prototypes.Prototype`` of ``ds`` under ``tm``'s (frozen) encoder."""

  @abc.abstractmethod
  def train(self, tm: TaskModel, uri: str, options: TrainOptions, *,
            data_root: str | None = None, progress: bool = False) -> Trained:
    """A fresh adapter trained on the train split of ``uri``."""

  @abc.abstractmethod
  def predict(self, tm: TaskModel, ds, *, progress: bool = False, **options):
    """Predictions for every example of ``ds``, in order."""

  @abc.abstractmethod
  def score(self, predictions, ds, **options) -> dict | None:
    """{metric: value} against ``ds``'s labels, or None when ``ds`` is unlabeled."""

  @abc.abstractmethod
  def write_predictions(self, predictions, ds, folder) -> list:
    """Write ``predictions`` under ``folder``; returns the paths written."""

  def size(self, ds) -> int:
    return len(ds)

  def __repr__(self):
    return f"<task {self.name}>"


def model_task_name(model) -> str:
  """The task of a model, from its config's type: ViT → classification, SAM →
  segmentation, Llama → report."""
  config = type(getattr(model, "config", None)).__name__
  names = {"ViTConfig": "classification", "SamConfig": "segmentation",
           "LlamaConfig": "report"}
  if config not in names:
    raise ValueError(f"{type(model).__name__} (config {config}) belongs to no task; models: "
                     "ViT (classification), SAM (segmentation), Llama (report)")
  return names[config]


# The URI schemes of each task; ``sites:`` is shared and split by family.
_SCHEMES = {"medmnist": "classification", "tfds": "classification", "folder": "classification",
            "tasks": "classification", "masks": "segmentation", "tfds-masks": "segmentation",
            "jsonl": "report", "reports": "report"}
_SITE_FAMILIES = {"digits": "classification", "digits-graded": "classification",
                  "organs": "segmentation", "organs-graded": "segmentation"}


def uri_task_name(uri: str) -> str:
  """The task a dataset URI belongs to, from its scheme (and a ``sites:`` family)."""
  if not isinstance(uri, str) or ":" not in uri:
    raise ValueError(f"dataset URI {uri!r} has no scheme; expected one of "
                     + ", ".join(f"{s}:" for s in sorted(set(_SCHEMES) | {"sites"})))
  scheme, rest = uri.split(":", 1)
  if scheme == "sites":
    family = rest.partition(":")[0].partition("/")[0]
    if family not in _SITE_FAMILIES:
      raise ValueError(f"{uri!r}: unknown built-in family {family!r}; families: "
                       + ", ".join(f"{f} ({t})" for f, t in _SITE_FAMILIES.items()))
    return _SITE_FAMILIES[family]
  if scheme not in _SCHEMES:
    raise ValueError(f"unknown dataset URI scheme {scheme!r} in {uri!r}; expected one of "
                     + ", ".join(f"{s}:" for s in sorted(set(_SCHEMES) | {"sites"})))
  return _SCHEMES[scheme]

"""The tasks by name, by model and by dataset URI, and a model with its preprocessing.

``rpe_jax.tasks.contract`` says what a task is; this module hands out the three of them
(``task_named``), the one a model's config picks (``task_for_model``) or a URI's scheme
picks (``task_of_uri``), and refuses a dataset of another task than the model's
(``check_data_fits``).
"""

from __future__ import annotations

from pathlib import Path

from rpe_jax.tasks.contract import (TASK_NAMES, Task, TaskModel, model_task_name,
                                    uri_task_name)


def task_named(name: str) -> Task:
  """The task called ``name`` (one of ``TASK_NAMES``)."""
  if name == "classification":
    from rpe_jax.tasks.classification import ClassificationTask
    return ClassificationTask()
  if name == "segmentation":
    from rpe_jax.tasks.segmentation import SegmentationTask
    return SegmentationTask()
  if name == "report":
    from rpe_jax.tasks.report import ReportTask
    return ReportTask()
  raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASK_NAMES)}")


def task_for_model(model) -> Task:
  return task_named(model_task_name(model))


def task_of_uri(uri: str) -> Task:
  return task_named(uri_task_name(uri))


def check_data_fits(uri: str, model, option: str = "--data") -> Task:
  """The model's task, after checking that ``uri`` is a dataset of that task."""
  want, got = model_task_name(model), uri_task_name(uri)
  if want != got:
    raise ValueError(f"{option} {uri} is a {got} dataset, but the model "
                     f"({type(model).__name__}) is a {want} model")
  return task_named(want)


def task_model(model, folder=None) -> TaskModel:
  """``model`` with its preprocessing: a ViT's image normalization (the folder's
  ``preprocessor_config.json`` when there is one), a SAM's, or a Llama's tokenizer from
  ``folder`` (``tokenizer.json``)."""
  from models.preprocessing import Normalization
  task = model_task_name(model)
  if task == "segmentation":
    from rpe_jax.tasks.segmentation import normalization
    return TaskModel(model, normalization(model))
  if task == "report":
    codec = None
    if folder is not None and (Path(folder) / "tokenizer.json").is_file():
      from rpe_jax.tasks.report import load_codec
      codec = load_codec(folder)
    return TaskModel(model, codec=codec)
  if folder is not None and (Path(folder) / "preprocessor_config.json").is_file():
    return TaskModel(model, Normalization.from_hf(str(folder), model.config.num_channels))
  return TaskModel(model, Normalization.for_model(model))

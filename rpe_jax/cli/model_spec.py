"""The one resolver of a `--model` spec: an HF checkpoint folder, a Hub id or a built-in name.

* an HF checkpoint folder (``config.json`` + safetensors) → ``models.hf.load``, with the
  image preprocessing of its ``preprocessor_config.json`` when there is one;
* ``demo`` or ``demo:TASK`` → a demo's base model (``demo:classification`` = ``demo``, the
  foundation ViT; ``demo:segmentation``, the small SAM; ``demo:report``, the small Llama
  and its tokenizer), built once and then loaded from the cache;
* ``tiny-foundation`` → the classification demo's ViT recipe, pre-trained here and now
  with ``seed``;
* any other spec is a Hugging Face Hub id (``org/name[@revision]``) → its snapshot folder,
  from the local HF cache or downloaded where the network is allowed (``models.hub``), then
  loaded as a folder.

A Llama folder's tokenizer (``tokenizer.json``) comes with it; a SAM gets its
preprocessing from ``rpe_jax.tasks.segmentation``.
"""

from __future__ import annotations

from pathlib import Path

from rpe_jax.tasks.contract import TASK_NAMES, TaskModel
from rpe_jax.tasks.registry import task_model

BUILTIN_MODELS = ("demo",) + tuple(f"demo:{t}" for t in TASK_NAMES) + ("tiny-foundation",)

# The model with what it needs beside its weights (image normalization or tokenizer).
ResolvedModel = TaskModel


def resolve_model(spec: str, *, seed: int = 0, progress: bool = False,
                  option: str = "--model") -> ResolvedModel:
  """The model named by ``spec`` and its preprocessing; ``ValueError`` naming ``option``
  when ``spec`` is neither a checkpoint folder, nor a Hub id that resolves to one, nor a
  built-in name."""
  from models.preprocessing import Normalization
  if spec == "demo" or spec.startswith("demo:"):
    from rpe_jax import demo
    task = spec.partition(":")[2] or "classification"
    if task not in TASK_NAMES:
      raise ValueError(f"{option} {spec}: unknown demo; demos: "
                       + ", ".join(f"demo:{t}" for t in TASK_NAMES))
    return demo.base_model(task)
  if spec == "tiny-foundation":
    from rpe_jax.tasks.classification import pretrain_foundation
    model, _ = pretrain_foundation(seed=seed, progress=progress)
    return ResolvedModel(model, Normalization.for_model(model))
  from models import hub
  builtin = f"not a built-in name ({', '.join(BUILTIN_MODELS)})"
  try:
    folder = hub.resolve(spec, option=option)   # a local folder, or a Hub id's snapshot
  except ValueError as e:
    raise ValueError(f"{e}; {builtin}") from None
  if not (folder / "config.json").is_file():
    where = "" if folder == Path(spec) else f" in {folder}"
    raise ValueError(f"{option} {spec}: not an HF checkpoint folder (no config.json{where}) "
                     f"and {builtin}")
  from safetensors import SafetensorError
  from models import hf
  from rpe_jax.library import untrusted
  # Read the JSON files first with a bounded depth and a message naming them.
  for name in ("config.json", "preprocessor_config.json"):
    if (folder / name).is_file() and not isinstance(
        untrusted.read_json(folder / name, option), dict):
      raise ValueError(f"{option} {folder / name} is not a JSON object")
  try:
    model = hf.load(folder)
  except SafetensorError as e:
    raise ValueError(f"{option} {spec}: a weights file is not readable safetensors: {e}") from None
  return task_model(model, folder)


def load_model(spec: str, **kw):
  """Just the model of ``resolve_model``."""
  return resolve_model(spec, **kw).model

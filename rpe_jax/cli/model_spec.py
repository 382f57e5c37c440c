"""The one resolver of a `--model` spec: an HF checkpoint folder, a Hub id or a built-in name.

* an HF checkpoint folder (``config.json`` + safetensors) → ``models.hf.load``, with the
  image preprocessing of its ``preprocessor_config.json`` when there is one;
* any other spec is a Hugging Face Hub id (``org/name[@revision]``) → its snapshot folder,
  from the local HF cache or downloaded where the network is allowed (``models.hub``), then
  loaded as a folder;
* ``demo`` → the demo's foundation ViT (pre-trained once, then loaded from the cache);
* ``tiny-foundation`` → the same small ViT recipe, pre-trained here and now with ``seed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

BUILTIN_MODELS = ("demo", "tiny-foundation")


class ResolvedModel(NamedTuple):
  model: Any            # the Flax NNX model
  normalization: Any    # its image preprocessing (``models.preprocessing.Normalization``)


def resolve_model(spec: str, *, seed: int = 0, progress: bool = False,
                  option: str = "--model") -> ResolvedModel:
  """The model named by ``spec`` and its preprocessing; ``ValueError`` naming ``option``
  when ``spec`` is neither a checkpoint folder, nor a Hub id that resolves to one, nor a
  built-in name."""
  from models.preprocessing import Normalization
  if spec == "demo":
    from rpe_jax import demo
    model = demo.foundation()
    return ResolvedModel(model, Normalization.for_model(model))
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
  if (folder / "preprocessor_config.json").is_file():
    return ResolvedModel(model, Normalization.from_hf(str(folder), model.config.num_channels))
  config = model.config
  return ResolvedModel(model, Normalization.for_model(model)
                       if hasattr(config, "image_size") else None)


def load_model(spec: str, **kw):
  """Just the model of ``resolve_model``."""
  return resolve_model(spec, **kw).model

"""Hugging Face checkpoint folders ⇄ Flax NNX models.

``load(folder)`` reads ``config.json``, builds the architecture it names abstractly
(``nnx.eval_shape``: no memory for random weights), then fills it tensor by tensor from
``model.safetensors`` or a sharded ``model.safetensors.index.json``, following the model
module's declarative key map. Every checkpoint key must be used or explicitly ignored and
every model parameter filled; anything else is an error that names the keys.

A model module plugs in with:

* ``ARCHITECTURES[name] = (module, config class, model class)`` — one line here;
* in the module, ``hf_key_map(model) -> dict(rules, ignored, strip_prefixes)`` where a rule
  is ``(our parameter path, HF keys, transform)`` with ``{i}`` standing for a layer index;
  ``keys[0]`` is the name written by ``save``, ``keys[-1]`` the transformers-v5 module name;
* the config class's ``from_hf(dict)`` / ``to_hf(architecture)``, the model class's
  ``hf_architecture``; optionally ``hf_config_fixup(config, architecture, keys)`` for what
  config.json does not record.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

ARCHITECTURES = {
    "ViTModel": ("models.vit", "ViTConfig", "ViTModel"),
    "ViTForImageClassification": ("models.vit", "ViTConfig", "ViTForImageClassification"),
    "LlamaForCausalLM": ("models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "SamModel": ("models.sam", "SamConfig", "SamModel"),
}

# name → (HF tensor → ours, ours → HF tensor)
TRANSFORMS = {
    "none": (lambda t: t, lambda t: t),
    "linear": (lambda t: t.T, lambda t: t.T),                      # [out, in] ⇄ [in, out]
    "conv": (lambda t: t.transpose(2, 3, 1, 0), lambda t: t.transpose(3, 2, 0, 1)),
    # ConvTranspose2d [in, out, kh, kw] ⇄ [kh, kw, in, out] (the layer flips, not the map)
    "conv_transpose": (lambda t: t.transpose(2, 3, 0, 1), lambda t: t.transpose(2, 3, 0, 1)),
}

_MAX_LISTED = 12


def format_keys(keys) -> str:
  """Sorted keys, comma-separated, at most a dozen then a count (for error messages)."""
  keys = sorted(keys)
  more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
  return ", ".join(keys[:_MAX_LISTED]) + more


def _pattern(template: str) -> re.Pattern:
  return re.compile("".join(r"(?P<i>\d+)" if part == "{i}" else re.escape(part)
                            for part in re.split(r"(\{i\})", template)) + r"\Z")


class _Rule(NamedTuple):
  ours: str
  keys: tuple[str, ...]
  transform: str
  ours_re: re.Pattern
  keys_re: tuple[re.Pattern, ...]


class KeyMap:
  """A compiled key map: HF key ⇄ our parameter path (see the module docstring)."""

  def __init__(self, rules, ignored=(), strip_prefixes=()):
    self.rules = []
    for ours, keys, transform in rules:
      if transform not in TRANSFORMS:
        raise ValueError(f"key map rule for {ours!r}: unknown transform {transform!r}")
      self.rules.append(_Rule(ours, tuple(keys), transform, _pattern(ours),
                              tuple(_pattern(k) for k in keys)))
    self.ignored = tuple(_pattern(k) for k in ignored)
    self.strip_prefixes = tuple(strip_prefixes)

  def _candidates(self, key: str):
    yield key
    for prefix in self.strip_prefixes:
      if key.startswith(prefix):
        yield key[len(prefix):]

  def to_ours(self, key: str) -> tuple[str, str] | None:
    """HF key → (our parameter path, transform), or None when no rule maps it."""
    for k in self._candidates(key):
      for rule in self.rules:
        for rx in rule.keys_re:
          m = rx.match(k)
          if m:
            return rule.ours.replace("{i}", m.groupdict().get("i") or ""), rule.transform
    return None

  def is_ignored(self, key: str) -> bool:
    return any(rx.match(k) for k in self._candidates(key) for rx in self.ignored)

  def to_hf(self, path: str, which: int = 0) -> tuple[str, str] | None:
    """Our parameter path → (HF key ``keys[which]``, transform), or None."""
    for rule in self.rules:
      m = rule.ours_re.match(path)
      if m:
        return rule.keys[which].replace("{i}", m.groupdict().get("i") or ""), rule.transform
    return None


def _resolve(architecture: str):
  if architecture not in ARCHITECTURES:
    raise ValueError(f"architecture {architecture!r} is not supported; "
                     f"supported: {sorted(ARCHITECTURES)}")
  module_name, config_name, model_name = ARCHITECTURES[architecture]
  module = importlib.import_module(module_name)
  return module, getattr(module, config_name), getattr(module, model_name)


def _module_of(model: nnx.Module):
  for arch, (module_name, _, model_name) in ARCHITECTURES.items():
    module = importlib.import_module(module_name)
    if type(model) is getattr(module, model_name):
      return arch, module
  raise TypeError(f"{type(model).__name__} is not a registered HF architecture "
                  f"(models.hf.ARCHITECTURES)")


def key_map(model: nnx.Module) -> KeyMap:
  """The compiled HF key map of a (concrete or abstract) model."""
  _, module = _module_of(model)
  return KeyMap(**module.hf_key_map(model))


def _tensor_files(folder: Path) -> dict[str, Path]:
  """Checkpoint key → the safetensors file holding it."""
  single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = {k: folder / f for k, f in weight_map.items()}
    for f in sorted(set(files.values())):
      if not f.exists():
        raise FileNotFoundError(f"shard {f.name} named in {index} is missing")
    return files
  if single.exists():
    with safe_open(single, framework="flax") as f:
      return {k: single for k in f.keys()}
  raise FileNotFoundError(f"{folder} holds neither model.safetensors nor "
                          "model.safetensors.index.json")


def _path_str(path) -> str:
  return ".".join(str(p) for p in path)


def load(folder, *, dtype=jnp.float32, architecture: str | None = None) -> nnx.Module:
  """Load an HF checkpoint folder into the Flax NNX model its ``config.json`` names.

  ``architecture`` overrides ``config.json``'s ``architectures[0]``. Parameters are cast to
  ``dtype``. Raises on unsupported config attributes, unknown or duplicated checkpoint keys,
  missing parameters and shape mismatches, naming them.
  """
  folder = Path(folder)
  config_path = folder / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} does not exist")
  config_dict = json.loads(config_path.read_text())
  if architecture is None:
    names = config_dict.get("architectures") or []
    if len(names) != 1:
      raise ValueError(f"{config_path}: 'architectures' must name exactly one architecture, "
                       f"got {names!r}; pass architecture=")
    architecture = names[0]
  module, config_cls, model_cls = _resolve(architecture)
  config = config_cls.from_hf(config_dict)
  files = _tensor_files(folder)
  if hasattr(module, "hf_config_fixup"):
    config = module.hf_config_fixup(config, architecture, files.keys())

  abstract = nnx.eval_shape(lambda: model_cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
  kmap = key_map(abstract)
  graphdef, state = nnx.split(abstract)
  params = {_path_str(p): (p, v) for p, v in nnx.to_flat_state(state)}

  plan: dict[str, tuple[str, str]] = {}   # checkpoint key → (our path, transform)
  unknown, source = [], {}
  for key in files:
    hit = kmap.to_ours(key)
    if hit is None:
      if not kmap.is_ignored(key):
        unknown.append(key)
      continue
    ours = hit[0]
    if ours not in params:
      unknown.append(key)
    elif ours in source:
      raise ValueError(f"{folder}: checkpoint keys {source[ours]!r} and {key!r} both map to "
                       f"parameter {ours!r}")
    else:
      source[ours] = key
      plan[key] = hit
  if unknown:
    raise ValueError(f"{folder}: checkpoint keys not used by {architecture}: {format_keys(unknown)}")
  missing = sorted(set(params) - set(source))
  if missing:
    raise ValueError(f"{folder}: {architecture} parameters missing from the checkpoint: "
                     f"{format_keys(missing)}")

  values = {}
  by_file: dict[Path, list[str]] = {}
  for key in plan:
    by_file.setdefault(files[key], []).append(key)
  for path, keys in sorted(by_file.items()):
    with safe_open(path, framework="flax") as f:
      for key in keys:
        ours, transform = plan[key]
        tensor = TRANSFORMS[transform][0](f.get_tensor(key))
        want = params[ours][1].shape
        if tuple(tensor.shape) != tuple(want):
          raise ValueError(f"{path.name}: {key!r} has shape {tuple(tensor.shape)} after the "
                           f"{transform!r} transform, parameter {ours!r} expects {tuple(want)}")
        values[params[ours][0]] = jnp.asarray(tensor, dtype=params[ours][1].dtype)
  filled = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in nnx.to_flat_state(state)])
  return nnx.merge(graphdef, filled)


def save(model: nnx.Module, folder, *, dtype=None) -> Path:
  """Write ``model`` as an HF folder (``config.json`` + ``model.safetensors``, legacy key
  names as HF's own ``save_pretrained`` writes them) that transformers can load.

  Adapters must be merged (``Linear.merge``) or exported with ``rpe_jax.peft_io`` first.
  """
  from safetensors.flax import save_file

  architecture, _ = _module_of(model)
  kmap = key_map(model)
  _, state = nnx.split(model)
  tensors, unmapped = {}, []
  for path, var in nnx.to_flat_state(state):
    name = _path_str(path)
    hit = kmap.to_hf(name)
    if hit is None:
      unmapped.append(name)
      continue
    key, transform = hit
    value = jnp.asarray(var.get_value())
    tensors[key] = jnp.asarray(np.ascontiguousarray(
        TRANSFORMS[transform][1](value.astype(dtype) if dtype else value)))
  if unmapped:
    raise ValueError(f"parameters with no HF key (merge adapters, or export them with "
                     f"rpe_jax.peft_io.write_peft): {format_keys(unmapped)}")
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  config = model.config.to_hf(architecture)
  config["dtype"] = str(jnp.dtype(dtype or next(iter(tensors.values())).dtype))
  (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
  return folder


__all__ = ["ARCHITECTURES", "TRANSFORMS", "KeyMap", "format_keys", "key_map", "load", "save"]

"""PEFT LoRA adapter folders ⇄ our exchange-form adapter trees.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with, per
adapted module ``m`` (its HF module path),

  base_model.model.<m>.lora_A.weight  [r, in]   = aᵀ
  base_model.model.<m>.lora_B.weight  [out, r]  = bᵀ / s

and PEFT computes y = x Wᵀ + s · (x Aᵀ) Bᵀ with s = α/r (rsLoRA: α/√r), where r and α
come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches ``m`` (PEFT's rule:
the pattern matches a dotted suffix of ``m``), else from ``r`` / ``lora_alpha``.

Import folds s into b: LoRA(a = Aᵀ, b = s·Bᵀ), so δW = a b. Module paths go through the
model's HF key map (``models.hf.key_map``), so legacy (``encoder.layer.N.attention.
attention.query``) and transformers-v5 (``layers.N.attention.q_proj``) adapters both land
on our ``layers.N.attention.query``. Export writes lora_alpha = r for every module (s = 1,
ranks via ``rank_pattern`` / ``alpha_pattern`` when they differ) under the transformers-v5
module names, which is what PEFT on transformers 5 writes and loads; an SVD-LoRA is
exported as LoRA(a, diag(e) b).
"""

from __future__ import annotations

import collections
import json
import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from models import hf, hub
from models.lora import LoRA, SVDLoRA, adapted_layers, from_flat, to_flat
from rpe_jax.library import untrusted

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight\Z")

# Config entries of PEFT LoRA variants whose math is not plain δW = s·BA on an unchanged
# base: any truthy value is refused, with the reason.
_VARIANTS = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales the whole weight by a magnitude vector",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "use_qalora": "QA-LoRA pools the input groups",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "alora_invocation_tokens": "activated LoRA applies the adapter only after invocation tokens",
    "arrow_config": "Arrow routes between several adapters",
    "kasa_config": "KaSA adds a singular-value module",
    "monteclora_config": "MonteCLoRA samples the factors",
    "velora_config": "VeLoRA changes the forward pass",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "layer_replication": "layer_replication changes the base model's layers",
    "trainable_token_indices": "trainable tokens change the embedding matrix",
    "modules_to_save": "modules_to_save holds fully trained modules, not LoRA factors",
    "megatron_config": "Megatron-parallel LoRA layers",
}
# init_lora_weights values that leave the base model untouched (PiSSA, OLoRA, CorDA,
# LoftQ, LoRA-GA rewrite the base weights, so the adapter is relative to another base).
_PLAIN_INITS = (True, False, "gaussian", "eva")


def _check_config(config: dict, folder: Path) -> None:
  where = folder / CONFIG_NAME
  if config.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{where}: peft_type {config.get('peft_type')!r} is not supported "
                     "(only LORA)")
  for key, why in _VARIANTS.items():
    if config.get(key):
      raise ValueError(f"{where}: {key}={config[key]!r} is not supported: {why}")
  if config.get("bias", "none") != "none":
    raise ValueError(f"{where}: bias={config['bias']!r} is not supported (the adapter "
                     "would carry trained biases); only 'none'")
  if config.get("fan_in_fan_out"):
    raise ValueError(f"{where}: fan_in_fan_out=True (Conv1D layouts) is not supported")
  init = config.get("init_lora_weights", True)
  if init not in _PLAIN_INITS:
    raise ValueError(f"{where}: init_lora_weights={init!r} is not supported: it modifies "
                     "the base weights, so the adapter does not apply to the original model")
  for key, value in config.items():
    if key.startswith("use_") and key != "use_rslora" and value:
      raise ValueError(f"{where}: {key}={value!r} is not supported (a LoRA variant)")


def _pattern_value(patterns: dict, module: str, default):
  """PEFT's ``get_pattern_key``: the first pattern p with re.match(rf"(.*\\.)?({p})$", m)."""
  for pattern, value in patterns.items():
    if re.match(rf"(.*\.)?({pattern})$", module):
      return value
  return default


def _targeted(target_modules, module: str) -> bool:
  """PEFT's rule: a string is a full-match regex, a list matches a dotted suffix; None and
  "all-linear" defer to PEFT's defaults (not checked here)."""
  if target_modules is None or target_modules == "all-linear":
    return True
  if isinstance(target_modules, str):
    return re.fullmatch(target_modules, module) is not None
  return any(module == t or module.endswith("." + t) for t in target_modules)


def _our_module(kmap: hf.KeyMap, module: str, layers: dict) -> str | None:
  hit = kmap.to_ours(module + ".weight")
  if hit is None or hit[1] != "linear" or not hit[0].endswith(".kernel"):
    return None
  ours = hit[0][: -len(".kernel")]
  return ours if ours in layers else None


def read_peft(folder, model: nnx.Module, *, dtype=jnp.float32) -> dict:
  """A PEFT LoRA folder → our exchange-form adapter tree for ``model`` (scaling folded in b).

  ``folder`` may also be a Hugging Face Hub id (``"org/name[@revision]"``), from the local HF
  cache or downloaded where allowed (``models.hub.resolve``).

  Raises, naming the offending entry, on LoRA variants (DoRA, lora_bias, ...), unknown or
  unmatched tensor keys, modules ``model`` has no adapted linear layer for, and shapes or
  ranks that disagree with the layer or the config.
  """
  folder = hub.resolve(folder, option="PEFT folder")
  config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} does not exist")
  if not weights_path.exists():
    raise FileNotFoundError(f"{weights_path} does not exist (only safetensors adapters are read)")
  config = untrusted.read_json(config_path)
  if not isinstance(config, dict):
    raise ValueError(f"{config_path} is not a JSON object")
  _check_config(config, folder)
  untrusted.safetensors_header(weights_path)   # bounded and checked before safetensors reads it
  try:
    return _read_peft(config, weights_path, model, dtype)
  except SafetensorError as e:
    raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from None
  except (TypeError, AttributeError, re.error) as e:   # config values of the wrong kind
    raise ValueError(f"{config_path}: {type(e).__name__}: {e}") from None


def _read_peft(config: dict, weights_path: Path, model, dtype) -> dict:
  r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
  rank_pattern = config.get("rank_pattern") or {}
  alpha_pattern = config.get("alpha_pattern") or {}
  rslora = bool(config.get("use_rslora", False))

  kmap = hf.key_map(model)
  layers = adapted_layers(model)
  factors: dict[str, dict[str, str]] = collections.defaultdict(dict)
  bad = []
  with safe_open(weights_path, framework="flax") as f:
    keys = list(f.keys())
  for key in keys:
    m = _KEY.match(key)
    if m is None:
      bad.append(key)
    else:
      factors[m["module"]][m["factor"]] = key
  if bad:
    dora = [k for k in bad if "lora_magnitude_vector" in k]
    why = "DoRA magnitude vectors are not supported" if dora else \
        "expected only base_model.model.<module>.lora_A/lora_B.weight"
    raise ValueError(f"{weights_path}: unsupported tensors ({why}): {hf.format_keys(bad)}")
  if not factors:
    raise ValueError(f"{weights_path} holds no LoRA factors")

  untargeted = [m for m in factors if not _targeted(config.get("target_modules"), m)]
  if untargeted:
    raise ValueError(f"{weights_path}: modules not matched by target_modules "
                     f"{config.get('target_modules')!r} (PEFT would not load them): "
                     f"{hf.format_keys(untargeted)}")
  unmapped = [m for m in factors if _our_module(kmap, m, layers) is None]
  if unmapped:
    raise ValueError(f"{weights_path}: modules with no adaptable linear layer in "
                     f"{type(model).__name__}: {hf.format_keys(unmapped)}")
  flat = {}
  with safe_open(weights_path, framework="flax") as f:
    for module, pair in sorted(factors.items()):
      if set(pair) != {"A", "B"}:
        lacking = ({"A", "B"} - set(pair)).pop()
        raise ValueError(f"{weights_path}: module {module!r} has no lora_{lacking}.weight")
      ours = _our_module(kmap, module, layers)
      if ours in flat:
        raise ValueError(f"{weights_path}: two modules map to our layer {ours!r} "
                         f"(legacy and transformers-v5 names of one module?)")
      layer = layers[ours]
      lora_a, lora_b = f.get_tensor(pair["A"]), f.get_tensor(pair["B"])
      r = lora_a.shape[0] if lora_a.ndim == 2 else 0
      if r < 1 or lora_a.shape != (r, layer.in_features) or lora_b.shape != (layer.out_features, r):
        raise ValueError(
            f"{weights_path}: module {module!r}: lora_A {tuple(lora_a.shape)} / lora_B "
            f"{tuple(lora_b.shape)} do not fit the layer {ours!r} "
            f"(in {layer.in_features}, out {layer.out_features})")
      r_config = _pattern_value(rank_pattern, module, r_default)
      if r_config != r:
        raise ValueError(f"{weights_path}: module {module!r} has rank {r} but the config "
                         f"(r / rank_pattern) says {r_config}")
      alpha = _pattern_value(alpha_pattern, module, alpha_default)
      s = alpha / math.sqrt(r) if rslora else alpha / r
      a = lora_a.T.astype(jnp.float32)
      b = lora_b.T.astype(jnp.float32)
      if s != 1:
        b = b * jnp.float32(s)
      flat[ours] = LoRA(a.astype(dtype), b.astype(dtype))
  return from_flat(flat)


def write_peft(adapter, model: nnx.Module, folder, *, base_model_name_or_path: str | None = None
               ) -> Path:
  """Write an exchange-form adapter tree for ``model`` as a PEFT LoRA folder.

  lora_alpha = r for every module (scaling 1); modules are named as transformers 5 names
  them, so ``PeftModel.from_pretrained(hf_model, folder)`` loads it. SVD-LoRA leaves are
  written as LoRA(a, diag(e) b).
  """
  from safetensors.flax import save_file

  flat = to_flat(adapter)
  if not flat:
    raise ValueError("the adapter is empty")
  kmap = hf.key_map(model)
  layers = adapted_layers(model)
  tensors, ranks = {}, {}
  for path, leaf in sorted(flat.items()):
    if path not in layers:
      raise ValueError(f"adapter path {path!r} is not an adapted linear layer of "
                       f"{type(model).__name__}")
    layer = layers[path]
    if leaf.shape != (layer.in_features, layer.out_features):
      raise ValueError(f"adapter at {path!r} has shape {leaf.shape}, the layer "
                       f"({layer.in_features}, {layer.out_features})")
    hit = kmap.to_hf(path + ".kernel", which=-1)
    if hit is None or hit[1] != "linear" or not hit[0].endswith(".weight"):
      raise ValueError(f"adapter path {path!r} has no HF linear-module name")
    module = hit[0][: -len(".weight")]
    a, b = leaf.a, leaf.b
    if isinstance(leaf, SVDLoRA):
      b = (leaf.e.astype(jnp.float32)[:, None] * b.astype(jnp.float32)).astype(b.dtype)
    tensors[f"{_PREFIX}{module}.lora_A.weight"] = jnp.asarray(np.ascontiguousarray(a.T))
    tensors[f"{_PREFIX}{module}.lora_B.weight"] = jnp.asarray(np.ascontiguousarray(b.T))
    ranks[module] = int(leaf.rank)

  # The most common rank is r; the others go to rank_pattern, with alpha = r everywhere.
  counts = collections.Counter(ranks.values())
  r = max(counts, key=lambda k: (counts[k], -k))
  pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
  config = {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
      "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
      "use_rslora": False, "use_dora": False, "lora_bias": False, "bias": "none",
      "target_modules": sorted(ranks), "lora_dropout": 0.0, "fan_in_fan_out": False,
      "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
  }
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
  return folder


__all__ = ["read_peft", "write_peft"]

"""PEFT interop: PEFT-made adapters run the same in our ViT as in PeftModel (the oracle), our
exported adapters load in PEFT with the same outputs, round trip exact, variants refused."""

import json

import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp
import peft
import transformers
from safetensors.torch import load_file, save_file

from models import hf
from models.lora import LoRA, SVDLoRA, adapted_layers, to_flat
from rpe_jax.library.peft_io import read_peft, write_peft

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=16, patch_size=4, num_labels=3)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny random HF classifier saved to disk, and our model loaded from it."""
  torch.manual_seed(0)
  model = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY)).eval()
  folder = tmp_path_factory.mktemp("base")
  model.save_pretrained(folder)
  return folder, hf.load(folder)


def _hf_base(folder):
  return transformers.ViTForImageClassification.from_pretrained(folder).eval()


def _pixels(seed=1):
  return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _peft_adapter(base_folder, out, seed=2, **lora_kw):
  """A PEFT adapter with random non-zero lora_B (PEFT's init has B = 0), saved to ``out``."""
  torch.manual_seed(seed)
  model = peft.get_peft_model(_hf_base(base_folder), peft.LoraConfig(**lora_kw)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.copy_(0.2 * torch.randn_like(p))
  model.save_pretrained(out)
  return model


def _ours_with(model, adapter, x):
  """Our logits with ``adapter`` installed unmerged (then removed again)."""
  layers = adapted_layers(model)
  flat = to_flat(adapter)
  for path, leaf in flat.items():
    layers[path].set_adapter(leaf)
  try:
    return np.asarray(model(jnp.asarray(x.permute(0, 2, 3, 1).numpy())).logits)
  finally:
    for path in flat:
      layers[path].set_adapter(None)


def _logits(torch_model, x):
  with torch.no_grad():
    return torch_model(x).logits.numpy()


@pytest.mark.parametrize("lora_kw", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "fc1"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "classifier"],
         rank_pattern={"v_proj": 2, "layers.1.attention.q_proj": 3},
         alpha_pattern={"o_proj": 5, "classifier": 1}),
], ids=["plain", "rslora", "rank_alpha_pattern"])
def test_peft_made_adapter_matches_peft_model(base, tmp_path, lora_kw):
  folder, ours = base
  theirs = _peft_adapter(folder, tmp_path, **lora_kw)
  x = _pixels()
  ref = _logits(theirs, x)
  assert np.abs(ref - _logits(_hf_base(folder), x)).max() > 1e-3  # the adapter matters
  adapter = read_peft(tmp_path, ours)
  flat = to_flat(adapter)
  assert "vit.layers.0.attention.query" in flat and "vit.layers.1.attention.value" in flat
  np.testing.assert_allclose(_ours_with(ours, adapter, x), ref, rtol=0, atol=1e-5)
  if "rank_pattern" in lora_kw:
    assert flat["vit.layers.0.attention.value"].rank == 2
    assert flat["vit.layers.1.attention.query"].rank == 3
    assert flat["vit.layers.0.attention.query"].rank == 4


def test_scaling_is_folded_into_b(base, tmp_path):
  folder, ours = base
  _peft_adapter(folder, tmp_path, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])
  tensors = load_file(tmp_path / "adapter_model.safetensors")
  a_t = tensors["base_model.model.vit.layers.1.attention.q_proj.lora_A.weight"].numpy()
  b_t = tensors["base_model.model.vit.layers.1.attention.q_proj.lora_B.weight"].numpy()
  leaf = to_flat(read_peft(tmp_path, ours))["vit.layers.1.attention.query"]
  np.testing.assert_array_equal(np.asarray(leaf.a), a_t.T)
  np.testing.assert_allclose(np.asarray(leaf.b), (8 / np.sqrt(4)) * b_t.T, rtol=1e-7)


def _random_adapter(model, seed=0):
  """Mixed ranks and kinds on query / value / fc2 / classifier."""
  layers = adapted_layers(model)
  spec = {"vit.layers.0.attention.query": ("lora", 2), "vit.layers.0.attention.value": ("svd", 3),
          "vit.layers.1.attention.query": ("lora", 2), "vit.layers.1.mlp.fc2": ("lora", 5),
          "classifier": ("svd", 2)}
  keys = iter(jax.random.split(jax.random.key(seed), 3 * len(spec)))
  flat = {}
  for path, (kind, r) in spec.items():
    n_in, n_out = layers[path].in_features, layers[path].out_features
    a = 0.3 * jax.random.normal(next(keys), (n_in, r))
    b = 0.3 * jax.random.normal(next(keys), (r, n_out))
    e = jax.random.uniform(next(keys), (r,), minval=0.5, maxval=2.0)
    flat[path] = LoRA(a, b) if kind == "lora" else SVDLoRA(a, e, b)
  from models.lora import from_flat
  return from_flat(flat)


def test_exported_adapter_loads_in_peft(base, tmp_path):
  folder, ours = base
  adapter = _random_adapter(ours)
  write_peft(adapter, ours, tmp_path, base_model_name_or_path="tiny-vit")
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["r"] == config["lora_alpha"] == 2
  assert config["rank_pattern"] == config["alpha_pattern"] == {
      "vit.layers.0.attention.v_proj": 3, "vit.layers.1.mlp.fc2": 5}
  theirs = peft.PeftModel.from_pretrained(_hf_base(folder), tmp_path).eval()
  x = _pixels(seed=7)
  ref = _logits(theirs, x)
  assert np.abs(ref - _logits(_hf_base(folder), x)).max() > 1e-3
  np.testing.assert_allclose(_ours_with(ours, adapter, x), ref, rtol=0, atol=1e-5)


def test_round_trip_is_exact(base, tmp_path):
  folder, ours = base
  adapter = _random_adapter(ours, seed=3)
  write_peft(adapter, ours, tmp_path)
  back = to_flat(read_peft(tmp_path, ours))
  flat = to_flat(adapter)
  assert sorted(back) == sorted(flat)
  for path, leaf in flat.items():
    assert isinstance(back[path], LoRA)
    np.testing.assert_array_equal(np.asarray(back[path].a), np.asarray(leaf.a))
    b = np.asarray(leaf.b)
    if isinstance(leaf, SVDLoRA):
      b = np.asarray(leaf.e)[:, None] * b      # numpy oracle for diag(e) b
    np.testing.assert_array_equal(np.asarray(back[path].b), b)


def test_legacy_module_names_read_the_same(base, tmp_path):
  folder, ours = base
  _peft_adapter(folder, tmp_path / "v5", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
  tensors = load_file(tmp_path / "v5" / "adapter_model.safetensors")
  legacy = {k.replace("vit.layers.", "vit.encoder.layer.")
             .replace("attention.q_proj", "attention.attention.query")
             .replace("attention.v_proj", "attention.attention.value"): v
            for k, v in tensors.items()}
  assert "base_model.model.vit.encoder.layer.0.attention.attention.query.lora_A.weight" in legacy
  (tmp_path / "legacy").mkdir()
  save_file(legacy, str(tmp_path / "legacy" / "adapter_model.safetensors"))
  config = json.loads((tmp_path / "v5" / "adapter_config.json").read_text())
  config["target_modules"] = ["query", "value"]   # as transformers-4 PEFT wrote it
  (tmp_path / "legacy" / "adapter_config.json").write_text(json.dumps(config))
  want, got = to_flat(read_peft(tmp_path / "v5", ours)), to_flat(read_peft(tmp_path / "legacy", ours))
  assert sorted(want) == sorted(got)
  for path in want:
    np.testing.assert_array_equal(np.asarray(got[path].b), np.asarray(want[path].b))
  # Both namings of one module in one file: ambiguous, refused.
  (tmp_path / "both").mkdir()
  both = {**tensors, **{k: v.clone() for k, v in legacy.items()}}
  save_file(both, str(tmp_path / "both" / "adapter_model.safetensors"))
  config["target_modules"] = None
  (tmp_path / "both" / "adapter_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="two modules map"):
    read_peft(tmp_path / "both", ours)


def test_dora_is_refused(base, tmp_path):
  folder, ours = base
  _peft_adapter(folder, tmp_path, r=2, target_modules=["q_proj"], use_dora=True)
  with pytest.raises(ValueError, match="DoRA"):
    read_peft(tmp_path, ours)


@pytest.mark.parametrize("change, message", [
    (dict(lora_bias=True), "lora_bias"),
    (dict(bias="all"), "bias"),
    (dict(init_lora_weights="pissa"), "base weights"),
    (dict(peft_type="IA3"), "IA3"),
    (dict(modules_to_save=["classifier"]), "modules_to_save"),
    (dict(r=3), "rank 2"),
    (dict(target_modules=["v_proj"]), "target_modules"),
])
def test_variants_and_bad_configs_are_refused(base, tmp_path, change, message):
  folder, ours = base
  _peft_adapter(folder, tmp_path, r=2, target_modules=["q_proj"])
  path = tmp_path / "adapter_config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
  with pytest.raises(ValueError, match=message):
    read_peft(tmp_path, ours)


def test_unmapped_module_is_refused(base, tmp_path):
  folder, ours = base
  _peft_adapter(folder, tmp_path, r=2, target_modules=["projection"])   # the patch conv
  with pytest.raises(ValueError, match="no adaptable linear layer.*projection"):
    read_peft(tmp_path, ours)


def test_write_rejects_unknown_paths(base, tmp_path):
  _, ours = base
  with pytest.raises(ValueError, match="not an adapted linear layer"):
    write_peft({"vit": {"nope": LoRA(jnp.zeros((32, 2)), jnp.zeros((2, 32)))}}, ours, tmp_path)

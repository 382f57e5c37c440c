"""HF checkpoint folders: key names (legacy and v5), shards, strictness, save → HF loads it."""

import json

import numpy as np
import pytest
import torch
import jax.numpy as jnp
import transformers
from safetensors.torch import load_file, save_file

from models import hf
from models.vit import ViTModel

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=16, patch_size=4, num_labels=3)


def _hf_model(cls, seed=0, **kw):
  torch.manual_seed(seed)
  model = cls(transformers.ViTConfig(**TINY), **kw).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "layernorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _pixels(batch=2, seed=1):
  return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _run(ours, x):
  return ours(jnp.asarray(x.permute(0, 2, 3, 1).numpy()))


def _close(ours, theirs, atol=1e-5):
  np.testing.assert_allclose(np.asarray(ours, np.float32), theirs.detach().numpy(),
                             rtol=0, atol=atol)


@pytest.fixture(scope="module")
def saved_cls(tmp_path_factory):
  model = _hf_model(transformers.ViTForImageClassification)
  folder = tmp_path_factory.mktemp("cls")
  model.save_pretrained(folder)
  return model, folder


def test_checkpoint_files_keep_legacy_names(saved_cls):
  """What transformers 5 writes: legacy names on disk, v5 names in memory."""
  theirs, folder = saved_cls
  keys = set(load_file(folder / "model.safetensors"))
  assert "vit.encoder.layer.0.attention.attention.query.weight" in keys
  assert "vit.layers.0.attention.q_proj.weight" in dict(theirs.named_parameters())


def test_v5_key_names_and_shards(saved_cls, tmp_path):
  theirs, folder = saved_cls
  x = _pixels()
  with torch.no_grad():
    ref = theirs(x).logits
  # v5 in-memory names (state_dict), written as a 3-shard checkpoint with an index.
  state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
  assert any(".q_proj." in k for k in state)
  names = sorted(state)
  shards = [names[i::3] for i in range(3)]
  weight_map = {}
  for j, part in enumerate(shards):
    fname = f"model-{j + 1:05d}-of-00003.safetensors"
    save_file({k: state[k] for k in part}, str(tmp_path / fname), metadata={"format": "pt"})
    weight_map.update({k: fname for k in part})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  _close(_run(hf.load(tmp_path), x).logits, ref)


def test_save_then_hf_loads_it(saved_cls, tmp_path):
  theirs, folder = saved_cls
  ours = hf.load(folder)
  hf.save(ours, tmp_path)
  reloaded = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
  x = _pixels(seed=5)
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(x).logits.numpy(), theirs(x).logits.numpy())
  assert reloaded.config.id2label == theirs.config.id2label
  assert set(load_file(tmp_path / "model.safetensors")) == set(load_file(folder / "model.safetensors"))


def test_vit_model_without_pooler_and_prefixed_keys(tmp_path):
  theirs = _hf_model(transformers.ViTModel, add_pooling_layer=False)
  state = {"vit." + k: v.contiguous() for k, v in theirs.state_dict().items()}
  save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  theirs.config.architectures = ["ViTModel"]
  theirs.config.save_pretrained(tmp_path)
  ours = hf.load(tmp_path)
  assert isinstance(ours, ViTModel) and ours.pooler is None
  x = _pixels()
  with torch.no_grad():
    ref = theirs(x)
  out = _run(ours, x)
  assert out.pooler_output is None
  _close(out.last_hidden_state, ref.last_hidden_state)


def test_mask_token_is_explicitly_ignored(tmp_path):
  theirs = _hf_model(transformers.ViTModel, use_mask_token=True)
  theirs.save_pretrained(tmp_path)
  assert "embeddings.mask_token" in load_file(tmp_path / "model.safetensors")
  x = _pixels()
  with torch.no_grad():
    _close(_run(hf.load(tmp_path), x).pooler_output, theirs(x).pooler_output)


def test_bfloat16_load(saved_cls):
  theirs, folder = saved_cls
  ours = hf.load(folder, dtype=jnp.bfloat16)
  assert ours.classifier.kernel[...].dtype == jnp.bfloat16
  x = _pixels()
  with torch.no_grad():
    ref = theirs(x).logits
  _close(_run(ours, x).logits, ref, atol=0.1)


def _rewrite(folder, dest, edit):
  tensors = load_file(folder / "model.safetensors")
  edit(tensors)
  save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
  (dest / "config.json").write_text((folder / "config.json").read_text())


def test_unknown_key_is_an_error_naming_it(saved_cls, tmp_path):
  _, folder = saved_cls
  _rewrite(folder, tmp_path, lambda t: t.update({"vit.encoder.layer.0.extra.weight": torch.ones(2)}))
  with pytest.raises(ValueError, match=r"not used.*vit\.encoder\.layer\.0\.extra\.weight"):
    hf.load(tmp_path)


def test_missing_key_is_an_error_naming_the_parameter(saved_cls, tmp_path):
  _, folder = saved_cls
  _rewrite(folder, tmp_path, lambda t: t.pop("vit.encoder.layer.1.output.dense.weight"))
  with pytest.raises(ValueError, match=r"missing.*vit\.layers\.1\.mlp\.fc2\.kernel"):
    hf.load(tmp_path)


def test_duplicate_legacy_and_v5_key_is_an_error(saved_cls, tmp_path):
  _, folder = saved_cls
  _rewrite(folder, tmp_path, lambda t: t.update(
      {"vit.layers.0.attention.q_proj.weight": t["vit.encoder.layer.0.attention.attention.query.weight"].clone()}))
  with pytest.raises(ValueError, match="both map to"):
    hf.load(tmp_path)


def test_shape_mismatch_is_an_error(saved_cls, tmp_path):
  _, folder = saved_cls
  _rewrite(folder, tmp_path, lambda t: t.update({"classifier.weight": torch.ones(3, 31)}))
  with pytest.raises(ValueError, match=r"classifier\.weight.*shape"):
    hf.load(tmp_path)


def test_unsupported_architecture(saved_cls, tmp_path):
  _, folder = saved_cls
  config = json.loads((folder / "config.json").read_text())
  config["architectures"] = ["ViTForMaskedImageModeling"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="ViTForMaskedImageModeling"):
    hf.load(tmp_path)


def test_save_refuses_unmerged_adapters(saved_cls, tmp_path):
  from flax import nnx
  from models.lora import init_adapters
  ours = hf.load(saved_cls[1])
  init_adapters(ours, rank=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="lora_a"):
    hf.save(ours, tmp_path)

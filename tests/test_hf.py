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


# --- sharded, memory-bounded loading ------------------------------------------------------------

def _sharded_bf16_llama(folder):
  """A tiny random Llama saved in bfloat16 as several safetensors shards (with an index)."""
  torch.manual_seed(3)
  cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64)
  model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
  model.save_pretrained(folder, max_shard_size="40KB")
  shards = sorted(folder.glob("model-*.safetensors"))
  assert len(shards) >= 3 and (folder / "model.safetensors.index.json").exists()
  state = {}
  for f in shards:
    state.update(load_file(f))
  return state


@pytest.mark.parametrize("preset", ["tp", "fsdp_tp"])
def test_sharded_bf16_checkpoint_each_device_gets_only_its_slice(tmp_path, preset, monkeypatch):
  """Loading onto an 8-device mesh: every parameter lands on the sharding of the abstract
  model's rules, each device's buffer is exactly its slice of the checkpoint tensor (oracle:
  the tensors as safetensors.torch reads them, transposed to [in, out]), and no read of a
  sharded kernel asks the file for more rows than the device's slice needs."""
  import jax
  from flax import nnx
  from rpe_jax.parallel.sharding import make_mesh, state_shardings

  state = _sharded_bf16_llama(tmp_path)
  mesh = make_mesh("data=2,model=4")
  rows_read = []
  read = hf.SafetensorsFile.read

  def spy(self, key, index=None):
    out = read(self, key, index)
    rows_read.append((key, out.shape[0] if out.ndim else 1, self.info(key)[0]))
    return out

  monkeypatch.setattr(hf.SafetensorsFile, "read", spy)
  want_shardings = {}

  def shardings(abstract):
    tree = state_shardings(nnx.state(abstract), mesh, model_type=abstract.config, preset=preset)
    want_shardings.update({".".join(map(str, p)): v.get_value() if isinstance(v, nnx.Variable)
                           else v for p, v in nnx.to_flat_state(tree)})
    return tree

  model = hf.load(tmp_path, dtype=jnp.bfloat16, shardings=shardings)
  kmap = hf.key_map(model)
  split = 0
  for path, var in nnx.to_flat_state(nnx.state(model)):
    name = ".".join(map(str, path))
    arr = var.get_value()
    assert arr.dtype == jnp.bfloat16
    assert arr.sharding.is_equivalent_to(want_shardings[name], arr.ndim), name
    key, transform = kmap.to_hf(name)
    full = state[key].float().numpy()
    full = full.T if transform == "linear" else full
    for shard in arr.addressable_shards:
      got = np.asarray(shard.data, np.float32)
      assert got.shape == full[shard.index].shape, name
      np.testing.assert_array_equal(got, full[shard.index])
      split += got.size < full.size
  assert split > 0      # the mesh really splits parameters
  # column-parallel kernels (q/k/v/gate/up: our out axis = the checkpoint's rows) are read
  # a device slice at a time, never whole
  for key, n_rows, shape in rows_read:
    if key.endswith(("q_proj.weight", "gate_proj.weight", "up_proj.weight")):
      assert n_rows == shape[0] // 4, (key, n_rows, shape)


def test_load_with_one_sharding_and_bad_shardings(saved_cls):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from rpe_jax.parallel.sharding import make_mesh
  _, folder = saved_cls
  mesh = make_mesh("data=8")
  model = hf.load(folder, shardings=NamedSharding(mesh, P()))
  assert len(model.classifier.kernel[...].sharding.device_set) == 8
  with pytest.raises(ValueError, match="no sharding for parameters"):
    hf.load(folder, shardings={"classifier.kernel": NamedSharding(mesh, P())})

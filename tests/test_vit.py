"""ViT port: parity with HF PyTorch ViT (the oracle), config checks, features, adapter paths."""

import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp
from flax import nnx
import transformers

from models import hf
from models.layers import set_attention_impl
from models.lora import LoRA, adapted_layers, init_adapters
from models.vit import ViTConfig, ViTForImageClassification, ViTModel, with_new_head

# Both attention kernels ("auto" resolves to one of them) must meet the same HF parity.
IMPLS = ["reference", "fused"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=16, patch_size=4, num_labels=5)


def _hf_model(cls, seed=0, **overrides):
  torch.manual_seed(seed)
  model = cls(transformers.ViTConfig(**{**TINY, **overrides})).eval()
  # HF's init leaves biases and layer norms at 0/1: randomise them so a swapped or
  # untransposed tensor cannot hide.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "layernorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _pixels(config, batch=3, seed=1):
  g = torch.Generator().manual_seed(seed)
  h, w = (config.image_size, config.image_size) if isinstance(config.image_size, int) \
      else config.image_size
  return torch.randn(batch, config.num_channels, h, w, generator=g)


def _nhwc(x):
  return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def _close(ours, theirs, atol=1e-5):
  np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=0, atol=atol)


@pytest.fixture(scope="module", params=IMPLS)
def vit_model(request, tmp_path_factory):
  model = _hf_model(transformers.ViTModel)
  folder = tmp_path_factory.mktemp("vit_model")
  model.save_pretrained(folder)
  return model, set_attention_impl(hf.load(folder), request.param)


@pytest.fixture(scope="module", params=IMPLS)
def vit_cls(request, tmp_path_factory):
  model = _hf_model(transformers.ViTForImageClassification)
  folder = tmp_path_factory.mktemp("vit_cls")
  model.save_pretrained(folder)
  return model, set_attention_impl(hf.load(folder), request.param)


def test_vit_model_parity(vit_model):
  theirs, ours = vit_model
  x = _pixels(theirs.config)
  with torch.no_grad():
    ref = theirs(x)
  out = ours(_nhwc(x))
  assert isinstance(ours, ViTModel) and out.logits is None
  assert ours.layers[0].attention.attention_impl == ours.config.attention_impl
  _close(out.last_hidden_state, ref.last_hidden_state)
  _close(out.pooler_output, ref.pooler_output)


def test_classifier_parity_under_jit(vit_cls):
  theirs, ours = vit_cls
  x = _pixels(theirs.config)
  with torch.no_grad():
    ref = theirs(x, output_hidden_states=True)
  graphdef, state = nnx.split(ours)
  out = jax.jit(lambda s, px: nnx.merge(graphdef, s)(px))(state, _nhwc(x))
  assert isinstance(ours, ViTForImageClassification) and out.pooler_output is None
  _close(out.logits, ref.logits)
  # HF's last hidden_states entry is the encoder output before the final layer norm.
  ln = theirs.vit.layernorm
  _close(out.last_hidden_state, ln(ref.hidden_states[-1]))


def test_features_cls_and_mean(vit_model):
  theirs, ours = vit_model
  x = _pixels(theirs.config, batch=4, seed=3)
  with torch.no_grad():
    hidden = theirs(x).last_hidden_state
  _close(ours.features(_nhwc(x), pooling="cls"), hidden[:, 0])
  _close(ours.features(_nhwc(x), pooling="mean"), hidden[:, 1:].mean(dim=1))
  with pytest.raises(ValueError, match="pooling"):
    ours.features(_nhwc(x), pooling="max")


@pytest.mark.parametrize("overrides", [
    dict(hidden_act="gelu_pytorch_tanh", qkv_bias=False, layer_norm_eps=1e-6),
    dict(image_size=[16, 12], patch_size=[4, 3], num_channels=1, pooler_output_size=24),
])
@pytest.mark.parametrize("impl", IMPLS)
def test_parity_variants(tmp_path, overrides, impl):
  theirs = _hf_model(transformers.ViTModel, seed=4, **overrides)
  theirs.save_pretrained(tmp_path)
  ours = set_attention_impl(hf.load(tmp_path), impl)
  x = _pixels(theirs.config, batch=2)
  with torch.no_grad():
    ref = theirs(x)
  out = ours(_nhwc(x))
  _close(out.last_hidden_state, ref.last_hidden_state)
  _close(out.pooler_output, ref.pooler_output)


def test_from_hf_reads_math_and_ignores_bookkeeping():
  d = transformers.ViTConfig(**TINY, layer_norm_eps=1e-6).to_dict()
  d.update(torch_dtype="float32", architectures=["ViTForImageClassification"],
           encoder_stride=8, initializer_range=0.5)
  c = ViTConfig.from_hf(d)
  assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (32, 2, 4)
  assert c.layer_norm_eps == 1e-6 and c.image_size == (16, 16) and c.patch_size == (4, 4)
  assert c.num_labels == 5 and c.labels[0] == "LABEL_0"
  assert ViTConfig.from_hf(c.to_hf("ViTModel")) == c


@pytest.mark.parametrize("change, message", [
    (dict(hidden_act="gelu_10"), "hidden_act"),
    (dict(model_type="deit"), "model_type"),
    (dict(layerscale_value=0.1), "layerscale_value"),
    (dict(pruned_heads={"0": [1]}), "pruned_heads"),
    (dict(hidden_size=30), "divisible"),
    (dict(image_size=18), "multiple of patch size"),
])
def test_from_hf_rejects(change, message):
  d = {**transformers.ViTConfig(**TINY).to_dict(), **change}
  with pytest.raises(ValueError, match=message):
    ViTConfig.from_hf(d)


def test_attention_impl_is_checked_and_not_an_hf_attribute():
  with pytest.raises(ValueError, match="attention_impl"):
    ViTConfig(attention_impl="flash")
  config = ViTConfig(attention_impl="fused")
  assert "attention_impl" not in config.to_hf("ViTModel")
  with pytest.raises(ValueError, match="attention_impl"):
    set_attention_impl(ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=8,
                                          image_size=4, patch_size=2), rngs=nnx.Rngs(0)), "x")


def test_pixel_shape_is_checked():
  model = ViTModel(ViTConfig(**{k: v for k, v in TINY.items() if k != "num_labels"}),
                   rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="NHWC"):
    model(jnp.zeros((1, 3, 16, 16)))


def test_adapter_paths_and_default_targets():
  config = ViTConfig(**{k: v for k, v in TINY.items() if k != "num_labels"}, labels=("a", "b"))
  model = ViTForImageClassification(config, rngs=nnx.Rngs(0))
  paths = set(adapted_layers(model))
  for i in range(2):
    for name in ("attention.query", "attention.key", "attention.value", "attention.output",
                 "mlp.fc1", "mlp.fc2"):
      assert f"vit.layers.{i}.{name}" in paths
  assert "classifier" in paths
  got = init_adapters(model, rank=2, rngs=nnx.Rngs(1))
  assert sorted(got) == [f"vit.layers.{i}.attention.{t}" for i in range(2)
                         for t in ("query", "value")]


def test_adapter_changes_output_like_a_merged_kernel():
  """An unmerged adapter on query equals the model whose query kernel is W + a b."""
  config = ViTConfig(**{k: v for k, v in TINY.items() if k != "num_labels"})
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  model = ViTModel(config, rngs=nnx.Rngs(0))
  layer = model.layers[1].attention.query
  ka, kb = jax.random.split(jax.random.key(1))
  lora = LoRA(jax.random.normal(ka, (32, 3)), 0.1 * jax.random.normal(kb, (3, 32)))
  base = model(x).last_hidden_state
  layer.set_adapter(lora)
  unmerged = model(x).last_hidden_state
  layer.set_adapter(None)
  layer.kernel[...] = layer.kernel[...] + np.asarray(lora.a) @ np.asarray(lora.b)
  merged = model(x).last_hidden_state
  assert float(jnp.abs(unmerged - base).max()) > 1e-3
  np.testing.assert_allclose(unmerged, merged, atol=1e-5)


def test_with_new_head_keeps_the_encoder(vit_model):
  theirs, ours = vit_model
  init_adapters(ours, rank=2, rngs=nnx.Rngs(0))
  try:
    clf = with_new_head(ours, ["x", "y", "z", "w"], rngs=nnx.Rngs(1))
  finally:
    for layer in adapted_layers(ours).values():
      layer.set_adapter(None)
  assert clf.config.num_labels == 4 and clf.vit.pooler is None
  assert all(layer.adapter is None for layer in adapted_layers(clf).values())
  x = _pixels(theirs.config, batch=2, seed=9)
  with torch.no_grad():
    hidden = theirs(x).last_hidden_state
  out = clf(_nhwc(x))
  assert out.logits.shape == (2, 4)
  _close(out.last_hidden_state, hidden)


def _max_err(a, b):
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_parity_with_hf_bfloat16(tmp_path, impl):
  """bf16 weights and activations (float32 norms, softmax and logits) against HF torch run
  in bf16 on the same checkpoint, and no further from HF float32 than HF's own bf16 is."""
  theirs = _hf_model(transformers.ViTForImageClassification, seed=5)
  theirs.save_pretrained(tmp_path)
  ours = set_attention_impl(hf.load(tmp_path, dtype=jnp.bfloat16), impl)
  assert {v.dtype for v in jax.tree.leaves(nnx.state(ours, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
  x = _pixels(theirs.config, batch=4, seed=6)
  with torch.no_grad():
    ref32 = theirs(x, output_hidden_states=True)
    hidden32 = theirs.vit.layernorm(ref32.hidden_states[-1])
    theirs16 = theirs.to(torch.bfloat16)
    ref16 = theirs16(x.to(torch.bfloat16), output_hidden_states=True)
    hidden16 = theirs16.vit.layernorm(ref16.hidden_states[-1]).float()
  out = ours(_nhwc(x))
  assert out.logits.dtype == jnp.float32 and out.last_hidden_state.dtype == jnp.bfloat16
  # Measured (2026-11-29, CPU, both kernels): max |Δ| vs HF bf16 = 9.8e-4 on the logits
  # (max |logit| 0.14) and 0.031 on the last hidden state (one bf16 ulp at |h| ~ 4-8);
  # tolerances = measured × ~2.5.
  assert _max_err(out.logits, ref16.logits.float()) <= 2.5e-3
  assert _max_err(out.last_hidden_state, hidden16) <= 0.08
  # Measured: ours vs HF f32 0.024 = HF bf16 vs HF f32 0.024 (ratio 1.0); allowed 2×.
  assert _max_err(out.last_hidden_state, hidden32) <= 2 * _max_err(hidden16, hidden32)


def test_gelu_exact_matches_float64_erf_and_torch():
  """The erf-form exact GELU against a float64 oracle (math.erf) and torch's "gelu", values
  and gradients, on inputs from the far tails to 0."""
  import math

  from models.layers import gelu_exact
  x = np.concatenate([np.linspace(-12, 12, 4001), np.random.default_rng(0).normal(size=2000)])
  x = x.astype(np.float32)
  oracle = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
  d_oracle = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2)
                       / math.sqrt(2 * math.pi) for v in x.astype(np.float64)])
  ours = np.asarray(jax.jit(gelu_exact)(jnp.asarray(x)), np.float64)
  d_ours = np.asarray(jax.jit(jax.grad(lambda v: gelu_exact(v).sum()))(jnp.asarray(x)))
  np.testing.assert_allclose(ours, oracle, rtol=2e-6, atol=2e-6)
  np.testing.assert_allclose(d_ours, d_oracle, rtol=2e-6, atol=2e-6)
  t = torch.from_numpy(x.copy())
  np.testing.assert_allclose(ours, torch.nn.functional.gelu(t).numpy(), rtol=1e-6, atol=1e-6)
  assert np.asarray(gelu_exact(jnp.asarray(x))).dtype == np.float32
  assert np.asarray(gelu_exact(jnp.asarray(x, jnp.bfloat16))).dtype == jnp.bfloat16

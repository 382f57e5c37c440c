"""Sharding on the 8 fake CPU devices of conftest: meshes, partition-spec rules, the sharded
library and its exact composition, sharded forwards of ViT and Llama carrying a composed
adapter, the sharded solver, orbax restore onto another mesh, and the multi-host entry.

Oracles: single-device results (compose.combine, the unsharded model, the unsharded
solver), dense float64 numpy, and hand-written partition specs.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from models.llama import LlamaConfig, LlamaForCausalLM
from models.lora import LoRA, SVDLoRA, adapted_layers, from_flat, is_lora, to_flat
from models.vit import ViTConfig, ViTForImageClassification
from rpe_jax import compose
from rpe_jax import distributed
from rpe_jax import sharding as sh
from solvers import sparse_simplex

TOL = 1e-6


def _np(x):
  return np.asarray(x, np.float64)


def _delta64(leaf):
  """Dense δW in float64 numpy (the oracle), from any leaf."""
  if isinstance(leaf, SVDLoRA):
    return (_np(leaf.a) * _np(leaf.e)) @ _np(leaf.b)
  return _np(leaf.a) @ _np(leaf.b)


def _specs(tree):
  return jax.tree.map(lambda x: x.sharding.spec, tree)


def _assert_shardings(tree, wanted):
  """Every array of ``tree`` sits exactly as the NamedSharding tree ``wanted`` says."""
  got = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, tree))
  want = jax.tree.leaves(wanted)
  assert len(got) == len(want) > 0
  for x, (g, w) in zip(jax.tree.leaves(tree), zip(got, want)):
    assert isinstance(g, NamedSharding) and g.mesh == w.mesh, (g, w)
    assert g.is_equivalent_to(w, x.ndim), (g.spec, w.spec)


def _assert_close(x, y, tol=TOL):
  x, y = _np(x), _np(y)
  np.testing.assert_allclose(x, y, rtol=tol, atol=tol * max(1.0, np.abs(y).max()))


# --- Meshes -----------------------------------------------------------------------------------

def test_make_mesh_shapes_and_fill():
  mesh = sh.make_mesh("data=2,model=4")
  assert dict(mesh.shape) == {"data": 2, "model": 4}
  assert mesh.devices.size == 8
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sh.make_mesh("data=-1,model=2").shape) == {"data": 4, "model": 2}
  small = sh.make_mesh("data=2")          # divides 8: the first two devices
  assert list(small.devices.flat) == jax.devices()[:2]
  assert sh.parse_mesh(" data = 8 ") == {"data": 8}


@pytest.mark.parametrize("spec, message", [
    ("data=3", "does not divide"),
    ("data=16", "does not divide"),
    ("data=2,data=4", "twice"),
    ("data:2", "NAME=SIZE"),
    ("data=two", "not an integer"),
    ("data=0", ">= 1"),
    ("data=-1,model=-1", "at most one"),
    ("data=-1,model=3", "does not divide"),
    ("", "data=2,model=4"),
])
def test_make_mesh_rejects_bad_specs(spec, message):
  with pytest.raises(ValueError, match=message):
    sh.make_mesh(spec)


# --- Tiny models and adapters -----------------------------------------------------------------

VIT = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, image_size=8, patch_size=4, num_channels=3,
                labels=("a", "b", "c"))
LLAMA = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
VIT_TARGETS = ("query", "value", "output", "fc1", "fc2")
LLAMA_TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def _random_adapter(model, targets, rank, seed, kind="lora", scale=0.1):
  """A random exchange-form adapter on the layers of ``model`` whose path ends in a target."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, layer in adapted_layers(model).items():
    if path.rsplit(".", 1)[-1] not in targets:
      continue
    a = jnp.asarray(scale * rng.normal(size=(layer.in_features, rank)), jnp.float32)
    b = jnp.asarray(scale * rng.normal(size=(rank, layer.out_features)), jnp.float32)
    if kind == "svd":
      flat[path] = SVDLoRA(a, jnp.asarray(rng.uniform(0.5, 2.0, rank), jnp.float32), b)
    else:
      flat[path] = LoRA(a, b)
  return from_flat(flat)


@pytest.fixture(scope="module")
def vit():
  return ViTForImageClassification(VIT, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def llama():
  return LlamaForCausalLM(LLAMA, rngs=nnx.Rngs(1))


# --- Partition-spec rules ---------------------------------------------------------------------

def test_vit_rules_tensor_parallel_and_fsdp(vit):
  model = compose.with_adapter(vit, _random_adapter(vit, ("query", "output"), 2, 0))
  mesh = sh.make_mesh("data=2,model=4")
  flat = lambda preset: {sh._dotted(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(
      sh.state_shardings(nnx.state(model), mesh, model_type="vit", preset=preset))[0]}
  tp, both = flat("tp"), flat("fsdp_tp")
  att = "vit.layers.0.attention"
  # Column-parallel q: out on model; row-parallel output: in on model (hand-written oracle).
  assert tp[f"{att}.query.kernel"] == P(None, "model")
  assert tp[f"{att}.query.bias"] == P("model")
  assert tp[f"{att}.query.lora_a"] == P(None, None)
  assert tp[f"{att}.query.lora_b"] == P(None, "model")
  assert tp[f"{att}.output.kernel"] == P("model", None)
  assert tp[f"{att}.output.bias"] == P(None)
  assert tp[f"{att}.output.lora_a"] == P("model", None)
  assert tp[f"{att}.output.lora_b"] == P(None, None)
  assert tp["vit.layers.1.mlp.fc1.kernel"] == P(None, "model")
  assert tp["vit.layers.1.mlp.fc2.kernel"] == P("model", None)
  assert tp["vit.layers.0.layernorm_before.scale"] == P(None)
  assert tp["classifier.kernel"] == P(None, None)
  assert both[f"{att}.query.kernel"] == P("data", "model")
  assert both[f"{att}.output.kernel"] == P("model", "data")
  assert both[f"{att}.query.lora_a"] == P("data", None)
  assert both["vit.embeddings.patch_embeddings.kernel"] == P(None, None, None, "data")
  assert all(s == P(*([None] * len(s))) for s in flat("replicated").values())


def test_rules_replicate_indivisible_dims_unless_strict():
  mesh = sh.make_mesh("model=8")
  # 12 output features do not split 8 ways: replicated, or an error when strict.
  assert sh.to_spec(("embed", "heads"), (16, 12), mesh, "tp") == P(None, None)
  assert sh.to_spec(("embed", "heads"), (16, 24), mesh, "tp") == P(None, "model")
  with pytest.raises(ValueError, match="not divisible by mesh axis 'model'"):
    sh.to_spec(("embed", "heads"), (16, 12), mesh, "tp", strict=True, where="q.kernel")
  with pytest.raises(ValueError, match="preset must be one of"):
    sh.to_spec(("embed",), (16,), mesh, "megatron")
  with pytest.raises(ValueError, match="model_type"):
    sh.state_shardings({}, mesh, model_type="bert")
  assert sh.model_type_of(LlamaForCausalLM(LLAMA, rngs=nnx.Rngs(0))) == "llama"


def test_shard_model_places_llama_parameters(llama):
  model = compose.with_adapter(llama, _random_adapter(llama, ("q_proj",), 2, 0))
  mesh = sh.make_mesh("data=2,model=4")
  before = {sh._dotted(p): _np(x) for p, x in jax.tree_util.tree_flatten_with_path(
      nnx.state(model))[0]}
  sh.shard_model(model, mesh, "fsdp_tp")
  layer = model.model.layers[0]
  assert layer.self_attn.q_proj.kernel[...].sharding.spec == P("data", "model")
  assert layer.self_attn.q_proj.lora_b[...].sharding.spec == P(None, "model")
  assert layer.mlp.down_proj.kernel[...].sharding.spec == P("model", "data")
  assert model.model.embed_tokens.embedding[...].sharding.spec == P("model", "data")
  assert model.lm_head.kernel[...].sharding.spec == P("data", "model")
  after = {sh._dotted(p): _np(x) for p, x in jax.tree_util.tree_flatten_with_path(
      nnx.state(model))[0]}
  assert before.keys() == after.keys()
  for key in before:
    np.testing.assert_array_equal(before[key], after[key])


# --- The stacked library ----------------------------------------------------------------------

def _library(model, targets, ranks, kinds=None, seed=0):
  kinds = kinds or ["lora"] * len(ranks)
  return [_random_adapter(model, targets, r, seed + i, kind)
          for i, (r, kind) in enumerate(zip(ranks, kinds))]


def test_stack_adapters_is_exact_and_pads(vit):
  adapters = _library(vit, ("query", "fc2"), [2, 3, 1], ["lora", "svd", "lora"])
  stack = sh.stack_adapters(adapters, multiple_of=4)
  for path, leaf in to_flat(stack).items():
    assert isinstance(leaf, LoRA)                 # mixed kinds: e folded into b
    assert leaf.a.shape[:1] == (4,) and leaf.a.shape[-1] == 3
    for i, adapter in enumerate(adapters):
      np.testing.assert_allclose(_np(leaf.a[i]) @ _np(leaf.b[i]), _delta64(to_flat(adapter)[path]),
                                 rtol=1e-6, atol=1e-7)
    assert not np.any(_np(leaf.a[3])) and not np.any(_np(leaf.b[3]))   # the zero pad
  svd = sh.stack_adapters(_library(vit, ("query",), [2, 2], ["svd", "svd"]))
  assert all(isinstance(x, SVDLoRA) for x in jax.tree.leaves(svd, is_leaf=is_lora))
  with pytest.raises(ValueError, match="differ in structure"):
    sh.stack_adapters([adapters[0], _random_adapter(vit, ("query",), 2, 9)])


def test_place_library_shards_the_library_axis(vit):
  mesh = sh.make_mesh("data=4,model=2")
  stack = sh.stack_adapters(_library(vit, ("query", "output"), [2, 2, 2, 2]))
  placed = sh.place_library(stack, mesh, "data", model_type="vit")
  q = to_flat(placed)["vit.layers.0.attention.query"]
  o = to_flat(placed)["vit.layers.0.attention.output"]
  assert (q.a.sharding.spec, q.b.sharding.spec) == (P("data", None, None), P("data", None, "model"))
  assert (o.a.sharding.spec, o.b.sharding.spec) == (P("data", "model", None), P("data", None, None))
  assert q.a.addressable_shards[0].data.shape == (1, 32, 2)   # one adapter per data shard
  with pytest.raises(ValueError, match="multiple_of=4"):
    sh.place_library(sh.stack_adapters(_library(vit, ("query",), [2, 2, 2])), mesh)


# --- SAM: rules and a sharded image-encoder forward -------------------------------------------

def _tiny_sam():
  from models.sam import SamConfig, SamModel
  from models.sam_decoder import SamMaskDecoderConfig, SamPromptEncoderConfig
  from models.sam_encoder import SamVisionConfig
  vision = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8, mlp_dim=64,
                           window_size=2, global_attn_indexes=(1,), num_pos_feats=8)
  config = SamConfig(vision,
                     SamPromptEncoderConfig(hidden_size=16, image_size=32, patch_size=8,
                                            mask_input_channels=4),
                     SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=1,
                                          num_attention_heads=2, iou_head_hidden_dim=16))
  return SamModel(config, rngs=nnx.Rngs(2))


def test_sam_rules():
  abstract = nnx.eval_shape(_tiny_sam)
  model = compose.with_adapter(abstract, _random_adapter(abstract, ("qkv",), 2, 3))
  mesh = sh.make_mesh("data=2,model=4")
  specs = {sh._dotted(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(
      sh.state_shardings(nnx.state(model), mesh, model_type="sam", preset="fsdp_tp"))[0]}
  layer = "vision_encoder.layers.0"
  assert specs[f"{layer}.attn.qkv.kernel"] == P("data", "model")
  assert specs[f"{layer}.attn.qkv.bias"] == P("model")
  assert specs[f"{layer}.attn.qkv.lora_a"] == P("data", None)
  assert specs[f"{layer}.attn.qkv.lora_b"] == P(None, "model")
  assert specs[f"{layer}.attn.proj.kernel"] == P("model", "data")
  assert specs[f"{layer}.mlp.lin1.kernel"] == P("data", "model")
  assert specs[f"{layer}.attn.rel_pos_h"] == P(None, None)
  assert specs["vision_encoder.patch_embed.kernel"] == P(None, None, None, "data")
  assert specs["mask_decoder.layers.0.self_attn.out_proj.kernel"] == P("model", "data")
  assert specs["mask_decoder.iou_prediction_head.proj_in.kernel"] == P(None, None)
  assert sh.model_type_of(abstract) == "sam"


@pytest.mark.slow
def test_sam_sharded_encoder_forward_with_adapter():
  sam = _tiny_sam()
  mesh = sh.make_mesh("data=2,model=4")
  model = compose.with_adapter(sam, _random_adapter(sam, ("qkv",), 2, 3, scale=0.3))
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 32, 32, 3)), jnp.float32)
  forward, state = sh.sharded_forward(model, mesh, preset="fsdp_tp",
                                      fn=lambda m, px: m.image_embeddings(px))
  out = forward(state, x)
  graphdef, single = nnx.split(model)
  ref = jax.jit(lambda st, px: nnx.merge(graphdef, st).image_embeddings(px))(single, x)
  _assert_close(out, ref)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4)

# --- Sharded composition ----------------------------------------------------------------------

WEIGHTS = jnp.asarray([0.6, -0.3, 0.5, 0.2], jnp.float32)


def test_tsqr_on_sharded_rows():
  mesh = sh.make_mesh("data=4,model=2")
  x = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=(32, 6)), jnp.float32),
                     NamedSharding(mesh, P(("data", "model"), None)))
  q, r = sh.tsqr(x, mesh)
  assert q.sharding.spec == P(("data", "model"), None)
  np.testing.assert_allclose(_np(q) @ _np(r), _np(x), atol=1e-5)
  np.testing.assert_allclose(_np(q).T @ _np(q), np.eye(6), atol=1e-5)
  # R equals numpy's up to the signs of its rows (QR is unique up to them).
  r_np = np.linalg.qr(_np(x))[1]
  np.testing.assert_allclose(np.abs(_np(r)), np.abs(r_np), atol=1e-5)


def test_sharded_combine_equals_single_device_concat(vit):
  mesh = sh.make_mesh("data=4,model=2")
  adapters = _library(vit, VIT_TARGETS, [2, 2, 2, 2])
  placed = sh.place_library(sh.stack_adapters(adapters), mesh, "data", model_type="vit")
  wanted = sh.adapter_shardings(compose.combine(adapters, WEIGHTS), mesh, model_type="vit")
  out = sh.sharded_combine(placed, WEIGHTS, mesh, model_type="vit")
  _assert_shardings(out, wanted)
  single = compose.combine(adapters, WEIGHTS)
  jax.tree.map(_assert_close, out, single)          # same layout: factor for factor
  for path, leaf in to_flat(out).items():             # and the float64 dense oracle
    dense = sum(float(w) * _delta64(to_flat(a)[path]) for w, a in zip(WEIGHTS, adapters))
    _assert_close(_delta64(leaf), dense)


def test_sharded_combine_padded_library_over_eight_devices(vit):
  mesh = sh.make_mesh("data=8")
  adapters = _library(vit, VIT_TARGETS, [2, 2, 2, 2])
  placed = sh.place_library(sh.stack_adapters(adapters, multiple_of=8), mesh, "data")
  weights = jnp.concatenate([WEIGHTS, jnp.zeros(4, jnp.float32)])
  out = sh.sharded_combine(placed, weights, mesh, out_sharding=P())
  _assert_shardings(out, jax.tree.map(lambda _: sh.replicated(mesh), out))
  for path, leaf in to_flat(out).items():             # and the float64 dense oracle
    dense = sum(float(w) * _delta64(to_flat(a)[path]) for w, a in zip(WEIGHTS, adapters))
    _assert_close(_delta64(leaf), dense)


def test_sharded_combine_mixed_ranks_and_kinds_to_one_sharding(vit):
  mesh = sh.make_mesh("data=4,model=2")
  adapters = _library(vit, ("query", "fc2"), [1, 3, 2, 2], ["lora", "svd", "lora", "svd"])
  placed = sh.place_library(sh.stack_adapters(adapters), mesh, "data")
  target = NamedSharding(mesh, P(None, "model"))
  out = sh.sharded_combine(placed, WEIGHTS, mesh, out_sharding=target)
  _assert_shardings(out, jax.tree.map(lambda _: target, out))
  single = compose.combine(adapters, WEIGHTS)
  for path, leaf in to_flat(out).items():
    _assert_close(_delta64(leaf), _delta64(to_flat(single)[path]))


def test_sharded_combine_all_svd_keeps_svd_form(vit):
  mesh = sh.make_mesh("data=4,model=2")
  adapters = _library(vit, ("value",), [2, 2, 2, 2], ["svd"] * 4)
  placed = sh.place_library(sh.stack_adapters(adapters), mesh, "data", model_type="vit")
  out = sh.sharded_combine(placed, WEIGHTS, mesh)
  single = compose.combine(adapters, WEIGHTS)
  assert all(isinstance(x, SVDLoRA) for x in jax.tree.leaves(out, is_leaf=is_lora))
  jax.tree.map(_assert_close, out, single)
  _assert_shardings(out, jax.tree.map(lambda _: sh.replicated(mesh), out))


def _top_svd(dense, r):
  u, s, vt = np.linalg.svd(dense)
  return (u[:, :r] * s[:r]) @ vt[:r], s[:r]


@pytest.mark.parametrize("rank, energy", [(3, None), (4, 0.8), (None, 0.8)])
def test_sharded_combine_truncated_equals_single_device(vit, rank, energy):
  mesh = sh.make_mesh("data=4,model=2")
  adapters = _library(vit, ("query", "output", "fc1"), [2, 3, 2, 1], seed=5)
  placed = sh.place_library(sh.stack_adapters(adapters), mesh, "data", model_type="vit")
  out = sh.sharded_combine(placed, WEIGHTS, mesh, rank=rank, energy=energy, model_type="vit")
  single = compose.combine(adapters, WEIGHTS, rank=rank, energy=energy)
  _assert_shardings(out, sh.adapter_shardings(single, mesh, model_type="vit"))
  for path, leaf in to_flat(out).items():
    ref = to_flat(single)[path]
    assert isinstance(leaf, SVDLoRA) and leaf.rank == ref.rank
    _assert_close(leaf.e, ref.e)
    _assert_close(_delta64(leaf), _delta64(ref))
    if energy is None:                      # the dense float64 Eckart–Young oracle
      dense = sum(float(w) * _delta64(to_flat(a)[path]) for w, a in zip(WEIGHTS, adapters))
      best, s = _top_svd(dense, rank)
      _assert_close(leaf.e, s, 1e-5)
      _assert_close(_delta64(leaf), best, 1e-5)


def test_sharded_combine_rejects_bad_input(vit):
  mesh = sh.make_mesh("data=4,model=2")
  stack = sh.stack_adapters(_library(vit, ("query",), [2, 2, 2, 2]))
  with pytest.raises(ValueError, match="place_library"):
    sh.sharded_combine(stack, WEIGHTS, mesh)
  placed = sh.place_library(stack, mesh)
  with pytest.raises(ValueError, match=r"weights must have shape \(4,\)"):
    sh.sharded_combine(placed, WEIGHTS[:3], mesh)
  with pytest.raises(ValueError, match="finite"):
    sh.sharded_combine(placed, WEIGHTS.at[0].set(jnp.nan), mesh)
  with pytest.raises(ValueError, match="rank"):
    sh.sharded_combine(placed, WEIGHTS, mesh, rank=0)


# --- Sharded forward with a composed, unmerged adapter ----------------------------------------

@pytest.mark.parametrize("preset", ["tp", "fsdp_tp"])
def test_sharded_vit_forward_with_composed_adapter(vit, preset):
  mesh = sh.make_mesh("data=2,model=4")
  adapters = _library(vit, VIT_TARGETS, [2, 2, 2, 2], seed=11)
  placed = sh.place_library(sh.stack_adapters(adapters), mesh, "data", model_type="vit")
  composed = sh.sharded_combine(placed, WEIGHTS, mesh, model_type="vit", preset=preset)
  model = compose.with_adapter(vit, composed)
  forward, state = sh.sharded_forward(model, mesh, preset=preset)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8, 8, 3)), jnp.float32)
  out = forward(state, x)
  # Oracle: the single-device model with the single-device composition.
  single = compose.with_adapter(vit, compose.combine(adapters, WEIGHTS))(x)
  _assert_close(out.logits, single.logits)
  _assert_close(out.last_hidden_state, single.last_hidden_state)
  assert out.logits.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
  q = state["vit"]["layers"][0]["attention"]["query"]
  assert q["kernel"][...].sharding.spec == (P(None, "model") if preset == "tp"
                                            else P("data", "model"))
  assert q["lora_b"][...].sharding.spec == P(None, "model")


def test_sharded_llama_forward_with_composed_adapter(llama):
  mesh = sh.make_mesh("data=2,model=4")
  adapters = _library(llama, LLAMA_TARGETS, [2, 2, 2, 2], seed=21)
  placed = sh.place_library(sh.stack_adapters(adapters), mesh, "data", model_type="llama")
  composed = sh.sharded_combine(placed, WEIGHTS, mesh, rank=4, model_type="llama")
  model = compose.with_adapter(llama, composed)
  forward, state = sh.sharded_forward(model, mesh, preset="tp")
  ids = jnp.asarray(np.random.default_rng(4).integers(0, 64, size=(4, 6)), jnp.int32)
  out = forward(state, ids)
  single = compose.with_adapter(llama, compose.combine(adapters, WEIGHTS, rank=4))(ids)
  _assert_close(out.logits, single.logits)
  assert out.logits.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 3)
  assert state["model"]["layers"][1]["mlp"]["down_proj"]["lora_a"][...].sharding.spec == \
      P("model", None)


# --- orbax: save sharded, restore onto a different mesh ---------------------------------------

def test_adapter_checkpoint_restores_onto_another_mesh(vit, tmp_path):
  mesh_a, mesh_b = sh.make_mesh("data=2,model=4"), sh.make_mesh("data=4,model=2")
  adapter = _random_adapter(vit, VIT_TARGETS, 4, 7)
  saved = jax.device_put(adapter, sh.adapter_shardings(adapter, mesh_a, model_type="vit"))
  path = distributed.save_checkpoint(tmp_path / "adapter", saved)
  with pytest.raises(FileExistsError):
    distributed.save_checkpoint(tmp_path / "adapter", saved)
  wanted = sh.adapter_shardings(adapter, mesh_b, model_type="vit", preset="fsdp_tp")
  restored = distributed.restore_checkpoint(path, adapter, wanted)
  _assert_shardings(restored, wanted)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               restored, adapter)


def test_model_checkpoint_restores_onto_another_mesh(vit, tmp_path):
  mesh_a, mesh_b = sh.make_mesh("data=2,model=4"), sh.make_mesh("model=8")
  model = nnx.merge(*nnx.split(vit))
  sh.shard_model(model, mesh_a, "fsdp_tp")
  path = distributed.save_checkpoint(tmp_path / "model", nnx.state(model))
  abstract = nnx.state(nnx.eval_shape(lambda: ViTForImageClassification(VIT, rngs=nnx.Rngs(0))))
  wanted = sh.state_shardings(abstract, mesh_b, model_type="vit", preset="tp")
  restored = distributed.restore_checkpoint(path, abstract, wanted)
  _assert_shardings(restored, wanted)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               restored, nnx.state(vit))
  assert restored["vit"]["layers"][0]["mlp"]["fc1"]["kernel"][...].sharding.spec == \
      P(None, "model")


# --- Multi-host entry -------------------------------------------------------------------------

class _Recorder:
  def __init__(self):
    self.calls = []

  def __call__(self, **kwargs):
    self.calls.append(kwargs)


def _args(*argv):
  parser = argparse.ArgumentParser()
  distributed.add_mesh_args(parser)
  return parser.parse_args(list(argv))


def test_distributed_flags_and_environment():
  rec = _Recorder()
  args = _args("--coordinator", "10.0.0.1:1234", "--num-processes", "4", "--process-id", "2",
               "--mesh", "data=2,model=4")
  assert args.mesh == "data=2,model=4"
  assert distributed.maybe_initialize_distributed(args, environ={}, initialize=rec)
  assert rec.calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                            process_id=2)]
  env = {"JAX_COORDINATOR_ADDRESS": "host:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed.maybe_initialize_distributed(_args(), environ=env, initialize=rec)
  assert rec.calls[-1] == dict(coordinator_address="host:99", num_processes=2, process_id=1)
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0",
           "SLURM_NTASKS": "2"}
  assert distributed.maybe_initialize_distributed(_args(), environ=slurm, initialize=rec)
  assert rec.calls[-1] == {}                      # jax's own cluster detection fills it in
  tpu = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}
  assert distributed.maybe_initialize_distributed(_args(), environ=tpu, initialize=rec)
  assert distributed.maybe_initialize_distributed(_args("--distributed"), environ={}, initialize=rec)
  n = len(rec.calls)
  # Single process: nothing asked, nothing detected (one SLURM task, one TPU host).
  assert not distributed.maybe_initialize_distributed(_args(), environ={}, initialize=rec)
  assert not distributed.maybe_initialize_distributed(
      _args(), environ={**slurm, "SLURM_NTASKS": "1"}, initialize=rec)
  assert not distributed.maybe_initialize_distributed(
      _args(), environ={"TPU_WORKER_HOSTNAMES": "w0"}, initialize=rec)
  assert len(rec.calls) == n
  assert distributed.is_primary()


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "nohost"], "HOST:PORT"),
    (["--coordinator", "h:1"], "needs --num-processes"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], r"in \[0, 2\)"),
    (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"], ">= 1"),
    (["--num-processes", "2", "--process-id", "0"], "need --coordinator"),
])
def test_distributed_rejects_bad_flags(argv, message):
  rec = _Recorder()
  with pytest.raises(ValueError, match=message):
    distributed.maybe_initialize_distributed(_args(*argv), environ={}, initialize=rec)
  assert rec.calls == []


# --- The solver with its batch axis sharded ---------------------------------------------------

def _solver_problem(dtype, shared, seed=8):
  rng = np.random.default_rng(seed)
  targets = jnp.asarray(rng.normal(size=(8, 9)), dtype)
  refs = jnp.asarray(rng.normal(size=(5, 9) if shared else (8, 5, 9)), dtype)
  return refs, targets


@pytest.mark.parametrize("shared, constraint, lam", [(True, "affine", 0.5),
                                                     (False, "simplex", 0.0)])
def test_sharded_solve_equals_single_device_float32(shared, constraint, lam):
  """Independent per-device loops: exactly the single-device solve of each device's block."""
  mesh = sh.make_mesh("data=4,model=2")
  refs, targets = _solver_problem(jnp.float32, shared)
  out = sh.sharded_solve(refs, targets, lam, mesh, constraint=constraint, independent=True)
  blocks = [sparse_simplex.solve(refs if shared else refs[i:i + 2], targets[i:i + 2], lam,
                                 constraint=constraint) for i in range(0, 8, 2)]
  single = jax.tree.map(lambda *xs: jnp.concatenate(xs), *blocks)
  jax.tree.map(_assert_close, out, single)
  for x in jax.tree.leaves(out):
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), x.ndim)
  assert np.all(np.asarray(out.status) == sparse_simplex.CONVERGED)


@pytest.mark.slow
def test_sharded_solve_equals_whole_batch_solve():
  """Against the single-device solve of the whole batch. Grouping the batch differently
  changes the solver's batch-wide polish/stop decisions, so in float32 the two agree to
  the solver's tolerance (below); in float64 they agree to rounding."""
  mesh = sh.make_mesh("data=4,model=2")
  for dtype in (jnp.float64, jnp.float32):
    with jax.enable_x64(dtype == jnp.float64):
      refs, targets = _solver_problem(dtype, shared=True, seed=9)
      out = sh.sharded_solve(refs, targets, 0.5, mesh, independent=False)
      single = sparse_simplex.solve(refs, targets, 0.5)
      assert out.weights.dtype == dtype
      assert out.weights.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
      tol = 1e-9 if dtype == jnp.float64 else 1e-6
      _assert_close(out.weights, single.weights, tol)
      _assert_close(out.objective, single.objective, tol)


def test_sharded_solve_rejects_bad_batches():
  mesh = sh.make_mesh("data=4,model=2")
  refs, targets = _solver_problem(jnp.float32, shared=True)
  with pytest.raises(ValueError, match="do not split over mesh axis 'data'"):
    sh.sharded_solve(refs, targets[:6], 0.0, mesh)
  with pytest.raises(ValueError, match="refs must be"):
    sh.sharded_solve(refs[:, :4], targets, 0.0, mesh)
  with pytest.raises(ValueError, match="not a mesh axis"):
    sh.sharded_solve(refs, targets, 0.0, mesh, axis="batch")


# --- Two real processes (jax.distributed over localhost, gloo collectives) --------------------

_WORKER = r'''
import argparse, json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from rpe_jax import distributed
parser = argparse.ArgumentParser()
distributed.add_mesh_args(parser)
parser.add_argument("--out")
args = parser.parse_args()
joined = distributed.maybe_initialize_distributed(args)
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from models.lora import LoRA
from rpe_jax import compose, sharding as sh
mesh = distributed.mesh_from_args(args)
rng = np.random.default_rng(0)
ads = [{"q": LoRA(jnp.asarray(rng.normal(size=(16, 2)), jnp.float32),
                  jnp.asarray(rng.normal(size=(2, 8)), jnp.float32))} for _ in range(8)]
w = jnp.asarray(rng.normal(size=8), jnp.float32)
placed = sh.place_library(sh.stack_adapters(ads), mesh, "data")
out = sh.sharded_combine(placed, w, mesh, rank=3)["q"]
ref = compose.combine(ads, w, rank=3)["q"]
delta = lambda l: (np.asarray(l.a, np.float64) * np.asarray(l.e)) @ np.asarray(l.b, np.float64)
err = float(np.abs(delta(out) - delta(ref)).max() / np.abs(delta(ref)).max())
path = distributed.save_checkpoint(os.path.join(args.out, "ckpt"), placed)
other = sh.make_mesh("data=2,model=4")
restored = distributed.restore_checkpoint(path, placed, sh.library_shardings(placed, other))
gathered = multihost_utils.process_allgather(restored["q"].a, tiled=True)
same = bool(np.array_equal(np.asarray(gathered), np.asarray(sh.stack_adapters(ads)["q"].a)))
print("RESULT " + json.dumps(dict(joined=joined, processes=jax.process_count(),
      devices=jax.device_count(), local=jax.local_device_count(), err=err, same=same,
      primary=distributed.is_primary(), spec=str(restored["q"].a.sharding.spec))))
'''


@pytest.mark.slow
def test_two_processes_compose_and_checkpoint(tmp_path):
  """The real jax.distributed path: 2 processes × 4 CPU devices = one 8-device mesh."""
  import json
  import os
  import pathlib
  import socket
  import subprocess
  import sys
  worker = tmp_path / "worker.py"
  worker.write_text(_WORKER)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  root = str(pathlib.Path(__file__).resolve().parents[1])
  env = {**os.environ, "PYTHONPATH": root}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, str(worker), "--coordinator", f"localhost:{port}", "--num-processes",
       "2", "--process-id", str(i), "--mesh", "data=8", "--out", str(tmp_path)],
      env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  results = []
  for p, text in zip(procs, outputs):
    assert p.returncode == 0, text[-3000:]
    results.append(json.loads(next(l for l in text.splitlines() if l.startswith("RESULT "))[7:]))
  assert [r["primary"] for r in results] == [True, False]
  for r in results:
    assert r["joined"] and r["processes"] == 2 and r["devices"] == 8 and r["local"] == 4
    assert r["err"] < TOL and r["same"]
    assert r["spec"] == str(P("data"))


# --- The CLI: python -m rpe_jax.compose --mesh ------------------------------------------------

def _cli_library(tmp_path):
  """A 5-adapter library and a target prototype; returns the common CLI arguments."""
  from rpe_jax.library import Library
  rng = np.random.default_rng(0)
  lib = Library.create(tmp_path / "lib")
  for i in range(5):
    adapter = {p: LoRA(rng.normal(size=(8, 2)).astype(np.float32),
                       rng.normal(size=(2, 4)).astype(np.float32)) for p in ("l0.q", "l1.q")}
    lib.add(f"site{i}", adapter, (rng.normal(size=6) + 3).astype(np.float32),
            base_model="toy", encoder="toy-enc", n_samples=10)
  lib.close()
  np.save(tmp_path / "z.npy", (rng.normal(size=6) + 3).astype(np.float32))
  return ["--library", str(tmp_path / "lib"), "--prototype", str(tmp_path / "z.npy"),
          "--k", "3", "--strategy", "lin", "--rank", "3"]


def _assert_same_adapter_file(got, want):
  from rpe_jax import adapter_file
  got, _ = adapter_file.load_adapter(got / "composed" / "adapter.safetensors")
  want, _ = adapter_file.load_adapter(want / "composed" / "adapter.safetensors")
  assert sorted(to_flat(got)) == sorted(to_flat(want))
  for path, leaf in to_flat(got).items():
    _assert_close(_delta64(leaf), _delta64(to_flat(want)[path]))
    _assert_close(leaf.e, to_flat(want)[path].e)


def test_compose_cli_on_a_mesh_equals_single_device(tmp_path, capsys):
  from rpe_jax.pipeline import main
  common = _cli_library(tmp_path)
  assert main(common + ["--out", str(tmp_path / "one")]) == 0
  assert main(common + ["--out", str(tmp_path / "mesh"), "--mesh", "data=4,model=2"]) == 0
  _assert_same_adapter_file(tmp_path / "mesh", tmp_path / "one")
  capsys.readouterr()
  assert main(common + ["--mesh", "data=3"]) == 2
  assert "does not divide" in capsys.readouterr().err


@pytest.mark.slow
def test_compose_cli_across_two_processes(tmp_path, capsys):
  """`python -m rpe_jax.compose --mesh data=8 --coordinator ...` on 2 processes × 4 CPU
  devices: process 0 writes the single-device result, process 1 writes nothing."""
  import os
  import pathlib
  import socket
  import subprocess
  import sys
  from rpe_jax.pipeline import main
  common = _cli_library(tmp_path)
  assert main(common + ["--out", str(tmp_path / "one")]) == 0
  capsys.readouterr()
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  root = str(pathlib.Path(__file__).resolve().parents[1])
  env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "rpe_jax.compose", *common, "--mesh", "data=8", "--coordinator",
       f"localhost:{port}", "--num-processes", "2", "--process-id", str(i),
       "--out", str(tmp_path / f"out{i}"), "--json"],
      env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, text in zip(procs, outputs):
    assert p.returncode == 0, text[-3000:]
  _assert_same_adapter_file(tmp_path / "out0", tmp_path / "one")
  assert not (tmp_path / "out1").exists()

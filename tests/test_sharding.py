"""Sharding on the 8 fake CPU devices of conftest: meshes, the partition-spec rules each model
config carries, placement of models and stacked adapter libraries, sharded forwards of ViT,
Llama and SAM carrying a composed adapter, orbax restore onto another mesh, and the
multi-host entry flags. (The sharded composition and solve: tests/test_sharded_ops.py.)

Oracles: single-device results (compose.combine, the unsharded model), dense float64 numpy,
and hand-written partition specs.
"""

import argparse
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from models.llama import LlamaConfig, LlamaForCausalLM
from models.lora import LoRA, Linear, SVDLoRA, is_lora, to_flat
from models.sam import SamConfig
from models.vit import ViTConfig, ViTForImageClassification
from oracles import dense
from rpe_jax import compose
from rpe_jax.parallel import distributed
from rpe_jax.parallel import sharded_ops as ops
from rpe_jax.parallel import sharding as sh
from sharding_cases import (LLAMA, LLAMA_TARGETS, VIT, VIT_TARGETS, WEIGHTS, assert_close,
                            assert_shardings, library, np64, random_adapter)


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


# --- Tiny models ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit():
  return ViTForImageClassification(VIT, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def llama():
  return LlamaForCausalLM(LLAMA, rngs=nnx.Rngs(1))


# --- Partition-spec rules ---------------------------------------------------------------------

def test_vit_rules_tensor_parallel_and_fsdp(vit):
  model = compose.with_adapter(vit, random_adapter(vit, ("query", "output"), 2, 0))
  mesh = sh.make_mesh("data=2,model=4")
  flat = lambda preset: {sh._dotted(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(
      sh.state_shardings(nnx.state(model), mesh, model_type=ViTConfig, preset=preset))[0]}
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
  with pytest.raises(ValueError, match="model_type must be a model config .* the string 'vit'"):
    sh.state_shardings({}, mesh, model_type="vit")
  assert sh.model_type_of(LlamaForCausalLM(LLAMA, rngs=nnx.Rngs(0))) == "llama"


def test_shard_model_places_llama_parameters(llama):
  model = compose.with_adapter(llama, random_adapter(llama, ("q_proj",), 2, 0))
  mesh = sh.make_mesh("data=2,model=4")
  before = {sh._dotted(p): np64(x) for p, x in jax.tree_util.tree_flatten_with_path(
      nnx.state(model))[0]}
  sh.shard_model(model, mesh, "fsdp_tp")
  layer = model.model.layers[0]
  assert layer.self_attn.q_proj.kernel[...].sharding.spec == P("data", "model")
  assert layer.self_attn.q_proj.lora_b[...].sharding.spec == P(None, "model")
  assert layer.mlp.down_proj.kernel[...].sharding.spec == P("model", "data")
  assert model.model.embed_tokens.embedding[...].sharding.spec == P("model", "data")
  assert model.lm_head.kernel[...].sharding.spec == P("data", "model")
  after = {sh._dotted(p): np64(x) for p, x in jax.tree_util.tree_flatten_with_path(
      nnx.state(model))[0]}
  assert before.keys() == after.keys()
  for key in before:
    np.testing.assert_array_equal(before[key], after[key])


# --- The rules live on the model configs ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _ToyConfig:
  """A new model's config: a ClassVar ``sharding_rules`` is all rpe_jax.parallel.sharding needs."""
  sharding_rules: ClassVar[tuple] = ((r"up\.kernel$", ("embed", "mlp")),
                                     (r"down\.kernel$", ("mlp", "embed")))
  width: int = 8


@dataclasses.dataclass(frozen=True)
class _PlainConfig:
  width: int = 8


@dataclasses.dataclass(frozen=True)
class _BadConfig:
  sharding_rules: ClassVar[tuple] = (r"up\.kernel$",)    # a regex without its axes


class _Toy(nnx.Module):
  def __init__(self, config, *, rngs):
    self.config = config
    self.up = Linear(config.width, 4 * config.width, rngs=rngs)
    self.down = Linear(4 * config.width, config.width, rngs=rngs)
    self.head = Linear(config.width, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.down(jax.nn.relu(self.up(x))))


def test_a_new_model_is_sharded_by_its_config_rules():
  mesh = sh.make_mesh("data=2,model=4")
  toy = _Toy(_ToyConfig(), rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.float32)
  ref = np64(toy(x))
  forward, state = sh.sharded_forward(toy, mesh, preset="fsdp_tp")   # no model type given
  out = forward(state, x)
  assert_close(out, ref)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
  sh.shard_model(toy, mesh, "fsdp_tp")
  # Hand-written specs for the toy's rules under fsdp_tp (embed → data, mlp → model).
  assert toy.up.kernel[...].sharding.spec == P("data", "model")
  assert toy.up.bias[...].sharding.spec == P("model")
  assert toy.down.kernel[...].sharding.spec == P("model", "data")
  assert toy.down.bias[...].sharding.spec == P("data")
  assert toy.head.kernel[...].sharding.spec == P(None, None)     # no rule: replicated
  # The config (instance or class) stands for the model where only a state is at hand.
  for rules in (toy.config, _ToyConfig):
    specs = jax.tree.leaves(sh.state_shardings(nnx.state(toy), mesh, model_type=rules,
                                               preset="fsdp_tp"))
    assert [s.spec for s in specs] == [x.sharding.spec for x in jax.tree.leaves(nnx.state(toy))]


def test_shipped_rules_are_on_the_configs(vit, llama):
  from models.llama import LlamaConfig
  from models.sam import SamConfig
  from models.vit import ViTConfig
  for name, config, model in (("vit", ViTConfig, vit), ("llama", LlamaConfig, llama)):
    assert config.model_type == name and sh.model_type_of(model) == name
    assert sh.partition_rules(config) is config.sharding_rules
    assert sh.partition_rules(model) is config.sharding_rules
    assert sh.partition_rules(model.config) is config.sharding_rules
  assert sh.partition_rules(SamConfig) is SamConfig.sharding_rules
  # An adapter sharded by the config class, the config or the model: the same specs.
  adapter = random_adapter(vit, VIT_TARGETS, 2, 0)
  mesh = sh.make_mesh("data=2,model=4")
  by_name = sh.adapter_shardings(adapter, mesh, model_type=ViTConfig, preset="fsdp_tp")
  for spec in (vit.config, vit):
    other = sh.adapter_shardings(adapter, mesh, model_type=spec, preset="fsdp_tp")
    assert jax.tree.leaves(other) == jax.tree.leaves(by_name)


def test_a_model_without_rules_is_refused_by_name():
  mesh = sh.make_mesh("data=2,model=4")
  plain = _Toy(_PlainConfig(), rngs=nnx.Rngs(0))
  for call in (lambda: sh.shard_model(plain, mesh), lambda: sh.sharded_forward(plain, mesh),
               lambda: sh.model_type_of(plain),
               lambda: sh.state_shardings(nnx.state(plain), mesh, model_type=plain)):
    with pytest.raises(ValueError, match=r"no sharding rules for a _Toy: its config "
                                         r"\(_PlainConfig\)"):
      call()
  with pytest.raises(ValueError, match="has no model_type"):
    sh.model_type_of(_Toy(_ToyConfig(), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="model_type must be a model config .* got a _PlainConfig"):
    sh.adapter_shardings({}, mesh, model_type=_PlainConfig())
  with pytest.raises(ValueError, match="_BadConfig.sharding_rules must be a sequence"):
    sh.partition_rules(_BadConfig())
  # An explicit model_type overrides the (missing) config rules.
  sh.shard_model(plain, mesh, "tp", model_type=_ToyConfig)
  assert plain.up.kernel[...].sharding.spec == P(None, "model")


# --- The stacked library ----------------------------------------------------------------------

def test_stack_adapters_is_exact_and_pads(vit):
  adapters = library(vit, ("query", "fc2"), [2, 3, 1], ["lora", "svd", "lora"])
  stack = sh.stack_adapters(adapters, multiple_of=4)
  for path, leaf in to_flat(stack).items():
    assert isinstance(leaf, LoRA)                 # mixed kinds: e folded into b
    assert leaf.a.shape[:1] == (4,) and leaf.a.shape[-1] == 3
    for i, adapter in enumerate(adapters):
      np.testing.assert_allclose(np64(leaf.a[i]) @ np64(leaf.b[i]), dense(to_flat(adapter)[path]),
                                 rtol=1e-6, atol=1e-7)
    assert not np.any(np64(leaf.a[3])) and not np.any(np64(leaf.b[3]))   # the zero pad
  svd = sh.stack_adapters(library(vit, ("query",), [2, 2], ["svd", "svd"]))
  assert all(isinstance(x, SVDLoRA) for x in jax.tree.leaves(svd, is_leaf=is_lora))
  with pytest.raises(ValueError, match="differ in structure"):
    sh.stack_adapters([adapters[0], random_adapter(vit, ("query",), 2, 9)])


def test_place_library_shards_the_library_axis(vit):
  mesh = sh.make_mesh("data=4,model=2")
  stack = sh.stack_adapters(library(vit, ("query", "output"), [2, 2, 2, 2]))
  placed = sh.place_library(stack, mesh, "data", model_type=ViTConfig)
  q = to_flat(placed)["vit.layers.0.attention.query"]
  o = to_flat(placed)["vit.layers.0.attention.output"]
  assert (q.a.sharding.spec, q.b.sharding.spec) == (P("data", None, None), P("data", None, "model"))
  assert (o.a.sharding.spec, o.b.sharding.spec) == (P("data", "model", None), P("data", None, None))
  assert q.a.addressable_shards[0].data.shape == (1, 32, 2)   # one adapter per data shard
  with pytest.raises(ValueError, match="multiple_of=4"):
    sh.place_library(sh.stack_adapters(library(vit, ("query",), [2, 2, 2])), mesh)


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
  model = compose.with_adapter(abstract, random_adapter(abstract, ("qkv",), 2, 3))
  mesh = sh.make_mesh("data=2,model=4")
  specs = {sh._dotted(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(
      sh.state_shardings(nnx.state(model), mesh, model_type=SamConfig, preset="fsdp_tp"))[0]}
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
  model = compose.with_adapter(sam, random_adapter(sam, ("qkv",), 2, 3, scale=0.3))
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 32, 32, 3)), jnp.float32)
  forward, state = sh.sharded_forward(model, mesh, preset="fsdp_tp",
                                      fn=lambda m, px: m.image_embeddings(px))
  out = forward(state, x)
  graphdef, single = nnx.split(model)
  ref = jax.jit(lambda st, px: nnx.merge(graphdef, st).image_embeddings(px))(single, x)
  assert_close(out, ref)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4)


# --- Sharded forward with a composed, unmerged adapter ----------------------------------------

@pytest.mark.parametrize("preset", ["tp", "fsdp_tp"])
def test_sharded_vit_forward_with_composed_adapter(vit, preset):
  mesh = sh.make_mesh("data=2,model=4")
  adapters = library(vit, VIT_TARGETS, [2, 2, 2, 2], seed=11)
  placed = sh.place_library(sh.stack_adapters(adapters), mesh, "data", model_type=ViTConfig)
  composed = ops.sharded_combine(placed, WEIGHTS, mesh, model_type=ViTConfig, preset=preset)
  model = compose.with_adapter(vit, composed)
  forward, state = sh.sharded_forward(model, mesh, preset=preset)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8, 8, 3)), jnp.float32)
  out = forward(state, x)
  # Oracle: the single-device model with the single-device composition.
  single = compose.with_adapter(vit, compose.combine(adapters, WEIGHTS))(x)
  assert_close(out.logits, single.logits)
  assert_close(out.last_hidden_state, single.last_hidden_state)
  assert out.logits.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
  q = state["vit"]["layers"][0]["attention"]["query"]
  assert q["kernel"][...].sharding.spec == (P(None, "model") if preset == "tp"
                                            else P("data", "model"))
  assert q["lora_b"][...].sharding.spec == P(None, "model")


def test_sharded_llama_forward_with_composed_adapter(llama):
  mesh = sh.make_mesh("data=2,model=4")
  adapters = library(llama, LLAMA_TARGETS, [2, 2, 2, 2], seed=21)
  placed = sh.place_library(sh.stack_adapters(adapters), mesh, "data", model_type=LlamaConfig)
  composed = ops.sharded_combine(placed, WEIGHTS, mesh, rank=4, model_type=LlamaConfig)
  model = compose.with_adapter(llama, composed)
  forward, state = sh.sharded_forward(model, mesh, preset="tp")
  ids = jnp.asarray(np.random.default_rng(4).integers(0, 64, size=(4, 6)), jnp.int32)
  out = forward(state, ids)
  single = compose.with_adapter(llama, compose.combine(adapters, WEIGHTS, rank=4))(ids)
  assert_close(out.logits, single.logits)
  assert out.logits.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 3)
  assert state["model"]["layers"][1]["mlp"]["down_proj"]["lora_a"][...].sharding.spec == \
      P("model", None)


# --- orbax: save sharded, restore onto a different mesh ---------------------------------------

def test_adapter_checkpoint_restores_onto_another_mesh(vit, tmp_path):
  mesh_a, mesh_b = sh.make_mesh("data=2,model=4"), sh.make_mesh("data=4,model=2")
  adapter = random_adapter(vit, VIT_TARGETS, 4, 7)
  saved = jax.device_put(adapter, sh.adapter_shardings(adapter, mesh_a, model_type=ViTConfig))
  path = distributed.save_checkpoint(tmp_path / "adapter", saved)
  with pytest.raises(FileExistsError):
    distributed.save_checkpoint(tmp_path / "adapter", saved)
  wanted = sh.adapter_shardings(adapter, mesh_b, model_type=ViTConfig, preset="fsdp_tp")
  restored = distributed.restore_checkpoint(path, adapter, wanted)
  assert_shardings(restored, wanted)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               restored, adapter)


def test_model_checkpoint_restores_onto_another_mesh(vit, tmp_path):
  mesh_a, mesh_b = sh.make_mesh("data=2,model=4"), sh.make_mesh("model=8")
  model = nnx.merge(*nnx.split(vit))
  sh.shard_model(model, mesh_a, "fsdp_tp")
  path = distributed.save_checkpoint(tmp_path / "model", nnx.state(model))
  abstract = nnx.state(nnx.eval_shape(lambda: ViTForImageClassification(VIT, rngs=nnx.Rngs(0))))
  wanted = sh.state_shardings(abstract, mesh_b, model_type=ViTConfig, preset="tp")
  restored = distributed.restore_checkpoint(path, abstract, wanted)
  assert_shardings(restored, wanted)
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

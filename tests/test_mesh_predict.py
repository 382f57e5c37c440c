"""Predictions on a device mesh (8 simulated CPU devices): the composed model's forward runs
data-parallel over ``data`` and tensor-parallel over ``model`` and predicts exactly what it
predicts on one device — for the dataset-level composition and per sample, for every task."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from models.lora import LoRA, adapted_layers, from_flat
from rpe_jax import pipeline
from rpe_jax.parallel.sharding import make_mesh
from rpe_jax.tasks import registry


def _random_adapter(model, targets, seed, rank=2):
  """Random non-zero factors on every adapted layer whose path matches ``targets``."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, layer in adapted_layers(model).items():
    if any(t in path for t in targets):
      flat[path] = LoRA(0.3 * rng.standard_normal((layer.in_features, rank), np.float32),
                        0.3 * rng.standard_normal((rank, layer.out_features), np.float32))
  return from_flat(flat)


def _vit():
  from models.vit import ViTForImageClassification
  from rpe_jax.tasks.classification import foundation_config
  config = dataclasses.replace(foundation_config(16), hidden_size=32, num_hidden_layers=2,
                               intermediate_size=64)
  return ViTForImageClassification(config, rngs=nnx.Rngs(0)), ("query", "value"), \
      "sites:digits/noisy:16"


def _sam():
  from models.sam import SamModel
  from rpe_jax.tasks.segmentation import base_config
  return SamModel(base_config(16), rngs=nnx.Rngs(0)), ("qkv", "q_proj", "v_proj"), \
      "sites:organs/noisy:16"


def _llama():
  from models import llama
  from rpe_jax.tasks import report
  texts = [t for m in report.MODALITIES for r in report.synthetic_reports(m, 20) for t in r]
  codec = report.train_tokenizer(texts + list(report.TEMPLATES), 300)
  config = llama.LlamaConfig(vocab_size=codec.vocab_size, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                             head_dim=8, max_position_embeddings=512, bos_token_id=codec.bos_id,
                             eos_token_id=(codec.eos_id,), pad_token_id=codec.pad_id)
  return (llama.LlamaForCausalLM(config, rngs=nnx.Rngs(0)), codec), ("q_proj", "v_proj"), \
      "reports:ct_chest"


@pytest.mark.slow
@pytest.mark.parametrize("make", [_vit, _sam, _llama], ids=["vit", "sam", "llama"])
def test_predictions_on_a_mesh_equal_one_device(make):
  model, targets, uri = make()
  codec = None
  if isinstance(model, tuple):
    model, codec = model
  tm = registry.task_model(model)._replace(codec=codec)
  task = registry.task_for_model(model)
  ds = task.subset(task.load(uri, "test"), np.arange(10))   # 10: not a multiple of 4
  adapters = [_random_adapter(model, targets, seed) for seed in (1, 2)]
  options = {"prompt": "box", "max_new_tokens": 6}
  mesh = make_mesh("data=4,model=2")

  # The placement: batches over data, the weights by the model's partition rules.
  placed = pipeline.on_mesh(tm, model, mesh)
  assert placed.place(np.zeros((8, 3), np.float32)).sharding.spec == P("data")
  specs = {str(v.value.sharding.spec) for v in jax.tree.leaves(
      nnx.state(placed.model), is_leaf=lambda x: isinstance(x, nnx.Variable))}
  assert any("model" in s for s in specs), specs

  from rpe_jax.compose import combine
  composed = combine(adapters, np.array([0.7, 0.3], np.float32))
  one, _ = pipeline.predict_targets(task, tm, [ds], [composed], **options)
  many, _ = pipeline.predict_targets(task, tm, [ds], [composed], mesh=mesh, **options)
  if codec is None:
    np.testing.assert_array_equal(np.asarray(many[0]), np.asarray(one[0]))
  else:
    assert many[0] == one[0]


@pytest.mark.slow
def test_per_sample_predictions_on_a_mesh_equal_one_device(tmp_path):
  from rpe_jax.library import Library
  model, targets, uri = _vit()
  tm = registry.task_model(model)
  task = registry.task_for_model(model)
  ds = task.subset(task.load(uri, "test"), np.arange(70))   # two batches of 64, one padded
  features = task.features(tm, ds)
  with Library.create(tmp_path / "lib") as lib:
    for i in range(3):
      # Prototypes near different inputs, so that inputs retrieve different adapters.
      lib.add(f"a{i}", _random_adapter(model, targets, seed=i), features[20 * i],
              base_model="vit", encoder="vit/cls", n_samples=1, pooling="cls")
  with Library.open(tmp_path / "lib", readonly=True) as lib:
    kw = dict(k=2, strategy="sparse", lam2=0.1, evaluate=True)
    one, _ = pipeline.predict_per_sample(lib, task, tm, ds, **kw)
    many, _ = pipeline.predict_per_sample(lib, task, tm, ds, mesh=make_mesh("data=4,model=2"),
                                          **kw)
  assert len(one.union) == 3 and one.stats["distinct_adapters_per_batch"][0] == 3
  np.testing.assert_array_equal(many.mixture, one.mixture)
  np.testing.assert_array_equal(many.predictions, one.predictions)
  # Each input ran its own composition: input n alone through with_adapter(combine(U, W[n]))
  # (in both batches, the second one padded).
  from rpe_jax.compose import combine, with_adapter
  from rpe_jax.tasks.classification import predict_labels
  with Library.open(tmp_path / "lib", readonly=True) as lib:
    adapters = [lib.load(n) for n in one.union]
  rows = np.arange(len(ds))
  alone = [predict_labels(with_adapter(model, combine(adapters, one.mixture[n])),
                          task.subset(ds, rows[n:n + 1]))[0] for n in rows]
  np.testing.assert_array_equal(one.predictions, alone)

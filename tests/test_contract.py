"""The task contract's dispatch: which task a model, a dataset URI or a name is."""

import pytest
from flax import nnx

from rpe_jax.tasks import contract, registry


@pytest.mark.parametrize("uri, task", [
    ("medmnist:pathmnist", "classification"), ("tfds:mnist", "classification"),
    ("folder:/x", "classification"), ("sites:digits/noisy", "classification"),
    ("tasks:digits/parity", "classification"), ("sites:organs/noisy:16", "segmentation"),
    ("masks:/a:/b", "segmentation"), ("tfds-masks:oxford_iiit_pet", "segmentation"),
    ("jsonl:r.jsonl", "report"), ("reports:ct_chest", "report")])
def test_a_uri_scheme_names_its_task(uri, task):
  assert contract.uri_task_name(uri) == task
  assert registry.task_of_uri(uri).name == task


@pytest.mark.parametrize("uri, message", [
    ("nothing", "has no scheme"), ("ftp:x", "unknown dataset URI scheme 'ftp'"),
    ("sites:faces/a", "unknown built-in family 'faces'")])
def test_a_bad_uri_is_refused_by_name(uri, message):
  with pytest.raises(ValueError, match=message):
    contract.uri_task_name(uri)


def test_the_models_config_picks_the_task():
  from models.llama import LlamaConfig, LlamaForCausalLM
  from models.sam import SamModel
  from models.vit import ViTConfig, ViTModel
  from rpe_jax.tasks.segmentation import base_config
  rngs = nnx.Rngs(0)
  vit = ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, image_size=8, patch_size=4), rngs=rngs)
  models = {"classification": vit, "segmentation": SamModel(base_config(16), rngs=rngs),
            "report": LlamaForCausalLM(LlamaConfig(), rngs=rngs)}
  for name, model in models.items():
    assert contract.model_task_name(model) == name
    assert registry.task_for_model(model).name == name
  assert registry.check_data_fits("reports:ct_chest", models["report"]).name == "report"
  with pytest.raises(ValueError, match="is a segmentation dataset, but the model "
                                       r"\(ViTModel\) is a classification model"):
    registry.check_data_fits("sites:organs/clean", vit)
  with pytest.raises(ValueError, match="belongs to no task"):
    contract.model_task_name(object())
  with pytest.raises(ValueError, match="unknown task 'foo'"):
    registry.task_named("foo")

"""Adapter training: held-out gain over the frozen model, resume, determinism, SVD-LoRA + head."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from models.lora import LoRA, SVDLoRA, adapted_layers, is_lora, orthogonality_penalty
from models.vit import ViTConfig
from models.preprocessing import Normalization
from rpe_jax.tasks import classification as train
from rpe_jax.tasks import images as data
from rpe_jax.library.adapter_file import load_adapter
from rpe_jax.compose import adapter_of

SIZE = 16
TINY = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, image_size=SIZE, patch_size=4, num_channels=1,
                 labels=tuple(str(i) for i in range(10)))


@pytest.fixture(scope="module")
def foundation():
  model, record = train.pretrain_foundation(("clean", "blur"), epochs=4, lr=3e-3,
                                            image_size=SIZE, model_config=TINY, seed=0)
  return model


@pytest.fixture(scope="module")
def rotated():
  return data.load_splits(f"sites:digits/rotated:{SIZE}")


def _accuracy(model, ds):
  """Oracle: one un-batched forward pass of the whole split, argmax in numpy."""
  x = Normalization.for_model(model)(ds.images)
  logits = np.asarray(model(x).logits)
  return float((logits.argmax(-1) == ds.labels).mean())


def _leaves(adapter):
  return jax.tree.leaves(adapter)


QUICK = train.TrainConfig(rank=4, epochs=3, lr=1e-2, batch_size=64)


def test_lora_gains_held_out_accuracy_over_the_frozen_model(foundation, rotated):
  config = QUICK._replace(epochs=6)
  result = train.train_adapter(foundation, rotated.train, rotated.val, config)
  before, after = _accuracy(foundation, rotated.test), _accuracy(result.model, rotated.test)
  assert after > before + 0.15, (before, after)
  # The returned model is the best epoch's: its val accuracy is the recorded best.
  assert _accuracy(result.model, rotated.val) == pytest.approx(result.best_val_accuracy)
  assert result.best_val_accuracy == max(h["val_accuracy"] for h in result.history)
  assert result.initial_val_accuracy == pytest.approx(_accuracy(foundation, rotated.val))
  # Only the adapter changed: same labels → no new head; base weights untouched.
  assert result.head is None
  flat = {p: l for p, l in adapted_layers(result.model).items()}
  for path, layer in adapted_layers(foundation).items():
    np.testing.assert_array_equal(flat[path].kernel[...], layer.kernel[...])
  assert not adapter_of(foundation)   # the caller's model carries no adapter afterwards
  leaves = jax.tree.leaves(result.adapter, is_leaf=is_lora)
  assert len(leaves) == 2 * TINY.num_hidden_layers and all(isinstance(x, LoRA) for x in leaves)
  assert all(x.rank == 4 for x in leaves)
  # Training can start from a given adapter (e.g. a Med-LEGO merge): it is the epoch-0 model.
  more = train.train_adapter(foundation, rotated.train, rotated.val, config._replace(epochs=1),
                             init_adapter=result.adapter)
  assert more.initial_val_accuracy == pytest.approx(result.best_val_accuracy)


def test_training_is_deterministic_for_a_seed(foundation, rotated):
  a = train.train_adapter(foundation, rotated.train, rotated.val, QUICK._replace(epochs=1))
  b = train.train_adapter(foundation, rotated.train, rotated.val, QUICK._replace(epochs=1))
  c = train.train_adapter(foundation, rotated.train, rotated.val,
                          QUICK._replace(epochs=1, seed=1))
  for x, y in zip(_leaves(a.adapter), _leaves(b.adapter)):
    np.testing.assert_array_equal(x, y)
  assert not all(np.array_equal(x, y) for x, y in zip(_leaves(a.adapter), _leaves(c.adapter)))


def test_resume_from_checkpoint_continues_to_the_same_result(foundation, rotated, tmp_path):
  full = train.train_adapter(foundation, rotated.train, rotated.val, QUICK)
  ckpt = str(tmp_path / "ckpt")
  part = train.train_adapter(foundation, rotated.train, rotated.val, QUICK,
                             checkpoint_dir=ckpt, stop_after=1)
  assert len(part.history) == 1
  resumed = train.train_adapter(foundation, rotated.train, rotated.val, QUICK,
                                checkpoint_dir=ckpt, resume=True)
  assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
  for x, y in zip(_leaves(full.adapter), _leaves(resumed.adapter)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
  assert resumed.best_epoch == full.best_epoch
  assert [h["val_accuracy"] for h in resumed.history] == [h["val_accuracy"] for h in full.history]
  # Checkpoints are never silently overwritten, nor mixed with another configuration's.
  with pytest.raises(ValueError, match="already holds checkpoints"):
    train.train_adapter(foundation, rotated.train, rotated.val, QUICK, checkpoint_dir=ckpt)
  with pytest.raises(ValueError, match="another model or configuration"):
    train.train_adapter(foundation, rotated.train, rotated.val, QUICK._replace(rank=2),
                        checkpoint_dir=ckpt, resume=True)


@pytest.mark.slow
def test_svd_lora_with_a_fresh_head_and_the_orthogonality_weight(foundation):
  task = data.load_splits(f"tasks:digits/parity:{SIZE}")
  config = QUICK._replace(kind="svd", epochs=2, lr=3e-2)
  with_ortho = train.train_adapter(foundation, task.train, task.val,
                                   config._replace(ortho_weight=1.0))
  no_ortho = train.train_adapter(foundation, task.train, task.val,
                                 config._replace(ortho_weight=0.0))
  # Parity's label set differs from the digits': a fresh 2-way head was trained alongside.
  assert with_ortho.head["kernel"].shape == (TINY.hidden_size, 2)
  assert with_ortho.model.config.labels == ("even", "odd")
  assert with_ortho.best_val_accuracy > 0.6
  leaves = jax.tree.leaves(with_ortho.adapter, is_leaf=is_lora)
  assert all(isinstance(x, SVDLoRA) for x in leaves)
  penalty = lambda r: sum(float(orthogonality_penalty(x))
                          for x in jax.tree.leaves(r.adapter, is_leaf=is_lora))
  assert penalty(with_ortho) < penalty(no_ortho)


def test_bad_configuration_is_refused(foundation, rotated):
  with pytest.raises(ValueError, match="kind must be 'lora' or 'svd'"):
    train.train_adapter(foundation, rotated.train, rotated.val, QUICK._replace(kind="dora"))
  task = data.load_splits(f"tasks:digits/loops:{SIZE}")
  with pytest.raises(ValueError, match="train a fresh head"):
    train.train_adapter(foundation, task.train, task.val, QUICK._replace(train_head=False))


@pytest.mark.slow
def test_cli_trains_and_writes_the_adapter(foundation, rotated, tmp_path, capsys):
  from models import hf
  from rpe_jax import cli
  from rpe_jax.compose import with_adapter
  folder = tmp_path / "model"
  hf.save(foundation, folder)
  out = tmp_path / "adapter.safetensors"
  uri = f"sites:digits/rotated:{SIZE}"
  code = cli.main(["train", "--data", uri, "--model", str(folder), "--rank", "4",
                   "--epochs", "6", "--lr", "1e-2", "--out", str(out), "--json"])
  assert code == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["head_trained"] is False
  adapter, meta = load_adapter(out)
  assert meta["data"] == uri
  assert all(x.rank == 4 for x in jax.tree.leaves(adapter, is_leaf=is_lora))
  # It learned: the written adapter beats the pretrained model on the site's test split,
  # both measured here by the un-batched oracle (not by the training code).
  before = _accuracy(hf.load(folder), rotated.test)
  after = _accuracy(with_adapter(hf.load(folder), adapter), rotated.test)
  assert after > before + 0.05, (before, after)
  assert summary["test_accuracy"] == pytest.approx(after, abs=1e-6)
  assert cli.main(["train", "--data", "nowhere:x", "--model", str(folder)]) == 2

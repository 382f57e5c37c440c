"""Segmentation pipeline: DICE / loss / boxes against independent oracles, the built-in site
family, SAM prototypes, and adapter training that clearly beats the frozen model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from models import lora
from models.sam import SamModel
from rpe_jax.tasks import segmentation as seg


def test_dice_scores_match_set_counting():
  rng = np.random.default_rng(0)
  pred = rng.random((5, 9, 7)) > 0.5
  gt = rng.random((5, 9, 7)) > 0.6
  pred[3], gt[3] = False, False          # both empty → 1
  pred[4], gt[4] = True, False           # disjoint → 0
  want = []
  for p, g in zip(pred, gt):
    a = {tuple(i) for i in np.argwhere(p)}
    b = {tuple(i) for i in np.argwhere(g)}
    want.append(1.0 if not a and not b else 2 * len(a & b) / (len(a) + len(b)))
  np.testing.assert_allclose(seg.dice_scores(pred, gt), want, rtol=1e-12)
  assert seg.dice_scores(pred[3:4], gt[3:4])[0] == 1.0 and seg.dice_scores(pred[4:], gt[4:])[0] == 0


def test_dice_bce_loss_matches_torch():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, (4, 8, 8)).astype(np.float32)
  masks = rng.random((4, 8, 8)) > 0.5
  t, g = torch.from_numpy(logits).double(), torch.from_numpy(masks).double()
  bce = torch.nn.functional.binary_cross_entropy_with_logits(t, g)
  p = torch.sigmoid(t)
  dice = (2 * (p * g).sum((1, 2)) + 1) / (p.sum((1, 2)) + g.sum((1, 2)) + 1)
  want = float(bce + 1 - dice.mean())
  got = float(seg.dice_bce_loss(jnp.asarray(logits), jnp.asarray(masks)))
  assert got == pytest.approx(want, rel=1e-5)


def test_boxes_from_masks_are_tight():
  masks = np.zeros((3, 10, 12), bool)
  masks[0, 2:5, 3:9] = True
  masks[1, 7, 1] = True
  boxes = seg.boxes_from_masks(masks)
  assert boxes.shape == (3, 1, 4)
  np.testing.assert_array_equal(boxes[:, 0], [[3, 2, 8, 4], [1, 7, 1, 7], [0, 0, 11, 9]])
  jittered = seg.boxes_from_masks(masks, jitter=2.0, rng=np.random.default_rng(0))
  assert np.all(np.abs(jittered - boxes) <= 2.0) and np.any(jittered != boxes)


def test_sites_share_nothing_but_the_recipe():
  a = seg.load_site("clean", n_train=6, n_test=4)
  b = seg.load_site("clean", n_train=6, n_test=4)
  np.testing.assert_array_equal(a.train.images, b.train.images)
  assert a.train.images.shape == (6, 32, 32, 1) and a.test.masks.shape == (4, 32, 32)
  assert a.train.images.min() >= 0 and a.train.images.max() <= 1
  frac = a.train.masks.mean()
  assert 0.02 < frac < 0.4, frac
  # The organ is brighter than the rest at the clean site and darker at the inverted one.
  inv = seg.load_site("inverted", n_train=6, n_test=4).train
  for ds, sign in ((a.train, 1), (inv, -1)):
    inside = ds.images[..., 0][ds.masks].mean()
    outside = ds.images[..., 0][~ds.masks].mean()
    assert sign * (inside - outside) > 0.2
  with pytest.raises(ValueError, match="unknown segmentation site 'mars'"):
    seg.load_site("mars")


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="prompt"):
    seg.SegTrainConfig(prompt="points")
  with pytest.raises(ValueError, match="masks"):
    seg.check_dataset(seg.SegDataset(np.zeros((2, 8, 8, 1)), np.zeros((2, 8, 7)), "x"))
  with pytest.raises(ValueError, match="NaN"):
    seg.check_dataset(seg.SegDataset(np.full((1, 8, 8, 1), np.nan), np.zeros((1, 8, 8)), "x"))


@pytest.fixture(scope="module")
def tiny_sam():
  return SamModel(seg.base_config(32), rngs=nnx.Rngs(0))


def test_prototype_is_the_mean_of_mean_pooled_embeddings(tiny_sam):
  ds = seg.load_site("noisy", n_train=5, n_test=1).train
  z = seg.prototype(tiny_sam, ds, batch_size=2)       # ragged batches, padded and masked
  emb = np.asarray(tiny_sam.image_embeddings(seg.model_input(tiny_sam, jnp.asarray(ds.images))),
                   np.float64)
  np.testing.assert_allclose(z, emb.mean(axis=(0, 1, 2)), atol=1e-5, rtol=0)
  assert z.shape == (32,)


def test_predict_uses_the_prompt(tiny_sam):
  ds = seg.load_site("clean", n_train=3, n_test=1).train
  box = seg.predict(tiny_sam, ds, prompt="box", batch_size=2)
  none = seg.predict(tiny_sam, ds, prompt="none", batch_size=2)
  assert box.shape == none.shape == (3, 32, 32) and box.dtype == bool
  assert np.any(box != none)
  # Without boxes the masks are not read: an unlabeled dataset predicts the same.
  np.testing.assert_array_equal(seg.predict(tiny_sam, ds._replace(masks=None), prompt="none",
                                            batch_size=2), none)


@pytest.mark.slow
def test_adapter_training_clearly_beats_the_frozen_model():
  """Base trained in full on the clean site; an encoder-qkv + decoder-q/v LoRA trained on the
  low-contrast site raises its held-out DICE well above the frozen base's, while the base's
  own weights stay untouched."""
  base = seg.pretrain_base(("clean",), steps=150, n_train=64)
  target = seg.load_site("lowcontrast", n_train=64, n_test=32)
  assert seg.evaluate_dice(base, seg.load_site("clean", n_train=1, n_test=32).test) > 0.85
  frozen = seg.evaluate_dice(base, target.test)
  kernels = {p: np.asarray(m.kernel[...]) for p, m in lora.adapted_layers(base).items()}

  result = seg.train(base, target.train, seg.SegTrainConfig(steps=100, rank=4))
  adapted = seg.evaluate_dice(result.model, target.test)
  assert adapted > frozen + 0.15, (frozen, adapted)
  assert result.losses[-10:].mean() < result.losses[:10].mean()

  layers = lora.adapted_layers(result.model)
  carrying = sorted(p for p, m in layers.items() if m.adapter is not None)
  assert "vision_encoder.layers.0.attn.qkv" in carrying
  assert "mask_decoder.layers.0.self_attn.q_proj" in carrying
  for p, m in layers.items():
    np.testing.assert_array_equal(np.asarray(m.kernel[...]), kernels[p])
  assert all(m.adapter is None for m in lora.adapted_layers(base).values())
  assert seg.evaluate_dice(base, target.test) == pytest.approx(frozen)

"""The graded site family: mixtures of base shifts, their URIs and their rendering."""

import numpy as np
import pytest

from rpe_jax.tasks import images as data
from rpe_jax.tasks import seg_data, sites
from rpe_jax.tasks.contract import uri_task_name
from rpe_jax.tasks.images import DatasetError


def test_every_graded_site_is_the_stated_mixture_of_its_bases():
  for name, alpha in sites.GRADED_MIX.items():
    assert sum(alpha.values()) == pytest.approx(1.0)
    # p = p0 + Σ α_j (p_j − p0), written out key by key from the base table.
    expected = {}
    for key, identity in sites.IDENTITY.items():
      value = identity + sum(a * (sites.GRADED_BASES[b].get(key, identity) - identity)
                             for b, a in alpha.items())
      if value != pytest.approx(identity):
        expected[key] = value
    got = sites.GRADED_SITES[name]
    assert set(got) == set(expected), name
    for key in expected:
      assert got[key] == pytest.approx(expected[key]), (name, key)
  assert sites.GRADED_SITES["rot"] == sites.GRADED_BASES["rot"]
  assert sites.GRADED_SITES["rot_noise"] == {"rotate": 15.0, "noise": 0.1}
  centre = sites.GRADED_SITES["rot_noise_bias"]
  assert centre == pytest.approx({"rotate": 10.0, "noise": 0.2 / 3, "bias": 0.3})


def test_mix_shifts_refuses_bad_mixtures():
  with pytest.raises(ValueError, match="unknown base"):
    sites.mix_shifts({"mars": 1.0})
  with pytest.raises(ValueError, match="sum to 1"):
    sites.mix_shifts({"rot": 0.5, "noise": 0.4})
  with pytest.raises(ValueError, match=">= 0"):
    sites.mix_shifts({"rot": 1.5, "noise": -0.5})
  with pytest.raises(ValueError, match="cannot be mixed"):
    sites.mix_shifts({"inv": 1.0}, {"inv": {"invert": True}})
  # Interpolating the intensity response too: contrast 0.5 at half strength is 0.75.
  assert sites.mix_shifts({"a": 0.5, "b": 0.5}, {"a": {"contrast": 0.5}, "b": {"blur": 1.0}}) \
      == {"blur": 0.5, "contrast": 0.75}


def test_rendering_a_mixed_site_is_rendering_its_mixed_parameters():
  clean = np.random.default_rng(0).uniform(size=(3, 8, 8))
  explicit = {"x": {"rotate": 15.0, "noise": 0.1}}
  a = sites.render(clean, "rot_noise", 16, np.random.default_rng(1), sites=sites.GRADED_SITES)
  b = sites.render(clean, "x", 16, np.random.default_rng(1), sites=explicit)
  np.testing.assert_array_equal(a, b)


def test_digits_graded_family_uris_and_deterministic_rendering():
  uris = data.members("sites:digits-graded:16")
  assert uris == [f"sites:digits-graded/{s}:16" for s in sites.GRADED_SITES]
  a = data.load_splits("sites:digits-graded/rot_noise:16")
  b = data.load_splits("sites:digits-graded/rot_noise:16")
  np.testing.assert_array_equal(a.test.images, b.test.images)
  np.testing.assert_array_equal(a.train.labels, b.train.labels)
  assert a.train.images.shape[1:] == (16, 16, 1) and len(a.train) == 540
  other = data.load("sites:digits-graded/rot_noise:16", seed=1)
  assert not np.array_equal(other.images, a.train.images)
  # Another family: the digits and their noise are drawn afresh, not the digits family's.
  assert not np.array_equal(data.load("sites:digits-graded/noise:16").images,
                            data.load("sites:digits/noisy:16").images)
  with pytest.raises(DatasetError, match="unknown site 'noisy'"):
    data.load("sites:digits-graded/noisy")
  with pytest.raises(DatasetError, match="segmentation dataset family"):
    data.load("sites:organs-graded/rot")
  with pytest.raises(DatasetError, match="available: digits, digits-graded"):
    data.load("sites:letters/rot")


def test_organs_graded_family_and_the_task_of_each_family():
  assert seg_data.members("sites:organs-graded") == [f"sites:organs-graded/{s}"
                                                     for s in sites.GRADED_SITES]
  a = seg_data.load("sites:organs-graded/noise_bias:16", "test")
  b = seg_data.load("sites:organs-graded/noise_bias:16", "test")
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.masks, b.masks)
  with pytest.raises(DatasetError, match="classification dataset family"):
    seg_data.load("sites:digits-graded/rot")
  for uri, task in (("sites:digits-graded/rot", "classification"),
                    ("sites:organs-graded/rot:16", "segmentation"),
                    ("sites:digits/clean", "classification")):
    assert uri_task_name(uri) == task

"""Dataset loaders (on files the tests create), batching, normalisation, built-in sites."""

import json
import os
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from models.preprocessing import Normalization
from rpe_jax import batching
from rpe_jax.tasks import images as data
from rpe_jax.tasks.images import DatasetError


# --- medmnist -------------------------------------------------------------------------------

def _write_npz(path, n=(6, 3, 4), shape=(28, 28), classes=9, seed=0, drop=(), **override):
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, k in zip(("train", "val", "test"), n):
    arrays[f"{split}_images"] = rng.integers(0, 256, (k, *shape), dtype=np.uint8)
    arrays[f"{split}_labels"] = rng.integers(0, classes, (k, 1))
  arrays.update(override)
  for key in drop:
    del arrays[key]
  np.savez(path, **arrays)
  return arrays


@pytest.fixture
def fake_medmnist(tmp_path, monkeypatch):
  """A stand-in ``medmnist`` package (its ``info.py`` is all the loader reads): the real one
  needs ``pip install --no-deps medmnist``, which the test install does not do."""
  pkg = tmp_path / "site" / "medmnist"
  pkg.mkdir(parents=True)
  (pkg / "__init__.py").write_text("raise ImportError('the loader must not import the package')\n")
  info = {"pathmnist": {"task": "multi-class", "n_channels": 3,
                        "label": {str(i): f"tissue {i}" for i in range(9)}},
          "dermamnist": {"task": "multi-class", "n_channels": 3,
                         "label": {str(i): f"lesion {i}" for i in range(7)}}}
  (pkg / "info.py").write_text(f"INFO = {info!r}\n")
  monkeypatch.syspath_prepend(str(tmp_path / "site"))
  monkeypatch.delitem(sys.modules, "medmnist", raising=False)   # find_spec would return it
  return info


def test_medmnist_loads_official_layout_with_package_metadata(tmp_path, fake_medmnist):
  arrays = _write_npz(tmp_path / "pathmnist.npz")
  splits = data.load_splits("medmnist:pathmnist", data_root=str(tmp_path))
  np.testing.assert_array_equal(splits.train.images[..., 0], arrays["train_images"])
  np.testing.assert_array_equal(splits.test.labels, arrays["test_labels"][:, 0])
  assert [len(s) for s in splits] == [6, 3, 4]
  assert splits.val.images.shape == (3, 28, 28, 1)
  # Class names come from the package's INFO dict.
  assert splits.train.num_classes == 9
  assert splits.train.class_names[4] == "tissue 4"


def test_medmnist_size_suffix_and_rgb(tmp_path, fake_medmnist):
  _write_npz(tmp_path / "dermamnist_64.npz", shape=(64, 64, 3), classes=7)
  ds = data.load("medmnist:dermamnist:64", "val", data_root=str(tmp_path))
  assert ds.images.shape == (3, 64, 64, 3) and ds.num_classes == 7


def test_medmnist_without_package_metadata_infers_classes(tmp_path, monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "medmnist" else real(name, *a))
  arrays = _write_npz(tmp_path / "mystery.npz", classes=4, seed=3)
  splits = data.load_splits("medmnist:mystery", data_root=str(tmp_path))
  seen = max(int(arrays[f"{s}_labels"].max()) for s in ("train", "val", "test"))
  assert splits.train.num_classes == seen + 1
  assert splits.train.class_names == tuple(str(i) for i in range(seen + 1))


@pytest.mark.parametrize("make, message", [
    (lambda p: _write_npz(p, drop=("val_labels",)), "missing keys \\['val_labels'\\]"),
    (lambda p: _write_npz(p, train_labels=np.zeros((5, 1))), "6 train_images but 5 train_labels"),
    (lambda p: _write_npz(p, test_labels=np.zeros((4, 14))), "multi-label"),
    (lambda p: _write_npz(p, train_labels=np.full((6, 1), 9)), "outside \\[0, 9\\)"),
    (lambda p: p.write_bytes(b"not a zip"), "not a readable .npz"),
])
def test_medmnist_bad_files_name_the_file_and_the_problem(tmp_path, fake_medmnist, make,
                                                         message):
  make(tmp_path / "pathmnist.npz")
  with pytest.raises(DatasetError, match=message) as info:
    data.load_splits("medmnist:pathmnist", data_root=str(tmp_path))
  assert "pathmnist.npz" in str(info.value)


def test_medmnist_missing_file_and_unknown_flag(tmp_path, fake_medmnist):
  with pytest.raises(DatasetError, match="bloodmnist.npz not found"):
    data.load_splits("medmnist:bloodmnist", data_root=str(tmp_path))
  with pytest.raises(DatasetError, match="unknown MedMNIST flag 'nosuch'"):
    _write_npz(tmp_path / "nosuch.npz")
    data.load_splits("medmnist:nosuch", data_root=str(tmp_path))
  with pytest.raises(DatasetError, match="needs a data root"):
    data.load_splits("medmnist:pathmnist")


# --- tfds -----------------------------------------------------------------------------------

def test_tfds_through_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6):
    splits = data.load_splits("tfds:mnist", data_root=str(tmp_path))
    sliced = data.load_splits("tfds:mnist:test", data_root=str(tmp_path), seed=1)
  assert [len(s) for s in splits] == [6, 6, 6]
  assert splits.train.images.shape == (6, 28, 28, 1) and splits.train.images.dtype == np.uint8
  assert splits.train.num_classes == 10 and splits.train.labels.max() < 10
  # One named split, divided 80/10/10 by the seed; the parts are disjoint and cover it.
  assert sum(len(s) for s in sliced) == 6
  with pytest.raises(DatasetError, match="tfds:no_such_dataset"):
    data.load_splits("tfds:no_such_dataset", data_root=str(tmp_path))


# --- folders --------------------------------------------------------------------------------

def _write_folder(root, classes=("cat", "dog"), per_class=5, size=(12, 10), mode="RGB"):
  rng = np.random.default_rng(0)
  pixels = {}
  for c in classes:
    os.makedirs(root / c, exist_ok=True)
    for i in range(per_class):
      shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
      arr = rng.integers(0, 256, shape, dtype=np.uint8)
      Image.fromarray(arr, mode).save(root / c / f"{i}.png")
      pixels[(c, i)] = arr
  return pixels


def test_folder_one_subfolder_per_class(tmp_path):
  pixels = _write_folder(tmp_path / "imgs")
  splits = data.load_splits(f"folder:{tmp_path / 'imgs'}", seed=0)
  assert sum(len(s) for s in splits) == 10
  assert splits.train.class_names == ("cat", "dog") and splits.train.images.shape[1:] == (10, 12, 3)
  # Every loaded image is one of the files, with its folder's label.
  everything = {(int(lab), im.tobytes()) for s in splits for im, lab in zip(s.images, s.labels)}
  assert everything == {(("cat", "dog").index(c), arr.tobytes()) for (c, _), arr in pixels.items()}
  again = data.load_splits(f"folder:{tmp_path / 'imgs'}", seed=0)
  np.testing.assert_array_equal(again.test.images, splits.test.images)


def test_folder_with_split_subfolders_and_gray_images(tmp_path):
  for s in ("train", "val", "test"):
    _write_folder(tmp_path / "d" / s, classes=("a", "b", "c"), per_class=2, mode="L")
  splits = data.load_splits(f"folder:{tmp_path / 'd'}")
  assert [len(s) for s in splits] == [6, 6, 6] and splits.val.images.shape[-1] == 1


def test_folder_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(DatasetError, match="no class subfolders"):
    data.load_splits(f"folder:{tmp_path / 'empty'}")
  (tmp_path / "e2" / "cls").mkdir(parents=True)
  with pytest.raises(DatasetError, match="class folder holds no images"):
    data.load_splits(f"folder:{tmp_path / 'e2'}")
  _write_folder(tmp_path / "bad")
  (tmp_path / "bad" / "dog" / "broken.png").write_bytes(b"\x89PNG garbage")
  with pytest.raises(DatasetError, match="broken.png: unreadable image"):
    data.load_splits(f"folder:{tmp_path / 'bad'}")
  with pytest.raises(DatasetError, match="does not exist"):
    data.load_splits(f"folder:{tmp_path / 'nowhere'}")


def test_unknown_scheme_and_bad_uris():
  with pytest.raises(DatasetError, match="unknown dataset URI scheme 'ftp'"):
    data.load_splits("ftp:whatever")
  with pytest.raises(DatasetError, match="has no scheme"):
    data.load_splits("digits")
  with pytest.raises(DatasetError, match="split must be one of"):
    data.load("sites:digits/clean", "training")


# --- built-in sites and tasks ---------------------------------------------------------------

def test_sites_family_lists_members_and_members_load():
  uris = data.members("sites:digits")
  assert uris == [f"sites:digits/{s}" for s in data.SITES]
  with pytest.raises(DatasetError, match="is a family of sites"):
    data.load_splits("sites:digits")
  with pytest.raises(DatasetError, match="unknown site 'mars'"):
    data.load_splits("sites:digits/mars")
  assert data.members("sites:digits:16")[0] == "sites:digits/clean:16"


def test_sites_are_real_digits_deterministic_and_shifted():
  from sklearn.datasets import load_digits
  digits = load_digits()
  clean = data.load_splits("sites:digits/clean")
  again = data.load_splits("sites:digits/clean")
  for a, b in zip(clean, again):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
  other_seed = data.load_splits("sites:digits/clean", seed=1)
  assert not np.array_equal(other_seed.train.labels, clean.train.labels)
  ds = clean.train
  assert ds.images.shape[1:] == (32, 32, 1) and ds.images.dtype == np.uint8
  assert ds.num_classes == 10
  # Real images: each clean rendering, averaged back to 8x8, matches a scikit-learn scan of
  # the same digit (the closest of all 1797 scans carries the image's label).
  small = ds.images[:20, ..., 0].reshape(20, 8, 4, 8, 4).mean((2, 4)) / 255.0
  dist = ((small[:, None] - digits.images[None] / 16.0) ** 2).sum((2, 3))
  np.testing.assert_array_equal(digits.target[dist.argmin(1)], ds.labels[:20])
  # Sites differ from each other in documented ways.
  inverted = data.load("sites:digits/inverted")
  assert inverted.images.mean() > 2 * ds.images.mean()   # dark background → bright
  noisy = data.load("sites:digits/noisy")
  roughness = lambda im: np.abs(np.diff(im.astype(float), axis=2)).mean()
  assert roughness(noisy.images) > 2 * roughness(ds.images)
  assert data.load("sites:digits/rotated:16").images.shape[1:] == (16, 16, 1)


def test_tasks_family_labels_follow_the_task():
  assert data.members("tasks:digits") == [f"tasks:digits/{t}" for t in data.TASKS]
  parity = data.load("tasks:digits/parity")
  assert parity.class_names == ("even", "odd") and set(np.unique(parity.labels)) == {0, 1}
  loops = data.load("tasks:digits/loops")
  assert loops.num_classes == 3
  digit = data.load("tasks:digits/digit")
  assert digit.num_classes == 10


# --- batching -------------------------------------------------------------------------------

def _toy(n=10):
  images = np.arange(n * 2 * 2, dtype=np.uint8).reshape(n, 2, 2, 1)
  return data.ImageDataset(images, np.arange(n) % 3, 3, "toy", ("a", "b", "c"))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_batches_pad_the_ragged_tail_and_mask_it(prefetch):
  ds = _toy(10)
  got = list(batching.batches(ds, 4, prefetch=prefetch))
  assert len(got) == 3 == batching.num_batches(10, 4)
  assert all(b.images.shape == (4, 2, 2, 1) for b in got)
  np.testing.assert_array_equal(got[-1].mask, [True, True, False, False])
  seen = np.concatenate([b.labels[b.mask] for b in got])
  np.testing.assert_array_equal(seen, ds.labels)
  images = np.concatenate([b.images[b.mask] for b in got])
  np.testing.assert_array_equal(images, ds.images)


def test_batches_drop_and_short_tails():
  ds = _toy(10)
  assert [len(b.labels) for b in batching.batches(ds, 4, tail="drop")] == [4, 4]
  assert [len(b.labels) for b in batching.batches(ds, 4, tail="short")] == [4, 4, 2]
  with pytest.raises(ValueError, match="tail must be"):
    batching.batches(ds, 4, tail="wrap")


def test_shuffle_is_a_permutation_seeded_by_seed_and_epoch():
  ds = _toy(10)
  order = lambda **kw: np.concatenate(
      [b.images[b.mask, 0, 0, 0] // 4 for b in batching.batches(ds, 3, shuffle=True, **kw)])
  a = order(seed=0, epoch=0)
  assert sorted(a) == list(range(10))
  np.testing.assert_array_equal(a, order(seed=0, epoch=0))
  assert not np.array_equal(a, order(seed=0, epoch=1))
  assert not np.array_equal(a, order(seed=1, epoch=0))


def test_prefetch_runs_the_transform_in_another_thread_and_propagates_errors():
  ds = _toy(8)
  threads = set()

  def transform(x):
    threads.add(threading.get_ident())
    return x.astype(np.float32) * 2

  got = list(batching.batches(ds, 4, transform=transform, prefetch=2))
  assert threads and threading.get_ident() not in threads
  np.testing.assert_array_equal(got[0].images, ds.images[:4] * 2.0)

  def broken(x):
    raise RuntimeError("transform exploded")

  with pytest.raises(RuntimeError, match="transform exploded"):
    list(batching.batches(ds, 4, transform=broken, prefetch=2))
  # Abandoning an iterator midway does not hang.
  it = batching.batches(ds, 1, prefetch=1)
  next(it)
  it.close()


# --- normalisation --------------------------------------------------------------------------

def test_normalization_matches_numpy_and_repeats_gray_to_rgb():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
  norm = Normalization(8, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  want = (np.repeat(images, 3, -1) / 255.0 - np.array(norm.mean)) / np.array(norm.std)
  np.testing.assert_allclose(np.asarray(norm(images)), want, atol=1e-5)
  # Float inputs are taken as [0, 1]; ViT's defaults (0.5, 0.5) map them to [-1, 1].
  vit = Normalization(8, 1)
  np.testing.assert_allclose(np.asarray(vit(np.ones((1, 8, 8, 1), np.float32))), 1.0)
  np.testing.assert_allclose(np.asarray(vit(np.zeros((1, 8, 8, 1), np.uint8))), -1.0)
  with pytest.raises(ValueError, match="images have 2 channels"):
    norm(np.zeros((1, 8, 8, 2), np.uint8))


def test_normalization_resizes_to_the_model_size():
  norm = Normalization(16, 1, (0.0,), (1.0,))
  x = np.full((2, 8, 8, 1), 51, np.uint8)
  out = np.asarray(norm(x))
  assert out.shape == (2, 16, 16, 1)
  np.testing.assert_allclose(out, 0.2, atol=1e-6)   # a constant image stays constant


def test_normalization_from_hf_processor_config(tmp_path):
  cfg = {"do_normalize": True, "do_rescale": True, "do_resize": True,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0], "resample": 2,
         "rescale_factor": 0.00392156862745098, "size": {"height": 24, "width": 32}}
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
  norm = Normalization.from_hf(str(tmp_path))
  assert norm.image_size == (24, 32) and norm.std == (0.25, 0.5, 1.0)
  with pytest.raises(ValueError, match="preprocessor_config.json"):
    Normalization.from_hf(str(tmp_path / "nope"))

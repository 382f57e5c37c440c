"""Segmentation datasets by URI (on files the tests write): image / mask folders paired by
stem, the built-in organ sites, seeded splits, and errors that name the bad file."""

import numpy as np
import pytest
from PIL import Image

from rpe_jax.tasks import images as image_data
from rpe_jax.tasks import seg_data
from rpe_jax.tasks import segmentation as seg
from rpe_jax.tasks.images import DatasetError


def _png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _npy(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  np.save(path, array)


def _pairs(root, n=3, shape=(8, 6), seed=0):
  """Gray PNG images and masks (PNG or .npy) of stems s0..s{n-1}; returns {stem: (image, mask)}."""
  rng = np.random.default_rng(seed)
  written = {}
  for i in reversed(range(n)):   # written in reverse: pairing must not follow write order
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    mask = rng.random(shape) > 0.5
    _png(root / "img" / f"s{i}.png", image)
    if i % 2:
      _npy(root / "lab" / f"s{i}.npy", mask.astype(np.int64) * 3)   # any nonzero is foreground
    else:
      _png(root / "lab" / f"s{i}.png", mask.astype(np.uint8) * 255)
    written[f"s{i}"] = image, mask
  return written


def test_masks_pairs_by_stem_and_round_trips(tmp_path):
  written = _pairs(tmp_path, n=4)
  (tmp_path / "img" / "notes.txt").write_text("ignored")
  ds = seg_data.load("masks:img:lab", "all", data_root=str(tmp_path))
  assert ds.name == "masks:img:lab"
  assert ds.images.dtype == np.float32 and ds.images.shape == (4, 8, 6, 1)
  assert ds.masks.dtype == bool and ds.masks.shape == (4, 8, 6)
  for i, stem in enumerate(sorted(written)):   # "all" is in file (stem) order
    image, mask = written[stem]
    np.testing.assert_array_equal(np.round(ds.images[i, ..., 0] * 255).astype(np.uint8), image)
    np.testing.assert_array_equal(ds.masks[i], mask)
  # An absolute images folder needs no data root.
  again = seg_data.load(f"masks:{tmp_path / 'img'}:{tmp_path / 'lab'}", "all")
  np.testing.assert_array_equal(again.images, ds.images)


def test_rgb_npy_and_sixteen_bit_images(tmp_path):
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
  floats = rng.random((5, 7)).astype(np.float32)
  deep = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
  _png(tmp_path / "img" / "a.png", rgb)
  _png(tmp_path / "img" / "b.png", gray)
  _npy(tmp_path / "img" / "c.npy", floats)
  _png(tmp_path / "img" / "d.png", deep)
  ds = seg_data.load("masks:img", "all", data_root=str(tmp_path))
  assert ds.masks is None and ds.images.shape == (4, 5, 7, 3)   # one RGB image: all RGB
  np.testing.assert_allclose(ds.images[0], rgb / 255, atol=1e-6)
  np.testing.assert_allclose(ds.images[1], np.repeat(gray[..., None], 3, -1) / 255, atol=1e-6)
  np.testing.assert_allclose(ds.images[2], np.repeat(floats[..., None], 3, -1), atol=1e-7)
  np.testing.assert_allclose(ds.images[3, ..., 0], deep / 65535, atol=1e-6)
  # Gray only: one channel.
  (tmp_path / "img" / "a.png").unlink()
  assert seg_data.load("masks:img", "all", data_root=str(tmp_path)).images.shape == (3, 5, 7, 1)


def test_file_splits_partition_the_dataset(tmp_path):
  for i in range(20):   # image i is constant i: its content names it
    _png(tmp_path / "img" / f"{i:02d}.png", np.full((4, 4), i, np.uint8))
    _png(tmp_path / "lab" / f"{i:02d}.png", np.full((4, 4), i % 2, np.uint8))
  uri = f"masks:{tmp_path / 'img'}:{tmp_path / 'lab'}"
  splits = seg_data.load_splits(uri, seed=3)
  ids = [list(np.round(s.images[:, 0, 0, 0] * 255).astype(int)) for s in splits]
  assert [len(i) for i in ids] == [14, 3, 3]
  assert sorted(sum(ids, [])) == list(range(20))            # disjoint, union = all
  for s, i in zip(splits, ids):
    np.testing.assert_array_equal(s.masks[:, 0, 0], np.array(i) % 2)   # masks follow
  assert [s.name for s in splits] == [f"{uri}[train]", f"{uri}[val]", f"{uri}[test]"]
  assert seg_data.load(uri, "val", seed=3).images.tobytes() == splits.val.images.tobytes()
  other = seg_data.load_splits(uri, seed=4)
  assert not np.array_equal(other.train.images, splits.train.images)
  unlabeled = seg_data.load_splits(f"masks:{tmp_path / 'img'}", seed=3)
  assert all(s.masks is None for s in unlabeled)
  np.testing.assert_array_equal(unlabeled.test.images, splits.test.images)


def test_builtin_organ_sites():
  a, b = seg_data.load_splits("sites:organs/noisy"), seg_data.load_splits("sites:organs/noisy")
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.images, y.images)
    np.testing.assert_array_equal(x.masks, y.masks)
  assert [x.images.shape for x in a] == [(96, 32, 32, 1), (32, 32, 32, 1), (32, 32, 32, 1)]
  assert a.test.masks.shape == (32, 32, 32) and a.test.masks.dtype == bool
  assert a.train.images.dtype == np.float32
  assert 0 <= a.train.images.min() <= a.train.images.max() <= 1
  whole = seg_data.load("sites:organs/noisy", "all")
  assert len(whole.images) == seg_data.PER_SITE and whole.name == "sites:organs/noisy"
  # The splits partition the whole (every phantom is distinct, so sums identify them).
  key = lambda ds: sorted(ds.images.sum(axis=(1, 2, 3)).round(4).tolist())
  assert key(whole) == sorted(sum((key(x) for x in a), []))
  # segmentation.load_site (the benchmarks') at its defaults: the same 160 images, in order.
  site = seg.load_site("noisy")
  np.testing.assert_array_equal(whole.images, np.concatenate([site.train.images,
                                                              site.test.images]))
  np.testing.assert_array_equal(whole.masks[:96], site.train.masks)
  assert seg_data.load("sites:organs/clean:48", "test", seed=1).images.shape == (32, 48, 48, 1)
  assert not np.array_equal(seg_data.load("sites:organs/noisy", "all", seed=1).images,
                            whole.images)
  assert seg_data.members("sites:organs") == [f"sites:organs/{s}" for s in seg.SITES]
  assert seg_data.members("sites:organs:64")[0] == "sites:organs/clean:64"
  assert seg_data.members("masks:x") == ["masks:x"]


# --- errors name the bad file --------------------------------------------------------------

def _missing_folder(root):
  return "masks:nope", "nope"


def _no_images(root):
  (root / "img").mkdir()
  (root / "img" / "readme.txt").write_text("x")
  return "masks:img", "img"


def _missing_masks_folder(root):
  _pairs(root)
  return "masks:img:labels", "labels"


def _image_without_mask(root):
  _pairs(root)
  (root / "lab" / "s1.npy").unlink()
  return "masks:img:lab", "s1.png"


def _mask_without_image(root):
  _pairs(root)
  _png(root / "lab" / "zz.png", np.zeros((8, 6), np.uint8))
  return "masks:img:lab", "zz.png"


def _mask_of_another_size(root):
  _pairs(root)
  _png(root / "lab" / "s2.png", np.zeros((8, 5), np.uint8))
  return "masks:img:lab", "s2.png is 8×5 but its image is 8×6"


def _images_of_different_sizes(root):
  _pairs(root)
  _png(root / "img" / "s1.png", np.zeros((9, 6), np.uint8))
  return "masks:img:lab", "s1.png is 9×6"


def _corrupt_png(root):
  _pairs(root)
  (root / "img" / "s1.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
  return "masks:img:lab", "s1.png"


def _corrupt_npy_mask(root):
  _pairs(root)
  (root / "lab" / "s1.npy").write_bytes(b"\x93NUMPY garbage")
  return "masks:img:lab", "s1.npy"


def _nan_image(root):
  _pairs(root)
  (root / "img" / "s1.png").unlink()
  _npy(root / "img" / "s1.npy", np.full((8, 6), np.nan, np.float32))
  return "masks:img:lab", "s1.npy"


def _inf_mask(root):
  _pairs(root)
  _npy(root / "lab" / "s1.npy", np.full((8, 6), np.inf))
  return "masks:img:lab", "s1.npy"


def _same_stem(root):
  _pairs(root)
  _npy(root / "img" / "s0.npy", np.zeros((8, 6), np.float32))
  return "masks:img:lab", "s0.npy"


def _four_channels(root):
  _npy(root / "img" / "x.npy", np.zeros((8, 6, 4), np.uint8))
  return "masks:img", "x.npy"


def _float_outside_unit(root):
  _npy(root / "img" / "x.npy", np.full((8, 6), 2.5, np.float32))
  return "masks:img", "x.npy"


def _int32_image(root):
  _npy(root / "img" / "x.npy", np.zeros((8, 6), np.int32))
  return "masks:img", "x.npy"


def _mask_of_three_dims(root):
  _pairs(root)
  (root / "lab" / "s1.npy").unlink()
  _npy(root / "lab" / "s1.npy", np.zeros((8, 6, 2), bool))
  return "masks:img:lab", "s1.npy"


@pytest.mark.parametrize("case", [
    _missing_folder, _no_images, _missing_masks_folder, _image_without_mask,
    _mask_without_image, _mask_of_another_size, _images_of_different_sizes, _corrupt_png,
    _corrupt_npy_mask, _nan_image, _inf_mask, _same_stem, _four_channels, _float_outside_unit,
    _int32_image, _mask_of_three_dims], ids=lambda f: f.__name__.strip("_"))
def test_bad_files_are_named(tmp_path, case):
  uri, named = case(tmp_path)
  with pytest.raises(DatasetError) as e:
    seg_data.load(uri, "all", data_root=str(tmp_path))
  assert named in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("uri, message", [
    ("organs", "has no scheme"),
    ("tfds:mnist", "unknown segmentation dataset URI scheme 'tfds'"),
    ("masks:", "names no dataset"),
    ("masks:a:b:c", r"expected masks:<images folder>\[:<masks folder>\]"),
    ("sites:organs", "family of sites; load one of: sites:organs/clean"),
    ("sites:organs/mars", "unknown site 'mars'"),
    ("sites:organs/clean:40", "multiple of 16"),
    ("sites:organs/clean:big", "multiple of 16"),
    ("sites:digits/clean", "classification dataset family"),
    ("sites:lungs/clean", "unknown built-in family 'lungs'"),
])
def test_bad_uris_are_named(uri, message):
  with pytest.raises(DatasetError, match=message) as e:
    seg_data.load(uri)
  assert "\n" not in str(e.value)


def test_bad_split_and_the_classification_side():
  with pytest.raises(DatasetError, match="split must be one of"):
    seg_data.load("sites:organs/clean", "validation")
  with pytest.raises(DatasetError, match="'sites:organs/clean' is a segmentation dataset family"):
    image_data.load("sites:organs/clean")
  with pytest.raises(DatasetError, match="segmentation dataset family"):
    image_data.members("sites:organs")
  with pytest.raises(DatasetError, match="unknown built-in family 'lungs'"):
    image_data.load("sites:lungs/clean")


def test_unlabeled_datasets_need_prompt_none():
  ds = seg_data.load("sites:organs/clean", "test")._replace(masks=None)
  assert seg.check_dataset(ds).masks is None
  # The checks come before the model is used, so no model is needed to see them.
  with pytest.raises(ValueError, match="prompt 'box' derives boxes from masks; dataset "
                     r"'sites:organs/clean\[test\]' has none — use prompt 'none'"):
    seg.predict(None, ds, prompt="box")
  with pytest.raises(ValueError, match="DICE .* has none"):
    seg.evaluate_dice(None, ds, prompt="none")
  with pytest.raises(ValueError, match="training .* has none"):
    seg.train(None, ds)


# --- tensorflow-datasets (tfds-masks:) -----------------------------------------------------

def _raw_pet(tfds, split, data_root):
  """The records' (image, mask [H, W]) as tfds itself gives them."""
  source = tfds.data_source("oxford_iiit_pet", split=split, data_dir=data_root, download=False)
  records = [source[i] for i in range(len(source))]
  return [(np.asarray(r["image"]), np.asarray(r["segmentation_mask"])[..., 0]) for r in records]


def _nearest(values, hw):
  """Nearest resize of raw mask values (the loader applies the foreground rule first)."""
  return np.asarray(Image.fromarray(values).resize((hw[1], hw[0]), Image.NEAREST))


def test_tfds_masks_through_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  root = str(tmp_path)
  even = ",".join(str(v) for v in range(0, 256, 2))
  with tfds.testing.mock_data(num_examples=6):
    raw = _raw_pet(tfds, "train", root)
    splits = seg_data.load_splits("tfds-masks:oxford_iiit_pet", data_root=root)
    train = seg_data.load("tfds-masks:oxford_iiit_pet:train", "all", data_root=root)
    chosen = seg_data.load(f"tfds-masks:oxford_iiit_pet:train:{even}", "all", data_root=root)
    parts = seg_data.load_splits("tfds-masks:oxford_iiit_pet:train:1", data_root=root, seed=1)
    again = seg_data.load_splits("tfds-masks:oxford_iiit_pet:train:1", data_root=root, seed=1)
  # The mock's images have random (None-dim) sizes, and masks other sizes than their images:
  # everything is resized to the first image's size.
  assert len({image.shape for image, _ in raw} | {mask.shape for _, mask in raw}) > 1
  hw = raw[0][0].shape[:2]
  # No split named: the dataset's train / validation / test (the mock serves every split).
  uri = "tfds-masks:oxford_iiit_pet"
  assert [s.name for s in splits] == [f"{uri}[train]", f"{uri}[val]", f"{uri}[test]"]
  for s in splits:
    assert s.images.shape == (6, *hw, 3) and s.images.dtype == np.float32
    assert s.masks.shape == (6, *hw) and s.masks.dtype == bool
    assert 0 <= s.images.min() <= s.images.max() <= 1
  np.testing.assert_array_equal(splits.train.images, train.images)   # train comes first
  np.testing.assert_allclose(train.images[0], raw[0][0] / 255, atol=1e-6)   # not resized
  for i, (_, mask) in enumerate(raw):   # nonzero by default; else the values named
    np.testing.assert_array_equal(train.masks[i], _nearest(mask, hw) != 0)
    np.testing.assert_array_equal(chosen.masks[i], _nearest(mask, hw) % 2 == 0)
  assert 0 < chosen.masks.mean() < 1
  # A named split: 80/10/10 by the seed, the same each time, the parts disjoint and covering it.
  assert [len(p.images) for p in parts] == [5, 1, 0]
  for p, q in zip(parts, again):
    np.testing.assert_array_equal(p.images, q.images)
  key = lambda images: sorted(images.sum(axis=(1, 2, 3)).round(4).tolist())
  assert key(np.concatenate([p.images for p in parts])) == key(train.images)


@pytest.mark.parametrize("rest, parsed", [
    ("pets", ("pets", None, None)),
    ("pets:train", ("pets", "train", None)),
    ("pets:train:1", ("pets", "train", (1,))),
    ("pets:3,1,3", ("pets", None, (1, 3))),             # digits and commas alone: values
    ("pets/config:test:2", ("pets/config", "test", (2,))),
    ("pets:train[:80%]", ("pets", "train[:80%]", None)),   # a slice holds ":"
    ("pets:train[:80%]:1", ("pets", "train[:80%]", (1,))),
])
def test_tfds_masks_uri_parse(rest, parsed):
  assert seg_data._tfds_parts(rest, "tfds-masks:" + rest) == parsed


@pytest.mark.parametrize("uri, message", [
    ("tfds-masks:pets:", r"expected tfds-masks:<name>\[:<split>\]\[:<foreground values>\]"),
    ("tfds-masks::train", r"expected tfds-masks:<name>"),
    ("tfds-masks:pets::1", "empty split"),
])
def test_tfds_masks_bad_uris(uri, message):
  with pytest.raises(DatasetError, match=message) as e:
    seg_data.load(uri)
  assert str(e.value).startswith(repr(uri)) and "\n" not in str(e.value)


def test_tfds_masks_unknown_dataset_or_features(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6):
    for uri, message in [("tfds-masks:no_such_dataset", "not found"),
                         ("tfds-masks:mnist:train", "dataset 'mnist' has no 'segmentation_mask' "
                          "feature (features: image, label)")]:
      with pytest.raises(DatasetError) as e:
        seg_data.load(uri, "all", data_root=str(tmp_path))
      assert str(e.value).startswith(repr(uri)) and message in str(e.value), str(e.value)
      assert "\n" not in str(e.value)


def test_tfds_masks_is_a_segmentation_uri_and_tfds_is_optional(monkeypatch):
  from rpe_jax.tasks import contract
  assert contract.uri_task_name("tfds-masks:oxford_iiit_pet:train:1") == "segmentation"
  assert seg_data.members("tfds-masks:oxford_iiit_pet") == ["tfds-masks:oxford_iiit_pet"]
  monkeypatch.setitem(__import__("sys").modules, "tensorflow_datasets", None)   # not installed
  with pytest.raises(DatasetError, match=r"^'tfds-masks:pets' needs tensorflow-datasets "
                     r"\(pip install tensorflow-datasets\)$"):
    seg_data.load("tfds-masks:pets")


def test_resize_helpers():
  x = np.linspace(0, 1, 4 * 6 * 3, dtype=np.float32).reshape(4, 6, 3)
  assert seg_data._resize_image(x, (4, 6)) is x   # the first image's size: untouched
  y = seg_data._resize_image(x, (8, 3))
  assert y.shape == (8, 3, 3) and y.dtype == np.float32 and 0 <= y.min() <= y.max() <= 1
  # Bilinear as PIL does it on 8-bit images (images._read_folder), without rounding to 8 bits.
  eight = np.round(x * 255).astype(np.uint8)
  pil = np.asarray(Image.fromarray(eight).resize((3, 8), Image.BILINEAR)) / 255
  np.testing.assert_allclose(y, pil, atol=2 / 255)
  flat = seg_data._resize_image(np.full((5, 7, 1), 0.25, np.float32), (9, 2))
  np.testing.assert_allclose(flat, 0.25, atol=1e-6)
  # Nearest for masks: doubling the size repeats every pixel, and shrinking keeps only pixels
  # of the mask (a bool stays a bool).
  m = np.random.default_rng(0).random((5, 7)) > 0.5
  big = seg_data._resize_mask(m, (10, 14))
  assert big.dtype == bool and big.shape == (10, 14)
  np.testing.assert_array_equal(big, np.repeat(np.repeat(m, 2, 0), 2, 1))
  np.testing.assert_array_equal(seg_data._resize_mask(big, (5, 7)), m)


def test_a_mixed_site_target_is_its_sites_splits_in_order():
  from rpe_jax.tasks import images
  mixed = seg_data.load_splits("sites:organs/blur+noisy:16")
  parts = [seg_data.load_splits(f"sites:organs/{s}:16") for s in ("blur", "noisy")]
  for split in ("train", "val", "test"):
    got = getattr(mixed, split)
    np.testing.assert_array_equal(got.images, np.concatenate(
        [getattr(p, split).images for p in parts]))
    np.testing.assert_array_equal(got.masks, np.concatenate(
        [getattr(p, split).masks for p in parts]))
  assert len(seg_data.load("sites:organs/blur+noisy:16", "all").images) == 2 * seg_data.PER_SITE
  digits = images.load_splits("sites:digits/blur+noisy:16")
  alone = images.load_splits("sites:digits/noisy:16")
  np.testing.assert_array_equal(digits.test.labels[-len(alone.test):], alone.test.labels)
  with pytest.raises(ValueError, match="distinct sites"):
    images.load_splits("sites:digits/blur+blur")

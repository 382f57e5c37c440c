"""Segmentation datasets by URI (the SAM task's data; ``rpe_jax.tasks.images`` is the
classification counterpart and shares its ``DatasetError``).

URIs (``load(uri, split)`` / ``load_splits(uri)``):

* ``masks:<images folder>[:<masks folder>]`` — image / mask pairs matched by file stem
  (``a.png`` in one folder, ``a.png`` or ``a.npy`` in the other); relative folders are
  resolved against ``data_root`` when one is given, and folder names cannot hold ":".
  Images are any image PIL reads (gray, 16-bit gray → 1 channel; anything else → RGB) or
  ``.npy`` arrays [H, W] or [H, W, 1|3] (uint8, uint16, bool, or float in [0, 1]); a folder
  mixing gray and RGB images is read as RGB (gray repeated: lossless). Masks are images or
  ``.npy`` arrays [H, W] (or [H, W, 1]): nonzero is foreground (a mask image's alpha channel
  is ignored). Every image needs a mask and every mask an image, all images one size and
  each mask its image's size.
  Without a masks folder the dataset is unlabeled (``masks`` None): a target to compose for.
  Files of other types (``README.txt``) and hidden files are ignored, as in ``folder:``.
  The files, sorted by stem, are divided 70/15/15 by a permutation seeded by ``seed``.
* ``sites:organs[/<site>][:<size>]`` — built-in: the organ phantoms (``load_site``)
  rendered at each acquisition site (``SITES``), ``PER_SITE``
  images per site at ``size`` pixels (default 32; a multiple of 16, the tiny SAM's rule),
  divided 60/20/20 by ``seed`` (which also seeds the phantoms). ``load_site``,
  which the benchmarks use, is the same generator with its own train / test counts: at its
  defaults (96 + 64) its images are these 160, in order. ``sites:organs/<a>+<b>+…`` mixes
  sites in equal proportions: each split is the members' splits, one after the other.
* ``sites:organs-graded[/<site>][:<size>]`` — the same phantoms at graded mixtures of three
  base shifts (``rpe_jax.tasks.sites.GRADED_SITES``): sites whose shifts overlap.
* ``tfds-masks:<name>[:<split>][:<foreground values>]`` — a tensorflow-datasets segmentation
  dataset (one with an ``image`` and a ``segmentation_mask`` feature, e.g. ``oxford_iiit_pet``,
  whose trimap is 1 pet, 2 background, 3 border) read through tfds' random-access
  ``data_source`` (array_record; no TensorFlow, no download) with ``data_root`` as the data
  dir. ``<name>`` is everything before the first ":" (``name/config`` works; a ``:version``
  does not). The last ":" field is the foreground values when it is digits and commas alone
  (``1`` or ``1,3``: a mask pixel is foreground when its value is in that set; without it,
  nonzero is foreground); everything between the name and the values is the split, so a
  digits-only split name cannot be given, and a sliced split (``train[:80%]``) can. Without a
  split, the dataset's train / validation / test splits are used when it has all three
  (``all``: them, in that order), else its train split is divided 80/10/10 by ``seed``; a
  named split is divided 80/10/10 by ``seed`` (``all``: that split). Images and masks of
  another size than the first image are resized to it (images bilinear, masks nearest); a
  mask [H, W, 1] is squeezed.

``split`` is "train", "val", "test" or "all" (the whole dataset, in file order). A family URI
(``sites:organs``) names several datasets: ``members(uri)`` lists them. Images are float32
[N, H, W, C] in [0, 1] (uint8 divided by 255), masks bool [N, H, W]. Everything malformed
raises ``DatasetError`` (a ``ValueError``) with one line naming the file, folder or URI.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import numpy as np

from rpe_jax.tasks import sites
from rpe_jax.tasks.images import DatasetError, parse_uri, seeded_parts, tfds_records
from rpe_jax.tasks.sites import SITES

SCHEMES = ("masks", "sites", "tfds-masks")
SPLITS = ("train", "val", "test", "all")
PER_SITE = 160          # phantoms per built-in site: 96 / 32 / 32, a fraction of a second
_BUILTIN_SIZE = 32
_FILE_FRACTIONS = (0.7, 0.15)    # train, val; test is the rest
_BUILTIN_FRACTIONS = (0.6, 0.2)
_TFDS_FRACTIONS = (0.8, 0.1)     # as the classification tfds: URIs
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npy")


class SegDataset(NamedTuple):
  """images float32 [N, H, W, C] in [0, 1] (C = 1 gray or 3); masks bool [N, H, W], or None
  for an unlabeled dataset (a target to compose for: its prototype needs no masks); a name.
  Datasets by URI: ``rpe_jax.tasks.seg_data``."""

  images: np.ndarray
  masks: np.ndarray | None
  name: str


def check_dataset(ds: SegDataset) -> SegDataset:
  images = np.asarray(ds.images)
  masks = None if ds.masks is None else np.asarray(ds.masks)
  if images.ndim != 4 or (masks is not None and masks.shape != images.shape[:3]):
    raise ValueError(f"dataset {ds.name!r}: images must be [N, H, W, C] and masks [N, H, W], "
                     f"got {images.shape} and {None if masks is None else masks.shape}")
  if len(images) == 0:
    raise ValueError(f"dataset {ds.name!r} is empty")
  if not np.all(np.isfinite(images)):
    raise ValueError(f"dataset {ds.name!r}: images contain NaN or Inf")
  return SegDataset(images.astype(np.float32), None if masks is None else masks.astype(bool),
                    ds.name)


def _require_masks(ds: SegDataset, why: str, hint: str = "") -> None:
  """Ground truth is needed for box prompts, DICE and training; an unlabeled dataset has none."""
  if ds.masks is None:
    raise ValueError(f"{why}; dataset {ds.name!r} has none{hint}")


# --- the built-in family ----------------------------------------------------------------------

def _anatomy(n: int, size: int, rng: np.random.Generator):
  """Clean images [n, size, size] and organ masks [n, size, size] before any site shift."""
  t = (np.arange(size) + 0.5) / size * 2 - 1
  yy, xx = np.meshgrid(t, t, indexing="ij")
  images = np.empty((n, size, size), np.float32)
  masks = np.empty((n, size, size), bool)
  for i in range(n):
    # Body outline and smooth tissue texture.
    body = (xx / 0.92) ** 2 + (yy / 0.82) ** 2 < 1
    k = rng.normal(size=(3, 2))
    tissue = 0.38 + 0.06 * np.sin(3 * (k[0, 0] * xx + k[0, 1] * yy) + k[1, 0]) \
        + 0.04 * np.cos(5 * (k[2, 0] * xx + k[2, 1] * yy))
    # The organ: r(θ) = r0 (1 + Σ a_j cos(jθ + φ_j)) in a rotated, stretched frame.
    cy, cx = rng.uniform(-0.35, 0.35, 2)
    r0, aspect, angle = rng.uniform(0.2, 0.34), rng.uniform(0.7, 1.3), rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    r, theta = np.hypot(u * aspect, v / aspect), np.arctan2(v, u)
    lobes = sum(rng.normal(0, 0.07) * np.cos(j * theta + rng.uniform(0, 2 * np.pi))
                for j in (2, 3, 4))
    organ = r < r0 * (1 + lobes)
    # The distractor: a dark disc that does not touch the organ.
    for _ in range(20):
      dy, dx = rng.uniform(-0.55, 0.55, 2)
      rd = rng.uniform(0.12, 0.2)
      disc = (xx - dx) ** 2 + (yy - dy) ** 2 < rd ** 2
      if not np.any(disc & np.pad(organ, 1)[1:-1, 1:-1]) and not np.any(
          disc & (np.hypot(xx - cx, yy - cy) < r0 * 1.5)):
        break
    x = np.where(body, tissue, 0.05)
    texture = 0.05 * np.sin(9 * u + 2 * k[1, 1]) * np.cos(7 * v)
    x = np.where(organ, 0.78 + texture, x)
    x = np.where(disc, 0.12, x)
    images[i], masks[i] = x, organ
  return images, masks


def _stream_offset(table: dict[str, dict]) -> int:
  """Where a family's random streams start (0 for ``SITES``: its data stay as they were)."""
  return 0 if table is SITES else 200


def apply_site(images: np.ndarray, masks: np.ndarray, site: str, *, seed: int = 0,
               table: dict[str, dict] = SITES):
  """Apply the acquisition shift of ``site`` (``rpe_jax.tasks.sites``; ``table``: the
  family's sites, default ``SITES``) to clean images [N, H, W] (masks follow only the
  geometric part). Returns (images float32 [N, H, W, 1] in [0, 1], masks bool [N, H, W])."""
  if site not in table:
    raise ValueError(f"unknown segmentation site {site!r}; sites: {', '.join(table)}")
  rng = np.random.default_rng([seed, _stream_offset(table) + sites.site_index(site, table), 7])
  x, m = sites.render(images.astype(np.float64), site, images.shape[1], rng, masks=masks,
                      sites=table)
  return x.astype(np.float32)[..., None], m


class SiteSplits(NamedTuple):
  """``load_site``'s two parts."""

  train: SegDataset
  test: SegDataset


def load_site(site: str, *, size: int = 32, n_train: int = 96, n_test: int = 64,
              seed: int = 0, table: dict[str, dict] = SITES) -> SiteSplits:
  """One site of a built-in family (``table``, default ``SITES``): fresh anatomy per site
  (seeded by site and seed)."""
  if site not in table:
    raise ValueError(f"unknown segmentation site {site!r}; sites: {', '.join(table)}")
  if size < 16:
    raise ValueError(f"size must be >= 16, got {size}")
  rng = np.random.default_rng([seed, _stream_offset(table) + list(table).index(site), 3])
  clean, masks = _anatomy(n_train + n_test, size, rng)
  images, masks = apply_site(clean, masks, site, seed=seed, table=table)
  name = f"seg:{site}"
  return SiteSplits(SegDataset(images[:n_train], masks[:n_train], f"{name}/train"),
                   SegDataset(images[n_train:], masks[n_train:], f"{name}/test"))


class SegSplits(NamedTuple):
  train: SegDataset
  val: SegDataset
  test: SegDataset


def _subset(ds: SegDataset, index, name: str) -> SegDataset:
  return SegDataset(ds.images[index], None if ds.masks is None else ds.masks[index], name)


def _consecutive_parts(lengths) -> tuple:
  """Train/val/test indices of a dataset that is its three splits concatenated."""
  ends = np.cumsum(lengths)
  return tuple(np.arange(end - n, end) for n, end in zip(lengths, ends))


def _split(ds: SegDataset, parts) -> SegSplits:
  return SegSplits(*(_subset(ds, p, f"{ds.name}[{s}]")
                     for p, s in zip(parts, SegSplits._fields)))


# --- URIs ----------------------------------------------------------------------------------

def _scheme(uri: str) -> tuple[str, str]:
  return parse_uri(uri, SCHEMES, "segmentation")


def _read(uri: str, data_root: str | None, seed: int) -> tuple[SegDataset, tuple]:
  """The whole dataset ``uri`` names and its train/val/test indices."""
  scheme, rest = _scheme(uri)
  if scheme == "tfds-masks":
    return _read_tfds(rest, uri, data_root, seed)
  if scheme == "masks":
    ds, fractions = _read_masks(rest, uri, data_root), _FILE_FRACTIONS
  else:
    ds, fractions = _read_site(rest, uri, seed), _BUILTIN_FRACTIONS
  return ds, seeded_parts(len(ds.images), fractions, seed)


def load_splits(uri: str, *, data_root: str | None = None, seed: int = 0) -> SegSplits:
  """The train/val/test splits of the dataset ``uri`` names (see the module docstring)."""
  from rpe_jax.tasks.images import mixed_sites
  members_ = mixed_sites(uri)
  if members_:   # a mixed-site target: each split is the members' splits, in order
    parts = [load_splits(m, data_root=data_root, seed=seed) for m in members_]
    return SegSplits(*(_concat([getattr(p, s) for p in parts], f"{uri}[{s}]")
                       for s in SegSplits._fields))
  ds, parts = _read(uri, data_root, seed)
  return _split(ds, parts)


def _concat(sets, name: str) -> SegDataset:
  masks = None if any(d.masks is None for d in sets) else np.concatenate([d.masks for d in sets])
  return SegDataset(np.concatenate([d.images for d in sets]), masks, name)


def load(uri: str, split: str = "test", *, data_root: str | None = None,
         seed: int = 0) -> SegDataset:
  """One split ("train", "val", "test", or "all": every image, in file order) of ``uri``."""
  if split not in SPLITS:
    raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
  if split == "all":
    from rpe_jax.tasks.images import mixed_sites
    if mixed_sites(uri):
      splits = load_splits(uri, data_root=data_root, seed=seed)
      return _concat(list(splits), f"{uri}[all]")
    return _read(uri, data_root, seed)[0]
  return getattr(load_splits(uri, data_root=data_root, seed=seed), split)


def members(uri: str) -> list[str]:
  """The dataset URIs of a family (``sites:organs`` → one per site); ``[uri]`` otherwise."""
  scheme, rest = _scheme(uri)
  if scheme == "sites":
    family, site, size = _builtin_parts(rest, uri)
    if site is None:
      suffix = f":{size}" if size != _BUILTIN_SIZE else ""
      return [f"sites:{family}/{s}{suffix}" for s in sites.family_table(family, "organs")]
  return [uri]


# --- image / mask folders ------------------------------------------------------------------

def _one_line(e: Exception) -> str:
  lines = str(e).splitlines()
  return lines[0] if lines else type(e).__name__


def _files_by_stem(folder: str, uri: str, what: str) -> dict[str, str]:
  """{stem: path} of the image and .npy files in ``folder``; two files of one stem are an
  error (which one is meant?)."""
  if not os.path.isdir(folder):
    raise DatasetError(f"{uri!r}: {what} folder {folder} does not exist")
  by_stem: dict[str, str] = {}
  for f in sorted(os.listdir(folder)):
    path = os.path.join(folder, f)
    if f.startswith(".") or not f.lower().endswith(_IMAGE_EXTENSIONS) or not os.path.isfile(path):
      continue
    stem = os.path.splitext(f)[0]
    if stem in by_stem:
      raise DatasetError(f"{path} and {by_stem[stem]} share the stem {stem!r}; keep one "
                         f"{what[:-1]} per stem")
    by_stem[stem] = path
  if not by_stem:
    raise DatasetError(f"{what} folder {folder} holds no {what} "
                       f"({', '.join(_IMAGE_EXTENSIONS)})")
  return by_stem


def _load_npy(path: str) -> np.ndarray:
  try:
    x = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:   # pickled objects, bad header, truncated
    raise DatasetError(f"{path}: not a readable .npy array ({_one_line(e)})") from e
  if not isinstance(x, np.ndarray):   # np.load of an .npz-in-disguise
    raise DatasetError(f"{path}: not a single .npy array")
  if x.dtype.kind not in "biuf":
    raise DatasetError(f"{path}: dtype {x.dtype} is not a number type")
  if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
    raise DatasetError(f"{path}: contains NaN or Inf")
  return x


def _open_image(path: str):
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      im.load()
      return im.copy()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DatasetError(f"{path}: unreadable image ({_one_line(e)})") from e


def _unit_range(x: np.ndarray, path: str) -> np.ndarray:
  """uint8 / 255, uint16 / 65535, bool as 0 / 1, float as is (it must lie in [0, 1]): float32
  in [0, 1]. Other integer types are refused rather than guessed at (which maximum?)."""
  if x.dtype in (np.uint8, np.uint16):
    return (x.astype(np.float64) / np.iinfo(x.dtype).max).astype(np.float32)
  if x.dtype == bool or (x.dtype.kind == "f" and (not x.size or (x.min() >= 0 and x.max() <= 1))):
    return x.astype(np.float32)
  span = f"values in [{x.min()}, {x.max()}]" if x.size and x.dtype.kind == "f" else "values"
  raise DatasetError(f"{path}: {x.dtype} {span}; expected uint8, uint16, or float in [0, 1]")


def _read_image(path: str) -> np.ndarray:
  """One image as float32 [H, W, C] in [0, 1], C = 1 (gray) or 3."""
  if path.lower().endswith(".npy"):
    x = _load_npy(path)
    if x.ndim == 2:
      x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3):
      raise DatasetError(f"{path}: array of shape {x.shape}; expected [H, W] or [H, W, 1|3]")
    return _unit_range(x, path)
  im = _open_image(path)
  if im.mode.startswith("I") or im.mode == "F":   # 16-bit gray (I;16, or I), float gray
    x = np.asarray(im)       # converting to "L" would clip 16-bit values at 255: keep the depth
    if x.dtype.kind == "i" and x.size and x.min() >= 0 and x.max() <= 65535:
      x = x.astype(np.uint16)
    return _unit_range(x, path)[..., None]
  gray = im.mode in ("1", "L", "LA")
  x = np.asarray(im.convert("L" if gray else "RGB"))
  return _unit_range(x if x.ndim == 3 else x[..., None], path)


def _read_mask(path: str) -> np.ndarray:
  """One mask as bool [H, W]: nonzero is foreground."""
  if path.lower().endswith(".npy"):
    x = _load_npy(path)
    if x.ndim == 3 and x.shape[-1] == 1:
      x = x[..., 0]
    if x.ndim != 2:
      raise DatasetError(f"{path}: mask array of shape {x.shape}; expected [H, W]")
    return x != 0
  im = _open_image(path)
  x = np.asarray(im)
  if im.mode.endswith("A"):   # LA, RGBA, PA: the alpha channel says nothing about the organ
    x = x[..., :-1]
  return (x != 0).any(axis=-1) if x.ndim == 3 else x != 0


def _rgb_if_any(images: list) -> list:
  """Gray images repeated to RGB (lossless) when any image is RGB: one channel count."""
  if any(x.shape[-1] == 3 for x in images):
    return [np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x for x in images]
  return images


def _hw(x: np.ndarray) -> str:
  return f"{x.shape[0]}×{x.shape[1]}"


def _read_masks(rest: str, uri: str, data_root: str | None) -> SegDataset:
  parts = rest.split(":")
  if len(parts) > 2 or not all(parts):
    raise DatasetError(f"{uri!r}: expected masks:<images folder>[:<masks folder>]")
  folders = [p if os.path.isabs(p) or data_root is None else os.path.join(data_root, p)
             for p in parts]
  image_files = _files_by_stem(folders[0], uri, "images")
  mask_files = _files_by_stem(folders[1], uri, "masks") if len(folders) == 2 else None
  if mask_files is not None:
    for stem, path in image_files.items():
      if stem not in mask_files:
        raise DatasetError(f"image {path} has no mask {stem}.* in {folders[1]}")
    for stem, path in mask_files.items():
      if stem not in image_files:
        raise DatasetError(f"mask {path} has no image {stem}.* in {folders[0]}")
  stems = sorted(image_files)
  images = [_read_image(image_files[s]) for s in stems]
  first = image_files[stems[0]]
  for s, x in zip(stems, images):
    if x.shape[:2] != images[0].shape[:2]:
      raise DatasetError(f"image {image_files[s]} is {_hw(x)} but {first} is {_hw(images[0])}; "
                         "all images must have one size")
  images = _rgb_if_any(images)
  masks = None
  if mask_files is not None:
    masks = [_read_mask(mask_files[s]) for s in stems]
    for s, m in zip(stems, masks):
      if m.shape != images[0].shape[:2]:
        raise DatasetError(f"mask {mask_files[s]} is {_hw(m)} but its image is "
                           f"{_hw(images[0])}")
    masks = np.stack(masks)
  return SegDataset(np.stack(images), masks, uri)


# --- the built-in family -------------------------------------------------------------------

def _builtin_parts(rest: str, uri: str):
  body, _, size = rest.partition(":")
  family, _, site = body.partition("/")
  if family in sites.family_names("digits"):
    raise DatasetError(f"{uri!r} is a classification dataset family (rpe_jax.tasks.images), "
                       "not a segmentation one")
  table = sites.family_table(family, "organs")
  if table is None:
    raise DatasetError(f"{uri!r}: unknown built-in family {family!r} (available: "
                       f"{', '.join(sites.family_names('organs'))})")
  if size and (not size.isdigit() or int(size) < 16 or int(size) % 16):
    raise DatasetError(f"{uri!r}: size must be a multiple of 16, got {size!r}")
  if site and site not in table:
    raise DatasetError(f"{uri!r}: unknown site {site!r}; sites: {', '.join(table)}")
  return family, site or None, int(size) if size else _BUILTIN_SIZE


def _read_site(rest: str, uri: str, seed: int) -> SegDataset:
  family, site, size = _builtin_parts(rest, uri)
  if site is None:
    raise DatasetError(f"{uri!r} is a family of sites; load one of: {', '.join(members(uri))}")
  # load_site's generator, all of it as one pool (its own two-way split is the benchmarks').
  whole = load_site(site, size=size, n_train=PER_SITE, n_test=0, seed=seed,
                    table=sites.family_table(family, "organs")).train
  return whole._replace(name=uri)


# --- tensorflow-datasets -------------------------------------------------------------------

_TFDS_IMAGE, _TFDS_MASK = "image", "segmentation_mask"
_FOREGROUND = re.compile(r"\d+(,\d+)*")


def _tfds_parts(rest: str, uri: str) -> tuple[str, str | None, tuple[int, ...] | None]:
  """``<name>[:<split>][:<foreground values>]`` → (name, split or None, values or None): the
  last field is the values when it is digits and commas alone, the rest after the name the
  split (which may hold ":", as a slice ``train[:80%]`` does)."""
  name, sep, tail = rest.partition(":")
  if not name or (sep and not tail):
    raise DatasetError(f"{uri!r}: expected tfds-masks:<name>[:<split>][:<foreground values>]")
  split, values = tail, None
  head, sep, last = tail.rpartition(":")
  if _FOREGROUND.fullmatch(last):
    if sep and not head:
      raise DatasetError(f"{uri!r}: empty split; expected "
                         "tfds-masks:<name>[:<split>][:<foreground values>]")
    split, values = head, tuple(sorted({int(v) for v in last.split(",")}))
  return name, split or None, values


def _import_tfds(uri: str):
  try:
    import tensorflow_datasets as tfds  # lazy: optional dependency
  except ImportError as e:
    raise DatasetError(f"{uri!r} needs tensorflow-datasets "
                       "(pip install tensorflow-datasets)") from e
  return tfds


def _tfds_builder(tfds, name: str, uri: str, data_root: str | None):
  """The dataset's builder, refused unless it has the image and mask features."""
  try:
    builder = tfds.builder(name, data_dir=data_root)
  except Exception as e:  # DatasetNotFoundError lists every dataset: keep the first line
    raise DatasetError(f"{uri!r}: {_one_line(e)}") from e
  features = list(builder.info.features)
  missing = [k for k in (_TFDS_IMAGE, _TFDS_MASK) if k not in features]
  if missing:
    raise DatasetError(f"{uri!r}: dataset {name!r} has no {' or '.join(map(repr, missing))} "
                       f"feature (features: {', '.join(features)})")
  return builder


def _tfds_splits(builder, uri: str) -> list[str]:
  """train / validation / test when the dataset has all three, else train alone."""
  available = list(builder.info.splits) or ["train", "validation", "test"]
  if "train" not in available:
    raise DatasetError(f"{uri!r} has no train split (splits: {available}); name one")
  val = next((s for s in ("validation", "val", "valid") if s in available), None)
  return ["train", val, "test"] if val and "test" in available else ["train"]


def _tfds_image(x, where: str) -> np.ndarray:
  """One record's image as float32 [H, W, 1|3] in [0, 1]."""
  x = np.asarray(x)
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 3):
    raise DatasetError(f"{where}: image of shape {x.shape}; expected [H, W] or [H, W, 1|3]")
  return _unit_range(x, where)


def _tfds_mask(x, values, where: str) -> np.ndarray:
  """One record's mask as bool [H, W]: its value in ``values`` (None: nonzero)."""
  x = np.asarray(x)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim != 2:
    raise DatasetError(f"{where}: mask of shape {x.shape}; expected [H, W] or [H, W, 1]")
  return x != 0 if values is None else np.isin(x, values)


def _resize_image(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """float32 [H, W, C] → [h, w, C], bilinear (PIL, each channel as a float image, so no
  rounding to 8 bits)."""
  if x.shape[:2] == tuple(hw):
    return x
  from PIL import Image
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c], np.float32))
                         .resize((hw[1], hw[0]), Image.BILINEAR)) for c in range(x.shape[-1])]
  return np.clip(np.stack(channels, axis=-1), 0, 1).astype(np.float32)


def _resize_mask(m: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """bool [H, W] → [h, w], nearest: every pixel is one of the mask's (no new labels)."""
  if m.shape == tuple(hw):
    return m
  from PIL import Image
  return np.asarray(Image.fromarray(m.astype(np.uint8)).resize((hw[1], hw[0]),
                                                                Image.NEAREST)) != 0


def _read_tfds(rest: str, uri: str, data_root: str | None, seed: int):
  """The examples of the splits ``uri`` names, one size (the first image's), and their
  train/val/test indices: the dataset's own splits, or seeded fractions of one split."""
  name, split, values = _tfds_parts(rest, uri)
  tfds = _import_tfds(uri)
  builder = _tfds_builder(tfds, name, uri, data_root)
  splits = [split] if split else _tfds_splits(builder, uri)
  images, masks, lengths = [], [], []
  for s in splits:
    records = tfds_records(tfds, name, s, uri, data_root)
    lengths.append(len(records))
    for i, r in enumerate(records):
      where = f"{uri!r} split {s!r} example {i}"
      images.append(_tfds_image(r[_TFDS_IMAGE], where))
      masks.append(_tfds_mask(r[_TFDS_MASK], values, where))
  hw = images[0].shape[:2]
  images = _rgb_if_any([_resize_image(x, hw) for x in images])
  ds = SegDataset(np.stack(images), np.stack([_resize_mask(m, hw) for m in masks]), uri)
  if len(lengths) == 3:
    return ds, _consecutive_parts(lengths)
  return ds, seeded_parts(len(ds.images), _TFDS_FRACTIONS, seed)

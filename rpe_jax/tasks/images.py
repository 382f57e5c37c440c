"""Labeled image datasets by URI (the image tasks' data; batching: ``rpe_jax.batching``).

URIs (``load(uri, split)`` / ``load_splits(uri)``):

* ``medmnist:<flag>[:<size>]`` — the official MedMNIST file ``<data_root>/<flag>.npz`` (28 px)
  or ``<flag>_<size>.npz`` with ``{train,val,test}_{images,labels}``; class names from the
  ``medmnist`` package's ``INFO`` when installed (``pip install --no-deps medmnist``), else
  inferred from the labels.
* ``tfds:<name>[:<split>]`` — tensorflow-datasets' random-access ``data_source`` (array_record;
  needs no TensorFlow) from ``data_root`` as the data dir. Without a split the dataset's
  train / validation / test splits are used; with one, that split is divided 80/10/10.
* ``folder:<path>`` — one subfolder per class (``<path>/<class>/*.png``), divided 70/15/15 by
  ``seed``; or ``<path>/{train,val,test}/<class>/...`` when those folders exist.
* ``sites:digits[/<site>][:<size>]`` — built-in: scikit-learn's 1797 real 8×8 digit scans
  rendered at several acquisition sites (``SITES``), each with its own documented shift.
  ``sites:digits/<a>+<b>+…`` mixes sites in equal proportions (``mixed_sites``).
* ``sites:digits-graded[/<site>][:<size>]`` — the same scans at graded mixtures of three base
  shifts (``rpe_jax.tasks.sites.GRADED_SITES``): sites whose shifts overlap.
* ``tasks:digits[/<task>][:<size>]`` — built-in multi-task family (Med-LEGO): different label
  tasks (``TASKS``) on different image subsets and renderings.

A family URI (``sites:digits``) names several datasets: ``members(uri)`` lists them.
Everything malformed raises ``DatasetError`` naming the file or URI and what is wrong.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Callable, NamedTuple

import numpy as np

from rpe_jax.tasks import sites
from rpe_jax.tasks.sites import SITES


class DatasetError(ValueError):
  """A dataset URI, file or folder that cannot be read as a labeled image dataset."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
  """An in-memory labeled image dataset: images [N, H, W, C] (uint8, or float in [0, 1])."""

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str
  class_names: tuple[str, ...]

  def __post_init__(self):
    if self.images.ndim != 4:
      raise DatasetError(f"{self.name}: images must be [N, H, W, C], got shape {self.images.shape}")
    if self.labels.shape != (self.images.shape[0],):
      raise DatasetError(f"{self.name}: {self.images.shape[0]} images but labels of shape "
                         f"{self.labels.shape}")
    if len(self.class_names) != self.num_classes:
      raise DatasetError(f"{self.name}: {len(self.class_names)} class names for "
                         f"{self.num_classes} classes")
    if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
      raise DatasetError(f"{self.name}: labels span [{self.labels.min()}, {self.labels.max()}], "
                         f"outside [0, {self.num_classes})")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def subset(self, index) -> "ImageDataset":
    return dataclasses.replace(self, images=self.images[index], labels=self.labels[index])


class Splits(NamedTuple):
  train: ImageDataset
  val: ImageDataset
  test: ImageDataset


def _dataset(images, labels, class_names, name) -> ImageDataset:
  images = np.asarray(images)
  if images.ndim == 3:   # grayscale [N, H, W]
    images = images[..., None]
  return ImageDataset(images, np.asarray(labels).astype(np.int32), len(class_names), name,
                      tuple(class_names))


def seeded_parts(n: int, fractions, seed: int) -> tuple:
  """Train/val/test indices (each sorted) of n examples by a permutation seeded by ``seed``:
  the first round(f_train·n) for train, the next round(f_val·n) for val, the rest for test.
  Every task's data divides by this one draw."""
  perm = np.random.default_rng(seed).permutation(n)
  n_train, n_val = int(round(fractions[0] * n)), int(round(fractions[1] * n))
  parts = (perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:])
  return tuple(np.sort(p) for p in parts)


def _split_fractions(ds: ImageDataset, fractions, seed: int) -> Splits:
  """Divide one dataset into train/val/test by a seeded permutation (``seeded_parts``)."""
  return Splits(*(dataclasses.replace(ds.subset(p), name=f"{ds.name}[{s}]")
                  for p, s in zip(seeded_parts(len(ds), fractions, seed), Splits._fields)))


# --- URIs ----------------------------------------------------------------------------------

def parse_uri(uri: str, schemes, kind: str = "") -> tuple[str, str]:
  """(scheme, rest) of a dataset URI ``scheme:rest``; ``DatasetError`` naming the URI when
  it has no scheme, one not in ``schemes``, or nothing after it. ``kind`` ("segmentation",
  "report") qualifies the messages of the other tasks' URIs."""
  what = f"{kind} dataset URI".strip()
  expected = ", ".join(s + ":" for s in schemes)
  if not isinstance(uri, str) or ":" not in uri:
    raise DatasetError(f"{what} {uri!r} has no scheme; expected one of {expected}")
  scheme, rest = uri.split(":", 1)
  if scheme not in schemes:
    raise DatasetError(f"unknown {what} scheme {scheme!r} in {uri!r}; expected one of "
                       f"{expected}")
  if not rest:
    raise DatasetError(f"dataset URI {uri!r} names no dataset")
  return scheme, rest


def _scheme(uri: str) -> tuple[str, str]:
  return parse_uri(uri, _LOADERS)


def load_splits(uri: str, *, data_root: str | None = None, seed: int = 0) -> Splits:
  """The train/val/test splits of the dataset ``uri`` names (see the module docstring)."""
  scheme, rest = _scheme(uri)
  parts = mixed_sites(uri)
  if parts:
    return _concat_splits([load_splits(p, data_root=data_root, seed=seed) for p in parts], uri)
  return _LOADERS[scheme](rest, uri, data_root, seed)


def mixed_sites(uri: str) -> list[str]:
  """The member URIs of a mixed-site URI ``sites:<family>/<a>+<b>+…[:<size>]`` (a target
  drawn from several built-in sites in equal proportions: each split is the members' splits
  one after the other); [] for any other URI."""
  scheme, _, rest = uri.partition(":")
  body, colon, size = rest.partition(":")
  family, _, sites_ = body.partition("/")
  if scheme != "sites" or "+" not in sites_:
    return []
  names = sites_.split("+")
  if len(set(names)) != len(names) or not all(names):
    raise DatasetError(f"{uri!r}: a mixed-site URI names distinct sites joined by '+'")
  return [f"sites:{family}/{n}{colon}{size}" for n in names]


def _concat_splits(parts, uri: str) -> Splits:
  def cat(split):
    sets = [getattr(p, split) for p in parts]
    return dataclasses.replace(sets[0], images=np.concatenate([d.images for d in sets]),
                               labels=np.concatenate([d.labels for d in sets]),
                               name=f"{uri}[{split}]")
  return Splits(*(cat(s) for s in Splits._fields))


def load(uri: str, split: str = "train", *, data_root: str | None = None,
         seed: int = 0) -> ImageDataset:
  """One split ("train", "val" or "test") of the dataset ``uri`` names."""
  if split not in Splits._fields:
    raise DatasetError(f"split must be one of {Splits._fields}, got {split!r}")
  return getattr(load_splits(uri, data_root=data_root, seed=seed), split)


def members(uri: str) -> list[str]:
  """The dataset URIs of a family (``sites:digits`` → one per site); ``[uri]`` otherwise."""
  scheme, rest = _scheme(uri)
  if scheme in ("sites", "tasks"):
    family, member, size = _builtin_parts(rest, uri)
    if member is None:
      names = _site_table(family) if scheme == "sites" else TASKS
      suffix = f":{size}" if size != _BUILTIN_SIZE else ""
      return [f"{scheme}:{family}/{m}{suffix}" for m in names]
  return [uri]


# --- medmnist -------------------------------------------------------------------------------

def _medmnist_info(flag: str) -> dict | None:
  """MedMNIST metadata from the installed package, without importing its torch datasets.

  ``import medmnist`` pulls in torch/torchvision dataset classes and prints to stdout when they
  fail; its ``info.py`` alone is a plain dict, so load that file directly.
  """
  import importlib.util
  spec = importlib.util.find_spec("medmnist")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "info.py")
  info_spec = importlib.util.spec_from_file_location("_medmnist_info", path)
  module = importlib.util.module_from_spec(info_spec)
  info_spec.loader.exec_module(module)
  if flag not in module.INFO:
    raise DatasetError(f"unknown MedMNIST flag {flag!r}; known: {', '.join(sorted(module.INFO))}")
  return module.INFO[flag]


def _load_medmnist(rest, uri, data_root, seed) -> Splits:
  flag, _, size = rest.partition(":")
  if size and not size.isdigit():
    raise DatasetError(f"{uri!r}: size must be an integer (28, 64, 128, 224), got {size!r}")
  if flag.endswith("3d"):
    raise DatasetError(f"{uri!r}: 3-D MedMNIST datasets are not supported")
  if data_root is None:
    raise DatasetError(f"{uri!r} needs a data root (--data-root) holding {flag}.npz")
  name = f"{flag}.npz" if size in ("", "28") else f"{flag}_{size}.npz"
  path = os.path.join(data_root, name)
  if not os.path.isfile(path):
    raise DatasetError(f"MedMNIST file {path} not found (download it from "
                       "https://zenodo.org/records/10519652)")
  try:
    with np.load(path, allow_pickle=False) as npz:
      keys = set(npz.files)
      need = [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")]
      missing = [k for k in need if k not in keys]
      if missing:
        raise DatasetError(f"{path}: missing keys {missing} (has {sorted(keys)})")
      arrays = {k: npz[k] for k in need}
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:   # EOFError: an empty file
    if isinstance(e, DatasetError):
      raise
    raise DatasetError(f"{path}: not a readable .npz file ({e})") from e
  info = _medmnist_info(flag)
  parts = []
  for split in ("train", "val", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
      raise DatasetError(f"{path}: {split}_images has shape {images.shape}; expected "
                         "[N, H, W] or [N, H, W, 1|3]")
    if labels.ndim == 2 and labels.shape[1] != 1:
      raise DatasetError(f"{path}: {split}_labels has shape {labels.shape}: multi-label tasks "
                         "are not supported")
    labels = labels.reshape(-1)
    if len(labels) != len(images):
      raise DatasetError(f"{path}: {len(images)} {split}_images but {len(labels)} {split}_labels")
    parts.append((images, labels))
  if info is not None:
    names = [info["label"][str(i)] for i in range(len(info["label"]))]
  else:   # no metadata: classes are the label values seen in any split
    n = 1 + max(int(lab.max()) for _, lab in parts if lab.size)
    names = [str(i) for i in range(n)]
  try:
    return Splits(*(_dataset(im, lab, names, f"{uri}[{s}]")
                    for (im, lab), s in zip(parts, Splits._fields)))
  except DatasetError as e:
    raise DatasetError(f"{path}: {e}") from e


# --- tensorflow-datasets --------------------------------------------------------------------

def tfds_records(tfds, name: str, split: str, uri: str, data_root: str | None) -> list:
  """Every record of a prepared tfds split (random access, no download); ``DatasetError``
  naming ``uri`` when it cannot be read or is empty."""
  try:
    source = tfds.data_source(name, split=split, data_dir=data_root, download=False)
    records = [source[i] for i in range(len(source))]
  except Exception as e:
    first = str(e).splitlines()
    raise DatasetError(f"{uri!r}: cannot read split {split!r} from data dir "
                       f"{data_root}: {first[0] if first else type(e).__name__}") from e
  if not records:
    raise DatasetError(f"{uri!r}: split {split!r} is empty")
  return records


def _load_tfds(rest, uri, data_root, seed) -> Splits:
  try:
    import tensorflow_datasets as tfds  # lazy: optional dependency
  except ImportError as e:
    raise DatasetError(f"{uri!r} needs tensorflow-datasets (pip install tensorflow-datasets)") from e
  name, _, split = rest.partition(":")
  try:
    builder = tfds.builder(name, data_dir=data_root)
  except Exception as e:  # DatasetNotFoundError lists every dataset: keep the first line
    raise DatasetError(f"{uri!r}: {str(e).splitlines()[0]}") from e
  image_key, label_key = builder.info.supervised_keys or ("image", "label")
  label_feature = builder.info.features[label_key]
  names = list(getattr(label_feature, "names", None) or [])

  def read(tfds_split) -> ImageDataset:
    records = tfds_records(tfds, name, tfds_split, uri, data_root)
    images = np.stack([np.asarray(r[image_key]) for r in records])
    labels = np.asarray([r[label_key] for r in records])
    return _dataset(images, labels, names or [str(i) for i in range(1 + labels.max())],
                    f"{uri}[{tfds_split}]")

  if split:
    return _split_fractions(read(split), (0.8, 0.1), seed)
  available = list(builder.info.splits) or ["train", "validation", "test"]
  val = next((s for s in ("validation", "val", "valid") if s in available), None)
  test = "test" if "test" in available else None
  if "train" not in available:
    raise DatasetError(f"{uri!r} has no train split (splits: {available})")
  if val is None or test is None:
    return _split_fractions(read("train"), (0.8, 0.1), seed)
  return Splits(read("train"), read(val), read(test))


# --- image folders --------------------------------------------------------------------------

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _read_folder(root: str, uri: str, class_names=None) -> ImageDataset:
  from PIL import Image, UnidentifiedImageError
  classes = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
  if not classes:
    raise DatasetError(f"{root}: no class subfolders (expected <folder>/<class>/<image>)")
  if class_names is not None and classes != list(class_names):
    raise DatasetError(f"{root}: classes {classes} differ from the train split's {list(class_names)}")
  images, labels, size, mode = [], [], None, None
  for label, cls in enumerate(classes):
    files = sorted(f for f in os.listdir(os.path.join(root, cls))
                   if f.lower().endswith(_IMAGE_EXTENSIONS) and not f.startswith("."))
    if not files:
      raise DatasetError(f"{os.path.join(root, cls)}: class folder holds no images "
                         f"({', '.join(_IMAGE_EXTENSIONS)})")
    for f in files:
      path = os.path.join(root, cls, f)
      try:
        with Image.open(path) as im:
          im.load()
          # One colour mode for the whole folder: the first image's (gray stays 1 channel).
          mode = mode or ("L" if im.mode in ("L", "1", "I;16", "I") else "RGB")
          size = size or im.size
          im = im.convert(mode)
          if im.size != size:   # mixed sizes: everything at the first image's size
            im = im.resize(size, Image.BILINEAR)
          images.append(np.asarray(im, dtype=np.uint8))
      except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f"{path}: unreadable image ({e})") from e
      labels.append(label)
  return _dataset(np.stack(images), labels, classes, uri)


def _load_folder(rest, uri, data_root, seed) -> Splits:
  root = rest if os.path.isabs(rest) or data_root is None else os.path.join(data_root, rest)
  if not os.path.isdir(root):
    raise DatasetError(f"{uri!r}: folder {root} does not exist")
  split_dirs = [os.path.join(root, s) for s in ("train", "val", "test")]
  if all(os.path.isdir(d) for d in split_dirs):
    train = _read_folder(split_dirs[0], f"{uri}[train]")
    return Splits(train, *(_read_folder(d, f"{uri}[{s}]", train.class_names)
                           for d, s in zip(split_dirs[1:], ("val", "test"))))
  return _split_fractions(_read_folder(root, uri), (0.7, 0.15), seed)


# --- built-in sites and tasks ---------------------------------------------------------------

_BUILTIN_SIZE = 32

# Label tasks for Med-LEGO: (classes, label function of the digit, site rendering).
_LOOPS = np.array([1, 0, 0, 0, 1, 0, 1, 0, 2, 1])   # closed loops in each digit's glyph
TASKS: dict[str, tuple[tuple[str, ...], Callable, str]] = {
    "digit": (tuple(str(i) for i in range(10)), lambda d: d, "clean"),
    "parity": (("even", "odd"), lambda d: d % 2, "blur"),
    "large": (("<5", ">=5"), lambda d: (d >= 5).astype(int), "lowcontrast"),
    "loops": (("0 loops", "1 loop", "2 loops"), lambda d: _LOOPS[d], "noisy"),
    "prime": (("not prime", "prime"), lambda d: np.isin(d, (2, 3, 5, 7)).astype(int), "bias"),
}

_PER_SITE = 900   # images drawn (without replacement) from the 1797 for each site or task


def _builtin_parts(rest, uri):
  body, _, size = rest.partition(":")
  family, _, member = body.partition("/")
  if family in sites.family_names("organs") and uri.startswith("sites:"):
    raise DatasetError(f"{uri!r} is a segmentation dataset family (rpe_jax.tasks.seg_data), "
                       "not a classification one")
  available = sites.family_names("digits") if uri.startswith("sites:") else ["digits"]
  if family not in available:
    raise DatasetError(f"{uri!r}: unknown built-in family {family!r} (available: "
                       f"{', '.join(available)})")
  if size and (not size.isdigit() or int(size) < 8):
    raise DatasetError(f"{uri!r}: size must be an integer >= 8, got {size!r}")
  return family, member or None, int(size) if size else _BUILTIN_SIZE


def _site_table(family: str) -> dict[str, dict]:
  """The site table of a ``sites:`` family ("digits": SITES, "digits-graded": GRADED_SITES)."""
  return sites.family_table(family, "digits")


def _stream_offset(table: dict[str, dict]) -> int:
  """Where a family's random streams start, so that each family draws its own digits and
  noise (0 for ``SITES``, which keeps its data as it always was; ``tasks:`` use 100)."""
  return 0 if table is SITES else 200


def render_site(scans: np.ndarray, site: str, size: int = _BUILTIN_SIZE, *,
                seed: int = 0, table: dict[str, dict] = SITES) -> np.ndarray:
  """Render 8×8 scans in [0, 1] as uint8 [N, size, size, 1] images with the site's shift
  (``rpe_jax.tasks.sites.render``); ``table``: the family's sites (default ``SITES``)."""
  if site not in table:
    raise DatasetError(f"unknown site {site!r}; sites: {', '.join(table)}")
  rng = np.random.default_rng([seed, _stream_offset(table) + sites.site_index(site, table), 1])
  x = sites.render(scans, site, size, rng, sites=table)
  return np.round(x * 255).astype(np.uint8)[..., None]


def _digits(member_index: int, seed: int):
  from sklearn.datasets import load_digits
  digits = load_digits()
  rng = np.random.default_rng([seed, member_index, 0])
  index = np.sort(rng.choice(len(digits.target), _PER_SITE, replace=False))
  return digits.images[index] / 16.0, digits.target[index]


def _load_sites(rest, uri, data_root, seed) -> Splits:
  family, site, size = _builtin_parts(rest, uri)
  if site is None:
    raise DatasetError(f"{uri!r} is a family of sites; load one of: {', '.join(members(uri))}")
  table = _site_table(family)
  if site not in table:
    raise DatasetError(f"{uri!r}: unknown site {site!r}; sites: {', '.join(table)}")
  scans, digits = _digits(_stream_offset(table) + list(table).index(site), seed)
  ds = _dataset(render_site(scans, site, size, seed=seed, table=table), digits,
                [str(i) for i in range(10)], uri)
  return _split_fractions(ds, (0.6, 0.2), seed)


def _load_tasks(rest, uri, data_root, seed) -> Splits:
  family, task, size = _builtin_parts(rest, uri)
  if task is None:
    raise DatasetError(f"{uri!r} is a family of tasks; load one of: {', '.join(members(uri))}")
  if task not in TASKS:
    raise DatasetError(f"{uri!r}: unknown task {task!r}; tasks: {', '.join(TASKS)}")
  names, label_fn, site = TASKS[task]
  scans, digits = _digits(100 + list(TASKS).index(task), seed)
  ds = _dataset(render_site(scans, site, size, seed=seed), label_fn(digits), names, uri)
  return _split_fractions(ds, (0.6, 0.2), seed)


_LOADERS = {"medmnist": _load_medmnist, "tfds": _load_tfds, "folder": _load_folder,
            "sites": _load_sites, "tasks": _load_tasks}

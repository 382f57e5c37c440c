"""Adapter files: the exchange form ↔ safetensors, and the structure signature.

An adapter on disk is one safetensors file whose keys are the flattened module path plus
the factor name (``layers.0.attention.query.a``, ``.e``, ``.b``), in the canonical layout
of ``models.lora``: a [in, r], e [r], b [r, out].

Two descriptions of an adapter:

* its *signature*: every adapted path with (in, out), kind (``lora`` / ``svd``), rank and
  dtype — what the catalog stores per adapter;
* its *structure*: the adapted paths with their (in, out) shapes only. Adapters of one
  base model must share it (rank and kind may differ: composition concatenates ranks),
  so it is what the library checks against the base model.

Everything here works on numpy ``{key: array}`` dicts ("tensors") and needs no JAX, so
the catalog and the CLI's read-only commands start fast; only the conversion to and from
``LoRA`` / ``SVDLoRA`` leaves imports ``models.lora`` (and with it JAX).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import ml_dtypes
import numpy as np
import safetensors.numpy

from rpe_jax.library import untrusted

FACTORS = ("a", "e", "b")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class AdapterFormatError(ValueError):
  """An adapter (tree, tensor dict or file) that is not a valid LoRA / SVD-LoRA adapter."""


class LayerSpec(NamedTuple):
  """One adapted layer: its module path, dense-update shape, kind, rank and dtype."""

  path: str
  d_in: int
  d_out: int
  kind: str   # "lora" or "svd"
  rank: int
  dtype: str


class Signature(NamedTuple):
  """The adapter's layers, sorted by path. ``structure_hash`` covers paths and shapes only."""

  layers: tuple[LayerSpec, ...]

  @property
  def structure(self) -> list[list]:
    """The base-model notion: ``[[path, in, out], ...]`` sorted by path."""
    return [[l.path, l.d_in, l.d_out] for l in self.layers]

  @property
  def structure_hash(self) -> str:
    return _hash(self.structure)

  @property
  def hash(self) -> str:
    """Hash of the full signature (kinds, ranks and dtypes included)."""
    return _hash(self.to_json())

  @property
  def rank(self) -> int:
    """The largest rank over the layers (the catalog's summary rank)."""
    return max(l.rank for l in self.layers)

  @property
  def dtype(self) -> str:
    dtypes = sorted({l.dtype for l in self.layers})
    return dtypes[0] if len(dtypes) == 1 else "mixed"

  def to_json(self) -> list[dict[str, Any]]:
    return [l._asdict() for l in self.layers]

  @classmethod
  def from_json(cls, layers) -> "Signature":
    return cls(tuple(LayerSpec(**l) for l in layers))


def _hash(obj) -> str:
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def structure_hash(structure) -> str:
  """The stable hash of a ``[[path, in, out], ...]`` structure (as ``Signature.structure``)."""
  return _hash([list(s) for s in structure])


def _dtype_name(x: np.ndarray) -> str:
  return np.dtype(x.dtype).name


# --- tensors <-> exchange-form trees ----------------------------------------------------

def _is_array(x) -> bool:
  # numpy and JAX arrays expose __array__; LoRA / SVDLoRA leaves do not.
  return hasattr(x, "__array__")


def as_tensors(adapter) -> dict[str, np.ndarray]:
  """Any adapter form → ``{"path.a": np.ndarray, ...}``.

  Accepts a tensor dict (keys ending in ``.a/.e/.b``), a flat ``{path: leaf}`` dict or a
  nested exchange-form dict with ``LoRA`` / ``SVDLoRA`` leaves.
  """
  if not isinstance(adapter, Mapping) or not adapter:
    raise AdapterFormatError(
        f"adapter must be a non-empty dict, got {type(adapter).__name__}"
        + (" (empty)" if isinstance(adapter, Mapping) else ""))
  if all(_is_array(v) for v in adapter.values()):
    return {str(k): np.asarray(v) for k, v in adapter.items()}
  from models.lora import SVDLoRA, is_lora, to_flat  # JAX only when leaves are involved
  flat = dict(adapter) if all(is_lora(v) for v in adapter.values()) else to_flat(adapter)
  tensors = {}
  for path, leaf in flat.items():
    if not is_lora(leaf):
      raise AdapterFormatError(f"adapter entry {path!r} is a {type(leaf).__name__}, "
                               "expected a LoRA or SVDLoRA leaf")
    tensors[f"{path}.a"] = np.asarray(leaf.a)
    if isinstance(leaf, SVDLoRA):
      tensors[f"{path}.e"] = np.asarray(leaf.e)
    tensors[f"{path}.b"] = np.asarray(leaf.b)
  return tensors


def to_tree(tensors: Mapping[str, np.ndarray]) -> dict:
  """``{"path.a": ...}`` → the nested exchange form with ``LoRA`` / ``SVDLoRA`` leaves."""
  import jax.numpy as jnp
  from models.lora import LoRA, SVDLoRA, from_flat
  groups = _group(tensors)
  flat = {}
  for path, f in groups.items():
    if "e" in f:
      flat[path] = SVDLoRA(jnp.asarray(f["a"]), jnp.asarray(f["e"]), jnp.asarray(f["b"]))
    else:
      flat[path] = LoRA(jnp.asarray(f["a"]), jnp.asarray(f["b"]))
  return from_flat(flat)


# --- validation and the signature -------------------------------------------------------

def _group(tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  groups: dict[str, dict[str, np.ndarray]] = {}
  for key, value in tensors.items():
    path, _, factor = key.rpartition(".")
    if not path or factor not in FACTORS:
      raise AdapterFormatError(
          f"adapter tensor key {key!r} is not '<module path>.<a|e|b>'")
    groups.setdefault(path, {})[factor] = value
  return groups


def signature(adapter, *, check_finite: bool = True) -> Signature:
  """Validate an adapter (any form accepted by ``as_tensors``) and describe it.

  Checks per path: ``a`` [in, r] and ``b`` [r, out] present, ``e`` [r] if present, r ≥ 1,
  floating dtypes, and (``check_finite``) no NaN/Inf.
  """
  tensors = as_tensors(adapter)
  layers = []
  for path, f in sorted(_group(tensors).items()):
    missing = [n for n in ("a", "b") if n not in f]
    if missing:
      raise AdapterFormatError(f"adapter layer {path!r} lacks factor(s) {missing}")
    a, b, e = f["a"], f["b"], f.get("e")
    for n, x in f.items():
      if _dtype_name(x) not in FLOAT_DTYPES:
        raise AdapterFormatError(
            f"adapter tensor {path}.{n} has dtype {_dtype_name(x)}, expected one of "
            f"{FLOAT_DTYPES}")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or a.shape[1] < 1:
      raise AdapterFormatError(
          f"adapter layer {path!r}: expected a [in, r] and b [r, out] with r >= 1, got "
          f"a {list(a.shape)} and b {list(b.shape)}")
    if e is not None and e.shape != (a.shape[1],):
      raise AdapterFormatError(
          f"adapter layer {path!r}: e has shape {list(e.shape)}, expected [{a.shape[1]}]")
    if check_finite:
      for n, x in f.items():
        if not np.isfinite(x).all():
          raise AdapterFormatError(f"adapter tensor {path}.{n} contains NaN or Inf")
    layers.append(LayerSpec(path, int(a.shape[0]), int(b.shape[1]),
                            "lora" if e is None else "svd", int(a.shape[1]),
                            _dtype_name(a)))
  return Signature(tuple(layers))


def structure_signature(adapter) -> dict[str, Any]:
  """JSON-able description: ``{"layers": [...], "structure": [[path, in, out]...],
  "structure_hash": ..., "hash": ...}``."""
  sig = signature(adapter)
  return {"layers": sig.to_json(), "structure": sig.structure,
          "structure_hash": sig.structure_hash, "hash": sig.hash}


# --- bytes and files ---------------------------------------------------------------------

def serialize(adapter, metadata: Mapping[str, str] | None = None) -> bytes:
  """The safetensors bytes of an adapter, tensors in sorted key order."""
  tensors = as_tensors(adapter)
  signature(tensors)
  meta = _check_metadata(metadata)
  return safetensors.numpy.save({k: np.ascontiguousarray(tensors[k]) for k in sorted(tensors)},
                                metadata=meta or None)


def _check_metadata(metadata) -> dict[str, str]:
  meta = dict(metadata or {})
  bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
  if bad:
    raise AdapterFormatError(f"safetensors metadata must map str to str; bad keys: {bad}")
  return meta


_ST_DTYPES = {"F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32,
              "F64": np.float64}


def _ints(value, length) -> bool:
  """``value`` is a list of non-negative ints (of ``length`` items when given)."""
  return (isinstance(value, list) and (length is None or len(value) == length)
          and all(type(v) is int and v >= 0 for v in value))


def parse(data: bytes, *, source: str = "<bytes>") -> tuple[dict[str, np.ndarray], dict]:
  """safetensors bytes → (tensors, metadata); a truncated or garbled file is an error.

  Parsed here rather than by ``safetensors.numpy.load``, which does not map BF16.
  """
  try:
    if len(data) < 8:
      raise ValueError("it is empty" if not data else "shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
      raise ValueError(f"header of {n} bytes runs past the end of the file")
    header = untrusted.loads_json(bytes(data[8:8 + n]), "its header")
    if not isinstance(header, dict):
      raise ValueError("its header is not a JSON object")
    body = memoryview(data)[8 + n:]
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
      raise ValueError("its __metadata__ is not a map of strings")
    for key, info in header.items():
      if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
              and _ints(info.get("shape"), None) and _ints(info.get("data_offsets"), 2)):
        raise ValueError(f"tensor {key!r}: expected {{dtype, shape, data_offsets}} with "
                         "non-negative integer shape and offsets")
    tensors, end = {}, 0
    for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
      if info["dtype"] not in _ST_DTYPES:
        raise ValueError(f"tensor {key!r} has dtype {info['dtype']}, expected one of "
                         f"{sorted(_ST_DTYPES)}")
      dtype = np.dtype(_ST_DTYPES[info["dtype"]])
      start, stop = info["data_offsets"]
      shape = tuple(info["shape"])
      if start != end or stop - start != dtype.itemsize * math.prod(shape):
        raise ValueError(f"tensor {key!r} has inconsistent data offsets")
      end = stop
      tensors[key] = np.frombuffer(body[start:stop], dtype).reshape(shape)
    if end != len(body):
      raise ValueError(f"{len(body)} data bytes, the header describes {end}")
  except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as e:
    raise AdapterFormatError(f"{source} is not a readable safetensors file: {e}") from None
  return tensors, dict(meta)


def save_adapter(path, adapter, metadata: Mapping[str, str] | None = None) -> None:
  """Write an adapter to a safetensors file (not atomic: the library does that itself)."""
  Path(path).write_bytes(serialize(adapter, metadata))


def read_tensors(path) -> tuple[dict[str, np.ndarray], dict]:
  """(tensors, metadata) of an adapter file, validated, without JAX."""
  path = Path(path)
  try:
    data = path.read_bytes()
  except OSError as e:
    raise AdapterFormatError(f"cannot read adapter file {path}: {e.strerror}") from e
  tensors, meta = parse(data, source=str(path))
  try:
    signature(tensors)
  except AdapterFormatError as e:
    raise AdapterFormatError(f"{path}: {e}") from e
  return tensors, meta


def load_adapter(path) -> tuple[dict, dict]:
  """(exchange-form tree, metadata) of an adapter file."""
  tensors, meta = read_tensors(path)
  return to_tree(tensors), meta

"""Reading untrusted input: bounded JSON, .npy vectors, safetensors headers, confined paths.

Everything a user (or the sender of a library folder) hands the tool is data, never code,
and a malformed file is a ``ValueError`` that names it — never a traceback:

* ``loads_json``: JSON whose nesting depth is bounded *before* parsing (the depth is
  counted on the text with strings blanked out, so no recursion happens on hostile input);
* ``read_npy``: a numeric .npy array, refusing what is not a .npy file (by its magic
  bytes, so a text file is "not a .npy file" rather than "pickled data"), empty files,
  pickles and complex values;
* ``check_float32``: finite real values that fit float32 (a float64 value beyond float32's
  range is reported as such, not as "NaN or Inf");
* ``safetensors_header``: the 8-byte length and the bounded JSON header of a safetensors
  file, checked before the file is handed to the ``safetensors`` library;
* ``confined``: a path that, symlinks resolved, lies inside a given folder.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

MAX_JSON_DEPTH = 64
NPY_MAGIC = b"\x93NUMPY"
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


class UntrustedInputError(ValueError):
  """A file or option whose content is malformed (the CLI maps it to exit 2)."""


def json_depth(data: bytes | str) -> int:
  """The deepest nesting of ``[`` / ``{`` in JSON text, strings excluded (linear, no recursion)."""
  raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
  codes = np.frombuffer(_STRING.sub(b'""', raw), np.uint8)
  step = (np.isin(codes, (ord("["), ord("{"))).astype(np.int64)
          - np.isin(codes, (ord("]"), ord("}"))).astype(np.int64))
  return int(np.cumsum(step).max(initial=0))


def loads_json(data: bytes | str, source: str, *, max_depth: int = MAX_JSON_DEPTH):
  """``json.loads`` of ``data`` with its nesting depth bounded; errors name ``source``."""
  if not data or not (data.strip() if isinstance(data, str) else bytes(data).strip()):
    raise UntrustedInputError(f"{source} is empty (expected JSON)")
  depth = json_depth(data)
  if depth > max_depth:
    raise UntrustedInputError(f"{source}: JSON nested {depth} levels deep (at most "
                              f"{max_depth} accepted)")
  try:
    return json.loads(data)
  except (ValueError, RecursionError) as e:   # UnicodeDecodeError is a ValueError
    raise UntrustedInputError(f"{source} is not valid JSON: {e}") from None


def read_json(path, what: str = "", *, max_depth: int = MAX_JSON_DEPTH):
  """The JSON content of the file ``path`` (``what`` names it in errors, e.g. an option)."""
  path = Path(path)
  source = f"{what} {path}".strip()
  try:
    data = path.read_bytes()
  except OSError as e:
    raise UntrustedInputError(f"cannot read {source}: {e.strerror or e}") from None
  return loads_json(data, source, max_depth=max_depth)


def check_float32(x: np.ndarray, what: str) -> np.ndarray:
  """``x`` as float32, refusing complex, non-numeric, NaN/Inf and float32 overflow."""
  x = np.asarray(x)
  if np.iscomplexobj(x):
    raise UntrustedInputError(f"{what} is complex-valued ({x.dtype}); expected real numbers")
  if x.dtype == bool or not np.issubdtype(x.dtype, np.number):
    raise UntrustedInputError(f"{what} has dtype {x.dtype}; expected real numbers")
  if not np.isfinite(x).all():
    raise UntrustedInputError(f"{what} contains NaN or Inf")
  with np.errstate(over="ignore"):
    z = x.astype(np.float32)
  if not np.isfinite(z).all():
    raise UntrustedInputError(f"{what} has values beyond the float32 range "
                              f"(|x| up to {float(np.abs(x).max()):.3g}); prototypes are "
                              "stored as float32")
  return z


def read_npy(path, what: str) -> np.ndarray:
  """A numeric array from the .npy file ``path``; ``what`` names it in errors."""
  path = Path(path)
  try:
    with open(path, "rb") as f:
      head = f.read(len(NPY_MAGIC))
  except FileNotFoundError:
    raise UntrustedInputError(f"{what} file {path} does not exist") from None
  except OSError as e:
    raise UntrustedInputError(f"cannot read {what} file {path}: {e.strerror or e}") from None
  if not head:
    raise UntrustedInputError(f"{what} file {path} is empty (expected a .npy array)")
  if head != NPY_MAGIC:
    raise UntrustedInputError(f"{what} file {path} is not a .npy file (no NumPy header)")
  try:
    x = np.load(path, allow_pickle=False)
  except Exception as e:   # noqa: BLE001 - numpy's header parser raises undocumented kinds
    # (ValueError, EOFError, SyntaxError, tokenize.TokenError, ...) on a hostile header.
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "pickled data" in message or "allow_pickle" in message:
      message = "it holds Python objects (pickled data), not numbers"
    raise UntrustedInputError(f"{what} file {path} is not a readable .npy array: "
                              f"{message}") from None
  if not isinstance(x, np.ndarray):
    raise UntrustedInputError(f"{what} file {path} is not a single .npy array")
  if x.dtype.hasobject or x.dtype.names is not None:
    raise UntrustedInputError(f"{what} file {path} holds a {x.dtype} array, not numbers")
  return x


def safetensors_header(path) -> dict:
  """The JSON header of the safetensors file ``path`` (length, bounds and depth checked)."""
  path = Path(path)
  try:
    with open(path, "rb") as f:
      size = f.seek(0, 2)
      f.seek(0)
      if size < 8:
        raise UntrustedInputError(f"{path} is not a safetensors file: " + (
            "it is empty" if size == 0 else f"{size} bytes, shorter than the 8-byte header "
            "length"))
      (n,) = struct.unpack("<Q", f.read(8))
      if n > size - 8:
        raise UntrustedInputError(f"{path} is not a safetensors file: its header of {n} bytes "
                                  "runs past the end of the file")
      data = f.read(n)
  except OSError as e:
    raise UntrustedInputError(f"cannot read {path}: {e.strerror or e}") from None
  header = loads_json(data, f"the safetensors header of {path}")
  if not isinstance(header, dict):
    raise UntrustedInputError(f"{path} is not a safetensors file: its header is not a JSON "
                              "object")
  return header


def confined(path, root, what: str) -> Path:
  """``path`` if, with every symlink resolved, it lies inside the folder ``root``; else a
  ``UntrustedInputError`` naming ``what`` (nothing is touched)."""
  root = Path(root).resolve()
  try:
    resolved = Path(path).resolve()
  except (OSError, RuntimeError) as e:   # a symlink loop
    raise UntrustedInputError(f"{what}: path {path} cannot be resolved ({e})") from None
  if resolved != root and root not in resolved.parents:
    raise UntrustedInputError(f"{what}: path {path} leads outside the library folder "
                              f"{root} (to {resolved}); refused, nothing touched")
  return Path(path)

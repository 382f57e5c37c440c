"""The adapter library (LoRA-VecDB): a durable catalog of adapters and their task prototypes.

A library is a directory::

    catalog.sqlite            the catalog (SQLite, WAL), schema version in PRAGMA user_version
    adapters/<id>.safetensors one file per adapter (see ``rpe_jax.library.adapter_file``)

Durability. ``add`` writes the file under a temporary name, fsyncs it, and then, inside
one ``BEGIN IMMEDIATE`` transaction, re-validates, renames it into place (fsyncing the
directory) and inserts the row; a crash at any point leaves the whole entry or none —
at worst an orphan file, which ``verify`` reports and ``verify(repair=True)`` deletes.
A row never exists without its file: ``remove`` deletes the row first and the file
after the commit; ``replace`` swaps rows in one transaction and deletes the old file
after it. Concurrent writers serialise on SQLite's lock and wait up to ``timeout``
seconds, then fail with ``LibraryBusyError``.

Consistency rules: the first adapter of a base model fixes its *structure* (adapted
paths and their (in, out) shapes); later ones must match. The first prototype of an
encoder fixes its dimension and pooling. Prototypes are finite float32 vectors.

Retrieval (``query``) runs on ``rpe_jax.retrieval``: the prototypes of one encoder are
one device array, cached per catalog version; a version counter in the catalog is
bumped by every write, so a write from another process invalidates the cache too.

The catalog and file paths need numpy and sqlite only; JAX is imported on first
``query`` or ``load``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import sqlite3
import uuid
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from rpe_jax.library import adapter_file, untrusted
from rpe_jax.library import checks
from rpe_jax.library.checks import VerifyReport
from rpe_jax.library.connection import Connection, busy as _busy, fsync_dir as _fsync_dir
from rpe_jax.library.adapter_file import AdapterFormatError, Signature

SCHEMA_VERSION = 1
CATALOG = "catalog.sqlite"
ADAPTERS = "adapters"
TMP_PREFIX = ".tmp-"
ID_FORM = re.compile(r"[0-9a-f]{32}\Z")   # uuid4().hex: the only ids the library writes
MAX_INT = 2**63 - 1                        # SQLite's largest INTEGER
# Where a fault can be injected during ``add`` (tests kill the process there).
FAULT_STEPS = ("after_write", "after_fsync", "after_rename", "before_commit", "after_commit")
fault_hook: Callable[[str], None] | None = None

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE base_models(
  id TEXT PRIMARY KEY, structure TEXT NOT NULL, structure_hash TEXT NOT NULL,
  created TEXT NOT NULL);
CREATE TABLE encoders(
  id TEXT PRIMARY KEY, dim INTEGER NOT NULL, pooling TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE adapters(
  id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,
  base_model TEXT NOT NULL REFERENCES base_models(id),
  signature TEXT NOT NULL, structure_hash TEXT NOT NULL,
  encoder TEXT NOT NULL REFERENCES encoders(id), prototype BLOB NOT NULL,
  n_samples INTEGER NOT NULL, rank INTEGER NOT NULL, dtype TEXT NOT NULL,
  sha256 TEXT NOT NULL, size INTEGER NOT NULL, created TEXT NOT NULL,
  metadata TEXT NOT NULL);
CREATE INDEX adapters_by_encoder ON adapters(encoder);
INSERT INTO meta VALUES ('version', '0');
"""


class LibraryError(ValueError):
  """Bad input or a library in a state that refuses the operation (CLI exit code 2)."""


class LibraryBusyError(LibraryError):
  """Another process held the catalog's write lock for longer than the timeout."""


class Entry(NamedTuple):
  """One catalog row (no adapter tensors)."""

  id: str
  name: str
  base_model: str
  encoder: str
  pooling: str
  prototype: np.ndarray   # [d] float32
  n_samples: int
  rank: int
  dtype: str
  sha256: str
  size: int
  created: str
  metadata: dict
  signature: Signature
  path: Path

  def to_json(self) -> dict[str, Any]:
    d = self._asdict()
    d.update(prototype_dim=int(self.prototype.shape[0]), path=str(self.path),
             signature=self.signature.to_json())
    del d["prototype"]
    return d


class Prototypes(NamedTuple):
  """The prototypes of one encoder in catalog order: names [N], matrix [N, d], n_samples [N]."""

  names: tuple[str, ...]
  matrix: np.ndarray
  n_samples: np.ndarray


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def _fault(step: str) -> None:
  if fault_hook is not None:
    fault_hook(step)


def _check_str(value, what: str) -> str:
  if not isinstance(value, str) or not value or value != value.strip() or not value.isprintable():
    raise LibraryError(f"{what} must be a non-empty printable string without surrounding "
                       f"spaces, got {value!r}")
  return value


def _check_prototype(prototype) -> np.ndarray:
  try:
    z = np.asarray(prototype)
  except (TypeError, ValueError) as e:
    raise LibraryError(f"prototype is not a numeric vector: {e}") from e
  if z.ndim != 1 or z.shape[0] == 0:
    raise LibraryError(f"prototype must be a non-empty vector [d], got shape {list(z.shape)}")
  try:
    return untrusted.check_float32(z, "prototype")
  except ValueError as e:
    raise LibraryError(str(e)) from None


class Library:
  """An adapter library directory. Use ``Library.create`` / ``Library.open``."""

  def __init__(self, path: Path, conn: sqlite3.Connection, readonly: bool, timeout: float):
    self.path = path
    self.readonly = readonly
    self.timeout = timeout
    self._conn = Connection(conn, path / CATALOG, LibraryError)
    self._cache: dict[str, tuple[int, Any]] = {}

  # --- opening ---------------------------------------------------------------------------

  @classmethod
  def create(cls, path, *, timeout: float = 10.0) -> "Library":
    """Create an empty library at ``path`` (a new or empty directory)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
      raise LibraryError(f"cannot create a library at {path}: it exists and is not an "
                         "empty directory")
    (path / ADAPTERS).mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path / CATALOG, timeout=timeout, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
    conn.close()
    _fsync_dir(path)
    return cls.open(path, timeout=timeout)

  @classmethod
  def open(cls, path, readonly: bool = False, *, timeout: float = 10.0) -> "Library":
    """Open an existing library; refuses a catalog written by a newer schema version."""
    path = Path(path)
    catalog = path / CATALOG
    if not catalog.is_file():
      raise LibraryError(f"{path} is not an adapter library (no {CATALOG}); create one "
                         "with `rpe library init`")
    uri = f"file:{catalog.resolve()}" + ("?mode=ro" if readonly else "")
    try:
      conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
      version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as e:
      raise LibraryError(f"{catalog} cannot be read as a catalog: {e}") from e
    if version > SCHEMA_VERSION:
      conn.close()
      raise LibraryError(f"library {path} has schema version {version}, newer than the "
                         f"{SCHEMA_VERSION} this rpe_jax reads; upgrade rpe_jax")
    if version < 1:
      conn.close()
      raise LibraryError(f"{catalog} is not an rpe_jax catalog (schema version {version})")
    lib = cls(path, conn, readonly, timeout)
    lib._conn.execute("PRAGMA foreign_keys=ON")
    if not readonly:
      lib._conn.execute("PRAGMA synchronous=FULL")
    return lib

  def close(self) -> None:
    self._conn.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __repr__(self):
    return f"Library({str(self.path)!r}, readonly={self.readonly})"

  # --- reading ---------------------------------------------------------------------------

  def _file(self, entry_id, name) -> Path:
    """The file of an entry; its id is checked first (the catalog is data, not code)."""
    if not isinstance(entry_id, str) or not ID_FORM.match(entry_id):
      raise LibraryError(f"catalog entry {name!r} has an invalid id {entry_id!r} (expected 32 "
                         "hex digits); refused, nothing touched")
    return self.path / ADAPTERS / f"{entry_id}.safetensors"

  def _adapters(self) -> Path:
    """The adapters/ folder, checked to lie inside the library (symlinks resolved)."""
    return self._confined(self.path / ADAPTERS, "the adapters folder")

  def _confined(self, path: Path, what: str) -> Path:
    try:
      return untrusted.confined(path, self.path, what)
    except ValueError as e:
      raise LibraryError(str(e)) from None

  def _entry_file(self, entry_id, name) -> Path:
    """The file of an entry, about to be opened, written or deleted: id and place checked."""
    self._adapters()
    return self._confined(self._file(entry_id, name), f"catalog entry {name!r}")

  def version(self) -> int:
    """The catalog version, bumped by every committed add / remove (any process)."""
    row = self._conn.execute("SELECT value FROM meta WHERE key='version'").fetchone()
    try:
      return int(row[0])
    except (TypeError, ValueError):
      raise LibraryError(f"catalog {self.path / CATALOG} is damaged: no valid version "
                         f"(got {row!r})") from None

  _COLUMNS = ("a.id, a.name, a.base_model, a.encoder, e.pooling, a.prototype, a.n_samples, "
              "a.rank, a.dtype, a.sha256, a.size, a.created, a.metadata, a.signature")

  def _entry(self, row) -> Entry:
    (id_, name, base, enc, pooling, proto, n, rank, dtype, sha, size, created, meta,
     sig) = row
    try:
      if not (all(isinstance(v, str) for v in (name, base, enc, pooling, dtype, sha, created))
              and all(type(v) is int and v >= 0 for v in (n, rank, size))
              and isinstance(proto, bytes) and proto and len(proto) % 4 == 0):
        raise ValueError("a field has the wrong type")
      metadata = untrusted.loads_json(meta, "its metadata")
      if not isinstance(metadata, dict):
        raise ValueError("its metadata is not a JSON object")
      signature = Signature.from_json(untrusted.loads_json(sig, "its signature"))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
      raise LibraryError(f"catalog entry {name!r} is damaged: {e}") from None
    return Entry(id_, name, base, enc, pooling, np.frombuffer(proto, "<f4").copy(), n, rank,
                 dtype, sha, size, created, metadata, signature, self._file(id_, name))

  def get(self, name: str) -> Entry:
    """The catalog row of ``name``."""
    row = self._conn.execute(
        f"SELECT {self._COLUMNS} FROM adapters a JOIN encoders e ON a.encoder = e.id "
        "WHERE a.name = ?", (name,)).fetchone()
    if row is None:
      raise LibraryError(f"no adapter named {name!r} in library {self.path}")
    return self._entry(row)

  def entries(self, *, encoder: str | None = None, base_model: str | None = None) -> list[Entry]:
    """All rows (optionally of one encoder / base model), sorted by name."""
    sql = (f"SELECT {self._COLUMNS} FROM adapters a JOIN encoders e ON a.encoder = e.id "
           "WHERE (? IS NULL OR a.encoder = ?) AND (? IS NULL OR a.base_model = ?) "
           "ORDER BY a.name")
    return [self._entry(r) for r in
            self._conn.execute(sql, (encoder, encoder, base_model, base_model))]

  def names(self) -> list[str]:
    """Every adapter name, sorted."""
    return [r[0] for r in self._conn.execute("SELECT name FROM adapters ORDER BY name")]

  def __len__(self) -> int:
    return self._conn.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]

  def __contains__(self, name) -> bool:
    return self._conn.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone() \
        is not None

  def encoders(self) -> dict[str, dict]:
    """{encoder id: {"dim", "pooling", "count"}}."""
    rows = self._conn.execute(
        "SELECT e.id, e.dim, e.pooling, COUNT(a.id) FROM encoders e "
        "LEFT JOIN adapters a ON a.encoder = e.id GROUP BY e.id ORDER BY e.id")
    return {r[0]: {"dim": r[1], "pooling": r[2], "count": r[3]} for r in rows}

  def base_models(self) -> dict[str, dict]:
    """{base model id: {"structure": [[path, in, out], ...], "structure_hash", "count"}}."""
    rows = self._conn.execute(
        "SELECT b.id, b.structure, b.structure_hash, COUNT(a.id) FROM base_models b "
        "LEFT JOIN adapters a ON a.base_model = b.id GROUP BY b.id ORDER BY b.id")
    return {r[0]: {"structure": self._json(r[1], f"base model {r[0]!r}"),
                   "structure_hash": r[2], "count": r[3]} for r in rows}

  def _json(self, text, what: str):
    try:
      return untrusted.loads_json(text, f"the catalog's {what}")
    except (ValueError, TypeError) as e:
      raise LibraryError(f"catalog {self.path / CATALOG} is damaged: {e}") from None

  def _encoder_id(self, encoder: str | None) -> str:
    # The encoders table only holds encoders that still have adapters (see _drop_unused).
    known = [r[0] for r in self._conn.execute("SELECT id FROM encoders ORDER BY id")]
    if not known:
      raise LibraryError(f"library {self.path} has no adapters to query")
    if encoder is None:
      if len(known) != 1:
        raise LibraryError(f"the library has {len(known)} encoders {known}; "
                           "name one with encoder=")
      return known[0]
    if encoder not in known:
      raise LibraryError(f"no prototypes for encoder {encoder!r}; known: {known}")
    return encoder

  def prototypes(self, encoder: str | None = None) -> Prototypes:
    """The prototypes of one encoder (the only one if None), in catalog (insertion) order."""
    encoder = self._encoder_id(encoder)
    rows = self._conn.execute(
        "SELECT name, prototype, n_samples FROM adapters WHERE encoder = ? ORDER BY rowid",
        (encoder,)).fetchall()
    dim = self._conn.execute("SELECT dim FROM encoders WHERE id = ?", (encoder,)).fetchone()[0]
    if not rows:   # the encoders table lists it, so an adapter must: an index is damaged
      raise LibraryError(f"catalog {self.path / CATALOG} is damaged: encoder {encoder!r} has "
                         "no adapters although the catalog lists it; run `rpe library verify`")
    for name, blob, n in rows:
      if (not isinstance(blob, bytes) or len(blob) != 4 * dim or type(n) is not int
          or not np.isfinite(np.frombuffer(blob, "<f4")).all()):
        raise LibraryError(f"catalog entry {name!r} is damaged: its prototype is not "
                           f"{dim} finite float32 values")
    matrix = np.stack([np.frombuffer(r[1], "<f4") for r in rows]).astype(np.float32)
    return Prototypes(tuple(r[0] for r in rows), matrix,
                      np.asarray([r[2] for r in rows], np.int64))

  def index(self, encoder: str | None = None):
    """The device-resident ``retrieval.PrototypeIndex`` of one encoder, cached per version."""
    from rpe_jax import retrieval
    encoder = self._encoder_id(encoder)
    version = self.version()
    cached = self._cache.get(encoder)
    if cached is None or cached[0] != version:
      protos = self.prototypes(encoder)
      self._cache[encoder] = (version, retrieval.build_index(protos.names, protos.matrix))
    return self._cache[encoder][1]

  def query(self, prototypes, k: int, *, encoder: str | None = None, exclude=(),
            approx: bool = False):
    """Exact k nearest library prototypes (squared L2) to ``prototypes`` ([d] or [B, d]).

    Returns a ``retrieval.Retrieval`` (names, distances, indices, inner, ref_sqnorm,
    target_sqnorm, references), nearest first, ties to the earlier catalog entry.
    ``exclude``: names to leave out (for all targets, or one sequence per target).
    """
    from rpe_jax import retrieval
    try:
      return retrieval.search(self.index(encoder), prototypes, k, exclude=exclude,
                              approx=approx)
    except retrieval.RetrievalError as e:
      raise LibraryError(str(e)) from e

  def load(self, name: str, *, as_tensors: bool = False):
    """The adapter ``name`` as an exchange-form tree (or numpy tensors), after checking the
    file's size and sha256 and its signature against the catalog and base model."""
    return self._load_entry(self.get(name), as_tensors)

  def _load_entry(self, entry: Entry, as_tensors: bool):
    name = entry.name
    try:
      data = self._entry_file(entry.id, name).read_bytes()
    except FileNotFoundError:
      raise LibraryError(f"adapter {name!r}: file {entry.path} is missing") from None
    except OSError as e:
      raise LibraryError(f"adapter {name!r}: cannot read {entry.path}: {e.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != entry.size or digest != entry.sha256:
      raise LibraryError(f"adapter {name!r}: file {entry.path} is corrupt ({len(data)} bytes, "
                         f"sha256 {digest[:12]}…; the catalog has {entry.size} bytes, "
                         f"sha256 {entry.sha256[:12]}…)")
    try:
      tensors, _ = adapter_file.parse(data, source=str(entry.path))
      sig = adapter_file.signature(tensors)
    except AdapterFormatError as e:
      raise LibraryError(f"adapter {name!r}: {e}") from e
    base = self._conn.execute("SELECT structure_hash FROM base_models WHERE id = ?",
                              (entry.base_model,)).fetchone()
    if base is None or sig != entry.signature or sig.structure_hash != base[0]:
      raise LibraryError(f"adapter {name!r}: file structure does not match the catalog / "
                         f"base model {entry.base_model!r}")
    return tensors if as_tensors else adapter_file.to_tree(tensors)

  # --- writing ---------------------------------------------------------------------------

  def _writable(self) -> None:
    if self.readonly:
      raise LibraryError(f"library {self.path} is open read-only")

  def _validate(self, name, sig: Signature, proto, base_model, encoder, pooling,
                replace) -> str | None:
    """Check an add against the catalog; returns the id being replaced (or None)."""
    row = self._conn.execute("SELECT id FROM adapters WHERE name = ?", (name,)).fetchone()
    if row is not None and not replace:
      raise LibraryError(f"an adapter named {name!r} already exists (use replace=True / "
                         "--replace)")
    base = self._conn.execute("SELECT structure_hash, structure FROM base_models WHERE id = ?",
                              (base_model,)).fetchone()
    if base is not None and base[0] != sig.structure_hash:
      try:
        want = {p: (i, o) for p, i, o in self._json(base[1], f"base model {base_model!r}")}
      except (TypeError, ValueError) as e:
        raise LibraryError(f"catalog {self.path / CATALOG}: base model {base_model!r} has a "
                           f"damaged structure ({e})") from None
      got = {p: (i, o) for p, i, o in sig.structure}
      diff = [f"{p}: base {want.get(p)} vs adapter {got.get(p)}"
              for p in sorted(set(want) | set(got)) if want.get(p) != got.get(p)]
      raise LibraryError(
          f"adapter {name!r} does not match the structure of base model {base_model!r} "
          f"(adapted path: (in, out)); {len(diff)} difference(s), first: "
          + "; ".join(diff[:3]))
    enc = self._conn.execute("SELECT dim, pooling FROM encoders WHERE id = ?",
                             (encoder,)).fetchone()
    if enc is not None and enc[0] != proto.shape[0]:
      raise LibraryError(f"prototype has dimension {proto.shape[0]}, but encoder "
                         f"{encoder!r} has {enc[0]}-dimensional prototypes")
    if enc is not None and enc[1] != pooling:
      raise LibraryError(f"pooling {pooling!r} differs from encoder {encoder!r}'s "
                         f"{enc[1]!r}; use another encoder id for another pooling")
    if row is not None:   # the old file will be deleted: check it is ours to delete
      self._entry_file(row[0], name)
    return None if row is None else row[0]

  def _begin(self) -> None:
    try:
      self._conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
      if _busy(e):
        raise LibraryBusyError(f"library {self.path} is busy: another process held its "
                               f"write lock for more than {self.timeout} s") from e
      raise

  def add(self, name: str, adapter, prototype, *, base_model: str, encoder: str,
          n_samples: int, metadata: dict | None = None, replace: bool = False,
          pooling: str = "mean") -> Entry:
    """Add an adapter (any form ``adapter_file.as_tensors`` takes) with its task prototype.

    ``n_samples``: size of the dataset the prototype was averaged over. ``metadata``: free
    JSON (license, source, task). Atomic; with ``replace=True`` an existing entry of the
    same name is swapped in the same transaction (it stays valid if the add fails).
    """
    self._writable()
    _check_str(name, "name")
    _check_str(base_model, "base_model")
    _check_str(encoder, "encoder")
    _check_str(pooling, "pooling")
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) \
        or not 1 <= n_samples <= MAX_INT:
      raise LibraryError(f"n_samples must be a positive integer up to 2**63 - 1 (what the "
                         f"catalog stores), got {n_samples!r}")
    try:
      meta_json = json.dumps(metadata or {}, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise LibraryError(f"metadata is not JSON-serialisable: {e}") from e
    if not isinstance(metadata or {}, dict):
      raise LibraryError(f"metadata must be a dict, got {type(metadata).__name__}")
    proto = _check_prototype(prototype)
    try:
      tensors = adapter_file.as_tensors(adapter)
      sig = adapter_file.signature(tensors)
      data = adapter_file.serialize(tensors, {"name": name, "base_model": base_model})
    except AdapterFormatError as e:
      raise LibraryError(f"adapter {name!r}: {e}") from e
    self._validate(name, sig, proto, base_model, encoder, pooling, replace)  # fail early

    entry_id = uuid.uuid4().hex
    adapters = self._adapters()
    tmp, final = (adapters / f"{TMP_PREFIX}{entry_id}.safetensors",
                  self._file(entry_id, name))
    committed, old_id = False, None
    try:
      with open(tmp, "wb") as f:
        f.write(data)
        _fault("after_write")
        f.flush()
        os.fsync(f.fileno())
      _fault("after_fsync")
      self._begin()
      try:
        # Another process may have written since the early check.
        old_id = self._validate(name, sig, proto, base_model, encoder, pooling, replace)
        os.replace(tmp, final)
        _fsync_dir(adapters)
        _fault("after_rename")
        now = _now()
        c = self._conn
        if old_id is not None:
          c.execute("DELETE FROM adapters WHERE id = ?", (old_id,))
        c.execute("INSERT OR IGNORE INTO base_models VALUES (?, ?, ?, ?)",
                  (base_model, json.dumps(sig.structure), sig.structure_hash, now))
        c.execute("INSERT OR IGNORE INTO encoders VALUES (?, ?, ?, ?)",
                  (encoder, int(proto.shape[0]), pooling, now))
        c.execute("INSERT INTO adapters VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                  (entry_id, name, base_model, json.dumps(sig.to_json()), sig.structure_hash,
                   encoder, proto.astype("<f4").tobytes(), int(n_samples), sig.rank,
                   sig.dtype, hashlib.sha256(data).hexdigest(), len(data), now, meta_json))
        self._drop_unused(c)
        c.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'version'")
        _fault("before_commit")
        c.execute("COMMIT")
        committed = True
      finally:
        if not committed and self._conn.in_transaction:
          self._conn.execute("ROLLBACK")
      _fault("after_commit")
    except sqlite3.OperationalError as e:
      if _busy(e):
        raise LibraryBusyError(f"library {self.path} is busy: {e}") from e
      raise
    finally:
      if not committed:
        for p in (tmp, final):
          p.unlink(missing_ok=True)
    if old_id is not None:
      self._entry_file(old_id, name).unlink(missing_ok=True)
      _fsync_dir(adapters)
    return self.get(name)

  @staticmethod
  def _drop_unused(c: sqlite3.Connection) -> None:
    # A base model or encoder with no adapters left no longer constrains later adds.
    c.execute("DELETE FROM base_models WHERE id NOT IN (SELECT base_model FROM adapters)")
    c.execute("DELETE FROM encoders WHERE id NOT IN (SELECT encoder FROM adapters)")

  def remove(self, name: str) -> None:
    """Remove an entry: the row in one transaction, then its file."""
    self._writable()
    self._begin()
    try:
      row = self._conn.execute("SELECT id FROM adapters WHERE name = ?", (name,)).fetchone()
      if row is None:
        raise LibraryError(f"no adapter named {name!r} in library {self.path}")
      path = self._entry_file(row[0], name)   # before anything changes
      self._conn.execute("DELETE FROM adapters WHERE id = ?", (row[0],))
      self._drop_unused(self._conn)
      self._conn.execute(
          "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'version'")
      self._conn.execute("COMMIT")
    finally:
      if self._conn.in_transaction:
        self._conn.execute("ROLLBACK")
    path.unlink(missing_ok=True)
    _fsync_dir(self.path / ADAPTERS)

  def integrity(self) -> list[str]:
    """SQLite's ``integrity_check`` and ``foreign_key_check`` findings (empty when sound)."""
    return checks.integrity(self)

  def verify(self, *, repair: bool = False, check_files: bool = True,
             progress: Callable | None = None) -> VerifyReport:
    """Check the catalog, every row and file, and that every file has a row (see
    ``rpe_jax.library.checks.verify``); ``repair=True`` deletes orphan files only."""
    return checks.verify(self, repair=repair, check_files=check_files, progress=progress)

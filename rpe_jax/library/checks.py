"""``verify``: the library checked end to end — catalog, rows, files — and orphans repaired.

What is checked, in order: SQLite's own ``integrity_check`` (a damaged interior page is
found even where no query happens to step on it) and ``foreign_key_check``; each row is a
valid entry (id of the form the library writes, fields of the right types) whose file lies
inside the library folder; each file is intact (size, sha256, parse, signature); each file
in ``adapters/`` belongs to a row. Repair deletes orphans only.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from rpe_jax.library.connection import fsync_dir as _fsync_dir

# The catalog imports this module, so its LibraryError (a ValueError) is caught as ValueError.


class VerifyReport(NamedTuple):
  """What ``verify`` found; ``ok`` when nothing is wrong."""

  checked: int
  missing: list[str]      # names whose file is gone
  corrupt: list[str]      # names whose file fails sha256 / parsing / signature
  orphans: list[str]      # files in adapters/ with no row (and leftover temp files)
  removed: list[str]      # orphans deleted by repair
  integrity: list[str] = []   # SQLite's integrity / foreign-key check messages (none: ok)
  invalid: list[str] = []     # rows that are not valid entries (id, path, fields)

  @property
  def ok(self) -> bool:
    """No missing or corrupt file and no orphan left (orphans removed by repair are fine)."""
    return not (self.missing or self.corrupt or self.integrity or self.invalid
                or set(self.orphans) - set(self.removed))


def integrity(lib) -> list[str]:
  """SQLite's ``integrity_check`` and ``foreign_key_check`` findings (empty when sound)."""
  try:
    found = [line for r in lib._conn.execute("PRAGMA integrity_check")
             for line in str(r[0]).splitlines() if line and not line.startswith("***")]
    found = [] if found == ["ok"] else found
    found += [f"{r[0]} row {r[1]} refers to a missing {r[2]} row"
              for r in lib._conn.execute("PRAGMA foreign_key_check")]
  except ValueError as e:
    found = [str(e)]
  return found


def verify(lib, *, repair: bool = False, check_files: bool = True,
           progress: Callable | None = None) -> VerifyReport:
  """Check the catalog (SQLite's integrity check), every row (a valid entry whose file
  lies inside the library, intact: size, sha256, signature) and that every file has a row.

  ``repair=True`` deletes orphan files (and leftover temp files) — only when the catalog
  itself is sound, never a row's file, never a folder; rows with a missing or corrupt
  file are reported, never dropped silently — remove them by name. Repair while another
  process is adding can delete that add's temp file; the add then fails cleanly.
  """
  if repair:
    lib._writable()
  problems = integrity(lib)
  try:
    rows = lib._conn.execute("SELECT id, name FROM adapters ORDER BY name").fetchall()
  except ValueError as e:
    return VerifyReport(0, [], [], [], [], problems or [str(e)], [])
  missing, corrupt, invalid = [], [], []
  for entry_id, name in (progress(rows) if progress else rows):
    label = name if isinstance(name, str) else repr(name)
    try:
      entry = lib.get(name)
      path = lib._entry_file(entry_id, label)
    except ValueError:
      invalid.append(label)
      continue
    if not path.is_file():
      missing.append(label)
    elif check_files:
      try:
        lib._load_entry(entry, as_tensors=True)
      except ValueError:
        corrupt.append(label)
  adapters = lib._adapters()
  known = {f"{r[0]}.safetensors" for r in rows}
  orphans = sorted(p.name for p in adapters.iterdir() if p.name not in known)
  removed = []
  if repair and orphans and not problems:
    # Re-read under the write lock: a concurrent add may have committed its file since.
    lib._begin()
    try:
      known = {f"{r[0]}.safetensors" for r in lib._conn.execute("SELECT id FROM adapters")}
      for orphan in orphans:
        path = adapters / orphan
        # unlink never follows a symlink; folders are not ours to delete.
        if orphan not in known and (path.is_symlink() or path.is_file()):
          path.unlink(missing_ok=True)
          removed.append(orphan)
    finally:
      lib._conn.execute("ROLLBACK")
    _fsync_dir(adapters)
  return VerifyReport(len(rows), missing, corrupt, orphans, removed, problems, invalid)

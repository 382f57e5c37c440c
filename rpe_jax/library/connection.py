"""The catalog's SQLite connection: every failure to read or write it is one clear error.

SQLite reports a damaged page only when a statement steps onto it, possibly halfway
through a result; fetching every row inside ``execute`` makes that happen in one place,
where it becomes the library's error naming the catalog file.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


def fsync_dir(path: Path) -> None:
  """fsync a folder, so that a rename or unlink in it is durable."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def busy(e: sqlite3.OperationalError) -> bool:
  """Is this the lock held by another writer (retry / report busy) rather than damage?"""
  text = str(e).lower()
  return "locked" in text or "busy" in text


class Rows(list):
  """Every row of a statement, fetched at once."""

  def fetchone(self):
    return self[0] if self else None

  def fetchall(self):
    return list(self)


class Connection:
  """The SQLite connection. Rows are fetched at once, so that an error reading a damaged
  page surfaces here: any ``sqlite3.DatabaseError`` but a busy lock becomes ``error``
  (the library's ``LibraryError``) naming the catalog; lock timeouts stay
  ``OperationalError``s for the caller's retry / busy message."""

  def __init__(self, conn: sqlite3.Connection, path: Path, error: type[Exception]):
    self.conn, self.path, self.error = conn, path, error

  def execute(self, sql: str, params=()) -> Rows:
    try:
      return Rows(self.conn.execute(sql, params).fetchall())
    except sqlite3.DatabaseError as e:
      if isinstance(e, sqlite3.OperationalError) and busy(e):
        raise
      hint = ("; the file is damaged (`rpe library verify` reports where)"
              if "malformed" in str(e) or "not a database" in str(e) else "")
      raise self.error(f"catalog {self.path}: {e}{hint}") from e
    except OverflowError as e:   # an integer SQLite cannot store
      raise self.error(f"catalog {self.path}: {e}") from e

  @property
  def in_transaction(self) -> bool:
    return self.conn.in_transaction

  def close(self) -> None:
    self.conn.close()

"""Output folders that never destroy a user's files: refuse, stage, then swap in.

* ``check_folder``: an existing non-empty folder is written into only when the tool wrote
  it (the caller's ``owned`` test: e.g. it holds only the tool's output names and the
  tool's report) or when the user says ``--overwrite`` — and even then only the names
  the tool writes are replaced; everything else in the folder is left alone.
* ``staged``: everything is written under a temporary folder inside the output folder
  first; ``install`` then moves each staged entry into place (a file by an atomic
  ``os.replace``; a folder by moving the old one aside first), so a failure before the
  install leaves the output folder exactly as it was.
* ``atomic_write_text``: temp file + fsync + rename, for a file rewritten in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterable


def check_folder(out, *, option: str, names: str, overwrite: bool,
                 owned: Callable[[Path], bool] = lambda folder: False) -> Path:
  """``out`` as a Path, or a ``ValueError`` when writing there could destroy user files.

  ``names`` describes what the tool writes there (for the message); ``owned(folder)``
  says whether an existing non-empty folder holds only the tool's own outputs.
  """
  out = Path(out)
  if out.exists() and not out.is_dir():
    raise ValueError(f"{option} {out} exists and is not a folder")
  if out.is_dir() and any(out.iterdir()) and not overwrite and not owned(out):
    raise ValueError(f"{option} {out} is a non-empty folder this tool did not write; pass "
                     f"--overwrite to replace only {names} there, or choose another folder")
  return out


@contextlib.contextmanager
def staged(out: Path, *, prefix: str):
  """A temporary folder inside ``out`` (created if needed), removed afterwards whatever
  happens; ``out`` itself is removed again if it was created here and stays empty."""
  created = not out.exists()
  out.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out))
  try:
    yield staging
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    if created:
      with contextlib.suppress(OSError):
        out.rmdir()   # only succeeds if nothing was installed


def install(staging: Path, out: Path, items: Iterable[Path], *, stale: Iterable[str] = ()
            ) -> None:
  """Move the staged ``items`` (in order) into ``out``, replacing entries of the same name,
  then move the ``stale`` names of an earlier run aside; the old entries end up inside
  ``staging`` (deleted with it)."""
  aside = staging / f".replaced-{uuid.uuid4().hex}"
  aside.mkdir()
  for item in items:
    dest = out / item.name
    if dest.is_symlink() or (dest.exists() and (dest.is_dir() or item.is_dir())):
      os.replace(dest, aside / item.name)
    os.replace(item, dest)   # a file over a file: atomic
  for name in stale:
    if (out / name).is_symlink() or (out / name).exists():
      os.replace(out / name, aside / name)


def atomic_write_text(path: Path, text: str) -> None:
  """Write ``path`` as a whole or not at all: a temp file beside it, fsync, rename."""
  tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:   # name the file being written, not the temp
    raise OSError(e.errno, e.strerror or str(e), str(path)) from e
  finally:
    tmp.unlink(missing_ok=True)


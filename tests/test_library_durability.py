"""Library durability: a process killed at each step of an add, concurrent writers, a held lock.

The child processes use the numpy-only add path (adapter tensors as a dict of arrays), so
they start without JAX and the whole file runs in a few seconds.
"""

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rpe_jax.library import catalog as library_module
from rpe_jax.library.catalog import FAULT_STEPS, Library, LibraryBusyError

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import numpy as np
    from rpe_jax.library import catalog as library

    def tensors(seed):
      rng = np.random.default_rng(seed)
      return {{"blocks.0.attn.q.a": rng.standard_normal((6, 2)).astype(np.float32),
               "blocks.0.attn.q.b": rng.standard_normal((2, 5)).astype(np.float32)}}

    path, step, replace, timeout = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
    names, seeds = sys.argv[5].split(","), [int(s) for s in sys.argv[6].split(",")]
    if step != "none":
      library.fault_hook = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == step else None
    lib = library.Library.open(path, timeout=timeout)
    for name, seed in zip(names, seeds):
      lib.add(name, tensors(seed), np.full(4, seed, np.float32), base_model="m", encoder="enc",
              n_samples=1, replace=replace)
    print("jax imported:", "jax" in sys.modules)
""")


def tensors(seed):
  rng = np.random.default_rng(seed)
  return {"blocks.0.attn.q.a": rng.standard_normal((6, 2)).astype(np.float32),
          "blocks.0.attn.q.b": rng.standard_normal((2, 5)).astype(np.float32)}


def spawn(path, names, seeds, *, step="none", replace=False, timeout=10.0):
  return subprocess.Popen(
      [sys.executable, "-c", CHILD.format(root=str(ROOT)), str(path), step,
       "1" if replace else "0", str(timeout), ",".join(names), ",".join(map(str, seeds))],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def lib_path(tmp_path):
  lib = Library.create(tmp_path / "lib")
  lib.add("keep", tensors(0), np.zeros(4), base_model="m", encoder="enc", n_samples=1)
  lib.close()
  return tmp_path / "lib"


def files(path):
  return sorted(p.name for p in (path / "adapters").iterdir())


@pytest.mark.parametrize("step", FAULT_STEPS)
@pytest.mark.parametrize("replace", [False, True], ids=["add", "replace"])
def test_killed_add_leaves_a_consistent_library(lib_path, step, replace):
  name, seed = ("keep", 7) if replace else ("fresh", 7)
  child = spawn(lib_path, [name], [seed], step=step, replace=replace)
  out, err = child.communicate(timeout=60)
  assert child.returncode == -9, (out, err)  # killed at the step, not failed before it

  lib = Library.open(lib_path)
  report = lib.verify()
  assert report.missing == [] and report.corrupt == []  # never a row without its file
  committed = step == "after_commit"
  expected_names = ["keep"] if replace else (["fresh", "keep"] if committed else ["keep"])
  assert lib.names() == expected_names
  # Before the commit the old state, after it the new one — never a mix.
  want = tensors(seed if committed else 0)
  got = lib.load(name if committed or replace else "keep", as_tensors=True)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
  # The one orphan: the temp or renamed new file before the commit, the replaced old file
  # (unlinked after the commit) after it; a plain add that committed leaves none.
  orphans = 0 if committed and not replace else 1
  assert len(report.orphans) == orphans, report
  if step in ("after_write", "after_fsync"):
    assert report.orphans[0].startswith(library_module.TMP_PREFIX)
  repaired = lib.verify(repair=True)
  assert repaired.ok and len(files(lib_path)) == len(lib.names())
  # The library is still writable and the catalog intact.
  lib.add("after", tensors(9), np.ones(4), base_model="m", encoder="enc", n_samples=1)
  assert lib.verify().ok
  assert lib._conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_two_processes_adding_at_once_both_succeed(lib_path):
  a = spawn(lib_path, [f"a{i}" for i in range(6)], list(range(10, 16)), timeout=60)
  b = spawn(lib_path, [f"b{i}" for i in range(6)], list(range(20, 26)), timeout=60)
  for child in (a, b):
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert "jax imported: False" in out  # the add path needs no JAX
  lib = Library.open(lib_path)
  assert lib.names() == sorted(["keep"] + [f"a{i}" for i in range(6)]
                               + [f"b{i}" for i in range(6)])
  assert lib.verify().ok and lib.version() == 13
  np.testing.assert_array_equal(lib.get("b3").prototype, np.full(4, 23, np.float32))
  assert lib._conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_held_write_lock_gives_a_clear_busy_error(lib_path):
  blocker = sqlite3.connect(lib_path / "catalog.sqlite", isolation_level=None)
  blocker.execute("BEGIN IMMEDIATE")
  lib = Library.open(lib_path, timeout=0.2)
  before = files(lib_path)
  with pytest.raises(LibraryBusyError, match="busy"):
    lib.add("late", tensors(3), np.ones(4), base_model="m", encoder="enc", n_samples=1)
  with pytest.raises(LibraryBusyError, match="busy"):
    lib.remove("keep")
  assert files(lib_path) == before  # the temp file was cleaned up
  blocker.execute("ROLLBACK")
  blocker.close()
  lib.add("late", tensors(3), np.ones(4), base_model="m", encoder="enc", n_samples=1)
  assert lib.names() == ["keep", "late"] and lib.verify().ok

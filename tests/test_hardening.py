"""Hardening (issue 16): one test per class of bad input, each through the CLI in-process.

Classes: the one error boundary (OSError and subclasses, EOFError, OverflowError,
RecursionError, sqlite3.DatabaseError, safetensors' errors), zero-byte files of every kind,
JSON nested past the bound, integers beyond SQLite, a corrupt file inside a PEFT folder, a
damaged catalog page; the catalog trusted for no path; verify's integrity check and a repair
that deletes orphans only; output folders that never lose a user's file; one base model per
composition; complex, float32-overflowing and non-.npy prototypes.
"""

import json
import os
import shutil
import sqlite3

import numpy as np
import pytest
import safetensors

from hardening_cases import (BASE, make_library, one_line_or_ok, peft_folder, rpe, sql,
                             tiny_vit_folder, write_adapter)
from rpe_jax import cli
from rpe_jax.library import Library

DEEP = "[" * 100_000 + "]" * 100_000


def error_line(capsys, *argv, code=2):
  got, out, err = rpe(capsys, *argv)
  assert got == code, (got, out, err)
  one_line_or_ok(got, out, err)
  return err


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("vit")
  model = tiny_vit_folder(folder / "base")
  peft_folder(model, folder / "peft")
  return folder


# --- 1. one error boundary -------------------------------------------------------------

@pytest.mark.parametrize("exc", [
    PermissionError(13, "Permission denied", "/some/file"),
    IsADirectoryError(21, "Is a directory", "/some/dir"), EOFError("No data left in file"),
    OverflowError("int too large"), RecursionError("maximum recursion depth exceeded"),
    sqlite3.DatabaseError("database disk image is malformed"),
    safetensors.SafetensorError("Error while deserializing header"),
], ids=lambda e: type(e).__name__)
def test_the_boundary_maps_user_errors_to_one_line_and_traceback_reraises(capsys, exc):
  def fail():
    raise exc
  assert cli.guarded(fail) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1
  if isinstance(exc, OSError):
    assert exc.filename in err
  with pytest.raises(type(exc)):
    cli.guarded(fail, traceback=True)
  with pytest.raises(KeyError):   # a genuine bug is not swallowed
    cli.guarded(lambda: {}["x"])


def test_zero_byte_files_of_every_kind(capsys, tmp_path, hf_folder):
  lib = make_library(capsys, tmp_path)
  empty = tmp_path / "empty"
  empty.write_bytes(b"")
  add = ["library", "add", lib, "x"]
  tail = [*BASE, "--n-samples", "1"]
  cases = [
      (add + [empty, tmp_path / "p0.npy"] + tail, "empty"),                     # adapter
      (add + [tmp_path / "a0.safetensors", empty] + tail, "empty"),             # prototype
      (add + [tmp_path / "a0.safetensors", tmp_path / "p0.npy"] + tail
       + ["--metadata", f"@{empty}"], "empty"),                                 # metadata
      (["library", "query", lib, empty], "empty"),
      (["compose", "--library", lib, "--prototype", empty], "empty"),
  ]
  for name in ("adapter_config.json", "adapter_model.safetensors"):   # PEFT folder files
    peft = tmp_path / f"peft-{name}"
    shutil.copytree(hf_folder / "peft", peft)
    (peft / name).write_bytes(b"")
    cases.append((["library", "import-peft", lib, "x", peft, tmp_path / "p0.npy",
                   "--model", hf_folder / "base", "--encoder", "enc", "--n-samples", "1"],
                  name))
  model = tmp_path / "model"
  shutil.copytree(hf_folder / "base", model)
  (model / "config.json").write_bytes(b"")
  cases.append((["library", "export-peft", lib, "ad0", tmp_path / "out", "--model", model],
                "config.json"))
  model2 = tmp_path / "model2"
  shutil.copytree(hf_folder / "base", model2)
  (model2 / "model.safetensors").write_bytes(b"")
  cases.append((["library", "export-peft", lib, "ad0", tmp_path / "out", "--model", model2],
                "model.safetensors"))
  (tmp_path / "pathmnist.npz").write_bytes(b"")   # a dataset file
  cases.append((["compose", "--library", lib, "--model", "demo", "--data", "medmnist:pathmnist",
                 "--data-root", tmp_path], "pathmnist.npz"))
  nolib = tmp_path / "nolib"
  nolib.mkdir()
  (nolib / "catalog.sqlite").write_bytes(b"")
  cases.append((["library", "list", nolib], "not an rpe_jax catalog"))
  for argv, message in cases:
    err = error_line(capsys, *argv)
    assert message in err, (argv, err)
  assert not (tmp_path / "out").exists()
  assert Library.open(lib).verify().ok


@pytest.mark.parametrize("where", ["metadata", "metadata-file", "safetensors-header",
                                   "peft-config", "catalog-row"])
def test_json_nesting_is_bounded_wherever_json_is_parsed(capsys, tmp_path, hf_folder, where):
  lib = make_library(capsys, tmp_path)
  add = ["library", "add", lib, "x", tmp_path / "a0.safetensors", tmp_path / "p0.npy", *BASE,
         "--n-samples", "1"]
  if where == "metadata":
    argv, named = add + ["--metadata", DEEP], "--metadata"
  elif where == "metadata-file":
    (tmp_path / "m.json").write_text(DEEP)
    argv, named = add + ["--metadata", f"@{tmp_path / 'm.json'}"], "m.json"
  elif where == "safetensors-header":
    header = DEEP.encode()
    (tmp_path / "deep.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    argv, named = add[:4] + [tmp_path / "deep.safetensors"] + add[5:], "deep.safetensors"
  elif where == "peft-config":
    shutil.copytree(hf_folder / "peft", tmp_path / "peft")
    (tmp_path / "peft" / "adapter_config.json").write_text(DEEP)
    argv = ["library", "import-peft", lib, "x", tmp_path / "peft", tmp_path / "p0.npy",
            "--model", hf_folder / "base", "--encoder", "enc", "--n-samples", "1"]
    named = "adapter_config.json"
  else:
    sql(lib, "UPDATE adapters SET metadata = ? WHERE name = 'ad1'", (DEEP,))
    argv, named = ["library", "show", lib, "ad1"], "'ad1'"
  err = error_line(capsys, *argv)
  assert "nested" in err and named in err, err


def test_integers_beyond_sqlite(capsys, tmp_path):
  lib = make_library(capsys, tmp_path)
  err = error_line(capsys, "library", "add", lib, "x", tmp_path / "a0.safetensors",
                   tmp_path / "p0.npy", *BASE, "--n-samples", 10**30)
  assert "n_samples" in err and "2**63" in err
  for argv in (["library", "query", lib, tmp_path / "p0.npy", "-k", 10**30],
               ["compose", "--library", lib, "--prototype", tmp_path / "p0.npy",
                "--k", 10**30]):
    assert "exceeds" in error_line(capsys, *argv)
  assert Library.open(lib).names() == ["ad0", "ad1", "ad2"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "huge-header-length",
                                    "zero-rank"])
def test_corrupt_adapter_file_inside_a_peft_folder(capsys, tmp_path, hf_folder, damage):
  lib = make_library(capsys, tmp_path)
  peft = tmp_path / "peft"
  shutil.copytree(hf_folder / "peft", peft)
  weights = peft / "adapter_model.safetensors"
  data = weights.read_bytes()
  if damage == "truncated":
    weights.write_bytes(data[:-10])
  elif damage == "garbage":
    weights.write_bytes(data[:8] + b"\x00garbage" * (len(data) // 8))
  elif damage == "huge-header-length":
    weights.write_bytes((2**62).to_bytes(8, "little") + data[8:])
  else:
    tensors = {k: np.zeros((0,) + v.shape[1:], v.dtype) if "lora_A" in k else v
               for k, v in safetensors.numpy.load_file(str(weights)).items()}
    safetensors.numpy.save_file(tensors, str(weights))
  err = error_line(capsys, "library", "import-peft", lib, "x", peft, tmp_path / "p0.npy",
                   "--model", hf_folder / "base", "--encoder", "enc", "--n-samples", "1")
  assert "adapter_model.safetensors" in err
  assert Library.open(lib).names() == ["ad0", "ad1", "ad2"]


def _damage_page(lib, table):
  """Overwrite the b-tree page header of ``table``'s root page with garbage."""
  conn = sqlite3.connect(lib / "catalog.sqlite")
  page_size = conn.execute("PRAGMA page_size").fetchone()[0]
  root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
  conn.close()
  with open(lib / "catalog.sqlite", "r+b") as f:
    f.seek((root - 1) * page_size)
    f.write(b"\x0a\x00\x00\x00\x07" + b"\xff" * 40)


def test_a_damaged_catalog_page_is_one_line_everywhere_and_verify_reports_it(capsys, tmp_path):
  lib = make_library(capsys, tmp_path)
  _damage_page(lib, "adapters")
  err = error_line(capsys, "library", "list", lib)
  assert "catalog.sqlite" in err and "malformed" in err
  err = error_line(capsys, "library", "add", lib, "x", tmp_path / "a0.safetensors",
                   tmp_path / "p0.npy", *BASE, "--n-samples", "1")
  assert "catalog.sqlite" in err
  err = error_line(capsys, "compose", "--library", lib, "--prototype", tmp_path / "p0.npy",
                   "--k", "1")
  assert "catalog.sqlite" in err
  code, out, err = rpe(capsys, "library", "verify", lib)
  assert code == 1 and "PROBLEMS" in out and "catalog damaged" in out and err == ""


# --- 2. the catalog is data, not code ---------------------------------------------------

def test_a_hand_edited_id_cannot_reach_outside_the_library(capsys, tmp_path):
  lib = make_library(capsys, tmp_path)
  victim = tmp_path / "victim.safetensors"
  victim.write_bytes(b"precious")
  sql(lib, "UPDATE adapters SET id = '../../victim' WHERE name = 'ad1'")
  for argv in (["library", "remove", lib, "ad1"], ["library", "show", lib, "ad1"],
               ["library", "add", lib, "ad1", tmp_path / "a0.safetensors",
                tmp_path / "p0.npy", *BASE, "--n-samples", "1", "--replace"]):
    err = error_line(capsys, *argv)
    assert "'ad1'" in err and "invalid id" in err
  assert victim.read_bytes() == b"precious"
  conn = sqlite3.connect(lib / "catalog.sqlite")
  assert conn.execute("SELECT id FROM adapters WHERE name = 'ad1'").fetchone() == ("../../victim",)
  conn.close()
  code, out, _ = rpe(capsys, "library", "verify", lib, "--repair")
  assert code == 1 and "invalid entry: ad1" in out and victim.read_bytes() == b"precious"


def test_symlinks_out_of_the_library_are_refused_and_never_followed(capsys, tmp_path):
  lib = make_library(capsys, tmp_path)
  outside = tmp_path / "outside.safetensors"
  shutil.copy(Library.open(lib).get("ad1").path, outside)
  before = outside.read_bytes()
  path = Library.open(lib).get("ad1").path
  path.unlink()
  path.symlink_to(outside)
  for argv in (["library", "remove", lib, "ad1"],
               ["library", "export-peft", lib, "ad1", tmp_path / "x", "--model", "nope"]):
    err = error_line(capsys, *argv)
    assert ("'ad1'" in err and "outside the library" in err) or "--model nope" in err
  assert Library.open(lib).names() == ["ad0", "ad1", "ad2"] and path.is_symlink()
  code, out, _ = rpe(capsys, "library", "verify", lib)
  assert code == 1 and "invalid entry: ad1" in out
  # An orphan symlink is removed by repair as a link: its target stays.
  path.unlink()
  stray = lib / "adapters" / "stray.safetensors"
  stray.symlink_to(outside)
  sql(lib, "DELETE FROM adapters WHERE name = 'ad1'")
  code, out, _ = rpe(capsys, "library", "verify", lib, "--repair")
  assert code == 0 and "stray.safetensors (removed)" in out
  assert not stray.is_symlink() and outside.read_bytes() == before
  # The adapters folder itself pointing elsewhere: nothing is written there.
  elsewhere = tmp_path / "elsewhere"
  (lib / "adapters").rename(elsewhere)
  (lib / "adapters").symlink_to(elsewhere)
  listing = sorted(os.listdir(elsewhere))
  err = error_line(capsys, "library", "add", lib, "new", tmp_path / "a0.safetensors",
                   tmp_path / "p0.npy", *BASE, "--n-samples", "1")
  assert "adapters folder" in err and sorted(os.listdir(elsewhere)) == listing


def test_rows_of_the_wrong_types_are_named_not_tracebacks(capsys, tmp_path):
  lib = make_library(capsys, tmp_path, n=4)
  sql(lib, "UPDATE adapters SET n_samples = 'many' WHERE name = 'ad0'")
  sql(lib, "UPDATE adapters SET prototype = x'0102' WHERE name = 'ad1'")
  sql(lib, "UPDATE adapters SET signature = '{\"a\": 1}' WHERE name = 'ad2'")
  for name in ("ad0", "ad1", "ad2"):
    err = error_line(capsys, "library", "show", lib, name)
    assert f"'{name}' is damaged" in err
  err = error_line(capsys, "library", "query", lib, tmp_path / "p0.npy", "-k", "1")
  assert "damaged" in err
  code, out, _ = rpe(capsys, "library", "verify", lib, "--json")
  assert code == 1 and json.loads(out)["invalid"] == ["ad0", "ad1", "ad2"]


# --- 3. verify: integrity check; repair deletes orphans only ------------------------------

def test_verify_finds_a_damaged_index_page_that_queries_do_not_see(capsys, tmp_path):
  lib = make_library(capsys, tmp_path)
  _damage_page(lib, "adapters_by_encoder")
  one_line_or_ok(*rpe(capsys, "library", "list", lib))   # may or may not step on it
  (lib / "adapters" / "deadbeef.safetensors").write_bytes(b"orphan")
  code, out, _ = rpe(capsys, "library", "verify", lib, "--repair", "--json")
  report = json.loads(out)
  assert code == 1 and not report["ok"] and report["integrity"]
  assert report["removed"] == []   # no repair on a damaged catalog
  assert (lib / "adapters" / "deadbeef.safetensors").exists()
  code, out, _ = rpe(capsys, "library", "verify", lib, "--repair")
  assert "orphans not removed: the catalog failed its integrity check" in out


def test_repair_never_deletes_an_entrys_data_and_says_what_it_removed(capsys, tmp_path):
  lib = make_library(capsys, tmp_path)
  files = {p.name: p.read_bytes() for p in (lib / "adapters").iterdir()}
  (lib / "adapters" / ".tmp-0123.safetensors").write_bytes(b"t")
  (lib / "adapters" / "orphan.safetensors").write_bytes(b"o")
  (lib / "adapters" / "a-folder").mkdir()
  code, out, _ = rpe(capsys, "library", "verify", lib, "--repair")
  assert "orphan file: .tmp-0123.safetensors (removed)" in out
  assert "orphan file: orphan.safetensors (removed)" in out
  assert "orphan file: a-folder\n" in out + "\n" and code == 1   # folders are not deleted
  assert {p.name: p.read_bytes() for p in (lib / "adapters").iterdir() if p.is_file()} == files


# --- 4. outputs never destroy a user's files ---------------------------------------------

def test_out_into_a_users_folder_needs_overwrite_and_keeps_their_files(capsys, tmp_path):
  lib = make_library(capsys, tmp_path)
  out = tmp_path / "mine"
  (out / "composed").mkdir(parents=True)
  (out / "notes.txt").write_text("keep me")
  (out / "composed" / "draft.txt").write_text("mine too")
  argv = ["compose", "--library", lib, "--prototype", tmp_path / "p1.npy", "--k", "2",
          "--strategy", "avg", "--out", out]
  err = error_line(capsys, *argv)
  assert "--overwrite" in err and "did not write" in err
  assert sorted(p.name for p in out.iterdir()) == ["composed", "notes.txt"]
  assert (out / "composed" / "draft.txt").read_text() == "mine too"
  code, _, err = rpe(capsys, *argv, "--overwrite")
  assert code == 0, err
  assert sorted(p.name for p in out.iterdir()) == ["composed", "notes.txt", "report.json"]
  assert (out / "notes.txt").read_text() == "keep me"
  assert sorted(p.name for p in (out / "composed").iterdir()) == ["adapter.safetensors"]
  # A folder the tool wrote: rewritten without --overwrite (two targets → target-N).
  fresh = tmp_path / "fresh"
  assert rpe(capsys, *argv[:-1], fresh)[0] == 0
  np.save(tmp_path / "two.npy", np.stack([np.full(4, 0.0), np.full(4, 2.0)]).astype(np.float32))
  code, _, err = rpe(capsys, "compose", "--library", lib, "--prototype", tmp_path / "two.npy",
                     "--k", "2", "--out", fresh)
  assert code == 0, err
  assert sorted(p.name for p in fresh.iterdir()) == ["report.json", "target-0", "target-1"]
  assert json.loads((fresh / "report.json").read_text())["written_by"] == "rpe_jax.compose"


def test_the_final_report_rewrite_is_atomic(capsys, tmp_path, monkeypatch):
  from rpe_jax.cli import outputs
  lib = make_library(capsys, tmp_path)
  out = tmp_path / "out"
  calls = []

  def failing_fsync(fd):   # the rewrite with final timings fails before its rename
    calls.append(fd)
    raise OSError(5, "Input/output error")

  monkeypatch.setattr(outputs.os, "fsync", failing_fsync)
  code, _, err = rpe(capsys, "compose", "--library", lib, "--prototype", tmp_path / "p1.npy",
                     "--k", "2", "--out", out)
  assert code == 2 and "Input/output error" in err and "report.json" in err and calls
  report = json.loads((out / "report.json").read_text())   # the staged one, whole
  assert report["targets"][0]["retrieved"] == ["ad1", "ad0"]
  assert sorted(p.name for p in out.iterdir()) == ["composed", "report.json"]


def test_export_peft_refuses_a_non_empty_folder_without_overwrite(capsys, tmp_path, hf_folder):
  lib = tmp_path / "lib"
  assert rpe(capsys, "library", "init", lib)[0] == 0
  np.save(tmp_path / "p.npy", np.ones(4, np.float32))
  code, _, err = rpe(capsys, "library", "import-peft", lib, "imp", hf_folder / "peft",
                     tmp_path / "p.npy", "--model", hf_folder / "base", "--encoder", "enc",
                     "--n-samples", "1")
  assert code == 0, err
  out = tmp_path / "export"
  out.mkdir()
  (out / "adapter_config.json").write_text('{"theirs": true}')
  (out / "README.md").write_text("theirs")
  argv = ["library", "export-peft", lib, "imp", out, "--model", hf_folder / "base"]
  assert "--overwrite" in error_line(capsys, *argv)
  assert json.loads((out / "adapter_config.json").read_text()) == {"theirs": True}
  assert rpe(capsys, *argv, "--overwrite")[0] == 0
  assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                   "adapter_model.safetensors"]
  assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


# --- 5. one base model per composition ------------------------------------------------------

def test_a_composition_never_mixes_base_models(capsys, tmp_path):
  lib = make_library(capsys, tmp_path, n=2)
  write_adapter(tmp_path / "m.safetensors", 7)   # the same shapes, another base model
  np.save(tmp_path / "pm.npy", np.full(4, 0.5, np.float32))
  assert rpe(capsys, "library", "add", lib, "other", tmp_path / "m.safetensors",
             tmp_path / "pm.npy", "--base-model", "another", "--encoder", "enc",
             "--n-samples", "1")[0] == 0
  argv = ["compose", "--library", lib, "--prototype", tmp_path / "p0.npy", "--k", "2",
          "--strategy", "avg"]
  err = error_line(capsys, *argv)
  assert "different base models" in err and "other (another)" in err and "ad0 (tiny)" in err
  code, out, err = rpe(capsys, *argv, "--base-model", "tiny", "--json")
  assert code == 0, err
  assert json.loads(out)["targets"][0]["retrieved"] == ["ad0", "ad1"]
  assert "no adapters of it" in error_line(capsys, *argv, "--base-model", "nope")


# --- prototypes: complex, float32 overflow, not a .npy file ---------------------------------

def test_prototype_files_that_are_not_real_float32_vectors(capsys, tmp_path):
  lib = make_library(capsys, tmp_path)
  np.save(tmp_path / "complex.npy", np.full(4, 1 + 2j))
  np.save(tmp_path / "huge.npy", np.full(4, 1e300))
  (tmp_path / "text.npy").write_text("0.1 0.2 0.3 0.4\n")
  np.savez(tmp_path / "zip.npy", x=np.ones(4))
  os.replace(tmp_path / "zip.npy.npz", tmp_path / "zip.npy")
  np.save(tmp_path / "object.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
  for name, message in [("complex", "complex-valued"), ("huge", "beyond the float32 range"),
                        ("text", "not a .npy file"), ("zip", "not a .npy file"),
                        ("object", "pickled data")]:
    path = tmp_path / f"{name}.npy"
    for argv in (["library", "add", lib, "x", tmp_path / "a0.safetensors", path, *BASE,
                  "--n-samples", "1"],
                 ["library", "query", lib, path],
                 ["compose", "--library", lib, "--prototype", path]):
      err = error_line(capsys, *argv)
      assert message in err and f"{name}.npy" in err, (argv, err)
  assert Library.open(lib).names() == ["ad0", "ad1", "ad2"]


def test_train_refuses_to_replace_an_existing_out_file_before_training(capsys, tmp_path):
  out = tmp_path / "adapter.safetensors"
  out.write_bytes(b"the user's adapter")
  err = error_line(capsys, "train", "--data", "sites:digits/noisy", "--out", out)
  assert "--overwrite" in err and str(out) in err
  assert out.read_bytes() == b"the user's adapter"

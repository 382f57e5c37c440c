"""Fuzz suite (hypothesis): malformed inputs of every kind the CLI reads, driven through
``rpe_jax.cli.main`` in-process.

Property: every generated case ends in exit 0 or exit 2 with exactly one ``error:`` line on
stderr (``verify``: 0 or 1, its documented "problems found"), never a traceback; nothing
outside the library folder is touched; and the library that the case ran against
verifies clean afterwards (a case that added an entry removes it again).

Generators: .npy files (any dtype and shape, NaN/Inf/huge values, truncated or garbled
headers, random bytes), safetensors files (random JSON headers, deep nesting, wrong
length fields, inconsistent offsets), --metadata JSON (text and @file), PEFT folders
(config values, missing files, damaged weights) and catalogs (hand-edited rows with any
SQLite value, flipped bytes). ``derandomize=True``: the same cases in every run.
Case counts: see ``EXAMPLES`` (their sum is the number of generated cases).
"""

import json
import shutil
import sqlite3
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from hardening_cases import (BASE, one_line_or_ok, peft_folder, tiny_vit_folder,
                             write_adapter)
from rpe_jax import cli
from rpe_jax.library import Library

EXAMPLES = {"npy": 40, "safetensors": 50, "metadata": 30, "peft": 20, "rows": 40,
            "bytes": 25}


def fuzz_settings(name):
  return settings(max_examples=EXAMPLES[name], deadline=None, derandomize=True,
                  database=None, suppress_health_check=list(HealthCheck))


def run(capsys, *argv, ok=(0,)):
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  one_line_or_ok(code, out, err, ok=ok)
  return code


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A library of three adapters (prototype dimension 4), the files added from, a tiny HF
  ViT with a valid PEFT folder for it, and a file outside the library that must survive."""
  root = tmp_path_factory.mktemp("fuzz")
  lib = Library.create(root / "lib")
  for i in range(3):
    tensors = write_adapter(root / f"a{i}.safetensors", i)
    lib.add(f"ad{i}", tensors, np.full(4, float(i)), base_model="tiny", encoder="enc",
            n_samples=1)
  lib.close()
  np.save(root / "p.npy", np.full(4, 0.5, np.float32))
  model = tiny_vit_folder(root / "vit")
  peft_folder(model, root / "peft")
  (root / "victim.safetensors").write_bytes(b"precious")
  return root


def library_is_clean(root):
  with Library.open(root / "lib") as lib:
    report = lib.verify()
    assert report.ok and lib.names() == ["ad0", "ad1", "ad2"], report
  assert (root / "victim.safetensors").read_bytes() == b"precious"


def add_then_cleanup(capsys, root, adapter, prototype, *extra):
  code = run(capsys, "library", "add", root / "lib", "fuzzed", adapter, prototype, *BASE,
             "--n-samples", "1", *extra)
  if code == 0:
    run(capsys, "library", "remove", root / "lib", "fuzzed")
  library_is_clean(root)


# --- generators -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)


@st.composite
def deep_json(draw):
  depth = draw(st.sampled_from([1, 10, 63, 65, 1000, 50_000]))
  opener = draw(st.sampled_from(["[", '{"a":']))
  closer = "]" if opener == "[" else "}"
  return opener * depth + "1" + closer * depth


@st.composite
def npy_bytes(draw):
  kind = draw(st.sampled_from(["array", "array", "mutated", "raw", "magic-raw"]))
  if kind in ("raw", "magic-raw"):
    data = draw(st.binary(max_size=200))
    return (b"\x93NUMPY" + data) if kind == "magic-raw" else data
  dtype = draw(st.sampled_from(["<f4", "<f8", "<f2", ">f8", "<i8", "|u1", "|b1", "<c8",
                                "<c16", "<U3", "<M8[s]"]))
  shape = draw(st.sampled_from([(4,), (4,), (1, 4), (3, 4), (5,), (0,), (0, 4), (2, 2, 4),
                                ()]))
  values = draw(st.lists(st.sampled_from([0.0, 1.5, -2.0, np.nan, np.inf, 1e300, -1e39, 7.0]),
                         min_size=1, max_size=1))
  x = np.full(shape, values[0]).astype("<f8")
  try:
    with np.errstate(all="ignore"):
      x = x.astype(dtype)
  except (ValueError, TypeError):
    x = x.astype("<f8")
  import io
  buffer = io.BytesIO()
  np.save(buffer, x)
  data = buffer.getvalue()
  if kind == "mutated":
    how = draw(st.sampled_from(["truncate", "flip", "header"]))
    at = draw(st.integers(0, len(data) - 1))
    if how == "truncate":
      data = data[:at]
    elif how == "flip":
      data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    else:
      header = draw(st.sampled_from([b"{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }",
                                     b"{'descr': 'O', 'fortran_order': False, 'shape': (4,), }",
                                     b"(" * 5000, b"{'descr': '<f4'}", b"not python"]))
      data = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data[-16:]
  return data


@st.composite
def safetensors_bytes(draw):
  kind = draw(st.sampled_from(["structured", "structured", "json", "deep", "raw"]))
  if kind == "raw":
    return draw(st.binary(max_size=64))
  if kind == "json":
    header = json.dumps(draw(json_values)).encode()
  elif kind == "deep":
    header = draw(deep_json()).encode()
  else:
    entries = {}
    offset = 0
    for key in draw(st.lists(st.sampled_from(["enc.0.q.a", "enc.0.q.b", "enc.0.q.e", "x",
                                              "enc.0.q.c", "__metadata__"]),
                             min_size=1, max_size=3, unique=True)):
      shape = draw(st.sampled_from([[6, 2], [2, 5], [2], [6, 0], [0, 5], [-1, 2], [2**40, 2**40],
                                    ["6", 2], [6.0, 2]]))
      dtype = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "C64", "F32", 7]))
      size = draw(st.sampled_from([48, 40, 20, 0, 8, -4]))
      entries[key] = ({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
                      if key != "__metadata__" else draw(st.sampled_from(
                          [{"a": "b"}, {"a": 1}, [], "x"])))
      offset += max(size, 0)
    header = json.dumps(entries).encode()
  data = draw(st.binary(max_size=120))
  length = draw(st.sampled_from([len(header), len(header), len(header) + 1, 0, 2**63]))
  return struct.pack("<Q", length) + header + data


# --- properties ------------------------------------------------------------------------

@fuzz_settings("npy")
@given(data=npy_bytes())
def test_fuzzed_npy_prototypes(capsys, world, data):
  path = world / "fuzz.npy"
  path.write_bytes(data)
  add_then_cleanup(capsys, world, world / "a0.safetensors", path)
  run(capsys, "library", "query", world / "lib", path, "-k", "1")
  run(capsys, "compose", "--library", world / "lib", "--prototype", path, "--k", "1",
      "--strategy", "nearest")


@fuzz_settings("safetensors")
@given(data=safetensors_bytes())
def test_fuzzed_safetensors_files(capsys, world, data):
  path = world / "fuzz.safetensors"
  path.write_bytes(data)
  add_then_cleanup(capsys, world, path, world / "p.npy")


@fuzz_settings("metadata")
@given(text=st.one_of(json_values.map(json.dumps), deep_json(), st.text(max_size=30)),
       as_file=st.booleans())
def test_fuzzed_metadata(capsys, world, text, as_file):
  if as_file:
    (world / "meta.json").write_text(text, errors="surrogatepass")
    text = f"@{world / 'meta.json'}"
  add_then_cleanup(capsys, world, world / "a0.safetensors", world / "p.npy",
                   "--metadata", text)


CONFIG_KEYS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora",
               "target_modules", "peft_type", "bias", "init_lora_weights", "use_dora",
               "fan_in_fan_out", "base_model_name_or_path"]


@fuzz_settings("peft")
@given(change=st.sampled_from(["config-value", "config-value", "config-json", "no-config",
                               "no-weights", "weights-bytes", "weights-keys"]),
       key=st.sampled_from(CONFIG_KEYS), value=json_values, data=safetensors_bytes(),
       rename=st.sampled_from(["base_model.model.nope.lora_A.weight", "x", "lora_A"]))
def test_fuzzed_peft_folders(capsys, world, change, key, value, data, rename):
  import safetensors.numpy
  folder = world / "fuzz-peft"
  shutil.rmtree(folder, ignore_errors=True)
  shutil.copytree(world / "peft", folder)
  config, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
  if change == "config-value":
    d = json.loads(config.read_text())
    d[key] = value
    config.write_text(json.dumps(d))
  elif change == "config-json":
    config.write_text(json.dumps(value))
  elif change == "no-config":
    config.unlink()
  elif change == "no-weights":
    weights.unlink()
  elif change == "weights-bytes":
    weights.write_bytes(data)
  else:
    tensors = safetensors.numpy.load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[rename] = tensors.pop(first)
    safetensors.numpy.save_file(tensors, str(weights))
  code = run(capsys, "library", "import-peft", world / "lib", "fuzzed", folder, world / "p.npy",
             "--model", world / "vit", "--encoder", "enc", "--n-samples", "1",
             "--base-model", "peft-base")
  if code == 0:
    run(capsys, "library", "remove", world / "lib", "fuzzed")
  library_is_clean(world)


COLUMNS = ["id", "name", "base_model", "signature", "structure_hash", "encoder", "prototype",
           "n_samples", "rank", "dtype", "sha256", "size", "created", "metadata"]
sqlite_values = st.one_of(
    st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=12), st.binary(max_size=20),
    st.sampled_from(["../victim", "../../victim", "/tmp", "a" * 32, "0" * 32, "{}", "[]",
                     "[[[[", "[" * 5000, '[{"path": 1}]', "enc", "tiny", "ad0"]))


def tampered_copy(world, name):
  copy = world / name
  shutil.rmtree(copy, ignore_errors=True)
  shutil.copytree(world / "lib", copy)
  return copy


def drive_every_command(capsys, world, lib):
  for argv in (["library", "list", lib], ["library", "show", lib, "ad1"],
               ["library", "query", lib, world / "p.npy", "-k", "2"],
               ["library", "add", lib, "ad2", world / "a0.safetensors", world / "p.npy", *BASE,
                "--n-samples", "1", "--replace"],
               ["library", "remove", lib, "ad0"]):
    run(capsys, *argv)
  run(capsys, "library", "verify", lib, "--repair", ok=(0, 1))
  assert (world / "victim.safetensors").read_bytes() == b"precious"


@fuzz_settings("rows")
@given(table_column=st.sampled_from([("adapters", c) for c in COLUMNS]
                                    + [("encoders", "dim"), ("encoders", "pooling"),
                                       ("encoders", "id"), ("base_models", "structure"),
                                       ("base_models", "structure_hash"), ("meta", "value")]),
       row=st.integers(0, 2), value=sqlite_values)
def test_fuzzed_catalog_rows(capsys, world, table_column, row, value):
  table, column = table_column
  lib = tampered_copy(world, "lib-rows")
  conn = sqlite3.connect(lib / "catalog.sqlite")
  try:
    rowid = conn.execute(f"SELECT rowid FROM {table} ORDER BY rowid").fetchall()
    conn.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?",
                 (value, rowid[min(row, len(rowid) - 1)][0]))
    conn.commit()
  except sqlite3.IntegrityError:
    reject()
  finally:
    conn.close()
  drive_every_command(capsys, world, lib)
  library_is_clean(world)


@fuzz_settings("bytes")
@given(edits=st.lists(st.tuples(st.integers(0, 2**16), st.binary(min_size=1, max_size=8)),
                      min_size=1, max_size=4),
       truncate=st.one_of(st.none(), st.integers(0, 2**15)))
def test_fuzzed_catalog_bytes(capsys, world, edits, truncate):
  lib = tampered_copy(world, "lib-bytes")
  data = bytearray((lib / "catalog.sqlite").read_bytes())
  for at, chunk in edits:
    at %= len(data)
    data[at:at + len(chunk)] = chunk
  (lib / "catalog.sqlite").write_bytes(bytes(data[:truncate] if truncate is not None else data))
  drive_every_command(capsys, world, lib)
  library_is_clean(world)

"""Adapter library: catalog API, validation, adapter files and exact retrieval.

Oracles: numpy float64 distances with a stable (distance, index) sort for retrieval;
hand-written structures for the signature; the arrays that went in for round trips.
"""

import json
import sqlite3

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from models.lora import LoRA, SVDLoRA, is_lora, to_flat
from rpe_jax import retrieval
from rpe_jax.library import adapter_file
from rpe_jax.library.adapter_file import AdapterFormatError
from rpe_jax.library.catalog import Library, LibraryError

SHAPES = {"layers.0.attention.query": (6, 6), "layers.0.attention.value": (6, 6),
          "layers.1.mlp.fc1": (6, 10)}


def make_adapter(seed, rank=2, kind="lora", shapes=SHAPES, dtype=np.float32):
  """An exchange-form tree with LoRA / SVDLoRA leaves of the given layer shapes."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, (d_in, d_out) in shapes.items():
    a = jnp.asarray(rng.standard_normal((d_in, rank)).astype(dtype))
    b = jnp.asarray(rng.standard_normal((rank, d_out)).astype(dtype))
    flat[path] = (SVDLoRA(a, jnp.asarray(rng.random(rank).astype(dtype)), b) if kind == "svd"
                  else LoRA(a, b))
  from models.lora import from_flat
  return from_flat(flat)


def tensors_of(tree):
  return {k: np.array(v) for k, v in adapter_file.as_tensors(tree).items()}


@pytest.fixture
def lib(tmp_path):
  library = Library.create(tmp_path / "lib")
  yield library
  library.close()


def add(lib, name, seed, *, dim=8, encoder="enc", base="vit-tiny", **kw):
  proto = np.random.default_rng(1000 + seed).standard_normal(dim).astype(np.float32)
  kw.setdefault("adapter", make_adapter(seed))
  return lib.add(name, kw.pop("adapter"), proto, base_model=base, encoder=encoder,
                 n_samples=10 + seed, **kw)


# --- adapter files and the signature ------------------------------------------------------

def test_structure_signature_is_paths_and_shapes():
  sig = adapter_file.structure_signature(make_adapter(0, rank=3))
  assert sig["structure"] == [["layers.0.attention.query", 6, 6],
                              ["layers.0.attention.value", 6, 6], ["layers.1.mlp.fc1", 6, 10]]
  assert [l["rank"] for l in sig["layers"]] == [3, 3, 3]
  assert {l["kind"] for l in sig["layers"]} == {"lora"}
  # Rank and kind change the full hash but not the structure hash.
  other = adapter_file.structure_signature(make_adapter(1, rank=5, kind="svd"))
  assert other["structure_hash"] == sig["structure_hash"]
  assert other["hash"] != sig["hash"]
  shapes = dict(SHAPES, **{"layers.1.mlp.fc1": (6, 11)})
  assert adapter_file.structure_signature(make_adapter(0, shapes=shapes))["structure_hash"] \
      != sig["structure_hash"]
  # Tree, flat dict and tensor dict give the same signature.
  tree = make_adapter(0, rank=3)
  assert adapter_file.signature(to_flat(tree)) == adapter_file.signature(tensors_of(tree)) \
      == adapter_file.signature(tree)


@pytest.mark.parametrize("tensors, message", [
    ({"q.a": np.ones((4, 2)), "q.x": np.ones((2, 4))}, "not '<module path>.<a|e|b>'"),
    ({"q.a": np.ones((4, 2))}, "lacks factor"),
    ({"q.a": np.ones((4, 2)), "q.b": np.ones((3, 4))}, "expected a [in, r] and b [r, out]"),
    ({"q.a": np.ones((4, 2)), "q.b": np.ones((2, 4)), "q.e": np.ones(3)}, "e has shape"),
    ({"q.a": np.ones((4, 2), np.int32), "q.b": np.ones((2, 4))}, "dtype int32"),
    ({"q.a": np.full((4, 2), np.nan), "q.b": np.ones((2, 4))}, "NaN or Inf"),
])
def test_bad_adapters_are_refused(tensors, message):
  with pytest.raises(AdapterFormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
    adapter_file.signature(tensors)


def test_adapter_file_round_trip_keeps_kind_and_dtype(tmp_path):
  tree = make_adapter(3, kind="svd", dtype=ml_dtypes.bfloat16)
  adapter_file.save_adapter(tmp_path / "x.safetensors", tree, {"task": "demo"})
  loaded, meta = adapter_file.load_adapter(tmp_path / "x.safetensors")
  assert meta == {"task": "demo"}
  leaf = loaded["layers"]["0"]["attention"]["query"]
  assert isinstance(leaf, SVDLoRA) and leaf.a.dtype == jnp.bfloat16
  for k, v in tensors_of(tree).items():
    np.testing.assert_array_equal(tensors_of(loaded)[k].astype(np.float32), v.astype(np.float32))
  raw, _ = adapter_file.read_tensors(tmp_path / "x.safetensors")
  assert sorted(raw) == sorted(tensors_of(tree))
  assert "layers.1.mlp.fc1.e" in raw


# --- the catalog --------------------------------------------------------------------------

def test_add_get_load_round_trip(lib):
  tree = make_adapter(0, rank=4, kind="svd")
  entry = add(lib, "svd-one", 0, adapter=tree, metadata={"license": "mit", "task": "derma"})
  assert entry.name == "svd-one" and entry.rank == 4 and entry.dtype == "float32"
  assert entry.metadata == {"license": "mit", "task": "derma"} and entry.n_samples == 10
  assert entry.path.is_file() and entry.path.parent.name == "adapters"
  got = lib.get("svd-one")
  np.testing.assert_array_equal(
      got.prototype, np.random.default_rng(1000).standard_normal(8).astype(np.float32))
  loaded = lib.load("svd-one")
  leaves = to_flat(loaded)
  assert all(isinstance(l, SVDLoRA) for l in leaves.values())
  for k, v in tensors_of(tree).items():
    np.testing.assert_array_equal(tensors_of(loaded)[k], v)
  assert lib.names() == ["svd-one"] and len(lib) == 1 and "svd-one" in lib


def test_mixed_ranks_and_kinds_share_a_base_model(lib):
  add(lib, "a", 0, adapter=make_adapter(0, rank=2))
  add(lib, "b", 1, adapter=make_adapter(1, rank=7, kind="svd"))
  assert lib.base_models()["vit-tiny"]["count"] == 2
  assert [e.rank for e in lib.entries()] == [2, 7]


def test_structure_mismatch_is_refused_and_nothing_is_written(lib):
  add(lib, "a", 0)
  files = sorted(p.name for p in (lib.path / "adapters").iterdir())
  shapes = dict(SHAPES, **{"layers.1.mlp.fc1": (6, 12)})
  with pytest.raises(LibraryError, match=r"structure of base model 'vit-tiny'.*fc1"):
    add(lib, "b", 1, adapter=make_adapter(1, shapes=shapes))
  fewer = {k: v for k, v in SHAPES.items() if "fc1" not in k}
  with pytest.raises(LibraryError, match="structure of base model"):
    add(lib, "c", 2, adapter=make_adapter(2, shapes=fewer))
  # Another base model id may have another structure.
  add(lib, "d", 3, adapter=make_adapter(3, shapes=fewer), base="other-model")
  assert lib.names() == ["a", "d"]
  assert len(files) + 1 == len(list((lib.path / "adapters").iterdir()))


def test_prototype_validation(lib):
  add(lib, "a", 0, dim=8)
  with pytest.raises(LibraryError, match="dimension 5.*encoder 'enc' has 8"):
    add(lib, "b", 1, dim=5)
  add(lib, "c", 2, dim=5, encoder="other-encoder")  # another encoder, another dimension
  for bad in (np.array([0.0, np.nan, 1.0]), np.array([np.inf, 0.0])):
    with pytest.raises(LibraryError, match="NaN or Inf"):
      lib.add("x", make_adapter(4), bad, base_model="vit-tiny", encoder="e2", n_samples=1)
  with pytest.raises(LibraryError, match=r"vector \[d\]"):
    lib.add("x", make_adapter(4), np.ones((2, 3)), base_model="vit-tiny", encoder="e2",
            n_samples=1)
  with pytest.raises(LibraryError, match="pooling 'cls' differs"):
    add(lib, "x", 5, pooling="cls")
  with pytest.raises(LibraryError, match="n_samples"):
    lib.add("x", make_adapter(4), np.ones(8), base_model="vit-tiny", encoder="enc",
            n_samples=0)
  with pytest.raises(LibraryError, match="name"):
    add(lib, " padded ", 6)
  with pytest.raises(LibraryError, match="NaN or Inf"):
    bad = tensors_of(make_adapter(7))
    bad["layers.1.mlp.fc1.b"][0, 0] = np.inf
    add(lib, "x", 7, adapter=bad)
  assert lib.names() == ["a", "c"]


def test_duplicates_and_atomic_replace(lib):
  add(lib, "a", 0)
  old = lib.get("a")
  with pytest.raises(LibraryError, match="already exists"):
    add(lib, "a", 1)
  # A replace that fails validation leaves the old entry intact.
  with pytest.raises(LibraryError, match="structure"):
    add(lib, "a", 1, replace=True, adapter=make_adapter(1, shapes={"x": (2, 2)}))
  assert lib.get("a").sha256 == old.sha256
  lib.load("a")
  new = add(lib, "a", 1, replace=True, adapter=make_adapter(1, rank=3))
  assert new.id != old.id and new.rank == 3 and not old.path.exists()
  assert lib.names() == ["a"] and lib.verify().ok
  np.testing.assert_array_equal(tensors_of(lib.load("a"))["layers.0.attention.query.a"],
                                tensors_of(make_adapter(1, rank=3))["layers.0.attention.query.a"])


def test_remove_frees_the_base_model_signature(lib):
  add(lib, "a", 0)
  path = lib.get("a").path
  lib.remove("a")
  assert lib.names() == [] and not path.exists()
  assert lib.base_models() == {} and lib.encoders() == {}
  with pytest.raises(LibraryError, match="no adapter named 'a'"):
    lib.remove("a")
  add(lib, "b", 1, adapter=make_adapter(1, shapes={"x": (3, 3)}), dim=4)  # a new signature


def test_load_detects_truncated_and_altered_files(lib):
  add(lib, "a", 0)
  add(lib, "b", 1)
  add(lib, "c", 2)
  path_a, path_b, path_c = (lib.get(n).path for n in "abc")
  path_a.write_bytes(path_a.read_bytes()[:-7])
  data = bytearray(path_b.read_bytes())
  data[-3] ^= 0x40  # same size, one bit flipped inside a tensor
  path_b.write_bytes(bytes(data))
  path_c.unlink()
  with pytest.raises(LibraryError, match="'a'.*corrupt"):
    lib.load("a")
  with pytest.raises(LibraryError, match="'b'.*corrupt"):
    lib.load("b")
  with pytest.raises(LibraryError, match="'c'.*missing"):
    lib.load("c")
  report = lib.verify()
  assert report.corrupt == ["a", "b"] and report.missing == ["c"] and not report.ok


def test_open_refuses_newer_schema_and_non_libraries(tmp_path):
  Library.create(tmp_path / "lib").close()
  conn = sqlite3.connect(tmp_path / "lib" / "catalog.sqlite")
  conn.execute("PRAGMA user_version = 99")
  conn.commit()
  conn.close()
  with pytest.raises(LibraryError, match="schema version 99, newer than the 1"):
    Library.open(tmp_path / "lib")
  with pytest.raises(LibraryError, match="not an adapter library"):
    Library.open(tmp_path)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(LibraryError, match="not an empty directory"):
    Library.create(tmp_path / "full")


def test_readonly_library_refuses_writes(tmp_path):
  lib = Library.create(tmp_path / "lib")
  add(lib, "a", 0)
  lib.close()
  ro = Library.open(tmp_path / "lib", readonly=True)
  with pytest.raises(LibraryError, match="read-only"):
    add(ro, "b", 1)
  assert ro.names() == ["a"] and ro.query(np.zeros(8), 1).names.tolist() == ["a"]


def test_verify_reports_and_repairs_orphans(lib):
  add(lib, "a", 0)
  (lib.path / "adapters" / "deadbeef.safetensors").write_bytes(b"x")
  (lib.path / "adapters" / ".tmp-cafe.safetensors").write_bytes(b"y")
  report = lib.verify()
  assert report.orphans == [".tmp-cafe.safetensors", "deadbeef.safetensors"] and not report.ok
  repaired = lib.verify(repair=True)
  assert repaired.removed == repaired.orphans and repaired.ok
  assert [p.name for p in (lib.path / "adapters").iterdir()] == [lib.get("a").path.name]
  assert lib.verify().ok


def test_a_concurrent_conflicting_add_is_caught_inside_the_transaction(tmp_path, monkeypatch):
  """Process A passes its early check, then B fixes the base model's structure first: A's
  re-check under the write lock must refuse, and A's temp file must be gone."""
  from rpe_jax.library import catalog as library_module
  a_lib = Library.create(tmp_path / "lib")
  b_lib = Library.open(tmp_path / "lib")

  def interleave(step):
    if step == "after_fsync":
      monkeypatch.setattr(library_module, "fault_hook", None)
      add(b_lib, "b", 1, adapter=make_adapter(1, shapes={"x": (3, 3)}))

  monkeypatch.setattr(library_module, "fault_hook", interleave)
  with pytest.raises(LibraryError, match="structure of base model"):
    add(a_lib, "a", 0)
  assert a_lib.names() == ["b"]
  assert len(list((tmp_path / "lib" / "adapters").iterdir())) == 1 and a_lib.verify().ok


# --- retrieval ----------------------------------------------------------------------------

def oracle_topk(refs, z, k, excluded=()):
  """float64 numpy: squared distances, stable sort by (distance, index)."""
  d = ((refs.astype(np.float64)[None] - z.astype(np.float64)[:, None]) ** 2).sum(-1)
  d[:, list(excluded)] = np.inf
  idx = np.argsort(d, axis=1, kind="stable")[:, :k]
  return idx, np.take_along_axis(d, idx, 1)


def test_query_matches_float64_oracle(lib):
  for i in range(13):  # 13 rows: padded to 16 inside
    add(lib, f"n{i:02d}", i, dim=8)
  protos = lib.prototypes("enc")
  assert protos.names == tuple(f"n{i:02d}" for i in range(13))
  assert protos.matrix.shape == (13, 8) and protos.n_samples.tolist() == list(range(10, 23))
  z = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)  # batch padded to 4
  r = lib.query(z, 4)
  idx, dist = oracle_topk(protos.matrix, z, 4)
  np.testing.assert_array_equal(np.asarray(r.indices), idx)
  assert r.names.tolist() == [[protos.names[i] for i in row] for row in idx]
  np.testing.assert_allclose(np.asarray(r.distances), dist, rtol=1e-5)
  refs = protos.matrix.astype(np.float64)[idx]
  np.testing.assert_allclose(np.asarray(r.inner), np.einsum("bkd,bd->bk", refs, z), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(r.ref_sqnorm), (refs ** 2).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(r.target_sqnorm), (z.astype(np.float64) ** 2).sum(-1),
                             rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(r.references), protos.matrix[idx])
  # d² = ‖z‖² − 2 z·z_i + ‖z_i‖²: the fields reproduce the distances (the solver's Gram input).
  np.testing.assert_allclose(
      np.asarray(r.target_sqnorm)[:, None] - 2 * np.asarray(r.inner) + np.asarray(r.ref_sqnorm),
      dist, rtol=1e-4, atol=1e-4)
  single = lib.query(z[1], 4)
  assert single.names.shape == (4,) and single.names.tolist() == r.names[1].tolist()


def test_query_ties_exclude_and_errors(lib):
  proto = np.ones(4, np.float32)
  for name in ("t0", "t1", "t2", "t3"):  # identical prototypes: ties broken by catalog order
    lib.add(name, make_adapter(0), proto, base_model="m", encoder="enc", n_samples=1)
  lib.add("far", make_adapter(0), proto + 3, base_model="m", encoder="enc", n_samples=1)
  assert lib.query(proto, 3).names.tolist() == ["t0", "t1", "t2"]
  assert lib.query(proto, 3, exclude=["t0", "t2"]).names.tolist() == ["t1", "t3", "far"]
  # One exclusion list per target (leave-one-out).
  r = lib.query(np.stack([proto, proto + 3]), 2, exclude=[["t0"], ["far"]])
  assert r.names.tolist() == [["t1", "t2"], ["t0", "t1"]]
  with pytest.raises(LibraryError, match="k=6 exceeds the 5 candidate"):
    lib.query(proto, 6)
  with pytest.raises(LibraryError, match="k=5 exceeds the 4 candidate"):
    lib.query(proto, 5, exclude=["far"])
  with pytest.raises(LibraryError, match="'nope'"):
    lib.query(proto, 1, exclude=["nope"])
  with pytest.raises(LibraryError, match=r"\[4\] or \[B, 4\]"):
    lib.query(np.ones(3), 1)
  with pytest.raises(LibraryError, match="NaN or Inf"):
    lib.query(np.array([1.0, np.nan, 0.0, 0.0]), 1)
  with pytest.raises(LibraryError, match="no prototypes for encoder 'other'"):
    lib.query(proto, 1, encoder="other")


def test_approx_option_and_empty_library(lib):
  with pytest.raises(LibraryError, match="no adapters to query"):
    lib.query(np.zeros(8), 1)
  for i in range(20):
    add(lib, f"n{i:02d}", i, dim=8)
  z = np.random.default_rng(9).standard_normal((2, 8)).astype(np.float32)
  idx, _ = oracle_topk(lib.prototypes().matrix, z, 3)
  # approx_max_k is approximate on TPU only; on CPU it must give the exact answer.
  np.testing.assert_array_equal(np.asarray(lib.query(z, 3, approx=True).indices), idx)


def test_query_cache_follows_writes_from_another_connection(tmp_path):
  reader = Library.create(tmp_path / "lib")
  writer = Library.open(tmp_path / "lib")
  add(writer, "a", 0, dim=4)
  z = np.zeros(4, np.float32)
  assert reader.query(z, 1).names.tolist() == ["a"]
  cached = reader.index("enc")
  assert reader.index("enc") is cached  # no rebuild without a write
  writer.add("b", make_adapter(1), z + 1e-3, base_model="vit-tiny", encoder="enc", n_samples=1)
  assert reader.query(z, 1).names.tolist() == ["b"]
  writer.remove("b")
  assert reader.query(z, 1).names.tolist() == ["a"]


@pytest.mark.parametrize("k", [1, 3])
def test_blocked_top_k_is_exact_with_ties_across_blocks(k):
  """Above 8·k·128 rows the top-k goes through block maxima: same answer as the oracle,
  ties (identical rows in different blocks, and inside one block) to the lower index."""
  rng = np.random.default_rng(0)
  refs = rng.standard_normal((3000, 6)).astype(np.float32) + 3
  z = rng.standard_normal((5, 6)).astype(np.float32)
  refs[[2999, 40, 1700, 41, 130]] = z[0]   # five exact hits for target 0, two in one block
  refs[[900, 901]] = z[1]
  index = retrieval.build_index([f"r{i}" for i in range(3000)], refs)
  assert index.rows // retrieval.BLOCK >= 8 * k  # the blocked path is taken
  r = retrieval.search(index, z, k)
  idx, dist = oracle_topk(refs, z, k)
  np.testing.assert_array_equal(np.asarray(r.indices), idx)
  np.testing.assert_allclose(np.asarray(r.distances), dist, rtol=1e-5, atol=1e-6)
  assert np.asarray(r.indices)[0].tolist() == [40, 41, 130][:k]
  # Leave-one-out per target through the same path.
  r = retrieval.search(index, z[:2], k, exclude=[["r40"], ["r900"]])
  assert np.asarray(r.indices)[0].tolist() == [41, 130, 1700][:k]
  assert np.asarray(r.indices)[1, 0] == 901


def test_padding_buckets():
  assert [retrieval.padded_rows(n) for n in (1, 8, 9, 1000, 1024, 1025, 100_000)] == \
      [8, 8, 16, 1024, 1024, 2048, 100_352]

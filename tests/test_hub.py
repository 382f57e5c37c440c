"""Models and PEFT adapters named by Hugging Face Hub id (models/hub.py), offline.

Each test writes the HF cache itself, laid out as ``huggingface_hub`` downloads it
(``models--org--name/{blobs,snapshots/<commit>,refs/<branch>}``, snapshot files linking to
blobs), points ``HF_HUB_CACHE`` at it and sets ``HF_HUB_OFFLINE=1``. Oracle: loading the
folder the test cached, directly.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from models import hf, hub

COMMIT_MAIN, COMMIT_DEV, COMMIT_LORA = "1" * 40, "2" * 40, "3" * 40
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=16, patch_size=4)


def cache_repo(cache: Path, repo_id: str, folder: Path, commit: str, refs=("main",)) -> Path:
  """``folder``'s files as a download of ``repo_id`` at ``commit`` into ``cache``."""
  repo = cache / ("models--" + repo_id.replace("/", "--"))
  for f in sorted(folder.iterdir()):
    data = f.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / f.name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
  for ref in refs:
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)   # no newline, as huggingface_hub writes it
  return repo / "snapshots" / commit


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """Two tiny random ViTs saved by transformers (the second with a preprocessor config)
  and a PEFT adapter for them."""
  import torch
  import transformers
  from models.lora import init_adapters
  from rpe_jax.compose import adapter_of
  from rpe_jax.library import peft_io
  root = tmp_path_factory.mktemp("hub_src")
  for seed, name in ((0, "vit_main"), (1, "vit_dev")):
    torch.manual_seed(seed)
    transformers.ViTModel(transformers.ViTConfig(**TINY)).save_pretrained(root / name)
  transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.2, 0.3, 0.4],
                                 image_std=[0.5, 0.6, 0.7]).save_pretrained(root / "vit_main")
  model = hf.load(root / "vit_main")
  init_adapters(model, ("query", "value"), rank=2, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)   # b starts at zero: make δW nonzero
  adapter = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32),
                         adapter_of(model))
  peft_io.write_peft(adapter, model, root / "lora", base_model_name_or_path="org/tiny-vit")
  return root


@pytest.fixture
def cache(folders, tmp_path, monkeypatch):
  """An offline HF cache holding org/tiny-vit (main, dev) and org/tiny-vit-lora (main)."""
  cache = tmp_path / "hf-cache"
  cache_repo(cache, "org/tiny-vit", folders / "vit_main", COMMIT_MAIN)
  cache_repo(cache, "org/tiny-vit", folders / "vit_dev", COMMIT_DEV, refs=("dev",))
  cache_repo(cache, "org/tiny-vit-lora", folders / "lora", COMMIT_LORA)
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return cache


def params(model) -> dict[str, np.ndarray]:
  return {".".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model))}


def assert_same_params(a, b):
  pa, pb = params(a), params(b)
  assert pa.keys() == pb.keys() and len(pa) > 10
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


# --- the id syntax -----------------------------------------------------------------------

@pytest.mark.parametrize("spec, parsed", [
    ("google/vit-base-patch16-224", ("google/vit-base-patch16-224", None)),
    ("gpt2", ("gpt2", None)),
    ("org/name@main", ("org/name", "main")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("org/name@v1.0", ("org/name", "v1.0")),
    (f"org/name@{COMMIT_MAIN}", ("org/name", COMMIT_MAIN)),
    ("../x", None), ("/abs/x", None), ("org/../x", None), ("a/b/c", None), ("org--x/y", None),
    (".x/y", None), ("-x/y", None), ("x.git", None), ("a b/c", None), ("org/", None),
    ("org/name@", None), ("org/name@../../etc", None), ("org/name@/x", None),
    ("org/name@a/../b", None), ("org/name@.hidden", None), ("o" * 97, None),
])
def test_hub_id_syntax_is_strict(spec, parsed):
  assert hub.parse_id(spec) == parsed


# --- resolving ---------------------------------------------------------------------------

def test_load_by_hub_id_equals_loading_the_cached_folder(cache, folders):
  direct = hf.load(folders / "vit_main")
  for spec in ("org/tiny-vit", "org/tiny-vit@main", f"org/tiny-vit@{COMMIT_MAIN}"):
    assert hub.resolve(spec).resolve() == (cache / "models--org--tiny-vit" / "snapshots"
                                           / COMMIT_MAIN).resolve()
    assert_same_params(hf.load(spec), direct)


def test_a_revision_picks_its_own_snapshot(cache, folders):
  dev = hf.load("org/tiny-vit@dev")
  assert_same_params(dev, hf.load(folders / "vit_dev"))
  assert_same_params(hf.load(f"org/tiny-vit@{COMMIT_DEV}"), dev)
  main = params(hf.load("org/tiny-vit"))
  assert any(not np.array_equal(main[k], v) for k, v in params(dev).items())


def test_the_cache_is_found_from_the_environment_at_call_time(cache, tmp_path, monkeypatch):
  monkeypatch.delenv("HF_HUB_CACHE")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
  with pytest.raises(ValueError, match=str(tmp_path / "home" / "hub")):
    hub.resolve("org/tiny-vit")
  shutil.move(cache, tmp_path / "home" / "hub")
  assert hub.resolve("org/tiny-vit").name == COMMIT_MAIN


def test_a_local_folder_wins_over_a_hub_id_of_the_same_spelling(cache, folders, tmp_path,
                                                               monkeypatch):
  monkeypatch.chdir(tmp_path)
  shutil.copytree(folders / "vit_dev", tmp_path / "org" / "tiny-vit")
  assert hub.resolve("org/tiny-vit") == Path("org/tiny-vit")
  assert_same_params(hf.load("org/tiny-vit"), hf.load(folders / "vit_dev"))


@pytest.mark.parametrize("spec", ["org/nope", "org/tiny-vit@v9", f"org/tiny-vit@{'4' * 40}",
                                  "nope"])
def test_an_id_not_in_the_cache_names_the_id_the_cache_and_why(cache, spec):
  with pytest.raises(ValueError) as e:
    hf.load(spec)
  message = str(e.value)
  assert message == (f"model {spec}: not a local folder, not in the HF cache "
                     f"{cache}, and offline (HF_HUB_OFFLINE=1)")


@pytest.mark.parametrize("spec, message", [
    ("../no/such/folder", "not a folder, and not a Hugging Face Hub id"),
    ("/no/such/folder", "not a folder, and not a Hugging Face Hub id"),
    ("org/name@../../x", "not a folder, and not a Hugging Face Hub id"),
    ("", "empty"),
])
def test_a_spec_that_is_neither_folder_nor_id_says_so(cache, spec, message):
  with pytest.raises(ValueError, match=f"^--model {spec}: {message}" if spec else message):
    hub.resolve(spec, option="--model")


def test_a_file_is_not_a_folder(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"x")
  with pytest.raises(ValueError, match="is a file, not a folder"):
    hub.resolve(str(tmp_path / "model.safetensors"))


def test_a_download_is_tried_only_online_and_fetches_no_pickles(tmp_path, monkeypatch):
  import huggingface_hub
  from huggingface_hub import constants, errors
  from huggingface_hub.utils import filter_repo_objects
  calls = []

  def fake_snapshot_download(repo_id, *, local_files_only=False, **kw):
    calls.append((repo_id, local_files_only, kw))
    if local_files_only:
      raise errors.LocalEntryNotFoundError("not cached")
    if repo_id == "org/down":
      raise errors.LocalEntryNotFoundError("Got: ...") from ConnectionError("no route to host")
    return str(tmp_path)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(ValueError, match=r"offline \(HF_HUB_OFFLINE=1\)"):
    hub.resolve("org/x")
  assert [c[1] for c in calls] == [True]   # the cache only

  monkeypatch.delenv("HF_HUB_OFFLINE")
  monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  calls.clear()
  assert hub.resolve("org/x@v1") == tmp_path
  assert [(c[0], c[1], c[2]["revision"], Path(c[2]["cache_dir"])) for c in calls] == [
      ("org/x", True, "v1", tmp_path / "c"), ("org/x", False, "v1", tmp_path / "c")]
  repo_files = ["config.json", "preprocessor_config.json", "model.safetensors",
                "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                "tokenizer.model", "vocab.txt", "merges.txt", "pytorch_model.bin",
                "adapter_model.bin", "training_args.bin", "model.pt", "tf_model.h5",
                "flax_model.msgpack", "consolidated.safetensors", "onnx/model.onnx",
                "original/consolidated.00.pth", "sub/model.safetensors", "README.md"]
  kw = calls[-1][2]
  fetched = set(filter_repo_objects(repo_files, allow_patterns=kw["allow_patterns"],
                                    ignore_patterns=kw["ignore_patterns"]))
  assert fetched == set(repo_files[:11])

  with pytest.raises(ValueError) as e:
    hub.resolve("org/down", option="--model")
  assert str(e.value) == (f"--model org/down: not a local folder, not in the HF cache "
                          f"{tmp_path / 'c'}, and the Hub could not be reached "
                          "(ConnectionError: no route to host)")


# --- through the model spec and the command lines ----------------------------------------

def test_model_spec_resolves_a_hub_id_with_its_preprocessor_config(cache, folders):
  from models.preprocessing import Normalization
  from rpe_jax.cli.model_spec import resolve_model
  resolved = resolve_model("org/tiny-vit")
  assert_same_params(resolved.model, hf.load(folders / "vit_main"))
  assert resolved.normalization.mean == pytest.approx((0.2, 0.3, 0.4))
  assert resolved.normalization == Normalization.from_hf(str(folders / "vit_main"), 3)
  with pytest.raises(ValueError, match=r"^--model org/nope: .*HF_HUB_OFFLINE=1\); not a "
                     r"built-in name \(demo, demo:classification, .*tiny-foundation\)$"):
    resolve_model("org/nope")
  with pytest.raises(ValueError, match=r"no config.json in .*snapshots"):   # a PEFT repo
    resolve_model("org/tiny-vit-lora")


def rpe(capsys, *argv):
  from rpe_jax.cli import main
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_import_peft_and_compose_by_hub_id(cache, folders, tmp_path, capsys):
  from models.lora import to_flat
  from rpe_jax.cli.compose import main as compose_main
  from rpe_jax.library import peft_io
  from rpe_jax.library.catalog import Library
  lib = tmp_path / "lib"
  assert rpe(capsys, "library", "init", lib)[0] == 0
  for i in range(2):
    np.save(tmp_path / f"p{i}.npy", np.full(4, float(i), np.float32))
    code, out, err = rpe(capsys, "library", "import-peft", lib, f"lora{i}", "org/tiny-vit-lora",
                         tmp_path / f"p{i}.npy", "--model", "org/tiny-vit@main",
                         "--encoder", "enc", "--n-samples", "3", "--json")
    assert code == 0, err
  assert json.loads(out)["base_model"] == "org/tiny-vit"   # the cached adapter_config.json
  base = hf.load(folders / "vit_main")
  expected = to_flat(peft_io.read_peft(folders / "lora", base))
  with Library.open(lib, readonly=True) as opened:
    got = to_flat(opened.load("lora1"))
  assert got.keys() == expected.keys() and len(got) == 4
  for k in got:
    np.testing.assert_array_equal(got[k].a, expected[k].a)
    np.testing.assert_array_equal(got[k].b, expected[k].b)

  # Two copies of one adapter averaged: the composition's δW is the adapter's.
  np.save(tmp_path / "z.npy", np.full(4, 0.5, np.float32))
  out = tmp_path / "out"
  code = compose_main(["--library", str(lib), "--prototype", str(tmp_path / "z.npy"),
                       "--k", "2", "--strategy", "avg", "--model", "org/tiny-vit",
                       "--format", "peft", "--out", str(out), "--json"])
  assert code == 0, capsys.readouterr().err
  composed = to_flat(peft_io.read_peft(out / "composed" / "peft", base))
  for k in expected:
    np.testing.assert_allclose(np.asarray(composed[k].a @ composed[k].b),
                               np.asarray(expected[k].a @ expected[k].b), atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["library", "import-peft", "{lib}", "x", "org/missing-lora", "{p}", "--model",
      "org/tiny-vit", "--encoder", "enc", "--n-samples", "1"],
     "PEFT folder org/missing-lora: not a local folder, not in the HF cache {cache}, and "
     "offline (HF_HUB_OFFLINE=1)"),
    (["library", "import-peft", "{lib}", "x", "org/tiny-vit-lora", "{p}", "--model",
      "org/missing-vit", "--encoder", "enc", "--n-samples", "1"],
     "--model org/missing-vit: not a local folder, not in the HF cache {cache}, and offline "
     "(HF_HUB_OFFLINE=1); not a built-in name (demo, demo:classification, demo:segmentation, demo:report, tiny-foundation)"),
    (["library", "export-peft", "{lib}", "a", "{tmp}/exported", "--model", "org/missing-vit"],
     "--model org/missing-vit: not a local folder"),
    (["compose", "--library", "{lib}", "--prototype", "{p}", "--k", "1", "--model",
      "org/missing-vit@dev", "--format", "peft", "--out", "{tmp}/composed"],
     "--model org/missing-vit@dev: not a local folder, not in the HF cache {cache}"),
])
def test_a_missing_hub_id_exits_2_with_one_line_and_writes_nothing(cache, tmp_path, capsys,
                                                                   argv, message):
  from rpe_jax.library.catalog import Library
  lib = tmp_path / "lib"
  Library.create(lib).close()
  rng = np.random.default_rng(0)
  safetensors.numpy.save_file({"enc.0.q.a": rng.standard_normal((6, 2)).astype(np.float32),
                               "enc.0.q.b": rng.standard_normal((2, 5)).astype(np.float32)},
                              str(tmp_path / "a.safetensors"))
  np.save(tmp_path / "p.npy", np.ones(4, np.float32))
  assert rpe(capsys, "library", "add", lib, "a", tmp_path / "a.safetensors", tmp_path / "p.npy",
             "--base-model", "tiny", "--encoder", "enc", "--n-samples", "1")[0] == 0
  def written():   # SQLite's -wal / -shm files come and go with any reader
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if not p.name.endswith(("-wal", "-shm")))

  before = written()
  fill = dict(lib=lib, p=tmp_path / "p.npy", tmp=tmp_path, cache=cache)
  code, out, err = rpe(capsys, *[a.format(**fill) for a in argv])
  assert code == 2 and out == ""
  assert err.startswith(f"error: {message.format(**fill)}") and err.count("\n") == 1, err
  assert written() == before
  with Library.open(lib, readonly=True) as opened:
    assert opened.names() == ["a"]

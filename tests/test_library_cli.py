"""`rpe library ...`: every subcommand in-process through ``rpe_jax.cli.main``.

Oracle: the library API (itself tested against numpy in test_library.py) and the arrays
written to disk by the test.
"""

import json

import numpy as np
import pytest
import safetensors.numpy

from rpe_jax.cli import main
from rpe_jax.library.catalog import Library


def write_adapter(path, seed, d_in=6):
  rng = np.random.default_rng(seed)
  tensors = {"enc.0.q.a": rng.standard_normal((d_in, 2)).astype(np.float32),
             "enc.0.q.b": rng.standard_normal((2, 5)).astype(np.float32)}
  safetensors.numpy.save_file(tensors, str(path))
  return tensors


def rpe(capsys, *argv):
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture
def files(tmp_path):
  """Three adapters a0..a2 with prototypes p0..p2 (dimension 4) and a query batch."""
  for i in range(3):
    write_adapter(tmp_path / f"a{i}.safetensors", i)
    np.save(tmp_path / f"p{i}.npy", np.full(4, float(i), np.float32))
  np.save(tmp_path / "q.npy", np.array([[0.1] * 4, [1.9] * 4], np.float32))
  return tmp_path


def init_and_add(capsys, files, n=3):
  lib = files / "lib"
  assert rpe(capsys, "library", "init", lib)[0] == 0
  for i in range(n):
    code, out, err = rpe(capsys, "library", "add", lib, f"ad{i}", files / f"a{i}.safetensors",
                         files / f"p{i}.npy", "--base-model", "tiny", "--encoder", "enc",
                         "--n-samples", 10 + i, "--metadata", json.dumps({"task": f"t{i}"}))
    assert code == 0, err
  return lib


def test_init_add_list_show(capsys, files):
  lib = init_and_add(capsys, files)
  code, out, _ = rpe(capsys, "library", "list", lib, "--json")
  rows = json.loads(out)
  assert code == 0 and [r["name"] for r in rows] == ["ad0", "ad1", "ad2"]
  assert rows[1]["n_samples"] == 11 and rows[1]["metadata"] == {"task": "t1"}
  assert rows[0]["signature"] == [{"path": "enc.0.q", "d_in": 6, "d_out": 5, "kind": "lora",
                                   "rank": 2, "dtype": "float32"}]
  code, out, _ = rpe(capsys, "library", "show", lib, "ad2")
  assert code == 0 and "enc.0.q: [6, 5] lora rank 2" in out and '"task": "t2"' in out
  # The stored file holds exactly the tensors that were added.
  with Library.open(lib) as opened:
    loaded = opened.load("ad1", as_tensors=True)
  want = write_adapter(files / "again.safetensors", 1)
  for key in want:
    np.testing.assert_array_equal(loaded[key], want[key])


def test_query_json_and_exclude(capsys, files):
  lib = init_and_add(capsys, files)
  code, out, _ = rpe(capsys, "library", "query", lib, files / "q.npy", "-k", "2", "--json")
  result = json.loads(out)
  assert code == 0
  assert [r["names"] for r in result] == [["ad0", "ad1"], ["ad2", "ad1"]]
  # Oracle: ‖q − p_i‖² with p_i = i·1 and q = 0.1·1 → 4·0.01 and 4·0.81.
  np.testing.assert_allclose(result[0]["distances"], [0.04, 3.24], rtol=1e-5)
  np.save(files / "one.npy", np.full(4, 0.1, np.float32))
  code, out, _ = rpe(capsys, "library", "query", lib, files / "one.npy", "-k", "1",
                     "--exclude", "ad0", "--json")
  assert code == 0 and json.loads(out)["names"] == ["ad1"]
  code, out, _ = rpe(capsys, "library", "query", lib, files / "one.npy", "-k", "1")
  assert code == 0 and out.startswith("[0] ad0 (0.04")


@pytest.mark.parametrize("argv, message", [
    (["add", "{lib}", "ad0", "{files}/a0.safetensors", "{files}/p0.npy", "--base-model",
      "tiny", "--encoder", "enc", "--n-samples", "1"], "already exists"),
    (["add", "{lib}", "x", "{files}/other.safetensors", "{files}/p0.npy", "--base-model",
      "tiny", "--encoder", "enc", "--n-samples", "1"], "structure of base model 'tiny'"),
    (["add", "{lib}", "x", "{files}/a0.safetensors", "{files}/bad.npy", "--base-model",
      "tiny", "--encoder", "enc", "--n-samples", "1"], "NaN or Inf"),
    (["add", "{lib}", "x", "{files}/missing.safetensors", "{files}/p0.npy", "--base-model",
      "tiny", "--encoder", "enc", "--n-samples", "1"], "cannot read adapter file"),
    (["add", "{lib}", "x", "{files}/a0.safetensors", "{files}/p0.npy", "--base-model",
      "tiny", "--encoder", "enc", "--n-samples", "1", "--metadata", "[1"], "not valid JSON"),
    (["query", "{lib}", "{files}/q.npy", "-k", "4"], "k=4 exceeds the 3 candidate"),
    (["show", "{lib}", "nope"], "no adapter named 'nope'"),
    (["remove", "{lib}", "ad0", "nope"], "no adapter named 'nope'"),
    (["list", "{files}/nolib"], "not an adapter library"),
    (["init", "{lib}"], "not an empty directory"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(capsys, files, argv, message):
  lib = init_and_add(capsys, files)
  write_adapter(files / "other.safetensors", 5, d_in=7)
  np.save(files / "bad.npy", np.array([1.0, np.nan, 0.0, 0.0], np.float32))
  before = sorted(p.name for p in (lib / "adapters").iterdir())
  code, out, err = rpe(capsys, "library", *[a.format(lib=lib, files=files) for a in argv])
  assert code == 2 and out == ""
  assert err.startswith("error: ") and message in err and err.count("\n") == 1
  assert sorted(p.name for p in (lib / "adapters").iterdir()) == before
  with Library.open(lib) as opened:
    assert opened.names() == ["ad0", "ad1", "ad2"]


def test_remove_and_verify_repair(capsys, files):
  lib = init_and_add(capsys, files)
  code, out, _ = rpe(capsys, "library", "remove", lib, "ad1", "--json")
  assert code == 0 and json.loads(out) == {"removed": ["ad1"]}
  (lib / "adapters" / "stray.safetensors").write_bytes(b"junk")
  code, out, _ = rpe(capsys, "library", "verify", lib, "--json")
  report = json.loads(out)
  assert code == 1 and report["orphans"] == ["stray.safetensors"] and not report["ok"]
  code, out, _ = rpe(capsys, "library", "verify", lib, "--repair")
  assert code == 0 and "orphan file: stray.safetensors (removed)" in out
  assert not (lib / "adapters" / "stray.safetensors").exists()
  code, out, _ = rpe(capsys, "library", "verify", lib, "--json")
  assert code == 0 and json.loads(out)["checked"] == 2


def test_replace_through_the_cli(capsys, files):
  lib = init_and_add(capsys, files)
  code, _, err = rpe(capsys, "library", "add", lib, "ad0", files / "a2.safetensors",
                     files / "p2.npy", "--base-model", "tiny", "--encoder", "enc",
                     "--n-samples", "99", "--replace")
  assert code == 0, err
  with Library.open(lib) as opened:
    assert opened.get("ad0").n_samples == 99
    np.testing.assert_array_equal(opened.load("ad0", as_tensors=True)["enc.0.q.a"],
                                  write_adapter(files / "x.safetensors", 2)["enc.0.q.a"])


def test_every_subcommand_has_help(capsys):
  for sub in ("init", "add", "import-peft", "export-peft", "list", "show", "query", "remove",
              "verify"):
    code, out, _ = rpe(capsys, "library", sub, "--help")
    assert code == 0 and f"rpe library {sub}" in out and "--json" in out


@pytest.mark.slow  # builds a tiny HF ViT and a PEFT adapter with torch
def test_import_and_export_peft(capsys, tmp_path):
  """Oracle: the tensors PEFT itself saved (lora_A = aᵀ, lora_B = bᵀ / (α/r))."""
  import peft
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, image_size=8, patch_size=4)
  transformers.ViTModel(config).save_pretrained(tmp_path / "base")
  hf_model = transformers.ViTModel.from_pretrained(tmp_path / "base")
  peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(
      r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.copy_(torch.randn_like(p))
  peft_model.save_pretrained(tmp_path / "peft")
  saved = safetensors.numpy.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
  np.save(tmp_path / "p.npy", np.ones(4, np.float32))
  lib = tmp_path / "lib"
  assert rpe(capsys, "library", "init", lib)[0] == 0
  code, out, err = rpe(capsys, "library", "import-peft", lib, "imported", tmp_path / "peft",
                       tmp_path / "p.npy", "--model", tmp_path / "base", "--encoder", "enc",
                       "--n-samples", "3", "--json")
  assert code == 0, err
  entry = json.loads(out)
  assert entry["base_model"] == str(tmp_path / "base")  # from adapter_config.json
  assert {l["rank"] for l in entry["signature"]} == {2} and len(entry["signature"]) == 2
  with Library.open(lib) as opened:
    tensors = opened.load("imported", as_tensors=True)
  a_keys = sorted(k for k in saved if "lora_A" in k)
  ours_a = sorted(k for k in tensors if k.endswith(".a"))
  assert len(a_keys) == len(ours_a) == 2
  for peft_key, our_key in zip(a_keys, ours_a):  # query then value in both namings
    np.testing.assert_array_equal(tensors[our_key], saved[peft_key].T)
    np.testing.assert_allclose(tensors[our_key[:-2] + ".b"],
                               3.0 * saved[peft_key.replace("lora_A", "lora_B")].T, rtol=1e-6)
  code, _, err = rpe(capsys, "library", "export-peft", lib, "imported", tmp_path / "out",
                     "--model", tmp_path / "base")
  assert code == 0, err
  exported = safetensors.numpy.load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
  out_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
  assert out_config["r"] == out_config["lora_alpha"] == 2
  # Scaling 1 on export: lora_B carries α/r = 3; lora_A unchanged. Module names differ
  # (if any) but sort the same way: q_proj before v_proj.
  out_a = sorted(k for k in exported if "lora_A" in k)
  assert len(out_a) == 2
  for peft_key, out_key in zip(a_keys, out_a):
    np.testing.assert_array_equal(exported[out_key], saved[peft_key])
    np.testing.assert_allclose(exported[out_key.replace("lora_A", "lora_B")],
                               3.0 * saved[peft_key.replace("lora_A", "lora_B")], rtol=1e-6)

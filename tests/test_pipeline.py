"""`python -m rpe_jax.compose` end to end on small libraries in temporary folders."""

import json

import numpy as np
import pytest

from models.lora import LoRA, is_lora, to_flat
from rpe_jax import adapter_file
from rpe_jax.library import Library
from rpe_jax.pipeline import main

PATHS = ("layers.0.query", "layers.0.value", "layers.1.query")
D = 12


def _adapter(rng, rank):
  return {p: LoRA(rng.normal(size=(6, rank)).astype(np.float32),
                  rng.normal(size=(rank, 5)).astype(np.float32)) for p in PATHS}


@pytest.fixture
def library(tmp_path):
  rng = np.random.default_rng(0)
  lib = Library.create(tmp_path / "lib")
  protos, adapters = {}, {}
  for i in range(5):
    name = f"site{i}"
    adapters[name] = _adapter(rng, rank=2 + i % 2)
    protos[name] = (rng.normal(size=D) + 4.0).astype(np.float32)
    lib.add(name, adapters[name], protos[name], base_model="toy", encoder="toy-enc",
            n_samples=100 + i)
  lib.close()
  return tmp_path / "lib", protos, adapters


def _dense(tree):
  flat = tree if all(is_lora(v) for v in tree.values()) else to_flat(tree)
  return {p: np.asarray(leaf.a, np.float64) @ (
      np.asarray(leaf.e, np.float64)[:, None] * np.asarray(leaf.b, np.float64)
      if hasattr(leaf, "e") else np.asarray(leaf.b, np.float64)) for p, leaf in flat.items()}


def test_compose_writes_the_exact_composition_and_report(library, tmp_path, capsys):
  path, protos, adapters = library
  target = 0.6 * protos["site1"] + 0.4 * protos["site3"]
  np.save(tmp_path / "z.npy", target)
  out = tmp_path / "out"
  code = main(["--library", str(path), "--prototype", str(tmp_path / "z.npy"), "--k", "3",
               "--strategy", "lin", "--out", str(out), "--json"])
  assert code == 0
  report = json.loads(capsys.readouterr().out)
  [t] = report["targets"]
  # Independent check of retrieval: the 3 nearest by squared distance, in numpy.
  names = sorted(protos)
  d2 = np.array([((target - protos[n]) ** 2).sum() for n in names])
  assert t["retrieved"] == [names[i] for i in np.argsort(d2, kind="stable")[:3]]
  np.testing.assert_allclose(t["sqdist"], np.sort(d2)[:3], rtol=1e-3)
  # lin reconstructs an exact affine combination of two retrieved prototypes.
  w = dict(zip(t["retrieved"], t["weights"]))
  assert w["site1"] == pytest.approx(0.6, abs=1e-3) and w["site3"] == pytest.approx(0.4, abs=1e-3)
  assert t["solver_status"] == "converged"
  # The written adapter is Σ w_i a_i b_i, checked densely in float64.
  tree, _ = adapter_file.load_adapter(out / "composed" / "adapter.safetensors")
  got = _dense(tree)
  for p in PATHS:
    expected = sum(w[n] * _dense(adapters[n])[p] for n in t["composed"])
    np.testing.assert_allclose(got[p], expected, rtol=1e-4, atol=1e-4)
  on_disk = json.loads((out / "report.json").read_text())
  assert on_disk["targets"][0]["weights"] == t["weights"]
  assert set(on_disk["timings_s"]) >= {"retrieve", "weigh", "combine", "write"}


def test_several_targets_in_one_call_and_table_output(library, tmp_path, capsys):
  path, protos, _ = library
  batch = np.stack([protos["site0"], protos["site4"] + 0.01])
  np.save(tmp_path / "zs.npy", batch)
  code = main(["--library", str(path), "--prototype", str(tmp_path / "zs.npy"), "--k", "2",
               "--strategy", "nearest", "--exclude", "site2"])
  assert code == 0
  text = capsys.readouterr().out
  assert "| adapter" in text and "zs[0]" in text and "zs[1]" in text
  assert "site2" not in text


def test_rank_truncation_bounds_the_rank(library, tmp_path):
  path, protos, _ = library
  np.save(tmp_path / "z.npy", protos["site2"] + 0.1)
  out = tmp_path / "out"
  assert main(["--library", str(path), "--prototype", str(tmp_path / "z.npy"), "--k", "4",
               "--strategy", "avg", "--rank", "2", "--out", str(out)]) == 0
  tensors, _ = adapter_file.read_tensors(out / "composed" / "adapter.safetensors")
  assert all(v.shape[-1] == 2 for k, v in tensors.items() if k.endswith(".a"))


@pytest.mark.parametrize("extra,message", [
    (["--k", "9"], "k=9 exceeds"),
    (["--strategy", "median"], None),   # argparse rejects it (exit 2)
    (["--library", "MISSING"], "not an adapter library"),
    (["--prototype", "BADDIM"], "dimension"),
    (["--prototype", "NOTNPY"], "cannot read"),
    (["--data", "nosuch:thing", "--model", "demo"], "unknown dataset URI scheme"),
    (["--data", "folder:NOFOLDER", "--model", "demo"], "NOFOLDER"),
    (["--encoder", "other-enc"], "not in the library"),
])
def test_errors_exit_2_with_one_line_and_write_nothing(library, tmp_path, capsys, extra,
                                                       message):
  path, protos, _ = library
  np.save(tmp_path / "z.npy", protos["site0"])
  np.save(tmp_path / "bad.npy", np.ones(D + 1, np.float32))
  (tmp_path / "junk.npy").write_text("not an array")
  args = {"--library": str(path), "--prototype": str(tmp_path / "z.npy")}
  replace = {"MISSING": str(tmp_path / "nolib"), "BADDIM": str(tmp_path / "bad.npy"),
             "NOTNPY": str(tmp_path / "junk.npy")}
  extra = [replace.get(x, x) for x in extra]
  for flag in ("--library", "--prototype"):
    if flag in extra:
      del args[flag]
  if "--data" in extra:
    del args["--prototype"]
  argv = [x for kv in args.items() for x in kv] + extra + ["--out", str(tmp_path / "out")]
  code = main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert not (tmp_path / "out").exists()
  if message:
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_empty_library_is_refused(tmp_path, capsys):
  Library.create(tmp_path / "empty").close()
  np.save(tmp_path / "z.npy", np.ones(D, np.float32))
  assert main(["--library", str(tmp_path / "empty"), "--prototype",
               str(tmp_path / "z.npy")]) == 2
  assert "is empty" in capsys.readouterr().err


def test_data_target_with_hf_model_peft_output_and_merge(tmp_path, capsys):
  """--data through a tiny ViT HF folder; the PEFT export and the merged model agree."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from models import hf
  from models.lora import init_adapters
  from models.vit import ViTConfig, ViTForImageClassification
  from rpe_jax import data, peft_io, prototypes
  from rpe_jax.compose import adapter_of, with_adapter

  config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, image_size=16, patch_size=4, num_channels=1,
                     labels=tuple("0123456789"))
  model = ViTForImageClassification(config, rngs=nnx.Rngs(0))
  hf.save(model, tmp_path / "vit")
  model = hf.load(tmp_path / "vit")
  lib = Library.create(tmp_path / "lib")
  for i, site in enumerate(("clean", "blur", "noisy")):
    init_adapters(model, ("query", "value"), rank=2, rngs=nnx.Rngs(i))
    adapter = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(i), x.shape),
                           adapter_of(model))
    ds = data.load(f"sites:digits/{site}:16", "train")
    z = prototypes.prototype(with_adapter(model, {}), ds, "cls").z
    lib.add(site, adapter, z, base_model="tiny-vit", encoder="tiny-vit/cls", n_samples=len(ds),
            pooling="cls")
  lib.close()
  out = tmp_path / "out"
  code = main(["--library", str(tmp_path / "lib"), "--model", str(tmp_path / "vit"),
               "--data", "sites:digits/bias:16", "--k", "3", "--strategy", "sparse",
               "--lam2", "0.1", "--format", "peft", "--merge", "--out", str(out), "--json"])
  assert code == 0, capsys.readouterr().err
  report = json.loads(capsys.readouterr().out)
  t = report["targets"][0]
  assert t["n_samples"] == len(data.load("sites:digits/bias:16", "test"))
  assert abs(sum(t["weights"]) - 1) < 1e-5
  base = with_adapter(model, {})
  composed = peft_io.read_peft(out / "composed" / "peft", base)
  merged = hf.load(out / "composed" / "merged")
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1))
  unmerged_logits = with_adapter(base, composed)(x).logits
  np.testing.assert_allclose(merged(x).logits, unmerged_logits, atol=1e-4)
  # The composition is not trivial: it changes the model's output.
  assert float(jnp.abs(unmerged_logits - base(x).logits).max()) > 1e-3


def test_orbax_format_round_trips(library, tmp_path):
  import orbax.checkpoint as ocp
  path, protos, adapters = library
  np.save(tmp_path / "z.npy", protos["site1"])
  out = tmp_path / "out"
  assert main(["--library", str(path), "--prototype", str(tmp_path / "z.npy"), "--k", "1",
               "--strategy", "nearest", "--format", "orbax", "--out", str(out)]) == 0
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore((out / "composed" / "orbax").absolute())
  expected = adapter_file.as_tensors(adapters["site1"])
  assert set(restored) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(np.asarray(restored[key]), value)

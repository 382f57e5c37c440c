"""`python -m rpe_jax.compose` end to end on small libraries in temporary folders."""

import json

import numpy as np
import pytest

from models.lora import LoRA, is_lora, to_flat
from rpe_jax.library import adapter_file
from rpe_jax.library.catalog import Library
from rpe_jax.cli.compose import main

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


def _kkt_lin(Z, z):
  """Oracle for ``lin``: argmin ‖z − Σ w_i z_i‖² s.t. Σ w = 1, from the KKT system
  [2G 1; 1ᵀ 0] [w; ν] = [2c; 1] (G = Z Zᵀ, c = Z z), solved in float64 numpy on vectors
  centred on the references' mean (the same minimiser under Σ w = 1, better conditioned)."""
  Z, z = np.asarray(Z, np.float64), np.asarray(z, np.float64)
  m = Z.mean(0)
  Zc, zc = Z - m, z - m
  k = len(Z)
  A = np.block([[2 * Zc @ Zc.T, np.ones((k, 1))], [np.ones((1, k)), np.zeros((1, 1))]])
  return np.linalg.solve(A, np.concatenate([2 * Zc @ zc, [1.0]]))[:k]


def _nearest(protos, z, k):
  """Oracle for retrieval: names and squared distances of the k nearest, float64 numpy."""
  names = sorted(protos)
  d2 = np.array([((np.float64(z) - np.float64(protos[n])) ** 2).sum() for n in names])
  order = np.argsort(d2, kind="stable")[:k]
  return [names[i] for i in order], d2[order]


def _rel(x, y):
  return np.linalg.norm(x - y) / np.linalg.norm(y)


def test_compose_writes_the_exact_composition_and_report(library, tmp_path, capsys):
  path, protos, adapters = library
  rng = np.random.default_rng(1)
  # Off the span of any two prototypes, so that every retrieved adapter has a weight.
  target = (0.6 * protos["site1"] + 0.4 * protos["site3"] + 0.3 * rng.normal(size=D)
            ).astype(np.float32)
  np.save(tmp_path / "z.npy", target)
  out = tmp_path / "out"
  code = main(["--library", str(path), "--prototype", str(tmp_path / "z.npy"), "--k", "3",
               "--strategy", "lin", "--out", str(out), "--json"])
  assert code == 0
  report = json.loads(capsys.readouterr().out)
  [t] = report["targets"]
  names, d2 = _nearest(protos, target, 3)
  assert t["retrieved"] == names
  # float32 squared distances from differences: a few ulps of each term, rtol 1e-5.
  np.testing.assert_allclose(t["sqdist"], d2, rtol=1e-5)
  w = _kkt_lin(np.stack([protos[n] for n in names]), target)
  # The float32 solver ends with an exact KKT solve on float32 inputs: weights of order 1
  # agree to ~1e-6 (cond(Gc)·eps32 here); 2e-5 leaves room for the conditioning.
  np.testing.assert_allclose(t["weights"], w, rtol=0, atol=2e-5)
  assert np.all(np.abs(w) > 1e-2)   # every retrieved adapter matters
  assert t["composed"] == names and t["solver_status"] == "converged"
  # The written adapter is Σ w_i a_i b_i over ALL retrieved adapters with the oracle's
  # weights, densely in float64 from the adapters that went into the library. float32
  # products and the weights' 2e-5 error allow a relative Frobenius error of 1e-4 at most.
  tree, _ = adapter_file.load_adapter(out / "composed" / "adapter.safetensors")
  got = _dense(tree)
  assert set(got) == set(PATHS)
  for p in PATHS:
    expected = sum(wi * _dense(adapters[n])[p] for wi, n in zip(w, names))
    assert _rel(got[p], expected) < 1e-4, p
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
  # One table per target, in order, each listing its own 2 nearest (site2 left out) with
  # nearest's one-hot weight on the closest.
  tables = text.split("target: ")[1:]
  assert [tb.splitlines()[0] for tb in tables] == ["zs[0]", "zs[1]"]
  kept = {n: p for n, p in protos.items() if n != "site2"}
  for tb, z in zip(tables, batch):
    rows = [line.split("|")[1:4] for line in tb.splitlines()[3:] if line.startswith("| ")]
    names, _ = _nearest(kept, z, 2)
    assert [r[0].strip() for r in rows] == names
    assert [float(r[2]) for r in rows] == [1.0, 0.0]
  assert "site2" not in text


def test_several_targets_with_out_write_one_folder_each(library, tmp_path, capsys):
  path, protos, adapters = library
  batch = np.stack([protos["site0"] + 0.01, protos["site3"] - 0.01, protos["site1"]])
  np.save(tmp_path / "zs.npy", batch[:2])
  np.save(tmp_path / "one.npy", batch[2])
  out = tmp_path / "out"
  assert main(["--library", str(path), "--prototype", str(tmp_path / "zs.npy"),
               "--prototype", str(tmp_path / "one.npy"), "--k", "2", "--strategy",
               "nearest", "--out", str(out), "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert sorted(p.name for p in out.iterdir()) == ["report.json", "target-0", "target-1",
                                                   "target-2"]
  assert [t["target"] for t in report["targets"]] == ["zs[0]", "zs[1]", "one"]
  for i, z in enumerate(batch):
    names, _ = _nearest(protos, z, 2)
    assert report["targets"][i]["retrieved"] == names
    tree, meta = adapter_file.load_adapter(out / f"target-{i}" / "adapter.safetensors")
    assert meta["target"] == report["targets"][i]["target"]
    # nearest: the written adapter is the nearest site's own adapter, exactly.
    got, expected = _dense(tree), _dense(adapters[names[0]])
    for p in PATHS:
      np.testing.assert_array_equal(got[p], expected[p])


def _svd_truncate(x, rank):
  u, s, vt = np.linalg.svd(x, full_matrices=False)
  return (u[:, :rank] * s[:rank]) @ vt[:rank], s


def test_rank_truncation_matches_the_float64_svd(library, tmp_path, capsys):
  path, protos, adapters = library
  z = protos["site2"] + 0.1
  np.save(tmp_path / "z.npy", z)
  out = tmp_path / "out"
  assert main(["--library", str(path), "--prototype", str(tmp_path / "z.npy"), "--k", "4",
               "--strategy", "avg", "--rank", "2", "--out", str(out), "--json"]) == 0
  names, _ = _nearest(protos, z, 4)
  assert json.loads(capsys.readouterr().out)["targets"][0]["retrieved"] == names
  tensors, _ = adapter_file.read_tensors(out / "composed" / "adapter.safetensors")
  for p in PATHS:
    assert tensors[f"{p}.a"].shape == (6, 2) and tensors[f"{p}.b"].shape == (2, 5)
  got = _dense(adapter_file.load_adapter(out / "composed" / "adapter.safetensors")[0])
  for p in PATHS:
    full = sum(0.25 * _dense(adapters[n])[p] for n in names)
    expected, s = _svd_truncate(full, 2)
    assert s[2] > 1e-3 * s[0]   # the truncation really drops something
    # A float32 SVD of the rank-≤12 composition: 1e-5 relative (eps32·σ1/gap, gap ≫ 0 here).
    assert _rel(got[p], expected) < 1e-5, p


def test_energy_truncation_keeps_the_smallest_rank_reaching_the_share(library, tmp_path):
  path, protos, adapters = library
  z = protos["site2"] + 0.1
  np.save(tmp_path / "z.npy", z)
  out = tmp_path / "out"
  assert main(["--library", str(path), "--prototype", str(tmp_path / "z.npy"), "--k", "4",
               "--strategy", "avg", "--energy", "0.9", "--out", str(out)]) == 0
  names, _ = _nearest(protos, z, 4)
  tensors, _ = adapter_file.read_tensors(out / "composed" / "adapter.safetensors")
  got = _dense(adapter_file.load_adapter(out / "composed" / "adapter.safetensors")[0])
  for p in PATHS:
    full = sum(0.25 * _dense(adapters[n])[p] for n in names)
    s = np.linalg.svd(full, compute_uv=False)
    # Med-LEGO's rule: the smallest r with Σ_{i≤r} s_i ≥ 0.9 Σ_i s_i.
    share = np.cumsum(s) / np.sum(s)
    rank = int(np.searchsorted(share, 0.9) + 1)
    assert abs(share[rank - 1] - 0.9) > 1e-4   # not on the edge of a float32 rounding
    assert rank < len(s)
    assert tensors[f"{p}.a"].shape == (6, rank) and tensors[f"{p}.b"].shape == (rank, 5)
    expected, _ = _svd_truncate(full, rank)
    assert _rel(got[p], expected) < 1e-5, p


def test_solver_max_iter_reaches_the_report(library, tmp_path, capsys, monkeypatch):
  """A non-converged weight solve is reported as such, per target, in the JSON report and
  the table. The pipeline has no solver option, so the solve is forced here: one iteration
  and a tolerance no solve reaches, through the pipeline's own call of compute_weights."""
  import functools

  from rpe_jax import weighting
  path, protos, _ = library
  np.save(tmp_path / "z.npy", np.stack([protos["site1"] + 0.3, protos["site2"] - 0.2]))
  monkeypatch.setattr(weighting, "compute_weights", functools.partial(
      weighting.compute_weights, tol=1e-30, max_iter=1))
  out = tmp_path / "out"
  assert main(["--library", str(path), "--prototype", str(tmp_path / "z.npy"), "--k", "3",
               "--strategy", "lin", "--out", str(out), "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert [t["solver_status"] for t in report["targets"]] == ["max_iter", "max_iter"]
  on_disk = json.loads((out / "report.json").read_text())
  assert [t["solver_status"] for t in on_disk["targets"]] == ["max_iter", "max_iter"]
  assert main(["--library", str(path), "--prototype", str(tmp_path / "z.npy"), "--k", "3",
               "--strategy", "lin"]) == 0
  assert capsys.readouterr().out.count("solver max_iter") == 2
  # The same targets without the forcing converge: the status is the solve's, not fixed.
  monkeypatch.undo()
  assert main(["--library", str(path), "--prototype", str(tmp_path / "z.npy"), "--k", "3",
               "--strategy", "lin", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert [t["solver_status"] for t in report["targets"]] == ["converged", "converged"]


def test_a_late_write_failure_leaves_the_out_folder_as_it_was(library, tmp_path, capsys,
                                                              monkeypatch):
  """The report is the last file written; make it fail: earlier targets' adapters were
  already staged, yet ``--out`` keeps exactly its previous content and no staging folder."""
  from pathlib import Path
  path, protos, _ = library
  np.save(tmp_path / "zs.npy", np.stack([protos["site0"], protos["site3"]]))
  out = tmp_path / "out"
  argv = ["--library", str(path), "--prototype", str(tmp_path / "zs.npy"), "--k", "2",
          "--strategy", "nearest", "--out", str(out)]
  assert main(argv) == 0
  capsys.readouterr()
  before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
  assert len(before) == 3   # target-0, target-1 and report.json
  real_write_text, staged = Path.write_text, []

  def failing_write_text(self, *args, **kwargs):
    if self.name == "report.json" and self.parent != out:
      staged.extend(p for p in self.parent.rglob("*.safetensors"))
      raise OSError(28, "No space left on device", str(self))
    return real_write_text(self, *args, **kwargs)

  monkeypatch.setattr(Path, "write_text", failing_write_text)
  # A filesystem error is the user's environment: exit 2 and one line naming the file.
  assert main(argv[:-4] + ["--k", "3", "--strategy", "avg", "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "No space left on device" in err[0] and "report.json" in err[0]
  assert len(staged) == 2   # the failure came after both adapters were written
  after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
  assert after == before
  assert sorted(p.name for p in out.iterdir()) == ["report.json", "target-0", "target-1"]


def test_rpe_compose_through_the_dispatcher(library, tmp_path, capsys):
  from rpe_jax import cli
  path, protos, adapters = library
  np.save(tmp_path / "z.npy", protos["site4"] + 0.01)
  out = tmp_path / "out"
  assert cli.main(["compose", "--library", str(path), "--prototype", str(tmp_path / "z.npy"),
                   "--k", "2", "--strategy", "nearest", "--out", str(out), "--json"]) == 0
  [t] = json.loads(capsys.readouterr().out)["targets"]
  assert t["retrieved"] == _nearest(protos, protos["site4"] + 0.01, 2)[0]
  assert t["weights"] == [1.0, 0.0]
  got = _dense(adapter_file.load_adapter(out / "composed" / "adapter.safetensors")[0])
  for p in PATHS:
    np.testing.assert_array_equal(got[p], _dense(adapters["site4"])[p])
  # Bad input through the dispatcher: exit 2, one line, nothing written.
  assert cli.main(["compose", "--library", str(path), "--prototype", str(tmp_path / "z.npy"),
                   "--k", "9", "--out", str(tmp_path / "out2")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "k=9" in err[0]
  assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("extra,message", [
    (["--k", "9"], "k=9 exceeds"),
    (["--strategy", "median"], None),   # argparse rejects it (exit 2)
    (["--library", "MISSING"], "not an adapter library"),
    (["--prototype", "BADDIM"], "dimension"),
    (["--prototype", "NOTNPY"], "not a .npy file"),
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
  from rpe_jax import prototypes
  from models.preprocessing import Normalization
  from rpe_jax.tasks import images as data
  from rpe_jax.library import peft_io
  from rpe_jax.compose import adapter_of, with_adapter

  config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, image_size=16, patch_size=4, num_channels=1,
                     labels=tuple("0123456789"))
  model = ViTForImageClassification(config, rngs=nnx.Rngs(0))
  hf.save(model, tmp_path / "vit")
  model = hf.load(tmp_path / "vit")
  lib = Library.create(tmp_path / "lib")
  protos = {}
  for i, site in enumerate(("clean", "blur", "noisy")):
    init_adapters(model, ("query", "value"), rank=2, rngs=nnx.Rngs(i))
    adapter = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(i), x.shape),
                           adapter_of(model))
    ds = data.load(f"sites:digits/{site}:16", "train")
    z = protos[site] = prototypes.prototype(with_adapter(model, {}), ds, "cls").z
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

  # Repeated --data: each target's prototype, retrieval and lin weights against oracles.
  uris = ["sites:digits/bias:16", "sites:digits/rotated:16"]
  code = main(["--library", str(tmp_path / "lib"), "--model", str(tmp_path / "vit"),
               "--data", uris[0], "--data", uris[1], "--k", "3", "--strategy", "lin",
               "--json"])
  assert code == 0, capsys.readouterr().err
  report = json.loads(capsys.readouterr().out)
  assert [t["target"] for t in report["targets"]] == uris
  for uri, t in zip(uris, report["targets"]):
    ds = data.load(uri, "test")
    # Oracle prototype: the frozen model's CLS features of the whole split in one
    # un-batched pass, averaged in float64 numpy (no streaming, padding or masking).
    feats = np.asarray(base.features(Normalization.for_model(base)(ds.images), "cls"))
    z = feats.astype(np.float64).mean(0)
    assert t["n_samples"] == len(ds)
    names, d2 = _nearest(protos, z, 3)
    assert t["retrieved"] == names
    # float32 features summed in another order: relative 1e-5 on each squared distance.
    np.testing.assert_allclose(t["sqdist"], d2, rtol=1e-5)
    w = _kkt_lin(np.stack([protos[n] for n in names]), z)
    # The pipeline's z is float32 and its solve float32 (exact KKT polish): these weights
    # are of order 1-10 and move by cond·1e-6 with z's rounding; 1e-3 absolute.
    np.testing.assert_allclose(t["weights"], w, rtol=0, atol=1e-3)
    assert t["solver_status"] == "converged"


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


def test_lam2_rel_and_the_path_reach_the_report_and_the_plot(library, tmp_path, capsys):
  """--lam2-rel 0 is lin and 1 is simplex (the weighting tests check both against Clarabel);
  here: they travel through the main job, λ* is reported, --path writes one PNG per target."""
  path, protos, _ = library
  # Outside the hull of the prototypes: lin has a negative weight, so λ* > 0.
  np.save(tmp_path / "z.npy", 1.6 * protos["site1"] - 0.6 * protos["site2"])
  runs = {}
  for strategy, extra in (("lin", []), ("simplex", []), ("sparse", ["--lam2-rel", "0"]),
                          ("sparse", ["--lam2-rel", "1"])):
    assert main(["--library", str(path), "--prototype", str(tmp_path / "z.npy"), "--k", "3",
                 "--strategy", strategy, "--json", *extra]) == 0
    runs[(strategy, *extra)] = json.loads(capsys.readouterr().out)["targets"][0]
  rel0, rel1 = runs[("sparse", "--lam2-rel", "0")], runs[("sparse", "--lam2-rel", "1")]
  assert min(runs[("lin",)]["weights"]) < -0.05
  np.testing.assert_allclose(rel0["weights"], runs[("lin",)]["weights"], atol=1e-4)
  np.testing.assert_allclose(rel1["weights"], runs[("simplex",)]["weights"], atol=1e-4)
  assert rel1["lam_star"] > 0 and rel1["lam2"] == pytest.approx(rel1["lam_star"], rel=1e-6)
  assert rel0["lam2"] == 0.0
  out = tmp_path / "out"
  assert main(["--library", str(path), "--prototype", str(tmp_path / "z.npy"), "--k", "3",
               "--lam2-rel", "0.5", "--path", "--out", str(out), "--json"]) == 0
  t = json.loads(capsys.readouterr().out)["targets"][0]
  assert len(t["lambda_path"]["lam"]) == 31 and len(t["lambda_path"]["weights"][0]) == 3
  png = (out / "lambda_path-0.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  assert not list(out.glob(".tmp-*"))   # drawn in the staging folder, then moved in
  # A later run into the same (tool-written) folder without --path drops the stale plot.
  assert main(["--library", str(path), "--prototype", str(tmp_path / "z.npy"), "--k", "3",
               "--strategy", "lin", "--out", str(out), "--json"]) == 0
  capsys.readouterr()
  assert not (out / "lambda_path-0.png").exists() and (out / "composed").is_dir()
  # Both ways of giving λ2 at once is bad input: exit 2, one line.
  assert main(["--library", str(path), "--prototype", str(tmp_path / "z.npy"), "--lam2", "1",
               "--lam2-rel", "1"]) == 2
  assert "not allowed with argument" in capsys.readouterr().err

"""Every task through the command line (issue 15), on tiny models in a temporary folder.

For classification (ViT), segmentation (SAM) and report generation (Llama): `rpe train
--add` builds a library of two adapters, `python -m rpe_jax.compose --predict --eval`
composes them for a held-out target, and the test checks the written files (one row per
image, one mask per image of its shape, one impression per report) and recomputes the
metric from the written predictions with its own code (numpy accuracy and DICE,
``rouge_score`` directly) against ``report.json``. Then the error cases: each exits 2 with
one line and writes nothing.
"""

import csv
import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from hardening_cases import one_line_or_ok, rpe
from models import hf

pytestmark = pytest.mark.slow


def _vit(folder, layers=2):
  from models.vit import ViTForImageClassification
  from rpe_jax.tasks.classification import foundation_config
  config = dataclasses.replace(foundation_config(16), hidden_size=32, num_hidden_layers=layers,
                               intermediate_size=64)
  hf.save(ViTForImageClassification(config, rngs=nnx.Rngs(0)), folder)
  return folder


def _sam(folder):
  from models.sam import SamModel
  from rpe_jax.tasks.segmentation import base_config
  hf.save(SamModel(base_config(16), rngs=nnx.Rngs(0)), folder)
  return folder


def _llama(folder):
  from models import llama
  from rpe_jax.tasks import report
  texts = [t for m in report.MODALITIES for r in report.synthetic_reports(m, 40)
           for t in r] + [report.format_prompt("", t) for t in report.TEMPLATES]
  codec = report.train_tokenizer(texts, 300)
  config = llama.LlamaConfig(vocab_size=codec.vocab_size, hidden_size=32,
                             intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                             bos_token_id=codec.bos_id, eos_token_id=(codec.eos_id,),
                             pad_token_id=codec.pad_id)
  hf.save(llama.LlamaForCausalLM(config, rngs=nnx.Rngs(0)), folder)
  report.save_codec(codec, folder)
  return folder


def _ok(capsys, *argv):
  code, out, err = rpe(capsys, *argv)
  assert code == 0, err[-3000:]
  return out


def _build_library(capsys, tmp, model, uris):
  library = tmp / "library"
  for name, uri in uris.items():
    summary = json.loads(_ok(capsys, "train", "--data", uri, "--model", model, "--epochs", "1",
                             "--rank", "2", "--add", library, "--name", name, "--json"))
    assert summary["library"]["name"] == name
  return library


def _compose(capsys, library, model, data, out, *extra):
  return json.loads(_ok(capsys, "compose", "--library", library, "--model", model,
                        "--data", data, "--k", "2", "--predict", "--eval", "--out", out,
                        "--json", *extra))


def _entries_task(library):
  from rpe_jax.library import Library
  with Library.open(library, readonly=True) as lib:
    return {e.name: e.metadata["task"] for e in lib.entries()}


def test_classification_end_to_end(capsys, tmp_path):
  from rpe_jax.tasks import images
  model = _vit(tmp_path / "vit")
  library = _build_library(capsys, tmp_path, model, {
      "noisy": "sites:digits/noisy:16", "blur": "sites:digits/blur:16"})
  assert _entries_task(library) == {"noisy": "classification", "blur": "classification"}
  target = "sites:digits/scanner:16"
  report = _compose(capsys, library, model, target, tmp_path / "out")
  rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
  labels = images.load(target, "test").labels
  assert len(rows) == len(labels)
  predicted = np.array([int(r["prediction"]) for r in rows])
  accuracy = float(np.mean(predicted == labels))
  assert report["task"] == "classification"
  assert report["metrics"] == {target: {"accuracy": accuracy}}
  saved = json.loads((tmp_path / "out" / "report.json").read_text())
  assert saved["metrics"][target]["accuracy"] == pytest.approx(accuracy, abs=1e-12)

  # Per sample (issue 19): every input its own k nearest adapters and weights.
  per = _compose(capsys, library, model, target, tmp_path / "per", "--per-sample")
  stored = np.load(tmp_path / "per" / "per_sample.npz")
  union, mixture = [str(n) for n in stored["union"]], stored["weights"]
  rows = list(csv.DictReader(open(tmp_path / "per" / "predictions.csv")))
  assert mixture.shape == (len(labels), len(union)) == (len(rows), 2)
  assert np.allclose(mixture.sum(axis=1), 1.0, atol=1e-5)
  stats = per["targets"][0]["per_sample"]
  assert stats["inputs_per_adapter"] == {n: int((mixture[:, j] != 0).sum())
                                         for j, n in enumerate(union)}
  # The oracle: input n alone through with_adapter(combine(union, W[n])).
  from rpe_jax.compose import combine, with_adapter
  from rpe_jax.library import Library
  from rpe_jax.tasks.classification import predict_labels
  base = hf.load(model)
  ds = images.load(target, "test")
  with Library.open(library, readonly=True) as lib:
    adapters = [lib.load(n) for n in union]
  # Input 7's weights from its own feature, computed here with the model's own encoder.
  from models.preprocessing import Normalization
  from rpe_jax.weighting import compute_weights
  feature = np.asarray(base.features(Normalization.for_model(base)(ds.images[7:8]), "cls"))
  with Library.open(library, readonly=True) as lib:
    found = lib.query(feature, 2)
  w = compute_weights(found.references, feature, "sparse", lam2=10.0, sqdist=found.distances)
  expected = dict(zip(map(str, found.names[0]), np.asarray(w.weights[0], np.float64)))
  got = {n: float(mixture[7, j]) for j, n in enumerate(union)}
  assert got == pytest.approx(expected, abs=1e-5)
  for n in (0, 7, len(rows) - 1):
    alone = with_adapter(base, combine(adapters, mixture[n]))
    assert predict_labels(alone, ds.subset(np.array([n])))[0] == int(rows[n]["prediction"])
  predicted = np.array([int(r["prediction"]) for r in rows])
  assert per["metrics"][target]["accuracy"] == pytest.approx(np.mean(predicted == labels),
                                                             abs=1e-12)


def _write_mask_folder(root, uri, split="test", n=12):
  """The first ``n`` images and masks of a built-in split as PNG files (a masks: folder)."""
  from PIL import Image
  from rpe_jax.tasks import seg_data
  ds = seg_data.load(uri, split)
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  for i in range(n):
    pixels = np.round(ds.images[i, ..., 0] * 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / "images" / f"case{i:02d}.png")
    Image.fromarray(ds.masks[i].astype(np.uint8) * 255).save(root / "masks" / f"case{i:02d}.png")
  return root


def test_segmentation_end_to_end(capsys, tmp_path):
  from PIL import Image
  model = _sam(tmp_path / "sam")
  library = _build_library(capsys, tmp_path, model, {
      "clean": "sites:organs/clean:16", "noisy": "sites:organs/noisy:16"})
  assert set(_entries_task(library).values()) == {"segmentation"}
  folder = _write_mask_folder(tmp_path / "target", "sites:organs/scanner:16")
  target = f"masks:{folder / 'images'}:{folder / 'masks'}"
  report = _compose(capsys, library, model, target, tmp_path / "out", "--split", "all")
  masks = np.load(tmp_path / "out" / "masks.npz")["masks"]
  truth = np.stack([np.asarray(Image.open(folder / "masks" / f"case{i:02d}.png")) > 0
                    for i in range(12)])
  assert masks.shape == truth.shape == (12, 16, 16) and masks.dtype == bool
  inter = (masks & truth).sum(axis=(1, 2))
  total = masks.sum(axis=(1, 2)) + truth.sum(axis=(1, 2))
  dice = float(np.mean(np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))))
  assert report["task"] == "segmentation"
  assert report["metrics"][target]["dice"] == pytest.approx(dice, abs=1e-12)


def test_report_end_to_end(capsys, tmp_path):
  from rouge_score import rouge_scorer
  from rpe_jax.tasks import report as text
  model = _llama(tmp_path / "llama")
  library = _build_library(capsys, tmp_path, model, {
      "ct": "reports:ct_chest", "us": "reports:us_abdomen"})
  assert set(_entries_task(library).values()) == {"report"}
  reports = text.synthetic_reports("mri_brain", 10, seed=5)
  path = text.write_jsonl(tmp_path / "target.jsonl", reports)
  target = f"jsonl:{path}"
  report = _compose(capsys, library, model, target, tmp_path / "out", "--split", "all",
                    "--max-new-tokens", "8")
  lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text()
           .splitlines()]
  assert [x["findings"] for x in lines] == [r.findings for r in reports]
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  rouge = float(np.mean([scorer.score(r.impression, x["impression"])["rougeL"].fmeasure
                         for r, x in zip(reports, lines)]))
  assert report["task"] == "report"
  assert report["metrics"][target]["rouge_l"] == pytest.approx(rouge, abs=1e-12)


# --- error cases: exit 2, one line, nothing written -------------------------------------------

@pytest.fixture(scope="module")
def vit_library(tmp_path_factory):
  """A ViT, a classification library of two adapters, a SAM, and a one-layer ViT."""
  from rpe_jax import cli
  tmp = tmp_path_factory.mktemp("errors")
  model = _vit(tmp / "vit")
  for name, site in (("noisy", "noisy"), ("blur", "blur")):
    assert cli.main(["train", "--data", f"sites:digits/{site}:16", "--model", str(model),
                     "--epochs", "1", "--rank", "2", "--add", str(tmp / "library"),
                     "--name", name, "--json"]) == 0
  return {"tmp": tmp, "vit": model, "library": tmp / "library", "sam": _sam(tmp / "sam"),
          "other_vit": _vit(tmp / "vit1", layers=1)}


def _refused(capsys, out, *argv):
  code, stdout, err = rpe(capsys, *argv, "--json")
  assert code == 2, (code, stdout, err)
  one_line_or_ok(code, stdout, err)
  assert not out.exists()
  return err


def test_adapters_of_another_task_are_refused(capsys, vit_library, tmp_path):
  err = _refused(capsys, tmp_path / "out", "compose", "--library", vit_library["library"],
                 "--model", vit_library["sam"], "--data", "sites:organs/clean:16", "--k", "2",
                 "--predict", "--out", tmp_path / "out")
  assert "classification adapter" in err and "segmentation model" in err


def test_adapters_of_another_base_model_are_refused(capsys, vit_library, tmp_path):
  err = _refused(capsys, tmp_path / "out", "compose", "--library", vit_library["library"],
                 "--model", vit_library["other_vit"], "--data", "sites:digits/scanner:16",
                 "--k", "2", "--predict", "--out", tmp_path / "out")
  assert "does not fit the model" in err


def test_a_dataset_of_the_wrong_kind_is_refused(capsys, vit_library, tmp_path):
  err = _refused(capsys, tmp_path / "out", "compose", "--library", vit_library["library"],
                 "--model", vit_library["vit"], "--data", "sites:organs/clean:16", "--k", "2",
                 "--predict", "--out", tmp_path / "out")
  assert "segmentation dataset" in err and "classification model" in err
  err = _refused(capsys, tmp_path / "a.safetensors", "train", "--data", "reports:ct_chest",
                 "--model", vit_library["vit"], "--out", tmp_path / "a.safetensors")
  assert "report dataset" in err


def test_a_mask_of_another_size_is_refused(capsys, vit_library, tmp_path):
  from PIL import Image
  folder = _write_mask_folder(tmp_path / "target", "sites:organs/scanner:16", n=3)
  Image.fromarray(np.zeros((16, 12), np.uint8)).save(folder / "masks" / "case01.png")
  err = _refused(capsys, tmp_path / "out", "compose", "--library", vit_library["library"],
                 "--model", vit_library["sam"],
                 "--data", f"masks:{folder / 'images'}:{folder / 'masks'}", "--k", "2",
                 "--predict", "--out", tmp_path / "out")
  assert "case01.png" in err


def test_a_jsonl_line_without_findings_is_refused(capsys, vit_library, tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"findings": "CT of the chest.", "impression": "Normal."}\n'
                  '{"impression": "Normal."}\n')
  err = _refused(capsys, tmp_path / "out", "compose", "--library", vit_library["library"],
                 "--model", vit_library["vit"], "--data", f"jsonl:{path}", "--k", "2",
                 "--predict", "--out", tmp_path / "out")
  assert "bad.jsonl:2" in err and "findings" in err

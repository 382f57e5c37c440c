"""The report → impression pipeline: data, tokenisation, loss masks, prototypes, training,
generation, ROUGE-L, and a small leave-one-out composition run."""

import json
import re

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from models import hf as hf_io
from models import llama
from rpe_jax.tasks import report as text
from rpe_jax.compose import adapter_of, combine, with_adapter

MODS = sorted(text.MODALITIES)


@pytest.fixture(scope="module")
def codec():
  corpus = [s for m in MODS for r in text.synthetic_reports(m, 64) for s in r]
  corpus += [text.format_prompt("", t) for t in text.TEMPLATES]
  return text.train_tokenizer(corpus, 768)


@pytest.fixture(scope="module")
def pair(codec, tmp_path_factory):
  """A tiny random HF Llama over the codec's vocabulary and ours loaded from it."""
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=codec.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
      bos_token_id=codec.bos_id, eos_token_id=codec.eos_id, pad_token_id=codec.pad_id)
  ref = transformers.LlamaForCausalLM(cfg).eval()
  folder = tmp_path_factory.mktemp("tiny")
  ref.save_pretrained(folder)
  return ref, hf_io.load(folder)


def test_jsonl_round_trip_and_errors(tmp_path):
  reports = text.synthetic_reports("ct_chest", 5)
  path = text.write_jsonl(tmp_path / "r.jsonl", reports)
  assert text.read_jsonl(path) == reports
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert rows[2] == {"findings": reports[2].findings, "impression": reports[2].impression}
  (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"findings": "x"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: 'impression'"):
    text.read_jsonl(tmp_path / "bad.jsonl")
  (tmp_path / "bad.jsonl").write_text("{nope\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
    text.read_jsonl(tmp_path / "bad.jsonl")


def test_templates_and_synthetic_modalities():
  assert len(text.TEMPLATES) == 20 and len(set(text.TEMPLATES)) == 20
  a, b = text.synthetic_reports("mri_brain", 30, seed=1), text.synthetic_reports("mri_brain", 30,
                                                                                 seed=1)
  assert a == b and a != text.synthetic_reports("mri_brain", 30, seed=2)
  assert all(r.findings.startswith("MRI of the brain") for r in a)
  with pytest.raises(ValueError, match="modality"):
    text.synthetic_reports("pet", 3)


def test_tokenizer_round_trip(codec):
  for r in text.synthetic_reports("us_abdomen", 10, seed=3):
    for s in (r.findings, " " + r.impression, text.format_prompt(r.findings, text.TEMPLATES[7])):
      assert codec.tokenizer.decode(codec.encode(s)) == s
  assert (codec.pad_id, codec.bos_id, codec.eos_id) == (0, 1, 2)
  ids = codec.encode("No acute abnormality.") + [codec.eos_id] + codec.encode("junk")
  assert codec.decode(ids) == "No acute abnormality."


def test_codec_folder_is_read_by_transformers(codec, tmp_path):
  text.save_codec(codec, tmp_path)
  hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
  assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 0)
  again = text.load_codec(tmp_path)
  assert again[1:] == codec[1:]
  for r in text.synthetic_reports("ct_chest", 4, seed=9):
    ids = hf_tok(r.findings, add_special_tokens=False)["input_ids"]
    assert again.encode(r.findings) == codec.encode(r.findings) == ids
  conf = json.loads((tmp_path / "tokenizer_config.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({**conf, "eos_token": "<nope>"}))
  with pytest.raises(ValueError, match="eos_token"):
    text.load_codec(tmp_path)


def test_loss_mask_covers_exactly_the_impression(codec):
  reports = text.synthetic_reports("xr_knee", 12, seed=4)
  batch = text.encode_examples(codec, reports, 160)
  prompts = {text.format_prompt(r.findings, t) for r in reports for t in text.TEMPLATES}
  for n, r in enumerate(reports):
    ids, attn, loss = (x[n] for x in batch)
    assert ids[0] == codec.bos_id and attn.sum() == (ids != codec.pad_id).sum()
    target = ids[loss == 1]
    assert target[-1] == codec.eos_id
    assert codec.tokenizer.decode(target[:-1].tolist()) == " " + r.impression
    prompt = ids[1:np.argmax(loss)]
    assert codec.tokenizer.decode(prompt.tolist()) in prompts
  # Too long: the findings are cut, never the impression.
  short = text.encode_examples(codec, reports[:1], 40)
  assert short.attention_mask[0].sum() == 40  # findings were cut to fit
  assert codec.tokenizer.decode(short.input_ids[0][short.loss_mask[0] == 1][:-1].tolist()) \
      == " " + reports[0].impression
  with pytest.raises(ValueError, match="max_len=10"):
    text.encode_examples(codec, reports[:1], 10)


def test_impression_loss_matches_hf_labels_loss(codec, pair):
  ref, ours = pair
  batch = text.encode_examples(codec, text.synthetic_reports("ct_chest", 4, seed=5), 64)
  labels = np.where(batch.loss_mask == 1, batch.input_ids, -100)
  with torch.no_grad():
    want = ref(torch.tensor(batch.input_ids, dtype=torch.long),
               attention_mask=torch.tensor(batch.attention_mask),
               labels=torch.tensor(labels, dtype=torch.long)).loss.item()
  got = float(text.impression_loss(ours, *batch))
  assert abs(got - want) < 1e-4


def test_findings_features_match_hf_per_report(codec, pair):
  ref, ours = pair
  findings = [r.findings for r in text.synthetic_reports("mri_brain", 5, seed=6)]
  feats = text.findings_features(ours, codec, findings, batch_size=4, max_len=64)
  for n, f in enumerate(findings):
    ids = torch.tensor([[codec.bos_id] + codec.encode(f)])
    with torch.no_grad():
      h = ref(ids, output_hidden_states=True).hidden_states[-1][0, 1:].numpy()
    np.testing.assert_allclose(feats[n], h.astype(np.float64).mean(0), atol=1e-5, rtol=0)
  proto = text.findings_prototype(ours, codec, findings, batch_size=2, max_len=64)
  assert proto.n == 5
  np.testing.assert_allclose(proto.z, feats.mean(0), atol=1e-6)


def test_generated_impressions_match_hf_greedy(codec, pair):
  ref, ours = pair
  findings = [r.findings for r in text.synthetic_reports("us_abdomen", 3, seed=7)]
  got = text.generate_impressions(ours, codec, findings, template=text.TEMPLATES[3],
                                  max_new_tokens=12, batch_size=2)
  for f, g in zip(findings, got):
    ids, _ = text.encode_prompts(codec, [f], text.TEMPLATES[3])
    with torch.no_grad():
      out = ref.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens=12,
                         do_sample=False, eos_token_id=codec.eos_id, pad_token_id=codec.pad_id)
    assert g == codec.decode(out[0, ids.shape[1]:].tolist()).strip()


def _lcs_f1(pred, ref):
  """Independent ROUGE-L oracle: lower-cased alphanumeric tokens, LCS by dynamic programming."""
  p, r = (re.sub(r"[^a-z0-9]+", " ", s.lower()).split() for s in (pred, ref))
  if not p or not r:
    return 0.0
  table = np.zeros((len(p) + 1, len(r) + 1), int)
  for i, a in enumerate(p):
    for j, b in enumerate(r):
      table[i + 1, j + 1] = table[i, j] + 1 if a == b else max(table[i, j + 1], table[i + 1, j])
  lcs = table[-1, -1]
  if lcs == 0:
    return 0.0
  prec, rec = lcs / len(p), lcs / len(r)
  return 2 * prec * rec / (prec + rec)


def test_rouge_l_matches_lcs_oracle():
  preds = ["Small nodule in the lingula.", "No acute abnormality", "mass", "cyst in liver"]
  refs = ["Small mass in the lingula.", "No acute abnormality.", "Large mass in the spleen.",
          "Small stone in the gallbladder."]
  score = text.rouge_l(preds, refs)
  want = np.array([_lcs_f1(p, r) for p, r in zip(preds, refs)])
  np.testing.assert_allclose(score.per_example, want, atol=1e-12)
  assert score.f1 == pytest.approx(want.mean()) and score.per_example[1] == 1.0
  with pytest.raises(ValueError, match="predictions"):
    text.rouge_l(preds, refs[:2])


def tiny_base(codec, seed=0):
  cfg = llama.LlamaConfig(vocab_size=codec.vocab_size, hidden_size=64, intermediate_size=128,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          eos_token_id=(codec.eos_id,), pad_token_id=codec.pad_id)
  return llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed))


def test_train_adapter_learns_impressions_and_leaves_base_alone(codec):
  base = tiny_base(codec)
  data = text.encode_examples(codec, text.synthetic_reports("ct_chest", 48, seed=8), 64)
  config = text.TextTrainConfig(steps=40, batch_size=8, lr=1e-2, rank=4)
  result = text.train_adapter(base, data, config)
  assert adapter_of(base) == {}
  assert result.losses[-5:].mean() < 0.5 * result.losses[:5].mean()
  again = text.train_adapter(base, data, config)  # deterministic for a seed
  np.testing.assert_array_equal(result.losses, again.losses)
  leaf = result.adapter["model"]["layers"]["1"]["mlp"]["down_proj"]
  assert leaf.rank == 4 and float(np.abs(leaf.b).max()) > 0
  with pytest.raises(ValueError, match="batch_size"):
    text.train_adapter(base, data, config._replace(batch_size=100))


def test_train_svd_adapter_with_orthogonality_penalty(codec):
  from models.lora import SVDLoRA, total_orthogonality_penalty
  base = tiny_base(codec)
  data = text.encode_examples(codec, text.synthetic_reports("mri_brain", 32, seed=9), 64)
  config = text.TextTrainConfig(steps=30, batch_size=8, lr=1e-2, rank=4, kind="svd",
                                targets=("q_proj", "v_proj"))
  result = text.train_adapter(base, data, config)
  leaves = jax.tree.leaves(result.adapter, is_leaf=lambda x: isinstance(x, SVDLoRA))
  assert len(leaves) == 4 and all(isinstance(x, SVDLoRA) for x in leaves)
  assert result.losses[-5:].mean() < result.losses[:5].mean() - 0.3
  # The first step's objective is the loss plus 0.1 x the penalty of the fresh adapter.
  fresh = with_adapter(base, {})
  from models.lora import init_adapters
  init_adapters(fresh, config.targets, 4, kind="svd", rngs=nnx.Rngs(0))
  idx = np.random.default_rng((0, 0)).permutation(32)[:8]
  want = float(text.impression_loss(fresh, *(x[idx] for x in data))) + 0.1 * float(
      total_orthogonality_penalty(adapter_of(fresh)))
  assert result.losses[0] == pytest.approx(want, rel=1e-4)


@pytest.mark.slow
def test_leave_one_out_composition_beats_the_base(codec):
  """Three modality adapters composed for a held-out fourth with every strategy."""
  from rpe_jax.weighting import STRATEGIES, compute_weights
  base = tiny_base(codec, seed=1)
  held_out, library = MODS[0], MODS[1:]
  config = text.TextTrainConfig(steps=100, batch_size=8, lr=1e-2, rank=4)
  adapters, protos = [], []
  for m in library:
    train = text.synthetic_reports(m, 64, seed=10)
    adapters.append(text.train_adapter(base, text.encode_examples(codec, train, 64),
                                       config).adapter)
    protos.append(text.findings_prototype(base, codec, [r.findings for r in train]).z)
  target_reports = text.synthetic_reports(held_out, 16, seed=11)
  findings = [r.findings for r in target_reports]
  refs = [r.impression for r in target_reports]
  z = text.findings_prototype(base, codec, findings).z
  scores = {"base": text.rouge_l(text.generate_impressions(base, codec, findings,
                                                           max_new_tokens=16), refs).f1}
  for strategy in STRATEGIES:
    w = compute_weights(np.stack(protos), z, strategy, lam2=1.0).weights
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-5)
    model = with_adapter(base, combine(adapters, w))
    pred = text.generate_impressions(model, codec, findings, max_new_tokens=16)
    scores[strategy] = text.rouge_l(pred, refs).f1
  print("\n| strategy | ROUGE-L |\n|---|---|\n" + "\n".join(
      f"| {k} | {v:.3f} |" for k, v in scores.items()))
  # The composed adapters carry the shared impression phrasing to the unseen modality.
  # (sim / nearest pick one adapter, which may transfer poorly: asserted only as valid.)
  for strategy in ("avg", "lin", "sparse"):
    assert scores[strategy] > scores["base"] + 0.15, scores
  assert all(0.0 <= v <= 1.0 for v in scores.values())


def _tiny_bert(folder):
  """A seeded random BERT and a word-level vocabulary saved locally (no download)."""
  words = ("the heart size is normal no pleural effusion nodule in right upper lobe mass "
           "lesion left lower stable").split()
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words)) + ["."]
  (folder / "vocab.txt").write_text("\n".join(vocab))
  transformers.BertTokenizer(str(folder / "vocab.txt"), model_max_length=64).save_pretrained(folder)
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64)
  transformers.BertModel(config).save_pretrained(folder)


def _bertscore_oracle(folder, candidate, reference, layer):
  """Greedy cosine matching of layer-``layer`` token embeddings. As in the reference
  implementation, [CLS]/[SEP] carry no weight in the averages but stay match candidates."""
  tok = transformers.BertTokenizer.from_pretrained(folder)
  model = transformers.BertModel.from_pretrained(folder).eval()

  def embed(text):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
      hidden = model(**ids, output_hidden_states=True).hidden_states[layer][0]
    return torch.nn.functional.normalize(hidden.double(), dim=-1)

  sim = embed(candidate) @ embed(reference).T          # [cand tokens, ref tokens]
  p = sim.max(dim=1).values[1:-1].mean().item()
  r = sim.max(dim=0).values[1:-1].mean().item()
  return p, r, 2 * p * r / (p + r)


def test_bert_score_with_a_local_model_matches_greedy_matching(tmp_path):
  _tiny_bert(tmp_path)
  preds = ["no pleural effusion .", "mass in the right upper lobe"]
  refs = ["no effusion .", "nodule in the left lower lobe"]
  score = text.bert_score(preds, refs, str(tmp_path), num_layers=2)
  expected = [_bertscore_oracle(str(tmp_path), c, r, 2) for c, r in zip(preds, refs)]
  np.testing.assert_allclose(score.per_example_f1, [e[2] for e in expected], atol=1e-5)
  assert score.precision == pytest.approx(np.mean([e[0] for e in expected]), abs=1e-5)
  assert score.recall == pytest.approx(np.mean([e[1] for e in expected]), abs=1e-5)
  identical = text.bert_score(refs, refs, str(tmp_path))
  np.testing.assert_allclose(identical.per_example_f1, 1.0, atol=1e-5)
  with_empty = text.bert_score(["", preds[1]], refs, str(tmp_path), num_layers=2)
  np.testing.assert_allclose(with_empty.per_example_f1, [0.0, expected[1][2]], atol=1e-5)


def test_bert_score_refuses_a_missing_model(tmp_path):
  with pytest.raises(ValueError, match="available locally"):
    text.bert_score(["a"], ["a"], str(tmp_path / "none"))

"""The report → impression pipeline for causal language models (RPE's language task).

A dataset is a list of ``Report(findings, impression)`` pairs (JSONL: one
``{"findings": ..., "impression": ...}`` object per line; impression None, and left out of
the file, in an unlabeled dataset; datasets by URI: ``rpe_jax.tasks.report_data``). One
training example is

  [bos] prompt(template, findings) impression [eos]

with the prompt and the impression tokenised separately (so the boundary is exact) and
the loss taken on the impression and eos tokens only:

  L = Σ_{b,t} m_{b,t+1} · CE(logits_{b,t}, x_{b,t+1}) / Σ m,   m = 1 on impression/eos tokens.

Each example uses one of the instruction ``TEMPLATES`` (the seeds use 20), drawn with a
seeded generator. The task prototype of a dataset is the mean, over its reports, of the
mean-pooled last hidden states over the findings tokens (frozen base model):

  z = (1/N) Σ_n (1/|f_n|) Σ_{t ∈ f_n} h_t(x_n; θ0).

Generation is greedy KV-cache decoding (``models.llama.generate``) after the prompt, and
predictions are scored by ROUGE-L F1 (the ``rouge-score`` package). ``synthetic_reports``
makes small report "modalities" for tests and demos; ``train_tokenizer`` a byte-level BPE.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import llama
from models.lora import LoRAParam, init_adapters
from rpe_jax.compose import adapter_of, with_adapter
from rpe_jax.prototypes import Prototype
from rpe_jax.tasks.contract import Task, TaskModel, Trained
from rpe_jax.tasks.report_data import (  # noqa: F401  (re-exported: the task's data)
    MODALITIES, Report, read_jsonl, synthetic_reports, write_jsonl)
from rpe_jax.training import OptimConfig, fit

# --- Data -----------------------------------------------------------------------------


# ``Report``, ``read_jsonl`` / ``write_jsonl`` and the synthetic modalities live in
# ``rpe_jax.tasks.report_data`` (the task's data) and are re-exported here.


# Instruction templates: an instruction, then "Findings: ...", then "Impression:".
TEMPLATES = (
    "Summarize the radiology findings into a concise impression.",
    "Write the impression section for this radiology report.",
    "Given the findings below, state the radiologist's impression.",
    "Condense these findings into a one-line clinical impression.",
    "You are a radiologist. Provide the impression for the findings.",
    "Produce a short impression that captures the key findings.",
    "Read the findings and give the final impression.",
    "What is the impression of this imaging study?",
    "Summarise the following report findings.",
    "Turn the detailed findings into a brief impression.",
    "Generate the impression for the exam described below.",
    "State the most important conclusion from these findings.",
    "Write a radiology impression based on the findings.",
    "Provide a concise diagnostic summary of the findings.",
    "From the findings, derive the impression a radiologist would write.",
    "Briefly summarize the clinically relevant findings.",
    "Compose the impression section of the report.",
    "Give a short summary of the imaging results.",
    "Convert the findings into an impression for the referring physician.",
    "Report the impression for the following study.",
)


def format_prompt(findings: str, template: str = TEMPLATES[0]) -> str:
  return f"{template}\nFindings: {findings}\nImpression:"


# --- Tokenisation ---------------------------------------------------------------------


class Codec(NamedTuple):
  """A ``tokenizers.Tokenizer`` and its special token ids."""

  tokenizer: object
  pad_id: int
  bos_id: int
  eos_id: int

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    """Text of ``ids`` up to the first eos, padding and specials dropped."""
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self.tokenizer.decode([i for i in ids if i not in (self.pad_id, self.bos_id)])


SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


def train_tokenizer(texts, vocab_size: int = 384) -> Codec:
  """A byte-level BPE trained on ``texts`` (lossless round trip), ids 0-2 = pad, bos, eos."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  if vocab_size < 256 + len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} for a byte-level "
                     f"BPE, got {vocab_size}")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(list(texts), trainer)
  pad, bos, eos = (tok.token_to_id(t) for t in SPECIAL_TOKENS)
  return Codec(tok, pad, bos, eos)


def save_codec(codec: Codec, folder) -> Path:
  """Write ``tokenizer.json`` + ``tokenizer_config.json`` (HF layout: transformers'
  ``PreTrainedTokenizerFast.from_pretrained(folder)`` reads it too)."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  codec.tokenizer.save(str(folder / "tokenizer.json"))
  tok = codec.tokenizer.id_to_token
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok(codec.bos_id),
      "eos_token": tok(codec.eos_id), "pad_token": tok(codec.pad_id)}, indent=2) + "\n")
  return folder


def load_codec(folder) -> Codec:
  """A ``Codec`` from an HF tokenizer folder (``tokenizer.json`` and the special tokens of
  ``tokenizer_config.json``); with no pad token (Llama) padding uses the eos id."""
  from tokenizers import Tokenizer
  folder = Path(folder)
  path = folder / "tokenizer.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist (only fast-tokenizer folders are read)")
  tokenizer = Tokenizer.from_file(str(path))
  conf_path = folder / "tokenizer_config.json"
  conf = json.loads(conf_path.read_text()) if conf_path.exists() else {}

  def special(name):
    token = conf.get(name)
    token = token.get("content") if isinstance(token, dict) else token
    if token is None:
      return None
    i = tokenizer.token_to_id(token)
    if i is None:
      raise ValueError(f"{conf_path}: {name} {token!r} is not in the vocabulary")
    return i

  bos, eos, pad = special("bos_token"), special("eos_token"), special("pad_token")
  if bos is None or eos is None:
    raise ValueError(f"{conf_path}: bos_token and eos_token are required")
  return Codec(tokenizer, eos if pad is None else pad, bos, eos)


class TokenBatch(NamedTuple):
  """Right-padded training examples: ids, attention mask, loss mask (all [N, L])."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  loss_mask: np.ndarray


def template_choice(n: int, n_templates: int = len(TEMPLATES), seed: int = 0) -> np.ndarray:
  """A seeded template index per example."""
  return np.random.default_rng(seed).integers(0, n_templates, size=n)


def encode_examples(codec: Codec, reports: Sequence[Report], max_len: int, *,
                    templates: Sequence[str] = TEMPLATES, seed: int = 0) -> TokenBatch:
  """Training examples with the loss on impression + eos tokens only.

  The findings are cut from the end when an example is longer than ``max_len``; an
  impression that does not fit even with empty findings is an error.
  """
  if not reports:
    raise ValueError("reports is empty")
  choice = template_choice(len(reports), len(templates), seed)
  ids = np.full((len(reports), max_len), codec.pad_id, np.int32)
  attn = np.zeros((len(reports), max_len), np.int32)
  loss = np.zeros((len(reports), max_len), np.int32)
  for n, (report, t) in enumerate(zip(reports, choice)):
    if report.impression is None:
      raise ValueError(f"reports[{n}] has no impression; training needs labeled reports")
    target = codec.encode(" " + report.impression) + [codec.eos_id]
    head, tail = templates[t] + "\nFindings: ", "\nImpression:"
    fixed = [codec.bos_id] + codec.encode(head) + codec.encode(tail) + target
    room = max_len - len(fixed)
    if room < 0:
      raise ValueError(f"reports[{n}]: the impression needs {len(fixed)} tokens with no "
                       f"findings, more than max_len={max_len}")
    findings = codec.encode(report.findings)[:room]
    prompt = [codec.bos_id] + codec.encode(head) + findings + codec.encode(tail)
    row = prompt + target
    ids[n, :len(row)] = row
    attn[n, :len(row)] = 1
    loss[n, len(prompt):len(row)] = 1
  return TokenBatch(ids, attn, loss)


def encode_prompts(codec: Codec, findings: Sequence[str], template: str = TEMPLATES[0], *,
                   max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded generation prompts (ids, mask) [N, L]; findings cut to fit ``max_len``."""
  head, tail = codec.encode(template + "\nFindings: "), codec.encode("\nImpression:")
  rows = []
  for f in findings:
    body = codec.encode(f)
    if max_len is not None:
      body = body[:max(0, max_len - 1 - len(head) - len(tail))]
    rows.append([codec.bos_id] + head + body + tail)
  length = max(len(r) for r in rows)
  ids = np.full((len(rows), length), codec.pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for n, r in enumerate(rows):
    ids[n, length - len(r):] = r
    mask[n, length - len(r):] = 1
  return ids, mask


# --- Training -------------------------------------------------------------------------


def impression_loss(model, input_ids, attention_mask, loss_mask) -> jax.Array:
  """Mean next-token cross-entropy over the tokens marked by ``loss_mask``."""
  logits = model(input_ids, attention_mask).logits[:, :-1].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, input_ids[:, 1:])
  m = loss_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


class TextTrainConfig(NamedTuple):
  rank: int = 8
  kind: str = "lora"                 # "lora" or "svd"
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                              "gate_proj", "up_proj", "down_proj")
  steps: int = 200
  batch_size: int = 16
  lr: float = 3e-3
  weight_decay: float = 0.0
  warmup_steps: int = 10
  clip_norm: float = 1.0
  ortho_weight: float | None = None  # None: 0.1 for svd (Med-LEGO's penalty), 0 for lora
  seed: int = 0


class TextTrainResult(NamedTuple):
  adapter: dict          # exchange form
  model: nnx.Module      # the base model carrying the trained adapter
  losses: np.ndarray     # per step


def report_loss(model, batch):
  """``impression_loss`` on a batch {input_ids, attention_mask, loss_mask}."""
  return impression_loss(model, batch["input_ids"], batch["attention_mask"],
                         batch["loss_mask"]), {}


def _sampler(data: TokenBatch, config: TextTrainConfig):
  """``config.steps`` batches from per-epoch permutations seeded by (seed, epoch)."""
  n = len(data.input_ids)
  per_epoch = n // config.batch_size
  for step in range(config.steps):
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng((config.seed, epoch)).permutation(n)
    idx = order[i * config.batch_size:(i + 1) * config.batch_size]
    yield {"input_ids": data.input_ids[idx], "attention_mask": data.attention_mask[idx],
           "loss_mask": data.loss_mask[idx]}


def train_adapter(model: llama.LlamaForCausalLM, data: TokenBatch,
                  config: TextTrainConfig = TextTrainConfig()) -> TextTrainResult:
  """Fit a fresh LoRA / SVD-LoRA adapter on ``data`` (base frozen) with AdamW
  (``rpe_jax.training``).

  Steps draw fixed-size batches from a per-epoch permutation seeded by ``config.seed``,
  so a run is deterministic. The learning rate warms up linearly then decays by cosine.
  SVD-LoRA adds Med-LEGO's orthogonality penalty λ_⊥ Σ ‖aᵀa − I‖² + ‖b bᵀ − I‖² to the
  objective (``losses`` records the objective).
  """
  n = len(data.input_ids)
  if config.batch_size > n:
    raise ValueError(f"batch_size {config.batch_size} exceeds the {n} training examples")
  if config.steps < 1:
    raise ValueError(f"steps must be >= 1, got {config.steps}")
  fresh = with_adapter(model, {})
  init_adapters(fresh, config.targets, config.rank, kind=config.kind,
                rngs=nnx.Rngs(config.seed))
  ortho = config.ortho_weight if config.ortho_weight is not None else (
      0.1 if config.kind == "svd" else 0.0)
  optim = OptimConfig(lr=float(config.lr), weight_decay=float(config.weight_decay),
                      clip_norm=float(config.clip_norm),
                      warmup_steps=max(1, min(int(config.warmup_steps), config.steps - 1)),
                      schedule="warmup_cosine", ortho_weight=float(ortho))
  result = fit(fresh, LoRAParam, report_loss, lambda epoch: _sampler(data, config),
               epochs=1, steps_per_epoch=config.steps, config=optim)
  return TextTrainResult(adapter_of(result.model), result.model, result.losses)


def pretrain_base(codec: Codec, reports: Sequence[Report], *, hidden: int = 64,
                  layers: int = 2, steps: int = 300, batch_size: int = 16, lr: float = 3e-3,
                  seed: int = 0) -> llama.LlamaForCausalLM:
  """A small Llama trained in full (every weight, impression loss) on ``reports``: the
  stand-in for a pretrained language model, which cannot be downloaded here."""
  config = llama.LlamaConfig(vocab_size=codec.vocab_size, hidden_size=hidden,
                             intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2,
                             head_dim=hidden // 4, max_position_embeddings=512,
                             bos_token_id=codec.bos_id, eos_token_id=(codec.eos_id,),
                             pad_token_id=codec.pad_id)
  model = llama.LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
  reports = list(reports)
  data = encode_examples(codec, reports, _max_len(codec, reports), seed=seed)
  train = TextTrainConfig(steps=steps, batch_size=min(batch_size, len(reports)), lr=lr,
                          warmup_steps=max(1, steps // 10), seed=seed)
  optim = OptimConfig(lr=lr, weight_decay=0.0, clip_norm=1.0,
                      warmup_steps=max(1, min(train.warmup_steps, steps - 1)),
                      schedule="warmup_cosine")
  result = fit(model, nnx.Param, report_loss, lambda epoch: _sampler(data, train),
               epochs=1, steps_per_epoch=steps, config=optim)
  if not np.all(np.isfinite(result.losses)):
    raise FloatingPointError("pretraining the report base diverged (non-finite loss)")
  return result.model


# --- Prototypes -----------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _pooled(graphdef, state, ids, attn, pool):
  h = nnx.merge(graphdef, state)(ids, attn).last_hidden_state.astype(jnp.float32)
  w = pool.astype(jnp.float32)[..., None]
  return jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


def findings_features(model, codec: Codec, findings: Sequence[str], *, batch_size: int = 32,
                      max_len: int = 128) -> np.ndarray:
  """Per report, the mean of the last hidden states over its findings tokens, [N, d].

  Input is [bos] + findings (cut at ``max_len``), right-padded in fixed-size batches (the
  ragged tail padded with empty rows, so one compile); bos and padding are not pooled.
  """
  if not findings:
    raise ValueError("findings is empty")
  graphdef, state = nnx.split(model)
  out = []
  for start in range(0, len(findings), batch_size):
    chunk = findings[start:start + batch_size]
    ids = np.full((batch_size, max_len), codec.pad_id, np.int32)
    attn = np.zeros((batch_size, max_len), np.int32)
    ids[:, 0], attn[:, 0] = codec.bos_id, 1
    for n, f in enumerate(chunk):
      body = codec.encode(f)[:max_len - 1]
      ids[n, 1:1 + len(body)] = body
      attn[n, 1:1 + len(body)] = 1
    pool = attn.copy()
    pool[:, 0] = 0
    feats = _pooled(graphdef, state, jnp.asarray(ids), jnp.asarray(attn), jnp.asarray(pool))
    out.append(np.asarray(feats)[:len(chunk)])
  return np.concatenate(out)


def findings_prototype(model, codec: Codec, findings: Sequence[str], **kw) -> Prototype:
  """The task prototype: the float64 mean of ``findings_features`` (returned as float32)."""
  feats = findings_features(model, codec, findings, **kw)
  return Prototype(feats.astype(np.float64).mean(axis=0).astype(np.float32), len(feats))


# --- Generation and scoring -----------------------------------------------------------


def generate_impressions(model, codec: Codec, findings: Sequence[str], *,
                         template: str = TEMPLATES[0], max_new_tokens: int = 32,
                         batch_size: int = 16, max_prompt_len: int = 128,
                         progress: bool = False, mesh=None) -> list[str]:
  """Greedy impressions for ``findings``: left-padded prompts in fixed-size batches; with a
  ``mesh`` each batch is split over its ``data`` axis."""
  if not findings:
    raise ValueError("findings is empty")
  where = TaskModel(model, mesh=mesh)
  batch_size = -(-batch_size // where.data_shards) * where.data_shards
  sharding = None
  if mesh is not None:
    from rpe_jax.parallel.sharding import batch_sharding
    sharding = batch_sharding(mesh)
  ids, mask = encode_prompts(codec, findings, template, max_len=max_prompt_len)
  n = len(ids)
  pad_rows = -n % batch_size
  if pad_rows:  # complete the last batch with copies of row 0 (one compile)
    ids = np.concatenate([ids, np.repeat(ids[:1], pad_rows, 0)])
    mask = np.concatenate([mask, np.repeat(mask[:1], pad_rows, 0)])
  texts = []
  starts = range(0, len(ids), batch_size)
  if progress:
    from tqdm.auto import tqdm
    starts = tqdm(starts, desc="generate impressions", unit="batch")
  for start in starts:
    new = llama.generate(model, ids[start:start + batch_size], max_new_tokens,
                         attention_mask=mask[start:start + batch_size],
                         eos_token_id=codec.eos_id, pad_token_id=codec.pad_id,
                         batch_sharding=sharding)
    texts += [codec.decode(row).strip() for row in np.asarray(new)]
  return texts[:n]


class RougeL(NamedTuple):
  f1: float                 # mean over examples
  per_example: np.ndarray   # F1 per example


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> RougeL:
  """ROUGE-L F1 (longest common subsequence of tokens), via ``rouge_score``."""
  from rouge_score import rouge_scorer
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
  if not references:
    raise ValueError("no references to score")
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
  f = np.array([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)])
  return RougeL(float(f.mean()), f)


class BertScore(NamedTuple):
  precision: float          # means over examples
  recall: float
  f1: float
  per_example_f1: np.ndarray


def bert_score(predictions: Sequence[str], references: Sequence[str], model_dir: str, *,
               num_layers: int | None = None, idf: bool = False,
               batch_size: int = 32) -> BertScore:
  """BERTScore (Zhang et al., 2020) with a scoring model available locally, via the
  ``bert-score`` package (``pip install -e ".[text]"``).

  ``model_dir``: an HF folder with a BERT-like encoder and its tokenizer (nothing is
  downloaded). ``num_layers``: the hidden layer whose token embeddings are matched (default:
  the model's last). Greedy cosine matching of token embeddings, [CLS]/[SEP] excluded;
  no baseline rescaling (its tables exist only for hub models).
  """
  import json
  import os
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
  if not references:
    raise ValueError("no references to score")
  config_path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(config_path):
    raise ValueError(f"BERTScore model folder {model_dir!r} has no config.json (the scoring "
                     "model must be available locally)")
  if num_layers is None:
    with open(config_path) as f:
      num_layers = int(json.load(f)["num_hidden_layers"])
  if any(not r.strip() for r in references):
    raise ValueError("a reference is empty: BERTScore needs a non-empty reference text")
  import bert_score as bs
  # An empty prediction matches nothing: it scores 0 (bert-score itself cannot encode it).
  keep = [i for i, p in enumerate(predictions) if p.strip()]
  p, r, f = (np.zeros(len(references)) for _ in range(3))
  if keep:
    scores = bs.score([predictions[i] for i in keep], [references[i] for i in keep],
                      model_type=model_dir, num_layers=num_layers, idf=idf,
                      batch_size=batch_size, device="cpu", verbose=False)
    for out, values in zip((p, r, f), scores):
      out[keep] = values.numpy()
  return BertScore(float(p.mean()), float(r.mean()), float(f.mean()), f)


# --- The task contract ----------------------------------------------------------------


def _max_len(codec: Codec, reports: Sequence[Report], cap: int = 256) -> int:
  """Room for the longest training example (template, findings, impression, eos), ≤ cap."""
  longest_template = max(len(codec.encode(t + "\nFindings: ")) for t in TEMPLATES)
  tail = len(codec.encode("\nImpression:"))
  need = max(len(codec.encode(r.findings)) + len(codec.encode(" " + r.impression))
             for r in reports)
  return min(cap, 2 + longest_template + tail + need)


class ReportTask(Task):
  """Report → impression generation with a causal LM behind
  ``rpe_jax.tasks.contract.Task``: data by ``rpe_jax.tasks.report_data`` URIs, the
  findings prototype, greedy impressions, ROUGE-L F1 (and BERTScore given a local model)."""

  name = "report"
  metric = "rouge_l"
  pooling = "mean"
  EPOCHS, LR, BATCH_SIZE = 10, 3e-3, 16

  def load(self, uri, split="test", *, data_root=None, seed=0):
    from rpe_jax.tasks import report_data
    return report_data.load(uri, split, data_root=data_root, seed=seed)

  def labeled(self, ds) -> bool:
    return ds.impressions is not None

  def _codec(self, tm):
    if tm.codec is None:
      raise ValueError("a report model needs its tokenizer (tokenizer.json in the model "
                       "folder)")
    return tm.codec

  predict_batch = 16

  def features(self, tm, ds, *, pooling=None, progress=False) -> np.ndarray:
    if pooling not in (None, "mean"):
      raise ValueError(f"report features pool the findings tokens by their mean, not "
                       f"{pooling!r}")
    return findings_features(tm.model, self._codec(tm), list(ds.findings))

  def subset(self, ds, index):
    return ds.subset(np.asarray(index), ds.name)

  def prototype(self, tm, ds, *, pooling=None, progress=False):
    if pooling not in (None, "mean"):
      raise ValueError(f"report prototypes pool the findings tokens by their mean, not "
                       f"{pooling!r}")
    return findings_prototype(tm.model, self._codec(tm), list(ds.findings))

  def train(self, tm, uri, options, *, data_root=None, progress=False):
    from rpe_jax.tasks import report_data
    if options.checkpoint_dir or options.resume:
      raise ValueError("--checkpoint-dir / --resume: only classification training keeps "
                       "checkpoints")
    codec = self._codec(tm)
    splits = report_data.load_splits(uri, data_root=data_root, seed=options.seed)
    if splits.train.impressions is None:
      raise ValueError(f"--data {uri}: training needs impressions")
    reports = list(splits.train.reports)
    batch_size = min(options.batch_size or self.BATCH_SIZE, len(reports))
    data = encode_examples(codec, reports, _max_len(codec, reports), seed=options.seed)
    epochs = options.epochs or self.EPOCHS
    steps = epochs * (len(reports) // batch_size)
    config = TextTrainConfig(rank=options.rank, kind=options.kind,
                             targets=options.targets or TextTrainConfig().targets,
                             steps=steps, batch_size=batch_size, lr=options.lr or self.LR,
                             ortho_weight=options.ortho_weight, seed=options.seed)
    val = lambda model: self.score(self.predict(TaskModel(model, codec=codec), splits.val),
                                   splits.val)["rouge_l"]
    before = val(tm.model)
    result = train_adapter(tm.model, data, config)
    return Trained(result.adapter, None, result.model, {
        "metric": self.metric, "initial_val": before, "val": val(result.model),
        "test": self.score(self.predict(TaskModel(result.model, codec=codec), splits.test),
                           splits.test)["rouge_l"],
        "steps": steps, "n_train": len(reports), "final_loss": float(result.losses[-1])},
        splits.train)

  def predict(self, tm, ds, *, progress=False, max_new_tokens=32, **options) -> list[str]:
    return generate_impressions(tm.model, self._codec(tm), list(ds.findings),
                                max_new_tokens=max_new_tokens, progress=progress,
                                mesh=tm.mesh)

  def score(self, predictions, ds, *, bertscore_model=None, **options) -> dict | None:
    if ds.impressions is None:
      return None
    scores = {"rouge_l": rouge_l(predictions, list(ds.impressions)).f1}
    if bertscore_model:
      scores["bertscore_f1"] = bert_score(predictions, list(ds.impressions), bertscore_model).f1
    return scores

  def write_predictions(self, predictions, ds, folder) -> list:
    """``predictions.jsonl``: {"index", "findings", "impression"} per report, in order."""
    path = Path(folder) / "predictions.jsonl"
    path.write_text("".join(json.dumps({"index": i, "findings": f, "impression": p}) + "\n"
                            for i, (f, p) in enumerate(zip(ds.findings, predictions))))
    return [path]

"""Llama 2 / 3 / 3.1 in Flax NNX: HF-parity forward pass, adapters, KV-cache decoding.

The module tree mirrors HF's ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj``,
``model.norm``, ``lm_head``) so checkpoint keys and PEFT ``target_modules`` carry over
one to one; every projection (q, k, v, o, gate, up, down, lm_head) is an adapted
``models.lora.Linear`` with kernel [in, out].

Per decoder layer, with RMSNorm(x) = w · x / sqrt(mean(x²) + eps) computed in float32::

  h = x + o_proj(attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n)))   n = RMSNorm(x)
  y = h + down_proj(silu(gate_proj(m)) · up_proj(m))                   m = RMSNorm(h)

RoPE keeps HF's half-split layout: x·cos + rotate_half(x)·sin with
rotate_half([x1, x2]) = [-x2, x1], so q/k kernels load without permutation. Grouped-query
attention: query head h reads key/value head h // (n_heads / n_kv_heads).

``dtype`` (float32 or bfloat16) is the weights' and activations' dtype; RMSNorm, the
attention logits and softmax run in float32, and the logits come back in float32 (the
lm_head runs in ``dtype``, as MaxText's ``cast_logits_to_fp32``). The attention kernel is
``config.attention_impl`` (``models.layers``: fused, cuDNN on GPU, or written out).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import check_attention_impl, fused_attention, resolve_attention_impl
from models.lora import Linear

# --- Config ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.1 frequency scaling (HF ``rope_type="llama3"``)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


# Tensor-parallel / FSDP partition rules, ``(regex on the dotted nnx.state path → logical
# axes)``, first match wins, for ``rpe_jax.parallel.sharding`` (whose presets map the logical axes
# "embed", "heads", "mlp", "vocab" to mesh axes). A rule names a kernel or a lone parameter;
# a Linear's bias and adapter factors follow its kernel. Megatron layout: q/k/v, gate and up
# are column-parallel (out dim on "heads"/"mlp"), o and down row-parallel; the vocabulary is
# split over "vocab" in the embedding and the head.
SHARDING_RULES = (
    (r"embed_tokens\.embedding$", ("vocab", "embed")),
    (r"self_attn\.(q_proj|k_proj|v_proj)\.kernel$", ("embed", "heads")),
    (r"self_attn\.o_proj\.kernel$", ("heads", "embed")),
    (r"mlp\.(gate_proj|up_proj)\.kernel$", ("embed", "mlp")),
    (r"mlp\.down_proj\.kernel$", ("mlp", "embed")),
    (r"lm_head\.kernel$", ("embed", "vocab")),
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  model_type: ClassVar[str] = "llama"
  sharding_rules: ClassVar[tuple] = SHARDING_RULES   # see SHARDING_RULES

  vocab_size: int = 128
  hidden_size: int = 64
  intermediate_size: int = 128
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  num_key_value_heads: int = 4
  head_dim: int = 16
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  bos_token_id: int | None = None
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int | None = None
  # Not an HF attribute: the attention kernel ("auto" | "fused" | "reference", see
  # models.layers); every choice computes the same function.
  attention_impl: str = "auto"

  def __post_init__(self):
    check_attention_impl(self.attention_impl)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                       f"of num_key_value_heads ({self.num_key_value_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

  @classmethod
  def from_hf(cls, hf: dict) -> "LlamaConfig":
    """Build from an HF ``config.json`` dict (transformers v5 or legacy layout).

    Raises ValueError on anything that would change the math and is not implemented:
    another model type or activation, rope types other than default/llama3, partial
    rotary factors, and any attribute this port does not know (named).
    """
    hf = dict(hf)
    if hf.get("model_type", "llama") != "llama":
      raise ValueError(f"Llama config: model_type {hf['model_type']!r} is not 'llama'")
    unknown = sorted(set(hf) - _READ - _HARMLESS)
    if unknown:
      raise ValueError(f"Llama config: unsupported attributes {unknown} (they may change "
                       "the model's math; this port does not implement them)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"Llama config: hidden_act {act!r} is not supported (only 'silu')")
    # v5 keeps theta and scaling in `rope_parameters`; legacy files use rope_theta +
    # rope_scaling (with "type" or "rope_type").
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
      raise ValueError("Llama config: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
      scaling = None
    elif rope_type == "llama3":
      scaling = RopeScaling(
          factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
          high_freq_factor=float(rope["high_freq_factor"]),
          original_max_position_embeddings=int(rope.get(
              "original_max_position_embeddings", hf.get("max_position_embeddings", 2048))))
    else:
      raise ValueError(f"Llama config: rope type {rope_type!r} is not supported "
                       "(only 'default' and 'llama3')")
    n_heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    return cls(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=n_heads,
        num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=scaling, max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos,
        pad_token_id=hf.get("pad_token_id"))

  def to_hf(self, architecture: str = "LlamaForCausalLM") -> dict:
    """The HF ``config.json`` dict (transformers v5 layout; inverse of ``from_hf``)."""
    out = {k: getattr(self, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
        "bos_token_id", "pad_token_id")}
    rope = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling is not None:
      rope = {**rope, "rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
    eos = list(self.eos_token_id)
    out.update(model_type="llama", architectures=[architecture], hidden_act="silu",
               rope_parameters=rope, eos_token_id=eos[0] if len(eos) == 1 else (eos or None))
    return out


# Keys read into LlamaConfig (or checked by from_hf).
_READ = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "partial_rotary_factor", "max_position_embeddings",
    "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act", "bos_token_id",
    "eos_token_id", "pad_token_id"})

# Keys that do not change the eval-mode forward pass (training, bookkeeping, generation
# defaults); accepted and dropped. ``pretraining_tp`` only sliced matmuls in old versions.
_HARMLESS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "initializer_range", "attention_dropout", "pretraining_tp", "use_cache", "_name_or_path",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "output_hidden_states", "output_attentions", "return_dict", "use_return_dict",
    "torchscript", "use_bfloat16", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "id2label", "label2id", "problem_type",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "suppress_tokens", "begin_suppress_tokens",
    "gradient_checkpointing", "chunk_size_feed_forward", "tie_encoder_decoder"})


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """Inverse frequencies θ^(-2i/d), float32, with llama3 scaling exactly as transformers.

  llama3: with wavelength λ = 2π/f, L = original_max_position_embeddings,
  f ← f/factor where λ > L/low; f unchanged where λ < L/high; in between
  f ← (1-s)·f/factor + s·f with s = (L/λ - low)/(high - low).
  """
  d = cfg.head_dim
  inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2).astype(np.float32) / d)))
  inv = inv.astype(np.float32)
  s = cfg.rope_scaling
  if s is None:
    return inv
  L = s.original_max_position_embeddings
  low_wavelen, high_wavelen = L / s.low_freq_factor, L / s.high_freq_factor
  wavelen = np.float32(2 * math.pi) / inv
  scaled = np.where(wavelen > low_wavelen, inv / np.float32(s.factor), inv).astype(np.float32)
  smooth = ((L / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor))
  smooth = smooth.astype(np.float32)
  smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


# --- Modules --------------------------------------------------------------------------


class KVCache(NamedTuple):
  """A fixed-size key/value cache: per layer [batch, max_len, kv_heads, head_dim].

  ``mask`` [batch, max_len] marks slots holding a real (non-padding) token; ``index`` is
  the next free slot, shared by the batch (prompts are left-padded to one length).
  """

  k: tuple
  v: tuple
  mask: jax.Array
  index: jax.Array


class LlamaOutput(NamedTuple):
  logits: jax.Array
  last_hidden_state: jax.Array
  cache: KVCache | None = None


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  """An empty cache for ``max_len`` tokens (prompt + generated)."""
  shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
  return KVCache(zeros, zeros, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


class RMSNorm(nnx.Module):
  """w · x / sqrt(mean(x²) + eps), normalised in float32 and cast back as HF does."""

  def __init__(self, dim: int, eps: float, dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * x32.astype(x.dtype)


def _rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def rope_cos_sin(cfg: LlamaConfig, positions, dtype):
  """cos, sin [batch, seq, head_dim] for integer ``positions`` [batch, seq]."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(cfg))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attention_impl = cfg.attention_impl
    h, d, b = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
    self.q_proj = Linear(h, cfg.num_attention_heads * d, use_bias=b, dtype=dtype, rngs=rngs)
    self.k_proj = Linear(h, cfg.num_key_value_heads * d, use_bias=b, dtype=dtype, rngs=rngs)
    self.v_proj = Linear(h, cfg.num_key_value_heads * d, use_bias=b, dtype=dtype, rngs=rngs)
    self.o_proj = Linear(cfg.num_attention_heads * d, h, use_bias=b, dtype=dtype, rngs=rngs)

  def __call__(self, x, cos, sin, allowed, kv=None, index=None, causal_only=False):
    """``allowed`` [batch, seq, keys] is the boolean attention pattern; with ``kv`` the
    new keys/values are written at slot ``index`` and attention runs over the cache.
    ``causal_only``: ``allowed`` is the plain causal mask (no padding, no cache), which the
    fused kernel applies itself (cuDNN then skips the masked blocks)."""
    cfg = self.cfg
    B, T, _ = x.shape
    nkv, d = cfg.num_key_value_heads, cfg.head_dim
    groups = cfg.num_attention_heads // nkv
    c, s = cos[:, :, None], sin[:, :, None]
    q = self.q_proj(x).reshape(B, T, cfg.num_attention_heads, d)
    k = self.k_proj(x).reshape(B, T, nkv, d)
    v = self.v_proj(x).reshape(B, T, nkv, d)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    if kv is not None:
      start = (0, index, 0, 0)
      k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
      kv = (k, v)
    if resolve_attention_impl(self.attention_impl) == "fused":
      mask = None if causal_only else allowed[:, None]
      out = fused_attention(q, k, v, mask=mask, scale=d ** -0.5, is_causal=causal_only)
      return self.o_proj(out.reshape(B, T, -1)), kv
    q = q.reshape(B, T, nkv, groups, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(x.dtype))
    return self.o_proj(out.reshape(B, T, -1)), kv


class MLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
    h, m, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
    self.gate_proj = Linear(h, m, use_bias=b, dtype=dtype, rngs=rngs)
    self.up_proj = Linear(h, m, use_bias=b, dtype=dtype, rngs=rngs)
    self.down_proj = Linear(m, h, use_bias=b, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
    self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
    self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

  def __call__(self, x, cos, sin, allowed, kv=None, index=None, causal_only=False):
    h, kv = self.self_attn(self.input_layernorm(x), cos, sin, allowed, kv, index, causal_only)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), kv


class LlamaModel(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, dtype, rngs: nnx.Rngs):
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                  param_dtype=dtype, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class LlamaForCausalLM(nnx.Module):
  """HF ``LlamaForCausalLM``: ``model(input_ids, attention_mask)`` → ``LlamaOutput``."""

  hf_architecture = "LlamaForCausalLM"

  def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = cfg
    self.model = LlamaModel(cfg, dtype=dtype, rngs=rngs)
    # Tied embeddings read the embedding matrix; a separate Linear would be a shared
    # parameter, which tree-mode NNX does not allow.
    self.lm_head = nnx.data(None if cfg.tie_word_embeddings else Linear(
        cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, rngs=rngs))

  def __call__(self, input_ids, attention_mask=None, *, positions=None,
               cache: KVCache | None = None) -> LlamaOutput:
    """Logits [B, T, vocab] and the final-norm hidden states [B, T, hidden].

    ``attention_mask`` [B, T] (1 = token, 0 = padding) hides padded keys on top of the
    causal mask. ``positions`` defaults to 0..T-1 (after ``cache.index`` with a cache),
    as HF's forward does. With ``cache`` the tokens are appended at ``cache.index`` and
    the updated cache is returned in ``output.cache``.
    """
    cfg = self.config
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    B, T = input_ids.shape
    mask = (jnp.ones((B, T), bool) if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool))
    if mask.shape != (B, T):
      raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids {(B, T)}")
    start = jnp.zeros((), jnp.int32) if cache is None else cache.index
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(T), (B, T))
    if cache is None:
      key_mask, n_keys = mask, T
    else:
      key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, start))
      n_keys = key_mask.shape[1]
    causal = jnp.arange(n_keys)[None, :] <= (start + jnp.arange(T))[:, None]
    allowed = causal[None] & key_mask[:, None, :]
    causal_only = cache is None and attention_mask is None

    x = self.model.embed_tokens(input_ids)
    cos, sin = rope_cos_sin(cfg, positions, x.dtype)
    new_k, new_v = [], []
    for i, layer in enumerate(self.model.layers):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      x, kv = layer(x, cos, sin, allowed, kv, start, causal_only)
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    h = self.model.norm(x)
    if self.lm_head is None:
      logits = h @ self.model.embed_tokens.embedding[...].T
    else:
      logits = self.lm_head(h)
    logits = logits.astype(jnp.float32)
    new_cache = None if cache is None else KVCache(tuple(new_k), tuple(new_v), key_mask,
                                                   start + T)
    return LlamaOutput(logits, h, new_cache)

  def features(self, input_ids, attention_mask=None, pooling: str = "mean") -> jax.Array:
    """Pooled last hidden states [B, hidden] for task prototypes: the mean over the
    unmasked tokens (``"mean"``) or the state of the last unmasked token (``"last"``)."""
    if pooling not in ("mean", "last"):
      raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
    h = self(input_ids, attention_mask).last_hidden_state.astype(jnp.float32)
    mask = (jnp.ones(h.shape[:2], jnp.float32) if attention_mask is None
            else jnp.asarray(attention_mask).astype(jnp.float32))
    if pooling == "mean":
      return jnp.sum(h * mask[..., None], 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)[:, None]
    last = h.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    return jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]


# --- Decoding -------------------------------------------------------------------------


def top_p_mask(logits, top_p: float):
  """Boolean mask of the tokens nucleus sampling keeps (HF ``TopPLogitsWarper``).

  Sorting ascending, a token is dropped when the cumulative probability up to and
  including it is <= 1 - top_p; the most likely token is always kept.
  """
  order = jnp.argsort(logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  drop_sorted = (cum <= 1 - top_p).at[..., -1].set(False)
  inverse = jnp.argsort(order, axis=-1)
  return ~jnp.take_along_axis(drop_sorted, inverse, axis=-1)


def sample_logits(logits, rng, temperature: float = 0.0, top_p: float = 1.0):
  """Next tokens [B] from logits [B, vocab]: argmax at temperature 0, else a draw from
  softmax(logits / temperature) restricted to the top-p nucleus."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1.0:
    logits = jnp.where(top_p_mask(logits, top_p), logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p",
                                   "eos", "pad", "cache_dtype"))
def _generate(graphdef, state, input_ids, attention_mask, rng, *, max_new_tokens,
              temperature, top_p, eos, pad, cache_dtype):
  model = nnx.merge(graphdef, state)
  B, T = input_ids.shape
  eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)
  # Left padding: positions count real tokens only (as HF generate does).
  mask = attention_mask.astype(bool)
  positions = jnp.where(mask, jnp.cumsum(mask, axis=-1) - 1, 1)
  cache = init_cache(model.config, B, T + max_new_tokens, cache_dtype)
  out = model(input_ids, mask, positions=positions, cache=cache)
  rng, key = jax.random.split(rng)
  tok = sample_logits(out.logits[:, -1], key, temperature, top_p)
  tokens = jnp.full((B, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)
  done = jnp.isin(tok, eos_ids)

  def cond(carry):
    step, _, _, done, _, _, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, tokens, tok, done, cache, pos, rng = carry
    out = model(tok[:, None], positions=pos[:, None], cache=cache)
    rng, key = jax.random.split(rng)
    new = sample_logits(out.logits[:, 0], key, temperature, top_p)
    new = jnp.where(done, pad, new)
    tokens = jax.lax.dynamic_update_slice(tokens, new[:, None], (0, step))
    return step + 1, tokens, new, done | jnp.isin(new, eos_ids), out.cache, pos + 1, rng

  next_pos = positions[:, -1] + 1
  carry = (jnp.ones((), jnp.int32), tokens, tok, done, out.cache, next_pos, rng)
  return jax.lax.while_loop(cond, body, carry)[1]


def generate(model: LlamaForCausalLM, input_ids, max_new_tokens: int, *, attention_mask=None,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id=None,
             pad_token_id: int | None = None, rng=None, cache_dtype=None,
             batch_sharding=None) -> jax.Array:
  """Decode ``max_new_tokens`` tokens after left-padded prompts, under one jit.

  Prefill fills a fixed-size KV cache (prompt + max_new_tokens slots), then a
  ``lax.while_loop`` appends one token per step until every row has produced an EOS or
  the budget is spent. temperature 0 is greedy (HF ``do_sample=False``); otherwise
  sampling at ``temperature`` within the top-p nucleus, keyed by ``rng``.
  Returns the new tokens [B, max_new_tokens]; after a row's EOS the rest is
  ``pad_token_id`` (HF's convention). ``eos_token_id`` defaults to the config's.
  ``batch_sharding``: where the prompts go (e.g. their batch axis over a mesh's ``data``
  axis, for data-parallel decoding; the model's state keeps its own placement).
  """
  cfg = model.config
  input_ids = np.asarray(input_ids)
  if input_ids.ndim != 2 or input_ids.shape[1] == 0:
    raise ValueError(f"input_ids must be a non-empty [batch, seq] array, got {input_ids.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng key")
  mask = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(
      attention_mask).astype(bool)
  if mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
  if np.any(mask[:, :-1] & ~mask[:, 1:]) or not mask[:, -1].all():
    raise ValueError("attention_mask must be left-padded (padding only before the tokens)")
  eos = cfg.eos_token_id if eos_token_id is None else (
      tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (eos_token_id,))
  pad = pad_token_id if pad_token_id is not None else (
      cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0))
  graphdef, state = nnx.split(model)
  dtype = cache_dtype or model.model.embed_tokens.embedding[...].dtype
  rng = jax.random.key(0) if rng is None else rng
  ids, mask = jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask)
  if batch_sharding is not None:
    ids, mask = jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding)
  return _generate(graphdef, state, ids, mask, rng,
                   max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                   top_p=float(top_p), eos=tuple(int(e) for e in eos), pad=int(pad),
                   cache_dtype=jnp.dtype(dtype))


# --- HF checkpoint key map (used by models.hf) ---------------------------------------
#
# Our parameter paths are HF's module paths, so PEFT adapters (base_model.model.<module>)
# land on the same names. "linear" transposes torch [out, in] to our [in, out].

_LAYER_MAP = (
    *((f"model.layers.{{i}}.{block}.{name}.kernel", (f"model.layers.{{i}}.{block}.{name}.weight",),
       "linear")
      for block, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                           ("mlp", ("gate_proj", "up_proj", "down_proj")))
      for name in names),
    *((f"model.layers.{{i}}.{norm}.weight", (f"model.layers.{{i}}.{norm}.weight",), "none")
      for norm in ("input_layernorm", "post_attention_layernorm")),
)


def _bias_rules(block, names):
  return tuple((f"model.layers.{{i}}.{block}.{n}.bias", (f"model.layers.{{i}}.{block}.{n}.bias",),
                "none") for n in names)


def hf_key_map(model: "LlamaForCausalLM") -> dict:
  """The declarative key map of ``model`` for ``models.hf`` (rules, ignored, prefixes).

  Ignored: the rotary ``inv_freq`` buffers some old checkpoints carry (recomputed from the
  config), and ``lm_head.weight`` when embeddings are tied (it is the embedding).
  """
  cfg = model.config
  rules = (("model.embed_tokens.embedding", ("model.embed_tokens.weight",), "none"),
           ("model.norm.weight", ("model.norm.weight",), "none")) + _LAYER_MAP
  if cfg.attention_bias:
    rules += _bias_rules("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))
  if cfg.mlp_bias:
    rules += _bias_rules("mlp", ("gate_proj", "up_proj", "down_proj"))
  ignored = ("model.layers.{i}.self_attn.rotary_emb.inv_freq",)
  if cfg.tie_word_embeddings:
    ignored += ("lm_head.weight",)
  else:
    rules += (("lm_head.kernel", ("lm_head.weight",), "linear"),)
  return dict(rules=rules, ignored=ignored, strip_prefixes=())

"""Vision Transformer (ViT) in Flax NNX: HF ``ViTModel`` and ``ViTForImageClassification``.

The math is HF's, layer for layer (pre-norm encoder):

  x0   = [cls; patches(pixels) @ P + p_b] + pos                 (patch conv as a matmul)
  h    = x + Attn(LN_before(x)),   Attn = softmax(q kᵀ / √d_head) v, then the output dense
  x'   = h + fc2(act(fc1(LN_after(h))))                          (act: exact erf GELU for "gelu")
  last_hidden_state = LN(x_L);  pooler_output = tanh(dense(last_hidden_state[:, 0]))
  logits = classifier(last_hidden_state[:, 0])

``dtype`` (float32 or bfloat16) is the weights' and activations' dtype; the layer norms and the
attention softmax run in float32 and the logits come back in float32 whatever it is. The
attention kernel is ``config.attention_impl`` (``models.layers``: fused or written out).

Module paths (stable; adapters and checkpoints are keyed by them)::

  ViTModel                                   ViTForImageClassification
    embeddings.cls_token       [1, 1, D]       vit.<everything of ViTModel, no pooler>
    embeddings.position_embeddings [1, N+1, D] classifier            (Linear D → num_labels)
    embeddings.patch_embeddings.{kernel [p, p, C, D], bias}
    layers.{i}.layernorm_before / layernorm_after      (nnx.LayerNorm: scale, bias)
    layers.{i}.attention.query | key | value | output   (adaptable Linear)
    layers.{i}.mlp.fc1 | fc2                              (adaptable Linear)
    layernorm
    pooler.dense                                          (adaptable Linear)

so adapter paths read ``layers.3.attention.query`` (``vit.layers.3.attention.query`` in the
classifier) and the default Med-LEGO/MeLo targets ``("query", "value")`` of
``models.lora.init_adapters`` select q and v.

``HF_KEY_MAP`` below is the declarative map to HF checkpoint keys used by ``models.hf``:
it accepts the legacy names that checkpoint files keep (``encoder.layer.N.attention.
attention.query.weight``) and the transformers-v5 in-memory names (``layers.N.attention.
q_proj.weight``). Dropout is not applied: the model is the eval-mode network.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import (LayerNorm, check_attention_impl, fused_attention, gelu_exact,
                           resolve_attention_impl)
from models.lora import Linear, LoRAParam

# --- Config ---------------------------------------------------------------------------------

# HF activation name → function. "gelu" is the exact erf GELU (jax's default is tanh).
_ACTIVATIONS = {
    "gelu": gelu_exact,
    "gelu_python": gelu_exact,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

# Keys read into ViTConfig (they change the math), with the HF defaults.
_READ = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
    "image_size": 224, "patch_size": 16, "num_channels": 3, "qkv_bias": True,
    "head_dim": None, "pooler_output_size": None, "pooler_act": "tanh",
}

# Keys that do not change the eval-mode forward pass (training/bookkeeping/generation or
# other heads); accepted and dropped.
_HARMLESS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "id2label", "label2id", "num_labels", "problem_type", "initializer_range",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "encoder_stride", "_name_or_path",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "output_hidden_states", "output_attentions", "return_dict", "use_return_dict",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_word_embeddings",
    "cross_attention_hidden_size", "finetuning_task", "tokenizer_class", "prefix",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "quantization_config_dict", "gradient_checkpointing", "use_cache",
    "pruned_heads",  # checked below: only an empty dict is accepted
})


def _pair(v, name: str) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(t, int) for t in v):
    return (int(v[0]), int(v[1]))
  raise ValueError(f"ViT config: {name} must be an int or a pair of ints, got {v!r}")


# Tensor-parallel / FSDP partition rules, ``(regex on the dotted nnx.state path → logical
# axes)``, first match wins, for ``rpe_jax.parallel.sharding`` (whose presets map the logical axes
# "embed", "heads", "mlp", "vocab" to mesh axes). A rule names a kernel or a lone parameter;
# a Linear's bias and adapter factors follow its kernel. Megatron layout: q/k/v and fc1 are
# column-parallel (out dim on "heads"/"mlp"), the attention output and fc2 row-parallel.
SHARDING_RULES = (
    (r"attention\.(query|key|value)\.kernel$", ("embed", "heads")),
    (r"attention\.output\.kernel$", ("heads", "embed")),
    (r"mlp\.fc1\.kernel$", ("embed", "mlp")),
    (r"mlp\.fc2\.kernel$", ("mlp", "embed")),
    (r"patch_embeddings\.kernel$", (None, None, None, "embed")),
    (r"embeddings\.(position_embeddings|cls_token)$", (None, None, "embed")),
    (r"pooler\.dense\.kernel$", ("embed", None)),
    (r"classifier\.kernel$", ("embed", None)),
)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """ViT hyper-parameters (the subset of HF ``ViTConfig`` that changes the math)."""

  model_type: ClassVar[str] = "vit"
  sharding_rules: ClassVar[tuple] = SHARDING_RULES   # see SHARDING_RULES

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: tuple[int, int] = (224, 224)
  patch_size: tuple[int, int] = (16, 16)
  num_channels: int = 3
  qkv_bias: bool = True
  head_dim: int | None = None            # None: hidden_size // num_attention_heads
  pooler_output_size: int | None = None  # None: hidden_size
  pooler_act: str = "tanh"
  add_pooling_layer: bool = True         # ViTModel only (HF constructor argument)
  labels: tuple[str, ...] | None = None  # classifier label names; len = num_labels
  # Not an HF attribute: the attention kernel ("auto" | "fused" | "reference", see
  # models.layers); every choice computes the same function.
  attention_impl: str = "auto"

  def __post_init__(self):
    object.__setattr__(self, "image_size", _pair(self.image_size, "image_size"))
    object.__setattr__(self, "patch_size", _pair(self.patch_size, "patch_size"))
    check_attention_impl(self.attention_impl)
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "num_channels"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"ViT config: {name} must be a positive int, got {v!r}")
    if self.head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ValueError(f"ViT config: hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
    for name in ("hidden_act", "pooler_act"):
      if getattr(self, name) not in _ACTIVATIONS:
        raise ValueError(f"ViT config: unsupported {name} {getattr(self, name)!r}; "
                         f"supported: {sorted(_ACTIVATIONS)}")
    for (i, p), name in zip(zip(self.image_size, self.patch_size), ("height", "width")):
      if p < 1 or i % p:
        raise ValueError(f"ViT config: image {name} {i} is not a multiple of patch size {p}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"ViT config: layer_norm_eps must be > 0, got {self.layer_norm_eps}")
    if self.labels is not None:
      object.__setattr__(self, "labels", tuple(str(t) for t in self.labels))
      if not self.labels:
        raise ValueError("ViT config: a classifier needs at least one label (num_labels >= 1)")

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return ((self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1]))

  @property
  def num_labels(self) -> int:
    return len(self.labels) if self.labels is not None else 2

  @classmethod
  def from_hf(cls, config: dict[str, Any]) -> "ViTConfig":
    """From an HF ``config.json`` dict; raises on attributes that change the math and that
    this port does not implement (any key it does not know is refused, by name)."""
    model_type = config.get("model_type", "vit")
    if model_type != "vit":
      raise ValueError(f"ViT config: model_type {model_type!r} is not 'vit'")
    unknown = sorted(set(config) - set(_READ) - _HARMLESS)
    if unknown:
      raise ValueError(f"ViT config: unsupported attributes {unknown} (they may change the "
                       "model's math; this port does not implement them)")
    if config.get("pruned_heads"):
      raise ValueError(f"ViT config: pruned_heads {config['pruned_heads']!r} is not supported")
    kw = {k: config.get(k, d) for k, d in _READ.items()}
    if "id2label" in config:
      id2label = {int(k): v for k, v in config["id2label"].items()}
      if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"ViT config: id2label keys must be 0..n-1, got {sorted(id2label)}")
      labels = tuple(id2label[i] for i in range(len(id2label)))
      if "num_labels" in config and config["num_labels"] != len(labels):
        raise ValueError(f"ViT config: num_labels {config['num_labels']} disagrees with "
                         f"id2label ({len(labels)} labels)")
    else:
      labels = tuple(f"LABEL_{i}" for i in range(config.get("num_labels", 2)))
    return cls(**kw, labels=labels)

  def to_hf(self, architecture: str) -> dict[str, Any]:
    """The HF ``config.json`` dict for ``architecture`` (inverse of ``from_hf``)."""
    out = {k: getattr(self, k) for k in _READ if k not in ("head_dim",)}
    out["image_size"] = self.image_size[0] if self.image_size[0] == self.image_size[1] \
        else list(self.image_size)
    out["patch_size"] = self.patch_size[0] if self.patch_size[0] == self.patch_size[1] \
        else list(self.patch_size)
    if self.head_dim is not None:
      out["head_dim"] = self.head_dim
    out["pooler_output_size"] = self.pooler_output_size or self.hidden_size
    labels = self.labels or tuple(f"LABEL_{i}" for i in range(self.num_labels))
    out.update(model_type="vit", architectures=[architecture],
               id2label={str(i): t for i, t in enumerate(labels)},
               label2id={t: i for i, t in enumerate(labels)},
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return out


# --- Modules --------------------------------------------------------------------------------

class ViTOutput(NamedTuple):
  """HF-named outputs; a field a model does not produce is None."""

  last_hidden_state: jax.Array
  pooler_output: jax.Array | None = None
  logits: jax.Array | None = None


def _layer_norm(config: ViTConfig, dtype, rngs) -> LayerNorm:
  # float32 statistics and affine map, two-pass variance (as torch), cast back to x's dtype.
  return LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, param_dtype=dtype,
                   rngs=rngs)


class PatchEmbeddings(nnx.Module):
  """Non-overlapping p×p patches → D: a stride-p conv written as one matmul.

  kernel [ph, pw, C, D] (HF Conv2d [D, C, ph, pw] transposed), bias [D]; patches are
  ordered row-major over the (H/ph, W/pw) grid, as HF's ``flatten(2)``.
  """

  def __init__(self, config: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    ph, pw = config.patch_size
    c, d = config.num_channels, config.hidden_size
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (ph * pw * c, d), dtype).reshape(ph, pw, c, d))
    self.bias = nnx.Param(jnp.zeros((d,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    ph, pw, _, d = self.kernel.shape
    x = x.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // ph) * (w // pw), ph * pw * c)
    return x @ self.kernel[...].reshape(ph * pw * c, d) + self.bias[...]


class Embeddings(nnx.Module):
  def __init__(self, config: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    d = config.hidden_size
    init = nnx.initializers.truncated_normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), dtype))
    self.position_embeddings = nnx.Param(init(rngs.params(), (1, config.num_patches + 1, d), dtype))
    self.patch_embeddings = PatchEmbeddings(config, dtype=dtype, rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    x = self.patch_embeddings(pixel_values)
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
    return jnp.concatenate([cls, x], axis=1) + self.position_embeddings[...]


class Attention(nnx.Module):
  def __init__(self, config: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    d, inner = config.hidden_size, config.num_attention_heads * config.head_size
    self.num_heads = config.num_attention_heads
    self.head_size = config.head_size
    self.attention_impl = config.attention_impl
    self.query = Linear(d, inner, use_bias=config.qkv_bias, dtype=dtype, rngs=rngs)
    self.key = Linear(d, inner, use_bias=config.qkv_bias, dtype=dtype, rngs=rngs)
    self.value = Linear(d, inner, use_bias=config.qkv_bias, dtype=dtype, rngs=rngs)
    self.output = Linear(inner, d, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, _ = x.shape
    if resolve_attention_impl(self.attention_impl) == "fused":
      split = lambda t: t.reshape(b, n, self.num_heads, self.head_size)
      out = fused_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                            scale=self.head_size ** -0.5)
      return self.output(out.reshape(b, n, -1))
    # Heads first, then plain batched matmuls: on XLA:CPU this runs ~1.5-2x faster than
    # the equivalent einsums over a [b, n, h, d] layout (measured at ViT-B/16, batch 32).
    heads = lambda t: t.reshape(b, n, self.num_heads, self.head_size).transpose(0, 2, 1, 3)
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    scores = (q @ k.transpose(0, 1, 3, 2)) * (self.head_size ** -0.5)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, -1)
    return self.output(out)


class MLP(nnx.Module):
  def __init__(self, config: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.act = _ACTIVATIONS[config.hidden_act]
    self.fc1 = Linear(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
    self.fc2 = Linear(config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class Layer(nnx.Module):
  def __init__(self, config: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.layernorm_before = _layer_norm(config, dtype, rngs)
    self.attention = Attention(config, dtype=dtype, rngs=rngs)
    self.layernorm_after = _layer_norm(config, dtype, rngs)
    self.mlp = MLP(config, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attention(self.layernorm_before(x))
    return x + self.mlp(self.layernorm_after(x))


class Pooler(nnx.Module):
  def __init__(self, config: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.act = _ACTIVATIONS[config.pooler_act]
    self.dense = Linear(config.hidden_size, config.pooler_output_size or config.hidden_size,
                        dtype=dtype, rngs=rngs)

  def __call__(self, hidden: jax.Array) -> jax.Array:
    return self.act(self.dense(hidden[:, 0]))


def _check_pixels(config: ViTConfig, pixel_values: jax.Array) -> None:
  want = (*config.image_size, config.num_channels)
  if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
    raise ValueError(f"pixel_values must be NHWC [batch, {want[0]}, {want[1]}, {want[2]}], "
                     f"got shape {tuple(pixel_values.shape)}")


def _pool(hidden: jax.Array, pooling: str) -> jax.Array:
  if pooling == "cls":
    return hidden[:, 0]
  if pooling == "mean":
    return hidden[:, 1:].mean(axis=1)
  raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")


class ViTModel(nnx.Module):
  """HF ``ViTModel``: embeddings, pre-norm encoder, final layer norm, optional pooler."""

  hf_architecture = "ViTModel"

  def __init__(self, config: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
               add_pooling_layer: bool | None = None):
    if add_pooling_layer is not None and add_pooling_layer != config.add_pooling_layer:
      config = dataclasses.replace(config, add_pooling_layer=add_pooling_layer)
    self.config = config
    self.embeddings = Embeddings(config, dtype=dtype, rngs=rngs)
    self.layers = nnx.List([Layer(config, dtype=dtype, rngs=rngs)
                            for _ in range(config.num_hidden_layers)])
    self.layernorm = _layer_norm(config, dtype, rngs)
    self.pooler = nnx.data(Pooler(config, dtype=dtype, rngs=rngs)
                           if config.add_pooling_layer else None)

  def encode(self, pixel_values: jax.Array) -> jax.Array:
    """pixel_values NHWC → last_hidden_state [batch, 1 + num_patches, hidden]."""
    _check_pixels(self.config, pixel_values)
    x = self.embeddings(pixel_values.astype(self.embeddings.cls_token[...].dtype))
    for layer in self.layers:
      x = layer(x)
    return self.layernorm(x)

  def __call__(self, pixel_values: jax.Array) -> ViTOutput:
    hidden = self.encode(pixel_values)
    pooled = self.pooler(hidden) if self.pooler is not None else None
    return ViTOutput(last_hidden_state=hidden, pooler_output=pooled)

  def features(self, pixel_values: jax.Array, pooling: str = "cls") -> jax.Array:
    """Pooled encoder features for task prototypes, [batch, hidden]: the CLS token after the
    final layer norm (``"cls"``) or the mean of the patch tokens after it (``"mean"``)."""
    return _pool(self.encode(pixel_values), pooling)


class ViTForImageClassification(nnx.Module):
  """HF ``ViTForImageClassification``: ``vit`` (no pooler) + a linear head on the CLS token."""

  hf_architecture = "ViTForImageClassification"

  def __init__(self, config: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.vit = ViTModel(config, dtype=dtype, rngs=rngs, add_pooling_layer=False)
    self.classifier = Linear(config.hidden_size, config.num_labels, dtype=dtype, rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> ViTOutput:
    hidden = self.vit.encode(pixel_values)
    # Logits in float32 whatever the compute dtype (the head itself runs in the model's).
    logits = self.classifier(hidden[:, 0]).astype(jnp.float32)
    return ViTOutput(last_hidden_state=hidden, logits=logits)

  def features(self, pixel_values: jax.Array, pooling: str = "cls") -> jax.Array:
    """See ``ViTModel.features`` (the encoder's features, not the logits)."""
    return self.vit.features(pixel_values, pooling)


def with_new_head(model: ViTModel | ViTForImageClassification, labels, *,
                  rngs: nnx.Rngs) -> ViTForImageClassification:
  """A classifier over ``labels`` (fresh head) on a copy of ``model``'s encoder weights.

  For fine-tuning a pretrained ``ViTModel`` (or a classifier with another label set). The
  pooler, if any, is dropped (HF's classifier has none); adapters are not carried over.
  """
  src = model.vit if isinstance(model, ViTForImageClassification) else model
  if not isinstance(src, ViTModel):
    raise TypeError(f"expected a ViTModel or ViTForImageClassification, got {type(model).__name__}")
  config = dataclasses.replace(src.config, labels=tuple(labels), add_pooling_layer=False)
  out = ViTForImageClassification(config, dtype=src.embeddings.cls_token[...].dtype, rngs=rngs)
  keep = nnx.All(nnx.Param, nnx.Not(LoRAParam), nnx.Not(nnx.PathContains("pooler")))
  nnx.update(out.vit, jax.tree.map(jnp.copy, nnx.state(src, keep)))
  return out


# --- HF checkpoint key map ------------------------------------------------------------------
#
# (our parameter path, HF keys, transform). ``{i}`` is a layer index. Every HF key listed is
# accepted on load; keys[0] is the name checkpoint files use (what HF save_pretrained and
# ``models.hf.save`` write); keys[-1] is the transformers-v5 in-memory name (``q_proj``...),
# the module path PEFT adapters use under transformers 5. Transforms (applied by models.hf):
# "linear" = torch [out, in] → [in, out]; "conv" = [out, in, kh, kw] → [kh, kw, in, out].

_ENCODER_MAP = (
    ("embeddings.cls_token", ("embeddings.cls_token",), "none"),
    ("embeddings.position_embeddings", ("embeddings.position_embeddings",), "none"),
    ("embeddings.patch_embeddings.kernel",
     ("embeddings.patch_embeddings.projection.weight",), "conv"),
    ("embeddings.patch_embeddings.bias", ("embeddings.patch_embeddings.projection.bias",), "none"),
    *(
        (f"layers.{{i}}.{ours}.{p}",
         (f"encoder.layer.{{i}}.{legacy}.{t}", f"layers.{{i}}.{v5}.{t}"),
         "linear" if p == "kernel" else "none")
        for ours, legacy, v5 in (
            ("attention.query", "attention.attention.query", "attention.q_proj"),
            ("attention.key", "attention.attention.key", "attention.k_proj"),
            ("attention.value", "attention.attention.value", "attention.v_proj"),
            ("attention.output", "attention.output.dense", "attention.o_proj"),
            ("mlp.fc1", "intermediate.dense", "mlp.fc1"),
            ("mlp.fc2", "output.dense", "mlp.fc2"))
        for p, t in (("kernel", "weight"), ("bias", "bias"))
    ),
    *(
        (f"layers.{{i}}.{ln}.{p}",
         (f"encoder.layer.{{i}}.{ln}.{t}", f"layers.{{i}}.{ln}.{t}"), "none")
        for ln in ("layernorm_before", "layernorm_after")
        for p, t in (("scale", "weight"), ("bias", "bias"))
    ),
    ("layernorm.scale", ("layernorm.weight",), "none"),
    ("layernorm.bias", ("layernorm.bias",), "none"),
)

_POOLER_MAP = (
    ("pooler.dense.kernel", ("pooler.dense.weight",), "linear"),
    ("pooler.dense.bias", ("pooler.dense.bias",), "none"),
)

# HF keys that may sit in a ViT checkpoint and that this port deliberately does not use.
_ENCODER_IGNORED = ("embeddings.mask_token",)  # masked-image-modeling token (ViTModel(use_mask_token))


def _prefixed(rules, prefix):
  return tuple((prefix + ours, tuple(prefix + k for k in keys), tf) for ours, keys, tf in rules)


def hf_key_map(model: ViTModel | ViTForImageClassification) -> dict:
  """The declarative key map of ``model`` for ``models.hf``.

  ``rules``: (our path, HF keys, transform); ``ignored``: HF keys deliberately unused;
  ``strip_prefixes``: prefixes an HF key may carry and that load drops (a ViTModel accepts
  the ``vit.``-prefixed keys of a checkpoint saved from a task model's base, as HF does).
  """
  if isinstance(model, ViTForImageClassification):
    rules = _prefixed(_ENCODER_MAP, "vit.") + (
        ("classifier.kernel", ("classifier.weight",), "linear"),
        ("classifier.bias", ("classifier.bias",), "none"))
    return dict(rules=rules, ignored=tuple("vit." + k for k in _ENCODER_IGNORED),
                strip_prefixes=())
  rules = _ENCODER_MAP + (_POOLER_MAP if model.pooler is not None else ())
  return dict(rules=rules, ignored=_ENCODER_IGNORED, strip_prefixes=("vit.",))


def hf_config_fixup(config: ViTConfig, architecture: str, keys) -> ViTConfig:
  """HF does not record ``add_pooling_layer`` in config.json: read it off the checkpoint."""
  if architecture == "ViTModel":
    has_pooler = any(k.endswith("pooler.dense.weight") for k in keys)
    return dataclasses.replace(config, add_pooling_layer=has_pooler)
  return config

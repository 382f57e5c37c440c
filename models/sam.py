"""Segment Anything (SAM) in Flax NNX: config, model, HF weight map and loader.

The model is HF ``SamModel`` ported module for module (encoder in ``models.sam_encoder``,
prompt encoder and mask decoder in ``models.sam_decoder``) with NHWC images:

  image_embeddings = neck(ViT(pixels))                   [B, h, w, C]
  sparse, dense    = prompt_encoder(points, boxes, masks)
  masks, iou       = mask_decoder(image_embeddings + dense, positions, sparse)
                                                         [B, P, M, 4h, 4w], [B, P, M]

Every linear layer is a ``models.lora.Linear``, so adapters go on the encoder's fused
``attn.qkv`` (MA-SAM style, ``ENCODER_TARGETS``) and optionally on the decoder's attention
projections (``DECODER_TARGETS``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.sam_decoder import (MaskDecoder, PromptEncoder, SamMaskDecoderConfig,
                                SamPromptEncoderConfig, dense_positions)
from models.layers import check_attention_impl
from models.sam_encoder import SamVisionConfig, VisionEncoder

ENCODER_TARGETS = ("attn.qkv",)
DECODER_TARGETS = ("q_proj", "v_proj")

# PretrainedConfig bookkeeping that never changes the forward pass.
_BOOKKEEPING = frozenset("""
  _name_or_path _commit_hash _attn_implementation_autoset architectures transformers_version
  model_type dtype torch_dtype use_bfloat16 return_dict output_hidden_states output_attentions
  torchscript tf_legacy_loss pruned_heads tie_word_embeddings chunk_size_feed_forward
  is_encoder_decoder is_decoder cross_attention_hidden_size add_cross_attention
  tie_encoder_decoder max_length min_length do_sample early_stopping num_beams num_beam_groups
  diversity_penalty temperature top_k top_p typical_p repetition_penalty length_penalty
  no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences
  output_scores return_dict_in_generate forced_bos_token_id forced_eos_token_id
  remove_invalid_values exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
  finetuning_task id2label label2id tokenizer_class prefix bos_token_id pad_token_id
  eos_token_id sep_token_id decoder_start_token_id task_specific_params problem_type
  initializer_range initializer_factor
""".split())


def _square(value, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"{name} {value} is not square; only square images are supported")
    value = value[0]
  return int(value)


def _take(hf: dict, section: str, fields: dict[str, Any], derived=()) -> dict:
  """Pick ``fields`` (name → default) from one HF sub-config, refusing what we cannot run."""
  unknown = sorted(set(hf) - set(fields) - _BOOKKEEPING - set(derived)
                   - {"hidden_act", "attention_dropout", "dropout", "mlp_ratio"})
  if unknown:
    raise ValueError(f"{section}: unsupported HF config attributes {unknown}")
  for key in ("attention_dropout", "dropout"):
    if float(hf.get(key, 0.0) or 0.0) != 0.0:
      raise ValueError(f"{section}.{key}={hf[key]} is not supported (inference port: 0 only)")
  return {k: hf.get(k, d) for k, d in fields.items()}


# Tensor-parallel / FSDP partition rules, ``(regex on the dotted nnx.state path → logical
# axes)``, first match wins, for ``rpe_jax.parallel.sharding`` (whose presets map the logical axes
# "embed", "heads", "mlp", "vocab" to mesh axes). A rule names a kernel or a lone parameter;
# a Linear's bias and adapter factors follow its kernel.
SHARDING_RULES = (
    # Vision encoder (a ViT-Det): fused qkv is column-parallel, proj row-parallel.
    (r"attn\.qkv\.kernel$", ("embed", "heads")),
    (r"attn\.proj\.kernel$", ("heads", "embed")),
    (r"mlp\.lin1\.kernel$", ("embed", "mlp")),
    (r"mlp\.lin2\.kernel$", ("mlp", "embed")),
    (r"patch_embed\.kernel$", (None, None, None, "embed")),
    (r"pos_embed$", (None, None, None, "embed")),
    # Mask-decoder attention (two-way transformer); its MLPs are small and stay replicated.
    (r"(q_proj|k_proj|v_proj)\.kernel$", ("embed", "heads")),
    (r"out_proj\.kernel$", ("heads", "embed")),
)


@dataclasses.dataclass(frozen=True)
class SamConfig:
  """The three HF sub-configs; ``from_hf`` reads a SamModel ``config.json`` dict."""

  model_type: ClassVar[str] = "sam"
  sharding_rules: ClassVar[tuple] = SHARDING_RULES   # see SHARDING_RULES

  vision: SamVisionConfig = SamVisionConfig()
  prompt_encoder: SamPromptEncoderConfig = SamPromptEncoderConfig()
  mask_decoder: SamMaskDecoderConfig = SamMaskDecoderConfig()
  # Not an HF attribute: the attention kernel of the encoder and the decoder ("auto" |
  # "fused" | "reference", see models.layers); every choice computes the same function.
  attention_impl: str = "auto"

  def __post_init__(self):
    check_attention_impl(self.attention_impl)
    v, p, d = self.vision, self.prompt_encoder, self.mask_decoder
    widths = {"vision.output_channels": v.output_channels,
              "2 * vision.num_pos_feats": 2 * v.num_pos_feats,
              "prompt_encoder.hidden_size": p.hidden_size, "mask_decoder.hidden_size": d.hidden_size}
    if len(set(widths.values())) != 1:
      raise ValueError(f"SAM needs one embedding width, got {widths}")
    if p.image_embedding_size != v.grid_size:
      raise ValueError(f"prompt encoder grid {p.image_embedding_size} != vision grid {v.grid_size}")

  @classmethod
  def from_hf(cls, hf: dict) -> "SamConfig":
    hf = dict(hf)
    if hf.get("model_type", "sam") != "sam":
      raise ValueError(f"config model_type {hf['model_type']!r} is not 'sam'")
    _take(hf, "config", {}, derived=("vision_config", "prompt_encoder_config",
                                     "mask_decoder_config"))
    vis = dict(hf.get("vision_config") or {})
    pe = dict(hf.get("prompt_encoder_config") or {})
    md = dict(hf.get("mask_decoder_config") or {})
    for sec, cfg, act in (("vision_config", vis, "gelu"), ("prompt_encoder_config", pe, "gelu"),
                          ("mask_decoder_config", md, "relu")):
      if cfg.get("hidden_act", act) != act:
        raise ValueError(f"{sec}.hidden_act={cfg['hidden_act']!r} is not supported ({act!r} only)")
    vdef = SamVisionConfig()
    fields = {f.name: getattr(vdef, f.name) for f in dataclasses.fields(SamVisionConfig)}
    # intermediate_size / projection_dim sit in older SAM configs; HF's SAM never reads them.
    v = _take(vis, "vision_config", fields,
              derived=("scale", "intermediate_size", "projection_dim"))
    v["image_size"] = _square(v["image_size"], "vision_config.image_size")
    v["patch_size"] = _square(v["patch_size"], "vision_config.patch_size")
    if vis.get("mlp_dim") is None:
      v["mlp_dim"] = int(v["hidden_size"] * vis.get("mlp_ratio", 4.0))
    v["global_attn_indexes"] = tuple(int(i) for i in v["global_attn_indexes"])
    if "scale" in vis and vis["scale"] != v["hidden_size"] // 2:
      raise ValueError(f"vision_config.scale {vis['scale']} != hidden_size // 2")
    pdef = SamPromptEncoderConfig()
    p = _take(pe, "prompt_encoder_config",
              {f.name: getattr(pdef, f.name) for f in dataclasses.fields(SamPromptEncoderConfig)},
              derived=("image_embedding_size",))
    p["image_size"] = _square(p["image_size"], "prompt_encoder_config.image_size")
    p["patch_size"] = _square(p["patch_size"], "prompt_encoder_config.patch_size")
    ddef = SamMaskDecoderConfig()
    d = _take(md, "mask_decoder_config",
              {f.name: getattr(ddef, f.name) for f in dataclasses.fields(SamMaskDecoderConfig)})
    config = cls(SamVisionConfig(**v), SamPromptEncoderConfig(**p), SamMaskDecoderConfig(**d))
    if pe.get("image_embedding_size", config.prompt_encoder.image_embedding_size) != \
        config.prompt_encoder.image_embedding_size:
      raise ValueError("prompt_encoder_config.image_embedding_size != image_size // patch_size")
    return config

  def to_hf(self, architecture: str = "SamModel") -> dict:
    """The HF ``config.json`` dict (inverse of ``from_hf``)."""
    vision = _sub_to_hf(self.vision, "sam_vision_model", hidden_act="gelu")
    vision["global_attn_indexes"] = list(self.vision.global_attn_indexes)
    return dict(
        model_type="sam", architectures=[architecture], vision_config=vision,
        prompt_encoder_config=_sub_to_hf(self.prompt_encoder, "sam_prompt_encoder",
                                         hidden_act="gelu"),
        mask_decoder_config=_sub_to_hf(self.mask_decoder, "sam_mask_decoder", hidden_act="relu"))


def _sub_to_hf(cfg, model_type: str, **extra) -> dict:
  out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  out.update(model_type=model_type, **extra)
  return out


class SamOutput(NamedTuple):
  pred_masks: jax.Array        # [B, P, M, 4h, 4w] low-resolution mask logits
  iou_scores: jax.Array        # [B, P, M]
  image_embeddings: jax.Array  # [B, h, w, C]


class SamModel(nnx.Module):
  """HF ``SamModel``: image encoder, prompt encoder, mask decoder (NHWC images).

  ``dtype`` is the parameter dtype (built in float32, then cast); activations follow it
  (pixels are cast to it). Whatever it is, the layer norms and attention softmaxes run in
  float32, the random Fourier matrix stays float32 (its phases need float32: see
  ``fourier_positions``), and the mask logits and IoU scores come back in float32.
  """

  hf_architecture = "SamModel"

  def __init__(self, config: SamConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    v = config.vision
    # Random Fourier features, shared by the prompt encoder and the dense image positions.
    self.shared_image_embedding = nnx.Param(
        (v.hidden_size // 2) * jax.random.normal(rngs.params(), (2, v.num_pos_feats)))
    self.vision_encoder = VisionEncoder(v, rngs=rngs, attention_impl=config.attention_impl)
    self.prompt_encoder = PromptEncoder(config.prompt_encoder, rngs=rngs)
    self.mask_decoder = MaskDecoder(config.mask_decoder, rngs=rngs,
                                    attention_impl=config.attention_impl)
    if jnp.dtype(dtype) != jnp.float32:
      for _, var in nnx.iter_graph(self):
        if (isinstance(var, nnx.Param) and var.get_value() is not None
            and var is not self.shared_image_embedding):
          var.set_value(var.get_value().astype(dtype))

  def image_embeddings(self, pixel_values: jax.Array) -> jax.Array:
    """NHWC pixels [B, H, W, 3] → image embeddings [B, h, w, C]."""
    return self.vision_encoder(pixel_values)

  def features(self, pixel_values: jax.Array, pooling: str = "mean") -> jax.Array:
    """The mean-pooled image embedding [B, C]: SAM's task-prototype feature (SAM has no
    CLS token, so ``pooling`` must be ``"mean"``)."""
    if pooling != "mean":
      raise ValueError(f"SAM pooling must be 'mean', got {pooling!r}")
    return self.image_embeddings(pixel_values).mean(axis=(1, 2))

  def image_positional_embeddings(self) -> jax.Array:
    """The dense positional embedding [h, w, C] of the image-embedding grid."""
    return dense_positions(self.config.prompt_encoder.image_embedding_size,
                           self.shared_image_embedding[...]).astype(self.dtype)

  @property
  def dtype(self):
    """The model's compute dtype (its parameters', the Fourier matrix aside)."""
    return self.mask_decoder.iou_token[...].dtype

  def __call__(self, pixel_values=None, *, image_embeddings=None, points=None, labels=None,
               boxes=None, masks=None, multimask_output: bool = True) -> SamOutput:
    """Predict masks from pixels (or precomputed image embeddings) and prompts.

    points [B, P, N, 2] as (x, y) pixels of the model's input image; labels [B, P, N]
    (1 fg, 0 bg, -1 not-a-point, -10 pad; default all 1); boxes [B, P, 4] as
    (x1, y1, x2, y2); masks [B, 4h, 4w] mask logits. With none, SAM's no-prompt masks.
    """
    if (pixel_values is None) == (image_embeddings is None):
      raise ValueError("pass exactly one of pixel_values and image_embeddings")
    if image_embeddings is None:
      image_embeddings = self.image_embeddings(pixel_values)
    b = image_embeddings.shape[0]
    if points is not None:
      if points.ndim != 4 or points.shape[-1] != 2:
        raise ValueError(f"points must be [B, P, N, 2], got shape {tuple(points.shape)}")
      if points.shape[0] != b:
        raise ValueError(f"points batch {points.shape[0]} != image batch {b}")
      if labels is None:
        labels = jnp.ones(points.shape[:-1], jnp.int32)
      elif tuple(labels.shape) != tuple(points.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} != points shape[:-1] "
                         f"{tuple(points.shape[:-1])}")
    if boxes is not None:
      if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != b:
        raise ValueError(f"boxes must be [B={b}, P, 4], got shape {tuple(boxes.shape)}")
      if points is not None and points.shape[1] != boxes.shape[1]:
        raise ValueError(f"points give {points.shape[1]} prompts per image, boxes "
                         f"{boxes.shape[1]}: they must match")
    if masks is not None:
      s = 4 * self.config.prompt_encoder.image_embedding_size
      if masks.shape != (b, s, s):
        raise ValueError(f"masks must be [B={b}, {s}, {s}], got shape {tuple(masks.shape)}")
    gaussian = self.shared_image_embedding[...]
    sparse, dense = self.prompt_encoder(gaussian, points, labels, boxes, masks)
    pred, iou = self.mask_decoder(image_embeddings, self.image_positional_embeddings(), sparse,
                                  dense, multimask_output)
    return SamOutput(pred.astype(jnp.float32), iou.astype(jnp.float32), image_embeddings)


# --- HF checkpoints ---------------------------------------------------------------------
#
# The declarative key map for ``models.hf``: (our parameter path, (HF key,), transform).
# Transforms: "linear" torch [out, in] → [in, out]; "conv" Conv2d [out, in, kh, kw] →
# [kh, kw, in, out]; "conv_transpose" ConvTranspose2d [in, out, kh, kw] → [kh, kw, in, out]
# (no spatial flip: ``ConvTranspose2d`` flips when it runs). SAM checkpoints use the same
# names in transformers 4 and 5.

_KINDS = {"linear": ("linear", True), "linear_nobias": ("linear", False),
          "conv": ("conv", True), "conv_nobias": ("conv", False),
          "conv_t": ("conv_transpose", True)}


def _module_rules(ours: str, hf: str, kind: str) -> list[tuple[str, tuple[str], str]]:
  """One torch module → the rules for its weight (and bias)."""
  if kind == "ln":
    return [(f"{ours}.scale", (f"{hf}.weight",), "none"),
            (f"{ours}.bias", (f"{hf}.bias",), "none")]
  if kind == "param":
    return [(ours, (hf,), "none")]
  transform, bias = _KINDS[kind]
  rules = [(f"{ours}.kernel", (f"{hf}.weight",), transform)]
  return rules + ([(f"{ours}.bias", (f"{hf}.bias",), "none")] if bias else [])


def _modules(config: SamConfig) -> list[tuple[str, str, str]]:
  """(our module path, HF module path, kind) for every module holding parameters."""
  v, d = config.vision, config.mask_decoder
  enc, pe, md, tf = "vision_encoder", "prompt_encoder", "mask_decoder", "mask_decoder.transformer"
  out = [("shared_image_embedding", "shared_image_embedding.positional_embedding", "param"),
         (f"{enc}.patch_embed", f"{enc}.patch_embed.projection", "conv")]
  if v.use_abs_pos:
    out.append((f"{enc}.pos_embed", f"{enc}.pos_embed", "param"))
  for i in range(v.num_hidden_layers):
    layer = f"{enc}.layers.{i}"
    out += [(f"{layer}.layer_norm1", f"{layer}.layer_norm1", "ln"),
            (f"{layer}.layer_norm2", f"{layer}.layer_norm2", "ln"),
            (f"{layer}.attn.qkv", f"{layer}.attn.qkv", "linear" if v.qkv_bias else "linear_nobias"),
            (f"{layer}.attn.proj", f"{layer}.attn.proj", "linear"),
            (f"{layer}.mlp.lin1", f"{layer}.mlp.lin1", "linear"),
            (f"{layer}.mlp.lin2", f"{layer}.mlp.lin2", "linear")]
    if v.use_rel_pos:
      out += [(f"{layer}.attn.{r}", f"{layer}.attn.{r}", "param") for r in ("rel_pos_h", "rel_pos_w")]
  for j in (1, 2):
    out += [(f"{enc}.neck.conv{j}", f"{enc}.neck.conv{j}", "conv_nobias"),
            (f"{enc}.neck.layer_norm{j}", f"{enc}.neck.layer_norm{j}", "ln")]

  out += [(f"{pe}.mask_embed.conv{j}", f"{pe}.mask_embed.conv{j}", "conv") for j in (1, 2, 3)]
  out += [(f"{pe}.mask_embed.layer_norm{j}", f"{pe}.mask_embed.layer_norm{j}", "ln")
          for j in (1, 2)]
  out += [(f"{pe}.{n}", f"{pe}.{n}.weight", "param") for n in ("no_mask_embed", "not_a_point_embed")]
  out += [(f"{pe}.point_embed.{j}", f"{pe}.point_embed.{j}.weight", "param")
          for j in range(config.prompt_encoder.num_point_embeddings)]

  out += [(f"{md}.iou_token", f"{md}.iou_token.weight", "param"),
          (f"{md}.mask_tokens", f"{md}.mask_tokens.weight", "param")]
  attentions = []
  for i in range(d.num_hidden_layers):
    ours, hf = f"{md}.layers.{i}", f"{tf}.layers.{i}"
    attentions += [(f"{ours}.{a}", f"{hf}.{a}") for a in
                   ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")]
    out += [(f"{ours}.layer_norm{j}", f"{hf}.layer_norm{j}", "ln") for j in (1, 2, 3, 4)]
    out += [(f"{ours}.mlp.{n}", f"{hf}.mlp.{n}", "linear") for n in ("lin1", "lin2")]
  attentions.append((f"{md}.final_attn_token_to_image", f"{tf}.final_attn_token_to_image"))
  out += [(f"{ours}.{p}", f"{hf}.{p}", "linear") for ours, hf in attentions
          for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
  out += [(f"{md}.layer_norm_final_attn", f"{tf}.layer_norm_final_attn", "ln"),
          (f"{md}.upscale_conv1", f"{md}.upscale_conv1", "conv_t"),
          (f"{md}.upscale_conv2", f"{md}.upscale_conv2", "conv_t"),
          (f"{md}.upscale_layer_norm", f"{md}.upscale_layer_norm", "ln")]
  heads = [(f"{md}.output_hypernetworks_mlps.{m}", 3) for m in range(d.num_multimask_outputs + 1)]
  heads.append((f"{md}.iou_prediction_head", d.iou_head_depth))
  for head, depth in heads:
    out += [(f"{head}.{p}", f"{head}.{p}", "linear") for p in ("proj_in", "proj_out")]
    out += [(f"{head}.layers.{k}", f"{head}.layers.{k}", "linear") for k in range(depth - 2)]
  return out


def hf_key_map(model: "SamModel") -> dict:
  """The key map of ``model`` for ``models.hf`` (``rules``, ``ignored``, ``strip_prefixes``).
  The prompt encoder's copy of the tied Fourier matrix is ignored when a checkpoint has it."""
  rules = [r for ours, hf, kind in _modules(model.config) for r in _module_rules(ours, hf, kind)]
  return dict(rules=rules, ignored=("prompt_encoder.shared_embedding.positional_embedding",),
              strip_prefixes=())


def from_pretrained(folder, *, dtype=jnp.float32) -> "SamModel":
  """Load an HF ``SamModel`` folder (``models.hf.load`` with the architecture fixed)."""
  from models import hf
  return hf.load(folder, dtype=dtype, architecture="SamModel")

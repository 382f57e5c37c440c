"""SAM's prompt encoder and two-way-transformer mask decoder in Flax NNX.

Shapes: B images, P prompts per image (HF's "point batch"), N points per prompt,
C = decoder hidden size, image embeddings [B, h, w, C] (NHWC), masks [B, P, M, 4h, 4w].

Random Fourier positions (the shared ``positional_embedding`` G [2, C/2]): a point (x, y)
normalised to [0, 1]² maps to [sin(2π(2u − 1)G), cos(2π(2u − 1)G)].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import fused_attention, gelu_exact, resolve_attention_impl
from models.lora import Linear
from models.sam_encoder import MLP, layer_norm


@dataclasses.dataclass(frozen=True)
class SamPromptEncoderConfig:
  """HF ``SamPromptEncoderConfig`` (supported attributes)."""

  hidden_size: int = 256
  image_size: int = 1024
  patch_size: int = 16
  mask_input_channels: int = 16
  num_point_embeddings: int = 4
  layer_norm_eps: float = 1e-6

  def __post_init__(self):
    if self.num_point_embeddings != 4:
      raise ValueError(f"num_point_embeddings must be 4 (neg, pos, box corners), "
                       f"got {self.num_point_embeddings}")
    if self.mask_input_channels % 4:
      raise ValueError(f"mask_input_channels {self.mask_input_channels} is not a multiple of 4")

  @property
  def image_embedding_size(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class SamMaskDecoderConfig:
  """HF ``SamMaskDecoderConfig`` (supported attributes; hidden_act must be relu)."""

  hidden_size: int = 256
  mlp_dim: int = 2048
  num_hidden_layers: int = 2
  num_attention_heads: int = 8
  attention_downsample_rate: int = 2
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  layer_norm_eps: float = 1e-6

  def __post_init__(self):
    if self.hidden_size % 8:
      raise ValueError(f"mask decoder hidden_size {self.hidden_size} is not a multiple of 8")
    if (self.hidden_size // self.attention_downsample_rate) % self.num_attention_heads:
      raise ValueError("num_attention_heads must divide hidden_size // attention_downsample_rate")
    if self.iou_head_depth < 2:
      raise ValueError(f"iou_head_depth must be >= 2, got {self.iou_head_depth}")


def fourier_positions(coords: jax.Array, gaussian: jax.Array) -> jax.Array:
  """coords [..., 2] in [0, 1] → [..., 2·F]: [sin(2π(2c − 1)G), cos(2π(2c − 1)G)], float32."""
  # float32 whatever the model's dtype: with |G| ~ hidden/2 the phase reaches ~10⁴ rad,
  # which bf16 cannot resolve (its spacing there is ~64 rad).
  coords, gaussian = jnp.asarray(coords, jnp.float32), jnp.asarray(gaussian, jnp.float32)
  z = 2 * np.pi * ((2 * coords - 1) @ gaussian)
  return jnp.concatenate([jnp.sin(z), jnp.cos(z)], axis=-1)


def dense_positions(size: int, gaussian: jax.Array) -> jax.Array:
  """The image-wide positional embedding [size, size, C] at the cell centres."""
  centres = (np.arange(size, dtype=np.float32) + 0.5) / size
  grid = np.stack(np.meshgrid(centres, centres, indexing="xy"), axis=-1)   # [y, x, (x, y)]
  return fourier_positions(jnp.asarray(grid, gaussian.dtype), gaussian)


class ConvTranspose2d(nnx.Module):
  """torch ``nn.ConvTranspose2d`` (no output padding, no groups) in NHWC.

  ``kernel`` is [kh, kw, in, out], i.e. torch's [in, out, kh, kw] transposed with no flip:
  y[s·i + a − p, s·j + b − p, o] += x[i, j, c] · kernel[a, b, c, o]. As a convolution this is
  the input dilated by the stride, padded by k − 1 − p, and the kernel flipped in space.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int, stride: int,
               padding: int = 0, *, rngs: nnx.Rngs):
    if not 0 <= padding <= kernel_size - 1:
      raise ValueError(f"padding must be in [0, kernel_size - 1], got {padding}")
    self.stride = stride
    self.padding = padding
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, in_features,
                                                 out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    dtype = jnp.promote_types(x.dtype, kernel.dtype)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    pad = kernel.shape[0] - 1 - self.padding
    y = jax.lax.conv_general_dilated(
        x, kernel[::-1, ::-1], window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
        lhs_dilation=(self.stride, self.stride), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)
    return y + self.bias[...]


class MaskEmbedding(nnx.Module):
  """A [B, 4h, 4w] mask prompt → [B, h, w, C]: two stride-2 convs with LN + GELU, then 1×1."""

  def __init__(self, config: SamPromptEncoderConfig, *, rngs: nnx.Rngs):
    c4, c = config.mask_input_channels // 4, config.mask_input_channels
    self.conv1 = nnx.Conv(1, c4, (2, 2), strides=(2, 2), padding="VALID", rngs=rngs)
    self.layer_norm1 = layer_norm(c4, config.layer_norm_eps, rngs)
    self.conv2 = nnx.Conv(c4, c, (2, 2), strides=(2, 2), padding="VALID", rngs=rngs)
    self.layer_norm2 = layer_norm(c, config.layer_norm_eps, rngs)
    self.conv3 = nnx.Conv(c, config.hidden_size, (1, 1), padding="VALID", rngs=rngs)

  def __call__(self, masks: jax.Array) -> jax.Array:
    h = gelu_exact(self.layer_norm1(self.conv1(masks[..., None])))
    h = gelu_exact(self.layer_norm2(self.conv2(h)))
    return self.conv3(h)


class PromptEncoder(nnx.Module):
  """Points, boxes and masks → sparse tokens [B, P, T, C] and dense embeddings [B, h, w, C].

  Point labels: 1 foreground, 0 background, -1 "not a point" (learned embedding replaces
  the position), -10 padding (zero). Without boxes, one (0, 0) point labelled -1 is appended
  to every prompt, as SAM does.
  """

  def __init__(self, config: SamPromptEncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config.hidden_size
    normal = nnx.initializers.normal(1.0)
    self.mask_embed = MaskEmbedding(config, rngs=rngs)
    self.no_mask_embed = nnx.Param(normal(rngs.params(), (1, c)))
    self.point_embed = nnx.List([nnx.Param(normal(rngs.params(), (1, c)))
                                 for _ in range(config.num_point_embeddings)])
    self.not_a_point_embed = nnx.Param(normal(rngs.params(), (1, c)))

  def embed_points(self, points, labels, pad: bool, gaussian) -> jax.Array:
    points = points + 0.5                                  # pixel centres
    if pad:
      points = jnp.concatenate([points, jnp.zeros_like(points[..., :1, :])], axis=-2)
      labels = jnp.concatenate([labels, -jnp.ones_like(labels[..., :1])], axis=-1)
    emb = fourier_positions(points / self.config.image_size, gaussian)
    emb = emb.astype(self.not_a_point_embed[...].dtype)
    lab = labels[..., None]
    emb = jnp.where(lab == -1, self.not_a_point_embed[...][0], emb)
    emb = jnp.where(lab == -10, 0.0, emb)
    emb = jnp.where(lab == 0, emb + self.point_embed[0][...][0], emb)
    return jnp.where(lab == 1, emb + self.point_embed[1][...][0], emb)

  def embed_boxes(self, boxes, gaussian) -> jax.Array:
    corners = (boxes + 0.5).reshape(*boxes.shape[:-1], 2, 2)
    emb = fourier_positions(corners / self.config.image_size, gaussian)
    emb = emb.astype(self.point_embed[2][...].dtype)
    corner = jnp.concatenate([self.point_embed[2][...], self.point_embed[3][...]], axis=0)
    return emb + corner

  def __call__(self, gaussian, points=None, labels=None, boxes=None, masks=None):
    sparse = None
    batch = 1
    if points is not None:
      if labels is None:
        raise ValueError("labels are required with points")
      batch = points.shape[0]
      sparse = self.embed_points(points, labels, pad=boxes is None, gaussian=gaussian)
    if boxes is not None:
      batch = boxes.shape[0]
      box = self.embed_boxes(boxes, gaussian)
      sparse = box if sparse is None else jnp.concatenate([sparse, box], axis=2)
    if masks is not None:
      dense = self.mask_embed(masks)
    else:
      s = self.config.image_embedding_size
      dense = jnp.broadcast_to(self.no_mask_embed[...][0], (batch, s, s, self.config.hidden_size))
    return sparse, dense


class Attention(nnx.Module):
  """Multi-head attention with q/k/v projected to hidden // downsample channels."""

  def __init__(self, config: SamMaskDecoderConfig, downsample: int, *, rngs: nnx.Rngs,
               attention_impl: str = "auto"):
    dim, inner = config.hidden_size, config.hidden_size // downsample
    self.attention_impl = attention_impl
    self.num_heads = config.num_attention_heads
    self.q_proj = Linear(dim, inner, rngs=rngs)
    self.k_proj = Linear(dim, inner, rngs=rngs)
    self.v_proj = Linear(dim, inner, rngs=rngs)
    self.out_proj = Linear(inner, dim, rngs=rngs)

  def _heads(self, x):
    return x.reshape(*x.shape[:-1], self.num_heads, -1).swapaxes(-2, -3)   # [..., n, L, d]

  def __call__(self, q, k, v):
    if resolve_attention_impl(self.attention_impl) == "fused":
      q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
      lead = q.shape[:-2]
      split = lambda t: t.reshape(-1, t.shape[-2], self.num_heads, t.shape[-1] // self.num_heads)
      out = fused_attention(split(q), split(k), split(v))
      return self.out_proj(out.reshape(*lead, q.shape[-2], -1))
    q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
    logits = (q @ k.swapaxes(-1, -2)) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = (probs @ v).swapaxes(-2, -3)
    return self.out_proj(out.reshape(*out.shape[:-2], -1))


class TwoWayBlock(nnx.Module):
  """Token self-attention, token→image, token MLP, image→token; post-norm each."""

  def __init__(self, config: SamMaskDecoderConfig, skip_first_layer_pe: bool, *,
               rngs: nnx.Rngs, attention_impl: str = "auto"):
    c, eps = config.hidden_size, config.layer_norm_eps
    self.skip_first_layer_pe = skip_first_layer_pe
    attn = dict(rngs=rngs, attention_impl=attention_impl)
    self.self_attn = Attention(config, 1, **attn)
    self.layer_norm1 = layer_norm(c, eps, rngs)
    self.cross_attn_token_to_image = Attention(config, config.attention_downsample_rate, **attn)
    self.layer_norm2 = layer_norm(c, eps, rngs)
    self.mlp = MLP(c, config.mlp_dim, "relu", rngs=rngs)
    self.layer_norm3 = layer_norm(c, eps, rngs)
    self.layer_norm4 = layer_norm(c, eps, rngs)
    self.cross_attn_image_to_token = Attention(config, config.attention_downsample_rate, **attn)

  def __call__(self, queries, keys, query_pe, key_pe):
    if self.skip_first_layer_pe:
      queries = self.self_attn(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + self.self_attn(q, q, queries)
    queries = self.layer_norm1(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = self.layer_norm2(queries + self.cross_attn_token_to_image(q, k, keys))
    queries = self.layer_norm3(queries + self.mlp(queries))
    q, k = queries + query_pe, keys + key_pe
    keys = self.layer_norm4(keys + self.cross_attn_image_to_token(k, q, queries))
    return queries, keys


class FeedForward(nnx.Module):
  """proj_in → ReLU → (layers → ReLU)* → proj_out: the hypernetwork MLPs and the IoU head."""

  def __init__(self, dim_in: int, hidden: int, dim_out: int, depth: int, *, rngs: nnx.Rngs):
    self.proj_in = Linear(dim_in, hidden, rngs=rngs)
    self.layers = nnx.List([Linear(hidden, hidden, rngs=rngs) for _ in range(depth - 2)])
    self.proj_out = Linear(hidden, dim_out, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.proj_in(x))
    for layer in self.layers:
      x = jax.nn.relu(layer(x))
    return self.proj_out(x)


class MaskDecoder(nnx.Module):
  """Two-way transformer over [iou, mask tokens, prompt tokens] × image, then masks by a
  per-token hypernetwork dotted with the 4× upscaled image features, and the IoU head."""

  def __init__(self, config: SamMaskDecoderConfig, *, rngs: nnx.Rngs,
               attention_impl: str = "auto"):
    self.config = config
    c = config.hidden_size
    self.num_mask_tokens = config.num_multimask_outputs + 1
    normal = nnx.initializers.normal(1.0)
    self.iou_token = nnx.Param(normal(rngs.params(), (1, c)))
    self.mask_tokens = nnx.Param(normal(rngs.params(), (self.num_mask_tokens, c)))
    self.layers = nnx.List([TwoWayBlock(config, i == 0, rngs=rngs, attention_impl=attention_impl)
                            for i in range(config.num_hidden_layers)])
    self.final_attn_token_to_image = Attention(config, config.attention_downsample_rate,
                                               rngs=rngs, attention_impl=attention_impl)
    # torch nn.LayerNorm default eps, not the config's.
    self.layer_norm_final_attn = layer_norm(c, 1e-5, rngs)
    self.upscale_conv1 = ConvTranspose2d(c, c // 4, 2, 2, rngs=rngs)
    self.upscale_layer_norm = layer_norm(c // 4, 1e-6, rngs)
    self.upscale_conv2 = ConvTranspose2d(c // 4, c // 8, 2, 2, rngs=rngs)
    self.output_hypernetworks_mlps = nnx.List([FeedForward(c, c, c // 8, 3, rngs=rngs)
                                               for _ in range(self.num_mask_tokens)])
    self.iou_prediction_head = FeedForward(c, config.iou_head_hidden_dim, self.num_mask_tokens,
                                           config.iou_head_depth, rngs=rngs)

  def __call__(self, image_embeddings, image_pe, sparse, dense, multimask_output: bool = True):
    """image_embeddings [B, h, w, C], image_pe [h, w, C], sparse [B, P, T, C] or None,
    dense [B or 1, h, w, C] → (masks [B, P, M, 4h, 4w], iou [B, P, M])."""
    b, h, w, c = image_embeddings.shape
    p = 1 if sparse is None else sparse.shape[1]
    tokens = jnp.concatenate([self.iou_token[...], self.mask_tokens[...]], axis=0)
    tokens = jnp.broadcast_to(tokens, (b, p) + tokens.shape)
    if sparse is not None:
      tokens = jnp.concatenate([tokens, sparse.astype(tokens.dtype)], axis=2)
    keys = (image_embeddings + dense).reshape(b, 1, h * w, c)
    keys = jnp.broadcast_to(keys, (b, p, h * w, c))
    key_pe = image_pe.reshape(h * w, c)

    queries = tokens
    for layer in self.layers:
      queries, keys = layer(queries, keys, tokens, key_pe)
    attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
    queries = self.layer_norm_final_attn(queries + attn)

    iou_token_out = queries[:, :, 0]
    mask_tokens_out = queries[:, :, 1:1 + self.num_mask_tokens]
    grid = keys.reshape(b * p, h, w, c)
    up = gelu_exact(self.upscale_layer_norm(self.upscale_conv1(grid)))
    up = gelu_exact(self.upscale_conv2(up))       # [bp, 4h, 4w, c/8]
    up = up.reshape(b, p, 4 * h, 4 * w, c // 8)
    hyper = jnp.stack([mlp(mask_tokens_out[:, :, i])
                       for i, mlp in enumerate(self.output_hypernetworks_mlps)], axis=2)
    masks = jnp.einsum("bpmc,bpyxc->bpmyx", hyper, up, precision=jax.lax.Precision.HIGHEST)
    iou = self.iou_prediction_head(iou_token_out)
    sl = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, :, sl], iou[:, :, sl]

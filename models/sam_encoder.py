"""SAM's image encoder in Flax NNX: a ViT with windowed / global attention and decomposed
relative positions, followed by the convolutional neck.

Images are NHWC. The encoder maps pixels [B, H, W, C_in] to image embeddings
[B, H/p, W/p, output_channels] (HF returns the same numbers as NCHW).

Layer i attends inside non-overlapping ``window_size`` × ``window_size`` windows unless
i is in ``global_attn_indexes``, where it attends over the whole grid. A grid that is not a
multiple of the window is zero-padded *after* the first layer norm and the padded tokens
take part in attention unmasked (as in the reference implementation), then are cropped.

Attention logits carry the decomposed relative position bias of MViTv2:
  logits[(y, x), (y', x')] = q·k/√d + q·R_h[y - y' + h - 1] + q·R_w[x - x' + w - 1]
with q the unscaled query.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import LayerNorm, fused_attention, gelu_exact, resolve_attention_impl
from models.lora import Linear


@dataclasses.dataclass(frozen=True)
class SamVisionConfig:
  """HF ``SamVisionConfig`` (the attributes this port supports)."""

  hidden_size: int = 768
  output_channels: int = 256
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 1024
  patch_size: int = 16
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  mlp_dim: int = 3072
  use_abs_pos: bool = True
  use_rel_pos: bool = True
  window_size: int = 14
  global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
  num_pos_feats: int = 128

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of "
                       f"patch_size {self.patch_size}")
    bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_hidden_layers]
    if bad:
      raise ValueError(f"global_attn_indexes {bad} outside [0, {self.num_hidden_layers})")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  def layer_window(self, i: int) -> int:
    """The attention window of layer i (0 = global attention)."""
    return 0 if i in self.global_attn_indexes else self.window_size


def layer_norm(n: int, eps: float, rngs: nnx.Rngs) -> LayerNorm:
  """torch-exact LayerNorm: the two-pass variance, not E[x²] - E[x]², computed in float32
  and cast back to the input's dtype (what torch does for bf16)."""
  return LayerNorm(n, epsilon=eps, rngs=rngs)


def interpolate_linear(x: np.ndarray | jax.Array, size: int) -> jax.Array:
  """Resize axis 0 of x to ``size`` like torch ``F.interpolate(mode="linear")``
  (align_corners=False): source index s = (i + ½)·n/size − ½ clamped at 0, then linear
  interpolation between ⌊s⌋ and min(⌊s⌋ + 1, n − 1).
  """
  n = x.shape[0]
  if n == size:
    return x
  src = np.maximum((np.arange(size) + 0.5) * (n / size) - 0.5, 0.0)
  i0 = np.floor(src).astype(np.int64)
  i1 = np.minimum(i0 + 1, n - 1)
  lam = (src - i0).astype(np.float32)[:, None]
  return x[i0] * (1 - lam) + x[i1] * lam


def relative_positions(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
  """HF ``get_rel_pos``: the [q_size, k_size, d] table R[i, j] = rel_pos'[i·sq − j·sk + (k−1)·sk]
  where rel_pos' is rel_pos resized to 2·max(q, k) − 1 rows and sq, sk scale the shorter side.
  """
  max_rel_dist = 2 * max(q_size, k_size) - 1
  table = interpolate_linear(rel_pos, max_rel_dist)
  q_coords = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
  k_coords = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
  index = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
  return table[index.astype(np.int64)]


class VisionAttention(nnx.Module):
  """Multi-head self-attention on a [B, h, w, C] grid with a fused qkv projection; the
  decomposed relative positions enter as an additive bias (exact for either kernel)."""

  def __init__(self, config: SamVisionConfig, window_size: int, *, rngs: nnx.Rngs,
               attention_impl: str = "auto"):
    size = config.grid_size if window_size == 0 else window_size
    dim = config.hidden_size
    self.attention_impl = attention_impl
    self.num_heads = config.num_attention_heads
    self.head_dim = dim // self.num_heads
    # Windowed attention runs on [B · windows, s, s, C] (`window_partition`, image-major):
    # a per-sample adapter gate spreads each image's row over its windows.
    fold = 1 if window_size == 0 else math.ceil(config.grid_size / window_size) ** 2
    self.qkv = Linear(dim, 3 * dim, use_bias=config.qkv_bias, rngs=rngs, batch_fold=fold)
    self.proj = Linear(dim, dim, rngs=rngs, batch_fold=fold)
    self.use_rel_pos = config.use_rel_pos
    if self.use_rel_pos:
      self.rel_pos_h = nnx.Param(jnp.zeros((2 * size - 1, self.head_dim)))
      self.rel_pos_w = nnx.Param(jnp.zeros((2 * size - 1, self.head_dim)))

  def _rel_bias(self, q: jax.Array, h: int, w: int) -> jax.Array:
    """The decomposed relative-position logits [b, heads, hw, hw] of q [b, heads, hw, d]."""
    b = q.shape[0]
    r_h = relative_positions(h, h, self.rel_pos_h[...])               # [h, h, d]
    r_w = relative_positions(w, w, self.rel_pos_w[...])               # [w, w, d]
    q_grid = q.reshape(b, self.num_heads, h, w, self.head_dim)
    rel_h = jnp.einsum("bnyxd,ykd->bnyxk", q_grid, r_h)
    rel_w = jnp.einsum("bnyxd,xkd->bnyxk", q_grid, r_w)
    bias = rel_h[..., :, None] + rel_w[..., None, :]                 # [b, n, h, w, h, w]
    return bias.reshape(b, self.num_heads, h * w, h * w)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, self.head_dim)
    if resolve_attention_impl(self.attention_impl) == "fused":
      q, k, v = (qkv[:, :, i] for i in range(3))                       # [b, hw, heads, d]
      bias = self._rel_bias(q.transpose(0, 2, 1, 3), h, w) if self.use_rel_pos else None
      out = fused_attention(q, k, v, bias=bias, scale=self.head_dim ** -0.5)
      return self.proj(out.reshape(b, h, w, c))
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))   # [b, heads, hw, d]
    logits = (q * self.head_dim ** -0.5) @ k.swapaxes(-1, -2)
    if self.use_rel_pos:
      logits = logits + self._rel_bias(q, h, w)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, h, w, c)
    return self.proj(out)


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """[B, h, w, C] → [B·nh·nw, window, window, C], zero-padding h and w up to multiples."""
  b, h, w, c = x.shape
  ph, pw = -h % window, -w % window
  x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  nh, nw = (h + ph) // window, (w + pw) // window
  x = x.reshape(b, nh, window, nw, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * nh * nw, window, window, c)


def window_unpartition(windows: jax.Array, window: int, h: int, w: int) -> jax.Array:
  """Inverse of ``window_partition``, cropping the padding off."""
  nh, nw = math.ceil(h / window), math.ceil(w / window)
  b = windows.shape[0] // (nh * nw)
  x = windows.reshape(b, nh, nw, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, nh * window, nw * window, -1)[:, :h, :w]


class MLP(nnx.Module):
  """lin2(act(lin1(x))), the act exact (erf) GELU or ReLU."""

  def __init__(self, dim: int, hidden: int, act: str, *, rngs: nnx.Rngs):
    if act not in ("gelu", "relu"):
      raise ValueError(f"unsupported activation {act!r}")
    self.act = act
    self.lin1 = Linear(dim, hidden, rngs=rngs)
    self.lin2 = Linear(hidden, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.lin1(x)
    h = gelu_exact(h) if self.act == "gelu" else jax.nn.relu(h)
    return self.lin2(h)


class VisionLayer(nnx.Module):
  """Pre-norm block: x + attn(LN(x)) (windowed or global), then x + mlp(LN(x))."""

  def __init__(self, config: SamVisionConfig, window_size: int, *, rngs: nnx.Rngs,
               attention_impl: str = "auto"):
    self.window_size = window_size
    self.layer_norm1 = layer_norm(config.hidden_size, config.layer_norm_eps, rngs)
    self.attn = VisionAttention(config, window_size, rngs=rngs, attention_impl=attention_impl)
    self.layer_norm2 = layer_norm(config.hidden_size, config.layer_norm_eps, rngs)
    self.mlp = MLP(config.hidden_size, config.mlp_dim, "gelu", rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.layer_norm1(x)
    if self.window_size > 0:
      _, height, width, _ = h.shape
      h = window_partition(h, self.window_size)
      h = window_unpartition(self.attn(h), self.window_size, height, width)
    else:
      h = self.attn(h)
    x = x + h
    return x + self.mlp(self.layer_norm2(x))


class Neck(nnx.Module):
  """conv 1×1 → LayerNorm2d → conv 3×3 (pad 1) → LayerNorm2d, no conv biases.

  The neck's norms use eps 1e-6 whatever the config says (HF's SamLayerNorm default).
  """

  def __init__(self, config: SamVisionConfig, *, rngs: nnx.Rngs):
    out = config.output_channels
    self.conv1 = nnx.Conv(config.hidden_size, out, (1, 1), padding="VALID", use_bias=False,
                          rngs=rngs)
    self.layer_norm1 = layer_norm(out, 1e-6, rngs)
    self.conv2 = nnx.Conv(out, out, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, rngs=rngs)
    self.layer_norm2 = layer_norm(out, 1e-6, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.layer_norm2(self.conv2(self.layer_norm1(self.conv1(x))))


class VisionEncoder(nnx.Module):
  """Patch embedding (+ absolute positions) → transformer layers → neck."""

  def __init__(self, config: SamVisionConfig, *, rngs: nnx.Rngs, attention_impl: str = "auto"):
    self.config = config
    p = config.patch_size
    self.patch_embed = nnx.Conv(config.num_channels, config.hidden_size, (p, p), strides=(p, p),
                                padding="VALID", rngs=rngs)
    g = config.grid_size
    self.pos_embed = nnx.data(
        nnx.Param(jnp.zeros((1, g, g, config.hidden_size))) if config.use_abs_pos else None)
    self.layers = nnx.List([VisionLayer(config, config.layer_window(i), rngs=rngs,
                                        attention_impl=attention_impl)
                            for i in range(config.num_hidden_layers)])
    self.neck = Neck(config, rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    c = self.config
    expected = (c.image_size, c.image_size, c.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
      raise ValueError(f"pixel_values must be NHWC [B, {c.image_size}, {c.image_size}, "
                       f"{c.num_channels}], got shape {tuple(pixel_values.shape)}")
    x = self.patch_embed(pixel_values.astype(self.patch_embed.kernel[...].dtype))
    if self.pos_embed is not None:
      x = x + self.pos_embed[...]
    for layer in self.layers:
      x = layer(x)
    return self.neck(x)

"""Meshes and partition specs for adapters, models, adapter libraries and the solver.

Everything runs through ``jax.jit(..., in_shardings=..., out_shardings=...)`` (what ``pjit``
became) on a named ``Mesh``; user code does not change between one device and many.

* Mesh: ``make_mesh("data=2,model=4")`` (the CLI's ``--mesh``). ``data`` carries the batch
  (and the library axis, and FSDP shards); ``model`` carries tensor parallelism.
* Model parameters: per model type a list of rules ``(path regex → logical axes)`` over the
  dotted ``nnx.state`` paths (``layers.3.attention.query.kernel``), as Levanter / MaxText
  logical-axis rules; a *preset* maps logical axes to mesh axes:

    tp       heads, mlp, vocab → model         (Megatron: column-parallel q/k/v/fc1/gate/up
                                                shard their out dim, row-parallel o/fc2/down
                                                their in dim)
    fsdp     embed → data                      (ZeRO-3: every large kernel sharded on data)
    fsdp_tp  both                              (2-D, MaxText's default)
    replicated  nothing

  Adapter factors follow their base kernel [in, out] with logical axes (i, o):
  a [in, r] ← (i, None), b [r, out] ← (None, o), e [r] ← (None,). Column-parallel layers
  thus keep a replicated and shard b on out (x @ a needs no communication); row-parallel
  layers shard a on in (x @ a is one all-reduce of width r) and keep b replicated.
* A library of k adapters is *stacked* (leaves with a leading k axis) and the k axis is
  sharded over a device axis (``place_library``). ``sharded_combine`` composes it exactly,
  Σ_i w_i a_i b_i = [a_1 … a_k] · [w_1 b_1; …; w_k b_k], and optionally re-truncates with
  TSQR on the sharded factors (local QR per device, one all-gather of the small R blocks,
  the small core SVD replicated), so no dense [in, out] matrix and no gathered factor.
* ``sharded_solve`` runs the batched weight solver with the batch axis sharded.

Multi-host start-up (``jax.distributed.initialize``), the ``--mesh`` flags and sharded orbax
checkpoints live in ``rpe_jax.distributed``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from models.lora import LoRA, SVDLoRA, _energy_count, _energy_keep, from_flat, is_lora, to_flat

# --- Meshes ---------------------------------------------------------------------------------

_AXIS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_mesh(spec: str) -> dict[str, int]:
  """"data=2,model=4" → {"data": 2, "model": 4}. One size may be -1 (use what is left)."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"--mesh must look like 'data=2,model=4', got {spec!r}")
  axes: dict[str, int] = {}
  for part in spec.split(","):
    name, sep, size = part.strip().partition("=")
    name = name.strip()
    if not sep or not _AXIS_NAME.match(name):
      raise ValueError(f"--mesh entry {part.strip()!r} must be NAME=SIZE (in {spec!r})")
    if name in axes:
      raise ValueError(f"--mesh names axis {name!r} twice (in {spec!r})")
    try:
      axes[name] = int(size)
    except ValueError:
      raise ValueError(f"--mesh axis {name!r} has size {size.strip()!r}, not an integer") from None
    if axes[name] == 0 or axes[name] < -1:
      raise ValueError(f"--mesh axis {name!r} has size {axes[name]}; sizes are >= 1 (or -1)")
  if sum(v == -1 for v in axes.values()) > 1:
    raise ValueError(f"--mesh may leave at most one axis size as -1, got {spec!r}")
  return axes


def make_mesh(spec: str | Mapping[str, int], *, devices: Sequence | None = None,
              axis_types: tuple | None = None) -> Mesh:
  """A named device mesh from ``"data=2,model=4"`` (or a dict).

  The product of the sizes must divide the number of devices (all of ``jax.devices()`` —
  every process's — unless ``devices`` is given); a smaller mesh uses the first devices.
  Axes are ``AxisType.Auto`` by default: shardings are propagated by the compiler, as with
  ``pjit``, so models written without sharding annotations run unchanged.
  """
  if not isinstance(spec, str):
    spec = ",".join(f"{k}={v}" for k, v in dict(spec).items())
  axes = parse_mesh(spec)
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  known = math.prod(v for v in axes.values() if v != -1)
  if -1 in axes.values():
    if n % known:
      raise ValueError(f"mesh {axes}: the fixed sizes multiply to {known}, which does not "
                       f"divide the {n} devices")
    axes = {k: (n // known if v == -1 else v) for k, v in axes.items()}
  size = math.prod(axes.values())
  if size > n or n % size:
    raise ValueError(f"mesh {axes} needs {size} devices, which does not divide the {n} "
                     f"available ({jax.devices()[0].platform}); pick sizes whose product "
                     f"divides {n}")
  if size != n and jax.process_count() > 1:
    raise ValueError(f"mesh {axes} uses {size} of the {n} devices; across "
                     f"{jax.process_count()} processes a mesh must span every device")
  if axis_types is None:
    axis_types = (AxisType.Auto,) * len(axes)
  return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=axis_types,
                       devices=devices[:size])


def batch_sharding(mesh: Mesh, axis: str | None = "data") -> NamedSharding:
  """Leading (batch) axis sharded over ``axis``, the rest replicated (everything replicated
  when the mesh has no such axis: no data parallelism, e.g. ``--mesh model=8``)."""
  return NamedSharding(mesh, P(axis) if axis in mesh.axis_names else P())


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# --- Partition-spec rules for model parameters ------------------------------------------------
#
# Logical axes: "embed" (the residual width), "heads" (attention inner width), "mlp" (the
# feed-forward inner width), "vocab"; None = never sharded. A rule names the *kernel* (or a
# lone parameter); a Linear's bias and adapter factors are derived from its kernel's rule.

_COLUMN = ("embed", "heads")
_ROW = ("heads", "embed")

VIT_RULES = (
    (r"attention\.(query|key|value)\.kernel$", _COLUMN),
    (r"attention\.output\.kernel$", _ROW),
    (r"mlp\.fc1\.kernel$", ("embed", "mlp")),
    (r"mlp\.fc2\.kernel$", ("mlp", "embed")),
    (r"patch_embeddings\.kernel$", (None, None, None, "embed")),
    (r"embeddings\.(position_embeddings|cls_token)$", (None, None, "embed")),
    (r"pooler\.dense\.kernel$", ("embed", None)),
    (r"classifier\.kernel$", ("embed", None)),
)

LLAMA_RULES = (
    (r"embed_tokens\.embedding$", ("vocab", "embed")),
    (r"self_attn\.(q_proj|k_proj|v_proj)\.kernel$", _COLUMN),
    (r"self_attn\.o_proj\.kernel$", _ROW),
    (r"mlp\.(gate_proj|up_proj)\.kernel$", ("embed", "mlp")),
    (r"mlp\.down_proj\.kernel$", ("mlp", "embed")),
    (r"lm_head\.kernel$", ("embed", "vocab")),
)

SAM_RULES = (
    # Vision encoder (a ViT-Det): fused qkv is column-parallel, proj row-parallel.
    (r"attn\.qkv\.kernel$", _COLUMN),
    (r"attn\.proj\.kernel$", _ROW),
    (r"mlp\.lin1\.kernel$", ("embed", "mlp")),
    (r"mlp\.lin2\.kernel$", ("mlp", "embed")),
    (r"patch_embed\.kernel$", (None, None, None, "embed")),
    (r"pos_embed$", (None, None, None, "embed")),
    # Mask-decoder attention (two-way transformer); its MLPs are small and stay replicated.
    (r"(q_proj|k_proj|v_proj)\.kernel$", _COLUMN),
    (r"out_proj\.kernel$", _ROW),
)

PARAM_RULES: dict[str, tuple] = {"vit": VIT_RULES, "llama": LLAMA_RULES, "sam": SAM_RULES}

PRESETS: dict[str, dict[str, str]] = {
    "replicated": {},
    "tp": {"heads": "model", "mlp": "model", "vocab": "model"},
    "fsdp": {"embed": "data"},
    "fsdp_tp": {"embed": "data", "heads": "model", "mlp": "model", "vocab": "model"},
}

_DERIVED = ("bias", "lora_a", "lora_b", "lora_e")   # take their axes from the sibling kernel


def model_type_of(model) -> str:
  """"vit" / "llama" / "sam" from the model's class name (ViTModel, LlamaForCausalLM, ...)."""
  name = type(model).__name__.lower()
  for key in PARAM_RULES:
    if name.startswith(key):
      return key
  raise ValueError(f"no sharding rules for a {type(model).__name__}; pass model_type= one of "
                   f"{sorted(PARAM_RULES)} or add rules to PARAM_RULES")


def _rules(model_type: str):
  if model_type not in PARAM_RULES:
    raise ValueError(f"model_type must be one of {sorted(PARAM_RULES)}, got {model_type!r}")
  return PARAM_RULES[model_type]


def _preset(preset: str) -> dict[str, str]:
  if preset not in PRESETS:
    raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
  return PRESETS[preset]


def _match(path: str, rules) -> tuple | None:
  for pattern, axes in rules:
    if re.search(pattern, path):
      return axes
  return None


def logical_axes(path: str, ndim: int, rules) -> tuple:
  """Logical axes of the parameter at dotted ``path`` (None where nothing matches).

  A Linear's ``bias`` → (o,), ``lora_a`` → (i, None), ``lora_b`` → (None, o), ``lora_e`` →
  (None,), with (i, ..., o) its kernel's axes; a ``bias`` of a layer with no kernel rule
  (layer norms) is replicated.
  """
  module, _, name = path.rpartition(".")
  if name in _DERIVED:
    kernel = _match(f"{module}.kernel" if module else "kernel", rules)
    if kernel is None:
      return (None,) * ndim
    axes = {"bias": (kernel[-1],), "lora_a": (kernel[0], None),
            "lora_b": (None, kernel[-1]), "lora_e": (None,)}[name]
  else:
    axes = _match(path, rules)
    if axes is None:
      return (None,) * ndim
  if len(axes) != ndim:
    raise ValueError(f"sharding rule for {path!r} gives {len(axes)} axes {axes}, but the "
                     f"parameter has {ndim} dimensions")
  return axes


def to_spec(axes: tuple, shape: tuple, mesh: Mesh, preset: str, *, skip: tuple = (),
            strict: bool = False, where: str = "") -> P:
  """Logical axes → a PartitionSpec on ``mesh`` under ``preset``.

  A mesh axis that the mesh lacks, that ``skip`` names, that the spec already used, or whose
  size does not divide the dimension leaves that dimension replicated (``strict=True``
  raises on the last case instead).
  """
  mapping = _preset(preset)
  used, out = set(skip), []
  for dim, logical in zip(shape, axes):
    axis = mapping.get(logical) if logical is not None else None
    if axis is None or axis not in mesh.shape or axis in used:
      out.append(None)
      continue
    if dim % mesh.shape[axis]:
      if strict:
        raise ValueError(f"{where or 'parameter'}: dimension {dim} ({logical}) is not "
                         f"divisible by mesh axis {axis!r} of size {mesh.shape[axis]}")
      out.append(None)
      continue
    used.add(axis)
    out.append(axis)
  return P(*out)


def _dotted(keypath) -> str:
  parts = []
  for k in keypath:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name != "value":   # the array inside an nnx.Variable
        parts.append(k.name)
    else:
      parts.append(str(k))
  return ".".join(parts)


def state_shardings(state, mesh: Mesh, *, model_type: str, preset: str = "tp",
                    strict: bool = False):
  """The NamedSharding tree (same structure as ``state``, e.g. ``nnx.state(model)``)."""
  rules = _rules(model_type)

  def one(keypath, x):
    path = _dotted(keypath)
    axes = logical_axes(path, len(x.shape), rules)
    return NamedSharding(mesh, to_spec(axes, x.shape, mesh, preset, strict=strict, where=path))

  return jax.tree_util.tree_map_with_path(one, state)


def shard_model(model: nnx.Module, mesh: Mesh, preset: str = "tp", *,
                model_type: str | None = None, strict: bool = False) -> nnx.Module:
  """Place ``model``'s parameters (adapters included) on ``mesh`` by ``preset``, in place."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, model_type=model_type or model_type_of(model),
                              preset=preset, strict=strict)
  nnx.update(model, jax.device_put(state, shardings))
  return model


def sharded_forward(model: nnx.Module, mesh: Mesh, *, preset: str = "tp",
                    model_type: str | None = None, batch_axis: str = "data",
                    fn: Callable | None = None, out_sharding=None):
  """Compile ``fn(model, batch)`` (default ``model(batch)``) over (graphdef, state).

  Returns ``(forward, state)``: ``state`` is the model's state placed by ``preset``;
  ``forward(state, batch)`` is ``jax.jit`` with ``in_shardings=(state shardings, batch
  over batch_axis)`` and ``out_shardings`` (default: every output's leading axis over
  ``batch_axis``). An adapter the model carries unmerged is sharded with its layer.
  """
  graphdef, state = nnx.split(model)
  shardings = state_shardings(state, mesh, model_type=model_type or model_type_of(model),
                              preset=preset)
  state = jax.device_put(state, shardings)
  data = batch_sharding(mesh, batch_axis)
  fn = fn or (lambda m, x: m(x))

  def run(state, batch):
    return fn(nnx.merge(graphdef, state), batch)

  forward = jax.jit(run, in_shardings=(shardings, data),
                    out_shardings=data if out_sharding is None else out_sharding)
  return forward, state


# --- Adapters and the stacked library ---------------------------------------------------------

def adapter_shardings(adapter, mesh: Mesh, *, model_type: str, preset: str = "tp",
                      lead: str | None = None, strict: bool = False):
  """NamedShardings for an exchange-form adapter (or a stack of them, ``lead`` = the mesh
  axis of the leading library axis): LoRA/SVDLoRA leaves whose fields are shardings."""
  rules = _rules(model_type)
  skip = () if lead is None else (lead,)

  def one(path, leaf):
    def spec(name, x):
      shape = x.shape[1:] if lead is not None else x.shape
      axes = logical_axes(f"{path}.lora_{name}", len(shape), rules)
      inner = to_spec(axes, shape, mesh, preset, skip=skip, strict=strict,
                      where=f"{path}.{name}")
      return NamedSharding(mesh, P(lead, *inner) if lead is not None else inner)
    fields = {f.name: spec(f.name, getattr(leaf, f.name)) for f in dataclasses.fields(leaf)}
    return type(leaf)(**fields)

  return from_flat({p: one(p, leaf) for p, leaf in to_flat(adapter).items()})


def stack_adapters(adapters: Sequence, *, multiple_of: int = 1):
  """k exchange-form adapters → one tree whose leaves carry a leading k axis.

  Per layer: all SVD-LoRA → SVDLoRA(a [k, in, r], e [k, r], b [k, r, out]); otherwise
  LoRA(a [k, in, r], b [k, r, out]) with each e folded into its b (exact). Ranks are padded
  to the largest with zero columns of a / rows of b (exact: they add nothing). With
  ``multiple_of`` the stack is padded with zero adapters to a multiple of it (so k divides
  the library mesh axis); give those entries any weight, e.g. 0.
  """
  from rpe_jax.compose import check_same_structure   # imported late: compose imports models
  adapters = list(adapters)
  if not adapters:
    raise ValueError("stack_adapters: adapters is empty")
  if multiple_of < 1:
    raise ValueError(f"stack_adapters: multiple_of must be >= 1, got {multiple_of}")
  check_same_structure(adapters)
  flats = [to_flat(a) for a in adapters]
  k = len(adapters)
  k_pad = -(-k // multiple_of) * multiple_of

  def stack(path):
    leaves = [f[path] for f in flats]
    r = max(leaf.rank for leaf in leaves)
    dtype = jnp.result_type(*[x for leaf in leaves for x in jax.tree.leaves(leaf)])
    svd = all(isinstance(leaf, SVDLoRA) for leaf in leaves)
    if not svd:
      leaves = [leaf.to_lora() for leaf in leaves]
    pad = lambda x, axis: jnp.pad(x.astype(dtype), [(0, r - x.shape[axis]) if i == axis
                                                    else (0, 0) for i in range(x.ndim)])
    a = jnp.stack([pad(leaf.a, 1) for leaf in leaves])
    b = jnp.stack([pad(leaf.b, 0) for leaf in leaves])
    extra = [(0, k_pad - k)]
    a, b = jnp.pad(a, extra + [(0, 0)] * 2), jnp.pad(b, extra + [(0, 0)] * 2)
    if svd:
      e = jnp.pad(jnp.stack([pad(leaf.e, 0) for leaf in leaves]), extra + [(0, 0)])
      return SVDLoRA(a, e, b)
    return LoRA(a, b)

  return from_flat({path: stack(path) for path in flats[0]})


def library_shardings(stack, mesh: Mesh, *, axis: str = "data", model_type: str | None = None,
                      preset: str = "tp"):
  """Shardings of a stacked library: the k axis over ``axis``; with ``model_type`` each
  factor is also sharded like its base layer on the other mesh axes."""
  if axis not in mesh.shape:
    raise ValueError(f"library axis {axis!r} is not a mesh axis {tuple(mesh.axis_names)}")
  if model_type is not None:
    return adapter_shardings(stack, mesh, model_type=model_type, preset=preset, lead=axis)
  return jax.tree.map(lambda x: NamedSharding(mesh, P(axis)), stack)


def place_library(stack, mesh: Mesh, axis: str = "data", *, model_type: str | None = None,
                  preset: str = "tp"):
  """``device_put`` a stacked library with its k axis sharded over ``axis``."""
  for path, leaf in to_flat(stack).items():
    k = leaf.a.shape[0]
    if k % mesh.shape.get(axis, 1):
      raise ValueError(f"library of {k} adapters ({path}) does not split over mesh axis "
                       f"{axis!r} of size {mesh.shape[axis]}; stack with "
                       f"stack_adapters(..., multiple_of={mesh.shape[axis]})")
  return jax.device_put(stack, library_shardings(stack, mesh, axis=axis,
                                                 model_type=model_type, preset=preset))


# --- Exact composition of a sharded library ---------------------------------------------------

def _concat_stacked(leaf, w):
  """A stacked leaf [k, ...] → its rank concatenation with the weights on b (or e):
  a = [a_1 … a_k] [in, k·r], b = [w_1 b_1; …; w_k b_k] [k·r, out] (``models.lora.concat``)."""
  k, n_in, r = leaf.a.shape
  dtype = jnp.result_type(*jax.tree.leaves(leaf))
  a = jnp.moveaxis(leaf.a, 0, 1).reshape(n_in, k * r).astype(dtype)
  b = leaf.b.reshape(k * r, leaf.b.shape[-1]).astype(dtype)
  if isinstance(leaf, SVDLoRA):
    return SVDLoRA(a, (w[:, None] * leaf.e).astype(dtype).reshape(k * r), b)
  return LoRA(a, (w[:, None, None] * leaf.b).astype(dtype).reshape(k * r, -1))


def _row_axes(rows: int, mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes (in mesh order) over which ``rows`` rows split evenly, greedily."""
  axes, size = [], 1
  for name in mesh.axis_names:
    if rows % (size * mesh.shape[name]) == 0:
      axes.append(name)
      size *= mesh.shape[name]
  return tuple(axes)


def tsqr(x: jax.Array, mesh: Mesh, axes: tuple[str, ...] | None = None):
  """Thin QR of a tall matrix whose rows are sharded over ``axes`` (TSQR).

  Each device factors its row block X_j = Q_j R_j; the small R_j are all-gathered and
  factored once more, [R_1; …; R_p] = Q' R (replicated); then Q = diag(Q_j) Q', so
  X = Q R with Q's rows sharded like X's and only the c × K blocks R_j communicated.
  """
  axes = _row_axes(x.shape[0], mesh) if axes is None else tuple(axes)
  if not axes:
    return jnp.linalg.qr(x)

  def local(xb):
    q1, r1 = jnp.linalg.qr(xb)
    stacked = jax.lax.all_gather(r1, axes, tiled=True)
    q2, r = jnp.linalg.qr(stacked)
    block = jax.lax.dynamic_slice_in_dim(q2, jax.lax.axis_index(axes) * r1.shape[0],
                                         r1.shape[0])
    return q1 @ block, r

  return jax.shard_map(local, mesh=mesh, in_specs=P(axes, None),
                       out_specs=(P(axes, None), P()), check_vma=False)(x)


def _truncate_sharded(leaf, mesh: Mesh, rank: int | None, energy: float | None):
  """``models.lora.truncate`` with the two QRs done by TSQR on the sharded factors and the
  small core SVD replicated: a = Qa Ra, bᵀ = Qb Rb, Ra C Rbᵀ = U S Vᵀ → (Qa U, S, Vᵀ Qbᵀ)."""
  dtype = leaf.dtype
  ct = jnp.promote_types(jnp.result_type(*jax.tree.leaves(leaf)), jnp.float32)
  qa, ra = tsqr(leaf.a.astype(ct), mesh)
  qb, rb = tsqr(leaf.b.astype(ct).T, mesh)
  if isinstance(leaf, SVDLoRA):
    ra = ra * leaf.e.astype(ct)
  u, s, vt = jnp.linalg.svd(ra @ rb.T, full_matrices=False)
  r = s.shape[0] if rank is None else min(rank, s.shape[0])
  if energy is not None and rank is not None:
    s = jnp.where(_energy_keep(s, energy, float(jnp.finfo(ct).eps)), s, 0)
  return SVDLoRA((qa @ u[:, :r]).astype(dtype), s[:r].astype(dtype),
                 (vt[:r] @ qb.T).astype(dtype))


def _compose_stack(stack, w, mesh, rank, energy):
  """The jitted body of `sharded_combine`: concatenate every layer, then maybe truncate."""
  w = w.astype(jnp.promote_types(w.dtype, jnp.float32))

  def one(leaf):
    leaf = _concat_stacked(leaf, w)
    if rank is None and energy is None:
      return leaf
    return _truncate_sharded(leaf, mesh, rank, energy)

  return jax.tree.map(one, stack, is_leaf=is_lora)


def _out_shardings(out_sharding, shapes, mesh: Mesh, model_type, preset):
  if out_sharding is None and model_type is not None:
    return adapter_shardings(shapes, mesh, model_type=model_type, preset=preset)
  if out_sharding is None:
    out_sharding = replicated(mesh)
  if isinstance(out_sharding, P):
    out_sharding = NamedSharding(mesh, out_sharding)
  if isinstance(out_sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda _: out_sharding, shapes)
  return out_sharding


def sharded_combine(stack, weights, mesh: Mesh, *, rank: int | None = None,
                    energy: float | None = None, out_sharding=None,
                    model_type: str | None = None, preset: str = "tp"):
  """Σ_i w_i δθ_i over a placed, stacked library, compiled with explicit shardings.

  stack: from ``stack_adapters`` + ``place_library`` (leaves [k, ...], k sharded on a mesh
    axis); its arrays' shardings are the ``in_shardings``.
  weights: [k] (replicated); padded library entries are zero adapters (any weight).
  rank, energy: re-truncation as ``rpe_jax.compose.combine`` (see ``models.lora.truncate``):
    a static ``rank`` cap, Med-LEGO's ``energy`` threshold (with ``rank``: masked, static
    shape; without: the rank per layer is read from the singular values, then cut).
  out_sharding: the ``out_shardings`` — None (replicated, or by the adapter rules of
    ``model_type`` / ``preset`` when given), one ``NamedSharding`` / ``PartitionSpec`` for
    every array, or a tree like the result (e.g. from ``adapter_shardings``).
  Returns the composed adapter (rank-concatenated LoRA / SVD-LoRA, or truncated SVD-LoRA)
  with exactly the requested shardings.
  """
  flat = to_flat(stack)
  if not flat:
    raise ValueError("sharded_combine: stack is empty")
  k = next(iter(flat.values())).a.shape[0]
  for path, leaf in flat.items():
    if leaf.a.ndim != 3 or leaf.a.shape[0] != k:
      raise ValueError(f"sharded_combine: stack leaf {path!r} has a {tuple(leaf.a.shape)}; "
                       f"expected [k={k}, in, r] (build it with stack_adapters)")
  in_sh = jax.tree.map(lambda x: getattr(x, "sharding", None), stack)
  for x in jax.tree.leaves(in_sh):
    if not isinstance(x, NamedSharding) or x.mesh != mesh:
      raise ValueError("sharded_combine: the stack is not placed on this mesh; "
                       "call place_library(stack, mesh) first")
  weights = jnp.asarray(weights)
  if weights.shape != (k,):
    raise ValueError(f"sharded_combine: weights must have shape ({k},) for a stack of {k}, "
                     f"got {tuple(weights.shape)}")
  if not bool(jnp.all(jnp.isfinite(weights))):
    raise ValueError(f"sharded_combine: weights must be finite, got {np.asarray(weights)}")
  if rank is not None and (not isinstance(rank, (int, np.integer)) or rank < 1):
    raise ValueError(f"sharded_combine: rank must be an int >= 1, got {rank!r}")
  if energy is not None and not 0.0 < float(energy) <= 1.0:
    raise ValueError(f"sharded_combine: energy must be in (0, 1], got {energy!r}")
  static = (mesh, None if rank is None else int(rank), None if energy is None else float(energy))
  shapes = jax.eval_shape(lambda s, w: _compose_stack(s, w, *static), stack, weights)
  out_sh = _out_shardings(out_sharding, shapes, mesh, model_type, preset)
  # A module-level function with static options: repeated calls reuse the compilation.
  out = jax.jit(_compose_stack, static_argnums=(2, 3, 4), in_shardings=(in_sh, replicated(mesh)),
                out_shardings=out_sh)(stack, weights, *static)
  if energy is None or rank is not None:
    return out
  # Energy without a rank cap: the cut depends on the singular values, read per layer.
  eps = float(jnp.finfo(jnp.promote_types(jax.tree.leaves(out)[0].dtype, jnp.float32)).eps)
  cut = {p: _energy_count(np.asarray(leaf.e, np.float64), float(energy), eps)
         for p, leaf in to_flat(out).items()}

  def take(tree):
    return from_flat({p: SVDLoRA(l.a[:, :cut[p]], l.e[:cut[p]], l.b[:cut[p]])
                      for p, l in to_flat(tree).items()})

  return jax.jit(take, out_shardings=out_sh)(out)


def combine_on_mesh(adapters: Sequence, weights, mesh: Mesh, *, axis: str = "data",
                    rank: int | None = None, energy: float | None = None, out_sharding=None,
                    model_type: str | None = None, preset: str = "tp"):
  """``compose.combine`` on a mesh: stack (padded to split over ``axis``), place, and
  `sharded_combine` (the padded entries get weight 0). Without an ``axis`` axis in the
  mesh the library goes on the mesh's first axis."""
  axis = axis if axis in mesh.shape else mesh.axis_names[0]
  adapters = list(adapters)
  weights = jnp.asarray(weights)
  if weights.shape != (len(adapters),):
    raise ValueError(f"combine_on_mesh: weights must have shape ({len(adapters)},), "
                     f"got {tuple(weights.shape)}")
  stack = stack_adapters(adapters, multiple_of=mesh.shape.get(axis, 1))
  k = jax.tree.leaves(stack)[0].shape[0]
  placed = place_library(stack, mesh, axis, model_type=model_type, preset=preset)
  return sharded_combine(placed, jnp.pad(weights, (0, k - len(adapters))), mesh, rank=rank,
                         energy=energy, out_sharding=out_sharding, model_type=model_type,
                         preset=preset)


# --- The solver with its batch axis sharded ---------------------------------------------------

def sharded_solve(refs, targets, lam, mesh: Mesh, *, axis: str = "data",
                  independent: bool = False, solve: Callable | None = None, **solve_kwargs):
  """``solvers.sparse_simplex.solve`` for T targets with the batch axis over ``axis``.

  refs: [k, d] shared (replicated) or [T, k, d] (sharded with the targets); targets [T, d];
  T must split evenly over ``axis``; lam: one scalar λ for all targets. Compiled as
  ``jax.jit`` with ``in_shardings`` / ``out_shardings`` on the batch axis; returns the ``Solution`` with every field's batch
  axis sharded over ``axis``.

  independent=False: one SPMD program over the whole batch; the loop's batch-wide tests
  (stop, polish) are all-reduced each iteration, so the result is the single-device one.
  independent=True: a ``shard_map`` in which each device runs the solver on its own
  problems to their own convergence (no per-iteration sync; a vmapped while-loop runs to
  the slowest member of its batch): equal to solving each device's block on its own.
  ``solve`` replaces the solver (same signature; default ``solvers.sparse_simplex.solve``).
  """
  if solve is None:
    from solvers.sparse_simplex import solve
  refs, targets = jnp.asarray(refs), jnp.asarray(targets)
  if targets.ndim != 2:
    raise ValueError(f"sharded_solve: targets must be [T, d], got {tuple(targets.shape)}")
  if refs.ndim not in (2, 3) or refs.shape[-1] != targets.shape[-1] or (
      refs.ndim == 3 and refs.shape[0] != targets.shape[0]):
    raise ValueError(f"sharded_solve: refs must be [k, d] or [T, k, d] matching targets "
                     f"{tuple(targets.shape)}, got {tuple(refs.shape)}")
  if axis not in mesh.shape:
    raise ValueError(f"sharded_solve: axis {axis!r} is not a mesh axis {mesh.axis_names}")
  if targets.shape[0] % mesh.shape[axis]:
    raise ValueError(f"sharded_solve: {targets.shape[0]} targets do not split over mesh axis "
                     f"{axis!r} of size {mesh.shape[axis]}; pad the batch")
  if jnp.ndim(lam) != 0:
    raise ValueError(f"sharded_solve: lam must be a scalar (one λ for every target), got "
                     f"shape {jnp.shape(lam)}")
  program = _solve_program(mesh, axis, refs.ndim == 3, bool(independent), solve,
                           tuple(sorted(solve_kwargs.items())))
  return program(refs, targets, jnp.asarray(lam))


@functools.lru_cache(maxsize=64)
def _solve_program(mesh, axis, per_target_refs, independent, solve, kwargs):
  """The compiled `sharded_solve`, built once per configuration (so calls reuse it)."""
  refs_spec = P(axis) if per_target_refs else P()

  def body(refs, targets, lam):
    refs = jnp.broadcast_to(refs, targets.shape[:-1] + refs.shape[-2:])
    return solve(refs, targets, lam, **dict(kwargs))

  if independent:
    body = jax.shard_map(body, mesh=mesh, in_specs=(refs_spec, P(axis), P()),
                         out_specs=P(axis), check_vma=False)
  batch = NamedSharding(mesh, P(axis))
  return jax.jit(body, in_shardings=(NamedSharding(mesh, refs_spec), batch, replicated(mesh)),
                 out_shardings=batch)

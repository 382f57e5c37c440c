"""Meshes and partition specs for adapters, models and adapter libraries, and placement.

Everything runs through ``jax.jit(..., in_shardings=..., out_shardings=...)`` (what ``pjit``
became) on a named ``Mesh``; user code does not change between one device and many.

* Mesh: ``make_mesh("data=2,model=4")`` (the CLI's ``--mesh``). ``data`` carries the batch
  (and the library axis, and FSDP shards); ``model`` carries tensor parallelism.
* Model parameters: each model's config carries its partition rules, a ClassVar
  ``sharding_rules`` of ``(path regex → logical axes)`` over the dotted ``nnx.state`` paths
  (``layers.3.attention.query.kernel``), as Levanter / MaxText logical-axis rules
  (``models.vit.ViTConfig``, ``models.llama.LlamaConfig``, ``models.sam.SamConfig``); a
  *preset* here maps logical axes to mesh axes:

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
  sharded over a device axis (``place_library``).

The operations on these placements (the exact composition of a sharded library with TSQR
re-truncation, the batch-sharded weight solve) are in ``rpe_jax.parallel.sharded_ops``; multi-host
start-up (``jax.distributed.initialize``), the ``--mesh`` flags and sharded orbax
checkpoints in ``rpe_jax.parallel.distributed``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from models.lora import LoRA, SVDLoRA, from_flat, to_flat

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
# The rules themselves belong to the models: ``<Config>.sharding_rules``.

# The configs a model-type string names (HF's ``model_type``), for callers that hold an
# adapter or a state but not the model. Any other config with ``sharding_rules`` is used
# directly: pass it (or its class, or the model) as ``model_type``.

PRESETS: dict[str, dict[str, str]] = {
    "replicated": {},
    "tp": {"heads": "model", "mlp": "model", "vocab": "model"},
    "fsdp": {"embed": "data"},
    "fsdp_tp": {"embed": "data", "heads": "model", "mlp": "model", "vocab": "model"},
}

_DERIVED = ("bias", "lora_a", "lora_b", "lora_e")   # take their axes from the sibling kernel


def _config_rules(config):
  rules = getattr(config, "sharding_rules", None)
  if rules is None:
    return None
  if not isinstance(rules, (tuple, list)) or not all(
      isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) for r in rules):
    name = config.__name__ if isinstance(config, type) else type(config).__name__
    raise ValueError(f"{name}.sharding_rules must be a sequence of (path regex, logical "
                     f"axes) pairs, got {rules!r}")
  return tuple(rules)


def partition_rules(model_type) -> tuple:
  """The ``(path regex, logical axes)`` rules for ``model_type``.

  model_type: a model (an ``nnx.Module`` whose ``config`` has a ``sharding_rules``
    ClassVar), or a model config or config class with ``sharding_rules`` (e.g.
    ``models.vit.ViTConfig``). The rules are read from what is handed in: this module
    imports no model port.
  """
  if isinstance(model_type, str):
    raise ValueError(f"model_type must be a model config with sharding_rules or a model "
                     f"(e.g. models.vit.ViTConfig), got the string {model_type!r}")
  if isinstance(model_type, nnx.Module):
    config = getattr(model_type, "config", None)
    rules = _config_rules(config)
    if rules is None:
      raise ValueError(
          f"no sharding rules for a {type(model_type).__name__}: its config "
          f"({type(config).__name__}) has no sharding_rules; give the config class a "
          f"ClassVar sharding_rules (as models.vit.ViTConfig does) or pass model_type=")
    return rules
  rules = _config_rules(model_type)
  if rules is None:
    raise ValueError(f"model_type must be a model config with sharding_rules or a model, "
                     f"got a {type(model_type).__name__}")
  return rules


def model_type_of(model) -> str:
  """"vit" / "llama" / "sam": the ``model_type`` of the config of ``model`` (ViTModel,
  LlamaForCausalLM, SamModel, ...); a ValueError naming the model class if it has none."""
  partition_rules(model)    # a clear error for a model without rules
  model_type = getattr(type(model.config), "model_type", None)
  if not isinstance(model_type, str):
    raise ValueError(f"the config of a {type(model).__name__} ({type(model.config).__name__}) "
                     f"has no model_type")
  return model_type


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


def state_shardings(state, mesh: Mesh, *, model_type, preset: str = "tp",
                    strict: bool = False):
  """The NamedSharding tree (same structure as ``state``, e.g. ``nnx.state(model)``).

  model_type: whose rules (``partition_rules``): "vit" / "llama" / "sam", a config with
  ``sharding_rules`` (e.g. ``model.config``), or the model.
  """
  rules = partition_rules(model_type)

  def one(keypath, x):
    path = _dotted(keypath)
    axes = logical_axes(path, len(x.shape), rules)
    return NamedSharding(mesh, to_spec(axes, x.shape, mesh, preset, strict=strict, where=path))

  return jax.tree_util.tree_map_with_path(one, state)


def shard_model(model: nnx.Module, mesh: Mesh, preset: str = "tp", *,
                model_type=None, strict: bool = False) -> nnx.Module:
  """Place ``model``'s parameters (adapters included) on ``mesh`` by ``preset``, in place.
  The rules are ``model.config.sharding_rules`` unless ``model_type`` names others."""
  state = nnx.state(model)
  rules = model if model_type is None else model_type
  shardings = state_shardings(state, mesh, model_type=rules, preset=preset, strict=strict)
  nnx.update(model, jax.device_put(state, shardings))
  return model


def sharded_forward(model: nnx.Module, mesh: Mesh, *, preset: str = "tp",
                    model_type=None, batch_axis: str = "data",
                    fn: Callable | None = None, out_sharding=None):
  """Compile ``fn(model, batch)`` (default ``model(batch)``) over (graphdef, state).

  Returns ``(forward, state)``: ``state`` is the model's state placed by ``preset``;
  ``forward(state, batch)`` is ``jax.jit`` with ``in_shardings=(state shardings, batch
  over batch_axis)`` and ``out_shardings`` (default: every output's leading axis over
  ``batch_axis``). An adapter the model carries unmerged is sharded with its layer. The
  rules are ``model.config.sharding_rules`` unless ``model_type`` names others.
  """
  graphdef, state = nnx.split(model)
  rules = model if model_type is None else model_type
  shardings = state_shardings(state, mesh, model_type=rules, preset=preset)
  state = jax.device_put(state, shardings)
  data = batch_sharding(mesh, batch_axis)
  fn = fn or (lambda m, x: m(x))

  def run(state, batch):
    return fn(nnx.merge(graphdef, state), batch)

  forward = jax.jit(run, in_shardings=(shardings, data),
                    out_shardings=data if out_sharding is None else out_sharding)
  return forward, state


# --- Adapters and the stacked library ---------------------------------------------------------

def adapter_shardings(adapter, mesh: Mesh, *, model_type, preset: str = "tp",
                      lead: str | None = None, strict: bool = False):
  """NamedShardings for an exchange-form adapter (or a stack of them, ``lead`` = the mesh
  axis of the leading library axis): LoRA/SVDLoRA leaves whose fields are shardings.
  model_type: the base model's rules, as ``state_shardings`` ("vit", a config, a model)."""
  rules = partition_rules(model_type)
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


def library_shardings(stack, mesh: Mesh, *, axis: str = "data", model_type=None,
                      preset: str = "tp"):
  """Shardings of a stacked library: the k axis over ``axis``; with ``model_type`` each
  factor is also sharded like its base layer on the other mesh axes."""
  if axis not in mesh.shape:
    raise ValueError(f"library axis {axis!r} is not a mesh axis {tuple(mesh.axis_names)}")
  if model_type is not None:
    return adapter_shardings(stack, mesh, model_type=model_type, preset=preset, lead=axis)
  return jax.tree.map(lambda x: NamedSharding(mesh, P(axis)), stack)


def place_library(stack, mesh: Mesh, axis: str = "data", *, model_type=None,
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

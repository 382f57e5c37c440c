"""The main job as a library API: prototype → retrieve → weigh → compose.

For one or many unlabeled targets:

1. the target prototype: given ([d] or a batch [B, d]) or computed from a dataset with the
   base model's encoder (``dataset_prototypes``);
2. the k nearest library prototypes (exact squared L2, ``Library.query``);
3. weights from a strategy (``rpe_jax.weighting``), all targets in one batched solve,
   reusing the retrieved references and squared distances;
4. the exact composition Σ w_i δθ_i (``rpe_jax.compose.combine``), optionally re-truncated
   (``compose_targets``).

The command line over it is ``python -m rpe_jax.compose`` (``rpe_jax.cli.compose``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


class Clock:
  """Seconds spent per named phase: ``with clock("weigh"): ...``."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  def __call__(self, name):
    clock = self

    class _Span:
      def __enter__(self):
        self.start = time.perf_counter()

      def __exit__(self, *exc):
        clock.seconds[name] = clock.seconds.get(name, 0.0) + time.perf_counter() - self.start

    return _Span()


class ComposeResult(NamedTuple):
  """What ``compose_targets`` returns, per target b of the batch."""

  retrieval: Any        # ``Library.query``'s result: names, distances, references [B, k, ...]
  weights: Any          # ``weighting.compute_weights``'s result (weights [B, k], status, ...)
  adapters: list        # the composed exchange-form adapter of each target
  composed: list        # the names composed for each target (those with a non-zero weight)


def open_library(path):
  """The library at ``path``, read-only; an error names a folder that is none or is empty."""
  from rpe_jax.library.catalog import Library
  if not Path(path, "catalog.sqlite").exists():
    raise ValueError(f"--library {path} is not an adapter library (no catalog.sqlite)")
  library = Library.open(path, readonly=True)
  if not library.names():
    raise ValueError(f"library {path} is empty")
  return library


def targets_from_prototypes(files) -> tuple[list[str], np.ndarray]:
  """(names, z [B, d] float32) from .npy files of one [d] prototype or a batch [B, d]."""
  from rpe_jax.library import untrusted
  names, rows = [], []
  for file in files:
    z = untrusted.read_npy(file, "--prototype")
    if z.ndim == 1:
      z = z[None]
    if z.ndim != 2 or 0 in z.shape:
      raise ValueError(f"--prototype {file}: expected a non-empty [d] or [B, d] array, got "
                       f"{z.dtype} {list(z.shape)}")
    z = untrusted.check_float32(z, f"--prototype {file}")
    stem = Path(file).stem
    names += [stem] if len(z) == 1 else [f"{stem}[{i}]" for i in range(len(z))]
    rows.append(z)
  dims = {r.shape[1] for r in rows}
  if len(dims) != 1:
    raise ValueError(f"--prototype files have different dimensions {sorted(dims)}")
  return names, np.concatenate(rows)


def load_datasets(uris, split: str = "test", data_root: str | None = None) -> tuple:
  """(task, datasets): the ``split`` of each dataset ``uris`` name, read by the task their
  scheme belongs to (``rpe_jax.tasks.contract``); URIs of different tasks are refused."""
  from rpe_jax.tasks import registry as contract
  names = {uri: contract.uri_task_name(uri) for uri in uris}
  if len(set(names.values())) > 1:
    raise ValueError("--data URIs of different tasks: "
                     + ", ".join(f"{u} ({t})" for u, t in names.items()))
  task = contract.task_named(next(iter(names.values())))
  return task, [task.load(uri, split, data_root=data_root) for uri in uris]


def dataset_prototypes(task, task_model, datasets, pooling,
                       progress) -> tuple[np.ndarray, list[int]]:
  """(z [B, d], sizes): the prototype of each dataset under the model's (frozen) encoder."""
  protos = [task.prototype(task_model, ds, pooling=pooling, progress=progress)
            for ds in datasets]
  return np.stack([p.z for p in protos]), [p.n for p in protos]


def check_library_task(library, encoder, task_name: str) -> None:
  """Refuse a library whose adapters (of ``encoder``) record another task than the
  model's; entries that record none (older libraries) are taken as they are."""
  from rpe_jax.tasks.contract import TASK_NAMES
  for entry in library.entries(encoder=encoder):
    recorded = entry.metadata.get("task") if isinstance(entry.metadata, dict) else None
    if recorded in TASK_NAMES and recorded != task_name:
      raise ValueError(f"library adapter {entry.name!r} is a {recorded} adapter, but the "
                       f"model is a {task_name} model; composing them is meaningless")


def on_mesh(task_model, model, mesh):
  """``task_model`` running ``model`` on ``mesh``: its weights placed by the model's own
  partition rules (tensor-parallel over ``model``, ``rpe_jax.parallel.sharding``), and its
  batches split over ``data``; as is without a mesh."""
  if mesh is None:
    return task_model._replace(model=model)
  from rpe_jax.parallel.sharding import shard_model
  return task_model._replace(model=shard_model(model, mesh), mesh=mesh)


def predict_targets(task, task_model, datasets, adapters, *, evaluate: bool = False,
                    progress: bool = False, clock=None, mesh=None,
                    **options) -> tuple[list, list]:
  """(predictions, metrics) of the base model carrying each composed adapter on its
  target dataset; metrics are None unless ``evaluate``. With a ``mesh`` the forward runs
  data-parallel over ``data`` and tensor-parallel over ``model`` (``on_mesh``)."""
  from rpe_jax.compose import with_adapter
  clock = clock or Clock()
  predictions, metrics = [], []
  for ds, adapter in zip(datasets, adapters):
    with clock("predict"):
      try:
        adapted = with_adapter(task_model.model, adapter)
      except ValueError as e:
        lines = str(e).splitlines()
        raise ValueError("the composed adapter does not fit the model (an adapter of "
                         f"another base model?): {lines[min(1, len(lines) - 1)].strip()}"
                         ) from None
      predictions.append(task.predict(on_mesh(task_model, adapted, mesh), ds,
                                      progress=progress, **options))
    with clock("score"):
      metrics.append(task.score(predictions[-1], ds, **options) if evaluate else None)
  return predictions, metrics


def _one_base_model(library, found, encoder, base_model, exclude) -> list[str]:
  """The names to exclude so that retrieval stays within ``base_model`` (or nothing when
  None); with ``found`` (a retrieval), an error if its adapters mix base models."""
  bases = {e.name: e.base_model for e in library.entries(encoder=encoder)}
  if found is None:
    if base_model is None:
      return list(exclude)
    if base_model not in bases.values():
      raise ValueError(f"--base-model {base_model!r}: the library has no adapters of it for "
                       f"this encoder; it has {sorted(set(bases.values()))}")
    return list(exclude) + [n for n, b in bases.items() if b != base_model]
  for b, row in enumerate(np.atleast_2d(found.names)):
    mixed = {}
    for name in map(str, row):
      mixed.setdefault(bases.get(name), name)
    if len(mixed) > 1:
      pairs = ", ".join(f"{n} ({m})" for m, n in mixed.items())
      raise ValueError(f"target {b}: the retrieved adapters belong to different base models "
                       f"[{pairs}]; composing them is meaningless — pass --base-model")
  return list(exclude)


def compose_targets(library, z, *, k, strategy, lam1=1.0, lam2=None, lam2_rel=None, encoder=None,
                    exclude=(), rank=None, energy=None, clock=None, mesh=None,
                    base_model=None):
  """Retrieve, weigh and compose for a batch of target prototypes z [B, d].

  The retrieved adapters of a target must share one base model: ``base_model`` restricts
  retrieval to it; without it a mix is refused, naming the adapters and their bases.

  One retrieval and one batched weight solve serve all targets; the references and
  squared distances that retrieval computed are handed to the weighting step.
  Returns a ``ComposeResult``.
  With a ``mesh`` the composition runs sharded (``rpe_jax.parallel.sharded_ops.combine_on_mesh``).
  """
  from rpe_jax import weighting
  from rpe_jax.compose import combine
  clock = clock or Clock()
  with clock("retrieve"):
    exclude = _one_base_model(library, None, encoder, base_model, exclude)
    found = library.query(z, k, encoder=encoder, exclude=exclude)
    _one_base_model(library, found, encoder, base_model, exclude)
  with clock("weigh"):
    w = weighting.compute_weights(found.references, z, strategy, lam1=lam1, lam2=lam2,
                                  lam2_rel=lam2_rel,
                                  sqdist=found.distances)
  weights = np.asarray(w.weights, np.float64)
  cache: dict[str, dict] = {}
  composed, kept = [], []
  for b in range(len(z)):
    # Adapters with weight exactly 0 contribute nothing; leaving them out is exact and
    # keeps the composed rank down (sparse weights are the point of the ℓ1 term).
    use = [i for i in range(k) if weights[b, i] != 0.0]
    names = [str(found.names[b, i]) for i in use]
    with clock("load"):
      for name in names:
        if name not in cache:
          cache[name] = library.load(name)
    with clock("combine"):
      if mesh is not None:
        from rpe_jax.parallel.sharded_ops import combine_on_mesh
        composed.append(combine_on_mesh([cache[n] for n in names],
                                        weights[b, use].astype(np.float32), mesh,
                                        rank=rank, energy=energy))
      else:
        composed.append(combine([cache[n] for n in names], weights[b, use].astype(np.float32),
                                rank=rank, energy=energy))
    kept.append(names)
  return ComposeResult(found, w, composed, kept)


class PerSampleResult(NamedTuple):
  """What ``predict_per_sample`` returns for one target dataset of N inputs."""

  retrieval: Any        # ``Library.query``'s result for the N inputs' features
  weights: Any          # ``weighting.compute_weights``'s result: weights [N, k], status ...
  union: list           # the adapters any input retrieved (the mixture's columns)
  mixture: np.ndarray   # W [N, |union|]: input n's weight of each union adapter (0: not
                        # retrieved)
  predictions: Any      # the task's predictions, in dataset order
  stats: dict           # JSON-able: distinct adapters per batch, weight statistics


def _mixture_stats(union, mixture, batch: int) -> dict:
  """How many adapters each batch used and how the per-input weights are spread."""
  nonzero = mixture != 0
  used = [int(nonzero[s:s + batch].any(axis=0).sum()) for s in range(0, len(mixture), batch)]
  values = mixture[nonzero]
  return {"inputs": int(len(mixture)), "union": [str(n) for n in union],
          "batch_size": batch, "distinct_adapters_per_batch": used,
          "nonzero_weights_per_input": {"mean": float(nonzero.sum(1).mean()),
                                        "min": int(nonzero.sum(1).min()),
                                        "max": int(nonzero.sum(1).max())},
          "weight": {"min": float(values.min()), "max": float(values.max()),
                     "mean": float(values.mean())},
          "negative_fraction": float((values < 0).mean()),
          "inputs_per_adapter": {str(n): int(c) for n, c in zip(union, nonzero.sum(0))}}


def predict_per_sample(library, task, task_model, ds, *, k, strategy, lam1=1.0, lam2=None,
                       lam2_rel=None, encoder=None, exclude=(), base_model=None,
                       pooling=None, evaluate=False, progress=False, clock=None,
                       mesh=None, features=None,
                       **options) -> tuple[PerSampleResult, dict | None]:
  """Per-sample composition: every input of ``ds`` gets its own weights, and the batch
  runs them all in one forward pass.

  1. each input's pooled feature under the frozen base is its own prototype;
  2. its k nearest library prototypes, all N inputs in one exact retrieval;
  3. all N weight problems in one batched solve (any strategy);
  4. the union U of the retrieved adapters and W [N, |U|] (``compose.mixture``): in batches
     of ``task.predict_batch`` inputs, every adapted layer computes
     x W0 + ((x A_U) ⊙ expand(W_b)) B_U, which for input n is exactly the forward of
     ``combine(U, W[n])`` (``rpe_jax.compose.mixture.with_mixture``). U is the union over
     the whole dataset, so every batch has the same shapes and compiles once. With a
     ``mesh`` each batch runs data-parallel over ``data`` and tensor-parallel over
     ``model`` (``on_mesh``).

  ``features``: the inputs' features [N, d] when already computed (``task.features``), so
  that several strategies on one target share the one pass of the base model.

  Returns (PerSampleResult, metrics or None).
  """
  import jax
  from rpe_jax import weighting
  from rpe_jax.compose.mixture import mixture_weights, set_mixture_weights, with_mixture
  clock = clock or Clock()
  with clock("features"):
    z = (task.features(task_model, ds, pooling=pooling, progress=progress)
         if features is None else np.asarray(features, np.float32))
  with clock("retrieve"):
    exclude = _one_base_model(library, None, encoder, base_model, exclude)
    found = library.query(z, k, encoder=encoder, exclude=exclude)
    _one_base_model(library, found, encoder, base_model, exclude)
  with clock("weigh"):
    # The N problems are padded (copies of the last) to a bucket of rows, so that targets
    # of nearby sizes share one compiled solve; the padding is dropped after.
    from rpe_jax.retrieval import padded_rows
    pad = np.minimum(np.arange(padded_rows(len(z))), len(z) - 1)
    w = weighting.compute_weights(np.asarray(found.references)[pad], z[pad], strategy,
                                  lam1=lam1, lam2=lam2, lam2_rel=lam2_rel,
                                  sqdist=np.asarray(found.distances)[pad])
    w = jax.tree.map(lambda x: x[:len(z)] if getattr(x, "ndim", 0) and len(x) == len(pad)
                     else x, w)
  union, mixture = mixture_weights(np.asarray(found.names), np.asarray(w.weights))
  with clock("load"):
    adapters = [library.load(str(name)) for name in union]
  batch, n = task.predict_batch, len(z)
  parts = []
  starts = range(0, n, batch)
  if progress:
    from tqdm.auto import tqdm
    starts = tqdm(starts, desc="predict per sample", unit="batch")
  with clock("predict"):
    for start in starts:
      # The last batch is completed with copies of its last input (dropped after), so
      # that every batch has the mixture's batch size.
      index = np.minimum(np.arange(start, start + batch), n - 1)
      rows = mixture[index].astype(np.float32)
      if start:   # the union's factors are built once; later batches swap the gates only
        mixed = set_mixture_weights(mixed, adapters, rows)
      else:
        try:
          mixed = with_mixture(task_model.model, adapters, rows)
        except ValueError as e:
          lines = str(e).splitlines()
          raise ValueError("the retrieved adapters do not fit the model (adapters of another "
                           f"base model?): {lines[min(1, len(lines) - 1)].strip()}") from None
      out = task.predict(on_mesh(task_model, mixed, mesh), task.subset(ds, index), **options)
      parts.append(out[:min(batch, n - start)])
  predictions = (np.concatenate(parts) if isinstance(parts[0], np.ndarray)
                 else [p for part in parts for p in part])
  metrics = None
  if evaluate:
    with clock("score"):
      metrics = task.score(predictions, ds, **options)
  result = PerSampleResult(found, w, list(union), mixture, predictions,
                           _mixture_stats(union, mixture, batch))
  return result, metrics

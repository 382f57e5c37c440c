"""The leave-one-out controls, shared by the classification and the task benchmarks.

* ``random`` — is retrieval worth anything? For each held-out site, ``draws`` subsets of k
  adapters drawn uniformly (without replacement) from the other sites, seeded by the run's
  seed and the site's name, each composed exactly with uniform weights
  (``rpe_jax.compose.combine``) and scored; the row is the mean over the draws, reported
  with their standard deviation. (With k = all the others there is one subset and random
  *is* avg, so the control uses a smaller k.)
* ``arrow`` — are the task prototypes worth anything beyond what the weights themselves
  say? Arrow's data-free prototypes (``rpe_jax.arrow``: per adapted layer, the top input
  direction of ΔW = a b, from the factors) replace the task prototypes. The target needs a
  vector in the same layer-wise input spaces: here the **mean input of each adapted layer
  over the target's unlabeled data** under the frozen base (what arrow.py suggests; Arrow
  itself routes every token by its own input, then we would need one composition per
  token). ``rpe_jax.arrow.arrow_sqdist`` turns those into squared distances in [0, 2];
  the k nearest are retrieved and weighted by ``sim`` (softmax(−λ1·d²)), as the ``sim``
  row does with the task prototypes.

The layer inputs are captured by a forward hook (``recorded_inputs``): ``Linear.__call__``
is wrapped for the duration of one eager forward pass (``jax.disable_jit``, so the inputs
are concrete arrays), and the sum and count of the input rows of the chosen layers are
accumulated in float64. Only the adapter's layers are recorded, by object identity, so the
forward must run on that very model object (not a split/merged copy).
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Callable, NamedTuple

import numpy as np

RANDOM_DRAWS = 20


# --- random ---------------------------------------------------------------------------------

def random_subsets(others, k: int, draws: int, *, seed: int, site: str) -> list[tuple[str, ...]]:
  """``draws`` subsets of ``k`` of ``others``, each uniform without replacement; seeded by
  ``seed`` and the held-out ``site`` (its CRC32), so reruns draw the same subsets."""
  others = list(others)
  if not 1 <= k <= len(others):
    raise ValueError(f"random control: k = {k} must be in 1 … {len(others)} (the others)")
  rng = np.random.default_rng([seed, zlib.crc32(site.encode()), 20])
  return [tuple(others[i] for i in sorted(rng.choice(len(others), k, replace=False)))
          for _ in range(draws)]


def uniform_composition(adapters: dict, names) -> dict:
  """Σ (1/k) δθ_i of the named adapters, composed exactly (rank concatenation)."""
  from rpe_jax.compose import combine
  return combine([adapters[n] for n in names], np.full(len(names), 1.0 / len(names), np.float32))


def combine_named(adapters: dict, names, weights) -> dict:
  """Σ w_i δθ_i of the named adapters, exactly (``rpe_jax.compose.combine``); zero weights
  are left out (exact, and a lower composed rank)."""
  from rpe_jax.compose import combine
  use = [(n, w) for n, w in zip(names, np.asarray(weights, np.float64)) if w != 0.0]
  return combine([adapters[n] for n, _ in use], np.array([w for _, w in use], np.float32))


def random_control(score: Callable[[dict], float], adapters: dict, others, *, k: int,
                   draws: int, seed: int, site: str) -> dict:
  """Score ``draws`` uniform compositions of k random others: {"mean", "std", "scores",
  "subsets"} (std over the draws, ddof = 1)."""
  subsets = random_subsets(others, k, draws, seed=seed, site=site)
  scores = [float(score(uniform_composition(adapters, s))) for s in subsets]
  return {"mean": float(np.mean(scores)),
          "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
          "scores": scores, "subsets": [list(s) for s in subsets]}


# --- arrow ----------------------------------------------------------------------------------

class ArrowLibrary(NamedTuple):
  """The Arrow prototypes of a set of adapters, stacked."""

  names: tuple[str, ...]
  vectors: np.ndarray        # [N, D]
  paths: tuple[str, ...]     # the L adapted layers, in the vectors' order
  sizes: tuple[int, ...]     # their input widths


def arrow_library(adapters: dict) -> ArrowLibrary:
  """Arrow prototypes (``rpe_jax.arrow.arrow_prototype``, from the factors) of adapters
  that share their layers."""
  from rpe_jax.arrow import arrow_prototype
  names = tuple(adapters)
  protos = [arrow_prototype(adapters[n]) for n in names]
  first = protos[0]
  for n, p in zip(names, protos):
    if (p.paths, p.sizes) != (first.paths, first.sizes):
      raise ValueError(f"adapter {n!r} adapts other layers than {names[0]!r}: no common "
                       "Arrow space")
  return ArrowLibrary(names, np.stack([np.asarray(p.vector, np.float64) for p in protos]),
                      first.paths, first.sizes)


@contextlib.contextmanager
def recorded_inputs(model, paths):
  """While active, every call of ``model``'s layers at ``paths`` adds its input rows to
  ``sums[path]`` ([in], float64) and their number to ``counts[path]``; yields (sums,
  counts). Runs with jit disabled (concrete inputs); restores ``Linear.__call__``."""
  import jax
  from models.lora import Linear, adapted_layers
  layers = adapted_layers(model)
  missing = [p for p in paths if p not in layers]
  if missing:
    raise ValueError(f"the model has no adapted layer at {missing[:3]}")
  owner = {id(layers[p]): p for p in paths}
  sums = {p: np.zeros(layers[p].in_features) for p in paths}
  counts = {p: 0 for p in paths}
  original = Linear.__call__

  def hooked(self, x):
    path = owner.get(id(self))
    if path is not None:
      rows = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
      sums[path] += rows.sum(0)
      counts[path] += rows.shape[0]
    return original(self, x)

  Linear.__call__ = hooked
  try:
    with jax.disable_jit():
      yield sums, counts
  finally:
    Linear.__call__ = original


def mean_layer_inputs(model, paths, forward: Callable[[], None]) -> np.ndarray:
  """[D]: the mean input of each layer at ``paths`` over one ``forward()`` of ``model``,
  concatenated in ``paths`` order (the Arrow prototypes' layout)."""
  with recorded_inputs(model, paths) as (sums, counts):
    forward()
  unseen = [p for p in paths if counts[p] == 0]
  if unseen:
    raise ValueError(f"the forward pass never called the layers {unseen[:3]}")
  return np.concatenate([sums[p] / counts[p] for p in paths])


def classification_forward(model, images, batch_size: int = 64) -> Callable[[], None]:
  """A forward of a ViT classifier over ``images`` [N, H, W, C] (its own preprocessing)."""
  import jax.numpy as jnp
  from models.preprocessing import Normalization
  norm = Normalization.for_model(model)

  def run():
    for s in range(0, len(images), batch_size):
      model(norm(jnp.asarray(images[s:s + batch_size])))

  return run


def arrow_weights(lib: ArrowLibrary, target, *, k: int, lam1: float, exclude=()) -> tuple:
  """(names, weights, sqdist) of the k adapters nearest to ``target`` ([D] mean layer
  inputs) by ``arrow_sqdist``, weighted by ``sim`` with temperature ``lam1``."""
  from rpe_jax.arrow import arrow_sqdist
  from rpe_jax.weighting import compute_weights
  keep = [i for i, n in enumerate(lib.names) if n not in set(exclude)]
  if not 1 <= k <= len(keep):
    raise ValueError(f"arrow control: k = {k} must be in 1 … {len(keep)}")
  d2 = np.asarray(arrow_sqdist(lib.vectors[keep], np.asarray(target), lib.sizes), np.float64)
  order = np.argsort(d2, kind="stable")[:k]
  refs = lib.vectors[keep][order]
  w = compute_weights(refs, np.zeros(refs.shape[1]), "sim", lam1=lam1, sqdist=d2[order])
  return ([lib.names[keep[i]] for i in order], np.asarray(w.weights, np.float64),
          d2[order])

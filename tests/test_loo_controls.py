"""benchmarks/controls.py: the random and Arrow controls of the leave-one-out benchmarks."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import controls  # noqa: E402

from models.lora import Linear, LoRA  # noqa: E402


class TwoLayers(nnx.Module):
  def __init__(self):
    self.first = Linear(3, 4, rngs=nnx.Rngs(0))
    self.second = Linear(4, 2, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.second(jax.nn.relu(self.first(x)))


def test_random_subsets_are_seeded_uniform_draws_of_distinct_others():
  others = ["a", "b", "c", "d", "e"]
  draws = controls.random_subsets(others, 3, 200, seed=0, site="x")
  assert draws == controls.random_subsets(others, 3, 200, seed=0, site="x")
  assert draws != controls.random_subsets(others, 3, 200, seed=1, site="x")
  assert draws != controls.random_subsets(others, 3, 200, seed=0, site="y")
  assert all(len(set(d)) == 3 and set(d) <= set(others) and list(d) == sorted(d)
             for d in draws)
  # Uniform: each member is in a draw with probability 3/5.
  freq = np.mean([[o in d for o in others] for d in draws], axis=0)
  np.testing.assert_allclose(freq, 0.6, atol=0.1)
  with pytest.raises(ValueError, match="k = 6"):
    controls.random_subsets(others, 6, 1, seed=0, site="x")


def test_uniform_composition_is_the_exact_mean_of_the_updates():
  rng = np.random.default_rng(0)
  adapters = {n: {"l": LoRA(rng.normal(size=(5, 2)).astype(np.float32),
                            rng.normal(size=(2, 3)).astype(np.float32))} for n in "abc"}
  got = controls.uniform_composition(adapters, ["a", "c"])["l"]
  want = (adapters["a"]["l"].delta() + adapters["c"]["l"].delta()) / 2
  np.testing.assert_allclose(np.asarray(got.delta()), np.asarray(want), atol=1e-5)
  named = controls.combine_named(adapters, ["a", "b", "c"], [0.25, 0.0, 0.75])["l"]
  assert named.rank == 4   # the zero weight is left out
  want = 0.25 * adapters["a"]["l"].delta() + 0.75 * adapters["c"]["l"].delta()
  np.testing.assert_allclose(np.asarray(named.delta()), np.asarray(want), atol=1e-5)


def test_mean_layer_inputs_records_each_layers_mean_input():
  model = TwoLayers()
  x = np.random.default_rng(0).normal(size=(2, 7, 3)).astype(np.float32)   # [B, tokens, in]
  got = controls.mean_layer_inputs(model, ("first", "second"),
                                   lambda: [model(jnp.asarray(x[i:i + 1])) for i in range(2)])
  hidden = np.asarray(jax.nn.relu(model.first(jnp.asarray(x))))
  np.testing.assert_allclose(got[:3], x.reshape(-1, 3).mean(0), atol=1e-6)
  np.testing.assert_allclose(got[3:], hidden.reshape(-1, 4).mean(0), atol=1e-5)
  assert Linear.__call__.__name__ == "__call__"   # the hook is gone again
  # A forward on a split/merged copy never calls these layer objects: a clear error.
  graphdef, state = nnx.split(model)
  with pytest.raises(ValueError, match="never called"):
    controls.mean_layer_inputs(model, ("first",),
                               lambda: nnx.merge(graphdef, state)(jnp.asarray(x)))
  with pytest.raises(ValueError, match="no adapted layer"):
    controls.mean_layer_inputs(model, ("third",), lambda: None)


def test_arrow_weights_retrieve_the_adapter_whose_direction_the_inputs_follow():
  eye = np.eye(4, dtype=np.float32)
  # Adapter i moves inputs along e_i only: its top input direction is e_i in both layers.
  adapters = {f"s{i}": {"p": LoRA(eye[:, i:i + 1] * (i + 1), np.ones((1, 2), np.float32)),
                        "q": LoRA(eye[:, i:i + 1], np.ones((1, 3), np.float32))}
              for i in range(4)}
  lib = controls.arrow_library(adapters)
  assert lib.paths == ("p", "q") and lib.sizes == (4, 4) and lib.vectors.shape == (4, 8)
  target = np.concatenate([[0.1, 0.2, 3.0, 0.1], [0.0, 0.1, -2.0, 0.3]])   # along e_2
  names, w, d2 = controls.arrow_weights(lib, target, k=2, lam1=1.0)
  assert names[0] == "s2" and len(names) == 2 and w.sum() == pytest.approx(1.0)
  assert w[0] > w[1] and d2[0] < d2[1]
  names, _, _ = controls.arrow_weights(lib, target, k=3, lam1=1.0, exclude=["s2"])
  assert "s2" not in names and len(names) == 3

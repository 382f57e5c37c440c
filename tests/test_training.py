"""The one training core against an independent oracle: optax.adamw run by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models.lora import Linear, LoRAParam, init_adapters
from rpe_jax.compose import adapter_of
from rpe_jax.training import OptimConfig, fit, learning_rate


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.dense = Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.dense(x)


def _mse(model, batch):
  err = model(batch["x"]) - batch["y"]
  return jnp.mean(err ** 2), {"n": jnp.float32(batch["x"].shape[0])}


def _data(steps, seed=0):
  rng = np.random.default_rng(seed)
  return [{"x": rng.normal(size=(4, 6)).astype(np.float32),
           "y": rng.normal(size=(4, 3)).astype(np.float32)} for _ in range(steps)]


@pytest.mark.parametrize("schedule,warmup", [("warmup_cosine", 3), ("cosine", 0)])
def test_fit_equals_optax_adamw_by_hand(schedule, warmup):
  steps = 12
  data = _data(steps)
  config = OptimConfig(lr=0.05, weight_decay=0.01, clip_norm=0.5, warmup_steps=warmup,
                       schedule=schedule)
  model = _Net(nnx.Rngs(0))
  result = fit(model, nnx.Param, _mse, lambda epoch: iter(data), epochs=1,
               steps_per_epoch=steps, config=config)

  # The oracle: optax's own adamw with the same schedule, applied with apply_updates.
  if schedule == "cosine":
    sched = optax.cosine_decay_schedule(0.05, steps)
  else:
    sched = optax.warmup_cosine_decay_schedule(0.0, 0.05, warmup, steps)
  tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(sched, weight_decay=0.01))
  graphdef, params = nnx.split(_Net(nnx.Rngs(0)))
  state = tx.init(params)
  losses = []
  for batch in data:
    loss, grads = jax.value_and_grad(
        lambda p: _mse(nnx.merge(graphdef, p), batch)[0])(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
  np.testing.assert_allclose(result.losses, losses, rtol=1e-5, atol=1e-6)
  for got, want in zip(jax.tree.leaves(nnx.state(result.model)), jax.tree.leaves(params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert len(result.history) == 1 and result.best_score is None
  # The epoch's loss is the n-weighted mean of the step losses (equal n here).
  assert result.history[0]["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
  assert float(learning_rate(config, steps)(steps - 1)) == pytest.approx(float(sched(steps - 1)))


def test_only_the_trainable_part_moves_and_the_best_epoch_is_kept():
  model = _Net(nnx.Rngs(0))
  init_adapters(model, ("dense",), 2, rngs=nnx.Rngs(1))
  frozen = np.asarray(model.dense.kernel[...])
  data = _data(5, seed=1)
  scores = iter([0.5, 0.9, 0.7])   # initial, epoch 0, epoch 1
  seen = []

  def evaluate(m):
    seen.append(jax.tree.map(np.asarray, adapter_of(m)))
    return next(scores)

  result = fit(model, LoRAParam, _mse, lambda epoch: iter(data), epochs=2, steps_per_epoch=5,
               config=OptimConfig(lr=0.05), evaluate=evaluate, score_name="val")
  np.testing.assert_array_equal(result.model.dense.kernel[...], frozen)
  assert result.best_epoch == 0 and result.best_score == 0.9 and result.initial_score == 0.5
  assert [h["val"] for h in result.history] == [0.9, 0.7]
  kept = adapter_of(result.model)["dense"]
  np.testing.assert_array_equal(kept.b, seen[1]["dense"].b)      # epoch 0's, not epoch 1's
  assert not np.array_equal(seen[1]["dense"].b, seen[2]["dense"].b)


def test_bad_arguments_are_named():
  model = _Net(nnx.Rngs(0))
  with pytest.raises(ValueError, match="schedule must be one of"):
    OptimConfig(schedule="linear")
  with pytest.raises(ValueError, match="lr must be > 0"):
    OptimConfig(lr=0.0)
  with pytest.raises(ValueError, match="nothing to train"):
    fit(model, LoRAParam, _mse, lambda e: iter(()), epochs=1, steps_per_epoch=1)


def test_the_step_donates_its_state_and_the_callers_model_survives(monkeypatch):
  """Each step consumes (donates) the parameters and optimiser state it is given, so a
  training run holds one copy of them on device; the caller's model is never donated."""
  from rpe_jax import training
  model = _Net(nnx.Rngs(0))
  init_adapters(model, ("dense",), 2, rngs=nnx.Rngs(1))
  before = jax.tree.map(np.asarray, nnx.state(model))
  b0 = np.asarray(adapter_of(model)["dense"].b)
  given = []
  real_step = training._step

  def spy(static, p, opt_state, *rest):
    given.append(jax.tree.leaves((p, opt_state)))
    return real_step(static, p, opt_state, *rest)

  monkeypatch.setattr(training, "_step", spy)
  result = fit(model, LoRAParam, _mse, lambda epoch: iter(_data(3)), epochs=2,
               steps_per_epoch=3, config=OptimConfig(lr=0.05), evaluate=lambda m: 0.0)
  assert len(given) == 6
  assert all(leaf.is_deleted() for leaves in given for leaf in leaves)
  for got, want in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(got, want)     # readable, unchanged
  assert not np.array_equal(adapter_of(result.model)["dense"].b, b0)   # it did train

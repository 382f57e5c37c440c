"""The one training core: fit the trainable part of an NNX model with AdamW, for every task.

A task supplies two things: a loss ``loss_fn(model, batch) -> (loss, aux)`` and the batches
of each epoch. The core splits the model into its trainable parameters p and the frozen
rest, and runs one jit-compiled step

    L(p)  = loss_fn(merge(p, rest), batch) + λ_⊥ Σ_layers ‖aᵀa − I‖² + ‖b bᵀ − I‖²
    u     = AdamW direction of clip_{‖·‖₂ ≤ c}(∇L(p))         (Adam moments + decoupled decay)
    p    ← p − η_t · u

(the second term of L is Med-LEGO's orthogonality penalty, on SVD-LoRA leaves only, when
λ_⊥ > 0). The scheduled rate η_t is an *argument* of the step, so the schedule — which
depends on the run's length — never forces a recompile, and the step's static part (model
structure, loss, hyper-parameters) is hashable: runs of the same shape share one compile.
``p − η u`` is exactly ``optax.adamw(schedule)``'s update.

``aux`` is a dict of per-batch *sums* (e.g. ``{"n": examples, "accuracy": correct}``); the
epoch's record divides them by Σ n (``n`` defaults to 1 per batch, i.e. a mean over steps).
With ``evaluate`` the model is scored after every epoch and the best epoch's parameters
are kept (strictly better wins, so the earliest best epoch wins ties); with a
``checkpoint_dir`` (orbax) the run is saved after every epoch and can resume bit-exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.lora import total_orthogonality_penalty
from rpe_jax.compose import adapter_of

SCHEDULES = ("warmup_cosine", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with global-norm clipping and a learning-rate schedule.

  ``schedule``: ``"warmup_cosine"`` (linear 0 → lr over ``warmup_steps``, then cosine to 0)
  or ``"cosine"`` (cosine from lr to 0, no warm-up).
  """

  lr: float = 3e-3
  weight_decay: float = 1e-4
  clip_norm: float = 1.0
  warmup_steps: int = 0
  schedule: str = "warmup_cosine"
  ortho_weight: float = 0.0

  def __post_init__(self):
    if not self.lr > 0:
      raise ValueError(f"lr must be > 0, got {self.lr}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


def learning_rate(config: OptimConfig, total_steps: int) -> optax.Schedule:
  """The schedule η_t of a run of ``total_steps`` steps."""
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(config.lr, total_steps)
  warmup = config.warmup_steps
  return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup,
                                            max(total_steps, warmup + 1))


def adamw_direction(weight_decay: float, clip_norm: float) -> optax.GradientTransformation:
  """AdamW without its learning rate (the step multiplies by the scheduled rate)."""
  return optax.chain(optax.clip_by_global_norm(clip_norm), optax.scale_by_adam(),
                     optax.add_decayed_weights(weight_decay))


class FitResult(NamedTuple):
  """What ``fit`` returns."""

  model: nnx.Module          # the model with the kept parameters (best epoch, else the last)
  losses: np.ndarray         # the objective at every step of this call
  history: list              # per epoch: loss, train_<aux>, <score_name>, lr, seconds
  best_epoch: int            # -1 when nothing was evaluated
  best_score: float | None   # the kept epoch's score (None without ``evaluate``)
  initial_score: float | None   # the score before training


class _Static(NamedTuple):
  """Everything the compiled step closes over; hashable, so equal runs share one compile."""

  graphdef: Any
  treedef: Any
  loss_fn: Callable
  weight_decay: float
  clip_norm: float
  ortho_weight: float


def _unflatten(static: _Static, p: dict):
  return jax.tree.unflatten(static.treedef, [p[k] for k in sorted(p)])


# p and the optimiser state are donated: the step updates them in place instead of holding
# a second copy on device (fit hands it a copy of the model's arrays, so the caller's
# model is untouched).
@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def _step(static: _Static, p, opt_state, rest, lr, batch):
  def objective(p):
    model = nnx.merge(static.graphdef, _unflatten(static, p), rest)
    loss, aux = static.loss_fn(model, batch)
    if static.ortho_weight:
      loss = loss + static.ortho_weight * total_orthogonality_penalty(adapter_of(model))
    return loss, aux
  (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(p)
  updates, opt_state = adamw_direction(static.weight_decay, static.clip_norm).update(
      grads, opt_state, p)
  p = jax.tree.map(lambda w, u: w - lr * u, p, updates)
  return p, opt_state, loss, aux


# --- checkpoints ----------------------------------------------------------------------------

def _manager(directory: str):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def _save(manager, epoch, state, meta) -> None:
  import orbax.checkpoint as ocp
  manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              meta=ocp.args.JsonSave(meta)))


def _restore(manager, template, expect: dict, directory: str):
  """(state, meta) of the latest checkpoint, or None; refuses one written for another run."""
  import orbax.checkpoint as ocp
  step = manager.latest_step()
  if step is None:
    return None
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  if any(meta.get(k) != v for k, v in expect.items()):
    raise ValueError(f"checkpoint in {directory} was written for another model or "
                     "configuration; use a fresh --checkpoint-dir or drop --resume")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract))).state
  return state, meta


# --- the loop -------------------------------------------------------------------------------

def _epoch_record(losses, auxes) -> dict:
  """Σ(loss·n)/Σn and Σ aux_k / Σn over one epoch's steps (host floats)."""
  losses, auxes = jax.device_get((losses, auxes))
  n = np.array([float(a.get("n", 1.0)) for a in auxes])
  total = max(float(n.sum()), 1.0)
  record = {"loss": float(np.sum(np.asarray(losses, np.float64) * n)) / total}
  for key in sorted(auxes[0]) if auxes else ():
    if key != "n":
      record[f"train_{key}"] = float(sum(float(a[key]) for a in auxes)) / total
  return record


def fit(model: nnx.Module, trainable, loss_fn: Callable, batches: Callable[[int], Iterable], *,
        epochs: int, steps_per_epoch: int, config: OptimConfig = OptimConfig(),
        evaluate: Callable[[nnx.Module], float] | None = None, score_name: str = "score",
        checkpoint_dir: str | None = None, resume: bool = False, identity: dict | None = None,
        stop_after: int | None = None, progress: bool = False,
        desc: str = "train") -> FitResult:
  """Train the ``trainable`` variables (an ``nnx`` filter) of ``model``.

  Args:
    model: the model; it is not modified (the result is a new model sharing frozen arrays).
    trainable: an ``nnx`` filter of what trains (``LoRAParam``; ``nnx.Param`` for all).
    loss_fn: ``loss_fn(model, batch) -> (scalar loss, aux dict of per-batch sums)``; make it
      hashable by value (a module-level function or a frozen dataclass), so that runs with
      equal losses share one compile.
    batches: ``batches(epoch)`` yields the ``steps_per_epoch`` batches of that epoch (pytrees
      of arrays of fixed shapes); seeding it by the epoch makes a resumed run exact.
    epochs, steps_per_epoch: the run's length (the schedule spans epochs · steps_per_epoch).
    evaluate: ``evaluate(model) -> score`` after every epoch; the best epoch is kept.
    checkpoint_dir / resume / identity: orbax checkpoints after every epoch; ``identity`` (a
      JSON dict) must match for a resume.
    stop_after: return after this many epochs of this call (resume later to finish).
  """
  if epochs < 1 or steps_per_epoch < 1:
    raise ValueError(f"epochs and steps per epoch must be >= 1, got {epochs}, {steps_per_epoch}")
  graphdef, params, rest = nnx.split(model, trainable, ...)
  leaves, treedef = jax.tree.flatten(params)
  if not leaves:
    raise ValueError("nothing to train: the model has no trainable parameters")
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  keys = [f"p{i:04d}" for i in range(len(leaves))]   # orbax-friendly names, in tree order
  initial_p = dict(zip(keys, leaves))   # the caller's arrays: never donated
  p = jax.tree.map(jnp.copy, initial_p)
  schedule = learning_rate(config, epochs * steps_per_epoch)
  static = _Static(graphdef, treedef, loss_fn, float(config.weight_decay),
                   float(config.clip_norm), float(config.ortho_weight))
  opt_state = adamw_direction(static.weight_decay, static.clip_norm).init(p)
  as_model = lambda q: nnx.merge(graphdef, _unflatten(static, q), rest)

  start, best_p, best_score, best_epoch, history = 0, initial_p, None, -1, []
  initial = evaluate(as_model(p)) if evaluate is not None else None
  losses = []
  manager = _manager(checkpoint_dir) if checkpoint_dir else None
  try:
    identity = {"paths": paths, **(identity or {})}
    if manager is not None and not resume and manager.latest_step() is not None:
      raise ValueError(f"checkpoint dir {checkpoint_dir} already holds checkpoints (up to "
                       f"epoch {manager.latest_step() + 1}); resume them or use a fresh dir")
    restored = _restore(manager, {"p": p, "opt": opt_state, "best": p}, identity,
                        checkpoint_dir) if manager is not None and resume else None
    if restored is not None:
      state, meta = restored
      p, opt_state, best_p = state["p"], state["opt"], state["best"]
      start, best_score, best_epoch = meta["epoch"] + 1, meta["best_score"], meta["best_epoch"]
      history = meta["history"]
    end = epochs if stop_after is None else min(epochs, start + stop_after)
    for epoch in range(start, end):
      t0 = time.perf_counter()
      it = batches(epoch)
      if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, total=steps_per_epoch, desc=f"{desc} epoch {epoch + 1}/{epochs}",
                  unit="step", leave=False)
      epoch_losses, auxes = [], []   # kept on device: no host sync inside the epoch
      for i, batch in enumerate(it):
        lr = np.float32(schedule(epoch * steps_per_epoch + i))
        p, opt_state, loss, aux = _step(static, p, opt_state, rest, lr, batch)
        epoch_losses.append(loss)
        auxes.append(aux)
      losses += epoch_losses
      record = {"epoch": epoch, **_epoch_record(epoch_losses, auxes)}
      if evaluate is not None:
        score = float(evaluate(as_model(p)))
        record[score_name] = score
        if best_score is None or score > best_score:
          # a copy: the next step donates p
          best_p, best_score, best_epoch = jax.tree.map(jnp.copy, p), score, epoch
      else:
        best_p = p   # the last epoch wins; reassigned after every epoch, so never stale
      record["lr"] = float(schedule((epoch + 1) * steps_per_epoch - 1))
      record["seconds"] = time.perf_counter() - t0
      history.append(record)
      if progress:
        extra = f" {score_name} {record[score_name]:.4f}" if evaluate is not None else ""
        print(f"{desc} epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}{extra}",
              file=sys.stderr, flush=True)
      if manager is not None:
        _save(manager, epoch, {"p": p, "opt": opt_state, "best": best_p},
              {"epoch": epoch, "best_score": best_score, "best_epoch": best_epoch,
               "history": history, **identity})
  finally:
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
  return FitResult(as_model(best_p), np.asarray(jax.device_get(losses), np.float32).reshape(-1),
                   history, best_epoch, best_score, initial)

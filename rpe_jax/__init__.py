"""rpe_jax: compose LoRA adapters for a new, unlabeled dataset with no training.

The public API, importable from here (each name is loaded on first use, so ``import
rpe_jax`` stays fast and does not import JAX):

    Library, LibraryError                  the adapter library (rpe_jax.library)
    prototype, Prototype                   streamed mean encoder feature (rpe_jax.prototypes)
    search, build_index                    exact top-k retrieval (rpe_jax.retrieval)
    compute_weights, Weights, STRATEGIES   weighting strategies (rpe_jax.weighting)
    lambda_path, LambdaPath                every λ2 of ``sparse`` in one batched solve
    combine, with_adapter, merge_into, adapter_of    exact composition (rpe_jax.compose)
    with_mixture, mixture_weights          per-input compositions in one batched forward
    set_mixture_weights                    new per-input weights on a mixture (gates only)
    medlego_merge, task_arithmetic, ties_merge, lora_average   merging (rpe_jax.merge)
    compose_targets, ComposeResult         the main job as a function (rpe_jax.pipeline)
    predict_per_sample, PerSampleResult    per-sample composition: one weight vector per input
    fit, OptimConfig                       the training core (rpe_jax.training)
    load_model                             an HF folder or a built-in name → model

Layers (lower never imports higher): solvers ← models ← core (compose, weighting,
retrieval, prototypes, batching, library, training, parallel) ← tasks ← pipeline ←
cli / demo.
"""

import importlib

_API = {
    "Library": "rpe_jax.library.catalog",
    "LibraryError": "rpe_jax.library.catalog",
    "prototype": "rpe_jax.prototypes",
    "Prototype": "rpe_jax.prototypes",
    "search": "rpe_jax.retrieval",
    "build_index": "rpe_jax.retrieval",
    "compute_weights": "rpe_jax.weighting",
    "Weights": "rpe_jax.weighting",
    "STRATEGIES": "rpe_jax.weighting",
    "lambda_path": "rpe_jax.weighting",
    "LambdaPath": "rpe_jax.weighting",
    "combine": "rpe_jax.compose",
    "with_adapter": "rpe_jax.compose",
    "merge_into": "rpe_jax.compose",
    "adapter_of": "rpe_jax.compose",
    "with_mixture": "rpe_jax.compose.mixture",
    "mixture_weights": "rpe_jax.compose.mixture",
    "set_mixture_weights": "rpe_jax.compose.mixture",
    "medlego_merge": "rpe_jax.merge",
    "task_arithmetic": "rpe_jax.merge",
    "ties_merge": "rpe_jax.merge",
    "lora_average": "rpe_jax.merge",
    "compose_targets": "rpe_jax.pipeline",
    "predict_per_sample": "rpe_jax.pipeline",
    "PerSampleResult": "rpe_jax.pipeline",
    "ComposeResult": "rpe_jax.pipeline",
    "fit": "rpe_jax.training",
    "OptimConfig": "rpe_jax.training",
    "load_model": "rpe_jax.cli.model_spec",
}

__all__ = sorted(_API)


def __getattr__(name: str):
  if name in _API:
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value   # cached: later lookups skip __getattr__
    return value
  raise AttributeError(f"module 'rpe_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))

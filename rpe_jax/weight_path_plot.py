"""The lasso-path picture of a ``weighting.lambda_path``: weights against λ2/λ*, as a PNG.

Top panel: each adapter's weight wᵢ(λ) against λ2/λ* (λ* the exact-penalty threshold;
past 1 the weights are the ``simplex`` ones, at 0 the ``lin`` ones). Bottom panel: the
reconstruction error ‖z − Σ wᵢzᵢ‖² (left axis) and ‖w‖₁ = 1 + 2·(negative mass) (right
axis). A problem whose λ* is 0 (its ``lin`` weights are already non-negative) is drawn
against the absolute λ2 instead. Drawn with matplotlib's object API on an Agg canvas (no
pyplot, no global backend change).

Example:
  >>> import numpy as np, tempfile, os
  >>> from rpe_jax import weighting
  >>> refs = np.array([[0., 0.], [1., 0.], [0., 1.]]); z = np.array([2., 2.])
  >>> path = weighting.lambda_path(refs, z, np.linspace(0, 1.5, 16), relative=True)
  >>> out = plot_lambda_path(path, os.path.join(tempfile.mkdtemp(), "path.png"), names=["a", "b", "c"])
  >>> os.path.getsize(out) > 0
  True
"""

from __future__ import annotations

import os

import numpy as np


def plot_lambda_path(path, file, *, index=(), names=None, title: str | None = None) -> str:
  """Draw one problem of a ``weighting.LambdaPath`` and write it as PNG to ``file``.

  Args:
    path: a ``weighting.LambdaPath``.
    file: the PNG file to write (its folder must exist).
    index: which problem of a batched path to draw (a tuple into the batch axes; () for an
      unbatched path).
    names: optional k labels of the adapters (default w1 … wk).
    title: optional figure title.

  Returns: ``file``.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  index = index if isinstance(index, tuple) else (index,)
  lam = np.asarray(path.lam)[index]
  if lam.ndim != 1:
    raise ValueError(f"index {index} must pick one problem of the path's batch {np.shape(path.lam)[:-1]}")
  weights = np.asarray(path.weights)[index]
  error, l1 = np.asarray(path.error)[index], np.asarray(path.l1)[index]
  lam_star = float(np.asarray(path.lam_star)[index])
  k = weights.shape[-1]
  names = [f"w{i + 1}" for i in range(k)] if names is None else [str(n) for n in names]
  if len(names) != k:
    raise ValueError(f"names has {len(names)} labels for {k} adapters")
  order = np.argsort(lam)
  relative = lam_star > 0
  x = (lam / lam_star if relative else lam)[order]

  fig = Figure(figsize=(7, 6), layout="constrained")
  FigureCanvasAgg(fig)
  top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
  for i in range(k):
    top.plot(x, weights[order, i], marker=".", label=names[i])
  top.axhline(0, color="0.6", lw=0.8)
  if relative:
    for ax in (top, bottom):
      ax.axvline(1, color="0.4", ls="--", lw=0.8)
    top.annotate("λ* (simplex from here)", (1, 1), xycoords=("data", "axes fraction"),
                 xytext=(4, -12), textcoords="offset points", fontsize=8, color="0.3")
  top.set_ylabel("weight")
  top.legend(fontsize=8, ncol=max(1, k // 8), loc="best")
  bottom.plot(x, error[order], color="C0", marker=".")
  bottom.set_ylabel("‖z − Σ wᵢzᵢ‖²", color="C0")
  twin = bottom.twinx()
  twin.plot(x, l1[order], color="C3", marker=".")
  twin.set_ylabel("‖w‖₁", color="C3")
  bottom.set_xlabel(f"λ2 / λ*   (λ* = {lam_star:.4g})" if relative else "λ2   (λ* = 0: lin is already non-negative)")
  fig.suptitle(title or "sparse weights along the λ2 path")
  fig.savefig(os.fspath(file), dpi=120)
  return os.fspath(file)

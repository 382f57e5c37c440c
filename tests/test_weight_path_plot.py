"""rpe_jax.weight_path_plot writes a readable PNG of a λ path."""

import numpy as np
import pytest
from PIL import Image

from rpe_jax import weighting
from rpe_jax.weight_path_plot import plot_lambda_path


def test_writes_png_for_a_batched_path(tmp_path):
  rng = np.random.default_rng(0)
  refs = rng.normal(size=(5, 8)) + 2.0
  targets = rng.normal(size=(2, 8)) * 3 + 2.0
  path = weighting.lambda_path(refs, targets, np.linspace(0, 1.5, 9), relative=True)
  out = plot_lambda_path(path, tmp_path / "path.png", index=1, names=list("abcde"))
  with Image.open(out) as image:
    assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 400
    pixels = np.asarray(image.convert("L"))
  assert pixels.std() > 5  # something was drawn


def test_bad_index_and_names(tmp_path):
  refs = np.eye(3)
  path = weighting.lambda_path(refs, np.ones((2, 3)), [0.0, 1.0])
  with pytest.raises(ValueError, match="index"):
    plot_lambda_path(path, tmp_path / "p.png")
  with pytest.raises(ValueError, match="names"):
    plot_lambda_path(path, tmp_path / "p.png", index=0, names=["x"])

"""The built-in acquisition sites: one table of shifts and the one renderer of them.

Each site re-renders clean images with the shift of one "scanner / vendor", like the
prostate MRI sites of the seeds. Shifts, applied in this order (per-site constants, plus
per-image jitter where noted):

  lowres   acquired at this many pixels, shown at the output size  — resolution
  rotate   rotation in degrees (± 5° jitter per image)            — patient positioning
  blur     Gaussian σ in output pixels                            — point-spread function
  gamma / contrast / offset   y = offset + contrast · x^gamma     — intensity response
  bias     amplitude of a smooth multiplicative field 1 + bias·(ramp) — coil bias field
  invert   y = 1 − y                                              — inverted contrast weighting
  noise    Rician noise σ: |y + n₁ + i n₂|                        — thermal noise

The classification family (``rpe_jax.tasks.images``, digit scans) and the segmentation
family (``rpe_jax.tasks.segmentation``, organ phantoms with masks) both render through
``render``; masks follow the geometric shifts only.
"""

from __future__ import annotations

import numpy as np

SITES: dict[str, dict] = {
    "clean": {},
    "blur": {"lowres": 12, "blur": 1.2},
    "lowcontrast": {"gamma": 1.8, "contrast": 0.5, "offset": 0.25},
    "noisy": {"noise": 0.2},
    "bias": {"bias": 0.9},
    "inverted": {"invert": True, "gamma": 0.8},
    "rotated": {"rotate": 35.0},
    "scanner": {"lowres": 16, "blur": 0.8, "gamma": 0.7, "noise": 0.08},
}
SHIFT_KEYS = frozenset({"rotate", "lowres", "blur", "gamma", "contrast", "offset", "bias",
                        "invert", "noise"})


def site_params(site: str, sites: dict[str, dict] = SITES) -> dict:
  """The shift parameters of ``site``; ``ValueError`` naming an unknown site or key."""
  if site not in sites:
    raise ValueError(f"unknown site {site!r}; sites: {', '.join(sites)}")
  unknown = set(sites[site]) - SHIFT_KEYS
  if unknown:
    raise ValueError(f"site {site!r} has unknown shift keys {sorted(unknown)}")
  return sites[site]


def site_index(site: str, sites: dict[str, dict] = SITES) -> int:
  """A stable number of the site (its rank by name), to seed per-site random streams."""
  return sorted(sites).index(site)


def render(clean: np.ndarray, site: str, size: int, rng: np.random.Generator, *,
           masks: np.ndarray | None = None, sites: dict[str, dict] = SITES):
  """Render clean images [N, h, w] in [0, 1] (any resolution) at ``site``, [N, size, size].

  The images are resampled (bilinear) to the site's acquisition resolution, rotated there,
  shown at ``size`` (nearest: the blocks of a low-resolution acquisition), then blurred,
  given the site's intensity response, bias field, contrast inversion and Rician noise.
  ``rng`` draws the per-image rotation jitter, then the noise. Returns float64 images in
  [0, 1], and with ``masks`` [N, size, size] (bool, at ``size``) also the masks rotated by
  the same angles.
  """
  from scipy import ndimage
  p = site_params(site, sites)
  n, h, w = clean.shape
  acquired = p.get("lowres", size)
  x = ndimage.zoom(clean, (1, acquired / h, acquired / w), order=1, grid_mode=True,
                   mode="grid-constant")
  if "rotate" in p:
    angles = p["rotate"] + rng.uniform(-5, 5, n)
    x = np.stack([ndimage.rotate(im, a, reshape=False, order=1) for im, a in zip(x, angles)])
    if masks is not None:
      masks = np.stack([ndimage.rotate(m.astype(np.float64), a, reshape=False, order=1) > 0.5
                        for m, a in zip(masks, angles)])
  if acquired != size:
    x = ndimage.zoom(x, (1, size / acquired, size / acquired), order=0, grid_mode=True,
                     mode="grid-constant")
  if "blur" in p:
    x = ndimage.gaussian_filter(x, (0, p["blur"], p["blur"]))
  x = np.clip(x, 0.0, 1.0)
  x = p.get("offset", 0.0) + p.get("contrast", 1.0) * x ** p.get("gamma", 1.0)
  if "bias" in p:
    t = np.linspace(-1.0, 1.0, size)
    ramp = (t[None, :, None] + 0.5 * t[None, None, :]) / 1.5   # fixed direction per site
    x = x * (1.0 + p["bias"] * ramp)
  if p.get("invert"):
    x = 1.0 - x
  if "noise" in p:
    x = np.hypot(x + rng.normal(0, p["noise"], x.shape), rng.normal(0, p["noise"], x.shape))
  x = np.clip(x, 0.0, 1.0)
  return x if masks is None else (x, np.asarray(masks, bool))

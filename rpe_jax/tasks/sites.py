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

Two tables of sites (``TABLES``, by family suffix):

* ``SITES`` (``sites:digits``, ``sites:organs``): eight distinct, mostly non-overlapping
  shifts. No combination of the other sites' adapters holds the fix for a held-out one.
* ``GRADED_SITES`` (``sites:digits-graded``, ``sites:organs-graded``): graded mixtures of
  three base shifts (``GRADED_BASES``: rotation, Rician noise, bias field — none of which
  the demo foundation saw in pre-training), like several scanners of one anatomy. Site s
  with mixture coefficients α (``GRADED_MIX``, Σα = 1) has the parameters
  p(s) = p₀ + Σ_j α_j (p_j − p₀), p₀ the identity (no shift) and p_j base j's, for every
  interpolable key (``mix_shifts``): the vertices are the bases, the edge midpoints halve
  two of them, the centre holds a third of each. A held-out centre or midpoint lies inside
  the convex hull of the others' parameters; a held-out vertex lies outside it but in
  their affine span (rot = rot_noise + rot_bias − noise_bias) — the case for negative weights.
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
# The parameter of "no shift" for every key a mixture can interpolate (lowres and invert are
# discrete: not mixable).
IDENTITY = {"rotate": 0.0, "blur": 0.0, "gamma": 1.0, "contrast": 1.0, "offset": 0.0,
            "bias": 0.0, "noise": 0.0}

GRADED_BASES: dict[str, dict] = {
    "rot": {"rotate": 30.0},
    "noise": {"noise": 0.2},
    "bias": {"bias": 0.9},
}
_THIRD = 1.0 / 3.0
GRADED_MIX: dict[str, dict[str, float]] = {
    "rot": {"rot": 1.0},
    "noise": {"noise": 1.0},
    "bias": {"bias": 1.0},
    "rot_noise": {"rot": 0.5, "noise": 0.5},
    "rot_bias": {"rot": 0.5, "bias": 0.5},
    "noise_bias": {"noise": 0.5, "bias": 0.5},
    "rot_noise_bias": {"rot": _THIRD, "noise": _THIRD, "bias": _THIRD},
}


def mix_shifts(coefficients: dict[str, float], bases: dict[str, dict] = GRADED_BASES) -> dict:
  """The shift parameters p₀ + Σ_j α_j (p_j − p₀) of a mixture of base shifts.

  ``coefficients`` maps base names to α_j ≥ 0 with Σα = 1 (a convex mixture); p₀ is
  ``IDENTITY``. Keys left at their identity value are dropped, so a mixture without
  rotation has no rotation (and no rotation jitter). ``ValueError`` for an unknown base,
  a negative or non-normalised α, or a base with a key that cannot be interpolated.

  Example:
    >>> mix_shifts({"rot": 0.5, "noise": 0.5})
    {'noise': 0.1, 'rotate': 15.0}
  """
  unknown = set(coefficients) - set(bases)
  if unknown:
    raise ValueError(f"unknown base shifts {sorted(unknown)}; bases: {', '.join(bases)}")
  alpha = {name: float(a) for name, a in coefficients.items()}
  if min(alpha.values(), default=-1.0) < 0 or abs(sum(alpha.values()) - 1.0) > 1e-9:
    raise ValueError(f"mixture coefficients must be >= 0 and sum to 1, got {coefficients}")
  params = dict(IDENTITY)
  for name, a in alpha.items():
    fixed = set(bases[name]) - set(IDENTITY)
    if fixed:
      raise ValueError(f"base shift {name!r} has keys {sorted(fixed)} that cannot be mixed")
    for key, value in bases[name].items():
      params[key] += a * (float(value) - IDENTITY[key])
  return {key: round(v, 12) for key, v in sorted(params.items()) if v != IDENTITY[key]}


GRADED_SITES: dict[str, dict] = {name: mix_shifts(c) for name, c in GRADED_MIX.items()}
# Family suffix → site table: "digits" / "organs" use SITES, "digits-graded" /
# "organs-graded" GRADED_SITES.
TABLES: dict[str, dict[str, dict]] = {"": SITES, "-graded": GRADED_SITES}


def family_table(family: str, base: str) -> dict[str, dict] | None:
  """The site table of a built-in family name (``base`` plus a ``TABLES`` suffix, e.g.
  "digits-graded" for base "digits"), or None when ``family`` is not one of them."""
  if not family.startswith(base):
    return None
  return TABLES.get(family[len(base):])


def family_names(base: str) -> list[str]:
  """Every built-in family name of ``base`` ("digits" → ["digits", "digits-graded"])."""
  return [base + suffix for suffix in TABLES]


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

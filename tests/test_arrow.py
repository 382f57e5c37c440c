"""rpe_jax.arrow against dense float64 SVDs of ΔW (numpy), never the code under test."""

import jax
import numpy as np
import pytest

from models.lora import LoRA, SVDLoRA
from rpe_jax import arrow


def _dense_top(a, b, e=None):
  """Top singular direction of ΔW in the input space: PEFT's ΔW = (a b)ᵀ, right vector Vh[0]."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  dw = (a * (1 if e is None else np.asarray(e, np.float64))) @ b
  _, s, vh = np.linalg.svd(dw.T)  # PEFT layout [out, in]
  return vh[0], s[0]


def _match_sign(v, ref):
  return v * np.sign(v @ ref)


@pytest.mark.parametrize("din,r,dout", [(7, 3, 5), (3, 5, 6), (12, 4, 2)])
def test_top_direction_equals_dense_svd(din, r, dout):
  rng = np.random.default_rng(din * 100 + r)
  a, b, e = rng.normal(size=(din, r)), rng.normal(size=(r, dout)), rng.normal(size=r)
  with jax.enable_x64(True):
    for leaf, ee in ((LoRA(a, b), None), (SVDLoRA(a, e, b), e)):
      v, s = arrow.top_input_direction(leaf)
      ref, s_ref = _dense_top(a, b, ee)
      np.testing.assert_allclose(_match_sign(np.asarray(v), ref), ref, atol=1e-10)
      np.testing.assert_allclose(s, s_ref, rtol=1e-10)
      assert np.abs(v).max() == np.max(v)  # canonical sign: largest entry positive


def test_float32_and_bf16_factors_are_upcast():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(16, 4)), rng.normal(size=(4, 8))
  ref, _ = _dense_top(a, b)
  v, _ = arrow.top_input_direction(LoRA(a.astype(np.float32), b.astype(np.float32)))
  assert v.dtype == np.float32
  np.testing.assert_allclose(_match_sign(np.asarray(v, np.float64), ref), ref, atol=1e-5)
  leaf = LoRA(jax.numpy.asarray(a, jax.numpy.bfloat16), jax.numpy.asarray(b, jax.numpy.bfloat16))
  v, _ = arrow.top_input_direction(leaf)
  ref, _ = _dense_top(np.asarray(leaf.a, np.float64), np.asarray(leaf.b, np.float64))
  assert v.dtype == np.float32
  np.testing.assert_allclose(_match_sign(np.asarray(v, np.float64), ref), ref, atol=1e-5)


def _adapter(rng, widths=(6, 6, 9)):
  return {"layers": {str(i): {"query": LoRA(rng.normal(size=(n, 2)), rng.normal(size=(2, 5)))}
                     for i, n in enumerate(widths)}}


def test_prototype_concatenates_unit_layer_directions_in_path_order():
  rng = np.random.default_rng(2)
  adapter = _adapter(rng)
  with jax.enable_x64(True):
    proto = arrow.arrow_prototype(adapter)
  assert proto.paths == ("layers.0.query", "layers.1.query", "layers.2.query")
  assert proto.sizes == (6, 6, 9)
  np.testing.assert_allclose(np.linalg.norm(proto.vector), 1.0, rtol=1e-12)
  bounds = np.cumsum((0,) + proto.sizes)
  for i, path in enumerate(proto.paths):
    leaf = adapter["layers"][str(i)]["query"]
    ref, s = _dense_top(leaf.a, leaf.b)
    seg = np.asarray(proto.vector[bounds[i]:bounds[i + 1]]) * np.sqrt(3)
    np.testing.assert_allclose(_match_sign(seg, ref), ref, atol=1e-10)
    np.testing.assert_allclose(proto.sigma[i], s, rtol=1e-10)


def test_sqdist_is_the_layerwise_sign_agnostic_distance():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    protos = [arrow.arrow_prototype(_adapter(rng)) for _ in range(4)]
    P = np.stack([np.asarray(p.vector) for p in protos])
    sizes = protos[0].sizes
    targets = rng.normal(size=(2, sum(sizes)))
    # a target equal to prototype 1 with one layer's sign flipped and rescaled is at distance 0
    same = P[1].copy()
    same[:6] *= -3.0
    d2 = np.asarray(arrow.arrow_sqdist(P, np.vstack([targets, same]), sizes))
  bounds = np.cumsum((0,) + sizes)
  for t in range(2):
    for i in range(4):
      expected = 0.0
      for lo, hi in zip(bounds[:-1], bounds[1:]):
        x = targets[t, lo:hi] / np.linalg.norm(targets[t, lo:hi])
        v = P[i, lo:hi] / np.linalg.norm(P[i, lo:hi])
        expected += min(((x - v) ** 2).sum(), ((x + v) ** 2).sum()) / len(sizes)
      np.testing.assert_allclose(d2[t, i], expected, rtol=1e-12)
  assert abs(d2[2, 1]) < 1e-12 and np.all(d2[2, [0, 2, 3]] > 1e-3)


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="no LoRA"):
    arrow.arrow_prototype({})
  with pytest.raises(ValueError, match="layers.0.query"):
    arrow.arrow_prototype({"layers": {"0": {"query": LoRA(np.ones((3, 2)), np.ones((3, 4)))}}})
  with pytest.raises(ValueError, match="sum of sizes"):
    arrow.arrow_sqdist(np.ones((2, 5)), np.ones(4), (2, 3))

"""Per-sample mixtures (rpe_jax.compose.mixture): one batched forward pass equals, for every
input, the forward of its own exact composition ``with_adapter(model, combine(...))`` on that
input alone — for tiny random ViT, SAM (windowed encoder, box prompts) and Llama (logits and
greedy KV-cache decoding). float32 throughout; tolerance rtol = atol = 1e-5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import llama
from models.lora import (LoRA, LoRAGate, LoRAParam, SVDLoRA, adapted_layers, from_flat,
                         gate_rows, matches)
from models.sam import SamModel
from models.vit import ViTConfig, ViTForImageClassification
from rpe_jax.compose import adapter_of, combine, with_adapter
from rpe_jax.compose.mixture import mixture_weights, set_mixture_weights, with_mixture
from rpe_jax.tasks.segmentation import base_config

TOL = dict(rtol=1e-5, atol=1e-5)

# Four adapters A–D (one LoRA and one SVD-LoRA at least; C's rank differs between layers) and
# four inputs, each with its own retrieved subset and weights: a negative weight, an explicit
# zero, an adapter no other input shares, and an input with a single adapter.
KINDS = {"A": ("lora", 2), "B": ("svd", 3), "C": ("lora", (1, 3)), "D": ("svd", 2)}
RETRIEVED = [["A", "B", "C"], ["B", "D"], ["C", "A", "D"], ["D"]]
WEIGHTS = [[0.8, -0.5, 0.7], [1.2, 0.0], [0.4, 0.9, -0.3], [1.0]]
B = len(RETRIEVED)


def random_adapter(model, targets, kind, rank, seed):
  """Random non-zero factors on every layer matching ``targets`` (b random too, unlike
  ``init_adapters``); ``rank`` may be a pair, alternated over the layers."""
  rng = np.random.default_rng(seed)
  ranks = rank if isinstance(rank, tuple) else (rank,)
  flat = {}
  layers = sorted((p, m) for p, m in adapted_layers(model).items() if matches(p, targets))
  assert layers, targets
  for j, (path, layer) in enumerate(layers):
    r, n_in, n_out = ranks[j % len(ranks)], layer.in_features, layer.out_features
    a = jnp.asarray(rng.standard_normal((n_in, r)) / np.sqrt(n_in), jnp.float32)
    b = jnp.asarray(0.5 * rng.standard_normal((r, n_out)) / np.sqrt(r), jnp.float32)
    if kind == "lora":
      flat[path] = LoRA(a, b)
    else:
      flat[path] = SVDLoRA(a, jnp.asarray(rng.uniform(0.5, 1.5, r), jnp.float32), b)
  return from_flat(flat)


def library(model, targets):
  return {name: random_adapter(model, targets, kind, rank, seed)
          for seed, (name, (kind, rank)) in enumerate(KINDS.items())}


def mixed_and_references(model, targets):
  """The mixed model of the batch, and per input b the model carrying combine(its own
  retrieved adapters, its own weights)."""
  lib = library(model, targets)
  union, w = mixture_weights(RETRIEVED, WEIGHTS)
  assert union == ["A", "B", "C", "D"] and w.shape == (B, 4)
  mixed = with_mixture(model, [lib[n] for n in union], w)
  refs = [with_adapter(model, combine([lib[n] for n in names], jnp.asarray(ws, jnp.float32)))
          for names, ws in zip(RETRIEVED, WEIGHTS)]
  return mixed, refs


def assert_per_input(mixed_out, ref_outs):
  """mixed_out[key][b] equals ref_outs[b][key][0] (input b alone through its own model)."""
  for key in mixed_out:
    got = np.asarray(mixed_out[key])
    for b, ref in enumerate(ref_outs):
      np.testing.assert_allclose(got[b], np.asarray(ref[key])[0], **TOL,
                                 err_msg=f"{key}, input {b}")


def assert_gate_matters(mixed, run, inputs):
  """The gate really changes the output: the ungated union (every weight 1) differs."""
  ungated = _copy_without_gates(mixed)
  diff = max(float(np.abs(np.asarray(run(ungated, inputs)[k]) - np.asarray(v)).max())
             for k, v in run(mixed, inputs).items())
  assert diff > 1e-2, diff


def _copy_without_gates(model):
  graphdef, state = nnx.split(model)
  out = nnx.merge(graphdef, state, copy=True)
  for layer in adapted_layers(out).values():
    layer.set_gate(None)
  return out


# --- ViT ----------------------------------------------------------------------------------

VIT_TARGETS = ("query", "value", "fc1", "classifier")


@pytest.fixture(scope="module")
def vit():
  config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, image_size=16, patch_size=4,
                     labels=("a", "b", "c", "d", "e"))
  model = ViTForImageClassification(config, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (B, 16, 16, 3))
  return model, x


@nnx.jit
def vit_run(model, x):
  out = model(x)
  return {"logits": out.logits, "hidden": out.last_hidden_state}


def test_vit_mixture_equals_each_inputs_composition(vit):
  model, x = vit
  mixed, refs = mixed_and_references(model, VIT_TARGETS)
  got = vit_run(mixed, x)
  assert_per_input(got, [vit_run(ref, x[b:b + 1]) for b, ref in enumerate(refs)])
  assert_gate_matters(mixed, vit_run, x)


def test_gate_is_not_trainable_and_batch_is_checked(vit):
  model, x = vit
  mixed, _ = mixed_and_references(model, VIT_TARGETS)
  # What training selects holds the factors only (mixed kinds: the union is LoRA everywhere).
  trainable = {str(p[-1]) for p, _ in nnx.to_flat_state(nnx.state(mixed, LoRAParam))}
  assert trainable == {"lora_a", "lora_b"}
  gates = {".".join(map(str, p[:-1])): v[...] for p, v in
           nnx.to_flat_state(nnx.state(mixed, LoRAGate))}
  targeted = sorted(p for p in adapted_layers(mixed) if matches(p, VIT_TARGETS))
  assert sorted(gates) == targeted and all(g.shape[0] == B for g in gates.values())
  # classifier: ranks A 2, B 3, C 1 or 3, D 2; input 1's row is [0 0, 1.2 1.2 1.2, 0.., 0 0]
  g = np.asarray(gates["classifier"])
  r_c = g.shape[1] - 7
  np.testing.assert_allclose(g[1], [0, 0, 1.2, 1.2, 1.2] + [0] * r_c + [0, 0], rtol=1e-7)
  for batch in (B - 1, 2 * B):   # neither fewer inputs nor a multiple of B passes
    with pytest.raises(ValueError, match=rf"gate batch mismatch.*{B} rows.*axis {batch}\b"):
      mixed(jnp.zeros((batch, 16, 16, 3)))
  with pytest.raises(ValueError, match="merge"):
    adapted_layers(mixed)["classifier"].merge()
  with pytest.raises(ValueError, match="per-sample mixture"):
    adapter_of(mixed)
  # Installing a plain adapter drops every gate.
  plain = with_adapter(mixed, adapter_of(with_adapter(model, library(model, VIT_TARGETS)["A"])))
  assert not nnx.to_flat_state(nnx.state(plain, LoRAGate))


def test_with_mixture_checks_its_inputs(vit):
  model, _ = vit
  lib = library(model, VIT_TARGETS)
  adapters = [lib[n] for n in "ABCD"]
  with pytest.raises(ValueError, match=r"shape \[B, 4\]"):
    with_mixture(model, adapters, np.ones((4,)))
  with pytest.raises(ValueError, match=r"shape \[B, 4\]"):
    with_mixture(model, adapters, np.ones((2, 3)))
  with pytest.raises(ValueError, match="finite"):
    with_mixture(model, adapters, np.full((2, 4), np.nan))
  with pytest.raises(ValueError, match="empty"):
    with_mixture(model, [], np.ones((2, 0)))
  other = random_adapter(model, ("query",), "lora", 2, 9)
  with pytest.raises(ValueError, match="differ in structure"):
    with_mixture(model, adapters[:1] + [other], np.ones((2, 2)))
  layer = adapted_layers(model)["classifier"]
  with pytest.raises(ValueError, match="no adapter"):
    layer.set_gate(jnp.ones((2, 3)))


def test_mixture_under_jit_with_traced_weights(vit):
  """The weights may be traced: one compiled function serves every weight matrix."""
  model, x = vit
  lib = library(model, VIT_TARGETS)
  adapters = [lib[n] for n in "ABCD"]
  _, w = mixture_weights(RETRIEVED, WEIGHTS)

  @jax.jit
  def logits(w):
    return with_mixture(model, adapters, w)(x).logits

  np.testing.assert_allclose(logits(jnp.asarray(w)), vit_run(with_mixture(model, adapters, w),
                                                             x)["logits"], **TOL)


def test_set_mixture_weights_equals_a_new_mixture(vit):
  """Swapping only the gates (the union's factors reused) gives the model with_mixture
  builds from the new weights — for the same batch size and another one — and leaves
  the mixture it started from as it was."""
  model, x = vit
  lib = library(model, VIT_TARGETS)
  adapters = [lib[n] for n in "ABCD"]
  _, w = mixture_weights(RETRIEVED, WEIGHTS)
  mixed = with_mixture(model, adapters, w)
  before = vit_run(mixed, x)["logits"]
  rng = np.random.default_rng(3)
  for rows in (B, 2):
    new_w = rng.standard_normal((rows, 4)).astype(np.float32)
    swapped = set_mixture_weights(mixed, adapters, new_w)
    want = vit_run(with_mixture(model, adapters, new_w), x[:rows])
    for key, got in vit_run(swapped, x[:rows]).items():
      np.testing.assert_allclose(got, want[key], **TOL, err_msg=f"{key}, batch {rows}")
  np.testing.assert_array_equal(vit_run(mixed, x)["logits"], before)
  with pytest.raises(ValueError, match="gated layers"):
    set_mixture_weights(model, adapters, w)
  with pytest.raises(ValueError, match="not the mixture of these adapters"):
    set_mixture_weights(mixed, adapters[:3] + [lib["B"]], w)   # D rank 2, B 3
  with pytest.raises(ValueError, match=r"shape \[B, 4\]"):
    set_mixture_weights(mixed, adapters, w[:, :3])


def test_gate_rows_spreads_each_sample_over_its_rows():
  h = jnp.arange(2 * 3 * 5 * 4, dtype=jnp.float32).reshape(6, 5, 4)   # B=2, fold=3
  g = jnp.asarray([[1., 2., 3., 4.], [-1., 0., 0.5, 2.]])
  want = np.asarray(h) * np.repeat(np.asarray(g), 3, axis=0)[:, None, :]
  np.testing.assert_array_equal(gate_rows(h, g, fold=3), want)
  with pytest.raises(ValueError, match="gate batch mismatch"):
    gate_rows(h, g)
  with pytest.raises(ValueError, match="leading batch axis"):
    gate_rows(h[0, 0], g)


def test_mixture_weights_scatters_into_the_union():
  union, w = mixture_weights([["x", "y"], ["z"], ["y", "x"]],   # rows of different lengths
                             [[0.25, 0.75], [1.0], [-0.5, 1.5]])
  assert union == ["x", "y", "z"]
  np.testing.assert_array_equal(w, [[0.25, 0.75, 0], [0, 0, 1.0], [1.5, -0.5, 0]])
  _, w32 = mixture_weights([[3, 7], [7, 5]], np.asarray([[0.5, 0.5], [2, -1]], np.float32))
  assert w32.dtype == np.float32
  np.testing.assert_array_equal(w32, [[0.5, 0.5, 0], [0, 2, -1]])
  assert mixture_weights([[3]], [[1]])[1].dtype == np.float32   # integer weights: float32
  with pytest.raises(ValueError, match="twice"):
    mixture_weights([["x", "x"]], [[0.5, 0.5]])
  with pytest.raises(ValueError, match="input 1 has 1 names"):
    mixture_weights([["x"], ["y"]], [[1.0], [0.5, 0.5]])
  with pytest.raises(ValueError, match="non-finite"):
    mixture_weights([["x"]], [[np.inf]])


# --- SAM ----------------------------------------------------------------------------------

# Every layout an adapted SAM layer sees: the windowed encoder attention ([B·windows, s, s, C]:
# qkv and proj), the global one and the encoder MLP ([B, h, w, C]), the decoder's attention
# over tokens and image ([B, P, T, C] / [B, P, hw, C]) and MLP, and the hypernetwork / IoU
# heads ([B, P, C]).
SAM_TARGETS = ("attn.qkv", "attn.proj", "q_proj", "v_proj", "lin1", "proj_in")


@nnx.jit
def sam_run(model, pixels, boxes):
  out = model(pixels, boxes=boxes)
  return {"masks": out.pred_masks, "iou": out.iou_scores}


def test_sam_mixture_equals_each_inputs_composition():
  config = base_config(16)
  assert config.vision.window_size and config.vision.global_attn_indexes
  model = SamModel(config, rngs=nnx.Rngs(0))
  layers = adapted_layers(model)
  assert layers["vision_encoder.layers.0.attn.qkv"].batch_fold == 4   # 4×4 grid, 2×2 windows
  assert layers["vision_encoder.layers.1.attn.qkv"].batch_fold == 1   # global attention
  pixels = jax.random.normal(jax.random.key(2), (B, 16, 16, 3))
  boxes = jnp.asarray([[[1., 2., 12., 14.], [4., 4., 9., 15.]], [[0., 0., 15., 15.], [3., 6., 8., 8.]],
                       [[5., 1., 10., 11.], [2., 2., 6., 13.]], [[7., 3., 14., 9.], [1., 8., 4., 15.]]])
  mixed, refs = mixed_and_references(model, SAM_TARGETS)
  got = sam_run(mixed, pixels, boxes)
  assert got["masks"].shape[:2] == (B, 2)
  assert_per_input(got, [sam_run(ref, pixels[b:b + 1], boxes[b:b + 1])
                         for b, ref in enumerate(refs)])
  assert_gate_matters(mixed, lambda m, a: sam_run(m, *a), (pixels, boxes))
  with pytest.raises(ValueError, match=rf"gate batch mismatch.*{B} samples × 4 rows"):
    mixed(pixels[:2], boxes=boxes[:2])


# --- Llama --------------------------------------------------------------------------------

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "lm_head")


@nnx.jit
def llama_run(model, ids, mask):
  return {"logits": model(ids, mask).logits}


def test_llama_mixture_equals_each_sequences_composition():
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)
  model = llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  ids = rng.integers(3, 64, size=(B, 6))
  mask = np.ones((B, 6), np.int32)
  mask[1, :2] = 0           # left padding on two sequences
  mask[3, :1] = 0
  mixed, refs = mixed_and_references(model, LLAMA_TARGETS)
  got = llama_run(mixed, ids, mask)
  refs_out = [llama_run(ref, ids[b:b + 1], mask[b:b + 1]) for b, ref in enumerate(refs)]
  for b in range(B):   # padded positions are not compared (their logits are meaningless)
    keep = mask[b].astype(bool)
    np.testing.assert_allclose(np.asarray(got["logits"])[b][keep],
                               np.asarray(refs_out[b]["logits"])[0][keep], **TOL)
  assert_gate_matters(mixed, lambda m, a: llama_run(m, *a), (ids, mask))
  # Greedy KV-cache decoding: the gate is per sequence, at prefill and at every step.
  new = np.asarray(llama.generate(mixed, ids, 8, attention_mask=mask, eos_token_id=()))
  for b, ref in enumerate(refs):
    want = np.asarray(llama.generate(ref, ids[b:b + 1], 8, attention_mask=mask[b:b + 1],
                                     eos_token_id=()))
    np.testing.assert_array_equal(new[b], want[0], err_msg=f"sequence {b}")
  assert len({tuple(row) for row in new}) > 1   # the sequences do decode differently

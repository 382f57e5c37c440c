"""Shared fixtures of tests/test_hardening.py and tests/test_fuzz.py: run the CLI in-process
and check the one-line contract, small adapter files, a tiny HF ViT folder with a PEFT
adapter for it (written by our own writer: no torch)."""

import sqlite3

import numpy as np
import safetensors.numpy

from rpe_jax import cli

BASE = ("--base-model", "tiny", "--encoder", "enc")


def rpe(capsys, *argv):
  """(exit code, stdout, stderr) of ``rpe ARGV`` run in-process."""
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def one_line_or_ok(code, out, err, *, ok=(0,)):
  """The CLI contract: success, or exit 2 with exactly one ``error:`` line on stderr."""
  assert code in ok + (2,), (code, out, err)
  if code == 2:
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, (out, err)


def write_adapter(path, seed=0, d_in=6, d_out=5, rank=2):
  rng = np.random.default_rng(seed)
  tensors = {"enc.0.q.a": rng.standard_normal((d_in, rank)).astype(np.float32),
             "enc.0.q.b": rng.standard_normal((rank, d_out)).astype(np.float32)}
  safetensors.numpy.save_file(tensors, str(path))
  return tensors


def make_library(capsys, root, n=3, dim=4):
  """A library of n adapters ``ad<i>`` with prototypes i·1 (dimension ``dim``)."""
  lib = root / "lib"
  assert rpe(capsys, "library", "init", lib)[0] == 0
  for i in range(n):
    write_adapter(root / f"a{i}.safetensors", i)
    np.save(root / f"p{i}.npy", np.full(dim, float(i), np.float32))
    code, _, err = rpe(capsys, "library", "add", lib, f"ad{i}", root / f"a{i}.safetensors",
                       root / f"p{i}.npy", *BASE, "--n-samples", 10 + i)
    assert code == 0, err
  return lib


def sql(lib, statement, params=()):
  """Edit the catalog by hand (as a user or a malicious sender could)."""
  conn = sqlite3.connect(lib / "catalog.sqlite")
  try:
    conn.execute(statement, params)
    conn.commit()
  finally:
    conn.close()


def tiny_vit_folder(folder):
  """A tiny random ViT as an HF checkpoint folder (``models.hf.save``)."""
  from flax import nnx
  from models import hf
  from models.vit import ViTConfig, ViTModel
  config = ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, image_size=8, patch_size=4)
  model = ViTModel(config, rngs=nnx.Rngs(0))
  hf.save(model, folder)
  return model


def peft_folder(model, folder, seed=0):
  """A valid PEFT folder for ``model`` (query and value of every layer, rank 2)."""
  from models.lora import LoRA, adapted_layers
  from rpe_jax.library import peft_io
  rng = np.random.default_rng(seed)
  flat = {p: LoRA(rng.standard_normal((l.in_features, 2)).astype(np.float32),
                  rng.standard_normal((2, l.out_features)).astype(np.float32))
          for p, l in adapted_layers(model).items() if p.endswith(("query", "value"))}
  from models.lora import from_flat
  peft_io.write_peft(from_flat(flat), model, folder, base_model_name_or_path="tiny-vit")
  return folder

"""Sharded operations on the 8 fake CPU devices of conftest: TSQR, the exact composition of
a sharded adapter library (plain, padded, mixed ranks and kinds, re-truncated), the weight
solver with its batch axis sharded, the composition across two real processes, and the
compose CLI on a mesh.

Oracles: single-device results (compose.combine, the unsharded solver), dense float64 numpy
(the δW of every leaf, Eckart–Young truncations), numpy's QR.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from models.lora import LoRA, SVDLoRA, is_lora, to_flat
from models.vit import ViTConfig, ViTForImageClassification
from oracles import dense
from rpe_jax import compose
from rpe_jax.parallel import sharded_ops as ops
from rpe_jax.parallel import sharding as sh
from sharding_cases import (TOL, VIT, VIT_TARGETS, WEIGHTS, assert_close,
                            assert_shardings, library, np64)
from solvers import sparse_simplex


@pytest.fixture(scope="module")
def vit():
  return ViTForImageClassification(VIT, rngs=nnx.Rngs(0))


# --- Sharded composition ----------------------------------------------------------------------

def test_tsqr_on_sharded_rows():
  mesh = sh.make_mesh("data=4,model=2")
  x = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=(32, 6)), jnp.float32),
                     NamedSharding(mesh, P(("data", "model"), None)))
  q, r = ops.tsqr(x, mesh)
  assert q.sharding.spec == P(("data", "model"), None)
  np.testing.assert_allclose(np64(q) @ np64(r), np64(x), atol=1e-5)
  np.testing.assert_allclose(np64(q).T @ np64(q), np.eye(6), atol=1e-5)
  # R equals numpy's up to the signs of its rows (QR is unique up to them).
  r_np = np.linalg.qr(np64(x))[1]
  np.testing.assert_allclose(np.abs(np64(r)), np.abs(r_np), atol=1e-5)


def test_sharded_combine_equals_single_device_concat(vit):
  mesh = sh.make_mesh("data=4,model=2")
  adapters = library(vit, VIT_TARGETS, [2, 2, 2, 2])
  placed = sh.place_library(sh.stack_adapters(adapters), mesh, "data", model_type=ViTConfig)
  wanted = sh.adapter_shardings(compose.combine(adapters, WEIGHTS), mesh, model_type=ViTConfig)
  out = ops.sharded_combine(placed, WEIGHTS, mesh, model_type=ViTConfig)
  assert_shardings(out, wanted)
  single = compose.combine(adapters, WEIGHTS)
  jax.tree.map(assert_close, out, single)          # same layout: factor for factor
  for path, leaf in to_flat(out).items():             # and the float64 dense oracle
    exact = sum(float(w) * dense(to_flat(a)[path]) for w, a in zip(WEIGHTS, adapters))
    assert_close(dense(leaf), exact)


def test_sharded_combine_padded_library_over_eight_devices(vit):
  mesh = sh.make_mesh("data=8")
  adapters = library(vit, VIT_TARGETS, [2, 2, 2, 2])
  placed = sh.place_library(sh.stack_adapters(adapters, multiple_of=8), mesh, "data")
  weights = jnp.concatenate([WEIGHTS, jnp.zeros(4, jnp.float32)])
  out = ops.sharded_combine(placed, weights, mesh, out_sharding=P())
  assert_shardings(out, jax.tree.map(lambda _: sh.replicated(mesh), out))
  for path, leaf in to_flat(out).items():             # and the float64 dense oracle
    exact = sum(float(w) * dense(to_flat(a)[path]) for w, a in zip(WEIGHTS, adapters))
    assert_close(dense(leaf), exact)


def test_sharded_combine_mixed_ranks_and_kinds_to_one_sharding(vit):
  mesh = sh.make_mesh("data=4,model=2")
  adapters = library(vit, ("query", "fc2"), [1, 3, 2, 2], ["lora", "svd", "lora", "svd"])
  placed = sh.place_library(sh.stack_adapters(adapters), mesh, "data")
  target = NamedSharding(mesh, P(None, "model"))
  out = ops.sharded_combine(placed, WEIGHTS, mesh, out_sharding=target)
  assert_shardings(out, jax.tree.map(lambda _: target, out))
  single = compose.combine(adapters, WEIGHTS)
  for path, leaf in to_flat(out).items():
    assert_close(dense(leaf), dense(to_flat(single)[path]))


def test_sharded_combine_all_svd_keeps_svd_form(vit):
  mesh = sh.make_mesh("data=4,model=2")
  adapters = library(vit, ("value",), [2, 2, 2, 2], ["svd"] * 4)
  placed = sh.place_library(sh.stack_adapters(adapters), mesh, "data", model_type=ViTConfig)
  out = ops.sharded_combine(placed, WEIGHTS, mesh)
  single = compose.combine(adapters, WEIGHTS)
  assert all(isinstance(x, SVDLoRA) for x in jax.tree.leaves(out, is_leaf=is_lora))
  jax.tree.map(assert_close, out, single)
  assert_shardings(out, jax.tree.map(lambda _: sh.replicated(mesh), out))


def _top_svd(exact, r):
  u, s, vt = np.linalg.svd(exact)
  return (u[:, :r] * s[:r]) @ vt[:r], s[:r]


@pytest.mark.parametrize("rank, energy", [(3, None), (4, 0.8), (None, 0.8)])
def test_sharded_combine_truncated_equals_single_device(vit, rank, energy):
  mesh = sh.make_mesh("data=4,model=2")
  adapters = library(vit, ("query", "output", "fc1"), [2, 3, 2, 1], seed=5)
  placed = sh.place_library(sh.stack_adapters(adapters), mesh, "data", model_type=ViTConfig)
  out = ops.sharded_combine(placed, WEIGHTS, mesh, rank=rank, energy=energy, model_type=ViTConfig)
  single = compose.combine(adapters, WEIGHTS, rank=rank, energy=energy)
  assert_shardings(out, sh.adapter_shardings(single, mesh, model_type=ViTConfig))
  for path, leaf in to_flat(out).items():
    ref = to_flat(single)[path]
    assert isinstance(leaf, SVDLoRA) and leaf.rank == ref.rank
    assert_close(leaf.e, ref.e)
    assert_close(dense(leaf), dense(ref))
    if energy is None:                      # the dense float64 Eckart–Young oracle
      exact = sum(float(w) * dense(to_flat(a)[path]) for w, a in zip(WEIGHTS, adapters))
      best, s = _top_svd(exact, rank)
      assert_close(leaf.e, s, 1e-5)
      assert_close(dense(leaf), best, 1e-5)


def test_sharded_combine_rejects_bad_input(vit):
  mesh = sh.make_mesh("data=4,model=2")
  stack = sh.stack_adapters(library(vit, ("query",), [2, 2, 2, 2]))
  with pytest.raises(ValueError, match="place_library"):
    ops.sharded_combine(stack, WEIGHTS, mesh)
  placed = sh.place_library(stack, mesh)
  with pytest.raises(ValueError, match=r"weights must have shape \(4,\)"):
    ops.sharded_combine(placed, WEIGHTS[:3], mesh)
  with pytest.raises(ValueError, match="finite"):
    ops.sharded_combine(placed, WEIGHTS.at[0].set(jnp.nan), mesh)
  with pytest.raises(ValueError, match="rank"):
    ops.sharded_combine(placed, WEIGHTS, mesh, rank=0)


# --- The solver with its batch axis sharded ---------------------------------------------------

def _solver_problem(dtype, shared, seed=8):
  rng = np.random.default_rng(seed)
  targets = jnp.asarray(rng.normal(size=(8, 9)), dtype)
  refs = jnp.asarray(rng.normal(size=(5, 9) if shared else (8, 5, 9)), dtype)
  return refs, targets


@pytest.mark.parametrize("shared, constraint, lam", [(True, "affine", 0.5),
                                                     (False, "simplex", 0.0)])
def test_sharded_solve_equals_single_device_float32(shared, constraint, lam):
  """Independent per-device loops: exactly the single-device solve of each device's block."""
  mesh = sh.make_mesh("data=4,model=2")
  refs, targets = _solver_problem(jnp.float32, shared)
  out = ops.sharded_solve(refs, targets, lam, mesh, constraint=constraint, independent=True)
  blocks = [sparse_simplex.solve(refs if shared else refs[i:i + 2], targets[i:i + 2], lam,
                                 constraint=constraint) for i in range(0, 8, 2)]
  single = jax.tree.map(lambda *xs: jnp.concatenate(xs), *blocks)
  jax.tree.map(assert_close, out, single)
  for x in jax.tree.leaves(out):
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), x.ndim)
  assert np.all(np.asarray(out.status) == sparse_simplex.CONVERGED)


@pytest.mark.slow
def test_sharded_solve_equals_whole_batch_solve():
  """Against the single-device solve of the whole batch. Grouping the batch differently
  changes the solver's batch-wide polish/stop decisions, so in float32 the two agree to
  the solver's tolerance (below); in float64 they agree to rounding."""
  mesh = sh.make_mesh("data=4,model=2")
  for dtype in (jnp.float64, jnp.float32):
    with jax.enable_x64(dtype == jnp.float64):
      refs, targets = _solver_problem(dtype, shared=True, seed=9)
      out = ops.sharded_solve(refs, targets, 0.5, mesh, independent=False)
      single = sparse_simplex.solve(refs, targets, 0.5)
      assert out.weights.dtype == dtype
      assert out.weights.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
      tol = 1e-9 if dtype == jnp.float64 else 1e-6
      assert_close(out.weights, single.weights, tol)
      assert_close(out.objective, single.objective, tol)


def test_sharded_solve_rejects_bad_batches():
  mesh = sh.make_mesh("data=4,model=2")
  refs, targets = _solver_problem(jnp.float32, shared=True)
  with pytest.raises(ValueError, match="do not split over mesh axis 'data'"):
    ops.sharded_solve(refs, targets[:6], 0.0, mesh)
  with pytest.raises(ValueError, match="refs must be"):
    ops.sharded_solve(refs[:, :4], targets, 0.0, mesh)
  with pytest.raises(ValueError, match="not a mesh axis"):
    ops.sharded_solve(refs, targets, 0.0, mesh, axis="batch")


# --- Two real processes (jax.distributed over localhost, gloo collectives) --------------------

_WORKER = r'''
import argparse, json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from rpe_jax.parallel import distributed
parser = argparse.ArgumentParser()
distributed.add_mesh_args(parser)
parser.add_argument("--out")
args = parser.parse_args()
joined = distributed.maybe_initialize_distributed(args)
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from models.lora import LoRA
from rpe_jax import compose
from rpe_jax.parallel import sharded_ops as ops
from rpe_jax.parallel import sharding as sh
mesh = distributed.mesh_from_args(args)
rng = np.random.default_rng(0)
ads = [{"q": LoRA(jnp.asarray(rng.normal(size=(16, 2)), jnp.float32),
                  jnp.asarray(rng.normal(size=(2, 8)), jnp.float32))} for _ in range(8)]
w = jnp.asarray(rng.normal(size=8), jnp.float32)
placed = sh.place_library(sh.stack_adapters(ads), mesh, "data")
out = ops.sharded_combine(placed, w, mesh, rank=3)["q"]
ref = compose.combine(ads, w, rank=3)["q"]
delta = lambda l: (np.asarray(l.a, np.float64) * np.asarray(l.e)) @ np.asarray(l.b, np.float64)
err = float(np.abs(delta(out) - delta(ref)).max() / np.abs(delta(ref)).max())
path = distributed.save_checkpoint(os.path.join(args.out, "ckpt"), placed)
other = sh.make_mesh("data=2,model=4")
restored = distributed.restore_checkpoint(path, placed, sh.library_shardings(placed, other))
gathered = multihost_utils.process_allgather(restored["q"].a, tiled=True)
same = bool(np.array_equal(np.asarray(gathered), np.asarray(sh.stack_adapters(ads)["q"].a)))
print("RESULT " + json.dumps(dict(joined=joined, processes=jax.process_count(),
      devices=jax.device_count(), local=jax.local_device_count(), err=err, same=same,
      primary=distributed.is_primary(), spec=str(restored["q"].a.sharding.spec))))
'''


@pytest.mark.slow
def test_two_processes_compose_and_checkpoint(tmp_path):
  """The real jax.distributed path: 2 processes × 4 CPU devices = one 8-device mesh."""
  import json
  import os
  import pathlib
  import socket
  import subprocess
  import sys
  worker = tmp_path / "worker.py"
  worker.write_text(_WORKER)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  root = str(pathlib.Path(__file__).resolve().parents[1])
  env = {**os.environ, "PYTHONPATH": root}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, str(worker), "--coordinator", f"localhost:{port}", "--num-processes",
       "2", "--process-id", str(i), "--mesh", "data=8", "--out", str(tmp_path)],
      env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  results = []
  for p, text in zip(procs, outputs):
    assert p.returncode == 0, text[-3000:]
    results.append(json.loads(next(l for l in text.splitlines() if l.startswith("RESULT "))[7:]))
  assert [r["primary"] for r in results] == [True, False]
  for r in results:
    assert r["joined"] and r["processes"] == 2 and r["devices"] == 8 and r["local"] == 4
    assert r["err"] < TOL and r["same"]
    assert r["spec"] == str(P("data"))


# --- The CLI: python -m rpe_jax.compose --mesh ------------------------------------------------

def _cli_library(tmp_path):
  """A 5-adapter library and a target prototype; returns the common CLI arguments."""
  from rpe_jax.library.catalog import Library
  rng = np.random.default_rng(0)
  lib = Library.create(tmp_path / "lib")
  for i in range(5):
    adapter = {p: LoRA(rng.normal(size=(8, 2)).astype(np.float32),
                       rng.normal(size=(2, 4)).astype(np.float32)) for p in ("l0.q", "l1.q")}
    lib.add(f"site{i}", adapter, (rng.normal(size=6) + 3).astype(np.float32),
            base_model="toy", encoder="toy-enc", n_samples=10)
  lib.close()
  np.save(tmp_path / "z.npy", (rng.normal(size=6) + 3).astype(np.float32))
  return ["--library", str(tmp_path / "lib"), "--prototype", str(tmp_path / "z.npy"),
          "--k", "3", "--strategy", "lin", "--rank", "3"]


def _assert_same_adapter_file(got, want):
  from rpe_jax.library import adapter_file
  got, _ = adapter_file.load_adapter(got / "composed" / "adapter.safetensors")
  want, _ = adapter_file.load_adapter(want / "composed" / "adapter.safetensors")
  assert sorted(to_flat(got)) == sorted(to_flat(want))
  for path, leaf in to_flat(got).items():
    assert_close(dense(leaf), dense(to_flat(want)[path]))
    assert_close(leaf.e, to_flat(want)[path].e)


def test_compose_cli_on_a_mesh_equals_single_device(tmp_path, capsys):
  from rpe_jax.cli.compose import main
  common = _cli_library(tmp_path)
  assert main(common + ["--out", str(tmp_path / "one")]) == 0
  assert main(common + ["--out", str(tmp_path / "mesh"), "--mesh", "data=4,model=2"]) == 0
  _assert_same_adapter_file(tmp_path / "mesh", tmp_path / "one")
  capsys.readouterr()
  assert main(common + ["--mesh", "data=3"]) == 2
  assert "does not divide" in capsys.readouterr().err


@pytest.mark.slow
def test_compose_cli_across_two_processes(tmp_path, capsys):
  """`python -m rpe_jax.compose --mesh data=8 --coordinator ...` on 2 processes × 4 CPU
  devices: process 0 writes the single-device result, process 1 writes nothing."""
  import os
  import pathlib
  import socket
  import subprocess
  import sys
  from rpe_jax.cli.compose import main
  common = _cli_library(tmp_path)
  assert main(common + ["--out", str(tmp_path / "one")]) == 0
  capsys.readouterr()
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  root = str(pathlib.Path(__file__).resolve().parents[1])
  env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "rpe_jax.compose", *common, "--mesh", "data=8", "--coordinator",
       f"localhost:{port}", "--num-processes", "2", "--process-id", str(i),
       "--out", str(tmp_path / f"out{i}"), "--json"],
      env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, text in zip(procs, outputs):
    assert p.returncode == 0, text[-3000:]
  _assert_same_adapter_file(tmp_path / "out0", tmp_path / "one")
  assert not (tmp_path / "out1").exists()

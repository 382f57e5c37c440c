"""Multi-host runs: ``jax.distributed.initialize`` for the CLI, the ``--mesh`` flags, and
sharded orbax checkpoints (restorable onto any other mesh).

One process per host (per GPU on some launchers); every process runs the same command.
``maybe_initialize_distributed(args)`` joins the run when flags ask for it
(``--coordinator HOST:PORT --num-processes N --process-id I``) or when a launcher is
detected (SLURM, Open MPI, a multi-host TPU slice); afterwards ``jax.devices()`` lists every
process's devices and ``rpe_jax.parallel.sharding.make_mesh`` spans them all. Only process 0
(``is_primary()``) writes reports and library entries; orbax checkpoints are written by all
processes together. See docs/multihost.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Callable, Mapping

import jax

from rpe_jax.parallel.sharding import make_mesh


def add_mesh_args(parser: argparse.ArgumentParser) -> None:
  """``--mesh`` and the multi-host flags, for the CLI."""
  group = parser.add_argument_group("devices and hosts")
  group.add_argument("--mesh", default=None, metavar="SPEC",
                     help="shard over a device mesh, e.g. 'data=2,model=4' (the product "
                          "divides the device count; one size may be -1); without it the "
                          "work runs on one device")
  group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                     help="multi-host: address of process 0 (jax.distributed)")
  group.add_argument("--num-processes", type=int, default=None, metavar="N",
                     help="multi-host: total number of processes")
  group.add_argument("--process-id", type=int, default=None, metavar="I",
                     help="multi-host: this process's index in [0, N)")
  group.add_argument("--distributed", action="store_true",
                     help="multi-host: call jax.distributed.initialize() with its own "
                          "cluster detection (TPU VM slices, SLURM, Open MPI)")


def _cluster_env(environ: Mapping[str, str]) -> str | None:
  """The multi-process launcher we can see in the environment, or None."""
  def count(name):
    try:
      return int(environ.get(name, "1"))
    except ValueError:
      return 1
  if all(k in environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID")) \
      and count("SLURM_NTASKS") > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in environ and count("OMPI_COMM_WORLD_SIZE") > 1:
    return "openmpi"
  if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1 \
      or "MEGASCALE_COORDINATOR_ADDRESS" in environ:
    return "tpu"
  return None


def maybe_initialize_distributed(args=None, *, environ: Mapping[str, str] | None = None,
                                 initialize: Callable | None = None) -> bool:
  """Join a multi-host run when one is asked for or detected; returns True when joined.

  Explicit: ``--coordinator HOST:PORT --num-processes N --process-id I`` (or the env
  variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
  Detected: a SLURM job step with more than one task, an Open MPI launch of more than one
  rank, a multi-host TPU slice (TPU_WORKER_HOSTNAMES / MEGASCALE_*), or ``--distributed``;
  then ``jax.distributed.initialize()`` finds the rest itself. Must run before anything
  touches a device. A single-process run (nothing asked, nothing detected) returns False.
  """
  environ = os.environ if environ is None else environ
  initialize = initialize or jax.distributed.initialize
  if jax.distributed.is_initialized():
    return True
  get = lambda name: getattr(args, name, None) if args is not None else None
  coordinator = get("coordinator") or environ.get("JAX_COORDINATOR_ADDRESS")
  num, pid = get("num_processes"), get("process_id")
  try:
    num = int(environ["JAX_NUM_PROCESSES"]) if num is None and "JAX_NUM_PROCESSES" in environ \
        else num
    pid = int(environ["JAX_PROCESS_ID"]) if pid is None and "JAX_PROCESS_ID" in environ else pid
  except ValueError as err:
    raise ValueError(f"JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers ({err})") from None
  if coordinator is not None:
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if num is None or pid is None:
      if _cluster_env(environ) is None:
        raise ValueError("--coordinator needs --num-processes and --process-id "
                         "(or a SLURM / Open MPI / TPU launcher that provides them)")
    if num is not None and num < 1:
      raise ValueError(f"--num-processes must be >= 1, got {num}")
    if num is not None and pid is not None and not 0 <= pid < num:
      raise ValueError(f"--process-id must be in [0, {num}), got {pid}")
    initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
    return True
  if num is not None or pid is not None:
    raise ValueError("--num-processes / --process-id need --coordinator HOST:PORT")
  if get("distributed") or _cluster_env(environ) is not None:
    initialize()
    return True
  return False


def is_primary() -> bool:
  """True on process 0: the one that writes reports, tables and library entries."""
  return jax.process_index() == 0


def mesh_from_args(args):
  """The mesh ``--mesh`` asks for (without it: one ``data`` axis over every device)."""
  return make_mesh(getattr(args, "mesh", None) or "data=-1")


def save_checkpoint(path, tree, *, force: bool = False) -> pathlib.Path:
  """Save a (sharded) pytree — adapter, stacked library or ``nnx.state(model)`` — with orbax.

  Every process must call it in a multi-host run: each writes the shards it holds and
  orbax lets process 0 write the metadata. Returns the absolute path.
  """
  import orbax.checkpoint as ocp
  path = pathlib.Path(path).absolute()
  if path.exists() and not force:
    raise FileExistsError(f"checkpoint {path} exists; pass force=True to overwrite it")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree, force=force)
  checkpointer.wait_until_finished()
  return path


def restore_checkpoint(path, like, shardings):
  """Restore a checkpoint onto any mesh: ``like`` gives the structure, shapes and dtypes
  (arrays or ``jax.ShapeDtypeStruct``s; e.g. ``nnx.state(nnx.eval_shape(...))``),
  ``shardings`` the target placement (a tree like ``like`` or one sharding for all)."""
  import orbax.checkpoint as ocp
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"no checkpoint at {path}")
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, like)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        like, shardings)
  return ocp.StandardCheckpointer().restore(path, target)

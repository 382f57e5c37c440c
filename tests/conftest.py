"""Test session set-up: 8 fake CPU devices, set before JAX starts; compiled code dropped
after each module (see ``_release_compiled_code``)."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No test reaches the network: a --model spec naming no folder is a Hub id, looked up in the
# HF cache only (models/hub.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402  (must come after XLA_FLAGS)

assert jax.device_count() == 8, "conftest must run before anything imports jax"

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drop every compiled executable after each test module.

  XLA:CPU maps each executable's code into memory regions of its own and keeps them for as
  long as a jit cache holds the executable. One pytest process compiles thousands of
  programs; left alone they pass Linux's default limit of 65 530 maps per process
  (vm.max_map_count) and the next compile dies inside LLVM (SIGABRT or SIGSEGV, no
  message) — which is how CI died in tests/test_sparse_simplex.py. Clearing after every
  module keeps the count at what one module needs (< 8 000); it was also the fastest
  choice measured (956 s for the suite, against 1 112–1 320 s in two runs that cleared
  only past 25 000 maps; our reading, not isolated: compiles slow down as loaded
  executables pile up).
  """
  yield
  jax.clear_caches()
  gc.collect()


# The slowest test files first (seconds in one process, measured 2026-11-30: demo 236, sparse_simplex
# 138, tasks_cli 95, mixture 65, classification 57, weighting 57, segmentation 55, device_check 54,
# sharded_ops 46, pipeline 44, mesh_predict 43, report 41). Under `-n 2 --dist loadfile` each file is
# one unit of work, handed out in collection order: starting the longest first keeps both workers
# busy to the end instead of leaving one to finish a long file alone.
_LONGEST_FIRST = ("test_demo.py", "test_sparse_simplex.py", "test_tasks_cli.py", "test_mixture.py",
                  "test_classification.py", "test_weighting.py", "test_segmentation.py",
                  "test_device_check.py", "test_sharded_ops.py", "test_pipeline.py",
                  "test_mesh_predict.py", "test_report.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole

"""Test session set-up: 8 fake CPU devices, set before JAX starts."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

assert jax.device_count() == 8, "conftest must run before anything imports jax"

import gc  # noqa: E402

import pytest  # noqa: E402

_MAPS_BEFORE_CLEARING = 25_000   # of Linux's default 65 530; one module adds < 8 000


def _memory_maps() -> int:
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:   # not Linux: no such limit to mind
    return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drop the compiled executables once they hold too many memory maps.

  XLA:CPU maps each executable's code into memory regions of its own and keeps them for as
  long as a jit cache holds the executable. One pytest process compiles thousands of
  programs; left alone they pass Linux's default limit of 65 530 maps per process
  (vm.max_map_count) and the next compile dies inside LLVM (SIGABRT or SIGSEGV, no
  message) — which is how CI died in tests/test_sparse_simplex.py. Clearing the caches
  after a module once the count is high keeps it bounded, and compiled code shared between
  modules is kept until then.
  """
  yield
  if _memory_maps() > _MAPS_BEFORE_CLEARING:
    jax.clear_caches()
    gc.collect()

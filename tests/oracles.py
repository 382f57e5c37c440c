"""Dense float64 numpy oracles shared by the adapter-algebra tests (never the code under test)."""

import numpy as np

from models.lora import SVDLoRA


def dense(leaf):
  """δW of a LoRA / SVDLoRA leaf, computed densely in float64 numpy."""
  a, b = np.asarray(leaf.a, np.float64), np.asarray(leaf.b, np.float64)
  if isinstance(leaf, SVDLoRA):
    a = a * np.asarray(leaf.e, np.float64)
  return a @ b


def rel(x, y):
  """Relative Frobenius error ‖x − y‖ / ‖y‖ in float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return np.linalg.norm(x - y) / np.linalg.norm(y)

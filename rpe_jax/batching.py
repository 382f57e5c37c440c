"""Fixed-size batches of an in-memory dataset, with a background prefetch thread.

Every batch has exactly ``batch_size`` rows (the ragged tail is padded and masked), so a
jitted step is traced once per shape. Works on any dataset with ``images`` and ``labels``
arrays of equal length (``rpe_jax.tasks.images.ImageDataset`` among them).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, NamedTuple

import numpy as np


class Arrays(NamedTuple):
  """The smallest dataset ``batches`` accepts: images [N, ...] and labels [N]."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:   # the number of rows, not of fields
    return int(self.images.shape[0])


class Batch(NamedTuple):
  """A fixed-size batch; ``mask`` is False on the rows that pad a ragged tail."""

  images: np.ndarray
  labels: np.ndarray
  mask: np.ndarray


def num_batches(n: int, batch_size: int, tail: str = "pad") -> int:
  return n // batch_size if tail == "drop" else -(-n // batch_size)


def batches(dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
            epoch: int = 0, tail: str = "pad", prefetch: int = 2,
            transform: Callable | None = None) -> Iterator[Batch]:
  """Iterate over ``dataset`` in batches of exactly ``batch_size`` rows.

  The order is a permutation seeded by (seed, epoch) when ``shuffle``. ``tail``: "pad"
  repeats the last rows to fill the final batch and masks them out (fixed shapes: one jit
  compile), "drop" drops it, "short" yields it shorter. ``transform`` (e.g. a
  ``Normalization``) is applied to the images in a background thread that keeps up to
  ``prefetch`` batches ready (0: no thread).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if tail not in ("pad", "drop", "short"):
    raise ValueError(f"tail must be 'pad', 'drop' or 'short', got {tail!r}")
  n = len(dataset)
  order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
           else np.arange(n))

  def produce():
    for i in range(num_batches(n, batch_size, tail)):
      index = order[i * batch_size:(i + 1) * batch_size]
      mask = np.ones(len(index), bool)
      if tail == "pad" and len(index) < batch_size:
        fill = batch_size - len(index)
        index = np.concatenate([index, np.resize(index, fill)])
        mask = np.concatenate([mask, np.zeros(fill, bool)])
      images = dataset.images[index]
      yield Batch(transform(images) if transform else images, dataset.labels[index], mask)

  return _prefetched(produce, prefetch) if prefetch > 0 else produce()


_END = object()


def _prefetched(produce, size: int):
  """Run the generator ``produce()`` in a daemon thread, ``size`` items ahead."""
  items: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def work():
    try:
      for item in produce():
        if not put(item):
          return
      put(_END)
    except BaseException as e:  # re-raised in the consumer
      put(e)

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    while True:
      item = items.get()
      if item is _END:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()

"""TFDS without TensorFlow: the file operations its shuffler needs once a split outgrows memory.

tfds.core.shuffle keeps up to 1 GB (MAX_MEM_BUFFER_SIZE) of serialized examples in memory, then
spills them into bucket files through `tf.io.gfile`, which raises ModuleNotFoundError when
TensorFlow is not installed (this project uses TFDS for its ArrayRecord builders only). `install()`
gives that module local-file equivalents when TensorFlow is absent; with TensorFlow installed it
does nothing.

Spilled examples are spread over buckets by the hash of their key, so builders that write large
splits should shuffle (the default): with `disable_shuffling=True` every example lands in one
bucket, which TFDS reads back into memory whole.
"""
from __future__ import annotations

import importlib.util
import os


class _Errors:
  class ResourceExhaustedError(OSError):
    """Never raised by local files; TFDS only catches it."""


class _Gfile:
  GFile = staticmethod(lambda path, mode="r": open(os.fspath(path), mode))
  exists = staticmethod(lambda path: os.path.exists(os.fspath(path)))
  remove = staticmethod(lambda path: os.remove(os.fspath(path)))


class _Io:
  gfile = _Gfile


class _FileOnlyTF:
  """The part of the TensorFlow API that tfds.core.shuffle uses."""
  io = _Io
  errors = _Errors


def install() -> bool:
  """Lets TFDS spill large splits to disk without TensorFlow; -> True when it patched TFDS."""
  if importlib.util.find_spec("tensorflow") is not None:
    return False
  from tensorflow_datasets.core import shuffle
  shuffle.tf = _FileOnlyTF
  return True

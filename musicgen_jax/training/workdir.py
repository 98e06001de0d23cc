"""Work directories that stay usable: one writer at a time, and no config that cannot restore.

* `WorkdirLock`: an exclusive `flock` on `<workdir>/.lock`, held for the life of a training process and
  released by the kernel however the process ends (so a killed run never leaves a stale lock). A second
  run is refused with the holder's pid and host. Advisory locks need a local or NFSv4 file system; on
  object stores (gs://) only the first process of a job takes it.
* `incompatible_fields`: which fields of a new config differ from the config a work directory was
  trained with in a way the checkpoint cannot absorb (parameter shapes, the pattern, the optimizer-state
  structure, the data source). Numerics (dtype, dropout, remat, scan unroll), the learning-rate
  schedule, logging and the mesh may change between runs; a checkpoint restores onto any mesh.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from typing import Any

import ml_collections

LOCK_FILE = ".lock"

# Config fields whose change a checkpoint cannot absorb: (prefix, fields under it that may change).
_FIXED = (
    ("model.", ("model.dtype", "model.dropout", "model.remat", "model.scan_unroll",
                "model.max_positions")),
    ("text.", ("text.max_length", "text.prefix_padding")),
    ("pattern.", ()),
    ("codec.", ()),
    ("train.grad_accum", ()),
    ("train.ema_decay", ()),
    ("train.freeze", ()),
    ("data.kind", ()),
    ("data.manifest", ()),
    ("codec_train.discriminator.", ()),
    ("codec_train.losses.", ()),
    ("task", ()),
)


class WorkdirError(ValueError):
  """A work directory that cannot be used as asked (one line: what and what to do)."""


class WorkdirLock:
  """`with WorkdirLock(dir):` holds the directory for one training process."""

  def __init__(self, directory: str):
    self.path = os.path.join(directory, LOCK_FILE)
    self._fd = None

  def acquire(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirError(f"{os.path.dirname(self.path)} is in use by another training run ({holder}): "
                         "wait for it to finish, stop it, or use another --workdir") from None
    os.ftruncate(fd, 0)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds")}
    os.write(fd, json.dumps(info).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self, remove_directory: bool = False) -> None:
    """Unlocks; with `remove_directory` (a directory the run created), a directory that holds
    nothing but the lock file is removed too (a run refused at start-up)."""
    if self._fd is None:
      return
    directory = os.path.dirname(self.path)
    if remove_directory and os.listdir(directory) == [LOCK_FILE]:
      os.remove(self.path)          # still held: no other run can have taken it
      os.rmdir(directory)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    info = json.loads(os.read(fd, 4096).decode() or "{}")
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('since', '?')}"
  except (OSError, ValueError):
    return "pid and host unknown"


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
  """{'model.dim': 1024, ...} with lists and tuples compared as lists."""
  d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, (tuple, list)) else v
  return out


# Fields added to the config after work directories were written, with the value a config that
# lacks them means.
_ADDED = {"model.beat_clock_rate": 0.0}


def incompatible_fields(stored: ml_collections.ConfigDict, new: ml_collections.ConfigDict
                        ) -> list[str]:
  """'field: stored -> new' for every fixed field that differs."""
  a, b = flatten(stored), flatten(new)
  a, b = {**_ADDED, **a}, {**_ADDED, **b}
  out = []
  for key in sorted(set(a) | set(b)):
    for prefix, free in _FIXED:
      if key.startswith(prefix) and key not in free:
        if a.get(key) != b.get(key):
          out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
        break
  return out

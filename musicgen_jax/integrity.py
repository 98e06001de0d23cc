"""Damage detection for anything saved to disk: a size + checksum record per file, and finite weights.

    write_record(directory)     records the size and BLAKE2b checksum of every file under `directory`
                                (or only under `paths`, relative to it) in a JSON record
    verify(directory)           re-reads every recorded file; IntegrityError naming the first file
                                that is missing, has another size or checksum, or is not recorded
    nonfinite_leaves(tree)      tree paths of leaves holding NaN / inf (or absurdly large) values
    check_finite(tree, source)  IntegrityError naming the first such leaf and `source`

The record defaults to `<directory>/integrity.json` (never listed in itself); `record=` puts it
elsewhere, e.g. beside a checkpoint step that another library writes. Files are streamed in 1 MiB blocks
and hashed on a few threads (hashlib releases the GIL): verifying costs about one read of the data.
Model directories (checkpoint.save_model) and training checkpoints are both recorded this way.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import time
from typing import Any, Iterable, Sequence

import numpy as np

from musicgen_jax.checkpoint import CheckpointError

RECORD_FILE = "integrity.json"
FORMAT = 2   # 2: checksums of 64 MiB segments, hashed in parallel
_BLOCK = 1 << 20
_SEGMENT = 64 << 20      # files are hashed in segments of this size, in parallel
# No weight of a trained model comes near this: beyond it a value is read as damage (overwritten bytes
# mostly decode to huge finite floats, not to NaN).
MAX_ABS_WEIGHT = 1e8


class IntegrityError(CheckpointError):
  """A saved file or parameter that is not what was written (one line: which file, what differs)."""


def _record_path(directory: str, record: str | None) -> str:
  return record if record is not None else os.path.join(directory, RECORD_FILE)


def _segment_digest(path: str, start: int, length: int) -> bytes:
  """BLAKE2b of bytes [start, start + length) of a file, read in 1 MiB blocks."""
  h = hashlib.blake2b(digest_size=32)
  buf = bytearray(_BLOCK)
  view = memoryview(buf)
  with open(path, "rb", buffering=0) as f:
    f.seek(start)
    left = length
    while left > 0:
      n = f.readinto(view[:min(_BLOCK, left)])
      if not n:
        break
      h.update(view[:n])
      left -= n
  return h.digest()


def _files(directory: str, paths: Sequence[str] | None, skip: str) -> list[str]:
  """Sorted relative paths ('/'-separated) of the regular files under directory (or its `paths`)."""
  roots = [""] if paths is None else [p.strip("/") for p in paths]
  out = set()
  for root in roots:
    top = os.path.join(directory, root) if root else directory
    if os.path.isfile(top):
      out.add(root)
      continue
    for dirpath, dirnames, filenames in os.walk(top):
      dirnames.sort()
      for name in filenames:
        full = os.path.join(dirpath, name)
        if os.path.abspath(full) == skip or os.path.islink(full):
          continue
        out.add(os.path.relpath(full, directory).replace(os.sep, "/"))
  return sorted(out)


def _hash_all(directory: str, rels: Iterable[str]) -> dict[str, str]:
  """{relative path: checksum}. A file's checksum is the BLAKE2b of the BLAKE2b digests of its 64 MiB
  segments, so one large file is hashed on several threads too."""
  jobs = []   # (rel, start, length)
  for rel in rels:
    size = os.path.getsize(os.path.join(directory, rel))
    jobs += [(rel, start, min(_SEGMENT, size - start)) for start in range(0, size, _SEGMENT)] or [
        (rel, 0, 0)]
  workers = min(16, max(1, len(jobs)), os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    parts = list(pool.map(lambda j: _segment_digest(os.path.join(directory, j[0]), j[1], j[2]), jobs))
  joined: dict[str, list[bytes]] = {}
  for (rel, _, _), part in zip(jobs, parts):
    joined.setdefault(rel, []).append(part)
  return {rel: hashlib.blake2b(b"".join(ps), digest_size=32).hexdigest() for rel, ps in joined.items()}


def write_record(directory: str, *, record: str | None = None,
                 paths: Sequence[str] | None = None) -> str:
  """Records size and checksum of every file under `directory` (or under `paths`, relative to it).

  The record (default `<directory>/integrity.json`) is written atomically; returns its path.
  """
  directory = os.path.abspath(directory)
  rec_path = os.path.abspath(_record_path(directory, record))
  rels = _files(directory, paths, rec_path)
  digests = _hash_all(directory, rels)
  files = {r: {"size": os.path.getsize(os.path.join(directory, r)), "blake2b": digests[r]}
           for r in rels}
  body = {"format": FORMAT, "algorithm": "blake2b-256 of the blake2b-256 of each 64 MiB segment",
          "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
          "paths": None if paths is None else [p.strip("/") for p in paths], "files": files}
  os.makedirs(os.path.dirname(rec_path), exist_ok=True)
  tmp = f"{rec_path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(body, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, rec_path)
  return rec_path


def has_record(directory: str, *, record: str | None = None) -> bool:
  return os.path.isfile(_record_path(directory, record))


def verify(directory: str, *, record: str | None = None, required: bool = True,
           checksums: bool = True) -> bool:
  """Checks `directory` against its record; IntegrityError naming the first damaged file.

  Missing, resized, changed (checksum) and unrecorded files (under the recorded paths) are damage.
  Without a record: IntegrityError when `required`, else returns False. `checksums=False` compares
  sizes only (instant; catches truncation, not overwritten bytes). Returns True when verified.
  """
  directory = os.path.abspath(directory)
  rec_path = os.path.abspath(_record_path(directory, record))
  if not os.path.isfile(rec_path):
    if required:
      raise IntegrityError(f"{rec_path} is missing: cannot verify {directory}")
    return False
  try:
    with open(rec_path) as f:
      body = json.load(f)
    files = body["files"]
    if body.get("format") != FORMAT:
      raise ValueError(f"format {body.get('format')!r}, expected {FORMAT}")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise IntegrityError(f"the integrity record {rec_path} is unreadable ({e}): the directory "
                         "cannot be verified") from None
  for rel in sorted(files):
    path = os.path.join(directory, rel)
    if not os.path.isfile(path):
      raise IntegrityError(f"{path} is missing (it is listed in {rec_path})")
    size = os.path.getsize(path)
    if size != files[rel]["size"]:
      raise IntegrityError(f"{path} is damaged: {size} bytes, {files[rel]['size']} were written")
  extra = sorted(set(_files(directory, body.get("paths"), rec_path)) - set(files))
  if extra:
    raise IntegrityError(f"{os.path.join(directory, extra[0])} was not written with this directory "
                         f"(not in {rec_path}): remove it, or the directory was mixed with another")
  if checksums:
    digests = _hash_all(directory, sorted(files))
    for rel in sorted(files):
      if digests[rel] != files[rel]["blake2b"]:
        raise IntegrityError(f"{os.path.join(directory, rel)} is damaged: its checksum differs from "
                             f"the one recorded when it was written ({rec_path})")
  return True


def _path_name(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def _device_stats(xs: list) -> list:
  import jax
  import jax.numpy as jnp

  @jax.jit
  def stats(xs):
    return [(jnp.all(jnp.isfinite(x)), jnp.maximum(jnp.max(x), -jnp.min(x)).astype(jnp.float32))
            for x in xs]
  return stats(xs)


def nonfinite_leaves(tree: Any, max_abs: float = MAX_ABS_WEIGHT) -> list[str]:
  """Tree paths ("lm/layers/fc1/kernel: NaN or inf") of floating leaves with NaN, inf or |x| > max_abs.

  Leaves may be numpy or jax arrays (checked where they live: one small reduction per leaf).
  """
  import jax
  import jax.numpy as jnp

  leaves = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.size]

  on_host = lambda x: isinstance(x, np.ndarray) or all(d.platform == "cpu" for d in x.devices())
  if all(on_host(x) for _, x in leaves):
    # (all finite, largest |x|) per leaf with numpy: nothing to compile, no leaf-sized temporary,
    # two passes (max and min are NaN when any value is, +-inf when one is)
    results = []
    for _, x in leaves:
      x = np.asarray(x)
      with np.errstate(invalid="ignore"):
        big = max(float(x.max()), -float(x.min()))
      finite = bool(np.isfinite(big))
      results.append((finite, big if finite else 0.0))
  else:   # on the accelerator, in one compiled program (kept by the compilation cache)
    results = jax.device_get(_device_stats([x for _, x in leaves]))
  bad = []
  for (path, _), (finite, big) in zip(leaves, results):
    if not finite:
      bad.append(f"{_path_name(path)}: NaN or inf")
    elif float(big) > max_abs:
      bad.append(f"{_path_name(path)}: |value| up to {float(big):.3g}")
  return bad


def check_finite(tree: Any, source: str, max_abs: float = MAX_ABS_WEIGHT) -> None:
  """IntegrityError naming the first leaf of `tree` (read from `source`) that nonfinite_leaves finds."""
  bad = nonfinite_leaves(tree, max_abs)
  if bad:
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise IntegrityError(f"{source} holds damaged weights: {bad[0]}{more}; re-create or re-download "
                         "it")

"""Training checkpoints: Orbax saves of the train state and the data iterators, kept complete.

    <workdir>/checkpoints/<step>/state/    the train state (params, optimizer, EMA, step, RNG), sharded
    <workdir>/checkpoints/<step>/data/     each process's grain iterator position (process_i-of-n.json)
    <workdir>/integrity/<step>.json        sizes and checksums of every file of that step, written once
                                           the step is committed (musicgen_jax.integrity)
    <workdir>/damaged/<step>-<time>/       a step that failed verification, moved aside (never deleted)

Saves are asynchronous: `save` returns once the arrays are copied off the devices and the files are
written in the background; Orbax commits a step by renaming its temporary directory, so a run killed
mid-save leaves only a `*.orbax-checkpoint-tmp*` directory, which is removed at the next start. Resuming
takes the newest step that is committed and verifies (or, when the run died between the commit and the
checksum, restores cleanly); anything else is moved aside with a warning.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from typing import Any

import grain.checkpoint as grain_ckpt
import jax
import orbax.checkpoint as ocp

from musicgen_jax import integrity

_log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
RECORDS = "integrity"
DAMAGED = "damaged"


class CheckpointStore:
  """Orbax CheckpointManager with completeness checks, per-step checksums and keep-N."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True, checksums: bool = True):
    self.workdir = workdir
    self.root = os.path.join(workdir, CHECKPOINTS)
    self.checksums = checksums
    self.primary = jax.process_index() == 0
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, keep), create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.root, options=options, item_names=("state", "data"))
    self._threads: list[threading.Thread] = []

  # --- reading ----------------------------------------------------------------------------------
  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def _record(self, step: int) -> str:
    return os.path.join(self.workdir, RECORDS, f"{step}.json")

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.root, str(step))

  def _move_aside(self, step: int, why: str) -> None:
    dst = os.path.join(self.workdir, DAMAGED, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    _log.warning("checkpoint step %d %s: moved to %s", step, why, dst)
    print(f"warning: checkpoint step {step} {why}; moved to {dst}", flush=True)
    if self.primary:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(self._step_dir(step), dst)
      if os.path.exists(self._record(step)):
        shutil.move(self._record(step), os.path.join(dst, "integrity.json"))
    self.manager.reload()

  def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[Any, int] | None:
    """Restores the newest complete step into `abstract_state` (ShapeDtypeStructs with shardings: the
    mesh may differ from the one that saved) and sets `data_iterator`'s position. None if no step."""
    for step in reversed(self.steps()):
      record = self._record(step)
      if os.path.isfile(record):
        try:
          integrity.verify(self._step_dir(step), record=record)
        except integrity.IntegrityError as e:
          self._move_aside(step, f"is damaged ({e})")
          continue
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain_ckpt.CheckpointRestore(data_iterator)))
      except Exception as e:  # noqa: BLE001 -- Orbax raises many types for an unreadable step
        if os.path.isfile(record):
          raise   # verified files that do not restore: a config mismatch, not damage
        self._move_aside(step, f"does not restore ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        continue
      state = restored["state"]
      bad = integrity.nonfinite_leaves(state.params)
      if bad:
        self._move_aside(step, f"holds non-finite parameters ({bad[0]})")
        continue
      if not os.path.isfile(record):
        self._write_record(step)
      return state, step
    return None

  # --- writing ----------------------------------------------------------------------------------
  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    """Starts an asynchronous save of `state` and the iterator position at `step`."""
    self._record_finished()
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain_ckpt.CheckpointSave(data_iterator)), force=True)

  def reached_preemption(self, step: int) -> bool:
    """True on every process once the cluster has announced a preemption (multi-host JAX)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until every save is committed and checksummed."""
    self.manager.wait_until_finished()
    self._record_finished()
    for t in self._threads:
      t.join()
    self._threads = []

  def close(self) -> None:
    self.wait()
    # The manager clears old temporary directories in a thread it starts when it is created, and its
    # close() does not wait for that: a run that stops before its first save (a bad init_from) would
    # have the thread cut off at interpreter exit, with a traceback after the error line.
    getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    self.manager.close()

  def _record_finished(self) -> None:
    """Checksums committed steps that have no record yet, in a background thread."""
    if not (self.primary and self.checksums) or self.manager.is_saving_in_progress():
      return
    steps = self.steps()
    records = os.path.join(self.workdir, RECORDS)
    for name in (os.listdir(records) if os.path.isdir(records) else []):
      stem = name[:-len(".json")]
      if name.endswith(".json") and stem.isdigit() and int(stem) not in steps:
        os.remove(os.path.join(records, name))   # that step was removed by keep-N
    for step in steps:
      if not os.path.isfile(self._record(step)):
        t = threading.Thread(target=self._write_record, args=(step,), daemon=True)
        t.start()
        self._threads.append(t)

  def _write_record(self, step: int) -> None:
    if not (self.primary and self.checksums):
      return
    os.makedirs(os.path.join(self.workdir, RECORDS), exist_ok=True)
    try:
      integrity.write_record(self._step_dir(step), record=self._record(step))
    except FileNotFoundError:   # the step was deleted by keep-N meanwhile
      pass

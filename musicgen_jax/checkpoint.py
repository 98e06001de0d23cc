"""Model directories: an Orbax parameter checkpoint plus the config our code loads.

Layout written by `save_model` (export, import of pretrained weights) and by train.py:
    DIR/musicgen_config.json      the ml_collections config (JSON)
    DIR/params/                   Orbax checkpoint of {'lm': ..., 'text': ..., 'codec': ... (optional)}
    DIR/tokenizer.json            optional, the text tokenizer
    DIR/integrity.json            sizes and checksums of the files above (musicgen_jax.integrity)
A training work directory holds the same config file and `checkpoints/<step>/...` (Orbax
CheckpointManager); `load_model` takes the parameters of its latest step (verified against
`integrity/<step>.json` when the training wrote one).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

CONFIG_FILE = "musicgen_config.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.json"
TRAIN_CHECKPOINTS = "checkpoints"
CODEC_DIR = "codec"             # <workdir>/codec/: the codec of a fine-tuned model (a model directory)
TRAIN_RECORDS = "integrity"     # <workdir>/integrity/<step>.json (training/checkpoints.py writes them)


class CheckpointError(ValueError):
  """A model directory that cannot be loaded (one line: which path, what is wrong)."""


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def write_config(directory: str, config: ml_collections.ConfigDict) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    f.write(config_to_json(config))


def read_config(directory: str) -> ml_collections.ConfigDict:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory} does not exist")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} is missing: {directory} is not a musicgen_jax model directory "
                          "(train.py or `python -m musicgen_jax.convert` write one)")
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is unreadable: {e}") from None
  return _lists_to_tuples_config(d)


def _lists_to_tuples_config(d: dict) -> ml_collections.ConfigDict:
  def fix(x, key=""):
    if isinstance(x, dict):
      return {k: fix(v, k) for k, v in x.items()}
    if isinstance(x, list) and key != "logical_axis_rules":
      return tuple(fix(v) for v in x)
    return x
  return ml_collections.ConfigDict(fix(d))


def _this_process_only() -> ocp.options.MultiprocessingOptions:
  """Orbax options for a model directory that one process writes or reads alone (host numpy arrays;
  the primary's best/ and codec/ copies, a token-cache worker's codec). Orbax's default synchronises
  every process of a multi-host job around each save and restore, so one process doing it alone
  would wait for the others, or fail on their next, different, synchronisation."""
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def save_model(directory: str, config: ml_collections.ConfigDict, params: dict,
               tokenizer_file: str | None = None, *, overwrite: bool = False) -> None:
  """Writes config + params (+ tokenizer.json) + an integrity record to `directory`.

  A non-empty `directory` is refused unless `overwrite` (and even then only an earlier model
  directory is replaced, never other files). The new model is written beside it and swapped in, so a
  save that is interrupted leaves the old model (or nothing) in place, never a mix.
  """
  from musicgen_jax import integrity
  directory = os.path.abspath(directory.rstrip("/\\") or directory)
  check_output_dir(directory, overwrite)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = f"{directory}.tmp-{os.getpid()}"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  try:
    write_config(tmp, config)
    params = jax.tree.map(np.asarray, params)
    mp = _this_process_only()
    with ocp.Checkpointer(ocp.StandardCheckpointHandler(multiprocessing_options=mp),
                          multiprocessing_options=mp) as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.StandardSave(params))
    recorded = [CONFIG_FILE, PARAMS_DIR]
    if tokenizer_file:
      shutil.copyfile(tokenizer_file, os.path.join(tmp, TOKENIZER_FILE))
      recorded.append(TOKENIZER_FILE)
    integrity.write_record(tmp, paths=recorded)
    old = None
    if os.path.exists(directory):
      old = f"{directory}.old-{os.getpid()}"
      os.replace(directory, old)
    os.replace(tmp, directory)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def check_output_dir(directory: str, overwrite: bool) -> None:
  """CheckpointError unless `directory` is absent or empty, or (with overwrite) a model directory."""
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise CheckpointError(f"{directory} exists and is not a directory: choose another output path")
  if not os.path.isdir(directory) or not os.listdir(directory):
    parent = os.path.dirname(os.path.abspath(directory)) or "."
    probe = parent
    while not os.path.exists(probe):
      probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK):
      raise CheckpointError(f"cannot write {directory}: {probe} is not writable")
    return
  if not overwrite:
    raise CheckpointError(f"{directory} already exists and is not empty: pass --overwrite to "
                          "replace the model in it, or choose another directory")
  if not os.path.isfile(os.path.join(directory, CONFIG_FILE)):
    raise CheckpointError(f"{directory} is not a musicgen_jax model directory (no {CONFIG_FILE}); "
                          "it is never replaced, even with --overwrite: choose another directory")


def latest_train_step(directory: str) -> int | None:
  root = os.path.join(directory, TRAIN_CHECKPOINTS)
  if not os.path.isdir(root):
    return None
  steps = [int(n) for n in os.listdir(root) if n.isdigit()]
  return max(steps) if steps else None


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  """A train step's `state` item has no step-level metadata file of its own, and orbax logs a
  warning about that on every read of it; the read itself is complete."""
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(level)


def load_model(directory: str, *, verify: bool = True,
               sharding: jax.sharding.Sharding | None = None) -> tuple[ml_collections.ConfigDict,
                                                                       dict[str, Any]]:
  """-> (config, params {'lm', 'text', ['codec']}) from an export or a train dir.

  The files are checked against their integrity record first (`verify=False`: sizes only) and the
  weights for NaN / inf / absurd values after; damage raises CheckpointError naming the file. The
  arrays are restored straight onto `sharding` (default: the first local device) as jax Arrays.
  """
  from musicgen_jax import integrity
  directory = os.path.abspath(directory)
  config = read_config(directory)
  target = os.path.join(directory, PARAMS_DIR)
  step = None
  if not os.path.isdir(target):
    step = latest_train_step(directory)
    if step is None:
      raise CheckpointError(f"{directory} has neither {PARAMS_DIR}/ nor {TRAIN_CHECKPOINTS}/<step>/: "
                            "nothing to load")
    record = os.path.join(directory, TRAIN_RECORDS, f"{step}.json")
    step_dir = os.path.join(directory, TRAIN_CHECKPOINTS, str(step))
    checked = integrity.verify(step_dir, record=record, required=False, checksums=verify)
    target = os.path.join(step_dir, "state")
  else:
    checked = integrity.verify(directory, required=False, checksums=verify)
  if not checked:
    print(f"warning: {directory} has no integrity record (written by an older version?): its files "
          "cannot be checked for damage", file=sys.stderr)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    with _quiet_orbax(), ocp.PyTreeCheckpointer() as ckptr:
      meta = ckptr.metadata(target).item_metadata
      meta = getattr(meta, "tree", meta)
      if step is not None:     # a train state: only its parameters are read
        meta = {"params": meta["params"]}
      abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                              meta)
      restored = ckptr.restore(target, args=ocp.args.PyTreeRestore(
          abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
          partial_restore=step is not None))
  except Exception as e:  # orbax raises many types for corrupt or partial checkpoints
    raise CheckpointError(f"cannot read the checkpoint at {target}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
  params = restored["params"] if step is not None else restored
  if step is not None and os.path.isdir(os.path.join(directory, CODEC_DIR)):
    params = dict(params, codec=load_codec(os.path.join(directory, CODEC_DIR))[1])
  if "lm" not in params:
    raise CheckpointError(f"the checkpoint at {target} has no 'lm' parameters")
  integrity.check_finite(params, target)
  return config, cast_floating(params, np.float32)


def cast_floating(params: Any, dtype) -> Any:
  """The floating arrays of `params` (numpy or jax) as `dtype`, others unchanged. Loading casts to
  float32, so weights stored in bfloat16 (`musicgen_jax.export --dtype`) become the float32 master
  weights of every other path; the export casts the other way."""
  dtype = np.dtype(dtype)
  leaves = jax.tree.leaves(params)
  if not any(_floating(x) and x.dtype != dtype for x in leaves):
    return params
  if all(isinstance(x, np.ndarray) for x in leaves):
    return _cast_leaves(params, dtype)
  # On the devices: every cast in one compiled program (one entry in the compilation cache), not one
  # eager program per leaf (41 for the shipped model).
  return jax.jit(_cast_leaves, static_argnums=1)(params, dtype)


def _floating(x) -> bool:
  return jax.numpy.issubdtype(x.dtype, jax.numpy.floating)   # numpy's issubdtype misses bfloat16


def _cast_leaves(params: Any, dtype: np.dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if _floating(x) else x, params)


def load_codec(directory: str):
  """-> (EncodecModel, its params as numpy arrays) of a directory that holds a codec: a model
  directory, a codec training run's work directory (its newest complete checkpoint), or a
  fine-tuning work directory (its `codec/`).

  Only the codec's arrays are read (a partial restore), not the LM's. CheckpointError when the
  directory has no codec (`python -m musicgen_jax.convert` writes one with the model).
  """
  from musicgen_jax.pipeline import codec_from_config
  directory = os.path.abspath(directory)
  target = os.path.join(directory, PARAMS_DIR)
  if not os.path.isdir(target) and os.path.isdir(os.path.join(directory, CODEC_DIR)):
    return load_codec(os.path.join(directory, CODEC_DIR))
  config = read_config(directory)
  codec = codec_from_config(config)
  in_state = False
  if not os.path.isdir(target) and (step := latest_train_step(directory)) is not None:
    target, in_state = os.path.join(directory, TRAIN_CHECKPOINTS, str(step), "state"), True
  if codec is None or not os.path.isdir(target):
    raise CheckpointError(f"{directory} holds no codec (config.codec.encodec or {PARAMS_DIR}/ is "
                          "missing): point data.codec at a model directory written by "
                          "`python -m musicgen_jax.convert` or a codec training run")
  mp = _this_process_only()
  try:
    with _quiet_orbax(), ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=mp),
                                          multiprocessing_options=mp) as ckptr:
      meta = ckptr.metadata(target).item_metadata
      meta = getattr(meta, "tree", meta)
      params_meta = meta["params"] if in_state else meta
      if "codec" not in params_meta:
        raise KeyError("no 'codec' parameters")
      item = {"codec": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), params_meta["codec"])}
      if in_state:
        item = {"params": item}
      restored = ckptr.restore(target, args=ocp.args.PyTreeRestore(
          item, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item),
          partial_restore=True))
  except Exception as e:  # orbax raises many types for corrupt or partial checkpoints
    raise CheckpointError(f"cannot read the codec of {target}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
  params = restored["params"]["codec"] if in_state else restored["codec"]
  from musicgen_jax import integrity
  integrity.check_finite({"codec": params}, target)
  return codec, cast_floating(params, np.float32)

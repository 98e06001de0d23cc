"""Model directories: the parameters in one safetensors file plus the config our code loads.

Layout written by `save_model` (export, import of pretrained weights, a training run's best/ and codec/):
    DIR/musicgen_config.json      the ml_collections config (JSON)
    DIR/params.safetensors        {'lm': ..., 'text': ..., 'codec': ... (optional)}, one tensor per leaf
                                  named by its path ("lm/layers/fc1/kernel"), in the stored dtype
    DIR/tokenizer.json            optional, the text tokenizer
    DIR/integrity.json            sizes and checksums of the files above (musicgen_jax.integrity)
Directories written before the safetensors file held the same tree as an Orbax checkpoint in
`DIR/params/`; they are still read. A training work directory holds the same config file and
`checkpoints/<step>/...` (Orbax CheckpointManager); `load_model` takes the parameters of its latest
step (verified against `integrity/<step>.json` when the training wrote one).

safetensors, not Orbax, for the finished model: it is the format model weights are shared in, and it
loads several times faster (a converted small model with T5 base, 2.35 GB, on the 2-core CPU: 1.8 s
to read against 10.2 s through Orbax and tensorstore), without importing Orbax at all.
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
from absl import logging as absl_logging

CONFIG_FILE = "musicgen_config.json"
PARAMS_FILE = "params.safetensors"
PARAMS_DIR = "params"           # the Orbax parameter checkpoint of older model directories
TOKENIZER_FILE = "tokenizer.json"
TRAIN_CHECKPOINTS = "checkpoints"
CODEC_DIR = "codec"             # <workdir>/codec/: the codec of a fine-tuned model (a model directory)
TRAIN_RECORDS = "integrity"     # <workdir>/integrity/<step>.json (training/checkpoints.py writes them)
_FORMAT = {"format": "musicgen_jax"}


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


def _this_process_only():
  """Orbax options for a model directory that one process writes or reads alone (host numpy arrays;
  the primary's best/ and codec/ copies, a token-cache worker's codec). Orbax's default synchronises
  every process of a multi-host job around each save and restore, so one process doing it alone
  would wait for the others, or fail on their next, different, synchronisation."""
  import orbax.checkpoint as ocp
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
    write_params(os.path.join(tmp, PARAMS_FILE), params)
    recorded = [CONFIG_FILE, PARAMS_FILE]
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


def write_params(path: str, params: dict) -> None:
  """The parameter tree (nested dicts of arrays, any dtype) as one safetensors file, a tensor per leaf
  named by its path ("lm/layers/fc1/kernel"); empty dicts are listed in the file's metadata."""
  from safetensors.numpy import save_file
  flat, empty = {}, []

  def walk(node, prefix):
    if hasattr(node, "items"):
      if not node:
        empty.append(prefix[:-1])
      for k, v in node.items():
        if not isinstance(k, str) or "/" in k or not k:
          raise ValueError(f"parameter name {prefix}{k!r}: names must be non-empty strings without '/'")
        walk(v, f"{prefix}{k}/")
    elif hasattr(node, "shape") and hasattr(node, "dtype"):
      flat[prefix[:-1]] = np.ascontiguousarray(np.asarray(node))
    else:
      raise TypeError(f"parameter {prefix[:-1]!r} is a {type(node).__name__}: only dicts of arrays "
                      "are stored")
  walk(params, "")
  save_file(flat, path, metadata=dict(_FORMAT, empty=json.dumps(empty)))


def read_params(path: str, prefix: str = "") -> dict:
  """The tree `write_params` wrote (numpy arrays, stored dtypes); with `prefix` ("codec/") only the
  leaves under it. CheckpointError when the file cannot be read as safetensors."""
  from safetensors import safe_open
  tree: dict = {}

  def node_at(names):
    node = tree
    for p in names:
      node = node.setdefault(p, {})
    return node
  try:
    with safe_open(path, framework="numpy") as f:
      for name in json.loads((f.metadata() or {}).get("empty", "[]")):
        if name.startswith(prefix) and name:
          node_at(name.split("/"))
      for name in f.keys():
        if name.startswith(prefix):
          *parents, leaf = name.split("/")
          node_at(parents)[leaf] = f.get_tensor(name)
  except Exception as e:   # safetensors raises its own error type, OSError and others for bad files
    raise CheckpointError(f"cannot read the weights in {path}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'unreadable'}") from None
  return tree


def _to_devices(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda i: x[i]), tree)


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
  arrays are put on `sharding` (default: the first local device) as jax Arrays, float32.
  """
  from musicgen_jax import integrity
  directory = os.path.abspath(directory)
  config = read_config(directory)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if os.path.isfile(os.path.join(directory, PARAMS_FILE)):
    _verify(directory, verify=verify)
    target = os.path.join(directory, PARAMS_FILE)
    params = _to_devices(read_params(target), sharding)
  else:
    target, step = os.path.join(directory, PARAMS_DIR), None
    if not os.path.isdir(target):
      step = latest_train_step(directory)
      if step is None:
        raise CheckpointError(f"{directory} has neither {PARAMS_FILE}, {PARAMS_DIR}/ nor "
                              f"{TRAIN_CHECKPOINTS}/<step>/: nothing to load")
      step_dir = os.path.join(directory, TRAIN_CHECKPOINTS, str(step))
      _verify(step_dir, verify=verify,
              record=os.path.join(directory, TRAIN_RECORDS, f"{step}.json"), shown=directory)
      target = os.path.join(step_dir, "state")
    else:
      _verify(directory, verify=verify)
    params = _restore_orbax(target, sharding, train_state=step is not None)
    if step is not None and os.path.isdir(os.path.join(directory, CODEC_DIR)):
      params = dict(params, codec=load_codec(os.path.join(directory, CODEC_DIR))[1])
  if "lm" not in params:
    raise CheckpointError(f"the checkpoint at {target} has no 'lm' parameters")
  integrity.check_finite(params, target)
  return config, cast_floating(params, np.float32)


def _verify(directory: str, *, verify: bool, record: str | None = None,
            shown: str | None = None) -> None:
  """integrity.verify, with one warning line where the directory has no record."""
  from musicgen_jax import integrity
  if not integrity.verify(directory, record=record, required=False, checksums=verify):
    print(f"warning: {shown or directory} has no integrity record (written by an older version?): its "
          "files cannot be checked for damage", file=sys.stderr)


def _restore_orbax(target: str, sharding: jax.sharding.Sharding, *, train_state: bool) -> dict:
  """The parameters of an Orbax checkpoint (an older model directory's params/, or a train state's
  params), restored straight onto `sharding`."""
  import orbax.checkpoint as ocp
  try:
    with _quiet_orbax(), ocp.PyTreeCheckpointer() as ckptr:
      meta = ckptr.metadata(target).item_metadata
      meta = getattr(meta, "tree", meta)
      if train_state:     # a train state: only its parameters are read
        meta = {"params": meta["params"]}
      abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                              meta)
      restored = ckptr.restore(target, args=ocp.args.PyTreeRestore(
          abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
          partial_restore=train_state))
  except Exception as e:  # orbax raises many types for corrupt or partial checkpoints
    raise CheckpointError(f"cannot read the checkpoint at {target}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
  return restored["params"] if train_state else restored


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

  Only the codec's arrays are read, not the LM's; a model directory's files are checked against its
  integrity record first. CheckpointError when the directory has no codec or is damaged
  (`python -m musicgen_jax.convert` writes one with the model).
  """
  from musicgen_jax import integrity
  from musicgen_jax.pipeline import codec_from_config
  directory = os.path.abspath(directory)
  params_file = os.path.join(directory, PARAMS_FILE)
  target = os.path.join(directory, PARAMS_DIR)
  if (not os.path.isfile(params_file) and not os.path.isdir(target)
      and os.path.isdir(os.path.join(directory, CODEC_DIR))):
    return load_codec(os.path.join(directory, CODEC_DIR))
  config = read_config(directory)
  codec = codec_from_config(config)
  if codec is not None and os.path.isfile(params_file):
    _verify(directory, verify=True)
    params = read_params(params_file, prefix="codec/").get("codec")
    if params is None:
      raise CheckpointError(f"{params_file} holds no codec parameters: point data.codec at a model "
                            "directory written by `python -m musicgen_jax.convert` or a codec "
                            "training run")
    integrity.check_finite({"codec": params}, params_file)
    return codec, cast_floating(params, np.float32)
  in_state = False
  if not os.path.isdir(target) and (step := latest_train_step(directory)) is not None:
    target, in_state = os.path.join(directory, TRAIN_CHECKPOINTS, str(step), "state"), True
  if codec is None or not os.path.isdir(target):
    raise CheckpointError(f"{directory} holds no codec (config.codec.encodec or {PARAMS_FILE} is "
                          "missing): point data.codec at a model directory written by "
                          "`python -m musicgen_jax.convert` or a codec training run")
  import orbax.checkpoint as ocp
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
  integrity.check_finite({"codec": params}, target)
  return codec, cast_floating(params, np.float32)

"""Model directories: an Orbax parameter checkpoint plus the config our code loads.

Layout written by `save_model` (export, import of pretrained weights) and by train.py:
    DIR/musicgen_config.json      the ml_collections config (JSON)
    DIR/params/                   Orbax checkpoint of {'lm': ..., 'text': ..., 'codec': ... (optional)}
    DIR/tokenizer.json            optional, the text tokenizer
A training work directory holds the same config file and `checkpoints/<step>/...` (Orbax
CheckpointManager); `load_model` takes the parameters of its latest step.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "musicgen_config.json"
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.json"
TRAIN_CHECKPOINTS = "checkpoints"


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


def save_model(directory: str, config: ml_collections.ConfigDict, params: dict,
               tokenizer_file: str | None = None) -> None:
  """Writes config + params (+ tokenizer.json) to `directory`, replacing any previous params."""
  directory = os.path.abspath(directory)
  write_config(directory, config)
  target = os.path.join(directory, PARAMS_DIR)
  if os.path.exists(target):
    shutil.rmtree(target)
  params = jax.tree.map(np.asarray, params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, params)
  if tokenizer_file:
    dst = os.path.join(directory, TOKENIZER_FILE)
    if os.path.abspath(tokenizer_file) != dst:
      shutil.copyfile(tokenizer_file, dst)


def latest_train_step(directory: str) -> int | None:
  root = os.path.join(directory, TRAIN_CHECKPOINTS)
  if not os.path.isdir(root):
    return None
  steps = [int(n) for n in os.listdir(root) if n.isdigit()]
  return max(steps) if steps else None


def load_model(directory: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """-> (config, params {'lm', 'text', ['codec']}) as numpy arrays, from an export or a train dir."""
  directory = os.path.abspath(directory)
  config = read_config(directory)
  target = os.path.join(directory, PARAMS_DIR)
  step = None
  if not os.path.isdir(target):
    step = latest_train_step(directory)
    if step is None:
      raise CheckpointError(f"{directory} has neither {PARAMS_DIR}/ nor {TRAIN_CHECKPOINTS}/<step>/: "
                            "nothing to load")
    target = os.path.join(directory, TRAIN_CHECKPOINTS, str(step), "state")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(target)
  except Exception as e:  # orbax raises many types for corrupt or partial checkpoints
    raise CheckpointError(f"cannot read the checkpoint at {target}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
  params = restored["params"] if step is not None else restored
  if "lm" not in params:
    raise CheckpointError(f"the checkpoint at {target} has no 'lm' parameters")
  return config, params

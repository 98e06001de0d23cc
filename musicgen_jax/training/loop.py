"""The training loop behind train.py: mesh, input pipeline, model, sharded state, step, checkpoints."""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from musicgen_jax import checkpoint, sharding
from musicgen_jax.data.synthetic import SyntheticTokens
from musicgen_jax.pipeline import pattern_from_config, text_conditioner_from_config
from musicgen_jax.training.lm_train import Trainer

_log = logging.getLogger(__name__)


def _check(config: ml_collections.ConfigDict) -> None:
  """Fails early, before any compile, on settings that cannot work."""
  t = config.train
  if t.batch_size < 1 or t.num_steps < 1:
    raise ValueError(f"train.batch_size and train.num_steps must be >= 1, got {t.batch_size}, "
                     f"{t.num_steps}")
  if config.data.kind != "synthetic":
    raise ValueError(f"data.kind {config.data.kind!r} is not available yet; use 'synthetic'")
  if config.model.melody:
    raise ValueError("training melody models needs chroma data, not available with data.kind "
                     "'synthetic'; use a text variant")


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains for config.train.num_steps (resuming from the latest checkpoint in workdir).

  Returns the last step's metrics as floats.
  """
  _check(config)
  # --- mesh ---
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.train.batch_size % data_ways:
    raise ValueError(f"train.batch_size {config.train.batch_size} must be divisible by the "
                     f"{data_ways} data-parallel devices of the mesh {dict(mesh.shape)}")
  # --- model, pattern, text ---
  pattern = pattern_from_config(config)
  text = text_conditioner_from_config(config)
  trainer = Trainer(config, pattern, text, mesh)
  frames = int(round(config.train.segment_seconds * config.codec.frame_rate))
  # --- input pipeline ---
  data = SyntheticTokens(config.train.seed, config.model.num_codebooks, config.model.card, frames,
                         config.train.batch_size, config.data.num_examples)
  # --- state and checkpoints ---
  checkpoint.write_config(workdir, config)
  options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True)
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), checkpoint.TRAIN_CHECKPOINTS),
                                  options=options)
  state = trainer.init_state(config.train.seed)
  if manager.latest_step() is not None:
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data=ocp.args.JsonRestore()))
    state = restored["state"]
    data.set_state(restored["data"])
    _log.warning("resumed from step %d", int(state.step))
  step_fn = trainer.make_step()
  metrics = {}
  t0 = time.time()
  while int(state.step) < config.train.num_steps:
    raw = next(data)
    batch = dict(text.tokenize(raw["texts"]), codes=raw["codes"])
    state, metrics = step_fn(state, batch)
    step = int(state.step)
    if step % config.train.log_every == 0 or step == config.train.num_steps:
      m = jax.device_get(metrics)
      print(f"step {step}: loss {float(m['loss']):.4f} grad_norm {float(m['grad_norm']):.3f} "
            f"ppl/codebook {[round(float(x), 2) for x in m['perplexity']]} ({time.time() - t0:.1f}s)",
            flush=True)
    if step % config.train.checkpoint_every == 0 or step == config.train.num_steps:
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 data=ocp.args.JsonSave(data.get_state())))
  manager.wait_until_finished()
  manager.close()
  return {k: np.asarray(v).tolist() for k, v in jax.device_get(metrics).items()}

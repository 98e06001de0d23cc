"""The generative evaluation inside training: every `train.generate_every` steps (and at the last), the
current weights sample `eval.samples` clips from held-out captions and musicgen_jax.eval's metrics
(Fréchet distances, KL, key / tempo / family accuracy) go to TensorBoard and metrics.jsonl as
`generate/*`. The cheap metrics (validation CE per codebook) run every `train.eval_every` steps in the
loop itself.

Needs the rendered corpus (data.kind = "corpus": its ground truth) and a codec (data.codec or
init_from); both are checked before training starts. Process 0 samples; on multi-host jobs every
process takes part in gathering the weights first.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import ml_collections


def check(config: ml_collections.ConfigDict) -> None:
  """ValueError when train.generate_every is set but cannot work (before anything compiles)."""
  every = int(config.train.get("generate_every", 0) or 0)
  if every < 0:
    raise ValueError(f"train.generate_every must be >= 0 (0 = off), got {every}")
  if not every:
    return
  if config.get("task", "lm") != "lm":
    raise ValueError("train.generate_every applies to LM runs only")
  if config.data.kind != "corpus":
    raise ValueError("train.generate_every needs data.kind='corpus' (the rendered corpus has the "
                     f"ground truth the metrics compare with), got {config.data.kind!r}")
  if not (config.data.get("codec") or config.get("init_from")):
    raise ValueError("train.generate_every needs a codec to listen with: set data.codec")


class GenerativeHook:
  """See the module docstring. Built by the loop when train.generate_every > 0."""

  def __init__(self, config: ml_collections.ConfigDict, data_dir: str, text, log: Callable[[str], None]):
    from musicgen_jax.eval import evaluate as ev
    e = config.get("eval", ml_collections.ConfigDict())
    self.settings = ev.EvalSettings(samples=int(e.get("samples", 16)),
                                    duration=float(e.get("duration", 0.0)), seed=int(e.get("seed", 0)),
                                    speed_seconds=0.0)
    ev.check_settings(self.settings)
    self.config, self.data_dir, self.text, self.log = config, data_dir, text, log
    self.every = int(config.train.generate_every)
    self._codec = None
    self._reference = None

  def due(self, step: int, last: int) -> bool:
    return step % self.every == 0 or step == last

  def run(self, params: Any) -> dict:
    """params: host {'lm', 'text'} -> {'fd_classifier', 'fd_codec', 'kl', 'key', 'tempo',
    'family', 'seconds'} of the samples."""
    from musicgen_jax import checkpoint
    from musicgen_jax.eval import evaluate as ev
    from musicgen_jax.pipeline import MusicGen
    t0 = time.time()
    if self._codec is None:
      self._codec = checkpoint.load_codec(self.config.data.get("codec") or self.config.init_from)
    codec, codec_params = self._codec
    model = MusicGen(self.config, {"lm": params["lm"], "text": params["text"], "codec": codec_params},
                     self.text, codec)
    duration = ev.clip_seconds(model, self.settings)
    if self._reference is None:
      self._reference = ev.build_reference(model, self.config, self.data_dir, self.settings,
                                           self._codec, self.log)
    ref = self._reference
    clips = ev.generate_clips(model, [it["caption"] for it in ref.items], duration,
                              self.settings.seed, self.settings.batch)
    row = ref.score(clips)
    out = {k: v for k, v in row.items() if isinstance(v, float)}
    out["seconds"] = round(time.time() - t0, 1)
    return out


def gather(params: Any) -> Any:
  """The weights as host numpy arrays (all processes call it: on multi-host jobs a collective)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)

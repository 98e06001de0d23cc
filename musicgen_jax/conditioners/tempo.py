"""The tempo a prompt names, given to the LM as a beat clock in phase with the beats.

A caption's "96 bpm" is a global condition, but a tempo is a period in time: to follow it the LM
must place onsets a number of frames apart that the number implies, which a small LM did not learn
from the words (models/demo/TRAINING.md). The beat clock states it where it acts: each audio frame
gets sin and cos of 2 pi m x for the beat phase x (in beats, 0 on every beat) and a few multiples m
(the beat, its halves, thirds and quarters). The phase is the real one of the audio in training
(the corpus knows where its beats fall: data/render.py's first_beat) and starts on a beat at the
first generated frame in sampling, so "onsets fall at phase 0" is a first-order association of the
frame with its tokens, as the time-aligned melody is, rather than a comparison of two frames.

Conditions carry the clock as `beat` float32 [B, 2] = (bpm, phase at audio frame 0 in beats); bpm 0
(no tempo named, the null condition of classifier-free guidance, or a training item whose beats are
not known) gives a silent clock. The bpm is the one the caption names (`named_bpm`), in training
(after any caption merging and word dropout) and in sampling alike.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MULTIPLES = (1.0, 2.0, 3.0, 4.0)   # pulses per beat: the beat, 8ths (in 2/4), triplets, 16ths
NUM_FEATURES = 2 * len(MULTIPLES)
MIN_BPM, MAX_BPM = 20.0, 400.0     # numbers outside are not read as tempi

# "96 bpm", "96bpm", "96 BPM", "96 beats per minute", "bpm: 96", "bpm 96", "tempo 96"
_NUMBER = r"(?<![\d.])(\d{2,3}(?:\.\d+)?)(?![\d])"
_PATTERNS = (re.compile(_NUMBER + r"\s*(?:bpm\b|beats per minute\b)", re.IGNORECASE),
             re.compile(r"\b(?:bpm|tempo)\s*[:=]?\s*" + _NUMBER + r"\b", re.IGNORECASE))


def named_bpm(text: str) -> float:
  """The tempo `text` names in beats per minute (the first one), or 0.0 when it names none."""
  for pattern in _PATTERNS:
    for m in pattern.finditer(text or ""):
      bpm = float(m.group(1))
      if MIN_BPM <= bpm <= MAX_BPM:
        return bpm
  return 0.0


def named_bpms(texts: Sequence[str]) -> np.ndarray:
  """float32 [B]: named_bpm of each text."""
  return np.asarray([named_bpm(t) for t in texts], np.float32)


def beat_phase(seconds: float, first_beat: float, bpm: float) -> float:
  """The beat phase in [0, 1) at time `seconds` of a recording whose beats fall every 60 / bpm s
  from `first_beat` s."""
  return float(((seconds - first_beat) * bpm / 60.0) % 1.0)


def sampling_beat(texts: Sequence[str], start_frame: int = 0, frame_rate: float = 50.0,
                  phase=0.0) -> np.ndarray:
  """float32 [B, 2]: the clock, at the tempo each text names, of audio whose frame `-start_frame`
  is at beat phase `phase` (a number or [B]): in sampling the first generated frame is on a beat,
  and a later window of long-form sampling starts `start_frame` frames on."""
  bpm = named_bpms(texts)
  phase = (np.asarray(phase, np.float64) + start_frame * bpm / (60.0 * float(frame_rate))) % 1.0
  return np.stack([bpm, phase.astype(np.float32)], axis=-1)


def beat_features(frames_n: jax.Array, beat_b2: jax.Array, frame_rate: float) -> jax.Array:
  """The beat clock at audio frames [N] (int) for clocks [B, 2] = (bpm, phase at frame 0) ->
  float32 [B, N, 8]: sin then cos of 2 pi m x for each m of MULTIPLES, x = phase + frame * bpm /
  (60 frame_rate) beats; zero where bpm <= 0."""
  beat_b2 = jnp.asarray(beat_b2, jnp.float32)
  bpm_b, phase_b = beat_b2[:, 0], beat_b2[:, 1]
  beats_per_frame_b = bpm_b / (60.0 * float(frame_rate))
  frac = lambda x: x - jnp.floor(x)   # noqa: E731
  # Frames are at most a window's (max_positions): the phase carries longer audio, so float32 is
  # exact to about 1e-5 beats here.
  beats_bn = frac(phase_b[:, None]
                  + jnp.asarray(frames_n, jnp.float32)[None, :] * beats_per_frame_b[:, None])
  m = jnp.asarray(MULTIPLES, jnp.float32)
  angle = 2.0 * math.pi * frac(beats_bn[..., None] * m)
  on_b = (bpm_b > 0).astype(jnp.float32)[:, None, None]
  return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1) * on_b


def clock_embedding(frames_n: jax.Array, beat_b2: jax.Array, frame_rate: float,
                    proj_fd: jax.Array) -> jax.Array:
  """The beat clock at audio frames [N] for clocks [B, 2], projected by [8, D] -> float32 [B, N, D]:
  what the LM adds to its token embeddings, in the full forward and the decode step alike."""
  return jnp.einsum("bnf,fd->bnd", beat_features(frames_n, beat_b2, frame_rate), proj_fd)

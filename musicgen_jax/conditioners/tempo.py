"""The tempo a prompt names, given to the LM as a beat clock on its audio frames.

A caption's "96 bpm" is a global condition, but a tempo is a period in time: to follow it the LM
must place onsets a number of frames apart that the number implies, which a small LM did not learn
from the words (models/demo/TRAINING.md). The beat clock states the period where it acts: each
audio frame t gets sin and cos of 2 pi m (bpm / 60) (t / frame_rate) for a few multiples m of the
beat (half-bar to sixteenth pulses), so "an onset one beat ago" is a frame whose clock reads the
same phase, something one attention head finds. The clock's phase is arbitrary (it starts at the
segment's first frame, not on a beat): only its period carries information, so training needs
no beat annotations, just captions that name the tempo.

The bpm comes from the caption itself, by `named_bpm`, in training (after any caption merging and
word dropout) and in sampling alike, so the clock is there exactly when the text names a tempo;
0 (no tempo named, or the null condition of classifier-free guidance) gives a silent clock.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MULTIPLES = (0.5, 1.0, 2.0, 4.0)   # pulses per beat: every other beat, the beat, 8ths, 16ths
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


def beat_features(frames_n: jax.Array, bpm_b: jax.Array, frame_rate: float) -> jax.Array:
  """The beat clock at audio frames [N] (int) for tempi [B] (0: none) -> float32 [B, N, 8]:
  sin then cos of 2 pi m bpm / 60 * frame / frame_rate for each m of MULTIPLES; zero where
  bpm <= 0."""
  bpm_b = jnp.asarray(bpm_b, jnp.float32)
  m = jnp.asarray(MULTIPLES, jnp.float32)
  cycles_per_frame_bm = bpm_b[:, None] * m[None] / (60.0 * float(frame_rate))
  # The phase in cycles is taken modulo 1 before the multiplication by 2 pi, so it stays exact in
  # float32 however many frames in.
  cycles_bnm = jnp.asarray(frames_n, jnp.float32)[None, :, None] * cycles_per_frame_bm[:, None]
  angle = 2.0 * math.pi * (cycles_bnm - jnp.floor(cycles_bnm))
  on_b = (bpm_b > 0).astype(jnp.float32)[:, None, None]
  return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1) * on_b

"""A synthetic, controllable token data set: texts that describe codes, with no audio or codec needed.

Each example names a pitch class and a tempo; codebook 0 repeats a motif built from that pitch at that
tempo, and each further codebook is a fixed function of the previous one, so a model that learns the
text -> codes mapping and the codebook dependencies reaches low loss. Deterministic in (seed, index);
loader.SyntheticSource serves it through the same grain pipeline as the token cache.
"""
from __future__ import annotations

import numpy as np

PITCHES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
TEMPOS = (60, 90, 120, 150)


def example(seed: int, index: int, num_codebooks: int, card: int, frames: int) -> tuple[str, np.ndarray]:
  """-> (text, codes int32 [K, T]) of example `index`."""
  rng = np.random.default_rng([seed, index])
  pitch = int(rng.integers(len(PITCHES)))
  tempo_i = int(rng.integers(len(TEMPOS)))
  period = 2 + tempo_i                     # faster tempo words -> longer motif period
  motif = (pitch * 5 + np.arange(period) * (3 + tempo_i)) % card
  c0 = np.resize(motif, frames)
  codes = [c0]
  for k in range(1, num_codebooks):
    codes.append((codes[-1] * (2 * k + 1) + k) % card)
  text = f"a melody in {PITCHES[pitch]} at {TEMPOS[tempo_i]} bpm"
  return text, np.stack(codes).astype(np.int32)


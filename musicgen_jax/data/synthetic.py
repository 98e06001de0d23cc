"""A synthetic, controllable token data set: texts that describe codes, with no audio or codec needed.

Each example names a pitch class and a tempo; codebook 0 repeats a motif built from that pitch at that
tempo, and each further codebook is a fixed function of the previous one, so a model that learns the
text -> codes mapping and the codebook dependencies reaches low loss. Deterministic in (seed, index), so
the iterator position is just an integer that checkpoints save and restore.
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


class SyntheticTokens:
  """Batches {'texts': list[str], 'codes': int32 [B, K, T]} from position `index` on."""

  def __init__(self, seed: int, num_codebooks: int, card: int, frames: int, batch_size: int,
               num_examples: int, index: int = 0):
    self.seed, self.k, self.card, self.frames = seed, num_codebooks, card, frames
    self.batch_size, self.num_examples, self.index = batch_size, num_examples, index
    self.skipped = 0   # bad records skipped (none here; the counter is part of the iterator contract)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    texts, codes = [], []
    for _ in range(self.batch_size):
      t, c = example(self.seed, self.index % self.num_examples, self.k, self.card, self.frames)
      texts.append(t)
      codes.append(c)
      self.index += 1
    return {"texts": texts, "codes": np.stack(codes)}

  def get_state(self) -> dict:
    return {"index": self.index, "skipped": self.skipped}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])
    self.skipped = int(state.get("skipped", 0))

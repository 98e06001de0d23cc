"""The interface every text conditioner implements (learned encoder, T5)."""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import jax
import numpy as np


class TextConditioner(Protocol):
  """Turns strings into hidden states the LM attends to (cross-attention) or prefixes.

  The LM owns the projection to its own width (`enc_to_dec_proj`); a conditioner only encodes.
  The null condition used for classifier-free guidance is all-zero hidden states with a zero mask.
  """

  dim: int  # width of the returned hidden states

  def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """-> {'input_ids': int32 [B, L], 'attention_mask': int32 [B, L]} (1 = real token)."""
    ...

  def init(self, rng: jax.Array) -> Any:
    """Random parameters (a pytree)."""
    ...

  def encode(self, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """-> (hidden float32 [B, L, dim], mask int32 [B, L]). Pure and jittable."""
    ...

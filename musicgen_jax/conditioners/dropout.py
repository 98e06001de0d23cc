"""Condition dropout for classifier-free guidance.

During training a fraction p of the examples lose their condition, so the same LM also learns the
unconditional distribution that guidance contrasts against. The null condition is the one the
released MusicGen models use at sampling time: all-zero hidden states with an all-zero mask.
Dropping is per example (every position of a dropped example), never per position.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def null_condition_like(hidden: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The null condition with the shapes and dtypes of (hidden [B, L, D], mask [B, L]): all zeros."""
  return jnp.zeros_like(hidden), jnp.zeros_like(mask)


def drop_condition(rng: jax.Array, hidden: jax.Array, mask: jax.Array,
                   p: float | jax.Array) -> tuple[jax.Array, jax.Array]:
  """Replaces each example's condition by the null condition with probability p.

  hidden [B, L, D], mask [B, L] -> the same shapes and dtypes. One Bernoulli(p) draw per example;
  p may be traced (p = 0 keeps everything, p = 1 drops everything). Jittable.
  """
  batch = hidden.shape[0]
  if mask.shape[0] != batch:
    raise ValueError(f"hidden batch {batch} and mask batch {mask.shape[0]} differ")
  drop_b = jax.random.uniform(rng, (batch,)) < p
  hidden = jnp.where(drop_b.reshape((batch,) + (1,) * (hidden.ndim - 1)), jnp.zeros_like(hidden), hidden)
  mask = jnp.where(drop_b.reshape((batch,) + (1,) * (mask.ndim - 1)), jnp.zeros_like(mask), mask)
  return hidden, mask

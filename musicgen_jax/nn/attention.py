"""Multi-head attention with an explicit key/value cache.

Self-attention in the decoder runs in two regimes with one code path:
  * full sequence (training, uncached reference): keys are the chunk itself, causally masked;
  * cached decoding (prefill of a chunk, then one step at a time): keys are the cache entries before
    `pos` plus the chunk itself. The new keys/values are *returned*, not written: the caller writes all
    layers' new entries into the cache with one dynamic_update_slice after the layer scan, so the scan never
    copies the cache.
Cross-attention keys and values of the conditioning are computed once and passed in.
Softmax is always computed in float32.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from musicgen_jax import sharding as shd

_NEG = -1e30  # finite, so fully masked rows give a uniform (not NaN) distribution, as the reference does


def dot_attention(q_bnhd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array,
                  mask_bns: jax.Array | None) -> jax.Array:
  """softmax(q k^T + mask) v with q already scaled. mask is bool [B or 1, N, S] (True = attend).

  Returns [B, N, H, D] in the dtype of v.
  """
  logits = jnp.einsum("bnhd,bshd->bhns", q_bnhd, k_bshd, preferred_element_type=jnp.float32)
  if mask_bns is not None:
    logits = jnp.where(mask_bns[:, None], logits, _NEG)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_bshd.dtype)
  return jnp.einsum("bhns,bshd->bnhd", probs, v_bshd)


def cached_dot_attention(q_bnhd, k_new_bnhd, v_new_bnhd, k_cache_bhsd, v_cache_bhsd, pos,
                         key_mask_bs: jax.Array | None = None) -> jax.Array:
  """Attention of N new queries at absolute positions pos..pos+N-1 over the cache (positions < pos)
  and the new keys (causal within the chunk). The cache is head-major [B, H, S, Dh] so each step reads
  it without a transpose. `key_mask_bs` masks cache positions (e.g. padded prefix).
  """
  n = q_bnhd.shape[1]
  s = k_cache_bhsd.shape[2]
  cache_ok_s = jnp.arange(s) < pos                                  # [S]
  cache_mask = jnp.broadcast_to(cache_ok_s[None, None, :], (1, n, s))
  if key_mask_bs is not None:
    cache_mask = cache_mask & key_mask_bs[:, None, :].astype(bool)
  causal_nn = jnp.tril(jnp.ones((n, n), bool))[None]
  logits_c = jnp.einsum("bnhd,bhsd->bhns", q_bnhd, k_cache_bhsd, preferred_element_type=jnp.float32)
  logits_n = jnp.einsum("bnhd,bshd->bhns", q_bnhd, k_new_bnhd, preferred_element_type=jnp.float32)
  logits_c = jnp.where(cache_mask[:, None], logits_c, _NEG)
  logits_n = jnp.where(causal_nn[:, None], logits_n, _NEG)
  probs = jax.nn.softmax(jnp.concatenate([logits_c, logits_n], axis=-1), axis=-1)
  probs = probs.astype(v_new_bnhd.dtype)
  return (jnp.einsum("bhns,bhsd->bnhd", probs[..., :s], v_cache_bhsd)
          + jnp.einsum("bhns,bshd->bnhd", probs[..., s:], v_new_bnhd))


def dense(features: int, axes: tuple[str, str], dtype, param_dtype, name: str | None = None,
          use_bias: bool = False) -> nn.Dense:
  """A Dense layer whose kernel carries logical axis names."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)))


class Attention(nn.Module):
  """Multi-head attention without biases (q_proj, k_proj, v_proj, out_proj as in MusicGen).

  Kernels are [D, H*Dh] / [H*Dh, D] so that importing a PyTorch Linear weight is a transpose.
  """
  dim: int
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    mk = lambda axes: dense(self.dim, axes, self.dtype, self.param_dtype)
    self.q_proj = mk((shd.EMBED, shd.HEADS))
    self.k_proj = mk((shd.EMBED, shd.HEADS))
    self.v_proj = mk((shd.EMBED, shd.HEADS))
    self.out_proj = mk((shd.HEADS, shd.EMBED))

  def _heads(self, x_bnd: jax.Array) -> jax.Array:
    b, n, _ = x_bnd.shape
    return x_bnd.reshape(b, n, self.num_heads, self.dim // self.num_heads)

  def project_kv(self, src_bld: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values [B, L, H, Dh] of a source sequence [B, L, D]."""
    return self._heads(self.k_proj(src_bld)), self._heads(self.v_proj(src_bld))

  def __call__(self, x_bnd: jax.Array, *, kv: tuple[jax.Array, jax.Array] | None = None,
               mask: jax.Array | None = None, cache: tuple[jax.Array, jax.Array] | None = None,
               pos: jax.Array | None = None, key_mask: jax.Array | None = None):
    """Returns (out [B, N, D], (k, v) of x [B, N, H, Dh] when they were projected here, else None).

    self-attention:  kv None; either `mask` [B|1, N, N] (uncached) or `cache` (k, v [B, H, S, Dh]) + `pos`
                     (+ `key_mask` [B, S] over cache entries).
    cross-attention: kv = precomputed keys/values of the condition; `mask` [B, 1, L].
    """
    head_dim = self.dim // self.num_heads
    q = self._heads(self.q_proj(x_bnd)) * jnp.asarray(head_dim ** -0.5, x_bnd.dtype)
    new_kv = None
    if kv is None:
      kv = new_kv = self.project_kv(x_bnd)
    k, v = kv
    if cache is not None:
      out = cached_dot_attention(q, k, v, cache[0], cache[1], pos, key_mask)
    else:
      out = dot_attention(q, k, v, mask)
    b, n = out.shape[:2]
    return self.out_proj(out.reshape(b, n, self.dim)), new_kv

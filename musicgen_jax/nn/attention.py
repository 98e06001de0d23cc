"""The attention core every model here uses, and the LM's multi-head attention module.

`attend` is the one implementation of softmax(q k^T + bias, masked) v in this package. It serves
  * the LM's full forward (causal self-attention, cross-attention to the text condition),
  * the LM's decode step (musicgen_jax/lm_decode.py: keys and values read from the head-major KV cache),
  * the T5 encoder (unscaled scores plus a relative position bias) and the learned text encoder.
Masks are boolean (True = attend); masked scores are set to MASK_VALUE. Scores and softmax are float32
whatever the compute dtype.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from musicgen_jax import sharding as shd

# Finite, so a fully masked row (a null text condition) gives a uniform distribution, not NaN, as the
# reference implementations do.
MASK_VALUE = -1e30


def attend(q_bqhd: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
           bias: jax.Array | None = None, kv_heads_first: bool = False) -> jax.Array:
  """softmax(q k^T + bias, masked) v over the key axis; q is already scaled.

  q [B, Q, H, D]; k, v [B, K, H, D], or [B, H, K, D] with `kv_heads_first` (the KV-cache layout, read
  without a transpose). mask: bool, broadcastable to [B, H, Q, K]; bias: float32, broadcastable to
  [B, H, Q, K] (added before masking). Returns [B, Q, H, D] in the dtype of v.
  """
  kv = "bhkd" if kv_heads_first else "bkhd"
  logits = jnp.einsum(f"bqhd,{kv}->bhqk", q_bqhd, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum(f"bhqk,{kv}->bqhd", probs, v)


def attend_causal(q_bqhd: jax.Array, k_bkhd: jax.Array, v_bkhd: jax.Array) -> jax.Array:
  """Causal self-attention over a whole sequence (training, the uncached forward); q already scaled.

  On a GPU in bf16 / fp16 this is cuDNN's fused (flash) attention: the [B, H, N, N] scores are never
  written to memory, which is what lets 30 s segments (N ~ 1500) train at a useful batch. Elsewhere,
  and wherever cuDNN refuses the shapes, it is `attend` with a lower-triangular mask.
  """
  if jax.default_backend() == "gpu" and q_bqhd.dtype in (jnp.bfloat16, jnp.float16):
    try:
      return jax.nn.dot_product_attention(q_bqhd, k_bkhd, v_bkhd, scale=1.0, is_causal=True,
                                          implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError):
      pass
  n, m = q_bqhd.shape[1], k_bkhd.shape[1]
  return attend(q_bqhd, k_bkhd, v_bkhd, jnp.tril(jnp.ones((n, m), bool), m - n)[None, None])


def dense(features: int, axes: tuple[str, str], dtype, param_dtype, name: str | None = None,
          use_bias: bool = False) -> nn.Dense:
  """A Dense layer whose kernel carries logical axis names."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)))


class Attention(nn.Module):
  """Multi-head attention without biases (q_proj, k_proj, v_proj, out_proj as in MusicGen).

  Kernels are [D, H*Dh] / [H*Dh, D] so that importing a PyTorch Linear weight is a transpose. This is
  the full-sequence form (training, the uncached reference); lm_decode.py reads the same kernels in its
  serving layout.
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

  def __call__(self, x_bnd: jax.Array, mask_bhnl: jax.Array | str, src_bld: jax.Array | None = None):
    """x [B, N, D] attends to itself (src None) or to src [B, L, D]; mask bool [B|1, 1, N, L], or
    "causal" for causal self-attention (see attend_causal).

    Returns [B, N, D].
    """
    head_dim = self.dim // self.num_heads
    q = self._heads(self.q_proj(x_bnd)) * jnp.asarray(head_dim ** -0.5, x_bnd.dtype)
    src = x_bnd if src_bld is None else src_bld
    k, v = self._heads(self.k_proj(src)), self._heads(self.v_proj(src))
    if isinstance(mask_bhnl, str):
      out = attend_causal(q, k, v)
    else:
      out = attend(q, k, v, mask_bhnl)
    b, n = out.shape[:2]
    return self.out_proj(out.reshape(b, n, self.dim))

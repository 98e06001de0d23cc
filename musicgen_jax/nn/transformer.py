"""The MusicGen decoder block and sinusoidal positions.

One pre-norm block: causal self-attention, optional cross-attention to the condition, exact-GELU FFN of
`ffn_dim`, all without biases, LayerNorms with eps 1e-5 (parameter names as in Hugging Face's MusicGen:
self_attn, self_attn_layer_norm, encoder_attn, encoder_attn_layer_norm, fc1, fc2, final_layer_norm).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from musicgen_jax import sharding as shd
from musicgen_jax.nn.attention import Attention, dense


def sinusoidal_positions(pos_n: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """[cos, sin] embeddings [N, dim] of integer positions, as MusicGen / audiocraft build them."""
  half = dim // 2
  inv_freq = np.exp(np.arange(half, dtype=np.float32) * np.float32(-np.log(max_period) / (half - 1)))
  angle = pos_n.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
  emb = jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def layer_norm(eps: float, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm with scale and bias, statistics and output in float32."""
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (shd.EMBED,)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (shd.EMBED,)))


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  dim: int
  num_heads: int
  ffn_dim: int
  cross_attention: bool
  layer_norm_eps: float = 1e-5
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32


class DecoderLayer(nn.Module):
  """One block of the full-sequence forward, written as a scan body over the stacked layers:
  (carry x [B, N, D], ctx broadcast to every layer) -> (x, None).

  ctx: with cross-attention, 'cond' [B, L, D] and 'cond_mask' bool [B, 1, 1, L]. Self-attention is causal
  over the whole chunk (attend_causal). The decode step (lm_decode.py) reads the same parameters in a serving layout.
  """
  cfg: BlockConfig
  deterministic: bool = True

  def setup(self):
    c = self.cfg
    self.self_attn = Attention(c.dim, c.num_heads, c.dtype, c.param_dtype)
    self.self_attn_layer_norm = layer_norm(c.layer_norm_eps)
    if c.cross_attention:
      self.encoder_attn = Attention(c.dim, c.num_heads, c.dtype, c.param_dtype)
      self.encoder_attn_layer_norm = layer_norm(c.layer_norm_eps)
    self.fc1 = dense(c.ffn_dim, (shd.EMBED, shd.MLP), c.dtype, c.param_dtype)
    self.fc2 = dense(c.dim, (shd.MLP, shd.EMBED), c.dtype, c.param_dtype)
    self.final_layer_norm = layer_norm(c.layer_norm_eps)
    self.drop = nn.Dropout(c.dropout)

  def _residual(self, x, h):
    h = self.drop(h, deterministic=self.deterministic)
    return nn.with_logical_constraint(x + h.astype(x.dtype), (shd.BATCH, shd.LENGTH, shd.EMBED))

  def __call__(self, x_bnd: jax.Array, ctx: dict):
    c = self.cfg
    h = self.self_attn_layer_norm(x_bnd).astype(c.dtype)
    x_bnd = self._residual(x_bnd, self.self_attn(h, "causal"))
    if c.cross_attention:
      h = self.encoder_attn_layer_norm(x_bnd).astype(c.dtype)
      h = self.encoder_attn(h, ctx["cond_mask"], ctx["cond"].astype(c.dtype))
      x_bnd = self._residual(x_bnd, h)
    h = self.final_layer_norm(x_bnd).astype(c.dtype)
    h = nn.with_logical_constraint(jax.nn.gelu(self.fc1(h), approximate=False),
                                   (shd.BATCH, shd.LENGTH, shd.MLP))
    x_bnd = self._residual(x_bnd, self.fc2(h))
    return x_bnd, None

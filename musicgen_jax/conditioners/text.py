"""A small learned text encoder, for training without a pretrained T5.

`LearnedTextEncoder` is a bidirectional pre-norm transformer: token embedding + sinusoidal positions,
`num_layers` blocks of (LayerNorm -> self-attention with the padding mask -> residual, LayerNorm ->
GELU feed-forward -> residual), then a final LayerNorm. Weights carry logical axis names
(`sharding.py`); matmuls run in `dtype`, while the residual stream, LayerNorm and softmax stay fp32.

`LearnedTextConditioner` wraps it with a `TextTokenizer` and implements the `TextConditioner`
protocol. It does not project to the decoder width: the LM owns `enc_to_dec_proj`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from musicgen_jax import sharding as shd
from musicgen_jax.conditioners.tokenizer import TextTokenizer
from musicgen_jax.nn.attention import attend
from musicgen_jax.nn.transformer import sinusoidal_positions

_EMBED_ROWS_MULTIPLE = 128  # embedding rows are padded so the vocab axis shards evenly
_LN_EPS = 1e-5


def _partitioned(init, axes):
  return nn.with_logical_partitioning(init, axes)


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=_LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
      scale_init=_partitioned(nn.initializers.ones, (shd.COND_EMBED,)),
      bias_init=_partitioned(nn.initializers.zeros, (shd.COND_EMBED,)))


class _Kernel(nn.Module):
  """One weight `kernel` of a given shape with logical axis names (fan-in scaled normal init)."""
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  param_dtype: Any
  fan_in_axes: tuple[int, ...] = (0,)

  @nn.compact
  def __call__(self) -> jax.Array:
    out_axes = tuple(i for i in range(len(self.shape)) if i not in self.fan_in_axes)
    init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=self.fan_in_axes,
                                            out_axis=out_axes)
    return self.param("kernel", _partitioned(init, self.axes), self.shape, self.param_dtype)


class _SelfAttention(nn.Module):
  """Bidirectional multi-head self-attention over keys where mask == 1. x [B, L, D] -> [B, L, D]."""
  num_heads: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x_bld: jax.Array, mask_bl: jax.Array) -> jax.Array:
    d = x_bld.shape[-1]
    head_dim = d // self.num_heads

    # Kernels are declared with their full shapes (not through DenseGeneral, which initialises a
    # flattened 2-D kernel and so cannot carry three logical axis names).
    def kernel(name, shape, axes, fan_in_axes=(0,)):
      return _Kernel(shape, axes, self.param_dtype, fan_in_axes, name=name)().astype(self.dtype)

    def proj(name):
      w_dhk = kernel(name, (d, self.num_heads, head_dim), (shd.COND_EMBED, shd.HEADS, shd.HEAD_DIM))
      return jnp.einsum("bld,dhk->blhk", x_bld.astype(self.dtype), w_dhk)

    q_blhk = proj("query") * jnp.asarray(1.0 / math.sqrt(head_dim), self.dtype)
    k_blhk = proj("key")
    v_blhk = proj("value")
    # A fully padded row stays finite (attend's mask value is finite); it is zeroed downstream.
    out_blhk = attend(q_blhk, k_blhk, v_blhk, mask_bl[:, None, None, :] > 0)
    w_hkd = kernel("out", (self.num_heads, head_dim, d), (shd.HEADS, shd.HEAD_DIM, shd.COND_EMBED),
                   fan_in_axes=(0, 1))
    return jnp.einsum("blhk,hkd->bld", out_blhk, w_hkd)


class _FeedForward(nn.Module):
  """Dense -> exact GELU -> Dense. x [B, L, D] -> [B, L, D]."""
  mlp_dim: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x_bld: jax.Array) -> jax.Array:
    d = x_bld.shape[-1]
    init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    h_blm = nn.Dense(self.mlp_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=_partitioned(init, (shd.COND_EMBED, shd.MLP)), name="wi")(x_bld)
    h_blm = nn.gelu(h_blm, approximate=False)
    h_blm = nn.with_logical_constraint(h_blm, (shd.BATCH, shd.LENGTH, shd.MLP))
    return nn.Dense(d, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=_partitioned(init, (shd.MLP, shd.COND_EMBED)), name="wo")(h_blm)


class _Block(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x_bld: jax.Array, mask_bl: jax.Array) -> jax.Array:
    # x_bld is the fp32 residual stream; sublayers see it normalised in fp32 then cast to `dtype`.
    h = _layer_norm("attn_norm")(x_bld).astype(self.dtype)
    h = _SelfAttention(self.num_heads, self.dtype, self.param_dtype, name="attn")(h, mask_bl)
    x_bld = x_bld + h.astype(jnp.float32)
    h = _layer_norm("mlp_norm")(x_bld).astype(self.dtype)
    h = _FeedForward(self.mlp_dim, self.dtype, self.param_dtype, name="mlp")(h)
    x_bld = x_bld + h.astype(jnp.float32)
    return nn.with_logical_constraint(x_bld, (shd.BATCH, shd.LENGTH, shd.COND_EMBED))


class LearnedTextEncoder(nn.Module):
  """Token ids int [B, L] + attention mask int [B, L] (1 = real) -> hidden states float32 [B, L, dim].

  Hidden states at padded positions are not zeroed here (`LearnedTextConditioner.encode` does that).
  The embedding table has `vocab_size` rounded up to a multiple of 128 rows, so the vocab axis can be
  sharded evenly; the extra rows are never looked up.
  """
  vocab_size: int
  dim: int = 256
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: Optional[int] = None  # default 4 * dim
  dtype: Any = jnp.float32       # matmul compute dtype, e.g. jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids_bl: jax.Array, attention_mask_bl: jax.Array) -> jax.Array:
    rows = -(-self.vocab_size // _EMBED_ROWS_MULTIPLE) * _EMBED_ROWS_MULTIPLE
    embed = nn.Embed(
        rows, self.dim, dtype=jnp.float32, param_dtype=self.param_dtype, name="token_embedding",
        embedding_init=_partitioned(nn.initializers.normal(1.0), (shd.VOCAB, shd.COND_EMBED)))
    length = input_ids_bl.shape[1]
    x_bld = embed(input_ids_bl) + sinusoidal_positions(jnp.arange(length), self.dim)[None]
    x_bld = nn.with_logical_constraint(x_bld, (shd.BATCH, shd.LENGTH, shd.COND_EMBED))
    mlp_dim = self.mlp_dim or 4 * self.dim
    for i in range(self.num_layers):
      x_bld = _Block(self.num_heads, mlp_dim, self.dtype, self.param_dtype,
                     name=f"layers_{i}")(x_bld, attention_mask_bl)
    return _layer_norm("final_norm")(x_bld)


@dataclasses.dataclass(frozen=True)
class LearnedTextConditioner:
  """TextConditioner over a `LearnedTextEncoder`: tokenize -> fixed [B, max_length] ids -> hidden
  float32 [B, max_length, dim] zeroed where the mask is 0.

  `init` returns the encoder's params with their logical-axis boxes (flax `LogicallyPartitioned`);
  `encode` accepts them boxed or unboxed.
  """
  tokenizer: TextTokenizer
  dim: int = 256
  num_layers: int = 4
  num_heads: int = 4
  max_length: int = 64
  mlp_dim: Optional[int] = None
  dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("dim", "num_heads", "max_length"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"LearnedTextConditioner.{name} must be >= 1, got {getattr(self, name)}")
    if int(self.num_layers) < 0:
      raise ValueError(f"LearnedTextConditioner.num_layers must be >= 0 (0: word embeddings and "
                       f"positions only), got {self.num_layers}")
    if self.dim % self.num_heads or self.dim % 2:
      raise ValueError(f"text encoder dim={self.dim} must be even and divisible by "
                       f"num_heads={self.num_heads}")

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def module(self) -> LearnedTextEncoder:
    return LearnedTextEncoder(vocab_size=self.vocab_size, dim=self.dim, num_layers=self.num_layers,
                              num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype)

  def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """-> {'input_ids', 'attention_mask'}: int32 [B, max_length] (longer texts truncated, warned)."""
    return self.tokenizer(texts, max_length=self.max_length)

  def init(self, rng: jax.Array) -> Any:
    """Random encoder params (a pytree with logical-axis metadata)."""
    ids_bl = jnp.zeros((1, self.max_length), jnp.int32)
    return self.module.init(rng, ids_bl, jnp.ones_like(ids_bl))["params"]

  def encode(self, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """-> (hidden float32 [B, L, dim] with zeros at padded positions, mask int32 [B, L])."""
    mask_bl = jnp.asarray(batch["attention_mask"]).astype(jnp.int32)
    hidden_bld = self.module.apply({"params": params}, jnp.asarray(batch["input_ids"]), mask_bl)
    hidden_bld = jnp.where(mask_bl[..., None] > 0, hidden_bld, 0.0).astype(jnp.float32)
    return hidden_bld, mask_bl

"""The frozen T5 text encoder MusicGen conditions on, and the conditioner that wraps it.

`T5Encoder` reproduces Hugging Face's `T5EncoderModel.last_hidden_state`:
  embed tokens -> N x [RMS norm -> self-attention (+ relative position bias) -> residual,
                       RMS norm -> feed-forward -> residual] -> RMS norm.
T5 conventions kept here: no 1/sqrt(d) scaling of attention scores, one relative position bias table
(owned by the first layer in HF, at the top of our tree) shared by every layer, RMS norms without mean
subtraction or bias, statistics in fp32.

Parameter tree (HF key in brackets, `encoder.` prefix omitted; the table is musicgen_jax/interop/t5.py):
  token_embedding                  [V, D]       (shared.weight)
  relative_attention_bias          [NB, H]      (block.0.layer.0.SelfAttention.relative_attention_bias.weight)
  block_{i}/attention_norm/scale   [D]          (block.i.layer.0.layer_norm.weight)
  block_{i}/attention/{query,key,value} [D, H, Dh]  (block.i.layer.0.SelfAttention.{q,k,v}.weight, transposed)
  block_{i}/attention/out          [H, Dh, D]   (block.i.layer.0.SelfAttention.o.weight, transposed)
  block_{i}/ffn_norm/scale         [D]          (block.i.layer.1.layer_norm.weight)
  block_{i}/ffn/{wi | wi_0, wi_1}  [D, F]       (block.i.layer.1.DenseReluDense.{wi | wi_0, wi_1}.weight, transposed)
  block_{i}/ffn/wo                 [F, D]       (block.i.layer.1.DenseReluDense.wo.weight, transposed)
  final_norm/scale                 [D]          (final_layer_norm.weight)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import types
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import linen as nn

from musicgen_jax.conditioners.tokenizer import read_tokenizer_file
from musicgen_jax.nn.attention import attend
from musicgen_jax.sharding import BATCH, COND_EMBED, HEAD_DIM, HEADS, LENGTH, MLP, VOCAB

_LOG = logging.getLogger(__name__)

T5_PAD_ID = 0
T5_EOS_ID = 1


def _quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


def _gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def _gelu_exact(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)


# Activation names as transformers' ACT2FN spells them -> the same function in JAX.
# 'gelu' / 'gelu_python' are the exact (erf) GELU; 'gelu_new', 'gelu_fast', 'gelu_accurate' and
# 'gelu_pytorch_tanh' are all the tanh approximation. Note 'gated-gelu' means gelu_new (see below).
ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = types.MappingProxyType({
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
})


def parse_feed_forward_proj(feed_forward_proj: str) -> tuple[str, bool]:
  """'relu' -> ('relu', False); 'gated-silu' -> ('silu', True); 'gated-gelu' -> ('gelu_new', True).

  Follows transformers' T5Config: the activation is the part after 'gated-', except that the legacy
  'gated-gelu' means the tanh-approximated gelu_new.
  """
  parts = feed_forward_proj.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise ValueError(f"T5 config field feed_forward_proj={feed_forward_proj!r} is not of the form "
                     "'ACT' or 'gated-ACT' (e.g. 'relu', 'gated-gelu')")
  act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
  if act not in ACTIVATIONS:
    raise ValueError(f"T5 config field feed_forward_proj={feed_forward_proj!r} names unknown activation "
                     f"{act!r}; known: {sorted(ACTIVATIONS)}")
  return act, parts[0] == "gated" and len(parts) == 2


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
  """The architecture of a T5 encoder (the subset of a Hugging Face T5 config it needs)."""

  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"T5 config field {name}={value!r} must be a positive integer")
    parse_feed_forward_proj(self.feed_forward_proj)  # validates

  @property
  def dense_act_fn(self) -> str:
    return parse_feed_forward_proj(self.feed_forward_proj)[0]

  @property
  def is_gated_act(self) -> bool:
    return parse_feed_forward_proj(self.feed_forward_proj)[1]

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> T5EncoderConfig:
    """From a Hugging Face T5 config dict (config.json of a T5 model, or a MusicGen's 'text_encoder')."""
    model_type = d.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
      raise ValueError(f"config has model_type={model_type!r}; expected a T5 config ('t5' or 'mt5')")
    required = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
    missing = [k for k in required if k not in d]
    if missing:
      raise ValueError(f"T5 config is missing field(s) {missing}; is this a T5 config.json?")
    kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
    return cls(**kwargs)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket of (key position - query position): int32 [Lq, Lk] in [0, num_buckets).

  Half the buckets are for keys after the query. Within each half, the first half of the buckets are
  exact distances, the rest log-spaced up to max_distance (farther distances share the last bucket).
  Static shapes, so this is numpy at trace time; the log runs in float32 as in the reference.
  """
  rel_qk = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  half = num_buckets // 2
  bucket_qk = (rel_qk > 0).astype(np.int64) * half
  dist_qk = np.abs(rel_qk)
  max_exact = half // 2
  safe_qk = np.maximum(dist_qk, 1).astype(np.float32)
  log_ratio = np.log(safe_qk / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
  large_qk = max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64)
  large_qk = np.minimum(large_qk, half - 1)
  bucket_qk += np.where(dist_qk < max_exact, dist_qk, large_qk)
  return bucket_qk.astype(np.int32)


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str, ...]):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class T5LayerNorm(nn.Module):
  """RMS norm: x / sqrt(mean(x^2) + eps) * scale, statistics in fp32. [..., D] -> fp32 [..., D]."""

  epsilon: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale_d = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), (COND_EMBED,))
    x = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return scale_d * (x * jax.lax.rsqrt(variance + self.epsilon))


class T5SelfAttention(nn.Module):
  """Unscaled multi-head self-attention with an additive position bias.

  x [B, L, D], bias [H, L, L] fp32, mask [B, L] (1 = attend) -> fp32 [B, L, D].
  """

  config: T5EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_bld: jax.Array, bias_hll: jax.Array, mask_bl: jax.Array) -> jax.Array:
    cfg = self.config
    init = nn.initializers.normal(cfg.d_model ** -0.5)
    in_axes = (COND_EMBED, HEADS, HEAD_DIM)
    shape_in = (cfg.d_model, cfg.num_heads, cfg.d_kv)
    x_bld = x_bld.astype(self.dtype)
    q_blhk, k_blhk, v_blhk = (
        jnp.einsum("bld,dhk->blhk", x_bld, _param(self, name, init, shape_in, in_axes).astype(self.dtype))
        for name in ("query", "key", "value"))
    # T5 does not scale the scores by 1/sqrt(d_kv): the scale is folded into the initialisation.
    out_blhk = attend(q_blhk, k_blhk, v_blhk, mask_bl[:, None, None, :].astype(bool), bias_hll[None])
    wo_hkd = _param(self, "out", nn.initializers.normal((cfg.num_heads * cfg.d_kv) ** -0.5),
                    (cfg.num_heads, cfg.d_kv, cfg.d_model), (HEADS, HEAD_DIM, COND_EMBED))
    return jnp.einsum("blhk,hkd->bld", out_blhk, wo_hkd.astype(self.dtype)).astype(jnp.float32)


class T5FeedForward(nn.Module):
  """wo(act(wi x)) or, gated, wo(act(wi_0 x) * wi_1 x). [B, L, D] -> fp32 [B, L, D]."""

  config: T5EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_bld: jax.Array) -> jax.Array:
    cfg = self.config
    act = ACTIVATIONS[cfg.dense_act_fn]
    init_in = nn.initializers.normal(cfg.d_model ** -0.5)
    x_bld = x_bld.astype(self.dtype)

    def dense_in(name: str) -> jax.Array:
      w_df = _param(self, name, init_in, (cfg.d_model, cfg.d_ff), (COND_EMBED, MLP))
      return jnp.einsum("bld,df->blf", x_bld, w_df.astype(self.dtype))

    if cfg.is_gated_act:
      h_blf = act(dense_in("wi_0")) * dense_in("wi_1")
    else:
      h_blf = act(dense_in("wi"))
    wo_fd = _param(self, "wo", nn.initializers.normal(cfg.d_ff ** -0.5), (cfg.d_ff, cfg.d_model), (MLP, COND_EMBED))
    return jnp.einsum("blf,fd->bld", h_blf, wo_fd.astype(self.dtype)).astype(jnp.float32)


class T5Block(nn.Module):
  """One pre-norm encoder layer; the residual stream stays fp32. [B, L, D] -> [B, L, D]."""

  config: T5EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_bld: jax.Array, bias_hll: jax.Array, mask_bl: jax.Array) -> jax.Array:
    eps = self.config.layer_norm_epsilon
    h_bld = T5LayerNorm(eps, name="attention_norm")(x_bld)
    x_bld = x_bld + T5SelfAttention(self.config, self.dtype, name="attention")(h_bld, bias_hll, mask_bl)
    h_bld = T5LayerNorm(eps, name="ffn_norm")(x_bld)
    return x_bld + T5FeedForward(self.config, self.dtype, name="ffn")(h_bld)


class T5Encoder(nn.Module):
  """T5 encoder stack: input_ids int [B, L], attention_mask [B, L] (1 = real) -> fp32 [B, L, D].

  Equals transformers' T5EncoderModel(...).last_hidden_state (padded positions included; they are
  whatever T5 computes there). `dtype` is the matmul compute dtype; params, norms, softmax and the
  residual stream are fp32.
  """

  config: T5EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids_bl: jax.Array, attention_mask_bl: jax.Array) -> jax.Array:
    cfg = self.config
    embedding_vd = _param(self, "token_embedding", nn.initializers.normal(1.0),
                          (cfg.vocab_size, cfg.d_model), (VOCAB, COND_EMBED))
    x_bld = jnp.take(embedding_vd, input_ids_bl, axis=0)
    x_bld = nn.with_logical_constraint(x_bld, (BATCH, LENGTH, COND_EMBED))
    length = input_ids_bl.shape[1]
    table_nh = _param(self, "relative_attention_bias", nn.initializers.normal(1.0),
                      (cfg.relative_attention_num_buckets, cfg.num_heads), (None, HEADS))
    buckets_ll = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
    bias_hll = jnp.transpose(jnp.take(table_nh, buckets_ll, axis=0), (2, 0, 1))
    for i in range(cfg.num_layers):
      x_bld = T5Block(cfg, self.dtype, name=f"block_{i}")(x_bld, bias_hll, attention_mask_bl)
    x_bld = T5LayerNorm(cfg.layer_norm_epsilon, name="final_norm")(x_bld)
    return nn.with_logical_constraint(x_bld, (BATCH, LENGTH, COND_EMBED))


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class T5Conditioner:
  """TextConditioner over a T5 encoder and its `tokenizers` tokenizer.

  Tokens: the tokenizer's own post-processor adds '</s>' (id 1); padding uses id 0. Pads to the
  longest prompt of the batch, or, with `max_length`, always to max_length (static shapes), truncating
  longer prompts (special tokens kept) with a logged warning.
  `encode` returns T5's last hidden state with padded positions zeroed. The LM still has to multiply
  by the mask after its own projection (the projection has a bias).
  """

  def __init__(self, config: T5EncoderConfig, tokenizer: tokenizers.Tokenizer, *,
               max_length: int | None = None, dtype: Any = jnp.float32):
    if max_length is not None and max_length <= 0:
      raise ValueError(f"max_length={max_length} must be a positive integer or None")
    self.config = config
    self.dim = config.d_model
    self.max_length = max_length
    self.module = T5Encoder(config, dtype)
    # A private copy: padding is done here, truncation only when max_length asks for it.
    self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    self._tokenizer.no_padding()
    if max_length is None:
      self._tokenizer.no_truncation()
    else:
      self._tokenizer.enable_truncation(max_length)

  @classmethod
  def from_pretrained(cls, directory: str, *, max_length: int | None = None,
                      dtype: Any = jnp.float32) -> T5Conditioner:
    """From a directory holding config.json (MusicGen: T5 under 'text_encoder'; or plain T5) and
    tokenizer.json. Parameters are loaded separately (musicgen_jax.interop.t5.t5_params_from_hf)."""
    for name in ("config.json", "tokenizer.json"):
      if not os.path.isfile(os.path.join(directory, name)):
        raise ValueError(f"{name} is missing from {directory!r}; a T5 / MusicGen checkpoint directory "
                         "needs config.json and tokenizer.json")
    config_dict = _read_json(os.path.join(directory, "config.json"))
    if isinstance(config_dict.get("text_encoder"), Mapping):
      config_dict = config_dict["text_encoder"]
    config = T5EncoderConfig.from_hf_dict(config_dict)
    tokenizer = read_tokenizer_file(os.path.join(directory, "tokenizer.json"))
    return cls(config, tokenizer, max_length=max_length, dtype=dtype)

  def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """-> {'input_ids': int32 [B, L], 'attention_mask': int32 [B, L]}, right-padded with id 0."""
    if isinstance(texts, str) or len(texts) == 0:
      raise ValueError("tokenize expects a non-empty sequence of strings, e.g. ['lofi beat']")
    encodings = self._tokenizer.encode_batch(list(texts))
    truncated = [i for i, e in enumerate(encodings) if e.overflowing]
    if truncated:
      _LOG.warning("T5Conditioner: %d prompt(s) longer than max_length=%d tokens were truncated (batch rows %s)",
                   len(truncated), self.max_length, truncated)
    length = self.max_length or max(len(e.ids) for e in encodings)
    input_ids = np.full((len(encodings), length), T5_PAD_ID, np.int32)
    attention_mask = np.zeros((len(encodings), length), np.int32)
    for row, e in enumerate(encodings):
      input_ids[row, :len(e.ids)] = e.ids
      attention_mask[row, :len(e.ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}

  def init(self, rng: jax.Array) -> Any:
    """Random parameters, boxed with their logical axis names (nn.Partitioned)."""
    dummy = jnp.ones((1, 2), jnp.int32)
    return self.module.init(rng, dummy, dummy)["params"]

  def encode(self, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """-> (hidden fp32 [B, L, d_model] with padded positions zeroed, mask int32 [B, L]). Jittable."""
    mask_bl = jnp.asarray(batch["attention_mask"]).astype(jnp.int32)
    hidden_bld = self.module.apply({"params": params}, jnp.asarray(batch["input_ids"]), mask_bl)
    hidden_bld = jnp.where(mask_bl[..., None] > 0, hidden_bld, 0.0)
    return hidden_bld, mask_bl

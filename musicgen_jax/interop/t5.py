"""Hugging Face T5 encoder weights -> the T5Encoder parameter tree (musicgen_jax.conditioners.t5).

A name table plus transposes: torch Linear weights are [out, in], our kernels [in, out] with the
head axis split out ([D, H, Dh] for q/k/v, [H, Dh, D] for o). Embeddings and norm scales copy as is.
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping

import numpy as np

from musicgen_jax.conditioners.t5 import T5EncoderConfig
from musicgen_jax.interop.common import set_path, take_weight

# (path in our tree, HF key without prefix, expected HF shape, HF array -> our array)
_Entry = tuple[tuple[str, ...], str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _identity(w: np.ndarray) -> np.ndarray:
  return w


def _linear(w_oi: np.ndarray) -> np.ndarray:
  return w_oi.T


def _name_table(config: T5EncoderConfig) -> Iterator[_Entry]:
  """Every parameter of T5Encoder(config) with the HF key it comes from."""
  d, h, k, f = config.d_model, config.num_heads, config.d_kv, config.d_ff
  yield ("token_embedding",), "shared.weight", (config.vocab_size, d), _identity
  yield (("relative_attention_bias",), "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
         (config.relative_attention_num_buckets, h), _identity)
  qkv = lambda w_od: w_od.T.reshape(d, h, k)  # [H*Dh, D] -> [D, H, Dh]; HF heads are the major part of H*Dh
  out = lambda w_do: w_do.T.reshape(h, k, d)  # [D, H*Dh] -> [H, Dh, D]
  ffn_in = ("wi_0", "wi_1") if config.is_gated_act else ("wi",)
  for i in range(config.num_layers):
    block, hf = f"block_{i}", f"encoder.block.{i}.layer"
    yield (block, "attention_norm", "scale"), f"{hf}.0.layer_norm.weight", (d,), _identity
    for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v")):
      yield (block, "attention", ours), f"{hf}.0.SelfAttention.{theirs}.weight", (h * k, d), qkv
    yield (block, "attention", "out"), f"{hf}.0.SelfAttention.o.weight", (d, h * k), out
    yield (block, "ffn_norm", "scale"), f"{hf}.1.layer_norm.weight", (d,), _identity
    for name in ffn_in:
      yield (block, "ffn", name), f"{hf}.1.DenseReluDense.{name}.weight", (f, d), _linear
    yield (block, "ffn", "wo"), f"{hf}.1.DenseReluDense.wo.weight", (d, f), _linear
  yield ("final_norm", "scale"), "encoder.final_layer_norm.weight", (d,), _identity


def t5_params_from_hf(state_dict: Mapping[str, np.ndarray], config: T5EncoderConfig,
                      prefix: str = "") -> dict:
  """Converts a HF T5 (encoder) state dict into T5Encoder params: a nested dict of float32 numpy arrays.

  `prefix` is prepended to every HF key (e.g. "text_encoder." in a MusicGen checkpoint). The token
  embedding is read from `shared.weight`, or from the tied `encoder.embed_tokens.weight` when only that
  is present. Unused keys (decoder, lm_head, ...) are ignored. A missing key or a wrong shape raises
  ValueError naming the key.
  """
  params: dict = {}
  for path, key, shape, convert in _name_table(config):
    full_key = prefix + key
    if full_key not in state_dict and key == "shared.weight":
      tied_key = prefix + "encoder.embed_tokens.weight"
      full_key = tied_key if tied_key in state_dict else full_key
    w = take_weight(state_dict, full_key, shape, "T5")
    set_path(params, path, np.ascontiguousarray(convert(w)))
  return params

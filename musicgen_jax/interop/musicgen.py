"""Hugging Face MusicGen / MusicGen-Melody checkpoints -> our config and LM parameter tree.

`config_from_hf` maps a `save_pretrained` config.json (+ generation_config.json) onto the sections of
our config a model directory needs; `lm_params_from_hf` converts the decoder weights with one name table:

  HF key ({d} = decoder.model.decoder, per layer i)        ours                       transform
  {d}.embed_tokens.{k}.weight        [card+1, D]           embed_tokens [K, card+1, D]  stack over k
  decoder.lm_heads.{k}.weight        [card, D]             lm_heads [K, card, D]        stack
  {d}.layers.{i}.{self_attn|encoder_attn}.{q,k,v,out}_proj.weight [D, D]
                                                           layers/<attn>/<proj>/kernel [L, D, D]
  {d}.layers.{i}.fc1.weight [F, D] / fc2.weight [D, F]     layers/fc1|fc2/kernel [L, D, F] | [L, F, D]
  {d}.layers.{i}.<norm>.{weight,bias} [D]                  layers/<norm>/{scale,bias} [L, D]
  {d}.layer_norm.{weight,bias}                             layer_norm/{scale,bias}
  enc_to_dec_proj.{weight,bias}       [D, text_dim]        enc_to_dec_proj/{kernel,bias}   (top level)
  audio_enc_to_dec_proj.{weight,bias} [D, 12]              audio_enc_to_dec_proj/{kernel,bias} (melody)

Linear weights are torch [out, in]; our kernels are [in, out]. Per-layer weights are stacked on axis 0
(the scanned layer axis). MusicGen-Melody uses the same decoder names without `encoder_attn`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping

import ml_collections
import numpy as np
from ml_collections import config_dict

from musicgen_jax.interop.common import set_path, take_weight
from musicgen_jax.lm import LMConfig
from musicgen_jax.sampling import sampling_defaults
from musicgen_jax.sharding import DEFAULT_RULES, MESH_AXES

MODEL_TYPES = ("musicgen", "musicgen_melody")
T5_MAX_LENGTH = 64   # text tokens per prompt of an imported T5 conditioner (static shapes)
_NORMS = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
_PROJS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _fail(field: str, value: Any, why: str) -> None:
  raise ValueError(f"config.json: {field}={value!r} {why}")


def _get(d: Mapping[str, Any], section: str, key: str, default: Any = None) -> Any:
  if key in d:
    return d[key]
  if default is None:
    raise ValueError(f"config.json: {section} has no field {key!r}; is this a MusicGen save_pretrained "
                     "directory?")
  return default


def _plain(d: Mapping[str, Any]) -> dict:
  """The scalar and list-of-scalar fields of a sub-config (drops label maps, task params, ...)."""
  scalar = (str, int, float, bool, type(None))
  return {k: v for k, v in d.items() if isinstance(v, scalar)
          or (isinstance(v, (list, tuple)) and all(isinstance(x, scalar) for x in v))}


def _base_config() -> ml_collections.ConfigDict:
  """The sections a model directory's config holds, from the package's own defaults (LMConfig, the
  sampling section, the sharding rules); `config_from_hf` fills them from config.json. The package never
  reads configs/ (that directory builds on the package, not the other way round)."""
  c = ml_collections.ConfigDict()
  c.variant = ""
  c.model = ml_collections.ConfigDict(dataclasses.asdict(LMConfig()))
  c.pattern = ml_collections.ConfigDict(dict(name="delay", delays=config_dict.placeholder(tuple)))
  c.text = ml_collections.ConfigDict(dict(kind="t5", max_length=T5_MAX_LENGTH, tokenizer="",
                                          prefix_padding="longest"))
  c.codec = ml_collections.ConfigDict()
  c.sampling = ml_collections.ConfigDict(sampling_defaults())
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), axes=MESH_AXES))
  c.logical_axis_rules = [list(r) for r in DEFAULT_RULES]
  return c


def config_from_hf(hf: Mapping[str, Any],
                   generation_config: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Our model-directory config (model, pattern, text, codec, sampling, mesh, rules) for a HF
  MusicGen(-Melody) config.json dict.

  Model shape from hf['decoder'], text = T5 (hf['text_encoder'] kept as config.text.t5), codec = EnCodec
  (hf['audio_encoder'] kept as config.codec.encodec), sampling defaults from generation_config.json.
  Raises ValueError naming config.json and the field for anything we cannot run.
  """
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    _fail("model_type", model_type, f"is not supported: this converter maps {list(MODEL_TYPES)}")
  for section in ("decoder", "text_encoder", "audio_encoder"):
    if not isinstance(hf.get(section), Mapping):
      _fail(section, None, "is missing: a MusicGen config.json has decoder, text_encoder and audio_encoder")
  dec, text, codec = hf["decoder"], hf["text_encoder"], hf["audio_encoder"]
  if text.get("model_type", "t5") != "t5":
    _fail("text_encoder.model_type", text.get("model_type"), "is not supported: only T5 text encoders")
  if codec.get("model_type", "encodec") != "encodec":
    _fail("audio_encoder.model_type", codec.get("model_type"), "is not supported: only EnCodec")
  if dec.get("activation_function", "gelu") != "gelu":
    _fail("decoder.activation_function", dec["activation_function"], "is not supported (only 'gelu')")
  if dec.get("scale_embedding", False):
    _fail("decoder.scale_embedding", True, "is not supported")
  cross = dec.get("cross_attention_hidden_size")
  if cross is not None and cross != dec.get("hidden_size"):
    _fail("decoder.cross_attention_hidden_size", cross, "is not supported (must be unset)")
  channels = int(dec.get("audio_channels", 1))
  if channels not in (1, 2):
    _fail("decoder.audio_channels", channels, "must be 1 or 2")

  c = _base_config()
  c.variant = f"hf_{model_type}"
  num_codebooks = int(_get(dec, "decoder", "num_codebooks"))
  c.model.update(
      num_codebooks=num_codebooks, card=int(_get(dec, "decoder", "vocab_size")),
      dim=int(_get(dec, "decoder", "hidden_size")), num_layers=int(_get(dec, "decoder", "num_hidden_layers")),
      num_heads=int(_get(dec, "decoder", "num_attention_heads")), ffn_dim=int(_get(dec, "decoder", "ffn_dim")),
      max_positions=int(_get(dec, "decoder", "max_position_embeddings")), dropout=0.0, layer_norm_eps=1e-5,
      text_dim=int(_get(text, "text_encoder", "d_model")), text_conditioning="cross", melody=False)
  if model_type == "musicgen_melody":
    c.model.update(melody=True, text_conditioning="prefix", num_chroma=int(hf.get("num_chroma", 12)),
                   chroma_length=int(hf.get("chroma_length", 235)))
  if channels == 2:
    if num_codebooks % 2:
      _fail("decoder.num_codebooks", num_codebooks, "must be even for a stereo (audio_channels 2) model")
    c.pattern.delays = tuple(k // 2 for k in range(num_codebooks))
  c.pattern.name = "delay"

  c.text.update(dim=c.model.text_dim, num_layers=int(text.get("num_layers", 1)),
                num_heads=int(text.get("num_heads", 1)))
  c.text.t5 = ml_collections.ConfigDict(_plain(text))

  ratios = _get(codec, "audio_encoder", "upsampling_ratios")
  sample_rate = int(_get(codec, "audio_encoder", "sampling_rate"))
  c.codec = ml_collections.ConfigDict(dict(
      sample_rate=sample_rate, frame_rate=math.ceil(sample_rate / math.prod(ratios)),
      channels=channels * int(codec.get("audio_channels", 1))))
  c.codec.encodec = ml_collections.ConfigDict(_plain(codec))

  g = generation_config or {}
  if g.get("guidance_scale") is not None:
    c.sampling.cfg_coef = float(g["guidance_scale"])
  if g.get("top_k") is not None:
    c.sampling.top_k = int(g["top_k"])
  if g.get("top_p") is not None and float(g["top_p"]) < 1.0:
    c.sampling.top_p = float(g["top_p"])
  if g.get("temperature") is not None:
    c.sampling.temperature = float(g["temperature"])
  if g.get("do_sample") is False:
    c.sampling.top_k = 1  # greedy
  return c


# --- weights -----------------------------------------------------------------------------------------
# (path in our tree, HF keys stacked on axis 0 (one key: no stacking), expected HF shape, transform)
_Entry = tuple[tuple[str, ...], list[str], tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _t(w: np.ndarray) -> np.ndarray:
  return w.T


def _same(w: np.ndarray) -> np.ndarray:
  return w


def _name_table(cfg: LMConfig, prefix: str, root: str) -> Iterator[_Entry]:
  d, f, k_cb, card = cfg.dim, cfg.ffn_dim, cfg.num_codebooks, cfg.card
  dec = f"{prefix}model.decoder"
  per_layer = lambda name: [f"{dec}.layers.{i}.{name}" for i in range(cfg.num_layers)]
  yield ("embed_tokens",), [f"{dec}.embed_tokens.{k}.weight" for k in range(k_cb)], (card + 1, d), _same
  yield ("lm_heads",), [f"{prefix}lm_heads.{k}.weight" for k in range(k_cb)], (card, d), _same
  attns = ("self_attn", "encoder_attn") if cfg.cross_attention else ("self_attn",)
  for attn in attns:
    for proj in _PROJS:
      yield ("layers", attn, proj, "kernel"), per_layer(f"{attn}.{proj}.weight"), (d, d), _t
  for norm in _NORMS:
    if norm == "encoder_attn_layer_norm" and not cfg.cross_attention:
      continue
    yield ("layers", norm, "scale"), per_layer(f"{norm}.weight"), (d,), _same
    yield ("layers", norm, "bias"), per_layer(f"{norm}.bias"), (d,), _same
  yield ("layers", "fc1", "kernel"), per_layer("fc1.weight"), (f, d), _t
  yield ("layers", "fc2", "kernel"), per_layer("fc2.weight"), (d, f), _t
  yield ("layer_norm", "scale"), [f"{dec}.layer_norm.weight"], (d,), _same
  yield ("layer_norm", "bias"), [f"{dec}.layer_norm.bias"], (d,), _same
  if cfg.text_dim and cfg.text_dim != cfg.dim:
    yield ("enc_to_dec_proj", "kernel"), [f"{root}enc_to_dec_proj.weight"], (d, cfg.text_dim), _t
    yield ("enc_to_dec_proj", "bias"), [f"{root}enc_to_dec_proj.bias"], (d,), _same
  if cfg.melody and cfg.num_chroma != cfg.dim:
    yield ("audio_enc_to_dec_proj", "kernel"), [f"{root}audio_enc_to_dec_proj.weight"], (d, cfg.num_chroma), _t
    yield ("audio_enc_to_dec_proj", "bias"), [f"{root}audio_enc_to_dec_proj.bias"], (d,), _same


def lm_params_from_hf(state_dict: Mapping[str, np.ndarray], lm_cfg: LMConfig, prefix: str = "decoder.",
                      root: str = "") -> dict:
  """HF MusicGen(-Melody) state dict (numpy arrays) -> MusicGenLM params: nested dict of float32 arrays.

  `prefix` is prepended to the decoder's keys (`decoder.` in a MusicgenForConditionalGeneration),
  `root` to the top-level projections (enc_to_dec_proj, audio_enc_to_dec_proj). Stacked entries get a
  leading axis: [K, ...] for embeddings and heads, [L, ...] for layer weights. A missing key or a shape
  that does not match the config raises ValueError naming the key, the expected and the actual shape.
  """
  params: dict = {}
  for path, keys, shape, convert in _name_table(lm_cfg, prefix, root):
    arrays = []
    for key in keys:
      arrays.append(convert(take_weight(state_dict, key, shape, "MusicGen", "config.json")))
    value = arrays[0] if len(keys) == 1 and path[0] not in ("embed_tokens", "lm_heads", "layers") \
        else np.stack(arrays)
    set_path(params, path, np.ascontiguousarray(value))
  return params

"""The MusicGen language model over K parallel codebook streams.

input steps [B, K, S] -> sum of K codebook embeddings (card + 1 rows each; the last row is the special
token) + sinusoidal positions -> L pre-norm decoder blocks (scanned) -> LayerNorm -> K linear heads
-> logits [B, K, S, card].

Conditioning (chosen by the config):
  * text by cross-attention (MusicGen): T5 / learned-encoder states projected by `enc_to_dec_proj`
    (present when the encoder width differs from the model width), zeroed at padding;
  * prefix (MusicGen-Melody): [chroma projected by `audio_enc_to_dec_proj`, text projected] placed before
    the token steps, sharing the positions and the causal self-attention;
  * a beat clock (this project's, `beat_clock_rate` > 0): sines of the beat phase at each audio frame,
    at the tempo the text names (conditioners/tempo.py), projected by `beat_proj` and added to the
    token steps.

Parameter names mirror Hugging Face's MusicgenForConditionalGeneration / MusicgenMelody decoders, with the
K embeddings and K heads stacked (see musicgen_jax/interop for the name table).

`__call__` is the full-sequence forward (training and the uncached reference). Cached decoding (prefill
and single steps against per-layer KV caches) reads the same parameters in a serving layout:
musicgen_jax/lm_decode.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from musicgen_jax import sharding as shd
from musicgen_jax.conditioners import tempo as tempo_lib
from musicgen_jax.nn.attention import dense
from musicgen_jax.nn.transformer import BlockConfig, DecoderLayer, layer_norm, sinusoidal_positions

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_REMAT = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Static shape and numerics of the LM (built from `config.model`)."""
  num_codebooks: int = 4
  card: int = 2048
  dim: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  ffn_dim: int = 4096
  text_dim: int = 768            # width of the text encoder output; 0 = no text condition
  text_conditioning: str = "cross"  # "cross" | "prefix"
  melody: bool = False           # chroma prefix (MusicGen-Melody)
  num_chroma: int = 12
  chroma_length: int = 235       # prefix frames of chroma (HF `chroma_length`)
  max_positions: int = 2048      # positions the model was trained for (duration limit)
  # Frames per second of the beat clock on the audio frames (conditioners/tempo.py; the codec's frame
  # rate), 0 = none (the released models).
  beat_clock_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  dropout: float = 0.0
  dtype: str = "float32"         # compute dtype; params are always float32
  remat: str = "none"
  # Layers per iteration of the layer scan; 0 (or >= num_layers): no loop; None: by backend
  # (layer_scan_unroll).
  scan_unroll: int | None = None

  def __post_init__(self):
    if self.dim % self.num_heads:
      raise ValueError(f"model.dim {self.dim} is not divisible by model.num_heads {self.num_heads}")
    if self.text_conditioning not in ("cross", "prefix"):
      raise ValueError(f"model.text_conditioning must be 'cross' or 'prefix', got {self.text_conditioning!r}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
    if self.remat not in _REMAT:
      raise ValueError(f"model.remat must be one of {_REMAT}, got {self.remat!r}")
    if self.beat_clock_rate < 0:
      raise ValueError(f"model.beat_clock_rate must be >= 0 (0: no beat clock), got {self.beat_clock_rate}")
    if self.scan_unroll is not None and (not isinstance(self.scan_unroll, int) or self.scan_unroll < 0):
      raise ValueError(f"model.scan_unroll must be an integer >= 0 (0: all layers unrolled) or None "
                       f"(by backend), got {self.scan_unroll!r}")

  @classmethod
  def from_dict(cls, d) -> "LMConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    d = dict(d)
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"unknown model config fields {unknown}; known: {sorted(fields)}")
    return cls(**d)

  @property
  def special_token(self) -> int:
    return self.card

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def cross_attention(self) -> bool:
    return self.text_dim > 0 and self.text_conditioning == "cross"

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads


@flax.struct.dataclass
class Conditions:
  """Raw conditions. text: encoder states [B, L, text_dim] + mask [B, L]; melody: chroma [B, Lm, 12];
  beat: the beat clock [B, 2] float32 = (the tempo the text names in bpm, 0 = none; the beat phase
  at audio frame 0), read only by models with a beat clock (conditioners/tempo.py)."""
  text: jax.Array | None = None
  text_mask: jax.Array | None = None
  melody: jax.Array | None = None
  beat: jax.Array | None = None


@flax.struct.dataclass
class CondTensors:
  """Conditions projected to the model width: cross-attention source and/or prefix, with masks."""
  cross: jax.Array | None = None        # [B, L, D]
  cross_mask: jax.Array | None = None   # [B, L] bool
  prefix: jax.Array | None = None       # [B, P, D]
  beat: jax.Array | None = None         # [B, 2] the beat clock (beat-clock models only)


def _remat_policy(name: str):
  return {"full": None,
          "dots": jax.checkpoint_policies.checkpoint_dots,
          "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}[name]


def layer_scan_unroll(cfg: LMConfig, backend: str | None = None) -> int:
  """Layers per iteration of the training forward's layer scan. `cfg.scan_unroll` when set; None
  picks by backend: every layer unrolled on a GPU, where the loop's stacking of per-layer residuals
  and gradients cost a quarter of the small train step (one H200: 36.0% MFU in 21 GiB unrolled
  against 26.1% in 33 GiB, docs/BENCHMARKS.md) for a compile 5x as long (178 s against 35 s); the
  loop elsewhere (CPU; TPU, whose ahead-of-time plans in docs/SCALING.md compile the loop, and
  where the unrolled step has not been measured)."""
  unroll = cfg.scan_unroll
  if unroll is None:
    unroll = 0 if (backend or jax.default_backend()) == "gpu" else 1
  return min(unroll or cfg.num_layers, cfg.num_layers)


class MusicGenLM(nn.Module):
  cfg: LMConfig
  deterministic: bool = True

  def setup(self):
    c = self.cfg
    dt = c.compute_dtype
    self.embed_tokens = self.param(
        "embed_tokens", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                     (shd.CODEBOOKS, None, shd.EMBED)),  # card+1 rows
        (c.num_codebooks, c.card + 1, c.dim), jnp.float32)
    if c.text_dim and c.text_dim != c.dim:
      self.enc_to_dec_proj = dense(c.dim, (shd.COND_EMBED, shd.EMBED), dt, jnp.float32, use_bias=True)
    if c.melody and c.num_chroma != c.dim:
      self.audio_enc_to_dec_proj = dense(c.dim, (shd.COND_EMBED, shd.EMBED), dt, jnp.float32,
                                         use_bias=True)
    if c.beat_clock_rate:
      # Zero-initialised, so a clock added to a trained model (init_fresh=beat) starts it unchanged:
      # the clock is in phase with the beats, so the frame's own tokens give its projection a
      # gradient at zero (an arbitrary-phase clock, which helps only by comparing two frames'
      # phases, had none there: models/demo/TRAINING.md).
      self.beat_proj = self.param("beat_proj", nn.with_logical_partitioning(
          nn.initializers.zeros, (None, shd.EMBED)), (tempo_lib.NUM_FEATURES, c.dim),
          jnp.float32)
    block = BlockConfig(c.dim, c.num_heads, c.ffn_dim, c.cross_attention, c.layer_norm_eps, c.dropout,
                        dt, jnp.float32)
    layer_cls = DecoderLayer
    if c.remat != "none":
      layer_cls = nn.remat(DecoderLayer, policy=_remat_policy(c.remat), prevent_cse=False)
    unroll = layer_scan_unroll(c)
    self.layers = nn.scan(layer_cls, variable_axes={"params": 0},
                          split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,),
                          length=c.num_layers, unroll=unroll,
                          metadata_params={nn.PARTITION_NAME: shd.LAYERS})(
        block, self.deterministic)
    self.layer_norm = layer_norm(c.layer_norm_eps)
    self.lm_heads = self.param(
        "lm_heads", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                 (shd.CODEBOOKS, shd.VOCAB, shd.EMBED)),
        (c.num_codebooks, c.card, c.dim), jnp.float32)

  # --- conditions -------------------------------------------------------------------------------
  def project_conditions(self, conds: Conditions) -> CondTensors:
    """Projects raw conditions to the model width; text zeroed at padding (as the reference does)."""
    c = self.cfg
    text = None
    mask = None
    if c.text_dim and conds.text is not None:
      text = conds.text.astype(jnp.float32)
      if c.text_dim != c.dim:
        text = self.enc_to_dec_proj(text).astype(jnp.float32)
      mask = (jnp.ones(text.shape[:2], bool) if conds.text_mask is None
              else conds.text_mask.astype(bool))
      text = text * mask[..., None]
    beat = None
    if c.beat_clock_rate and conds.beat is not None:
      beat = jnp.asarray(conds.beat, jnp.float32)
    if c.text_conditioning == "cross":
      prefix = self._melody_prefix(conds)
      return CondTensors(cross=text, cross_mask=mask, prefix=prefix, beat=beat)
    parts = [p for p in (self._melody_prefix(conds), text) if p is not None]
    return CondTensors(prefix=jnp.concatenate(parts, axis=1) if parts else None, beat=beat)

  def _melody_prefix(self, conds: Conditions):
    c = self.cfg
    if not c.melody:
      return None
    if conds.melody is None:
      raise ValueError("this model is melody-conditioned: pass a chroma [B, frames, 12] (or the null one)")
    chroma = conds.melody.astype(jnp.float32)
    if c.num_chroma != c.dim:
      chroma = self.audio_enc_to_dec_proj(chroma).astype(jnp.float32)
    return chroma

  # --- token embedding and heads ----------------------------------------------------------------
  def embed(self, tokens_bkn: jax.Array, pos_n: jax.Array) -> jax.Array:
    """Sum of the K codebook embeddings plus positions -> [B, N, D] float32."""
    x = sum(self.embed_tokens[k][tokens_bkn[:, k]] for k in range(self.cfg.num_codebooks))
    return x + sinusoidal_positions(pos_n, self.cfg.dim)[None]

  def heads(self, x_bnd: jax.Array) -> jax.Array:
    """Final LayerNorm and the K heads -> logits [B, K, N, card] float32."""
    h = self.layer_norm(x_bnd).astype(self.cfg.compute_dtype)
    w = self.lm_heads.astype(self.cfg.compute_dtype)
    # Heads stored [K, card, D] (PyTorch's Linear layout): the contraction reads rows contiguously, with
    # no per-step transpose of the 8M-entry weight.
    logits = jnp.einsum("bnd,kcd->bknc", h, w, preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, (shd.BATCH, shd.CODEBOOKS, shd.LENGTH, shd.VOCAB))

  # --- full sequence ----------------------------------------------------------------------------
  def __call__(self, tokens_bks: jax.Array, conds: Conditions) -> jax.Array:
    """Full forward: steps [B, K, S] -> logits [B, K, S, card] (logit at step s predicts step s+1)."""
    cond = self.project_conditions(conds)
    x, p = self._with_prefix(tokens_bks, cond.prefix, 0, cond.beat)
    ctx = {}
    if cond.cross is not None:
      ctx["cond"] = cond.cross
      ctx["cond_mask"] = cond.cross_mask[:, None, None, :]
    x, _ = self.layers(x.astype(self.cfg.compute_dtype), ctx)
    return self.heads(x[:, p:])

  def _with_prefix(self, tokens_bkn, prefix: jax.Array | None, offset, beat_b=None):
    """Embeds tokens at positions P + offset.. (with the beat clock [B, 2] at frames offset.., as
    project_conditions gives it: None without a clock) and prepends the prefix [B, P, D] (if any)
    at 0..P-1."""
    p = 0 if prefix is None else prefix.shape[1]
    frames_n = offset + jnp.arange(tokens_bkn.shape[-1])
    x = self.embed(tokens_bkn, p + frames_n)
    if beat_b is not None:
      x = x + tempo_lib.clock_embedding(frames_n, beat_b, self.cfg.beat_clock_rate, self.beat_proj)
    if p:
      pre = prefix + sinusoidal_positions(jnp.arange(p), self.cfg.dim)[None]
      x = jnp.concatenate([pre.astype(x.dtype), x], axis=1)
    return x, p


def init_params(cfg: LMConfig, rng: jax.Array, batch: int = 1, steps: int = 2, text_len: int = 2,
                chroma_len: int = 2) -> Any:
  """Random parameters (boxed with logical axis names) from a dummy forward pass."""
  model = MusicGenLM(cfg)
  tokens = jnp.full((batch, cfg.num_codebooks, steps), cfg.special_token, jnp.int32)
  return model.init(rng, tokens, dummy_conditions(cfg, batch, text_len, chroma_len))


def dummy_conditions(cfg: LMConfig, batch: int, text_len: int = 2, chroma_len: int = 2) -> Conditions:
  text = mask = melody = None
  if cfg.text_dim:
    text = jnp.zeros((batch, text_len, cfg.text_dim), jnp.float32)
    mask = jnp.ones((batch, text_len), jnp.int32)
  if cfg.melody:
    melody = jnp.zeros((batch, chroma_len, cfg.num_chroma), jnp.float32)
  return Conditions(text=text, text_mask=mask, melody=melody)

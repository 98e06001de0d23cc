"""EnCodec: SEANet encoder -> residual VQ -> SEANet decoder, numerically matching transformers' EncodecModel.

Public API:
  EncodecConfig.from_hf_dict(d)                         config from a Hugging Face encodec config dict
  model = EncodecModel(config); params = model.init(rng)
  model.encode(params, audio [B, C_audio, N], n_q=None) -> codes int32 [B, K, T]
  model.decode(params, codes [B, K, T])                 -> audio [B, C_audio, T * hop]
  model.encode_frames / decode_frames                   the chunked / normalised path (48 kHz model)

All methods are pure and jittable (n_q is static: `jax.jit(model.encode, static_argnames='n_q')`).
The parameter tree is {'encoder': ..., 'decoder': ..., 'quantizer': {'embed': [K, C, D]}}.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp

from musicgen_jax import quantization
from musicgen_jax.codec import seanet

_NORM_TYPES = ('weight_norm', 'time_group_norm')


def _fail(field: str, value: Any, why: str) -> None:
  raise ValueError(f'EncodecConfig.{field}={value!r}: {why}')


@dataclasses.dataclass(frozen=True)
class EncodecConfig:
  """EnCodec architecture; field names and defaults follow transformers' EncodecConfig (24 kHz model)."""
  sampling_rate: int = 24_000
  audio_channels: int = 1
  num_filters: int = 32
  num_residual_layers: int = 1
  upsampling_ratios: tuple[int, ...] = (8, 5, 4, 2)
  norm_type: str = 'weight_norm'
  kernel_size: int = 7
  last_kernel_size: int = 7
  residual_kernel_size: int = 3
  dilation_growth_rate: int = 2
  use_causal_conv: bool = True
  pad_mode: str = 'reflect'
  compress: int = 2
  num_lstm_layers: int = 2
  trim_right_ratio: float = 1.0
  hidden_size: int = 128
  codebook_size: int = 1024
  codebook_dim: int | None = None
  use_conv_shortcut: bool = True
  target_bandwidths: tuple[float, ...] = (1.5, 3.0, 6.0, 12.0, 24.0)
  normalize: bool = False
  chunk_length_s: float | None = None
  overlap: float | None = None

  def __post_init__(self):
    object.__setattr__(self, 'upsampling_ratios', tuple(int(r) for r in self.upsampling_ratios))
    object.__setattr__(self, 'target_bandwidths', tuple(float(b) for b in self.target_bandwidths))
    if self.codebook_dim is None:
      object.__setattr__(self, 'codebook_dim', self.hidden_size)
    for name in ('sampling_rate', 'audio_channels', 'num_filters', 'kernel_size', 'last_kernel_size',
                 'residual_kernel_size', 'dilation_growth_rate', 'compress', 'num_lstm_layers',
                 'hidden_size', 'codebook_size'):
      if int(getattr(self, name)) < 1:
        _fail(name, getattr(self, name), 'must be a positive integer')
    if self.num_residual_layers < 0:
      _fail('num_residual_layers', self.num_residual_layers, 'must be >= 0')
    if not self.upsampling_ratios or min(self.upsampling_ratios) < 1:
      _fail('upsampling_ratios', self.upsampling_ratios, 'must be a non-empty list of positive ints')
    if self.norm_type not in _NORM_TYPES:
      _fail('norm_type', self.norm_type, f'must be one of {_NORM_TYPES}')
    if self.pad_mode not in seanet.PAD_MODES:
      _fail('pad_mode', self.pad_mode, f'must be one of {tuple(seanet.PAD_MODES)}')
    if not 0.0 <= self.trim_right_ratio <= 1.0:
      _fail('trim_right_ratio', self.trim_right_ratio, 'must be in [0, 1]')
    if not self.use_causal_conv and self.trim_right_ratio != 1.0:
      _fail('trim_right_ratio', self.trim_right_ratio, 'must be 1.0 unless use_causal_conv is true')
    if self.codebook_size & (self.codebook_size - 1):
      _fail('codebook_size', self.codebook_size, 'must be a power of 2')
    if self.codebook_dim != self.hidden_size:
      _fail('codebook_dim', self.codebook_dim,
            f'must equal hidden_size={self.hidden_size} (EnCodec has no codebook projection)')
    if not self.target_bandwidths or self.num_quantizers < 1:
      _fail('target_bandwidths', self.target_bandwidths,
            'the largest bandwidth must allow at least one codebook')
    if self.chunk_length_s is not None and self.chunk_length_s <= 0:
      _fail('chunk_length_s', self.chunk_length_s, 'must be positive or None')
    if self.chunk_length_s is not None and self.chunk_length < 1:
      _fail('chunk_length_s', self.chunk_length_s, 'gives a chunk shorter than one sample')
    if self.overlap is not None and not 0.0 <= self.overlap < 1.0:
      _fail('overlap', self.overlap, 'must be in [0, 1) or None')
    if self.chunk_length_s is not None and self.overlap is None:
      _fail('overlap', self.overlap, 'must be set when chunk_length_s is (HF needs a chunk stride)')

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> EncodecConfig:
    """Config from a transformers encodec config dict (e.g. config.json or MusicGen's 'audio_encoder').

    Keys that are not architecture fields (architectures, torch_dtype, ...) are ignored.
    """
    if d.get('model_type', 'encodec') != 'encodec':
      raise ValueError(f"model_type={d['model_type']!r}: expected an 'encodec' config")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  @property
  def hop_length(self) -> int:
    """Audio samples per code frame (product of the ratios)."""
    return math.prod(self.upsampling_ratios)

  @property
  def frame_rate(self) -> int:
    """Code frames per second, ceil(sampling_rate / hop_length) as HF defines it."""
    return math.ceil(self.sampling_rate / self.hop_length)

  @property
  def num_quantizers(self) -> int:
    """Codebooks in the residual quantizer (enough for the largest target bandwidth)."""
    bits = math.ceil(math.log2(self.codebook_size))
    return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * bits))

  @property
  def chunk_length(self) -> int | None:
    """Samples per chunk, or None when the whole input is one chunk."""
    return None if self.chunk_length_s is None else int(self.chunk_length_s * self.sampling_rate)

  @property
  def chunk_stride(self) -> int | None:
    """Samples between chunk starts, or None when not chunking with overlap."""
    if self.chunk_length_s is None or self.overlap is None:
      return None
    return max(1, int((1.0 - self.overlap) * self.chunk_length))

  def n_q_for_bandwidth(self, bandwidth: float) -> int:
    """Number of codebooks HF uses at `bandwidth` (kbps, one of target_bandwidths)."""
    if bandwidth not in self.target_bandwidths:
      raise ValueError(f'bandwidth={bandwidth} is not one of target_bandwidths={self.target_bandwidths}')
    bits_per_q = math.log2(self.codebook_size) * self.frame_rate
    return int(max(1, math.floor(bandwidth * 1000 / bits_per_q)))


@flax.struct.dataclass
class EncodedFrames:
  """Codes of F chunks, as HF's encode returns them.

  codes: int32 [F, B, K, Tf] (the last chunk zero-padded to Tf); scales: [F, B] (None unless
  config.normalize); last_frame_pad_length: padding frames appended to the last chunk (static).
  """
  codes: jax.Array
  scales: jax.Array | None
  last_frame_pad_length: int = flax.struct.field(pytree_node=False, default=0)


@dataclasses.dataclass(frozen=True)
class EncodecModel:
  """EnCodec as pure functions of an explicit parameter tree."""
  config: EncodecConfig

  @property
  def encoder(self) -> seanet.SEANetEncoder:
    return seanet.SEANetEncoder(self.config)

  @property
  def decoder(self) -> seanet.SEANetDecoder:
    return seanet.SEANetDecoder(self.config)

  @property
  def sample_rate(self) -> int:
    return self.config.sampling_rate

  @property
  def frame_rate(self) -> int:
    return self.config.frame_rate

  @property
  def num_codebooks(self) -> int:
    """K, the codebooks in the quantizer (encode's default n_q)."""
    return self.config.num_quantizers

  @property
  def channels(self) -> int:
    return self.config.audio_channels

  def init(self, rng: jax.Array) -> dict[str, Any]:
    """Random parameters: {'encoder', 'decoder', 'quantizer': {'embed': [K, codebook_size, D]}}."""
    cfg = self.config
    r_enc, r_dec, r_q = jax.random.split(rng, 3)
    audio = jnp.zeros((1, cfg.hop_length, cfg.audio_channels), jnp.float32)
    latents = jnp.zeros((1, 1, cfg.hidden_size), jnp.float32)
    embed = jax.random.normal(r_q, (cfg.num_quantizers, cfg.codebook_size, cfg.codebook_dim))
    return {'encoder': self.encoder.init(r_enc, audio)['params'],
            'decoder': self.decoder.init(r_dec, latents)['params'],
            'quantizer': {'embed': embed}}

  # --- building blocks -------------------------------------------------------------------------

  def encode_latents(self, params: Mapping[str, Any], audio_bnc: jax.Array) -> jax.Array:
    """Encoder only: audio [B, N, C_audio] (channels last) -> latents [B, ceil(N / hop), D]."""
    return self.encoder.apply({'params': params['encoder']}, audio_bnc)

  def decode_latents(self, params: Mapping[str, Any], latents_btd: jax.Array) -> jax.Array:
    """Decoder only: latents [B, T, D] -> audio [B, T * hop, C_audio] (channels last)."""
    return self.decoder.apply({'params': params['decoder']}, latents_btd)

  def _check_audio(self, audio: jax.Array) -> None:
    if audio.ndim != 3 or audio.shape[1] != self.channels or audio.shape[2] < 1:
      raise ValueError(f'audio must be [B, {self.channels}, N>0] (batch, channels, samples); got '
                       f'shape {tuple(audio.shape)}')

  def _check_n_q(self, n_q: int | None) -> int:
    n_q = self.num_codebooks if n_q is None else n_q
    if not 1 <= n_q <= self.num_codebooks:
      raise ValueError(f'n_q={n_q} must be in [1, {self.num_codebooks}] (codebooks in this codec)')
    return n_q

  def _check_codes(self, codes: jax.Array, ndim: int) -> None:
    if codes.ndim != ndim or not 1 <= codes.shape[-2] <= self.num_codebooks or codes.shape[-1] < 1:
      want = '[B, K, T]' if ndim == 3 else '[F, B, K, T]'
      raise ValueError(f'codes must be {want} with 1 <= K <= {self.num_codebooks} and T >= 1; got '
                       f'shape {tuple(codes.shape)}')

  def _encode_chunk(self, params, audio_bcn: jax.Array, n_q: int) -> tuple[jax.Array, jax.Array | None]:
    """One chunk [B, C, N] -> (codes [B, n_q, ceil(N / hop)], scale [B] or None)."""
    x_bnc = jnp.transpose(audio_bcn, (0, 2, 1)).astype(jnp.float32)
    scale_b = None
    if self.config.normalize:
      mono_bn = jnp.sum(x_bnc, axis=-1) / x_bnc.shape[-1]
      scale_b = jnp.sqrt(jnp.mean(mono_bn**2, axis=-1)) + 1e-8
      x_bnc = x_bnc / scale_b[:, None, None]
    latents_btd = self.encode_latents(params, x_bnc)
    codes_bkt = quantization.rvq_encode(params['quantizer']['embed'], latents_btd, n_q)
    return codes_bkt.astype(jnp.int32), scale_b

  def _decode_chunk(self, params, codes_bkt: jax.Array, scale_b: jax.Array | None) -> jax.Array:
    """Codes [B, K, T] (and optional scale [B]) -> audio [B, C, T * hop]."""
    latents_btd = quantization.rvq_decode(params['quantizer']['embed'], codes_bkt)
    audio_bnc = self.decode_latents(params, latents_btd)
    if scale_b is not None:
      audio_bnc = audio_bnc * scale_b[:, None, None]
    return jnp.transpose(audio_bnc, (0, 2, 1))

  # --- public API ------------------------------------------------------------------------------

  def encode(self, params: Mapping[str, Any], audio_bcn: jax.Array, n_q: int | None = None) -> jax.Array:
    """Audio [B, C_audio, N] -> codes int32 [B, n_q, ceil(N / hop)] (n_q defaults to all K codebooks).

    Only for configs without normalisation or chunking (e.g. MusicGen's 32 kHz codec); otherwise use
    `encode_frames`, which also returns the per-chunk scales.
    """
    self._check_plain('encode')
    self._check_audio(audio_bcn)
    return self._encode_chunk(params, audio_bcn, self._check_n_q(n_q))[0]

  def decode(self, params: Mapping[str, Any], codes_bkt: jax.Array) -> jax.Array:
    """Codes [B, K, T] (K <= num_codebooks; the first K codebooks) -> audio [B, C_audio, T * hop]."""
    self._check_plain('decode')
    self._check_codes(codes_bkt, 3)
    return self._decode_chunk(params, codes_bkt, None)

  def _check_plain(self, what: str) -> None:
    if self.config.normalize or self.config.chunk_length is not None:
      raise ValueError(f'{what}: this codec normalises and/or chunks its input (normalize='
                       f'{self.config.normalize}, chunk_length_s={self.config.chunk_length_s}); use '
                       f'{what}_frames, which carries the per-chunk scales')

  def _chunk_plan(self, n: int) -> tuple[int, list[tuple[int, int]]]:
    """(stride, [(offset, length)]) of the chunks HF cuts from N samples."""
    chunk, stride = self.config.chunk_length, self.config.chunk_stride
    if chunk is None:
      return n, [(0, n)]
    plan = [(o, min(chunk, n - o)) for o in range(0, n, stride)]
    hop = self.config.hop_length
    frames = [-(-length // hop) for _, length in plan]
    if any(f != frames[0] for f in frames[:-1]):
      raise ValueError(f'{n} samples cut into chunks of {chunk} every {stride} leave more than one '
                       'partial chunk; pad or trim the audio so only the last chunk is short')
    return stride, plan

  def encode_frames(self, params: Mapping[str, Any], audio_bcn: jax.Array,
                    n_q: int | None = None) -> EncodedFrames:
    """Audio [B, C_audio, N] -> EncodedFrames (codes [F, B, n_q, Tf]) following HF's chunked encode.

    Chunks of config.chunk_length samples every config.chunk_stride (one chunk when unset) are each
    normalised (when config.normalize) and encoded; the last chunk's codes are zero-padded to Tf.
    """
    self._check_audio(audio_bcn)
    n_q = self._check_n_q(n_q)
    b = audio_bcn.shape[0]
    _, plan = self._chunk_plan(audio_bcn.shape[-1])
    chunk = plan[0][1]
    full = [o for o, length in plan if length == chunk]
    # All full-length chunks go through the encoder as one batch.
    x_fbcn = jnp.stack([audio_bcn[..., o:o + chunk] for o in full])
    codes, scale = self._encode_chunk(params, x_fbcn.reshape((-1,) + x_fbcn.shape[2:]), n_q)
    codes_list = list(codes.reshape((len(full), b) + codes.shape[1:]))
    scales_list = [None] * len(full) if scale is None else list(scale.reshape(len(full), b))
    for o, length in plan[len(full):]:
      c, s = self._encode_chunk(params, audio_bcn[..., o:o + length], n_q)
      codes_list.append(c)
      scales_list.append(s)
    pad = codes_list[0].shape[-1] - codes_list[-1].shape[-1]
    codes_list[-1] = jnp.pad(codes_list[-1], ((0, 0), (0, 0), (0, pad)))
    scales = None if scales_list[0] is None else jnp.stack(scales_list)
    return EncodedFrames(jnp.stack(codes_list), scales, pad)

  def decode_frames(self, params: Mapping[str, Any], frames: EncodedFrames) -> jax.Array:
    """EncodedFrames -> audio [B, C_audio, N']: decode each chunk, rescale, linear overlap-add (as HF)."""
    codes, scales, pad = frames.codes, frames.scales, frames.last_frame_pad_length
    self._check_codes(codes, 4)
    n_frames, b = codes.shape[:2]
    if self.config.chunk_length is None and n_frames != 1:
      raise ValueError(f'this codec does not chunk, so codes must hold one frame; got F={n_frames}')
    if not 0 <= pad < codes.shape[-1]:
      raise ValueError(f'last_frame_pad_length={pad} must be in [0, {codes.shape[-1]})')
    if scales is not None and scales.shape != (n_frames, b):
      raise ValueError(f'scales must be [F, B] = {(n_frames, b)}; got {tuple(scales.shape)}')
    outs = []
    if n_frames > 1:  # every frame but the last has full length: one batched decoder call
      head = codes[:-1].reshape((-1,) + codes.shape[2:])
      s = None if scales is None else scales[:-1].reshape(-1)
      audio = self._decode_chunk(params, head, s)
      outs = list(audio.reshape((n_frames - 1, b) + audio.shape[1:]))
    last = codes[-1][..., :codes.shape[-1] - pad]
    outs.append(self._decode_chunk(params, last, None if scales is None else scales[-1]))
    if n_frames == 1:
      return outs[0]
    stride = self.config.chunk_stride or 1
    weight, sum_w = seanet.overlap_add_weights([o.shape[-1] for o in outs], stride)
    out = jnp.zeros(outs[0].shape[:2] + sum_w.shape, outs[0].dtype)
    for i, frame in enumerate(outs):
      n = frame.shape[-1]
      out = out.at[..., i * stride:i * stride + n].add(weight[:n] * frame)
    return out / sum_w

"""Melody conditioning: the chromagram with an argmax bottleneck (MusicGen paper, section 2.3).

    audio [B, N] at 32 kHz -> STFT (n_fft 2^14, hop 4096, periodic Hann, centred with reflect padding)
    -> power spectrum / sum(window^2) -> 12-bin chroma filter bank -> divide each frame by its max
    -> one-hot of the argmax pitch class per frame.

This reproduces `transformers.MusicgenMelodyFeatureExtractor` (torchaudio `Spectrogram(power=2,
normalized=True, center=True)` + librosa's chroma filters with tuning 0), including its zero padding
of clips shorter than n_fft (split evenly, the odd sample on the right) and its frame count
1 + max(N, n_fft) // hop. Differences, by design: the extractor also truncates clips to 30 s and
resamples with torchaudio's sinc filter; here `melody_condition` resamples with scipy's polyphase
filter (`audio.resample`) and fits the chroma to the caller's number of frames.

The null melody condition (`null_chroma`: every frame one-hot on C) is what the released
MusicGen-Melody models see without a melody and as the unconditional half of classifier-free guidance
(transformers' MusicgenMelodyForConditionalGeneration builds the same); it is also what the extractor
gives for silence. The sampler, the pipeline and `melody_condition` (for a silent melody) all use it.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

_log = logging.getLogger(__name__)

NULL_PITCH_CLASS = 0  # C


def null_chroma(batch: int, frames: int, num_chroma: int = 12) -> np.ndarray:
  """The null melody condition: float32 [batch, frames, num_chroma], every frame one-hot on C."""
  chroma = np.zeros((batch, frames, num_chroma), np.float32)
  chroma[..., NULL_PITCH_CLASS] = 1.0
  return chroma


def chroma_filter_bank(sr: int, n_fft: int, n_chroma: int = 12, tuning: float = 0.0,
                       center_octave: float = 5.0, octave_width: float = 2.0,
                       norm: float | None = 2.0, base_c: bool = True) -> np.ndarray:
  """Librosa-style chroma filter bank, float64 [n_chroma, n_fft // 2 + 1].

  Every FFT bin k > 0 sits at a fractional pitch p_k = n_chroma * log2(f_k / (A440 / 16)) (A440 moved
  by `tuning` fractions of a chroma bin); bin 0 is placed 1.5 octaves below bin 1. Row c of the bank
  is a Gaussian bump over the circular distance between p_k and pitch class c, its width the bin's
  spacing in pitch (at least one pitch class); each column is normalised to unit `norm` norm (None:
  no normalisation), then weighted by a Gaussian over octaves centred on `center_octave` with
  half-width `octave_width`. `base_c` rotates the rows so row 0 is C (otherwise A).
  """
  if sr <= 0 or n_fft < 2 or n_chroma < 1:
    raise ValueError(f"chroma_filter_bank needs sr > 0, n_fft >= 2, n_chroma >= 1; "
                     f"got sr={sr}, n_fft={n_fft}, n_chroma={n_chroma}")
  a440 = 440.0 * 2.0 ** (tuning / n_chroma)
  freqs = np.arange(1, n_fft, dtype=np.float64) * (sr / n_fft)  # all bins but DC, up to sr
  pitch = n_chroma * np.log2(freqs / (a440 / 16.0))
  pitch = np.concatenate([[pitch[0] - 1.5 * n_chroma], pitch])  # [n_fft]
  width = np.append(np.maximum(np.diff(pitch), 1.0), 1.0)  # [n_fft]
  half = float(np.round(n_chroma / 2.0))
  # Signed circular distance from each bin's pitch to each pitch class, in (-half, n_chroma - half].
  dist_cf = pitch[None, :] - np.arange(n_chroma, dtype=np.float64)[:, None]
  dist_cf = np.mod(dist_cf + half + 10 * n_chroma, n_chroma) - half
  bank_cf = np.exp(-0.5 * np.square(2.0 * dist_cf / width[None, :]))
  if norm is not None:
    bank_cf = bank_cf / np.sum(bank_cf ** norm, axis=0, keepdims=True) ** (1.0 / norm)
  bank_cf = bank_cf * np.exp(-0.5 * np.square((pitch / n_chroma - center_octave) / octave_width))[None]
  if base_c:
    bank_cf = np.roll(bank_cf, -3 * (n_chroma // 12), axis=0)
  return np.ascontiguousarray(bank_cf[:, : n_fft // 2 + 1])


def num_chroma_frames(num_samples: int, n_fft: int = 16384, hop: int = 4096) -> int:
  """Frames `chromagram` returns for `num_samples` samples: 1 + max(N, n_fft) // hop."""
  return 1 + max(int(num_samples), n_fft) // hop


def chromagram(audio: jax.Array, sample_rate: int = 32000, n_fft: int = 16384, hop: int = 4096,
               argmax: bool = True, n_chroma: int = 12, eps: float = 1e-6) -> jax.Array:
  """Chroma features of mono audio [B, N] at `sample_rate` -> float32 [B, frames, n_chroma].

  frames = 1 + max(N, n_fft) // hop. With `argmax` each frame is the one-hot of its loudest pitch
  class (C = 0); otherwise the chroma divided by its per-frame maximum (floored at `eps`).
  Jittable; all arguments but `audio` are static.
  """
  audio_bn = jnp.asarray(audio, jnp.float32)
  if audio_bn.ndim != 2:
    raise ValueError(f"chromagram expects mono audio [B, N], got shape {audio_bn.shape}; "
                     "mix down channels first")
  n = audio_bn.shape[-1]
  if n < n_fft:  # Too short for one window: zero-pad, the odd sample going to the right.
    left = (n_fft - n) // 2
    audio_bn = jnp.pad(audio_bn, ((0, 0), (left, n_fft - n - left)))
  frames = num_chroma_frames(n, n_fft, hop)
  # Centred frames: reflect-pad by half a window (mirror without repeating the edge sample).
  padded_bn = jnp.pad(audio_bn, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
  starts_t = jnp.arange(frames, dtype=jnp.int32) * hop
  frames_btw = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(padded_bn, s, n_fft, axis=1),
                        out_axes=1)(starts_t)
  window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
  spec_btf = jnp.abs(jnp.fft.rfft(frames_btw * window.astype(np.float32), axis=-1)) ** 2
  spec_btf = spec_btf / np.float32(np.sum(window ** 2))
  bank_cf = chroma_filter_bank(sample_rate, n_fft, n_chroma).astype(np.float32)
  raw_btc = jnp.einsum("btf,cf->btc", spec_btf, bank_cf, precision=jax.lax.Precision.HIGHEST)
  chroma_btc = raw_btc / jnp.maximum(jnp.max(jnp.abs(raw_btc), axis=-1, keepdims=True), eps)
  if argmax:
    chroma_btc = jax.nn.one_hot(jnp.argmax(chroma_btc, axis=-1), n_chroma, dtype=jnp.float32)
  return chroma_btc


def melody_condition(audio: np.ndarray, sr: int, target_frames: int, sample_rate: int = 32000,
                     n_fft: int = 16384, hop: int = 4096, silence_db: float = -60.0) -> np.ndarray:
  """A melody clip -> the one-hot chroma condition float32 [target_frames, 12].

  `audio` [C, N] (or [N]) at `sr` is mixed down to mono (channel mean), resampled to `sample_rate`,
  turned into the argmax chromagram, then tiled (repeated from the start) or cut to `target_frames`.
  A melody whose RMS is below `silence_db` dBFS logs a warning and gives `null_chroma`, the condition
  of no melody.
  """
  from musicgen_jax import audio as audio_lib
  audio = np.asarray(audio, np.float32)
  if audio.ndim == 1:
    audio = audio[None]
  if audio.ndim != 2 or audio.shape[-1] == 0:
    raise ValueError(f"melody audio must be [C, N] or [N] with N > 0, got shape {audio.shape}")
  if int(target_frames) < 1:
    raise ValueError(f"target_frames must be >= 1, got {target_frames}")
  mono_1n = audio_lib.resample(audio_lib.to_channels(audio, 1), sr, sample_rate)
  if audio_lib.is_silent(mono_1n, silence_db):
    _log.warning("melody is silent (below %.0f dBFS); using the null melody condition", silence_db)
    return null_chroma(1, int(target_frames))[0]
  chroma_tc = np.asarray(chromagram(mono_1n, sample_rate, n_fft, hop, argmax=True))[0]
  reps = -(-int(target_frames) // chroma_tc.shape[0])
  return np.tile(chroma_tc, (reps, 1))[: int(target_frames)]

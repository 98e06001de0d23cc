"""Reconstruction losses and metrics of codec training (audiocraft's EnCodec recipe), per example.

Waveforms are [B, C, N] (batch, channels, samples). Every function returns one value per example [B]
so that training takes the batch mean and evaluation can weight padded examples out.

  l1(est, ref)                       mean |est - ref|
  multiscale_mel(est, ref, spec)     audiocraft's MultiScaleMelSpectrogramLoss (msspec): for each
                                     scale 2^i, i in [range_start, range_end): L1 between linear
                                     mel spectrograms + alpha_i * MSE between log10(floor + mel)
                                     ones; divided by sum(alpha_i + 1) when `normalized`
  si_snr(est, ref)                   scale-invariant SNR in dB over the whole signal (higher is
                                     better; audiocraft's SISNR loss is its negative)

The STFT is computed here in jnp (frames -> periodic Hann window -> rfft); the mel filters are
librosa's HTK filters without area normalisation (torchaudio's MelSpectrogram defaults, which
audiocraft uses), built once per geometry as numpy constants.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class MelSpec:
  """Geometry of the multi-scale mel loss (audiocraft's `msspec` config, whose values are the
  defaults)."""
  sample_rate: int
  range_start: int = 6            # first scale: n_fft = 2**6 = 64
  range_end: int = 11             # last scale: n_fft = 2**10 = 1024
  n_mels: int = 64
  f_min: float = 64.0
  f_max: float | None = None      # None: sample_rate / 2
  normalized: bool = True         # spectrogram / sum(window^2), and the loss / sum(alpha + 1)
  alphas: bool = False            # weight the log term of scale 2^i by sqrt(2^i - 1) (else 1)
  floor_level: float = 1e-5

  def __post_init__(self):
    if not 1 <= self.range_start < self.range_end:
      raise ValueError(f'msspec range [{self.range_start}, {self.range_end}) must hold at least '
                       'one scale with range_start >= 1')
    if self.n_mels < 1 or self.sample_rate < 1:
      raise ValueError(f'msspec needs n_mels >= 1 and sample_rate >= 1; got {self.n_mels}, '
                       f'{self.sample_rate}')

  @property
  def scales(self) -> tuple[int, ...]:
    return tuple(2**i for i in range(self.range_start, self.range_end))

  def alpha(self, n_fft: int) -> float:
    return math.sqrt(n_fft - 1) if self.alphas else 1.0


# -------------------------------------------------------------------------------------------- STFT


@functools.lru_cache(maxsize=None)
def hann_window(win_length: int, n_fft: int) -> np.ndarray:
  """Periodic Hann window of win_length, zero-padded to n_fft on both sides (as torch.stft)."""
  w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(win_length) / win_length)
  left = (n_fft - win_length) // 2
  return np.pad(w, (left, n_fft - win_length - left)).astype(np.float32)


def frames(x: jax.Array, n_fft: int, hop: int) -> jax.Array:
  """Frames of the last axis without padding: [..., N] -> [..., 1 + (N - n_fft) // hop, n_fft]."""
  n = x.shape[-1]
  if n < n_fft:
    raise ValueError(f'a signal of {n} samples is shorter than one STFT frame ({n_fft}): use '
                     'longer segments or smaller FFT sizes')
  count = 1 + (n - n_fft) // hop
  if n_fft % hop == 0:
    # n_fft / hop shifted reshapes instead of a gather: cheap to differentiate on every backend.
    parts = []
    for r in range(n_fft // hop):
      seg = x[..., r * hop:r * hop + count * hop]
      parts.append(seg.reshape(x.shape[:-1] + (count, hop)))
    return jnp.concatenate(parts, axis=-1)
  idx = hop * np.arange(count)[:, None] + np.arange(n_fft)[None, :]
  return x[..., idx]


def stft(x: jax.Array, n_fft: int, hop: int, win_length: int | None = None,
         normalized: bool = False) -> jax.Array:
  """Complex STFT without centring: [..., N] -> [..., frames, n_fft // 2 + 1] (complex64).

  Periodic Hann window; `normalized` divides by sqrt(sum(window^2)) (torchaudio's Spectrogram with
  normalized=True; torch.stft's own `normalized` divides by sqrt(n_fft) instead).
  """
  window = hann_window(win_length or n_fft, n_fft)
  spec = jnp.fft.rfft(frames(x.astype(jnp.float32), n_fft, hop) * window, axis=-1)
  if normalized:
    spec = spec / np.float32(np.sqrt(np.sum(window.astype(np.float64)**2)))
  return spec


# --------------------------------------------------------------------------------------------- mel


@functools.lru_cache(maxsize=None)
def mel_filters(sample_rate: int, n_fft: int, n_mels: int, f_min: float,
                f_max: float | None) -> np.ndarray:
  """[n_fft // 2 + 1, n_mels] triangular HTK-mel filters, unnormalised (torchaudio's defaults)."""
  import librosa
  with warnings.catch_warnings():  # small FFTs leave some mel bands empty, as in audiocraft
    warnings.simplefilter('ignore')
    fb = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min,
                             fmax=f_max if f_max is not None else sample_rate / 2.0, htk=True,
                             norm=None)
  return np.ascontiguousarray(fb.T.astype(np.float32))


def pad_for_frames(x: jax.Array, n_fft: int, hop: int) -> jax.Array:
  """Zero-pads the end of [..., N] so that the last STFT frame is full (ceil of the frame count)."""
  n = x.shape[-1]
  count = math.ceil((n - n_fft) / hop) + 1
  extra = (count - 1) * hop + n_fft - n
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, max(extra, 0))])


def mel_spectrogram(x_bcn: jax.Array, spec: MelSpec, n_fft: int) -> jax.Array:
  """Linear mel power spectrogram of audio [B, C, N] at one scale -> [B, C, frames, n_mels].

  As audiocraft's MelSpectrogramWrapper: reflect padding of (n_fft - hop) // 2 on both sides, zeros
  to a full last frame, window = n_fft, hop = n_fft // 4, power 2, no centring.
  """
  hop = n_fft // 4
  p = (n_fft - hop) // 2
  x = jnp.pad(x_bcn.astype(jnp.float32), ((0, 0), (0, 0), (p, p)), mode='reflect')
  x = pad_for_frames(x, n_fft, hop)
  power = jnp.abs(stft(x, n_fft, hop, normalized=spec.normalized))**2
  fb = mel_filters(spec.sample_rate, n_fft, spec.n_mels, float(spec.f_min), spec.f_max)
  return jnp.einsum('bctf,fm->bctm', power, fb, precision=jax.lax.Precision.HIGHEST)


def multiscale_mel(est_bcn: jax.Array, ref_bcn: jax.Array, spec: MelSpec) -> jax.Array:
  """audiocraft's msspec loss per example [B]: the sum over scales of L1(mel) + alpha * MSE(log10
  mel)."""
  _check_pair(est_bcn, ref_bcn)
  total = jnp.zeros(est_bcn.shape[:1], jnp.float32)
  for n_fft in spec.scales:
    m_est, m_ref = mel_spectrogram(est_bcn, spec, n_fft), mel_spectrogram(ref_bcn, spec, n_fft)
    l_est = jnp.log10(spec.floor_level + m_est)
    l_ref = jnp.log10(spec.floor_level + m_ref)
    total = total + jnp.mean(jnp.abs(m_est - m_ref), axis=(1, 2, 3))
    total = total + spec.alpha(n_fft) * jnp.mean((l_est - l_ref)**2, axis=(1, 2, 3))
  if spec.normalized:
    total = total / sum(spec.alpha(n) + 1.0 for n in spec.scales)
  return total


# ---------------------------------------------------------------------------------- waveform terms


def _check_pair(est: jax.Array, ref: jax.Array) -> None:
  if est.shape != ref.shape or est.ndim != 3:
    raise ValueError(f'estimate and reference must both be [B, C, N]; got {tuple(est.shape)} and '
                     f'{tuple(ref.shape)}')


def l1(est_bcn: jax.Array, ref_bcn: jax.Array) -> jax.Array:
  """Mean absolute error per example [B]."""
  _check_pair(est_bcn, ref_bcn)
  return jnp.mean(jnp.abs(est_bcn.astype(jnp.float32) - ref_bcn.astype(jnp.float32)), axis=(1, 2))


def si_snr(est_bcn: jax.Array, ref_bcn: jax.Array) -> jax.Array:
  """Scale-invariant signal-to-noise ratio in dB per example [B] (mean over channels).

  Both signals centred; s = <est, ref> / |ref|^2 * ref, e = est - s; 10 log10(|s|^2 / |e|^2), with
  float32 eps * N added to every energy (audiocraft's epsilon, proportional to the length).
  """
  _check_pair(est_bcn, ref_bcn)
  est = est_bcn.astype(jnp.float32)
  ref = ref_bcn.astype(jnp.float32)
  eps = float(np.finfo(np.float32).eps) * est.shape[-1]
  est = est - jnp.mean(est, axis=-1, keepdims=True)
  ref = ref - jnp.mean(ref, axis=-1, keepdims=True)
  dot = jnp.sum(est * ref, axis=-1, keepdims=True)
  proj = dot * ref / (eps + jnp.sum(ref**2, axis=-1, keepdims=True))
  noise = est - proj
  ratio = (jnp.log10(eps + jnp.sum(proj**2, axis=-1)) - jnp.log10(eps + jnp.sum(noise**2, axis=-1)))
  return jnp.mean(10.0 * ratio, axis=-1)


def spectral_flatness(x_bcn: jax.Array, n_fft: int = 2048, hop: int = 512,
                      amin: float = 1e-10) -> jax.Array:
  """librosa's spectral flatness (power spectrum, uncentred frames) averaged over channels and
  frames -> [B]: the geometric over the arithmetic mean of each frame's power bins, near 0 for
  tones and 1 for white noise. A reconstruction-only codec's noise floor shows as a flatness many
  times the real audio's (models/demo/TRAINING.md); the adversarial losses bring it down."""
  power = jnp.maximum(jnp.abs(stft(x_bcn, n_fft, hop))**2, amin)     # [B, C, frames, bins]
  flat = jnp.exp(jnp.mean(jnp.log(power), axis=-1)) / jnp.mean(power, axis=-1)
  return jnp.mean(flat, axis=(1, 2))


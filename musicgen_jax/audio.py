"""Audio I/O, resampling and channel handling (host side, numpy).

Arrays are channels-first: audio is float32 [C, N] in [-1, 1] at a stated sample rate.
"""
from __future__ import annotations

import math
import os
from typing import Union

import numpy as np
import soundfile as sf

PathLike = Union[str, os.PathLike]


class AudioError(ValueError):
  """An audio file that does not exist or cannot be decoded."""


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def read_audio(path: PathLike) -> tuple[np.ndarray, int]:
  """Reads any format libsndfile decodes (WAV, FLAC, OGG, MP3 with recent libsndfile, ...).

  Returns (audio float32 [C, N] in [-1, 1], sample_rate). Raises AudioError (a ValueError) with one
  line naming the file and the reason when the file is missing, cannot be decoded, holds no
  samples or holds NaN or infinite ones (a float WAV can).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise AudioError(f"cannot read audio file {path!r}: no such file; check the path")
  if os.path.isdir(path):
    raise AudioError(f"cannot read audio file {path!r}: it is a directory, not an audio file")
  try:
    data_nc, sample_rate = sf.read(path, dtype="float32", always_2d=True)
  except Exception as e:  # libsndfile raises LibsndfileError / RuntimeError / TypeError by format.
    raise AudioError(f"cannot decode audio file {path!r}: {_one_line(e)}") from e
  if data_nc.size == 0:
    raise AudioError(f"audio file {path!r} holds no samples: give a file with sound in it")
  if not np.isfinite(data_nc).all():
    raise AudioError(f"audio file {path!r} contains NaN or infinite samples: it is damaged; "
                     "export it again")
  return np.ascontiguousarray(data_nc.T), int(sample_rate)


def write_wav(path: PathLike, audio: np.ndarray, sample_rate: int) -> None:
  """Writes audio [C, N] (or mono [N]) as a 16-bit PCM WAV file, creating parent folders.

  Samples are clipped to [-1, 1] and scaled by 2^15 (the scale libsndfile divides by on reading),
  rounded to the nearest integer and saturated at 32767, so a write/read round trip is exact to
  half a quantisation step (full scale +1.0 is stored as 32767/32768).
  """
  audio = np.asarray(audio, dtype=np.float32)
  if audio.ndim == 1:
    audio = audio[None]
  if audio.ndim != 2:
    raise ValueError(f"write_wav expects audio [C, N] or [N], got shape {audio.shape}")
  if not np.all(np.isfinite(audio)):
    raise ValueError(f"audio for {os.fspath(path)!r} contains NaN or inf; refusing to write it")
  if int(sample_rate) <= 0:
    raise ValueError(f"sample_rate must be a positive integer, got {sample_rate}")
  pcm_cn = np.clip(np.round(np.clip(audio, -1.0, 1.0) * 32768.0), -32768, 32767).astype(np.int16)
  parent = os.path.dirname(os.path.abspath(os.fspath(path)))
  os.makedirs(parent, exist_ok=True)
  sf.write(os.fspath(path), pcm_cn.T, int(sample_rate), subtype="PCM_16", format="WAV")


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
  """Polyphase resampling along the last axis: [..., N] at sr_in -> [..., ceil(N * sr_out / sr_in)].

  Uses scipy.signal.resample_poly with the gcd-reduced ratio (its default Kaiser-windowed FIR);
  returns the input unchanged (as float32) when the rates are equal.
  """
  sr_in, sr_out = int(sr_in), int(sr_out)
  if sr_in <= 0 or sr_out <= 0:
    raise ValueError(f"sample rates must be positive integers, got {sr_in} -> {sr_out}")
  audio = np.asarray(audio, dtype=np.float32)
  if sr_in == sr_out:
    return audio
  g = math.gcd(sr_in, sr_out)
  import scipy.signal   # 1.5 s to import on a small CPU: only when audio is resampled
  out = scipy.signal.resample_poly(audio, sr_out // g, sr_in // g, axis=-1)
  return out.astype(np.float32)


def to_channels(audio: np.ndarray, channels: int) -> np.ndarray:
  """[C, N] -> [channels, N]: unchanged when C == channels, mean mix-down to mono, or mono duplicated
  to stereo. Any other conversion raises ValueError."""
  audio = np.asarray(audio, dtype=np.float32)
  if audio.ndim != 2:
    raise ValueError(f"to_channels expects audio [C, N], got shape {audio.shape}")
  c = audio.shape[0]
  if c == channels:
    return audio
  if channels == 1:
    return audio.mean(axis=0, keepdims=True)
  if c == 1 and channels == 2:
    return np.repeat(audio, 2, axis=0)
  raise ValueError(f"cannot convert {c}-channel audio to {channels} channels; "
                   "only mono mix-down and mono -> stereo are supported")


def is_silent(audio: np.ndarray, threshold_db: float = -60.0) -> bool:
  """True when the RMS over all samples is below `threshold_db` dB full scale (empty audio is silent)."""
  audio = np.asarray(audio, dtype=np.float64)
  if audio.size == 0:
    return True
  rms = float(np.sqrt(np.mean(np.square(audio))))
  return rms < 10.0 ** (threshold_db / 20.0)

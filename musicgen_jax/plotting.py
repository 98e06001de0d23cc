"""Spectrogram pictures of generated audio, written as PNG with numpy and zlib only (no plotting library).

One image per WAV: log-magnitude STFT (dB, clipped to the top 80 dB), low frequencies at the bottom, one
band per channel stacked vertically, coloured with a perceptually ordered dark-blue -> yellow ramp.
"""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
from scipy import signal

# Anchor colours of the ramp (dark blue, purple, teal, green, yellow), interpolated linearly.
_RAMP = np.array([[40, 11, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                 np.float64)


def spectrogram_db(audio_n: np.ndarray, sample_rate: int, n_fft: int = 1024,
                   hop: int = 256) -> np.ndarray:
  """Log-magnitude spectrogram [freq, frames] in dB relative to the maximum, clipped at -80 dB."""
  _, _, z = signal.stft(np.asarray(audio_n, np.float64), fs=sample_rate, nperseg=n_fft,
                        noverlap=n_fft - hop, boundary=None, padded=True)
  mag = np.abs(z)
  db = 20.0 * np.log10(np.maximum(mag, 1e-10))
  db -= db.max()
  return np.maximum(db, -80.0)


def colorize(values: np.ndarray) -> np.ndarray:
  """Values in [0, 1] [H, W] -> uint8 RGB [H, W, 3] along the ramp."""
  x = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
  lo = np.floor(x).astype(int)
  hi = np.minimum(lo + 1, len(_RAMP) - 1)
  w = (x - lo)[..., None]
  return np.round(_RAMP[lo] * (1 - w) + _RAMP[hi] * w).astype(np.uint8)


def write_png(path: str, rgb: np.ndarray) -> None:
  """Writes uint8 RGB [H, W, 3] as an 8-bit truecolour PNG."""
  rgb = np.ascontiguousarray(rgb, np.uint8)
  h, w, _ = rgb.shape
  raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))   # filter type 0 on every row

  def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
         + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(png)


def spectrogram_png(path: str, audio: np.ndarray, sample_rate: int, max_width: int = 1200) -> None:
  """Spectrogram image of audio [C, N] (or [N]): one band per channel, low frequencies at the bottom."""
  audio = np.asarray(audio, np.float32)
  if audio.ndim == 1:
    audio = audio[None]
  bands = []
  for channel in audio:
    db = spectrogram_db(channel, sample_rate)
    if db.shape[1] > max_width:   # average neighbouring frames so long clips stay a readable size
      step = int(np.ceil(db.shape[1] / max_width))
      cut = db.shape[1] // step * step
      db = db[:, :cut].reshape(db.shape[0], -1, step).mean(-1)
    bands.append(colorize(1.0 + db[::-1] / 80.0))
  separator = np.full((2, bands[0].shape[1], 3), 255, np.uint8)
  rows = [bands[0]]
  for band in bands[1:]:
    rows += [separator, band]
  write_png(path, np.concatenate(rows, axis=0))

"""Spectrogram PNGs: a valid PNG whose bright row sits at the frequency of a test tone."""
from __future__ import annotations

import struct
import zlib

import numpy as np

from musicgen_jax import plotting


def read_png(path):
  """Minimal reader for the files write_png makes (8-bit RGB, filter 0): -> uint8 [H, W, 3]."""
  data = open(path, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  pos, idat, size = 8, b"", None
  while pos < len(data):
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
    (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
    assert crc == zlib.crc32(tag + body)
    if tag == b"IHDR":
      size = struct.unpack(">II", body[:8])
      assert body[8:10] == b"\x08\x02"
    elif tag == b"IDAT":
      idat += body
    pos += 12 + length
  w, h = size
  rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
  assert (rows[:, 0] == 0).all()
  return rows[:, 1:].reshape(h, w, 3)


def test_tone_lands_on_its_frequency_row(tmp_path):
  sr, f0 = 16000, 2000.0
  t = np.arange(sr) / sr
  left = 0.5 * np.sin(2 * np.pi * f0 * t)
  right = 0.5 * np.sin(2 * np.pi * 2 * f0 * t)
  path = str(tmp_path / "s.png")
  plotting.spectrogram_png(path, np.stack([left, right]), sr)
  img = read_png(path).astype(float)
  n_bins = 1024 // 2 + 1
  assert img.shape[0] == 2 * n_bins + 2          # two channel bands and a separator
  brightness = img.sum(-1).mean(1)
  top = np.argmax(brightness[:n_bins])           # row 0 is the highest frequency
  bin_hz = sr / 1024
  assert abs((n_bins - 1 - top) * bin_hz - f0) <= bin_hz
  low = np.argmax(brightness[n_bins + 2:])
  assert abs((n_bins - 1 - low) * bin_hz - 2 * f0) <= bin_hz


def test_long_audio_is_downsampled_in_width(tmp_path):
  sr = 8000
  audio = np.random.default_rng(0).standard_normal(sr * 60).astype(np.float32) * 0.1
  path = str(tmp_path / "long.png")
  plotting.spectrogram_png(path, audio, sr, max_width=300)
  assert read_png(path).shape[1] <= 300

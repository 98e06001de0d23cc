"""Spectrograms: the loudest bin of a tone sits at its frequency; the PNG is an image with one panel
per channel whose pixels are not blank."""
from __future__ import annotations

import numpy as np

from musicgen_jax import plotting


def test_tone_peaks_at_its_frequency():
  sr = 16000
  t = np.arange(sr) / sr
  for f0 in (440.0, 2000.0):
    db, freqs, times = plotting.spectrogram_db(0.5 * np.sin(2 * np.pi * f0 * t), sr)
    assert db.max() == 0.0 and db.min() >= plotting.FLOOR_DB
    peak = freqs[np.argmax(db.mean(axis=1))]
    assert abs(peak - f0) <= sr / plotting.N_FFT
    assert abs(times[-1] - 1.0) < 2 * plotting.HOP / sr


def test_png_has_a_panel_per_channel(tmp_path):
  import matplotlib.image as mpimg
  sr = 8000
  rng = np.random.default_rng(0)
  mono, stereo = str(tmp_path / "m.png"), str(tmp_path / "s.png")
  plotting.spectrogram_png(mono, 0.1 * rng.standard_normal(sr * 2), sr, title="noise")
  plotting.spectrogram_png(stereo, 0.1 * rng.standard_normal((2, sr * 2)), sr)
  a, b = mpimg.imread(mono), mpimg.imread(stereo)
  assert a.ndim == 3 and b.shape[0] > 1.6 * a.shape[0]     # the second channel adds a panel
  assert a[..., :3].std() > 0.1                            # not a blank picture


def test_spectrogram_equals_librosa_centred_stft():
  """The picture's spectrogram is librosa's centred STFT in dB (computed by matplotlib, whose Hann
  window is the symmetric one: a few hundredths of a dB apart), on the same frame times."""
  import librosa
  rng = np.random.default_rng(1)
  sr = 16000
  t = np.arange(int(1.3 * sr)) / sr
  x = (0.3 * np.sin(2 * np.pi * 330 * t) * np.exp(-2 * t) + 0.02 * rng.standard_normal(t.size))
  db, freqs, times = plotting.spectrogram_db(x, sr)
  mag = np.abs(librosa.stft(x.astype(np.float32), n_fft=plotting.N_FFT, hop_length=plotting.HOP))
  ref = librosa.amplitude_to_db(mag, ref=np.max, top_db=-plotting.FLOOR_DB)
  assert db.shape == ref.shape
  np.testing.assert_allclose(times, librosa.frames_to_time(np.arange(ref.shape[1]), sr=sr,
                                                           hop_length=plotting.HOP), atol=1e-9)
  np.testing.assert_allclose(freqs, librosa.fft_frequencies(sr=sr, n_fft=plotting.N_FFT))
  assert np.percentile(np.abs(db - ref), 99) < 0.5

"""Spectrogram pictures of audio (matplotlib, off-screen): what `sample.py --plot` and the listening
examples write beside each WAV.

One panel per channel: the log-magnitude STFT in dB relative to the loudest bin (clipped at -80 dB),
time in seconds across, frequency in Hz up (log scale from 32 Hz, where the notes of music sit),
with a colour bar and an optional title (the prompt).
"""
from __future__ import annotations

import os

import numpy as np

N_FFT, HOP = 2048, 512
FLOOR_DB = -80.0


def spectrogram_db(audio_n: np.ndarray, sample_rate: int, n_fft: int = N_FFT,
                   hop: int = HOP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """-> (dB [freq, frames] relative to the maximum, clipped at FLOOR_DB; bin frequencies in Hz;
  frame centres in s) of mono audio [N]: matplotlib's spectrogram (Hann window) of frames centred
  on every hop-th sample (the signal padded with n_fft / 2 zeros each side, as librosa centres its
  STFT). matplotlib's, not librosa's: importing librosa's STFT (scipy.signal, numba) took longer
  than drawing the picture, and sample.py --plot needs nothing else from it."""
  from matplotlib import mlab
  x = np.pad(np.asarray(audio_n, np.float64), n_fft // 2)
  mag, freqs, times = mlab.specgram(x, NFFT=n_fft, Fs=sample_rate, noverlap=n_fft - hop,
                                    window=mlab.window_hanning, mode="magnitude")
  db = 20.0 * np.log10(np.maximum(mag, 1e-10) / max(float(mag.max()), 1e-10))
  return np.maximum(db, FLOOR_DB), freqs, times - (n_fft // 2) / sample_rate


def spectrogram_png(path: str, audio: np.ndarray, sample_rate: int, title: str | None = None,
                    width_inches: float = 8.0) -> None:
  """Writes the spectrogram of audio [C, N] (or [N]) as a PNG at `path` (folders created)."""
  import matplotlib
  matplotlib.use("Agg", force=False)
  from matplotlib.figure import Figure
  audio = np.asarray(audio, np.float32)
  if audio.ndim == 1:
    audio = audio[None]
  fig = Figure(figsize=(width_inches, 2.6 * len(audio) + 0.6), dpi=100, layout="constrained")
  axes = fig.subplots(len(audio), 1, squeeze=False)[:, 0]
  image = None
  for c, (ax, channel) in enumerate(zip(axes, audio)):
    db, freqs, times = spectrogram_db(channel, sample_rate)
    step = max(1, db.shape[1] // 2000)          # at most 2000 columns however long the audio
    image = ax.pcolormesh(times[::step], freqs[1:], db[1:, ::step], shading="auto",
                          cmap="magma", vmin=FLOOR_DB, vmax=0.0, rasterized=True)
    ax.set_yscale("log")
    ax.set_ylim(32.0, sample_rate / 2)
    ax.set_ylabel("Hz" if len(audio) == 1 else f"channel {c}, Hz")
  axes[-1].set_xlabel("seconds")
  if title:
    axes[0].set_title(title, fontsize=9)
  fig.colorbar(image, ax=list(axes), label="dB")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)

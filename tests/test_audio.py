"""Audio I/O, resampling and channel helpers."""
from __future__ import annotations

import numpy as np
import pytest

from musicgen_jax import audio as audio_lib


def _sine(freq: float, sr: int, n: int, amp: float = 0.5) -> np.ndarray:
  return (amp * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


def test_wav_round_trip_within_one_lsb(tmp_path):
  rng = np.random.default_rng(0)
  x_cn = rng.uniform(-1.0, 1.0, size=(2, 4000)).astype(np.float32)
  x_cn[0, :4] = [1.0, -1.0, 0.0, 0.999]  # full scale on both sides
  path = tmp_path / "a" / "b" / "x.wav"  # parent folders are created
  audio_lib.write_wav(path, x_cn, 32000)
  y_cn, sr = audio_lib.read_audio(path)
  assert sr == 32000
  assert y_cn.dtype == np.float32 and y_cn.shape == (2, 4000)
  assert np.max(np.abs(y_cn - x_cn)) <= 1.0 / 32767


def test_write_wav_clips_and_accepts_mono(tmp_path):
  x_n = np.array([2.0, -3.0, 0.25], np.float32)
  audio_lib.write_wav(tmp_path / "m.wav", x_n, 16000)
  y_cn, sr = audio_lib.read_audio(tmp_path / "m.wav")
  assert sr == 16000 and y_cn.shape == (1, 3)
  np.testing.assert_allclose(y_cn[0], [32767 / 32768, -1.0, 0.25], atol=1e-7)
  with pytest.raises(ValueError, match="NaN"):
    audio_lib.write_wav(tmp_path / "bad.wav", np.array([np.nan], np.float32), 16000)


@pytest.mark.parametrize("sr_in,sr_out", [(44100, 32000), (32000, 48000), (16000, 32000)])
def test_resample_sine_keeps_frequency_and_length_ratio(sr_in, sr_out):
  freq, n = 440.0, sr_in // 2  # half a second
  y = audio_lib.resample(_sine(freq, sr_in, n)[None], sr_in, sr_out)
  assert y.dtype == np.float32
  assert y.shape == (1, int(np.ceil(n * sr_out / sr_in)))
  expected = _sine(freq, sr_out, y.shape[-1])
  edge = sr_out // 50  # ignore the filter's start/end transients (20 ms)
  err = np.max(np.abs(y[0, edge:-edge] - expected[edge:-edge]))
  assert err < 2e-3, err


def test_resample_identity_and_bad_rates():
  x = _sine(100.0, 8000, 800)
  np.testing.assert_array_equal(audio_lib.resample(x, 8000, 8000), x)
  with pytest.raises(ValueError, match="positive"):
    audio_lib.resample(x, 0, 8000)


def test_missing_file_error_names_file(tmp_path):
  path = tmp_path / "nope.wav"
  with pytest.raises(audio_lib.AudioError, match="nope.wav.*no such file") as e:
    audio_lib.read_audio(path)
  assert isinstance(e.value, ValueError)
  assert "\n" not in str(e.value)


def test_garbage_file_error_names_file(tmp_path):
  path = tmp_path / "garbage.wav"
  path.write_bytes(np.random.default_rng(1).bytes(2000))
  with pytest.raises(audio_lib.AudioError, match="cannot decode audio file.*garbage.wav") as e:
    audio_lib.read_audio(path)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("samples, message", [
    (np.full(320, np.nan, np.float32), "contains NaN or infinite samples"),
    (np.r_[np.zeros(100), np.inf].astype(np.float32), "contains NaN or infinite samples"),
    (np.zeros(0, np.float32), "holds no samples")])
def test_damaged_or_empty_float_file_is_refused(tmp_path, samples, message):
  import soundfile as sf
  path = tmp_path / "bad.wav"
  sf.write(path, samples, 32000, subtype="FLOAT")
  with pytest.raises(audio_lib.AudioError, match=message) as e:
    audio_lib.read_audio(path)
  assert "bad.wav" in str(e.value) and "\n" not in str(e.value)


def test_to_channels():
  mono = np.arange(6, dtype=np.float32).reshape(1, 6)
  stereo = np.stack([mono[0], -mono[0] + 2])
  np.testing.assert_array_equal(audio_lib.to_channels(mono, 2), np.concatenate([mono, mono]))
  np.testing.assert_allclose(audio_lib.to_channels(stereo, 1), np.ones((1, 6)))
  assert audio_lib.to_channels(stereo, 2) is not None
  with pytest.raises(ValueError, match="3-channel"):
    audio_lib.to_channels(np.zeros((3, 4), np.float32), 2)


def test_is_silent():
  assert audio_lib.is_silent(np.zeros((2, 100)))
  assert audio_lib.is_silent(np.full((1, 100), 1e-4))  # -80 dBFS
  assert not audio_lib.is_silent(np.full((1, 100), 1e-2))  # -40 dBFS
  assert audio_lib.is_silent(np.full((1, 100), 1e-2), threshold_db=-30)
  assert audio_lib.is_silent(np.zeros((1, 0)))

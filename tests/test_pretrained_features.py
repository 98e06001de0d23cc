"""Pretrained-model features of the pipeline against transformers: audio continuation, melody files,
long-form generation with a melody, and stereo (left/right interleaved) MusicGen.

Tiny random HF models (built as in tests/test_convert.py, never downloaded) are saved with save_pretrained,
converted with musicgen_jax.convert and loaded with MusicGen.load; everything runs on CPU in fp32.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from musicgen_jax import audio as audio_lib, convert, sampling  # noqa: E402
from musicgen_jax.pipeline import MusicGen  # noqa: E402
from tests.test_convert import CARD, K, ROOT, TEXTS, _hf_model, _tokenizer_json, fill_codebooks, hf_generate  # noqa: E402

GREEDY_CFG3 = sampling.SamplingSettings(top_k=1, cfg_coef=3.0)


def _convert(model, root) -> str:
  """save_pretrained + tokenizer.json + convert (codebooks filled, see fill_codebooks); -> our dir."""
  fill_codebooks(model)
  hf_dir, out_dir = str(root / "hf"), str(root / "ours")
  model.save_pretrained(hf_dir, safe_serialization=True)
  _tokenizer_json(os.path.join(hf_dir, "tokenizer.json"))
  assert convert.main([hf_dir, out_dir]) == 0
  return out_dir


@pytest.fixture(scope="module")
def mono(tmp_path_factory):
  """(HF MusicGen, our converted directory, MusicGen loaded from it)."""
  model = _hf_model(melody=False)
  out_dir = _convert(model, tmp_path_factory.mktemp("mono"))
  return model, out_dir, MusicGen.load(out_dir)


@pytest.fixture(scope="module")
def melody(tmp_path_factory):
  """(HF MusicGen-Melody, our converted directory, MusicGen loaded from it)."""
  model = _hf_model(melody=True)
  with torch.no_grad():  # a louder melody prefix and attention values, so greedy tokens depend on the melody
    model.audio_enc_to_dec_proj.weight.mul_(30.0)
    for name, p in model.decoder.named_parameters():
      if "self_attn.v_proj" in name or "self_attn.out_proj" in name:
        p.mul_(5.0)
  out_dir = _convert(model, tmp_path_factory.mktemp("melody"))
  return model, out_dir, MusicGen.load(out_dir)


def _hf_stereo():
  """A tiny stereo MusicGen: 8 decoder codebooks (L/R interleaved) over a mono 4-codebook EnCodec."""
  t = transformers
  torch.manual_seed(2)
  t5 = t.T5Config(vocab_size=32, d_model=24, d_kv=8, d_ff=48, num_layers=1, num_heads=3,
                  feed_forward_proj="relu")
  enc = t.EncodecConfig(target_bandwidths=[2.4], sampling_rate=1600, num_filters=4, num_residual_layers=1,
                        upsampling_ratios=[4, 4], codebook_size=CARD, codebook_dim=16, hidden_size=16,
                        num_lstm_layers=1, normalize=False, use_causal_conv=True)
  dec = t.MusicgenDecoderConfig(vocab_size=CARD, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                ffn_dim=64, num_codebooks=2 * K, audio_channels=2, max_position_embeddings=256,
                                pad_token_id=CARD, bos_token_id=CARD)
  model = t.MusicgenForConditionalGeneration(
      t.MusicgenConfig(text_encoder=t5, audio_encoder=enc, decoder=dec))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name or name.endswith("proj.bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.generation_config.decoder_start_token_id = CARD
  return model.eval()


@pytest.fixture(scope="module")
def stereo(tmp_path_factory):
  model = _hf_stereo()
  out_dir = _convert(model, tmp_path_factory.mktemp("stereo"))
  return model, out_dir, MusicGen.load(out_dir)


def _noise(path, seconds: float, sr: int, channels: int = 1) -> None:
  wav = np.random.default_rng(6).uniform(-0.9, 0.9, size=(channels, int(round(seconds * sr))))
  audio_lib.write_wav(path, wav.astype(np.float32), sr)


def _sine(path, freq: float, seconds: float, sr: int, channels: int = 1, amp: float = 0.5) -> None:
  t = np.arange(int(round(seconds * sr))) / sr
  wav = amp * np.sin(2 * np.pi * freq * t + np.arange(channels)[:, None])  # a phase offset per channel
  audio_lib.write_wav(path, wav.astype(np.float32), sr)


# --- 1. continuation ---------------------------------------------------------------------------------
PROMPT_FRAMES = 5
FILE_SR = 8000   # the prompt file's rate; the tiny codec runs at 1600 Hz, so it is resampled


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("prompt") / "prompt.wav")
  _noise(path, PROMPT_FRAMES / 100, FILE_SR)
  return path


def test_encode_audio_file_matches_hf_encodec(mono, prompt_wav):
  model, _, ours = mono
  codes = ours.encode_audio_file(prompt_wav)
  wav, sr = audio_lib.read_audio(prompt_wav)
  wav = audio_lib.resample(wav, sr, ours.codec.sample_rate)
  with torch.no_grad():
    ref = model.audio_encoder.encode(torch.tensor(wav[None])).audio_codes[0].numpy()
  assert codes.shape == (1, K, PROMPT_FRAMES) == ref.shape
  assert len(np.unique(codes)) > 8                                 # not a degenerate (all-equal) encoding
  np.testing.assert_array_equal(codes, ref)


def test_continuation_keeps_prompt_and_matches_hf(mono, prompt_wav):
  model, _, ours = mono
  prompt = np.repeat(ours.encode_audio_file(prompt_wav), len(TEXTS), axis=0)   # [B, K, Tp]
  wav, sr = audio_lib.read_audio(prompt_wav)
  wav = audio_lib.resample(wav, sr, ours.codec.sample_rate)
  # HF encodes `input_values` with the codec and continues from those codes (after a start step).
  new_tokens = 9
  codes_ref, audio_ref = hf_generate(model, ours, new_tokens,
                                      input_values=torch.tensor(np.repeat(wav[None], len(TEXTS), 0)))
  frames = PROMPT_FRAMES + 1 + new_tokens - K
  assert codes_ref.shape == (len(TEXTS), K, frames)
  np.testing.assert_array_equal(codes_ref[..., :PROMPT_FRAMES], prompt)
  codes = ours.generate(TEXTS, duration=(frames - 0.5) / ours.frame_rate, settings=GREEDY_CFG3,
                        prompt=prompt)
  np.testing.assert_array_equal(codes[..., :PROMPT_FRAMES], prompt)
  np.testing.assert_array_equal(codes, codes_ref)
  err = float(np.abs(ours.decode(codes) - audio_ref).max())
  print(f"continuation: max abs audio error {err:.2e}")
  assert err < 1e-4


# --- 2. melody files ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def a4_wav(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("melody_in") / "a4.wav")
  _sine(path, 440.0, 3.0, 22050, channels=2)
  return path


def test_melody_chroma_of_a4_is_pitch_class_a(melody, a4_wav):
  _, _, ours = melody
  chroma = ours.melody_chroma_file(a4_wav, batch=2)
  assert chroma.shape[0] == 2 and chroma.shape[2] == 12 and chroma.shape[1] >= 1
  np.testing.assert_array_equal(chroma.sum(-1), 1.0)
  hits = float(np.mean(chroma.argmax(-1) == 9))
  print(f"A4 chroma: {hits:.0%} of {chroma.shape[1]} frames on pitch class 9")
  assert hits >= 0.9


def test_silent_melody_gives_null_chroma_and_warns(melody, tmp_path, caplog):
  _, _, ours = melody
  path = str(tmp_path / "silence.wav")
  audio_lib.write_wav(path, np.zeros((1, 22050), np.float32), 22050)
  with caplog.at_level(logging.WARNING):
    chroma = ours.melody_chroma_file(path, batch=1)
  expect = np.zeros_like(chroma)
  expect[..., 0] = 1.0
  np.testing.assert_array_equal(chroma, expect)
  assert any("silent" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def _sample_cli(*args: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--noprogress", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_sample_cli_melody_matches_in_process(melody, a4_wav, tmp_path):
  _, out_dir, ours = melody
  tokens = str(tmp_path / "tokens.npy")
  duration = 0.07
  res = _sample_cli("--checkpoint", out_dir, "--melody", a4_wav, "--prompt", "x", "--top-k", "1",
                    "--cfg", "3", "--duration", str(duration), "--save-tokens", tokens)
  assert res.returncode == 0, res.stderr[-2000:]
  got = np.load(tokens)
  want = ours.generate(["x"], duration, GREEDY_CFG3, chroma=ours.melody_chroma_file(a4_wav, 1))
  assert got.shape == (1, K, 7)
  np.testing.assert_array_equal(got, want)
  # The melody matters: the null melody gives other tokens (otherwise this test could not fail).
  assert not np.array_equal(want, ours.generate(["x"], duration, GREEDY_CFG3))


def test_sample_cli_undecodable_melody_is_one_line(melody, tmp_path):
  _, out_dir, _ = melody
  bad = str(tmp_path / "garbage.wav")
  with open(bad, "wb") as f:
    f.write(np.random.default_rng(0).bytes(3000))
  res = _sample_cli("--checkpoint", out_dir, "--melody", bad, "--prompt", "x", "--duration", "0.05",
                    "--save-tokens", str(tmp_path / "t.npy"))
  assert res.returncode == 2, res.stderr[-2000:]
  assert "Traceback" not in res.stderr
  errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
  assert len(errors) == 1 and bad in errors[0] and errors[0].startswith("sample.py: error:"), res.stderr


# --- 3. long-form with a melody ----------------------------------------------------------------------
def test_melody_window_starts_at_the_right_frame(melody):
  _, _, ours = melody
  frames = 5
  idx = (np.arange(frames) * 5) % 12                              # frame i -> pitch class 5i mod 12
  chroma = np.eye(12, dtype=np.float32)[idx][None]                 # [1, F, 12]
  hop_s = 4096 / ours.sample_rate                                  # one chroma frame, in seconds
  length = ours.lm_cfg.chroma_length
  for start in range(2 * frames + 1):
    win = ours.melody_window(chroma, start * hop_s)
    assert win.shape == (1, length, 12)
    np.testing.assert_array_equal(win[0].argmax(-1), idx[(start + np.arange(length)) % frames])


def test_generate_long_with_melody(melody):
  _, out_dir, ours = melody
  config = ours.config.copy_and_resolve_references()
  config.model.max_positions = ours.prefix_length(config.text.max_length) + 40
  small = MusicGen(config, ours.params, ours.text, ours.codec)
  window = small.max_duration()
  frame_hop = 4096 / small.sample_rate
  chroma = np.eye(12, dtype=np.float32)[[0, 7, 2, 9, 4]][None]    # [1, 5, 12]
  seen = []
  generate = small.generate

  def record(texts, duration, settings, seed, prompt, chroma_arg, progress, **kwargs):
    seen.append((0 if prompt is None else prompt.shape[-1], chroma_arg))
    return generate(texts, duration, settings, seed, prompt, chroma_arg, progress, **kwargs)

  small.generate = record
  duration, stride = 3.0, 0.3
  codes = small.generate_long(["x"], duration, GREEDY_CFG3, chroma=chroma, stride=stride)
  assert codes.shape == (1, K, int(round(duration * small.frame_rate)))
  win = int(round(window * small.frame_rate))
  step = int(round(stride * small.frame_rate))
  assert len(seen) == 1 + -(-(codes.shape[-1] - win) // step) > 3
  starts = [i * step for i in range(len(seen))]
  first = []
  for (kept, chroma_arg), start in zip(seen, starts):
    assert kept == (0 if start == 0 else win - step)
    np.testing.assert_array_equal(chroma_arg, small.melody_window(chroma, start / small.frame_rate))
    first.append(int(chroma_arg[0, 0].argmax()))
  # Later windows start on later melody frames (2.56 s per chroma frame at this codec's rate).
  expect = [[0, 7, 2, 9, 4][int(round(s / small.frame_rate / frame_hop)) % 5] for s in starts]
  assert first == expect and len(set(first)) > 1, (first, starts)


# --- 4. stereo -----------------------------------------------------------------------------------------
def test_stereo_generation_and_decoding_match_hf(stereo):
  model, _, ours = stereo
  assert tuple(ours.config.pattern.delays) == (0, 0, 1, 1, 2, 2, 3, 3)
  assert ours.lm_cfg.num_codebooks == 2 * K and ours.codec.num_codebooks == K
  new_tokens = 10
  codes_ref, audio_ref = hf_generate(model, ours, new_tokens)
  frames = new_tokens + 1 - K
  assert codes_ref.shape == (len(TEXTS), 2 * K, frames)
  codes = ours.generate(TEXTS, duration=(frames - 0.5) / ours.frame_rate, settings=GREEDY_CFG3)
  np.testing.assert_array_equal(codes, codes_ref)
  audio = ours.decode(codes)
  assert audio.shape == audio_ref.shape and audio.shape[1] == 2
  err = float(np.abs(audio - audio_ref).max())
  print(f"stereo: max abs audio error {err:.2e}")
  assert err < 1e-4


def test_stereo_decode_splits_left_right_like_hf(stereo):
  model, _, ours = stereo
  codes = np.random.default_rng(4).integers(0, CARD, size=(2, 2 * K, 6)).astype(np.int32)
  with torch.no_grad():
    ref = [model.audio_encoder.decode(torch.tensor(codes[None, :, c::2]).long(), [None] * 2).audio_values
           for c in range(2)]
  ref = torch.cat(ref, dim=1).numpy()
  audio = ours.decode(codes)
  err = float(np.abs(audio - ref).max())
  print(f"stereo decode: max abs error {err:.2e}")
  assert audio.shape == ref.shape == (2, 2, 6 * 16) and err < 1e-4
  assert np.abs(audio[:, 0] - audio[:, 1]).max() > 1e-3              # left and right really differ


def test_stereo_encode_audio_file_interleaves_left_right(stereo, tmp_path):
  model, _, ours = stereo
  path = str(tmp_path / "stereo.wav")
  _noise(path, PROMPT_FRAMES / 100, FILE_SR, channels=2)
  codes = ours.encode_audio_file(path)
  wav, sr = audio_lib.read_audio(path)
  wav = audio_lib.resample(wav, sr, ours.codec.sample_rate)
  with torch.no_grad():
    left, right = (model.audio_encoder.encode(torch.tensor(wav[None, c:c + 1])).audio_codes[0].numpy()
                   for c in range(2))
  assert codes.shape == (1, 2 * K, PROMPT_FRAMES)
  np.testing.assert_array_equal(codes[:, 0::2], left)
  np.testing.assert_array_equal(codes[:, 1::2], right)

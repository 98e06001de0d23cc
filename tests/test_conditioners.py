"""Conditioners: tokenizer, learned text encoder, melody chroma, classifier-free-guidance dropout."""
from __future__ import annotations

import logging
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from musicgen_jax import sharding as shd
from musicgen_jax.conditioners import dropout, melody
from musicgen_jax.conditioners.text import LearnedTextConditioner
from musicgen_jax.conditioners.tokenizer import TextTokenizer

# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_byte_tokenizer_ids_padding_and_truncation(caplog):
  tok = TextTokenizer.from_file(None)
  assert tok.vocab_size == 259 and tok.pad_id == 0
  out = tok(["hé", "abc"])
  # UTF-8 bytes + 3, then eos = 1, right-padded with 0 to the longest.
  np.testing.assert_array_equal(out["input_ids"], [[ord("h") + 3, 0xC3 + 3, 0xA9 + 3, 1],
                                                   [97 + 3, 98 + 3, 99 + 3, 1]])
  assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
  np.testing.assert_array_equal(out["attention_mask"], np.ones((2, 4)))
  out = tok(["ab", ""], max_length=5)
  np.testing.assert_array_equal(out["input_ids"], [[100, 101, 1, 0, 0], [1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
  with caplog.at_level(logging.WARNING):
    out = tok(["abcdef", "a"], max_length=3)
  assert "truncated 1 of 2" in caplog.text
  np.testing.assert_array_equal(out["input_ids"], [[100, 101, 1], [100, 1, 0]])  # eos kept
  with pytest.raises(ValueError, match="empty batch"):
    tok([])


def _write_word_tokenizer(path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"hello": 0, "world": 1, "<pad>": 2, "</s>": 3, "<unk>": 4, "a": 5, "b": 6}
  t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  t.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 3)])
  t.enable_padding(pad_id=2, pad_token="<pad>")
  t.save(str(path))
  return tokenizers


def test_json_tokenizer_matches_tokenizers_library(tmp_path):
  path = tmp_path / "tokenizer.json"
  tokenizers = _write_word_tokenizer(path)
  tok = TextTokenizer.from_file(path)
  assert tok.pad_id == 2 and tok.vocab_size == 7
  texts = ["hello world a b a", "a zz", "b"]
  for max_length in (None, 4, 9):
    ref = tokenizers.Tokenizer.from_file(str(path))
    if max_length is None:
      ref.enable_padding(pad_id=2, pad_token="<pad>")
    else:
      ref.enable_truncation(max_length)
      ref.enable_padding(pad_id=2, pad_token="<pad>", length=max_length)
    enc = ref.encode_batch(texts)
    out = tok(texts, max_length=max_length)
    np.testing.assert_array_equal(out["input_ids"], [e.ids for e in enc])
    np.testing.assert_array_equal(out["attention_mask"], [e.attention_mask for e in enc])
  with pytest.raises(ValueError, match="not found"):
    TextTokenizer.from_file(tmp_path / "missing.json")


def test_word_tokenizer_is_fitted_on_words_and_punctuation(tmp_path):
  """fit_word_tokenizer: <pad> </s> <unk> first, then one id per word or punctuation mark seen
  (case kept), </s> after every text (also when truncated), unseen words <unk>."""
  from musicgen_jax.conditioners.tokenizer import EOS_ID, PAD_ID, UNK_ID, fit_word_tokenizer
  texts = ["a Bach chorale in A major, 72 bpm", "an air in F-sharp minor on flute, 6/8", "  "]
  tok = fit_word_tokenizer(texts, tmp_path / "sub" / "tokenizer.json")
  words = ["a", "Bach", "chorale", "in", "A", "major", ",", "72", "bpm", "an", "air", "F", "-",
           "sharp", "minor", "on", "flute", "6", "/", "8"]
  assert tok.vocab_size == 3 + len(words) and tok.pad_id == PAD_ID
  assert TextTokenizer.from_file(tmp_path / "sub" / "tokenizer.json").vocab_size == tok.vocab_size
  out = tok(["a flute in A major", "an oboe, 6/8", "F-sharp minor"], max_length=7)
  ids, mask = out["input_ids"], out["attention_mask"]
  assert len(set(ids[0, :5])) == 5 and ids[0, 0] != ids[0, 3] and ids[0, 5] == EOS_ID
  assert mask[0].tolist() == [1] * 6 + [0] and ids[0, 6] == PAD_ID
  assert ids[1, 1] == UNK_ID and ids[1, 2] != UNK_ID and ids[1, 6] == EOS_ID   # 6 words + </s>
  assert UNK_ID not in ids[2] and ids[2, 4] == EOS_ID
  cut = tok(["a Bach chorale in A major, 72 bpm"], max_length=4)["input_ids"][0]
  assert cut[-1] == EOS_ID and UNK_ID not in cut
  with pytest.raises(ValueError, match="no texts"):
    fit_word_tokenizer(["", " "], tmp_path / "empty.json")


def test_words_outside_the_vocabulary_are_named_in_one_warning(tmp_path, caplog):
  from musicgen_jax.conditioners.tokenizer import UNK_ID, fit_word_tokenizer
  tok = fit_word_tokenizer(["a folk tune in A major"], tmp_path / "tokenizer.json")
  with caplog.at_level("WARNING"):
    ids = tok(["a cheerful folk dance", "dance in A major 🎻"])["input_ids"]
    tok(["a lively jig"])
  assert (ids == UNK_ID).sum() == 4
  said = [r.getMessage() for r in caplog.records if "vocabulary" in r.getMessage()]
  assert len(said) == 1, said
  assert "3 word(s)" in said[0] and "'cheerful', 'dance', '🎻'" in said[0] and "of 9" in said[0]
  caplog.clear()
  with caplog.at_level("WARNING"):
    tok(["a folk tune"])
    fit_word_tokenizer(["x"], tmp_path / "t2.json")(["x y"], max_length=8)
  assert [r.getMessage() for r in caplog.records if "vocabulary" in r.getMessage()] == [
      "1 word(s) of the text are not in the text encoder's vocabulary of 4 and are read as "
      "unknown: 'y'. Further unknown words are not reported"]


def test_random_model_of_a_word_vocabulary_config_takes_the_trained_text_conditioner(tmp_path):
  """A word vocabulary lives in the model's directory, not in its config: MusicGen.random (the
  evaluation's random-weight baseline) takes the trained model's text conditioner."""
  import importlib, sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from musicgen_jax.conditioners.tokenizer import fit_word_tokenizer
  from musicgen_jax.pipeline import MusicGen
  c = importlib.import_module("configs.musicgen").get_config("tiny")
  c.text.tokenizer = "words"
  with pytest.raises(ValueError, match="tokenizer.json in the work directory: none was given"):
    MusicGen.random(c)
  text = LearnedTextConditioner(fit_word_tokenizer(["a folk tune"], tmp_path / "t.json"),
                                dim=c.text.dim, num_layers=c.text.num_layers,
                                num_heads=c.text.num_heads, max_length=c.text.max_length)
  model = MusicGen.random(c, text=text)
  assert model.text is text
  rows = model.params["text"]["token_embedding"]["embedding"].shape[0]
  c.text.tokenizer = ""
  shapes = nn.unbox(jax.eval_shape(text.init, jax.random.key(0)))
  assert rows == shapes["token_embedding"]["embedding"].shape[0]
  assert rows < MusicGen.random(c).params["text"]["token_embedding"]["embedding"].shape[0]


def test_text_encoder_without_layers_is_the_normalised_embedding(tmp_path):
  """num_layers=0: word embedding + positions through the final LayerNorm, nothing else."""
  cond = LearnedTextConditioner(TextTokenizer.from_file(None), dim=D, num_layers=0, num_heads=H,
                                max_length=8)
  params = nn.unbox(cond.init(jax.random.key(1)))
  assert set(params) == {"token_embedding", "final_norm"}
  batch = cond.tokenize(["ab", "xyz"])
  hidden, mask = cond.encode(params, batch)
  x = (np.asarray(params["token_embedding"]["embedding"])[batch["input_ids"]]
       + _sinusoid_np(8, D)[None])
  ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(hidden, ref * np.asarray(mask)[..., None], atol=1e-4)
  with pytest.raises(ValueError, match="num_layers must be >= 0"):
    LearnedTextConditioner(TextTokenizer.from_file(None), dim=D, num_layers=-1, num_heads=H)


# ---------------------------------------------------------------------------------------------
# Learned text encoder

D, H, NL, MLP_DIM = 32, 4, 2, 48


def _conditioner(dtype=jnp.float32, max_length=12):
  return LearnedTextConditioner(TextTokenizer.from_file(None), dim=D, num_layers=NL, num_heads=H,
                                max_length=max_length, mlp_dim=MLP_DIM, dtype=dtype)


@pytest.fixture(scope="module")
def text_setup():
  """(conditioner, boxed init params, perturbed boxed params, jitted encode), built once."""
  cond = _conditioner()
  boxed = jax.jit(cond.init)(jax.random.key(0))
  rng = np.random.default_rng(0)

  def perturb(path, x):  # LayerNorm scales and biases away from their init of 1 and 0
    name, x = jax.tree_util.keystr(path), np.asarray(x)
    if "'scale'" in name:
      return x + 0.2 * rng.standard_normal(x.shape).astype(np.float32)
    if "'bias'" in name:
      return 0.2 * rng.standard_normal(x.shape).astype(np.float32)
    return x

  params = jax.tree_util.tree_map_with_path(perturb, boxed)
  return cond, boxed, params, jax.jit(cond.encode)


def _sinusoid_np(length, dim):
  """[cos, sin] positions with max period 10000 (MusicGen's convention), written independently."""
  pos = np.arange(length)[:, None]
  freq = 10000.0 ** (-np.arange(dim // 2) / (dim // 2 - 1))
  return np.concatenate([np.cos(pos * freq), np.sin(pos * freq)], axis=1)


def test_text_encoder_matches_torch_prenorm_transformer(text_setup):
  torch = pytest.importorskip("torch")
  cond, _, params, encode = text_setup
  batch = cond.tokenize(["a short one", "a somewhat longer caption!", "x"])
  hidden, mask = encode(params, batch)  # boxed (logically partitioned) params apply directly
  hidden, mask = np.asarray(hidden), np.asarray(mask)

  p = jax.tree_util.tree_map(lambda x: torch.tensor(np.asarray(x, np.float32)), nn.meta.unbox(params))
  ids = torch.tensor(batch["input_ids"]).long()
  x = p["token_embedding"]["embedding"][ids] + torch.tensor(_sinusoid_np(ids.shape[1], D)).float()
  pad = torch.tensor(batch["attention_mask"] == 0)
  with torch.no_grad():
    for i in range(NL):
      lp = p[f"layers_{i}"]
      layer = torch.nn.TransformerEncoderLayer(D, H, MLP_DIM, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True, layer_norm_eps=1e-5)
      a = lp["attn"]
      layer.self_attn.in_proj_weight.copy_(torch.cat(
          [a[n]["kernel"].reshape(D, D).T for n in ("query", "key", "value")]))
      layer.self_attn.in_proj_bias.zero_()
      layer.self_attn.out_proj.weight.copy_(a["out"]["kernel"].reshape(D, D).T)
      layer.self_attn.out_proj.bias.zero_()
      layer.linear1.weight.copy_(lp["mlp"]["wi"]["kernel"].T)
      layer.linear1.bias.zero_()
      layer.linear2.weight.copy_(lp["mlp"]["wo"]["kernel"].T)
      layer.linear2.bias.zero_()
      for tn, jn in (("norm1", "attn_norm"), ("norm2", "mlp_norm")):
        getattr(layer, tn).weight.copy_(lp[jn]["scale"])
        getattr(layer, tn).bias.copy_(lp[jn]["bias"])
      layer.eval()
      x = layer(x, src_key_padding_mask=pad)
    x = torch.nn.functional.layer_norm(x, (D,), p["final_norm"]["scale"], p["final_norm"]["bias"], 1e-5)
  ref = x.numpy()
  real = batch["attention_mask"] > 0
  np.testing.assert_array_equal(mask, batch["attention_mask"])
  err = np.max(np.abs(hidden[real] - ref[real]))
  assert err < 1e-5, err  # measured ~1e-6
  assert np.all(hidden[~real] == 0.0)


def test_text_conditioner_padding_invariance_axes_and_bf16(text_setup):
  short, boxed, params, encode = text_setup
  long = _conditioner(max_length=20)  # param shapes do not depend on max_length
  params = nn.meta.unbox(params)  # unboxed params apply too
  texts = ["piano", "lofi"]  # both fit in 12 tokens
  h12, m12 = encode(params, short.tokenize(texts))
  h20, m20 = jax.jit(long.encode)(params, long.tokenize(texts))
  assert h12.shape == (2, 12, D) and h12.dtype == jnp.float32 and m12.dtype == jnp.int32
  np.testing.assert_allclose(np.asarray(h20[:, :12]), np.asarray(h12), atol=1e-5)
  assert np.all(np.asarray(h20[:, 12:]) == 0)

  specs = nn.get_partition_spec(boxed)
  assert specs["token_embedding"]["embedding"] == jax.sharding.PartitionSpec(shd.VOCAB, shd.COND_EMBED)
  assert boxed["token_embedding"]["embedding"].value.shape == (384, D)  # 259 rounded up to 128s
  assert specs["layers_0"]["attn"]["query"]["kernel"] == jax.sharding.PartitionSpec(
      shd.COND_EMBED, shd.HEADS, shd.HEAD_DIM)
  assert specs["layers_1"]["mlp"]["wo"]["kernel"] == jax.sharding.PartitionSpec(shd.MLP, shd.COND_EMBED)
  n_leaves = len(jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  assert all(isinstance(x, nn.Partitioned) for x in
             jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  assert n_leaves == 1 + NL * 10 + 2  # embedding, 4 attn + 2 mlp kernels + 2 norms per layer, final norm

  bf16 = _conditioner(dtype=jnp.bfloat16)
  hb, _ = jax.jit(bf16.encode)(params, bf16.tokenize(texts))
  assert hb.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(hb - h12))) < 0.1
  with pytest.raises(ValueError, match="divisible"):
    LearnedTextConditioner(TextTokenizer.from_file(None), dim=30, num_heads=4)


# ---------------------------------------------------------------------------------------------
# Melody chroma


class _TorchSpectrogram:
  """torchaudio.transforms.Spectrogram(power=2, normalized=True, center=True) on torch.stft:
  periodic Hann window, reflect padding, |STFT|^2 / sum(window^2). Stands in for torchaudio,
  which the extractor needs but which is not installed with this project's test dependencies."""

  def __init__(self, n_fft, win_length, hop_length, power, center, pad, normalized):
    import torch
    assert power == 2 and center and pad == 0 and normalized is True and win_length == n_fft
    self.n_fft, self.hop = n_fft, hop_length
    self.window = torch.hann_window(n_fft)

  def __call__(self, wav):
    import torch
    spec = torch.stft(wav, self.n_fft, hop_length=self.hop, win_length=self.n_fft, window=self.window,
                      center=True, pad_mode="reflect", onesided=True, return_complex=True)
    return (spec / self.window.pow(2).sum().sqrt()).abs().pow(2)


@pytest.fixture(scope="module")
def extractor():
  pytest.importorskip("torch")
  fe_mod = pytest.importorskip("transformers.models.musicgen_melody.feature_extraction_musicgen_melody")
  try:
    import torchaudio  # noqa: F401
    return fe_mod.MusicgenMelodyFeatureExtractor()
  except ImportError:
    fake = types.SimpleNamespace(transforms=types.SimpleNamespace(Spectrogram=_TorchSpectrogram))
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(fe_mod, "torchaudio", fake, raising=False)
      return fe_mod.MusicgenMelodyFeatureExtractor()


def _ref_chroma(fe, audio_bn):
  """The extractor's pre-argmax chroma [B, T, 12] (its own spectrogram and filters) and its output."""
  import torch
  wav = torch.tensor(audio_bn)
  if wav.shape[-1] < fe.n_fft:
    pad = fe.n_fft - wav.shape[-1]
    wav = torch.nn.functional.pad(wav, (pad // 2, pad - pad // 2))
  raw = torch.einsum("cf,...ft->...ct", fe.chroma_filters, fe.spectrogram(wav))
  pre = torch.nn.functional.normalize(raw, p=float("inf"), dim=-2, eps=1e-6).transpose(1, 2).numpy()
  onehot = fe(list(audio_bn), sampling_rate=32000, return_tensors="np")["input_features"]
  return pre, onehot


_chroma_jit = jax.jit(melody.chromagram, static_argnames=("argmax",))


def _sines(freqs, seconds, sr=32000, amp=0.3):
  t = np.arange(int(seconds * sr)) / sr
  return sum(amp * np.sin(2 * np.pi * f * t + i) for i, f in enumerate(freqs)).astype(np.float32)


def test_chroma_filter_bank_matches_transformers():
  audio_utils = pytest.importorskip("transformers.audio_utils")
  if not hasattr(audio_utils, "chroma_filter_bank"):
    pytest.skip("transformers has no chroma_filter_bank")
  for sr, n_fft, n_chroma, tuning in [(32000, 16384, 12, 0.0), (22050, 2048, 12, 0.3), (16000, 1024, 24, -0.2)]:
    ref = audio_utils.chroma_filter_bank(num_frequency_bins=n_fft, num_chroma=n_chroma, sampling_rate=sr,
                                         tuning=tuning)
    ours = melody.chroma_filter_bank(sr, n_fft, n_chroma, tuning=tuning)
    assert ours.shape == (n_chroma, n_fft // 2 + 1)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_chromagram_matches_musicgen_melody_extractor(extractor):
  rng = np.random.default_rng(0)
  signals = {
      "noise": (0.1 * rng.standard_normal((2, 3 * 32000 + 123))).astype(np.float32),
      "short": (0.1 * rng.standard_normal((1, 10000))).astype(np.float32),  # < n_fft: zero padded
      "chord": _sines([261.63, 329.63, 392.0], 2.0)[None],
  }
  np.testing.assert_allclose(melody.chroma_filter_bank(32000, 16384).astype(np.float32),
                             extractor.chroma_filters.numpy(), atol=1e-7)
  for name, x_bn in signals.items():
    pre_ref, onehot_ref = _ref_chroma(extractor, x_bn)
    ours = np.asarray(_chroma_jit(x_bn, argmax=True))
    pre = np.asarray(_chroma_jit(x_bn, argmax=False))
    frames = melody.num_chroma_frames(x_bn.shape[-1])
    assert ours.shape == onehot_ref.shape == (x_bn.shape[0], frames, 12), name
    np.testing.assert_array_equal(ours, onehot_ref, err_msg=name)
    err = np.max(np.abs(pre - pre_ref))
    assert err < 1e-5, (name, err)  # measured ~1e-6; a symmetric Hann window gives ~3e-5
  # The C major chord: the three loudest pitch classes of every frame are C, E, G.
  pre = np.asarray(_chroma_jit(signals["chord"], argmax=False))[0]
  assert all(set(np.argsort(f)[-3:]) == {0, 4, 7} for f in pre)


def test_melody_condition_stereo_matches_extractor_and_fits_length(extractor):
  rng = np.random.default_rng(1)
  stereo = (0.1 * rng.standard_normal((2, 2 * 32000))).astype(np.float32)
  ref = extractor([stereo], sampling_rate=32000, return_tensors="np")["input_features"][0]
  t = ref.shape[0]
  np.testing.assert_array_equal(melody.melody_condition(stereo, 32000, t), ref)
  np.testing.assert_array_equal(melody.melody_condition(stereo, 32000, 3), ref[:3])
  tiled = melody.melody_condition(stereo, 32000, 2 * t + 3)
  np.testing.assert_array_equal(tiled, np.concatenate([ref, ref, ref[:3]]))


def test_melody_condition_resamples_and_nulls_silence(caplog):
  a4_16k = _sines([440.0], 2.0, sr=16000)
  out = melody.melody_condition(np.stack([a4_16k, a4_16k]), 16000, 10)
  assert out.shape == (10, 12) and out.dtype == np.float32
  np.testing.assert_array_equal(out.argmax(-1), np.full(10, 9))  # A is pitch class 9 from C
  np.testing.assert_array_equal(out.sum(-1), np.ones(10))
  with caplog.at_level(logging.WARNING):
    silent = melody.melody_condition(np.zeros((1, 32000), np.float32), 32000, 7)
  assert "silent" in caplog.text
  np.testing.assert_array_equal(silent, melody.null_chroma(1, 7)[0])
  np.testing.assert_array_equal(silent.argmax(-1), np.zeros(7))   # one-hot on C, as the released models
  np.testing.assert_array_equal(silent.sum(-1), np.ones(7))


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance dropout


def _cond_batch(b=4096, l=3, d=2):
  hidden = jnp.ones((b, l, d), jnp.float32) + jnp.arange(b, dtype=jnp.float32)[:, None, None]
  mask = jnp.ones((b, l), jnp.int32)
  return hidden, mask


def test_drop_condition_rates_and_per_example():
  hidden, mask = _cond_batch()
  drop = jax.jit(dropout.drop_condition)  # p traced: one compilation for every p
  h0, m0 = drop(jax.random.key(0), hidden, mask, 0.0)
  np.testing.assert_array_equal(h0, hidden)
  np.testing.assert_array_equal(m0, mask)
  h1, m1 = drop(jax.random.key(0), hidden, mask, 1.0)
  assert not np.any(np.asarray(h1)) and not np.any(np.asarray(m1))
  for p in (0.1, 0.3):
    h, m = drop(jax.random.key(2), hidden, mask, p)
    h, m = np.asarray(h), np.asarray(m)
    dropped_h = np.all(h == 0, axis=(1, 2))
    dropped_m = np.all(m == 0, axis=1)
    # Per example: each example is either untouched or entirely null, and hidden and mask agree.
    np.testing.assert_array_equal(dropped_h, dropped_m)
    np.testing.assert_array_equal(h[~dropped_h], np.asarray(hidden)[~dropped_h])
    assert np.all(m[~dropped_m] == 1)
    frac = dropped_h.mean()
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / hidden.shape[0]), (p, frac)  # 4 sigma
  assert drop._cache_size() == 1
  zh, zm = dropout.null_condition_like(hidden, mask)
  assert zh.shape == hidden.shape and zm.dtype == mask.dtype and not np.any(np.asarray(zh))

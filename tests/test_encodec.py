"""EnCodec parity against transformers' EncodecModel (tiny random models, fp32, CPU)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicgen_jax.codec import seanet
from musicgen_jax.codec.encodec import EncodecConfig, EncodedFrames, EncodecModel
from musicgen_jax.interop.encodec import encodec_params_from_hf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# The facebook/encodec_32khz codec (MusicGen's) at small width: non-causal, reflect padding, weight norm,
# identity shortcuts, 2-layer LSTM, 4 codebooks of 2048 at 2.2 kbps (50 Hz frames).
MUSICGEN_32K = dict(sampling_rate=32000, audio_channels=1, num_filters=8, hidden_size=16,
                    upsampling_ratios=[8, 5, 4, 4], norm_type='weight_norm', use_causal_conv=False,
                    pad_mode='reflect', use_conv_shortcut=False, num_lstm_layers=2,
                    num_residual_layers=1, codebook_size=2048, target_bandwidths=[2.2])
# facebook/encodec_24khz at small width: causal convs, conv shortcuts; 2 residual layers to exercise
# dilation growth. 750 bps per codebook: 1.5 kbps -> 2 codebooks, 3.0 kbps -> 4.
ENCODEC_24K = dict(sampling_rate=24000, audio_channels=1, num_filters=8, hidden_size=16,
                   upsampling_ratios=[8, 5, 4, 2], norm_type='weight_norm', use_causal_conv=True,
                   pad_mode='reflect', use_conv_shortcut=True, num_residual_layers=2,
                   codebook_size=1024, target_bandwidths=[1.5, 3.0])
# facebook/encodec_48khz's mechanics (stereo, time_group_norm, normalised chunks with 1% overlap) at
# small width and depth: 2 ratios (hop 40, 1200 Hz frames) keep it fast; 4 codebooks.
ENCODEC_48K = dict(sampling_rate=48000, audio_channels=2, num_filters=4, hidden_size=16,
                   upsampling_ratios=[8, 5], norm_type='time_group_norm', use_causal_conv=False,
                   pad_mode='reflect', normalize=True, chunk_length_s=0.05, overlap=0.01,
                   codebook_size=1024, target_bandwidths=[24.0, 48.0])


def _hf_model(cfg_kwargs: dict, seed: int):
  """Random HF EncodecModel with non-trivial weight-norm gains, biases and codebooks."""
  torch.manual_seed(seed)
  model = transformers.EncodecModel(transformers.EncodecConfig(**cfg_kwargs)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'original0' in name:  # weight-norm gain: != ||v|| so that folding is exercised
        p.copy_(torch.rand_like(p) + 0.5)
      elif name.endswith('norm.weight'):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith('bias') or 'bias_' in name:
        p.copy_(0.1 * torch.randn_like(p))
    # HF initialises codebooks to zeros; give them a realistic spread, smaller for later stages.
    for name, b in model.named_buffers():
      if name.endswith('codebook.embed'):
        k = int(name.split('.')[2])
        b.copy_(torch.randn_like(b) * 0.7**k)
  return model


def _state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _audio(b: int, c: int, n: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  t = np.arange(n) / 8000.0
  tone = np.sin(2 * np.pi * 220.0 * t * (1 + np.arange(c)[:, None]))
  return (0.3 * tone[None] + 0.2 * rng.standard_normal((b, c, n))).astype(np.float32)


@pytest.fixture(scope='module')
def case_32k():
  hf = _hf_model(MUSICGEN_32K, seed=0)
  cfg = EncodecConfig.from_hf_dict(hf.config.to_dict())
  model = EncodecModel(cfg)
  params = encodec_params_from_hf(_state_dict(hf), cfg)
  x = _audio(2, 1, 9500, seed=1)  # ~0.3 s, not a multiple of the hop: exercises the extra padding
  with torch.no_grad():
    enc = hf.encode(torch.from_numpy(x), bandwidth=2.2)
    hf_audio = hf.decode(enc.audio_codes, enc.audio_scales).audio_values.numpy()
  hf_codes = enc.audio_codes[0].numpy()
  codes = np.asarray(jax.jit(model.encode, static_argnames='n_q')(params, jnp.asarray(x)))
  audio = np.asarray(jax.jit(model.decode)(params, jnp.asarray(hf_codes, jnp.int32)))
  return dict(hf=hf, cfg=cfg, model=model, params=params, hf_codes=hf_codes, hf_audio=hf_audio,
              codes=codes, audio=audio)


def _assert_codes_meaningful(codes: np.ndarray, k: int) -> None:
  assert codes.shape[-2] == k
  for q in range(k):  # every codebook is exercised with varied entries
    assert len(np.unique(codes[..., q, :])) > 3, q


def test_32k_codes_match_hf(case_32k):
  assert case_32k['model'].num_codebooks == 4 and case_32k['model'].frame_rate == 50
  assert case_32k['model'].sample_rate == 32000
  assert case_32k['codes'].dtype == np.int32 and case_32k['codes'].shape == (2, 4, 15)
  _assert_codes_meaningful(case_32k['codes'], 4)
  np.testing.assert_array_equal(case_32k['codes'], case_32k['hf_codes'])


def test_32k_decode_matches_hf(case_32k):
  assert case_32k['audio'].shape == case_32k['hf_audio'].shape == (2, 1, 9600)
  err = np.abs(case_32k['audio'] - case_32k['hf_audio']).max()
  assert err < 1e-4, err


def test_24k_causal_matches_hf():
  hf = _hf_model(ENCODEC_24K, seed=2)
  cfg = EncodecConfig.from_hf_dict(hf.config.to_dict())
  model = EncodecModel(cfg)
  params = encodec_params_from_hf(_state_dict(hf), cfg)
  x = _audio(2, 1, 7201, seed=3)
  with torch.no_grad():
    enc_hi = hf.encode(torch.from_numpy(x), bandwidth=3.0)
    enc_lo = hf.encode(torch.from_numpy(x), bandwidth=1.5)
    hf_audio_lo = hf.decode(enc_lo.audio_codes, enc_lo.audio_scales).audio_values.numpy()
  assert cfg.n_q_for_bandwidth(3.0) == 4 and cfg.n_q_for_bandwidth(1.5) == 2
  codes = np.asarray(jax.jit(model.encode, static_argnames='n_q')(params, jnp.asarray(x), n_q=4))
  _assert_codes_meaningful(codes, 4)
  np.testing.assert_array_equal(codes, enc_hi.audio_codes[0].numpy())
  np.testing.assert_array_equal(codes[:, :2], enc_lo.audio_codes[0].numpy())
  # Decoding with fewer codebooks than the quantizer holds uses the first K.
  audio = np.asarray(jax.jit(model.decode)(params, jnp.asarray(codes[:, :2])))
  assert audio.shape == hf_audio_lo.shape == (2, 1, 23 * 320)
  assert np.abs(audio - hf_audio_lo).max() < 1e-4


def test_48k_chunked_normalised_stereo_matches_hf():
  hf = _hf_model(ENCODEC_48K, seed=4)
  cfg = EncodecConfig.from_hf_dict(hf.config.to_dict())
  model = EncodecModel(cfg)
  params = encodec_params_from_hf(_state_dict(hf), cfg)
  x = _audio(2, 2, 6000, seed=5)  # chunks of 2400 every 2376: two full, one of 1248 samples
  with torch.no_grad():
    enc = hf.encode(torch.from_numpy(x), bandwidth=48.0)
    hf_audio = hf.decode(enc.audio_codes, enc.audio_scales,
                         last_frame_pad_length=enc.last_frame_pad_length).audio_values.numpy()
  frames = jax.jit(model.encode_frames, static_argnames='n_q')(params, jnp.asarray(x))
  assert frames.codes.shape == tuple(enc.audio_codes.shape) == (3, 2, 4, 60)
  assert frames.last_frame_pad_length == enc.last_frame_pad_length == 28
  _assert_codes_meaningful(np.asarray(frames.codes), 4)
  np.testing.assert_array_equal(np.asarray(frames.codes), enc.audio_codes.numpy())
  np.testing.assert_allclose(np.asarray(frames.scales),
                             torch.stack(enc.audio_scales)[..., 0].numpy(), rtol=1e-5)
  hf_frames = EncodedFrames(jnp.asarray(enc.audio_codes.numpy(), jnp.int32),
                            jnp.asarray(torch.stack(enc.audio_scales)[..., 0].numpy()),
                            enc.last_frame_pad_length)
  audio = np.asarray(jax.jit(model.decode_frames)(params, hf_frames))
  assert audio.shape == hf_audio.shape
  assert np.abs(audio - hf_audio).max() < 1e-4
  with pytest.raises(ValueError, match='encode_frames'):
    model.encode(params, jnp.asarray(x))


def test_safetensors_round_trip_and_legacy_weight_norm(case_32k, tmp_path):
  from safetensors.numpy import load_file
  case_32k['hf'].save_pretrained(tmp_path)
  sd = load_file(str(tmp_path / 'model.safetensors'))
  assert any('parametrizations.weight.original0' in k for k in sd)
  cfg = EncodecConfig.from_hf_dict(transformers.EncodecConfig.from_pretrained(tmp_path).to_dict())
  assert cfg == case_32k['cfg']
  # Inside a MusicGen checkpoint the codec sits under 'audio_encoder.'; older torch saved weight_g/_v.
  legacy = {'audio_encoder.' + k.replace('parametrizations.weight.original0', 'weight_g')
            .replace('parametrizations.weight.original1', 'weight_v'): v for k, v in sd.items()}
  for params in (encodec_params_from_hf(sd, cfg),
                 encodec_params_from_hf(legacy, cfg, prefix='audio_encoder.')):
    jax.tree.map(np.testing.assert_array_equal, params, case_32k['params'])


def test_import_errors(case_32k):
  sd = _state_dict(case_32k['hf'])
  cfg = case_32k['cfg']
  missing = dict(sd)
  del missing['decoder.layers.1.lstm.weight_hh_l1']
  with pytest.raises(ValueError, match='decoder.layers.1.lstm.weight_hh_l1'):
    encodec_params_from_hf(missing, cfg)
  wrong = dict(sd)
  wrong['quantizer.layers.3.codebook.embed'] = np.zeros((2048, 8), np.float32)
  with pytest.raises(ValueError, match=r'quantizer.layers.3.codebook.embed.*\(2048, 16\).*\(2048, 8\)'):
    encodec_params_from_hf(wrong, cfg)
  with pytest.raises(ValueError, match='missing key'):
    encodec_params_from_hf(sd, cfg, prefix='audio_encoder.')
  with pytest.raises(ValueError, match=r'encoder.layers.0.conv.*expected shape \(4, 1, 1\)'):
    encodec_params_from_hf(sd, dataclasses.replace(cfg, num_filters=4))


@pytest.mark.parametrize('field,value', [
    ('norm_type', 'batch_norm'), ('pad_mode', 'mirror'), ('codebook_size', 1000),
    ('codebook_dim', 8), ('trim_right_ratio', 0.5), ('upsampling_ratios', []),
    ('target_bandwidths', [0.1]), ('overlap', None), ('num_filters', 0)])
def test_config_errors(field, value):
  d = {**MUSICGEN_32K, 'chunk_length_s': 1.0, 'overlap': 0.01, field: value}
  with pytest.raises(ValueError, match=field):
    EncodecConfig.from_hf_dict(d)


def test_api_errors(case_32k):
  model, params = case_32k['model'], case_32k['params']
  with pytest.raises(ValueError, match='audio must be'):
    model.encode(params, jnp.zeros((1, 2, 640)))
  with pytest.raises(ValueError, match='n_q=5'):
    model.encode(params, jnp.zeros((1, 1, 640)), n_q=5)
  with pytest.raises(ValueError, match='codes must be'):
    model.decode(params, jnp.zeros((1, 5, 3), jnp.int32))
  with pytest.raises(ValueError, match='model_type'):
    EncodecConfig.from_hf_dict({'model_type': 'dac'})


@pytest.mark.parametrize('length,left,right', [(10, 3, 4), (3, 5, 2), (4, 2, 4), (1, 1, 1)])
def test_reflect_pad_matches_hf_on_short_inputs(length, left, right):
  from transformers.models.encodec.modeling_encodec import EncodecConv1d
  x = np.arange(2 * length * 3, dtype=np.float32).reshape(2, 3, length)
  want = EncodecConv1d._pad1d(torch.from_numpy(x), (left, right), mode='reflect').numpy()
  got = seanet.pad1d(jnp.asarray(x.transpose(0, 2, 1)), left, right, 'reflect')
  np.testing.assert_array_equal(np.asarray(got).transpose(0, 2, 1), want)


@pytest.mark.parametrize('kernel,stride', [(5, 2), (4, 4), (3, 1), (2, 3)])
def test_conv_transpose_matches_torch(kernel, stride):
  rng = np.random.default_rng(kernel * 10 + stride)
  x = rng.standard_normal((2, 7, 3)).astype(np.float32)
  w = rng.standard_normal((3, 4, kernel)).astype(np.float32)  # torch layout [C_in, C_out, K]
  want = torch.nn.functional.conv_transpose1d(torch.from_numpy(x.transpose(0, 2, 1)),
                                              torch.from_numpy(w), stride=stride).numpy()
  got = seanet.conv_transpose(jnp.asarray(x), jnp.asarray(w.transpose(2, 0, 1)), stride)
  np.testing.assert_allclose(np.asarray(got).transpose(0, 2, 1), want, atol=1e-5)

"""Import of Hugging Face MusicGen / MusicGen-Melody checkpoints (musicgen_jax.convert).

Tiny random PyTorch models are built from configs (never downloaded), saved with save_pretrained, then
converted with the CLI entry point. Compared against transformers on CPU in fp32: decoder logits, greedy
generation with classifier-free guidance (tokens and decoded audio), and the CLI's failure modes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from musicgen_jax import audio as audio_lib, cli, convert, lm as lm_lib, sampling  # noqa: E402
from musicgen_jax.interop import musicgen as hf_musicgen  # noqa: E402
from musicgen_jax.pipeline import MusicGen  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARD, K = 64, 4
TEXTS = ["lofi beat with a calm piano", "rock drums"]
WORDS = "a lofi beat with calm piano rock drums jazz slow fast and the".split()


def _tokenizer_json(path: str) -> None:
  """A WordLevel tokenizer with T5's conventions: pad 0, '</s>' 1 appended, unk 2."""
  from tokenizers import models, pre_tokenizers, processors
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
  for w in WORDS:
    vocab.setdefault(w, len(vocab))
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  tok.save(path)


def _hf_model(melody: bool):
  t = transformers
  torch.manual_seed(1 if melody else 0)
  t5 = t.T5Config(vocab_size=32, d_model=24, d_kv=8, d_ff=48, num_layers=1, num_heads=3,
                  feed_forward_proj="relu")
  enc = t.EncodecConfig(target_bandwidths=[2.4], sampling_rate=1600, num_filters=4, num_residual_layers=1,
                        upsampling_ratios=[4, 4], codebook_size=CARD, codebook_dim=16, hidden_size=16,
                        num_lstm_layers=1, normalize=False, use_causal_conv=True)   # 100 Hz, 4 codebooks
  dec_kw = dict(vocab_size=CARD, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                num_codebooks=K, max_position_embeddings=256, pad_token_id=CARD, bos_token_id=CARD)
  if melody:
    cfg = t.MusicgenMelodyConfig(text_encoder=t5, audio_encoder=enc,
                                 decoder=t.MusicgenMelodyDecoderConfig(**dec_kw), chroma_length=6)
    model = t.MusicgenMelodyForConditionalGeneration(cfg)
  else:
    cfg = t.MusicgenConfig(text_encoder=t5, audio_encoder=enc, decoder=t.MusicgenDecoderConfig(**dec_kw))
    model = t.MusicgenForConditionalGeneration(cfg)
  with torch.no_grad():  # non-trivial LayerNorm affines and projection biases
    for name, p in model.named_parameters():
      if "layer_norm" in name or name.endswith("proj.bias"):
        p.add_(0.1 * torch.randn_like(p))
  fill_codebooks(model)
  model.generation_config.decoder_start_token_id = CARD
  return model.eval()


def fill_codebooks(model) -> None:
  """EnCodec's codebooks start as zeros in transformers (k-means fills them in training), so every code
  would decode alike and every frame encode to code 0: fill them with noise at about the scale of the
  tiny encoder's output, so that codes vary and the audio comparisons can tell codes apart."""
  gen = torch.Generator().manual_seed(5)
  with torch.no_grad():
    for layer in model.audio_encoder.quantizer.layers:
      layer.codebook.embed.copy_(0.05 * torch.randn(layer.codebook.embed.shape, generator=gen))


@pytest.fixture(scope="module", params=[False, True], ids=["musicgen", "melody"])
def converted(request, tmp_path_factory):
  """(HF model, its save_pretrained dir, our converted dir) for MusicGen and MusicGen-Melody."""
  melody = request.param
  root = tmp_path_factory.mktemp("melody" if melody else "musicgen")
  hf_dir, out_dir = str(root / "hf"), str(root / "ours")
  model = _hf_model(melody)
  model.save_pretrained(hf_dir, safe_serialization=True)
  _tokenizer_json(os.path.join(hf_dir, "tokenizer.json"))
  assert convert.main([hf_dir, out_dir]) == 0
  return model, hf_dir, out_dir


def _hf_text(ours: MusicGen):
  """Our tokenization, cut to the longest prompt (what the HF processor's padding=True gives)."""
  batch = ours.text.tokenize(TEXTS)
  n = int(batch["attention_mask"].sum(1).max())
  return (torch.tensor(batch["input_ids"][:, :n], dtype=torch.long),
          torch.tensor(batch["attention_mask"][:, :n], dtype=torch.long))


def _chroma(ours: MusicGen, frames: int = 4) -> np.ndarray:
  idx = np.random.default_rng(3).integers(0, 12, size=(len(TEXTS), frames))
  return np.eye(12, dtype=np.float32)[idx]                       # one-hot [B, frames, 12]


def test_decoder_logits_match(converted):
  model, _, out_dir = converted
  ours = MusicGen.load(out_dir)
  ids, mask = _hf_text(ours)
  steps = np.random.default_rng(0).integers(0, CARD + 1, size=(len(TEXTS), K, 7))
  kw = {}
  chroma = None
  if ours.lm_cfg.melody:
    chroma = _chroma(ours)
    kw["input_features"] = torch.tensor(chroma)
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor(steps).reshape(-1, 7), **kw)
  ref = out.logits.numpy().reshape(len(TEXTS), K, -1, CARD)[:, :, -7:]
  conds = ours.conditions(TEXTS, chroma)
  got = lm_lib.MusicGenLM(ours.lm_cfg).apply({"params": ours.params["lm"]}, jnp.asarray(steps), conds)
  err = float(np.abs(np.asarray(got) - ref).max())
  print(f"max abs logit error ({ours.config.variant}): {err:.2e}")
  assert err < 1e-4


def hf_generate(model, ours: MusicGen, new_tokens: int, **kw):
  """HF greedy CFG-3 generation -> (codes [B, K, T] handed to the codec, audio [B, C, N])."""
  ids, mask = _hf_text(ours)
  calls = []
  decode = model.audio_encoder.decode

  def record(codes, *args, **kwargs):
    calls.append(codes[0].clone().numpy())                        # [B, K_codec, T]
    return decode(codes, *args, **kwargs)

  model.audio_encoder.decode = record
  try:
    with torch.no_grad():
      audio = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, guidance_scale=3.0,
                             max_new_tokens=new_tokens, **kw).numpy()
  finally:
    model.audio_encoder.decode = decode
  if len(calls) == 1:
    return calls[0], audio
  left, right = calls                                              # stereo: codec called per channel
  codes = np.empty((left.shape[0], 2 * left.shape[1], left.shape[2]), left.dtype)
  codes[:, 0::2], codes[:, 1::2] = left, right
  return codes, audio



def test_greedy_generation_matches(converted):
  model, _, out_dir = converted
  ours = MusicGen.load(out_dir)
  kw, chroma = {}, None
  if ours.lm_cfg.melody:
    chroma = _chroma(ours)
    kw["input_features"] = torch.tensor(chroma)
  new_tokens = 11
  codes_ref, audio_ref = hf_generate(model, ours, new_tokens, **kw)    # [B, K, T]
  frames = new_tokens + 1 - K                                       # HF's max_length counts the start step
  assert codes_ref.shape == (len(TEXTS), K, frames)
  codes = ours.generate(TEXTS, duration=(frames - 0.5) / ours.frame_rate, chroma=chroma,
                        settings=sampling.SamplingSettings(top_k=1, cfg_coef=3.0))
  np.testing.assert_array_equal(codes, codes_ref)
  audio = ours.decode(codes)
  err = float(np.abs(audio - audio_ref).max())
  print(f"max abs audio error ({ours.config.variant}): {err:.2e}")
  assert audio.shape == audio_ref.shape and err < 1e-4


def test_sample_cli_writes_wavs(converted, tmp_path, monkeypatch, capsys):
  _, _, out_dir = converted
  wav_dir = tmp_path / "wavs"
  monkeypatch.chdir(ROOT)
  import sample
  args = ["sample.py", "--compile-cache=", "--checkpoint", out_dir, "--top-k", "1", "--cfg", "3",
          "--duration", "0.05", "--out", str(wav_dir), "--noprogress"]
  for text in TEXTS:
    args += ["--prompt", text]
  assert cli.run_main(sample.main, args) == 0, capsys.readouterr().err[-2000:]
  wavs = sorted(n for n in os.listdir(wav_dir) if n.endswith(".wav"))
  assert len(wavs) == len(TEXTS)
  ours = MusicGen.load(out_dir)
  if ours.lm_cfg.melody:
    return                                   # the content is checked once, below
  # The WAV holds the decoded greedy generation (16-bit PCM).
  audio = ours.decode(ours.generate(TEXTS, 0.05, sampling.SamplingSettings(top_k=1, cfg_coef=3.0)))
  got, sr = audio_lib.read_audio(str(wav_dir / wavs[0]))
  assert sr == ours.sample_rate and got.shape == audio[0].shape
  np.testing.assert_allclose(got, np.clip(audio[0], -1, 1), atol=2 / 32768)


def test_config_mapping_stereo_and_generation_defaults():
  dec = dict(num_codebooks=8, vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             ffn_dim=128, max_position_embeddings=2048, audio_channels=2, dropout=0.1)
  hf = {"model_type": "musicgen", "decoder": dec, "text_encoder": {"d_model": 768, "model_type": "t5"},
        "audio_encoder": {"model_type": "encodec", "sampling_rate": 32000, "upsampling_ratios": [8, 5, 4, 4]}}
  c = hf_musicgen.config_from_hf(hf, {"guidance_scale": 4.0, "top_k": 100, "do_sample": True})
  assert c.pattern.delays == (0, 0, 1, 1, 2, 2, 3, 3) and c.codec.channels == 2
  assert (c.codec.frame_rate, c.model.dim, c.model.text_dim, c.model.dropout) == (50, 64, 768, 0.0)
  assert (c.sampling.cfg_coef, c.sampling.top_k, c.text.kind) == (4.0, 100, "t5")
  with pytest.raises(ValueError, match="config.json: model_type='bark'"):
    hf_musicgen.config_from_hf(dict(hf, model_type="bark"))


def _copy(src: str, dst: str) -> str:
  shutil.copytree(src, dst)
  return dst


def _edit_weights(directory: str, fn) -> None:
  from safetensors.numpy import load_file, save_file
  path = os.path.join(directory, "model.safetensors")
  sd = load_file(path)
  fn(sd)
  save_file(sd, path)


@pytest.mark.parametrize("case", ["bin_only", "model_type", "missing_weight", "wrong_shape", "no_dir",
                                  "bad_tokenizer"])
def test_convert_errors_are_one_line(converted, case, tmp_path, capsys):
  model, hf_dir, _ = converted
  if model.config.model_type != "musicgen":
    pytest.skip("checked once")
  bad = str(tmp_path / "bad")
  if case == "bin_only":
    os.makedirs(bad)
    shutil.copy(os.path.join(hf_dir, "config.json"), bad)
    shutil.copy(os.path.join(hf_dir, "tokenizer.json"), bad)
    open(os.path.join(bad, "pytorch_model.bin"), "wb").close()
    expect = "safe_serialization=True"
  elif case == "model_type":
    _copy(hf_dir, bad)
    cfg = json.load(open(os.path.join(bad, "config.json")))
    json.dump(dict(cfg, model_type="bark"), open(os.path.join(bad, "config.json"), "w"))
    expect = "model_type"
  elif case == "missing_weight":
    _copy(hf_dir, bad)
    _edit_weights(bad, lambda sd: sd.pop("decoder.model.decoder.layers.1.fc1.weight"))
    expect = "decoder.model.decoder.layers.1.fc1.weight"
  elif case == "wrong_shape":
    _copy(hf_dir, bad)
    _edit_weights(bad, lambda sd: sd.update({"decoder.lm_heads.2.weight": np.zeros((CARD, 8), np.float32)}))
    expect = "expected shape (64, 32) from config.json, got (64, 8)"
  elif case == "bad_tokenizer":
    _copy(hf_dir, bad)
    with open(os.path.join(bad, "tokenizer.json"), "w") as f:
      f.write("garbage")
    expect = (f"cannot load tokenizer file {os.path.join(bad, 'tokenizer.json')!r} (damaged, or not "
              "a `tokenizers` tokenizer.json?): expected value at line 1 column 1")
  else:
    expect = "does not exist: pass a local save_pretrained directory"
  assert convert.main([bad, str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("convert: error:") and expect in err and err.count("\n") == 1, err


def test_sample_refuses_a_model_whose_tokenizer_does_not_load(converted, tmp_path, monkeypatch,
                                                               capsys):
  model, _, out_dir = converted
  if model.config.model_type != "musicgen":
    pytest.skip("checked once")
  bad = _copy(out_dir, str(tmp_path / "bad"))
  os.remove(os.path.join(bad, "integrity.json"))
  with open(os.path.join(bad, "tokenizer.json"), "w") as f:
    f.write("garbage")
  monkeypatch.chdir(ROOT)
  import sample
  assert cli.run_main(sample.main, ["sample.py", "--compile-cache=", "--checkpoint", bad, "--prompt",
                                    "x", "--duration", "0.05", "--noprogress", "--save-tokens",
                                    str(tmp_path / "t.npy")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == (f"sample.py: error: cannot load tokenizer file "
                     f"{os.path.join(bad, 'tokenizer.json')!r} (damaged, or not a `tokenizers` "
                     "tokenizer.json?): expected value at line 1 column 1"), err
  assert len(err) == 2 and "has no integrity record" in err[0], err


def test_convert_cli_exit_code(tmp_path):
  res = subprocess.run([sys.executable, "-m", "musicgen_jax.convert", str(tmp_path / "nope"), str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert res.returncode == 2 and res.stderr.count("\n") == 1 and "convert: error:" in res.stderr


def test_convert_refuses_to_replace_without_overwrite(converted, tmp_path, capsys):   # issue 6 row 8
  model, hf_dir, out_dir = converted
  if model.config.model_type != "musicgen":
    pytest.skip("checked once")
  out = str(tmp_path / "ours")
  shutil.copytree(out_dir, out)
  before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
  assert convert.main([hf_dir, out]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "already exists and is not empty: pass --overwrite" in err
  assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == before
  assert convert.main([hf_dir, out, "--overwrite"]) == 0
  MusicGen.load(out)                                      # complete, verified
  assert sorted(os.listdir(tmp_path)) == ["ours"]         # nothing left beside it


@pytest.mark.parametrize("fill, expect", [(b"\xff", "NaN or inf"), (b"\x7f", "|value| up to")])
def test_convert_refuses_damaged_weights(converted, tmp_path, capsys, fill, expect):   # issue 6 row 6
  model, hf_dir, _ = converted
  if model.config.model_type != "musicgen":
    pytest.skip("checked once")
  bad = _copy(hf_dir, str(tmp_path / "bad"))
  path = os.path.join(bad, "model.safetensors")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:                            # some bytes of the data overwritten
    f.seek(size - 4096)
    f.write(fill * 64)
  assert convert.main([bad, str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"{path} holds damaged weights" in err and expect in err, err
  assert not os.path.exists(tmp_path / "out")


def test_fine_tune_a_converted_model_on_audio_files(converted, tmp_path, capfd):
  """The README's path: convert -> audio files + manifest -> fine-tune (token cache made with the
  model's own codec; the frozen T5 runs inside the step) -> a work directory that samples to audio."""
  import soundfile as sf
  from configs.musicgen import get_config
  from musicgen_jax import checkpoint
  from musicgen_jax.training import loop
  _, _, out_dir = converted
  source = MusicGen.load(out_dir)
  rng = np.random.default_rng(0)
  lines = []
  for i in range(4):
    t = np.arange(int(1.2 * 1600)) / 1600
    sf.write(tmp_path / f"{i}.wav", (0.3 * np.sin(2 * np.pi * 110 * (i + 1) * t)
                                     + 0.05 * rng.standard_normal(t.shape)).astype(np.float32), 1600)
    lines.append(json.dumps({"path": f"{i}.wav", "description": TEXTS[i % 2]}))
  (tmp_path / "songs.jsonl").write_text("\n".join(lines))
  c = get_config("tiny")
  c.init_from = out_dir
  c.data.update(kind="manifest", manifest=str(tmp_path / "songs.jsonl"), valid_fraction=0.25,
                min_seconds=0.5)
  c.train.update(num_steps=2, batch_size=2, segment_seconds=0.3, log_every=1, eval_every=2,
                 eval_batches=1, checkpoint_every=2, progress=False)
  workdir = str(tmp_path / "run")
  metrics = loop.train(c, workdir, out=lambda _: None)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["eval_loss"])
  err = capfd.readouterr().err          # train.progress=False: no bars while the data is built
  assert "encoding audio to tokens" not in err and "examples/s" not in err, err[-2000:]
  tuned = MusicGen.load(workdir)
  assert tuned.config.text.kind == "t5" and tuned.codec is not None
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                      tuned.params["text"], source.params["text"])
  assert all(jax.tree.leaves(same))                                       # T5 stayed frozen
  assert not np.array_equal(np.asarray(tuned.params["lm"]["lm_heads"]),
                            np.asarray(source.params["lm"]["lm_heads"]))  # the LM trained
  codes = tuned.generate(TEXTS[:1], 0.2, sampling.SamplingSettings(top_k=4))
  audio = tuned.decode(codes)
  assert audio.shape[0] == 1 and audio.shape[-1] >= 0.2 * 1600 and np.isfinite(audio).all()
  assert checkpoint.read_config(workdir).init_from == out_dir
  # More songs in the manifest, then a resume: it goes on with the new data, and says so.
  sf.write(tmp_path / "4.wav", (0.3 * np.sin(2 * np.pi * 550 * t)).astype(np.float32), 1600)
  (tmp_path / "songs.jsonl").write_text("\n".join(lines + [json.dumps(
      {"path": "4.wav", "description": TEXTS[0]})]))
  c.train.num_steps = 3
  out = []
  loop.train(c, workdir, out=out.append)
  assert any(line.startswith("resumed from step 2") for line in out), out
  assert [line for line in out if "the training data changed since step 2" in line], out
  out.clear()
  c.train.num_steps = 4                                   # the same data again: no note
  loop.train(c, workdir, out=out.append)
  assert not [line for line in out if "data changed" in line], out

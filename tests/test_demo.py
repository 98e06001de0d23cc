"""The shipped model (models/demo) and the pieces that make it: configs/demo.py, an LM run taking
its codec from `data.codec`, the bfloat16 export, and sample.py's default model."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from musicgen_jax import audio as audio_lib, checkpoint, cli, export
from musicgen_jax.data import corpus
from musicgen_jax.training import loop
from tests.conftest import ProgramCount

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _configs():
  import importlib
  import sys
  sys.path.insert(0, ROOT)
  return importlib.import_module("configs.demo"), importlib.import_module("configs.musicgen")


def test_demo_configs_agree_with_each_other():
  """The LM's vocabulary, frame rate and sample rate are the codec's; the corpus is shared."""
  demo, _ = _configs()
  codec, lm = demo.get_config("codec"), demo.get_config("lm")
  enc = codec.codec.encodec
  assert lm.model.card == enc.codebook_size
  assert lm.codec.sample_rate == codec.codec.sample_rate == enc.sampling_rate
  assert lm.codec.frame_rate == codec.codec.frame_rate
  assert lm.data.cache_dir == codec.data.cache_dir and lm.data.corpus == codec.data.corpus == "demo"
  assert lm.data.codec == demo.CODEC_DIR
  # The chain of runs: each starts where the one before it wrote its work directory.
  adv, words, final, cross, merge, wide, attr, more = (
      demo.get_config(v) for v in ("codec_adv", "lm_words", "lm_final", "lm_cross", "lm_merge",
                                   "lm_wide", "lm_attr", "lm_more"))
  assert adv.init_from == demo.CODEC_DIR and adv.codec.to_dict() == codec.codec.to_dict()
  assert adv.codec_train.losses.adv > 0 and adv.codec_train.losses.feat > 0
  assert words.init_from == demo.LM_DIR and words.init_fresh == "text"
  assert words.text.tokenizer == "words" and words.text.num_layers == 0
  assert final.init_from == demo.WORDS_DIR and final.data.codec == demo.ADV_CODEC_DIR
  assert cross.init_from == demo.FINAL_DIR and cross.data.codec == demo.ADV_CODEC_DIR
  assert cross.init_fresh == "cross" and cross.model.text_conditioning == "cross"
  assert merge.init_from == demo.CROSS_DIR and not merge.init_fresh
  assert merge.model.to_dict() == cross.model.to_dict() and merge.text.to_dict() == cross.text.to_dict()
  assert merge.data.caption_merge_p > 0 and cross.data.caption_merge_p == 0
  assert wide.init_from == demo.MERGE_DIR and wide.model.to_dict() == merge.model.to_dict()
  assert wide.data.codec == demo.ADV_CODEC_DIR and wide.data.cache_dir != merge.data.cache_dir
  assert wide.data.corpus_options["renderings"] > corpus.PRESETS["demo"]["renderings"]
  assert {k: v for k, v in wide.data.to_dict().items() if k.startswith("caption_")} == \
      {k: v for k, v in merge.data.to_dict().items() if k.startswith("caption_")}
  # lm_attr: lm_wide's run continued on the same data, with the melody also dropped alone.
  assert attr.init_from == demo.WIDE_DIR and attr.model.to_dict() == wide.model.to_dict()
  assert attr.data.to_dict() == wide.data.to_dict()
  assert attr.train.melody_dropout > 0
  for c in (lm, words, final, cross, merge, wide):   # the runs made before it had none
    assert c.train.melody_dropout == 0
  # lm_more: lm_attr's run trained on with the same settings, a lower peak and a longer schedule.
  assert more.init_from == demo.ATTR_DIR and more.model.to_dict() == attr.model.to_dict()
  assert more.data.to_dict() == attr.data.to_dict()
  assert more.train.melody_dropout == attr.train.melody_dropout
  assert more.train.num_steps > attr.train.num_steps
  assert more.train.learning_rate < attr.train.learning_rate
  for c in (lm, words, final, cross, merge, wide, attr, more):   # made before word dropout existed
    assert c.data.word_dropout == 0
  for c in (adv, words, final, cross, merge, wide, attr, more):
    loop.check_config(c)
  with pytest.raises(ValueError, match="use one of codec, codec_adv, lm, lm_words, lm_final, "
                     "lm_cross, lm_merge, lm_wide, lm_attr, lm_more"):
    demo.get_config("nope")


def _recipe_commands(text: str) -> list[str]:
  """The `python ...` commands of the retraining recipe in `text`: backslash continuations joined,
  split at '&&'."""
  joined = " ".join(text.replace("\\\n", " ").split())
  start = joined.index("python train.py --config configs/demo.py:codec ")
  end = joined.index("--overwrite", start) + len("--overwrite")
  return [c.strip() for c in joined[start:end].split("&&")]


def test_the_recipe_is_the_same_in_the_config_readme_and_training_record():
  """The one retraining command appears three times (configs/demo.py's docstring, the README and
  models/demo/TRAINING.md); all three list the same runs, every variant they name exists, and it
  ends by exporting the last run's work directory to models/demo."""
  demo, _ = _configs()
  copies = [_recipe_commands(open(os.path.join(ROOT, *f.split("/"))).read())
            for f in ("README.md", "models/demo/TRAINING.md")]
  ours = _recipe_commands(demo.__doc__)
  assert all(c == ours for c in copies), [c for c in copies if c != ours]
  runs = [c.split() for c in ours[:-1]]
  assert all(r[:3] == ["python", "train.py", "--config"] and r[4] == "--workdir" for r in runs)
  for r in runs:
    demo.get_config(r[3].split(":")[1])
  export_cmd = ours[-1].split()
  assert export_cmd[:3] == ["python", "-m", "musicgen_jax.export"]
  assert export_cmd[3] == runs[-1][5] and export_cmd[4] == "models/demo"


def test_lm_run_takes_its_codec_from_data_codec(tmp_path):
  """Without init_from, an LM config whose data.codec is a codec run gets that codec's
  architecture (so its work directory is a whole model); an explicit codec.encodec is kept."""
  import sys
  sys.path.insert(0, ROOT)
  from configs import codec as codec_configs
  demo, musicgen = _configs()
  codec_dir = str(tmp_path / "codec")
  checkpoint.write_config(codec_dir, codec_configs.get_config("tiny"))
  c = musicgen.get_config("tiny")
  c.data.codec = codec_dir
  got = loop.resolve_init_from(c)
  assert got.codec.encodec.to_dict() == codec_configs.get_config("tiny").codec.encodec.to_dict()
  assert got.codec.sample_rate == 8000 and "encodec" not in c.codec   # the caller's is untouched
  plain = musicgen.get_config("tiny")
  assert loop.resolve_init_from(plain).to_dict() == plain.to_dict()


def test_fine_tuning_on_another_codecs_tokens_takes_that_codec(tmp_path):
  """With init_from and a different data.codec, the run's codec (its config section and the model
  files it writes) is data.codec's, the one its token cache comes from, not init_from's."""
  import sys
  sys.path.insert(0, ROOT)
  from configs import codec as codec_configs
  demo, musicgen = _configs()
  model_dir, codec_dir = str(tmp_path / "model"), str(tmp_path / "codec")
  base = musicgen.get_config("tiny")
  base.codec = codec_configs.get_config("tiny").codec
  other = codec_configs.get_config("tiny")
  other.codec.encodec.num_filters = 2 * other.codec.encodec.num_filters
  from musicgen_jax.pipeline import codec_from_config
  for directory, cfg, value in ((model_dir, base, 1.0), (codec_dir, other, 2.0)):
    shapes = jax.eval_shape(codec_from_config(cfg).init, jax.random.key(0))
    checkpoint.save_model(directory, cfg, {"codec": jax.tree.map(
        lambda x, v=value: np.full(x.shape, v, np.float32), shapes)})
  c = musicgen.get_config("tiny")
  c.init_from, c.data.codec = model_dir, codec_dir
  resolved = loop.resolve_init_from(c)
  assert resolved.codec.to_dict() == other.codec.to_dict()
  # The codec the run writes into its work directory (what sample.py decodes with) is that one too.
  from musicgen_jax.sharding import make_mesh
  from musicgen_jax.training.lm_task import LMTask
  task = LMTask(resolved, make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  task.write_model_files(str(tmp_path / "run"))
  _, written = checkpoint.load_codec(str(tmp_path / "run"))
  assert {float(np.unique(x)[0]) for x in jax.tree.leaves(written)} == {2.0}
  c.data.codec = ""
  assert loop.resolve_init_from(c).codec.to_dict() == base.codec.to_dict()


def test_bfloat16_export_loads_as_rounded_float32(tmp_path):
  """export --dtype bfloat16 halves the parameter bytes; loading gives float32 arrays equal to the
  bfloat16 rounding of the originals; the source itself and a bad dtype are refused."""
  from musicgen_jax.pipeline import MusicGen
  _, musicgen = _configs()
  c = musicgen.get_config("tiny")
  model = MusicGen.random(c)
  src, f32, bf16 = (str(tmp_path / n) for n in ("src", "f32", "bf16"))
  checkpoint.save_model(src, c, jax.device_get(model.params))
  a = export.export(src, f32, dtype="float32")
  b = export.export(src, bf16, dtype="bfloat16")
  assert a["parameters"] == b["parameters"] > 0 and b["bytes"] < 0.7 * a["bytes"]
  _, original = checkpoint.load_model(src)
  with ProgramCount() as count:
    _, loaded = checkpoint.load_model(bf16)
  flat_o, flat_l = jax.tree.leaves(original), jax.tree.leaves(loaded)
  assert len(flat_o) == len(flat_l)
  assert count.programs <= 1 < len(flat_l)   # the casts in one program, not one program per leaf
  assert any(not np.array_equal(x, y) for x, y in zip(flat_o, flat_l))  # it really rounded
  for x, y in zip(flat_o, flat_l):
    assert y.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(jnp.asarray(x).astype(jnp.bfloat16), np.float32), y)
  with pytest.raises(ValueError, match="is the source"):
    export.export(src, src)
  assert export.main([src, str(tmp_path / "x"), "--dtype", "float32"]) == 0
  assert export.main([str(tmp_path / "missing"), str(tmp_path / "y")]) == 2


def _shipped():
  if not os.path.isfile(os.path.join(cli.SHIPPED_MODEL, checkpoint.CONFIG_FILE)):
    pytest.fail(f"the shipped model is missing from {cli.SHIPPED_MODEL}")
  return cli.SHIPPED_MODEL


def test_shipped_model_is_small_and_recorded():
  """At most 30 MB, no pickle, an integrity record, and a training record naming its command."""
  d = _shipped()
  files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]
  assert sum(os.path.getsize(f) for f in files) <= 30e6
  assert not [f for f in files if f.endswith((".pkl", ".pickle", ".bin", ".pt"))]
  from musicgen_jax import integrity
  assert integrity.verify(d, required=True, checksums=True)
  record = open(os.path.join(d, "TRAINING.md")).read()
  assert "configs/demo.py:lm" in record and "configs/demo.py:codec" in record
  config = json.load(open(os.path.join(d, checkpoint.CONFIG_FILE)))
  assert config["codec"]["encodec"]["codebook_size"] == config["model"]["card"]


def test_sample_without_checkpoint_uses_the_shipped_model(sample, tmp_path, caplog):
  """The README's main command: no --checkpoint, a WAV at the codec's rate that is neither silent
  nor clipped noise; --melody works with it. The words its vocabulary lacks are named once."""
  _shipped()
  out = tmp_path / "out"
  rate = 32000
  tone = 0.3 * np.sin(2 * np.pi * 440.0 * np.arange(rate) / rate).astype(np.float32)
  melody = str(tmp_path / "a4.wav")
  sf.write(melody, tone, rate)
  wav = out / "folk.wav"
  rc, stdout, err = sample("--prompt", "a cheerful folk dance in A major on flute", "--duration",
                           "0.5", "--out", str(wav), "--melody", melody, "--plot", shipped=True)
  assert rc == 0, err
  assert "randomly initialised" not in err
  said = err + caplog.text
  assert said.count("not in the text encoder's vocabulary") == 1, said
  assert "'cheerful', 'dance'" in said, said
  assert sorted(p.name for p in out.iterdir()) == ["folk.png", "folk.wav"], stdout
  audio, sr = sf.read(str(wav), dtype="float32")
  assert sr == rate and abs(len(audio) - rate // 2) <= 640
  assert np.all(np.isfinite(audio)) and 1e-3 < float(np.sqrt(np.mean(audio ** 2))) < 0.9


def test_scripts_run_from_any_working_directory(tmp_path):
  """sample.py and train.py find their default config beside themselves, not in the caller's
  directory (bad input here, so each stops with its own one-line message right after parsing)."""
  import subprocess
  import sys
  from tests.conftest import ROOT
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  got = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--prompt", "a", "--prompt",
                        "b", "--out", "x.wav"], cwd=tmp_path, capture_output=True, text=True, env=env)
  assert got.returncode == 2 and "names one WAV file but there are 2 prompts" in got.stderr, got.stderr
  got = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--workdir", "w",
                        "--config.train.batch_size=0"], cwd=tmp_path, capture_output=True, text=True,
                       env=env)
  assert got.returncode != 0 and "train.batch_size must be an integer >= 1" in got.stderr, got.stderr


def test_out_names_one_wav_file_only_for_one_prompt(sample, tmp_path):
  rc, _, err = sample("--prompt", "a", "--prompt", "b", "--out", str(tmp_path / "x.wav"))
  assert rc == 2 and "names one WAV file but there are 2 prompts" in err
  assert not (tmp_path / "x.wav").exists()


def test_empty_prompt_is_unconditional_with_a_warning(sample, tmp_path):
  """An empty prompt gets the null text condition: guidance then changes nothing (its conditional
  and unconditional rows are the same), unlike for a real prompt."""
  def tokens(prompt, cfg):
    path = str(tmp_path / f"{len(prompt)}_{cfg}.npy")
    rc, _, err = sample("--prompt", prompt, "--top-k", "1", "--cfg", cfg, "--duration", "0.3",
                        "--save-tokens", path)
    assert rc == 0, err
    return np.load(path), err
  (a, err), (b, _) = tokens("", "3"), tokens("", "1")
  assert "prompt 1 is empty" in err and err.count("warning") == 1
  np.testing.assert_array_equal(a, b)
  # The condition itself: the empty row is the null one (zeros, no mask); the other row is not.
  from musicgen_jax.pipeline import MusicGen
  _, musicgen = _configs()
  conds = MusicGen.random(musicgen.get_config("tiny")).conditions(["", "a melody in C"])
  text, mask = np.asarray(conds.text), np.asarray(conds.text_mask)
  assert not text[0].any() and not mask[0].any()
  assert text[1].any() and mask[1].any()
  c, d = tokens("a melody in C", "3")[0], tokens("a melody in C", "1")[0]
  assert not np.array_equal(c, d)


def test_shipped_model_takes_any_text(sample, tmp_path, caplog):
  """Emoji, other scripts and a prompt far beyond the text encoder's 96 positions: tokenised (bytes),
  the long one truncated with one warning, never a crash."""
  _shipped()
  path = str(tmp_path / "t.npy")
  rc, _, err = sample("--prompt", "🎻 一首欢快的中国民歌 — «danse» ", "--prompt", "a reel " * 60,
                      "--duration", "0.2", "--save-tokens", path, shipped=True)
  assert rc == 0, err
  codes = np.load(path)
  assert codes.shape[:2] == (2, 4) and codes.min() >= 0 and codes.max() < 512
  said = err + caplog.text
  assert said.count("truncated") == 1, said


def test_missing_or_damaged_shipped_model_is_one_line_saying_how_to_restore(sample, tmp_path,
                                                                             monkeypatch):
  import shutil
  _shipped()
  monkeypatch.setattr(cli, "SHIPPED_MODEL", str(tmp_path / "nowhere"))
  rc, _, err = sample("--prompt", "x", "--duration", "0.1", "--out", str(tmp_path / "x.wav"),
                      shipped=True)
  assert rc == 2 and len(err.strip().splitlines()) == 1, err
  assert "shipped model is missing" in err and "git checkout -- models/demo" in err
  copy = tmp_path / "demo"
  shutil.copytree(os.path.join(ROOT, "models", "demo"), copy)
  biggest = max((p for p in copy.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0xFF                     # one flipped byte: same size, wrong checksum
  biggest.write_bytes(bytes(data))
  monkeypatch.setattr(cli, "SHIPPED_MODEL", str(copy))
  rc, _, err = sample("--prompt", "x", "--duration", "0.1", "--out", str(tmp_path / "x.wav"),
                      shipped=True)
  assert rc == 2 and len(err.strip().splitlines()) == 1, err
  assert "shipped model is damaged" in err and biggest.name in err and "TRAINING.md" in err


def test_sampling_sees_the_text_prefix_as_training_padded_it():
  """A prefix model trained here had every caption padded to text.max_length (no mask on the
  prefix), so sampling pads the same way and the condition equals the training step's; models
  marked prefix_padding='longest' (imported ones) keep only the longest prompt."""
  import ml_collections
  from musicgen_jax.pipeline import MusicGen
  _, musicgen = _configs()
  c = musicgen.get_config("tiny_melody")
  assert c.text.prefix_padding == "max_length"
  model = MusicGen.random(c)
  texts = ["a jig", "a slow air in D minor"]
  conds = model.conditions(texts)
  tok = {k: jnp.asarray(v) for k, v in model.text.tokenize(texts).items()}
  hidden, mask = model.text.encode(model.params["text"], tok)     # what lm_task._conditions uses
  assert conds.text.shape[1] == c.text.max_length
  np.testing.assert_allclose(np.asarray(conds.text), np.asarray(hidden), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(conds.text_mask), np.asarray(mask))
  longest = ml_collections.ConfigDict(c.to_dict())
  longest.text.prefix_padding = "longest"
  got = MusicGen(longest, model.params, model.text).conditions(texts)
  assert got.text.shape[1] == int(np.asarray(mask).sum(axis=1).max()) < c.text.max_length
  longest.text.prefix_padding = "both"
  with pytest.raises(ValueError, match="prefix_padding must be"):
    MusicGen(longest, model.params, model.text)


def test_readme_python_example_runs(tmp_path, monkeypatch):
  """The README's "From Python" block, as written, with the shipped model: three WAVs of 8 s."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
    text = fh.read()
  section = text[text.index("## From Python"):text.index("## Pretrained MusicGen")]
  code = "\n".join(ln[4:] for ln in section.splitlines() if ln.startswith("    "))
  assert "MusicGen.load" in code and "write_wav" in code
  for name in ("models", "docs"):      # the paths as a user at the repository root has them
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  monkeypatch.chdir(tmp_path)
  exec(compile(code, "README.md", "exec"), {})
  for name in ("reel", "chorale", "tune"):
    wav, sr = audio_lib.read_audio(str(tmp_path / f"{name}.wav"))
    assert sr == 32000 and wav.shape[-1] == 8 * 32000 and np.abs(wav).max() > 0.01, name

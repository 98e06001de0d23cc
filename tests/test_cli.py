"""End-to-end: train.py -> checkpoint -> sample.py, and one-line errors for bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from configs.musicgen import get_config
from musicgen_jax import checkpoint, cli, pipeline, sampling
from musicgen_jax.pipeline import MusicGen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny model trained for a few steps by train.py (exercises the sharded step and Orbax)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  r = run("train.py", "--config", "configs/musicgen.py:tiny", "--workdir", workdir,
          "--config.train.num_steps=4", "--config.train.checkpoint_every=2",
          "--config.train.log_every=2")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "step 4: loss" in r.stdout
  assert checkpoint.latest_train_step(workdir) == 4
  return workdir


def test_train_resumes(trained):
  r = run("train.py", "--config", "configs/musicgen.py:tiny", "--workdir", trained,
          "--config.train.num_steps=6", "--config.train.checkpoint_every=2",
          "--config.train.log_every=1")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "step 5: loss" in r.stdout and "step 1: loss" not in r.stdout
  assert checkpoint.latest_train_step(trained) == 6


def test_sample_from_training_run(trained, tmp_path, sample):
  tokens = tmp_path / "tokens.npy"
  rc, _, err = sample("--checkpoint", trained, "--prompt", "a melody in C at 60 bpm", "--prompt",
                      "a melody in G at 120 bpm", "--duration", "0.4", "--top-k", "1", "--cfg", "3",
                      "--save-tokens", str(tokens), "--out", str(tmp_path / "out"), "--progress")
  assert rc == 0, err[-2000:]
  codes = np.load(tokens)
  assert codes.shape == (2, 4, 20) and codes.dtype == np.int32
  assert codes.min() >= 0 and codes.max() < get_config("tiny").model.card
  assert "generating" in err and "100%" in err  # progress bar
  # Greedy sampling through the CLI equals the library on the same checkpoint.
  model = MusicGen.load(trained)
  lib = model.generate(["a melody in C at 60 bpm", "a melody in G at 120 bpm"], 0.4,
                       sampling.SamplingSettings(top_k=1, cfg_coef=3.0))
  np.testing.assert_array_equal(codes, lib)
  assert sorted(os.listdir(tmp_path / "out")) == ["000_a_melody_in_c_at_60_bpm.npy",
                                                  "001_a_melody_in_g_at_120_bpm.npy"]


@pytest.mark.parametrize("args, fragment", [
    (["--top-k", "0"], "top-k must be a positive integer"),
    (["--top-p", "1.5"], "top-p must be in [0, 1]"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--duration", "0"], "--duration must be a finite number of seconds > 0"),
    (["--stride", "-1"], "--stride must be a finite number of seconds > 0"),
    (["--checkpoint", "/nonexistent/model"], "does not exist"),
    (["--checkpoint", ""], "--checkpoint is empty"),          # an unset $MODEL in a script
    (["--config", "configs/musicgen.py:tiny", "--config.pattern.name=zigzag"], "zigzag"),
    (["--config.pattern.name=delay"], "cannot change a loaded checkpoint"),   # the shipped model
    (["--config", "configs/musicgen.py:tiny", "--config.sampling.nosuch=1"],
     "the config has no field 'nosuch' (from --config.sampling.nosuch)"),
    (["--prompts-file", "/nonexistent.txt"], "does not exist"),
    (["--prompt", "y", "extra"], "unexpected arguments"),
])
def test_bad_input_one_line(args, fragment, sample, tmp_path):
  rc, _, err = sample("--prompt", "x", "--save-tokens", str(tmp_path / "t.npy"), *args)
  assert rc == 2
  assert fragment in err, err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_unknown_config_field_is_one_line_before_anything_runs(tmp_path):
  """ml_collections reads --config.* overrides while the flag is defined, at import: a field the
  config lacks is one line there too, not a traceback."""
  r = run("train.py", "--config", "configs/musicgen.py:tiny", "--workdir", str(tmp_path / "w"),
          "--config.train.nosuch=1")
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip() == ("train.py: error: the config has no field 'nosuch' (from "
                              "--config.train.nosuch): check the name against the config file")
  assert not (tmp_path / "w").exists()


def test_train_py_needs_a_workdir():
  """A run's directory is named, never a default that another config's run may already hold."""
  r = run("train.py", "--config", "configs/musicgen.py:tiny")
  assert r.returncode == 2 and r.stderr.strip() == (
      "train.py: error: --workdir is required: the directory for this run's checkpoints, metrics "
      "and config (give the same one again to resume)"), r.stderr[-2000:]


@pytest.mark.parametrize("name", ["x.mp3", "x.FLAC", "x.ogg", "x.m4a", "x.aac", "x.opus"])
def test_out_with_another_audio_extension_is_refused(name, sample, tmp_path):
  """Only WAV is written: --out x.mp3 would otherwise become a directory named x.mp3."""
  out = tmp_path / name
  rc, _, err = sample("--prompt", "x", "--duration", "0.1", "--out", str(out))
  assert rc == 2 and err.strip() == (f"sample.py: error: --out {out}: only .wav files are written; "
                                     "give a FILE.wav, or a directory for one WAV per prompt"), err
  assert not out.exists()


def test_no_prompt_and_unreadable_checkpoint(sample, tmp_path):
  rc, _, err = sample()
  assert rc == 2 and "no prompt" in err
  (tmp_path / checkpoint.CONFIG_FILE).write_text("{not json")
  rc, _, err = sample("--checkpoint", str(tmp_path), "--prompt", "x", "--save-tokens",
                      str(tmp_path / "t.npy"))
  assert rc == 2 and "unreadable" in err and "Traceback" not in err


def test_export_roundtrip_and_long_form(tmp_path):
  """save/load keeps the weights; a duration beyond the positions is generated in windows."""
  config = get_config("tiny")
  config.model.max_positions = 40   # ~0.7 s windows, so 2 s needs several windows
  model = MusicGen.random(config, seed=1)
  model.save(str(tmp_path / "m"))
  loaded = MusicGen.load(str(tmp_path / "m"))
  s = sampling.SamplingSettings(top_k=1)
  window = model.max_duration()
  assert window < 1.0
  first = model.generate(["x"], window, s)
  np.testing.assert_array_equal(first, loaded.generate(["x"], window, s))
  long = loaded.generate_long(["x"], 2.0, s, stride=window / 2)
  assert long.shape == (1, 4, 100)
  # The first window is an ordinary generation; each later window continues the previous one.
  np.testing.assert_array_equal(long[..., :first.shape[-1]], first)


@pytest.mark.parametrize("script", ["sample.py", "train.py"])
def test_help_is_not_an_error(script):
  """--help prints the usage and exits 0 (absl exits 1); an unknown flag is still exit 2."""
  r = run(script, "--help")
  assert r.returncode == 0 and "python " + script in r.stdout, (r.returncode, r.stderr[-500:])
  bad = run(script, "--no-such-flag")
  assert bad.returncode == 2 and "no-such-flag" in bad.stderr and "Traceback" not in bad.stderr


def test_plot_that_would_draw_nothing_is_refused_before_generation(sample, tmp_path, monkeypatch):
  """--plot without --out, or with a model that has no codec (tokens only), is one line and exit 2,
  before anything is generated; --plot with --out and a codec is tested with the shipped model."""
  generated = []
  monkeypatch.setattr(MusicGen, "generate_long", lambda *a, **k: generated.append(1))
  rc, _, err = sample("--prompt", "x", "--plot")
  assert rc == 2 and "--plot" in err and "--out" in err and "Traceback" not in err
  rc, _, err = sample("--prompt", "x", "--plot", "--out", str(tmp_path / "o"))
  assert rc == 2 and "no codec" in err and "Traceback" not in err
  assert generated == [] and not (tmp_path / "o").exists()


PROMPTS = ["a folk song", "a Bach chorale", "an Irish reel"]


def _prompt_args(prompts=PROMPTS):
  return [a for p in prompts for a in ("--prompt", p)] + ["--duration", "0.4"]


def test_batches_equal_runs_of_their_prompts(sample, tmp_path, monkeypatch):
  """--batch-size: each batch samples as a run of its own prompts would (the first with --seed, the
  others with their derived seeds; the last batch padded with its last prompt), its WAVs named by the
  prompts' places in the whole list, the tokens of all prompts in one file."""
  real, sizes = MusicGen.generate_long, []

  def generate_long(self, texts, *a, **k):
    sizes.append(len(texts))
    return real(self, texts, *a, **k)
  monkeypatch.setattr(MusicGen, "generate_long", generate_long)
  rc, out, err = sample(*_prompt_args(), "--batch-size", "2", "--seed", "4",
                        "--out", str(tmp_path / "o"), "--save-tokens", str(tmp_path / "all.npy"))
  assert rc == 0, err
  got = np.load(tmp_path / "all.npy")
  assert got.shape == (3, 4, 20) and sizes == [2, 2]     # one compiled shape
  assert sorted(os.listdir(tmp_path / "o"))[:3] == ["000_a_folk_song.npy", "001_a_bach_chorale.npy",
                                                    "002_an_irish_reel.npy"]
  np.testing.assert_array_equal(np.load(tmp_path / "o" / "002_an_irish_reel.npy"), got[2])
  rc, _, err = sample(*_prompt_args(PROMPTS[:2]), "--seed", "4", "--save-tokens",
                      str(tmp_path / "first.npy"))
  assert rc == 0, err
  np.testing.assert_array_equal(np.load(tmp_path / "first.npy"), got[:2])
  second = cli.batch_seed(4, 1)
  assert second not in (4, cli.batch_seed(4, 2), pipeline.window_seed(4, 1))
  rc, _, err = sample(*_prompt_args(PROMPTS[2:] * 2), "--seed", str(second), "--save-tokens",
                      str(tmp_path / "last.npy"))
  assert rc == 0, err
  np.testing.assert_array_equal(np.load(tmp_path / "last.npy")[:1], got[2:])
  rc, _, err = sample(*_prompt_args(), "--batch-size", "0", "--save-tokens", str(tmp_path / "z.npy"))
  assert rc == 2 and "--batch-size must be at least 1" in err and "Traceback" not in err


def test_prompts_that_do_not_fit_run_in_batches_that_do(sample, tmp_path, monkeypatch):
  """Without --batch-size, prompts whose decoding would not fit in memory together run in batches of
  as many as fit (with a note), as --batch-size would; an explicit --batch-size too large is refused
  before anything compiles, naming the size that fits."""
  model = MusicGen.random(get_config("tiny"))
  settings = sampling.SamplingSettings.from_config(model.config.sampling.to_dict())
  monkeypatch.setattr(pipeline, "free_device_bytes",
                      lambda: model.decode_need(2, 0.4, settings)["total"])
  rc, _, err = sample(*_prompt_args(), "--save-tokens", str(tmp_path / "auto.npy"))
  assert rc == 0 and "they run in 2 batches of 2 (--batch-size)" in err, err
  rc, _, err = sample(*_prompt_args(), "--batch-size", "2", "--save-tokens", str(tmp_path / "2.npy"))
  assert rc == 0 and "batches of" not in err, err
  np.testing.assert_array_equal(np.load(tmp_path / "auto.npy"), np.load(tmp_path / "2.npy"))
  rc, _, err = sample(*_prompt_args(), "--batch-size", "3", "--save-tokens", str(tmp_path / "3.npy"))
  assert rc == 2 and "pass --batch-size 2" in err and "Traceback" not in err
  assert not (tmp_path / "3.npy").exists()


def test_ctrl_c_between_batches_keeps_the_batches_done(sample, tmp_path, monkeypatch):
  """Ctrl-C in the second batch: the first batch's files are written already, and --save-tokens gets
  its prompts' tokens (those of an uninterrupted run); exit 130."""
  args = [*_prompt_args(), "--batch-size", "2"]
  rc, _, err = sample(*args, "--save-tokens", str(tmp_path / "all.npy"))
  assert rc == 0, err
  real, calls = MusicGen.generate_long, []

  def generate_long(self, *a, **k):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(self, *a, **k)
  monkeypatch.setattr(MusicGen, "generate_long", generate_long)
  rc, out, err = sample(*args, "--out", str(tmp_path / "o"), "--save-tokens",
                        str(tmp_path / "part.npy"))
  assert rc == 130 and "interrupted: wrote 2 of 3 prompts" in err and "Traceback" not in err
  np.testing.assert_array_equal(np.load(tmp_path / "part.npy"), np.load(tmp_path / "all.npy")[:2])
  assert sorted(os.listdir(tmp_path / "o")) == ["000_a_folk_song.npy", "001_a_bach_chorale.npy"]


def test_failed_write_in_a_later_batch_keeps_every_prompts_tokens(sample, tmp_path, monkeypatch):
  """Writing fails in the second batch (a full disk): the fallback file holds the tokens of every
  prompt generated so far, the first batch's too, as an uninterrupted run gives them."""
  args = [*_prompt_args(), "--batch-size", "2"]
  rc, _, err = sample(*args, "--save-tokens", str(tmp_path / "all.npy"))
  assert rc == 0, err
  real_save = np.save

  def full_disk(path, arr, *a, **k):
    if str(path).endswith("002_an_irish_reel.npy"):
      raise OSError(28, "No space left on device")
    return real_save(path, arr, *a, **k)
  monkeypatch.setattr(np, "save", full_disk)
  rc, _, err = sample(*args, "--out", str(tmp_path / "o"))
  rescued = [n for n in os.listdir(tmp_path / "o") if n.startswith("musicgen-tokens-")]
  assert rc == 2 and "No space left on device" in err and len(rescued) == 1, err
  np.testing.assert_array_equal(np.load(tmp_path / "o" / rescued[0]), np.load(tmp_path / "all.npy"))


def test_ctrl_c_in_long_form_writes_the_windows_finished(sample, tmp_path, monkeypatch):
  """Ctrl-C during a long-form generation writes what its finished windows hold (the same tokens
  as the start of an uninterrupted run) and exits 130; during the first window nothing is written."""
  args = ["--config=configs/musicgen.py:tiny", "--config.model.max_positions=40", "--prompt", "x",
          "--duration", "2", "--stride", "0.3"]
  rc, _, err = sample(*args, "--save-tokens", str(tmp_path / "all.npy"))
  assert rc == 0, err
  full = np.load(tmp_path / "all.npy")
  real, calls = MusicGen.generate, []

  def generate(self, *a, **k):   # Ctrl-C while the third window is generated
    calls.append(1)
    if len(calls) == stop_at:
      raise KeyboardInterrupt
    return real(self, *a, **k)
  monkeypatch.setattr(MusicGen, "generate", generate)
  stop_at = 3
  rc, _, err = sample(*args, "--save-tokens", str(tmp_path / "part.npy"))
  assert rc == 130 and "interrupted: wrote the first" in err and "Traceback" not in err
  part = np.load(tmp_path / "part.npy")
  config = get_config("tiny")
  config.model.max_positions = 40
  model = MusicGen.random(config)
  window = model.frames_for(model.max_duration())   # the first window and one stride (0.3 s)
  assert part.shape == (1, 4, window + round(0.3 * model.frame_rate)) and full.shape[-1] == 100
  np.testing.assert_array_equal(part, full[..., :part.shape[-1]])
  calls.clear()
  stop_at = 1
  rc, _, err = sample(*args, "--save-tokens", str(tmp_path / "none.npy"))
  assert rc == 130 and "interrupted" in err and not (tmp_path / "none.npy").exists()

"""Tests for the beat clock (musicgen_jax/conditioners/tempo.py) through every path that carries it:
the tempo read from a prompt, the clock's period, the LM's cached decoding against its full forward,
greedy sampling against the uncached reference loop, the training batch and condition dropout, and
adding a clock to a trained model (init_fresh=beat)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.musicgen import get_config
from musicgen_jax import lm as lm_lib
from musicgen_jax import patterns, sampling
from musicgen_jax import sharding as shd
from musicgen_jax.conditioners import tempo
from musicgen_jax.training import loop
from musicgen_jax.training.lm_task import LMTask

from tests import test_lm, test_sampling
from tests.conftest import MELODY_CFG, TinyLM, _tiny
from tests.test_training import _batch, _init_state, final_state, tiny


@pytest.mark.parametrize("text, bpm", [
    ("an Irish reel on fiddle, lively, 112 bpm", 112.0), ("G minor, 78 BPM, trumpet", 78.0),
    ("at 96bpm", 96.0), ("bpm: 132", 132.0), ("tempo 70, piano", 70.0),
    ("120 beats per minute", 120.0), ("a jig in 6/8 time", 0.0), ("1200 bpm", 0.0),
    ("5 bpm", 0.0), ("", 0.0), ("a reel, fast", 0.0), ("97.5 bpm then 120 bpm", 97.5)])
def test_named_bpm(text, bpm):
  assert tempo.named_bpm(text) == bpm


def test_beat_features_have_the_beat_period_and_are_silent_without_a_tempo():
  frames = jnp.arange(200)
  feats = np.asarray(tempo.beat_features(frames, jnp.asarray([120.0, 0.0, 75.0]), 50.0))
  assert feats.shape == (3, 200, tempo.NUM_FEATURES)
  assert (feats[1] == 0).all()
  m = len(tempo.MULTIPLES)
  beat = tempo.MULTIPLES.index(1.0)
  pair = [beat, m + beat]   # sin and cos of the beat pulse
  # 120 bpm at 50 frames/s: a beat every 25 frames; 75 bpm: every 40.
  np.testing.assert_allclose(feats[0, 25:, pair], feats[0, :-25, pair], atol=1e-4)
  np.testing.assert_allclose(feats[2, 40:, pair], feats[2, :-40, pair], atol=1e-4)
  assert np.abs(feats[0, 12:, pair] - feats[0, :-12, pair]).max() > 1.0   # half a beat: opposite
  # Every pulse is periodic in its own multiple of the beat: the half-bar one in 2 beats.
  half = tempo.MULTIPLES.index(0.5)
  np.testing.assert_allclose(feats[0, 50:, half], feats[0, :-50, half], atol=1e-4)
  assert np.abs(feats[0, 25:, half] - feats[0, :-25, half]).max() > 1.0


BEAT_CFG = dataclasses.replace(MELODY_CFG, text_conditioning="cross", beat_clock_rate=50.0)


@pytest.fixture(scope="module")
def beat_lm() -> TinyLM:
  lm = _tiny(BEAT_CFG, 5)   # random weights: the clock's projection is not zero
  return dataclasses.replace(lm, conds=lm.conds.replace(bpm=jnp.asarray([120.0, 0.0])))


def test_the_clock_changes_exactly_the_rows_that_name_a_tempo(beat_lm):
  tokens = test_lm._tokens(beat_lm.cfg, 3)
  with_bpm = np.asarray(beat_lm.forward(beat_lm.params, tokens, beat_lm.conds))
  without = np.asarray(beat_lm.forward(beat_lm.params, tokens, beat_lm.conds.replace(bpm=None)))
  assert np.abs(with_bpm[0] - without[0]).max() > 1e-2
  np.testing.assert_array_equal(with_bpm[1], without[1])
  # With a zero projection the clock is inert: the model is the one without it.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if "beat_proj" in jax.tree_util.keystr(p) else x,
      beat_lm.params)
  np.testing.assert_array_equal(np.asarray(beat_lm.forward(params, tokens, beat_lm.conds)),
                                np.asarray(beat_lm.forward(params, tokens,
                                                           beat_lm.conds.replace(bpm=None))))


def test_cached_decoding_with_the_clock_matches_full_forward(beat_lm):
  tokens = test_lm._tokens(beat_lm.cfg, 1)
  full = beat_lm.forward(beat_lm.params, tokens, beat_lm.conds)
  cached = jax.jit(lambda p, t, c: test_lm._cached_logits(beat_lm.model, p, t, c, chunks=(3, 2),
                                                          cache_room=3))(
      beat_lm.params, tokens, beat_lm.conds)
  assert test_lm._max_diff(cached, full) < 1e-5


def test_greedy_sampling_with_the_clock_matches_reference_loop(beat_lm):
  pattern = patterns.get_pattern("delay", 4)
  got = test_sampling._generate(beat_lm, pattern, segments=2)
  ref = test_sampling.reference_greedy(beat_lm, pattern, beat_lm.conds, test_sampling.T, 3.0)
  np.testing.assert_array_equal(got, ref)
  # The clock reaches the sampler: without it the tokens differ.
  silent = dataclasses.replace(beat_lm, conds=beat_lm.conds.replace(bpm=jnp.zeros(2)))
  assert (test_sampling._generate(silent, pattern, segments=2) != got).any()


def _beat_config(**train):
  c = tiny(**train)
  c.model.beat_clock_rate = float(c.codec.frame_rate)
  return c


def test_training_batches_carry_the_tempo_and_condition_dropout_silences_it():
  from musicgen_jax.data import loader
  c = _beat_config(cond_dropout=0.5)
  task = LMTask(c, shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  assert "bpm" in task.batch_keys() and task.batch_spec(4)["bpm"].shape == (4,)
  captions = ["a melody in C at 120 bpm", "a melody in D", "bpm: 60"]
  got = loader.Tokenize(task.text).map({"caption": np.asarray(captions, object)})
  np.testing.assert_array_equal(got["bpm"], np.asarray([120.0, 0.0, 60.0], np.float32))
  n = 64
  batch = _batch(c, range(n))
  batch["bpm"] = np.arange(60, 60 + n, dtype=np.float32)
  params = _init_state(task).params
  conds = task._conditions(params, batch, jax.random.key(3), train=True)
  kept = np.asarray(conds.text_mask).any(axis=1)
  assert 0.3 < kept.mean() < 0.7
  np.testing.assert_array_equal(np.asarray(conds.bpm)[kept], batch["bpm"][kept])
  assert (np.asarray(conds.bpm)[~kept] == 0).all()
  ev = task._conditions(params, batch, jax.random.key(3), train=False)
  np.testing.assert_array_equal(np.asarray(ev.bpm), batch["bpm"])


def test_init_fresh_beat_adds_a_clock_to_a_trained_model(tmp_path):
  """init_fresh='beat': every weight of the model directory is kept and the clock's projection is a
  fresh initialisation (N(0, 0.02), as the token embeddings)."""
  from musicgen_jax import checkpoint
  from musicgen_jax.pipeline import MusicGen
  src = MusicGen.random(get_config("tiny"), seed=3)
  src.save(str(tmp_path / "model"))
  c = _beat_config(num_steps=1, eval_every=0, learning_rate=1e-4, warmup_steps=1)
  c.init_from, c.init_fresh = str(tmp_path / "model"), "beat"
  loop.train(c, str(tmp_path / "run"), out=lambda _: None)
  assert checkpoint.read_config(str(tmp_path / "run")).model.beat_clock_rate == c.model.beat_clock_rate
  params = final_state(str(tmp_path / "run"), 1)["params"]
  flat = {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  before = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(src.params)[0]}
  assert sorted(set(flat) - set(before)) == ["['lm']['beat_proj']"]
  assert max(float(np.abs(flat[n] - before[n]).max()) for n in before) < 1e-3
  beat = flat["['lm']['beat_proj']"]
  assert 0.015 < beat.std() < 0.025, beat.std()
  # Without init_fresh the architecture is the model directory's: no clock.
  c.init_fresh = ""
  loop.train(c, str(tmp_path / "run2"), out=lambda _: None)
  assert not checkpoint.read_config(str(tmp_path / "run2")).model.get("beat_clock_rate")
  assert "beat_proj" not in final_state(str(tmp_path / "run2"), 1)["params"]["lm"]


def test_work_directories_from_before_the_clock_still_resume():
  from musicgen_jax.training import workdir
  old = get_config("tiny")
  del old.model.beat_clock_rate
  assert workdir.incompatible_fields(old, get_config("tiny")) == []
  clocked = get_config("tiny")
  clocked.model.beat_clock_rate = 50.0
  assert workdir.incompatible_fields(old, clocked) == ["model.beat_clock_rate: 0.0 -> 50.0"]


def test_the_pipeline_reads_the_tempo_from_each_prompt():
  from musicgen_jax.pipeline import MusicGen
  c = get_config("tiny")
  c.model.beat_clock_rate = 50.0
  model = MusicGen.random(c, seed=1)
  conds = model.conditions(["a melody in C at 120 bpm", "", "a melody in D"])
  np.testing.assert_array_equal(np.asarray(conds.bpm), [120.0, 0.0, 0.0])
  assert MusicGen.random(get_config("tiny"), seed=1).conditions(["at 120 bpm"]).bpm is None

"""Tests for the beat clock (musicgen_jax/conditioners/tempo.py) through every path that carries it:
the tempo read from a prompt, the clock's phase and period, the beat phase of training crops, the LM's cached decoding against its full forward,
greedy sampling against the uncached reference loop, the training batch and condition dropout, and
adding a clock to a trained model (init_fresh=beat)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.musicgen import get_config
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


def test_beat_features_are_in_phase_with_the_beats_and_silent_without_a_tempo():
  frames = jnp.arange(200)
  # 120 bpm at 50 frames/s: a beat every 25 frames, the first at frame 0; 75 bpm: every 40 frames,
  # half a beat in at frame 0, so the beats fall at frames 20, 60, ...
  feats = np.asarray(tempo.beat_features(frames, jnp.asarray([[120.0, 0.0], [0.0, 0.3],
                                                              [75.0, 0.5]]), 50.0))
  assert feats.shape == (3, 200, tempo.NUM_FEATURES)
  assert (feats[1] == 0).all()
  m = len(tempo.MULTIPLES)
  sin, cos = feats[..., :m], feats[..., m:]
  for row, first, period in ((0, 0, 25), (2, 20, 40)):
    on_beat = np.arange(first, 200, period)
    np.testing.assert_allclose(cos[row, on_beat], 1.0, atol=1e-4)   # every pulse at phase 0
    np.testing.assert_allclose(sin[row, on_beat], 0.0, atol=1e-3)
    off = on_beat[:-1] + period // 2   # half a beat on: the beat pulse and its thirds opposite
    for j, mult in enumerate(tempo.MULTIPLES):
      want = np.cos(np.pi * mult) if period % 2 == 0 else None
      if want is not None:
        np.testing.assert_allclose(cos[row, off, j], want, atol=1e-4)
  # Exact to the end of a long window: 120 bpm, frame 2000 is beat 80.
  far = np.asarray(tempo.beat_features(jnp.asarray([2000, 2005]), jnp.asarray([[120.0, 0.0]]),
                                       50.0))
  np.testing.assert_allclose(far[0, 0, m:], 1.0, atol=1e-4)
  np.testing.assert_allclose(far[0, 1, m:], np.cos(2 * np.pi * np.asarray(tempo.MULTIPLES) * 0.2),
                             atol=1e-4)


def test_beat_phase_and_sampling_clock():
  assert tempo.beat_phase(2.1, 0.1, 120.0) == pytest.approx(0.0)
  assert tempo.beat_phase(2.35, 0.1, 120.0) == pytest.approx(0.5)
  assert tempo.beat_phase(0.0, 0.25, 60.0) == pytest.approx(0.75)
  texts = ["a reel at 120 bpm", "no tempo", "72 bpm"]
  first = tempo.sampling_beat(texts)
  np.testing.assert_array_equal(first, [[120.0, 0.0], [0.0, 0.0], [72.0, 0.0]])
  # A window that starts 30 frames in continues the first window's clock.
  later = tempo.sampling_beat(texts, start_frame=30, frame_rate=50.0)
  np.testing.assert_allclose(np.asarray(tempo.beat_features(jnp.arange(30, 60), first, 50.0)),
                             np.asarray(tempo.beat_features(jnp.arange(30), later, 50.0)),
                             atol=1e-4)
  np.testing.assert_allclose(later[:, 1], [0.2, 0.0, 0.72], atol=1e-6)


BEAT_CFG = dataclasses.replace(MELODY_CFG, text_conditioning="cross", beat_clock_rate=50.0)


@pytest.fixture(scope="module")
def beat_lm() -> TinyLM:
  lm = _tiny(BEAT_CFG, 5)   # random weights: the clock's projection is not zero
  return dataclasses.replace(lm, conds=lm.conds.replace(beat=jnp.asarray([[120.0, 0.3],
                                                                         [0.0, 0.0]])))


def test_the_clock_changes_exactly_the_rows_that_name_a_tempo(beat_lm):
  tokens = test_lm._tokens(beat_lm.cfg, 3)
  with_bpm = np.asarray(beat_lm.forward(beat_lm.params, tokens, beat_lm.conds))
  without = np.asarray(beat_lm.forward(beat_lm.params, tokens, beat_lm.conds.replace(beat=None)))
  assert np.abs(with_bpm[0] - without[0]).max() > 1e-2
  np.testing.assert_array_equal(with_bpm[1], without[1])
  # The phase matters: the same tempo half a beat later is another input.
  shifted = beat_lm.conds.replace(beat=beat_lm.conds.beat.at[0, 1].add(0.5))
  assert np.abs(np.asarray(beat_lm.forward(beat_lm.params, tokens, shifted))[0]
                - with_bpm[0]).max() > 1e-2
  # With a zero projection the clock is inert: the model is the one without it.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if "beat_proj" in jax.tree_util.keystr(p) else x,
      beat_lm.params)
  np.testing.assert_array_equal(np.asarray(beat_lm.forward(params, tokens, beat_lm.conds)),
                                np.asarray(beat_lm.forward(params, tokens,
                                                           beat_lm.conds.replace(beat=None))))
  # ... yet it has a gradient there (the clock is in phase with the audio, a first-order input), so
  # a zero-initialised projection trains; only from the rows that have a clock.
  weights = jax.random.normal(jax.random.key(0), with_bpm.shape)
  def loss(p, conds):
    return jnp.sum(beat_lm.forward(p, tokens, conds) * weights)
  grad = jax.grad(loss)(params, beat_lm.conds)["params"]["beat_proj"]
  assert float(jnp.abs(grad).max()) > 1e-3
  silent = beat_lm.conds.replace(beat=beat_lm.conds.beat.at[0, 0].set(0.0))
  assert (jax.grad(loss)(params, silent)["params"]["beat_proj"] == 0).all()


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
  silent = dataclasses.replace(beat_lm, conds=beat_lm.conds.replace(beat=jnp.zeros((2, 2))))
  assert (test_sampling._generate(silent, pattern, segments=2) != got).any()


def _beat_config(**train):
  c = tiny(**train)
  c.model.beat_clock_rate = float(c.codec.frame_rate)
  return c


def _item(metadata: dict | None, frames: int = 400) -> dict:
  import json
  return {"codes": np.zeros((4, frames), np.int16), "caption": "x",
          **({} if metadata is None else {"metadata": json.dumps(metadata)})}


def test_crops_carry_the_beat_phase_of_their_first_frame():
  from musicgen_jax.data import loader
  crop = loader.Crop(100, 50.0, seed=7, beat=True)
  meta = {"bpm": 96, "first_beat": 0.17, "offset_seconds": 8.0}
  for index in range(5):
    ex = crop.map_with_index(index, _item(meta))
    start = loader._mix64(7, index) % (400 - 100 + 1)   # the crop's first frame in the window
    seconds = 8.0 + start / 50.0 - 0.17                 # since the first beat
    beats = seconds * 96 / 60.0
    np.testing.assert_allclose(ex["beat_grid"], [96.0, beats - np.floor(beats)], atol=1e-5)
  for meta in (None, {"bpm": 96}, {"first_beat": 0.1}, {"bpm": 0, "first_beat": 0.1},
               {"bpm": "fast", "first_beat": 0.1}):
    assert np.isnan(crop.map_with_index(0, _item(meta))["beat_grid"]).all(), meta
  assert np.isnan(crop.padding(4)["beat_grid"]).all()
  assert "beat_grid" not in loader.Crop(100, 50.0).map_with_index(0, _item(meta))


def test_training_batches_carry_the_clock_and_condition_dropout_silences_it():
  from musicgen_jax.data import loader
  c = _beat_config(cond_dropout=0.5)
  task = LMTask(c, shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  assert "beat" in task.batch_keys() and task.batch_spec(4)["beat"].shape == (4, 2)
  captions = ["a melody in C at 120 bpm", "a melody in D", "bpm: 60", "at 90 bpm", "at 80 bpm"]
  grid = np.asarray([[120, 0.25], [100, 0.5], [60, 0.75], [91, 0.1], [np.nan, np.nan]], np.float32)
  got = loader.Tokenize(task.text).map({"caption": np.asarray(captions, object), "beat_grid": grid})
  # The clock where the caption names the item's own tempo and its beats are known; else silent.
  np.testing.assert_array_equal(got["beat"], np.asarray([[120, 0.25], [0, 0], [60, 0.75], [0, 0],
                                                         [0, 0]], np.float32))
  assert "beat_grid" not in got
  n = 64
  batch = _batch(c, range(n))
  batch["beat"] = np.stack([np.arange(60, 60 + n), np.linspace(0, 0.9, n)], 1).astype(np.float32)
  params = _init_state(task).params
  conds = task._conditions(params, batch, jax.random.key(3), train=True)
  kept = np.asarray(conds.text_mask).any(axis=1)
  assert 0.3 < kept.mean() < 0.7
  np.testing.assert_array_equal(np.asarray(conds.beat)[kept], batch["beat"][kept])
  assert (np.asarray(conds.beat)[~kept] == 0).all()
  ev = task._conditions(params, batch, jax.random.key(3), train=False)
  np.testing.assert_array_equal(np.asarray(ev.beat), batch["beat"])


def test_init_fresh_beat_adds_a_clock_to_a_trained_model(tmp_path):
  """init_fresh='beat': every weight of the model directory is kept and the clock's projection starts
  at zero (the model starts as it was) and trains."""
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
  # At zero, as initialised (synthetic data has no beats to train it; the gradient a clock gives it
  # at zero is tested above).
  assert beat.shape == (tempo.NUM_FEATURES, c.model.dim) and (beat == 0).all()
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
  np.testing.assert_array_equal(np.asarray(conds.beat), [[120.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
  later = model.conditions(["at 120 bpm", "75 bpm"], start_frame=10)   # 0.4 and 0.25 beats in
  np.testing.assert_allclose(np.asarray(later.beat), [[120.0, 0.4], [75.0, 0.25]], atol=1e-6)
  assert MusicGen.random(get_config("tiny"), seed=1).conditions(["at 120 bpm"]).beat is None


def test_long_form_windows_continue_the_clock():
  """Each window after the first starts its clock where the audio it continues had it."""
  from musicgen_jax.pipeline import MusicGen
  c = get_config("tiny")
  c.model.update(max_positions=40, beat_clock_rate=50.0)   # ~0.7 s windows
  model = MusicGen.random(c, seed=1)
  seen, conditions = [], model.conditions
  model.conditions = lambda texts, chroma=None, start_frame=0: seen.append(
      (start_frame, conditions(texts, chroma, start_frame))) or seen[-1][1]
  window = model.max_duration()
  step = int(round(window / 2 * model.frame_rate))
  model.generate_long(["a reel at 100 bpm"], 2.0, sampling.SamplingSettings(top_k=1),
                      stride=window / 2)
  starts = [s for s, _ in seen]
  assert len(starts) >= 3 and starts == [i * step for i in range(len(starts))]
  for start, conds in seen:
    np.testing.assert_allclose(np.asarray(conds.beat)[0],
                               [100.0, (start * 100 / 3000.0) % 1.0], atol=1e-6)

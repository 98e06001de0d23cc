"""The rendered music21 corpus: ground truth the audio carries, splits by piece, seeds, missing
tools; and the control report (eval/control.py) run end to end on a tiny corpus.

Rendering tests need the Debian packages `fluidsynth` and `timgm6mb-soundfont` (.ci/run installs
them) and are skipped without them. Audio is kept to a few seconds per rendering.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil

import librosa
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from musicgen_jax.data import corpus, manifest, render, scores
from musicgen_jax.eval import attributes

SR = 32000
HAVE_SYNTH = (shutil.which("fluidsynth") is not None
              and os.path.isfile(render.SOUNDFONTS["timgm6mb"][0]))
needs_synth = pytest.mark.skipif(not HAVE_SYNTH, reason="needs the Debian packages fluidsynth and "
                                 "timgm6mb-soundfont")
PIANO, MARIMBA = 0, 12


@functools.cache
def _tiny_pieces() -> tuple[scores.PieceRef, ...]:
  """The tiny preset's pieces: two Bach, two Essen, two Ryan's Mammoth."""
  chosen, _ = corpus.select_pieces(corpus.make_config("tiny"))
  return tuple(r for name in sorted(chosen) for r in chosen[name])


@functools.cache
def _load(ref: scores.PieceRef) -> scores.Piece:
  return scores.load_piece(ref, max_quarters=40)


def _pieces(collection: str | None = None) -> list[scores.Piece]:
  """The tiny preset's pieces (of one collection), each parsed once per session."""
  return [_load(r) for r in _tiny_pieces() if collection in (None, r.collection)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
  """The tiny preset with two 2 s renderings per piece, through the loader's entry point
  (corpus.prepare), with TFDS's in-memory buffer forced to spill to disk (the path a full-size
  corpus takes, with no TensorFlow installed). -> the corpus root."""
  if not HAVE_SYNTH:
    pytest.skip("needs fluidsynth and timgm6mb-soundfont")
  from tensorflow_datasets.core import shuffle
  config = ml_collections.ConfigDict({"data": {
      "kind": "corpus", "corpus": "tiny", "min_seconds": 1.0,
      "corpus_options": {"renderings": 2, "max_seconds": 2.0}}})
  cache_root = str(tmp_path_factory.mktemp("cache"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 0)
    root = corpus.prepare(config, cache_root, sample_rate=SR, channels=1, build=True)
  assert corpus.prepare(config, cache_root, sample_rate=SR, channels=1, build=False) == root
  from musicgen_jax.data import loader   # data.kind=corpus reaches the same corpus
  assert loader.AUDIO_SOURCES["corpus"](config, cache_root, SR, 1, build=False) == root
  return root


def _examples(root: str) -> dict[str, list[dict]]:
  counts = manifest.read_counts(root)
  source = tfds.builder_from_directory(manifest.dataset_dir(root, counts)).as_data_source()
  return {split: [source[split][i] for i in range(len(source[split]))] for split in source}


def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def _truth_pc(ex: dict) -> int:
  names = scores.PITCH_NAMES if attributes.mode_family(_text(ex["key_mode"])) == "major" \
      else scores.MINOR_NAMES
  return names.index(_text(ex["key_tonic"]))


# --- ground truth in the audio --------------------------------------------------------------------

def _estimates_vs_truth(pieces: list[scores.Piece], seconds: float
                        ) -> tuple[list[bool], list[bool]]:
  """Renders each piece with its seeded key and tempo (rendering 0), on piano or marimba (clear
  onsets and pitch) -> (key estimate == truth, tempo estimate == truth up to octave errors)."""
  sf = render.find_soundfont("timgm6mb")
  key_ok, tempo_ok = [], []
  for i, piece in enumerate(pieces):
    drawn = render.choose(piece, corpus.rendering_rng(0, piece.ref.piece_id, 0))
    choices = dataclasses.replace(drawn, program=(PIANO, MARIMBA)[i % 2])
    out = render.render(piece, choices, soundfont_path=sf, max_seconds=seconds)
    key_ok.append(attributes.key_matches(attributes.estimate_key(out.audio_n, SR), out.tonic_pc,
                                         piece.mode))
    bpm = attributes.estimate_tempo(out.audio_n, SR)
    tempo_ok.append(attributes.tempo_matches(bpm, choices.bpm))
  return key_ok, tempo_ok


@needs_synth
def test_fiddle_tunes_sound_in_their_key_and_tempo():
  """The two Ryan's Mammoth tunes (regular rhythm, plain tonality), 8 s each: the key and tempo
  estimated from the audio are the ground truth that the captions state."""
  key_ok, tempo_ok = _estimates_vs_truth(_pieces("ryansMammoth"), 8.0)
  assert key_ok == [True, True] and tempo_ok == [True, True], (key_ok, tempo_ok)


@pytest.mark.slow
@needs_synth
def test_estimates_agree_with_ground_truth_for_most_pieces():
  """All six tiny-preset pieces, 15 s each (the truth is the key of the whole piece; a few seconds
  of a slow tune do not establish it): most estimates agree with the ground truth."""
  key_ok, tempo_ok = _estimates_vs_truth(_pieces(), 15.0)
  assert sum(key_ok) > len(key_ok) / 2 and sum(tempo_ok) > len(tempo_ok) / 2, (key_ok, tempo_ok)


@needs_synth
def test_transposition_moves_the_estimated_key():
  """One chorale on piano at three transpositions: the estimated tonic moves with the transposition
  (the ground truth moves alike; that the two agree is the test above)."""
  piece = _pieces("bach")[0]
  sf = render.find_soundfont("timgm6mb")
  estimates = []
  for shift in (0, 5, -3):
    choices = render.Choices(program=PIANO, bpm=96, transpose=shift, octaves=0, velocity=90)
    out = render.render(piece, choices, soundfont_path=sf, max_seconds=8.0)
    assert out.tonic_pc == (piece.tonic_pc + shift) % 12
    estimates.append(attributes.estimate_key(out.audio_n, SR))
  assert [(t - estimates[0][0]) % 12 for t, _ in estimates] == [0, 5, 9], estimates
  assert len({m for _, m in estimates}) == 1, estimates


def _stand_in(notes_nf, meter="4/4", beat_q=1.0) -> scores.Piece:
  return scores.Piece(ref=scores.PieceRef("stand-in"), title="", composer="",
                      notes_nf=np.asarray(notes_nf, np.float64), meter=meter, beat_q=beat_q,
                      tonic_pc=0, mode="major", key_source="score", num_parts=1)


def test_first_beat_follows_the_pickup():
  """An eighth-note pickup before the barline puts the first beat an eighth in; 6/8's beat is a
  dotted quarter; a piece with no note on a beat has no grid."""
  choices = render.Choices(program=PIANO, bpm=120, transpose=0, octaves=0, velocity=90)
  pickup = _stand_in([(0, 0.5, 60, 0, 0.25), (0.5, 1, 62, 0, 1.0), (1.5, 1, 64, 0, 0.5)])
  assert render.first_beat_seconds(pickup, choices) == pytest.approx(0.25)   # 0.5 s a quarter
  jig = _stand_in([(0, 0.5, 60, 0, 0.25), (0.5, 0.5, 62, 0, 0.25), (1.0, 1.5, 64, 0, 1.0)],
                  "6/8", 1.5)   # two eighths before the barline; 120 dotted quarters a minute
  assert render.first_beat_seconds(jig, choices) == pytest.approx(1.0 / 3.0)
  assert render.first_beat_seconds(_stand_in([(0, 1, 60, 0, 0.125)]), choices) is None


@needs_synth
def test_first_beat_grid_falls_on_the_rendered_onsets():
  """The beat grid (first_beat, then every 60 / bpm s) of a hornpipe with an eighth-note pickup and
  of a chorale, rendered on piano: the audio's onset strength is higher on it than on the grid moved
  by any multiple of an eighth of a beat (half a beat: the hornpipe's pickup ignored)."""
  from musicgen_jax.conditioners import tempo
  for piece in (_pieces("ryansMammoth")[0], _pieces("bach")[0]):
    choices = render.Choices(program=PIANO, bpm=100, transpose=0, octaves=0, velocity=90)
    out = render.render(piece, choices, soundfont_path=render.find_soundfont("timgm6mb"),
                        max_seconds=8.0)
    first = render.first_beat_seconds(piece, choices)
    env = librosa.onset.onset_strength(y=out.audio_n / 32768.0, sr=SR, hop_length=320)
    times = librosa.frames_to_time(np.arange(env.size), sr=SR, hop_length=320)
    phase = np.asarray([tempo.beat_phase(t, first, choices.bpm) for t in times])
    strength = [env[np.abs((phase - shift + 0.5) % 1 - 0.5) < 0.06].mean()
                for shift in np.arange(8) / 8]
    assert strength[0] > 1.1 * max(strength[1:]), (piece.ref.piece_id, first, strength)


@needs_synth
def test_melody_line_follows_the_audio():
  """A monophonic fiddle tune: the stored melody's pitch class is the loudest chroma bin of the
  audio in most sounding frames, and clearly less often once the melody moves in time or pitch."""
  piece = _pieces("ryansMammoth")[0]
  choices = render.Choices(program=73, bpm=100, transpose=2, octaves=0, velocity=90)  # flute
  out = render.render(piece, choices, soundfont_path=render.find_soundfont("timgm6mb"),
                      max_seconds=6.0, frame_rate=50.0)
  assert out.melody_t.shape == (int(np.ceil(out.audio_n.size * 50 / SR)),)
  chroma_ct = librosa.feature.chroma_cqt(y=out.audio_n / 32768.0, sr=SR, hop_length=640)
  loudest_t = chroma_ct.argmax(axis=0)[: out.melody_t.size]

  def agreement(melody_t):
    on = melody_t[: loudest_t.size] >= 0
    return np.mean(melody_t[: loudest_t.size][on] % 12 == loudest_t[on])

  aligned = agreement(out.melody_t)
  late = max(agreement(np.roll(out.melody_t, frames)) for frames in (-50, -25, -15, 15, 25, 50))
  sharp = agreement(np.where(out.melody_t >= 0, out.melody_t + 1, -1))
  assert aligned > 0.6 and aligned > late + 0.3 and sharp < 0.2, (aligned, late, sharp)


def test_melody_line_is_the_skyline():
  notes = np.array([[0.0, 1.0, 60], [0.5, 1.0, 67], [2.0, 0.5, 55]])  # onset s, duration s, pitch
  line = render.melody_line(notes, num_frames=30, frame_rate=10.0)
  expect = np.full(30, -1)
  expect[0:5], expect[5:15], expect[20:25] = 60, 67, 55
  np.testing.assert_array_equal(line, expect)


# --- the dataset ----------------------------------------------------------------------------------

@needs_synth
def test_splits_are_by_piece_and_captions_state_the_ground_truth(tiny):
  examples = _examples(tiny)
  split_of_piece = {}
  for split, items in examples.items():
    for ex in items:
      pid = _text(ex["piece_id"])
      assert split_of_piece.setdefault(pid, split) == split, f"{pid} in two splits"
      meta = json.loads(_text(ex["metadata"]))
      assert meta["piece_id"] == pid and meta["bpm"] == ex["bpm"]
      caption = _text(ex["caption"])
      modes = "|".join(scores.MAJOR_MODES + scores.MINOR_MODES)
      for tonic, mode in re.findall(rf"\b([A-G](?:#|b|-sharp|-flat)?) ({modes})\b", caption):
        tonic = tonic.replace("-sharp", "#").replace("-flat", "b")
        assert (tonic, mode) == (_text(ex["key_tonic"]), _text(ex["key_mode"])), caption
      assert _text(ex["instrument"]) in caption, caption
      if "bpm" in caption.lower():
        assert f"{ex['bpm']} bpm" in caption.lower(), caption
      assert ex["audio"].dtype == np.int16 and ex["audio"].shape[0] == 1
  renderings = [_text(ex["piece_id"]) for items in examples.values() for ex in items]
  assert all(renderings.count(p) == 2 for p in renderings)       # both renderings, same split
  assert len(split_of_piece) == 6 and "validation" in examples
  for pid, split in split_of_piece.items():
    if split != "validation":                                     # validation may hold a moved one
      assert split == corpus.split_of(pid)


def test_split_is_a_stable_function_of_the_piece():
  pieces, _ = scores.list_pieces(["bach", "essenFolksong"])
  ids = [r.piece_id for refs in pieces.values() for r in refs]
  splits = [corpus.split_of(p) for p in ids]
  share = {s: splits.count(s) / len(ids) for s in corpus.SPLITS}
  assert 0.03 < share["test"] < 0.07 and 0.03 < share["validation"] < 0.07, share
  assert corpus.split_of("bach/bwv18.5-lz.mxl") == corpus.split_of("bach/bwv18.5-w.mxl")
  assert splits == [corpus.split_of(p) for p in ids]


def test_features_match_the_manifest_builder():
  ours, theirs = corpus.features(1), manifest.audio_features(1)
  for name in ("audio", "caption", "metadata"):
    assert repr(ours[name]) == repr(theirs[name]), name


@needs_synth
def test_same_seed_same_renderings_other_seed_other_choices():
  ref = next(r for r in _tiny_pieces() if r.collection == "essenFolksong")
  cfg = corpus.make_config("tiny", max_seconds=1.5, renderings=2)
  sf, fs = render.find_soundfont("timgm6mb"), render.find_fluidsynth()
  first, _ = corpus.render_piece(ref, cfg, sf, fs)
  again, _ = corpus.render_piece(ref, cfg, sf, fs)
  other, _ = corpus.render_piece(ref, dataclasses.replace(cfg, seed=1), sf, fs)
  assert len(first) == 2
  for (k1, a), (k2, b) in zip(first, again):
    assert k1 == k2 and a["caption"] == b["caption"] and a["metadata"] == b["metadata"]
    np.testing.assert_array_equal(a["audio"], b["audio"])
  pick = lambda exs: [(e["program"], e["bpm"], e["transpose"], e["caption"])  # noqa: E731
                      for _, e in exs]
  assert pick(first) != pick(other)


def test_captions_vary_and_name_the_instrument():
  from musicgen_jax.data import captions
  piece = _pieces("essenFolksong")[0]
  texts = set()
  for i in range(40):
    rng = np.random.default_rng(i)
    choices = render.choose(piece, rng)
    text = captions.caption(piece, choices, (piece.tonic_pc + choices.transpose) % 12, rng)
    assert choices.instrument in text
    texts.add(text.replace(choices.instrument, "X"))
  assert len(texts) > 30


# --- missing tools --------------------------------------------------------------------------------

def test_missing_fluidsynth_is_one_line_naming_the_package(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("PATH", str(tmp_path))
  with pytest.raises(ValueError, match="install the Debian package `fluidsynth`") as e:
    render.find_fluidsynth()
  assert "\n" not in str(e.value)
  with pytest.raises(SystemExit) as exit_:
    corpus.main(["--out", str(tmp_path / "c"), "--preset", "tiny"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.endswith("error: fluidsynth not found on PATH: install the Debian package "
                      "`fluidsynth` (apt-get install -y --no-install-recommends fluidsynth)"), err


def test_missing_soundfont_names_its_package(tmp_path, monkeypatch):
  missing = (str(tmp_path / "none.sf2"), "timgm6mb-soundfont")
  monkeypatch.setitem(render.SOUNDFONTS, "timgm6mb", missing)
  with pytest.raises(ValueError, match="install the Debian package `timgm6mb-soundfont`"):
    render.find_soundfont("timgm6mb")


# --- the control report end to end ----------------------------------------------------------------

_CADENCE = {"major": ((0, 4, 7, 12), (5, 9, 12, 17), (7, 11, 14, 19), (0, 4, 7, 12)),
            "minor": ((0, 3, 7, 12), (5, 8, 12, 17), (7, 11, 14, 19), (0, 3, 7, 12))}


class _Renders:
  """A stand-in model for control.run whose "codes" are the audio itself (an identity codec) and
  whose samples are arpeggiated I-IV-V-I bars in quarter notes, accented on the downbeat, rendered
  with FluidSynth: in the key, at the tempo and on the instrument that the prompt names when
  `obedient` (C major, 100 bpm, piano where it names none), else always C major, 100 bpm, piano."""
  frame_rate = 50.0

  def __init__(self, obedient: bool):
    from types import SimpleNamespace
    from musicgen_jax import sampling
    self.obedient, self.sample_rate = obedient, SR
    self.lm_cfg = SimpleNamespace(melody=False)
    self.settings = sampling.SamplingSettings()
    self._sf, self._clips = render.find_soundfont("timgm6mb"), {}

  def _clip(self, prompt: str, seconds: float) -> np.ndarray:
    from musicgen_jax.eval import control
    key = re.search(r" in ([A-G][#b]?) (major|minor) on ", prompt) if self.obedient else None
    bpm = re.search(r"\b(\d+) bpm\b", prompt) if self.obedient else None
    inst = re.search(r" on (.+?)(?:, |$)", prompt) if self.obedient else None
    tonic, mode = (control._pc(key[1]), key[2]) if key else (0, "major")
    program, _, _, lo, hi = next((i for i in render.INSTRUMENTS if inst and i[1] == inst[1]),
                                 render.INSTRUMENTS[0])
    notes = [(4 * bar + beat, 0.95, 60 + step, 0, 1.0 if beat == 0 else 0.0)
             for bar in range(int(seconds) + 1)
             for beat, step in enumerate(_CADENCE[mode][bar % 4])]
    piece = scores.Piece(ref=scores.PieceRef("stand-in"), title="", composer="",
                         notes_nf=np.array(notes, np.float64), meter="4/4", beat_q=1.0,
                         tonic_pc=0, mode=mode, key_source="score", num_parts=1)
    octave = min(range(-3, 4), key=lambda k: (not lo <= 60 + tonic + 12 * k <= hi - 19, abs(k)))
    choices = render.Choices(program=program, bpm=int(bpm[1]) if bpm else 100, transpose=tonic,
                             octaves=octave, velocity=100)
    out = render.render(piece, choices, soundfont_path=self._sf, sample_rate=SR,
                        max_seconds=seconds)
    audio = manifest.from_int16(out.audio_n[None]).mean(axis=0)
    return np.pad(audio, (0, int(seconds * SR) - audio.size))[:int(seconds * SR)]

  def generate(self, prompts, duration, settings, seed, chroma=None):
    for p in set(prompts):   # once each: batches are padded with repeats of a prompt
      if (p, duration) not in self._clips:
        self._clips[p, duration] = self._clip(p, duration)
    return np.stack([self._clips[p, duration] for p in prompts])[:, None]

  def encode_audio(self, audio):
    return np.asarray(audio, np.float32)

  def decode(self, codes):
    return codes

  def frame_nll(self, codes, texts, chroma, beat_phase=0.0):   # as likely under any caption
    frames = int(codes.shape[-1] / SR * self.frame_rate)
    return np.ones((len(texts), frames)), np.full((frames,), 4)


@pytest.fixture(scope="module")
def tiny_held_out(tmp_path_factory) -> str:
  """The tiny preset with a third of its pieces held out as the test split (control.run's real
  recordings), one 3 s rendering each. -> the corpus root."""
  if not HAVE_SYNTH:
    pytest.skip("needs fluidsynth and timgm6mb-soundfont")
  config = ml_collections.ConfigDict({"data": {
      "kind": "corpus", "corpus": "tiny", "min_seconds": 1.0,
      "corpus_options": {"renderings": 1, "max_seconds": 3.0, "test_fraction": 0.34}}})
  return corpus.prepare(config, str(tmp_path_factory.mktemp("cache")), sample_rate=SR, channels=1,
                        build=True)


@needs_synth
def test_control_report_scores_a_model_that_follows_prompts_and_one_that_ignores_them(
    tiny_held_out):
  """control.run end to end on the tiny corpus: a model that renders what each prompt names is
  matched on the named key and tempo and not on the changed ones, and its tempo rises with the
  prompt's; one that plays the same thing whatever the prompt scores exactly alike on the named,
  changed and removed prompts (nothing of the truth leaks into the measurement)."""
  from musicgen_jax.eval import control
  logged = []
  model = _Renders(True)
  follows = control.run(model, tiny_held_out, samples=8, duration=5.0, seed=3, log=logged.append,
                        settings=model.settings)
  key, tempo = follows["attributes"]["key"], follows["attributes"]["tempo"]
  assert key["named"] >= 0.75 and key["changed"] <= 0.125 and key["removed"] <= 0.25, key
  assert tempo["named"] >= 0.75 and tempo["changed"] <= 0.25, tempo
  assert tempo["rank_correlation"]["spearman"] > 0.6 and tempo["rank_correlation"]["clips"] == 16
  family = follows["attributes"]["family"]
  assert family["named"] >= family["changed"]
  assert follows["likelihood"]["windows"]["clip"]["key"]["ce_increase"] == 0.0
  assert any(line.startswith("key: ") for line in logged)
  row = f"| key | {key['named']:.2f} | {key['changed']:.2f} | {key['removed']:.2f} |"
  assert row in control.markdown(follows)
  model = _Renders(False)
  ignores = control.run(model, tiny_held_out, samples=8, duration=5.0, seed=3, log=lambda _: None,
                        settings=model.settings)
  for attr, row in ignores["attributes"].items():
    assert row["named"] == row["changed"] == row.get("removed", row["named"]), (attr, row)
  assert ignores["attributes"]["key"]["named"] < key["named"]
  assert ignores["attributes"]["tempo"]["named"] < tempo["named"]

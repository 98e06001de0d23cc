"""The controllability measurements: the family classifier, the prompt sets, the melody score."""
from __future__ import annotations

import numpy as np
import pytest

from musicgen_jax.data import render
from musicgen_jax.eval import classifier, control

SR = 16000


def _tone(freq, seconds=1.0, harmonics=1, rng=None):
  t = np.arange(int(seconds * SR)) / SR
  x = sum(np.sin(2 * np.pi * freq * h * t) / h for h in range(1, harmonics + 1))
  if rng is not None:
    x = x + 0.05 * rng.standard_normal(len(t))
  return (0.3 * x).astype(np.float32)


def test_classifier_separates_timbres_and_round_trips(tmp_path):
  """Pure tones against tones with rich harmonics: held-out accuracy 1, chance otherwise; the saved
  classifier gives the same probabilities (arrays only, no pickle)."""
  rng = np.random.default_rng(0)
  def data(n):
    x, y = [], []
    for _ in range(n):
      f = float(rng.uniform(200, 800))
      x += [classifier.features(_tone(f, rng=rng), SR),
            classifier.features(_tone(f, harmonics=8, rng=rng), SR)]
      y += ["pure", "rich"]
    return np.stack(x), y
  x, y = data(12)
  clf = classifier.Classifier.fit(x, y, steps=300)
  xt, yt = data(6)
  assert clf.accuracy(xt, yt) == 1.0
  assert clf.accuracy(xt, yt[::-1]) < 1.0        # it can be wrong
  path = str(tmp_path / "clf.npz")
  clf.save(path)
  back = classifier.Classifier.load(path)
  assert back.classes == clf.classes
  np.testing.assert_allclose(back.probabilities(xt), clf.probabilities(xt), rtol=1e-6)
  assert clf.embed(xt).shape == (len(yt), 128)


def test_prompt_sets_change_only_their_attribute():
  sets = control.attribute_prompts(20, np.random.default_rng(1))
  key, tempo, family = sets["key"], sets["tempo"], sets["family"]
  for i, (pc, mode) in enumerate(key["truth"]):
    named, changed, removed = key["named"][i], key["changed"][i], key["removed"][i]
    assert f" {mode}" in named and named != changed and " in " not in removed.split(" on ")[0]
    assert named.split(" on ")[1] == changed.split(" on ")[1] == removed.split(" on ")[1]
  for i, bpm in enumerate(tempo["truth"]):
    assert tempo["named"][i].endswith(f"{bpm} bpm") and not tempo["removed"][i].endswith("bpm")
    other = int(tempo["changed"][i].rsplit(", ", 1)[1].split()[0])
    assert abs(other / bpm - 1) > 0.3 and tempo["changed_bpm"][i] == other
  fams = {name: fam for _, name, fam, _, _ in render.INSTRUMENTS}
  for i, fam in enumerate(family["truth"]):
    inst = family["changed"][i].split(" on ")[1].split(",")[0]
    assert fams[inst] != fam and fams[family["named"][i].split(" on ")[1].split(",")[0]] == fam


def test_melody_similarity_is_one_for_the_melody_itself_and_low_for_another():
  from musicgen_jax.conditioners import melody as melody_lib
  sr = 32000
  a4 = np.sin(2 * np.pi * 440 * np.arange(3 * sr) / sr)
  c5 = np.sin(2 * np.pi * 523.25 * np.arange(3 * sr) / sr)
  ref = np.asarray(melody_lib.chromagram(a4[None].astype(np.float32), sr))[0]
  assert control.melody_similarity(ref, a4.astype(np.float32), sr) == 1.0
  assert control.melody_similarity(ref, c5.astype(np.float32), sr) == 0.0


def test_estimates_of_a_set_of_clips_are_summarised_and_matched():
  """control.json says what the estimators made of the generated clips (a model whose samples all
  sound alike shows one value), beside the match rates computed from the same estimates."""
  sr = 22050
  chord = lambda pcs: sum(_tone_at(440.0 * 2 ** ((pc - 9) / 12), sr) for pc in pcs)  # noqa: E731
  clips = [chord((7, 11, 2)), chord((7, 11, 2)), chord((0, 4, 7))]   # G major twice, C major
  keys = control.estimate("key", clips, sr, None)
  assert keys[0] == keys[1] == (7, "major") and keys[2] == (0, "major")
  assert control.matches("key", keys, [(7, "major"), (2, "minor"), (0, "major")]) == [True, False, True]
  assert control.spread("key", keys) == {"most_common": [["G major", 2], ["C major", 1]],
                                         "distinct": 2}
  families = ["synth pad"] * 3 + ["organ", "brass", "organ"]
  assert control.spread("family", families, top=2) == {
      "most_common": [["synth pad", 3], ["organ", 2]], "distinct": 3}
  bpm = [60.0, 90.0, 120.0, 150.0, 180.0]
  assert control.spread("tempo", bpm) == {"bpm_quartiles": [90.0, 120.0, 150.0]}
  assert control.matches("tempo", [120.0, 61.0], [60.0, 90.0]) == [True, False]
  result = {"samples": 3, "duration": 8.0, "real_test_renderings": 3,
            "classifier": {"test_accuracy": 1.0, "test_clips": 3, "chance": 0.1},
            "attributes": {"key": {"ceiling_real_audio": 1.0, "ceiling_through_codec": 1.0,
                                   "named": 2 / 3, "estimates": {"named": control.spread("key", keys)}},
                           "tempo": {"ceiling_real_audio": 1.0, "ceiling_through_codec": 1.0,
                                     "named": 0.2, "estimates": {"named": control.spread("tempo", bpm)}}}}
  text = control.markdown(result)
  assert "Spearman" not in text                    # control.json files from before the measure
  result["attributes"]["tempo"]["rank_correlation"] = control.rank_correlation(
      [60, 90, 120, 150, 80], bpm)     # 80 bpm estimated as 180: rho = 1 - 6 * 12 / (5 * 24)
  result["attributes"]["tempo"]["rank_correlation_real_audio"] = control.rank_correlation(bpm, bpm)
  text = control.markdown(result)
  assert "over the 5 'named' and 'changed' clips: Spearman's rank correlation 0.40 (one-sided " \
         "p = 0.25); the true tempo of the 5 held-out renderings against the estimate: 1.00." in text
  assert control.rank_correlation([150, 120, 90, 60, 30], bpm)["spearman"] == pytest.approx(-1.0)
  assert "key estimator made of the clips of the 'named' prompts: 2 distinct, the most common " \
         "G major 2, C major 1." in text
  key_row = result["attributes"]["key"]
  key_row["estimates"].update(real_audio=control.spread("key", keys[2:]),
                              through_codec=control.spread("key", keys[:2]))
  assert "the most common G major 2, C major 1; of the held-out renderings: 1 distinct, the most " \
         "common C major 1; of their codec reconstructions: 1 distinct, the most common G major 2." \
         in control.markdown(result)
  assert "120 bpm in the median, quartiles 90 and 150" in text


def _tone_at(freq, sr, seconds=4.0):
  t = np.arange(int(seconds * sr)) / sr
  return (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_pitch_class_spellings():
  assert [control._pc(n) for n in ("C", "F#", "Bb", "E-", "B", "Cb")] == [0, 6, 10, 3, 11, 11]


def test_control_cli_refuses_bad_input_in_one_line_before_loading(tmp_path, capsys):
  cases = [(["--corpus", str(tmp_path), "--top-k", "0"], "top-k must be a positive integer"),
           (["--corpus", str(tmp_path), "--temperature", "-1"], "temperature must be"),
           (["--corpus", str(tmp_path / "nothing-*")], "matches 0 directories"),
           (["--corpus", str(tmp_path)], "is not a built corpus"),
           (["--corpus", str(tmp_path), "--samples", "4"], "too few"),
           (["--corpus", str(tmp_path), "--duration", "nan"], "--duration must be a finite"),
           (["--corpus", str(tmp_path), "--seed", "-1"], "--seed must be >= 0"),
           (["--corpus", str(tmp_path), "--out", str(tmp_path / "a_file" / "out")], "is a file")]
  (tmp_path / "a_file").write_text("")
  for argv, message in cases:
    assert control.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)


class _ReadsTheKeyOnlyWithoutMelody:
  """A stand-in for the model in control.likelihood: every frame costs 1 nat, 0.1 more with the
  null melody, and 0.3 more again for a caption other than the recording's own when the melody is
  the null one (a model that reads the text's key only when no melody gives it)."""
  sample_rate, frame_rate = 32000, 50.0

  def __init__(self, own_captions):
    from types import SimpleNamespace
    self.lm_cfg = SimpleNamespace(melody=True)
    self.own = set(own_captions)

  def encode_audio(self, audio):
    return np.zeros((len(audio), 4, int(audio.shape[-1] / self.sample_rate * self.frame_rate)),
                    np.int32)

  def frame_nll(self, codes, texts, chroma, beat_phase=0.0):
    from musicgen_jax.conditioners import melody as melody_lib
    null = np.all(chroma == melody_lib.null_chroma(1, chroma.shape[1]), axis=(1, 2))
    other = np.array([t not in self.own for t in texts])
    per_item = 1.0 + 0.1 * null + 0.3 * (null & other)
    frames = codes.shape[-1]
    return np.repeat(per_item[:, None], frames, axis=1) * 4, np.full((frames,), 4)


def test_likelihood_scores_the_text_also_without_the_melody():
  """For a melody model each attribute is probed twice: with the recording's own melody, and with
  none (as sampling without --melody runs), each against the caption scored the same way."""
  name, family = render.INSTRUMENTS[0][1:3]
  items = []
  for i, (tonic, bpm) in enumerate([("G", 80), ("D", 120), ("F", 96)]):
    items.append(dict(caption=f"a chorale in {tonic} major played by a {name}, {bpm} bpm",
                      key_mode="major", key_tonic=tonic, bpm=bpm, instrument=name, family=family,
                      audio=_tone(440.0 * 2 ** (i / 12), seconds=2.0).repeat(2)))
  model = _ReadsTheKeyOnlyWithoutMelody(e["caption"] for e in items)
  rows = control.likelihood(model, items, seed=0, seconds=2.0, batch=2)["windows"]["clip"]
  for attr in ("key", "tempo", "family"):
    assert rows[attr]["named"] == pytest.approx(1.0) and rows[attr]["ce_increase"] == 0.0
    no_melody = rows[f"{attr}, no melody"]
    assert no_melody["items"] == 3 and no_melody["named"] == pytest.approx(1.1)
    assert no_melody["ce_increase"] == pytest.approx(0.3) and no_melody["named_more_likely"] == 1.0
  assert rows["melody"]["ce_increase"] == 0.0
  assert rows["all (no condition)"]["ce_increase"] == pytest.approx(0.4)


def test_likelihood_gives_each_recording_its_own_beat_phase():
  """A beat-clock model is scored with each recording's beat phase at its first frame (from the
  corpus's first_beat and bpm), under its own caption and every changed one; none known: 0."""
  name, family = render.INSTRUMENTS[0][1:3]
  items = []
  for i, (tonic, bpm, first) in enumerate([("G", 80, 0.3), ("D", 120, None), ("F", 96, 0.5)]):
    items.append(dict(caption=f"a chorale in {tonic} major played by a {name}, {bpm} bpm",
                      key_mode="major", key_tonic=tonic, bpm=bpm, instrument=name, family=family,
                      first_beat=first, audio=_tone(440.0 * 2 ** (i / 12), seconds=2.0).repeat(2)))
  # At time 0, before the first beat: 0.3 s at 80 bpm is 0.4 beats, so the phase is 0.6; 0.5 s
  # at 96 bpm is 0.8 beats, phase 0.2.
  want = {0: 0.6, 1: 0.0, 2: 0.2}
  model = _ReadsTheKeyOnlyWithoutMelody(e["caption"] for e in items)
  seen = []
  frame_nll = model.frame_nll
  model.frame_nll = lambda codes, texts, chroma, beat_phase=0.0: (
      seen.append((list(texts), np.asarray(beat_phase))) or frame_nll(codes, texts, chroma))
  control.likelihood(model, items, seed=0, seconds=2.0, batch=2)
  own = {e["caption"]: i for i, e in enumerate(items)}
  checked = 0
  for texts, phase in seen:
    for text, p in zip(texts, phase):
      if text in own:
        assert p == pytest.approx(want[own[text]]), (text, p)
        checked += 1
  assert checked >= 2 * len(items)   # own caption, with and without the melody
  assert {round(float(p), 6) for _, ph in seen for p in ph} <= {0.6, 0.0, 0.2}

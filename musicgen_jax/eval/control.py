"""Does the audio follow the prompt? Key, tempo, instrument family and melody, measured on samples.

    python -m musicgen_jax.eval.control --corpus DATA_DIR [--checkpoint DIR] [--samples 48]
        [--duration 8] [--seed 0] [--out runs/control]
        [--temperature T] [--top-k K] [--top-p P] [--cfg C]

Samples are drawn with the model's own sampling settings (its config's `sampling` section) unless
the flags, named as in sample.py, override them; the settings used are recorded in control.json.

For each attribute, `--samples` prompts in the corpus's caption style name a value drawn at random
(a key of the 24, a tempo in 60-150 bpm, one of the corpus's instruments). Each prompt is sampled
three ways: as it is ("named"), with that attribute changed to another value ("changed": the key a
tritone away, the tempo times 1.5 or divided by it, an instrument of another family) and with the
attribute left out ("removed"; not for the instrument, which every corpus caption names). The
attribute is estimated from each generated clip (key: chroma profiles; tempo: librosa's beat tracker
within 8%, half and double accepted; family: a classifier trained on the corpus) and compared with
the value of the named prompt. A model that follows its prompts matches far more often when named
than changed or removed. For the tempo, the rank correlation between the bpm the prompt names
and the estimate, over the 'named' and 'changed' clips, shows a rough following that has not yet
reached the 8% tolerance; the tracker's octave errors (a 6/8 tune followed in eighths) weaken it,
on real recordings too, whose figure is given beside it. The same estimators on the corpus's
held-out test renderings, and on what the model's codec makes of them, give the ceilings: how
often they are right on real audio, and on the audio a perfect LM would generate through this
codec. The family classifier learns from codec
reconstructions as well as clean renderings (a classifier of clean audio alone places codec audio
by its artefacts). Beside each share, control.json keeps what the estimator made of the clips (the
most common keys and families, the tempo's quartiles): samples that all sound alike show one value
whatever the prompt. The same for the held-out renderings and their codec reconstructions shows a
lean that the codec itself gives (e.g. toward one key).

Likelihood: the held-out renderings' codes, teacher-forced, under their own caption and under the
caption with one attribute changed, with the recording's melody and with none (and another
melody, and no condition). This needs no sampling
and no estimator: it says whether the LM uses each condition at all (`likelihood`).

Melody: held-out test renderings give a melody (their chroma) and a caption; the model samples with
the melody and without it (text only). The score is the chroma cosine similarity between the melody
and the generated audio (the paper's measure: argmax chroma per frame, i.e. the share of frames
whose loudest pitch class agrees).

Writes control.json and control.md in --out and prints the table. DATA_DIR is the corpus root that
train.py renders (runs/demo-data/corpus-*, the directory holding counts.json). With
`--listening DIR` it writes listening material instead (docs/samples: generated clips from held-out
captions next to the real renderings, with spectrograms).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import sys
import time

import numpy as np

from musicgen_jax.conditioners import tempo
from musicgen_jax.data import captions, manifest, render, scores
from musicgen_jax.eval import attributes
from musicgen_jax.eval.classifier import Classifier, features
from musicgen_jax.eval.reference import derangement, excerpt

KEYS = [(pc, mode) for mode in ("major", "minor") for pc in range(12)]
WHAT = ("a traditional jig", "a Bach chorale", "an Irish reel", "a German folk song",
        "a Scottish air", "a Renaissance motet by Palestrina", "a traditional hornpipe")
CLIP_SECONDS = 8.0


def corpus_split(root: str, split: str, limit: int | None = None) -> list[dict]:
  """Examples of one split of the rendered corpus (audio as float32 [N], mono)."""
  import tensorflow_datasets as tfds
  counts = manifest.read_counts(root)
  if counts is None:
    raise ValueError(f"{root} is not a built corpus (no counts.json): pass the directory that "
                     "train.py rendered, e.g. runs/demo-data/corpus-*")
  source = tfds.builder_from_directory(manifest.dataset_dir(root, counts)).as_data_source(split)
  n = len(source) if limit is None else min(limit, len(source))
  out = []
  for i in range(n):
    ex = source[i]
    audio = manifest.from_int16(np.asarray(ex["audio"])).mean(axis=0)
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
    out.append({"audio": audio, "caption": text(ex["caption"]), "family": text(ex["family"]),
                "key_tonic": text(ex["key_tonic"]), "key_mode": text(ex["key_mode"]),
                "bpm": int(ex["bpm"]), "meter": text(ex["meter"]),
                "instrument": text(ex["instrument"]),
                "first_beat": json.loads(text(ex["metadata"])).get("first_beat")})
  return out


_NATURALS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


def _pc(name: str) -> int:
  """Pitch class of a tonic spelled 'F#', 'Bb', 'E-' (music21's flat) -> 0..11."""
  acc = name[1:]
  return (_NATURALS[name[0].upper()] + acc.count("#") - acc.count("b") - acc.count("-")) % 12


def _batches(clips, batch: int):
  """Mono clips of one length -> (audio [batch, 1, N], how many are real) per batch, the last one
  zero-padded: one compiled codec shape."""
  for s in range(0, len(clips), batch):
    part = np.stack(clips[s:s + batch])[:, None]
    yield np.concatenate([part, np.zeros((batch - len(part),) + part.shape[1:], np.float32)]), len(part)


def codec_roundtrip(model, clips: list[np.ndarray], batch: int = 8) -> list[np.ndarray]:
  """Mono clips of one length -> what the model's codec makes of each (encoded with the LM's
  codebooks, decoded): the audio a perfect LM would generate for them."""
  return [a.mean(axis=0) for audio, n in _batches(clips, batch)
          for a in model.decode(model.encode_audio(audio))[:n]]


def train_classifier(root: str, sample_rate: int, rng: np.random.Generator, test: list[dict],
                     crops_per_item: int = 2, roundtrip=None,
                     roundtrip_every: int = 4) -> tuple[Classifier, dict]:
  """The family classifier on CLIP_SECONDS crops of the train split; its accuracy on `test` (the
  test split's items).

  Generated audio comes out of a codec, whose artefacts move the log-mel statistics far enough that
  a classifier trained on clean renderings alone places codec audio by its artefacts (on the
  shipped model's codec: 0.96 accuracy on clean held-out clips, 0.17 on their reconstructions). With
  `roundtrip` (clips -> their codec reconstructions) every `roundtrip_every`-th training crop is
  also added as reconstructed, with the same label, and the accuracy is reported on the
  reconstructed test clips too.
  """
  clip = int(CLIP_SECONDS * sample_rate)

  def crops(items, n):
    out = []
    for it in items:
      for _ in range(n):
        start = int(rng.integers(0, max(len(it["audio"]) - clip, 0) + 1))
        out.append((excerpt(it["audio"][start:], clip), it["family"]))
    return out
  train = crops(corpus_split(root, "train"), crops_per_item)
  if roundtrip is not None:
    picked = train[::roundtrip_every]
    train += list(zip(roundtrip([a for a, _ in picked]), [f for _, f in picked]))
  clf = Classifier.fit(np.stack([features(a, sample_rate) for a, _ in train]),
                       [f for _, f in train], classes=render.FAMILIES)
  held = crops(test, 1)
  x_test, y_test = np.stack([features(a, sample_rate) for a, _ in held]), [f for _, f in held]
  info = {"train_clips": len(train), "test_clips": len(held),
          "test_accuracy": clf.accuracy(x_test, y_test), "chance": 1.0 / len(render.FAMILIES)}
  if roundtrip is not None:
    info["train_clips_through_codec"] = len(picked)
    rec = roundtrip([a for a, _ in held])
    info["test_accuracy_through_codec"] = clf.accuracy(
        np.stack([features(a, sample_rate) for a in rec]), y_test)
  return clf, info


def altered_captions(item: dict, rng: np.random.Generator) -> dict[str, str]:
  """{attribute: the item's caption with that attribute changed}, for the attributes the caption
  names: the key a tritone away (same mode and spelling), the tempo times or divided by 1.5 (number
  and word), the instrument swapped for one of another family (with its article)."""
  cap, out = item["caption"], {}
  mode, tonic = item["key_mode"], item["key_tonic"]
  other = scores.tonic_name((_pc(tonic) + 6) % 12, mode)
  for old, new in ((captions.long_spelling(tonic), captions.long_spelling(other)),
                   (tonic, other)):
    if f"{old} {mode}" in cap:
      out["key"] = cap.replace(f"{old} {mode}", f"{new} {mode}", 1)
      break
  bpm = item["bpm"]
  faster = int(round(bpm * 1.5)) if bpm < 100 else int(round(bpm / 1.5))
  tempo = re.sub(rf"\b{bpm} (bpm|BPM)\b", lambda m: f"{faster} {m.group(1)}", cap)
  word, new_word = captions.tempo_word(bpm), captions.tempo_word(faster)
  head, sep, tail = tempo.rpartition(f", {word}")   # the tempo word follows the instrument
  if sep and (not tail or tail.startswith(",")):
    tempo = f"{head}, {new_word}{tail}"
  if tempo != cap:
    out["tempo"] = tempo
  inst, fam = item["instrument"], item["family"]
  others = [name for _, name, f, _, _ in render.INSTRUMENTS if f != fam]
  swap = others[int(rng.integers(len(others)))]
  changed = re.sub(rf"\b(a|an) {re.escape(inst)}\b", captions.article(swap), cap, count=1)
  if changed == cap:
    changed = re.sub(rf"\b{re.escape(inst)}\b", swap, cap, count=1)
  if changed != cap:
    out["family"] = changed
  return out


def _frame_nll(model, codes: np.ndarray, texts: list[str], chroma: np.ndarray | None,
               batch: int, phase: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """model.frame_nll over a list in batches of `batch` (the last one padded: one compiled shape);
  phase: each recording's beat phase at its first frame."""
  out, tokens = [], None
  for s in range(0, len(texts), batch):
    idx = list(range(s, min(s + batch, len(texts))))
    idx += [idx[0]] * (batch - len(idx))
    nll, tokens = model.frame_nll(codes[idx], [texts[i] for i in idx],
                                  None if chroma is None else chroma[idx], phase[idx])
    out.append(nll[:min(batch, len(texts) - s)])
  return np.concatenate(out), tokens


def likelihood(model, items: list[dict], seed: int, seconds: float = CLIP_SECONDS,
               batch: int = 8) -> dict:
  """Does the model use each condition of its prompt? Teacher-forced, on held-out recordings.

  Each item (a test rendering: mono audio at the model's rate, caption and ground truth) is cut to
  `seconds`, encoded by the model's codec, and scored by model.token_ce (nats per token) under its
  own caption ("named") and under the caption with one attribute changed (altered_captions); for
  melody models also with another item's melody instead of its own, and with no condition at all,
  and each caption and its changes once more with no melody (", no melody": as sampling without
  --melody runs, where the melody cannot tell the model the key or the tempo). A beat-clock model
  gets the recording's own beat phase (from its first_beat) with every caption.
  A model that uses a condition finds the recording less likely when it is changed: the figures
  are the mean CE increase and the share of items whose own condition gives the lower CE, over the
  whole clip and over its first second alone (where the prompt is all the model has to go on; later
  the audio so far tells the model much of what the prompt does). Unlike the sampled figures this
  needs no estimator and no codec decoder, so it isolates what the LM has learnt.
  """
  from musicgen_jax.conditioners import melody as melody_lib
  sr, clip = model.sample_rate, int(seconds * model.sample_rate)
  rng = np.random.default_rng(seed)
  audio = [excerpt(e["audio"], clip) for e in items]
  codes = np.concatenate([model.encode_audio(part)[:n] for part, n in _batches(audio, batch)])
  chroma = None
  if model.lm_cfg.melody:
    frames = melody_lib.num_chroma_frames(clip)
    chroma = np.stack([melody_lib.melody_condition(a[None], sr, frames, sr) for a in audio])
  everything = list(range(len(items)))
  variants = [altered_captions(e, rng) for e in items]
  phase = np.asarray([0.0 if e.get("first_beat") is None else
                      tempo.beat_phase(0.0, e["first_beat"], e["bpm"]) for e in items])
  # The conditions each caption is scored with: for melody models its own melody, and no melody
  # (the null one), as sampling without --melody runs; there a caption's key and tempo are not
  # given by the melody, so this is where the LM must read them from the text.
  melodies = {"": chroma}
  if chroma is not None:
    melodies[", no melody"] = melody_lib.null_chroma(len(items), chroma.shape[1])
  cases = {}   # name -> (which melodies, items, texts, chroma)
  for which, mel in melodies.items():
    for attr in ("key", "tempo", "family"):
      idx = [i for i, v in enumerate(variants) if attr in v]
      if idx:
        cases[attr + which] = (which, idx, [variants[i][attr] for i in idx],
                               None if mel is None else mel[idx])
  if chroma is not None:
    cases["melody"] = ("", everything, [e["caption"] for e in items],
                       chroma[derangement(len(items), rng)])   # each item gets another's melody
  cases["all (no condition)"] = ("", everything, [""] * len(items), melodies.get(", no melody"))
  result = {"items": len(items), "clip_seconds": seconds, "windows": {}}
  own, tokens = {}, None
  for which, mel in melodies.items():
    own[which], tokens = _frame_nll(model, codes, [e["caption"] for e in items], mel, batch,
                                    phase)
  altered = {name: _frame_nll(model, codes[idx], texts, cond, batch, phase[idx])[0]
             for name, (_, idx, texts, cond) in cases.items()}
  for window, frames in (("clip", codes.shape[-1]), ("first_second", int(round(model.frame_rate)))):
    ce = lambda nll: nll[:, :frames].sum(axis=1) / max(tokens[:frames].sum(), 1)  # noqa: E731
    rows = {}
    for name, (which, idx, _, _) in cases.items():
      named = ce(own[which])[idx]
      d = ce(altered[name]) - named
      rows[name] = {"items": len(idx), "named": float(named.mean()),
                    "changed": float((named + d).mean()), "ce_increase": float(d.mean()),
                    "ce_increase_std": float(d.std()), "named_more_likely": float(np.mean(d > 0))}
    result["windows"][window] = rows
  return result


def _prompt(what: str, key: str, inst: str, tempo: str) -> str:
  parts = [f"{what}{f' in {key}' if key else ''} on {inst}"] + ([tempo] if tempo else [])
  return ", ".join(parts)


def _key_text(pc: int, mode: str) -> str:
  return f"{scores.tonic_name(pc, mode)} {mode}"


def attribute_prompts(n: int, rng: np.random.Generator) -> dict[str, dict]:
  """{attribute: {"truth": [...], "named" / "changed" / "removed": [prompts]}}."""
  insts = [(name, fam) for _, name, fam, _, _ in render.INSTRUMENTS]
  out = {}
  rows = []
  for _ in range(n):
    rows.append(dict(what=WHAT[rng.integers(len(WHAT))], key=KEYS[rng.integers(len(KEYS))],
                     inst=insts[rng.integers(len(insts))], bpm=int(rng.integers(60, 151))))
  key = {"truth": [], "named": [], "changed": [], "removed": []}
  tempo = {"truth": [], "named": [], "changed": [], "removed": [], "changed_bpm": []}
  family = {"truth": [], "named": [], "changed": []}
  for r in rows:
    (pc, mode), (inst, fam), bpm, what = r["key"], r["inst"], r["bpm"], r["what"]
    k, t = _key_text(pc, mode), f"{bpm} bpm"
    key["truth"].append([pc, mode])
    key["named"].append(_prompt(what, k, inst, t))
    key["changed"].append(_prompt(what, _key_text((pc + 6) % 12, mode), inst, t))
    key["removed"].append(_prompt(what, "", inst, t))
    other = int(round(bpm * 1.5)) if bpm < 100 else int(round(bpm / 1.5))
    tempo["truth"].append(bpm)
    tempo["named"].append(_prompt(what, k, inst, t))
    tempo["changed"].append(_prompt(what, k, inst, f"{other} bpm"))
    tempo["changed_bpm"].append(other)
    tempo["removed"].append(_prompt(what, k, inst, ""))
    others = [i for i in insts if i[1] != fam]
    o = others[rng.integers(len(others))]
    family["truth"].append(fam)
    family["named"].append(_prompt(what, k, inst, t))
    family["changed"].append(_prompt(what, k, o[0], t))
  out["key"], out["tempo"], out["family"] = key, tempo, family
  return out


def _generate(model, prompts: list[str], duration: float, seed: int, chroma=None,
              batch: int = 16, settings=None) -> list[np.ndarray]:
  """Mono float32 clips, one per prompt, in batches of `batch` (one compiled shape); `settings`:
  a SamplingSettings (default: the model config's)."""
  from musicgen_jax.eval.evaluate import generate_clips
  return generate_clips(model, prompts, duration, seed, batch, chroma, settings)


def estimate(attr: str, clips: list[np.ndarray], sr: int, clf) -> list:
  """The attribute estimated from each clip: (tonic pitch class, mode), bpm, or a family name."""
  if attr == "key":
    return [attributes.estimate_key(a, sr) for a in clips]
  if attr == "tempo":
    return [attributes.estimate_tempo(a, sr) for a in clips]
  return list(clf.predict(np.stack([features(a, sr) for a in clips])))


def matches(attr: str, estimates: list, truth: list) -> list[bool]:
  if attr == "key":
    return [attributes.key_matches(e, pc, mode) for e, (pc, mode) in zip(estimates, truth)]
  if attr == "tempo":
    return [attributes.tempo_matches(e, bpm) for e, bpm in zip(estimates, truth)]
  return [e == t for e, t in zip(estimates, truth)]


def rank_correlation(prompted_bpm: list, estimates: list) -> dict:
  """Does the estimated tempo rise with the tempo the prompt names? Spearman's rank correlation
  over clips, with its one-sided p-value (no tolerance and no octave folding: a model that follows
  its prompts only roughly shows it here before its clips land within 8%)."""
  from scipy import stats
  rho, p = stats.spearmanr(prompted_bpm, estimates, alternative="greater")
  return {"spearman": float(rho), "p_value": float(p), "clips": len(estimates)}


def spread(attr: str, estimates: list, top: int = 3) -> dict:
  """What the estimator made of a set of clips: the most common keys or families with their
  counts, or the quartiles of the tempo; a model whose samples all sound alike shows one value."""
  if attr == "tempo":
    return {"bpm_quartiles": [round(float(q), 1) for q in np.percentile(estimates, (25, 50, 75))]}
  names = [attributes.key_name(*e) if attr == "key" else str(e) for e in estimates]
  values, counts = np.unique(names, return_counts=True)
  order = np.argsort(-counts, kind="stable")[:top]
  return {"most_common": [[str(values[i]), int(counts[i])] for i in order],
          "distinct": int(len(values))}


def melody_similarity(chroma_ref: np.ndarray, audio: np.ndarray, sr: int) -> float:
  """Share of frames whose argmax pitch class agrees (cosine of one-hot chroma), over the frames
  both have."""
  from musicgen_jax.conditioners import melody as melody_lib
  gen = np.asarray(melody_lib.chromagram(audio[None], sr))[0]
  n = min(len(gen), len(chroma_ref))
  return float(np.mean(np.sum(gen[:n] * chroma_ref[:n], axis=-1)))


def run(model, corpus_root: str, samples: int, duration: float, seed: int,
        log=print, settings=None) -> dict:
  """The measurements (module docstring); samples drawn with `settings` (a SamplingSettings;
  default: the model config's), recorded in the result."""
  if settings is None:
    settings = model.sampling_settings()
  sr = model.sample_rate
  rng = np.random.default_rng(seed)
  t0 = time.time()
  test = corpus_split(corpus_root, "test")
  roundtrip = lambda clips: codec_roundtrip(model, clips)  # noqa: E731
  clf, clf_info = train_classifier(corpus_root, sr, rng, test, roundtrip=roundtrip)
  log(f"family classifier: test accuracy {clf_info['test_accuracy']:.3f} on "
      f"{clf_info['test_clips']} held-out clips, {clf_info['test_accuracy_through_codec']:.3f} on "
      f"their codec reconstructions (chance {clf_info['chance']:.3f})")
  clip = int(CLIP_SECONDS * sr)
  real = [excerpt(e["audio"], clip) for e in test]
  truth = {"key": [(_pc(e["key_tonic"]), e["key_mode"]) for e in test],
           "tempo": [e["bpm"] for e in test], "family": [e["family"] for e in test]}
  through_codec = roundtrip(real)
  real_estimates = {attr: [estimate(attr, clips, sr, clf) for clips in (real, through_codec)]
                    for attr in truth}
  ceiling = {attr: [float(np.mean(matches(attr, found, truth[attr]))) for found in both]
             for attr, both in real_estimates.items()}
  result = {"samples": samples, "duration": duration, "seed": seed, "classifier": clf_info,
            "real_test_renderings": len(test), "sampling": dataclasses.asdict(settings),
            "attributes": {}}
  for attr, sets in attribute_prompts(samples, rng).items():
    row = {"ceiling_real_audio": ceiling[attr][0], "ceiling_through_codec": ceiling[attr][1],
           "estimates": {"real_audio": spread(attr, real_estimates[attr][0]),
                         "through_codec": spread(attr, real_estimates[attr][1])}}
    found = {}
    for variant in ("named", "changed", "removed"):
      if variant in sets:
        clips = _generate(model, sets[variant], duration, seed, settings=settings)
        found[variant] = estimate(attr, clips, sr, clf)
        row[variant] = float(np.mean(matches(attr, found[variant], sets["truth"])))
        row["estimates"][variant] = spread(attr, found[variant])
    if attr == "tempo":
      row["rank_correlation"] = rank_correlation(sets["truth"] + sets["changed_bpm"],
                                                 found["named"] + found["changed"])
      row["rank_correlation_real_audio"] = rank_correlation(truth["tempo"],
                                                            real_estimates["tempo"][0])
    result["attributes"][attr] = row
    log(f"{attr}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)))
  if model.lm_cfg.melody:
    from musicgen_jax.conditioners import melody as melody_lib
    pick = rng.permutation(len(test))[:samples]
    items = [test[i] for i in pick]
    frames = melody_lib.num_chroma_frames(clip)
    chroma = np.stack([melody_lib.melody_condition(e["audio"][:clip][None], sr, frames, sr)
                       for e in items])
    texts = [e["caption"] for e in items]
    with_m = _generate(model, texts, duration, seed, chroma=chroma, settings=settings)
    without = _generate(model, texts, duration, seed, settings=settings)
    sims = [[melody_similarity(c, a, sr) for c, a in zip(chroma, clips)] for clips in
            (with_m, without)]
    codec_sims = [melody_similarity(c, through_codec[i], sr) for c, i in zip(chroma, pick)]
    result["melody"] = {"samples": len(items), "with_melody": float(np.mean(sims[0])),
                        "ceiling_through_codec": float(np.mean(codec_sims)),
                        "with_melody_std": float(np.std(sims[0])),
                        "text_only": float(np.mean(sims[1])),
                        "text_only_std": float(np.std(sims[1]))}
    log(f"melody: chroma cosine {result['melody']['with_melody']:.3f} with the melody, "
        f"{result['melody']['text_only']:.3f} text only ({len(items)} clips)")
  result["likelihood"] = likelihood(model, test, seed)
  for window, rows in result["likelihood"]["windows"].items():
    for attr, row in rows.items():
      log(f"likelihood ({window}), {attr} changed: CE {row['ce_increase']:+.4f} nats, own condition "
          f"more likely for {row['named_more_likely']:.2f} of {row['items']}")
  result["seconds"] = round(time.time() - t0, 1)
  return result


def write_listening(model, corpus_root: str, out_dir: str, count: int = 4, seconds: float = 5.0,
                    seed: int = 0, settings=None) -> list[dict]:
  """Listening material: for `count` held-out test renderings, the real recording and a sample of
  the model from its caption (the first also with its melody), as WAVs with spectrogram PNGs and
  an index (README.md), sampled with `settings` (default: the model config's). -> the index
  entries."""
  from musicgen_jax import audio as audio_lib, plotting
  from musicgen_jax.conditioners import melody as melody_lib
  sr = model.sample_rate
  test = corpus_split(corpus_root, "test")
  rng = np.random.default_rng(seed)
  items = [test[i] for i in sorted(rng.permutation(len(test))[:count])]
  clip = int(seconds * sr)
  texts = [e["caption"] for e in items]
  generated = _generate(model, texts, seconds, seed, batch=len(texts), settings=settings)
  entries = []
  for i, (e, g) in enumerate(zip(items, generated)):
    entries.append({"name": f"{i + 1}_generated", "prompt": e["caption"], "audio": g})
    entries.append({"name": f"{i + 1}_real", "prompt": e["caption"], "audio": e["audio"][:clip]})
  if model.lm_cfg.melody:
    e = items[0]
    frames = melody_lib.num_chroma_frames(clip)
    chroma = melody_lib.melody_condition(e["audio"][:clip][None], sr, frames, sr)[None]
    g = _generate(model, [e["caption"]], seconds, seed, chroma=chroma, batch=1,
                  settings=settings)[0]
    entries.append({"name": "1_generated_with_melody_of_1_real", "prompt": e["caption"],
                    "audio": g})
  os.makedirs(out_dir, exist_ok=True)
  lines = ["# Listening examples", "",
           "Generated by the shipped model (`models/demo`) from the captions of held-out corpus "
           "renderings (test split: pieces the model never saw), each next to that real rendering. "
           f"{seconds:g} s, {sr} Hz mono; made by `python -m musicgen_jax.eval.control "
           "--listening docs/samples`.", "",
           "| file | prompt | spectrogram |", "|---|---|---|"]
  for e in entries:
    audio_lib.write_wav(os.path.join(out_dir, e["name"] + ".wav"), e["audio"], sr)
    plotting.spectrogram_png(os.path.join(out_dir, e["name"] + ".png"), e["audio"], sr,
                             title=e["prompt"], width_inches=6.0)
    lines.append(f"| [{e['name']}.wav]({e['name']}.wav) | {e['prompt']} | "
                 f"![]({e['name']}.png) |")
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return [{k: v for k, v in e.items() if k != "audio"} for e in entries]


def markdown(result: dict) -> str:
  n, n_real = result["samples"], result["real_test_renderings"]
  lines = ["| attribute | named in the prompt | changed | removed | estimator on real held-out "
           "audio | on its codec reconstruction |", "|---|---|---|---|---|---|"]
  for attr, row in result["attributes"].items():
    cell = lambda k: f"{row[k]:.2f}" if k in row else "—"  # noqa: E731
    lines.append(f"| {attr} | {cell('named')} | {cell('changed')} | {cell('removed')} | "
                 f"{row['ceiling_real_audio']:.2f} | {row['ceiling_through_codec']:.2f} |")
  lines.append("")
  lines.append(f"Share of {n} generated {result['duration']:g} s clips per cell whose estimated "
               "attribute equals the one the 'named' prompt gives; the estimators' own accuracy on "
               f"{n_real} held-out renderings (first {CLIP_SECONDS:g} s) and on what the codec makes "
               "of them (the ceiling for generated audio).")
  if "sampling" in result:            # control.json files written before it was recorded lack it
    sm = result["sampling"]
    lines.append(f"Sampling: temperature {sm['temperature']:g}, top-k {sm['top_k']}, top-p "
                 f"{sm['top_p']:g}, CFG {sm['cfg_coef']:g}.")
  for attr, row in result["attributes"].items():
    if "estimates" in row:           # control.json files written before 2026-11-27 lack them
      found = row["estimates"]
      text = (f"What the {attr} estimator made of the clips of the 'named' prompts: "
              f"{_spread_text(found['named'])}")
      if "through_codec" in found:   # older ones lack the real-audio spreads
        text += (f"; of the held-out renderings: {_spread_text(found['real_audio'])}; of their "
                 f"codec reconstructions: {_spread_text(found['through_codec'])}")
      lines.append(text + ".")
  tempo = result["attributes"].get("tempo", {})
  if "rank_correlation" in tempo:    # older control.json files lack it
    rc, real = tempo["rank_correlation"], tempo["rank_correlation_real_audio"]
    lines.append(f"Tempo named in the prompt against the tempo estimated from the clip, over the "
                 f"{rc['clips']} 'named' and 'changed' clips: Spearman's rank correlation "
                 f"{rc['spearman']:.2f} (one-sided p = {rc['p_value']:.2g}); the true tempo of the "
                 f"{real['clips']} held-out renderings against the estimate: {real['spearman']:.2f}.")
  c = result["classifier"]
  lines.append(f"Family classifier: {c['test_accuracy']:.2f} accuracy on {c['test_clips']} held-out "
               f"clips and {c.get('test_accuracy_through_codec', float('nan')):.2f} on their codec "
               f"reconstructions ({len(render.FAMILIES)} families, chance {c['chance']:.2f}).")
  if "melody" in result:
    m = result["melody"]
    lines.append(f"Melody: chroma cosine similarity {m['with_melody']:.3f} ± {m['with_melody_std']:.3f}"
                 f" with the melody against {m['text_only']:.3f} ± {m['text_only_std']:.3f} text only "
                 f"({m['samples']} held-out melodies); the codec's reconstruction of the melody's own "
                 f"recording gives {m.get('ceiling_through_codec', float('nan')):.3f}.")
  if "likelihood" in result:
    lk = result["likelihood"]
    lines += ["", f"Likelihood of {lk['items']} held-out recordings ({lk['clip_seconds']:g} s, "
              "teacher-forced) under their own condition and with one condition changed, over the "
              "whole clip and its first second:", "",
              "| changed | window | items | CE own condition | CE changed | increase (nats per token) "
              "| own condition more likely |", "|---|---|---|---|---|---|---|"]
    for window, rows in lk["windows"].items():
      for attr, row in rows.items():
        lines.append(f"| {attr} | {window.replace('_', ' ')} | {row['items']} | {row['named']:.4f} | "
                     f"{row['changed']:.4f} | {row['ce_increase']:+.4f} ± "
                     f"{row['ce_increase_std']:.4f} | {row['named_more_likely']:.2f} |")
  return "\n".join(lines) + "\n"


def _spread_text(spread_: dict) -> str:
  if "bpm_quartiles" in spread_:
    q = spread_["bpm_quartiles"]
    return f"{q[1]:g} bpm in the median, quartiles {q[0]:g} and {q[2]:g}"
  common = ", ".join(f"{name} {count}" for name, count in spread_["most_common"])
  return f"{spread_['distinct']} distinct, the most common {common}"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m musicgen_jax.eval.control",
                              description=__doc__.split("\n")[0])
  p.add_argument("--corpus", required=True, help="the rendered corpus root (has counts.json); a "
                 "glob is accepted, e.g. 'runs/demo-data/corpus-*'")
  p.add_argument("--checkpoint", default=None, help="model directory (default: the shipped one)")
  p.add_argument("--samples", type=int, default=48)
  p.add_argument("--duration", type=float, default=CLIP_SECONDS)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/control")
  p.add_argument("--listening", default=None, help="only write listening examples to this "
                 "directory (e.g. docs/samples), no measurements")
  p.add_argument("--temperature", type=float, default=None, help="softmax temperature (default: "
                 "the model's)")
  p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
  p.add_argument("--top-p", type=float, default=None, help="nucleus mass in [0, 1] (0 = off)")
  p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance coefficient")
  args = p.parse_args(argv)
  roots = sorted(glob.glob(args.corpus))
  overrides = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   cfg_coef=args.cfg)
  try:
    from musicgen_jax import sampling
    sampling.SamplingSettings.from_config({}, **overrides)   # bad values fail before any loading
    if not (math.isfinite(args.duration) and args.duration > 0):
      raise ValueError(f"--duration must be a finite number of seconds > 0, got {args.duration}")
    if args.seed < 0:
      raise ValueError(f"--seed must be >= 0, got {args.seed}")
    from musicgen_jax import cli   # the results must have somewhere to go before the work starts
    cli.check_output_dir(args.listening or args.out, "listening" if args.listening else "out")
    if len(roots) != 1:
      raise ValueError(f"--corpus {args.corpus!r} matches {len(roots)} directories: give one")
    if args.samples < 8:
      raise ValueError(f"--samples {args.samples} is too few to compare rates: use at least 8")
    if manifest.read_counts(roots[0]) is None:
      raise ValueError(f"{roots[0]} is not a built corpus (no counts.json)")
    from musicgen_jax.pipeline import MusicGen
    model = MusicGen.load(args.checkpoint or cli.shipped_model())
    if model.codec is None:
      raise ValueError("the model has no codec: nothing to listen to")
    settings = model.sampling_settings(**overrides)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.listening:
    for e in write_listening(model, roots[0], args.listening, seed=args.seed, settings=settings):
      print(f"{e['name']}: {e['prompt']}")
    return 0
  result = run(model, roots[0], args.samples, args.duration, args.seed, settings=settings)
  result["command"] = "python -m musicgen_jax.eval.control " + " ".join(sys.argv[1:] if argv is None
                                                                       else argv)
  os.makedirs(args.out, exist_ok=True)
  manifest.write_json(os.path.join(args.out, "control.json"), result)
  table = markdown(result)
  with open(os.path.join(args.out, "control.md"), "w") as f:
    f.write(table)
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Held-out real audio of the rendered corpus, and how a set of clips scores against it.

A `Reference` holds, for `samples` test renderings (pieces no model trained on), two excerpts of
`duration` seconds: the first (the reference every candidate set is compared with) and the last
(a second excerpt of the same rendering: real audio that follows the same caption, the ceiling), with
the caption and the ground truth (key, tempo, instrument family); real validation excerpts (a second
real set, the baseline of the Fréchet distances); a family classifier trained on the train split;
and two embedding spaces (the classifier's hidden layer, and the codec encoder's latents).

`score(clips, pairs)` measures a candidate set, clip i made for test item pairs[i]:
  fd_classifier / fd_codec   Fréchet distance to the reference excerpts (set against set)
  kl                         mean KL(classifier labels of reference i || of clip i)
  key / tempo / family       share of clips whose estimated attribute equals item i's truth
                             (key: chroma profiles; tempo: librosa's beat tracker within 8%, octave
                             errors accepted; family: the classifier)
Reference sets, scored the same way (`baselines`): "real" (the second excerpts), "real, captions
shuffled" (second excerpts of other items: right audio, wrong pairing), "real validation" (FD only)
and "noise" (Gaussian noise at each excerpt's loudness).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from musicgen_jax.data import render
from musicgen_jax.eval import attributes, frechet
from musicgen_jax.eval.classifier import Classifier, features

_log = logging.getLogger(__name__)

WINDOW_SECONDS = 2.0    # classifier windows: a clip's label is the mean over its windows
CODEC_POOL_SECONDS = 0.5  # codec latents are mean-pooled over windows this long (one vector each)
CLASSIFIER_HIDDEN = 64
CLASSIFIER_CROPS = 4    # training windows per train-split rendering


def excerpt(audio: np.ndarray, samples: int, last: bool = False) -> np.ndarray:
  """The first (or last) `samples` of mono audio, zero-padded when shorter."""
  a = audio[-samples:] if last else audio[:samples]
  return np.pad(a, (0, samples - len(a))).astype(np.float32)


def windows(audio: np.ndarray, samples: int) -> list[np.ndarray]:
  """Consecutive windows of `samples` (at least one; the tail shorter than a window is dropped)."""
  n = max(1, len(audio) // samples)
  return [excerpt(audio[i * samples:], samples) for i in range(n)]


def _pc(name: str) -> int:
  from musicgen_jax.eval.control import _pc as pitch_class
  return pitch_class(name)


@dataclasses.dataclass
class Reference:
  sample_rate: int
  duration: float
  items: list[dict]              # test items: caption, truths, 'first' / 'last' excerpts
  validation: list[np.ndarray]   # real validation excerpts
  classifier: Classifier
  classifier_info: dict
  codec: Any = None              # (EncodecModel, params) for codec embeddings, or None
  _cache: dict = dataclasses.field(default_factory=dict)

  # --- building ---------------------------------------------------------------------------------
  @classmethod
  def from_corpus(cls, corpus_root: str, sample_rate: int, duration: float, samples: int,
                  seed: int = 0, codec=None, log: Callable[[str], None] = print) -> "Reference":
    """`samples` test renderings (all of them, with a warning, if the split has fewer)."""
    from musicgen_jax.eval.control import corpus_split
    clip = int(round(duration * sample_rate))
    test = corpus_split(corpus_root, "test")
    if len(test) < samples:
      log(f"warning: the test split has {len(test)} renderings, fewer than the {samples} asked "
          f"for: the metrics use {len(test)}")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.permutation(len(test))[:samples])
    items = []
    for i in pick:
      e = test[i]
      items.append({"caption": e["caption"], "family": e["family"], "key": (_pc(e["key_tonic"]),
                    e["key_mode"]), "bpm": e["bpm"], "first": excerpt(e["audio"], clip),
                    "last": excerpt(e["audio"], clip, last=True)})
    validation = [excerpt(e["audio"], clip) for e in corpus_split(corpus_root, "validation")]
    classifier, info = cached_classifier(corpus_root, sample_rate, seed, test, log)
    return cls(sample_rate, duration, items, validation, classifier, info, codec)

  # --- embeddings and labels ----------------------------------------------------------------------
  def _windows(self, clips):
    w = int(round(min(WINDOW_SECONDS, self.duration) * self.sample_rate))
    return [windows(c, w) for c in clips]

  def labels(self, clips: list[np.ndarray]) -> np.ndarray:
    """[N, families]: the classifier's probabilities, averaged over each clip's windows."""
    return np.stack([self.classifier.probabilities(
        np.stack([features(w, self.sample_rate) for w in ws])).mean(axis=0)
        for ws in self._windows(clips)])

  def classifier_embeddings(self, clips: list[np.ndarray]) -> np.ndarray:
    """[windows, hidden]: the classifier's hidden layer, one vector per window."""
    feats = [features(w, self.sample_rate) for ws in self._windows(clips) for w in ws]
    return self.classifier.embed(np.stack(feats))

  def codec_embeddings(self, clips: list[np.ndarray]) -> np.ndarray | None:
    """[pooled frames, latent dim]: the codec encoder's latents mean-pooled over 0.5 s."""
    if self.codec is None:
      return None
    model, params = self.codec
    fn = self._cache.get("encode")
    if fn is None:
      fn = self._cache["encode"] = jax.jit(model.encode_latents)
    pool = max(1, int(round(CODEC_POOL_SECONDS * model.frame_rate)))
    out = []
    for s in range(0, len(clips), 16):
      x = np.stack(clips[s:s + 16])[:, :, None]                    # [B, N, 1]
      x = np.repeat(x, model.channels, axis=2)
      lat = np.asarray(fn(params["codec"] if "codec" in params else params, jnp.asarray(x)))
      t = lat.shape[1] // pool * pool
      out.append(lat[:, :t].reshape(lat.shape[0], t // pool, pool, -1).mean(axis=2)
                 .reshape(-1, lat.shape[-1]))
    return np.concatenate(out)

  def _reference_stats(self) -> dict:
    if "ref" not in self._cache:
      first = [it["first"] for it in self.items]
      self._cache["ref"] = {"labels": self.labels(first),
                            "classifier": self.classifier_embeddings(first),
                            "codec": self.codec_embeddings(first)}
    return self._cache["ref"]

  # --- scoring ------------------------------------------------------------------------------------
  def score(self, clips: list[np.ndarray], pairs: list[int] | None = None,
            attributes_too: bool = True) -> dict:
    """The metrics of a candidate set (module docstring). pairs[i]: the test item clip i answers
    (default i). Fréchet distances need no pairing; KL and attributes do."""
    pairs = list(range(len(clips))) if pairs is None else list(pairs)
    ref = self._reference_stats()
    emb = self.classifier_embeddings(clips)
    out = {"clips": len(clips), "fd_classifier": frechet.frechet_distance(emb, ref["classifier"]),
           "fd_classifier_vectors": [len(emb), len(ref["classifier"])]}
    codec = self.codec_embeddings(clips)
    if codec is not None:
      out["fd_codec"] = frechet.frechet_distance(codec, ref["codec"])
      out["fd_codec_vectors"] = [len(codec), len(ref["codec"])]
    if attributes_too:
      probs = self.labels(clips)
      out["kl"] = frechet.mean_kl(ref["labels"][pairs], probs)
      sr = self.sample_rate
      items = [self.items[j] for j in pairs]
      out["key"] = float(np.mean([attributes.key_matches(attributes.estimate_key(c, sr), *it["key"])
                                  for c, it in zip(clips, items)]))
      out["tempo"] = float(np.mean([attributes.tempo_matches(attributes.estimate_tempo(c, sr),
                                                             it["bpm"])
                                    for c, it in zip(clips, items)]))
      predicted = [self.classifier.classes[i] for i in probs.argmax(axis=1)]
      out["family"] = float(np.mean([p == it["family"] for p, it in zip(predicted, items)]))
    return out

  def baselines(self, seed: int = 0) -> dict[str, dict]:
    """The reference rows (module docstring), computed once per Reference."""
    if "baselines" not in self._cache:
      rng = np.random.default_rng(seed + 1)
      last = [it["last"] for it in self.items]
      n = len(last)
      shuffled = derangement(n, rng)
      noise = [(rng.standard_normal(len(it["first"])) * (np.sqrt(np.mean(it["first"] ** 2)) + 1e-4))
               .astype(np.float32) for it in self.items]
      self._cache["baselines"] = {
          "real": self.score(last),
          "real, captions shuffled": self.score([last[j] for j in shuffled]),
          "real validation": self.score(self.validation, attributes_too=False),
          "noise": self.score(noise)}
    return self._cache["baselines"]

  def warnings(self, dims: dict[str, int]) -> list[str]:
    """Lines about sets too small for a metric (the Fréchet distances' full-rank covariances)."""
    out = []
    ref = self._reference_stats()
    for name, d in dims.items():
      have = len(ref[name]) if ref.get(name) is not None else None
      if have is not None and have < frechet.min_vectors(d):
        out.append(f"warning: the {name} Fréchet distance fits {d}-dimensional Gaussians to "
                   f"{have} reference vectors, fewer than the {frechet.min_vectors(d)} a full-rank "
                   "covariance needs: use more --samples or a longer --duration")
    return out


def derangement(n: int, rng: np.random.Generator) -> list[int]:
  """A random permutation with no fixed point (every clip paired with another item's caption)."""
  if n < 2:
    return list(range(n))
  while True:
    p = rng.permutation(n)
    if not np.any(p == np.arange(n)):
      return [int(j) for j in p]


def cached_classifier(corpus_root: str, sample_rate: int, seed: int, test: list[dict],
                      log: Callable[[str], None] = print) -> tuple[Classifier, dict]:
  """The family classifier of a corpus on WINDOW_SECONDS windows (trained once, kept beside the
  corpus as eval-classifier-<digest>.npz with its accuracy), and its held-out figures."""
  from musicgen_jax.eval.control import corpus_split
  key = json.dumps({"corpus": os.path.basename(os.path.normpath(corpus_root)), "sr": sample_rate,
                    "window": WINDOW_SECONDS, "hidden": CLASSIFIER_HIDDEN, "seed": seed,
                    "crops": CLASSIFIER_CROPS, "version": 1}, sort_keys=True)
  path = os.path.join(corpus_root, f"eval-classifier-{hashlib.sha256(key.encode()).hexdigest()[:12]}")
  if os.path.isfile(path + ".npz") and os.path.isfile(path + ".json"):
    with open(path + ".json") as f:
      return Classifier.load(path + ".npz"), json.load(f)
  rng = np.random.default_rng(seed)
  w = int(round(WINDOW_SECONDS * sample_rate))

  def crops(items, n):
    x, y = [], []
    for it in items:
      a = it["audio"]
      for _ in range(n):
        start = int(rng.integers(0, max(len(a) - w, 0) + 1))
        x.append(features(excerpt(a[start:], w), sample_rate))
        y.append(it["family"])
    return np.stack(x), y
  log("eval: training the family classifier on the corpus's train split (once per corpus)")
  x, y = crops(corpus_split(corpus_root, "train"), CLASSIFIER_CROPS)
  clf = Classifier.fit(x, y, classes=render.FAMILIES, hidden=CLASSIFIER_HIDDEN, seed=seed)
  xt, yt = crops(test, 1)
  info = {"train_windows": len(y), "test_windows": len(yt), "window_seconds": WINDOW_SECONDS,
          "test_accuracy": clf.accuracy(xt, yt), "chance": 1.0 / len(render.FAMILIES)}
  try:
    clf.save(path + ".npz")
    with open(path + ".json", "w") as f:
      json.dump(info, f)
  except OSError as e:   # a read-only data directory: train again next time
    _log.warning("could not keep the classifier in %s: %s", corpus_root, e)
  return clf, info

"""The input pipeline: caches prepared once per work directory, then grain iterators of batches.

    prepare_data(config, workdir, process_index=, process_count=) -> counts
        kind "manifest" (and any kind in AUDIO_SOURCES): the audio dataset (process 0 builds it, the
        others wait), then the token cache (each process encodes its shards; process 0 finalises).
        Both live under data.cache_dir (default <workdir>/data), in directories named by a
        fingerprint of what they depend on (manifest bytes and file sizes, sample rate, channels;
        then the codec's config and weights, window settings, melody), so a changed manifest or
        codec builds new caches instead of reusing stale ones. Kind "synthetic" needs nothing.
    make_iterator(config, split, tokenizer, workdir=, process_index=, process_count=, shuffle=,
                  num_epochs=) -> a grain DatasetIterator (get_state / set_state; grain's Orbax
                  handler saves it) of per-process batches (see make_iterator).

One global stream per split: shuffle (seeded, a new order each epoch) -> repeat -> (training split,
with data.caption_merge_p > 0) metadata merged into captions (MergeAttributes) -> (training split,
with data.word_dropout > 0) words dropped from the captions (WordDropout) -> crop (at a
position that hashes the seed and the stream position, so a restored iterator crops alike) ->
global batches of train.batch_size, of which process p takes rows [p * b, (p + 1) * b),
b = batch_size / processes.
So the global batch, crops included, is the same for any number of processes, and process
batches assemble with jax.make_array_from_process_local_data in process order. A finite stream
(num_epochs set) is padded with weight-0 examples to whole global batches: every process yields the
same number of batches.

A new audio source (e.g. the rendered music21 corpus) plugs in through AUDIO_SOURCES: a function
`(config, cache_root, sample_rate, channels, build) -> root` that builds (when `build`) a TFDS
dataset with manifest.audio_features() under root and writes root/counts.json last, as
manifest.prepare does; the token cache and the loader then work unchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable

import grain
import numpy as np

from musicgen_jax.conditioners import tempo
from musicgen_jax.data import manifest as manifest_lib
from musicgen_jax.data import synthetic
from musicgen_jax.data import token_cache

_log = logging.getLogger(__name__)



def _corpus(*args, **kwargs) -> str:
  from musicgen_jax.data import corpus   # music21 and FluidSynth only when the corpus is used
  return corpus.prepare(*args, **kwargs)


AUDIO_SOURCES: dict[str, Callable[..., str]] = {"manifest": manifest_lib.prepare, "corpus": _corpus}
SPLITS = ("train", "validation")
WAIT_SECONDS = 24 * 3600           # how long processes > 0 wait for process 0's caches
CACHE_POINTER = "token_cache-{key}.json"


def _cache_root(config, workdir: str) -> str:
  return os.path.abspath(config.data.get("cache_dir") or os.path.join(workdir, "data"))


def _pointer(config, workdir: str) -> str:
  """Where prepare_data records the token cache of this config's data settings."""
  fields = {"data": {k: v for k, v in config.data.to_dict().items()
                     if k not in ("num_workers", "prefetch", "encode_batch_size")
                     and not k.startswith("caption_")},   # read-time settings: the same cache
            "codec": config.codec.to_dict(), "init_from": config.get("init_from", ""),
            "model": {k: config.model[k] for k in ("num_codebooks", "card", "melody")},
            "segment_seconds": config.train.segment_seconds}
  key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
  return os.path.join(_cache_root(config, workdir), CACHE_POINTER.format(key=key))


def wait_for(read: Callable[[], Any], what: str, timeout: float = WAIT_SECONDS) -> Any:
  """Polls `read` until it returns something (another process is writing `what`)."""
  t0 = last = time.monotonic()
  while (value := read()) is None:
    now = time.monotonic()
    if now - t0 > timeout:
      raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}; did process 0 fail?")
    if now - last > 60:
      _log.info("waiting for %s (%.0fs)", what, now - t0)
      last = now
    time.sleep(1.0)
  return value


def _synthetic_sizes(config) -> dict[str, int]:
  n = int(config.data.num_examples)
  return {"train": n, "validation": max(int(config.train.batch_size), n // 8)}


# --- building the caches -------------------------------------------------------------------------

def token_codec_dir(config) -> str:
  """The model directory whose codec makes the token cache, and so the run's codec: data.codec,
  else init_from ('' when neither is set)."""
  return config.data.get("codec") or config.get("init_from") or ""


def prepare_data(config, workdir: str, *, process_index: int = 0, process_count: int = 1) -> dict:
  """Builds or reuses the caches `make_iterator` reads; -> counts for the log.

  {'kind', 'train', 'validation' (items, i.e. cache windows), 'frames', 'skipped' {reason: n},
   'rescaled' (files divided by their peak), 'cache' (the token cache directory), and
   'previous_cache' when this work directory last read another one (the data changed)}.
  Every process calls it (multi-host: at the same time).
  """
  kind = config.data.kind
  if kind == "synthetic":
    return {"kind": "synthetic", **_synthetic_sizes(config)}
  if kind not in AUDIO_SOURCES:
    kinds = ("synthetic",) + tuple(AUDIO_SOURCES)
    raise ValueError(f"data.kind must be one of {kinds}, got {kind!r}")
  from musicgen_jax import checkpoint
  codec_dir = token_codec_dir(config)
  if not codec_dir:
    raise ValueError(f"data.kind={kind!r} needs a codec to build the token cache: set "
                     "--config.data.codec=MODEL_DIR or --config.init_from=MODEL_DIR")
  codec, params = checkpoint.load_codec(codec_dir)
  spec = token_cache.spec_for(config, codec)
  root = _cache_root(config, workdir)
  os.makedirs(root, exist_ok=True)
  primary = process_index == 0
  audio_root = AUDIO_SOURCES[kind](config, root, spec.sample_rate, spec.channels, build=primary)
  audio_counts = wait_for(lambda: manifest_lib.read_counts(audio_root), f"{audio_root}/counts.json")
  audio_dir = manifest_lib.dataset_dir(audio_root, audio_counts)
  cache = token_cache.cache_dir_for(root, os.path.basename(audio_root), spec,
                                    token_cache.codec_identity(codec, params))
  counts = token_cache.read_counts(cache)
  if counts is None:
    if primary:
      os.makedirs(cache, exist_ok=True)
      plan = token_cache.make_plan(cache, audio_dir, spec,
                                   int(config.data.get("items_per_shard") or 64))
    else:
      plan = wait_for(lambda: manifest_lib.read_json(os.path.join(cache, token_cache.PLAN_FILE)),
                      f"{cache}/plan.json")
    token_cache.build_shards(cache, plan, codec, params, spec,
                             batch_size=int(config.data.encode_batch_size),
                             progress=bool(config.train.get("progress", True)),
                             process_index=process_index, process_count=process_count)
    if primary:
      wait_for(lambda: None if token_cache.missing_shards(cache, plan) else True,
               f"the other processes' token-cache shards in {cache}")
      counts = token_cache.finalize(cache, plan, spec, audio_counts)
    else:
      counts = wait_for(lambda: token_cache.read_counts(cache), f"{cache}/counts.json")
  pointer = _pointer(config, workdir)
  before = (manifest_lib.read_json(pointer) or {}).get("cache")
  if primary:
    manifest_lib.write_json(pointer, {"cache": cache})
  else:   # an older run's pointer may still be there: wait for this one's
    named = lambda: (manifest_lib.read_json(pointer) or {}).get("cache") == cache
    wait_for(lambda: True if named() else None, f"{pointer} naming {cache}")
  changed = {"previous_cache": before} if primary and before and before != cache else {}
  return {"kind": kind, **counts["windows"], "frames": counts["frames"],
          "skipped": audio_counts.get("skipped", {}), "rescaled": audio_counts.get("rescaled", 0),
          "cache": cache, **changed}


# --- sources and per-example transforms ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """synthetic.example(seed, index, ...) as a random-access source: {'codes' [K, T], 'caption'}."""
  seed: int
  num_codebooks: int
  card: int
  frames: int
  size: int

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    text, codes = synthetic.example(self.seed, int(index), self.num_codebooks, self.card,
                                    self.frames)
    return {"codes": codes, "caption": text}


class TokenSource:
  """Random access to one split of a token cache: {'codes' [K, F], 'caption', 'metadata' (JSON
  text), ['chroma' [Fc]]}.

  Reads the TFDS dataset's ArrayRecord files with grain's ArrayRecordDataSource and decodes each
  tf.train.Example directly (np.frombuffer of the byte features; dtypes and K from the dataset's
  FeaturesDict): the same arrays as TFDS's decoder (tested), about 100x faster per item.
  """

  def __init__(self, directory: str, split: str):
    import tensorflow_datasets as tfds
    info = tfds.builder_from_directory(directory).info
    if split not in info.splits:
      raise ValueError(f"the {split!r} split of {directory} is empty: give data.valid_manifest, "
                       "or a data.valid_fraction that selects some files")
    self.files = [os.fspath(p) for p in info.splits[split].filepaths]
    self.codes_dtype = np.dtype(info.features["codes"].np_dtype)
    self.num_codebooks = int(info.features["codes"].shape[0])
    self.melody = "chroma" in info.features
    self._source = grain.sources.ArrayRecordDataSource(self.files)

  def __len__(self) -> int:
    return len(self._source)

  def _decode(self, raw: bytes) -> dict:
    from tensorflow_datasets.proto import tf_example_pb2
    f = tf_example_pb2.Example.FromString(raw).features.feature
    item = {"codes": np.frombuffer(f["codes"].bytes_list.value[0], self.codes_dtype).reshape(
                self.num_codebooks, -1),
            "caption": f["caption"].bytes_list.value[0].decode("utf-8")}
    if "metadata" in f:
      item["metadata"] = f["metadata"].bytes_list.value[0].decode("utf-8")
    if self.melody:
      item["chroma"] = np.frombuffer(f["chroma"].bytes_list.value[0], np.uint8)
    return item

  def __getitem__(self, index: int) -> dict:
    return self._decode(self._source[index])

  def __repr__(self) -> str:
    return f"TokenSource({len(self.files)} files, {len(self)} items)"


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _mix64(*values: int) -> int:
  """A 64-bit hash of integers (splitmix64 steps): cheap, seeded randomness per stream position."""
  x = 0x9E3779B97F4A7C15
  for v in values:
    x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 29
  return x


class EpochShuffle(grain.MapDataset):
  """Element i of epoch e is parent[perm_e[i]], perm_e = a permutation seeded by (seed, e): a new
  order every epoch, the same for the same seed. Indices past len(parent) are later epochs."""

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._seed, self._n = int(seed), len(parent)
    self._perms: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self._n

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:       # once per epoch; two epochs kept (prefetching may straddle them)
      perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
      self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
      self._perms[epoch] = perm
    return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(int(index), self._n)
    return self._parent[int(self._perm(epoch)[i]) + epoch * self._n]

  def __getstate__(self):
    return dict(self.__dict__, _perms={})

  def __str__(self) -> str:
    return f"EpochShuffle(seed={self._seed})"


def attribute_phrases(metadata, fields: tuple[str, ...]) -> list[str]:
  """The metadata's `fields` as caption phrases, in `fields` order: bpm '72 bpm', moods (a list)
  'calm, dreamy', the others as they are ('G major', 'jazz', 'flute'). Missing, empty or malformed
  values (a bpm that is not a positive number) give no phrase. `metadata`: a dict or its JSON."""
  if isinstance(metadata, (bytes, str)):
    try:
      metadata = json.loads(metadata) if metadata else {}
    except ValueError:
      return []
  if not isinstance(metadata, dict):
    return []
  out = []
  for name in fields:
    value = metadata.get(name)
    if name == "bpm":
      try:
        bpm = float(value)
      except (TypeError, ValueError):
        continue
      if math.isfinite(bpm) and bpm > 0:
        out.append(f"{round(bpm)} bpm")
      continue
    if isinstance(value, (list, tuple)):
      value = ", ".join(str(v).strip() for v in value if str(v).strip())
    value = "" if value is None or isinstance(value, (dict, bool)) else str(value).strip()
    if value:
      out.append(value)
  return out


@dataclasses.dataclass(frozen=True)
class MergeAttributes(grain.transforms.MapWithIndex):
  """Training captions with the item's metadata merged in (audiocraft's merge_text_p, drop_desc_p
  and drop_other_p): with probability `merge_p` the phrases of attribute_phrases(metadata, fields),
  each kept with probability 1 - drop_attribute_p, follow the caption in a random order, and with
  probability `drop_description_p` they replace it. A prompt that names an attribute alone, or with
  few others, makes reading that attribute pay off on its own; and a manifest's bpm, key, genre,
  moods and instrument reach the model even where the descriptions leave them out. The draws are a
  function of (seed, stream position), so a restored iterator draws alike; an item whose phrases
  all drop keeps its caption."""
  merge_p: float
  drop_description_p: float
  drop_attribute_p: float
  fields: tuple[str, ...]
  seed: int = 0

  def map_with_index(self, index: int, item: dict) -> dict:
    rng = np.random.default_rng([self.seed, 0x6361706E, int(index)])
    if rng.random() >= self.merge_p:
      return item
    phrases = [x for x in attribute_phrases(item.get("metadata"), self.fields)
               if rng.random() >= self.drop_attribute_p]
    if not phrases:
      return item
    phrases = [phrases[i] for i in rng.permutation(len(phrases))]
    caption = _text(item["caption"]).strip()
    if caption and rng.random() >= self.drop_description_p:
      phrases.insert(0, caption)
    return dict(item, caption=", ".join(phrases))


def merge_attributes(config) -> MergeAttributes | None:
  """The MergeAttributes of config.data's caption_* settings, or None when merging is off."""
  d = config.data
  merge_p = float(d.get("caption_merge_p", 0.0))
  if merge_p <= 0:
    return None
  return MergeAttributes(merge_p, float(d.get("caption_drop_description_p", 0.0)),
                         float(d.get("caption_drop_attribute_p", 0.0)),
                         tuple(d.get("caption_attributes", ())), seed=int(config.train.seed))


@dataclasses.dataclass(frozen=True)
class WordDropout(grain.transforms.MapWithIndex):
  """Training captions with each word (split at spaces) dropped with probability `p`, the others
  kept in order: audiocraft's word_dropout of its text conditioner (0.3 in its text-to-music recipe,
  0.2 in the melody one), so that the model does not lean on any one word or on the caption's
  exact phrasing, and sees short prompts. A caption whose words all drop becomes "" (no text). The
  draws are a function of (seed, stream position), as MergeAttributes' are."""
  p: float
  seed: int = 0

  def map_with_index(self, index: int, item: dict) -> dict:
    words = _text(item["caption"]).split()
    if not words:
      return item
    keep = np.random.default_rng([self.seed, 0x776F7264, int(index)]).random(len(words)) >= self.p
    return dict(item, caption=" ".join(w for w, k in zip(words, keep) if k))


def word_dropout(config) -> WordDropout | None:
  """The WordDropout of config.data.word_dropout, or None when it is 0."""
  p = float(config.data.get("word_dropout", 0.0))
  return WordDropout(p, seed=int(config.train.seed)) if p > 0 else None


def check_caption_settings(data) -> None:
  """One line for a caption_* or word_dropout setting out of range."""
  for name in ("caption_merge_p", "caption_drop_description_p", "caption_drop_attribute_p",
               "word_dropout"):
    value = data.get(name, 0.0)
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
      raise ValueError(f"data.{name} must be a probability in [0, 1], got {value!r}")
  fields = data.get("caption_attributes", ())
  if isinstance(fields, str) or not all(isinstance(f, str) and f for f in fields):
    raise ValueError("data.caption_attributes must be a list of metadata field names, e.g. "
                     f"\"key,bpm,genre\", got {fields!r}")


@dataclasses.dataclass(frozen=True)
class Crop(grain.transforms.MapWithIndex):
  """An item {'codes' [K, F], 'caption', ['chroma' uint8 [Fc]]} at stream position `index` -> a
  training example.

  Codes: a window of `frames` frames starting at a pseudo-random frame in [0, F - frames], a hash
  of (seed, index), so the same position always gets the same crop (F < frames: from 0,
  zero-padded, frame_mask False on the padding). Chroma (when chroma_length > 0): the chroma frames
  under the real part of the crop, from round(start / frame_rate * chroma_rate), tiled to
  chroma_length (as MusicGen.melody_window tiles a short melody), one-hot float32 [C, 12]; items
  without chroma get the null melody (pitch class C), as pipeline.MusicGen.conditions does.
  Beat grid (when `beat`, for beat-clock models): float32 [2] = (the metadata's bpm, the beat phase
  at the crop's first frame), from the metadata's bpm and first_beat (seconds, the corpus's) and the
  cache window's offset_seconds; NaN when the item's beats are not known.
  """
  frames: int
  frame_rate: float
  chroma_rate: float = 0.0
  chroma_length: int = 0
  seed: int = 0
  beat: bool = False

  def map_with_index(self, index: int, item: dict) -> dict:
    codes_kf = np.asarray(item["codes"])
    f, t = codes_kf.shape[-1], self.frames
    start = _mix64(self.seed, index) % (f - t + 1) if f > t else 0
    real = min(t, f - start)
    codes_kt = np.zeros((codes_kf.shape[0], t), np.int32)
    codes_kt[:, :real] = codes_kf[:, start:start + real]
    mask_t = np.zeros((t,), bool)
    mask_t[:real] = True
    ex = {"codes": codes_kt, "frame_mask": mask_t, "caption": _text(item["caption"]),
          "weight": np.float32(1.0)}
    if self.chroma_length:
      ex["chroma"] = self.chroma(item.get("chroma"), start, real)
    if self.beat:
      ex["beat_grid"] = self.beat_grid(item.get("metadata"), start)
    return ex

  def beat_grid(self, metadata, start: int) -> np.ndarray:
    try:
      meta = json.loads(_text(metadata)) if metadata else {}
      bpm, first = float(meta["bpm"]), float(meta["first_beat"])
      seconds = float(meta.get("offset_seconds", 0.0)) + start / self.frame_rate
    except (ValueError, TypeError, KeyError):
      return np.full((2,), np.nan, np.float32)
    if not (math.isfinite(bpm) and bpm > 0 and math.isfinite(first)):
      return np.full((2,), np.nan, np.float32)
    return np.asarray([bpm, tempo.beat_phase(seconds, first, bpm)], np.float32)

  def chroma(self, ids: np.ndarray | None, start: int, real: int) -> np.ndarray:
    ids = np.zeros((1,), np.uint8) if ids is None or len(ids) == 0 else np.asarray(ids)
    per_frame = self.chroma_rate / self.frame_rate
    c0 = min(int(round(start * per_frame)), len(ids) - 1)
    n = min(len(ids) - c0, self.chroma_length, max(1, math.ceil(real * per_frame - 1e-6)))
    return np.eye(12, dtype=np.float32)[np.resize(ids[c0:c0 + n], self.chroma_length)]

  def padding(self, num_codebooks: int) -> dict:
    """A weight-0 example (finite streams are padded with it to whole global batches)."""
    ex = {"codes": np.zeros((num_codebooks, self.frames), np.int32),
          "frame_mask": np.zeros((self.frames,), bool), "caption": "", "weight": np.float32(0.0)}
    if self.chroma_length:
      ex["chroma"] = self.chroma(None, 0, self.frames)
    if self.beat:
      ex["beat_grid"] = np.full((2,), np.nan, np.float32)
    return ex


class ProcessRows(grain.MapDataset):
  """Process p's rows of each global batch of a stream: element j is stream element
  (j // b) * B + p * b + j % b; past the end of a finite stream, the padding example."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
               process_count: int, padding: dict):
    super().__init__(parent)
    self._b = global_batch // process_count
    self._global, self._p, self._padding = global_batch, process_index, padding
    self._total = len(parent)
    batches = self._total // global_batch if self._total >= sys.maxsize else \
        -(-self._total // global_batch)      # endless: all; finite: the last batch padded
    self._len = batches * self._b

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    g = (index // self._b) * self._global + self._p * self._b + index % self._b
    if g >= self._total:
      return dict(self._padding)
    return self._parent[g]

  def __str__(self) -> str:
    return f"ProcessRows(p={self._p}, b={self._b}, B={self._global})"


def _stack(examples: list[dict]) -> dict:
  return {k: ([e[k] for e in examples] if k == "caption" else np.stack([e[k] for e in examples]))
          for k in examples[0]}


@dataclasses.dataclass(frozen=True)
class Tokenize(grain.transforms.Map):
  """Batch captions -> input_ids / attention_mask int32 [b, L] with the text conditioner; with a
  beat grid (Crop.beat), the beat clock float32 [b, 2] = (the tempo the caption names, the beat phase
  at the first frame), zero where the caption names no tempo, names another than the metadata's, or
  the item's beats are not known (conditioners/tempo.py)."""
  tokenizer: Any

  def map(self, batch: dict) -> dict:
    batch = dict(batch)
    texts = list(batch.pop("caption"))
    grid = batch.pop("beat_grid", None)
    if grid is not None:
      named = tempo.named_bpms(texts)
      known = np.isfinite(grid).all(axis=1) & (np.abs(named - np.nan_to_num(grid[:, 0])) < 0.5)
      batch["beat"] = np.where(known[:, None], np.stack([named, np.nan_to_num(grid[:, 1])], 1),
                               0.0).astype(np.float32)
    tok = self.tokenizer.tokenize(texts)
    batch["input_ids"] = np.asarray(tok["input_ids"], np.int32)
    batch["attention_mask"] = np.asarray(tok["attention_mask"], np.int32)
    return batch


# --- iterators -----------------------------------------------------------------------------------

def _source(config, split: str, workdir: str):
  frames = int(round(float(config.train.segment_seconds) * float(config.codec.frame_rate)))
  if config.data.kind == "synthetic":
    seed = int(config.train.seed) + (0 if split == "train" else 1)
    return SyntheticSource(seed, int(config.model.num_codebooks), int(config.model.card), frames,
                           _synthetic_sizes(config)[split])
  pointer = manifest_lib.read_json(_pointer(config, workdir))
  if pointer is None or token_cache.read_counts(pointer["cache"]) is None:
    raise ValueError(f"no token cache for this config under {_cache_root(config, workdir)}: call "
                     "loader.prepare_data(config, workdir, ...) first")
  return TokenSource(pointer["cache"], split)


def make_dataset(source, config, tokenizer, *, process_index: int = 0, process_count: int = 1,
                 shuffle: bool = True, num_epochs: int | None = None,
                 augment: bool = False) -> grain.IterDataset:
  """The grain pipeline over a random-access `source` of items (see the module docstring);
  `augment` (the training split) merges metadata into captions as data.caption_* say and drops
  words from them as data.word_dropout says."""
  t, d = config.train, config.data
  global_batch = int(t.batch_size)
  if global_batch % process_count:
    raise ValueError(f"train.batch_size {global_batch} must be divisible by the {process_count} "
                     "processes")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if len(source) == 0:
    raise ValueError("the data source is empty")
  frame_rate = float(config.codec.frame_rate)
  melody = bool(config.model.melody)
  seed = int(t.seed)
  crop = Crop(int(round(float(t.segment_seconds) * frame_rate)), frame_rate,
              float(config.codec.sample_rate) / token_cache.CHROMA_HOP if melody else 0.0,
              int(config.model.chroma_length) if melody else 0, seed=seed,
              beat=bool(config.model.get("beat_clock_rate", 0.0)))
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = EpochShuffle(ds, seed)
  ds = ds.repeat(num_epochs)
  merge = merge_attributes(config) if augment else None
  if merge is not None:
    ds = ds.map_with_index(merge)
  words = word_dropout(config) if augment else None
  if words is not None:
    ds = ds.map_with_index(words)
  ds = ds.map_with_index(crop)
  ds = ProcessRows(ds, global_batch, process_index, process_count,
                   crop.padding(int(config.model.num_codebooks)))
  ds = ds.batch(global_batch // process_count, drop_remainder=True, batch_fn=_stack)
  prefetch = int(d.get("prefetch", 2))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))
  workers = int(d.get("num_workers", 0))
  if workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():   # grain's workers read its absl flags (defaults outside a CLI)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=max(1, prefetch)))
  return it.map(Tokenize(tokenizer))


def make_iterator(config, split: str, tokenizer, *, workdir: str, process_index: int = 0,
                  process_count: int = 1, shuffle: bool = True,
                  num_epochs: int | None = None) -> grain.DatasetIterator:
  """Per-process batches of `split` ("train" | "validation"): a grain iterator with get_state /
  set_state, yielding dicts of numpy arrays, b = train.batch_size // process_count:

      codes int32 [b, K, T]   frame_mask bool [b, T]   input_ids, attention_mask int32 [b, L]
      chroma float32 [b, C, 12] (melody models)   weight float32 [b] (0 on padding examples)
      beat float32 [b, 2] (beat-clock models: the tempo each caption names, 0 = none, and the beat
      phase at the first frame; Tokenize)

  T = round(segment_seconds * frame_rate). num_epochs None: endless. prepare_data must have run.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  source = _source(config, split, workdir)
  return iter(make_dataset(source, config, tokenizer, process_index=process_index,
                           process_count=process_count, shuffle=shuffle, num_epochs=num_epochs,
                           augment=split == "train"))


def measure_throughput(config, workdir: str, seconds: float = 10.0, tokenizer=None,
                       split: str = "train") -> dict:
  """Throughput of the `split` iterator of `config` (prepare_data must have run): see throughput."""
  if tokenizer is None:
    from musicgen_jax import pipeline
    tokenizer = pipeline.text_conditioner_from_config(config, config.get("init_from") or None)
  it = make_iterator(config, split, tokenizer, workdir=workdir)
  try:
    stats = throughput(it, seconds)
  finally:
    it.close()
  return dict(stats, num_workers=int(config.data.get("num_workers", 0)))


def throughput(iterator, seconds: float = 10.0) -> dict:
  """Batches per second of `iterator` after a warm-up batch, and the frames per second that makes:
  'frames_per_s' counts every frame of every batch (what a train step consumes), 'real_frames_per_s'
  only the frame_mask True ones."""
  next(iterator)
  n, frames, real = 0, 0, 0
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    batch = next(iterator)
    n += 1
    frames += batch["frame_mask"].size
    real += int(batch["frame_mask"].sum())
  dt = time.perf_counter() - t0
  return {"batches_per_s": n / dt, "frames_per_s": frames / dt, "real_frames_per_s": real / dt,
          "batch": int(batch["codes"].shape[0]), "frames": int(batch["codes"].shape[-1])}

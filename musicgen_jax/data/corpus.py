"""The music21 corpus rendered to audio: a TFDS dataset with captions and ground-truth attributes.

    python -m musicgen_jax.data.corpus --out DIR [--preset tiny|demo|full] [--max-pieces N]
        [--renderings R] [--seconds S] [--collections bach,essenFolksong] [--workers W]

Every score shipped inside the `music21` package (scores.py) is rendered `renderings` times with
seeded choices of General MIDI instrument, tempo and transposition (render.py: music21 MIDI ->
FluidSynth with a GM SoundFont), and captioned from its metadata and those choices (captions.py).
Pieces that cannot be parsed or rendered are skipped, counted and logged, never fatal.

Features (the audio, caption and metadata of manifest.audio_features, so the token cache reads the
corpus as it reads a manifest, plus the ground truth as separate features):
    audio       int16 [C, N]   mono (C = 1; duplicated when C = 2) at sample_rate (in DatasetInfo
                               metadata, with melody_frame_rate and the corpus config)
    caption     text
    metadata    text: JSON of every field below plus source, title, composer, key ("G major"),
                key_source, seconds, rendering, soundfont, and first_beat (seconds to the first
                beat of the score's beat grid, render.first_beat_seconds; absent when no note
                falls on a beat): with bpm, the beat phase of every frame (the LM's beat clock)
    melody      int16 [T]      skyline MIDI pitch per frame at melody_frame_rate Hz, -1 = no note
    piece_id, collection, key_tonic ("F#"), key_mode ("minor", "dorian", ...), meter ("6/8"),
    instrument, family   text;   bpm (beats of the meter per minute), program (GM, 0-based),
    transpose (semitones)   int32

Splits "train" / "validation" / "test" by a stable hash of the piece (variants of one Bach chorale,
bwv18.5-lz / bwv18.5-w, count as one piece), never by rendering. Reproducible: a rendering's choices
and caption depend only on (seed, piece id, rendering index), and FluidSynth renders offline, so the
same config, music21 version and SoundFont give the same audio bytes, whatever the number of
workers.

Layout of DIR: music21_corpus/<config>/1.0.0/ (the TFDS dataset) and counts.json, written last, as
manifest.prepare writes its own (`prepare` is the loader's entry for data.kind == "corpus").
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from musicgen_jax.data import captions, manifest, render, scores, tfds_compat

_log = logging.getLogger(__name__)

FORMAT_VERSION = "2"   # 2: metadata has first_beat
COUNTS_FILE = manifest.COUNTS_FILE
SPLITS = ("train", "validation", "test")
SKIP_REASONS = ("unparsable", "no_notes", "render_failed", "too_short")


@dataclasses.dataclass(eq=False)
class CorpusConfig(tfds.core.BuilderConfig):
  """What the corpus holds; everything here changes the stored bytes (workers do not)."""
  collections: tuple[str, ...] = ()  # () = every collection of the music21 corpus
  max_pieces: int = 0                # per collection, the pieces with the smallest id hash; 0 = all
  renderings: int = 3                # per piece
  max_seconds: float = 20.0          # a rendering is cut here (with a fade)
  min_seconds: float = 1.0           # shorter renderings are skipped ("too_short")
  seed: int = 0
  sample_rate: int = 32000
  channels: int = 1
  melody_frame_rate: float = 50.0
  soundfont: str = "timgm6mb"        # render.SOUNDFONTS name or a .sf2 path
  valid_fraction: float = 0.05
  test_fraction: float = 0.05

  def knobs(self) -> dict:
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in base}


PRESETS = {
    # Seconds to build: two short pieces from each of three collections, one 3 s rendering each.
    "tiny": dict(collections=("bach", "essenFolksong", "ryansMammoth"), max_pieces=2, renderings=1,
                 max_seconds=3.0),
    # The shipped demo model's corpus (configs/demo.py), sized for a 2-core CPU (about 10 minutes
    # with 2 workers): the collections of chorales, folk songs, fiddle tunes, airs and early
    # polyphony, at most 120 pieces of each, two 12 s renderings per piece.
    "demo": dict(collections=("airdsAirs", "bach", "essenFolksong", "miscFolk", "monteverdi",
                              "oneills1850", "palestrina", "ryansMammoth", "trecento"),
                 max_pieces=120, renderings=2, max_seconds=12.0),
    # Every collection, at most 300 pieces from each, three 20 s renderings per piece.
    "full": dict(max_pieces=300, renderings=3, max_seconds=20.0),
}


def make_config(preset: str = "full", **overrides) -> CorpusConfig:
  """A CorpusConfig from a preset and overrides; named after the preset when nothing is overridden,
  else after the preset and a hash of the knobs."""
  if preset not in PRESETS:
    raise ValueError(f"unknown corpus preset {preset!r}: use one of {sorted(PRESETS)}")
  knobs = dict(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
  if "collections" in knobs:
    knobs["collections"] = tuple(knobs["collections"])
  config = CorpusConfig(name=preset, **knobs)
  if config.knobs() != CorpusConfig(name=preset, **PRESETS[preset]).knobs():
    config.name = f"{preset}-{_digest(config.knobs())[:8]}"
  _check(config)
  return config


def _check(c: CorpusConfig) -> None:
  if c.renderings < 1 or c.max_pieces < 0:
    raise ValueError(f"renderings must be >= 1 and max_pieces >= 0, got {c.renderings}, "
                     f"{c.max_pieces}")
  if not 0 < c.min_seconds <= c.max_seconds:
    raise ValueError(f"need 0 < min_seconds <= max_seconds, got {c.min_seconds}, {c.max_seconds}")
  if c.channels not in (1, 2) or c.sample_rate < 8000:
    raise ValueError(f"channels must be 1 or 2 and sample_rate >= 8000, got {c.channels}, "
                     f"{c.sample_rate}")
  if min(c.valid_fraction, c.test_fraction) < 0 or c.valid_fraction + c.test_fraction >= 1:
    raise ValueError("valid_fraction and test_fraction must be >= 0 with a sum below 1")


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _unit(text: str) -> float:
  """A stable number in [0, 1) from a string."""
  return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16.0 ** 12


def split_group(piece_id: str) -> str:
  """The unit of splitting: the piece id, without the suffixes that mark another version of one
  score (a Bach chorale's variants bwv18.5-lz / bwv18.5-w, Monteverdi's madrigal.3.1_old)."""
  m = re.match(r"^(bach/bwv[0-9.]+?)(\.?-[A-Za-z0-9]+)?\.(mxl|xml|krn)$", piece_id)
  if m:
    return m.group(1)
  return re.sub(r"_old(\.[a-z]+)$", r"\1", piece_id)


def split_of(piece_id: str, valid_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
  """'test', 'validation' or 'train' from a stable hash of the piece's split group."""
  u = _unit("split|" + split_group(piece_id))
  if u < test_fraction:
    return "test"
  return "validation" if u < test_fraction + valid_fraction else "train"


def select_pieces(config: CorpusConfig) -> tuple[dict[str, list[scores.PieceRef]], dict]:
  """The pieces to render per collection (sorted by the hash of their id, the first max_pieces) and
  {'listed': {collection: n}, 'excluded': {reason: n}}."""
  listed, excluded = scores.list_pieces(config.collections or None)
  chosen = {}
  for name, refs in listed.items():
    refs = sorted(refs, key=lambda r: _unit("pick|" + r.piece_id))
    chosen[name] = refs[: config.max_pieces] if config.max_pieces else refs
  return chosen, {"listed": {k: len(v) for k, v in listed.items()}, "excluded": dict(excluded)}


def assign_splits(refs: list[scores.PieceRef], config: CorpusConfig) -> dict[str, list]:
  """Pieces by split. When the hashes leave validation empty but there are two or more pieces, the
  training piece whose validation hash is smallest moves there (tiny corpora still validate)."""
  out = {s: [] for s in SPLITS}
  for r in refs:
    out[split_of(r.piece_id, config.valid_fraction, config.test_fraction)].append(r)
  if not out["validation"] and config.valid_fraction > 0 and len(out["train"]) >= 2:
    moved = min(out["train"], key=lambda r: _unit("split|" + split_group(r.piece_id)))
    out["train"].remove(moved)
    out["validation"].append(moved)
  return out


def rendering_rng(seed: int, piece_id: str, index: int) -> np.random.Generator:
  """The generator of one rendering's choices and caption: a function of these three only."""
  piece_hash = int(hashlib.sha256(piece_id.encode()).hexdigest()[:8], 16)
  return np.random.default_rng([seed, piece_hash, index])


def max_quarters(config: CorpusConfig) -> float:
  """Quarter notes that the fastest tempo of render.TEMPO_RANGES plays in max_seconds (+ a bar)."""
  fastest_qpm = max(hi * beat for beat, (_, hi) in render.TEMPO_RANGES.items())
  return config.max_seconds * fastest_qpm / 60.0 + 8.0


def _skip_reason(err: Exception) -> str:
  if isinstance(err, render.RenderError):
    return "render_failed"
  return "no_notes" if "no pitched notes" in str(err) else "unparsable"


def render_piece(ref: scores.PieceRef, config: CorpusConfig, soundfont_path: str,
                 fluidsynth: str) -> tuple[list[tuple[str, dict]], dict[str, int]]:
  """All renderings of one piece -> ([(key, example)], {skip reason: count}). Never raises for a
  bad piece: a piece that cannot be parsed is one skip; a rendering that fails or is too short, one
  more each."""
  skipped: collections.Counter = collections.Counter()
  try:
    piece = scores.load_piece(ref, max_quarters(config))
  except scores.PieceError as e:
    _log.warning("skipping %s: %s", ref.piece_id, e)
    return [], {_skip_reason(e): 1}
  examples = []
  for index in range(config.renderings):
    rng = rendering_rng(config.seed, ref.piece_id, index)
    choices = render.choose(piece, rng)
    try:
      out = render.render(piece, choices, soundfont_path=soundfont_path,
                          sample_rate=config.sample_rate, max_seconds=config.max_seconds,
                          frame_rate=config.melody_frame_rate, fluidsynth=fluidsynth)
    except render.RenderError as e:
      _log.warning("skipping %s rendering %d: %s", ref.piece_id, index, e)
      skipped["render_failed"] += 1
      continue
    seconds = out.audio_n.size / config.sample_rate
    if seconds < config.min_seconds:
      _log.warning("skipping %s rendering %d: %.2fs < min_seconds", ref.piece_id, index, seconds)
      skipped["too_short"] += 1
      continue
    text = captions.caption(piece, choices, out.tonic_pc, rng)
    examples.append((f"{ref.piece_id}|{index}", _example(piece, choices, out, text, index, config)))
  return examples, dict(skipped)


def _example(piece: scores.Piece, choices: render.Choices, out: render.Rendering, text: str,
             index: int, config: CorpusConfig) -> dict:
  tonic = scores.tonic_name(out.tonic_pc, piece.mode)
  truth = {"piece_id": piece.ref.piece_id, "collection": piece.ref.collection, "key_tonic": tonic,
           "key_mode": piece.mode, "meter": piece.meter, "instrument": choices.instrument,
           "family": choices.family, "bpm": choices.bpm, "program": choices.program,
           "transpose": choices.transpose}
  meta = dict(truth, source=f"music21:{piece.ref.piece_id}", title=piece.title,
              composer=piece.composer, key=f"{tonic} {piece.mode}", key_source=piece.key_source,
              seconds=round(out.audio_n.size / config.sample_rate, 3), rendering=index,
              soundfont=config.soundfont)
  first_beat = render.first_beat_seconds(piece, choices)
  if first_beat is not None:
    meta["first_beat"] = round(first_beat, 4)
  audio_cn = np.repeat(out.audio_n[None], config.channels, axis=0)
  return dict(truth, audio=audio_cn, caption=text, metadata=json.dumps(meta), melody=out.melody_t)


def _render_job(job) -> tuple:
  ref, config, soundfont_path, fluidsynth = job
  return ref, *render_piece(ref, config, soundfont_path, fluidsynth)


def features(channels: int) -> tfds.features.FeaturesDict:
  """manifest.audio_features (what the token cache reads) plus the ground truth."""
  text = tfds.features.Text
  audio = manifest.audio_features(channels)
  return tfds.features.FeaturesDict({
      **{name: audio[name] for name in audio.keys()},
      "melody": tfds.features.Tensor(shape=(None,), dtype=np.int16, encoding="bytes"),
      "piece_id": text(), "collection": text(), "key_tonic": text(), "key_mode": text(),
      "meter": text(), "instrument": text(), "family": text(),
      "bpm": np.int32, "program": np.int32, "transpose": np.int32})


class Music21Corpus(tfds.core.GeneratorBasedBuilder):
  """The rendered music21 corpus (see the module docstring). Construct with a preset name or
  `config=make_config(...)`; `workers` processes render in parallel (the output does not depend on
  how many)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [make_config(name) for name in PRESETS]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS's default looks the module up through importlib_resources, which is not installed.
    return epath.Path(__file__)

  def __init__(self, *, workers: int = 1, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    config = kwargs.get("config")
    if isinstance(config, CorpusConfig) and config.name in PRESETS:
      if config.knobs() != make_config(config.name).knobs():
        raise ValueError(f"a CorpusConfig named {config.name!r} must equal that preset; "
                         "build configs with make_config")
      kwargs["config"] = config.name  # TFDS wants the registered instance of a preset
    self._workers = max(1, int(workers))
    self.stats: dict[str, Any] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self, features=features(c.channels),
        metadata=tfds.core.MetadataDict(sample_rate=c.sample_rate,
                                        melody_frame_rate=c.melody_frame_rate,
                                        corpus=json.loads(json.dumps(c.knobs(), default=list))))

  def _split_generators(self, dl_manager) -> dict[str, Iterator]:
    del dl_manager
    c = self.builder_config
    fluidsynth = render.find_fluidsynth()
    soundfont_path = render.find_soundfont(c.soundfont)
    chosen, listing = select_pieces(c)
    refs = [r for name in sorted(chosen) for r in chosen[name]]
    by_split = assign_splits(refs, c)
    self.stats = {**listing, "selected": {k: len(v) for k, v in chosen.items()},
                  "skipped": collections.Counter(), "skipped_pieces": {},
                  "rendered": collections.Counter(), "seconds": collections.Counter(),
                  "examples": collections.Counter()}
    return {s: self._generate_examples(refs, soundfont_path, fluidsynth, s)
            for s, refs in by_split.items() if refs}

  def _generate_examples(self, refs, soundfont_path: str, fluidsynth: str, split: str):
    c = self.builder_config
    jobs = [(r, c, soundfont_path, fluidsynth) for r in refs]
    if self._workers == 1:
      results = map(_render_job, jobs)
      pool = None
    else:
      pool = multiprocessing.get_context("spawn").Pool(self._workers)
      results = pool.imap(_render_job, jobs, chunksize=1)
    st = self.stats
    try:
      for ref, examples, skipped in results:
        for reason, n in skipped.items():
          st["skipped"][reason] += n
          st["skipped_pieces"].setdefault(reason, []).append(ref.piece_id)
        if examples:
          st["rendered"][ref.collection] += 1
        for key, ex in examples:
          st["seconds"][ref.collection] += ex["audio"].shape[-1] / c.sample_rate
          st["examples"][split] += 1
          yield key, ex
    finally:
      if pool is not None:
        pool.terminate()


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


read_counts = manifest.read_counts   # the same counts.json, written last


def build_corpus(config: CorpusConfig, out_dir: str, workers: int = 1) -> dict:
  """Builds the corpus under `out_dir` and writes out_dir/counts.json last; -> the counts. A corpus
  already complete there with the same knobs is reused."""
  knobs = json.loads(json.dumps(config.knobs(), default=list))
  done = read_counts(out_dir)
  if done is not None and done.get("config") == knobs and done.get("format") == FORMAT_VERSION:
    return done
  # One-line errors (the Debian package to install, a misspelt collection) before TFDS makes any
  # directory.
  render.find_fluidsynth()
  render.find_soundfont(config.soundfont)
  unknown = set(config.collections) - set(scores.collection_names())
  if unknown:
    raise ValueError(f"no music21 corpus collection {sorted(unknown)}: choose from "
                     f"{scores.collection_names()}")
  t0 = time.time()
  tfds_compat.install()  # the full corpus outgrows TFDS's in-memory shuffle buffer
  builder = Music21Corpus(config=config, data_dir=out_dir, workers=workers)
  builder.download_and_prepare()
  st = builder.stats or {"listed": {}, "selected": {}, "skipped": {}, "skipped_pieces": {},
                         "rendered": {}, "seconds": {}, "excluded": {}}
  fresh = bool(builder.stats)  # False: TFDS found the dataset complete and generated nothing
  splits = builder.info.splits
  counts = {"directory": os.path.relpath(builder.data_dir, out_dir),
            **{s: (splits[s].num_examples if s in splits else 0) for s in SPLITS},
            "skipped": {r: st["skipped"].get(r, 0) for r in SKIP_REASONS},
            "skipped_files": st["skipped_pieces"],
            "collections": {name: {"listed": st["listed"].get(name, 0), "selected": n,
                                   "rendered": st["rendered"].get(name, 0),
                                   "hours": round(st["seconds"].get(name, 0.0) / 3600, 4)}
                            for name, n in st["selected"].items()},
            "excluded": st["excluded"],
            "hours": round(sum(st["seconds"].values()) / 3600, 4) if fresh else None,
            "bytes": _dir_bytes(builder.data_dir),
            "build_seconds": round(time.time() - t0, 1) if fresh else None,
            "config": knobs, "format": FORMAT_VERSION}
  manifest.write_json(os.path.join(out_dir, COUNTS_FILE), counts)
  return counts


def prepare(config, cache_root: str, sample_rate: int, channels: int, build: bool = True) -> str:
  """The loader's AUDIO_SOURCES entry for data.kind == "corpus": the corpus root under `cache_root`
  (named by a fingerprint of its settings), built there when absent and `build`.

  Reads config.data.corpus (a preset name, default "full") and config.data.corpus_options (a dict
  of CorpusConfig overrides, optional); min_seconds comes from config.data.min_seconds."""
  d = config.data
  options = dict(d.get("corpus_options", None) or {})
  options.setdefault("min_seconds", float(d.get("min_seconds", 1.0)))
  corpus_config = make_config(d.get("corpus", "full") or "full", sample_rate=int(sample_rate),
                              channels=int(channels), **options)
  import music21
  sf_path = render.SOUNDFONTS.get(corpus_config.soundfont, (corpus_config.soundfont, None))[0]
  identity = {"format": FORMAT_VERSION, "knobs": corpus_config.knobs(),
              "music21": music21.__version__,
              "soundfont_bytes": os.path.getsize(sf_path) if os.path.isfile(sf_path) else None}
  root = os.path.join(cache_root, f"corpus-{_digest(identity)[:16]}")
  if build and read_counts(root) is None:
    build_corpus(corpus_config, root, workers=int(d.get("corpus_workers", 1) or 1))
  return root


# --- command line ---------------------------------------------------------------------------------

def _report(counts: dict, out_dir: str) -> str:
  lines = [f"music21 corpus in {os.path.join(out_dir, counts['directory'])}"]
  for name, c in sorted(counts["collections"].items()):
    lines.append(f"  {name:20s} {c['rendered']:5d} pieces rendered of {c['selected']:5d} selected "
                 f"({c['listed']} in the corpus), {c['hours'] * 60:.1f} min of audio")
  lines.append("  examples: " + ", ".join(f"{s} {counts[s]}" for s in SPLITS))
  skipped = {k: v for k, v in counts["skipped"].items() if v}
  lines.append(f"  skipped: {skipped or 'none'}")
  for reason, ids in counts["skipped_files"].items():
    more = f" (+{len(ids) - 5} more)" if len(ids) > 5 else ""
    lines.append(f"    {reason}: {', '.join(ids[:5])}{more}")
  if counts.get("excluded"):
    lines.append(f"  excluded files: {counts['excluded']}")
  hours = counts["hours"]
  lines.append(f"  audio: {'?' if hours is None else f'{hours:.3f}'} h, disk: "
               f"{counts['bytes'] / 2**20:.1f} MiB, build: {counts['build_seconds']} s")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m musicgen_jax.data.corpus",
                              description="Render the music21 corpus to a TFDS dataset.")
  p.add_argument("--out", required=True, help="output directory (TFDS data_dir + counts.json)")
  p.add_argument("--preset", default="full", choices=sorted(PRESETS))
  p.add_argument("--collections", help="comma-separated music21 corpus directories (default: all)")
  p.add_argument("--max-pieces", type=int, help="per collection; 0 = all")
  p.add_argument("--renderings", type=int, help="renderings per piece")
  p.add_argument("--seconds", type=float, dest="max_seconds", help="max seconds per rendering")
  p.add_argument("--seed", type=int)
  p.add_argument("--sample-rate", type=int)
  p.add_argument("--channels", type=int)
  p.add_argument("--soundfont", help=f"one of {sorted(render.SOUNDFONTS)} or a .sf2 path")
  p.add_argument("--workers", type=int, default=1, help="rendering processes (output is the same)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  try:
    config = make_config(args.preset, collections=args.collections and args.collections.split(","),
                         max_pieces=args.max_pieces, renderings=args.renderings,
                         max_seconds=args.max_seconds, seed=args.seed, sample_rate=args.sample_rate,
                         channels=args.channels, soundfont=args.soundfont)
    counts = build_corpus(config, args.out, workers=args.workers)
  except ValueError as e:
    p.error(" ".join(str(e).split()))
  print(_report(counts, args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())

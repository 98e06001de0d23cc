"""Your own music as a TFDS dataset: a JSONL manifest -> decoded, resampled audio in ArrayRecord.

The manifest has one JSON object per line, as audiocraft's manifests do:

    {"path": "songs/a.flac", "description": "calm lofi piano", "duration": 182.3, "bpm": 80,
     "key": "C minor", "genre": "lofi", "moods": ["calm"], "instrument": "piano"}

`path` is absolute or relative to the manifest's folder; `description` is the caption; the other
fields are optional and kept as metadata (`first_beat`, the seconds to the first beat of a file at a
steady `bpm`, gives beat-clock models the beats' phase: conditioners/tempo.py). Files are decoded
and resampled with librosa (soundfile + soxr_hq) to the codec's sample rate and channel count
(mixed down to mono by channel mean, or mono duplicated to stereo), and stored as **int16** [C, N]
(half of float32, the precision of most source files; samples are scaled by 2^15 and clipped, as
audio.write_wav does). A file whose samples go beyond full scale (a float file that was never
normalised, or a loud master's overshoot after resampling) is divided by its peak rather than clipped
into a square wave; those files are counted ("rescaled"), and named in the log when the peak is above
2 (beyond what resampling a full-scale file can give).

Splits: "train" and "validation". With a `valid_manifest`, its files are the validation split;
otherwise a file goes to validation when a hash of its manifest path falls below `valid_fraction`
(stable across runs and machines); when that picks no file, the file with the smallest hash is
taken, so a manifest of two or more usable files always has a validation split.

Bad records never stop the build: a line that is not JSON ("bad_json"), lacks `path` or
`description` ("missing_field"), names a missing file ("missing_file"), a file that cannot be
decoded ("undecodable": also one with NaN or infinite samples) or is shorter than `min_seconds`
("too_short") is skipped, logged with its
name and counted; the counts are stored in `<root>/counts.json` (written last: its presence marks
the dataset as complete) and returned. A manifest that is empty, or has no usable line, is one
ValueError before anything is decoded.

Every audio-producing builder (this one, the rendered music21 corpus) yields the same features:
    audio     int16 [C, None]   samples at the codec's rate
    caption   text
    metadata  text (JSON: at least "source"; here also the manifest's optional fields)
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import warnings
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from musicgen_jax import audio as audio_lib

_log = logging.getLogger(__name__)

FORMAT_VERSION = "1"          # bump when the stored layout changes: old caches are then not reused
COUNTS_FILE = "counts.json"
LOUD_PEAK = 2.0               # a rescaled file is named in the log above this peak
SKIP_REASONS = ("bad_json", "missing_field", "missing_file", "undecodable", "too_short")
OPTIONAL_FIELDS = ("duration", "bpm", "key", "genre", "moods", "instrument", "first_beat")
SPLITS = ("train", "validation")


def audio_features(channels: int) -> tfds.features.FeaturesDict:
  """The features every audio builder yields (see the module docstring)."""
  return tfds.features.FeaturesDict({
      "audio": tfds.features.Tensor(shape=(channels, None), dtype=np.int16, encoding="bytes"),
      "caption": tfds.features.Text(),
      "metadata": tfds.features.Text()})


def to_int16(audio_cn: np.ndarray) -> np.ndarray:
  return np.clip(np.round(np.clip(audio_cn, -1.0, 1.0) * 32768.0), -32768, 32767).astype(np.int16)


def from_int16(audio_cn: np.ndarray) -> np.ndarray:
  return np.asarray(audio_cn, np.float32) / np.float32(32768.0)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One usable manifest line: the file, its caption, its metadata (JSON-able dict)."""
  path: str           # absolute
  name: str           # as the manifest wrote it (hashed for the split, used in logs)
  caption: str
  metadata: dict


@dataclasses.dataclass
class Manifest:
  """A parsed manifest: usable entries, the lines skipped while reading, a fingerprint.

  `valid` holds the valid_manifest's entries, or None: then `valid_fraction` of the entries that
  decode go to validation (see `split`).
  """
  entries: list[Entry]
  valid: list[Entry] | None
  valid_fraction: float
  skipped: collections.Counter
  skipped_names: dict[str, list[str]]
  fingerprint: str


def _skip(skipped, names, reason: str, name: str, why: str) -> None:
  skipped[reason] += 1
  names.setdefault(reason, []).append(name)
  _log.warning("skipping %s: %s", name, why)


def _read_lines(path: str, skipped, names, digest) -> list[Entry]:
  if not os.path.isfile(path):
    raise ValueError(f"manifest {path} does not exist: give a JSONL file with one "
                     '{"path": ..., "description": ...} object per line')
  with open(path, "rb") as f:
    raw = f.read()
  digest.update(raw)
  base = os.path.dirname(os.path.abspath(path))
  entries = []
  lines = [(i + 1, line) for i, line in enumerate(raw.decode("utf-8", "replace").splitlines())
           if line.strip()]
  if not lines:
    raise ValueError(f"manifest {path} is empty: write one JSON object per line with at least "
                     '"path" and "description"')
  for lineno, line in lines:
    where = f"{os.path.basename(path)}:{lineno}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      _skip(skipped, names, "bad_json", where, f"not JSON ({e.msg})")
      continue
    if not isinstance(obj, dict) or not isinstance(obj.get("path"), str) or \
        not isinstance(obj.get("description"), str):
      _skip(skipped, names, "missing_field", where, 'needs string fields "path" and "description"')
      continue
    full = obj["path"] if os.path.isabs(obj["path"]) else os.path.join(base, obj["path"])
    size = os.path.getsize(full) if os.path.isfile(full) else -1
    # The path as written: the same manifest and files in a moved folder are the same data.
    digest.update(f"\n{obj['path']}\t{size}".encode())
    if size < 0:
      _skip(skipped, names, "missing_file", obj["path"], f"no such file ({where})")
      continue
    meta = {k: obj[k] for k in OPTIONAL_FIELDS if k in obj}
    meta["source"] = obj["path"]
    entries.append(Entry(full, obj["path"], obj["description"], meta))
  return entries


def _hash_unit(name: str) -> float:
  """A stable number in [0, 1) from a manifest path."""
  return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 2.0 ** 32


def read_manifest(path: str, valid_manifest: str = "", valid_fraction: float = 0.05,
                  settings: str = "") -> Manifest:
  """Parses the manifest(s); no audio is decoded here.

  The fingerprint covers the manifests' bytes, each named file's size, and `settings` (what else
  the stored dataset depends on: sample rate, channels, ...), so a changed manifest, a re-encoded
  file or other settings give another cache directory.
  """
  if not 0.0 <= valid_fraction < 1.0:
    raise ValueError(f"data.valid_fraction must be in [0, 1), got {valid_fraction}")
  skipped, names = collections.Counter(), {}
  digest = hashlib.sha256(f"{FORMAT_VERSION}|{settings}|{valid_fraction}".encode())
  entries = _read_lines(path, skipped, names, digest)
  valid = None
  if valid_manifest:
    digest.update(b"\nvalid\n")
    valid = _read_lines(valid_manifest, skipped, names, digest)
  if not entries:
    raise ValueError(f"manifest {path} has no usable line ({dict(skipped)} skipped): each line "
                     'needs "path" (an existing file) and "description"')
  return Manifest(entries, valid, valid_fraction, skipped, names, digest.hexdigest()[:16])


def split(entries: list[Entry], valid: list[Entry] | None,
          valid_fraction: float) -> dict[str, list[Entry]]:
  """{'train', 'validation'}: `valid` if given, else the entries whose path hash < valid_fraction
  (at least one when valid_fraction > 0 and there are two or more entries)."""
  if valid is not None:
    return {"train": entries, "validation": valid}
  held = [e for e in entries if _hash_unit(e.name) < valid_fraction]
  if not held and valid_fraction > 0 and len(entries) >= 2:
    held = [min(entries, key=lambda e: _hash_unit(e.name))]
  chosen = {id(e) for e in held}
  return {"train": [e for e in entries if id(e) not in chosen], "validation": held}


@contextlib.contextmanager
def _quiet_audioread():
  # librosa warns, for every file libsndfile cannot read, that it falls back on audioread (ffmpeg
  # and the like); that fallback is what is wanted here, and a file neither reads is skipped, named.
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="PySoundFile failed", category=UserWarning)
    warnings.filterwarnings("ignore", message=".*[Aa]udioread", category=FutureWarning)
    yield


def decode(path: str, sample_rate: int, channels: int) -> np.ndarray:
  """An audio file -> float32 [channels, N] at `sample_rate` (librosa: soundfile + soxr_hq)."""
  import librosa
  with _quiet_audioread():
    wav, _ = librosa.load(path, sr=sample_rate, mono=channels == 1, res_type="soxr_hq")
  wav = np.atleast_2d(np.asarray(wav, np.float32))
  return audio_lib.to_channels(wav, channels)


def _probe_seconds(path: str) -> float:
  """Duration from the file header (no decoding); ValueError saying why for files that cannot be
  opened."""
  import soundfile as sf
  try:
    return float(sf.info(path).duration)
  except Exception as e:  # not a libsndfile format: let librosa (audioread) try
    import librosa
    first = audio_lib._one_line(e) or type(e).__name__
    try:
      with _quiet_audioread():
        return float(librosa.get_duration(path=path))
    except Exception as e2:  # noqa: BLE001 -- neither decoder reads it
      second = audio_lib._one_line(e2) or type(e2).__name__
      raise ValueError(f"not audio that libsndfile reads ({first}), nor that audioread (ffmpeg) "
                       f"opens ({second})") from None


class ManifestAudio(tfds.core.GeneratorBasedBuilder):
  """TFDS builder over a parsed Manifest; reads back with tfds.builder_from_directory."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS's default looks the module up through importlib_resources, which is not installed.
    return epath.Path(__file__)

  def __init__(self, *, manifest: Manifest, sample_rate: int, channels: int, min_seconds: float,
               **kwargs):
    self._manifest, self._rate, self._channels = manifest, int(sample_rate), int(channels)
    self._min_seconds = float(min_seconds)
    self.skipped = collections.Counter(manifest.skipped)
    self.skipped_names = {k: list(v) for k, v in manifest.skipped_names.items()}
    self.rescaled = 0
    self.kept = self._probe()
    super().__init__(file_format="array_record", **kwargs)

  def _probe(self) -> dict[str, list[Entry]]:
    """Header check of every file, so that undecodable and short files are known before the split
    and before writing."""
    m = self._manifest
    ok = lambda entries: [e for e in entries if self._readable(e)]
    return split(ok(m.entries), None if m.valid is None else ok(m.valid), m.valid_fraction)

  def _readable(self, e: Entry) -> bool:
    try:
      seconds = _probe_seconds(e.path)
    except Exception as err:  # noqa: BLE001 -- any decoder failure is a skipped record
      _skip(self.skipped, self.skipped_names, "undecodable", e.name, audio_lib._one_line(err))
      return False
    if seconds < self._min_seconds:
      _skip(self.skipped, self.skipped_names, "too_short", e.name,
            f"{seconds:.2f}s < data.min_seconds={self._min_seconds}")
      return False
    return True

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=audio_features(self._channels),
                                 disable_shuffling=True,
                                 metadata=tfds.core.MetadataDict(sample_rate=self._rate))

  def _split_generators(self, dl_manager) -> dict[str, Iterator]:
    del dl_manager
    return {split: self._generate_examples(entries)
            for split, entries in self.kept.items() if entries}

  def _generate_examples(self, entries: list[Entry]) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, e in enumerate(entries):
      try:
        wav_cn = decode(e.path, self._rate, self._channels)
      except Exception as err:  # noqa: BLE001 -- any decoder failure is a skipped record
        _skip(self.skipped, self.skipped_names, "undecodable", e.name, audio_lib._one_line(err))
        continue
      if wav_cn.shape[-1] < self._min_seconds * self._rate:
        _skip(self.skipped, self.skipped_names, "too_short", e.name,
              f"{wav_cn.shape[-1] / self._rate:.2f}s < data.min_seconds={self._min_seconds}")
        continue
      peak = float(np.abs(wav_cn).max())
      if peak > 1.0:                # beyond full scale: scaled down, not clipped into a square wave
        wav_cn = wav_cn / np.float32(peak)
        self.rescaled += 1
        if peak > LOUD_PEAK:
          _log.warning("rescaling %s: its samples peak at %.3g, beyond full scale (1.0): divided by "
                       "the peak rather than clipped", e.name, peak)
      meta = dict(e.metadata, seconds=round(wav_cn.shape[-1] / self._rate, 3))
      yield i, {"audio": to_int16(wav_cn), "caption": e.caption, "metadata": json.dumps(meta)}


def write_json(path: str, obj: Any) -> None:
  """Written to a temporary name and renamed: readers (other processes too) see all of it or
  nothing."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  """The JSON file at `path`, or None when there is none."""
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_counts(root: str) -> dict | None:
  """The counts of the complete dataset under `root`, or None while it is not complete."""
  return read_json(os.path.join(root, COUNTS_FILE))


def dataset_dir(root: str, counts: dict) -> str:
  """The TFDS directory (tfds.builder_from_directory) of the dataset under `root`."""
  return os.path.join(root, counts["directory"])


def prepare(config, cache_root: str, sample_rate: int, channels: int, build: bool = True) -> str:
  """The root of the manifest's audio dataset under `cache_root` (named by its fingerprint).

  A complete dataset (`<root>/counts.json` present) is reused; otherwise, when `build`, it is built
  now. With build=False (processes other than 0) the caller waits for counts.json.
  """
  d = config.data
  if not d.get("manifest"):
    raise ValueError("data.kind is 'manifest' but data.manifest is empty: pass "
                     "--config.data.manifest=FILE.jsonl")
  settings = f"rate={sample_rate}|channels={channels}|min_seconds={float(d.min_seconds)}"
  m = read_manifest(d.manifest, d.get("valid_manifest", ""), float(d.valid_fraction), settings)
  root = os.path.join(cache_root, f"audio-{m.fingerprint}")
  if build and read_counts(root) is None:
    build_dataset(m, root, sample_rate, channels, float(d.min_seconds))
  return root


def build_dataset(manifest: Manifest, root: str, sample_rate: int, channels: int,
                  min_seconds: float) -> dict:
  """Writes the dataset under `root` and then `root/counts.json`; -> the counts."""
  builder = ManifestAudio(manifest=manifest, sample_rate=sample_rate, channels=channels,
                          min_seconds=min_seconds, data_dir=root)
  if not builder.kept["train"]:
    raise ValueError(f"no usable audio in the manifest: {dict(builder.skipped)} skipped (see the "
                     "log for the files); check the paths and data.min_seconds")
  try:
    builder.download_and_prepare()
  except AssertionError as e:  # TFDS refuses a split whose every file failed to decode
    raise ValueError(f"cannot build the audio dataset: {audio_lib._one_line(e)} "
                     f"({dict(builder.skipped)} skipped)") from None
  splits = builder.info.splits
  counts = {"directory": os.path.relpath(builder.data_dir, root),
            **{s: (splits[s].num_examples if s in splits else 0) for s in SPLITS},
            "skipped": {r: builder.skipped.get(r, 0) for r in SKIP_REASONS},
            "skipped_files": builder.skipped_names, "rescaled": builder.rescaled}
  if counts["train"] == 0:
    raise ValueError(f"no audio file of the manifest could be decoded ({counts['skipped']})")
  write_json(os.path.join(root, COUNTS_FILE), counts)
  total = sum(counts["skipped"].values())
  _log.info("audio dataset %s: %d train, %d validation items; %d skipped %s; %d rescaled",
            builder.data_dir, counts["train"], counts["validation"], total, counts["skipped"],
            counts["rescaled"])
  return counts

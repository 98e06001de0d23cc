"""The token cache: every audio item encoded once with the codec, as a TFDS dataset of codes.

Input: a complete audio dataset (manifest.py's builder or any builder with the same features:
audio int16 [C, N] at the codec's rate, caption, metadata). Output, in one directory:

    plan.json                                       the shards: (split, index, items [start, end))
    token_cache-<split>.array_record-0000i-of-0000n   one ArrayRecord file per shard
    done/<split>-<i>.json                             written (atomically) after its shard file
    dataset_info.json, features.json                  written once every shard is done (finalize)
    counts.json                                       written last: marks the cache complete

It reads as a normal TFDS dataset: `tfds.builder_from_directory(dir).as_data_source(split)`, items
    codes     int16 [K, F]   (int32 when card > 32768); K = the LM's codebooks (stereo: L/R
                             interleaved, as pipeline.encode_audio_file does)
    chroma    uint8 [Fc]     melody models only: argmax pitch class (C = 0) per chroma frame
                             (sample_rate / 4096 Hz), from conditioners.melody.chromagram
    caption   text;  metadata  text (the audio item's JSON plus offset_seconds, seconds)

Windows, not whole files. EnCodec's encoder is not frame-local: its convolutions see a few frames
on each side and its LSTM carries state across the whole input, so encoding a long file in chunks
cut at frame boundaries does NOT give the codes of encoding it whole (the codes differ around each
cut). The cache therefore defines its items as fixed windows of `data.encode_seconds` (default:
twice train.segment_seconds), each encoded on its own, as audiocraft encodes each training segment
on its own; an item's codes are exactly `codec.encode(window)`, however the windows are batched. A
file longer than a window gives windows at 0, W, 2W, ... and a last one ending at the file's end
(it overlaps the previous one, so no padding is ever encoded for long files). A file shorter than a
window is zero-padded to the smallest "bucket" (W, W/2, W/4, ... down to data.min_seconds) that
holds it and its codes cut to ceil(N / hop) frames. Each bucket length compiles once.

Multi-host: shards are dealt round-robin to processes (`process_index`, `process_count`); each
process writes only its own shard files. A shard whose done-file exists is never redone, so an
interrupted build resumes where it stopped. Process 0 finalises the metadata once all done-files
exist. The shard layout depends only on the audio dataset, so any number of processes writes the
same files.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer

from musicgen_jax.conditioners import melody as melody_lib
from musicgen_jax.data import manifest as manifest_lib

_log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
DATASET_NAME = "token_cache"
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
PLAN_FILE, COUNTS_FILE, DONE_DIR = "plan.json", "counts.json", "done"
CHROMA_HOP = 4096                  # conditioners.melody defaults, MusicGen-Melody's
SPLITS = manifest_lib.SPLITS


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """What the cached codes depend on (all of it goes into the cache's fingerprint)."""
  sample_rate: int
  channels: int                    # audio channels stored (config.codec.channels)
  hop: int                         # samples per frame
  n_q: int                         # codebooks asked of the codec per stream
  streams: int                     # 1, or 2: a mono codec run on left and right (stereo models)
  card: int
  window_frames: int
  bucket_frames: tuple[int, ...]   # window lengths, longest first
  melody: bool

  @property
  def num_codebooks(self) -> int:
    return self.n_q * self.streams

  @property
  def codes_dtype(self):
    return np.int16 if self.card <= 32768 else np.int32


def spec_for(config, codec) -> CacheSpec:
  """The cache spec for `config` and an EncodecModel; a mismatch is a ValueError naming both.

  model.num_codebooks may be fewer than the codec's (its first codebooks: a lower bandwidth); a
  stereo config (codec.channels 2) with a mono codec runs it per channel (2 streams).
  """
  c, m = config.codec, config.model
  def refuse(what, ours, theirs):
    raise ValueError(f"the codec's {what} is {theirs} but the config's is {ours}: use a codec that "
                     "matches the model (data.codec / init_from), or fix the config")
  if int(codec.sample_rate) != int(c.sample_rate):
    refuse("sample rate", c.sample_rate, codec.sample_rate)
  if abs(float(codec.frame_rate) - float(c.frame_rate)) > 1e-9:
    refuse("frame rate", c.frame_rate, codec.frame_rate)
  if int(codec.config.codebook_size) != int(m.card):
    refuse("codebook size (model.card)", m.card, codec.config.codebook_size)
  streams = 2 if (codec.channels == 1 and int(c.channels) == 2) else 1
  if streams == 1 and codec.channels != int(c.channels):
    refuse("channel count", c.channels, codec.channels)
  if m.num_codebooks % streams or not 1 <= m.num_codebooks // streams <= codec.num_codebooks:
    refuse("codebook count" + (" (x2 streams for stereo)" if streams == 2 else ""),
           m.num_codebooks, codec.num_codebooks * streams)
  frame_rate = float(c.frame_rate)
  seconds = float(config.data.get("encode_seconds") or 2.0 * float(config.train.segment_seconds))
  window = int(math.ceil(round(seconds * frame_rate, 6)))
  segment = int(round(float(config.train.segment_seconds) * frame_rate))
  if window < segment:
    raise ValueError(f"data.encode_seconds={seconds} is shorter than train.segment_seconds="
                     f"{config.train.segment_seconds}: windows must hold a training segment")
  floor = max(1, int(float(config.data.min_seconds) * frame_rate))
  buckets = [window]
  while math.ceil(buckets[-1] / 2) >= floor and math.ceil(buckets[-1] / 2) < buckets[-1]:
    buckets.append(math.ceil(buckets[-1] / 2))
  return CacheSpec(int(c.sample_rate), int(c.channels), int(codec.config.hop_length),
                   m.num_codebooks // streams, streams, int(m.card), window, tuple(buckets),
                   bool(m.melody))


def features(spec: CacheSpec) -> tfds.features.FeaturesDict:
  f = {"codes": tfds.features.Tensor(shape=(spec.num_codebooks, None), dtype=spec.codes_dtype,
                                     encoding="bytes"),
       "caption": tfds.features.Text(), "metadata": tfds.features.Text()}
  if spec.melody:
    f["chroma"] = tfds.features.Tensor(shape=(None,), dtype=np.uint8, encoding="bytes")
  return tfds.features.FeaturesDict(f)


def codec_identity(codec, params) -> str:
  """A digest of the codec's config and weights."""
  h = hashlib.sha256(repr(codec.config).encode())
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(leaves, key=lambda x: jax.tree_util.keystr(x[0])):
    a = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def cache_dir_for(cache_root: str, audio_fingerprint: str, spec: CacheSpec, codec_id: str) -> str:
  key = f"{FORMAT_VERSION}|{audio_fingerprint}|{codec_id}|{dataclasses.asdict(spec)}"
  return os.path.join(cache_root, f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:16]}")


# --- windows -------------------------------------------------------------------------------------

def windows(num_samples: int, spec: CacheSpec) -> list[tuple[int, int, int]]:
  """[(start, real_length, padded_length)] in samples: the windows an item of N samples gives."""
  w = spec.window_frames * spec.hop
  if num_samples < w:
    fits = [b * spec.hop for b in spec.bucket_frames if b * spec.hop >= num_samples]
    return [(0, num_samples, min(fits))]
  starts = list(range(0, num_samples - w + 1, w))
  tail = (num_samples - w) // spec.hop * spec.hop   # one more, ending within a frame of the end
  if tail > starts[-1]:
    starts.append(tail)
  return [(s, w, w) for s in starts]


@functools.lru_cache(maxsize=8)
def _compiled(codec, n_q: int, sample_rate: int, devices: tuple):
  """Jitted (codes, chroma ids) functions, shared by the Encoders of one codec in this process."""
  mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))

  def chroma_ids(mono_bl):
    c = melody_lib.chromagram(mono_bl, sample_rate, hop=CHROMA_HOP, argmax=False)
    return jnp.argmax(c, axis=-1).astype(jnp.uint8)

  codes = jax.jit(functools.partial(codec.encode, n_q=n_q), out_shardings=rows)
  return mesh, rows, codes, jax.jit(chroma_ids, out_shardings=rows)


class Encoder:
  """Jitted codec (+ chroma) over fixed batches of equal-length windows, on the local devices.

  `__call__(audio [B, C, L] float32)` -> (codes [B, K, ceil(L / hop)], chroma ids [B, Fc] or None);
  B may be anything up to `batch_size` (padded with silent windows). Counts windows and calls.
  """

  def __init__(self, codec, params, spec: CacheSpec, batch_size: int):
    devices = tuple(jax.local_devices())
    self.spec, self.codec = spec, codec
    self.batch_size = -(-max(1, int(batch_size)) // len(devices)) * len(devices)
    mesh, self._rows, self._codes, self._chroma = _compiled(codec, spec.n_q, spec.sample_rate,
                                                            devices)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.params = jax.device_put(params, replicated)
    self.windows = 0
    self.calls = 0

  def __call__(self, audio_bcl: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    b = audio_bcl.shape[0]
    batch = np.zeros((self.batch_size,) + audio_bcl.shape[1:], np.float32)
    batch[:b] = audio_bcl
    self.windows += b
    self.calls += 1
    if self.spec.streams == 2:     # a mono codec per channel, codes interleaved L0 R0 L1 R1 ...
      x = jax.device_put(batch.reshape(-1, 1, batch.shape[-1]), self._rows)
      codes = np.asarray(self._codes(self.params, x))
      codes = codes.reshape(self.batch_size, 2, self.spec.n_q, -1).transpose(0, 2, 1, 3)
      codes = codes.reshape(self.batch_size, 2 * self.spec.n_q, -1)
    else:
      codes = np.asarray(self._codes(self.params, jax.device_put(batch, self._rows)))
    chroma = None
    if self.spec.melody:
      chroma = np.asarray(self._chroma(jax.device_put(batch.mean(axis=1), self._rows)))[:b]
    return codes[:b], chroma


# --- plan, shards, finalize ----------------------------------------------------------------------

def _template(cache_dir: str, split: str) -> tfds.core.ShardedFileTemplate:
  return tfds.core.ShardedFileTemplate(data_dir=cache_dir, template=FILE_TEMPLATE,
                                       dataset_name=DATASET_NAME, split=split,
                                       filetype_suffix="array_record")


def make_plan(cache_dir: str, audio_dir: str, spec: CacheSpec, items_per_shard: int = 64) -> dict:
  """Reads or writes plan.json: the shards of each split (audio items [start, end))."""
  path = os.path.join(cache_dir, PLAN_FILE)
  plan = manifest_lib.read_json(path)
  if plan is not None:
    return plan
  os.makedirs(os.path.join(cache_dir, DONE_DIR), exist_ok=True)
  splits = tfds.builder_from_directory(audio_dir).info.splits
  shards = []
  for split in SPLITS:
    n = splits[split].num_examples if split in splits else 0
    count = -(-n // items_per_shard)
    for i in range(count):
      shards.append({"split": split, "index": i, "count": count, "start": i * items_per_shard,
                     "end": min(n, (i + 1) * items_per_shard)})
  plan = {"audio_dir": os.path.abspath(audio_dir), "spec": dataclasses.asdict(spec),
          "shards": shards}
  manifest_lib.write_json(path, plan)
  return plan


def _done_path(cache_dir: str, shard: dict) -> str:
  return os.path.join(cache_dir, DONE_DIR, f"{shard['split']}-{shard['index']:05d}.json")


def build_shards(cache_dir: str, plan: dict, codec, params, spec: CacheSpec, *, batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 after_shard: Callable[[dict], None] | None = None,
                 encoder: Encoder | None = None, progress: bool = True) -> list[dict]:
  """Encodes this process's shards that are not done yet (a tqdm bar unless not `progress`);
  -> the shards built now."""
  from array_record.python import array_record_module
  mine = [s for i, s in enumerate(plan["shards"]) if i % process_count == process_index]
  todo = [s for s in mine if not os.path.isfile(_done_path(cache_dir, s))]
  if not todo:
    return []
  encoder = encoder or Encoder(codec, params, spec, batch_size)
  audio = tfds.builder_from_directory(plan["audio_dir"])
  feats = features(spec)
  serializer = example_serializer.ExampleSerializer(feats.get_serialized_info())
  from tqdm import tqdm
  bar = tqdm(todo, desc=f"encoding audio to tokens (process {process_index})" if process_count > 1
             else "encoding audio to tokens", unit="shard", dynamic_ncols=True,
             disable=not progress)
  for shard in bar:
    source = audio.as_data_source(shard["split"])
    examples = _encode_items(source, range(shard["start"], shard["end"]), spec, encoder)
    path = os.fspath(_template(cache_dir, shard["split"]).sharded_filepath(
        shard_index=shard["index"], num_shards=shard["count"]))
    tmp = f"{path}.tmp-{os.getpid()}"
    # One record per group, uncompressed: codes barely compress and random reads are 2x faster.
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1,uncompressed")
    for ex in examples:
      writer.write(serializer.serialize_example(feats.encode_example(ex)))
    writer.close()
    os.replace(tmp, path)
    frames = int(sum(ex["codes"].shape[-1] for ex in examples))
    manifest_lib.write_json(_done_path(cache_dir, shard), {"examples": len(examples), "frames": frames,
                                               "bytes": os.path.getsize(path)})
    _log.info("token cache: %s shard %d/%d done (%d windows)", shard["split"], shard["index"] + 1,
              shard["count"], len(examples))
    if after_shard is not None:
      after_shard(shard)
  return todo


def _encode_items(source, indices, spec: CacheSpec, encoder: Encoder) -> list[dict]:
  """The cache examples of audio items `indices`, in item then window order.

  Windows wait in a queue per padded length and are encoded a full batch at a time; only the
  queued windows (not whole files) are held in memory.
  """
  examples: list[dict | None] = []
  queues: dict[int, list] = {}

  def flush(length: int) -> None:
    queue = queues.pop(length, [])
    if not queue:
      return
    audio_bcl = np.zeros((len(queue), spec.channels, length), np.float32)
    for r, (_, window_cn, _) in enumerate(queue):
      audio_bcl[r, :, :window_cn.shape[-1]] = manifest_lib.from_int16(window_cn)
    codes, chroma = encoder(audio_bcl)
    for r, (job, window_cn, ex) in enumerate(queue):
      real = window_cn.shape[-1]
      ex["codes"] = codes[r, :, :-(-real // spec.hop)].astype(spec.codes_dtype)
      if chroma is not None:
        ex["chroma"] = chroma[r, :melody_lib.num_chroma_frames(real, hop=CHROMA_HOP)]
      examples[job] = ex

  for i in indices:
    item = source[i]
    audio_cn, caption = item["audio"], _text(item["caption"])
    meta = json.loads(_text(item["metadata"]))
    for start, real, padded in windows(audio_cn.shape[-1], spec):
      ex = {"caption": caption,
            "metadata": json.dumps(dict(meta, offset_seconds=round(start / spec.sample_rate, 4),
                                        seconds=round(real / spec.sample_rate, 4)))}
      queues.setdefault(padded, []).append((len(examples), audio_cn[:, start:start + real], ex))
      examples.append(None)
      if len(queues[padded]) == encoder.batch_size:
        flush(padded)
  for length in sorted(queues, reverse=True):
    flush(length)
  return examples


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def missing_shards(cache_dir: str, plan: dict) -> list[dict]:
  return [s for s in plan["shards"] if not os.path.isfile(_done_path(cache_dir, s))]


def finalize(cache_dir: str, plan: dict, spec: CacheSpec, audio_counts: dict | None = None) -> dict:
  """Writes the TFDS metadata and counts.json once every shard is done; -> the counts."""
  missing = missing_shards(cache_dir, plan)
  if missing:
    raise ValueError(f"token cache {cache_dir}: {len(missing)} shards are not done yet "
                     f"(first: {missing[0]['split']} {missing[0]['index']})")
  split_infos, counts = [], {"directory": ".", "windows": {}, "frames": {}, "bytes": 0}
  for split in SPLITS:
    done = [manifest_lib.read_json(_done_path(cache_dir, s)) for s in plan["shards"] if s["split"] == split]
    counts["windows"][split] = sum(d["examples"] for d in done)
    counts["frames"][split] = sum(d["frames"] for d in done)
    counts["bytes"] += sum(d["bytes"] for d in done)
    if done and counts["windows"][split]:
      split_infos.append(tfds.core.SplitInfo(
          name=split, shard_lengths=[d["examples"] for d in done],
          num_bytes=sum(d["bytes"] for d in done), filename_template=_template(cache_dir, split)))
  tfds.folder_dataset.write_metadata(data_dir=cache_dir, features=features(spec),
                                     split_infos=split_infos, filename_template=FILE_TEMPLATE,
                                     check_data=False)
  for leftover in glob.glob(os.path.join(cache_dir, "*.tmp-*")):   # from interrupted processes
    os.remove(leftover)
  if audio_counts:
    counts["audio"] = {k: v for k, v in audio_counts.items() if k != "directory"}
  manifest_lib.write_json(os.path.join(cache_dir, COUNTS_FILE), counts)
  return counts


def read_counts(cache_dir: str) -> dict | None:
  """counts.json of a complete cache, else None."""
  return manifest_lib.read_json(os.path.join(cache_dir, COUNTS_FILE))

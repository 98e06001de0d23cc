"""Waveform batches for codec training: random crops of audio, as a checkpointable grain iterator.

    prepare_data(config, workdir, process_index=, process_count=) -> counts
        kind "manifest" / "corpus" (any audio source registered in loader.AUDIO_SOURCES): the audio
        TFDS dataset at the codec's rate and channels (process 0 builds it, the others wait); kind
        "synthetic": nothing to build.
    make_iterator(config, split, workdir=, ...) -> grain iterator of per-process batches
        audio   float32 [b, C, S]   S = round(train.segment_seconds * codec.sample_rate); a random
                                    crop (start uniform in [0, N - S]); shorter items are
                                    zero-padded at the end, as audiocraft's AudioDataset pads them
        weight  float32 [b]         1 for real examples, 0 for the padding of finite (eval) passes

The synthetic source (tests, smoke runs) is seeded per item: a few sines with vibrato and harmonics
plus decaying noise bursts, 2 * S samples long, so that crops differ from epoch to epoch.
"""
from __future__ import annotations

import dataclasses
import os
import time

import grain
import numpy as np

SPLITS = ("train", "validation")


def segment_samples(config) -> int:
  return int(round(float(config.train.segment_seconds) * int(config.codec.sample_rate)))


def _cache_root(config, workdir: str) -> str:
  return os.path.abspath(config.data.get("cache_dir") or os.path.join(workdir, "data"))


def _synthetic_sizes(config) -> dict[str, int]:
  n = int(config.data.num_examples)
  return {"train": n, "validation": max(int(config.train.batch_size), n // 8)}


# --- sources -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SyntheticAudio:
  """Item i: {'audio': float32 [channels, length]}, a seeded mix of tones and noise bursts."""
  seed: int
  sample_rate: int
  channels: int
  length: int
  size: int

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    rng = np.random.default_rng([self.seed, int(index)])
    t = np.arange(self.length) / self.sample_rate
    nyquist = self.sample_rate / 2
    x = np.zeros((self.length,), np.float64)
    for _ in range(int(rng.integers(1, 4))):
      f0 = float(np.exp(rng.uniform(np.log(60.0), np.log(max(61.0, nyquist / 4)))))
      vib = 1.0 + 0.01 * np.sin(2 * np.pi * rng.uniform(2, 7) * t)
      phase = 2 * np.pi * np.cumsum(f0 * vib) / self.sample_rate
      for h in range(1, 4):
        if h * f0 < nyquist * 0.9:
          x += rng.uniform(0.1, 0.5) / h * np.sin(h * phase + rng.uniform(0, 2 * np.pi))
    for _ in range(int(rng.integers(0, 4))):
      start = int(rng.integers(0, self.length))
      n = self.length - start
      decay = np.exp(-np.arange(n) / (rng.uniform(0.005, 0.05) * self.sample_rate))
      x[start:] += rng.uniform(0.1, 0.4) * decay * rng.standard_normal(n)
    x = 0.8 * x / max(1e-6, float(np.max(np.abs(x))))
    audio = np.stack([x * (1.0 - 0.1 * c) for c in range(self.channels)])
    return {"audio": audio.astype(np.float32)}


def _source(config, split: str, workdir: str):
  d = config.data
  if d.kind == "synthetic":
    seed = int(config.train.seed) + (0 if split == "train" else 1)
    return SyntheticAudio(seed, int(config.codec.sample_rate), int(config.codec.channels),
                          2 * segment_samples(config), _synthetic_sizes(config)[split])
  import tensorflow_datasets as tfds
  from musicgen_jax.data import manifest as manifest_lib
  root = _audio_root(config, workdir, build=False)
  counts = manifest_lib.read_counts(root)
  if counts is None:
    raise ValueError(f"no audio dataset for this config under {_cache_root(config, workdir)}: call "
                     "audio_crops.prepare_data(config, workdir) first")
  builder = tfds.builder_from_directory(manifest_lib.dataset_dir(root, counts))
  if split not in builder.info.splits:
    raise ValueError(f"the {split!r} split of the audio dataset is empty: give "
                     "data.valid_manifest, or a data.valid_fraction that selects some files")
  return builder.as_data_source(split)


def _audio_root(config, workdir: str, build: bool) -> str:
  from musicgen_jax.data import loader
  kind = config.data.kind
  if kind not in loader.AUDIO_SOURCES:
    raise ValueError(f"data.kind must be one of {('synthetic',) + tuple(loader.AUDIO_SOURCES)}, "
                     f"got {kind!r}")
  root = _cache_root(config, workdir)
  os.makedirs(root, exist_ok=True)
  return loader.AUDIO_SOURCES[kind](config, root, int(config.codec.sample_rate),
                                    int(config.codec.channels), build=build)


def prepare_data(config, workdir: str, *, process_index: int = 0, process_count: int = 1,
                 timeout: float = 24 * 3600) -> dict:
  """Builds or reuses the audio dataset; -> {'kind', 'train', 'validation' (items), ['skipped',
  'rescaled']} (manifest_lib.build_dataset's counts)."""
  del process_count
  if config.data.kind == "synthetic":
    return {"kind": "synthetic", **_synthetic_sizes(config)}
  from musicgen_jax.data import manifest as manifest_lib
  root = _audio_root(config, workdir, build=process_index == 0)
  t0 = time.monotonic()
  while (counts := manifest_lib.read_counts(root)) is None:   # process 0 is still building it
    if time.monotonic() - t0 > timeout:
      raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {root}/counts.json; did "
                         "process 0 fail?")
    time.sleep(1.0)
  return {"kind": config.data.kind, "train": counts["train"], "validation": counts["validation"],
          "skipped": counts.get("skipped", {}), "rescaled": counts.get("rescaled", 0)}


# --- transforms and the pipeline -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Crop(grain.transforms.RandomMap):
  """{'audio': [C, N] (int16 or float)} -> {'audio': float32 [C, samples], 'weight': 1}."""
  samples: int

  def random_map(self, item: dict, rng: np.random.Generator) -> dict:
    audio = np.asarray(item["audio"])
    if audio.dtype == np.int16:
      audio = audio.astype(np.float32) / np.float32(32768.0)
    n = audio.shape[-1]
    start = int(rng.integers(0, n - self.samples + 1)) if n > self.samples else 0
    out = np.zeros((audio.shape[0], self.samples), np.float32)
    piece = audio[:, start:start + self.samples]
    out[:, :piece.shape[-1]] = piece
    return {"audio": out, "weight": np.float32(1.0)}

  def padding(self, channels: int) -> dict:
    return {"audio": np.zeros((channels, self.samples), np.float32), "weight": np.float32(0.0)}


def _stack(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def make_dataset(source, config, *, process_index: int = 0, process_count: int = 1,
                 shuffle: bool = True, num_epochs: int | None = None) -> grain.IterDataset:
  """The grain pipeline over a random-access source of {'audio': [C, N]} items."""
  from musicgen_jax.data.loader import ProcessRows
  t, d = config.train, config.data
  global_batch = int(t.batch_size)
  if global_batch % process_count:
    raise ValueError(f"train.batch_size {global_batch} must be divisible by the {process_count} "
                     "processes")
  if len(source) == 0:
    raise ValueError("the audio source is empty")
  crop = Crop(segment_samples(config))
  seed = int(t.seed) % 2**32
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.random_map(crop, seed=(seed + 1) % 2**32)
  ds = ProcessRows(ds, global_batch, process_index, process_count,
                   crop.padding(int(config.codec.channels)))
  ds = ds.batch(global_batch // process_count, drop_remainder=True, batch_fn=_stack)
  prefetch = int(d.get("prefetch", 2))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))
  workers = int(d.get("num_workers", 0))
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=max(1, prefetch)))
  return it


def make_iterator(config, split: str, *, workdir: str, process_index: int = 0,
                  process_count: int = 1, shuffle: bool = True,
                  num_epochs: int | None = None) -> grain.DatasetIterator:
  """Per-process batches {'audio' [b, C, S], 'weight' [b]} of `split`, with get_state / set_state.
  num_epochs None: endless. prepare_data must have run (except for synthetic data)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  source = _source(config, split, workdir)
  return iter(make_dataset(source, config, process_index=process_index,
                           process_count=process_count, shuffle=shuffle, num_epochs=num_epochs))

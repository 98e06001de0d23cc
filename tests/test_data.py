"""Audio data: manifest builder, token cache, grain loader (tiny WAVs, a tiny random EnCodec)."""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import threading

import grain
import jax
import jax.numpy as jnp
import librosa
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import soundfile as sf
import tensorflow_datasets as tfds

from configs.musicgen import get_config
from musicgen_jax import checkpoint, pipeline, sharding
from musicgen_jax.codec.encodec import EncodecConfig, EncodecModel
from musicgen_jax.conditioners import melody as melody_lib
from musicgen_jax.data import loader, manifest, synthetic, token_cache

SR = 3200                 # the tiny codec: hop 32 -> 100 frames/s, 4 codebooks of 64
ENCODEC = dict(model_type="encodec", sampling_rate=SR, audio_channels=1, num_filters=4,
               hidden_size=16, upsampling_ratios=[8, 4], use_causal_conv=False, pad_mode="reflect",
               use_conv_shortcut=False, num_lstm_layers=2, codebook_size=64,
               target_bandwidths=[2.4])
# name -> (seconds, sample rate, channels); 0.3 s is below min_seconds.
FILES = {"sine8k_stereo.wav": (3.0, 8000, 2), "noise4k.wav": (2.0, 4000, 1),
         "sine_native.wav": (2.5, SR, 1), "clip.wav": (0.55, 16000, 2), "short.wav": (0.3, SR, 1)}


def _write_audio(folder: str) -> None:
  rng = np.random.default_rng(0)
  for i, (name, (sec, sr, ch)) in enumerate(FILES.items()):
    t = np.arange(int(sec * sr)) / sr
    x = 0.4 * np.sin(2 * np.pi * (220 * (i + 1)) * t)[:, None] * np.ones(ch)
    if "noise" in name:
      x = 0.3 * rng.standard_normal(x.shape)
    x[:, -1] *= 0.5                         # channels differ, so mixing is visible
    sf.write(os.path.join(folder, name), x.astype(np.float32), sr, subtype="PCM_16")
  with open(os.path.join(folder, "broken.wav"), "wb") as f:
    f.write(b"RIFF\x00\x00 this is not audio" * 10)


def _manifest(folder: str) -> str:
  lines = [json.dumps({"path": n, "description": f"music {n}", "bpm": 100 + i})
           for i, n in enumerate(FILES)]
  lines += [json.dumps({"path": "broken.wav", "description": "broken"}),
            json.dumps({"path": "nowhere.wav", "description": "missing"}),
            '{"path": "x.wav", "description": ',                    # not JSON
            json.dumps({"path": "noise4k.wav"}), ""]                # no description; blank line
  path = os.path.join(folder, "songs.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def _config(folder: str, manifest_path: str, codec_dir: str) -> ml_collections.ConfigDict:
  c = get_config("tiny_melody")
  c.codec.update(sample_rate=SR, frame_rate=100, channels=1)
  c.train.update(segment_seconds=0.5, batch_size=4, seed=3)
  c.data.update(kind="manifest", manifest=manifest_path, codec=codec_dir, min_seconds=0.5,
                valid_fraction=0.2, encode_batch_size=3, cache_dir=os.path.join(folder, "cache"))
  c.data.encode_seconds = 1.2            # windows of 120 frames; buckets 120, 60
  c.data.items_per_shard = 2
  return c


def _random_params(codec) -> dict:
  """Seeded noise in the shapes of codec.init (no init compile): fan-in scaled kernels, small
  biases, codebooks at about the scale of the tiny encoder's output so that the codes vary."""
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "embed" in name:
      return (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)
    if leaf.ndim == 1:
      return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(codec.init, jax.random.key(0)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Audio files, a manifest, a model directory with a tiny random codec, config, audio data."""
  root = str(tmp_path_factory.mktemp("data"))
  _write_audio(root)
  path = _manifest(root)
  codec = EncodecModel(EncodecConfig.from_hf_dict(ENCODEC))
  params = _random_params(codec)
  c = _config(root, path, os.path.join(root, "model"))
  model_cfg = get_config("tiny")
  model_cfg.codec = ml_collections.ConfigDict(dict(sample_rate=SR, frame_rate=100, channels=1,
                                                   encodec=ENCODEC))
  checkpoint.save_model(c.data.codec, model_cfg, {"lm": {"w": np.zeros(2, np.float32)},
                                                  "codec": params})
  codec, params = checkpoint.load_codec(c.data.codec)
  spec = token_cache.spec_for(c, codec)
  audio_root = manifest.prepare(c, c.data.cache_dir, SR, 1)
  counts = manifest.read_counts(audio_root)
  return dict(root=root, config=c, codec=codec, params=params, spec=spec,
              audio_dir=manifest.dataset_dir(audio_root, counts), counts=counts)


def _build(env, cache_dir, processes=1, batch_size=3, after_shard=None):
  """Token cache shards for `processes` simulated processes (run one after the other)."""
  os.makedirs(cache_dir, exist_ok=True)
  plan = token_cache.make_plan(cache_dir, env["audio_dir"], env["spec"], items_per_shard=2)
  encoders = []
  for p in range(processes):
    enc = token_cache.Encoder(env["codec"], env["params"], env["spec"], batch_size)
    token_cache.build_shards(cache_dir, plan, env["codec"], env["params"], env["spec"],
                             batch_size=batch_size, process_index=p, process_count=processes,
                             after_shard=after_shard, encoder=enc)
    encoders.append(enc)
  return plan, encoders


@pytest.fixture(scope="module")
def cache(env, tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tokens"))
  plan, (enc,) = _build(env, d)
  token_cache.finalize(d, plan, env["spec"], env["counts"])
  return d, enc


def _items(directory: str, split: str) -> list[dict]:
  source = tfds.builder_from_directory(directory).as_data_source(split)
  return [source[i] for i in range(len(source))]


# --- manifest ------------------------------------------------------------------------------------

def test_manifest_skips_each_bad_record_and_counts_it(env, caplog):
  counts = env["counts"]
  assert counts["skipped"] == {"bad_json": 1, "missing_field": 1, "missing_file": 1,
                               "undecodable": 1, "too_short": 1}
  assert counts["skipped_files"]["undecodable"] == ["broken.wav"]
  assert counts["skipped_files"]["too_short"] == ["short.wav"]
  assert counts["skipped_files"]["missing_file"] == ["nowhere.wav"]
  assert counts["train"] + counts["validation"] == 4 and counts["validation"] >= 1
  # The log names the file and the reason (a fresh read of the same manifest).
  with caplog.at_level(logging.WARNING):
    manifest.read_manifest(env["config"].data.manifest)
  assert "nowhere.wav" in caplog.text and "not JSON" in caplog.text


def test_undecodable_file_is_skipped_saying_why_without_librosa_warnings(env):
  """The skip line says what each decoder made of the file (audioread's error has no message of
  its own), and librosa's warning about falling back on audioread is not shown for every file."""
  import warnings
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    with pytest.raises(ValueError, match=r"not audio that libsndfile reads \(.+\), nor that "
                                         r"audioread \(ffmpeg\) opens \(\w+"):
      manifest._probe_seconds(os.path.join(env["root"], "broken.wav"))
  assert not [w for w in seen if "audioread" in str(w.message) or "PySoundFile" in str(w.message)]


def test_manifest_without_usable_lines_is_one_clear_error(env, tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n  \n")
  with pytest.raises(ValueError, match="is empty"):
    manifest.read_manifest(str(empty))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('not json\n{"path": "gone.wav", "description": "x"}\n')
  with pytest.raises(ValueError, match="no usable line"):
    manifest.read_manifest(str(bad))


def test_stored_audio_is_librosa_resampled_and_mixed(env):
  items = _items(env["audio_dir"], "train") + _items(env["audio_dir"], "validation")
  by_source = {json.loads(x["metadata"])["source"]: x for x in items}
  for name in ("sine8k_stereo.wav", "noise4k.wav", "clip.wav"):
    ref, _ = librosa.load(os.path.join(env["root"], name), sr=SR, mono=True, res_type="soxr_hq")
    got = by_source[name]["audio"]
    assert got.dtype == np.int16 and got.shape == (1, ref.shape[-1])
    assert np.max(np.abs(manifest.from_int16(got)[0] - ref)) <= 0.5 / 32768 + 1e-7
  # Mono duplicated to stereo for a stereo codec.
  wav = manifest.decode(os.path.join(env["root"], "noise4k.wav"), SR, 2)
  ref, _ = librosa.load(os.path.join(env["root"], "noise4k.wav"), sr=SR, mono=True)
  np.testing.assert_array_equal(wav, np.stack([ref, ref]))


def test_float_files_beyond_full_scale_are_rescaled_and_nan_ones_skipped(tmp_path, caplog):
  """A float WAV never normalised (peak 40) is divided by its peak, not clipped into a square wave,
  counted and named; one holding NaN or inf samples is skipped as undecodable and named."""
  sr, t = 8000, np.arange(8000 * 2) / 8000
  sine = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
  files = {"plain.wav": sine, "loud.wav": 80 * sine, "nan.wav": np.where(t < 1, sine, np.nan),
           "inf.wav": np.where(t < 1, sine, np.inf)}
  with open(tmp_path / "m.jsonl", "w") as f:
    for name, x in files.items():
      sf.write(str(tmp_path / name), x.astype(np.float32), sr, subtype="FLOAT")
      f.write(json.dumps({"path": name, "description": name}) + "\n")
  m = manifest.read_manifest(str(tmp_path / "m.jsonl"), valid_fraction=0.0)
  with caplog.at_level(logging.WARNING):
    counts = manifest.build_dataset(m, str(tmp_path / "data"), SR, 1, 0.5)
  assert sorted(counts["skipped_files"]["undecodable"]) == ["inf.wav", "nan.wav"]
  assert counts["rescaled"] == 1 and "rescaling loud.wav: its samples peak at 40" in caplog.text
  items = {json.loads(x["metadata"])["source"]: manifest.from_int16(x["audio"])[0]
           for split in ("train", "validation") if counts[split]
           for x in _items(manifest.dataset_dir(str(tmp_path / "data"), counts), split)}
  assert set(items) == {"plain.wav", "loud.wav"}
  # The same waveform at full scale: a sine, not a clipped square (which would sit at +-1 throughout).
  np.testing.assert_allclose(items["loud.wav"], items["plain.wav"] / np.abs(items["plain.wav"]).max(),
                             atol=2e-3)
  assert np.mean(np.abs(items["loud.wav"]) > 0.99) < 0.1


# --- token cache ---------------------------------------------------------------------------------

def test_codec_that_disagrees_with_the_config_is_refused(env):
  c = ml_collections.ConfigDict(env["config"].to_dict())
  c.codec.sample_rate = 32000
  with pytest.raises(ValueError, match="sample rate is 3200 but the config's is 32000"):
    token_cache.spec_for(c, env["codec"])
  c = ml_collections.ConfigDict(env["config"].to_dict())
  c.model.num_codebooks = 8
  with pytest.raises(ValueError, match="codebook count is 4 but the config's is 8"):
    token_cache.spec_for(c, env["codec"])


def test_cached_codes_and_chroma_equal_a_direct_encode_of_each_window(env, cache):
  """The cache encodes windows 3 at a time (padded batches); the reference, one window per call."""
  spec, codec, params = env["spec"], env["codec"], env["params"]
  encode = jax.jit(lambda p, x: codec.encode(p, x))
  chroma = jax.jit(lambda x: jnp.argmax(melody_lib.chromagram(x, SR, argmax=False), -1))
  audio = {s: _items(env["audio_dir"], s) for s in manifest.SPLITS}
  lengths = set()
  for split in manifest.SPLITS:
    cached = _items(cache[0], split)
    expected = [(item, w) for item in audio[split]
                for w in token_cache.windows(item["audio"].shape[-1], spec)]
    assert len(cached) == len(expected)
    lengths |= {padded for _, (_, _, padded) in expected}
    for got, (item, (start, real, padded)) in zip(cached, expected):
      window = np.zeros((1, 1, padded), np.float32)     # the window alone, padded to its bucket
      window[0, :, :real] = manifest.from_int16(item["audio"])[:, start:start + real]
      ref = np.asarray(encode(params, jnp.asarray(window)))[0, :, :-(-real // spec.hop)]
      np.testing.assert_array_equal(got["codes"], ref)
      ref_ids = np.asarray(chroma(window[:, 0]))[0]
      np.testing.assert_array_equal(got["chroma"], ref_ids[:len(got["chroma"])])
      assert len(got["chroma"]) == melody_lib.num_chroma_frames(real)
      meta = json.loads(got["metadata"])
      assert meta["offset_seconds"] == round(start / SR, 4) and got["caption"] == item["caption"]
  assert lengths == {60 * 32, 120 * 32}                    # both buckets were used
  assert len(np.unique(np.concatenate([x["codes"].ravel() for x in cached]))) > 16  # codes vary
  # A long file: full windows, the last one ending at the file's end.
  assert token_cache.windows(int(3.0 * SR), spec) == [(0, 3840, 3840), (3840, 3840, 3840),
                                                       (5760, 3840, 3840)]


def test_token_source_decodes_like_tfds(env, cache):
  for split in manifest.SPLITS:
    fast = loader.TokenSource(cache[0], split)
    ref = _items(cache[0], split)
    assert len(fast) == len(ref)
    for i, want in enumerate(ref):
      got = fast[i]
      assert got["caption"] == want["caption"].decode()
      assert got["metadata"] == want["metadata"].decode()
      for k in ("codes", "chroma"):
        assert got[k].dtype == want[k].dtype
        np.testing.assert_array_equal(got[k], want[k])


def test_two_processes_write_the_shards_of_one(env, cache, tmp_path):
  d = str(tmp_path / "two")
  plan, encs = _build(env, d, processes=2)
  assert all(e.windows > 0 for e in encs)
  assert sum(e.windows for e in encs) == cache[1].windows
  token_cache.finalize(d, plan, env["spec"], env["counts"])
  shards = lambda root: sorted(os.path.basename(p)
                              for p in glob.glob(os.path.join(root, "*.array_record-*")))
  names = shards(cache[0])
  assert names == shards(d)
  for n in names:
    with open(os.path.join(d, n), "rb") as a, open(os.path.join(cache[0], n), "rb") as b:
      assert a.read() == b.read(), n


def test_interrupted_build_resumes_without_redoing_finished_shards(env, cache, tmp_path):
  d = str(tmp_path / "resume")

  def crash(shard):
    raise KeyboardInterrupt("preempted")

  with pytest.raises(KeyboardInterrupt):
    _, (first,) = _build(env, d, after_shard=crash)
  plan = token_cache.make_plan(d, env["audio_dir"], env["spec"])
  assert len(token_cache.missing_shards(d, plan)) == len(plan["shards"]) - 1
  with pytest.raises(ValueError, match="not done"):
    token_cache.finalize(d, plan, env["spec"])
  _, (second,) = _build(env, d)
  done = _items_per_shard(d, plan)[0]
  assert second.windows == cache[1].windows - done     # the finished shard was not re-encoded
  token_cache.finalize(d, plan, env["spec"])
  for split in manifest.SPLITS:
    for a, b in zip(_items(d, split), _items(cache[0], split), strict=True):
      np.testing.assert_array_equal(a["codes"], b["codes"])


def _items_per_shard(d, plan):
  return [json.load(open(token_cache._done_path(d, s)))["examples"] for s in plan["shards"]]


# --- loader --------------------------------------------------------------------------------------

class _Items:
  """Items whose codes carry their index: codes [K, F] = index, F = frames[index]."""

  def __init__(self, frames):
    self.frames = frames

  def __len__(self):
    return len(self.frames)

  def __getitem__(self, i):
    return {"codes": np.full((4, self.frames[i]), i + 1, np.int16), "caption": f"item {i}",
            "chroma": (np.arange(12, dtype=np.uint8) + i) % 12}


def _loader_config(batch=4, melody=True):
  c = get_config("tiny_melody" if melody else "tiny")
  c.train.update(batch_size=batch, segment_seconds=0.2, seed=7)
  c.codec.update(sample_rate=SR, frame_rate=100)     # T = 20 frames, chroma 0.78 frames/s
  c.data.prefetch = 0
  return c


def _tok():
  return pipeline.text_conditioner_from_config(get_config("tiny"))


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _ids(batch):
  return [int(c[0, 0]) - 1 if w else -1 for c, w in zip(batch["codes"], batch["weight"])]


def test_process_shards_are_disjoint_cover_the_data_and_assemble_the_global_batch():
  c, source = _loader_config(batch=4), _Items([30] * 12)
  one = list(loader.make_dataset(source, c, _tok(), num_epochs=2))
  two = [list(loader.make_dataset(source, c, _tok(), process_index=p, process_count=2,
                                  num_epochs=2)) for p in range(2)]
  assert len(one) == len(two[0]) == len(two[1]) == 6
  for g, (a, b) in zip(one, zip(*two)):
    for k in g:
      np.testing.assert_array_equal(g[k], np.concatenate([a[k], b[k]]), err_msg=k)
  epoch1 = [i for b in one[:3] for i in _ids(b)]
  epoch2 = [i for b in one[3:] for i in _ids(b)]
  assert sorted(epoch1) == sorted(epoch2) == list(range(12)) and epoch1 != epoch2


def test_same_seed_same_batches_and_restore_continues_identically(tmp_path):
  c, source = _loader_config(), _Items([25, 40, 18, 60, 33, 20, 50])
  ref = _batches(iter(loader.make_dataset(source, c, _tok())), 8)
  it = iter(loader.make_dataset(source, c, _tok()))
  _batches(it, 3)
  state = it.get_state()
  ckpt = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  ckpt.save(tmp_path / "iter", args=grain.checkpoint.CheckpointSave(it))
  _batches(it, 2)                                     # moves on; the restore must rewind it
  fresh = iter(loader.make_dataset(source, c, _tok()))
  ckpt.restore(tmp_path / "iter", args=grain.checkpoint.CheckpointRestore(fresh))
  other = iter(loader.make_dataset(source, c, _tok()))
  other.set_state(state)
  for restored in (fresh, other):
    for a, b in zip(_batches(restored, 5), ref[3:]):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  c.train.seed = 8
  diff = _batches(iter(loader.make_dataset(source, c, _tok())), 2)
  assert any(not np.array_equal(a["codes"], b["codes"]) for a, b in zip(diff, ref))


def test_short_items_are_padded_with_a_frame_mask_and_chroma_follows_the_crop():
  c, source = _loader_config(batch=2), _Items([7, 400])
  crop = loader.Crop(20, 100.0, SR / 4096, int(c.model.chroma_length))
  short = crop.map_with_index(5, source[0])
  assert short["frame_mask"].tolist() == [True] * 7 + [False] * 13
  assert (short["codes"][:, :7] == 1).all() and (short["codes"][:, 7:] == 0).all()
  # Chroma as MusicGen.melody_window builds it: the crop's chroma frames, tiled to chroma_length.
  ns = type("M", (), {"sample_rate": SR, "lm_cfg": type("L", (), {"chroma_length": 16})})()
  onehot = np.eye(12, dtype=np.float32)[source[0]["chroma"]][None]
  np.testing.assert_array_equal(short["chroma"],
                                pipeline.MusicGen.melody_window(ns, onehot[:, :1], 0.0)[0])
  ids = np.arange(40, dtype=np.uint8) % 12                  # a long item: 40 chroma frames
  long_crop = loader.Crop(2100, 100.0, SR / 4096, 16)       # 21 s: more than 16 chroma frames
  ref = pipeline.MusicGen.melody_window(ns, np.eye(12, dtype=np.float32)[ids][None], 3.0)[0]
  np.testing.assert_array_equal(long_crop.chroma(ids, start=300, real=2100), ref)
  long = [crop.map_with_index(i, source[1]) for i in range(20)]
  assert all(x["frame_mask"].all() for x in long)
  starts = {int(np.argmax(x["codes"][0] > 0)) for x in long}   # constant codes: all start at 0 ...
  assert starts == {0}


def test_finite_eval_pads_with_weight_zero_and_every_process_yields_alike():
  c, source = _loader_config(batch=4), _Items([30] * 5)
  runs = [list(loader.make_dataset(source, c, _tok(), process_index=p, process_count=2,
                                   shuffle=False, num_epochs=1)) for p in range(2)]
  assert [len(r) for r in runs] == [2, 2]
  assert [_ids(b) for b in runs[0]] == [[0, 1], [4, -1]]
  assert [_ids(b) for b in runs[1]] == [[2, 3], [-1, -1]]
  assert sum(float(b["weight"].sum()) for r in runs for b in r) == 5.0


def test_synthetic_kind_serves_synthetic_examples(tmp_path):
  c = get_config("tiny")
  c.train.batch_size = 8
  assert loader.prepare_data(c, str(tmp_path))["train"] == 64
  it = loader.make_iterator(c, "train", _tok(), workdir=str(tmp_path))
  frames = int(round(c.train.segment_seconds * c.codec.frame_rate))
  refs = {synthetic.example(c.train.seed, i, 4, c.model.card, frames)[1].tobytes()
          for i in range(64)}
  seen = [x.tobytes() for b in _batches(it, 8) for x in b["codes"]]
  assert set(seen) == refs and len(seen) == 64
  assert _batches(it, 1)[0]["frame_mask"].all()


def test_prepare_data_builds_once_and_feeds_the_iterator(env, monkeypatch, tmp_path):
  c = env["config"]                       # its audio dataset exists already (the env fixture)
  summary = loader.prepare_data(c, str(tmp_path))
  assert summary["skipped"]["undecodable"] == 1 and summary["train"] > 0
  # The codec task reads the same audio dataset and reports the same counts.
  from musicgen_jax.data import audio_crops
  crops = audio_crops.prepare_data(c, str(tmp_path))
  assert crops["skipped"] == summary["skipped"] and crops["rescaled"] == summary["rescaled"] == 0
  assert summary["cache"].startswith(c.data.cache_dir)
  calls = []
  monkeypatch.setattr(token_cache, "build_shards", lambda *a, **k: calls.append(1))
  assert loader.prepare_data(c, str(tmp_path))["cache"] == summary["cache"] and not calls
  batch = next(loader.make_iterator(c, "train", _tok(), workdir=str(tmp_path)))
  assert batch["codes"].shape == (4, 4, 50) and batch["chroma"].shape == (4, 16, 12)
  assert batch["frame_mask"].all() and batch["codes"].max() > 0
  ev = list(loader.make_iterator(c, "validation", _tok(), workdir=str(tmp_path), shuffle=False,
                                 num_epochs=1))
  assert sum(float(b["weight"].sum()) for b in ev) == summary["validation"]
  stats = loader.measure_throughput(c, str(tmp_path), seconds=0.3, tokenizer=_tok())
  assert stats["frames_per_s"] > 0


def test_prepare_data_on_two_processes_at_once_equals_one(env, cache, tmp_path):
  c = ml_collections.ConfigDict(env["config"].to_dict())
  c.data.cache_dir = str(tmp_path / "cache")
  out, errors = {}, []

  def run(p):
    try:
      out[p] = loader.prepare_data(c, str(tmp_path), process_index=p, process_count=2)
    except Exception as e:  # noqa: BLE001 -- surfaced below
      errors.append(e)

  other = threading.Thread(target=run, args=(1,))
  other.start()
  run(0)
  other.join(timeout=120)
  assert not errors and out[0] == out[1]
  for split in manifest.SPLITS:
    for a, b in zip(_items(out[0]["cache"], split), _items(cache[0], split), strict=True):
      np.testing.assert_array_equal(a["codes"], b["codes"])


def test_a_changed_manifest_or_codec_names_another_cache(env, tmp_path):
  c = ml_collections.ConfigDict(env["config"].to_dict())
  root = manifest.prepare(c, c.data.cache_dir, SR, 1, build=False)
  assert manifest.read_counts(root) is not None           # the env fixture's, reused
  with open(c.data.manifest) as f:
    text = f.read()
  same = os.path.join(env["root"], "copy.jsonl")            # same bytes, another name: same cache
  changed = os.path.join(env["root"], "changed.jsonl")      # one caption edited: a new cache
  with open(same, "w") as f:
    f.write(text)
  with open(changed, "w") as f:
    f.write(text.replace("music noise4k.wav", "music noise"))
  c.data.manifest = same
  assert manifest.prepare(c, c.data.cache_dir, SR, 1, build=False) == root
  c.data.manifest = changed
  other = manifest.prepare(c, c.data.cache_dir, SR, 1, build=False)
  assert other != root and manifest.read_counts(other) is None
  ident = token_cache.codec_identity(env["codec"], env["params"])
  params = jax.tree.map(np.copy, env["params"])
  params["encoder"]["layers_0"]["bias"][0] += 1e-3
  assert token_cache.codec_identity(env["codec"], params) != ident
  assert token_cache.cache_dir_for("r", "a", env["spec"], ident) != \
      token_cache.cache_dir_for("r", "b", env["spec"], ident)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_restore():
  c, source = _loader_config(), _Items([25, 40, 18, 60, 33, 20, 50])
  ref = _batches(iter(loader.make_dataset(source, c, _tok())), 6)
  c.data.update(num_workers=2, prefetch=2)
  it = iter(loader.make_dataset(source, c, _tok()))
  got = _batches(it, 4)
  state = it.get_state()
  got += _batches(it, 2)
  it.close()
  other = iter(loader.make_dataset(source, c, _tok()))
  other.set_state(state)
  got += _batches(other, 2)
  other.close()
  for a, b in zip(got, ref[:6] + ref[4:6], strict=True):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_word_vocabulary_is_fitted_on_the_training_captions_once(env, tmp_path):
  """text.tokenizer='words': the run fits a word-level tokenizer.json on its training split's
  captions, sizes the text encoder by it, keeps it in the work and model directories, and a resumed
  run reuses it; nothing can build the text encoder before the vocabulary exists."""
  from musicgen_jax.conditioners.tokenizer import UNK_ID, TextTokenizer
  from musicgen_jax.pipeline import MusicGen
  from musicgen_jax.training import loop
  from musicgen_jax.training.lm_task import LMTask
  c = ml_collections.ConfigDict(env["config"].to_dict())
  c.text.update(tokenizer="words", num_layers=0)
  c.train.update(num_steps=1, eval_every=0, checkpoint_every=1, progress=False,
                 async_checkpoints=False)
  with pytest.raises(ValueError, match="fitted on the training captions"):
    pipeline.text_conditioner_from_config(c)
  with pytest.raises(ValueError, match="known only after prepare_data"):
    LMTask(c, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])).init_params(jax.random.key(0))
  wd = str(tmp_path / "run")
  loop.train(c, wd, out=lambda _: None)
  path = os.path.join(wd, checkpoint.TOKENIZER_FILE)
  tok = TextTokenizer.from_file(path)
  cache = loader.prepare_data(c, wd)["cache"]
  train_captions = [it["caption"].decode() for it in _items(cache, "train")]
  valid_captions = [it["caption"].decode() for it in _items(cache, "validation")]
  split = lambda t: re.findall(r"[^\W_]+|[^\w\s]|_", t)     # white space, then punctuation
  words = {w for t in train_captions for w in split(t)}
  assert tok.vocab_size == len(words) + 3                        # <pad>, </s>, <unk> and the words
  ids = tok(train_captions)
  assert not (ids["input_ids"] == UNK_ID).any()
  last = ids["attention_mask"].sum(1) - 1
  assert (ids["input_ids"][np.arange(len(last)), last] == 1).all()            # </s> ends each
  held_out = {w for t in valid_captions for w in split(t)} - words
  assert held_out and (tok(valid_captions)["input_ids"] == UNK_ID).any()
  model = MusicGen.load(wd)
  assert model.text.vocab_size == tok.vocab_size
  assert model.params["text"]["token_embedding"]["embedding"].shape == (128, c.text.dim)
  before = open(path, "rb").read()
  os.utime(path, (0, 0))
  c.train.num_steps = 2
  loop.train(c, wd, out=lambda _: None)                         # resumes: the same vocabulary
  assert open(path, "rb").read() == before and os.path.getmtime(path) == 0


# --- metadata merged into captions ----------------------------------------------------------------

FIELDS = ("key", "bpm", "genre", "moods", "instrument")


def test_attribute_phrases_name_each_usable_field_and_skip_the_rest():
  meta = {"key": "G major", "bpm": 71.6, "genre": " jazz ", "moods": ["calm", "", "dreamy"],
          "instrument": "flute", "title": "not asked for"}
  assert loader.attribute_phrases(meta, FIELDS) == ["G major", "72 bpm", "jazz", "calm, dreamy",
                                                    "flute"]
  assert loader.attribute_phrases(json.dumps(meta), ("instrument", "key")) == ["flute", "G major"]
  bad = {"key": None, "bpm": "fast", "genre": "", "moods": [], "instrument": {"a": 1}}
  assert loader.attribute_phrases(bad, FIELDS) == []
  assert loader.attribute_phrases({"bpm": -3}, FIELDS) == loader.attribute_phrases({"bpm": "nan"}, FIELDS) == []
  assert loader.attribute_phrases("{not json", FIELDS) == loader.attribute_phrases(None, FIELDS) == []


def test_merged_captions_follow_their_probabilities_and_the_stream_position():
  item = {"caption": "an Irish reel", "codes": np.zeros((4, 5), np.int16),
          "metadata": json.dumps({"key": "D major", "bpm": 120, "instrument": "fiddle"})}
  phrases = {"D major", "120 bpm", "fiddle"}
  merge = lambda p, desc=0.0, attr=0.0: loader.MergeAttributes(p, desc, attr, FIELDS, seed=5)  # noqa: E731
  always = [merge(1.0).map_with_index(i, item)["caption"] for i in range(40)]
  for cap in always:
    head, *rest = cap.split(", ")
    assert head == "an Irish reel" and set(rest) == phrases
  assert len(set(always)) > 1                                   # the attributes' order varies
  alone = [merge(1.0, desc=1.0).map_with_index(i, item)["caption"] for i in range(20)]
  assert all(set(c.split(", ")) == phrases for c in alone)
  assert merge(1.0, attr=1.0).map_with_index(3, item) is item   # every phrase dropped: unchanged
  assert merge(0.0).map_with_index(3, item) is item
  some = [merge(1.0, attr=0.5).map_with_index(i, item)["caption"] for i in range(400)]
  named = np.mean([len(c.split(", ")) - 1 for c in some if c != item["caption"]])
  assert 1.5 < named < 2.5                                      # of 3, each kept half the time
  half = [merge(0.5).map_with_index(i, item) is not item for i in range(400)]
  assert 0.42 < np.mean(half) < 0.58
  again = [merge(0.5).map_with_index(i, item) is not item for i in range(400)]
  assert half == again                                          # a function of the position
  assert merge(1.0).map_with_index(7, dict(item, caption=""))["caption"].split(", ")[0] in phrases


def _subsequence(short: list, long: list) -> bool:
  rest = iter(long)
  return all(w in rest for w in short)


def test_word_dropout_keeps_each_word_with_its_probability_in_order():
  words = "a Bach chorale in G major played by a string ensemble at 72 bpm".split()
  item = {"caption": " ".join(words).encode(), "codes": np.zeros((4, 5), np.int16)}
  drop = lambda p: loader.WordDropout(p, seed=5)  # noqa: E731
  out = [drop(0.3).map_with_index(i, item)["caption"].split() for i in range(400)]
  assert all(_subsequence(o, words) for o in out)
  assert 0.66 < np.mean([len(o) / len(words) for o in out]) < 0.74
  assert len({" ".join(o) for o in out}) > 100                 # the draws vary with the position
  assert [drop(0.3).map_with_index(i, item)["caption"].split() for i in range(400)] == out
  assert drop(1.0).map_with_index(3, item)["caption"] == ""    # every word dropped: no text
  assert drop(1e-9).map_with_index(3, item)["caption"] == " ".join(words)
  assert drop(0.5).map_with_index(3, dict(item, caption=b""))["caption"] == b""
  c = _loader_config(melody=False)
  c.data.word_dropout = 0.0
  assert loader.word_dropout(c) is None
  c.data.word_dropout = 0.3
  assert loader.word_dropout(c) == loader.WordDropout(0.3, seed=7)


class _Recorder:
  """A tokenizer stand-in that keeps every caption it is given."""

  def __init__(self):
    self.seen = []

  def tokenize(self, texts):
    self.seen.extend(texts)
    return {"input_ids": np.zeros((len(texts), 2), np.int32),
            "attention_mask": np.ones((len(texts), 2), np.int32)}


class _ItemsWithMetadata(_Items):
  def __getitem__(self, i):
    return dict(super().__getitem__(i), metadata=json.dumps({"bpm": 60 + i, "genre": "folk"}))


def test_training_stream_merges_metadata_and_restores_alike(tmp_path):
  """Only the augmented (training) stream merges; the draws survive a checkpoint of the iterator."""
  c, source = _loader_config(melody=False), _ItemsWithMetadata([30] * 9)
  c.data.update(caption_merge_p=0.5, caption_drop_description_p=0.5, word_dropout=0.0)

  def captions(augment, skip=0, state=None, n=4):
    rec = _Recorder()
    it = iter(loader.make_dataset(source, c, rec, augment=augment))
    if state is not None:
      it.set_state(state)
    batches = _batches(it, skip + n)
    return rec.seen[skip * 4:], it, batches

  plain, _, _ = captions(False)
  assert all(re.fullmatch(r"item \d", x) for x in plain)
  merged, _, batches = captions(True)
  ids = [i for b in batches for i in _ids(b)]
  changed = [(cap, i) for cap, i in zip(merged, ids) if cap != f"item {i}"]
  assert 0 < len(changed) < len(merged)
  for cap, i in changed:
    assert set(cap.split(", ")) - {f"item {i}"} == {f"{60 + i} bpm", "folk"}
  _, it, _ = captions(True, n=2)
  resumed, _, _ = captions(True, state=it.get_state(), n=2)
  assert resumed == merged[8:]


def test_training_stream_drops_words_after_merging_and_restores_alike():
  c, source = _loader_config(melody=False), _ItemsWithMetadata([30] * 9)
  c.data.update(caption_merge_p=1.0, caption_drop_description_p=0.0, word_dropout=0.4)

  def captions(augment, state=None, n=6):
    rec = _Recorder()
    it = iter(loader.make_dataset(source, c, rec, augment=augment))
    if state is not None:
      it.set_state(state)
    return rec.seen, it, _batches(it, n)

  plain, _, _ = captions(False)
  assert all(re.fullmatch(r"item \d", x) for x in plain)      # validation: as they are
  dropped, _, batches = captions(True)
  ids = [i for b in batches for i in _ids(b)]
  kept = [len(cap.split()) for cap in dropped]
  for cap, i in zip(dropped, ids):   # the merged caption's words (in either order), some dropped
    assert any(_subsequence(cap.split(), m.split())
               for m in (f"item {i}, {60 + i} bpm, folk", f"item {i}, folk, {60 + i} bpm"))
  assert 0.4 < np.mean(kept) / 5 < 0.8 and len(set(kept)) > 2
  _, it, _ = captions(True, n=3)
  resumed, _, _ = captions(True, state=it.get_state(), n=3)
  assert resumed == dropped[12:]


def test_caption_settings_are_checked_and_leave_the_token_cache_alone(tmp_path):
  from musicgen_jax.training import loop
  c = _loader_config()
  before = loader._pointer(c, str(tmp_path))
  c.data.update(caption_merge_p=0.3, caption_attributes=("bpm",))
  assert loader._pointer(c, str(tmp_path)) == before            # read-time: the same cache
  c.data.caption_drop_attribute_p = 1.5
  with pytest.raises(ValueError, match="caption_drop_attribute_p must be a probability"):
    loop.check_config(c)
  c.data.update(caption_drop_attribute_p=0.0, word_dropout=-0.1)
  with pytest.raises(ValueError, match="word_dropout must be a probability"):
    loop.check_config(c)
  c.data.update(word_dropout=0.3, caption_attributes=("bpm", ""))
  with pytest.raises(ValueError, match="caption_attributes must be a list"):
    loop.check_config(c)


def test_word_vocabulary_holds_the_merged_metadata_words(env, cache, tmp_path):
  from musicgen_jax.conditioners.tokenizer import UNK_ID, TextTokenizer
  from musicgen_jax.training.lm_task import LMTask
  c = ml_collections.ConfigDict(env["config"].to_dict())
  c.text.update(tokenizer="words", num_layers=0)
  c.data.caption_merge_p = 0.2
  task = LMTask(c, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  task._fit_words(str(tmp_path), {"cache": cache[0]})
  tok = TextTokenizer.from_file(str(tmp_path / checkpoint.TOKENIZER_FILE))
  bpms = [json.loads(it["metadata"])["bpm"] for it in _items(cache[0], "train")]
  assert bpms and (tok([f"{b} bpm" for b in bpms])["input_ids"] != UNK_ID).all()
  assert "bpm" not in " ".join(it["caption"].decode() for it in _items(cache[0], "train"))


def test_only_the_training_split_merges_metadata(monkeypatch):
  seen = []
  monkeypatch.setattr(loader, "_source", lambda config, split, workdir: split)
  monkeypatch.setattr(loader, "make_dataset",
                      lambda source, *a, augment, **k: seen.append((source, augment)) or [])
  for split in loader.SPLITS:
    loader.make_iterator(_loader_config(), split, None, workdir="")
  assert seen == [("train", True), ("validation", False)]

"""musicgen_jax.eval (one model, every metric), the training hook and compare_patterns.

The metrics are checked on audio whose answers are known: synthetic pieces with a key, a tempo and a
timbre (three "families"), scored as the evaluation scores a model's samples. Real held-out audio
must beat the same audio with its captions shuffled, noise, and a randomly initialised model's
samples; the validation cross-entropy must equal the training loop's evaluation pass.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from musicgen_jax import compare_patterns, patterns
from musicgen_jax.eval import evaluate as ev, frechet, hook
from musicgen_jax.eval.classifier import Classifier, features
from musicgen_jax.eval.reference import Reference, WINDOW_SECONDS, excerpt, windows

SR = 16000
MAJOR, MINOR = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10)
TIMBRES = {"pure": (1.0,), "bright": (1.0, 0.7, 0.5, 0.4, 0.3, 0.25), "hollow": (1.0, 0, 0.5, 0, 0.3)}


def _piece(tonic: int, mode: str, bpm: int, family: str, seconds: float, rng, sr: int = SR
           ) -> np.ndarray:
  """A melody of one-beat notes in the key (tonic-triad heavy, so the key is audible), with a
  percussive envelope on every beat (so the tempo is), in one of three timbres."""
  scale = MAJOR if mode == "major" else MINOR
  beat = 60.0 / bpm
  n = int(seconds * sr)
  out = np.zeros(n, np.float32)
  t = np.arange(int(beat * sr)) / sr
  env = np.exp(-t / (0.35 * beat))
  for i in range(int(seconds / beat)):
    degree = int(rng.choice([0, 0, 2, 4, 4, 1, 3, 5, 6]))
    pc = tonic + scale[degree]
    f0 = 220.0 * 2 ** ((pc - 9) / 12) * (2 if rng.random() < 0.3 else 1)
    bass = 110.0 * 2 ** ((tonic - 9) / 12)      # the tonic under every note
    note = sum(a * (np.sin(2 * np.pi * f0 * (h + 1) * t) + 0.6 * np.sin(2 * np.pi * bass * (h + 1) * t))
               for h, a in enumerate(TIMBRES[family]))
    start = int(i * beat * sr)
    seg = (0.2 * env * note)[: n - start]
    out[start:start + len(seg)] += seg.astype(np.float32)
  return out


def _items(count: int, seconds: float, rng, sr: int = SR) -> list[dict]:
  out = []
  for i in range(count):
    tonic, mode = int(rng.integers(12)), ("major", "minor")[i % 2]
    bpm, family = int(rng.integers(70, 140)), list(TIMBRES)[i % 3]
    out.append({"caption": f"{family} piece in {tonic} {mode} at {bpm} bpm", "family": family,
                "key": (tonic, mode), "bpm": bpm,
                "audio": _piece(tonic, mode, bpm, family, seconds, rng, sr)})
  return out


@pytest.fixture(scope="module")
def synthetic_reference() -> Reference:
  rng = np.random.default_rng(0)
  duration = 4.0
  clip = int(duration * SR)
  w = int(WINDOW_SECONDS * SR)
  train = _items(24, 8.0, rng)
  x = np.stack([features(win, SR) for it in train for win in windows(it["audio"], w)])
  y = [it["family"] for it in train for _ in windows(it["audio"], w)]
  clf = Classifier.fit(x, y, classes=tuple(TIMBRES), hidden=32, steps=400)
  test = _items(12, 8.0, rng)
  items = [dict(it, first=excerpt(it["audio"], clip), last=excerpt(it["audio"], clip, last=True))
           for it in test]
  validation = [excerpt(it["audio"], clip) for it in _items(12, 4.0, rng)]
  info = {"test_accuracy": 1.0, "test_windows": 0, "window_seconds": WINDOW_SECONDS, "chance": 1 / 3}
  return Reference(SR, duration, items, validation, clf, info)


def test_frechet_distance_matches_the_closed_form():
  """For Gaussians N(m1, s1^2 I) and N(m2, s2^2 I) in d dimensions the distance is
  |m1 - m2|^2 + d (s1 - s2)^2; the same set is at distance 0."""
  rng = np.random.default_rng(0)
  d, n = 4, 20000
  x = rng.standard_normal((n, d))
  y = 2.0 + 3.0 * rng.standard_normal((n, d))
  assert frechet.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
  assert frechet.frechet_distance(x, y) == pytest.approx(d * 4.0 + d * 4.0, rel=0.03)
  # Fewer vectors than dimensions: singular covariances, still finite and symmetric.
  a, b = rng.standard_normal((5, 16)), rng.standard_normal((5, 16)) + 1
  assert np.isfinite(frechet.frechet_distance(a, b))
  assert frechet.frechet_distance(a, b) == pytest.approx(frechet.frechet_distance(b, a), rel=1e-4)
  with pytest.raises(ValueError, match="different sizes"):
    frechet.frechet_distance(a, b[:, :3])


def test_mean_kl_is_zero_for_equal_labels_and_grows_with_disagreement():
  p = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])
  assert frechet.mean_kl(p, p) == pytest.approx(0.0, abs=1e-12)
  near, far = p[:, [0, 2, 1]], p[::-1]
  assert 0 < frechet.mean_kl(p, near) < frechet.mean_kl(p, far)
  expected = np.mean([np.sum(p[i] * np.log(p[i] / far[i])) for i in range(2)])
  assert frechet.mean_kl(p, far) == pytest.approx(expected, rel=1e-5)


def test_every_metric_ranks_real_audio_above_shuffled_captions_and_noise(synthetic_reference):
  """The evaluation's own reference rows: a second excerpt of each held-out piece (real audio that
  follows its caption) scores better on every metric than the same excerpts paired with other
  captions (KL, key, tempo, family) and than noise (the Fréchet distance); real validation audio is
  far nearer the test audio than noise."""
  rows = synthetic_reference.baselines()
  real, shuffled, noise = rows["real"], rows["real, captions shuffled"], rows["noise"]
  assert real["clips"] == len(synthetic_reference.items) == 12
  assert real["kl"] < 0.5 * shuffled["kl"]
  for attr in ("key", "tempo", "family"):
    assert real[attr] >= 0.6 and real[attr] > shuffled[attr] + 0.2, (attr, real, shuffled)
  assert real["fd_classifier"] * 5 < noise["fd_classifier"]
  assert rows["real validation"]["fd_classifier"] * 5 < noise["fd_classifier"]
  assert noise["key"] < real["key"] and noise["family"] < real["family"]


def test_frechet_distance_of_real_audio_is_far_below_a_random_models_samples(tmp_path):
  """Classifier and codec-encoder embeddings at the tiny codec's 8 kHz: real validation against real
  test audio, against noise, and against the samples of a randomly initialised MusicGen."""
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import codec as codec_configs, musicgen
  from musicgen_jax.pipeline import MusicGen
  sr, duration = 8000, 1.0
  c = musicgen.get_config("tiny")
  c.codec = ml_collections.ConfigDict(codec_configs.get_config("tiny").codec.to_dict())
  c.model.update(num_codebooks=2, card=64)
  from tests.test_data import _random_params
  model = MusicGen.random(c, seed=1)
  model = MusicGen(c, dict(model.params, codec=_random_params(model.codec)), model.text, model.codec)
  rng = np.random.default_rng(1)

  def at(items):
    return [it["audio"] for it in items]
  clip = int(duration * sr)
  test = at(_items(16, 2.0, rng, sr))
  val = [excerpt(a, clip) for a in at(_items(16, 2.0, rng, sr))]
  train = at(_items(12, 2.0, rng, sr))
  fam = [list(TIMBRES)[i % 3] for i in range(12)]
  clf = Classifier.fit(np.stack([features(a, sr) for a in train]), fam, hidden=16, steps=200)
  items = [{"caption": "x", "family": "pure", "key": (0, "major"), "bpm": 100,
            "first": excerpt(a, clip), "last": excerpt(a, clip, last=True)} for a in test]
  ref = Reference(sr, duration, items, val, clf, {}, codec=(model.codec, model.params["codec"]))
  codes = model.generate(["a piece"] * 8, duration, seed=0)
  samples = [a.mean(axis=0) for a in model.decode(codes)]
  noise = [(0.1 * rng.standard_normal(clip)).astype(np.float32) for _ in range(8)]
  real = ref.score(val, attributes_too=False)
  for other in (ref.score(samples, attributes_too=False), ref.score(noise, attributes_too=False)):
    assert real["fd_classifier"] * 3 < other["fd_classifier"]
    assert real["fd_codec"] * 3 < other["fd_codec"]


# --- the command and its inputs ----------------------------------------------------------------------

class _RecordingHook(hook.GenerativeHook):
  """The loop's generative hook with its measurement replaced by a record of the calls."""
  calls: list = []

  def __init__(self, config, data_dir, text, log):
    self.every = int(config.train.generate_every)

  def run(self, params):
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
    self.calls.append(sorted(params))
    return {"fd_classifier": float(len(self.calls))}


@pytest.fixture(scope="module")
def manifest_run(tmp_path_factory):
  """A tiny melody LM trained for 3 steps on a manifest's audio, with a tiny random codec
  (tests/test_data.py's data), evaluated by the loop on the whole validation split; its generative
  hook (every 2 steps) records what it is given."""
  from tests import test_data as td
  from musicgen_jax import checkpoint
  from musicgen_jax.codec.encodec import EncodecConfig, EncodecModel
  from musicgen_jax.training import loop
  root = str(tmp_path_factory.mktemp("evalrun"))
  td._write_audio(root)
  c = td._config(root, td._manifest(root), os.path.join(root, "codec"))
  codec = EncodecModel(EncodecConfig.from_hf_dict(td.ENCODEC))
  model_cfg = td.get_config("tiny")
  model_cfg.codec = ml_collections.ConfigDict(dict(sample_rate=td.SR, frame_rate=100, channels=1,
                                                   encodec=td.ENCODEC))
  checkpoint.save_model(c.data.codec, model_cfg, {"lm": {"w": np.zeros(2, np.float32)},
                                                  "codec": td._random_params(codec)})
  c.train.update(num_steps=3, eval_every=3, eval_batches=0, log_every=1, checkpoint_every=3,
                 progress=False, async_checkpoints=False, generate_every=2)
  workdir = os.path.join(root, "run")
  _RecordingHook.calls = []
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(hook, "GenerativeHook", _RecordingHook)
    mp.setattr(hook, "check", lambda config: None)
    loop.train(c, workdir, out=lambda _: None)
  return {"workdir": workdir, "data": c.data.cache_dir, "config": c, "hook": _RecordingHook.calls}


def test_validation_ce_equals_the_training_loops_evaluation(manifest_run):
  from musicgen_jax import checkpoint
  from musicgen_jax.pipeline import MusicGen
  wd = manifest_run["workdir"]
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f if "eval/loss" in line][-1]
  model = MusicGen.load(wd)
  config = ev.data_config(checkpoint.read_config(wd), wd, manifest_run["data"])
  got = ev.validation_ce(model, config, wd, manifest_run["data"], log=lambda _: None)
  np.testing.assert_allclose(got["ce_per_codebook"], logged["eval/ce_per_codebook"], rtol=1e-5)
  assert got["tokens"] == logged["eval/tokens"] > 0
  assert got["loss"] == pytest.approx(logged["eval/loss"], rel=1e-5)


def test_eval_command_bad_input_is_one_line(manifest_run, tmp_path, capsys):
  """No codec, no audio data, a missing data directory, too few samples: one line, exit 2, before
  anything is generated."""
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import musicgen
  from musicgen_jax.eval.__main__ import main
  from musicgen_jax.pipeline import MusicGen
  plain = str(tmp_path / "plain")
  MusicGen.random(musicgen.get_config("tiny")).save(plain)
  wd, data = manifest_run["workdir"], manifest_run["data"]
  cases = [([plain, "--data", data], "has no codec"),
           ([wd, "--data", str(tmp_path / "nowhere")], "is not a directory"),
           ([wd, "--data", data, "--samples", "3"], "too few"),
           ([wd, "--data", data, "--samples", "8", "--speed-seconds", "0"], "rendered corpus"),
           ([wd, "--data", data, "--duration", "nan"], "--duration must be a finite number"),
           ([wd, "--data", data, "--speed-seconds", "inf"], "--speed-seconds must be a finite"),
           ([wd, "--data", data, "--out", str(tmp_path / "a_file" / "eval")], "is a file")]
  (tmp_path / "a_file").write_text("")
  for argv, message in cases:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], (argv, err)


def test_reference_warns_when_the_test_split_is_smaller_than_asked(synthetic_reference):
  ref = synthetic_reference
  lines = ref.warnings({"classifier": 64})
  assert len(lines) == 1 and "fewer than the 65" in lines[0]
  assert ref.warnings({"classifier": 8}) == []


# --- compare_patterns --------------------------------------------------------------------------------

def test_pattern_specs_parse_and_bad_ones_name_the_valid_choices():
  assert compare_patterns.parse_pattern("delay", 4) == ("delay", {})
  name, opts = compare_patterns.parse_pattern("delay:delays=0,2,4,6", 4)
  assert (name, opts) == ("delay", {"delays": (0, 2, 4, 6)})
  assert compare_patterns.label(name, opts) == "delay-delays_0_2_4_6"
  assert compare_patterns.parse_pattern("musiclm:group_by=2", 4) == ("musiclm", {"group_by": 2})
  with pytest.raises(ValueError, match="valid names are parallel, delay, unroll, coarse_first"):
    compare_patterns.parse_pattern("flatten", 4)
  with pytest.raises(ValueError, match="takes delays="):
    compare_patterns.parse_pattern("delay:group_by=2", 4)
  with pytest.raises(ValueError, match="delays"):
    compare_patterns.parse_pattern("delay:delays=0,1", 4)      # 2 delays for 4 codebooks
  assert set(patterns.PATTERN_NAMES) == {"parallel", "delay", "unroll", "coarse_first", "musiclm"}


def test_a_budget_too_small_or_a_bad_pattern_stops_before_training(tmp_path, monkeypatch):
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import patterns as patterns_config
  from musicgen_jax.training import loop
  trained = []
  monkeypatch.setattr(loop, "train", lambda *a, **k: trained.append(a))
  c = patterns_config.get_config("tiny")
  with pytest.raises(ValueError, match="too small to finish a single evaluation.*at least 50"):
    compare_patterns.compare(c, [], 49, str(tmp_path / "w"))
  with pytest.raises(ValueError, match="valid names"):
    compare_patterns.compare(c, ["delay", "nope"], 300, str(tmp_path / "w"))
  with pytest.raises(ValueError, match="twice"):
    compare_patterns.compare(c, ["delay", "delay"], 300, str(tmp_path / "w"))
  assert trained == [] and not os.path.exists(tmp_path / "w")


def test_runs_differ_only_in_their_pattern():
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import patterns as patterns_config
  from musicgen_jax.training import workdir
  base = patterns_config.get_config("tiny")
  a = compare_patterns.run_config(base, "delay", {}, 300)
  b = compare_patterns.run_config(base, "unroll", {"flattening": (0, 1, 1, 2)}, 300)
  diff = {k for k, v in workdir.flatten(a).items() if workdir.flatten(b).get(k) != v}
  assert diff == {"pattern.name", "pattern.flattening"}
  assert a.train.num_steps == b.train.num_steps == 300


def test_generative_hook_is_checked_before_training():
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import musicgen
  c = musicgen.get_config("tiny")
  hook.check(c)                                   # off by default
  c.train.generate_every = 5
  with pytest.raises(ValueError, match="needs data.kind='corpus'"):
    hook.check(c)
  c.data.kind = "corpus"
  with pytest.raises(ValueError, match="needs a codec"):
    hook.check(c)
  c.train.generate_every = -1
  with pytest.raises(ValueError, match=">= 0"):
    hook.check(c)


def test_training_runs_the_generative_evaluation_at_its_interval(manifest_run):
  """train.generate_every: the hook gets the current weights on the host at every multiple and at the
  last step, and what it measures lands in metrics.jsonl as generate/*."""
  with open(os.path.join(manifest_run["workdir"], "metrics.jsonl")) as f:
    got = [(m["step"], m["generate/fd_classifier"]) for m in map(json.loads, f)
           if "generate/fd_classifier" in m]
  assert got == [(2, 1.0), (3, 2.0)]
  assert manifest_run["hook"] == [["lm", "text"]] * 2


@pytest.mark.slow   # renders a corpus and trains and evaluates two LMs: a few minutes on 2 cores
def test_compare_patterns_end_to_end_and_resume(tmp_path):
  """Two patterns on the tiny corpus with a tiny random codec: one table, the plots, an evaluation per
  pattern; a second call trains nothing and evaluates nothing again."""
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from tests import test_corpus
  if not test_corpus.HAVE_SYNTH:
    pytest.skip("needs fluidsynth and timgm6mb-soundfont")
  from configs import codec as codec_configs, musicgen
  from musicgen_jax import checkpoint
  from musicgen_jax.codec.encodec import EncodecModel, EncodecConfig
  from tests.test_data import _random_params
  codec_cfg = codec_configs.get_config("tiny")
  codec_dir = str(tmp_path / "codec")
  codec = EncodecModel(EncodecConfig.from_hf_dict(codec_cfg.codec.encodec.to_dict()))
  checkpoint.save_model(codec_dir, codec_cfg, {"codec": _random_params(codec)})
  c = musicgen.get_config("tiny")
  c.model.update(num_codebooks=2, card=64)
  c.data.update(kind="corpus", corpus="tiny", codec=codec_dir, cache_dir=str(tmp_path / "data"))
  c.data.corpus_options = {"renderings": 2, "max_seconds": 3.0, "test_fraction": 0.3}
  c.train.update(num_steps=4, eval_every=2, warmup_steps=1, log_every=2, checkpoint_every=2,
                 progress=False, async_checkpoints=False)
  c.eval.update(samples=8, duration=1.0, speed_seconds=2.0)
  lines = []
  out = compare_patterns.compare(c, ["parallel", "delay:delays=0,2"], 4, str(tmp_path / "w"),
                                 log=lines.append)
  assert list(out["patterns"]) == ["parallel", "delay-delays_0_2"]
  for r in out["patterns"].values():
    assert r["step"] == 4 and r["ce"]["tokens"] > 0 and "fd_classifier" in r["rows"]["model"]
  for name in ("compare.md", "compare.json", "loss_curves.png", "metrics.png"):
    assert os.path.getsize(tmp_path / "w" / name) > 0
  again = []
  compare_patterns.compare(c, ["parallel", "delay:delays=0,2"], 4, str(tmp_path / "w"),
                           log=again.append)
  assert sum("evaluated before" in line for line in again) == 2


def test_key_estimate_works_below_the_cqt_rate():
  """An 8 kHz model's audio (the tiny codec's rate) is resampled for the chroma, not refused."""
  from musicgen_jax.eval import attributes
  rng = np.random.default_rng(3)
  audio = _piece(7, "major", 100, "bright", 4.0, rng, sr=8000)
  assert attributes.key_matches(attributes.estimate_key(audio, 8000), 7, "major")


def _captioned_batch(task, codes, texts, chroma):
  tok = task.text.tokenize(texts)
  return {"codes": codes, "frame_mask": np.ones(codes.shape[::2], bool),
          "weight": np.ones(len(texts), np.float32), "chroma": chroma,
          "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}


def test_token_ce_equals_the_training_loss_and_sees_only_earlier_frames(manifest_run):
  """MusicGen.token_ce (the sampler's conditions) against LMTask.token_losses (the training step's
  CE) per item, and causality: the CE of the first f frames does not depend on later audio."""
  from flax import linen as nn
  from musicgen_jax import sharding as shd
  from musicgen_jax.pipeline import MusicGen
  from musicgen_jax.training.lm_task import LMTask
  wd, c = manifest_run["workdir"], manifest_run["config"]
  trained = MusicGen.load(wd)
  # After 3 steps the conditions move the CE by ~1e-6, below the tolerance: weights scaled by 3
  # (any weights must give equal CEs) make a caption worth ~5e-4, so a swapped condition shows.
  model = MusicGen(trained.config, jax.tree.map(lambda x: 3 * x, trained.params), trained.text,
                   trained.codec)
  cfg = model.lm_cfg
  rng = np.random.default_rng(0)
  codes = np.repeat(rng.integers(0, cfg.card, (1, cfg.num_codebooks, 24)).astype(np.int32), 3, 0)
  chroma = np.eye(12, dtype=np.float32)[rng.integers(0, 12, (3, cfg.chroma_length))]
  texts = ["a jig in D major on fiddle", "", "a slow air in A minor, 60 bpm"]
  got = model.token_ce(codes, texts, chroma)
  assert abs(got[0] / got[2] - 1) > 1e-4 and abs(got[0] / got[1] - 1) > 1e-4   # same codes
  mesh = shd.make_mesh((1, 1, 1), c.mesh.axes, devices=jax.devices()[:1])
  task = LMTask(c, mesh, wd)
  params = {"lm": model.params["lm"], "text": model.params["text"]}
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.rules_from_config(c.logical_axis_rules)):
    fn = jax.jit(lambda p, b: task.token_losses(p, b, jax.random.key(0), train=False))
    for i in (0, 2):   # the training step has no '' = unconditional rule: captions only
      s, n = fn(params, _captioned_batch(task, codes[i:i + 1], texts[i:i + 1], chroma[i:i + 1]))
      assert got[i] == pytest.approx(float(np.sum(s) / np.sum(n)), rel=1e-5)
  # Under the delay pattern codebook k of frame t is predicted after codebook j < k of frames up to
  # t + k - 1 - j: the CE of the first 10 frames reads frames up to 10 + K - 3, nothing later.
  first, reach = model.token_ce(codes, texts, chroma, frames=10), 10 + cfg.num_codebooks - 2
  # A shorter sequence is another program (other reduction orders): fp32 agreement, not bits.
  np.testing.assert_allclose(first, model.token_ce(codes[..., :reach], texts, chroma, frames=10),
                             rtol=1e-5)
  changed = codes.copy()
  changed[..., reach:] = (changed[..., reach:] + 1) % cfg.card
  np.testing.assert_allclose(model.token_ce(changed, texts, chroma, frames=10), first, rtol=1e-6)
  assert not np.allclose(model.token_ce(changed, texts, chroma), got, rtol=1e-3)
  changed[..., reach - 1] = (changed[..., reach - 1] + 1) % cfg.card
  assert not np.allclose(model.token_ce(changed, texts, chroma, frames=10), first, rtol=1e-6)


def test_condition_gain_is_the_ce_saved_over_the_samplers_unconditional(manifest_run):
  """The held-out evaluation's CE under the null condition equals the sampler's unconditional CE
  (token_ce with '' and no melody); the gain is exactly 0 when the condition projections are zero
  (the LM cannot see its conditions) and not otherwise."""
  from flax import linen as nn
  from musicgen_jax import sharding as shd
  from musicgen_jax.pipeline import MusicGen
  from musicgen_jax.training.lm_task import LMTask
  wd, c = manifest_run["workdir"], manifest_run["config"]
  trained = MusicGen.load(wd)
  params = jax.tree.map(lambda x: 3 * x, trained.params)     # as above: conditions worth ~5e-4
  model = MusicGen(trained.config, params, trained.text, trained.codec)
  cfg = model.lm_cfg
  assert cfg.melody and cfg.text_dim
  rng = np.random.default_rng(1)
  codes = rng.integers(0, cfg.card, (2, cfg.num_codebooks, 24)).astype(np.int32)
  chroma = np.eye(12, dtype=np.float32)[rng.integers(0, 12, (2, cfg.chroma_length))]
  texts = ["a jig in D major on fiddle", "a slow air in A minor, 60 bpm"]
  mesh = shd.make_mesh((1, 1, 1), c.mesh.axes, devices=jax.devices()[:1])
  task = LMTask(c, mesh, wd)
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.rules_from_config(c.logical_axis_rules)):
    fn = jax.jit(task.eval_sums)
    summary = lambda p, i: task.summarize_eval(jax.device_get(fn(
        {"lm": p["lm"], "text": p["text"]}, _captioned_batch(task, codes[i:i + 1], texts[i:i + 1],
                                                             chroma[i:i + 1]))))
    for i in range(2):
      got = summary(params, i)
      assert got["loss"] == pytest.approx(model.token_ce(codes[i:i + 1], texts[i:i + 1],
                                                         chroma[i:i + 1])[0], rel=1e-5)
      assert got["loss_unconditioned"] == pytest.approx(model.token_ce(codes[i:i + 1], [""])[0],
                                                        rel=1e-5)
      assert got["condition_gain"] == got["loss_unconditioned"] - got["loss"]
      assert abs(got["condition_gain"]) > 1e-4
      # the text with no melody: the sampler's CE without --melody, and the gain split in two
      assert got["loss_no_melody"] == pytest.approx(model.token_ce(codes[i:i + 1], texts[i:i + 1])[0],
                                                    rel=1e-5)
      assert got["text_gain"] == got["loss_unconditioned"] - got["loss_no_melody"]
      assert got["melody_gain"] == got["loss_no_melody"] - got["loss"]
      assert abs(got["text_gain"]) > 1e-5 and abs(got["melody_gain"]) > 1e-5
    deaf = jax.tree.map(lambda x: x, params)    # the melody's projection zeroed: it adds nothing
    deaf["lm"]["audio_enc_to_dec_proj"] = jax.tree.map(jnp.zeros_like,
                                                       deaf["lm"]["audio_enc_to_dec_proj"])
    got = summary(deaf, 0)
    assert got["melody_gain"] == 0.0 and abs(got["text_gain"]) > 1e-5
    blind = jax.tree.map(lambda x: x, params)
    for name in ("enc_to_dec_proj", "audio_enc_to_dec_proj"):
      blind["lm"][name] = jax.tree.map(jnp.zeros_like, blind["lm"][name])
    got = summary(blind, 0)
    assert got["condition_gain"] == got["text_gain"] == got["melody_gain"] == 0.0


def test_altered_captions_change_one_attribute_each():
  from musicgen_jax.eval import control
  items = [
      {"caption": "a Bach chorale in F-sharp minor played by a flute, slow, 60 bpm, 4/4",
       "key_tonic": "F#", "key_mode": "minor", "bpm": 60, "instrument": "flute",
       "family": "pipe"},
      {"caption": "an oboe plays an Irish reel in Bb major, 120 BPM", "key_tonic": "Bb",
       "key_mode": "major", "bpm": 120, "instrument": "oboe", "family": "reed"},
      {"caption": "solo piano: a German folk song, lively", "key_tonic": "G", "key_mode": "major",
       "bpm": 110, "instrument": "piano", "family": "piano"},
  ]
  rng = np.random.default_rng(0)
  out = [control.altered_captions(e, rng) for e in items]
  assert out[0]["key"] == "a Bach chorale in C minor played by a flute, slow, 60 bpm, 4/4"
  assert out[0]["tempo"] == "a Bach chorale in F-sharp minor played by a flute, moderate, 90 bpm, 4/4"
  assert out[1]["key"] == "an oboe plays an Irish reel in E major, 120 BPM"
  assert out[1]["tempo"] == "an oboe plays an Irish reel in Bb major, 80 BPM"
  assert "key" not in out[2] and out[2]["tempo"] == "solo piano: a German folk song, moderate"
  import re
  from musicgen_jax.data import captions, render
  family = {name: fam for _, name, fam, _, _ in render.INSTRUMENTS}
  for e, o in zip(items, out):
    swapped = o["family"]
    new = next(n for n in family if n in swapped and n not in e["caption"])
    assert family[new] != e["family"]
    back = re.sub(rf"\b(a|an) {re.escape(new)}\b", captions.article(e["instrument"]), swapped)
    assert (back if back != swapped else swapped.replace(new, e["instrument"])) == e["caption"]

"""Reliability of sampling, import and model directories (issue 6): no hang, no silently wrong output,
no lost work. sample.py runs in this process (cli.run_main) unless a fresh process is the point.

Each test names the row of the issue it covers.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs.musicgen import get_config
from musicgen_jax import audio as audio_lib, checkpoint, cli, convert, integrity, pipeline, sampling
from musicgen_jax.conditioners.tokenizer import TextTokenizer
from musicgen_jax.pipeline import MusicGen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = sampling.SamplingSettings(top_k=1, cfg_coef=3.0)


def tiny_codec_model(max_positions: int = 40, seed: int = 0) -> MusicGen:
  """The tiny LM with a tiny random EnCodec (1600 Hz, 100 frames/s, 4 codebooks of 64)."""
  config = get_config("tiny")
  config.model.max_positions = max_positions
  config.codec = ml_collections.ConfigDict(dict(sample_rate=1600, frame_rate=100, channels=1, encodec=dict(
      sampling_rate=1600, num_filters=4, num_residual_layers=1, upsampling_ratios=(4, 4),
      codebook_size=64, hidden_size=16, num_lstm_layers=1, target_bandwidths=(2.4,),
      use_causal_conv=True)))
  model = MusicGen.random(config, seed=seed)
  rng = np.random.default_rng(seed + 7)

  def fill(path, leaf):   # noise at the scale of the initialisers, without compiling them
    name = str(getattr(path[-1], "key", path[-1]))
    scale = {"bias": 0.0, "embed": 1.0}.get(name, 0.3 if name.startswith("w_") else
                                            1 / np.sqrt(np.prod(leaf.shape[:-1])))
    return (scale * rng.standard_normal(leaf.shape)).astype(np.float32)
  shapes = jax.eval_shape(model.codec.init, jax.random.key(0))
  model.params["codec"] = jax.tree_util.tree_map_with_path(fill, shapes)
  return model


@pytest.fixture(scope="module")
def codec_model():
  return tiny_codec_model()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A saved tiny model (no codec)."""
  path = str(tmp_path_factory.mktemp("model") / "m")
  MusicGen.random(get_config("tiny"), seed=3).save(path)
  return path


def one_error_line(err: str, prog: str = "sample.py") -> str:
  lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
  assert len(lines) == 1 and lines[0].startswith(f"{prog}: error:"), err
  assert "Traceback" not in err
  return lines[0]


# --- rows 5, 7, 9, 10, 14: bad input stops with one line, before any model is loaded -------------
@pytest.fixture
def no_model(monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("a model was loaded before the input was checked")
  monkeypatch.setattr(cli, "load_model", refuse)


@pytest.mark.parametrize("args, fragment", [
    (["--cfg", "nan"], "cfg coefficient must be a finite number"),                        # row 5
    (["--temperature", "nan"], "temperature must be a finite number"),                     # row 5
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--top-p", "nan"], "top-p must be in [0, 1]"),
    (["--seed", "4294967296"], "seed must be an integer in [0, 2**32)"),                   # row 14
    (["--seed", "-1"], "seed must be an integer in [0, 2**32)"),
    (["--seed", "99999999999999999999999"], "seed must be an integer in [0, 2**32)"),       # row 7
    (["--duration", "1e9"], "above --max-duration (3600s)"),                               # row 10
    (["--duration", "inf"], "--duration must be a finite number"),
    (["--duration", "nan"], "--duration must be a finite number"),
    (["--stride", "inf"], "--stride must be a finite number"),
    (["--max-duration", "nan"], "--max-duration must be a finite number"),
    (["--top-k", "abc"], "--top-k=abc"),
    (["--config", "configs/musicgen.py:nope"], "unknown config variant 'nope'"),            # row 9
    (["--config", "configs/nope.py"], "No such file or directory"),
    (["--config.model.dimm=3"], "config.model.dimm"),
])
def test_bad_settings_are_one_line_before_loading(sample, no_model, args, fragment):
  rc, _, err = sample("--prompt", "x", *args)
  assert rc == 2
  assert fragment in one_error_line(err)


def test_bad_output_paths_are_one_line_before_loading(sample, no_model, tmp_path):   # row 7
  a_file = tmp_path / "file.txt"
  a_file.write_text("x")
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "000_x.wav").write_text("old")
  cases = [
      ([], "nothing would be written: pass --out FILE.wav"),
      (["--out", str(a_file)], "is a file: --out names a directory"),
      (["--out", str(a_file / "sub")], "is a file, not a directory"),
      (["--save-tokens", str(tmp_path)], "must name a .npy file"),
      (["--save-tokens", str(tmp_path / "dir.npy")], "is a directory"),
      (["--save-tokens", str(a_file / "t.npy")], "is a file, not a directory"),
      (["--out", str(tmp_path / "out")], "000_x.wav already exists: pass --overwrite"),
  ]
  (tmp_path / "dir.npy").mkdir()
  (tmp_path / "t.npy").write_bytes(b"")
  cases.append((["--save-tokens", str(tmp_path / "t.npy")], "already exists: pass --overwrite"))
  for args, fragment in cases:
    rc, _, err = sample("--prompt", "x", *args)
    assert rc == 2 and fragment in one_error_line(err), (args, err)
  assert (tmp_path / "out" / "000_x.wav").read_text() == "old"


def test_train_py_bad_variant_is_one_line():   # row 9, train.py shares cli.parse_flags
  res = subprocess.run([sys.executable, "train.py", "--config", "configs/musicgen.py:nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert res.returncode == 2
  assert "unknown config variant 'nope'" in one_error_line(res.stderr, "train.py")


# --- row 7: a finished generation is never lost -----------------------------------------------------
def test_failed_write_keeps_the_tokens(sample, tmp_path, monkeypatch):
  target = str(tmp_path / "t.npy")
  real_save = np.save

  def flaky(path, arr, *a, **k):
    if str(path) == target:
      raise OSError(28, "No space left on device")
    return real_save(path, arr, *a, **k)
  monkeypatch.setattr(np, "save", flaky)
  rc, _, err = sample("--prompt", "x", "--duration", "0.1", "--top-k", "1", "--save-tokens", target)
  line = one_error_line(err)
  rescued = [n for n in os.listdir(tmp_path) if n.startswith("musicgen-tokens-")]
  assert rc == 2 and "No space left on device" in line and len(rescued) == 1
  assert str(tmp_path / rescued[0]) in line
  assert np.load(tmp_path / rescued[0]).shape == (1, 4, 5)


# --- row 14: seeds never alias ------------------------------------------------------------------------
def test_seeds_are_checked_and_windows_get_distinct_seeds():
  assert pipeline.check_seed(2**32 - 1) == 2**32 - 1
  for bad in (2**32, -1, 1.5, True, "3"):
    with pytest.raises(ValueError, match="seed must be an integer"):
      pipeline.check_seed(bad)
  seeds = {pipeline.window_seed(s, w) for s in (0, 1, 2**32 - 1) for w in range(4)}
  assert len(seeds) == 12 and all(0 <= s < 2**32 for s in seeds)
  assert pipeline.window_seed(7, 0) == 7


# --- row 1: an audio prompt longer than the window --------------------------------------------------
def test_prompt_longer_than_window_is_cut_and_generation_advances(codec_model, tmp_path, capsys):
  model = codec_model
  wav = np.random.default_rng(0).normal(size=(1, 1600 * 2)).astype(np.float32) * 0.1
  audio_lib.write_wav(str(tmp_path / "two.wav"), wav, 1600)
  prompt = model.encode_audio_file(str(tmp_path / "two.wav"))               # [1, K, 200]
  window = model.max_duration()
  win = model.frames_for(window)
  assert prompt.shape[-1] > win
  calls = []
  generate = model.generate

  def counted(*args, **kwargs):
    calls.append(args[4].shape[-1] if args[4] is not None else 0)
    assert len(calls) < 20, "generation makes no progress"
    return generate(*args, **kwargs)
  model.generate = counted
  try:
    codes = model.generate_long(["x"], 1.0, GREEDY, prompt=prompt)
  finally:
    del model.generate
  keep = win - int(round(window / 2 * model.frame_rate))
  assert codes.shape == (1, 4, 100)
  np.testing.assert_array_equal(codes[..., :keep], prompt[..., -keep:])     # starts with the kept end
  assert "only its last" in capsys.readouterr().err
  assert calls[0] == keep and len(calls) == 1 + -(-(100 - win) // (win - keep))


# --- row 6: damaged weights are detected at load ------------------------------------------------------
def _largest_file(directory: str) -> str:
  files = [os.path.join(d, n) for d, _, ns in os.walk(directory) for n in ns]
  return max(files, key=os.path.getsize)


def test_damaged_model_directory_is_refused(sample, model_dir, tmp_path):
  bad = str(tmp_path / "bad")
  shutil.copytree(model_dir, bad)
  victim = os.path.join(bad, checkpoint.PARAMS_FILE)
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 2)
    f.write(b"\xff" * 16)
  with pytest.raises(checkpoint.CheckpointError, match="is damaged: its checksum differs"):
    MusicGen.load(bad)
  rc, _, err = sample("--checkpoint", bad, "--prompt", "x", "--duration", "0.1",
                      "--save-tokens", str(tmp_path / "t.npy"))
  assert rc == 2 and victim in one_error_line(err)
  # Truncation is caught even without checksums.
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) - 1)
  with pytest.raises(checkpoint.CheckpointError, match="bytes,"):
    MusicGen.load(bad, verify=False)


@pytest.mark.parametrize("edit, match", [
    ({"num_layers": 3}, r"the weights do not fit its musicgen_config.json: lm\['layers'\]\S* has "
     r"shape \(2, .*the config makes \(3, "),
    ({"ffn_dim": 48}, r"the weights do not fit .*fc1.*the config makes"),
    ({"dim": "big"}, r"musicgen_config.json does not describe a model \(model.dim must be an "
     r"integer, got 'big'\)"),
    ({"melody": "no"}, r"\(model.melody must be true or false, got 'no'\)")])
def test_config_that_does_not_fit_the_weights_is_refused(sample, model_dir, tmp_path, edit, match):
  """A config edited by hand or taken from another model, in a directory without an integrity
  record (older exports) or loaded without checking it: one line at load, not a failure deep in
  the sampler or wrong output."""
  import json
  bad = str(tmp_path / "bad")
  shutil.copytree(model_dir, bad)
  os.remove(os.path.join(bad, integrity.RECORD_FILE))
  path = os.path.join(bad, checkpoint.CONFIG_FILE)
  with open(path) as f:
    config = json.load(f)
  assert get_config("tiny").model.num_layers == 2 and config["model"]["num_layers"] == 2
  config["model"].update(edit)
  with open(path, "w") as f:
    json.dump(config, f)
  with pytest.raises(checkpoint.CheckpointError, match=match):
    MusicGen.load(bad)
  rc, _, err = sample("--checkpoint", bad, "--prompt", "x", "--duration", "0.1",
                      "--save-tokens", str(tmp_path / "t.npy"))
  assert rc == 2 and "Traceback" not in err and re.search(match, one_error_line(err)), err


def test_nan_weights_are_refused_naming_the_leaf(tmp_path):
  model = MusicGen.random(get_config("tiny"), seed=1)
  model.params["lm"]["layers"]["fc1"]["kernel"][1, 2, 3] = np.nan
  model.save(str(tmp_path / "m"))
  with pytest.raises(checkpoint.CheckpointError, match="lm/layers/fc1/kernel: NaN or inf"):
    MusicGen.load(str(tmp_path / "m"))


def test_extra_or_missing_files_and_old_directories(model_dir, tmp_path, capsys):
  d = str(tmp_path / "m")
  shutil.copytree(model_dir, d)
  assert sorted(os.listdir(d)) == sorted([checkpoint.CONFIG_FILE, checkpoint.PARAMS_FILE,
                                          integrity.RECORD_FILE])
  open(os.path.join(d, "notes.txt"), "w").close()          # beside the model: not its business
  MusicGen.load(d)
  os.remove(os.path.join(d, integrity.RECORD_FILE))        # an export from before the records
  capsys.readouterr()
  MusicGen.load(d)
  warning = capsys.readouterr().err
  assert "has no integrity record" in warning and warning.count("\n") == 1


def test_params_file_round_trip_and_bad_trees(tmp_path):
  """params.safetensors keeps the tree as written: nesting, empty dicts, dtypes and bytes; a prefix
  reads one branch; trees it cannot name, and a damaged header, are one clear error."""
  import ml_dtypes
  tree = {"lm": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "none": {},
                 "b": np.array([1.5, -2.0], ml_dtypes.bfloat16)},
          "codec": {"q": {"embed": np.arange(4, dtype=np.int32)}}, "text": {}}
  path = str(tmp_path / checkpoint.PARAMS_FILE)
  checkpoint.write_params(path, tree)
  back = checkpoint.read_params(path)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
  assert back["lm"]["none"] == {} and back["text"] == {}
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
  assert list(checkpoint.read_params(path, prefix="codec/")) == ["codec"]
  with pytest.raises(TypeError, match="'lm/w' is a list"):
    checkpoint.write_params(path, {"lm": {"w": [np.zeros(2)]}})
  with pytest.raises(ValueError, match="without '/'"):
    checkpoint.write_params(path, {"lm": {"a/b": np.zeros(2)}})
  with open(path, "r+b") as f:
    f.write(b"\xff" * 8)
  with pytest.raises(checkpoint.CheckpointError, match="cannot read the weights in"):
    checkpoint.read_params(path)


def test_model_directory_of_the_orbax_format_still_loads(model_dir, tmp_path):
  """Model directories written before params.safetensors hold their parameters as an Orbax checkpoint
  in params/ (models/demo did until 2026-11-27): they load to the same weights, and their record
  still catches a file in params/ that was not written with them."""
  import orbax.checkpoint as ocp
  new = MusicGen.load(model_dir)
  old = str(tmp_path / "old")
  checkpoint.write_config(old, new.config)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(old, checkpoint.PARAMS_DIR), jax.device_get(new.params))
  integrity.write_record(old, paths=[checkpoint.CONFIG_FILE, checkpoint.PARAMS_DIR])
  loaded = MusicGen.load(old)
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(new.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  extra = os.path.join(old, checkpoint.PARAMS_DIR, "stray")
  open(extra, "w").close()
  with pytest.raises(checkpoint.CheckpointError, match="stray was not written"):
    MusicGen.load(old)


def test_integrity_record_elsewhere_and_damage(tmp_path):
  d = tmp_path / "step"
  (d / "sub").mkdir(parents=True)
  (d / "sub" / "a.bin").write_bytes(np.random.default_rng(0).bytes(3 << 20))
  (d / "b.json").write_text("{}")
  record = str(tmp_path / "records" / "7.json")
  integrity.write_record(str(d), record=record)
  assert not os.path.exists(d / integrity.RECORD_FILE)
  assert integrity.verify(str(d), record=record)
  assert integrity.verify(str(tmp_path / "nothing"), required=False) is False
  with pytest.raises(integrity.IntegrityError, match="is missing"):
    integrity.verify(str(d))
  os.remove(d / "b.json")
  with pytest.raises(checkpoint.CheckpointError, match="b.json is missing"):
    integrity.verify(str(d), record=record)
  (d / "b.json").write_text("{}")
  with open(d / "sub" / "a.bin", "r+b") as f:                 # flip one byte: same size, other content
    f.seek(1 << 20)
    byte = f.read(1)[0]
    f.seek(1 << 20)
    f.write(bytes([byte ^ 0xFF]))
  assert integrity.verify(str(d), record=record, checksums=False)        # same size
  with pytest.raises(integrity.IntegrityError, match="a.bin is damaged"):
    integrity.verify(str(d), record=record)
  bad = integrity.nonfinite_leaves({"a": np.ones(2), "b": {"c": jax.numpy.array([1.0, np.inf])},
                                    "d": np.array([3e38], np.float32), "e": np.arange(3)})
  assert bad == ["b/c: NaN or inf", "d: |value| up to 3e+38"]


# --- row 8 / work directories: nothing is replaced without --overwrite --------------------------------
def test_model_directories_are_not_replaced_without_overwrite(model_dir, tmp_path):
  d = str(tmp_path / "m")
  shutil.copytree(model_dir, d)
  model = MusicGen.random(get_config("tiny"), seed=4)
  with pytest.raises(checkpoint.CheckpointError, match="pass --overwrite"):
    model.save(d)
  before = MusicGen.load(d).params["lm"]["lm_heads"]
  np.testing.assert_array_equal(before, MusicGen.load(model_dir).params["lm"]["lm_heads"])
  model.save(d, overwrite=True)
  np.testing.assert_array_equal(MusicGen.load(d).params["lm"]["lm_heads"], model.params["lm"]["lm_heads"])
  assert sorted(os.listdir(tmp_path)) == ["m"]                 # no temporary or old copies left
  other = tmp_path / "notes"
  other.mkdir()
  (other / "todo.txt").write_text("mine")
  with pytest.raises(checkpoint.CheckpointError, match="never replaced"):
    model.save(str(other), overwrite=True)
  assert (other / "todo.txt").read_text() == "mine"


# --- row 12: a mistyped path is not a hub id ---------------------------------------------------------
def test_convert_missing_path_is_not_fetched(tmp_path, monkeypatch, capsys):
  hub = pytest.importorskip("huggingface_hub")
  monkeypatch.setattr(hub, "snapshot_download", lambda *a, **k: pytest.fail("fetched from the hub"))
  assert convert.main(["nope/nope", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "nope/nope does not exist" in err and "hf:nope/nope" in err
  assert not os.path.exists(tmp_path / "out")


def test_convert_hub_id_needs_the_prefix(tmp_path, monkeypatch, capsys):
  hub = pytest.importorskip("huggingface_hub")
  asked = []

  def offline(repo_id, **kw):
    asked.append(repo_id)
    raise OSError("offline")
  monkeypatch.setattr(hub, "snapshot_download", offline)
  assert convert.main(["hf:org/model", str(tmp_path / "out")]) == 2
  assert asked == ["org/model"] and "cannot fetch org/model" in capsys.readouterr().err


# --- row 11: --config overrides with --checkpoint -------------------------------------------------------
def test_checkpoint_overrides_applied_or_refused(sample, model_dir, tmp_path):
  rc, _, err = sample("--checkpoint", model_dir, "--prompt", "x", "--config.model.dim=64",
                      "--config.pattern.name=parallel", "--save-tokens", str(tmp_path / "t.npy"))
  line = one_error_line(err)
  assert rc == 2 and "--config.model.dim, --config.pattern.name cannot change a loaded" in line
  rc, _, err = sample("--checkpoint", model_dir, "--prompt", "x", "--config",
                      "configs/musicgen.py:small", "--save-tokens", str(tmp_path / "t.npy"))
  assert rc == 2 and "--config is not used with --checkpoint" in one_error_line(err)
  # Sampling overrides are applied: greedy by config equals greedy by flag, and differs from sampling.
  outs = {}
  for name, args in (("config", ["--config.sampling.top_k=1"]), ("flag", ["--top-k", "1"]),
                     ("neither", [])):
    path = str(tmp_path / f"{name}.npy")
    rc, _, err = sample("--checkpoint", model_dir, "--prompt", "x", "--duration", "0.1",
                        "--temperature", "2", "--save-tokens", path, *args)
    assert rc == 0, err
    outs[name] = np.load(path)
  np.testing.assert_array_equal(outs["config"], outs["flag"])
  assert not np.array_equal(outs["config"], outs["neither"])


def test_no_random_init_with_a_checkpoint(sample, model_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(MusicGen, "random", lambda *a, **k: pytest.fail("random init"))
  rc, _, err = sample("--checkpoint", model_dir, "--prompt", "x", "--duration", "0.1", "--top-k", "1",
                      "--save-tokens", str(tmp_path / "t.npy"))
  assert rc == 0, err


def test_overrides_policy_and_dtype():
  pipeline.check_overrides(["sampling.top_k", "model.dtype"])
  with pytest.raises(ValueError, match="--config.model.num_layers, --config.text.max_length"):
    pipeline.check_overrides(["model.num_layers", "sampling.cfg", "text.max_length"])
  assert cli.resolve_dtype("auto", {}, "gpu") == "bfloat16"
  assert cli.resolve_dtype("auto", {}, "tpu") == "bfloat16"
  assert cli.resolve_dtype("auto", {}, "cpu") == "float32"
  assert cli.resolve_dtype("auto", {"model.dtype": "bfloat16"}, "cpu") == "bfloat16"
  assert cli.resolve_dtype("float32", {"model.dtype": "bfloat16"}, "gpu") == "float32"


# --- row 10: long durations: a limit, a plan and an estimate --------------------------------------------
def test_long_form_prints_plan_and_estimate(sample, tmp_path):
  rc, _, err = sample("--config", "configs/musicgen.py:tiny", "--prompt", "x",
                      "--config.model.max_positions=40", "--duration", "2.5",
                      "--top-k", "1", "--save-tokens", str(tmp_path / "t.npy"), "--verbose", "--progress")
  assert rc == 0, err
  assert np.load(tmp_path / "t.npy").shape == (1, 4, 125)
  assert "windows, each adding" in err and re.search(r"about \S+ for the \d+ windows left", err)
  assert "time: load" in err and "generate" in err and "compile" in err


# --- row 15: the README prompt fits the tiny model; truncation is reported once --------------------
def test_tiny_prompt_length_and_one_warning(caplog):
  tok = TextTokenizer.from_file(None)
  max_length = get_config("tiny").text.max_length
  ids = tok(["a melody in C at 90 bpm"], max_length=max_length)
  assert ids["attention_mask"].sum() == len("a melody in C at 90 bpm") + 1
  with caplog.at_level(logging.WARNING):
    for _ in range(3):
      tok(["x" * 100, "y"], max_length=max_length)
  assert [r.getMessage().count("truncated 1 of 2") for r in caplog.records] == [1]


# --- issue 8: the codec in chunks, and the compilation cache across processes ----------------------
def test_chunked_codec_decode_matches_whole(codec_model):
  codes = np.random.default_rng(1).integers(0, 64, size=(2, 4, 250)).astype(np.int32)
  whole = codec_model.decode(codes, chunk_seconds=100.0)
  errors = [np.abs(codec_model.decode(codes, chunk_seconds=1.2, context_seconds=c) - whole).max()
            for c in (0.0, 0.5)]
  assert codec_model.decode(codes, chunk_seconds=1.2).shape == whole.shape == (2, 1, 250 * 16)
  # The decoder's LSTM remembers: context in front of each chunk makes the seams vanish.
  assert errors[0] > 1e-2 and errors[1] < 1e-4, errors


def test_second_run_loads_compiled_programs(tmp_path):
  """Two processes with the same shapes: the second compiles nothing (persistent cache)."""
  script = ("import sys; from musicgen_jax import cli; import sample; "
            "sys.exit(cli.run_main(sample.main, sys.argv[1:]))")
  args = ["sample.py", "--config", "configs/musicgen.py:tiny", "--prompt", "x", "--duration", "0.1",
          "--noprogress", "--verbose",
          "--compile-cache", str(tmp_path / "cache"), "--save-tokens", str(tmp_path / "t.npy"),
          "--overwrite"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  runs = [subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env) for _ in range(2)]
  for r in runs:
    assert r.returncode == 0, r.stderr[-2000:]
  first, second = ([ln for ln in r.stderr.splitlines() if ln.startswith("time:")][0] for r in runs)
  assert "0 hits" in first and " 0 misses" not in first
  assert " 0 misses" in second, second


# --- issue 8: progress from the host, between compiled chunks of the step loop ------------------------
def test_chunked_sampler_equals_one_program(text_lm):
  from musicgen_jax import patterns
  settings = sampling.SamplingSettings(top_k=8, top_p=0.9, cfg_coef=2.0)    # random: same keys per step
  pattern = patterns.get_pattern("delay", text_lm.cfg.num_codebooks)
  prompt = np.random.default_rng(0).integers(0, text_lm.cfg.card, (2, 4, 5)).astype(np.int32)
  kw = dict(seed=5, settings=settings, prompt=prompt, segments=2)
  one = sampling.generate(text_lm.params, text_lm.cfg, pattern, text_lm.conds, 12, **kw)
  chunked = sampling._cached_chunked_fn(text_lm.cfg, pattern, 12, 5, 8, True, "batch", 2, None, None)
  for chunk in (50, 3):          # one chunk per segment; chunks ending inside segments
    chunked.chunk = chunk
    seen = []
    got = sampling.generate(text_lm.params, text_lm.cfg, pattern, text_lm.conds, 12, **kw,
                            progress=lambda done, total: seen.append((done, total)))
    np.testing.assert_array_equal(got, one)
    done = [d for d, _ in seen]
    assert done[0] == 0 and done == sorted(done) and seen[-1][0] == seen[-1][1]
  assert len(seen) > 4


def test_training_directory_loads_params_only_and_is_verified(tmp_path):
  """A work directory as training writes it: checkpoints/<step>/state (params + optimizer state) and
  integrity/<step>.json beside it. Only the parameters are read; the record is checked."""
  import orbax.checkpoint as ocp
  model = MusicGen.random(get_config("tiny"), seed=5)
  work = tmp_path / "run"
  checkpoint.write_config(str(work), model.config)
  state = {"params": model.params, "opt_state": {"mu": model.params["lm"]["lm_heads"] * 0},
           "step": np.int32(7)}
  step_dir = work / checkpoint.TRAIN_CHECKPOINTS / "7"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(step_dir / "state"), state)
  record = str(work / checkpoint.TRAIN_RECORDS / "7.json")
  integrity.write_record(str(step_dir), record=record)
  loaded = MusicGen.load(str(work))
  assert set(loaded.params) == {"lm", "text"}
  np.testing.assert_array_equal(loaded.params["lm"]["lm_heads"], model.params["lm"]["lm_heads"])
  victim = _largest_file(str(step_dir))
  with open(victim, "r+b") as f:
    f.seek(10)
    f.write(b"\x00\x01")
  with pytest.raises(checkpoint.CheckpointError, match="checksum differs"):
    MusicGen.load(str(work))


# --- issue 8, bad input: a batch that does not fit in device memory ----------------------------------
def test_decode_memory_estimate_matches_the_arrays_it_counts():
  """decode_bytes against the arrays themselves: init_caches and the serving layout."""
  from musicgen_jax import lm_decode
  model = MusicGen.random(get_config("tiny"), seed=3)
  cfg = model.lm_cfg
  params = model.params["lm"]
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  est = lm_decode.decode_bytes(cfg, n, rows=6, length=37, cond_len=5)
  caches = lm_decode.init_caches(cfg, 6, 37)
  assert est["caches"] == sum(x.nbytes for x in jax.tree.leaves(caches))
  serving = jax.eval_shape(lambda p: lm_decode.serving_weights(cfg, {"params": p}), params)
  actual = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(serving))
  assert abs(est["weights"] - actual) <= 0.05 * actual, (est["weights"], actual)
  assert est["total"] == sum(v for k, v in est.items() if k != "total")


def test_batch_that_does_not_fit_is_one_line_before_compiling(sample, model_dir, tmp_path,
                                                             monkeypatch):
  from musicgen_jax import pipeline, sampling as sampling_lib
  model = MusicGen.random(get_config("tiny"), seed=3)
  need = model.check_memory(4, 1.0, free_bytes=2**40)["total"]
  assert model.decode_need(4, 1.0)["total"] == need
  with pytest.raises(ValueError, match=r"needs about .* GiB per device .* is free: pass "
                                       r"--batch-size [1-3] "):
    model.check_memory(4, 1.0, free_bytes=need - 1)
  assert model.check_memory(2, 1.0, free_bytes=need - 1)["total"] < need   # fewer prompts fit
  two_pass = sampling_lib.SamplingSettings(cfg_mode="two_pass")
  assert model.check_memory(4, 1.0, two_pass, free_bytes=need - 1)["total"] < need
  # The most prompts that fit: the estimate is affine in the batch, so the search must land on the edge.
  for free in (need - 1, need, 10 * need, model.decode_need(1, 1.0)["total"]):
    fit = model.max_batch(1.0, free_bytes=free)
    assert model.decode_need(fit, 1.0)["total"] <= free < model.decode_need(fit + 1, 1.0)["total"]
  assert model.max_batch(1.0, free_bytes=model.decode_need(1, 1.0)["total"] - 1) == 0

  def refuse(*a, **k):
    raise AssertionError("compiled before the memory check")
  monkeypatch.setattr(pipeline, "free_device_bytes", lambda: 1024)
  monkeypatch.setattr(sampling_lib, "generate", refuse)
  rc, _, err = sample("--checkpoint", model_dir, "--prompt", "a", "--duration", "0.5",
                      "--save-tokens", str(tmp_path / "t.npy"))
  assert rc == 2 and "does not fit even for one prompt" in one_error_line(err)
  assert not os.path.exists(tmp_path / "t.npy")


def test_free_memory_on_cpu_is_the_hosts(monkeypatch):
  """On CPUs the memory checks see the host's available memory less a reserve, shared by the CPU
  devices: a batch that would exhaust it is refused rather than killed by the system half way."""
  with open("/proc/meminfo") as fh:
    info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in fh}
  assert 0 < pipeline._host_available_bytes() <= info["MemTotal"]
  n = len(jax.local_devices())
  assert 0 < pipeline.free_device_bytes() <= (info["MemTotal"] - pipeline.HOST_RESERVE[0]) // n
  model = MusicGen.random(get_config("tiny"), seed=3)
  assert model.check_memory(2, 1.0)["total"] == model.decode_need(2, 1.0)["total"]
  for host, reserve in ((8 * 2**30, 2**31), (64 * 2**30, int(6.4 * 2**30))):   # 2 GiB or 10%
    monkeypatch.setattr(pipeline, "_host_available_bytes", lambda: host)
    assert pipeline.free_device_bytes() == (host - reserve) // n
    assert model.max_batch(1.0) == model.max_batch(1.0, free_bytes=(host - reserve) // n) > 1000


def test_codec_decodes_in_row_groups_that_fit(codec_model, monkeypatch):
  """A batch whose audio decode (XLA's memory analysis of the compiled codec) would not fit is
  decoded a few rows at a time, padded to one shape, with the same audio; not even one row: one line."""
  codes = np.random.default_rng(2).integers(0, 64, size=(5, 4, 60)).astype(np.int32)
  whole = codec_model.decode(codes)
  assert codec_model.codec_rows(codes.shape, free_bytes=2**40) == 5
  ma = codec_model._codec_program(codes.shape).memory_analysis()
  per_row = (ma.temp_size_in_bytes + ma.output_size_in_bytes) / 5
  monkeypatch.setattr(pipeline, "free_device_bytes", lambda: int(2.5 * per_row))
  assert codec_model.codec_rows(codes.shape) == 2
  np.testing.assert_allclose(codec_model.decode(codes), whole, rtol=0, atol=1e-6)
  assert (2, 4, 60) in codec_model._codec_programs
  monkeypatch.setattr(pipeline, "free_device_bytes", lambda: int(0.5 * per_row))
  with pytest.raises(ValueError, match=r"decoding the audio of one prompt needs about .* is free"):
    codec_model.decode(codes)


_MESH_CODEC_SCRIPT = r"""
import json
import jax, numpy as np
from musicgen_jax import pipeline, sharding
from tests.test_reliability import tiny_codec_model
assert jax.device_count() == 8, jax.devices()
one, many = tiny_codec_model(), tiny_codec_model()
many.mesh = sharding.make_mesh((4, 1, 2))
many.params = jax.device_put(many.params, sharding.replicated(many.mesh))   # as MusicGen.load places them
codes = np.random.default_rng(2).integers(0, 64, size=(5, 4, 60)).astype(np.int32)
ref = one.decode(codes)
out = {"err": float(np.abs(many.decode(codes) - ref).max()), "programs": list(many._codec_programs)}
program = many._codec_programs[(8, 4, 60)]
out["spec"] = str(program.input_shardings[0][1].spec)
ma = program.memory_analysis()
pipeline.free_device_bytes = lambda: int(0.6 * (ma.temp_size_in_bytes + ma.output_size_in_bytes))
out["rows"] = many.codec_rows((8, 4, 60))
out["err_groups"] = float(np.abs(many.decode(codes) - ref).max())
print("RESULT " + json.dumps(out))
"""


def test_codec_rows_split_over_the_mesh():
  """On 8 fake CPU devices with a (data 4, fsdp 1, tensor 2) mesh, the codec's rows are split over the
  4 batch shards (5 rows padded to 8) with one device's audio; short of memory, the row groups stay
  a multiple of the shards (one row per device)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _MESH_CODEC_SCRIPT], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
  assert res["spec"] == "P(('data', 'fsdp'), None, None)" and [8, 4, 60] in res["programs"], res
  assert res["rows"] == 4 and res["err"] < 1e-6 and res["err_groups"] < 1e-6, res


def test_library_calls_sample_with_the_models_settings():
  """generate / generate_long without settings use the model's (its config's sampling section), and
  sampling_settings(**changes) starts from them: a config that says greedy samples greedily."""
  config = get_config("tiny")
  config.sampling.top_k = 1
  model = MusicGen.random(config, seed=3)
  assert model.sampling_settings() == sampling.SamplingSettings(top_k=1)
  assert model.sampling_settings(top_k=7, cfg_coef=1.0).top_k == 7
  greedy = model.generate(["x"], 0.3, seed=0)
  np.testing.assert_array_equal(model.generate_long(["x"], 0.3, seed=5), greedy)
  assert not np.array_equal(model.generate(["x"], 0.3, sampling.SamplingSettings(), seed=5), greedy)

"""Soak test of sample.py: hundreds of random valid and invalid invocations.

    python bench/soak_sample.py --runs 300 --subprocess-every 15 --seed 0 [--json out.json]

Models: the tiny config (random weights, saved), the same with a tiny random EnCodec (WAV output,
--prompt-audio, long-form windows), a copy with bytes overwritten and one with NaN weights, and no
--checkpoint (the shipped model, models/demo). Each
invocation is drawn at random: valid ones (prompts, durations within and beyond the window, every
sampling setting, seeds up to 2**32 - 1, fresh output paths or --overwrite), or one mistake among ~30
(NaN / inf / out-of-range settings, seeds that would alias, paths of the wrong kind or already there,
unknown variants and flags, missing or damaged checkpoints, --config overrides of the model's shape).
Most run in this process (cli.run_main, compiled programs shared), every --subprocess-every-th as a
real `python sample.py` with the persistent compilation cache.

Counted: crashes (a traceback, an exception out of main, exit 2 on valid input or anything but 2 on
invalid input), hangs (no exit within --timeout), wrong outputs (tokens of the wrong shape or range,
WAVs of the wrong length, a result that differs from a rerun with the same seed, a continuation that
does not start with its prompt, or a damaged / NaN model that loads). Not a CI test (minutes); the
figures go in docs/RELIABILITY.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPTS = ["a melody in C at 90 bpm", "drums", "lofi hip hop with a mellow piano", "x", "ünïcödé ♪",
           "a" * 200]


SHIPPED_CARD = 512   # codebook size of models/demo (no --checkpoint), checked in main()


class Hang(Exception):
  pass


def make_models(root: str) -> dict[str, str]:
  """Model directories: plain, with codec, damaged, NaN weights."""
  import jax
  import ml_collections
  from configs.musicgen import get_config
  from musicgen_jax import checkpoint
  from musicgen_jax.pipeline import MusicGen

  dirs = {k: os.path.join(root, k) for k in ("plain", "codec", "damaged", "nan")}
  MusicGen.random(get_config("tiny"), seed=1).save(dirs["plain"])
  config = get_config("tiny")
  config.model.max_positions = 60          # 0.57 s windows at 100 Hz: long-form is cheap
  config.codec = ml_collections.ConfigDict(dict(sample_rate=1600, frame_rate=100, channels=1, encodec=dict(
      sampling_rate=1600, num_filters=4, num_residual_layers=1, upsampling_ratios=(4, 4),
      codebook_size=64, hidden_size=16, num_lstm_layers=1, target_bandwidths=(2.4,),
      use_causal_conv=True)))
  model = MusicGen.random(config, seed=2)
  rng = np.random.default_rng(3)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    scale = {"bias": 0.0, "embed": 1.0}.get(name, 0.3 if name.startswith("w_") else
                                            1 / np.sqrt(np.prod(leaf.shape[:-1])))
    return (scale * rng.standard_normal(leaf.shape)).astype(np.float32)
  model.params["codec"] = jax.tree_util.tree_map_with_path(
      fill, jax.eval_shape(model.codec.init, jax.random.key(0)))
  model.save(dirs["codec"])
  shutil.copytree(dirs["plain"], dirs["damaged"])
  victim = os.path.join(dirs["damaged"], checkpoint.PARAMS_FILE)
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 3)
    f.write(os.urandom(32))
  bad = MusicGen.random(get_config("tiny"), seed=4)
  bad.params["lm"]["lm_heads"][0, 0, 0] = np.inf
  bad.save(dirs["nan"])
  return dirs


class Case:
  def __init__(self, args: list[str], valid: bool, what: str, check=None):
    self.args, self.valid, self.what, self.check = args, valid, what, check


def draw(rng: random.Random, models: dict, work: str, wavs: dict, i: int) -> Case:
  """One random invocation (valid about half the time) and how to judge it."""
  d = os.path.join(work, f"case{i}")
  os.makedirs(d)
  model = rng.choice(["plain", "plain", "codec", None])
  n = rng.choice([1, 1, 2, 3])
  prompts = rng.sample(PROMPTS, n)
  args = [a for p in prompts for a in ("--prompt", p)]
  if model:
    args += ["--checkpoint", models[model]]
  prompt_audio = model == "codec" and rng.random() < 0.3
  long_prompt = prompt_audio and rng.random() < 0.3        # longer than a window: cut, continued
  if prompt_audio:        # the output starts with the prompt: at least as long (or long-form)
    duration = 1.3 if long_prompt else rng.choice([0.2, 1.3])
  else:
    duration = rng.choice([0.1, 0.2, 0.2, 1.3]) if model == "codec" else rng.choice([0.1, 0.2])
  args += ["--duration", str(duration)]
  for flag, values in (("--top-k", ["1", "16", "1000"]), ("--top-p", ["0", "0.5", "1"]),
                       ("--temperature", ["0", "0.7", "1.5"]), ("--cfg", ["1", "3", "0"]),
                       ("--cfg-mode", ["batch", "two_pass"]), ("--stride", ["0.2", "0.3"])):
    if rng.random() < 0.4:
      args += [flag, rng.choice(values)]
  if n > 1 and rng.random() < 0.4:        # in batches (the last one padded)
    args += ["--batch-size", rng.choice(["1", "2"])]
  seed = rng.choice([0, 1, 2**32 - 1, rng.randrange(2**32)])
  args += ["--seed", str(seed)]
  tokens = os.path.join(d, "t.npy")
  args += ["--save-tokens", tokens]
  out = None
  if model == "codec" and rng.random() < 0.5:
    out = os.path.join(d, "out")
    args += ["--out", out]
  if prompt_audio:
    args += ["--prompt-audio", wavs["long" if long_prompt else "short"]]
  if rng.random() < 0.3:
    args.append("--noprogress")
  frames = int(math.ceil(round(duration * (100 if model == "codec" else 50), 6)))
  rate = 100 if model == "codec" else 50

  def check(res) -> str | None:
    codes = np.load(tokens)
    if codes.shape != (n, 4, frames) or codes.dtype != np.int32:
      return f"tokens {codes.shape} {codes.dtype}, expected {(n, 4, frames)}"
    card = 64 if model else SHIPPED_CARD
    if codes.min() < 0 or codes.max() >= card:
      return f"token values out of range [{codes.min()}, {codes.max()}]"
    if out:
      from musicgen_jax import audio as audio_lib
      for name in sorted(os.listdir(out)):
        wav, sr = audio_lib.read_audio(os.path.join(out, name))
        if sr != 1600 or wav.shape[-1] != frames * 16:
          return f"{name}: {wav.shape} at {sr} Hz, expected {frames * 16} samples"
    if prompt_audio:
      expect = res["prompt_codes"]
      if expect is not None and not np.array_equal(codes[..., :expect.shape[-1]], expect):
        return "the continuation does not start with its prompt"
    return None

  if rng.random() < 0.55:
    case = Case(args, True, "valid", check)
    case.model, case.duration, case.rate = model, duration, rate
    case.prompt_audio = args[args.index("--prompt-audio") + 1] if prompt_audio else None
    case.tokens = tokens
    return case
  return mistake(rng, args, models, d, tokens)


def _set(args: list[str], flag: str, value: str) -> list[str]:
  args = list(args)
  if flag in args:
    args[args.index(flag) + 1] = value
  else:
    args += [flag, value]
  return args


def mistake(rng: random.Random, args: list[str], models: dict, d: str, tokens: str) -> Case:
  a_file = os.path.join(d, "file.txt")
  with open(a_file, "w") as f:
    f.write("x")
  choices = [
      ("cfg nan", lambda: _set(args, "--cfg", "nan")),
      ("temperature nan", lambda: _set(args, "--temperature", "nan")),
      ("temperature -1", lambda: _set(args, "--temperature", "-1")),
      ("temperature inf", lambda: _set(args, "--temperature", "inf")),
      ("top-p 1.5", lambda: _set(args, "--top-p", "1.5")),
      ("top-p nan", lambda: _set(args, "--top-p", "nan")),
      ("top-k 0", lambda: _set(args, "--top-k", "0")),
      ("top-k abc", lambda: _set(args, "--top-k", "abc")),
      ("seed 2**32", lambda: _set(args, "--seed", str(2**32))),
      ("seed -1", lambda: _set(args, "--seed", "-1")),
      ("seed huge", lambda: _set(args, "--seed", "99999999999999999999999")),
      ("duration 0", lambda: _set(args, "--duration", "0")),
      ("duration nan", lambda: _set(args, "--duration", "nan")),
      ("duration inf", lambda: _set(args, "--duration", "inf")),
      ("duration 1e9", lambda: _set(args, "--duration", "1e9")),
      ("batch-size 0", lambda: _set(args, "--batch-size", "0")),
      ("batch-size -2", lambda: _set(args, "--batch-size", "-2")),
      ("stride -1", lambda: _set(args, "--stride", "-1")),
      ("stride inf", lambda: _set(args, "--stride", "inf")),
      ("out is a file", lambda: _set(args, "--out", a_file)),
      ("out below a file", lambda: _set(args, "--out", os.path.join(a_file, "x"))),
      ("save-tokens a dir", lambda: _set(args, "--save-tokens", _mkdir(d + ".npy"))),
      ("save-tokens not npy", lambda: _set(args, "--save-tokens", a_file)),
      ("save-tokens exists", lambda: _set(args, "--save-tokens", _touch(tokens))),
      ("variant nope", lambda: ["--config", "configs/musicgen.py:nope"] + args),
      ("config file missing", lambda: ["--config", "configs/nope.py"] + args),
      ("unknown flag", lambda: args + ["--tempreature", "1"]),
      ("positional", lambda: args + ["stray"]),
      ("no prompt", lambda: [a for j, a in enumerate(args)
                             if a != "--prompt" and (j == 0 or args[j - 1] != "--prompt")]),
      ("prompts-file missing", lambda: args + ["--prompts-file", os.path.join(d, "nope.txt")]),
      ("checkpoint missing", lambda: _set(args, "--checkpoint", os.path.join(d, "nope"))),
      ("checkpoint damaged", lambda: _set(args, "--checkpoint", models["damaged"])),
      ("checkpoint with inf weights", lambda: _set(args, "--checkpoint", models["nan"])),
      ("checkpoint is a file", lambda: _set(args, "--checkpoint", a_file)),
      ("shape override", lambda: _set(args, "--checkpoint", models["plain"])
       + ["--config.model.num_layers=3"]),
      ("melody on a text model", lambda: _set(args, "--checkpoint", models["plain"])
       + ["--melody", a_file]),
      ("prompt-audio missing", lambda: args + ["--prompt-audio", os.path.join(d, "nope.wav")]),
      ("prompt-audio not audio", lambda: _set(args, "--checkpoint", models["codec"])
       + ["--prompt-audio", a_file]),
  ]
  what, make = rng.choice(choices)
  return Case(make(), False, what)


def _touch(path: str) -> str:
  open(path, "w").close()
  return path


def _mkdir(path: str) -> str:
  os.makedirs(path)
  return path


def run_in_process(case: Case, timeout: float) -> dict:
  from musicgen_jax import cli
  import sample
  err, out = io.StringIO(), io.StringIO()

  def alarm(signum, frame):
    raise Hang()
  old = signal.signal(signal.SIGALRM, alarm)
  signal.alarm(int(timeout))
  t0 = time.time()
  crash = None
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      rc = cli.run_main(sample.main, ["sample.py", *case.args])
  except Hang:
    return {"rc": None, "hang": True, "stderr": err.getvalue(), "seconds": time.time() - t0}
  except BaseException as e:  # noqa: BLE001 -- an exception out of main is a crash
    rc, crash = -1, "".join(traceback.format_exception(e))
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
  return {"rc": rc, "hang": False, "stderr": err.getvalue() + (crash or ""),
          "seconds": time.time() - t0}


def run_subprocess(case: Case, timeout: float, cache: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  t0 = time.time()
  try:
    p = subprocess.run([sys.executable, "sample.py", "--compile-cache", cache, *case.args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired as e:
    return {"rc": None, "hang": True, "stderr": str(e.stderr or ""), "seconds": time.time() - t0}
  return {"rc": p.returncode, "hang": False, "stderr": p.stderr, "seconds": time.time() - t0}


def prompt_codes(case: Case) -> np.ndarray | None:
  """The codes the continuation must start with (the kept end of a prompt longer than a window)."""
  from musicgen_jax.pipeline import MusicGen
  if not getattr(case, "prompt_audio", None):
    return None
  model = _models_cache.setdefault(case.model, MusicGen.load(_model_dirs[case.model]))
  codes = model.encode_audio_file(case.prompt_audio)
  stride = float(case.args[case.args.index("--stride") + 1]) if "--stride" in case.args else None
  n, window, stride = model.long_form_plan(case.duration, stride)
  if n > 1 and codes.shape[-1] >= model.frames_for(window):
    keep = model.frames_for(window) - int(round(stride * model.frame_rate))
    codes = codes[..., -keep:]
  return np.repeat(codes, case.args.count("--prompt"), axis=0)


_models_cache: dict = {}
_model_dirs: dict = {}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--runs", type=int, default=300)
  p.add_argument("--subprocess-every", type=int, default=15, help="every n-th run as a real process")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--timeout", type=float, default=600)
  p.add_argument("--rerun-every", type=int, default=10, help="rerun every n-th valid case: same tokens")
  p.add_argument("--json", default=None)
  a = p.parse_args()
  os.chdir(ROOT)
  from musicgen_jax import checkpoint
  if checkpoint.read_config(os.path.join(ROOT, "models", "demo")).model.card != SHIPPED_CARD:
    raise SystemExit("soak_sample.py: models/demo's codebook size changed: update SHIPPED_CARD")
  rng = random.Random(a.seed)
  work = tempfile.mkdtemp(prefix="soak_sample_")
  cache = os.path.join(work, "jax_cache")
  from musicgen_jax import audio as audio_lib
  _model_dirs.update(make_models(os.path.join(work, "models")))
  wavs = {"short": os.path.join(work, "short.wav"), "long": os.path.join(work, "long.wav")}
  noise = np.random.default_rng(0)
  audio_lib.write_wav(wavs["short"], 0.1 * noise.standard_normal((1, 320)).astype(np.float32), 1600)
  audio_lib.write_wav(wavs["long"], 0.1 * noise.standard_normal((1, 12000)).astype(np.float32), 8000)
  stats = {"runs": 0, "valid": 0, "invalid": 0, "subprocess": 0, "crashes": 0, "hangs": 0,
           "wrong": 0, "reruns": 0, "by_mistake": {}, "failures": [], "seconds": 0.0}
  t_all = time.time()
  valid_seen = 0
  for i in range(a.runs):
    case = draw(rng, _model_dirs, work, wavs, i)
    sub = a.subprocess_every > 0 and i % a.subprocess_every == a.subprocess_every - 1
    res = run_subprocess(case, a.timeout, cache) if sub else run_in_process(case, a.timeout)
    stats["runs"] += 1
    stats["subprocess"] += sub
    stats["valid" if case.valid else "invalid"] += 1
    if not case.valid:
      stats["by_mistake"][case.what] = stats["by_mistake"].get(case.what, 0) + 1
    expect_rc = 0 if case.valid else 2
    problem = None
    if res["hang"]:
      stats["hangs"] += 1
      problem = "hang"
    elif "Traceback" in res["stderr"] or res["rc"] != expect_rc:
      stats["crashes"] += 1
      problem = f"exit {res['rc']} (expected {expect_rc})"
    elif case.valid and expect_rc == 0:
      valid_seen += 1
      why = case.check({"prompt_codes": prompt_codes(case)})
      if why is None and a.rerun_every and valid_seen % a.rerun_every == 0:
        stats["reruns"] += 1
        first = np.load(case.tokens)
        again = run_in_process(Case(case.args + ["--overwrite"], True, "rerun"), a.timeout)
        if again["rc"] != 0 or not np.array_equal(np.load(case.tokens), first):
          why = "a rerun with the same seed gave other tokens"
      if why:
        stats["wrong"] += 1
        problem = why
    if problem:
      stats["failures"].append({"run": i, "what": case.what, "problem": problem, "args": case.args,
                                "stderr": res["stderr"][-1500:]})
      print(f"[{i}] {case.what}: {problem}\n  {' '.join(case.args)}\n  {res['stderr'][-500:]}",
            flush=True)
    if i % 25 == 24:
      print(f"{i + 1} runs: {stats['crashes']} crashes, {stats['hangs']} hangs, "
            f"{stats['wrong']} wrong ({time.time() - t_all:.0f}s)", flush=True)
  stats["seconds"] = round(time.time() - t_all, 1)
  print(json.dumps({k: v for k, v in stats.items() if k != "failures"}, indent=1))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(stats, f, indent=1)
  shutil.rmtree(work, ignore_errors=True)
  return 1 if stats["crashes"] or stats["hangs"] or stats["wrong"] else 0


if __name__ == "__main__":
  sys.exit(main())

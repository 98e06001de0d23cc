"""What sample.py does, as library code: parse flags, check a request, load a model, generate, write.

Everything a user can get wrong is checked by `SampleRequest.from_flags` before a model is loaded or
anything compiles: settings finite and in range, seeds in [0, 2**32), the duration under
--max-duration, input files present, output paths writable and not already there (unless --overwrite).
A finished generation is never lost: when writing fails, the tokens go to a fallback file and the
error says where.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import numpy as np
from absl import flags
from ml_collections import config_flags

from musicgen_jax import checkpoint, pipeline, sampling
from musicgen_jax.pipeline import MusicGen

DTYPES = ("auto", "float32", "bfloat16")


def fail(message: str, code: int = 2) -> None:
  """Prints one line and exits non-zero."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _one_line(e: BaseException) -> str:
  """The last line of an error's message (config_flags puts a traceback before it), without the
  'SomeError: ' a traceback puts in front."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  msg = lines[-1] if lines else type(e).__name__
  head, sep, rest = msg.partition(": ")
  return rest if sep and head.endswith(("Error", "Exception")) and " " not in head else msg


def _config_flag_names() -> list[str]:
  names = []
  for name in list(flags.FLAGS):
    try:
      config_flags.get_override_values(flags.FLAGS[name])
      names.append(name)
    except TypeError:   # not a config flag
      continue
    except flags.Error:   # a config flag not parsed yet (UnparsedFlagError)
      names.append(name)
  return names


class _PlainFormatter(logging.Formatter):
  def format(self, record: logging.LogRecord) -> str:
    message = record.getMessage()
    return message if message.startswith("note: ") else f"{record.levelname.lower()}: {message}"


def plain_log_lines() -> None:
  """Log records reach the user as 'warning: ...' lines (as the tool's own warnings are printed),
  not with absl's timestamp, thread id and source line. Call inside absl's app.run."""
  from absl import logging as absl_logging
  absl_logging.get_absl_handler().setFormatter(_PlainFormatter())


def _config_error(e: BaseException, argv: list[str]) -> str:
  """One line for a config that failed to load: a --config.* override naming a field the config
  lacks (ml_collections raises AttributeError or KeyError with the bare name) says so."""
  if not isinstance(e, (AttributeError, KeyError)):
    return _one_line(e)
  missing = str(e.args[0] if e.args else e).strip("\"' ")
  names = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
  overrides = [n for n in names if "." in n and missing in n.split(".")[1:]]
  where = f" (from {', '.join(overrides)})" if overrides else ""
  return f"the config has no field {missing!r}{where}: check the name against the config file"


# What a bad flag, config file, variant or --config.* override raises while flags are defined or parsed.
_FLAG_ERRORS = (flags.Error, OSError, ValueError, AttributeError, KeyError, TypeError)


def _exit_flag_error(e: BaseException, argv: list[str]) -> None:
  prog = os.path.basename(argv[0]) if argv else "musicgen"
  print(f"{prog}: error: {_config_error(e, argv)}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl `flags_parser` for sample.py and train.py: a bad flag, config file or config variant is
  one line and exit 2 (config files are loaded here, not later)."""
  asked_help = any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in argv[1:])
  try:
    rest = flags.FLAGS(argv)
    for name in _config_flag_names():
      getattr(flags.FLAGS[name].value, "variant", None)   # a config that failed to load raises
  except _FLAG_ERRORS as e:
    _exit_flag_error(e, argv)
  except SystemExit as e:   # absl prints the usage for --help, then exits 1: asked for, not an error
    if asked_help and e.code == 1:
      raise SystemExit(0) from None
    raise
  return rest


def define_config_flag(name: str, default: str, help_text: str):
  """config_flags.DEFINE_config_file, with the errors it raises while defining the flag (it reads
  the --NAME.* overrides of sys.argv then) as one line and exit 2."""
  try:
    return config_flags.DEFINE_config_file(name, default, help_text)
  except _FLAG_ERRORS as e:
    _exit_flag_error(e, sys.argv)


def run_main(main: Callable[[list[str]], Any], argv: list[str]) -> int:
  """Runs a CLI's `main` in this process as `python argv[0] argv[1:]` would (tests, soak).

  Flags are reset to their defaults first (config files re-read with argv's overrides). Returns the
  exit code.
  """
  old_argv, sys.argv = sys.argv, list(argv)
  try:
    flags.FLAGS.unparse_flags()
    for name in _config_flag_names():
      for stale in [n for n in list(flags.FLAGS) if n.startswith(name + ".")]:
        delattr(flags.FLAGS, stale)   # an earlier run's overrides point at its config object
      try:   # re-reads the default config file and defines argv's --config.* override flags
        flags.FLAGS.set_default(name, ast.literal_eval(flags.FLAGS[name].default_as_str))
      except Exception:   # noqa: BLE001 -- the same error is reported by parse_flags
        pass
    try:
      main(parse_flags(list(argv)))
    except SystemExit as e:
      return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
  finally:
    sys.argv = old_argv


@contextlib.contextmanager
def friendly_errors(prog: str) -> Iterator[None]:
  """Turns the errors a user can cause into one line and a non-zero exit (no traceback)."""
  try:
    yield
  except (ValueError, OSError, checkpoint.CheckpointError) as e:
    msg = " ".join(str(e).split()) or type(e).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    sys.exit(130)


# --- the request ------------------------------------------------------------------------------------
def _finite(name: str, value, low: float = 0.0, what: str = "seconds") -> None:
  if value is not None and not (value > low and math.isfinite(value)):
    raise ValueError(f"--{name} must be a finite number of {what} > {low:g}, got {value}")


def _check_writable(path: str, flag: str, overwrite: bool, kind: str = "file") -> None:
  """ValueError unless `path` can be created as a `kind` ('file' or 'dir') by this user."""
  if os.path.exists(path):
    if kind == "dir" and not os.path.isdir(path):
      raise ValueError(f"--{flag} {path} is a file: --{flag} names a directory")
    if kind == "file" and os.path.isdir(path):
      raise ValueError(f"--{flag} {path} is a directory: --{flag} names a file")
    if kind == "file" and not overwrite:
      raise ValueError(f"--{flag} {path} already exists: pass --overwrite to replace it, or "
                       "choose another path")
    if not os.access(path if kind == "dir" else os.path.dirname(os.path.abspath(path)),
                     os.W_OK | os.X_OK):
      raise ValueError(f"--{flag} {path} is not writable")
    return
  probe = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ValueError(f"--{flag} {path}: {probe} is a file, not a directory")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f"--{flag} {path}: {probe} is not writable")


def check_output_dir(path: str, flag: str = "out") -> None:
  """ValueError (one line) unless directory `path` exists or can be created and written: checked
  before long work, so that its results are not lost at the end."""
  _check_writable(path, flag, True, kind="dir")


# Audio formats --out could be taken to ask for; only WAV is written (a name ending so would become a
# directory of WAVs).
OTHER_AUDIO_EXTENSIONS = (".mp3", ".flac", ".ogg", ".m4a", ".aac", ".opus")


@dataclasses.dataclass
class SampleRequest:
  prompts: list[str]
  duration: float | None
  settings: dict
  seed: int
  out: str | None
  save_tokens: str | None
  melody: str | None
  prompt_audio: str | None
  stride: float | None
  plot: bool
  progress: bool
  overwrite: bool = False
  max_duration: float = 3600.0
  verbose: bool = False
  batch_size: int | None = None     # prompts per compiled call; None: all that fit in memory

  @classmethod
  def from_flags(cls, f: dict) -> "SampleRequest":
    """Checks every flag that can be checked without a model; ValueError (one line) otherwise."""
    prompts = list(f["prompt"])
    if f["prompts-file"]:
      path = f["prompts-file"]
      if not os.path.isfile(path):
        raise ValueError(f"--prompts-file {path} does not exist or is not a file")
      with open(path, encoding="utf-8") as fh:
        prompts += [line.strip() for line in fh if line.strip()]
    if not prompts:
      raise ValueError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    for i, p in enumerate(prompts):
      if not p.strip():
        print(f"warning: prompt {i + 1} is empty: it is sampled unconditionally (the null text "
              "condition)", file=sys.stderr)
    settings = {k: f[flag] for k, flag in (("temperature", "temperature"), ("top_k", "top-k"),
                                           ("top_p", "top-p"), ("cfg_coef", "cfg"),
                                           ("cfg_mode", "cfg-mode")) if f[flag] is not None}
    sampling.SamplingSettings.from_config({}, **settings)   # the values, before any model is loaded
    _finite("max-duration", f["max-duration"])
    _finite("duration", f["duration"])
    if f["duration"] is not None and f["duration"] > f["max-duration"]:
      raise ValueError(f"--duration {f['duration']:g}s is above --max-duration "
                       f"({f['max-duration']:g}s): pass --max-duration {f['duration']:g} to allow it")
    _finite("stride", f["stride"])
    seed = pipeline.check_seed(f["seed"])
    if f.get("batch-size") is not None and f["batch-size"] < 1:
      raise ValueError(f"--batch-size must be at least 1 (prompts per call), got {f['batch-size']}")
    for name in ("melody", "prompt-audio"):
      if f[name] and not os.path.isfile(f[name]):
        raise ValueError(f"--{name} file {f[name]} does not exist")
    if f["save-tokens"]:
      if not f["save-tokens"].endswith(".npy"):
        raise ValueError(f"--save-tokens must name a .npy file, got {f['save-tokens']}")
      _check_writable(f["save-tokens"], "save-tokens", f["overwrite"])
    ext = os.path.splitext(f["out"] or "")[1].lower()
    if ext in OTHER_AUDIO_EXTENSIONS:
      raise ValueError(f"--out {f['out']}: only .wav files are written; give a FILE.wav, or a "
                       "directory for one WAV per prompt")
    req = cls(prompts, f["duration"], settings, seed, f["out"], f["save-tokens"], f["melody"],
              f["prompt-audio"], f["stride"], f["plot"], f["progress"], f["overwrite"],
              f["max-duration"], f["verbose"], f.get("batch-size"))
    if req.plot and not req.out:
      raise ValueError("--plot draws each WAV's spectrogram next to it: pass --out FILE.wav or DIR "
                       "too")
    if not req.out and not req.save_tokens:
      raise ValueError("nothing would be written: pass --out FILE.wav (a directory for one WAV per "
                       "prompt) or --save-tokens FILE.npy")
    if req.out:
      if req.single_file and len(prompts) != 1:
        raise ValueError(f"--out {req.out} names one WAV file but there are {len(prompts)} prompts: "
                         "give one prompt, or a directory as --out for one WAV per prompt")
      _check_writable(req.out, "out", req.overwrite, kind="file" if req.single_file else "dir")
      for stem in req.stems():
        for ext in (".wav", ".npy", ".png"):
          if os.path.exists(stem + ext) and not req.overwrite:
            raise ValueError(f"{stem + ext} already exists: pass --overwrite to replace it, or "
                             "choose another --out")
    return req

  @property
  def single_file(self) -> bool:
    """--out names the WAV file itself (one prompt) rather than a directory."""
    return bool(self.out) and self.out.lower().endswith(".wav")

  def stems(self) -> list[str]:
    """Output paths without extension, one per prompt."""
    if self.single_file:
      return [self.out[:-len(".wav")]]
    return [os.path.join(self.out, f"{i:03d}_{_slug(p)}") for i, p in enumerate(self.prompts)]


def _slug(text: str, n: int = 40) -> str:
  s = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
  return (s[:n] or "prompt")


# --- model -------------------------------------------------------------------------------------------
def config_overrides(flag) -> dict[str, Any]:
  """{dotted field: value} of the --config.* overrides given on the command line."""
  return dict(flag.override_values or {})


def resolve_dtype(flag_value: str, overrides: dict[str, Any], backend: str) -> str | None:
  """The LM's compute dtype: --dtype, else --config.model.dtype, else bfloat16 on accelerators and
  None (the config's, float32) on CPU."""
  if flag_value != "auto":
    return flag_value
  if "model.dtype" in overrides:
    return overrides["model.dtype"]
  return "bfloat16" if backend != "cpu" else "float32"


def setup_compilation_cache(directory: str | None) -> str | None:
  """Turns on JAX's persistent compilation cache in `directory` (default: a per-user cache directory,
  or $JAX_COMPILATION_CACHE_DIR); '' turns it off. A second run with the same shapes loads its
  compiled programs instead of compiling again. Returns the directory used."""
  import jax
  if directory == "":
    return None
  directory = directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
      "musicgen_jax", "jax")
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    print(f"note: no compilation cache ({directory}: {e.strerror})", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_MODEL = os.path.join(REPO_ROOT, "models", "demo")
# The scripts' default --config, found from any working directory.
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "musicgen.py") + ":tiny"


_RESTORE_SHIPPED = ("restore it with `git checkout -- models/demo`, retrain it with the command in "
                    "models/demo/TRAINING.md, or pass --checkpoint DIR")


def shipped_model() -> str:
  """The model directory that ships with the repo (configs/demo.py; models/demo/TRAINING.md)."""
  if not os.path.isfile(os.path.join(SHIPPED_MODEL, checkpoint.CONFIG_FILE)):
    raise ValueError(f"the shipped model is missing from {SHIPPED_MODEL} (a partial checkout?): "
                     + _RESTORE_SHIPPED)
  return SHIPPED_MODEL


def load_model(checkpoint_dir: str | None, config, *, overrides: dict[str, Any] | None = None,
               dtype: str | None = None, verify: bool = True, mesh=None) -> MusicGen:
  """The model of --checkpoint (overrides: sampling settings and dtype only) or a random one of
  --config (no --checkpoint; smoke runs)."""
  overrides = dict(overrides or {})
  if dtype:
    overrides["model.dtype"] = dtype
  if checkpoint_dir:
    try:
      return MusicGen.load(checkpoint_dir, verify=verify, overrides=overrides, mesh=mesh)
    except checkpoint.CheckpointError as e:
      if os.path.abspath(checkpoint_dir) != SHIPPED_MODEL:
        raise
      raise checkpoint.CheckpointError(f"the shipped model is damaged ({e}): "
                                       + _RESTORE_SHIPPED) from None
  pipeline.pattern_from_config(config)   # a bad pattern fails before anything is printed
  print("note: no --checkpoint given: using a randomly initialised model of the config "
        f"({config.variant}); the output is noise", file=sys.stderr)
  config = pipeline.apply_overrides(config, {k: v for k, v in overrides.items() if k == "model.dtype"})
  model = MusicGen.random(config)
  model.mesh = mesh
  return model


# --- timing and progress --------------------------------------------------------------------------
class Timings:
  """Wall time per phase (load, generate, codec, write), with JAX's compile time (tracing, lowering,
  XLA compile or persistent-cache load) counted apart from the phase it happened in."""

  _COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                     "/jax/core/compile/jaxpr_to_mlir_module_duration",
                     "/jax/core/compile/backend_compile_duration")

  def __init__(self, listen: bool = True):
    import jax
    self.phases: dict[str, float] = {}
    self.compile = 0.0
    self.cache_hits = self.cache_misses = 0
    self.listening = listen
    if listen:   # JAX's listeners are process-wide: close() removes them
      jax.monitoring.register_event_duration_secs_listener(self._on_duration)
      jax.monitoring.register_event_listener(self._on_event)

  def _on_duration(self, event: str, duration: float, **_) -> None:
    if event in self._COMPILE_EVENTS:
      self.compile += duration

  def _on_event(self, event: str, **_) -> None:
    self.cache_hits += event == "/jax/compilation_cache/cache_hits"
    self.cache_misses += event == "/jax/compilation_cache/cache_misses"

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    t0, c0 = time.perf_counter(), self.compile
    try:
      yield
    finally:
      self.phases[name] = self.phases.get(name, 0.0) + (time.perf_counter() - t0) - (self.compile - c0)

  def close(self) -> None:
    import jax
    if self.listening:
      self.listening = False
      jax.monitoring.unregister_event_duration_listener(self._on_duration)
      jax.monitoring.unregister_event_listener(self._on_event)

  def summary(self) -> str:
    parts = [f"{k} {v:.2f}s" for k, v in self.phases.items()]
    parts.append(f"compile {self.compile:.2f}s (persistent cache: {self.cache_hits} hits, "
                 f"{self.cache_misses} misses)")
    return "time: " + ", ".join(parts)


class Progress:
  """A tqdm bar over the decode steps of every window of every batch (the sampler reports between
  its compiled chunks), and the time estimate of a long run once its first window (or, in one
  window, batch) is done."""

  def __init__(self, windows: int, enabled: bool, timings: Timings,
               unit: tuple[str, str] = ("window", "windows")):
    self.windows, self.enabled, self.timings, self.unit = windows, enabled, timings, unit
    self.window, self.last, self.bar = 0, -1, None
    self.t0, self.c0 = time.perf_counter(), timings.compile

  def __call__(self, done, steps) -> None:
    done, steps = int(done), int(steps)
    if done < self.last:            # a new window started
      self.window += 1
    self.last = done
    if self.bar is None and self.enabled:
      from tqdm import tqdm
      self.bar = tqdm(total=self.windows * steps, desc="generating", unit="step", file=sys.stderr,
                      dynamic_ncols=True, mininterval=0.5)
    if self.bar is not None and self.window * steps + done > self.bar.n:
      self.bar.update(self.window * steps + done - self.bar.n)
    if done == steps and self.window == 0 and self.windows > 2:
      self._estimate()

  def _estimate(self) -> None:
    spent = time.perf_counter() - self.t0 - (self.timings.compile - self.c0)
    left = spent * (self.windows - 1)
    one, many = self.unit
    line = (f"note: first {one} decoded in {spent:.1f}s (compile excluded): about "
            f"{_human(left)} for the {self.windows - 1} {many} left")
    if self.bar is not None:
      self.bar.write(line, file=sys.stderr)
    else:
      print(line, file=sys.stderr)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _human(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.0f}s"
  if seconds < 7200:
    return f"{seconds / 60:.0f} min"
  return f"{seconds / 3600:.1f} h"


# --- generating and writing -------------------------------------------------------------------------
def batch_size(model: MusicGen, req: SampleRequest, duration: float,
               settings: sampling.SamplingSettings) -> int:
  """Prompts per compiled call: --batch-size, else all of them when their decoding fits in memory,
  else as many as fit (with a note). What does not fit is refused (ValueError) before any compile."""
  n = len(req.prompts)
  if req.batch_size:
    size = min(req.batch_size, n)
    model.check_memory(size, duration, settings)
    return size
  fit = model.max_batch(duration, settings)
  if fit is None or fit >= n:
    return n
  if fit == 0:
    model.check_memory(n, duration, settings)   # raises: not even one prompt fits
  gib = lambda b: f"{b / 2**30:.1f} GiB"
  print(f"note: decoding all {n} prompts at once needs about "
        f"{gib(model.decode_need(n, duration, settings)['total'])} per device, more than is free: "
        f"they run in {-(-n // fit)} batches of {fit} (--batch-size)", file=sys.stderr)
  return fit


def batch_seed(seed: int, batch: int) -> int:
  """The seed of the prompts' batch `batch` (0: `seed` itself, so one batch samples as before)."""
  if batch == 0:
    return seed
  return int(np.random.SeedSequence([seed, 0, batch]).generate_state(1)[0])


def sample_batches(model: MusicGen, req: SampleRequest, timings: Timings | None = None
                   ) -> Iterator[tuple[int, np.ndarray]]:
  """Generates the prompts, in batches of `batch_size` (the last padded with repeats of its last
  prompt, so that one compiled program serves all) -> yields (the index of the batch's first prompt,
  its codes [b, K, T]) as each batch finishes. Ctrl-C in long-form after a batch's first window
  raises GenerationInterrupted with that batch's finished windows and `start`."""
  timings = timings or Timings(listen=False)
  settings = model.sampling_settings(**req.settings)
  duration = req.duration if req.duration is not None else float(model.config.sampling.duration)
  if duration > req.max_duration:
    raise ValueError(f"the duration {duration:g}s (the model's default) is above --max-duration "
                     f"({req.max_duration:g}s): pass --duration or a larger --max-duration")
  if req.plot and model.codec is None:
    raise ValueError("--plot draws the spectrogram of the audio, and this model has no codec (it "
                     "writes tokens): drop --plot, or use a model directory with a codec")
  size = batch_size(model, req, duration, settings)   # the memory check: before any compile
  prompt = chroma = None
  with timings.phase("codec"):
    if req.prompt_audio:
      prompt = np.repeat(model.encode_audio_file(req.prompt_audio), size, axis=0)
    if req.melody:
      chroma = model.melody_chroma_file(req.melody, size)
  windows, window, stride = model.long_form_plan(duration, req.stride)
  batches = -(-len(req.prompts) // size)
  if windows > 1:
    print(f"note: {duration:g}s is longer than this model's window ({window:.2f}s): {windows} "
          f"windows, each adding {stride:.2f}s; an estimate of the time follows the first window",
          file=sys.stderr)
  progress = Progress(windows * batches, req.progress, timings,
                      unit=("window", "windows") if windows > 1 else ("batch", "batches"))
  callback = progress if (req.progress or windows * batches > 2) else None   # None: one call
  try:
    for b in range(batches):
      start = b * size
      texts = req.prompts[start:start + size]
      real = len(texts)
      texts = texts + texts[-1:] * (size - real)
      try:
        with timings.phase("generate"):
          codes = model.generate_long(texts, duration, settings, seed=batch_seed(req.seed, b),
                                      prompt=prompt, chroma=chroma, stride=req.stride,
                                      progress=callback)
      except pipeline.GenerationInterrupted as e:
        raise pipeline.GenerationInterrupted(e.codes[:real], start) from None
      yield start, codes[:real]
  finally:
    progress.close()


def generate_and_write(model: MusicGen, req: SampleRequest, timings: Timings) -> str | None:
  """sample.py's work: generates batch by batch, writing each batch's files as it finishes (a line
  per file on stdout); the tokens (--save-tokens) of all prompts at the end. Ctrl-C keeps what is
  finished: the batches done, and in long-form the finished windows of the batch under way. -> None,
  or after Ctrl-C a line that says what was written."""
  done: list[np.ndarray] = []
  several = False                          # more than one batch: tokens written at the end
  stopped = None
  try:
    for start, codes in sample_batches(model, req, timings):
      several = codes.shape[0] < len(req.prompts)
      done.append(codes)
      for line in write_outputs(model, req, codes, timings, start=start, tokens=not several,
                                finished=np.concatenate(done) if several else None):
        print(line)
  except pipeline.GenerationInterrupted as e:   # the finished windows of the batch under way
    several = e.codes.shape[0] < len(req.prompts)
    for line in write_outputs(model, req, e.codes, timings, start=e.start, tokens=not several):
      print(line)
    if not several:                        # one batch: its tokens were written with it
      return (f"interrupted: wrote the first {e.codes.shape[-1] / model.frame_rate:.2f}s, the "
              "windows finished before Ctrl-C")
    stopped = (f"interrupted: wrote {e.start} of {len(req.prompts)} prompts in full and the first "
               f"{e.codes.shape[-1] / model.frame_rate:.2f}s of prompts {e.start + 1}-"
               f"{e.start + e.codes.shape[0]}, the windows finished before Ctrl-C")
  except KeyboardInterrupt:
    if not done:
      raise
    stopped = f"interrupted: wrote {sum(len(c) for c in done)} of {len(req.prompts)} prompts"
  if several and done and req.save_tokens:
    codes = np.concatenate(done)
    save_tokens(req.save_tokens, codes, timings)
    print(f"tokens {codes.shape} -> {req.save_tokens}"
          + (f" (the {len(codes)} complete prompts)" if stopped else ""))
  return stopped


def save_tokens(path: str, codes: np.ndarray, timings: Timings | None = None) -> None:
  with (timings or Timings(listen=False)).phase("write"):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.save(path, codes)


def write_outputs(model: MusicGen, req: SampleRequest, codes: np.ndarray,
                  timings: Timings | None = None, start: int = 0, tokens: bool = True,
                  finished: np.ndarray | None = None) -> list[str]:
  """Writes the files of prompts start.. start + len(codes): their WAVs (/ PNGs) and, with `tokens`,
  --save-tokens; returns one line per file written.

  If anything fails after generation, the tokens are saved to a fallback file first and the error
  (one line) says where, so a finished generation is never lost: `finished` (default `codes`), i.e.
  in batches the tokens of every prompt generated so far, this batch's included.
  """
  from musicgen_jax import audio as audio_lib
  timings = timings or Timings(listen=False)
  lines: list[str] = []
  try:
    if req.save_tokens and tokens:
      save_tokens(req.save_tokens, codes, timings)
      lines.append(f"tokens {codes.shape} -> {req.save_tokens}")
    if req.out:
      stems = req.stems()[start:start + codes.shape[0]]
      os.makedirs(os.path.dirname(os.path.abspath(stems[0])), exist_ok=True)
      with timings.phase("codec"):
        audio = model.decode(codes)
      with timings.phase("write"):
        for i, stem in enumerate(stems):
          if audio is None:
            np.save(stem + ".npy", codes[i])
            lines.append(f"tokens (this model has no codec) -> {stem}.npy")
            continue
          audio_lib.write_wav(stem + ".wav", audio[i], model.sample_rate)
          lines.append(f"{audio.shape[-1] / model.sample_rate:.2f}s -> {stem}.wav")
          if req.plot:
            from musicgen_jax import plotting   # matplotlib: imported only with --plot
            plotting.spectrogram_png(stem + ".png", audio[i], model.sample_rate,
                                     title=req.prompts[start + i])
            lines.append(f"spectrogram -> {stem}.png")
  except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 -- rescue the tokens, then report
    near = os.path.dirname(os.path.abspath(req.save_tokens or os.path.join(req.out or ".", "x")))
    finished = codes if finished is None else finished
    rescue = _rescue_tokens(finished, [near, os.getcwd(), tempfile.gettempdir()])
    for line in lines:
      print(line)
    what = " ".join(str(e).split()) or type(e).__name__
    raise OSError(f"writing the outputs failed ({what}); the generated tokens {finished.shape} were "
                  f"saved to {rescue}" if rescue else f"writing the outputs failed ({what}) and the "
                  "tokens could not be saved anywhere") from None
  return lines


def _rescue_tokens(codes: np.ndarray, folders: list[str]) -> str | None:
  """Saves codes to a new file in the first of `folders` that takes it; its path or None."""
  name = f"musicgen-tokens-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.npy"
  for folder in folders:
    try:
      path = os.path.join(folder, name)
      np.save(path, codes)
      return path
    except OSError:
      continue
  return None

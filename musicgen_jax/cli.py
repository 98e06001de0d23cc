"""What sample.py does, as library code: validate a request, load a model, generate, write outputs."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Iterator

import numpy as np

from musicgen_jax import audio as audio_lib, checkpoint, plotting, sampling
from musicgen_jax.pipeline import MusicGen


def fail(message: str, code: int = 2) -> None:
  """Prints one line and exits non-zero."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


@contextlib.contextmanager
def friendly_errors(prog: str) -> Iterator[None]:
  """Turns the errors a user can cause into one line and a non-zero exit (no traceback)."""
  try:
    yield
  except (ValueError, FileNotFoundError, checkpoint.CheckpointError) as e:
    msg = " ".join(str(e).split()) or type(e).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)


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

  @classmethod
  def from_flags(cls, f: dict) -> "SampleRequest":
    prompts = list(f["prompt"])
    if f["prompts-file"]:
      path = f["prompts-file"]
      if not os.path.isfile(path):
        raise ValueError(f"--prompts-file {path} does not exist")
      with open(path, encoding="utf-8") as fh:
        prompts += [line.strip() for line in fh if line.strip()]
    if not prompts:
      raise ValueError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    settings = {k: f[flag] for k, flag in (("temperature", "temperature"), ("top_k", "top-k"),
                                           ("top_p", "top-p"), ("cfg_coef", "cfg"),
                                           ("cfg_mode", "cfg-mode")) if f[flag] is not None}
    if f["duration"] is not None and not f["duration"] > 0:
      raise ValueError(f"--duration must be > 0 seconds, got {f['duration']}")
    for name in ("melody", "prompt-audio"):
      if f[name] and not os.path.isfile(f[name]):
        raise ValueError(f"--{name} file {f[name]} does not exist")
    if f["save-tokens"] and not f["save-tokens"].endswith(".npy"):
      raise ValueError(f"--save-tokens must name a .npy file, got {f['save-tokens']}")
    if f["stride"] is not None and not f["stride"] > 0:
      raise ValueError(f"--stride must be > 0 seconds, got {f['stride']}")
    req = cls(prompts, f["duration"], settings, f["seed"], f["out"], f["save-tokens"], f["melody"],
              f["prompt-audio"], f["stride"], f["plot"], f["progress"])
    req.sampling_settings({})  # validate the values early, before any model is loaded
    return req

  def sampling_settings(self, defaults: dict) -> sampling.SamplingSettings:
    d = {"temperature": defaults.get("temperature", 1.0), "top_k": defaults.get("top_k", 250),
         "top_p": defaults.get("top_p", 0.0), "cfg_coef": defaults.get("cfg", 3.0),
         "cfg_mode": defaults.get("cfg_mode", "batch")}
    d.update(self.settings)
    return sampling.SamplingSettings(**d)


def load_model(checkpoint_dir: str | None, config) -> MusicGen:
  if checkpoint_dir:
    return MusicGen.load(checkpoint_dir)
  print("note: no --checkpoint given: using a randomly initialised model of the config "
        f"({config.variant}); the output is noise", file=sys.stderr)
  return MusicGen.random(config)


def _progress(step, total):
  step, total = int(step), int(total)
  if step % max(1, total // 20) == 0 or step >= total - 2:
    print(f"\rgenerating: step {step + 1}/{total}", end="" if step < total - 2 else "\n",
          file=sys.stderr, flush=True)


def run_sample(model: MusicGen, req: SampleRequest) -> np.ndarray:
  """-> codes [B, K, T] for all prompts in one compiled call per window."""
  settings = req.sampling_settings(model.config.sampling.to_dict())
  duration = req.duration if req.duration is not None else float(model.config.sampling.duration)
  prompt = chroma = None
  if req.prompt_audio:
    prompt = model.encode_audio_file(req.prompt_audio)
    prompt = np.repeat(prompt, len(req.prompts), axis=0)
  if req.melody:
    chroma = model.melody_chroma_file(req.melody, len(req.prompts))
  return model.generate_long(req.prompts, duration, settings, seed=req.seed, prompt=prompt,
                             chroma=chroma, stride=req.stride,
                             progress=_progress if req.progress else None)


def write_outputs(model: MusicGen, req: SampleRequest, codes: np.ndarray) -> list[str]:
  """Writes tokens / WAVs (/ PNGs); returns one line per file written."""
  lines = []
  if req.save_tokens:
    os.makedirs(os.path.dirname(os.path.abspath(req.save_tokens)), exist_ok=True)
    np.save(req.save_tokens, codes)
    lines.append(f"tokens {codes.shape} -> {req.save_tokens}")
  if req.out:
    os.makedirs(req.out, exist_ok=True)
    audio = model.decode(codes)
    for i, prompt in enumerate(req.prompts):
      stem = os.path.join(req.out, f"{i:03d}_{_slug(prompt)}")
      if audio is None:
        np.save(stem + ".npy", codes[i])
        lines.append(f"tokens (this model has no codec) -> {stem}.npy")
        continue
      audio_lib.write_wav(stem + ".wav", audio[i], model.sample_rate)
      lines.append(f"{audio.shape[-1] / model.sample_rate:.2f}s -> {stem}.wav")
      if req.plot:
        plotting.spectrogram_png(stem + ".png", audio[i], model.sample_rate)
        lines.append(f"spectrogram -> {stem}.png")
  if not lines:
    lines.append(f"generated {codes.shape}; pass --out DIR or --save-tokens FILE.npy to keep it")
  return lines


def _slug(text: str, n: int = 40) -> str:
  s = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
  return (s[:n] or "prompt")

"""A whole MusicGen: text conditioner + LM + pattern (+ codec), built from a config or a model directory.

This is what sample.py drives; everything is checked before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from musicgen_jax import checkpoint, lm as lm_lib, patterns, sampling
from musicgen_jax.conditioners.text import LearnedTextConditioner
from musicgen_jax.conditioners.tokenizer import TextTokenizer

PATTERN_OPTIONS = ("delays", "flattening", "group_by")


def _ceil_frames(duration: float, frame_rate: float) -> int:
  """ceil(duration * frame_rate), ignoring float error (0.07 s at 100 Hz is 7 frames, not 8)."""
  return int(math.ceil(round(duration * frame_rate, 6)))


def pattern_from_config(config: ml_collections.ConfigDict):
  """The codebook pattern named by `config.pattern` with the options that are set."""
  opts = {k: config.pattern.get(k) for k in PATTERN_OPTIONS if config.pattern.get(k) is not None}
  return patterns.get_pattern(config.pattern.name, config.model.num_codebooks, **opts)


def text_conditioner_from_config(config: ml_collections.ConfigDict, directory: str | None = None):
  """The text conditioner of `config.text` ('learned' or 't5'); tokenizer.json read from `directory`."""
  t = config.text
  tok_path = t.get("tokenizer") or None
  if directory and os.path.isfile(os.path.join(directory, checkpoint.TOKENIZER_FILE)):
    tok_path = os.path.join(directory, checkpoint.TOKENIZER_FILE)
  if t.kind == "learned":
    return LearnedTextConditioner(TextTokenizer.from_file(tok_path), dim=t.dim,
                                  num_layers=t.num_layers, num_heads=t.num_heads,
                                  max_length=t.max_length)
  if t.kind == "t5":
    import tokenizers
    from musicgen_jax.conditioners.t5 import T5Conditioner, T5EncoderConfig
    if not tok_path:
      raise ValueError("config.text.kind is 't5' but no tokenizer.json was found: import a checkpoint "
                       "with `python -m musicgen_jax.convert`")
    return T5Conditioner(T5EncoderConfig.from_hf_dict(t.t5.to_dict()),
                         tokenizers.Tokenizer.from_file(tok_path), max_length=t.max_length)
  raise ValueError(f"config.text.kind must be 'learned' or 't5', got {t.kind!r}")


def codec_from_config(config: ml_collections.ConfigDict):
  """The EnCodec model described by `config.codec.encodec` (an HF EncodecConfig dict), or None."""
  enc = config.codec.get("encodec")
  if not enc:
    return None
  from musicgen_jax.codec.encodec import EncodecConfig, EncodecModel
  return EncodecModel(EncodecConfig.from_hf_dict(enc.to_dict()))


@dataclasses.dataclass
class MusicGen:
  config: ml_collections.ConfigDict
  params: dict[str, Any]            # {'lm', 'text', ['codec']}, unboxed
  text: Any                         # a TextConditioner
  codec: Any = None                 # an EncodecModel or None

  def __post_init__(self):
    self.lm_cfg = lm_lib.LMConfig.from_dict(self.config.model)
    self.pattern = pattern_from_config(self.config)
    self._encode_text = jax.jit(self.text.encode)

  # --- construction -----------------------------------------------------------------------------
  @classmethod
  def random(cls, config: ml_collections.ConfigDict, seed: int = 0) -> "MusicGen":
    """A randomly initialised model (tests, smoke runs)."""
    lm_cfg = lm_lib.LMConfig.from_dict(config.model)
    pattern_from_config(config)  # fail on a bad pattern before anything is initialised
    text = text_conditioner_from_config(config)
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"lm": nn.unbox(lm_lib.init_params(lm_cfg, k1))["params"],
              "text": nn.unbox(text.init(k2))}
    return cls(config, params, text, codec_from_config(config))

  @classmethod
  def load(cls, directory: str) -> "MusicGen":
    """From a model directory (export, import or training run); CheckpointError if unusable."""
    config, params = checkpoint.load_model(directory)
    text = text_conditioner_from_config(config, directory)
    return cls(config, params, text, codec_from_config(config))

  def save(self, directory: str) -> None:
    checkpoint.save_model(directory, self.config, self.params,
                          tokenizer_file=self.config.text.get("tokenizer") or None)

  # --- geometry ---------------------------------------------------------------------------------
  @property
  def frame_rate(self) -> float:
    return float(self.config.codec.frame_rate)

  @property
  def sample_rate(self) -> int:
    return int(self.config.codec.sample_rate)

  def prefix_length(self, text_len: int) -> int:
    c = self.lm_cfg
    p = c.chroma_length if c.melody else 0
    if c.text_conditioning == "prefix" and c.text_dim:
      p += text_len
    return p

  def max_duration(self) -> float:
    """Longest duration (s) one window can generate within the model's positions."""
    c = self.lm_cfg
    budget = c.max_positions - self.prefix_length(self.config.text.max_length)
    t = 1
    while self.pattern.num_steps(t + 1) <= budget:
      t += 1
    return t / self.frame_rate

  def frames_for(self, duration: float) -> int:
    """Frames for `duration` seconds; ValueError if <= 0 or beyond the model's positions."""
    if not duration > 0:
      raise ValueError(f"duration must be > 0 seconds, got {duration}")
    frames = _ceil_frames(duration, self.frame_rate)
    limit = self.max_duration()
    if frames / self.frame_rate > limit + 1e-9:
      raise ValueError(f"duration {duration}s is longer than this model's positions allow "
                       f"({limit:.2f}s); ask for a shorter duration")
    return frames

  # --- conditions and generation ----------------------------------------------------------------
  def conditions(self, texts: Sequence[str], chroma: np.ndarray | None = None) -> lm_lib.Conditions:
    """Text (and melody chroma [B, frames, 12]) -> Conditions for the LM."""
    batch = {k: jnp.asarray(v) for k, v in self.text.tokenize(list(texts)).items()}
    hidden, mask = self._encode_text(self.params["text"], batch)
    if self.lm_cfg.text_conditioning == "prefix":
      # A text prefix is attended without a mask (as in the reference), so padding would shift every
      # position: keep only up to the longest prompt of the batch, as padding=True tokenization does.
      n = max(int(np.asarray(mask).sum(axis=1).max()), 1)
      hidden, mask = hidden[:, :n], mask[:, :n]
    melody = None
    if self.lm_cfg.melody:
      if chroma is None:   # no melody given: the null chroma (silence, first pitch class)
        chroma = np.zeros((len(texts), self.lm_cfg.chroma_length, self.lm_cfg.num_chroma), np.float32)
        chroma[..., 0] = 1.0
      # Tiled / cut to chroma_length frames, as the reference does with a shorter or longer melody.
      melody = jnp.asarray(self.melody_window(np.asarray(chroma), 0.0), jnp.float32)
    return lm_lib.Conditions(text=hidden, text_mask=mask, melody=melody)

  def generate(self, texts: Sequence[str], duration: float,
               settings: sampling.SamplingSettings = sampling.SamplingSettings(), seed: int = 0,
               prompt: np.ndarray | None = None, chroma: np.ndarray | None = None,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """-> codes int32 [B, K, T] for T = ceil(duration * frame_rate)."""
    frames = self.frames_for(duration)
    if prompt is not None and prompt.shape[-1] > frames:
      raise ValueError(f"the prompt has {prompt.shape[-1]} frames, more than the {frames} requested: "
                       "ask for a longer duration")
    conds = self.conditions(texts, chroma)
    codes = sampling.generate({"params": self.params["lm"]}, self.lm_cfg, self.pattern, conds, frames,
                              seed=seed, settings=settings,
                              prompt=None if prompt is None else jnp.asarray(prompt), progress=progress)
    return np.asarray(codes)

  # --- long-form ----------------------------------------------------------------------------------
  def generate_long(self, texts: Sequence[str], duration: float,
                    settings: sampling.SamplingSettings = sampling.SamplingSettings(), seed: int = 0,
                    prompt: np.ndarray | None = None, chroma: np.ndarray | None = None,
                    stride: float | None = None,
                    progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Any duration: one window when it fits the model's positions, else windowed extension.

    Each further window keeps the last (window - stride) seconds as its prompt and adds `stride`
    seconds (default half a window); the melody chroma [B, F, 12] (at its own frame rate) is re-indexed
    to each window's start. Every window after the first has the same shapes: one more compilation.
    """
    if not duration > 0:
      raise ValueError(f"duration must be > 0 seconds, got {duration}")
    window = self.max_duration()
    total = _ceil_frames(duration, self.frame_rate)
    melody = lambda t0: None if chroma is None else self.melody_window(chroma, t0)
    if duration <= window:
      return self.generate(texts, duration, settings, seed, prompt, melody(0.0), progress)
    win = self.frames_for(window)
    step = int(round((stride if stride is not None else window / 2) * self.frame_rate))
    if not 0 < step < win:
      raise ValueError(f"stride must be between 0 and the window ({window:.2f}s), got {stride}")
    keep = win - step
    first_prompt = None if prompt is None else prompt[..., :win]
    codes = self.generate(texts, window, settings, seed, first_prompt, melody(0.0), progress)
    i = 0
    while codes.shape[-1] < total:
      i += 1
      start = codes.shape[-1] - keep
      ctx = codes[..., start:]
      if prompt is not None and prompt.shape[-1] > start + keep:   # an audio prompt longer than a window
        ctx = prompt[..., start:start + win]
      new = self.generate(texts, window, settings, seed + i, ctx, melody(start / self.frame_rate),
                          progress)
      codes = np.concatenate([codes[..., :start + ctx.shape[-1]], new[..., ctx.shape[-1]:]], axis=-1)
    return codes[..., :total]

  # --- audio in and out ---------------------------------------------------------------------------
  @property
  def _codec_streams(self) -> int:
    """1 for mono models; 2 when the LM interleaves left/right codebooks of a mono codec (stereo)."""
    if self.codec is None:
      return 1
    return 2 if self.lm_cfg.num_codebooks == 2 * self.codec.num_codebooks else 1

  def _need_codec(self, what: str):
    if self.codec is None:
      raise ValueError(f"{what} needs a codec, and this model has none: use an imported checkpoint "
                       "(python -m musicgen_jax.convert)")

  def encode_audio_file(self, path: str) -> np.ndarray:
    """An audio file -> codes [1, K, T] at the model's frame rate (stereo models: interleaved L/R)."""
    from musicgen_jax import audio as audio_lib
    self._need_codec("--prompt-audio")
    wav, sr = audio_lib.read_audio(path)
    wav = audio_lib.resample(wav, sr, self.codec.sample_rate)
    streams = self._codec_streams
    wav = audio_lib.to_channels(wav, streams * self.codec.channels)
    n_q = self.lm_cfg.num_codebooks // streams
    encode = lambda x: np.asarray(self.codec.encode(self.params["codec"], jnp.asarray(x[None]), n_q))
    if streams == 1:
      return encode(wav)
    left, right = encode(wav[0:1]), encode(wav[1:2])   # the mono codec per channel
    out = np.empty((1, 2 * n_q, left.shape[-1]), left.dtype)
    out[:, 0::2], out[:, 1::2] = left, right
    return out

  def melody_chroma_file(self, path: str, batch: int) -> np.ndarray:
    """A melody file -> chroma [B, F, 12] of the whole file (argmax one-hot; silence -> null)."""
    from musicgen_jax import audio as audio_lib
    from musicgen_jax.conditioners import melody as melody_lib
    if not self.lm_cfg.melody:
      raise ValueError("--melody was given but this model is not melody-conditioned")
    wav, sr = audio_lib.read_audio(path)
    frames = melody_lib.num_chroma_frames(int(round(wav.shape[-1] * self.sample_rate / sr)))
    chroma = melody_lib.melody_condition(wav, sr, max(frames, 1), self.sample_rate)
    if not chroma.any():  # silent: the null chroma of the released models
      chroma[:, 0] = 1.0
    return np.repeat(chroma[None], batch, axis=0)

  def melody_window(self, chroma: np.ndarray, t0: float) -> np.ndarray:
    """The chroma_length frames starting at time t0 (s), tiled when the melody is shorter."""
    rate = self.sample_rate / 4096.0
    start = int(round(t0 * rate)) % chroma.shape[1]
    rolled = np.roll(chroma, -start, axis=1)
    reps = -(-self.lm_cfg.chroma_length // rolled.shape[1])
    return np.tile(rolled, (1, reps, 1))[:, :self.lm_cfg.chroma_length]

  def decode(self, codes: np.ndarray) -> np.ndarray | None:
    """Codes [B, K, T] -> audio float32 [B, C, N] through the codec, or None without one."""
    if self.codec is None:
      return None
    if self._codec_streams == 2:
      left = self.codec.decode(self.params["codec"], jnp.asarray(codes[:, 0::2]))
      right = self.codec.decode(self.params["codec"], jnp.asarray(codes[:, 1::2]))
      return np.concatenate([np.asarray(left), np.asarray(right)], axis=1)
    return np.asarray(self.codec.decode(self.params["codec"], jnp.asarray(codes)))

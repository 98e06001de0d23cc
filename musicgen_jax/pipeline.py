"""A whole MusicGen: text conditioner + LM + pattern (+ codec), built from a config or a model directory.

This is what sample.py drives; everything is checked before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import sys
import typing
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from musicgen_jax import checkpoint, lm as lm_lib, lm_decode, patterns, sampling
from musicgen_jax.conditioners import tempo
from musicgen_jax.conditioners.text import LearnedTextConditioner
from musicgen_jax.conditioners.tokenizer import TextTokenizer, read_tokenizer_file

PATTERN_OPTIONS = ("delays", "flattening", "group_by")
SEED_LIMIT = 2**32   # jax.random.key keeps 32 bits: larger seeds would alias smaller ones


def check_seed(seed) -> int:
  """The seed as an int; ValueError unless it is an integer in [0, 2**32)."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < SEED_LIMIT:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  return int(seed)


# Config fields a command line may change on a loaded model: they do not touch the weights' shapes.
SAMPLING_OVERRIDES = ("sampling.", "model.dtype")


def check_overrides(names: Sequence[str]) -> None:
  """ValueError naming the config fields (dotted) that cannot change a loaded model."""
  refused = [n for n in names if not any(n == o or (o.endswith(".") and n.startswith(o))
                                         for o in SAMPLING_OVERRIDES)]
  if refused:
    fields = ", ".join(f"--config.{n}" for n in refused)
    raise ValueError(f"{fields} cannot change a loaded checkpoint (the model directory fixes its "
                     "shape and training); only --config.sampling.* and --config.model.dtype apply")


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]):
  """A copy of `config` with {dotted field: value} set; ValueError for fields check_overrides refuses."""
  check_overrides(list(overrides))
  config = ml_collections.ConfigDict(config.to_dict())
  for name, value in overrides.items():
    *parents, leaf = name.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


class GenerationInterrupted(KeyboardInterrupt):
  """Ctrl-C during long-form generation after its first window: `codes` [B, K, T] are the windows
  finished by then (T frames, fewer than asked), so that a long run's work can still be written;
  `start`: the index of their first prompt among a run's (sample.py's batches)."""

  def __init__(self, codes: np.ndarray, start: int = 0):
    super().__init__()
    self.codes, self.start = codes, start


def window_seed(seed: int, window: int) -> int:
  """The seed of long-form window `window` (0: `seed` itself): distinct per (seed, window), in range."""
  if window == 0:
    return seed
  return int(np.random.SeedSequence([seed, window]).generate_state(1)[0])


def _ceil_frames(duration: float, frame_rate: float) -> int:
  """ceil(duration * frame_rate), ignoring float error (0.07 s at 100 Hz is 7 frames, not 8)."""
  return int(math.ceil(round(duration * frame_rate, 6)))


def lm_config(config: ml_collections.ConfigDict) -> lm_lib.LMConfig:
  """The LMConfig of `config.model`; ValueError naming a field whose value has the wrong type (a
  hand-edited musicgen_config.json: "dim": "big"), which LMConfig would meet as a bare TypeError."""
  kinds = {int: (numbers.Integral, "an integer"), float: (numbers.Real, "a number"),
           str: (str, "a string"), bool: (bool, "true or false")}
  for name, hint in typing.get_type_hints(lm_lib.LMConfig).items():
    value = config.model.get(name)
    optional = type(None) in typing.get_args(hint)
    want = next((t for t in (typing.get_args(hint) or (hint,)) if t in kinds), None)
    if want is None or name not in config.model or (optional and value is None):
      continue
    ok_type, what = kinds[want]
    if not isinstance(value, ok_type) or (want is not bool and isinstance(value, bool)):
      raise ValueError(f"model.{name} must be {what}{' or null' if optional else ''}, got {value!r}")
  return lm_lib.LMConfig.from_dict(config.model)


def pattern_from_config(config: ml_collections.ConfigDict):
  """The codebook pattern named by `config.pattern` with the options that are set."""
  opts = {k: config.pattern.get(k) for k in PATTERN_OPTIONS if config.pattern.get(k) is not None}
  return patterns.get_pattern(config.pattern.name, config.model.num_codebooks, **opts)


# config.text.tokenizer value: fit a word-level vocabulary on the training split's captions
# (conditioners/tokenizer.fit_word_tokenizer) when training starts.
WORD_TOKENIZER = "words"


def text_conditioner_from_config(config: ml_collections.ConfigDict, directory: str | None = None):
  """The text conditioner of `config.text` ('learned' or 't5'); tokenizer.json read from `directory`."""
  t = config.text
  tok_path = t.get("tokenizer") or None
  if directory and os.path.isfile(os.path.join(directory, checkpoint.TOKENIZER_FILE)):
    tok_path = os.path.join(directory, checkpoint.TOKENIZER_FILE)
  elif tok_path == WORD_TOKENIZER:
    raise ValueError(f"config.text.tokenizer={WORD_TOKENIZER!r} is a word vocabulary fitted on the "
                     "training captions when training starts, kept as tokenizer.json in the work "
                     f"directory: {f'{directory} has none' if directory else 'none was given'} "
                     "(pass the run's work directory or model directory)")
  if t.kind == "learned":
    return LearnedTextConditioner(TextTokenizer.from_file(tok_path), dim=t.dim,
                                  num_layers=t.num_layers, num_heads=t.num_heads,
                                  max_length=t.max_length)
  if t.kind == "t5":
    from musicgen_jax.conditioners.t5 import T5Conditioner, T5EncoderConfig
    if not tok_path:
      raise ValueError("config.text.kind is 't5' but no tokenizer.json was found: import a checkpoint "
                       "with `python -m musicgen_jax.convert`")
    return T5Conditioner(T5EncoderConfig.from_hf_dict(t.t5.to_dict()),
                         read_tokenizer_file(tok_path), max_length=t.max_length)
  raise ValueError(f"config.text.kind must be 'learned' or 't5', got {t.kind!r}")


def codec_from_config(config: ml_collections.ConfigDict):
  """The EnCodec model described by `config.codec.encodec` (an HF EncodecConfig dict), or None."""
  enc = config.codec.get("encodec")
  if not enc:
    return None
  from musicgen_jax.codec.encodec import EncodecConfig, EncodecModel
  return EncodecModel(EncodecConfig.from_hf_dict(enc.to_dict()))


def _host_available_bytes() -> int | None:
  """The host's available memory (Linux MemAvailable: free memory plus what the kernel can reclaim),
  else the free pages; None when the system tells neither."""
  try:
    with open("/proc/meminfo", encoding="ascii") as fh:
      for line in fh:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
  except (AttributeError, OSError, ValueError):
    return None


HOST_RESERVE = (2 * 2**30, 0.1)   # bytes, share: what CPU runs keep back for compiling and the rest


def free_device_bytes() -> int | None:
  """Free memory per local device: on GPUs / TPUs that of the fullest device (bytes_limit -
  bytes_in_use); on CPUs the host's available memory less HOST_RESERVE (the larger of 2 GiB and 10%:
  XLA's compiler and the process's other arrays, which the estimates do not count: the small
  MusicGen's CPU decode grew the process by up to 2.0 GB more than them, docs/BENCHMARKS.md), shared
  by the CPU devices; None when unknown."""
  devices = jax.local_devices()
  if all(d.platform == "cpu" for d in devices):
    host = _host_available_bytes()
    if host is None:
      return None
    return max(0, host - max(HOST_RESERVE[0], int(HOST_RESERVE[1] * host))) // len(devices)
  stats = [d.memory_stats() for d in devices]
  if any(not st or "bytes_limit" not in st for st in stats):
    return None
  return min(int(st["bytes_limit"]) - int(st.get("bytes_in_use", 0)) for st in stats)


def param_shapes(config: ml_collections.ConfigDict, text) -> dict[str, Any]:
  """{'lm', 'text'}: the ShapeDtypeStructs of the parameters `config` (and its text conditioner)
  make, from tracing the initialisers (nothing is computed)."""
  lm_cfg = lm_config(config)

  def init(key):
    k1, k2 = jax.random.split(key)
    return {"lm": nn.unbox(lm_lib.init_params(lm_cfg, k1))["params"],
            "text": nn.unbox(text.init(k2))}
  return jax.eval_shape(init, jax.random.key(0))


def check_params(config: ml_collections.ConfigDict, params: dict[str, Any], text,
                 directory: str) -> None:
  """CheckpointError (one line) when the LM and text weights of a model directory are not the ones
  its config makes: a parameter missing, extra, or of another shape (a config edited by hand, or
  taken from another model), which would otherwise fail deep in the sampler or run wrong."""
  try:
    expected = param_shapes(config, text)
  except (TypeError, ValueError) as e:
    raise checkpoint.CheckpointError(
        f"{directory}: its {checkpoint.CONFIG_FILE} does not describe a model "
        f"({' '.join(str(e).split())}): restore the file or export the model again") from None
  for part in ("lm", "text"):
    if part not in params:
      continue
    want = {jax.tree_util.keystr(p): x.shape
            for p, x in jax.tree_util.tree_flatten_with_path(expected[part])[0]}
    got = {jax.tree_util.keystr(p): np.shape(x)
           for p, x in jax.tree_util.tree_flatten_with_path(params[part])[0]}
    for name in sorted(set(want) | set(got)):
      if want.get(name) != got.get(name):
        what = ("is missing" if name not in got else "is not made by the config" if name not in want
                else f"has shape {got[name]}, the config makes {want[name]}")
        raise checkpoint.CheckpointError(
            f"{directory}: the weights do not fit its {checkpoint.CONFIG_FILE}: {part}{name} "
            f"{what}; the config and the weights come from different models")


@dataclasses.dataclass
class MusicGen:
  config: ml_collections.ConfigDict
  params: dict[str, Any]            # {'lm', 'text', ['codec']}, unboxed
  text: Any                         # a TextConditioner
  codec: Any = None                 # an EncodecModel or None
  mesh: jax.sharding.Mesh | None = None   # sample across these devices (None: the default device)

  def __post_init__(self):
    self.lm_cfg = lm_config(self.config)
    if self.prefix_padding not in ("max_length", "longest"):
      raise ValueError(f"text.prefix_padding must be 'max_length' or 'longest', got "
                       f"{self.prefix_padding!r}")
    self.pattern = pattern_from_config(self.config)
    self._encode_text = jax.jit(self.text.encode)
    self._frame_nll = None   # built by frame_nll on first use
    if self.codec is not None:
      self._codec_decode = jax.jit(self.codec.decode)
      self._codec_programs: dict[tuple[int, ...], Any] = {}   # compiled decodes, per codes shape
      self._codec_encode = jax.jit(self.codec.encode, static_argnums=2)

  # --- construction -----------------------------------------------------------------------------
  @classmethod
  def random(cls, config: ml_collections.ConfigDict, seed: int = 0, text=None) -> "MusicGen":
    """A model with random weights (tests, smoke runs): N(0, 0.02) noise, LayerNorms at identity.

    `text`: the text conditioner (e.g. a trained model's, whose word vocabulary lives in its
    directory); default: built from config.text. The shapes come from tracing the initialisers
    (jax.eval_shape), the values from numpy: nothing is compiled.
    """
    pattern_from_config(config)  # fail on a bad pattern before anything is initialised
    text = text if text is not None else text_conditioner_from_config(config)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
      name = "/".join(str(getattr(p, "key", p)) for p in path)
      if "norm" in name and name.endswith(("scale", "weight")):
        return np.ones(leaf.shape, leaf.dtype)
      if name.endswith("bias"):
        return np.zeros(leaf.shape, leaf.dtype)
      return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    params = jax.tree_util.tree_map_with_path(fill, param_shapes(config, text))
    return cls(config, params, text, codec_from_config(config))

  @classmethod
  def load(cls, directory: str, verify: bool = True, overrides: dict[str, Any] | None = None,
           mesh: jax.sharding.Mesh | None = None) -> "MusicGen":
    """From a model directory (export, import or training run); CheckpointError if unusable or
    damaged (`verify=False` checks file sizes but not checksums). `overrides` ({'sampling.top_k': 50,
    'model.dtype': 'bfloat16'}) change the loaded config where that cannot break the weights. The
    weights go straight to the devices (replicated over `mesh` when given)."""
    check_overrides(list(overrides or {}))
    sharding = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    config, params = checkpoint.load_model(directory, verify=verify, sharding=sharding)
    config = apply_overrides(config, overrides or {})
    text = text_conditioner_from_config(config, directory)
    check_params(config, params, text, directory)
    return cls(config, params, text, codec_from_config(config), mesh)

  def save(self, directory: str, overwrite: bool = False) -> None:
    """Writes a model directory (an existing one is replaced only with overwrite=True)."""
    checkpoint.save_model(directory, self.config, self.params,
                          tokenizer_file=self.config.text.get("tokenizer") or None, overwrite=overwrite)

  # --- geometry ---------------------------------------------------------------------------------
  @property
  def frame_rate(self) -> float:
    return float(self.config.codec.frame_rate)

  @property
  def sample_rate(self) -> int:
    return int(self.config.codec.sample_rate)

  @property
  def prefix_padding(self) -> str:
    """How a text prefix is padded: 'max_length' (as this project trains) or 'longest' (imported
    models, and model directories written before the field existed)."""
    return self.config.text.get("prefix_padding", "longest")

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

  def long_form_plan(self, duration: float, stride: float | None = None) -> tuple[int, float, float]:
    """(windows, window seconds, stride seconds) that generate_long uses for `duration` seconds."""
    window = self.max_duration()
    if duration <= window:
      return 1, duration, duration
    win = self.frames_for(window)
    step = int(round((stride if stride is not None else window / 2) * self.frame_rate))
    total = _ceil_frames(duration, self.frame_rate)
    return 1 + max(0, -(-(total - win) // max(step, 1))), window, step / self.frame_rate

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
  def conditions(self, texts: Sequence[str], chroma: np.ndarray | None = None,
                 start_frame: int = 0, beat_phase=0.0) -> lm_lib.Conditions:
    """Text (and melody chroma [B, frames, 12]) -> Conditions for the LM. Beat-clock models also get
    the tempo each text names, at beat phase `beat_phase` (default: on a beat; [B] or a number)
    `start_frame` frames before the first (conditioners/tempo.py; long-form windows after the first
    pass how far in they start)."""
    batch = {k: jnp.asarray(v) for k, v in self.text.tokenize(list(texts)).items()}
    hidden, mask = self._encode_text(self.params["text"], batch)
    empty = np.array([not t.strip() for t in texts])
    if empty.any():   # an empty prompt is the null text condition: unconditional sampling
      keep = jnp.asarray(~empty)
      hidden = jnp.where(keep[:, None, None], hidden, jnp.zeros_like(hidden))
      mask = jnp.where(keep[:, None], mask, jnp.zeros_like(mask))
    if self.lm_cfg.text_conditioning == "prefix" and self.prefix_padding == "longest":
      # A text prefix is attended without a mask (as in the reference), so its length moves every
      # position: models trained on the batch's longest caption (padding=True tokenization, the
      # imported ones) see only up to the longest prompt. Models trained here saw max_length.
      n = max(int(np.asarray(mask).sum(axis=1).max()), 1)
      hidden, mask = hidden[:, :n], mask[:, :n]
    melody = None
    if self.lm_cfg.melody:
      if chroma is None:   # no melody given: the null chroma of the released models
        from musicgen_jax.conditioners import melody as melody_lib
        chroma = melody_lib.null_chroma(len(texts), self.lm_cfg.chroma_length, self.lm_cfg.num_chroma)
      # Tiled / cut to chroma_length frames, as the reference does with a shorter or longer melody.
      melody = jnp.asarray(self.melody_window(np.asarray(chroma), 0.0), jnp.float32)
    beat = None
    if self.lm_cfg.beat_clock_rate:
      beat = jnp.asarray(tempo.sampling_beat(texts, start_frame, self.lm_cfg.beat_clock_rate,
                                             beat_phase))
    return lm_lib.Conditions(text=hidden, text_mask=mask, melody=melody, beat=beat)

  def generate(self, texts: Sequence[str], duration: float,
               settings: sampling.SamplingSettings | None = None, seed: int = 0,
               prompt: np.ndarray | None = None, chroma: np.ndarray | None = None,
               progress: Callable[[int, int], None] | None = None, start_frame: int = 0
               ) -> np.ndarray:
    """-> codes int32 [B, K, T] for T = ceil(duration * frame_rate). `start_frame`: where the output
    (its prompt included) starts in a longer piece (long-form windows; the beat clock's phase).
    `settings`: default the model's (its config's `sampling` section)."""
    settings = self.sampling_settings(settings)
    seed = check_seed(seed)
    frames = self.frames_for(duration)
    if prompt is not None and prompt.shape[-1] > frames:
      raise ValueError(f"the prompt has {prompt.shape[-1]} frames, more than the {frames} requested: "
                       "ask for a longer duration")
    conds = self.conditions(texts, chroma, start_frame)
    codes = sampling.generate({"params": self.params["lm"]}, self.lm_cfg, self.pattern, conds, frames,
                              seed=seed, settings=settings,
                              prompt=None if prompt is None else jnp.asarray(prompt), progress=progress,
                              **({} if self.mesh is None else {"mesh": self.mesh, "rules": self._rules}))
    return np.asarray(codes)

  def frame_nll(self, codes: np.ndarray, texts: Sequence[str],
                chroma: np.ndarray | None = None, beat_phase=0.0) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced -log p of codes [B, K, T] given texts (and melody chroma), per frame ->
    (nll float64 [B, T]: summed over the codebooks the pattern predicts at that frame, tokens
    int [T]: how many that is), under the conditions sampling uses (the same text padding, null
    text for '', melody window; for beat-clock models the recording's beat phase at its first
    frame, [B] or a number). token_ce averages it."""
    codes = jnp.asarray(codes, jnp.int32)
    if codes.ndim != 3 or codes.shape[1] != self.lm_cfg.num_codebooks or codes.shape[0] != len(texts):
      raise ValueError(f"codes must be [B={len(texts)}, K={self.lm_cfg.num_codebooks}, T], got "
                       f"{tuple(codes.shape)}")
    if self._frame_nll is None:
      model = lm_lib.MusicGenLM(self.lm_cfg, deterministic=True)

      def nll(params, codes_bkt, conds):
        steps = self.pattern.build(codes_bkt, self.lm_cfg.special_token)
        logits = model.apply({"params": params}, steps, conds)
        logits_bktc, mask_kt = self.pattern.revert_logits(logits, codes_bkt.shape[-1])
        nll_bkt = -jnp.take_along_axis(jax.nn.log_softmax(logits_bktc.astype(jnp.float32)),
                                       codes_bkt[..., None], axis=-1)[..., 0]
        w_kt = jnp.asarray(mask_kt, jnp.float32)
        return jnp.sum(nll_bkt * w_kt[None], axis=1), jnp.sum(w_kt, axis=0)
      self._frame_nll = jax.jit(nll)
    nll_bt, tokens_t = self._frame_nll(self.params["lm"], codes,
                                       self.conditions(texts, chroma, beat_phase=beat_phase))
    return np.asarray(nll_bt, np.float64), np.asarray(tokens_t).astype(np.int64)

  def token_ce(self, codes: np.ndarray, texts: Sequence[str], chroma: np.ndarray | None = None,
               frames: int | None = None) -> np.ndarray:
    """Teacher-forced cross-entropy of codes [B, K, T] given texts (and melody chroma) -> float [B].

    The mean over the codebooks and the pattern's valid positions of -log p(token), in nats (see
    frame_nll): how likely the model finds these codes after this prompt. Comparing a recording's
    CE under its own caption with its CE under an altered one measures whether the model uses what
    was altered. `frames` counts only the first frames (where the prompt is all the model has to
    go on).
    """
    nll_bt, tokens_t = self.frame_nll(codes, texts, chroma)
    f = nll_bt.shape[1] if frames is None else max(1, min(int(frames), nll_bt.shape[1]))
    return nll_bt[:, :f].sum(axis=1) / max(int(tokens_t[:f].sum()), 1)

  def decode_need(self, batch: int, duration: float,
                  settings: sampling.SamplingSettings | None = None) -> dict[str, int]:
    """Bytes per device that decoding `batch` prompts of `duration` seconds (one window at most)
    adds to the stored parameters: lm_decode.decode_bytes, the batch split over the mesh's data
    axes. Nothing is compiled."""
    settings = self.sampling_settings(settings)
    c = self.lm_cfg
    frames = self.frames_for(min(duration, self.max_duration()))
    text_len = int(self.config.text.max_length)
    rows = -(-batch * self._rows_per_prompt(settings) // self._data_shards)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params["lm"]))
    return lm_decode.decode_bytes(c, num_params, rows,
                                  self.prefix_length(text_len) + self.pattern.num_steps(frames),
                                  text_len)

  def sampling_settings(self, settings: sampling.SamplingSettings | None = None,
                        **overrides) -> sampling.SamplingSettings:
    """`settings`, else the model's (its config's `sampling` section) with `overrides` (e.g. top_k=50)."""
    if settings is not None:
      return settings
    return sampling.SamplingSettings.from_config(self.config.sampling.to_dict(), **overrides)

  @staticmethod
  def _rows_per_prompt(settings: sampling.SamplingSettings) -> int:
    return 2 if settings.cfg_coef != 1.0 and settings.cfg_mode == "batch" else 1

  @property
  def _data_shards(self) -> int:
    """How many ways the mesh splits the batch (of the LM's decode and of the codec) under the rules."""
    if self.mesh is None:
      return 1
    from musicgen_jax import sharding
    return sharding.data_parallel_size(self.mesh, self._mesh_rules)

  def max_batch(self, duration: float,
                settings: sampling.SamplingSettings | None = None,
                free_bytes: int | None = None) -> int | None:
    """The most prompts (a multiple of the data shards) whose decoding fits in `free_bytes` per
    device (default: what is free now); 0 when not even one does; None when the memory is unknown."""
    free_bytes = free_device_bytes() if free_bytes is None else free_bytes
    if free_bytes is None:
      return None
    fits = lambda b: self.decode_need(b, duration, settings)["total"] <= free_bytes
    shards = self._data_shards
    if not fits(shards):
      return 0
    lo, hi = 1, 2                        # in units of `shards` prompts: fits(lo), then find a miss
    while fits(hi * shards) and hi < 2**24:
      lo, hi = hi, hi * 2
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if fits(mid * shards) else (lo, mid)
    return lo * shards

  def check_memory(self, batch: int, duration: float,
                   settings: sampling.SamplingSettings | None = None,
                   free_bytes: int | None = None) -> dict[str, int] | None:
    """Refuses, before anything compiles, a batch whose decoding would not fit in memory: ValueError
    with the estimated need per device (decode_need) and the free memory (free_device_bytes: the
    fullest accelerator, or the host's available memory on CPUs) and the most prompts that fit.
    -> the estimate, or None when the free memory is unknown."""
    free_bytes = free_device_bytes() if free_bytes is None else free_bytes
    if free_bytes is None:
      return None
    need = self.decode_need(batch, duration, settings)
    if need["total"] > free_bytes:
      gib = lambda b: f"{b / 2**30:.2f} GiB"
      frames = self.frames_for(min(duration, self.max_duration()))
      fit = self.max_batch(duration, settings, free_bytes)
      remedy = (f"pass --batch-size {fit} (prompts per call)" if fit else
                "this model does not fit even for one prompt: use a device with more memory")
      raise ValueError(
          f"decoding {batch} prompt(s) of {frames / self.frame_rate:.1f}s needs about "
          f"{gib(need['total'])} per device (KV caches {gib(need['caches'])}, serving weights "
          f"{gib(need['weights'])}) but {gib(free_bytes)} is free: {remedy}, or a shorter "
          "--duration (longer ones run in windows), --cfg-mode two_pass, or more devices")
    return need

  # --- long-form ----------------------------------------------------------------------------------
  def generate_long(self, texts: Sequence[str], duration: float,
                    settings: sampling.SamplingSettings | None = None, seed: int = 0,
                    prompt: np.ndarray | None = None, chroma: np.ndarray | None = None,
                    stride: float | None = None,
                    progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Any duration: one window when it fits the model's positions, else windowed extension.

    Each further window keeps the last (window - stride) seconds as its prompt and adds `stride`
    seconds (default half a window); the melody chroma [B, F, 12] (at its own frame rate) is re-indexed
    to each window's start. Every window after the first has the same shapes: one more compilation.
    An audio prompt [B, K, P] that fills the window is cut to its last (window - stride) seconds, with
    a warning; the output starts with the part kept. Ctrl-C after the first window raises
    GenerationInterrupted with the windows finished.
    """
    if not (duration > 0 and math.isfinite(duration)):
      raise ValueError(f"duration must be a finite number of seconds > 0, got {duration}")
    settings = self.sampling_settings(settings)
    seed = check_seed(seed)
    window = self.max_duration()
    total = _ceil_frames(duration, self.frame_rate)
    melody = lambda t0: None if chroma is None else self.melody_window(chroma, t0)
    if duration <= window:
      return self.generate(texts, duration, settings, seed, prompt, melody(0.0), progress)
    win = self.frames_for(window)
    if stride is not None and not (stride > 0 and math.isfinite(stride)):
      raise ValueError(f"stride must be a finite number of seconds > 0, got {stride}")
    step = int(round((stride if stride is not None else window / 2) * self.frame_rate))
    if not 0 < step < win:
      raise ValueError(f"stride must be between 0 and the window ({window:.2f}s), got {stride}")
    keep = win - step
    if prompt is not None and prompt.shape[-1] >= win:
      print(f"warning: the audio prompt ({prompt.shape[-1] / self.frame_rate:.2f}s) fills this "
            f"model's window ({window:.2f}s): only its last {keep / self.frame_rate:.2f}s are kept "
            "and continued", file=sys.stderr)
      prompt = prompt[..., -keep:]
    codes = self.generate(texts, window, settings, seed, prompt, melody(0.0), progress)
    i = 0
    try:
      while codes.shape[-1] < total:      # each window adds `step` > 0 frames
        i += 1
        start = codes.shape[-1] - keep
        new = self.generate(texts, window, settings, window_seed(seed, i), codes[..., start:],
                            melody(start / self.frame_rate), progress, start_frame=start)
        codes = np.concatenate([codes, new[..., keep:]], axis=-1)
    except KeyboardInterrupt:
      raise GenerationInterrupted(codes[..., :total]) from None
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
    return self.encode_audio(audio_lib.resample(wav, sr, self.codec.sample_rate)[None])

  def encode_audio(self, audio: np.ndarray) -> np.ndarray:
    """Audio float [B, C, N] at the codec's sample rate -> codes [B, K, T] at the model's frame
    rate: channels mixed down or duplicated to what the model takes; stereo models (two streams of
    a mono codec) get their left / right codebooks interleaved."""
    from musicgen_jax import audio as audio_lib
    self._need_codec("encoding audio")
    streams = self._codec_streams
    wav = np.stack([audio_lib.to_channels(a, streams * self.codec.channels) for a in audio])
    n_q = self.lm_cfg.num_codebooks // streams
    encode = lambda x: np.asarray(self._codec_encode(self.params["codec"], jnp.asarray(x), n_q))
    if streams == 1:
      return encode(wav)
    left, right = encode(wav[:, 0:1]), encode(wav[:, 1:2])   # the mono codec per channel
    out = np.empty((len(wav), 2 * n_q, left.shape[-1]), left.dtype)
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
    chroma = melody_lib.melody_condition(wav, sr, max(frames, 1), self.sample_rate)  # silence: null
    return np.repeat(chroma[None], batch, axis=0)

  def melody_window(self, chroma: np.ndarray, t0: float) -> np.ndarray:
    """The chroma_length frames starting at time t0 (s), tiled when the melody is shorter."""
    rate = self.sample_rate / 4096.0
    start = int(round(t0 * rate)) % chroma.shape[1]
    rolled = np.roll(chroma, -start, axis=1)
    reps = -(-self.lm_cfg.chroma_length // rolled.shape[1])
    return np.tile(rolled, (1, reps, 1))[:, :self.lm_cfg.chroma_length]

  @property
  def _rules(self):
    from musicgen_jax import sharding
    rules = self.config.get("logical_axis_rules")
    return None if rules is None else sharding.rules_from_config(rules)

  @property
  def _mesh_rules(self):
    """The config's rules, else the library's (what the sampler falls back on too)."""
    from musicgen_jax import sharding
    return self._rules or sharding.rules_from_config(sharding.DEFAULT_RULES)

  def decode(self, codes: np.ndarray, chunk_seconds: float = 30.0,
             context_seconds: float = 2.0) -> np.ndarray | None:
    """Codes [B, K, T] -> audio float32 [B, C, N] through the codec, or None without one.

    Audio up to `chunk_seconds` is decoded in one call, as the reference does. Longer audio is decoded
    in chunks of that length (one compiled shape, bounded memory), each with `context_seconds` of codes
    on both sides that are decoded and dropped: the decoder's LSTM and convolutions see what came
    before, so the seams match a whole decode closely (not bit for bit).
    """
    if self.codec is None:
      return None
    streams = [codes[:, 0::2], codes[:, 1::2]] if self._codec_streams == 2 else [codes]
    out = [self._decode_chunked(np.asarray(c), chunk_seconds, context_seconds) for c in streams]
    return out[0] if len(out) == 1 else np.concatenate(out, axis=1)

  def _codes_sharding(self):
    """Codes [B, K, T] split by rows over the mesh's batch axes (None without a mesh)."""
    if self.mesh is None:
      return None
    from musicgen_jax import sharding
    return sharding.batch_sharding(self.mesh, self._mesh_rules, 3)

  def _codec_program(self, shape: tuple[int, ...]):
    """The codec's decode compiled for codes of `shape` (kept per shape), their rows split over the
    mesh's batch axes."""
    if shape not in self._codec_programs:
      codes = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self._codes_sharding())
      self._codec_programs[shape] = self._codec_decode.lower(self.params["codec"], codes).compile()
    return self._codec_programs[shape]

  def codec_rows(self, shape: tuple[int, ...], free_bytes: int | None = None) -> int:
    """How many rows of codes of `shape` [B, K, T] (B a multiple of _data_shards) one codec call
    decodes: all of them when the compiled decode's buffers per device (temporaries and output, from
    XLA's memory analysis) fit in the free memory (free_device_bytes), else as many as fit, a multiple
    of the row shards; ValueError when not even one row per device does."""
    free_bytes = free_device_bytes() if free_bytes is None else free_bytes
    batch, frames = shape[0], shape[-1]
    shards = self._data_shards
    analysis = self._codec_program(tuple(shape)).memory_analysis()
    if free_bytes is None or analysis is None:
      return batch
    need = int(analysis.temp_size_in_bytes) + int(analysis.output_size_in_bytes)   # per device
    if need <= free_bytes:
      return batch
    per_row = -(-need // (batch // shards))
    rows = int(free_bytes // per_row) * shards
    if rows < 1:
      raise ValueError(f"decoding the audio of one prompt needs about {per_row / 2**30:.2f} GiB "
                       f"({frames / self.frame_rate:.1f}s at a time) but {free_bytes / 2**30:.2f} GiB "
                       "is free: free some memory, or sample a shorter --duration")
    return rows

  def _decode_chunked(self, codes_bkt: np.ndarray, chunk_seconds: float,
                      context_seconds: float) -> np.ndarray:
    """Time chunks of `chunk_seconds` (with context), each in row groups that fit in memory, split
    over the mesh's batch axes (the rows padded, so that one compiled shape serves all)."""
    rows = None
    shards = self._data_shards

    def decode(c):
      nonlocal rows
      c = np.asarray(c, np.int32)
      rows = rows or self.codec_rows((-(-c.shape[0] // shards) * shards,) + c.shape[1:])
      program = self._codec_program((rows,) + c.shape[1:])
      place = program.input_shardings[0][1]
      out = []
      for a in range(0, c.shape[0], rows):
        part = c[a:a + rows]
        if part.shape[0] < rows:
          part = np.concatenate([part, np.repeat(part[-1:], rows - part.shape[0], axis=0)])
        out.append(np.asarray(program(self.params["codec"], jax.device_put(part, place))))
      return np.concatenate(out)[:c.shape[0]]

    total = codes_bkt.shape[-1]
    length = max(1, int(round(chunk_seconds * self.frame_rate)))
    ctx = min(int(round(context_seconds * self.frame_rate)), (length - 1) // 2)
    if total <= length:
      return decode(codes_bkt)
    hop = self.codec.config.hop_length
    core = length - 2 * ctx                 # frames each chunk contributes
    pieces = []
    for a in range(0, total, core):
      b = min(a + core, total)
      start = min(max(a - ctx, 0), total - length)
      audio = decode(codes_bkt[..., start:start + length])   # [B, C, length * hop]
      pieces.append(audio[..., (a - start) * hop:(b - start) * hop])
    return np.concatenate(pieces, axis=-1)

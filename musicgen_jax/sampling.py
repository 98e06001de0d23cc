"""The compiled sampler: one jit-compiled call generates all pattern steps.

    stored weights -> serving layout, made once (lm_decode.py) -> conditions projected once ->
    cross-attention K/V once -> prefill (prefix + the steps the pattern or the prompt already fixes)
    -> one step scan per segment of steps, with KV caches sized to the positions that segment reaches
    (grown between segments), so a step reads about the filled part of the cache:
        logits -> classifier-free guidance -> temperature / top-k / top-p (or greedy) -> token
        -> force pattern-empty slots to the special token and prompt slots to the prompt
        -> one decode step (a plain loop over the layers, per-layer caches updated in place)
    -> steps [B, K, S] -> pattern.revert -> codes [B, K, T].

Shapes (batch, length, prompt length, top-k, pattern, CFG mode, segments) are static: one compilation
serves every call with the same shapes. Values (seed, temperature, top-p, CFG coefficient, the weights)
are traced.

Across devices (`mesh`): the batch is split over the data axes and the weights over the tensor axis by
the same logical-axis rules as training; the KV caches carry the CACHE_* names of sharding.py. A batch
the data axes do not divide is padded (with a note) and cut back. With classifier-free guidance in one
batch, each example's conditional and unconditional rows sit side by side, so guidance needs no
communication between devices.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from musicgen_jax import lm as lm_lib
from musicgen_jax import lm_decode
from musicgen_jax import sharding as shd
from musicgen_jax.conditioners import dropout as dropout_lib
from musicgen_jax.conditioners import melody as melody_lib

CFG_MODES = ("batch", "two_pass", "none")
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """Validated sampling settings, and the one home of their defaults (a config's `sampling` section
  overrides them, see `from_config`). `top_k` and `cfg_mode` are static; the rest are traced."""
  temperature: float = 1.0
  top_k: int = 250
  top_p: float = 0.0
  cfg_coef: float = 3.0
  cfg_mode: str = "batch"

  def __post_init__(self):
    check_settings(self.temperature, self.top_k, self.top_p, self.cfg_coef, self.cfg_mode)

  @classmethod
  def from_config(cls, section: Mapping[str, Any] | None = None, **overrides) -> "SamplingSettings":
    """Defaults <- a config's `sampling` section (other keys, e.g. duration, ignored; the pre-rename
    key `cfg` read as `cfg_coef`) <- overrides (e.g. command-line flags; None values ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = dict(section or {})
    if "cfg" in values and "cfg_coef" not in values:
      values["cfg_coef"] = values.pop("cfg")
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(overrides) - names)
    if unknown:
      raise ValueError(f"unknown sampling settings {unknown}; known: {sorted(names)}")
    return cls(**{k: v for k, v in values.items() if k in names})


def sampling_defaults(duration: float = 10.0) -> dict[str, Any]:
  """A config's `sampling` section: the duration in seconds and SamplingSettings' defaults."""
  return dict(duration=duration, **dataclasses.asdict(SamplingSettings()))


def check_settings(temperature: float, top_k: int, top_p: float, cfg_coef: float, cfg_mode: str) -> None:
  """Raises ValueError with one clear line for settings that cannot work."""
  if not isinstance(top_k, (int, np.integer)) or top_k <= 0:
    raise ValueError(f"top-k must be a positive integer (1 = greedy), got {top_k!r}")
  if not 0.0 <= top_p <= 1.0:
    raise ValueError(f"top-p must be in [0, 1] (0 disables it), got {top_p!r}")
  if not 0 <= temperature < float("inf"):   # NaN fails every comparison
    raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
  if cfg_mode not in CFG_MODES:
    raise ValueError(f"cfg mode must be one of {CFG_MODES}, got {cfg_mode!r}")
  if not 0 <= cfg_coef < float("inf"):
    raise ValueError(f"cfg coefficient must be a finite number >= 0, got {cfg_coef!r}")


def sample_tokens(logits_bkc: jax.Array, rng: jax.Array, temperature, top_k: int, top_p,
                  use_top_p: bool) -> jax.Array:
  """Samples [B, K] int32 from logits [B, K, card] (float32).

  Temperature 0 is greedy. Top-k keeps the k largest logits (k static); top-p then keeps the smallest
  prefix of them, by descending probability, whose mass reaches p (p traced; 0 or 1 keeps all).
  """
  greedy = jnp.argmax(logits_bkc, axis=-1).astype(jnp.int32)
  k = min(top_k, logits_bkc.shape[-1])
  vals, idx = jax.lax.top_k(logits_bkc, k)                   # sorted descending, [B, K, k]
  scaled = vals / jnp.maximum(temperature, 1e-6)
  if use_top_p:
    probs = jax.nn.softmax(scaled, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    drop = (mass_before >= top_p) & (top_p > 0)
    drop = drop.at[..., 0].set(False)
    scaled = jnp.where(drop, -jnp.inf, scaled)
  choice = jax.random.categorical(rng, scaled, axis=-1)
  sampled = jnp.take_along_axis(idx, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def null_conditions(conds: lm_lib.Conditions) -> lm_lib.Conditions:
  """The unconditional input of the released models: the null text condition (zero states, zero mask;
  conditioners/dropout.py), for melody models the null chroma (conditioners/melody.py), and no
  tempo (bpm 0: a silent beat clock, conditioners/tempo.py)."""
  text = mask = melody = None
  if conds.text is not None:
    mask = conds.text_mask if conds.text_mask is not None else jnp.ones(conds.text.shape[:2], jnp.int32)
    text, mask = dropout_lib.null_condition_like(conds.text, mask)
  if conds.melody is not None:
    melody = jnp.asarray(melody_lib.null_chroma(*conds.melody.shape), conds.melody.dtype)
  beat = None if conds.beat is None else jnp.zeros_like(conds.beat)
  return lm_lib.Conditions(text=text, text_mask=mask, melody=melody, beat=beat)


def _pair_rows(a: lm_lib.Conditions, b: lm_lib.Conditions) -> lm_lib.Conditions:
  """[a0, b0, a1, b1, ...] along the batch: each example's two rows stay on one device."""
  return jax.tree.map(lambda x, y: jnp.stack([x, y], axis=1).reshape((-1,) + x.shape[1:]), a, b)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static schedule for one (pattern, T, prompt length)."""
  num_steps: int          # S
  first_free: int         # first step with a slot to sample (prefill covers steps < first_free)
  empty_ks: np.ndarray    # bool [K, S]: slot holds the special token
  known_ks: np.ndarray    # bool [K, S]: slot holds a prompt timestep

  @staticmethod
  def make(pattern, num_timesteps: int, prompt_len: int) -> "_Plan":
    layout = np.asarray(pattern.layout(num_timesteps))       # [K, S], -1 = empty
    empty = layout < 0
    known = (~empty) & (layout < prompt_len)
    free = ~(empty | known)
    free[:, 0] = False
    steps = np.nonzero(free.any(axis=0))[0]
    first = int(steps[0]) if len(steps) else layout.shape[1]
    return _Plan(layout.shape[1], max(first, 1), empty, known)


def auto_segments(num_scanned_steps: int, rows: int | None = None, dim: int | None = None,
                  backend: str | None = None) -> int:
  """How many segments to cut the step scan into. Each segment compiles the step once more; with n
  segments attention reads (n + 1) / 2n of the cache on average instead of all of it. One on CPU
  (compile time matters more there than cache reads) and for short runs (under 384 steps); else, with
  the batch rows (CFG included) and model width known, by how the KV cache read at the last step
  (2 rows S D per layer) compares with the weights read per step (about 14 D^2 per layer): 1 while
  the cache is smaller, 2 up to 4x, then 4. Without them, one per 384 steps, at most 4.
  """
  backend = backend or jax.default_backend()
  if backend == "cpu" or num_scanned_steps < 384:
    return 1
  if rows is None or dim is None:
    return int(min(4, num_scanned_steps // 384))
  ratio = 2 * rows * num_scanned_steps / (14 * dim)
  return 1 if ratio < 1 else (2 if ratio < 4 else 4)


def segment_bounds(start: int, end: int, segments: int) -> list[tuple[int, int]]:
  """[start, end) cut into `segments` nearly equal, non-empty consecutive ranges."""
  n = max(1, min(segments, end - start))
  cuts = [start + (end - start) * i // n for i in range(n + 1)]
  return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _constrainer(mesh: Mesh | None, rules) -> Callable[[jax.Array, tuple], jax.Array]:
  """x, logical axis names -> x constrained to its sharding on `mesh` (identity without a mesh)."""
  if mesh is None:
    return lambda x, axes: x
  return lambda x, axes: jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), rules)))


_CACHE_AXES = (shd.CACHE_BATCH, shd.CACHE_HEADS, shd.CACHE_SEQUENCE, shd.CACHE_KV)


@flax.struct.dataclass
class DecodeState:
  """What the step loop carries between compiled chunks of `ChunkedGenerate` (device arrays)."""
  weights: Any                # lm_decode serving weights
  prepared: Any               # per pass: (CondTensors, cross-attention K/V)
  seq: jax.Array              # [B, K, S] int32, the pattern sequence so far
  caches: Any                 # per pass: per-layer (k, v)
  logits: jax.Array | None    # [B, K, card] float32, for the next step
  rng: jax.Array
  temperature: jax.Array
  top_p: jax.Array
  cfg_coef: jax.Array

  @property
  def prefix_len(self) -> int:
    prefix = self.prepared[0][0].prefix
    return 0 if prefix is None else prefix.shape[1]


@dataclasses.dataclass(frozen=True)
class _Stages:
  """The generate program cut into stages: start (serving weights, conditions, prefill) -> per segment
  grow (the caches to the segment's length) + steps -> finish (the last step's token)."""
  start: Callable          # (params, conds, prompt, rng, temperature, top_p, cfg_coef) -> DecodeState
  grow: Callable           # (state, length) -> state
  scan_steps: Callable     # (state, a, e), static a < e -> state after steps a..e-1
  loop_steps: Callable     # (state, lo, hi), traced -> the same, for any range of one segment
  finish: Callable         # state -> seq [B, K, S]
  bounds: tuple            # segments [(a, e)] of the scanned steps
  first_free: int
  num_steps: int

  def lengths(self, prefix_len: int) -> list[int]:
    """Cache length of each segment: segment [a, e) writes positions up to prefix_len + e - 1."""
    return [prefix_len + e for _, e in self.bounds] or [prefix_len + self.first_free]


def _stages(cfg: lm_lib.LMConfig, pattern, num_timesteps: int, prompt_len: int, top_k: int,
            use_top_p: bool, cfg_mode: str, segments: int | None, mesh: Mesh | None,
            rules) -> _Stages:
  rules = shd.DEFAULT_RULES if rules is None else rules
  constrain = _constrainer(mesh, rules)
  model = lm_lib.MusicGenLM(cfg)
  plan = _Plan.make(pattern, num_timesteps, prompt_len)
  special = cfg.special_token
  n_steps = plan.num_steps
  empty = jnp.asarray(plan.empty_ks)
  known = jnp.asarray(plan.known_ks)
  n_k = cfg.num_codebooks
  bounds = segment_bounds(plan.first_free, n_steps - 1,
                          auto_segments(n_steps - 1 - plan.first_free) if segments is None else segments)

  def constrain_caches(caches):
    return tuple((constrain(k, _CACHE_AXES), constrain(v, _CACHE_AXES)) for k, v in caches)

  def run_all(st, tokens_bkn, caches, pos, with_prefix):
    b = st.seq.shape[0]
    logits, new_caches = [], []
    for (tensors, ckv), cache in zip(st.prepared, caches):
      toks = jnp.repeat(tokens_bkn, 2, axis=0) if cfg_mode == "batch" else tokens_bkn
      if with_prefix:   # the first chunk (pos 0): a scan over the layers, compiled once
        lg, cache = lm_decode.prefill(cfg, st.weights, toks, cache, ckv, tensors.cross_mask,
                                      tensors.prefix, beat=tensors.beat)
      else:
        lg, cache = lm_decode.decode(cfg, st.weights, toks, cache, pos, ckv, tensors.cross_mask,
                                     beat=tensors.beat, prefix_len=st.prefix_len)
      logits.append(lg[:, :, -1])
      new_caches.append(constrain_caches(cache))
    if cfg_mode == "none":
      guided = logits[0]
    else:
      if cfg_mode == "batch":
        pair = logits[0].reshape((b, 2) + logits[0].shape[1:])
        cond_l, uncond_l = pair[:, 0], pair[:, 1]
      else:
        cond_l, uncond_l = logits
      guided = uncond_l + (cond_l - uncond_l) * st.cfg_coef
    return constrain(guided.astype(jnp.float32), (shd.BATCH, None, None)), new_caches

  def start(params, conds, prompt, rng, temperature, top_p, cfg_coef):
    w = lm_decode.serving_weights(cfg, params, constrain)   # once, outside the step loop
    leaves = jax.tree.leaves(conds)
    b = leaves[0].shape[0] if leaves else prompt.shape[0]
    if prompt_len:
      padded = jnp.pad(prompt, ((0, 0), (0, 0), (0, num_timesteps - prompt_len)))
      prompt_seq = pattern.build(padded, special)
    else:
      prompt_seq = jnp.full((b, n_k, n_steps), special, jnp.int32)
    seq = jnp.where(empty[None], special, jnp.where(known[None], prompt_seq, special)).astype(jnp.int32)
    seq = constrain(seq, (shd.BATCH, None, None))

    # One or two "passes" (conditional, unconditional), each with its own conditions and caches.
    if cfg_mode == "none":
      pass_conds = [conds]
    elif cfg_mode == "batch":
      pass_conds = [_pair_rows(conds, null_conditions(conds))]
    else:
      pass_conds = [conds, null_conditions(conds)]
    prepared = []
    for c in pass_conds:
      tensors = model.apply(params, c, method=model.project_conditions)
      if cfg.cross_attention and tensors.cross is None:
        raise ValueError("this model attends to a text condition: pass text conditions")
      prepared.append((tensors, lm_decode.cross_kv(cfg, w, tensors.cross)))
    st = DecodeState(w, prepared, seq, None, None, rng, temperature, top_p, cfg_coef)
    rows = b * (2 if cfg_mode == "batch" else 1)
    first_len = stages.lengths(st.prefix_len)[0]
    caches = [constrain_caches(lm_decode.init_caches(cfg, rows, first_len)) for _ in prepared]
    # Prefill: prefix + every step before the first one that needs sampling, in one call per pass.
    logits, caches = run_all(st, seq[:, :, :plan.first_free], caches, 0, True)
    return st.replace(caches=caches, logits=logits)

  def place(st, seq, logits, s):
    key = jax.random.fold_in(st.rng, s)
    tok = sample_tokens(logits, key, st.temperature, top_k, st.top_p, use_top_p)       # [B, K]
    col = jax.lax.dynamic_index_in_dim(seq, s, axis=2, keepdims=False)
    e = jax.lax.dynamic_index_in_dim(empty, s, axis=1, keepdims=False)[None]
    kn = jax.lax.dynamic_index_in_dim(known, s, axis=1, keepdims=False)[None]
    tok = jnp.where(e | kn, col, tok)
    return jax.lax.dynamic_update_index_in_dim(seq, tok, s, axis=2), tok

  def step_body(st):
    """One step; the carry is (seq, caches, logits), the rest of `st` is loop-invariant."""
    def body(carry, s):
      seq, caches, logits = carry
      seq, tok = place(st, seq, logits, s)
      logits, caches = run_all(st, tok[:, :, None], caches, st.prefix_len + s, False)
      return (seq, caches, logits), None
    return body

  def grow(st, length):
    return st.replace(caches=[constrain_caches(lm_decode.grow_caches(c, length)) for c in st.caches])

  def scan_steps(st, a, e):
    carry, _ = jax.lax.scan(step_body(st), (st.seq, st.caches, st.logits), jnp.arange(a, e))
    return st.replace(seq=carry[0], caches=carry[1], logits=carry[2])

  def loop_steps(st, lo, hi):
    body = step_body(st)
    carry = jax.lax.fori_loop(lo, hi, lambda s, c: body(c, s)[0], (st.seq, st.caches, st.logits))
    return st.replace(seq=carry[0], caches=carry[1], logits=carry[2])

  def finish(st):
    seq, _ = place(st, st.seq, st.logits, n_steps - 1)
    return seq

  stages = _Stages(start, grow, scan_steps, loop_steps, finish, tuple(bounds), plan.first_free,
                   n_steps)
  return stages


def make_generate_fn(cfg: lm_lib.LMConfig, pattern, num_timesteps: int, prompt_len: int = 0,
                     top_k: int = 250, use_top_p: bool = False, cfg_mode: str = "batch",
                     progress: Callable[[int, int], None] | None = None, *,
                     segments: int | None = None, mesh: Mesh | None = None, rules=None) -> Callable:
  """Builds the jitted generate function for one static configuration.

  Returned fn(params, conds, prompt [B, K, Tp] int32, rng, temperature, top_p, cfg_coef) -> steps
  [B, K, S] int32 (the pattern sequence, special token in empty slots). `prompt` is ignored when
  prompt_len is 0 (pass an array of shape [B, K, 0]). `segments` (None = `auto_segments`) cuts the
  step scan; `progress(step, total)` is called once at the end of each segment (a program with such a
  host callback is never written to the persistent compilation cache: `ChunkedGenerate` reports
  progress from the host instead). With `mesh`, the KV caches, the step sequence and the serving
  weights are constrained by `rules` (default the training rules); place the inputs with
  `input_shardings`.
  """
  stages = _stages(cfg, pattern, num_timesteps, prompt_len, top_k, use_top_p, cfg_mode, segments,
                   mesh, rules)

  def generate(params, conds, prompt, rng, temperature, top_p, cfg_coef):
    st = stages.start(params, conds, prompt, rng, temperature, top_p, cfg_coef)
    for (a, e), length in zip(stages.bounds, stages.lengths(st.prefix_len)):
      st = stages.scan_steps(stages.grow(st, length), a, e)
      if progress is not None:
        jax.debug.callback(progress, e - 1, stages.num_steps)
    return stages.finish(st)

  return jax.jit(generate)


class ChunkedGenerate:
  """make_generate_fn's program driven from the host: start, then each segment's steps in compiled
  chunks of at most `chunk` steps, then finish. Same tokens as the one-program function; a caller sees
  progress after each chunk without any callback inside a compiled program (so every program goes to
  the persistent compilation cache). The state is donated from chunk to chunk (no copies)."""

  def __init__(self, stages: _Stages, chunk: int = 50):
    self.stages, self.chunk = stages, max(1, int(chunk))
    self._start = jax.jit(stages.start)
    self._grow = jax.jit(stages.grow, static_argnums=1, donate_argnums=0)
    self._steps = jax.jit(lambda st, lo, hi: (stages.loop_steps(st, lo, hi), hi), donate_argnums=0)
    self._finish = jax.jit(stages.finish)

  def __call__(self, params, conds, prompt, rng, temperature, top_p, cfg_coef,
               progress: Callable[[int, int], None] | None = None) -> jax.Array:
    """-> steps [B, K, S]; `progress(steps done, steps)` at the start and after each chunk has run."""
    s = self.stages
    if progress is not None:
      progress(0, s.num_steps)
    st = self._start(params, conds, prompt, rng, temperature, top_p, cfg_coef)
    pending = None      # the previous chunk: reported once the next one is queued
    for (a, e), length in zip(s.bounds, s.lengths(st.prefix_len)):
      with warnings.catch_warnings():   # the old caches cannot hold the grown ones: expected
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        st = self._grow(st, length)
      for lo in range(a, e, self.chunk):
        hi = min(lo + self.chunk, e)
        st, done = self._steps(st, jnp.int32(lo), jnp.int32(hi))
        if progress is not None and pending is not None:
          progress(int(pending), s.num_steps)
        pending = done
    seq = self._finish(st)
    if progress is not None:
      seq.block_until_ready()
      progress(s.num_steps, s.num_steps)
    return seq


@functools.lru_cache(maxsize=32)
def _cached_generate_fn(cfg, pattern, num_timesteps, prompt_len, top_k, use_top_p, cfg_mode, progress,
                        segments=None, mesh=None, rules=None):
  return make_generate_fn(cfg, pattern, num_timesteps, prompt_len, top_k, use_top_p, cfg_mode, progress,
                          segments=segments, mesh=mesh, rules=rules)


@functools.lru_cache(maxsize=32)
def _cached_chunked_fn(cfg, pattern, num_timesteps, prompt_len, top_k, use_top_p, cfg_mode,
                       segments=None, mesh=None, rules=None) -> ChunkedGenerate:
  return ChunkedGenerate(_stages(cfg, pattern, num_timesteps, prompt_len, top_k, use_top_p, cfg_mode,
                                 segments, mesh, rules))


@functools.lru_cache(maxsize=8)
def param_shardings(cfg: lm_lib.LMConfig, mesh: Mesh, rules) -> Any:
  """NamedShardings of the LM parameters ({'params': ...}) on `mesh` by `rules` (logical axis names)."""
  abstract = jax.eval_shape(functools.partial(lm_lib.init_params, cfg), jax.random.key(0))
  return shd.logical_sharding(abstract, mesh, rules)


def input_shardings(cfg: lm_lib.LMConfig, mesh: Mesh, rules, conds: lm_lib.Conditions):
  """(params, conds, prompt) shardings: weights by their logical names, the rest split on the batch."""
  batch = lambda x: shd.batch_sharding(mesh, rules, x.ndim)
  return (param_shardings(cfg, mesh, rules), jax.tree.map(batch, conds),
          shd.batch_sharding(mesh, rules, 3))


_PADDING_NOTED: set[tuple[int, int]] = set()   # (batch, data-parallel size) already noted


def _pad_batch(x: jax.Array, rows: int) -> jax.Array:
  """x [B, ...] -> [B + rows, ...], repeating the last example (a real one, so nothing is degenerate)."""
  return jnp.concatenate([x, jnp.repeat(x[-1:], rows, axis=0)], axis=0)


def generate(params: Any, cfg: lm_lib.LMConfig, pattern, conds: lm_lib.Conditions, num_timesteps: int,
             *, seed: int | jax.Array = 0, settings: SamplingSettings = SamplingSettings(),
             prompt: jax.Array | None = None, batch_size: int | None = None,
             progress: Callable[[int, int], None] | None = None, segments: int | None = None,
             mesh: Mesh | None = None, rules=None) -> jax.Array:
  """Generates codes [B, K, T] (T = num_timesteps); a prompt [B, K, Tp] is kept as the first Tp steps.

  Compiles once per static configuration (shapes, top-k, CFG mode, segments, mesh); seed, temperature,
  top-p and the CFG coefficient are traced, so changing them does not recompile.

  mesh: sample across its devices (e.g. `sharding.make_mesh((-1, 1, 1))` for every device on the data
  axis, `(-1, 1, t)` to split a large model's weights t ways); rules: the logical-axis rules (default
  `sharding.DEFAULT_RULES`; pass `sharding.rules_from_config(config.logical_axis_rules)`). Weights not
  yet placed are copied to their shardings; a batch the data axes do not divide is padded.
  """
  prompt_len = 0 if prompt is None else int(prompt.shape[-1])
  if prompt_len > num_timesteps:
    raise ValueError(f"the prompt has {prompt_len} frames but only {num_timesteps} are requested: "
                     "ask for a longer duration or a shorter prompt")
  leaves = jax.tree.leaves(conds)
  b = leaves[0].shape[0] if leaves else (prompt.shape[0] if prompt is not None else batch_size)
  if b is None:
    raise ValueError("unconditional generation needs batch_size")
  # Host arrays where they are made here: each eager jnp op is a compiled program of its own.
  if prompt is None:
    prompt = np.zeros((b, cfg.num_codebooks, 0), np.int32)
  elif isinstance(prompt, np.ndarray):
    prompt = prompt.astype(np.int32)
  else:
    prompt = jnp.asarray(prompt, jnp.int32)
  mode = settings.cfg_mode if settings.cfg_coef != 1.0 else "none"
  if not leaves:
    mode = "none"
  if mesh is not None:
    rules = shd.rules_from_config(shd.DEFAULT_RULES if rules is None else rules)
    dp = shd.data_parallel_size(mesh, rules)
    if b % dp:
      extra = dp - b % dp
      if (b, dp) not in _PADDING_NOTED:   # once per shape, not at every window or batch
        _PADDING_NOTED.add((b, dp))
        _LOG.warning("note: batch %d is padded to %d to split evenly over %d devices on the data "
                     "axes; the extra rows are discarded", b, b + extra, dp)
      conds = jax.tree.map(lambda x: _pad_batch(jnp.asarray(x), extra), conds)
      prompt = _pad_batch(prompt, extra)
    p_sh, c_sh, prompt_sh = input_shardings(cfg, mesh, rules, conds)
    params = jax.device_put(params, p_sh)
    conds = jax.device_put(conds, c_sh)
    prompt = jax.device_put(prompt, prompt_sh)
  static = (cfg, pattern, num_timesteps, prompt_len, settings.top_k, 0.0 < settings.top_p < 1.0, mode)
  args = (params, conds, prompt, jax.random.key(seed), np.float32(settings.temperature),
          np.float32(settings.top_p), np.float32(settings.cfg_coef))
  if segments is None:
    rows = b * (2 if mode == "batch" else 1)
    segments = auto_segments(pattern.num_steps(num_timesteps) - 1, rows, cfg.dim)
  if progress is None:
    seq = _cached_generate_fn(*static, None, segments, mesh, rules)(*args)
  else:   # progress from the host, between compiled chunks
    seq = _cached_chunked_fn(*static, segments, mesh, rules)(*args, progress=progress)
  return _revert_fn(pattern, b, cfg.special_token)(seq)


@functools.lru_cache(maxsize=32)
def _revert_fn(pattern, rows: int, special_token: int) -> Callable[[jax.Array], jax.Array]:
  """Pattern steps [B', K, S] -> the first `rows` examples' codes [rows, K, T], in one compiled program
  (eagerly, the gathers and selects of the revert are a program each)."""
  return jax.jit(lambda seq: pattern.revert(seq[:rows], special_token)[0])

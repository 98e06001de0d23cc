"""The compiled sampler: one jit-compiled call generates all pattern steps.

    conditions -> projected once -> cross-attention K/V once -> prefill (prefix + the steps the pattern or
    the prompt already fixes) -> lax.scan over the remaining steps:
        logits -> classifier-free guidance -> temperature / top-k / top-p (or greedy) -> token
        -> force pattern-empty slots to the special token and prompt slots to the prompt
        -> one decode step against the KV cache
    -> steps [B, K, S] -> pattern.revert -> codes [B, K, T].

Shapes (batch, length, prompt length, top-k, pattern, CFG mode) are static: one compilation serves every
call with the same shapes. Values (seed, temperature, top-p, CFG coefficient, the weights) are traced.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from musicgen_jax import lm as lm_lib

CFG_MODES = ("batch", "two_pass", "none")


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """Validated sampling settings. `top_k` and `cfg_mode` are static; the rest are traced."""
  temperature: float = 1.0
  top_k: int = 250
  top_p: float = 0.0
  cfg_coef: float = 3.0
  cfg_mode: str = "batch"

  def __post_init__(self):
    check_settings(self.temperature, self.top_k, self.top_p, self.cfg_coef, self.cfg_mode)


def check_settings(temperature: float, top_k: int, top_p: float, cfg_coef: float, cfg_mode: str) -> None:
  """Raises ValueError with one clear line for settings that cannot work."""
  if not isinstance(top_k, (int, np.integer)) or top_k <= 0:
    raise ValueError(f"top-k must be a positive integer (1 = greedy), got {top_k!r}")
  if not 0.0 <= top_p <= 1.0:
    raise ValueError(f"top-p must be in [0, 1] (0 disables it), got {top_p!r}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
  if cfg_mode not in CFG_MODES:
    raise ValueError(f"cfg mode must be one of {CFG_MODES}, got {cfg_mode!r}")
  if cfg_coef < 0:
    raise ValueError(f"cfg coefficient must be >= 0, got {cfg_coef!r}")


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


def null_conditions(cfg: lm_lib.LMConfig, conds: lm_lib.Conditions) -> lm_lib.Conditions:
  """The unconditional input of the released models: zero text states with a zero mask, and for
  melody models the chroma of silence (every frame one-hot on the first pitch class)."""
  text = mask = melody = None
  if conds.text is not None:
    text = jnp.zeros_like(conds.text)
    mask = jnp.zeros(conds.text.shape[:2], jnp.int32)
  if conds.melody is not None:
    melody = jnp.zeros_like(conds.melody).at[..., 0].set(1.0)
  del cfg
  return lm_lib.Conditions(text=text, text_mask=mask, melody=melody)


def cast_weights(params: Any, dtype) -> Any:
  """Casts floating matrices (ndim >= 2: kernels, embeddings, heads) to `dtype`; vectors (norm scales,
  biases) keep float32. A no-op for float32 compute."""
  if dtype == jnp.float32:
    return params
  return jax.tree.map(lambda x: x.astype(dtype) if (jnp.issubdtype(x.dtype, jnp.floating)
                                                    and x.ndim >= 2) else x, params)


def _concat_conditions(a: lm_lib.Conditions, b: lm_lib.Conditions) -> lm_lib.Conditions:
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)


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


def make_generate_fn(cfg: lm_lib.LMConfig, pattern, num_timesteps: int, prompt_len: int = 0,
                     top_k: int = 250, use_top_p: bool = False, cfg_mode: str = "batch",
                     progress: Callable[[int, int], None] | None = None) -> Callable:
  """Builds the jitted generate function for one static configuration.

  Returned fn(params, conds, prompt [B, K, Tp] int32, rng, temperature, top_p, cfg_coef) -> steps
  [B, K, S] int32 (the pattern sequence, special token in empty slots). `prompt` is ignored when
  prompt_len is 0 (pass an array of shape [B, K, 0]).
  """
  model = lm_lib.MusicGenLM(cfg)
  plan = _Plan.make(pattern, num_timesteps, prompt_len)
  special = cfg.special_token
  n_steps = plan.num_steps
  empty = jnp.asarray(plan.empty_ks)
  known = jnp.asarray(plan.known_ks)

  def prepare(params, conds):
    tensors = model.apply(params, conds, method=model.project_conditions)
    return tensors, model.apply(params, tensors, method=model.cross_kv)

  def decode(params, tokens, cache, pos, tensors, ckv, prefix=None):
    logits, new_kv = model.apply(params, tokens, cache, pos, ckv, tensors.cross_mask, prefix,
                                 method=model.decode)
    return logits, lm_lib.write_cache(cache, new_kv, pos)

  def generate(params, conds, prompt, rng, temperature, top_p, cfg_coef):
    # Weight matrices are cast to the compute dtype once, not re-read in fp32 at every step.
    params = cast_weights(params, cfg.compute_dtype)
    b = jax.tree.leaves(conds)[0].shape[0] if jax.tree.leaves(conds) else prompt.shape[0]
    if prompt_len:
      padded = jnp.pad(prompt, ((0, 0), (0, 0), (0, num_timesteps - prompt_len)))
      prompt_seq = pattern.build(padded, special)
    else:
      prompt_seq = jnp.full((b, cfg.num_codebooks, n_steps), special, jnp.int32)
    seq = jnp.where(empty[None], special, jnp.where(known[None], prompt_seq, special)).astype(jnp.int32)

    # One or two "passes" (conditional, unconditional), each with its own conditions and cache.
    if cfg_mode == "none":
      pass_conds = [conds]
    elif cfg_mode == "batch":
      pass_conds = [_concat_conditions(conds, null_conditions(cfg, conds))]
    else:
      pass_conds = [conds, null_conditions(cfg, conds)]
    prepared = [prepare(params, c) for c in pass_conds]
    prefix_len = 0 if prepared[0][0].prefix is None else prepared[0][0].prefix.shape[1]
    cache_len = prefix_len + n_steps

    def run_all(tokens_bkn, caches, pos, with_prefix):
      logits, new_caches = [], []
      for (tensors, ckv), cache in zip(prepared, caches):
        toks = jnp.concatenate([tokens_bkn] * 2) if cfg_mode == "batch" else tokens_bkn
        prefix = tensors.prefix if with_prefix else None
        lg, cache = decode(params, toks, cache, pos, tensors, ckv, prefix)
        logits.append(lg[:, :, -1])
        new_caches.append(cache)
      if cfg_mode == "none":
        guided = logits[0]
      else:
        cond_l, uncond_l = (jnp.split(logits[0], 2, axis=0) if cfg_mode == "batch" else logits)
        guided = uncond_l + (cond_l - uncond_l) * cfg_coef
      return guided.astype(jnp.float32), new_caches

    caches = [lm_lib.init_cache(cfg, b * (2 if cfg_mode == "batch" else 1), cache_len)
              for _ in prepared]
    # Prefill: prefix + every step before the first one that needs sampling, in one call each pass.
    logits, caches = run_all(seq[:, :, :plan.first_free], caches, 0, True)

    def place(seq, logits, s, key):
      tok = sample_tokens(logits, key, temperature, top_k, top_p, use_top_p)            # [B, K]
      col = jax.lax.dynamic_index_in_dim(seq, s, axis=2, keepdims=False)
      e = jax.lax.dynamic_index_in_dim(empty, s, axis=1, keepdims=False)[None]
      kn = jax.lax.dynamic_index_in_dim(known, s, axis=1, keepdims=False)[None]
      tok = jnp.where(e | kn, col, tok)
      return jax.lax.dynamic_update_index_in_dim(seq, tok, s, axis=2), tok

    def body(carry, s):
      seq, caches, logits = carry
      seq, tok = place(seq, logits, s, jax.random.fold_in(rng, s))
      logits, caches = run_all(tok[:, :, None], caches, prefix_len + s, False)
      if progress is not None:
        jax.debug.callback(progress, s, n_steps)
      return (seq, caches, logits), None

    if plan.first_free < n_steps:
      steps = jnp.arange(plan.first_free, n_steps - 1)
      (seq, caches, logits), _ = jax.lax.scan(body, (seq, caches, logits), steps)
      seq, _ = place(seq, logits, n_steps - 1, jax.random.fold_in(rng, n_steps - 1))
    return seq

  return jax.jit(generate)


@functools.lru_cache(maxsize=32)
def _cached_generate_fn(cfg, pattern, num_timesteps, prompt_len, top_k, use_top_p, cfg_mode, progress):
  return make_generate_fn(cfg, pattern, num_timesteps, prompt_len, top_k, use_top_p, cfg_mode, progress)


def generate(params: Any, cfg: lm_lib.LMConfig, pattern, conds: lm_lib.Conditions, num_timesteps: int,
             *, seed: int | jax.Array = 0, settings: SamplingSettings = SamplingSettings(),
             prompt: jax.Array | None = None, batch_size: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> jax.Array:
  """Generates codes [B, K, T] (T = num_timesteps); a prompt [B, K, Tp] is kept as the first Tp steps.

  Compiles once per static configuration (shapes, top-k, CFG mode); seed, temperature, top-p and the
  CFG coefficient are traced, so changing them does not recompile.
  """
  prompt_len = 0 if prompt is None else int(prompt.shape[-1])
  if prompt_len > num_timesteps:
    raise ValueError(f"the prompt has {prompt_len} frames but only {num_timesteps} are requested: "
                     "ask for a longer duration or a shorter prompt")
  leaves = jax.tree.leaves(conds)
  b = leaves[0].shape[0] if leaves else (prompt.shape[0] if prompt is not None else batch_size)
  if b is None:
    raise ValueError("unconditional generation needs batch_size")
  if prompt is None:
    prompt = jnp.zeros((b, cfg.num_codebooks, 0), jnp.int32)
  mode = settings.cfg_mode if settings.cfg_coef != 1.0 else "none"
  if not leaves:
    mode = "none"
  fn = _cached_generate_fn(cfg, pattern, num_timesteps, prompt_len, settings.top_k,
                           0.0 < settings.top_p < 1.0, mode, progress)
  key = jax.random.key(seed)
  seq = fn(params, conds, jnp.asarray(prompt, jnp.int32), key, jnp.float32(settings.temperature),
           jnp.float32(settings.top_p), jnp.float32(settings.cfg_coef))
  codes, _ = pattern.revert(seq, cfg.special_token)
  return codes

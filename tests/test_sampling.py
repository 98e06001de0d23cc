"""Tests for musicgen_jax.sampling.

Greedy generation is compared with a plain reference loop written here: at every pattern step it runs the
*uncached* full forward on the whole sequence so far, combines conditional and unconditional logits with
classifier-free guidance, takes the argmax and forces pattern-empty slots to the special token and prompt
slots to the prompt. The forward always sees a fixed length S_MAX (unfilled steps hold the special token;
causality, tested in test_lm.py, makes them invisible), so it compiles once per model.
sample_tokens is checked against known distributions.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicgen_jax import lm as lm_lib
from musicgen_jax import patterns
from musicgen_jax import sampling

from tests.conftest import ProgramCount, TinyLM

T = 5          # generated timesteps
S_MAX = 24     # fixed forward length of the reference loop (>= every pattern's S for T)
GREEDY = sampling.SamplingSettings(top_k=1)


# ---- reference ---------------------------------------------------------------------------------------
def _null(conds: lm_lib.Conditions) -> lm_lib.Conditions:
  """The unconditional input, written independently: zero text with an all-zero mask; for melody the
  chroma of silence, one-hot on pitch class 0; no tempo for the beat clock."""
  melody = None
  if conds.melody is not None:
    melody = jnp.zeros_like(conds.melody).at[..., 0].set(1.0)
  return lm_lib.Conditions(text=jnp.zeros_like(conds.text), text_mask=jnp.zeros_like(conds.text_mask),
                           melody=melody,
                           beat=None if conds.beat is None else jnp.zeros_like(conds.beat))


def reference_greedy(lm: TinyLM, pattern, conds, num_timesteps: int, cfg_coef: float,
                     prompt: np.ndarray | None = None) -> np.ndarray:
  """Greedy codes [B, K, T] from the step-by-step uncached loop (see the module docstring)."""
  special = lm.cfg.special_token
  layout = np.asarray(pattern.layout(num_timesteps))
  k, s_len = layout.shape
  assert s_len <= S_MAX
  b = conds.text.shape[0]
  tp = 0 if prompt is None else prompt.shape[-1]
  empty = layout < 0
  known = ~empty & (layout < tp)
  seq = np.full((b, k, S_MAX), special, np.int32)
  if tp:  # place the prompt timesteps where the pattern puts them
    for kk in range(k):
      for s in range(s_len):
        if known[kk, s]:
          seq[:, kk, s] = prompt[:, kk, layout[kk, s]]
  null = _null(conds)
  for s in range(1, s_len):
    if (empty[:, s] | known[:, s]).all():
      continue
    cond_l = np.asarray(lm.forward(lm.params, jnp.asarray(seq), conds))[:, :, s - 1]
    if cfg_coef == 1.0:
      guided = cond_l
    else:
      uncond_l = np.asarray(lm.forward(lm.params, jnp.asarray(seq), null))[:, :, s - 1]
      guided = uncond_l + (cond_l - uncond_l) * np.float32(cfg_coef)
    free = ~(empty[:, s] | known[:, s])
    seq[:, :, s] = np.where(free[None], guided.argmax(-1), seq[:, :, s])
  codes = np.full((b, k, num_timesteps), -1, np.int32)
  for kk in range(k):
    for s in range(s_len):
      if not empty[kk, s]:
        codes[:, kk, layout[kk, s]] = seq[:, kk, s]
  assert (codes >= 0).all()
  return codes


def _generate(lm: TinyLM, pattern, settings=GREEDY, num_timesteps: int = T, **kw) -> np.ndarray:
  codes = sampling.generate(lm.params, lm.cfg, pattern, lm.conds, num_timesteps, settings=settings, **kw)
  assert codes.shape == (lm.conds.text.shape[0], lm.cfg.num_codebooks, num_timesteps)
  assert codes.dtype == jnp.int32
  return np.asarray(codes)


# ---- greedy generation vs the reference loop ---------------------------------------------------------
@pytest.mark.parametrize("name", ["delay", "parallel", "unroll", "coarse_first", "musiclm"])
def test_greedy_matches_reference_loop(text_lm, name):
  pattern = patterns.get_pattern(name, 4)
  got = _generate(text_lm, pattern)
  assert ((got >= 0) & (got < text_lm.cfg.card)).all()
  np.testing.assert_array_equal(got, reference_greedy(text_lm, pattern, text_lm.conds, T, 3.0))


def test_generate_builds_one_program_per_stage(text_lm):
  """A new shape costs the generate program, the revert and the seed's key, not one program per eager
  op around them (each is a compilation or a persistent-cache read in every new process): with
  progress, the four stages too."""
  pattern = patterns.get_pattern("delay", 4)
  with ProgramCount() as plain:
    _generate(text_lm, pattern, num_timesteps=T + 2, seed=11)
  with ProgramCount() as chunked:
    _generate(text_lm, pattern, num_timesteps=T + 3, seed=12, progress=lambda done, total: None)
  assert plain.programs <= 3 and chunked.programs <= 3 + 4


def test_greedy_melody_prefix_matches_reference_loop(melody_lm):
  pattern = patterns.get_pattern("delay", 4)
  got = _generate(melody_lm, pattern, segments=2)   # caches grown between two step scans
  np.testing.assert_array_equal(got, reference_greedy(melody_lm, pattern, melody_lm.conds, T, 3.0))


def test_greedy_melody_prefix_with_text_by_cross_attention_matches_reference_loop():
  """The chroma as a prefix and the text by cross-attention in the same model (the shipped model's
  layout since 2026-11-27; the released melody models put both in the prefix)."""
  from tests.conftest import MELODY_CFG, _tiny
  lm = _tiny(dataclasses.replace(MELODY_CFG, text_conditioning="cross"), 2)
  assert lm.cfg.cross_attention and lm.cfg.melody
  pattern = patterns.get_pattern("delay", 4)
  got = _generate(lm, pattern, segments=2)
  np.testing.assert_array_equal(got, reference_greedy(lm, pattern, lm.conds, T, 3.0))


def test_cfg_two_pass_equals_batch(text_lm):
  pattern = patterns.get_pattern("delay", 4)
  batch = _generate(text_lm, pattern, sampling.SamplingSettings(top_k=1, cfg_mode="batch"))
  two_pass = _generate(text_lm, pattern, sampling.SamplingSettings(top_k=1, cfg_mode="two_pass"))
  np.testing.assert_array_equal(two_pass, batch)


def test_cfg_coef_one_is_plain_conditional(text_lm):
  pattern = patterns.get_pattern("delay", 4)
  got = _generate(text_lm, pattern, sampling.SamplingSettings(top_k=1, cfg_coef=1.0))
  ref = reference_greedy(text_lm, pattern, text_lm.conds, T, 1.0)
  np.testing.assert_array_equal(got, ref)
  # Guidance matters here: with coefficient 3 the result differs.
  assert (ref != reference_greedy(text_lm, pattern, text_lm.conds, T, 3.0)).any()


def test_continuation_keeps_prompt_and_matches_reference(text_lm):
  pattern = patterns.get_pattern("delay", 4)
  rng = np.random.default_rng(3)
  prompt = rng.integers(0, text_lm.cfg.card, size=(2, 4, 2)).astype(np.int32)
  got = _generate(text_lm, pattern, prompt=jnp.asarray(prompt), segments=3)
  np.testing.assert_array_equal(got[:, :, :2], prompt)
  np.testing.assert_array_equal(got, reference_greedy(text_lm, pattern, text_lm.conds, T, 3.0, prompt))


# ---- compilation -------------------------------------------------------------------------------------
def test_temperature_zero_is_greedy_and_settings_do_not_retrace(text_lm, monkeypatch):
  pattern = patterns.get_pattern("delay", 4)
  traces = []
  original = sampling.sample_tokens

  def counting_sample_tokens(*args, **kwargs):
    traces.append(1)  # runs only while generate is being traced
    return original(*args, **kwargs)

  monkeypatch.setattr(sampling, "sample_tokens", counting_sample_tokens)
  settings = lambda **kw: sampling.SamplingSettings(**dict(dict(top_k=16, top_p=0.5), **kw))
  zero = _generate(text_lm, pattern, settings(temperature=0.0), seed=0)
  np.testing.assert_array_equal(zero, reference_greedy(text_lm, pattern, text_lm.conds, T, 3.0))
  n_traces = len(traces)
  a = _generate(text_lm, pattern, settings(temperature=1.0, top_p=0.9, cfg_coef=2.0), seed=1)
  b = _generate(text_lm, pattern, settings(temperature=0.7, top_p=0.8, cfg_coef=4.0), seed=2)
  a2 = _generate(text_lm, pattern, settings(temperature=1.0, top_p=0.9, cfg_coef=2.0), seed=1)
  assert len(traces) == n_traces, "a new seed / temperature / top-p / cfg coefficient retraced"
  segments = 1   # what generate chooses on CPU
  fn = sampling._cached_generate_fn(text_lm.cfg, pattern, T, 0, 16, True, "batch", None, segments, None,
                                    None)
  assert fn._cache_size() == 1
  np.testing.assert_array_equal(a, a2)            # same seed and settings: same codes
  assert (a != zero).any() and (a != b).any()     # sampling is really random
  _generate(text_lm, pattern, settings(temperature=1.0), num_timesteps=T + 1)
  assert len(traces) > n_traces, "a new length must compile a new program"


# ---- sample_tokens -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _draw_fn(top_k: int, use_top_p: bool):
  """jit(vmap over keys) of sample_tokens for one static (top_k, use_top_p): shared between tests."""
  def one(logits_bkc, key, temperature, top_p):
    return sampling.sample_tokens(logits_bkc, key, temperature, top_k, top_p, use_top_p)
  return jax.jit(jax.vmap(one, in_axes=(None, 0, None, None)))


def _draws(logits_bkc, n: int, temperature=1.0, top_k: int = 1000, top_p=0.0, seed: int = 0) -> np.ndarray:
  """n samples [n, B, K] of sample_tokens with independent keys."""
  keys = jax.random.split(jax.random.key(seed), n)
  fn = _draw_fn(top_k, bool(0.0 < top_p < 1.0))
  return np.asarray(fn(logits_bkc, keys, jnp.float32(temperature), jnp.float32(top_p)))


def _logits_of(probs_c: np.ndarray, b: int = 1, k: int = 1) -> jax.Array:
  return jnp.broadcast_to(jnp.log(jnp.asarray(probs_c, jnp.float32)), (b, k, len(probs_c)))


def test_top_k_restricts_support():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 16)) * 0.5  # flat: all 16 are plausible
  draws = _draws(logits, 2000, top_k=4)
  assert draws.dtype == np.int32 and draws.shape == (2000, 2, 3)
  top4 = np.argsort(-np.asarray(logits), axis=-1)[..., :4]
  for bb in range(2):
    for kk in range(3):
      assert set(draws[:, bb, kk]) == set(top4[bb, kk]), (bb, kk)  # exactly the 4 largest, all seen


def test_top_p_restricts_to_nucleus():
  probs = np.array([0.05, 0.3, 0.1, 0.4, 0.15])
  logits = _logits_of(probs)
  # Descending: 0.4 (3), 0.3 (1), 0.15 (4), 0.1 (2), 0.05 (0). Mass before each: 0, 0.4, 0.7, 0.85, 0.95.
  for top_p, nucleus in [(0.35, [3]), (0.6, [3, 1]), (0.8, [3, 1, 4]), (0.9, [3, 1, 4, 2])]:
    draws = _draws(logits, 4000, top_p=top_p, seed=1)[:, 0, 0]
    assert set(draws) == set(nucleus), top_p
    freq = np.bincount(draws, minlength=5)[nucleus] / len(draws)
    np.testing.assert_allclose(freq, probs[nucleus] / probs[nucleus].sum(), atol=0.03)
  # top_p 1 (or 0) keeps the full distribution
  for top_p in (0.0, 1.0):
    assert set(_draws(logits, 4000, top_p=top_p, seed=2)[:, 0, 0]) == set(range(5))


def test_temperature_zero_and_tiny_are_argmax():
  logits = jax.random.normal(jax.random.key(1), (3, 4, 32))
  want = np.asarray(jnp.argmax(logits, -1))
  for temperature in (0.0, 1e-4):
    draws = _draws(logits, 50, temperature=temperature, top_k=32, seed=3)
    assert (draws == want[None]).all(), temperature
  # also through top-p and a small top-k
  assert (_draws(logits, 20, temperature=0.0, top_k=5, top_p=0.5) == want[None]).all()


def test_seeds_are_reproducible_and_differ():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 16)) * 0.5
  np.testing.assert_array_equal(_draws(logits, 2000, top_k=4, seed=7), _draws(logits, 2000, top_k=4, seed=7))
  assert (_draws(logits, 2000, top_k=4, seed=7) != _draws(logits, 2000, top_k=4, seed=8)).any()
  # independent keys give independent draws: not all equal to the first one
  assert (_draws(logits, 2000, top_k=4, seed=7) != _draws(logits, 2000, top_k=4, seed=7)[:1]).any()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distribution_matches_softmax(temperature):
  probs = np.array([0.02, 0.08, 0.1, 0.2, 0.25, 0.35])
  logits = _logits_of(probs)
  n = 20000
  counts = np.bincount(_draws(logits, n, temperature=temperature, top_k=6, seed=4)[:, 0, 0], minlength=6)
  expected = np.exp(np.log(probs) / temperature)
  expected = n * expected / expected.sum()
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  assert chi2 < 25.0, (chi2, counts, expected)  # 5 dof: P(chi2 > 20.5) = 0.001


def test_top_k_larger_than_card_keeps_all():
  probs = np.array([0.1, 0.2, 0.3, 0.4])
  draws = _draws(_logits_of(probs), 2000, top_k=250, seed=5)[:, 0, 0]
  assert set(draws) == {0, 1, 2, 3}


# ---- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=0), "top-k"),
    (dict(top_k=-3), "top-k"),
    (dict(top_k=2.5), "top-k"),
    (dict(top_p=-0.1), "top-p"),
    (dict(top_p=1.5), "top-p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(cfg_mode="interleaved"), "cfg mode"),
    (dict(cfg_coef=-1.0), "cfg coefficient"),
])
def test_settings_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sampling.SamplingSettings(**kwargs)


def test_prompt_longer_than_request_raises(text_lm):
  prompt = jnp.zeros((2, 4, T + 1), jnp.int32)
  with pytest.raises(ValueError, match="prompt has 6 frames"):
    sampling.generate(text_lm.params, text_lm.cfg, patterns.get_pattern("delay", 4), text_lm.conds, T,
                      prompt=prompt)


def test_unconditional_without_batch_size_raises():
  cfg = lm_lib.LMConfig(num_codebooks=4, card=16, dim=32, num_layers=2, num_heads=4, ffn_dim=64, text_dim=0)
  with pytest.raises(ValueError, match="batch_size"):
    sampling.generate({}, cfg, patterns.get_pattern("delay", 4), lm_lib.Conditions(), T)

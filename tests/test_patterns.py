"""Tests for musicgen_jax.patterns against plain-Python reference layouts written here independently.

Each reference builds the pattern as a list of steps, each step a list of (t, k) coordinates (timesteps
past T included, as audiocraft's providers emit them), then fills [B, K, S] arrays with explicit loops.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicgen_jax import patterns

SPECIAL = 2048
N_QS = (1, 4, 8)
TS = (1, 2, 7, 50)


# ---- plain-Python references ---------------------------------------------------------------------------
def ref_delay_steps(n_q, T, delays):
  steps = [[]]
  for j in range(T + max(delays)):
    steps.append([(j - delays[k], k) for k in range(n_q) if j - delays[k] >= 0])
  return steps


def ref_unroll_steps(n_q, T, flattening, delays):
  inner_steps = max(flattening) + 1
  horizon = T + max(delays)
  entries = [(-1, [])]
  for t in range(horizon):
    for inner in range(inner_steps):
      ks = [k for k in range(n_q) if flattening[k] == inner]
      if not ks:
        entries.append((t, []))
        continue
      delay = delays[ks[0]]
      if t + delay < horizon:
        entries.append((t + delay, [(t, k) for k in ks]))
  # Python orders (block, coords) tuples: empty lists first, then by (t, k) of the first coordinate.
  return [coords for _, coords in sorted(entries)]


def ref_coarse_first_steps(n_q, T, delays):
  steps = [[]] + [[(t, 0)] for t in range(T)]
  if n_q > 1:
    for j in range(T + max(delays)):
      steps.append([(j - delays[k - 1], k) for k in range(1, n_q) if j - delays[k - 1] >= 0])
  return steps


def ref_musiclm_steps(n_q, T, group_by):
  steps = [[]]
  for start in range(0, n_q, group_by):
    for t in range(T):
      for k in range(start, min(start + group_by, n_q)):
        steps.append([(t, k)])
  return steps


def ref_steps(name, n_q, T, opts):
  if name == "parallel":
    return ref_delay_steps(n_q, T, [0] * n_q)
  if name == "delay":
    return ref_delay_steps(n_q, T, opts.get("delays", list(range(n_q))))
  if name == "unroll":
    return ref_unroll_steps(n_q, T, opts.get("flattening", list(range(n_q))), opts.get("delays", [0] * n_q))
  if name == "coarse_first":
    return ref_coarse_first_steps(n_q, T, opts.get("delays", [0] * (n_q - 1)))
  return ref_musiclm_steps(n_q, T, opts.get("group_by", 2))


def ref_trim(steps, T, trim_tail):
  """audiocraft's keep_only_valid_steps: drop (max t in the grid + 1 - T) trailing steps."""
  if not trim_tail:
    return steps
  max_delay = max(t for step in steps for t, _ in step) + 1 - T
  return steps[:len(steps) - max_delay]


def ref_build(codes, steps, special):
  B, K, T = codes.shape
  out = np.full((B, K, len(steps)), special, codes.dtype)
  for s, step in enumerate(steps):
    for t, k in step:
      if t < T:
        out[:, k, s] = codes[:, k, t]
  return out


def ref_revert_logits(logits, steps, T, fill):
  B, K, _, C = logits.shape
  out = np.full((B, K, T, C), fill, logits.dtype)
  mask = np.zeros((K, T), bool)
  for s, step in enumerate(steps):
    for t, k in step:
      if t < T:
        out[:, k, t] = logits[:, k, s - 1]
        mask[k, t] = True
  return out, mask


def cases(n_q):
  """(name, options) pairs exercised for n_q codebooks."""
  out = [("parallel", {}), ("delay", {}), ("delay", {"delays": [k // 2 for k in range(n_q)]}),
         ("delay", {"delays": [1 + 2 * k for k in range(n_q)]}),
         ("unroll", {}), ("unroll", {"flattening": [0] + [1] * (n_q - 1)}),
         ("unroll", {"flattening": [0] + [1] * (n_q - 1), "delays": [0] + [3] * (n_q - 1)}),
         ("unroll", {"flattening": [2 * k + 1 for k in range(n_q)], "delays": list(range(n_q))}),
         ("coarse_first", {}), ("coarse_first", {"delays": list(range(n_q - 1))}),
         ("musiclm", {}), ("musiclm", {"group_by": 3}), ("musiclm", {"group_by": 1})]
  return out


ALL_CASES = [(name, n_q, opts) for n_q in N_QS for name, opts in cases(n_q)]
CASE_IDS = [f"{name}-K{n_q}-{i}" for i, (name, n_q, _) in enumerate(ALL_CASES)]


# ---- layouts -------------------------------------------------------------------------------------------
def ref_layout(steps, n_q, T):
  layout = np.full((n_q, len(steps)), -1)
  for s, step in enumerate(steps):
    for t, k in step:
      if t < T:
        layout[k, s] = t
  return layout


@pytest.mark.parametrize("name,n_q,opts", ALL_CASES, ids=CASE_IDS)
def test_layout_matches_reference(name, n_q, opts):
  pattern = patterns.get_pattern(name, n_q, **opts)
  for T in TS:
    for trim_tail in (False, True):
      steps = ref_trim(ref_steps(name, n_q, T, opts), T, trim_tail)
      np.testing.assert_array_equal(pattern.layout(T, trim_tail=trim_tail), ref_layout(steps, n_q, T))
      assert pattern.num_steps(T, trim_tail=trim_tail) == len(steps)
      assert pattern.num_timesteps(len(steps), trim_tail=trim_tail) == T


def fake_logits(n_q, num_seq_steps):
  """[2, K, S, 2] float32 whose value at [b, k, s, c] is 1e5 b + 100 s + k + c / 10: it encodes s."""
  b, k, s, c = np.meshgrid(np.arange(2), np.arange(n_q), np.arange(num_seq_steps), np.arange(2),
                           indexing="ij")
  return (1e5 * b + 100.0 * s + k + c / 10.0).astype(np.float32)


@functools.partial(jax.jit, static_argnums=2)
def _round_trips(codes_list, logits_list, specs):
  """build / revert / revert_logits for several (pattern, trim_tail) at once: one compilation per call."""
  out = []
  for codes, logits, (pattern, trim_tail) in zip(codes_list, logits_list, specs):
    seq = pattern.build(codes, SPECIAL, trim_tail=trim_tail)
    back, mask = pattern.revert(seq, SPECIAL, trim_tail=trim_tail)
    got_logits, logits_mask = None, None
    if logits is not None:
      got_logits, logits_mask = pattern.revert_logits(logits, trim_tail=trim_tail)
    out.append((seq, back, mask, got_logits, logits_mask))
  return out


def check_round_trips(runs, seed, logits_for=lambda name, n_q, T: True):
  """runs: (name, n_q, options, T, trim_tail). For each: build == reference build; revert(build(codes))
  == codes; and where logits_for(...) says so, revert_logits gives (k, t) the logits of the step before
  the one holding (k, t) (skipped elsewhere only to keep compilation short)."""
  rng = np.random.default_rng(seed)
  specs, codes_list, logits_list, steps_list = [], [], [], []
  for name, n_q, opts, T, trim in runs:
    specs.append((patterns.get_pattern(name, n_q, **opts), trim))
    steps = ref_trim(ref_steps(name, n_q, T, opts), T, trim)
    steps_list.append(steps)
    codes_list.append(rng.integers(0, SPECIAL, size=(2, n_q, T), dtype=np.int32))
    logits_list.append(fake_logits(n_q, len(steps)) if logits_for(name, n_q, T) else None)
  outs = _round_trips(codes_list, logits_list, tuple(specs))
  for (_, _, _, T, trim), (pattern, _), steps, codes, logits, out in zip(
      runs, specs, steps_list, codes_list, logits_list, outs):
    seq, back, mask, got_logits, logits_mask = (None if a is None else np.asarray(a) for a in out)
    np.testing.assert_array_equal(seq, ref_build(codes, steps, SPECIAL))
    want_mask = ref_revert_logits(np.zeros((1, codes.shape[1], len(steps), 1)), steps, T, 0)[1]
    np.testing.assert_array_equal(mask, want_mask)
    assert mask.all() or trim
    np.testing.assert_array_equal(back, np.where(mask[None], codes, SPECIAL))
    if logits is None:
      continue
    want_logits, _ = ref_revert_logits(logits, steps, T, 0.0)
    np.testing.assert_array_equal(logits_mask, want_mask)
    np.testing.assert_array_equal(got_logits, want_logits)
    pos = pattern.positions(T, trim_tail=trim)
    step_of_logit = np.round(got_logits[0, :, :, 0] / 100.0).astype(int)
    np.testing.assert_array_equal(step_of_logit[mask], pos[mask] - 1)


@pytest.mark.parametrize("name", patterns.PATTERN_NAMES)
def test_round_trip_every_pattern(name):
  """Default options, n_q in {1, 4, 8}, T in {1, 2, 7, 50}."""
  check_round_trips([(name, n_q, {}, T, False) for n_q in N_QS for T in TS], seed=0,
                    logits_for=lambda name, n_q, T: T in (2, 7))


def test_round_trip_options_and_trim_tail():
  stereo = {"delays": [0, 0, 1, 1, 2, 2, 3, 3]}
  unroll_delayed = {"flattening": [0, 1, 1, 2], "delays": [0, 3, 3, 4]}
  runs = [("delay", 8, stereo, T, False) for T in TS]
  runs += [("unroll", 4, unroll_delayed, T, trim) for T in (1, 7) for trim in (False, True)]
  runs += [("delay", 4, {"delays": [1, 2, 2, 5]}, 7, True), ("delay", 4, {}, 7, True),
           ("coarse_first", 4, {"delays": [0, 1, 2]}, 7, True), ("musiclm", 4, {"group_by": 3}, 7, False)]
  check_round_trips(runs, seed=1)


@pytest.mark.parametrize("name,n_q,opts", ALL_CASES, ids=CASE_IDS)
def test_layout_invariants(name, n_q, opts):
  pattern = patterns.get_pattern(name, n_q, **opts)
  for T in (1, 7):
    layout = pattern.layout(T)
    assert layout.dtype == np.int32 and layout.shape == (n_q, pattern.num_steps(T))
    assert (layout[:, 0] == -1).all(), "step 0 must be empty"
    for k in range(n_q):
      held = layout[k][layout[k] >= 0]
      assert sorted(held.tolist()) == list(range(T)), "each (k, t) exactly once"
      assert (np.diff(held) > 0).all(), "timesteps of a codebook ascend along the sequence"
    assert (pattern.valid_steps_mask(T) == (layout >= 0)).all()
    assert pattern.layout(T) is layout, "layouts are cached"
    assert not layout.flags.writeable
    # audiocraft's max_delay: how far the grid reaches past T - 1.
    grid_max_t = max(t for step in ref_steps(name, n_q, T, opts) for t, _ in step)
    assert pattern.max_delay == grid_max_t + 1 - T


def test_num_steps_formulas():
  T = 50
  assert patterns.get_pattern("parallel", 4).num_steps(T) == T + 1
  assert patterns.get_pattern("delay", 4).num_steps(T) == T + 3 + 1
  assert patterns.get_pattern("delay", 4).num_steps(T, trim_tail=True) == T + 1
  assert patterns.get_pattern("delay", 8, delays=[0, 0, 1, 1, 2, 2, 3, 3]).num_steps(T) == T + 4
  assert patterns.get_pattern("delay", 4, delays=[1, 2, 2, 5]).num_steps(T) == T + 6
  assert patterns.get_pattern("unroll", 4).num_steps(T) == 4 * T + 1
  assert patterns.get_pattern("unroll", 4, flattening=[0, 1, 1, 1]).num_steps(T) == 2 * T + 1
  assert patterns.get_pattern("coarse_first", 4).num_steps(T) == 2 * T + 1
  assert patterns.get_pattern("coarse_first", 4, delays=[0, 1, 2]).num_steps(T) == 2 * T + 3
  assert patterns.get_pattern("coarse_first", 1).num_steps(T) == T + 1
  assert patterns.get_pattern("musiclm", 4).num_steps(T) == 4 * T + 1
  assert patterns.get_pattern("musiclm", 4, group_by=3).num_steps(T) == 4 * T + 1


def test_hand_written_layouts():
  """Small layouts worked out by hand from audiocraft's provider definitions."""
  e = -1
  np.testing.assert_array_equal(patterns.get_pattern("delay", 3).layout(4), [
      [e, 0, 1, 2, 3, e, e], [e, e, 0, 1, 2, 3, e], [e, e, e, 0, 1, 2, 3]])
  np.testing.assert_array_equal(patterns.get_pattern("unroll", 3).layout(2), [
      [e, 0, e, e, 1, e, e], [e, e, 0, e, e, 1, e], [e, e, e, 0, e, e, 1]])
  unroll = patterns.get_pattern("unroll", 3, flattening=[0, 1, 1], delays=[0, 3, 3])
  np.testing.assert_array_equal(unroll.layout(4), [
      [e, 0, 1, 2, e, 3, e, e, e, e, e, e], [e, e, e, e, 0, e, 1, e, 2, e, 3, e],
      [e, e, e, e, 0, e, 1, e, 2, e, 3, e]])
  np.testing.assert_array_equal(unroll.layout(4, trim_tail=True), unroll.layout(4)[:, :9])
  np.testing.assert_array_equal(patterns.get_pattern("coarse_first", 3).layout(2), [
      [e, 0, 1, e, e], [e, e, e, 0, 1], [e, e, e, 0, 1]])
  np.testing.assert_array_equal(patterns.get_pattern("musiclm", 4).layout(2), [
      [e, 0, e, 1, e, e, e, e, e], [e, e, 0, e, 1, e, e, e, e],
      [e, e, e, e, e, 0, e, 1, e], [e, e, e, e, e, e, 0, e, 1]])
  stereo = patterns.get_pattern("delay", 8, delays=[0, 0, 1, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(stereo.layout(1)[::2], stereo.layout(1)[1::2])
  np.testing.assert_array_equal(stereo.layout(1)[::2], patterns.get_pattern("delay", 4).layout(1))


def test_revert_values_float_and_explicit_num_timesteps():
  pattern = patterns.get_pattern("delay", 4)
  x = np.random.default_rng(1).normal(size=(2, 4, pattern.num_steps(7) + 5)).astype(np.float32)
  vals, mask = pattern.revert_values(x, num_timesteps=7)  # extra trailing steps are ignored
  pos = pattern.positions(7)
  want = np.take_along_axis(x, np.broadcast_to(pos[None], (2, 4, 7)), axis=2)
  np.testing.assert_array_equal(np.asarray(vals), want)
  assert mask.all() and vals.dtype == jnp.float32
  vals_p, _ = pattern.revert_values(x, num_timesteps=7, predictions=True)
  want_p = np.take_along_axis(x, np.broadcast_to(pos[None] - 1, (2, 4, 7)), axis=2)
  np.testing.assert_array_equal(np.asarray(vals_p), want_p)


def test_trim_tail_is_audiocraft_training_layout():
  """Delay 0..3 trimmed: S = T + 1 (audiocraft keep_only_valid_steps); codebook k loses its last k steps."""
  pattern = patterns.get_pattern("delay", 4)
  T = 10
  pos = pattern.positions(T, trim_tail=True)
  assert pattern.layout(T, trim_tail=True).shape == (4, T + 1)
  np.testing.assert_array_equal(pos >= 0, np.arange(T)[None, :] < T - np.arange(4)[:, None])
  logits = np.ones((1, 4, T + 1, 3), np.float32)
  got, mask = pattern.revert_logits(logits, trim_tail=True, fill=-7.0)
  np.testing.assert_array_equal(mask, pos >= 0)
  np.testing.assert_array_equal(np.asarray(got)[0, :, :, 0], np.where(mask, 1.0, -7.0))
  assert patterns.get_pattern("delay", 4, delays=None) == pattern  # None takes the default


# ---- jit -----------------------------------------------------------------------------------------------
def test_jit_build_revert_no_retrace():
  pattern = patterns.get_pattern("delay", 4)
  traces = []

  @jax.jit
  def round_trip(codes):
    traces.append(1)
    seq = pattern.build(codes, SPECIAL)
    back, _ = pattern.revert(seq, SPECIAL)
    logits = jax.nn.one_hot(seq, SPECIAL + 1)
    lg, _ = pattern.revert_logits(logits)
    return seq, back, lg

  rng = np.random.default_rng(2)
  for _ in range(2):
    codes = rng.integers(0, SPECIAL, size=(3, 4, 20), dtype=np.int32)
    seq, back, lg = round_trip(codes)
    np.testing.assert_array_equal(np.asarray(back), codes)
    np.testing.assert_array_equal(np.asarray(seq), ref_build(codes, ref_delay_steps(4, 20, [0, 1, 2, 3]),
                                                             SPECIAL))
    assert lg.shape == (3, 4, 20, SPECIAL + 1)
  assert len(traces) == 1, "second call with the same shape must not retrace"

  # Patterns are hashable, so they can be static arguments; the special token may be traced.
  f = jax.jit(lambda p, c, tok: p.build(c, tok), static_argnums=0)
  out = f(patterns.get_pattern("musiclm", 4), codes, jnp.int32(7))
  assert out.shape == (3, 4, 4 * 20 + 1) and int(out[0, 0, 0]) == 7


# ---- errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,match", [
    (lambda: patterns.get_pattern("nope", 4),
     "unknown codebook pattern 'nope'; valid names: parallel, delay, unroll, coarse_first, musiclm"),
    (lambda: patterns.get_pattern("delay", 4, delay=[0, 1, 2, 3]),
     "unknown option.*delay.*valid options: delays"),
    (lambda: patterns.get_pattern("parallel", 4, delays=[0] * 4), "valid options: none"),
    (lambda: patterns.get_pattern("musiclm", 4, flattening=[0]), "valid options: group_by"),
    (lambda: patterns.get_pattern("delay", 4, delays=[0, 2, 1, 3]), "sorted"),
    (lambda: patterns.get_pattern("delay", 4, delays=[0, 1, 2]), "must have 4 entries"),
    (lambda: patterns.get_pattern("delay", 4, delays=[-1, 0, 1, 2]), ">= 0"),
    (lambda: patterns.get_pattern("delay", 4, delays=[0, 1.5, 2, 3]), "integer"),
    (lambda: patterns.get_pattern("delay", 4, delays=5), "list of 4 integers"),
    (lambda: patterns.get_pattern("coarse_first", 4, delays=[0, 1, 2, 3]), "must have 3 entries"),
    (lambda: patterns.get_pattern("unroll", 3, flattening=[1, 0, 2]), "flattening must be sorted"),
    (lambda: patterns.get_pattern("unroll", 3, flattening=[0, 1, 1], delays=[0, 1, 2]),
     "share inner step 1.*same delay"),
    (lambda: patterns.get_pattern("musiclm", 4, group_by=0), "group_by must be an integer >= 1"),
    (lambda: patterns.get_pattern("delay", 0), "n_q must be an integer >= 1"),
    (lambda: patterns.get_pattern("delay", 4).layout(0), "num_timesteps must be an integer >= 1"),
    (lambda: patterns.get_pattern("delay", 4).num_timesteps(3), "no number of timesteps T gives 3 steps"),
    (lambda: patterns.get_pattern("unroll", 4).num_timesteps(10), "no number of timesteps"),
    (lambda: patterns.get_pattern("delay", 4).build(np.zeros((2, 3, 5), np.int32), 0),
     "expected 4, got 3"),
    (lambda: patterns.get_pattern("delay", 4).build(np.zeros((4, 5), np.int32), 0), r"\[B, K, T\]"),
    (lambda: patterns.get_pattern("delay", 4).revert(np.zeros((2, 5, 9), np.int32), 0), "expected 4, got 5"),
    (lambda: patterns.get_pattern("delay", 4).revert(np.zeros((2, 4, 9), np.int32), 0, num_timesteps=6),
     "more timesteps than the layout holds"),
    (lambda: patterns.get_pattern("delay", 4).revert_logits(np.zeros((2, 4, 9, 3)), num_timesteps=6),
     "more timesteps than the layout holds"),
    (lambda: patterns.get_pattern("delay", 4).revert_logits(np.zeros((2, 2, 9, 3))), "expected 4, got 2"),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()

"""Codebook interleaving patterns (MusicGen paper, Sec. 2.2; audiocraft's codebook pattern providers).

The codec gives K parallel token streams codes[b, k, t], t < T. The LM reads one sequence of S steps: at
each step one token per codebook (their embeddings are summed), and it predicts one token per codebook for
the next step. A pattern says which (codebook k, timestep t) sits at which step s:

  layout(T)[k, s] = t    slot (k, s) holds codes[:, k, t]
  layout(T)[k, s] = -1   empty slot: holds the special token, never a prediction target

Step 0 is always empty (all special tokens): it is the input from which the first codes are predicted.
Every (k, t) with t < T appears exactly once. Lengths S = num_steps(T) count step 0 and equal the length
of audiocraft's layout for T timesteps.

Patterns, by the names audiocraft's configs use (`codebooks_pattern.modeling`):

  parallel      (k, t) at step t + 1: all codebooks of a timestep together.        S = T + 1
  delay         (k, t) at step t + delays[k] + 1 (MusicGen). Default delays 0..K-1. S = T + max(delays) + 1
                Stereo MusicGen models use 8 codebooks interleaved left/right (L0, R0, L1, R1, ...) with
                delays [0, 0, 1, 1, 2, 2, 3, 3]: that is just this pattern with those delays.
  unroll        flattening: every timestep becomes a block of max(flattening) + 1 steps; codebook k is
                emitted at inner step flattening[k] of its block (codebooks sharing an inner step go
                together, unused inner steps are empty steps). delays[k] moves a whole inner-step group
                that many blocks later (codebooks sharing an inner step must share their delay). Default:
                full flattening, one codebook per step, no delays: S = K * T + 1.
                Steps are ordered as audiocraft orders them: by block (t + delay), then empty steps
                first, then by timestep, then by codebook.
  coarse_first  codebook 0 for all T timesteps first (steps 1..T), then codebooks 1..K-1 as a delay
                pattern with K - 1 delays (default all 0).                       S = 2T + max(delays) + 1
                Not causal in time across the two phases: sampling must always produce the full
                trained duration. With K = 1 there is no second phase (S = T + 1; audiocraft rejects K = 1).
  musiclm       codebooks in groups of `group_by` (default 2); each group fully flattened over all T
                timesteps, group after group.                                   S = K * T + 1
                When group_by does not divide K, the last group holds the remaining codebooks.

`trim_tail=True` (an argument of layout/build/revert...) drops the last `max_delay` steps, which only exist
to finish the delayed codebooks: audiocraft's `keep_only_valid_steps=True`, which its LM training uses.
The trimmed-off (k, t) then have mask False in revert / revert_logits and must be left out of the loss.

Training convention (revert_logits): the LM output at step s predicts the tokens at step s + 1, so the
logits for (k, t) come from the step before the one holding (k, t); the loss is masked CE between
revert_logits(model(build(codes))) and codes, as in audiocraft's LMModel.compute_predictions.

Layouts are static numpy arrays built once per (pattern, T) on the host; build / revert are jnp gathers
with those tables as constants, so they jit with no retrace for a new batch of the same shape.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PATTERN_NAMES = ("parallel", "delay", "unroll", "coarse_first", "musiclm")
_OPTIONS = {
    "parallel": (),
    "delay": ("delays",),
    "unroll": ("flattening", "delays"),
    "coarse_first": ("delays",),
    "musiclm": ("group_by",),
}


def _int(name: str, value: Any, minimum: int) -> int:
  """`value` as a Python int >= minimum, or a ValueError naming `name`."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
  return int(value)


def _int_tuple(name: str, values: Any, length: int, sorted_: bool = True) -> tuple[int, ...]:
  """A sequence of `length` non-negative ints (ascending when `sorted_`) as a tuple, else ValueError."""
  if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
    raise ValueError(f"{name} must be a list of {length} integers, got {values!r}")
  out = tuple(_int(f"{name} entries", v, 0) for v in values)
  if len(out) != length:
    raise ValueError(f"{name} must have {length} entries (one per codebook), got {len(out)}: {list(out)}")
  if sorted_ and list(out) != sorted(out):
    raise ValueError(f"{name} must be sorted in ascending order, got {list(out)}")
  return out


@dataclasses.dataclass(frozen=True)
class Pattern:
  """Base class: a static interleaving of n_q codebook streams (see the module docstring).

  Subclasses define `_raw_layout(T)` (timesteps, possibly >= T, where the pattern's grid puts them), the
  affine step count `_steps_affine` (num_steps(T) = a * T + b) and `max_delay`. Instances are frozen and
  hashable, so a pattern can be a static argument of jax.jit.
  """
  n_q: int

  def __post_init__(self):
    _int("n_q", self.n_q, 1)

  # ---- subclass hooks --------------------------------------------------------------------------------
  @property
  def _steps_affine(self) -> tuple[int, int]:
    raise NotImplementedError

  @property
  def max_delay(self) -> int:
    """Trailing steps that only finish delayed codebooks (audiocraft's `Pattern.max_delay`).

    The pattern's grid reaches `max_delay` timesteps past T - 1 (those slots are empty); `trim_tail=True`
    drops the last `max_delay` steps. For the delay pattern it is max(delays) - min(delays).
    """
    raise NotImplementedError

  def _raw_layout(self, num_timesteps: int) -> np.ndarray:
    """[K, S] int64: the timestep each slot of the grid holds (may be >= T), -1 for no coordinate."""
    raise NotImplementedError

  # ---- static tables ---------------------------------------------------------------------------------
  def num_steps(self, num_timesteps: int, *, trim_tail: bool = False) -> int:
    """Sequence steps S for T timesteps, counting the initial empty step 0."""
    t = _int("num_timesteps", num_timesteps, 1)
    a, b = self._steps_affine
    return a * t + b - (self.max_delay if trim_tail else 0)

  def num_timesteps(self, num_steps: int, *, trim_tail: bool = False) -> int:
    """The T with num_steps(T) == S; ValueError when no T gives exactly S steps."""
    s = _int("num_steps", num_steps, 0)
    a, b = self._steps_affine
    b -= self.max_delay if trim_tail else 0
    if s < a + b or (s - b) % a:
      raise ValueError(
          f"no number of timesteps T gives {s} steps for {self}: S = {a} * T + {b} with T >= 1; "
          "pass num_timesteps explicitly or fix the sequence length")
    return (s - b) // a

  def layout(self, num_timesteps: int, *, trim_tail: bool = False) -> np.ndarray:
    """[K, S] int32 (read-only): timestep t held by codebook k at step s, or -1 for the special token."""
    return _tables(self, _int("num_timesteps", num_timesteps, 1), bool(trim_tail))[0]

  def positions(self, num_timesteps: int, *, trim_tail: bool = False) -> np.ndarray:
    """[K, T] int32 (read-only): the step s holding (k, t); -1 where trim_tail dropped it."""
    return _tables(self, _int("num_timesteps", num_timesteps, 1), bool(trim_tail))[1]

  def valid_steps_mask(self, num_timesteps: int, *, trim_tail: bool = False) -> np.ndarray:
    """[K, S] bool: slot (k, s) holds a real code (not the special token).

    For continuation, the slots holding a prompt of T_p timesteps are
    `(layout(T) >= 0) & (layout(T) < T_p)`.
    """
    return self.layout(num_timesteps, trim_tail=trim_tail) >= 0

  # ---- jnp gathers -----------------------------------------------------------------------------------
  def _check(self, x: jax.Array, what: str, shape: str) -> None:
    """ValueError unless x has the rank `shape` describes ("..." = any trailing dims) and K = n_q."""
    rank_ok = x.ndim >= 3 if "..." in shape else x.ndim == 3
    if not rank_ok:
      raise ValueError(f"{what} must have shape {shape}, got shape {tuple(x.shape)}")
    if x.shape[1] != self.n_q:
      raise ValueError(f"{what} {shape} has K={x.shape[1]} codebooks on axis 1 but the pattern has "
                       f"n_q={self.n_q}: expected {self.n_q}, got {x.shape[1]}")

  def build(self, codes: jax.Array, special_token: int | jax.Array, *,
            trim_tail: bool = False) -> jax.Array:
    """Interleave codes [B, K, T] into the pattern sequence [B, K, S], special_token in empty slots."""
    codes_bkt = jnp.asarray(codes)
    self._check(codes_bkt, "codes", "[B, K, T]")
    layout_ks = self.layout(codes_bkt.shape[2], trim_tail=trim_tail)
    valid_ks = layout_ks >= 0
    rows_k1 = np.arange(self.n_q)[:, None]
    seq_bks = codes_bkt[:, rows_k1, np.where(valid_ks, layout_ks, 0)]
    return jnp.where(valid_ks[None], seq_bks, jnp.asarray(special_token).astype(codes_bkt.dtype))

  def revert_values(self, x: jax.Array, num_timesteps: int | None = None, *, fill: Any = 0,
                    predictions: bool = False, trim_tail: bool = False) -> tuple[jax.Array, np.ndarray]:
    """Un-interleave any per-step array x [B, K, S, ...] -> (values [B, K, T, ...], mask [K, T] bool).

    values[:, k, t] = x[:, k, s] with s the step holding (k, t) or, when `predictions` is True,
    x[:, k, s - 1]: x is then a model output aligned with its input sequence, whose step s - 1 predicts
    the token at step s. mask[k, t] is False where (k, t) is not in the sequence (only with
    trim_tail=True); those values are `fill`. T defaults to num_timesteps(S); an explicit T needs
    S >= num_steps(T) (extra trailing steps are ignored).
    """
    return self._revert(x, "x", "[B, K, S, ...]", num_timesteps, fill, predictions, trim_tail)

  def _revert(self, x: jax.Array, what: str, shape: str, num_timesteps: int | None, fill: Any,
              predictions: bool, trim_tail: bool) -> tuple[jax.Array, np.ndarray]:
    """Shared body of revert / revert_values / revert_logits (one static gather over axis 2)."""
    x = jnp.asarray(x)
    self._check(x, what, shape)
    num_seq_steps = x.shape[2]
    if num_timesteps is None:
      num_timesteps = self.num_timesteps(num_seq_steps, trim_tail=trim_tail)
    needed = self.num_steps(num_timesteps, trim_tail=trim_tail)
    if num_seq_steps < needed:
      raise ValueError(
          f"num_timesteps={num_timesteps} needs {needed} steps but the sequence has {num_seq_steps}: "
          "asked for more timesteps than the layout holds")
    pos_kt = self.positions(num_timesteps, trim_tail=trim_tail)
    mask_kt = pos_kt >= 0
    # Step 0 holds no code, so pos - 1 >= 0 wherever mask is True.
    steps_kt = np.where(mask_kt, pos_kt - (1 if predictions else 0), 0)
    values = x[:, np.arange(self.n_q)[:, None], steps_kt]
    if not mask_kt.all():
      mask_b = mask_kt.reshape((1,) + mask_kt.shape + (1,) * (x.ndim - 3))
      values = jnp.where(mask_b, values, jnp.asarray(fill).astype(x.dtype))
    return values, mask_kt

  def revert(self, seq: jax.Array, special_token: int | jax.Array, num_timesteps: int | None = None, *,
             trim_tail: bool = False) -> tuple[jax.Array, np.ndarray]:
    """Pattern sequence [B, K, S] -> (codes [B, K, T], mask [K, T] bool); inverse of build.

    T defaults to num_timesteps(S); an explicit T needs S >= num_steps(T), else ValueError. Positions
    with mask False (only with trim_tail=True) hold special_token; for a complete sequence the mask is
    all True. The mask is a static numpy array (it depends on shapes only).
    """
    return self._revert(seq, "seq", "[B, K, S]", num_timesteps, special_token, False, trim_tail)

  def revert_logits(self, logits: jax.Array, num_timesteps: int | None = None, *, fill: Any = 0.0,
                    trim_tail: bool = False) -> tuple[jax.Array, np.ndarray]:
    """LM outputs on a pattern sequence [B, K, S, card] -> (logits [B, K, T, card], mask [K, T]).

    Convention (next-token prediction, as audiocraft's LMModel.compute_predictions): `logits` is the
    output of the causal LM applied to the sequence `build(codes)` itself (same S, no shifting by the
    caller); the output at step s predicts the tokens at step s + 1. So the logits for (k, t) are taken
    from the step *before* the step holding (k, t), and the last step's output is unused. The result is
    aligned with `codes`: the loss is CE(revert_logits(model(build(codes)))[0], codes) over `mask`.
    Masked-out positions (only with trim_tail=True) are `fill`. Works for any trailing dims.
    """
    return self._revert(logits, "logits", "[B, K, S, ...]", num_timesteps, fill, True, trim_tail)


@functools.lru_cache(maxsize=256)
def _tables(pattern: Pattern, num_timesteps: int, trim_tail: bool) -> tuple[np.ndarray, np.ndarray]:
  """(layout [K, S], positions [K, T]) int32 read-only arrays for one (pattern, T, trim_tail).

  Built once per key on the host; read-only so a cached table cannot be changed by a caller.
  """
  raw_ks = pattern._raw_layout(num_timesteps)
  assert raw_ks.shape == (pattern.n_q, pattern.num_steps(num_timesteps)), raw_ks.shape
  layout_ks = np.where(raw_ks < num_timesteps, raw_ks, -1).astype(np.int32)
  if trim_tail and pattern.max_delay:
    layout_ks = layout_ks[:, :-pattern.max_delay]
  layout_ks = np.ascontiguousarray(layout_ks)
  pos_kt = np.full((pattern.n_q, num_timesteps), -1, np.int32)
  k_idx, s_idx = np.nonzero(layout_ks >= 0)
  pos_kt[k_idx, layout_ks[k_idx, s_idx]] = s_idx
  layout_ks.setflags(write=False)
  pos_kt.setflags(write=False)
  return layout_ks, pos_kt


def _delayed_block(delays: tuple[int, ...], length: int) -> np.ndarray:
  """[len(delays), length]: column j holds timestep j - delays[k] for codebook k, -1 before its start."""
  t_kj = np.arange(length)[None, :] - np.asarray(delays, np.int64)[:, None]
  return np.where(t_kj >= 0, t_kj, -1)


@dataclasses.dataclass(frozen=True)
class DelayPattern(Pattern):
  """Codebook k of timestep t at step t + delays[k] + 1; delays sorted ascending (parallel: all 0)."""
  delays: tuple[int, ...] | None = None

  def __post_init__(self):
    super().__post_init__()
    delays = tuple(range(self.n_q)) if self.delays is None else self.delays
    object.__setattr__(self, "delays", _int_tuple("delays", delays, self.n_q))

  @property
  def _steps_affine(self) -> tuple[int, int]:
    return 1, 1 + self.delays[-1]

  @property
  def max_delay(self) -> int:
    return self.delays[-1] - self.delays[0]

  def _raw_layout(self, num_timesteps: int) -> np.ndarray:
    block = _delayed_block(self.delays, num_timesteps + self.delays[-1])
    return np.concatenate([np.full((self.n_q, 1), -1), block], axis=1)


@dataclasses.dataclass(frozen=True)
class UnrollPattern(Pattern):
  """Flattening of codebooks into inner steps, with optional per-group delays (audiocraft's unroll)."""
  flattening: tuple[int, ...] | None = None
  delays: tuple[int, ...] | None = None

  def __post_init__(self):
    super().__post_init__()
    flattening = tuple(range(self.n_q)) if self.flattening is None else self.flattening
    delays = (0,) * self.n_q if self.delays is None else self.delays
    flattening = _int_tuple("flattening", flattening, self.n_q)
    delays = _int_tuple("delays", delays, self.n_q)
    for k in range(1, self.n_q):
      if flattening[k] == flattening[k - 1] and delays[k] != delays[k - 1]:
        raise ValueError(
            f"codebooks {k - 1} and {k} share inner step {flattening[k]} in flattening but have different "
            f"delays ({delays[k - 1]} != {delays[k]}); give codebooks flattened together the same delay")
    object.__setattr__(self, "flattening", flattening)
    object.__setattr__(self, "delays", delays)

  def _groups(self) -> dict[int, tuple[list[int], int]]:
    """inner step -> (codebooks emitted at that inner step, their shared delay)."""
    groups: dict[int, tuple[list[int], int]] = {}
    for k, (inner, delay) in enumerate(zip(self.flattening, self.delays)):
      groups.setdefault(inner, ([], delay))[0].append(k)
    return groups

  @property
  def _num_inner(self) -> int:
    return self.flattening[-1] + 1

  @property
  def _steps_affine(self) -> tuple[int, int]:
    group_delays = [delay for _, delay in self._groups().values()]
    return self._num_inner, 1 + self._num_inner * self.delays[-1] - sum(group_delays)

  @property
  def max_delay(self) -> int:
    return self.delays[-1] - self.delays[0]

  def _raw_layout(self, num_timesteps: int) -> np.ndarray:
    horizon = num_timesteps + self.delays[-1]
    groups = self._groups()
    # One entry per emitted step; sort keys (block, non-empty, timestep, first codebook).
    blocks, nonempty, times, first_k, owner = [], [], [], [], []
    for inner in range(self._num_inner):
      if inner in groups:
        codebooks, delay = groups[inner]
        t = np.arange(horizon - delay)  # the grid stops at block `horizon`
        blocks.append(t + delay)
        first_k.append(np.full_like(t, codebooks[0]))
      else:
        t = np.arange(horizon)
        blocks.append(t)
        first_k.append(np.full_like(t, -1))
      nonempty.append(np.full_like(t, inner in groups))
      times.append(t)
      owner.append(np.full_like(t, inner))
    blocks, nonempty, times, first_k, owner = map(np.concatenate, (blocks, nonempty, times, first_k, owner))
    order = np.lexsort((first_k, times, nonempty, blocks))
    raw_ks = np.full((self.n_q, 1 + order.size), -1, np.int64)
    steps = 1 + np.arange(order.size)
    for inner, (codebooks, _) in groups.items():
      sel = owner[order] == inner
      raw_ks[np.asarray(codebooks)[:, None], steps[sel][None, :]] = times[order][sel][None, :]
    return raw_ks


@dataclasses.dataclass(frozen=True)
class CoarseFirstPattern(Pattern):
  """Codebook 0 over all timesteps first, then codebooks 1..K-1 delayed by `delays` (K - 1 entries)."""
  delays: tuple[int, ...] | None = None

  def __post_init__(self):
    super().__post_init__()
    delays = (0,) * (self.n_q - 1) if self.delays is None else self.delays
    object.__setattr__(self, "delays", _int_tuple("delays", delays, self.n_q - 1))

  @property
  def _steps_affine(self) -> tuple[int, int]:
    return (2, 1 + self.delays[-1]) if self.delays else (1, 1)

  @property
  def max_delay(self) -> int:
    return self.delays[-1] - self.delays[0] if self.delays else 0

  def _raw_layout(self, num_timesteps: int) -> np.ndarray:
    raw_ks = np.full((self.n_q, self.num_steps(num_timesteps)), -1, np.int64)
    raw_ks[0, 1:1 + num_timesteps] = np.arange(num_timesteps)
    if self.delays:
      raw_ks[1:, 1 + num_timesteps:] = _delayed_block(self.delays, num_timesteps + self.delays[-1])
    return raw_ks


@dataclasses.dataclass(frozen=True)
class MusicLMPattern(Pattern):
  """Groups of `group_by` codebooks, each group flattened over all timesteps, group after group."""
  group_by: int = 2

  def __post_init__(self):
    super().__post_init__()
    _int("group_by", self.group_by, 1)

  @property
  def _steps_affine(self) -> tuple[int, int]:
    return self.n_q, 1

  @property
  def max_delay(self) -> int:
    return 0

  def _raw_layout(self, num_timesteps: int) -> np.ndarray:
    raw_ks = np.full((self.n_q, self.num_steps(num_timesteps)), -1, np.int64)
    first_step = 1
    for start in range(0, self.n_q, self.group_by):
      size = min(self.group_by, self.n_q - start)
      # Group codebook start + i of timestep t at first_step + t * size + i.
      steps_it = first_step + np.arange(num_timesteps)[None, :] * size + np.arange(size)[:, None]
      raw_ks[np.arange(start, start + size)[:, None], steps_it] = np.arange(num_timesteps)[None, :]
      first_step += size * num_timesteps
    return raw_ks


def get_pattern(name: str, n_q: int, **options: Any) -> Pattern:
  """The pattern `name` (one of PATTERN_NAMES) for n_q codebooks, with audiocraft's option names.

  Options: delay: delays (K sorted ints >= 0, default 0..K-1; stereo: [0, 0, 1, 1, 2, 2, 3, 3]);
  unroll: flattening (K sorted ints, default 0..K-1), delays (K sorted ints, default 0);
  coarse_first: delays (K - 1 sorted ints, default 0); musiclm: group_by (int >= 1, default 2);
  parallel: none. An option given as None takes its default.
  """
  if name not in _OPTIONS:
    raise ValueError(f"unknown codebook pattern {name!r}; valid names: {', '.join(PATTERN_NAMES)}")
  n_q = _int("n_q", n_q, 1)
  unknown = sorted(set(options) - set(_OPTIONS[name]))
  if unknown:
    valid = ", ".join(_OPTIONS[name]) or "none"
    raise ValueError(f"unknown option(s) {', '.join(unknown)} for pattern {name!r}; valid options: {valid}")
  if name == "parallel":
    return DelayPattern(n_q, (0,) * n_q)
  if name == "delay":
    return DelayPattern(n_q, options.get("delays"))
  if name == "unroll":
    return UnrollPattern(n_q, options.get("flattening"), options.get("delays"))
  if name == "coarse_first":
    return CoarseFirstPattern(n_q, options.get("delays"))
  group_by = options.get("group_by")
  return MusicLMPattern(n_q, 2 if group_by is None else group_by)

"""Residual vector quantization (RVQ) as pure functions over a codebook pytree, as EnCodec trains it.

Codebook k of K quantizes the residual left by codebooks 0..k-1 (nearest code in L2); a frame decodes
to the sum of its K chosen codes. The codebooks are not trained by gradient: each follows exponential
moving averages (EMA) of the vectors assigned to its codes, starts from k-means on the first batch it
sees, and re-seeds its dead codes (EMA use below a threshold) from the batch. The encoder learns through
the straight-through output and the commitment loss. Quantizer dropout trains with a random number
n_q of active codebooks (variable bitrate); n_q may be traced: codebooks >= n_q are masked, not sliced.

Layout: K codebooks of C codes of dimension D; frames x [B, T, D]; codes int32 [B, K, T].

Inference:  nearest_code, rvq_encode, rvq_decode (a plain embed [K, C, D] array, no state).
Training:   init_codebooks -> CodebookState; train_quantize = kmeans_init -> quantize -> ema_update;
            sample_n_q / codebook_mask for quantizer dropout.

Where this differs from audiocraft (audiocraft/quantization/core_vq.py), on purpose:
- The EMA state is kept consistent: embed_sum == embed * cluster_size after k-means (audiocraft copies the
  k-means centres unscaled into its embed_avg, so its next EMA step divides each code by its count).
- Dead codes are replaced after the EMA step, and the replacement is written into embed_sum and
  cluster_size too (= vector * threshold, threshold). In audiocraft the replaced `embed` is overwritten
  by the EMA renormalisation in the same call, so its replacement never takes effect.
"""
from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


@struct.dataclass
class CodebookState:
  """EMA codebooks of a residual vector quantizer: K codebooks of C codes of dimension D."""
  embed: jax.Array         # [K, C, D] code vectors used to encode and decode
  cluster_size: jax.Array  # [K, C] EMA of how many vectors each code was assigned per batch
  embed_sum: jax.Array     # [K, C, D] EMA of the sum of the vectors assigned to each code
  initialized: jax.Array   # [K] bool; False until k-means has run on a batch

  @property
  def num_codebooks(self) -> int:
    return self.embed.shape[0]

  @property
  def codebook_size(self) -> int:
    return self.embed.shape[1]

  @property
  def dim(self) -> int:
    return self.embed.shape[2]


@struct.dataclass
class QuantizeOutput:
  """What `quantize` returns for one batch of frames x [B, T, D]."""
  quantized_btd: jax.Array   # [B, T, D] sum of the active codes; gradient wrt x is the identity
  codes_bkt: jax.Array       # [B, K, T] int32; entries of inactive codebooks (mask_bk False) are unused
  commit_loss: jax.Array     # [] mean over active (example, codebook) pairs of MSE(residual, sg(code))
  residuals_kbtd: jax.Array  # [K, B, T, D] input of each codebook (stop-gradient), for ema_update
  mask_bk: jax.Array         # [B, K] bool, True where codebook k is active for example b


def init_codebooks(rng: jax.Array, num_codebooks: int, codebook_size: int, dim: int,
                   kmeans_init: bool = True) -> CodebookState:
  """Fresh state for K=num_codebooks codebooks of C=codebook_size codes of dimension D=dim.

  kmeans_init=True: zero codes marked uninitialized; `kmeans_init` (the function) fills them from the
  first batch. kmeans_init=False: codes uniform in +-sqrt(6 / D) (Kaiming-uniform, as audiocraft),
  marked initialized, with zero EMA counts (so unused codes are re-seeded by the first EMA step).
  """
  for name, value in (('num_codebooks', num_codebooks), ('codebook_size', codebook_size), ('dim', dim)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be a positive int; got {value!r}')
  shape = (num_codebooks, codebook_size, dim)
  if kmeans_init:
    embed = jnp.zeros(shape, jnp.float32)
  else:
    bound = (6.0 / dim) ** 0.5
    embed = jax.random.uniform(rng, shape, jnp.float32, -bound, bound)
  return CodebookState(
      embed=embed,
      cluster_size=jnp.zeros(shape[:2], jnp.float32),
      embed_sum=jnp.zeros(shape, jnp.float32),
      initialized=jnp.full((num_codebooks,), not kmeans_init, bool))


# ----------------------------------------------------------------------------- encode / decode


def nearest_code(embed_cd: jax.Array, x_nd: jax.Array) -> jax.Array:
  """Index of the L2-nearest row of `embed_cd` [C, D] for each row of `x_nd` [N, D] -> int32 [N].

  Distances are |x|^2 - 2 x.e + |e|^2 as in the reference implementations, with the matmul at full fp32
  precision (TPUs otherwise round it to bf16). Ties go to the lowest index.
  """
  dots_nc = jnp.dot(x_nd, embed_cd.T, precision=_HIGHEST)
  dist_nc = (jnp.sum(x_nd**2, -1, keepdims=True) - 2.0 * dots_nc
             + jnp.sum(embed_cd**2, -1)[None, :])
  return jnp.argmin(dist_nc, axis=-1).astype(jnp.int32)


def _rvq_scan(embed_kcd: jax.Array, x_nd: jax.Array, mask_kn: jax.Array | None = None):
  """Greedy residual quantization of x [N, D] through the K codebooks (one lax.scan).

  Returns codes [K, N], codes' vectors [K, N, D], the input residual of each codebook [K, N, D], and the
  running sum over k of the vectors where mask_kn is True [N, D] (summed in k order, as rvq_decode does).
  """
  if mask_kn is None:
    mask_kn = jnp.ones(embed_kcd.shape[:1] + x_nd.shape[:1], bool)

  def step(carry, xs):
    resid_nd, acc_nd = carry
    embed_cd, m_n = xs
    codes_n = nearest_code(embed_cd, resid_nd)
    q_nd = embed_cd[codes_n]
    acc_nd = acc_nd + jnp.where(m_n[:, None], q_nd, 0.0)
    return (resid_nd - q_nd, acc_nd), (codes_n, q_nd, resid_nd)

  (_, acc_nd), (codes_kn, q_knd, resid_knd) = lax.scan(
      step, (x_nd, jnp.zeros_like(x_nd)), (embed_kcd, mask_kn))
  return codes_kn, q_knd, resid_knd, acc_nd


def rvq_encode(embed_kcd: jax.Array, x_btd: jax.Array, n_q: int | None = None) -> jax.Array:
  """Residual quantization of x [B, T, D] with the first n_q (static, default K) codebooks -> int32 [B, n_q, T]."""
  k, _, d = embed_kcd.shape
  try:
    n = k if n_q is None else operator.index(n_q)
  except TypeError:
    n = 0
  if not 1 <= n <= k:
    raise ValueError(f'n_q must be a static int in [1, {k}] (the number of codebooks; a traced n_q '
                     f'needs quantize); got {n_q!r}')
  n_q = n
  if x_btd.ndim != 3 or x_btd.shape[-1] != d:
    raise ValueError(f'x must be [B, T, {d}] to match the codebooks; got shape {tuple(x_btd.shape)}')
  b, t, _ = x_btd.shape
  codes_kn, _, _, _ = _rvq_scan(embed_kcd[:n_q], x_btd.reshape(b * t, d).astype(embed_kcd.dtype))
  return codes_kn.reshape(n_q, b, t).transpose(1, 0, 2)


def rvq_decode(embed_kcd: jax.Array, codes_bkt: jax.Array) -> jax.Array:
  """Sum of codebook lookups: codes [B, n_q, T] -> [B, T, D], using the first n_q codebooks in order."""
  n_q = codes_bkt.shape[1]
  if codes_bkt.ndim != 3 or not 1 <= n_q <= embed_kcd.shape[0]:
    raise ValueError(f'codes must be [B, n_q, T] with 1 <= n_q <= {embed_kcd.shape[0]}; '
                     f'got shape {tuple(codes_bkt.shape)}')
  b, _, t = codes_bkt.shape

  def step(acc_btd, xs):
    embed_cd, codes_bt = xs
    return acc_btd + embed_cd[codes_bt], None

  acc_btd = jnp.zeros((b, t, embed_kcd.shape[2]), embed_kcd.dtype)
  out_btd, _ = lax.scan(step, acc_btd, (embed_kcd[:n_q], codes_bkt.transpose(1, 0, 2)))
  return out_btd


# ----------------------------------------------------------------------------- quantizer dropout


def sample_n_q(rng: jax.Array, num_codebooks: int, batch_size: int | None = None,
               min_n_q: int = 1) -> jax.Array:
  """Random number of active codebooks, uniform in [min_n_q, K] -> int32 [] (per batch, as audiocraft's
  q_dropout) or int32 [batch_size] (per example)."""
  if not isinstance(num_codebooks, int) or not 1 <= min_n_q <= num_codebooks:
    raise ValueError(f'need 1 <= min_n_q <= num_codebooks; got min_n_q={min_n_q!r}, '
                     f'num_codebooks={num_codebooks!r}')
  shape = () if batch_size is None else (batch_size,)
  return jax.random.randint(rng, shape, min_n_q, num_codebooks + 1, jnp.int32)


def codebook_mask(n_q: int | jax.Array | None, num_codebooks: int, batch_size: int) -> jax.Array:
  """Which codebooks are active: [B, K] bool, True where k < n_q (n_q: None = all, int, or int array
  [] or [B], possibly traced; traced values are clipped to [1, K])."""
  if n_q is None:
    return jnp.ones((batch_size, num_codebooks), bool)
  if isinstance(n_q, int) and not 1 <= n_q <= num_codebooks:
    raise ValueError(f'n_q must be in [1, {num_codebooks}] (the number of codebooks); got {n_q}')
  n_q = jnp.asarray(n_q)
  if n_q.ndim == 0:
    n_q = jnp.broadcast_to(n_q, (batch_size,))
  elif n_q.shape != (batch_size,):
    raise ValueError(f'n_q must be a scalar or have shape [B]=({batch_size},); got shape {n_q.shape}')
  n_q = jnp.clip(n_q.astype(jnp.int32), 1, num_codebooks)
  return jnp.arange(num_codebooks)[None, :] < n_q[:, None]


def _frame_mask(mask_bk: jax.Array, t: int) -> jax.Array:
  """[B, K] -> [K, B * T]: codebook k's mask for every frame of x flattened to [B * T, D]."""
  return jnp.repeat(mask_bk.T, t, axis=1)


# ----------------------------------------------------------------------------- training forward


def _check_frames(state: CodebookState, x_btd: jax.Array) -> tuple[int, int, int]:
  if x_btd.ndim != 3 or x_btd.shape[-1] != state.dim:
    raise ValueError(f'x must be [B, T, {state.dim}] to match the codebooks; '
                     f'got shape {tuple(x_btd.shape)}')
  return x_btd.shape


def quantize(state: CodebookState, x_btd: jax.Array,
             n_q: int | jax.Array | None = None) -> QuantizeOutput:
  """Training forward of the RVQ with the current codebooks (no state change; see train_quantize).

  x [B, T, D]; n_q: None (all K), an int, or an int array [] / [B] (traced is fine) of active codebooks.
  - quantized_btd: value is the sum of the active codes (bitwise rvq_decode of the first n_q codes);
    written sg(q) + (x - sg(x)), the straight-through x + sg(q - x) without its rounding.
  - commit_loss: for each active (example b, codebook k), the mean over [T, D] of
    (residual_k - sg(code_k))^2, then the mean over active pairs. With one n_q for the batch this is
    audiocraft's penalty: the mean over the n_q codebooks of each codebook's MSE. As in audiocraft, each
    residual after the first is computed from the straight-through output, so it carries no gradient:
    only codebook 0's term back-propagates into x, the others only add to the value.
  """
  b, t, d = _check_frames(state, x_btd)
  k = state.num_codebooks
  mask_bk = codebook_mask(n_q, k, b)
  x_nd = x_btd.reshape(b * t, d).astype(state.embed.dtype)
  codes_kn, q_knd, resid_knd, qsum_nd = _rvq_scan(
      state.embed, lax.stop_gradient(x_nd), _frame_mask(mask_bk, t))
  quantized_nd = lax.stop_gradient(qsum_nd) + (x_nd - lax.stop_gradient(x_nd))

  resid_knd = lax.stop_gradient(resid_knd)
  loss_input_knd = resid_knd.at[0].set(x_nd)  # same values; only codebook 0 keeps a path to x
  sq_kbt = jnp.mean((loss_input_knd - lax.stop_gradient(q_knd))**2, -1).reshape(k, b, t)
  mse_bk = jnp.mean(sq_kbt, -1).T
  commit_loss = jnp.sum(jnp.where(mask_bk, mse_bk, 0.0)) / jnp.sum(mask_bk)

  return QuantizeOutput(
      quantized_btd=quantized_nd.reshape(b, t, d).astype(x_btd.dtype),
      codes_bkt=codes_kn.reshape(k, b, t).transpose(1, 0, 2),
      commit_loss=commit_loss,
      residuals_kbtd=resid_knd.reshape(k, b, t, d),
      mask_bk=mask_bk)


# ----------------------------------------------------------------------------- codebook learning


def sample_vectors(rng: jax.Array, x_nd: jax.Array, num: int,
                   weight_n: jax.Array | None = None) -> jax.Array:
  """`num` rows of x [N, D] drawn at random among those with weight > 0 -> [num, D].

  Distinct rows while there are enough (a random permutation), then rows drawn with replacement.
  """
  n = x_nd.shape[0]
  valid_n = jnp.ones((n,), bool) if weight_n is None else weight_n > 0
  key_perm, key_extra = jax.random.split(rng)
  order_n = jnp.argsort(jnp.where(valid_n, jax.random.uniform(key_perm, (n,)), 2.0))  # valid rows first
  n_valid = jnp.maximum(jnp.sum(valid_n), 1)
  j = jnp.arange(num)
  pick = jnp.where(j < n_valid, j, jax.random.randint(key_extra, (num,), 0, n_valid))
  return x_nd[order_n[pick]]


def kmeans(rng: jax.Array, x_nd: jax.Array, num_clusters: int, num_iters: int = 50,
           weight_n: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Lloyd's k-means of x [N, D] (rows weighted by weight_n [N], default 1) -> (means [C, D], counts [C]).

  Centres start at rows sampled from the data; a centre left with no points keeps its place. counts are
  the weights assigned to each centre by the last iteration's assignment (audiocraft's `bins`).
  """
  if not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(f'num_iters must be an int >= 1; got {num_iters!r}')
  w_n = jnp.ones(x_nd.shape[:1], x_nd.dtype) if weight_n is None else weight_n.astype(x_nd.dtype)
  means_cd = sample_vectors(rng, x_nd, num_clusters, w_n)

  def body(_, carry):
    means_cd, _ = carry
    codes_n = nearest_code(means_cd, x_nd)
    counts_c = jax.ops.segment_sum(w_n, codes_n, num_clusters)
    sums_cd = jax.ops.segment_sum(x_nd * w_n[:, None], codes_n, num_clusters)
    has_c = counts_c > 0
    new_cd = sums_cd / jnp.where(has_c, counts_c, 1.0)[:, None]
    return jnp.where(has_c[:, None], new_cd, means_cd), counts_c

  return lax.fori_loop(0, num_iters, body, (means_cd, jnp.zeros((num_clusters,), x_nd.dtype)))


def kmeans_init(state: CodebookState, x_btd: jax.Array, rng: jax.Array,
                n_q: int | jax.Array | None = None, *, num_iters: int = 50) -> CodebookState:
  """Initialise, by k-means on this batch, each codebook that is uninitialized and active.

  Runs through the codebooks in order, as audiocraft's first forward does: codebook k's k-means sees the
  residual left by codebooks < k, themselves initialised first. Sets embed = means,
  cluster_size = counts, embed_sum = means * counts, initialized = True. Costs one predicate once every
  active codebook is initialized. x [B, T, D]; n_q as in `quantize` (frames of inactive examples are
  ignored).
  """
  b, t, d = _check_frames(state, x_btd)
  k, c = state.num_codebooks, state.codebook_size
  mask_bk = codebook_mask(n_q, k, b)
  w_kn = _frame_mask(mask_bk, t).astype(state.embed.dtype)
  needs_k = jnp.logical_not(state.initialized) & jnp.any(mask_bk, axis=0)
  x_nd = lax.stop_gradient(x_btd).reshape(b * t, d).astype(state.embed.dtype)
  keys = jax.random.split(rng, k)

  def init_all(st: CodebookState) -> CodebookState:
    def step(resid_nd, xs):
      embed_cd, cs_c, es_cd, inited, need, w_n, key = xs

      def run(_):
        means_cd, counts_c = kmeans(key, resid_nd, c, num_iters, w_n)
        return means_cd, counts_c, means_cd * counts_c[:, None], jnp.array(True)

      new = lax.cond(need, run, lambda _: (embed_cd, cs_c, es_cd, inited), None)
      codes_n = nearest_code(new[0], resid_nd)
      return resid_nd - new[0][codes_n], new

    _, (embed, cs, es, inited) = lax.scan(
        step, x_nd, (st.embed, st.cluster_size, st.embed_sum, st.initialized, needs_k, w_kn, keys))
    return CodebookState(embed=embed, cluster_size=cs, embed_sum=es, initialized=inited)

  return lax.cond(jnp.any(needs_k), init_all, lambda st: st, state)


def _check_ema_args(decay: float, epsilon: float, threshold_ema_dead_code: float) -> None:
  if not 0.0 <= decay <= 1.0:
    raise ValueError(f'decay must be in [0, 1]; got {decay}')
  if not epsilon > 0.0:
    raise ValueError(f'epsilon must be > 0 (Laplace smoothing); got {epsilon}')
  if not threshold_ema_dead_code >= 0.0:
    raise ValueError(f'threshold_ema_dead_code must be >= 0 (0 disables dead-code replacement); '
                     f'got {threshold_ema_dead_code}')


def ema_update(state: CodebookState, residuals_kbtd: jax.Array, codes_bkt: jax.Array,
               rng: jax.Array, mask_bk: jax.Array | None = None, *, decay: float = 0.99,
               epsilon: float = 1e-5, threshold_ema_dead_code: float = 2.0) -> CodebookState:
  """One EMA step of every active codebook from its inputs residuals [K, B, T, D] and codes [B, K, T].

  Per codebook, with n_c the number of (active) vectors assigned to code c and s_c their sum:
    cluster_size = decay * cluster_size + (1 - decay) * n_c
    embed_sum    = decay * embed_sum    + (1 - decay) * s_c
    embed        = embed_sum / (Laplace-smoothed cluster_size:
                   (cluster_size + eps) / (sum(cluster_size) + C * eps) * sum(cluster_size))
  then every code whose new cluster_size < threshold_ema_dead_code (0 disables) is re-seeded with a
  random active vector r of this batch: embed = r, embed_sum = r * threshold, cluster_size = threshold.
  mask_bk [B, K] (default all True, see QuantizeOutput.mask_bk) drops inactive examples' frames; a
  codebook with no active frame is left unchanged. decay, epsilon and the threshold are static.
  """
  _check_ema_args(decay, epsilon, threshold_ema_dead_code)
  k, b, t, d = residuals_kbtd.shape
  c = state.codebook_size
  if (k, d) != (state.num_codebooks, state.dim) or codes_bkt.shape != (b, k, t):
    raise ValueError(f'need residuals [K={state.num_codebooks}, B, T, D={state.dim}] and codes '
                     f'[B, K, T]; got {tuple(residuals_kbtd.shape)} and {tuple(codes_bkt.shape)}')
  if mask_bk is None:
    mask_bk = jnp.ones((b, k), bool)
  w_kn = _frame_mask(mask_bk, t).astype(state.embed.dtype)
  resid_knd = lax.stop_gradient(residuals_kbtd).reshape(k, b * t, d).astype(state.embed.dtype)
  codes_kn = codes_bkt.transpose(1, 0, 2).reshape(k, b * t)
  thr = float(threshold_ema_dead_code)

  def update_one(carry, xs):
    embed_cd, cs_c, es_cd, r_nd, codes_n, w_n, key = xs

    def run(_):
      counts_c = jax.ops.segment_sum(w_n, codes_n, c)
      sums_cd = jax.ops.segment_sum(r_nd * w_n[:, None], codes_n, c)
      new_cs_c = decay * cs_c + (1.0 - decay) * counts_c
      new_es_cd = decay * es_cd + (1.0 - decay) * sums_cd
      total = jnp.sum(new_cs_c)
      smoothed_c = (new_cs_c + epsilon) / (total + c * epsilon) * total
      new = (new_es_cd / smoothed_c[:, None], new_cs_c, new_es_cd)
      if thr <= 0.0:
        return new
      expired_c = new_cs_c < thr

      def replace(args):
        e_cd, n_c, s_cd = args
        r_cd = sample_vectors(key, r_nd, c, w_n)
        dead = expired_c[:, None]
        return (jnp.where(dead, r_cd, e_cd), jnp.where(expired_c, thr, n_c),
                jnp.where(dead, r_cd * thr, s_cd))

      return lax.cond(jnp.any(expired_c), replace, lambda args: args, new)

    new = lax.cond(jnp.any(w_n > 0), run, lambda _: (embed_cd, cs_c, es_cd), None)
    return carry, new

  _, (embed, cs, es) = lax.scan(
      update_one, None, (state.embed, state.cluster_size, state.embed_sum, resid_knd, codes_kn, w_kn,
                         jax.random.split(rng, k)))
  return state.replace(embed=embed, cluster_size=cs, embed_sum=es)


def train_quantize(state: CodebookState, x_btd: jax.Array, rng: jax.Array,
                   n_q: int | jax.Array | None = None, *, decay: float = 0.99, epsilon: float = 1e-5,
                   threshold_ema_dead_code: float = 2.0,
                   kmeans_iters: int = 50) -> tuple[QuantizeOutput, CodebookState]:
  """One training step of the quantizer, as EnCodec's RVQ forward in train mode -> (output, new state).

  k-means initialisation of uninitialized active codebooks, then `quantize` (encoded with the codebooks
  as they were before this step's EMA, as audiocraft), then `ema_update` of the active codebooks.
  Defaults are EnCodec's (audiocraft config rvq: decay 0.99, kmeans_iters 50, threshold 2). Multiply
  output.commit_loss by the commitment weight (audiocraft: 1) in the codec loss.
  """
  _check_ema_args(decay, epsilon, threshold_ema_dead_code)
  key_init, key_ema = jax.random.split(rng)
  state = kmeans_init(state, x_btd, key_init, n_q, num_iters=kmeans_iters)
  out = quantize(state, x_btd, n_q)
  state = ema_update(state, out.residuals_kbtd, out.codes_bkt, key_ema, out.mask_bk, decay=decay,
                     epsilon=epsilon, threshold_ema_dead_code=threshold_ema_dead_code)
  return out, state

"""Tests for musicgen_jax.quantization: RVQ encode/decode, straight-through, commitment loss, EMA,
k-means, dead codes and quantizer dropout, against numpy references, all under jax.jit."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musicgen_jax import quantization as vq


def _state(embed_kcd: np.ndarray, cluster_size_kc: np.ndarray | None = None) -> vq.CodebookState:
  """An initialized state with the given codes and consistent EMA sums."""
  embed = jnp.asarray(embed_kcd, jnp.float32)
  cs = jnp.ones(embed.shape[:2]) if cluster_size_kc is None else jnp.asarray(cluster_size_kc, jnp.float32)
  return vq.CodebookState(embed=embed, cluster_size=cs, embed_sum=embed * cs[..., None],
                          initialized=jnp.ones(embed.shape[:1], bool))


def _np_rvq(embed_kcd: np.ndarray, x_nd: np.ndarray):
  """Brute-force greedy RVQ in float64 -> codes [K, N], code vectors [K, N, D], inputs [K, N, D]."""
  resid = x_nd.astype(np.float64)
  codes, qs, inputs = [], [], []
  for e_cd in embed_kcd.astype(np.float64):
    idx = np.argmin(((resid[:, None, :] - e_cd[None]) ** 2).sum(-1), axis=1)
    codes.append(idx)
    qs.append(e_cd[idx])
    inputs.append(resid)
    resid = resid - e_cd[idx]
  return np.stack(codes), np.stack(qs), np.stack(inputs)


def test_nearest_code_matches_bruteforce():
  rng = np.random.default_rng(0)
  embed_cd = rng.normal(size=(64, 16)).astype(np.float32)
  x_nd = rng.normal(size=(500, 16)).astype(np.float32)
  got = jax.jit(vq.nearest_code)(embed_cd, x_nd)
  ref = np.argmin(((x_nd[:, None].astype(np.float64) - embed_cd[None]) ** 2).sum(-1), axis=1)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), ref)


def test_rvq_encode_decode_roundtrip_is_exact():
  # x is a sum of one code per codebook, scales 1, 1e-2, 1e-4: the greedy path recovers every code.
  rng = np.random.default_rng(1)
  k, c, d, b, t = 3, 16, 8, 2, 5
  embed_kcd = (rng.normal(size=(k, c, d)) * np.array([1.0, 1e-2, 1e-4])[:, None, None]).astype(np.float32)
  true_bkt = rng.integers(0, c, size=(b, k, t))
  x_btd = jnp.zeros((b, t, d))
  for i in range(k):  # summed in codebook order, as rvq_decode sums
    x_btd = x_btd + jnp.asarray(embed_kcd[i])[true_bkt[:, i]]
  codes = jax.jit(vq.rvq_encode)(embed_kcd, x_btd)
  assert codes.shape == (b, k, t) and codes.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(codes), true_bkt)
  np.testing.assert_array_equal(np.asarray(jax.jit(vq.rvq_decode)(embed_kcd, codes)), np.asarray(x_btd))
  # static n_q: the first codebooks' codes, and ValueError outside [1, K]
  codes2 = jax.jit(vq.rvq_encode, static_argnums=2)(embed_kcd, x_btd, 2)
  np.testing.assert_array_equal(np.asarray(codes2), true_bkt[:, :2])
  with pytest.raises(ValueError, match='n_q'):
    vq.rvq_encode(embed_kcd, x_btd, 4)
  with pytest.raises(ValueError, match='x must be'):
    vq.rvq_encode(embed_kcd, x_btd[..., :4])


def _random_setup(seed: int = 2, k: int = 4, c: int = 32, d: int = 8, b: int = 3, t: int = 7):
  rng = np.random.default_rng(seed)
  embed_kcd = (rng.normal(size=(k, c, d)) * (0.5 ** np.arange(k))[:, None, None]).astype(np.float32)
  x_btd = rng.normal(size=(b, t, d)).astype(np.float32)
  return _state(embed_kcd), embed_kcd, x_btd


def test_straight_through_gradient_is_identity():
  state, _, x_btd = _random_setup()
  w_btd = np.random.default_rng(3).normal(size=x_btd.shape).astype(np.float32)

  @jax.jit
  def grad_fn(x, n_q):
    return jax.grad(lambda x: jnp.sum(vq.quantize(state, x, n_q).quantized_btd * w_btd))(x)

  for n_q in (1, 4):
    np.testing.assert_allclose(np.asarray(grad_fn(x_btd, n_q)), w_btd, rtol=0, atol=0)


def test_commit_loss_value_and_gradient_match_numpy():
  state, embed_kcd, x_btd = _random_setup()
  b, t, d = x_btd.shape
  codes_kn, q_knd, in_knd = _np_rvq(embed_kcd, x_btd.reshape(b * t, d))
  loss_and_grad = jax.jit(jax.value_and_grad(lambda x, n: vq.quantize(state, x, n).commit_loss))
  for n_q in (1, 2, 4):
    # audiocraft: mean over the n_q codebooks of MSE(residual_k, code_k); only k = 0 has a gradient.
    ref = np.mean([np.mean((in_knd[i] - q_knd[i]) ** 2) for i in range(n_q)])
    ref_grad = 2.0 * (in_knd[0] - q_knd[0]) / (b * t * d) / n_q
    loss, grad = loss_and_grad(x_btd, jnp.int32(n_q))
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad).reshape(b * t, d), ref_grad, rtol=1e-4, atol=1e-7)
  # per-example n_q: mean over active (example, codebook) pairs
  n_q_b = np.array([1, 4, 2])
  mse_kb = ((in_knd - q_knd) ** 2).mean(-1).reshape(4, b, t).mean(-1)
  active_kb = np.arange(4)[:, None] < n_q_b[None]
  loss, _ = loss_and_grad(x_btd, jnp.asarray(n_q_b))
  np.testing.assert_allclose(float(loss), mse_kb[active_kb].mean(), rtol=1e-5)
  out = jax.jit(vq.quantize)(state, x_btd)
  np.testing.assert_array_equal(np.asarray(out.codes_bkt), codes_kn.reshape(4, b, t).transpose(1, 0, 2))


def test_quantizer_dropout_traced_n_q_equals_decode_of_first_codebooks():
  state, embed_kcd, x_btd = _random_setup()
  b, t, d = x_btd.shape
  codes_kn, _, _ = _np_rvq(embed_kcd, x_btd.reshape(b * t, d))
  codes_kbt = codes_kn.reshape(-1, b, t)

  def ref_decode(n_q: int, rows=slice(None)) -> np.ndarray:  # sequential fp32 sum, as rvq_decode
    out = np.zeros((b, t, d), np.float32)[rows]
    for i in range(n_q):
      out = out + embed_kcd[i][codes_kbt[i][rows]]
    return out

  traces = []

  @jax.jit
  def fwd(x, n_q):
    traces.append(None)
    out = vq.quantize(state, x, n_q)
    return out.quantized_btd, out.codes_bkt, out.mask_bk

  for n_q in range(1, 5):
    q_btd, codes_bkt, mask_bk = fwd(x_btd, jnp.int32(n_q))
    np.testing.assert_array_equal(np.asarray(q_btd), ref_decode(n_q))
    np.testing.assert_array_equal(np.asarray(codes_bkt[:, :n_q]), codes_kbt[:n_q].transpose(1, 0, 2))
    assert np.asarray(mask_bk).sum(1).tolist() == [n_q] * b
  assert len(traces) == 1  # one compilation serves every n_q
  # per-example n_q
  n_q_b = [3, 1, 4]
  q_btd, _, _ = fwd(x_btd, jnp.asarray(n_q_b))
  for i, n in enumerate(n_q_b):
    np.testing.assert_array_equal(np.asarray(q_btd[i]), ref_decode(n, i))
  # and rvq_decode itself, over the first n_q codebooks
  decode = jax.jit(vq.rvq_decode)
  np.testing.assert_array_equal(np.asarray(decode(embed_kcd, codes_kbt[:2].transpose(1, 0, 2))),
                                ref_decode(2))


def test_sample_n_q_and_mask():
  draws = jax.jit(vq.sample_n_q, static_argnums=(1, 2))(jax.random.PRNGKey(0), 4, 2000)
  assert draws.shape == (2000,) and draws.dtype == jnp.int32
  assert sorted(np.unique(np.asarray(draws)).tolist()) == [1, 2, 3, 4]
  assert vq.sample_n_q(jax.random.PRNGKey(1), 4).shape == ()
  np.testing.assert_array_equal(np.asarray(vq.codebook_mask(jnp.array([1, 3]), 4, 2)),
                                [[True, False, False, False], [True, True, True, False]])
  with pytest.raises(ValueError, match='n_q'):
    vq.codebook_mask(0, 4, 2)
  with pytest.raises(ValueError, match='shape'):
    vq.codebook_mask(jnp.array([1, 2, 3]), 4, 2)


def test_ema_update_matches_numpy():
  rng = np.random.default_rng(4)
  k, c, d, b, t = 2, 6, 3, 4, 5
  embed = rng.normal(size=(k, c, d)).astype(np.float32)
  cs = rng.uniform(0.5, 3.0, size=(k, c)).astype(np.float32)
  state = _state(embed, cs)
  resid_kbtd = rng.normal(size=(k, b, t, d)).astype(np.float32)
  codes_bkt = rng.integers(0, c, size=(b, k, t)).astype(np.int32)
  mask_bk = np.array([[True, True], [True, False], [True, True], [True, False]])
  decay, eps = 0.9, 1e-3
  upd = jax.jit(functools.partial(vq.ema_update, decay=decay, epsilon=eps, threshold_ema_dead_code=0))
  new = upd(state, resid_kbtd, codes_bkt, jax.random.PRNGKey(0), mask_bk)
  for i in range(k):
    r_nd = resid_kbtd[i].reshape(-1, d).astype(np.float64)
    w_n = np.repeat(mask_bk[:, i], t).astype(np.float64)
    onehot_nc = np.eye(c)[codes_bkt[:, i].reshape(-1)] * w_n[:, None]
    n_c = decay * cs[i] + (1 - decay) * onehot_nc.sum(0)
    s_cd = decay * embed[i] * cs[i][:, None] + (1 - decay) * onehot_nc.T @ r_nd
    smoothed = (n_c + eps) / (n_c.sum() + c * eps) * n_c.sum()
    np.testing.assert_allclose(np.asarray(new.cluster_size[i]), n_c, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new.embed_sum[i]), s_cd, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new.embed[i]), s_cd / smoothed[:, None], rtol=1e-5, atol=1e-6)
  # a codebook with no active frame is left unchanged
  none_active = upd(state, resid_kbtd, codes_bkt, jax.random.PRNGKey(0), mask_bk & np.array([True, False]))
  np.testing.assert_array_equal(np.asarray(none_active.embed[1]), embed[1])
  np.testing.assert_array_equal(np.asarray(none_active.cluster_size[1]), cs[1])
  with pytest.raises(ValueError, match='decay'):
    vq.ema_update(state, resid_kbtd, codes_bkt, jax.random.PRNGKey(0), decay=1.5)


def test_dead_code_is_replaced_by_batch_vector():
  rng = np.random.default_rng(5)
  x_nd = rng.normal(size=(64, 2)).astype(np.float32)
  embed = np.array([[[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]], np.float32)  # code 3 unused
  state = _state(embed, np.array([[20.0, 20.0, 20.0, 10.0]]))
  x_btd = jnp.asarray(x_nd)[None]

  @jax.jit
  def step(state, x_btd, key):
    out = vq.quantize(state, x_btd)
    update = functools.partial(vq.ema_update, state, out.residuals_kbtd, out.codes_bkt, key, decay=0.5)
    return out, update(threshold_ema_dead_code=8.0), update(threshold_ema_dead_code=0.0)

  out, new, kept = step(state, x_btd, jax.random.PRNGKey(0))
  assert 3 not in np.asarray(out.codes_bkt)
  np.testing.assert_allclose(np.asarray(new.cluster_size[0, :3]),  # used codes: 0.5 * 20 + 0.5 * count
                             10.0 + 0.5 * np.bincount(np.asarray(out.codes_bkt).ravel(), minlength=3))
  e = np.asarray(new.embed[0])
  # the unused code (cluster size 0.5 * 10 < 8) now sits exactly on a vector of the batch
  assert np.any(np.all(x_nd == e[3], axis=1))
  assert float(new.cluster_size[0, 3]) == 8.0
  np.testing.assert_allclose(np.asarray(new.embed_sum[0, 3]), e[3] * 8.0)
  assert not np.any(np.all(x_nd[:, None] == e[None, :3], axis=-1))  # the used codes are EMA means
  # threshold 0 disables replacement: the unused code stays where it was (its EMA sums decay together)
  np.testing.assert_allclose(np.asarray(kept.embed[0, 3]), [100.0, 100.0], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(kept.embed[0, :3]), e[:3])


def _mixture(rng: np.random.Generator, centres_cd: np.ndarray, n: int, std: float) -> np.ndarray:
  labels = rng.integers(0, len(centres_cd), size=n)
  return (centres_cd[labels] + std * rng.normal(size=(n, centres_cd.shape[1]))).astype(np.float32)


def test_kmeans_init_and_ema_converge_on_gaussian_mixture():
  rng = np.random.default_rng(6)
  angles = np.arange(8) * 2 * np.pi / 8
  centres = 10.0 * np.stack([np.cos(angles), np.sin(angles)], 1)  # 8 clusters, 7.7 apart, std 0.3
  state = vq.init_codebooks(jax.random.PRNGKey(0), 1, 8, 2)
  assert not bool(state.initialized[0])
  # Threshold at 3/4 of a cluster's share of the batch (512 / 8): a code that covers half a cluster is
  # re-seeded, which is how k-means' local minima (two codes in one cluster) get out.
  step = jax.jit(functools.partial(vq.train_quantize, decay=0.9, threshold_ema_dead_code=48.0,
                                   kmeans_iters=10))
  key = jax.random.PRNGKey(1)
  for _ in range(60):
    key, sub = jax.random.split(key)
    out, state = step(state, jnp.asarray(_mixture(rng, centres, 512, 0.3))[None], sub)
  assert bool(state.initialized[0])
  dist = np.linalg.norm(centres[:, None] - np.asarray(state.embed[0])[None], axis=-1).min(1)
  assert dist.max() < 0.1, dist
  assert float(out.commit_loss) < 0.1  # per-dim variance of the clusters is 0.09


def test_kmeans_init_runs_on_residuals_and_skips_inactive_codebooks():
  rng = np.random.default_rng(7)
  x_btd = jnp.asarray(rng.normal(size=(2, 50, 3)).astype(np.float32))
  state = vq.init_codebooks(jax.random.PRNGKey(0), 3, 4, 3)
  init = jax.jit(functools.partial(vq.kmeans_init, num_iters=5))
  new = init(state, x_btd, jax.random.PRNGKey(1), jnp.int32(2))
  assert np.asarray(new.initialized).tolist() == [True, True, False]
  np.testing.assert_array_equal(np.asarray(new.embed[2]), 0.0)
  # codebook 1 was fit to the residual of codebook 0: its centres are those of k-means on it
  x_nd = np.asarray(x_btd).reshape(-1, 3)
  e0 = np.asarray(new.embed[0], np.float64)
  resid = (x_nd - e0[np.argmin(((x_nd[:, None] - e0[None]) ** 2).sum(-1), 1)]).astype(np.float32)
  key_1 = jax.random.split(jax.random.PRNGKey(1), 3)[1]  # kmeans_init's key for codebook 1
  means, counts = jax.jit(vq.kmeans, static_argnums=(2, 3))(key_1, jnp.asarray(resid), 4, 5)
  np.testing.assert_allclose(np.asarray(new.embed[1]), np.asarray(means), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new.cluster_size[1]), np.asarray(counts))
  np.testing.assert_allclose(np.asarray(new.embed_sum[1]), np.asarray(means * counts[:, None]), rtol=1e-6)
  assert float(counts.sum()) == 100.0
  # initialized codebooks are left alone
  again = init(new, x_btd * 2.0, jax.random.PRNGKey(2), jnp.int32(3))
  np.testing.assert_array_equal(np.asarray(again.embed[:2]), np.asarray(new.embed[:2]))
  assert np.asarray(again.initialized).all()


def test_init_codebooks_and_input_checks():
  s = vq.init_codebooks(jax.random.PRNGKey(0), 2, 5, 4, kmeans_init=False)
  assert s.embed.shape == (2, 5, 4) and s.cluster_size.shape == (2, 5) and s.embed_sum.shape == (2, 5, 4)
  assert np.asarray(s.initialized).all() and np.abs(np.asarray(s.embed)).max() <= (6 / 4) ** 0.5
  assert (s.num_codebooks, s.codebook_size, s.dim) == (2, 5, 4)
  with pytest.raises(ValueError, match='codebook_size'):
    vq.init_codebooks(jax.random.PRNGKey(0), 2, 0, 4)
  with pytest.raises(ValueError, match='x must be'):
    vq.quantize(s, jnp.zeros((1, 3, 5)))

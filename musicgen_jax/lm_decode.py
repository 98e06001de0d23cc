"""The LM's decode step, close to the hardware: a serving layout of the weights and per-layer KV caches.

The stored parameters keep their Hugging Face-mappable names and the stacked [L, ...] layer axis the
full forward scans over. Before the step loop, `serving_weights` turns them, once, into:
  * one `LayerWeights` per layer, so the step never slices a stacked weight;
  * self-attention Q, K and V as one [D, 3, D] matmul; cross-attention keys and values of the condition
    computed once (`cross_kv`), only the query and output projections left in the step;
  * every matrix cast once to the compute dtype (LayerNorm affines stay float32).
`decode` (one step, or a chunk) is a plain Python loop over the layers. Each layer has its own cache
(k, v) [B, H, S, Dh] (head-major: the attention dots read it without a transpose), carried by the
caller's step scan and updated in place at `pos`. Attention reads the whole cache, masked, with its
softmax in float32; the sampler sizes the caches by segment of steps (`grow_caches`), so a step reads
about the filled part. On a GPU in bf16 with many rows the step's self-attention can be cuDNN's fused
attention instead, which reads the cache only up to the filled length (`use_cudnn_decode`; off until
checked on a GPU). `prefill` (the prefix and the first steps, once per call) scans over the stacked
layers instead: it runs once, so one compiled layer is enough.

Both equal `MusicGenLM.__call__` on the same steps (tests/test_lm.py).
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from musicgen_jax import lm as lm_lib
from musicgen_jax import sharding as shd
from musicgen_jax.conditioners import tempo as tempo_lib
from musicgen_jax.nn.attention import attend
from musicgen_jax.nn.transformer import sinusoidal_positions

Norm = tuple[jax.Array, jax.Array]                 # LayerNorm (scale [D], bias [D]), float32
KV = tuple[jax.Array, jax.Array]                   # (k, v) [B, H, S, Dh]
Caches = tuple[KV, ...]                            # one per layer


@flax.struct.dataclass
class LayerWeights:
  """One decoder layer in the serving layout (matrices in the compute dtype); `prefill` stacks them
  (a leading [L] axis on every array) to scan over the layers."""
  self_norm: Norm
  qkv: jax.Array                      # [D, 3, D]: q, k, v kernels side by side
  self_out: jax.Array                 # [D, D]
  ffn_norm: Norm
  fc1: jax.Array                      # [D, F]
  fc2: jax.Array                      # [F, D]
  cross_norm: Norm | None = None
  cross_q: jax.Array | None = None    # [D, D]
  cross_out: jax.Array | None = None  # [D, D]


@flax.struct.dataclass
class ServingWeights:
  embed: jax.Array                    # [K, card + 1, D] float32 (looked up, not multiplied)
  layers: tuple[LayerWeights, ...]    # one entry per layer (the step's plain loop)
  final_norm: Norm
  heads: jax.Array                    # [K, card, D]: the K heads, one matmul
  cross_kv: jax.Array | None          # [L, D, 2, D]: cross-attention k, v kernels (used once)
  beat_proj: jax.Array | None = None  # [F, D] float32: the beat clock's projection (if the model has one)


def _no_constraint(x: jax.Array, axes: tuple) -> jax.Array:
  del axes
  return x


def serving_weights(cfg: lm_lib.LMConfig, params: Any,
                    constrain: Callable[[jax.Array, tuple], jax.Array] = _no_constraint) -> ServingWeights:
  """The serving layout of the stored LM parameters ({'params': {...}}, unboxed). Jittable; run it
  once per generate call, outside the step loop. `constrain(x, logical_axes)` places each new array
  (the sampler passes its mesh's sharding constraint)."""
  p = params["params"]
  dt = cfg.compute_dtype
  lay = p["layers"]
  norm = lambda name: (lay[name]["scale"], lay[name]["bias"])

  def kernel(axes, *path):
    x = lay
    for name in path + ("kernel",):
      x = x[name]
    return constrain(x.astype(dt), (shd.LAYERS,) + axes)

  def fused(axes, attn, names):   # several [L, D, D] kernels side by side: [L, D, n, D]
    return constrain(jnp.stack([kernel(axes, attn, n) for n in names], axis=2),
                     (shd.LAYERS, axes[0], None, axes[1]))

  fields = dict(self_norm=norm("self_attn_layer_norm"),
                qkv=fused((shd.EMBED, shd.HEADS), "self_attn", ("q_proj", "k_proj", "v_proj")),
                self_out=kernel((shd.HEADS, shd.EMBED), "self_attn", "out_proj"),
                ffn_norm=norm("final_layer_norm"), fc1=kernel((shd.EMBED, shd.MLP), "fc1"),
                fc2=kernel((shd.MLP, shd.EMBED), "fc2"))
  cross_kv = None
  if cfg.cross_attention:
    fields.update(cross_norm=norm("encoder_attn_layer_norm"),
                  cross_q=kernel((shd.EMBED, shd.HEADS), "encoder_attn", "q_proj"),
                  cross_out=kernel((shd.HEADS, shd.EMBED), "encoder_attn", "out_proj"))
    cross_kv = fused((shd.EMBED, shd.HEADS), "encoder_attn", ("k_proj", "v_proj"))
  stacked = LayerWeights(**fields)
  layers = tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(cfg.num_layers))
  heads = constrain(p["lm_heads"].astype(dt), (shd.CODEBOOKS, shd.VOCAB, shd.EMBED))
  return ServingWeights(embed=p["embed_tokens"], layers=layers,
                        final_norm=(p["layer_norm"]["scale"], p["layer_norm"]["bias"]), heads=heads,
                        cross_kv=cross_kv, beat_proj=p.get("beat_proj") if cfg.beat_clock_rate else None)


def init_caches(cfg: lm_lib.LMConfig, batch: int, length: int) -> Caches:
  """Empty per-layer caches: L x (k, v) [B, H, length, Dh] in the compute dtype."""
  shape = (batch, cfg.num_heads, length, cfg.head_dim)
  return tuple((jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
               for _ in range(cfg.num_layers))


def decode_bytes(cfg: lm_lib.LMConfig, num_params: int, rows: int, length: int,
                 cond_len: int) -> dict[str, int]:
  """Device bytes that decoding adds to the stored parameters, estimated without compiling.

  rows: sequences in the step (the batch, doubled for CFG in one batch); length: cache positions
  (prefix + frames + delays); cond_len: cross-attention condition positions. -> {'caches' (the
  per-layer K/V caches of init_caches), 'cross' (the condition's K/V), 'weights' (the serving copy
  in the compute dtype), 'logits' (fp32, with their softmax), 'total'}.
  """
  item = jnp.dtype(cfg.compute_dtype).itemsize
  out = {"caches": 2 * cfg.num_layers * rows * length * cfg.num_heads * cfg.head_dim * item,
         "cross": (2 * cfg.num_layers * rows * cond_len * cfg.num_heads * cfg.head_dim * item
                   if cfg.text_conditioning == "cross" else 0),
         "weights": int(num_params) * item,
         "logits": 2 * rows * cfg.num_codebooks * cfg.card * 4}
  out["total"] = sum(out.values())
  return out


def grow_caches(caches: Caches, length: int) -> Caches:
  """The caches padded (with zeros, never read) to `length` positions: one copy, between segments."""
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))
  return tuple((pad(k), pad(v)) for k, v in caches)


def cross_kv(cfg: lm_lib.LMConfig, w: ServingWeights, cond_bld: jax.Array | None) -> Caches | None:
  """Cross-attention keys and values of the projected condition [B, Lc, D], computed once:
  L x (k, v) [B, H, Lc, Dh] (head-major, like the cache), or None without cross-attention."""
  if cond_bld is None or w.cross_kv is None:
    return None
  b, lc, _ = cond_bld.shape
  kv = jnp.einsum("bld,ndtf->ntblf", cond_bld.astype(cfg.compute_dtype), w.cross_kv)
  kv = kv.reshape(cfg.num_layers, 2, b, lc, cfg.num_heads, cfg.head_dim).swapaxes(3, 4)
  return tuple((kv[i, 0], kv[i, 1]) for i in range(cfg.num_layers))


def embed(cfg: lm_lib.LMConfig, w: ServingWeights, tokens_bkn: jax.Array, pos,
          prefix: jax.Array | None = None, beat: jax.Array | None = None,
          frame=0) -> jax.Array:
  """The decoder input of a chunk in the compute dtype [B, P + N, D]: the prefix [B, P, D] (if any) at
  positions pos..pos+P-1, then the sum of the K codebook embeddings of tokens [B, K, N], with the
  beat clock [B, 2] at audio frames frame..frame+N-1 (beat-clock models)."""
  p = 0 if prefix is None else prefix.shape[1]
  n = tokens_bkn.shape[-1]
  x = sum(w.embed[k][tokens_bkn[:, k]] for k in range(cfg.num_codebooks))
  x = x + sinusoidal_positions(pos + p + jnp.arange(n), cfg.dim)[None]
  if w.beat_proj is not None and beat is not None:
    x = x + tempo_lib.clock_embedding(frame + jnp.arange(n), beat, cfg.beat_clock_rate, w.beat_proj)
  if p:
    pre = prefix + sinusoidal_positions(pos + jnp.arange(p), cfg.dim)[None]
    x = jnp.concatenate([pre.astype(x.dtype), x], axis=1)
  return x.astype(cfg.compute_dtype)


def _layer_norm(cfg: lm_lib.LMConfig, x: jax.Array, norm: Norm) -> jax.Array:
  # The full forward's LayerNorm module, applied to this layer's affine: the same float32 statistics.
  ln = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=jnp.float32)
  return ln.apply({"params": {"scale": norm[0], "bias": norm[1]}}, x)


def _heads(cfg: lm_lib.LMConfig, x_bnd: jax.Array) -> jax.Array:
  b, n, _ = x_bnd.shape
  return x_bnd.reshape(b, n, cfg.num_heads, cfg.head_dim)


# The projections of a decode step of at most this many rows (the batch, doubled with CFG in one batch,
# times the chunk) run as elementwise products and a float32 sum over the input features on these
# backends, instead of a matmul. A matmul kernel is tiled for many rows; at one or two rows XLA's
# GPU matmuls read the weights at about a fifth of the bandwidth, and at batch 1 the step is bound by
# that read. On one H200 at the small shape in bf16 (docs/BENCHMARKS.md, bench/decode_profile.py),
# batch 1 over 300 steps: 846-858 steps/s with matmuls, 1018 with every projection as sums (1002
# with all but Q/K/V; cuBLAS instead of Triton matmuls: 796, and 996 with sums). On a CPU the sums
# are slower (XLA:CPU's dot is a tuned matrix-vector product), so there the matmul stays.
REDUCE_DENSE_MAX_ROWS = 8
REDUCE_DENSE_BACKENDS = ("gpu",)


def use_reduce_dense(rows: int) -> bool:
  """Whether a decode step of `rows` rows runs its projections as products and sums."""
  return rows <= REDUCE_DENSE_MAX_ROWS and jax.default_backend() in REDUCE_DENSE_BACKENDS


def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., D_in] @ w [D_in, *out] -> [..., *out], in x's dtype: a matmul, or for a few rows
  (use_reduce_dense) products and a float32 sum that read each weight once."""
  if use_reduce_dense(x.size // x.shape[-1]):
    xs = x.reshape(x.shape + (1,) * (w.ndim - 1)).astype(jnp.float32)
    return jnp.sum(xs * w.astype(jnp.float32), axis=x.ndim - 1).astype(x.dtype)
  return jnp.tensordot(x, w, axes=1)


def _layer(cfg: lm_lib.LMConfig, lw: LayerWeights, x_bnd: jax.Array, cache: KV | None, pos,
           cross: KV | None, cross_mask: jax.Array | None) -> tuple[jax.Array, KV]:
  """One pre-norm decoder layer on a chunk x [B, N, D] (the residual stream, compute dtype).

  With a cache: the chunk's keys and values are written at pos first, then attention reads the whole
  cache masked to each query's position. (Writing before reading leaves the update as the only use of
  the old buffer, so XLA updates it in place; reading first makes it copy the cache at every step.)
  Returns (x, the updated cache). Without one (prefill): causal attention over the chunk; returns
  (x, the chunk's (k, v) [B, H, N, Dh]).
  """
  dt = cfg.compute_dtype
  b, n, _ = x_bnd.shape
  scale = jnp.asarray(cfg.head_dim ** -0.5, dt)
  h = _layer_norm(cfg, x_bnd, lw.self_norm).astype(dt)
  qkv = _dense(h, lw.qkv)     # [B, N, 3, D]: the dot's natural output order, no transpose
  q, k, v = (_heads(cfg, qkv[:, :, i]) for i in range(3))
  new_kv = (k.swapaxes(1, 2), v.swapaxes(1, 2))
  if cache is None:
    h = attend(q * scale, k, v, jnp.tril(jnp.ones((n, n), bool))[None, None])
  else:
    new_kv = tuple(jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0, 0, pos, 0))
                   for c, x in zip(cache, new_kv))
    if n == 1 and use_cudnn_decode(dt, b):
      h = _cudnn_decode_attention(q * scale, new_kv[0], new_kv[1], pos + 1)
    else:
      length = cache[0].shape[2]
      mask = (jnp.arange(length)[None, :] <= pos + jnp.arange(n)[:, None])[None, None]
      h = attend(q * scale, new_kv[0], new_kv[1], mask, kv_heads_first=True)
  x_bnd = x_bnd + _dense(h.reshape(b, n, cfg.dim), lw.self_out).astype(x_bnd.dtype)
  if lw.cross_q is not None:
    h = _layer_norm(cfg, x_bnd, lw.cross_norm).astype(dt)
    q = _heads(cfg, _dense(h, lw.cross_q)) * scale
    h = attend(q, cross[0], cross[1], cross_mask[:, None, None, :].astype(bool), kv_heads_first=True)
    x_bnd = x_bnd + _dense(h.reshape(b, n, cfg.dim), lw.cross_out).astype(x_bnd.dtype)
  h = _layer_norm(cfg, x_bnd, lw.ffn_norm).astype(dt)
  h = jax.nn.gelu(_dense(h, lw.fc1), approximate=False)
  return x_bnd + _dense(h, lw.fc2).astype(x_bnd.dtype), new_kv


# Decode self-attention through cuDNN's fused attention from this many rows (the batch, doubled with
# CFG in one batch) on a GPU in bf16 / fp16; None: never. It reads the head-major cache as it is, up
# to the filled length. On one H200 at the small shape (docs/BENCHMARKS.md, bench/decode_profile.py):
# 251 against 203 steps/s at 128 rows over 1500 steps, 727 against 631 at 16 rows, 757 against 784
# at 2 rows over 300 steps (there the step is bound by its matmuls, not by reading the cache). Its
# output equals `attend`'s on a GPU (tests/test_lm.py, run there by bench/gpu_all.sh's gpu_tests).
CUDNN_DECODE_MIN_ROWS: int | None = 16


def use_cudnn_decode(dtype, rows: int) -> bool:
  """Whether a decode step of `rows` rows in `dtype` runs its self-attention through cuDNN."""
  return (CUDNN_DECODE_MIN_ROWS is not None and rows >= CUDNN_DECODE_MIN_ROWS
          and jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and _cudnn_attention() is not None)


def _cudnn_attention():
  # jax.nn.dot_product_attention takes only the sequence-major layout (it would transpose the whole
  # cache at every step); the cuDNN function beneath it also takes the head-major one. It is not
  # public API: where this jax lacks it, decoding keeps `attend`.
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa
    return fa if hasattr(fa, "dot_product_attention") and hasattr(fa, "MaskType") else None
  except ImportError:
    return None


def _cudnn_decode_attention(q_b1hd: jax.Array, k_bhsd: jax.Array, v_bhsd: jax.Array,
                            length) -> jax.Array:
  """One query per row (already scaled) over the first `length` positions (a scalar, or one per row)
  of head-major keys and values, by cuDNN's fused attention; -> [B, 1, H, Dh]."""
  fa = _cudnn_attention()
  b = q_b1hd.shape[0]
  out = fa.dot_product_attention(
      q_b1hd.swapaxes(1, 2), k_bhsd, v_bhsd, q_seqlen=jnp.ones((b,), jnp.int32),
      kv_seqlen=jnp.broadcast_to(jnp.asarray(length, jnp.int32), (b,)), scale=1.0,
      mask_type=fa.MaskType.PADDING, qkv_layout="BNTH")
  return out.swapaxes(1, 2)


def _logits(cfg: lm_lib.LMConfig, w: ServingWeights, x_bnd: jax.Array) -> jax.Array:
  h = _layer_norm(cfg, x_bnd, w.final_norm).astype(cfg.compute_dtype)
  return jnp.einsum("bnd,kcd->bknc", h, w.heads, preferred_element_type=jnp.float32)


def decode(cfg: lm_lib.LMConfig, w: ServingWeights, tokens_bkn: jax.Array, caches: Caches, pos,
           cross: Caches | None = None, cross_mask: jax.Array | None = None,
           beat: jax.Array | None = None, prefix_len: int = 0) -> tuple[jax.Array, Caches]:
  """Steps tokens [B, K, N] at positions pos..pos+N-1 (traced) against the caches: a plain loop over
  the layers (audio frames pos - prefix_len.., for the beat clock [B, 2]). Returns (logits
  [B, K, N, card] float32, the updated caches)."""
  x = embed(cfg, w, tokens_bkn, pos, beat=beat, frame=pos - prefix_len)
  new_caches = []
  for i, lw in enumerate(w.layers):
    x, kv = _layer(cfg, lw, x, caches[i], pos, None if cross is None else cross[i], cross_mask)
    new_caches.append(kv)
  return _logits(cfg, w, x), tuple(new_caches)


def prefill(cfg: lm_lib.LMConfig, w: ServingWeights, tokens_bkn: jax.Array, caches: Caches,
            cross: Caches | None = None, cross_mask: jax.Array | None = None,
            prefix: jax.Array | None = None,
            beat: jax.Array | None = None) -> tuple[jax.Array, Caches]:
  """The first chunk: the prefix [B, P, D] (if any) and tokens [B, K, N] at positions 0..P+N-1 (audio
  frames 0..N-1, for the beat clock [B, 2]), with a scan over the stacked layers; their
  keys and values are written at the start of the caches.
  Returns (logits [B, K, N, card] float32 of the token steps, the caches)."""
  x = embed(cfg, w, tokens_bkn, 0, prefix, beat=beat)
  stack = lambda layers: jax.tree.map(lambda *a: jnp.stack(a), *layers)   # one transient copy
  xs = (stack(w.layers), None if cross is None else stack(cross))

  def body(x, layer):
    lw, ckv = layer
    return _layer(cfg, lw, x, None, 0, ckv, cross_mask)

  with jax.named_scope("prefill"):
    x, (k_all, v_all) = jax.lax.scan(body, x, xs)
  new = tuple((jax.lax.dynamic_update_slice(k, k_all[i].astype(k.dtype), (0, 0, 0, 0)),
               jax.lax.dynamic_update_slice(v, v_all[i].astype(v.dtype), (0, 0, 0, 0)))
              for i, (k, v) in enumerate(caches))
  return _logits(cfg, w, x[:, x.shape[1] - tokens_bkn.shape[-1]:]), new

"""Tests for musicgen_jax.lm: cached decoding vs the full forward, causality, text padding, bf16, remat,
logical axis names and the HF-shaped parameter table, sharded vs single-device logits, config checks.

The tiny models (dim 32, 2 layers, 4 codebooks of 16) and their random weights come from conftest.py.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec

from musicgen_jax import lm as lm_lib
from musicgen_jax import lm_decode
from musicgen_jax import sharding as shd
from musicgen_jax.nn.attention import attend

from tests.conftest import TEXT_CFG, TinyLM, abstract_params

STEPS = 7
REPO = pathlib.Path(__file__).resolve().parents[1]


def _tokens(cfg: lm_lib.LMConfig, seed: int, batch: int = 2, steps: int = STEPS) -> jax.Array:
  """Random steps [B, K, S] over the whole vocabulary, special token included."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, cfg.card + 1, size=(batch, cfg.num_codebooks, steps)), jnp.int32)


def _max_diff(a, b) -> float:
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


# ---- cached decoding ---------------------------------------------------------------------------------
def _cached_logits(model: lm_lib.MusicGenLM, params, tokens_bks, conds, chunks, cache_room: int):
  """Logits [B, K, S, card] from the serving-layout decode step (lm_decode.py): a prefill of chunks[0]
  steps (with the prefix), then chunks of the given sizes, then single steps. The caches start filled
  with noise and are `cache_room` entries longer than needed (grown by `cache_room` more half-way), so
  anything read past the written positions would show."""
  cfg = model.cfg
  w = lm_decode.serving_weights(cfg, params)
  cond = model.apply(params, conds, method=model.project_conditions)
  ckv = lm_decode.cross_kv(cfg, w, cond.cross)
  p = 0 if cond.prefix is None else cond.prefix.shape[1]
  b, _, s = tokens_bks.shape
  keys = iter(jax.random.split(jax.random.key(7), 2 * cfg.num_layers))
  caches = tuple(tuple(3.0 * jax.random.normal(next(keys), x.shape, x.dtype) for x in kv)
                 for kv in lm_decode.init_caches(cfg, b, p + s + cache_room))
  sizes = list(chunks) + [1] * (s - sum(chunks))
  out, start = [], 0
  for i, n in enumerate(sizes):
    if i == len(sizes) // 2:
      caches = lm_decode.grow_caches(caches, caches[0][0].shape[2] + cache_room)
    chunk = tokens_bks[:, :, start:start + n]
    if i == 0:
      logits, caches = lm_decode.prefill(cfg, w, chunk, caches, ckv, cond.cross_mask, cond.prefix,
                                         beat=cond.beat)
    else:
      logits, caches = lm_decode.decode(cfg, w, chunk, caches, jnp.int32(p + start), ckv,
                                        cond.cross_mask, beat=cond.beat, prefix_len=p)
    out.append(logits)
    start += n
  return jnp.concatenate(out, axis=2)


@pytest.mark.parametrize("projections", ["matmul", "sums"])
@pytest.mark.parametrize("which", ["text_lm", "melody_lm"])
def test_cached_decoding_matches_full_forward(which, projections, request, monkeypatch):
  lm: TinyLM = request.getfixturevalue(which)
  tokens = _tokens(lm.cfg, 1)
  full = lm.forward(lm.params, tokens, lm.conds)
  assert full.shape == (2, 4, STEPS, lm.cfg.card) and full.dtype == jnp.float32
  # A new function object per trace: jax caches traces by function, and the module constant below is
  # read while tracing.
  cached_fn = lambda: functools.partial(_cached_logits, lm.model, chunks=(3, 2), cache_room=3)
  monkeypatch.setattr(lm_decode, "REDUCE_DENSE_BACKENDS", ())
  if projections == "sums":
    # The GPU's form of a few rows' projections (lm_decode.use_reduce_dense), here on this backend:
    # the chunks of 2 and of 1 steps have at most 8 rows, so their layers' matmuls (4 or 6 a layer)
    # are gone from the program.
    dots = lambda: str(jax.make_jaxpr(cached_fn())(lm.params, tokens, lm.conds)).count("dot_general")
    matmul_dots = dots()
    monkeypatch.setattr(lm_decode, "REDUCE_DENSE_BACKENDS", (jax.default_backend(),))
    assert dots() <= matmul_dots - 4 * lm.cfg.num_layers * 2
  cached = jax.jit(cached_fn())(lm.params, tokens, lm.conds)
  assert cached.shape == full.shape and cached.dtype == jnp.float32
  err = _max_diff(cached, full)
  assert err < 1e-5, err


# ---- causality and padding ---------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["text_lm", "melody_lm"])
def test_logits_do_not_depend_on_future_steps(which, request):
  lm: TinyLM = request.getfixturevalue(which)
  tokens = _tokens(lm.cfg, 2)
  base = lm.forward(lm.params, tokens, lm.conds)
  for s in (0, 3, STEPS - 2):
    other = _tokens(lm.cfg, 10 + s)
    perturbed = tokens.at[:, :, s + 1:].set(other[:, :, s + 1:])
    out = lm.forward(lm.params, perturbed, lm.conds)
    assert _max_diff(out[:, :, :s + 1], base[:, :, :s + 1]) < 1e-6
    assert _max_diff(out[:, :, s + 1:], base[:, :, s + 1:]) > 1e-3  # the perturbation is seen later


@pytest.mark.parametrize("which", ["text_lm", "melody_lm"])
def test_padded_text_positions_do_not_change_output(which, request):
  lm: TinyLM = request.getfixturevalue(which)
  tokens = _tokens(lm.cfg, 3)
  base = lm.forward(lm.params, tokens, lm.conds)
  mask = np.asarray(lm.conds.text_mask, bool)
  assert not mask.all()
  noise = 10.0 * jax.random.normal(jax.random.key(5), lm.conds.text.shape)
  at_padding = lm.conds.replace(text=jnp.where(mask[..., None], lm.conds.text, noise))
  assert _max_diff(lm.forward(lm.params, tokens, at_padding), base) < 1e-6
  # Positive control: the same change at a real position changes the logits of that row.
  at_real = lm.conds.replace(text=lm.conds.text.at[0, 0].add(1.0))
  assert _max_diff(lm.forward(lm.params, tokens, at_real)[0], base[0]) > 1e-3
  # A fully padded (null) text gives finite logits.
  null = lm.conds.replace(text_mask=jnp.zeros_like(lm.conds.text_mask))
  assert bool(jnp.isfinite(lm.forward(lm.params, tokens, null)).all())


def test_cross_attention_ignores_padding_like_truncation(text_lm):
  # Row 0 has 2 real text positions: the output equals that of the text truncated to them, which only
  # holds if padded keys are masked in cross-attention (zeroed states alone would still get weight).
  tokens = _tokens(text_lm.cfg, 4)
  n_real = int(np.asarray(text_lm.conds.text_mask)[0].sum())
  assert 0 < n_real < text_lm.conds.text.shape[1]
  base = text_lm.forward(text_lm.params, tokens, text_lm.conds)
  short = lm_lib.Conditions(text=text_lm.conds.text[:1, :n_real],
                            text_mask=jnp.ones((1, n_real), jnp.int32))
  out = jax.jit(text_lm.model.apply)(text_lm.params, tokens[:1], short)
  assert _max_diff(out[0], base[0]) < 1e-5


# ---- numerics: bf16 and remat ------------------------------------------------------------------------
def test_bf16_compute_is_close_to_fp32(text_lm):
  tokens = _tokens(text_lm.cfg, 5)
  ref = text_lm.forward(text_lm.params, tokens, text_lm.conds)
  cfg16 = dataclasses.replace(text_lm.cfg, dtype="bfloat16")
  out = jax.jit(lm_lib.MusicGenLM(cfg16).apply)(text_lm.params, tokens, text_lm.conds)
  assert out.dtype == jnp.float32 and out.shape == ref.shape
  assert bool(jnp.isfinite(out).all())
  scale = float(jnp.std(ref))
  err = _max_diff(out, ref)
  assert err < 0.1 * scale, (err, scale)
  assert err > 0.0  # bf16 really was used
  caches = lm_decode.init_caches(cfg16, 2, 4)
  assert len(caches) == cfg16.num_layers and caches[0][0].dtype == jnp.bfloat16


def _loss(cfg: lm_lib.LMConfig, params, tokens_bks, targets_bks, conds):
  logits = lm_lib.MusicGenLM(cfg).apply(params, tokens_bks, conds)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets_bks).mean()


def test_remat_and_scan_unroll_give_same_loss_and_gradients(text_lm):
  """Recomputation and unrolling the layer scan (same stacked parameters) change no number."""
  tokens = _tokens(text_lm.cfg, 6)
  targets = jnp.asarray(np.random.default_rng(6).integers(0, text_lm.cfg.card, tokens.shape))
  results = {}
  variants = {"none": {}, "full": dict(remat="full"), "dots": dict(remat="dots"),
              "unrolled": dict(scan_unroll=0),
              "unrolled+dots": dict(scan_unroll=text_lm.cfg.num_layers, remat="dots")}
  for name, fields in variants.items():
    cfg = dataclasses.replace(text_lm.cfg, **fields)
    fn = jax.jit(jax.value_and_grad(functools.partial(_loss, cfg), argnums=0))
    results[name] = fn(text_lm.params, tokens, targets, text_lm.conds)
  loss0, grads0 = results.pop("none")
  assert float(loss0) > 0 and float(optax.tree.norm(grads0)) > 1e-3
  for name, (loss, grads) in results.items():
    assert abs(float(loss) - float(loss0)) < 1e-5, name
    errs = jax.tree.leaves(jax.tree.map(_max_diff, grads, grads0))
    assert max(errs) < 1e-5, (name, max(errs))
  # ...while the unrolled program really has no layer loop left
  hlo = lambda cfg: jax.jit(functools.partial(_loss, cfg)).lower(
      text_lm.params, tokens, targets, text_lm.conds).as_text()
  assert "while" in hlo(text_lm.cfg)
  assert "while" not in hlo(dataclasses.replace(text_lm.cfg, scan_unroll=0))
  with pytest.raises(ValueError, match="scan_unroll"):
    dataclasses.replace(text_lm.cfg, scan_unroll=-1)
  # The default (None) picks by backend: the loop here and on TPU, every layer unrolled on a GPU.
  assert text_lm.cfg.scan_unroll is None
  layers = text_lm.cfg.num_layers
  assert [lm_lib.layer_scan_unroll(text_lm.cfg, b) for b in ("cpu", "tpu", "gpu")] == [1, 1, layers]
  assert lm_lib.layer_scan_unroll(dataclasses.replace(text_lm.cfg, scan_unroll=1), "gpu") == 1


# ---- parameter tree ----------------------------------------------------------------------------------
_LOGICAL_NAMES = {shd.BATCH, shd.LENGTH, shd.KV_LENGTH, shd.EMBED, shd.HEADS, shd.HEAD_DIM, shd.MLP,
                  shd.VOCAB, shd.CODEBOOKS, shd.LAYERS, shd.COND_EMBED}


def _flat(tree) -> dict[str, object]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def _expected_table(k, card, d, layers, ffn, text_dim=None, chroma=None, cross=True) -> dict:
  """Parameter name -> shape, as the Hugging Face decoder names them (K embeddings / heads stacked)."""
  table = {"embed_tokens": (k, card + 1, d), "lm_heads": (k, card, d),
           "layer_norm/scale": (d,), "layer_norm/bias": (d,)}
  blocks = ["self_attn"] + (["encoder_attn"] if cross else [])
  for attn in blocks:
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      table[f"layers/{attn}/{proj}/kernel"] = (layers, d, d)
  for ln in ["self_attn_layer_norm", "final_layer_norm"] + (["encoder_attn_layer_norm"] if cross else []):
    table[f"layers/{ln}/scale"] = (layers, d)
    table[f"layers/{ln}/bias"] = (layers, d)
  table["layers/fc1/kernel"] = (layers, d, ffn)
  table["layers/fc2/kernel"] = (layers, ffn, d)
  if text_dim is not None:
    table["enc_to_dec_proj/kernel"] = (text_dim, d)
    table["enc_to_dec_proj/bias"] = (d,)
  if chroma is not None:
    table["audio_enc_to_dec_proj/kernel"] = (chroma, d)
    table["audio_enc_to_dec_proj/bias"] = (d,)
  return {"params/" + name: shape for name, shape in table.items()}


@pytest.mark.parametrize("variant", ["text", "text_dim_eq_dim", "melody", "no_text"])
def test_parameter_table_and_logical_axes(variant):
  base = dict(num_codebooks=4, card=16, dim=32, num_layers=2, num_heads=4, ffn_dim=64)
  cfg = {"text": lm_lib.LMConfig(**base, text_dim=24),
         "text_dim_eq_dim": lm_lib.LMConfig(**base, text_dim=32),
         "melody": lm_lib.LMConfig(**base, text_dim=24, text_conditioning="prefix", melody=True),
         "no_text": lm_lib.LMConfig(**base, text_dim=0)}[variant]
  expected = _expected_table(4, 16, 32, 2, 64,
                             text_dim=24 if variant in ("text", "melody") else None,
                             chroma=12 if variant == "melody" else None,
                             cross=variant in ("text", "text_dim_eq_dim"))
  boxed = abstract_params(cfg)
  shapes = {name: tuple(x.shape) for name, x in _flat(nn.unbox(boxed)).items()}
  assert shapes == expected
  specs = _flat(nn.get_partition_spec(boxed))
  assert specs.keys() == expected.keys()
  for name, spec in specs.items():
    assert isinstance(spec, PartitionSpec), name
    assert len(spec) == len(expected[name]), (name, spec)  # every axis named: an unboxed leaf has P()
    assert set(spec) <= _LOGICAL_NAMES | {None} and set(spec) != {None}, (name, spec)
    assert (spec[0] == shd.LAYERS) == name.startswith("params/layers/"), (name, spec)
    assert list(spec).count(shd.LAYERS) <= 1, (name, spec)
  # card + 1 rows divide no mesh axis: the embedding's vocab axis is deliberately unsharded.
  assert specs["params/embed_tokens"] == PartitionSpec(shd.CODEBOOKS, None, shd.EMBED)
  assert specs["params/lm_heads"] == PartitionSpec(shd.CODEBOOKS, shd.VOCAB, shd.EMBED)
  assert specs["params/layers/fc1/kernel"] == PartitionSpec(shd.LAYERS, shd.EMBED, shd.MLP)
  assert specs["params/layers/self_attn/q_proj/kernel"] == PartitionSpec(shd.LAYERS, shd.EMBED, shd.HEADS)
  assert specs["params/layers/self_attn/out_proj/kernel"] == PartitionSpec(shd.LAYERS, shd.HEADS,
                                                                            shd.EMBED)


# ---- sharded vs single device ------------------------------------------------------------------------
_SHARDED_SCRIPT = r"""
import functools, json
import jax, jax.numpy as jnp, numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding
from musicgen_jax import lm as lm_lib, sharding as shd
from tests.conftest import TEXT_CFG, random_conditions, random_params

assert jax.device_count() == 8, jax.devices()
cfg, b, s = TEXT_CFG, 4, 6
mesh = shd.make_mesh((2, 2, 2))
rules = shd.DEFAULT_RULES
model = lm_lib.MusicGenLM(cfg)
init = functools.partial(lm_lib.init_params, cfg)
params = random_params(cfg, 0)
conds = random_conditions(cfg, 100, batch=b)
tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.card + 1, (b, cfg.num_codebooks, s)), jnp.int32)
ref = jax.jit(model.apply)(params, tokens, conds)
init_ref = nn.unbox(jax.jit(init)(jax.random.key(3)))

out = {}
with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
  p_sh = shd.logical_sharding(jax.eval_shape(init, jax.random.key(0)), mesh, rules)
  init_sh = nn.unbox(jax.jit(init, out_shardings=p_sh)(jax.random.key(3)))
  tok_sh = shd.batch_sharding(mesh, rules, 3)
  cond_sh = jax.tree.map(lambda x: shd.batch_sharding(mesh, rules, x.ndim), conds)
  logits_sh = NamedSharding(mesh, nn.logical_to_mesh_axes(
      (shd.BATCH, shd.CODEBOOKS, shd.LENGTH, shd.VOCAB), rules))
  fwd = jax.jit(model.apply, in_shardings=(p_sh, tok_sh, cond_sh), out_shardings=logits_sh)
  sharded_params = jax.device_put(params, p_sh)
  logits = fwd(sharded_params, jax.device_put(tokens, tok_sh), jax.device_put(conds, cond_sh))

# The sampler across the 8 devices: batch 3 (padded to 4 for data x fsdp = 4) against one device, greedy
# (temperature 0) and sampled; weights split over fsdp and tensor by the same rules.
import logging
from musicgen_jax import patterns, sampling
pattern = patterns.get_pattern("delay", cfg.num_codebooks)
notes = []
handler = logging.Handler()
handler.emit = lambda record: notes.append(record.getMessage())
logging.getLogger(sampling.__name__).addHandler(handler)
conds3 = jax.tree.map(lambda x: x[:3], conds)
for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
  settings = sampling.SamplingSettings(top_k=4, temperature=temperature)
  one = sampling.generate(params, cfg, pattern, conds3, 5, seed=3, settings=settings)
  many = sampling.generate(params, cfg, pattern, conds3, 5, seed=3, settings=settings, mesh=mesh,
                           rules=rules)
  out[name + "_equal"] = bool((np.asarray(one) == np.asarray(many)).all())
  out[name + "_shape"] = list(np.asarray(many).shape)
  out["sampler_devices"] = len(many.sharding.device_set)
out["padding_notes"] = sum("padded to 4" in n for n in notes)   # once, not at every call

# Compare on the host, outside the mesh context.
out["init_err"] = max(jax.tree.leaves(jax.tree.map(
    lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), init_sh, init_ref)))
out["logits_err"] = float(np.max(np.abs(np.asarray(logits) - np.asarray(ref))))
out["logits_scale"] = float(np.std(np.asarray(ref)))
out["logits_spec"] = str(logits.sharding.spec)
fc1 = sharded_params["params"]["layers"]["fc1"]["kernel"]
out["fc1_spec"] = str(fc1.sharding.spec)
out["fc1_shard_shape"] = list(fc1.addressable_shards[0].data.shape)
print("RESULT " + json.dumps(out))
"""


def test_sharded_forward_and_sampler_match_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  res = json.loads(line[len("RESULT "):])
  assert res["logits_err"] < 1e-5, res
  assert res["logits_scale"] > 0.1, res
  assert res["init_err"] == 0.0, res
  # fc1 [L, D, ffn]: embed over fsdp (2), mlp over tensor (2); logits batch over data x fsdp.
  assert res["fc1_spec"] == str(PartitionSpec(None, "fsdp", "tensor")), res
  assert res["fc1_shard_shape"] == [2, 16, 32], res
  assert res["logits_spec"] == str(PartitionSpec(("data", "fsdp"), None, None, "tensor")), res
  # The sampler on 8 devices (batch 3 padded to 4, weights split) gives one device's tokens.
  assert res["greedy_equal"] and res["sampled_equal"] and res["padding_notes"] == 1, res
  assert res["greedy_shape"] == res["sampled_shape"] == [3, 4, 5], res
  assert res["sampler_devices"] == 8, res


# ---- config validation -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=30, num_heads=4), "divisible"),
    (dict(dtype="float64"), "dtype"),
    (dict(remat="everything"), "remat"),
    (dict(text_conditioning="concat"), "text_conditioning"),
])
def test_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(TEXT_CFG, **kwargs)


def test_config_from_dict():
  d = dataclasses.asdict(TEXT_CFG)
  assert lm_lib.LMConfig.from_dict(d) == TEXT_CFG
  with pytest.raises(ValueError, match="unknown model config fields.*'n_layers'"):
    lm_lib.LMConfig.from_dict(dict(d, n_layers=3))
  assert TEXT_CFG.special_token == TEXT_CFG.card and TEXT_CFG.head_dim == 8


def test_cudnn_decode_attention_only_on_gpu_in_half_precision_with_many_rows(monkeypatch):
  """cuDNN's fused attention serves the decode step only where it is switched on and was measured to
  pay: a GPU, bf16 or fp16, at least CUDNN_DECODE_MIN_ROWS rows; everywhere else `attend`."""
  monkeypatch.setattr(lm_decode, "CUDNN_DECODE_MIN_ROWS", 16)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert not lm_decode.use_cudnn_decode(jnp.bfloat16, 160)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(lm_decode, "_cudnn_attention", lambda: object())
  assert lm_decode.use_cudnn_decode(jnp.bfloat16, 16) and lm_decode.use_cudnn_decode(jnp.float16, 16)
  assert not lm_decode.use_cudnn_decode(jnp.bfloat16, 15)
  assert not lm_decode.use_cudnn_decode(jnp.float32, 160)
  monkeypatch.setattr(lm_decode, "CUDNN_DECODE_MIN_ROWS", None)    # switched off
  assert not lm_decode.use_cudnn_decode(jnp.bfloat16, 160)
  monkeypatch.setattr(lm_decode, "CUDNN_DECODE_MIN_ROWS", 16)
  monkeypatch.setattr(lm_decode, "_cudnn_attention", lambda: None)    # a jax without the function
  assert not lm_decode.use_cudnn_decode(jnp.bfloat16, 160)


def test_reduce_dense_only_on_gpu_with_few_rows(monkeypatch):
  """The decode step's projections run as products and sums only where that was measured to pay."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert lm_decode.use_reduce_dense(1) and lm_decode.use_reduce_dense(lm_decode.REDUCE_DENSE_MAX_ROWS)
  assert not lm_decode.use_reduce_dense(lm_decode.REDUCE_DENSE_MAX_ROWS + 1)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert not lm_decode.use_reduce_dense(1)


@pytest.mark.skipif(jax.default_backend() != "gpu" or lm_decode._cudnn_attention() is None,
                    reason="cuDNN's fused attention needs a GPU")
@pytest.mark.parametrize("rows,length", [(2, 1), (16, 37), (128, 300)])
def test_cudnn_decode_attention_matches_attend(rows, length):
  """The cuDNN decode path against `attend` on the same bf16 cache: the positions past the filled
  length hold huge values, so reading any of them shows."""
  h, s, d = 16, 320, 64
  rng = np.random.default_rng(rows)
  q = jnp.asarray(rng.normal(size=(rows, 1, h, d)) / 8, jnp.bfloat16)
  k, v = (np.asarray(rng.normal(size=(rows, h, s, d)), np.float32) for _ in range(2))
  k[:, :, length:], v[:, :, length:] = 1e4, 1e4
  k, v = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
  got = jax.jit(lm_decode._cudnn_decode_attention)(q, k, v, jnp.int32(length))
  mask = (jnp.arange(s) < length)[None, None, None, :]
  want = attend(q, k, v, mask, kv_heads_first=True)
  assert got.shape == want.shape == (rows, 1, h, d)
  err = float(jnp.linalg.norm((got - want).astype(jnp.float32)) /
              jnp.linalg.norm(want.astype(jnp.float32)))
  assert err < 2e-2, err

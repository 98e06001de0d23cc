"""Where the decode step's time goes, and candidate changes to it timed side by side.

For each `--variants` entry the script compiles our sampler (`sampling.make_generate_fn`, random weights,
the shape flags of sample_speed.py), times `--repeats` calls (median steps/s), and checks the variant's
greedy tokens (top-k 1, `--agree-steps` steps) against the first variant's. With `--profile` it also
traces one call with `jax.profiler` and prints the device time per decode step by kernel (XLA op names
with their numeric suffixes folded, e.g. every `loop_add_fusion.N` together), the kernel count per step,
and the busy time against the wall time of the call (the difference is launch gaps and host work).

Variants (each changes how the decode step computes attention or its projections; the stored weights
are the same):
  base        the library's decode step as it is (lm_decode.py: self-attention through cuDNN on a GPU
              in bf16 from lm_decode.CUDNN_DECODE_MIN_ROWS rows, else XLA's dots; on a GPU the
              projections of at most REDUCE_DENSE_MAX_ROWS rows as products and sums)
  xla         XLA's dots for every attention (no cuDNN)
  reduce      single-query attention as elementwise products and reductions instead of dots, so XLA
              may fuse scores, mask and softmax into fewer kernels
  cudnn-self  self-attention over the KV cache through cuDNN at any number of rows (GPU, bf16 only),
              the cache read in its head-major layout (BNTH) up to the filled length
  cudnn-both  cudnn-self and the cross-attention too (key lengths from the text mask)
  matmul      the layer projections as matmuls at any number of rows (the library runs them as
              products and a sum for a few rows on a GPU: lm_decode.REDUCE_DENSE_MAX_ROWS)
  rows        the projection weights transposed once before the step loop to [*out, D_in], so that
              the products-and-sum projections reduce over contiguous rows (XLA's row reduction)
              instead of down columns; matmuls contract the same axis. Same arithmetic as base.
A variant that cannot run here (cuDNN on a CPU) is reported as such and skipped.

    python bench/decode_profile.py --dtype bfloat16 --steps 300 --variants base,reduce,cudnn-self --profile
    python bench/decode_profile.py --layers 2 --dim 64 --heads 4 --card 64 --top-k 16 --steps 24 \
        --variants base,reduce --profile                     # CPU smoke

XLA flags apply to the whole process: compare them by running the script again with XLA_FLAGS set.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench import sample_speed  # noqa: E402
from musicgen_jax import lm_decode  # noqa: E402
from musicgen_jax.nn import attention as attention_lib  # noqa: E402

VARIANTS = ("base", "xla", "reduce", "cudnn-self", "cudnn-both", "matmul", "rows")
_LIBRARY_ATTEND = attention_lib.attend


def _reduce_attend(q, k, v, mask=None, bias=None, kv_heads_first=False):
  """softmax(q k^T) v for one query over head-major keys, as products and sums (float32)."""
  if not kv_heads_first or q.shape[1] != 1 or bias is not None:
    return _LIBRARY_ATTEND(q, k, v, mask, bias, kv_heads_first)
  qh = q[:, 0, :, None, :].astype(jnp.float32)                      # [B, H, 1, D]
  logits = jnp.sum(qh * k.astype(jnp.float32), axis=-1)             # [B, H, S]
  if mask is not None:
    logits = jnp.where(mask[:, :, 0, :], logits, attention_lib.MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.sum(probs[..., None] * v.astype(jnp.float32), axis=2)   # [B, H, D]
  return out[:, None].astype(v.dtype)


def _cudnn_cross_attend(q, k, v, mask=None, bias=None, kv_heads_first=False):
  """The cross-attention of a decode step (one query, the text mask [B, 1, 1, Lc]) through cuDNN, the
  mask given as key lengths (a right-padded text mask keeps a prefix of the keys)."""
  if not kv_heads_first or q.shape[1] != 1 or bias is not None or mask is None:
    return _LIBRARY_ATTEND(q, k, v, mask, bias, kv_heads_first)
  lengths = jnp.sum(mask[:, 0, 0, :].astype(jnp.int32), axis=-1)
  lengths = jnp.maximum(lengths, 1)   # a null text condition: its keys are all equal, any one will do
  return lm_decode._cudnn_decode_attention(q, k, v, lengths)


_LIBRARY_MIN_ROWS = lm_decode.CUDNN_DECODE_MIN_ROWS
_LIBRARY_DENSE_BACKENDS = lm_decode.REDUCE_DENSE_BACKENDS
_LIBRARY_DENSE = lm_decode._dense
_LIBRARY_SERVING = lm_decode.serving_weights
_PROJECTIONS = ("qkv", "self_out", "fc1", "fc2", "cross_q", "cross_out")


def _rows_serving_weights(*args, **kwargs):
  """The library's serving layout with every projection kernel [D_in, *out] copied to [*out, D_in]."""
  import dataclasses
  w = _LIBRARY_SERVING(*args, **kwargs)
  flip = lambda k: None if k is None else jnp.moveaxis(k, 0, -1)
  layers = tuple(dataclasses.replace(lw, **{n: flip(getattr(lw, n)) for n in _PROJECTIONS})
                 for lw in w.layers)
  return dataclasses.replace(w, layers=layers)


def _rows_dense(x, w):
  """x [..., D_in] against w [*out, D_in] -> [..., *out]: products and a float32 sum over the last
  (contiguous) axis for a few rows, else a contraction of the same axis."""
  if lm_decode.use_reduce_dense(x.size // x.shape[-1]):
    xs = x.reshape(x.shape[:-1] + (1,) * (w.ndim - 1) + x.shape[-1:]).astype(jnp.float32)
    return jnp.sum(xs * w.astype(jnp.float32), axis=-1).astype(x.dtype)
  return jnp.tensordot(x, w, axes=((x.ndim - 1,), (w.ndim - 1,)))


def use_variant(name: str) -> None:
  """Sets lm_decode's attention and projections for the variant (the decode step reads
  `lm_decode.attend`, `lm_decode.CUDNN_DECODE_MIN_ROWS` and `lm_decode.REDUCE_DENSE_BACKENDS`)."""
  lm_decode.attend, lm_decode.CUDNN_DECODE_MIN_ROWS = _LIBRARY_ATTEND, _LIBRARY_MIN_ROWS
  lm_decode.REDUCE_DENSE_BACKENDS = _LIBRARY_DENSE_BACKENDS
  lm_decode._dense, lm_decode.serving_weights = _LIBRARY_DENSE, _LIBRARY_SERVING
  if name == "base":
    return
  if name == "rows":
    lm_decode._dense, lm_decode.serving_weights = _rows_dense, _rows_serving_weights
    return
  if name == "matmul":
    lm_decode.REDUCE_DENSE_BACKENDS = ()
    return
  if name == "xla":
    lm_decode.CUDNN_DECODE_MIN_ROWS = sys.maxsize
  elif name == "reduce":
    lm_decode.attend, lm_decode.CUDNN_DECODE_MIN_ROWS = _reduce_attend, sys.maxsize
  elif name in ("cudnn-self", "cudnn-both"):
    if jax.default_backend() != "gpu" or lm_decode._cudnn_attention() is None:
      raise RuntimeError("cuDNN attention needs a GPU")
    lm_decode.CUDNN_DECODE_MIN_ROWS = 0
    if name == "cudnn-both":
      lm_decode.attend = _cudnn_cross_attend
  else:
    raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")


def greedy_tokens(shape: sample_speed.BenchShape, dtype: str, steps: int) -> np.ndarray:
  """Greedy steps [B, K, S] of the current variant (top-k 1), fixed random weights."""
  import dataclasses
  short = dataclasses.replace(shape, steps=steps, top_k=1)
  _, run = sample_speed.prepare_ours(short, dtype, segments=1)
  return np.asarray(run(0))


def main(argv=None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--layers", type=int, default=24)
  p.add_argument("--dim", type=int, default=1024)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--codebooks", type=int, default=4)
  p.add_argument("--card", type=int, default=2048)
  p.add_argument("--text-dim", type=int, default=768)
  p.add_argument("--top-k", type=int, default=250)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--dtype", choices=sample_speed.DTYPES, default="bfloat16")
  p.add_argument("--segments", type=int, default=None)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--variants", default="base,reduce", help=f"comma-separated, from {', '.join(VARIANTS)}")
  p.add_argument("--profile", action="store_true", help="trace one call per variant, kernels by time")
  p.add_argument("--agree-steps", type=int, default=32,
                 help="greedy steps compared with the first variant (0: no comparison)")
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  names = [v for v in a.variants.split(",") if v]
  for v in names:
    if v not in VARIANTS:
      p.error(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
  shape = sample_speed.BenchShape(layers=a.layers, dim=a.dim, heads=a.heads, ffn=4 * a.dim,
                                  codebooks=a.codebooks, card=a.card, text_dim=a.text_dim,
                                  batch=a.batch, steps=a.steps, top_k=a.top_k)
  info = common.machine_info(with_torch=False)
  print(common.machine_line(info), flush=True)
  print(f"shape   | layers={shape.layers} dim={shape.dim} heads={shape.heads} codebooks={shape.codebooks}x"
        f"{shape.card} batch={shape.batch} steps={shape.steps} dtype={a.dtype} cfg={shape.cfg} "
        f"top_k={shape.top_k} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  results, reference = [], None
  for name in names:
    row: dict[str, Any] = {"variant": name}
    try:
      use_variant(name)
      facts, run = sample_speed.prepare_ours(shape, a.dtype, segments=a.segments)
      times = [0.0] * a.repeats
      for i in range(a.repeats):
        t0 = time.perf_counter()
        run(100 + i)
        times[i] = time.perf_counter() - t0
      row.update(compile_s=facts["compile_s"], median_s=statistics.median(times),
                 steps_per_s=shape.steps / statistics.median(times), segments=facts["segments"])
      if a.agree_steps:
        tokens = greedy_tokens(shape, a.dtype, a.agree_steps)
        if reference is None:
          reference = tokens
        same = np.all(tokens == reference, axis=(0, 1))
        row["greedy_same_steps"] = int(np.argmin(same)) if not same.all() else int(same.size)
        row["greedy_of"] = int(same.size)
      if a.profile:
        row["profile"] = common.kernel_profile(lambda: run(7), shape.steps)
    except Exception as e:   # a variant this machine cannot run: say so, go on with the others
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    finally:
      use_variant("base")
    results.append(row)
    if "error" in row:
      print(f"variant | {name}: not run: {row['error']}", flush=True)
      continue
    print(f"variant | {name}: {row['steps_per_s']:.1f} steps/s (median {row['median_s']:.3f} s of "
          f"{a.repeats}), compile {row['compile_s']:.1f} s, segments {row['segments']}"
          + (f"; greedy tokens equal to {names[0]}'s for {row['greedy_same_steps']} of "
             f"{row['greedy_of']} steps" if "greedy_of" in row else ""), flush=True)
    if "profile" in row:
      pr = row["profile"]
      print(common.format_kernel_profile(pr, f"profile | {name}", "step"))
  print()
  ok = [r for r in results if "error" not in r]
  print(common.format_table([dict(r, **{"steps/s": r["steps_per_s"]}) for r in ok],
                            ["variant", "steps/s", "median_s", "compile_s", "greedy_same_steps"]))
  payload = {"machine": info, "shape": vars(a), "results": results}
  if a.json:
    common.write_json(a.json, payload)
  return payload


if __name__ == "__main__":
  main()

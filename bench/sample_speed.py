"""Decode speed of our compiled sampler vs Hugging Face `MusicgenForConditionalGeneration` (random weights).

Both sides generate exactly --steps pattern steps (delay pattern, one decoder forward per step) at the same
shape and sampling settings (classifier-free guidance in one doubled batch, top-k, temperature 1), in the
same process, and we report decode steps per second and the ratio ours / HF.

What is timed
  ours  one call of the jitted `sampling.make_generate_fn` program (projection of the text states,
        cross-attention K/V, prefill, lax.scan over the steps), compiled ahead of time (compile time is
        reported apart) and warmed up once; each timed call uses a new seed and ends with
        block_until_ready.
  hf    `model.decoder.generate` (MusicgenForCausalLM, the decode loop of the composite model) given the
        projected text states with the zeroed unconditional half appended, exactly as the composite's
        generate prepares them. The T5 text encoder and the EnCodec audio decoding are not run (the composite
        `generate` always decodes audio, so it is not the entry point timed). torch.no_grad, eval mode, the
        default attention implementation; one short warm-up call.
The text states are random [B, --text-len, 768] on both sides: no text encoder is timed.

Defaults are the paper's small model (24 layers, D 1024, 16 heads, FFN 4096, 4 x 2048 codebooks), CFG 3,
top-k 250, batch 1, 1500 steps (30 s at 50 Hz). Reduced CPU run:

  python bench/sample_speed.py --layers 4 --dim 256 --heads 4 --steps 100
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# On a GPU both JAX and torch allocate memory in this process: keep JAX from preallocating 75% of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from bench import common  # noqa: E402
from musicgen_jax import lm as lm_lib  # noqa: E402
from musicgen_jax import patterns, sampling  # noqa: E402

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class BenchShape:
  """The benchmarked model shape and sampling settings (validated)."""
  layers: int = 24
  dim: int = 1024
  heads: int = 16
  ffn: int = 4096
  codebooks: int = 4
  card: int = 2048
  text_dim: int = 768
  text_len: int = 12
  batch: int = 1
  steps: int = 1500
  cfg: float = 3.0
  top_k: int = 250

  def __post_init__(self):
    for name in ("layers", "dim", "heads", "ffn", "codebooks", "card", "text_dim", "text_len", "batch",
                 "top_k"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
    if self.dim % self.heads:
      raise ValueError(f"--dim {self.dim} is not divisible by --heads {self.heads}")
    if self.steps < self.codebooks:
      raise ValueError(f"--steps {self.steps} must be >= --codebooks {self.codebooks} "
                       "(the delay pattern needs codebooks - 1 steps before the first full frame)")
    if self.top_k > self.card:
      raise ValueError(f"--top-k {self.top_k} exceeds the codebook size --card {self.card}")
    if self.cfg < 1:
      raise ValueError(f"--cfg must be >= 1 (1 disables guidance, as in Hugging Face), got {self.cfg}")

  @property
  def frames(self) -> int:
    """Codec frames T produced by `steps` decode steps of the delay pattern (S = T + K, step 0 given)."""
    return self.steps + 1 - self.codebooks

  @property
  def use_cfg(self) -> bool:
    return self.cfg > 1


def _text_states(shape: BenchShape) -> np.ndarray:
  """Random encoder states [B, L, text_dim] float32 standing in for T5 output."""
  return np.random.default_rng(0).standard_normal(
      (shape.batch, shape.text_len, shape.text_dim)).astype(np.float32)


# --- ours ---------------------------------------------------------------------------------------------
def prepare_ours(shape: BenchShape, dtype: str) -> tuple[dict[str, Any], Callable[[int], Any]]:
  """Builds random params, compiles our sampler ahead of time and runs it once (warm-up).

  Returns (facts: compile time, output shape, ...; run(seed) -> steps [B, K, S], blocking).
  """
  cfg = lm_lib.LMConfig(num_codebooks=shape.codebooks, card=shape.card, dim=shape.dim,
                        num_layers=shape.layers, num_heads=shape.heads, ffn_dim=shape.ffn,
                        text_dim=shape.text_dim, max_positions=max(2048, shape.steps + 1), dtype=dtype)
  pattern = patterns.get_pattern("delay", shape.codebooks)
  if pattern.num_steps(shape.frames) - 1 != shape.steps:
    raise AssertionError("delay pattern step count does not match --steps")
  params = jax.jit(lambda r: nn.meta.unbox(lm_lib.init_params(cfg, r)))(jax.random.key(0))
  text = jnp.asarray(_text_states(shape))
  conds = lm_lib.Conditions(text=text, text_mask=jnp.ones(text.shape[:2], jnp.int32))
  prompt = jnp.zeros((shape.batch, shape.codebooks, 0), jnp.int32)
  mode = "batch" if shape.use_cfg else "none"
  fn = sampling.make_generate_fn(cfg, pattern, shape.frames, 0, shape.top_k, False, mode)

  def args(seed):
    return (params, conds, prompt, jax.random.key(seed), jnp.float32(1.0), jnp.float32(0.0),
            jnp.float32(shape.cfg))

  t0 = time.perf_counter()
  compiled = fn.lower(*args(0)).compile()
  compile_s = time.perf_counter() - t0

  def run(seed: int) -> jax.Array:
    return compiled(*args(seed)).block_until_ready()

  out = run(0)                                          # warm-up, not timed
  return ({"impl": "ours", "dtype": dtype, "compile_s": compile_s, "out_shape": list(out.shape),
           "out": "pattern steps [B, K, S]", "frames": shape.frames,
           "path": "sampling.make_generate_fn (jit, AOT-compiled), cfg_mode=" + mode},
          run)


# --- Hugging Face -------------------------------------------------------------------------------------
def build_hf_model(shape: BenchShape, torch_dtype, device):
  """MusicgenForConditionalGeneration with a tiny T5 and a tiny EnCodec, the decoder at the bench shape."""
  import transformers as tf
  tf.logging.set_verbosity_error()  # the released configs' pad/bos id = vocab size warns; it is intended
  text_cfg = tf.T5Config(vocab_size=64, d_model=shape.text_dim, d_kv=8, d_ff=32, num_layers=1,
                         num_heads=2)
  codec_cfg = tf.EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=4, hidden_size=8,
                               upsampling_ratios=[8, 5, 4, 4], codebook_size=shape.card,
                               target_bandwidths=[2.2], num_lstm_layers=1, num_residual_layers=1)
  dec_cfg = tf.MusicgenDecoderConfig(
      vocab_size=shape.card, max_position_embeddings=max(2048, shape.steps + 1),
      num_hidden_layers=shape.layers, ffn_dim=shape.ffn, num_attention_heads=shape.heads,
      hidden_size=shape.dim, num_codebooks=shape.codebooks, dropout=0.0, pad_token_id=shape.card,
      bos_token_id=shape.card)
  config = tf.MusicgenConfig(text_encoder=text_cfg, audio_encoder=codec_cfg, decoder=dec_cfg)
  model = tf.MusicgenForConditionalGeneration(config).eval().to(device=device, dtype=torch_dtype)
  return model


def prepare_hf(shape: BenchShape, dtype: str) -> tuple[dict[str, Any], Callable[[int], Any]]:
  """Builds the random HF model and runs a short warm-up generate.

  Returns (facts: device, attention implementation, output shape, ...; run(seed) -> codes [B, K, T]
  from `model.decoder.generate` of --steps new tokens, synchronised).
  """
  import torch
  import transformers as tf
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  torch.manual_seed(0)
  t0 = time.perf_counter()
  model = build_hf_model(shape, torch_dtype, device)
  build_s = time.perf_counter() - t0
  text = torch.from_numpy(_text_states(shape)).to(device=device, dtype=torch_dtype)
  b, k, special = shape.batch, shape.codebooks, shape.card

  def run(seed: int, new_tokens: int):
    torch.manual_seed(seed)
    with torch.no_grad():
      hidden = model.enc_to_dec_proj(text) if hasattr(model, "enc_to_dec_proj") else text
      mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=device)
      if shape.use_cfg:  # the composite model's CFG input: conditional rows, then zeroed unconditional rows
        hidden = torch.cat([hidden, torch.zeros_like(hidden)], dim=0)
        mask = torch.cat([mask, torch.zeros_like(mask)], dim=0)
      start = torch.full((b * k, 1), special, dtype=torch.long, device=device)
      # The composite model decodes with an EncoderDecoderCache; the standalone decoder's generate would
      # make one DynamicCache shared by self- and cross-attention (cross keys appended to self keys), so
      # pass the composite's cache type explicitly.
      cache = tf.EncoderDecoderCache(tf.DynamicCache(config=model.decoder.config),
                                     tf.DynamicCache(config=model.decoder.config))
      codes = model.decoder.generate(
          input_ids=start, encoder_hidden_states=hidden, encoder_attention_mask=mask,
          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_k=shape.top_k,
          top_p=1.0, temperature=1.0, guidance_scale=shape.cfg if shape.use_cfg else None,
          num_return_sequences=1, cache=cache,
          pad_token_id=special, bos_token_id=special, decoder_start_token_id=special)
    if device == "cuda":
      torch.cuda.synchronize()
    return codes

  run(0, min(shape.steps, 16))                          # warm-up, not timed
  last = {}

  def timed_run(seed: int):
    last["codes"] = run(seed, shape.steps)
    return last["codes"]

  def frames() -> int:
    """Frames of the last timed call (call after timing)."""
    return int(last["codes"].shape[-1])

  return ({"impl": "hf", "dtype": dtype, "build_s": build_s, "out": "codes [B, K, T]", "device": device,
           "attn_implementation": getattr(model.decoder.config, "_attn_implementation", None),
           "path": "MusicgenForConditionalGeneration.decoder.generate (MusicgenForCausalLM) with projected "
                   "encoder_hidden_states; no T5, no audio decoding", "frames_fn": frames},
          timed_run)


# --- CLI ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=24)
  p.add_argument("--dim", type=int, default=1024)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--ffn", type=int, default=None, help="FFN width (default 4 x --dim)")
  p.add_argument("--codebooks", type=int, default=4)
  p.add_argument("--card", type=int, default=2048, help="codebook size")
  p.add_argument("--text-len", type=int, default=12)
  p.add_argument("--text-dim", type=int, default=768)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=1500, help="decode steps (1500 = 30 s at 50 Hz)")
  p.add_argument("--cfg", type=float, default=3.0, help="guidance coefficient (1 = no CFG)")
  p.add_argument("--top-k", type=int, default=250)
  p.add_argument("--dtype", choices=DTYPES, default="float32", help="our compute dtype")
  p.add_argument("--hf-dtype", choices=DTYPES, default="float32", help="Hugging Face model dtype")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per implementation")
  p.add_argument("--skip-hf", action="store_true", help="time only ours")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="torch intra-op CPU threads (0 = torch's default); 1 avoids OpenMP spin-waits on a "
                      "CPU shared with other jobs")
  p.add_argument("--json", default=None, help="also write the results as JSON to this path")
  return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
  a = parse_args(argv)
  if a.repeats < 1:
    raise ValueError(f"--repeats must be >= 1, got {a.repeats}")
  if a.torch_threads < 0:
    raise ValueError(f"--torch-threads must be >= 0 (0 = torch's default), got {a.torch_threads}")
  shape = BenchShape(layers=a.layers, dim=a.dim, heads=a.heads, ffn=a.ffn or 4 * a.dim,
                     codebooks=a.codebooks, card=a.card, text_dim=a.text_dim, text_len=a.text_len,
                     batch=a.batch, steps=a.steps, cfg=a.cfg, top_k=a.top_k)
  if a.torch_threads and not a.skip_hf:
    import torch
    torch.set_num_threads(a.torch_threads)
  info = common.machine_info(with_torch=not a.skip_hf)
  print(common.machine_line(info))
  print(f"shape  | layers={shape.layers} dim={shape.dim} heads={shape.heads} ffn={shape.ffn} "
        f"codebooks={shape.codebooks}x{shape.card} text={shape.text_len}x{shape.text_dim} "
        f"batch={shape.batch} steps={shape.steps} (frames={shape.frames}) cfg={shape.cfg} "
        f"top_k={shape.top_k} repeats={a.repeats}", flush=True)

  ours, run_ours = prepare_ours(shape, a.dtype)
  results, runs = [ours], [run_ours]
  print(f"ours   | {ours['path']}; compile {ours['compile_s']:.2f} s", flush=True)
  if not a.skip_hf:
    hf, run_hf = prepare_hf(shape, a.hf_dtype)
    results.append(hf)
    runs.append(run_hf)
    print(f"hf     | {hf['path']}; device={hf['device']} attn={hf['attn_implementation']}", flush=True)
  # Interleaved (ours, hf, ours, hf, ...) so that both see the same machine load.
  for r, times in zip(results, common.time_interleaved(runs, a.repeats)):
    r["times_s"] = times
    r.update(common.summarize(times))
    r["steps"] = shape.steps
    r["steps_per_s"] = shape.steps / r["median_s"]
  if not a.skip_hf:
    hf["frames"] = hf.pop("frames_fn")()
    if hf["frames"] != ours["frames"]:
      raise AssertionError(f"HF produced {hf['frames']} frames, ours {ours['frames']}")
  print()
  print(common.format_table(
      [dict(r, seconds=r["median_s"], **{"steps/s": r["steps_per_s"]}) for r in results],
      ["impl", "dtype", "steps", "seconds", "steps/s"]))
  ratio = results[0]["steps_per_s"] / results[1]["steps_per_s"] if len(results) > 1 else None
  print(f"\nratio ours/hf = {ratio:.3f}" if ratio is not None else "\nratio ours/hf = n/a (--skip-hf)")
  print("(seconds: median of the timed calls; steps/s = steps / median seconds)")
  payload = {"machine": info, "shape": dataclasses.asdict(shape), "repeats": a.repeats,
             "results": results, "ratio_ours_over_hf": ratio,
             "argv": sys.argv[1:] if argv is None else list(argv)}
  if a.json:
    common.write_json(a.json, payload)
  return payload


if __name__ == "__main__":
  try:
    main()
  except ValueError as e:
    sys.exit(f"error: {e}")

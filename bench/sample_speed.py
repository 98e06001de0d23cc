"""Decode speed of our compiled sampler vs Hugging Face `MusicgenForConditionalGeneration`.

Random weights by default; --hf-dir / --checkpoint run on imported weights (see below).

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

Imported weights
  --hf-dir DIR      a local Hugging Face MusicGen `save_pretrained` directory (config.json + safetensors).
                    Our side converts its LM in-process with musicgen_jax.interop.musicgen (the functions
                    `python -m musicgen_jax.convert` uses; no tokenizer needed); the HF side loads the same
                    directory with `MusicgenForConditionalGeneration.from_pretrained(DIR, local_files_only)`.
  --checkpoint DIR  a model directory we already converted (`python -m musicgen_jax.convert`): our LM
                    weights and config come from it; with --hf-dir as well the HF side loads that, otherwise
                    the HF side has random weights at the checkpoint's shape.
The model shape (layers, dim, heads, ffn, codebooks, card, text_dim) is then taken from the checkpoint and
the shape flags are ignored; --top-k defaults to min(250, card). When both sides hold the same weights, one
extra greedy (top-k 1) pass of --agree-steps steps runs on both and a line says whether the tokens agree
(a sanity check, not timed). Text-conditioned mono MusicGen only (not Melody, not stereo).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
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
SHAPE_FLAGS = ("layers", "dim", "heads", "ffn", "codebooks", "card", "text_dim")


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


@dataclasses.dataclass(frozen=True)
class Imported:
  """LM weights and config read from a checkpoint (--hf-dir and/or --checkpoint)."""
  model: dict[str, Any]          # our `config.model` fields (LMConfig.from_dict input)
  params: dict[str, Any]         # the LM parameter tree (numpy), without the {'params': ...} wrapper
  source: str                    # where our weights came from, for the output
  hf_dir: str | None             # the HF directory the HF side loads (None: HF side is random)

  def shape(self, a: argparse.Namespace) -> BenchShape:
    """The bench shape: model dimensions from the checkpoint, run settings from the flags."""
    m = self.model
    top_k = a.top_k if a.top_k is not None else min(250, int(m["card"]))
    return BenchShape(layers=m["num_layers"], dim=m["dim"], heads=m["num_heads"], ffn=m["ffn_dim"],
                      codebooks=m["num_codebooks"], card=m["card"], text_dim=m["text_dim"],
                      text_len=a.text_len, batch=a.batch, steps=a.steps, cfg=a.cfg, top_k=top_k)


def _check_supported(model: dict[str, Any], pattern: Any, where: str) -> None:
  """The bench drives the text cross-attention MusicGen with the plain K-codebook delay pattern."""
  if model.get("melody") or model.get("text_conditioning", "cross") != "cross" or not model.get("text_dim"):
    raise ValueError(f"{where} is a MusicGen-Melody (or not text cross-attention) model: this bench times "
                     "only text-conditioned MusicGen")
  delays = pattern.get("delays") if pattern is not None else None
  if pattern is not None and (pattern.get("name") != "delay" or
                              (delays is not None and tuple(delays) != tuple(range(model["num_codebooks"])))):
    raise ValueError(f"{where} uses pattern {pattern.get('name')!r} with delays {delays} (stereo?): this "
                     "bench times only the mono delay pattern")


def load_imported(hf_dir: str | None, checkpoint_dir: str | None) -> Imported:
  """Reads our LM config and weights from `checkpoint_dir` (ours) or else converts them from `hf_dir`."""
  from musicgen_jax import convert
  from musicgen_jax.interop import musicgen as hf_musicgen
  for flag, d in (("--hf-dir", hf_dir), ("--checkpoint", checkpoint_dir)):
    if d is not None and not os.path.isdir(d):
      raise ValueError(f"{flag} {d} is not a directory: pass a local directory (nothing is downloaded)")
  hf_model = None
  if hf_dir is not None:
    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
      raise ValueError(f"{cfg_path} is missing: --hf-dir must be a save_pretrained directory")
    with open(cfg_path, encoding="utf-8") as f:
      hf_config = hf_musicgen.config_from_hf(json.load(f))
    hf_model = hf_config.model.to_dict()
    _check_supported(hf_model, hf_config.pattern, hf_dir)
  if checkpoint_dir is not None:
    from musicgen_jax import checkpoint
    config, params = checkpoint.load_model(checkpoint_dir)
    model = config.model.to_dict()
    _check_supported(model, config.get("pattern"), checkpoint_dir)
    if hf_model is not None:
      keys = ("num_layers", "dim", "num_heads", "ffn_dim", "num_codebooks", "card", "text_dim")
      diff = [f"{k} {model[k]} vs {hf_model[k]}" for k in keys if model[k] != hf_model[k]]
      if diff:
        raise ValueError(f"--checkpoint and --hf-dir hold different models ({', '.join(diff)}): pass the HF "
                         "directory the checkpoint was converted from")
    return Imported(model, params["lm"], f"our checkpoint {checkpoint_dir}", hf_dir)
  lm_cfg = lm_lib.LMConfig.from_dict(hf_model)
  params = hf_musicgen.lm_params_from_hf(convert.load_state_dict(hf_dir), lm_cfg)
  return Imported(hf_model, params, f"converted in-process from {hf_dir}", hf_dir)


def _lm_config(shape: BenchShape, dtype: str, imported: Imported | None) -> lm_lib.LMConfig:
  if imported is not None:
    return lm_lib.LMConfig.from_dict(dict(imported.model, dtype=dtype, dropout=0.0))
  return lm_lib.LMConfig(num_codebooks=shape.codebooks, card=shape.card, dim=shape.dim,
                         num_layers=shape.layers, num_heads=shape.heads, ffn_dim=shape.ffn,
                         text_dim=shape.text_dim, max_positions=max(2048, shape.steps + 1), dtype=dtype)


def _text_states(shape: BenchShape) -> np.ndarray:
  """Random encoder states [B, L, text_dim] float32 standing in for T5 output."""
  return np.random.default_rng(0).standard_normal(
      (shape.batch, shape.text_len, shape.text_dim)).astype(np.float32)


# --- ours ---------------------------------------------------------------------------------------------
def _conditions(shape: BenchShape) -> lm_lib.Conditions:
  text = jnp.asarray(_text_states(shape))
  return lm_lib.Conditions(text=text, text_mask=jnp.ones(text.shape[:2], jnp.int32))


def prepare_ours(shape: BenchShape, dtype: str, imported: Imported | None = None,
                 segments: int | None = None,
                 hlo_stats: bool = False) -> tuple[dict[str, Any], Callable[[int], Any]]:
  """Builds random params (or takes the imported ones), compiles our sampler ahead of time and runs it
  once (warm-up). `segments`: the step scan's segments (None: what `sampling.generate` would choose);
  `hlo_stats`: also count the kernels and bytes copied per step in the compiled program (decode_hlo.py).

  Returns (facts: compile time, output shape, ...; run(seed) -> steps [B, K, S], blocking).
  """
  cfg = _lm_config(shape, dtype, imported)
  pattern = patterns.get_pattern("delay", shape.codebooks)
  if pattern.num_steps(shape.frames) - 1 != shape.steps:
    raise AssertionError("delay pattern step count does not match --steps")
  if imported is None:
    params = jax.jit(lambda r: nn.meta.unbox(lm_lib.init_params(cfg, r)))(jax.random.key(0))
  else:
    params = {"params": jax.tree.map(jnp.asarray, imported.params)}
  conds = _conditions(shape)
  prompt = jnp.zeros((shape.batch, shape.codebooks, 0), jnp.int32)
  mode = "batch" if shape.use_cfg else "none"
  if segments is None:
    segments = sampling.auto_segments(shape.steps, shape.batch * (2 if shape.use_cfg else 1), cfg.dim)
  fn = sampling.make_generate_fn(cfg, pattern, shape.frames, 0, shape.top_k, False, mode,
                                 segments=segments)

  def args(seed):
    return (params, conds, prompt, jax.random.key(seed), jnp.float32(1.0), jnp.float32(0.0),
            jnp.float32(shape.cfg))

  t0 = time.perf_counter()
  compiled = fn.lower(*args(0)).compile()
  compile_s = time.perf_counter() - t0
  stats = {}
  if hlo_stats:
    from bench import decode_hlo
    comps, entry = decode_hlo.parse_hlo(compiled.as_text())
    loops = decode_hlo.step_loops(comps, entry, cfg.num_layers)
    n = max(1, sum(l["trip"] for l in loops))
    kinds: dict[str, float] = {}
    for l in loops:
      for k, v in l["ops"].items():
        kinds[k] = kinds.get(k, 0) + v * l["trip"] / n
    stats = {"kernels_per_step": sum(l["kernels"] * l["trip"] for l in loops) / n,
             "kernel_kinds_per_step": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
             "copy_bytes_per_step": sum(l["copy_bytes"] * l["trip"] for l in loops) / n,
             "dynamic_slice_bytes_per_step":
                 sum(l["dynamic_slice_bytes"] * l["trip"] for l in loops) / n,
             "written_bytes_per_step": sum(l["written_bytes"] * l["trip"] for l in loops) / n}

  def run(seed: int) -> jax.Array:
    return compiled(*args(seed)).block_until_ready()

  out = run(0)                                          # warm-up, not timed
  return ({"impl": "ours", "dtype": dtype, "compile_s": compile_s, "out_shape": list(out.shape),
           "out": "pattern steps [B, K, S]", "frames": shape.frames, "segments": segments,
           "path": f"sampling.make_generate_fn (jit, AOT-compiled), cfg_mode={mode}, segments={segments}",
           **stats},
          run)


def greedy_ours(shape: BenchShape, dtype: str, imported: Imported, steps: int) -> np.ndarray:
  """Greedy (top-k 1) codes [B, K, steps + 1 - K] from the imported weights, same CFG as the bench."""
  cfg = _lm_config(shape, dtype, imported)
  settings = sampling.SamplingSettings(top_k=1, cfg_coef=shape.cfg,
                                       cfg_mode="batch" if shape.use_cfg else "none")
  codes = sampling.generate({"params": jax.tree.map(jnp.asarray, imported.params)}, cfg,
                            patterns.get_pattern("delay", shape.codebooks), _conditions(shape),
                            steps + 1 - shape.codebooks, seed=0, settings=settings)
  return np.asarray(codes)


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


def load_hf_model(hf_dir: str, torch_dtype, device):
  """MusicgenForConditionalGeneration.from_pretrained of a local directory (never downloads)."""
  import transformers as tf
  tf.logging.set_verbosity_error()
  model = tf.MusicgenForConditionalGeneration.from_pretrained(hf_dir, local_files_only=True,
                                                              use_safetensors=True)
  return model.eval().to(device=device, dtype=torch_dtype)


def hf_cache_kwarg(decoder) -> str:
  """The name under which this transformers version's MusicGen decoder takes its KV cache: `cache`
  (5.2x) or `past_key_values` (5.17 and older; generate rejects `cache` there)."""
  return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def prepare_hf(shape: BenchShape, dtype: str, hf_dir: str | None = None
               ) -> tuple[dict[str, Any], Callable[[int], Any], Callable[[int], np.ndarray]]:
  """Builds the random HF model (or loads `hf_dir`) and runs a short warm-up generate.

  Returns (facts: device, attention implementation, output shape, ...; run(seed) -> codes [B, K, T]
  from `model.decoder.generate` of --steps new tokens, synchronised; greedy(new_tokens) -> codes
  [B, K, new_tokens + 1 - K] numpy from a greedy decode with the same CFG).
  """
  import torch
  import transformers as tf
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  torch.manual_seed(0)
  t0 = time.perf_counter()
  model = build_hf_model(shape, torch_dtype, device) if hf_dir is None else \
      load_hf_model(hf_dir, torch_dtype, device)
  build_s = time.perf_counter() - t0
  cache_kwarg = hf_cache_kwarg(model.decoder)
  text = torch.from_numpy(_text_states(shape)).to(device=device, dtype=torch_dtype)
  b, k, special = shape.batch, shape.codebooks, shape.card

  def run(seed: int, new_tokens: int, greedy: bool = False):
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
      # pass the composite's cache type explicitly, under the name this transformers version takes.
      cache = tf.EncoderDecoderCache(tf.DynamicCache(config=model.decoder.config),
                                     tf.DynamicCache(config=model.decoder.config))
      codes = model.decoder.generate(
          input_ids=start, encoder_hidden_states=hidden, encoder_attention_mask=mask,
          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=not greedy,
          top_k=1 if greedy else shape.top_k,
          top_p=1.0, temperature=1.0, guidance_scale=shape.cfg if shape.use_cfg else None,
          num_return_sequences=1, **{cache_kwarg: cache},
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

  def greedy(new_tokens: int) -> np.ndarray:
    return run(0, new_tokens, greedy=True).cpu().numpy()

  return ({"impl": "hf", "dtype": dtype, "build_s": build_s, "out": "codes [B, K, T]", "device": device,
           "attn_implementation": getattr(model.decoder.config, "_attn_implementation", None),
           "weights": hf_dir if hf_dir is not None else "random",
           "path": "MusicgenForConditionalGeneration.decoder.generate (MusicgenForCausalLM) with projected "
                   "encoder_hidden_states; no T5, no audio decoding", "frames_fn": frames},
          timed_run, greedy)


# --- CLI ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", type=int, default=None, help="default 24")
  p.add_argument("--dim", type=int, default=None, help="default 1024")
  p.add_argument("--heads", type=int, default=None, help="default 16")
  p.add_argument("--ffn", type=int, default=None, help="FFN width (default 4 x --dim)")
  p.add_argument("--codebooks", type=int, default=None, help="default 4")
  p.add_argument("--card", type=int, default=None, help="codebook size (default 2048)")
  p.add_argument("--text-len", type=int, default=12)
  p.add_argument("--text-dim", type=int, default=None, help="default 768")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=1500, help="decode steps (1500 = 30 s at 50 Hz)")
  p.add_argument("--cfg", type=float, default=3.0, help="guidance coefficient (1 = no CFG)")
  p.add_argument("--top-k", type=int, default=None,
                 help="default 250 (min(250, card) with imported weights)")
  p.add_argument("--dtype", choices=DTYPES, default="float32", help="our compute dtype")
  p.add_argument("--hf-dtype", choices=DTYPES, default="float32", help="Hugging Face model dtype")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per implementation")
  p.add_argument("--hf-repeats", type=int, default=None,
                 help="timed calls of the HF side (default --repeats; fewer saves time on slow runs)")
  p.add_argument("--segments", type=int, default=None,
                 help="our step-scan segments (default: what sampling.generate chooses)")
  p.add_argument("--hlo-stats", action="store_true",
                 help="print kernels and bytes copied per decode step of our compiled program")
  p.add_argument("--skip-hf", action="store_true", help="time only ours")
  p.add_argument("--torch-threads", type=int, default=0,
                 help="torch intra-op CPU threads (0 = torch's default); 1 avoids OpenMP spin-waits on a "
                      "CPU shared with other jobs")
  p.add_argument("--hf-dir", default=None,
                 help="local HF MusicGen save_pretrained directory: both sides use its weights and shape")
  p.add_argument("--checkpoint", default=None,
                 help="our converted model directory: our side uses its LM weights and shape")
  p.add_argument("--agree-steps", type=int, default=8,
                 help="steps of the greedy token-agreement check (same weights on both sides only)")
  p.add_argument("--json", default=None, help="also write the results as JSON to this path")
  return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
  a = parse_args(argv)
  if a.repeats < 1 or (a.hf_repeats is not None and a.hf_repeats < 1):
    raise ValueError(f"--repeats and --hf-repeats must be >= 1, got {a.repeats}, {a.hf_repeats}")
  if a.segments is not None and a.segments < 1:
    raise ValueError(f"--segments must be >= 1, got {a.segments}")
  if a.torch_threads < 0:
    raise ValueError(f"--torch-threads must be >= 0 (0 = torch's default), got {a.torch_threads}")
  imported = None
  if a.hf_dir is not None or a.checkpoint is not None:
    imported = load_imported(a.hf_dir, a.checkpoint)
    shape = imported.shape(a)
    same_weights = imported.hf_dir is not None and not a.skip_hf
    if same_weights and a.agree_steps < shape.codebooks:
      raise ValueError(f"--agree-steps {a.agree_steps} must be >= the {shape.codebooks} codebooks")
  else:
    dim = a.dim or 1024
    shape = BenchShape(layers=a.layers or 24, dim=dim, heads=a.heads or 16, ffn=a.ffn or 4 * dim,
                       codebooks=a.codebooks or 4, card=a.card or 2048, text_dim=a.text_dim or 768,
                       text_len=a.text_len, batch=a.batch, steps=a.steps, cfg=a.cfg,
                       top_k=250 if a.top_k is None else a.top_k)
  if a.torch_threads and not a.skip_hf:
    import torch
    torch.set_num_threads(a.torch_threads)
  info = common.machine_info(with_torch=not a.skip_hf)
  print(common.machine_line(info))
  print(f"shape  | layers={shape.layers} dim={shape.dim} heads={shape.heads} ffn={shape.ffn} "
        f"codebooks={shape.codebooks}x{shape.card} text={shape.text_len}x{shape.text_dim} "
        f"batch={shape.batch} steps={shape.steps} (frames={shape.frames}) cfg={shape.cfg} "
        f"top_k={shape.top_k} repeats={a.repeats}", flush=True)
  if imported is not None:
    given = [f"--{n.replace('_', '-')}" for n in SHAPE_FLAGS if getattr(a, n) is not None]
    print(f"import | model shape (layers dim heads ffn codebooks card text_dim) taken from the checkpoint"
          f"{'; ignored ' + ' '.join(given) if given else ''}; our LM weights: {imported.source}; "
          f"hf weights: {'from_pretrained(' + imported.hf_dir + ')' if imported.hf_dir else 'random'}",
          flush=True)

  ours, run_ours = prepare_ours(shape, a.dtype, imported, a.segments, a.hlo_stats)
  if imported is not None:
    ours["weights"] = imported.source
  results, runs = [ours], [run_ours]
  print(f"ours   | {ours['path']}; compile {ours['compile_s']:.2f} s", flush=True)
  if a.hlo_stats:
    print(f"hlo    | per step: {ours['kernels_per_step']:.0f} kernels, "
          f"{ours['copy_bytes_per_step'] / 1e6:.3f} MB copied, "
          f"{ours['dynamic_slice_bytes_per_step'] / 1e6:.3f} MB dynamic-sliced, "
          f"{ours['written_bytes_per_step'] / 1e6:.3f} MB written "
          f"({jax.default_backend()} program, bench/decode_hlo.py)", flush=True)
    top = list(ours["kernel_kinds_per_step"].items())[:10]
    print("hlo    | kinds: " + ", ".join(f"{k} {v:.0f}" for k, v in top), flush=True)
  if not a.skip_hf:
    hf, run_hf, greedy_hf = prepare_hf(shape, a.hf_dtype, imported.hf_dir if imported else None)
    results.append(hf)
    runs.append(run_hf)
    print(f"hf     | {hf['path']}; device={hf['device']} attn={hf['attn_implementation']}", flush=True)
  # Interleaved (ours, hf, ours, hf, ...) so that both see the same machine load.
  hf_repeats = a.repeats if a.hf_repeats is None else a.hf_repeats
  counts = [a.repeats] + [hf_repeats] * (len(runs) - 1)
  timings = common.time_interleaved(runs, min(counts))
  for fn, times, n in zip(runs, timings, counts):   # the side with more repeats runs its extra calls
    for i in range(len(times), n):
      t0 = time.perf_counter()
      fn(1000 + i)
      times.append(time.perf_counter() - t0)
  for r, times in zip(results, timings):
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
  agreement = None
  if imported is not None and imported.hf_dir is not None and not a.skip_hf:
    agreement = check_agreement(shape, a, imported, greedy_hf)
  payload = {"machine": info, "shape": dataclasses.asdict(shape), "repeats": a.repeats,
             "results": results, "ratio_ours_over_hf": ratio,
             "argv": sys.argv[1:] if argv is None else list(argv)}
  if agreement is not None:
    payload["greedy_agreement"] = agreement
  if a.json:
    common.write_json(a.json, payload)
  return payload


def check_agreement(shape: BenchShape, a: argparse.Namespace, imported: Imported,
                    greedy_hf: Callable[[int], np.ndarray]) -> dict[str, Any]:
  """One greedy pass of --agree-steps steps on both sides (same weights); prints and returns the result."""
  ours = greedy_ours(shape, a.dtype, imported, a.agree_steps)
  ref = greedy_hf(a.agree_steps)
  same = ours.shape == ref.shape
  agree = int((ours == ref).sum()) if same else 0
  total = int(ref.size)
  result = {"steps": a.agree_steps, "codes_shape": list(ref.shape), "agree": agree, "total": total,
            "equal": same and agree == total, "dtypes": [a.dtype, a.hf_dtype]}
  if not same:
    verdict = f"NO (shapes differ: ours {list(ours.shape)}, hf {list(ref.shape)})"
  elif agree == total:
    verdict = f"yes ({agree}/{total} tokens)"
  else:
    first = tuple(int(i) for i in np.argwhere(ours != ref)[0])
    result["first_mismatch_bkt"] = list(first)
    verdict = f"NO ({agree}/{total} tokens agree; first mismatch at [b, k, t] = {list(first)})"
  print(f"\ngreedy | top-k 1, {a.agree_steps} steps (codes {list(ref.shape)}), CFG {shape.cfg}, "
        f"dtypes ours {a.dtype} / hf {a.hf_dtype}: tokens agree: {verdict} "
        "(sanity check, not timed)")
  return result


if __name__ == "__main__":
  try:
    main()
  except ValueError as e:
    sys.exit(f"error: {e}")

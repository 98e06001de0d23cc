"""Training speed: our sharded LM train step against transformers' MusicGen decoder, same run.

    python bench/train_speed.py --size small --batch 8 --seconds 30 --steps 10          # a GPU
    python bench/train_speed.py --layers 2 --dim 128 --heads 4 --batch 2 --seconds 2    # CPU smoke

ours: the train step the loop runs (training.loop.build_train_step over LMTask: delay pattern, learned
      text encoder, condition dropout, masked per-codebook CE, AdamW + clipping, fp32 params), jitted
      over all local devices (data-parallel), bf16 compute unless --dtype, state donated.
hf:   MusicgenForCausalLM (transformers) at the same shape: delayed codes in, per-codebook CE against the
      labels, projected text states as encoder_hidden_states, torch.optim.AdamW (fused on CUDA), global
      norm clipping, bf16 autocast unless --hf-dtype float32. One device.

Both see random tokens of the same shape; each timing is the median of --repeats blocks of --steps
steps after a warm-up. Printed: steps/s, frames/s (codec frames of audio per second of training),
model FLOPs per step (analytical: training.lm_task.forward_flops x 3, formula in its docstring), MFU
against the device's peak bf16 FLOP/s, peak device memory, and the ratio ours / hf. --pipeline also
measures the input pipeline alone (reading a token cache built from random codes) in frames/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")   # leave torch room in the same process

import numpy as np

from bench.common import (format_kernel_profile, kernel_profile, machine_info, machine_line,
                          peak_flops)
from musicgen_jax.lm import LMConfig, layer_scan_unroll

SIZES = {"small": (1024, 24, 16), "medium": (1536, 48, 24), "large": (2048, 48, 32)}


def parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", choices=sorted(SIZES), default="small")
  p.add_argument("--layers", type=int)
  p.add_argument("--dim", type=int)
  p.add_argument("--heads", type=int)
  p.add_argument("--codebooks", type=int, default=4)
  p.add_argument("--card", type=int, default=2048)
  p.add_argument("--batch", type=int, default=8, help="global batch")
  p.add_argument("--seconds", type=float, default=30.0, help="segment length (50 frames/s)")
  p.add_argument("--text-len", type=int, default=32)
  p.add_argument("--steps", type=int, default=10, help="steps per timed block")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"])
  p.add_argument("--scan-unroll", type=int, default=None,
                 help="layers per iteration of the layer scan (model.scan_unroll; 0 = all; default: "
                      "the library's choice for the backend, lm.layer_scan_unroll)")
  p.add_argument("--hf-dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--skip-hf", action="store_true")
  p.add_argument("--skip-ours", action="store_true")
  p.add_argument("--pipeline", action="store_true", help="also time the input pipeline alone")
  p.add_argument("--profile", action="store_true",
                 help="also trace one block of our steps: device time by kernel (bench/common.py)")
  p.add_argument("--json", help="write all figures to this file")
  return p.parse_args()


def config_for(a):
  from configs.musicgen import get_config
  c = get_config(a.size)
  d, layers, heads = SIZES[a.size]
  d, layers, heads = a.dim or d, a.layers or layers, a.heads or heads
  c.model.update(dim=d, num_layers=layers, num_heads=heads, ffn_dim=4 * d, num_codebooks=a.codebooks,
                 card=a.card, dtype=a.dtype, remat=a.remat, scan_unroll=a.scan_unroll)
  c.text.update(max_length=a.text_len)
  c.train.update(batch_size=a.batch, segment_seconds=a.seconds, warmup_steps=10, num_steps=1000)
  c.pattern.delays = tuple(range(a.codebooks))
  return c


def random_batch(task, batch: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  out = {}
  for k, s in task.batch_spec(batch).items():
    if k == "codes":
      out[k] = rng.integers(0, task.lm_cfg.card, s.shape).astype(np.int32)
    elif k == "input_ids":
      out[k] = rng.integers(3, 200, s.shape).astype(np.int32)
    else:
      out[k] = np.ones(s.shape, s.dtype)
  return out


def time_blocks(run_block, repeats: int) -> float:
  run_block()   # warm-up (compile)
  return statistics.median(_timed(run_block) for _ in range(repeats))


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def ours(a, c) -> dict:
  import jax
  from flax import linen as nn
  from musicgen_jax import sharding as shd
  from musicgen_jax.training.lm_task import LMTask
  from musicgen_jax.training.steps import build_train_step
  mesh = shd.make_mesh(c.mesh.shape, c.mesh.axes)
  rules = shd.rules_from_config(c.logical_axis_rules)
  task = LMTask(c, mesh)
  ts = build_train_step(task, mesh, rules, a.batch)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(lambda r: nn.unbox(task.init_state(r)), out_shardings=ts.state_shardings)(
        jax.random.key(0))
    batch = jax.device_put(random_batch(task, a.batch), ts.batch_shardings)
    acc = jax.device_put(ts.zero_acc(), ts.acc_sharding)
    exe = ts.lower().compile()
  compile_s = time.perf_counter() - t0
  box = {"state": state, "acc": acc}

  def block():
    s, ac = box["state"], box["acc"]
    for _ in range(a.steps):
      s, ac, _ = exe(s, ac, batch)
    jax.block_until_ready(ac)
    box["state"], box["acc"] = s, ac

  sec = time_blocks(block, a.repeats) / a.steps
  loss = float(jax.device_get(box["acc"])["sum"]["loss"]) / max(int(box["acc"]["n"]), 1)
  mem = _jax_peak_bytes()
  out = {"impl": "ours", "dtype": a.dtype, "step_s": sec, "compile_s": compile_s, "peak_bytes": mem,
         "flops": task.flops_per_step(a.batch), "frames": task.frames, "loss": loss,
         "devices": jax.device_count()}
  if a.profile:
    out["profile"] = kernel_profile(block, a.steps)
  return out


def _jax_peak_bytes() -> int | None:
  import jax
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  peaks = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use") is not None]
  return max(peaks) if peaks else None


def hf(a, c, frames: int) -> dict:
  import torch
  from transformers import MusicgenDecoderConfig, MusicgenForCausalLM
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  m = c.model
  cfg = MusicgenDecoderConfig(vocab_size=m.card, max_position_embeddings=4096,
                              num_hidden_layers=m.num_layers, ffn_dim=m.ffn_dim,
                              num_attention_heads=m.num_heads, hidden_size=m.dim,
                              num_codebooks=m.num_codebooks, pad_token_id=m.card,
                              bos_token_id=m.card, dropout=0.0, attention_dropout=0.0,
                              activation_dropout=0.0)
  model = MusicgenForCausalLM(cfg).to(dev).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                          fused=dev == "cuda")
  k = m.num_codebooks
  steps = frames + k   # delay pattern length (special first step + delays), as ours
  g = torch.Generator().manual_seed(0)
  codes = torch.randint(0, m.card, (a.batch, k, steps), generator=g)
  labels = codes.permute(0, 2, 1).to(dev)                          # (B, S, K)
  enc = torch.randn(a.batch, a.text_len, m.dim, generator=g).to(dev)
  enc_mask = torch.ones(a.batch, a.text_len, dtype=torch.long, device=dev)
  autocast = a.hf_dtype == "bfloat16"
  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()

  def one():
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
      out = model(labels=labels, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss

  def block():
    for _ in range(a.steps):
      loss = one()
    float(loss.detach())   # syncs the device

  sec = time_blocks(block, a.repeats) / a.steps
  peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
  return {"impl": "hf", "dtype": a.hf_dtype, "step_s": sec, "peak_bytes": peak, "device": dev,
          "attn": getattr(model.config, "_attn_implementation", "?")}


def random_token_cache(c, directory: str, items: int = 256, seed: int = 0) -> str:
  """A token cache of `items` random windows (2 x the segment) in the cache's own format: the
  ArrayRecord shards, done-files and TFDS metadata that token_cache.build_shards/finalize write."""
  from array_record.python import array_record_module
  from tensorflow_datasets.core import example_serializer
  from musicgen_jax.data import manifest, token_cache
  m = c.model
  frames = 2 * int(round(float(c.train.segment_seconds) * float(c.codec.frame_rate)))
  spec = token_cache.CacheSpec(int(c.codec.sample_rate), int(c.codec.channels), 1,
                               int(m.num_codebooks), 1, int(m.card), frames, (frames,),
                               bool(m.melody))
  feats = token_cache.features(spec)
  serializer = example_serializer.ExampleSerializer(feats.get_serialized_info())
  rng = np.random.default_rng(seed)
  shards, per_shard = [], 64
  for split, n in (("train", items), ("validation", per_shard)):
    count = -(-n // per_shard)
    for i in range(count):
      shards.append({"split": split, "index": i, "count": count, "start": i * per_shard,
                     "end": min(n, (i + 1) * per_shard)})
  plan = {"audio_dir": "", "spec": dataclasses.asdict(spec), "shards": shards}
  os.makedirs(os.path.join(directory, token_cache.DONE_DIR), exist_ok=True)
  for shard in shards:
    path = os.fspath(token_cache._template(directory, shard["split"]).sharded_filepath(
        shard_index=shard["index"], num_shards=shard["count"]))
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1,uncompressed")
    n = shard["end"] - shard["start"]
    for _ in range(n):
      ex = {"codes": rng.integers(0, m.card, (m.num_codebooks, frames)).astype(spec.codes_dtype),
            "caption": "a random caption for the pipeline benchmark", "metadata": "{}"}
      if spec.melody:
        ex["chroma"] = rng.integers(0, 12, frames // 2).astype(np.uint8)
      writer.write(serializer.serialize_example(feats.encode_example(ex)))
    writer.close()
    manifest.write_json(token_cache._done_path(directory, shard),
                           {"examples": n, "frames": n * frames, "bytes": os.path.getsize(path)})
  token_cache.finalize(directory, plan, spec)
  return directory


def pipeline(c) -> dict:
  """Frames/s of the input pipeline alone (grain over a token cache of random codes, crops,
  tokenisation, batching, the config's worker processes), on this host."""
  from musicgen_jax import pipeline as pipeline_lib
  from musicgen_jax.data import loader
  tokenizer = pipeline_lib.text_conditioner_from_config(c, None)
  with tempfile.TemporaryDirectory() as d:
    source = loader.TokenSource(random_token_cache(c, d), "train")
    it = iter(loader.make_dataset(source, c, tokenizer))
    return loader.throughput(it, seconds=10.0)


def main():
  a = parse()
  c = config_for(a)
  print(machine_line(machine_info(with_torch=not a.skip_hf)))
  m = c.model
  print(f"shape | layers={m.num_layers} dim={m.dim} heads={m.num_heads} ffn={m.ffn_dim} "
        f"codebooks={m.num_codebooks}x{m.card} batch={a.batch} segment={a.seconds}s text={a.text_len} "
        f"steps/block={a.steps} repeats={a.repeats} remat={a.remat} scan_unroll={a.scan_unroll} "
        f"(layers per scan iteration: {layer_scan_unroll(LMConfig.from_dict(m))})")
  rows = []
  if not a.skip_ours:
    rows.append(ours(a, c))
  frames = int(round(a.seconds * 50))
  if not a.skip_hf:
    rows.append(hf(a, c, frames))
  flops = rows[0].get("flops") if rows and "flops" in rows[0] else None
  if flops is None:
    from musicgen_jax import lm as lm_lib
    from musicgen_jax.training.lm_task import forward_flops
    flops = 3 * forward_flops(lm_lib.LMConfig.from_dict(c.model), a.batch, frames + a.codebooks,
                              a.text_len)
  peak = peak_flops()
  print(f"flops  | {flops / 1e12:.2f} TFLOP per step (3 x forward, analytical); device peak "
        f"{'%.0f TFLOP/s' % (peak / 1e12) if peak else 'unknown'}")
  print(f"\n{'impl':5} {'dtype':9} {'s/step':>9} {'steps/s':>8} {'frames/s':>10} {'MFU':>6} "
        f"{'peak mem':>10}")
  for r in rows:
    r["steps_per_s"] = 1.0 / r["step_s"]
    r["frames_per_s"] = r["steps_per_s"] * frames * a.batch
    r["mfu"] = flops * r["steps_per_s"] / peak if peak else None
    mem = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r.get("peak_bytes") else "n/a"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    print(f"{r['impl']:5} {r['dtype']:9} {r['step_s']:9.4f} {r['steps_per_s']:8.2f} "
          f"{r['frames_per_s']:10.0f} {mfu:>6} {mem:>10}")
  if len(rows) == 2:
    print(f"\nratio ours/hf (steps/s) = {rows[0]['steps_per_s'] / rows[1]['steps_per_s']:.2f}")
  if rows and "profile" in rows[0]:
    print("\n" + format_kernel_profile(rows[0]["profile"], "profile | our train step", "step"))
  if rows and rows[0]["impl"] == "ours":
    print(f"ours compile {rows[0]['compile_s']:.1f} s, final loss {rows[0]['loss']:.3f}, "
          f"{rows[0]['devices']} device(s)")
  result = {"rows": rows, "flops_per_step": flops, "peak_flops": peak}
  if a.pipeline:
    p = pipeline(c)
    result["pipeline"] = p
    need = rows[0]["frames_per_s"] if rows else float("nan")
    print(f"\npipeline | {p['frames_per_s']:.0f} frames/s reading the token cache "
          f"({p['frames_per_s'] / need:.1f}x the train step's {need:.0f}; target >= 5x)")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()

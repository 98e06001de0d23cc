"""Text to WAV, end to end: our `sample.py` against transformers' `MusicgenForConditionalGeneration`.

One random MusicGen (T5 text encoder, decoder, EnCodec) is built with transformers, saved with
`save_pretrained` (+ a tokenizer.json) and converted with `python -m musicgen_jax.convert`; both sides then
turn the same prompts into WAV files, each in a fresh process whose wall time is measured:

  ours  `python sample.py --checkpoint OURS --prompts-file P --duration D --out DIR --verbose`: start-up,
        loading (checksums verified), compilation, T5, decoding, EnCodec, WAV writing. `cold` starts with
        an empty JAX compilation cache (--compile-cache), `warm` is a second run with the cache it filled,
        as a user's second call with the same shapes.
  hf    a child process: import torch + transformers, `from_pretrained` (safetensors, local), tokenize,
        `model.generate(do_sample=True, top_k, guidance_scale, max_new_tokens)` (T5, decoder, EnCodec),
        the same WAV writer. `cold` is the first such process, `warm` a second one (the OS file cache is
        warm; torch keeps no compilation cache).
Settings on both sides: CFG 3 in one doubled batch, top-k 250, temperature 1, T = ceil(D * frame rate)
frames (HF: max_new_tokens = T + K - 1 steps of the delay pattern). Prompts are distinct short texts.
The table prints each side's seconds and the ratio hf / ours (> 1: ours is faster).

    python bench/e2e_speed.py                                  # small model, 10 s and 30 s, batch 1 and 64
    python bench/e2e_speed.py --smoke                          # tiny everything, seconds on a CPU
    python bench/e2e_speed.py --durations 30 --batches 1 --states warm --json runs/e2e.json

Shapes: --layers/--dim/--heads/--ffn/--card for the decoder, --t5 base|tiny, --codec 32khz|tiny. The model
directories live in --workdir (reused when the shape matches). On a GPU the HF side runs on cuda in
--hf-dtype (default float32, its fastest in our measurements); ours uses sample.py's default dtype
(bfloat16 on accelerators) unless --dtype is given.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("lofi hip hop beat with a mellow piano calm ambient pad slow drums bass guitar synth bright "
         "energetic rock jazz trio soft strings epic orchestral dance house groove warm vinyl").split()
ENCODEC_32KHZ = dict(sampling_rate=32000, audio_channels=1, num_filters=64, hidden_size=128,
                     upsampling_ratios=[8, 5, 4, 4], norm_type="weight_norm", use_causal_conv=False,
                     pad_mode="reflect", use_conv_shortcut=False, num_lstm_layers=2, num_residual_layers=1,
                     compress=2, kernel_size=7, last_kernel_size=7, residual_kernel_size=3,
                     dilation_growth_rate=2, codebook_size=2048, codebook_dim=128, target_bandwidths=[2.2],
                     normalize=False)
ENCODEC_TINY = dict(target_bandwidths=[2.4], sampling_rate=1600, num_filters=4, num_residual_layers=1,
                    upsampling_ratios=[4, 4], codebook_dim=16, hidden_size=16, num_lstm_layers=1,
                    normalize=False, use_causal_conv=True)     # 100 Hz frames, 4 codebooks
T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
               feed_forward_proj="relu")
T5_TINY = dict(vocab_size=64, d_model=24, d_kv=8, d_ff=48, num_layers=1, num_heads=3,
               feed_forward_proj="relu")


def prompts(batch: int) -> list[str]:
  return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 5)) for i in range(batch)]


# --- the model -----------------------------------------------------------------------------------------
def _converter_digest() -> str:
  """A hash of the code that writes model directories: a change of it rebuilds the cached model."""
  import hashlib
  h = hashlib.sha1()
  pkg = ROOT / "musicgen_jax"
  paths = [pkg / n for n in ("convert.py", "checkpoint.py", "integrity.py")]
  for path in paths + sorted((pkg / "interop").glob("*.py")):
    if path.is_file():
      h.update(path.read_bytes())
  return h.hexdigest()[:12]


def model_spec(a: argparse.Namespace) -> dict[str, Any]:
  return {"layers": a.layers, "dim": a.dim, "heads": a.heads, "ffn": a.ffn or 4 * a.dim, "card": a.card,
          "t5": a.t5, "codec": a.codec, "max_positions": 2048, "converter": _converter_digest()}


def build_model(spec: dict[str, Any], hf_dir: str, ours_dir: str) -> str:
  """Random HF MusicGen saved to hf_dir (+ tokenizer.json), converted to ours_dir; -> a summary line."""
  import tokenizers
  import torch
  import transformers as t
  from tokenizers import models, pre_tokenizers, processors
  t.logging.set_verbosity_error()
  torch.manual_seed(0)
  codec = dict(ENCODEC_32KHZ if spec["codec"] == "32khz" else ENCODEC_TINY, codebook_size=spec["card"])
  t5 = T5_BASE if spec["t5"] == "base" else T5_TINY
  dec = t.MusicgenDecoderConfig(vocab_size=spec["card"], hidden_size=spec["dim"],
                                num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                                ffn_dim=spec["ffn"], num_codebooks=4,
                                max_position_embeddings=spec["max_positions"], pad_token_id=spec["card"],
                                bos_token_id=spec["card"])
  model = t.MusicgenForConditionalGeneration(t.MusicgenConfig(
      text_encoder=t.T5Config(**t5), audio_encoder=t.EncodecConfig(**codec), decoder=dec)).eval()
  model.generation_config.decoder_start_token_id = spec["card"]
  model.generation_config.pad_token_id = spec["card"]
  model.save_pretrained(hf_dir, safe_serialization=True)
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
  for w in WORDS:
    vocab.setdefault(w, len(vocab))
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  tok.save(os.path.join(hf_dir, "tokenizer.json"))
  proc = subprocess.run([sys.executable, "-m", "musicgen_jax.convert", hf_dir, ours_dir], cwd=ROOT,
                        capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"convert failed: {proc.stderr.strip()[-2000:]}")
  with open(os.path.join(ours_dir, "bench_spec.json"), "w") as f:
    json.dump(spec, f)
  return proc.stdout.strip()


def ensure_model(spec: dict[str, Any], workdir: str) -> tuple[str, str]:
  hf_dir, ours_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "ours")
  marker = os.path.join(ours_dir, "bench_spec.json")
  if os.path.isfile(marker):
    with open(marker) as f:
      if json.load(f) == spec:
        print(f"model  | reusing {workdir}", flush=True)
        return hf_dir, ours_dir
  for d in (hf_dir, ours_dir):
    shutil.rmtree(d, ignore_errors=True)
  t0 = time.perf_counter()
  line = build_model(spec, hf_dir, ours_dir)
  print(f"model  | built and converted in {time.perf_counter() - t0:.1f} s: {line}", flush=True)
  return hf_dir, ours_dir


# --- one run per side ----------------------------------------------------------------------------------
def run_ours(a, ours_dir: str, duration: float, batch: int, cache_dir: str, out_dir: str) -> dict:
  pfile = os.path.join(out_dir, "prompts.txt")
  os.makedirs(out_dir, exist_ok=True)
  with open(pfile, "w") as f:
    f.write("\n".join(prompts(batch)) + "\n")
  cmd = [sys.executable, "sample.py", "--checkpoint", ours_dir, "--prompts-file", pfile,
         "--duration", str(duration), "--out", os.path.join(out_dir, "wav"), "--overwrite",
         "--compile-cache", cache_dir, "--verbose", "--noprogress", "--seed", "0", "--top-k", "250",
         "--cfg", "3", "--temperature", "1"]
  if a.dtype:
    cmd += ["--dtype", a.dtype]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.timeout)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f"sample.py failed ({proc.returncode}): {proc.stderr.strip()[-3000:]}")
  wavs = len([n for n in os.listdir(os.path.join(out_dir, "wav")) if n.endswith(".wav")])
  detail = [l.strip() for l in proc.stderr.splitlines() if l.strip() and not l.startswith(("W", "I"))]
  return {"wall_s": wall, "wavs": wavs, "detail": detail[-8:]}


def run_hf(a, hf_dir: str, duration: float, batch: int, out_dir: str) -> dict:
  job = {"hf_dir": hf_dir, "duration": duration, "batch": batch, "out": out_dir, "dtype": a.hf_dtype,
         "top_k": 250, "cfg": 3.0, "torch_threads": a.torch_threads}
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, __file__, "--hf-child", json.dumps(job)], cwd=ROOT,
                        capture_output=True, text=True, timeout=a.timeout)
  wall = time.perf_counter() - t0
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"HF child failed ({proc.returncode}): {proc.stderr.strip()[-3000:]}")
  return dict(json.loads(lines[-1][len("RESULT "):]), wall_s=wall)


def hf_child(job: dict) -> None:
  """In a fresh process: load, generate, write WAVs; prints RESULT {phases}."""
  t0 = time.perf_counter()
  import torch
  import transformers as t
  from musicgen_jax import audio as audio_lib
  t.logging.set_verbosity_error()
  if job["torch_threads"]:
    torch.set_num_threads(job["torch_threads"])
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job["dtype"]]
  t1 = time.perf_counter()
  model = t.MusicgenForConditionalGeneration.from_pretrained(
      job["hf_dir"], local_files_only=True, use_safetensors=True, dtype=dtype).to(device).eval()
  tok = t.PreTrainedTokenizerFast(tokenizer_file=os.path.join(job["hf_dir"], "tokenizer.json"),
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
  t2 = time.perf_counter()
  rate = model.config.audio_encoder.sampling_rate
  frame_rate = math.ceil(rate / math.prod(model.config.audio_encoder.upsampling_ratios))
  frames = int(math.ceil(round(job["duration"] * frame_rate, 6)))
  k = model.config.decoder.num_codebooks
  inputs = tok(prompts(job["batch"]), padding=True, return_tensors="pt").to(device)
  torch.manual_seed(0)
  with torch.no_grad():
    audio = model.generate(**inputs, do_sample=True, top_k=job["top_k"], guidance_scale=job["cfg"],
                           max_new_tokens=frames + k - 1)
  if device == "cuda":
    torch.cuda.synchronize()
  t3 = time.perf_counter()
  audio = audio.float().cpu().numpy()
  os.makedirs(job["out"], exist_ok=True)
  for i in range(audio.shape[0]):
    audio_lib.write_wav(os.path.join(job["out"], f"{i:03d}.wav"), audio[i], rate)
  t4 = time.perf_counter()
  print("RESULT " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "generate_s": t3 - t2,
                                "write_s": t4 - t3, "samples": int(audio.shape[-1]),
                                "seconds_of_audio": audio.shape[-1] / rate, "device": device}))


# --- CLI -----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--durations", type=float, nargs="+", default=[10.0, 30.0])
  p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
  p.add_argument("--states", nargs="+", choices=("cold", "warm"), default=["cold", "warm"],
                 help="warm runs after a cold one of ours (it fills the cache; printed, hf not run)")
  p.add_argument("--layers", type=int, default=24)
  p.add_argument("--dim", type=int, default=1024)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--ffn", type=int, default=None, help="default 4 x --dim")
  p.add_argument("--card", type=int, default=2048)
  p.add_argument("--t5", choices=("base", "tiny"), default="base")
  p.add_argument("--codec", choices=("32khz", "tiny"), default="32khz")
  p.add_argument("--smoke", action="store_true",
                 help="tiny decoder / T5 / codec, 1 s at batch 1 and 2: a CPU smoke run")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                 help="our LM dtype (default: sample.py's, bfloat16 on accelerators)")
  p.add_argument("--hf-dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--skip-hf", action="store_true")
  p.add_argument("--torch-threads", type=int, default=0, help="torch CPU threads (0 = default)")
  p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "musicgen_e2e_bench"))
  p.add_argument("--timeout", type=float, default=1800, help="seconds per process")
  p.add_argument("--json", default=None)
  p.add_argument("--hf-child", default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.smoke:
    a.layers, a.dim, a.heads, a.card, a.t5, a.codec = 2, 64, 4, 64, "tiny", "tiny"
    if a.durations == [10.0, 30.0]:
      a.durations = [1.0]
    if a.batches == [1, 64]:
      a.batches = [1, 2]
  return a


def main(argv=None) -> dict:
  a = parse_args(argv)
  if a.hf_child:
    hf_child(json.loads(a.hf_child))
    return {}
  from bench import common
  info = common.machine_info(with_torch=not a.skip_hf)
  print(common.machine_line(info), flush=True)
  spec = model_spec(a)
  print(f"shape  | decoder {spec['layers']} x {spec['dim']} (heads {spec['heads']}, ffn {spec['ffn']}, "
        f"4 x {spec['card']}), T5 {spec['t5']}, EnCodec {spec['codec']}; CFG 3, top-k 250", flush=True)
  os.makedirs(a.workdir, exist_ok=True)
  hf_dir, ours_dir = ensure_model(spec, a.workdir)
  rows = []
  for duration in a.durations:
    for batch in a.batches:
      cache = os.path.join(a.workdir, f"jax_cache_{duration:g}s_b{batch}")
      shutil.rmtree(cache, ignore_errors=True)          # cold: an empty compilation cache
      for state in ("cold", "warm"):
        if state not in a.states and not (state == "cold" and "warm" in a.states):
          continue
        out = os.path.join(a.workdir, f"out_{duration:g}s_b{batch}_{state}")
        shutil.rmtree(out, ignore_errors=True)
        row = {"duration_s": duration, "batch": batch, "state": state, "reported": state in a.states}
        row["ours"] = run_ours(a, ours_dir, duration, batch, cache, os.path.join(out, "ours"))
        if not a.skip_hf and state in a.states:
          row["hf"] = run_hf(a, hf_dir, duration, batch, os.path.join(out, "hf"))
        rows.append(row)   # a cold run made only to fill the cache for `warm` is printed too
        hf_s = row.get("hf", {}).get("wall_s")
        print(f"run    | {duration:g} s x {batch} {state}: ours {row['ours']['wall_s']:.2f} s"
              + (f", hf {hf_s:.2f} s (generate {row['hf']['generate_s']:.2f} s)" if hf_s else ""),
              flush=True)
        for line in row["ours"]["detail"]:
          print(f"       | ours: {line}")
  table = []
  for r in rows:
    hf_s = r.get("hf", {}).get("wall_s")
    table.append({"duration": f"{r['duration_s']:g} s", "batch": r["batch"], "state": r["state"],
                  "ours s": r["ours"]["wall_s"], "hf s": hf_s if hf_s is not None else "",
                  "hf/ours": hf_s / r["ours"]["wall_s"] if hf_s else ""})
  print()
  print(common.format_table(table, ["duration", "batch", "state", "ours s", "hf s", "hf/ours"]))
  print("(wall seconds of one fresh process each, text to WAV files; hf/ours > 1: ours is faster)")
  payload = {"machine": info, "spec": spec, "rows": rows, "argv": sys.argv[1:] if argv is None else argv}
  if a.json:
    common.write_json(a.json, payload)
  return payload


if __name__ == "__main__":
  main()

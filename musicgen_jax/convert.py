"""Import a Hugging Face MusicGen / MusicGen-Melody checkpoint into a musicgen_jax model directory.

  python -m musicgen_jax.convert HF_DIR OUT_DIR

HF_DIR is a local `save_pretrained` directory: config.json, model.safetensors (or a sharded
model.safetensors.index.json), tokenizer.json (from the processor / tokenizer save) and optionally
generation_config.json. Pickled weights (pytorch_model.bin) are refused, never loaded. OUT_DIR is then
usable with `sample.py --checkpoint OUT_DIR`. A hub id in place of HF_DIR is fetched with
huggingface_hub when that package is installed (safetensors and JSON files only).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

_MODEL = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read {path}: {e}") from None


def resolve_dir(source: str) -> str:
  """A local directory as is; a hub id ('org/name') downloaded when huggingface_hub is installed."""
  if os.path.isdir(source):
    return source
  looks_like_id = source.count("/") == 1 and not source.startswith((".", "/")) and not os.path.exists(source)
  if looks_like_id:
    try:
      import huggingface_hub
    except ImportError:
      huggingface_hub = None
    if huggingface_hub is not None:
      return huggingface_hub.snapshot_download(source, allow_patterns=["*.safetensors", "*.json"])
  raise ValueError(f"{source} is not a directory: pass a local save_pretrained directory")


def load_state_dict(directory: str) -> dict[str, np.ndarray]:
  """All weights of model.safetensors or of the shards listed in model.safetensors.index.json."""
  from safetensors.numpy import load_file
  single, index = os.path.join(directory, _MODEL), os.path.join(directory, _INDEX)
  if os.path.isfile(single):
    return load_file(single)
  if os.path.isfile(index):
    shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
    if not shards:
      raise ValueError(f"{index} lists no shards")
    sd: dict[str, np.ndarray] = {}
    for shard in shards:
      path = os.path.join(directory, shard)
      if not os.path.isfile(path):
        raise ValueError(f"{path} (listed in {_INDEX}) is missing")
      sd.update(load_file(path))
    return sd
  if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in os.listdir(directory)):
    raise ValueError(f"{directory} holds only pickled PyTorch weights, which are never loaded: re-save the "
                     "model with `save_pretrained(..., safe_serialization=True)`")
  raise ValueError(f"{directory} has neither {_MODEL} nor {_INDEX}")


def convert(hf_dir: str, out_dir: str) -> str:
  """Reads a HF MusicGen directory and writes our model directory; returns a one-line summary."""
  from musicgen_jax import checkpoint
  from musicgen_jax.codec.encodec import EncodecConfig
  from musicgen_jax.conditioners.t5 import T5EncoderConfig
  from musicgen_jax.interop import musicgen as hf_musicgen
  from musicgen_jax.interop.encodec import encodec_params_from_hf
  from musicgen_jax.interop.t5 import t5_params_from_hf
  from musicgen_jax.lm import LMConfig

  hf_dir = resolve_dir(hf_dir)
  cfg_path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(cfg_path):
    raise ValueError(f"{cfg_path} is missing: {hf_dir} is not a save_pretrained directory")
  gen_path = os.path.join(hf_dir, "generation_config.json")
  gen = _read_json(gen_path) if os.path.isfile(gen_path) else None
  config = hf_musicgen.config_from_hf(_read_json(cfg_path), gen)
  tokenizer = os.path.join(hf_dir, "tokenizer.json")
  if not os.path.isfile(tokenizer):
    raise ValueError(f"{tokenizer} is missing: save the processor (or tokenizer) into {hf_dir} too")
  state = load_state_dict(hf_dir)

  lm_cfg = LMConfig.from_dict(config.model)
  params = {
      "lm": hf_musicgen.lm_params_from_hf(state, lm_cfg),
      "text": t5_params_from_hf(state, T5EncoderConfig.from_hf_dict(config.text.t5.to_dict()),
                                prefix="text_encoder."),
      "codec": encodec_params_from_hf(state, EncodecConfig.from_hf_dict(config.codec.encodec.to_dict()),
                                      prefix="audio_encoder."),
  }
  checkpoint.save_model(out_dir, config, params, tokenizer_file=tokenizer)
  m = config.model
  return (f"wrote {out_dir}: {config.variant}, {m.num_layers} layers x {m.dim}, {m.num_codebooks} codebooks "
          f"of {m.card}, {config.codec.sample_rate} Hz")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("hf_dir", help="Hugging Face save_pretrained directory (or hub id)")
  parser.add_argument("out_dir", help="musicgen_jax model directory to write")
  args = parser.parse_args(argv)
  try:
    print(convert(args.hf_dir, args.out_dir))
  except Exception as e:  # noqa: BLE001 -- every failure is reported as one line, never a traceback
    msg = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, (ValueError, OSError)):
      msg = f"{type(e).__name__}: {msg}"
    print(f"convert: error: {msg}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

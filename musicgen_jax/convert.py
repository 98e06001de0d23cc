"""Import a Hugging Face MusicGen / MusicGen-Melody checkpoint into a musicgen_jax model directory.

  python -m musicgen_jax.convert HF_DIR OUT_DIR [--overwrite]

HF_DIR is a local `save_pretrained` directory: config.json, model.safetensors (or a sharded
model.safetensors.index.json), tokenizer.json (from the processor / tokenizer save) and optionally
generation_config.json. Pickled weights (pytorch_model.bin) are refused, never loaded; weights with NaN,
inf or absurd values are refused, naming the file and tensor. OUT_DIR is then usable with
`sample.py --checkpoint OUT_DIR`; an existing OUT_DIR is replaced only with --overwrite. A Hugging Face
hub id is fetched only when written `hf:ORG/NAME` and huggingface_hub is installed (safetensors and
JSON files only); anything else is a local path.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Sequence

import numpy as np

_MODEL = "model.safetensors"
_INDEX = "model.safetensors.index.json"
HUB_PREFIX = "hf:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read {path}: {e}") from None


def resolve_dir(source: str) -> str:
  """A local directory as is; `hf:ORG/NAME` downloaded from the hub when huggingface_hub is installed.

  A path that does not exist is never guessed to be a hub id: the error says what is wrong.
  """
  if source.startswith(HUB_PREFIX):
    repo_id = source[len(HUB_PREFIX):]
    if not _HUB_ID.match(repo_id):
      raise ValueError(f"{source}: a hub id is hf:ORG/NAME (e.g. hf:facebook/musicgen-small)")
    try:
      import huggingface_hub
    except ImportError:
      raise ValueError(f"{source} is a Hugging Face hub id, but huggingface_hub is not installed: "
                       "`pip install huggingface_hub`, or download the model and pass its "
                       "directory") from None
    try:
      return huggingface_hub.snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json"])
    except Exception as e:  # noqa: BLE001 -- network, auth and not-found errors all end here
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise ValueError(f"cannot fetch {repo_id} from the Hugging Face hub ({type(e).__name__}: "
                       f"{first[:200]})") from None
  if os.path.isdir(source):
    return source
  if os.path.exists(source):
    raise ValueError(f"{source} is a file, not a directory: pass the save_pretrained directory "
                     "that holds config.json and model.safetensors")
  hint = ""
  if _HUB_ID.match(source):
    hint = f" (for the Hugging Face hub id, write {HUB_PREFIX}{source})"
  raise ValueError(f"{source} does not exist: pass a local save_pretrained directory{hint}")


def load_state_dict(directory: str) -> dict[str, np.ndarray]:
  """All weights of model.safetensors or of the shards listed in model.safetensors.index.json."""
  from musicgen_jax import integrity
  from safetensors.numpy import load_file

  def load_checked(path: str) -> dict[str, np.ndarray]:
    try:
      sd = load_file(path)
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own types for a damaged header
      raise ValueError(f"{path} is damaged or not a safetensors file: "
                       f"{' '.join(str(e).split())[:200]}") from None
    integrity.check_finite(sd, path)
    return sd

  single, index = os.path.join(directory, _MODEL), os.path.join(directory, _INDEX)
  if os.path.isfile(single):
    return load_checked(single)
  if os.path.isfile(index):
    shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
    if not shards:
      raise ValueError(f"{index} lists no shards")
    sd: dict[str, np.ndarray] = {}
    for shard in shards:
      path = os.path.join(directory, shard)
      if not os.path.isfile(path):
        raise ValueError(f"{path} (listed in {_INDEX}) is missing")
      sd.update(load_checked(path))
    return sd
  if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in os.listdir(directory)):
    raise ValueError(f"{directory} holds only pickled PyTorch weights, which are never loaded: re-save the "
                     "model with `save_pretrained(..., safe_serialization=True)`")
  raise ValueError(f"{directory} has neither {_MODEL} nor {_INDEX}")


def convert(hf_dir: str, out_dir: str, overwrite: bool = False) -> str:
  """Reads a HF MusicGen directory and writes our model directory; returns a one-line summary.

  An existing model in `out_dir` is replaced only with `overwrite` (checked before anything is read).
  """
  from musicgen_jax import checkpoint
  from musicgen_jax.codec.encodec import EncodecConfig
  from musicgen_jax.conditioners.t5 import T5EncoderConfig
  from musicgen_jax.conditioners.tokenizer import read_tokenizer_file
  from musicgen_jax.interop import musicgen as hf_musicgen
  from musicgen_jax.interop.encodec import encodec_params_from_hf
  from musicgen_jax.interop.t5 import t5_params_from_hf
  from musicgen_jax.lm import LMConfig

  checkpoint.check_output_dir(os.path.abspath(out_dir), overwrite)
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
  try:
    read_tokenizer_file(tokenizer)   # a model directory with a tokenizer that does not load is refused
  except ValueError as e:
    raise ValueError(f"{e}: save the processor (or tokenizer) into {hf_dir} again") from None
  state = load_state_dict(hf_dir)

  lm_cfg = LMConfig.from_dict(config.model)
  params = {
      "lm": hf_musicgen.lm_params_from_hf(state, lm_cfg),
      "text": t5_params_from_hf(state, T5EncoderConfig.from_hf_dict(config.text.t5.to_dict()),
                                prefix="text_encoder."),
      "codec": encodec_params_from_hf(state, EncodecConfig.from_hf_dict(config.codec.encodec.to_dict()),
                                      prefix="audio_encoder."),
  }
  checkpoint.save_model(out_dir, config, params, tokenizer_file=tokenizer, overwrite=overwrite)
  m = config.model
  return (f"wrote {out_dir}: {config.variant}, {m.num_layers} layers x {m.dim}, {m.num_codebooks} codebooks "
          f"of {m.card}, {config.codec.sample_rate} Hz")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="convert", description=__doc__.split("\n\n")[0])
  parser.add_argument("hf_dir", help="Hugging Face save_pretrained directory (or hf:ORG/NAME)")
  parser.add_argument("out_dir", help="musicgen_jax model directory to write")
  parser.add_argument("--overwrite", action="store_true", help="replace a model already in OUT_DIR")
  args = parser.parse_args(argv)
  try:
    print(convert(args.hf_dir, args.out_dir, args.overwrite))
  except Exception as e:  # noqa: BLE001 -- every failure is reported as one line, never a traceback
    msg = " ".join(str(e).split()) or type(e).__name__
    if not isinstance(e, (ValueError, OSError)):
      msg = f"{type(e).__name__}: {msg}"
    print(f"convert: error: {msg}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"convert: interrupted; {args.out_dir} is unchanged", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""A compact model directory from a training run: the parameters only, optionally in bfloat16.

    python -m musicgen_jax.export SOURCE OUT_DIR [--dtype bfloat16|float32] [--overwrite]

SOURCE is anything sample.py reads: a training run's work directory (its newest checkpoint, with the
codec under codec/), its best/ directory, or a model directory. OUT_DIR gets the config, the
parameters (text encoder, LM and codec; no optimizer state, no EMA copy), the tokenizer when there is
one, and an integrity record. bfloat16 halves the size; loading casts the weights back to float32
(checkpoint.cast_floating), so only their rounding differs. This is how models/demo is made.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

from musicgen_jax import checkpoint

DTYPES = ("float32", "bfloat16")


def export(source: str, out_dir: str, *, dtype: str = "float32", overwrite: bool = False) -> dict:
  """Writes OUT_DIR from SOURCE; returns {'parameters': n, 'bytes': size on disk}."""
  if dtype not in DTYPES:
    raise ValueError(f"--dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
  if os.path.abspath(source) == os.path.abspath(out_dir):
    raise ValueError("the output directory is the source: choose another OUT_DIR")
  checkpoint.check_output_dir(out_dir, overwrite)
  config, params = checkpoint.load_model(source)
  tokenizer = os.path.join(source, checkpoint.TOKENIZER_FILE)
  params = checkpoint.cast_floating(jax.device_get(params), jnp.dtype(dtype))
  checkpoint.save_model(out_dir, config, params,
                        tokenizer if os.path.isfile(tokenizer) else None, overwrite=overwrite)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out_dir) for f in fs)
  return {"parameters": int(sum(x.size for x in jax.tree.leaves(params))), "bytes": size}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m musicgen_jax.export", description=__doc__.split("\n")[0])
  p.add_argument("source", help="a training work directory, its best/, or a model directory")
  p.add_argument("out_dir")
  p.add_argument("--dtype", default="float32", choices=DTYPES)
  p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
  args = p.parse_args(argv)
  try:
    got = export(args.source, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
  except (ValueError, OSError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out_dir}: {got['parameters']:,} parameters in {args.dtype}, "
        f"{got['bytes'] / 1e6:.1f} MB")
  return 0


if __name__ == "__main__":
  sys.exit(main())

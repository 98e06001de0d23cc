"""Evaluate a model: `python -m musicgen_jax.eval MODEL_DIR --data DATA_DIR [--samples 32]
[--duration S] [--speed-seconds 30] [--seed 0] [--random-baseline] [--out DIR]`.

Writes eval.json, eval.md and eval.png to --out (default MODEL_DIR/eval) and prints the table. What
is measured: musicgen_jax/eval/evaluate.py. DATA_DIR: the data directory the model was trained with
(e.g. runs/demo-data for the shipped model).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m musicgen_jax.eval", description=__doc__.split("\n")[0])
  p.add_argument("model_dir")
  p.add_argument("--data", required=True, help="the data directory of the model's training run "
                 "(its config.data.cache_dir: the rendered corpus and the token cache)")
  p.add_argument("--samples", type=int, default=32)
  p.add_argument("--duration", type=float, default=0.0, help="seconds per clip (0: the model's)")
  p.add_argument("--speed-seconds", type=float, default=30.0, help="0: skip the speed measurement")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None)
  p.add_argument("--random-baseline", action="store_true", help="also score the samples of a "
                 "model of the same shape with random weights (the model's codec)")
  args = p.parse_args(argv)
  from musicgen_jax import checkpoint
  from musicgen_jax.data.manifest import write_json
  from musicgen_jax.eval import evaluate as ev
  settings = ev.EvalSettings(samples=args.samples, duration=args.duration, seed=args.seed,
                             speed_seconds=args.speed_seconds,
                             random_baseline=args.random_baseline)
  out = args.out or os.path.join(args.model_dir, "eval")
  try:
    ev.check_settings(settings)
    from musicgen_jax import cli
    cli.check_output_dir(out)
    ev.check_model_dir(checkpoint.read_config(args.model_dir), args.model_dir, args.data)
    result = ev.evaluate(args.model_dir, args.data, settings)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  result["command"] = "python -m musicgen_jax.eval " + " ".join(sys.argv[1:] if argv is None
                                                                else argv)
  os.makedirs(out, exist_ok=True)
  write_json(os.path.join(out, "eval.json"), result)
  table = ev.markdown(result)
  with open(os.path.join(out, "eval.md"), "w") as f:
    f.write(table)
  ev.plot(result, os.path.join(out, "eval.png"))
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())

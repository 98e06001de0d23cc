"""Train the MusicGen LM: `python train.py --config configs/musicgen.py:tiny --workdir runs/tiny`.

Resumes from the newest complete checkpoint in --workdir; SIGTERM / Ctrl-C save and stop (run the same
command to continue). The work directory is also a model directory: `python sample.py --checkpoint
runs/tiny ...` generates from its latest step. Your own music:

  python train.py --config configs/musicgen.py:small --workdir runs/mine \
      --config.data.kind=manifest --config.data.manifest=songs.jsonl --config.init_from=models/small
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from musicgen_jax import cli
from musicgen_jax.training import loop

_CONFIG = cli.define_config_flag("config", cli.DEFAULT_CONFIG, "Training config.")
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the config are written (required; "
                    "the same directory resumes the run).")
FLAGS = flags.FLAGS

# Architecture fields that come from --config.init_from's model directory when it is given.
_ARCHITECTURE = ("--config.model.", "--config.text.", "--config.pattern.", "--config.codec.")
_NUMERICS = ("--config.model.dtype", "--config.model.dropout", "--config.model.remat")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  cli.plain_log_lines()
  with cli.friendly_errors("train.py"):
    if not (FLAGS.workdir or "").strip():
      raise ValueError("--workdir is required: the directory for this run's checkpoints, metrics "
                       "and config (give the same one again to resume)")
    fresh = [f"--config.{field}" for part in loop.init_fresh_parts(config)
             for field in loop.INIT_FRESH[part].fields]
    names = [a.split("=")[0] for a in sys.argv[1:]]
    overridden = [n for n in names if n.startswith(_ARCHITECTURE) and not n.startswith(_NUMERICS)
                  and not any(n == f or n.startswith(f + ".") for f in fresh)]
    if config.init_from and overridden:
      cli.fail(f"{', '.join(overridden)} cannot be combined with --config.init_from: the "
               f"architecture comes from {config.init_from}; only model.dtype, model.dropout and "
               "model.remat may change (and the parts that --config.init_fresh starts anew)")
    try:
      loop.train(config, FLAGS.workdir)
    except loop.Stopped as e:
      print(f"train.py: {e}", file=sys.stderr)
      sys.exit(e.exit_code)
    except KeyboardInterrupt:
      print("train.py: interrupted before training started; nothing was saved (caches resume)",
            file=sys.stderr)
      sys.exit(130)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=cli.parse_flags)   # bad flags or config: one line, exit 2

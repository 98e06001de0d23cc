"""Train the MusicGen LM: `python train.py --config configs/musicgen.py:tiny --workdir runs/tiny`.

Resumes from the latest checkpoint in --workdir. The work directory is also a model directory:
`python sample.py --checkpoint runs/tiny ...` generates from its latest step.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from musicgen_jax import cli
from musicgen_jax.training import loop

_CONFIG = config_flags.DEFINE_config_file("config", "configs/musicgen.py:tiny", "Training config.")
flags.DEFINE_string("workdir", "runs/tiny", "Where checkpoints and the config are written.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  with cli.friendly_errors("train.py"):
    loop.train(_CONFIG.value, FLAGS.workdir)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)

"""Generate music from text prompts (and optionally a melody or an audio prompt).

  python sample.py --checkpoint DIR --prompt "lofi hip hop with a mellow piano" --duration 10 --out out/
  python sample.py --prompt "a tiny random model" --duration 1 --save-tokens out/tokens.npy  # no weights

Without --checkpoint a randomly initialised model of --config is used (smoke runs, tests).
All prompts run in one compiled call. Bad input stops with one line before anything compiles.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from musicgen_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/musicgen.py:tiny",
                                          "Model config, used when --checkpoint is not given.")
flags.DEFINE_string("checkpoint", None, "Model directory (train.py output or an imported checkpoint).")
flags.DEFINE_multi_string("prompt", [], "A text prompt; repeat for several.")
flags.DEFINE_string("prompts-file", None, "A text file with one prompt per line.")
flags.DEFINE_float("duration", None, "Seconds of audio per prompt (default: the config's).")
flags.DEFINE_integer("top-k", None, "Sample among the k most likely tokens (1 = greedy).")
flags.DEFINE_float("top-p", None, "Nucleus sampling mass in [0, 1] (0 = off).")
flags.DEFINE_float("temperature", None, "Softmax temperature (0 = greedy).")
flags.DEFINE_float("cfg", None, "Classifier-free guidance coefficient (1 = off).")
flags.DEFINE_enum("cfg-mode", None, ["batch", "two_pass"], "CFG in one doubled batch or two passes.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("out", None, "Directory for one WAV per prompt (tokens .npy without a codec).")
flags.DEFINE_string("save-tokens", None, "Write the generated codes [B, K, T] to this .npy file.")
flags.DEFINE_string("melody", None, "Audio file whose chromagram conditions a melody model.")
flags.DEFINE_string("prompt-audio", None, "Audio file to continue; the output starts with it.")
flags.DEFINE_float("stride", None, "Long-form: seconds to advance per window (default: half).")
flags.DEFINE_bool("plot", False, "Also write a spectrogram PNG beside each WAV.")
flags.DEFINE_bool("progress", True, "Show a progress indication on stderr.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}: prompts go in --prompt")
  f = {name: FLAGS[name].value for name in FLAGS}
  with cli.friendly_errors("sample.py"):
    request = cli.SampleRequest.from_flags(f)        # validates everything cheap first
    model = cli.load_model(f["checkpoint"], _CONFIG.value)
    result = cli.run_sample(model, request)
    for line in cli.write_outputs(model, request, result):
      print(line)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)

"""Generate music from text prompts (and optionally a melody or an audio prompt).

  python sample.py --checkpoint DIR --prompt "lofi hip hop with a mellow piano" --duration 10 \
      --out out/
  python sample.py --prompt "a tiny random model" --duration 1 --save-tokens out/t.npy  # no weights

  python sample.py --prompt "a cheerful folk dance in A major on flute" --out out.wav  # shipped

Without --checkpoint the model that ships with the repo (models/demo) is used; with --config and no
--checkpoint, a randomly initialised model of that config (smoke runs, tests).
All prompts run in one compiled call (in batches when they do not fit in memory, or with
--batch-size); compiled programs are kept in a per-user cache, so the next run with the same shapes
starts at once. Bad input stops with one line before anything is loaded.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging

from musicgen_jax import cli, pipeline, sharding

_CONFIG = cli.define_config_flag("config", cli.DEFAULT_CONFIG,
                                 "A config for a randomly initialised model (smoke runs); only "
                                 "without --checkpoint.")
flags.DEFINE_string("checkpoint", None, "Model directory (train.py output or an imported checkpoint); "
                    "default: the shipped model, models/demo.")
flags.DEFINE_multi_string("prompt", [], "A text prompt; repeat for several.")
flags.DEFINE_string("prompts-file", None, "A text file with one prompt per line.")
flags.DEFINE_float("duration", None, "Seconds of audio per prompt (default: the config's).")
flags.DEFINE_float("max-duration", 3600.0, "Refuse durations above this many seconds (raise it for "
                   "longer audio; each window of the model's length takes its own decode).")
flags.DEFINE_integer("top-k", None, "Sample among the k most likely tokens (1 = greedy).")
flags.DEFINE_float("top-p", None, "Nucleus sampling mass in [0, 1] (0 = off).")
flags.DEFINE_float("temperature", None, "Softmax temperature (0 = greedy).")
flags.DEFINE_float("cfg", None, "Classifier-free guidance coefficient (1 = off).")
flags.DEFINE_enum("cfg-mode", None, ["batch", "two_pass"], "CFG in one doubled batch or two passes.")
flags.DEFINE_integer("seed", 0, "Random seed, in [0, 2**32).")
flags.DEFINE_string("out", None, "Directory for one WAV per prompt (tokens .npy without a codec), "
                    "or a FILE.wav for a single prompt.")
flags.DEFINE_string("save-tokens", None, "Write the generated codes [B, K, T] to this .npy file.")
flags.DEFINE_bool("overwrite", False, "Replace output files that already exist.")
flags.DEFINE_string("melody", None, "Audio file whose chromagram conditions a melody model.")
flags.DEFINE_string("prompt-audio", None, "Audio file to continue; the output starts with it.")
flags.DEFINE_integer("batch-size", None, "Prompts per compiled call (default: all of them when they "
                     "fit in memory, else as many as fit); each batch is written as it finishes.")
flags.DEFINE_float("stride", None, "Long-form: seconds to advance per window (default: half).")
flags.DEFINE_bool("plot", False, "Also write a spectrogram PNG beside each WAV.")
flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
flags.DEFINE_enum("dtype", "auto", list(cli.DTYPES), "LM compute dtype: auto = bfloat16 on GPU/TPU, "
                  "float32 on CPU (weights stay float32).")
flags.DEFINE_bool("verify", True, "Check the weights' checksums at load (one read of the files).")
flags.DEFINE_string("compile-cache", None, "JAX compilation cache directory (default: per user, "
                    "~/.cache/musicgen_jax/jax; '' = off).")
flags.DEFINE_bool("verbose", False, "Print where the time went (load, compile, generate, codec...).")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}: prompts go in --prompt")
  f = {name: FLAGS[name].value for name in FLAGS}
  cli.plain_log_lines()
  with cli.friendly_errors("sample.py"):
    request = cli.SampleRequest.from_flags(f)        # everything cheap, before any model is loaded
    overrides = cli.config_overrides(FLAGS["config"])
    checkpoint_dir = f["checkpoint"]
    if FLAGS["checkpoint"].present and not (checkpoint_dir or "").strip():
      raise ValueError("--checkpoint is empty: give a model directory, or leave the flag out for "
                       "the model that ships with the repo")
    if checkpoint_dir and FLAGS["config"].present:
      raise ValueError("--config is not used with --checkpoint (the model directory holds its "
                       "config): drop it; --config.sampling.* and --config.model.dtype still apply")
    if not checkpoint_dir and not FLAGS["config"].present:
      checkpoint_dir = cli.shipped_model()
    if checkpoint_dir:
      pipeline.check_overrides(list(overrides))
    cli.setup_compilation_cache(f["compile-cache"])
    import jax
    dtype = cli.resolve_dtype(f["dtype"], overrides, jax.default_backend())
    devices = jax.local_devices()   # every local device: the batch is split over them
    mesh = sharding.make_mesh(devices=devices) if len(devices) > 1 else None
    timings = cli.Timings()
    try:
      with timings.phase("load"):
        model = cli.load_model(checkpoint_dir, _CONFIG.value, overrides=overrides, dtype=dtype,
                               verify=f["verify"], mesh=mesh)
      stopped = cli.generate_and_write(model, request, timings)   # Ctrl-C: what is finished is kept
      if request.verbose:
        print(timings.summary(), file=sys.stderr)
    finally:
      timings.close()
    if stopped:
      print(f"sample.py: {stopped}", file=sys.stderr)
      sys.exit(130)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=cli.parse_flags)

"""The model that ships with the repo (models/demo): `--config configs/demo.py:codec` and `:lm`.

Trained on a 2-core CPU from the music21 corpus rendered with FluidSynth (corpus preset "demo"),
in two runs that share one data directory (the corpus is rendered once, by whichever run starts
first), then exported in bfloat16. The whole recipe, one command from the repository root:

    python train.py --config configs/demo.py:codec --workdir runs/demo-codec && \
    python train.py --config configs/demo.py:lm --workdir runs/demo-lm && \
    python train.py --config configs/demo.py:lm --workdir runs/demo-lm --config.train.num_steps=2000 && \
    python -m musicgen_jax.export runs/demo-lm models/demo --dtype bfloat16 --overwrite

The LM trains in two stages, as the shipped weights did: 500 steps with their own warmup and cosine
decay, then the same run continued to 2000 steps, whose schedule restarts from its value at step
500 of a 2000-step cosine (a warm restart: the learning rate goes back up to 0.87 of its peak).
models/demo/TRAINING.md records the run that made the shipped weights.

codec  EnCodec geometry at 32 kHz mono, hop 640 (50 Hz frames), 4 codebooks of 512, 16 base filters,
       64-dim latents, one LSTM layer (configs/codec.py:demo). Trained with the L1, multi-scale mel
       and commitment losses but without the adversarial ones: on this CPU the MS-STFT
       discriminator made a step 23 times slower (15.3 s against 0.67 s for 8 x 1 s; 8-9 s since
       2026-11-27). What that costs, a noise floor many times the real audio's, and the
       adversarial fine-tune that lowers it: models/demo/TRAINING.md. Batch 8 x 1 s, so each
       code sees 400 frames per step: the dead-code threshold is lowered to match (audiocraft's
       2.0 assumes ~12 times more frames per code), and 512 codes per book (not 1024) keep the
       LM's vocabulary small.
lm     4 layers, D 256, 4 heads, FFN 1024 (4.2M parameters with the heads and embeddings), the
       learned byte-level text encoder (2 layers, D 256; it collapsed in training, and the next LM
       should use --config.text.tokenizer=words --config.text.num_layers=0, TRAINING.md says
       why) and the chroma melody, both as a prefix as
       MusicGen-Melody does; 8 s segments, batch 8, 500 steps (2.8 s a step on a 2-core CPU:
       about 25 minutes), then continued to 2000 (the recipe above). 576 positions: the longest
       text prefix (96 bytes), the melody prefix (64 chroma frames) and 8.2 s of audio, the length
       it learnt; longer samples are generated in overlapping windows of that length, as for the
       released models. Pattern: "delay" (the paper's choice for its released
       models): one decoder step per frame, so an 8 s sample is 403 steps, where flattening would
       take 4 times as many (too slow for a sample in under a minute on a CPU) and parallel
       predicts the codebooks of a frame independently, which the paper found clearly worse.
"""
from __future__ import annotations

from ml_collections import ConfigDict

from configs import codec as codec_configs
from configs import musicgen

DATA_DIR = "runs/demo-data"      # the corpus and the token cache, shared by the two runs
CODEC_DIR = "runs/demo-codec"    # the codec run's work directory (the LM run's codec)


def _data(c: ConfigDict) -> None:
  c.data.update(kind="corpus", corpus="demo", cache_dir=DATA_DIR, corpus_workers=2)


def get_config(arg: str | None = None) -> ConfigDict:
  variant = arg or "lm"
  if variant == "codec":
    c = codec_configs.get_config("demo")
    _data(c)
    return c
  if variant != "lm":
    raise ValueError(f"unknown demo config variant {variant!r}: use codec or lm")
  c = musicgen.get_config("small")
  c.variant = "demo"
  c.model.update(num_codebooks=4, card=512, dim=256, num_layers=4, num_heads=4, ffn_dim=1024,
                 melody=True, text_conditioning="prefix", chroma_length=64, max_positions=576)
  c.text.update(kind="learned", dim=256, num_layers=2, num_heads=4, max_length=96, tokenizer="")
  c.model.text_dim = c.text.dim
  c.codec.update(sample_rate=32000, frame_rate=50, channels=1)
  c.sampling.update(duration=8.0)
  c.train.update(batch_size=8, num_steps=500, learning_rate=1e-3, warmup_steps=50,
                 segment_seconds=8.0, cond_dropout=0.2, log_every=25, eval_every=250,
                 eval_batches=4, checkpoint_every=100, keep_checkpoints=2)
  _data(c)
  c.data.codec = CODEC_DIR
  return c

"""The model that ships with the repo (models/demo): `--config configs/demo.py:VARIANT`.

Trained on a 2-core CPU from the music21 corpus rendered with FluidSynth (corpus preset "demo"),
in runs that share one data directory (the corpus is rendered once, by whichever run starts first),
then exported in bfloat16. The whole recipe, one command from the repository root (each run resumes
if interrupted; models/demo/TRAINING.md records the runs that made the shipped weights):

    python train.py --config configs/demo.py:codec --workdir runs/demo-codec && \
    python train.py --config configs/demo.py:codec_adv --workdir runs/demo-codec-adv && \
    python train.py --config configs/demo.py:lm --workdir runs/demo-lm && \
    python train.py --config configs/demo.py:lm --workdir runs/demo-lm --config.train.num_steps=2000 \
        --config.train.stop_at=1800 && \
    python train.py --config configs/demo.py:lm_words --workdir runs/demo-lm-words && \
    python train.py --config configs/demo.py:lm_final --workdir runs/demo-lm-final && \
    python train.py --config configs/demo.py:lm_cross --workdir runs/demo-lm-cross && \
    python train.py --config configs/demo.py:lm_cross --workdir runs/demo-lm-cross \
        --config.train.num_steps=3000 && \
    python train.py --config configs/demo.py:lm_cross --workdir runs/demo-lm-cross \
        --config.train.num_steps=5400 && \
    python train.py --config configs/demo.py:lm_merge --workdir runs/demo-lm-merge && \
    python train.py --config configs/demo.py:lm_merge --workdir runs/demo-lm-merge \
        --config.train.num_steps=3000 && \
    python train.py --config configs/demo.py:lm_wide --workdir runs/demo-lm-wide && \
    python train.py --config configs/demo.py:lm_attr --workdir runs/demo-lm-attr && \
    python train.py --config configs/demo.py:lm_more --workdir runs/demo-lm-more && \
    python train.py --config configs/demo.py:lm_beat --workdir runs/demo-lm-beat && \
    python -m musicgen_jax.export runs/demo-lm-beat models/demo --dtype bfloat16 --overwrite

codec      EnCodec geometry at 32 kHz mono, hop 640 (50 Hz frames), 4 codebooks of 512, 16 base
           filters, 64-dim latents, one LSTM layer (configs/codec.py:demo), 3,000 steps with the L1,
           multi-scale mel and commitment losses only (the MS-STFT discriminator makes a step 12
           times slower on this CPU). Batch 8 x 1 s, so each code sees 400 frames per step: the
           dead-code threshold is lowered to match (audiocraft's 2.0 assumes ~12 times more frames
           per code), and 512 codes per book (not 1024) keep the LM's vocabulary small.
codec_adv  that codec fine-tuned with the adversarial and feature-matching losses (MS-STFT
           discriminator, weights 4 and 4 beside L1 0.1 and mel 2 in the balancer): without them
           the decoder adds a noise floor 12 times the input's spectral flatness, which the LM then
           learns to reproduce; 700 steps of a 1000-step schedule bring it to the input's or below.
lm         4 layers, D 256, 4 heads, FFN 1024 (4.2M parameters with the heads and embeddings), the
           learned byte-level text encoder (2 layers, D 256) and the chroma melody, both as a prefix
           as MusicGen-Melody does; 8 s segments, batch 8, 500 steps (2.8 s a step on a 2-core CPU),
           then continued to step 1800 of a 2000-step schedule (a warm restart: the learning rate
           goes back up to 0.87 of its peak). 576 positions: the longest text prefix (96 tokens),
           the melody prefix (64 chroma frames) and 8.2 s of audio, the length it learnt; longer
           samples are generated in overlapping windows of that length, as for the released models.
           Pattern: "delay" (the paper's choice for its released models): one decoder step per
           frame, so an 8 s sample is 403 steps, where flattening would take 4 times as many (too
           slow for a sample in under a minute on a CPU) and parallel predicts the codebooks of a
           frame independently, which the paper found clearly worse.
lm_words   that LM with a new text encoder (init_fresh): its byte-level one collapsed to one output
           for every caption, so the LM had learnt to ignore it. A word vocabulary fitted on the
           training captions and no layers (an embedding table plus positions, like audiocraft's
           lookup-table conditioner) cannot collapse that way. Learning rate 5e-4, 1036 steps of a
           1500-step schedule.
lm_final   that LM continued on the tokens of codec_adv (the codec exported with it): the fine-tune
           renamed 92-97% of the codes, so the LM learns its vocabulary again while keeping what it
           knows of music and of the captions. Learning rate 5e-4, 1000 steps of a 1200-step
           schedule (45 min on this CPU).
lm_cross   that LM reading its text by cross-attention in every layer instead of as a prefix
           (init_fresh=cross: new cross-attention weights, every other weight kept; the audio then
           starts right after the melody prefix). A cross-attention LM trained from scratch used its
           conditions 25-35 times more than the prefix one but learnt the audio too slowly on this
           CPU; starting from the trained LM keeps the audio. Learning rate 5e-4, 1500 steps
           (64 min on this CPU), then continued twice as the lm stage was (warm restarts: steps
           1500-3000 of a 3000-step cosine, then 3000-5400 of a 5400-step one, starting at 0.51
           and 0.42 of the peak), because the instrument and the key were still being learnt (the
           held-out CE and the condition gain still improving; 3 h 40 min in all).
lm_merge   that LM on captions merged with the corpus's metadata: 30% of the training captions get
           the rendering's key, bpm and instrument, half of those alone ("G minor, 78 bpm,
           trumpet"), so that the key and tempo are sometimes all a caption says. A fresh schedule
           (learning rate 5e-4, 1500 steps, 68 min): the held-out CE fell 0.12 below where the one
           before had flattened and the melody is followed far more (chroma 0.39 against 0.23).
           Continued as lm_cross was (steps 1500-3000 of a 3000-step cosine, about 60 min): the
           held-out CE fell 0.057 more and the melody to 0.57; the key and the tempo are read no
           more than before the merging.
lm_wide    that LM on a wider corpus: the same pieces rendered 5 times each instead of twice (with
           their own seeded instrument, tempo and transposition; 4,430 training renderings, 16.4 h,
           a second corpus and token cache under runs/demo-data-wide, 18 + 16 min to build), the
           same merged captions, a fresh 1500-step schedule at 5e-4 (53 min). The LM had begun to
           overfit its 1,772 renderings (train loss 3.05, held-out 3.25); on 2.5 times as many,
           the held-out test recordings' CE fell 0.18 nats and the melody is followed as closely
           as the codec allows (chroma 0.79; its reconstructions 0.77). The key and the tempo are
           still not read.
lm_attr    that LM with the melody also dropped alone, from half the training examples
           (train.melody_dropout, audiocraft's attribute dropout for its melody models). Every run
           before dropped the text and the melody only together, so text without a melody (what
           sampling without --melody gives the LM) was never seen in training, and with the melody
           there, a caption's key and tempo told the LM nothing the melody did not. The same data
           and captions, a fresh 1500-step schedule at 5e-4 (61 min). The key is now followed
           (7 of 32 clips in the named key against 1 with another key named or none), the
           instrument more often, the held-out CE 0.11 lower; the melody a little less closely
           (chroma 0.73 against 0.79) and the tempo still not.
lm_more    that LM trained on with the same data and settings, 2,000 steps of a fresh cosine at
           3e-4 (about where lm_attr's schedule was at its middle; 65 min): the key had only begun
           to be read, and the held-out CE was still falling. The CE fell 0.08 more, the key is
           named in 11 of 32 clips (7 before) against 1 changed, the instrument and the melody as
           before; the tempo still not.
lm_beat    that LM with a beat clock (model.beat_clock_rate, conditioners/tempo.py): each audio
           frame also gets sines of its beat phase at the tempo the caption names, in phase with
           the recording's beats (the corpus knows them from the score), starting on a beat in
           sampling. Its projection starts at zero (init_fresh=beat), so the LM starts as it was.
           1,000 steps of a fresh cosine at 3e-4, the data and settings of lm_more (31 min). The
           tempo is followed now (24 of 32 clips at the named tempo against 2 with another named),
           the key, instrument and melody as before: the shipped LM. The caption's words alone
           had not taught the tempo in 3,500 steps, nor had more segment starts, nor a clock of
           arbitrary phase.
"""
from __future__ import annotations

from ml_collections import ConfigDict

from configs import codec as codec_configs
from configs import musicgen

DATA_DIR = "runs/demo-data"      # the corpus and the token caches, shared by the runs
CODEC_DIR = "runs/demo-codec"    # the codec run's work directory (the lm run's codec)
ADV_CODEC_DIR = "runs/demo-codec-adv"   # its adversarial fine-tune (lm_final's codec)
LM_DIR, WORDS_DIR = "runs/demo-lm", "runs/demo-lm-words"   # where lm_words and lm_final start
FINAL_DIR = "runs/demo-lm-final"                          # where lm_cross starts
CROSS_DIR = "runs/demo-lm-cross"                          # where lm_merge starts
MERGE_DIR = "runs/demo-lm-merge"                          # where lm_wide starts
WIDE_DIR = "runs/demo-lm-wide"                            # where lm_attr starts
ATTR_DIR = "runs/demo-lm-attr"                            # where lm_more starts
MORE_DIR = "runs/demo-lm-more"                            # where lm_beat starts
WIDE_DATA_DIR = "runs/demo-data-wide"   # the same pieces rendered 5 times each (lm_wide)
VARIANTS = ("codec", "codec_adv", "lm", "lm_words", "lm_final", "lm_cross", "lm_merge", "lm_wide",
            "lm_attr", "lm_more", "lm_beat")


def _data(c: ConfigDict) -> None:
  c.data.update(kind="corpus", corpus="demo", cache_dir=DATA_DIR, corpus_workers=2)


def get_config(arg: str | None = None) -> ConfigDict:
  variant = arg or "lm"
  if variant not in VARIANTS:
    raise ValueError(f"unknown demo config variant {variant!r}: use one of {', '.join(VARIANTS)}")
  if variant in ("codec", "codec_adv"):
    c = codec_configs.get_config("demo")
    _data(c)
    if variant == "codec_adv":
      c.init_from = CODEC_DIR
      c.codec_train.losses.update(adv=4.0, feat=4.0)
      c.train.update(num_steps=1000, stop_at=700, eval_every=100, checkpoint_every=50, log_every=10)
    return c
  c = musicgen.get_config("small")
  c.variant = "demo"
  c.model.update(num_codebooks=4, card=512, dim=256, num_layers=4, num_heads=4, ffn_dim=1024,
                 melody=True, text_conditioning="prefix", chroma_length=64, max_positions=576)
  c.text.update(kind="learned", dim=256, num_layers=2, num_heads=4, max_length=96, tokenizer="")
  c.model.text_dim = c.text.dim
  c.codec.update(sample_rate=32000, frame_rate=50, channels=1)
  c.sampling.update(duration=8.0)
  c.train.update(batch_size=8, num_steps=500, learning_rate=1e-3, warmup_steps=50,
                 segment_seconds=8.0, cond_dropout=0.2, melody_dropout=0.0, log_every=25,
                 eval_every=250, eval_batches=4, checkpoint_every=100, keep_checkpoints=2)
  _data(c)
  c.data.codec = CODEC_DIR
  c.data.word_dropout = 0.0   # the shipped runs were made before data.word_dropout existed
  if variant == "lm_words":
    c.init_from, c.init_fresh = LM_DIR, "text"
    c.text.update(tokenizer="words", num_layers=0)
    c.train.update(learning_rate=5e-4, warmup_steps=100, num_steps=1500, stop_at=1036)
  elif variant == "lm_final":
    c.init_from, c.data.codec = WORDS_DIR, ADV_CODEC_DIR
    c.train.update(learning_rate=5e-4, warmup_steps=50, num_steps=1200, stop_at=1000,
                   eval_every=200)
  elif variant == "lm_cross":
    c.init_from, c.init_fresh, c.data.codec = FINAL_DIR, "cross", ADV_CODEC_DIR
    c.model.text_conditioning = "cross"
    c.train.update(learning_rate=5e-4, warmup_steps=50, num_steps=1500, eval_every=250)
  elif variant in ("lm_merge", "lm_wide", "lm_attr", "lm_more", "lm_beat"):
    c.init_from, c.data.codec = CROSS_DIR, ADV_CODEC_DIR
    c.model.text_conditioning = "cross"
    c.data.update(caption_merge_p=0.3, caption_drop_description_p=0.5,
                  caption_attributes=("key", "bpm", "instrument"))
    c.train.update(learning_rate=5e-4, warmup_steps=50, num_steps=1500, eval_every=250)
    if variant in ("lm_wide", "lm_attr", "lm_more", "lm_beat"):   # lm_merge's, on the wider corpus
      c.init_from = {"lm_wide": MERGE_DIR, "lm_attr": WIDE_DIR, "lm_more": ATTR_DIR,
                     "lm_beat": MORE_DIR}[variant]
      c.data.update(cache_dir=WIDE_DATA_DIR, corpus_options={"renderings": 5})
    if variant in ("lm_attr", "lm_more", "lm_beat"):   # and the melody dropped alone from half
      c.train.melody_dropout = 0.5
    if variant == "lm_more":   # lm_attr trained longer, from about where its schedule's middle was
      c.train.update(learning_rate=3e-4, num_steps=2000)
    if variant == "lm_beat":   # lm_more with a beat clock in phase with the corpus's beats
      c.init_fresh = "beat"
      c.model.beat_clock_rate = float(c.codec.frame_rate)
      c.train.update(learning_rate=3e-4, num_steps=1000)
  return c

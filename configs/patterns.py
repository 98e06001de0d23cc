"""The pattern comparison (`python -m musicgen_jax.compare_patterns --config configs/patterns.py:tiny`).

One LM recipe that compare_patterns trains once per codebook pattern (config.pattern is set per run;
everything else, data, steps and seed included, is the same).

tiny   finishes on a 2-core CPU within 30 minutes, data included: a small corpus rendered from the
       music21 collections of the shipped model's corpus (at most 40 pieces each, one 8 s rendering,
       10% of the pieces held out for validation and 10% for test), tokenised by the codec that ships
       in models/demo (4 x 512 codes at 50 Hz), and an LM of 2 layers, D 128, with the learned byte
       text encoder by cross-attention, trained on 4 s segments (200 frames: 201 decoder steps for
       parallel, 204 for delay, 401 for coarse_first, 801 for unroll and musiclm) for the budget that
       compare_patterns' --budget gives (default train.num_steps, 200 steps of batch 8; on a 2-core
       CPU a step of all five patterns together takes about 4.3 s). max_positions covers 30 s of
       flattening, so every pattern's speed is measured on a real 30 s generation.
"""
from __future__ import annotations

from ml_collections import ConfigDict

from configs import musicgen

SHIPPED_CODEC = "models/demo"


def get_config(arg: str | None = None) -> ConfigDict:
  variant = arg or "tiny"
  if variant != "tiny":
    raise ValueError(f"unknown patterns config variant {variant!r}: use tiny")
  c = musicgen.get_config("small")
  c.variant = "patterns_tiny"
  c.model.update(num_codebooks=4, card=512, dim=128, num_layers=2, num_heads=4, ffn_dim=512,
                 melody=False, text_conditioning="cross", max_positions=6016)
  c.text.update(kind="learned", dim=128, num_layers=1, num_heads=4, max_length=96, tokenizer="")
  c.model.text_dim = c.text.dim
  c.codec.update(sample_rate=32000, frame_rate=50, channels=1)
  c.sampling.update(duration=4.0)
  c.train.update(batch_size=8, num_steps=200, learning_rate=2e-3, warmup_steps=20,
                 segment_seconds=4.0, cond_dropout=0.2, log_every=25, eval_every=50,
                 eval_batches=0, checkpoint_every=100, keep_checkpoints=1, keep_best=False)
  c.data.update(kind="corpus", corpus="demo", cache_dir="runs/patterns-data", corpus_workers=2,
                codec=SHIPPED_CODEC)
  c.data.corpus_options = dict(max_pieces=40, renderings=1, max_seconds=8.0, valid_fraction=0.1,
                               test_fraction=0.1)
  # What compare_patterns' evaluation samples (per pattern): clips, their length, the seed.
  c.eval.update(samples=32, duration=4.0, seed=0, speed_seconds=30.0)
  return c

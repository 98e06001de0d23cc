"""MusicGen configs: `--config configs/musicgen.py:VARIANT`.

Variants: tiny (tests and smoke runs, seconds on CPU), small / medium / large (the paper's 300M, 1.5B,
3.3B shapes), melody (medium with chroma + text as a prefix), tiny_melody, stereo_small (8 codebooks with
stereo delays). Any field can be overridden on the command line, e.g. `--config.pattern.name=parallel`.
"""
from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from musicgen_jax import sharding

#                 dim  layers heads
_SIZES = {"small": (1024, 24, 16), "medium": (1536, 48, 24), "large": (2048, 48, 32)}


def get_config(arg: str | None = None) -> ConfigDict:
  variant = arg or "small"
  c = ConfigDict()
  c.variant = variant

  c.model = ConfigDict(dict(
      num_codebooks=4, card=2048, dim=1024, num_layers=24, num_heads=16, ffn_dim=4096,
      text_dim=768, text_conditioning="cross", melody=False, num_chroma=12, chroma_length=235,
      max_positions=2048, layer_norm_eps=1e-5, dropout=0.0, dtype="float32", remat="none"))

  # Codebook pattern: name + the options that pattern takes (None = its default).
  c.pattern = ConfigDict(dict(name="delay", delays=config_dict.placeholder(tuple),
                              flattening=config_dict.placeholder(tuple),
                              group_by=config_dict.placeholder(int)))

  # Text conditioner: "t5" (pretrained, imported) or "learned" (small encoder trained with the LM).
  c.text = ConfigDict(dict(kind="learned", dim=768, num_layers=2, num_heads=8, max_length=64,
                           tokenizer=""))

  # Codec geometry (the EnCodec weights come with an imported checkpoint).
  c.codec = ConfigDict(dict(sample_rate=32000, frame_rate=50, channels=1))

  c.sampling = ConfigDict(dict(duration=10.0, top_k=250, top_p=0.0, temperature=1.0, cfg=3.0,
                               cfg_mode="batch"))

  c.train = ConfigDict(dict(
      seed=0, batch_size=32, num_steps=100_000, learning_rate=1e-4, warmup_steps=2000,
      weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0, cond_dropout=0.2, segment_seconds=30.0,
      log_every=100, checkpoint_every=1000, keep_checkpoints=3))
  c.data = ConfigDict(dict(kind="synthetic", num_examples=1024))

  c.mesh = ConfigDict(dict(shape=(-1, 1, 1), axes=sharding.MESH_AXES))
  c.logical_axis_rules = [list(r) for r in sharding.DEFAULT_RULES]

  if variant in _SIZES:
    d, layers, heads = _SIZES[variant]
    c.model.update(dim=d, num_layers=layers, num_heads=heads, ffn_dim=4 * d)
  elif variant == "melody":
    d, layers, heads = _SIZES["medium"]
    c.model.update(dim=d, num_layers=layers, num_heads=heads, ffn_dim=4 * d, melody=True,
                   text_conditioning="prefix")
  elif variant == "stereo_small":
    d, layers, heads = _SIZES["small"]
    c.model.update(dim=d, num_layers=layers, num_heads=heads, ffn_dim=4 * d, num_codebooks=8)
    c.pattern.delays = (0, 0, 1, 1, 2, 2, 3, 3)
    c.codec.channels = 2
  elif variant in ("tiny", "tiny_melody"):
    c.model.update(num_codebooks=4, card=64, dim=32, num_layers=2, num_heads=2, ffn_dim=128,
                   text_dim=24, max_positions=1500, chroma_length=16)
    c.text.update(dim=24, num_layers=1, num_heads=2, max_length=16)
    c.sampling.update(duration=1.0, top_k=16)
    c.train.update(batch_size=8, num_steps=20, learning_rate=3e-3, warmup_steps=5,
                   segment_seconds=1.0, log_every=5, checkpoint_every=10)
    c.data.num_examples = 64
    if variant == "tiny_melody":
      c.model.update(melody=True, text_conditioning="prefix")
  else:
    raise ValueError(f"unknown config variant {variant!r}: use one of tiny, tiny_melody, small, "
                     "medium, large, melody, stereo_small")
  c.model.text_dim = c.text.dim
  return c

"""MusicGen configs: `--config configs/musicgen.py:VARIANT`.

Variants: tiny (tests and smoke runs, seconds on CPU), small / medium / large (the paper's 300M, 1.5B,
3.3B shapes), melody (medium with chroma + text as a prefix), tiny_melody, stereo_small (8 codebooks with
stereo delays). Any field can be overridden on the command line, e.g. `--config.pattern.name=parallel`.
"""
from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from musicgen_jax import sharding
from musicgen_jax.sampling import sampling_defaults

#                 dim  layers heads
_SIZES = {"small": (1024, 24, 16), "medium": (1536, 48, 24), "large": (2048, 48, 32)}


def get_config(arg: str | None = None) -> ConfigDict:
  variant = arg or "small"
  c = ConfigDict()
  c.variant = variant

  c.model = ConfigDict(dict(
      num_codebooks=4, card=2048, dim=1024, num_layers=24, num_heads=16, ffn_dim=4096,
      text_dim=768, text_conditioning="cross", melody=False, num_chroma=12, chroma_length=235,
      max_positions=2048, layer_norm_eps=1e-5, dropout=0.0, dtype="float32", remat="none",
      scan_unroll=config_dict.placeholder(int), beat_clock_rate=0.0))
  # beat_clock_rate: a beat clock on the audio frames at the tempo the caption names
  # (conditioners/tempo.py), in frames per second (the codec's frame rate); 0 = none, as in the
  # released models. To add one to a trained model: init_fresh=beat.
  # scan_unroll: layers per iteration of the train step's layer scan (0: all, no loop; the same stacked
  # parameters and numbers either way). None picks by backend (lm.layer_scan_unroll): unrolled on a
  # GPU, where it is 38% faster and needs a third less memory at the small shape but compiles 5x as
  # long (docs/BENCHMARKS.md); the loop on CPU and TPU. A numerics setting: a run may resume with any.

  # Codebook pattern: name + the options that pattern takes (None = its default).
  c.pattern = ConfigDict(dict(name="delay", delays=config_dict.placeholder(tuple),
                              flattening=config_dict.placeholder(tuple),
                              group_by=config_dict.placeholder(int)))

  # Text conditioner: "t5" (pretrained, imported) or "learned" (small encoder trained with the LM).
  # prefix_padding (text_conditioning="prefix" only): the prefix is attended without a mask, so its
  # length moves every audio position. Training here pads every caption to max_length, so sampling
  # does too ("max_length"); imported models were trained with the batch's longest caption ("longest").
  c.text = ConfigDict(dict(kind="learned", dim=768, num_layers=2, num_heads=8, max_length=64,
                           tokenizer="", prefix_padding="max_length"))

  # Codec geometry (the EnCodec weights come with an imported checkpoint).
  c.codec = ConfigDict(dict(sample_rate=32000, frame_rate=50, channels=1))

  # Sampling: SamplingSettings' defaults (their one home; these fields override them) + the duration.
  c.sampling = ConfigDict(sampling_defaults(duration=10.0))

  # Optimisation (audiocraft's MusicGen recipe: AdamW 0.9 / 0.95, weight decay 0.1, warmup then cosine,
  # clipping 1.0). batch_size is the GLOBAL batch of one micro-step; grad_accum micro-steps make one
  # update. freeze: regular expressions over parameter paths ('lm/embed_tokens') that do not train.
  # max_steps_ahead: dispatched steps the host lets run unfinished (0 = unbounded); 2 keeps the devices
  # fed and bounds how late a stop signal or preemption notice is acted on. stop_at: the step to stop
  # at (0 = num_steps), while the schedule stays num_steps' (a run cut short, reproducibly).
  # cond_dropout: the fraction of examples that lose every condition (for classifier-free
  # guidance); melody_dropout (melody models): the fraction of the others that lose the melody
  # alone, as audiocraft's MusicGen-Melody recipe does (0.5), so that text without a melody is
  # learnt too.
  c.train = ConfigDict(dict(
      seed=0, batch_size=32, num_steps=100_000, stop_at=0, learning_rate=1e-4, warmup_steps=2000,
      weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0, grad_accum=1, ema_decay=0.0, freeze=(),
      cond_dropout=0.2, melody_dropout=0.5, segment_seconds=30.0, log_every=100, eval_every=1000,
      eval_batches=0, checkpoint_every=1000, keep_checkpoints=3, keep_best=True,
      async_checkpoints=True, checksums=True, progress=True, generate_every=0, max_steps_ahead=2))
  # The generative evaluation (musicgen_jax.eval): clips sampled from held-out captions of the
  # corpus, compared with the real recordings; every train.generate_every steps during training
  # (0 = off; the validation CE runs every eval_every), and by compare_patterns after training.
  # duration 0: the sampling duration; speed_seconds: the audio that the speed figure generates.
  c.eval = ConfigDict(dict(samples=16, duration=0.0, seed=0, speed_seconds=30.0))
  # Data: 'synthetic' (token data for tests and benchmarks), 'manifest' (your audio files, described
  # by a JSONL manifest), 'corpus' (the music21 corpus rendered to audio). Caches live in cache_dir
  # (default <workdir>/data); codec is the model directory whose codec makes the token cache
  # (default: init_from's). The token cache encodes windows of encode_seconds (0: twice
  # train.segment_seconds), items_per_shard audio files per shard file. corpus: the corpus preset
  # ("tiny" | "demo" | "full", data/corpus.py) rendered under cache_dir.
  c.data = ConfigDict(dict(
      kind="synthetic", manifest="", valid_manifest="", valid_fraction=0.05, codec="", cache_dir="",
      num_workers=0, prefetch=2, min_seconds=1.0, encode_batch_size=8, encode_seconds=0.0,
      items_per_shard=64, num_examples=1024, corpus="full",
      caption_merge_p=0.0, caption_drop_description_p=0.0, caption_drop_attribute_p=0.0,
      caption_attributes=("key", "bpm", "genre", "moods", "instrument"), word_dropout=0.3))
  # Training captions with metadata merged in (loader.MergeAttributes; audiocraft's merge_text_p,
  # drop_desc_p, drop_other_p): with probability caption_merge_p an example's caption gets the
  # phrases of its metadata's caption_attributes ("G major", "72 bpm", ...), each dropped with
  # probability caption_drop_attribute_p, and loses its own text with caption_drop_description_p.
  # word_dropout: each word of a training caption dropped with this probability (loader.WordDropout;
  # audiocraft's text conditioner: 0.3 for text-to-music, 0.2 for melody models, set below).
  # Fine-tuning: a model directory (converted Hugging Face checkpoint or one of ours) to start from. Its
  # architecture (model, text, pattern, codec) is used; dtype, dropout, remat and scan_unroll stay
  # this config's. init_fresh: parts of that model that start from a fresh initialisation instead,
  # with this config's settings ("text": a new text encoder, e.g. another tokenizer; "cross": text
  # read by new cross-attention layers, for a model that read it as a prefix); with
  # data.codec, the codec is data.codec's (the one that makes the token cache).
  c.init_from = ""
  c.init_fresh = ""
  # Multi-host: explicit coordinator, or `auto` detection of TPU pods, SLURM and Open MPI jobs.
  c.distributed = ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1, auto=True,
                                  timeout_seconds=300))

  # Mesh (data, fsdp, tensor), one -1 filled from the device count. dcn_shape: the mesh across slices
  # (multi-slice TPU / multi-host GPU); then shape is per slice.
  c.mesh = ConfigDict(dict(shape=(-1, 1, 1), axes=sharding.MESH_AXES,
                           dcn_shape=config_dict.placeholder(tuple)))
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
    c.text.update(dim=24, num_layers=1, num_heads=2, max_length=64)   # bytes: ~60-character prompts
    c.sampling.update(duration=1.0, top_k=16)
    c.train.update(batch_size=8, num_steps=20, learning_rate=3e-3, warmup_steps=5,
                   segment_seconds=1.0, log_every=5, checkpoint_every=10, eval_every=10,
                   eval_batches=2)
    c.data.num_examples = 64
    if variant == "tiny_melody":
      c.model.update(melody=True, text_conditioning="prefix")
  else:
    raise ValueError(f"unknown config variant {variant!r}: use one of tiny, tiny_melody, small, "
                     "medium, large, melody, stereo_small")
  if c.model.melody:
    c.data.word_dropout = 0.2
  c.model.text_dim = c.text.dim
  return c

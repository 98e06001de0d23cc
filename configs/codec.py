"""Codec (EnCodec) training configs: `--config configs/codec.py:VARIANT`, run by the LM's loop.

Variants:
  tiny       tests and smoke runs (seconds on CPU): 8 kHz, hop 16, 2 codebooks of 64, 4 filters, a
             2-scale discriminator of 4 filters.
  demo       the codec of the model that ships with the repo (configs/demo.py:codec adds its data):
             32 kHz mono, ratios 8, 5, 4, 4 (hop 640, 50 Hz frames: the LM's frame rate), 4 codebooks
             of 512 (1.8 kbps), 16 base filters, 64-dim latents, one LSTM layer: 2.8M parameters
             (1.3M each in encoder and decoder, 1.05M of them in the two LSTMs). Its audio is
             synthesised General-MIDI renderings of scores, far fewer timbres than the music
             MusicGen's codec learnt, so a narrow codec suffices. Sized for training on a 2-core CPU:
             batch 8 x 1 s, no adversarial losses (configs/demo.py says why), dead-code threshold
             0.25. Measured on that CPU: 0.67 s per step without the discriminator, 15.3 s with it
             (8-9 s since its convolutions avoid strides and dilations, 2026-11-27); without it and
             batch 32 on an H200 (jax 0.11.2): 0.32 s per step.
  demo25     an experiment for the shipped model's next codec: demo with ratios 8, 5, 4, 8 (hop 1280,
             25 Hz frames, 0.9 kbps), so that a held note spans twice as few frames and an 8 s
             sample is 200 LM steps; models/demo/TRAINING.md says why and what it gave.
  encodec32k the released MusicGen codec's geometry (facebook/encodec_32khz): 64 base filters,
             ratios 8, 5, 4, 4, 4 codebooks of 2048 (57.9M parameters), and audiocraft's
             `encodec_musicgen_32khz` recipe.

The recipe (audiocraft's compression solver): Adam lr 3e-4, betas (0.5, 0.9), no weight decay, no
clipping, a constant learning rate, for the generator and the discriminator alike; an EMA of the
generator (decay 0.99) is what evaluation and export use; balanced losses l1 0.1, msspec 2,
adversarial 4, feature matching 4 (balancer: total norm 1, EMA 0.999, per batch item); the
commitment loss with weight 1 outside the balancer; the MS-STFT discriminator trained every step;
1-second crops, batch 64.

The top-level fields the loop reads (train, data, mesh, logical_axis_rules, distributed, init_from)
come from configs/musicgen.py; `task = "codec"` selects this task. The work directory's config holds
`codec.encodec` (a Hugging Face EncodecConfig dict), so checkpoint.load_codec reads its exports.
"""
from __future__ import annotations

import copy

from ml_collections import ConfigDict

from configs import musicgen

# The Hugging Face encodec_32khz architecture (MusicGen's codec).
ENCODEC_32K = dict(
    model_type="encodec", sampling_rate=32000, audio_channels=1, num_filters=64,
    num_residual_layers=1, upsampling_ratios=(8, 5, 4, 4), norm_type="weight_norm", kernel_size=7,
    last_kernel_size=7, residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=False,
    pad_mode="reflect", compress=2, num_lstm_layers=2, trim_right_ratio=1.0, hidden_size=128,
    codebook_size=2048, use_conv_shortcut=False, target_bandwidths=(2.2,), normalize=False)


def _codec_train() -> ConfigDict:
  """Losses, balancer, quantizer learning and discriminator: audiocraft's compression defaults."""
  return ConfigDict(dict(
      losses=dict(l1=0.1, msspec=2.0, adv=4.0, feat=4.0),   # balanced; 0 drops a loss
      commitment_weight=1.0,                                 # outside the balancer, as audiocraft
      balancer=dict(balance_grads=True, total_norm=1.0, ema_decay=0.999, per_batch_item=True),
      msspec=dict(range_start=6, range_end=11, n_mels=64, f_min=64.0, f_max=None, normalized=True,
                  alphas=False, floor_level=1e-5),
      discriminator=dict(filters=32, max_filters=1024, filters_scale=1,
                         n_ffts=(1024, 2048, 512, 256, 128), hop_lengths=(256, 512, 128, 64, 32),
                         win_lengths=(1024, 2048, 512, 256, 128), kernel_size=(3, 9), stride=(1, 2),
                         dilations=(1, 2, 4), normalized=True, negative_slope=0.3),
      adversarial_every=1,          # the discriminator trains on a step with probability 1 / every
      feature_relative=False,       # audiocraft's plain L1 feature matching (True: the paper's)
      quantizer=dict(decay=0.99, epsilon=1e-5, threshold_ema_dead_code=2.0, kmeans_iters=50,
                     dropout=False)))  # dropout: uniform 1..K active codebooks per batch


def get_config(arg: str | None = None) -> ConfigDict:
  variant = arg or "demo"
  base = musicgen.get_config("small")
  c = ConfigDict()
  c.task = "codec"
  c.variant = variant
  encodec = dict(ENCODEC_32K)
  c.codec_train = _codec_train()
  c.train = ConfigDict(copy.deepcopy(base.train.to_dict()))
  c.train.update(batch_size=64, num_steps=400_000, learning_rate=3e-4, warmup_steps=0, b1=0.5,
                 b2=0.9, weight_decay=0.0, grad_clip=0.0, ema_decay=0.99, cond_dropout=0.0,
                 segment_seconds=1.0, log_every=100, eval_every=2000, eval_batches=50,
                 checkpoint_every=2000)
  c.data = ConfigDict(copy.deepcopy(base.data.to_dict()))
  c.data.update(kind="synthetic", num_examples=1024)
  c.init_from = base.init_from
  c.distributed = ConfigDict(copy.deepcopy(base.distributed.to_dict()))
  c.mesh = ConfigDict(copy.deepcopy(base.mesh.to_dict()))
  c.logical_axis_rules = copy.deepcopy(base.logical_axis_rules)

  if variant == "encodec32k":
    pass
  elif variant in ("demo", "demo25"):
    encodec.update(num_filters=16, hidden_size=64, num_lstm_layers=1, codebook_size=512,
                   target_bandwidths=(1.8,))
    if variant == "demo25":   # an experiment: hop 1280 (25 Hz frames), the same 4 codebooks of 512
      encodec.update(upsampling_ratios=(8, 5, 4, 8), target_bandwidths=(0.9,))
    c.train.update(batch_size=8, num_steps=3000, eval_every=500, eval_batches=8,
                   checkpoint_every=250, keep_checkpoints=2, log_every=50)
    c.codec_train.losses.update(adv=0.0, feat=0.0)        # configs/demo.py says why
    c.codec_train.quantizer.threshold_ema_dead_code = 0.25
    c.codec_train.discriminator.filters = 16
  elif variant == "tiny":
    encodec.update(sampling_rate=8000, num_filters=4, hidden_size=16, upsampling_ratios=(4, 4),
                   num_lstm_layers=1, codebook_size=64, target_bandwidths=(6.0,))
    c.train.update(batch_size=4, num_steps=6, learning_rate=1e-3, segment_seconds=0.128,
                   log_every=2, eval_every=3, eval_batches=1, checkpoint_every=3, ema_decay=0.0,
                   async_checkpoints=False, progress=False)
    c.data.num_examples = 16
    c.codec_train.msspec.update(range_start=6, range_end=9)
    c.codec_train.discriminator.update(filters=4, n_ffts=(256, 128), hop_lengths=(64, 32),
                                       win_lengths=(256, 128), dilations=(1, 2))
    c.codec_train.quantizer.kmeans_iters = 5
  else:
    raise ValueError(f"unknown codec config variant {variant!r}: use one of tiny, demo, demo25, "
                     "encodec32k")
  from musicgen_jax.codec.encodec import EncodecConfig
  c.codec = ConfigDict(dict(sample_rate=encodec["sampling_rate"],
                            channels=encodec["audio_channels"],
                            frame_rate=EncodecConfig.from_hf_dict(encodec).frame_rate,
                            encodec=encodec))
  return c

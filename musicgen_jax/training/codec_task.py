"""The codec training task: EnCodec trained as audiocraft's compression solver does, in one step.

    audio [B, C, N] -> SEANet encoder (weight-normed convs) -> latents [B, T, D]
      -> train_quantize (EMA codebooks, k-means init on the first batch, dead-code replacement,
         optional quantizer dropout) -> straight-through quantized latents + commitment loss
      -> SEANet decoder -> y [B, C, N]
    discriminator step (with probability 1 / adversarial_every): hinge loss of the MS-STFT
      discriminator on (x, sg(y)), its own Adam
    generator losses on y with the updated discriminator: l1, multi-scale mel, adversarial, feature
      matching -> loss balancer (gradients w.r.t. y, reweighted by their EMA norms) -> one backward
      through the decoder, quantizer and encoder, plus the commitment loss's own gradient -> Adam.

The whole train state lives in one pytree (`CodecTrainState`): weight-normed generator parameters
and their optimizer, discriminator parameters and their optimizer, the codebooks, the balancer's
moving averages, the RNG and the step; its `params` entry is what a codec directory holds (the EMA
of the folded generator weights and the current codebooks, the tree EncodecModel and the Hugging
Face importer use), so `checkpoint.save_model(dir, config, export_params(state))` writes a
directory that `checkpoint.load_codec` reads. Everything is replicated; the batch is split over the
data axes.
"""
from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from jax.sharding import Mesh

from musicgen_jax import quantization, sharding as shd
from musicgen_jax.codec import balancer as balancer_lib
from musicgen_jax.codec import discriminator as disc_lib
from musicgen_jax.codec import losses, seanet, weight_norm
from musicgen_jax.codec.encodec import EncodecConfig, EncodecModel
from musicgen_jax.data import audio_crops

BATCH_AXES = {"audio": (shd.BATCH, None, None), "weight": (shd.BATCH,)}
LOSSES = ("l1", "msspec", "adv", "feat")   # the balanced generator losses


@flax.struct.dataclass
class CodecTrainState:
  step: jax.Array                       # int32 []
  params: Any                           # {'codec': exported EnCodec params (EMA), see module doc}
  generator: Any                        # {'encoder', 'decoder'}: kernels as kernel_g / kernel_v
  gen_opt: Any
  disc: Any                             # MS-STFT discriminator params
  disc_opt: Any
  codebooks: quantization.CodebookState
  balancer: balancer_lib.BalancerState
  rng: jax.Array                        # uint32 [2]: raw PRNG key data


def _optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam (audiocraft: lr 3e-4, betas 0.5 / 0.9, no decay), constant after an optional warmup."""
  lr = optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps) if t.warmup_steps > 0 \
      else t.learning_rate
  if t.weight_decay > 0:
    opt = optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay)
  else:
    opt = optax.adam(lr, b1=t.b1, b2=t.b2)
  return optax.chain(optax.clip_by_global_norm(t.grad_clip), opt) if t.grad_clip > 0 else opt


def flatness_fft(samples: int) -> int:
  """The FFT size of the evaluation's spectral flatness: 2048 (hop 512), or the largest power of two
  that fits in shorter held-out segments."""
  return min(2048, 1 << (max(int(samples), 2).bit_length() - 1))


class CodecTask:
  """The static pieces of one codec run (model, discriminator, losses, optimizers) and its steps."""

  name = "codec"

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, directory: str | None = None):
    del directory
    self.config = config
    self.mesh = mesh
    self.rules = shd.rules_from_config(config.logical_axis_rules)
    enc = config.codec.get("encodec")
    if not enc:
      raise ValueError("config.codec.encodec is missing: a codec run needs the codec's "
                       "architecture (use configs/codec.py)")
    self.codec_cfg = EncodecConfig.from_hf_dict(enc.to_dict())
    self.model = EncodecModel(self.codec_cfg)
    cc, ct = self.codec_cfg, config.codec_train
    if (int(config.codec.sample_rate), int(config.codec.channels)) != (cc.sampling_rate,
                                                                         cc.audio_channels):
      raise ValueError(f"codec.sample_rate / codec.channels ({config.codec.sample_rate}, "
                       f"{config.codec.channels}) differ from codec.encodec's ({cc.sampling_rate}, "
                       f"{cc.audio_channels}): make them equal")
    if cc.normalize or cc.chunk_length_s is not None:
      raise ValueError("codec.encodec.normalize / chunk_length_s are not trainable here: set "
                       "normalize=False and chunk_length_s=None")
    self.samples = audio_crops.segment_samples(config)
    self.frames = math.ceil(self.samples / cc.hop_length)
    unknown = sorted(set(ct.losses) - set(LOSSES))
    if unknown:
      raise ValueError(f"codec_train.losses has unknown losses {unknown}: use {list(LOSSES)}")
    self.weights = {k: float(v) for k, v in ct.losses.items() if float(v) > 0}
    if not self.weights:
      raise ValueError("codec_train.losses are all 0: give at least one loss a positive weight")
    self.adversarial = bool({"adv", "feat"} & set(self.weights))
    self.mel = losses.MelSpec(cc.sampling_rate, **ct.msspec.to_dict())
    self.disc_cfg = disc_lib.DiscriminatorConfig.from_dict(
        dict(ct.discriminator.to_dict(), channels=cc.audio_channels))
    self.disc = disc_lib.MultiScaleSTFTDiscriminator(self.disc_cfg)
    need = max(max(self.mel.scales), self.disc_cfg.min_samples if self.adversarial else 0)
    if self.samples < need:
      raise ValueError(f"train.segment_seconds={config.train.segment_seconds} gives {self.samples} "
                       f"samples, fewer than the largest STFT window ({need}): use longer segments "
                       "or smaller msspec / discriminator FFT sizes")
    q = ct.quantizer
    if not 0.0 <= q.decay <= 1.0 or q.threshold_ema_dead_code < 0 or q.kmeans_iters < 1:
      raise ValueError("codec_train.quantizer needs decay in [0, 1], threshold_ema_dead_code >= 0 "
                       f"and kmeans_iters >= 1; got {q.to_dict()}")
    if int(ct.adversarial_every) < 1:
      raise ValueError(f"codec_train.adversarial_every must be >= 1, got {ct.adversarial_every}")
    self.tx_gen = _optimizer(config.train)
    self.tx_disc = _optimizer(config.train)
    self._convtr = {f"layers_{s.index}" for s in seanet.decoder_layout(cc) if s.kind == "convtr"}

  # --- state ------------------------------------------------------------------------------------
  def _keep_axis(self, path: tuple[str, ...]) -> int | None:
    """Which kernel axis weight norm keeps: C_out (2) for convs, C_in (1) for transposed convs (as
    torch's weight_norm(dim=0) on their [C_in, C_out, K] weights); None without weight norm."""
    if self.codec_cfg.norm_type != "weight_norm":
      return None
    return 1 if path[0] == "decoder" and len(path) == 2 and path[1] in self._convtr else 2

  def init_params(self, rng: jax.Array) -> Any:
    """Random codec parameters {'codec': {'encoder', 'decoder', 'quantizer': {'embed'}}}."""
    return {"codec": self.model.init(rng)}

  def abstract_params(self) -> Any:
    """Shapes of the train state's parameters (what train.freeze is checked against)."""
    return jax.eval_shape(self.init_state, jax.random.key(0)).params

  def _codebooks_from(self, embed_kcd: jax.Array) -> quantization.CodebookState:
    """Codebooks for fine-tuning: the given codes, marked initialized, with the EMA count of steady
    uniform use (frames per batch / codebook size, above the dead-code threshold)."""
    q = self.config.codec_train.quantizer
    k, c, _ = embed_kcd.shape
    count = max(float(q.threshold_ema_dead_code) + 1.0,
                self.config.train.batch_size * self.frames / c)
    return quantization.CodebookState(
        embed=embed_kcd, cluster_size=jnp.full((k, c), count, jnp.float32),
        embed_sum=embed_kcd * count, initialized=jnp.ones((k,), bool))

  def init_state(self, rng: jax.Array, params: Any = None) -> CodecTrainState:
    """A fresh state; `params` ({'codec': ...}, e.g. an imported codec) to fine-tune from."""
    k_params, k_disc, k_codes, k_state = jax.random.split(rng, 4)
    cc = self.codec_cfg
    if params is None:
      plain = self.model.init(k_params)
      codebooks = quantization.init_codebooks(k_codes, cc.num_quantizers, cc.codebook_size,
                                              cc.codebook_dim, kmeans_init=True)
    else:
      plain = params["codec"]
      codebooks = self._codebooks_from(jnp.asarray(plain["quantizer"]["embed"], jnp.float32))
    generator = weight_norm.split_tree({"encoder": plain["encoder"], "decoder": plain["decoder"]},
                                       self._keep_axis)
    audio = jnp.zeros((1, cc.audio_channels, self.samples), jnp.float32)
    disc = self.disc.init(k_disc, audio)["params"]
    return CodecTrainState(
        step=jnp.zeros((), jnp.int32),
        params=self._export(weight_norm.fold_tree(generator), codebooks),
        generator=generator, gen_opt=self.tx_gen.init(generator), disc=disc,
        disc_opt=self.tx_disc.init(disc), codebooks=codebooks,
        balancer=balancer_lib.init(self.weights), rng=jax.random.key_data(k_state))

  @staticmethod
  def _export(folded: Any, codebooks: quantization.CodebookState) -> dict:
    return {"codec": {"encoder": folded["encoder"], "decoder": folded["decoder"],
                      "quantizer": {"embed": codebooks.embed}}}

  def param_shardings(self) -> Any:
    abstract = nn.unbox(jax.eval_shape(self.init_params, jax.random.key(0)))
    return jax.tree.map(lambda _: shd.replicated(self.mesh), abstract)

  def load_params(self, directory: str) -> Any:
    """{'codec': params} of a codec directory (fine-tuning start), as numpy arrays."""
    from musicgen_jax import checkpoint
    codec, params = checkpoint.load_codec(directory)
    if codec.config != self.codec_cfg:
      raise ValueError(f"init_from {directory} holds another codec architecture than "
                       "config.codec.encodec: use its config, or another init_from")
    return {"codec": params}

  def batch_keys(self) -> tuple[str, ...]:
    return ("audio", "weight")

  def batch_shardings(self, keys) -> dict:
    return {k: shd.logical_named_sharding(self.mesh, self.rules, BATCH_AXES[k]) for k in keys}

  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {"audio": jax.ShapeDtypeStruct((batch_size, self.codec_cfg.audio_channels, self.samples),
                                          jnp.float32),
            "weight": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

  # --- data ---------------------------------------------------------------------------------------
  def prepare_data(self, workdir: str) -> dict:
    return audio_crops.prepare_data(self.config, workdir, process_index=jax.process_index(),
                                    process_count=jax.process_count())

  def make_iterator(self, split: str, workdir: str, *, shuffle: bool = True,
                    num_epochs: int | None = None):
    return audio_crops.make_iterator(self.config, split, workdir=workdir,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count(), shuffle=shuffle,
                                     num_epochs=num_epochs)

  # --- the generator ------------------------------------------------------------------------------
  def generate(self, generator: Any, codebooks: quantization.CodebookState, audio_bcn: jax.Array,
               rng: jax.Array, n_q: jax.Array | None = None):
    """Training forward: ((y [B, C, N], commit_loss []), (new codebooks, QuantizeOutput))."""
    q = self.config.codec_train.quantizer
    plain = weight_norm.fold_tree(generator)
    latents_btd = self.model.encode_latents(plain, jnp.transpose(audio_bcn, (0, 2, 1)))
    out, codebooks = quantization.train_quantize(
        codebooks, latents_btd, rng, n_q, decay=float(q.decay), epsilon=float(q.epsilon),
        threshold_ema_dead_code=float(q.threshold_ema_dead_code), kmeans_iters=int(q.kmeans_iters))
    y_bnc = self.model.decode_latents(plain, out.quantized_btd)
    y_bcn = jnp.transpose(y_bnc, (0, 2, 1))[..., :audio_bcn.shape[-1]]
    return (y_bcn, out.commit_loss), (codebooks, out)

  def _gen_losses(self, disc_params, x_bcn: jax.Array) -> list:
    """The weighted generator losses as groups of functions y -> {name: []} (see
    balancer.balanced_grad); the discriminator's view of the real audio is computed once, without
    gradient."""
    w = self.weights
    groups = []
    if "l1" in w:
      groups.append(lambda y: {"l1": jnp.mean(losses.l1(y, x_bcn))})
    if "msspec" in w:
      groups.append(lambda y: {"msspec": jnp.mean(losses.multiscale_mel(y, x_bcn, self.mel))})
    if self.adversarial:
      real_fmaps = None
      if "feat" in w:
        real_fmaps = jax.lax.stop_gradient(self.disc.apply({"params": disc_params}, x_bcn)[1])
      relative = bool(self.config.codec_train.feature_relative)

      def adversarial(y):
        logits, fmaps = self.disc.apply({"params": disc_params}, y)
        out = {}
        if "adv" in w:
          out["adv"] = disc_lib.generator_loss(logits)
        if "feat" in w:
          out["feat"] = disc_lib.feature_loss(fmaps, real_fmaps, relative)
        return out
      groups.append(adversarial)
    return groups

  def _disc_step(self, state: CodecTrainState, x_bcn, y_bcn, rng):
    """One discriminator update on (real, sg(fake)), kept with probability 1 / adversarial_every."""
    b = x_bcn.shape[0]

    def loss_fn(dp):
      logits, _ = self.disc.apply({"params": dp}, jnp.concatenate([x_bcn, y_bcn], axis=0))
      return disc_lib.discriminator_loss([lg[:b] for lg in logits], [lg[b:] for lg in logits])

    d_loss, grads = jax.value_and_grad(loss_fn)(state.disc)
    updates, opt = self.tx_disc.update(grads, state.disc_opt, state.disc)
    disc = optax.apply_updates(state.disc, updates)
    every = int(self.config.codec_train.adversarial_every)
    if every > 1:
      take = jax.random.uniform(rng) <= 1.0 / every
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(take, n, o), new, old)
      disc, opt = keep(disc, state.disc), keep(opt, state.disc_opt)
    return disc, opt, d_loss, optax.global_norm(grads)

  # --- steps --------------------------------------------------------------------------------------
  def train_step(self, state: CodecTrainState, batch: dict) -> tuple[CodecTrainState, dict]:
    ct, t = self.config.codec_train, self.config.train
    key = jax.random.wrap_key_data(state.rng)
    key, step_key = jax.random.split(key)
    k_q, k_nq, k_adv = jax.random.split(jax.random.fold_in(step_key, state.step), 3)
    x_bcn = batch["audio"].astype(jnp.float32)
    n_q = quantization.sample_n_q(k_nq, self.codec_cfg.num_quantizers) if ct.quantizer.dropout \
        else None

    (y_bcn, commit), gen_vjp, (codebooks, qout) = jax.vjp(
        lambda g: self.generate(g, state.codebooks, x_bcn, k_q, n_q), state.generator, has_aux=True)
    metrics = {"commit": commit}
    disc, disc_opt = state.disc, state.disc_opt
    if self.adversarial:
      disc, disc_opt, metrics["d_loss"], metrics["disc_grad_norm"] = self._disc_step(
          state, x_bcn, jax.lax.stop_gradient(y_bcn), k_adv)

    b = ct.balancer
    grad_y, g_loss, bal_state, bal_metrics = balancer_lib.balanced_grad(
        self._gen_losses(disc, x_bcn), y_bcn, state.balancer, self.weights,
        balance_grads=bool(b.balance_grads), total_norm=float(b.total_norm),
        ema_decay=float(b.ema_decay), per_batch_item=bool(b.per_batch_item))
    (grads,) = gen_vjp((grad_y, jnp.asarray(float(ct.commitment_weight), commit.dtype)))
    updates, gen_opt = self.tx_gen.update(grads, state.gen_opt, state.generator)
    generator = optax.apply_updates(state.generator, updates)

    folded = weight_norm.fold_tree(generator)
    d = float(t.ema_decay)
    if d > 0:
      old = state.params["codec"]
      folded = {k: jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, old[k], folded[k])
                for k in ("encoder", "decoder")}
    params = self._export(folded, codebooks)

    metrics.update(bal_metrics)
    y_sg = jax.lax.stop_gradient(y_bcn)
    if "l1" not in metrics:
      metrics["l1"] = jnp.mean(losses.l1(y_sg, x_bcn))
    if "msspec" not in metrics:
      metrics["msspec"] = jnp.mean(losses.multiscale_mel(y_sg, x_bcn, self.mel))
    metrics.update(loss=metrics["msspec"], g_loss=g_loss, grad_norm=optax.global_norm(grads),
                   n_q=jnp.mean(jnp.sum(qout.mask_bk, axis=1).astype(jnp.float32)),
                   codebook_usage=_usage(qout, self.codec_cfg.codebook_size))
    new = state.replace(step=state.step + 1, params=params, generator=generator, gen_opt=gen_opt,
                        disc=disc, disc_opt=disc_opt, codebooks=codebooks, balancer=bal_state,
                        rng=jax.random.key_data(key))
    return new, metrics

  def eval_step(self, state: CodecTrainState, batch: dict) -> dict:
    """Sums over one held-out batch of the exported codec's round trip (encode -> decode, all
    codebooks): multi-scale mel distance, SI-SNR (dB), L1, and the spectral flatness of the
    reconstruction and of the input (the noise floor), weighted by the example weights."""
    p = state.params["codec"]
    x_bcn = batch["audio"].astype(jnp.float32)
    w_b = batch["weight"].astype(jnp.float32)
    y_bcn = self.model.decode(p, self.model.encode(p, x_bcn))[..., :x_bcn.shape[-1]]
    n_fft = flatness_fft(x_bcn.shape[-1])
    return {"msspec_sum": jnp.sum(w_b * losses.multiscale_mel(y_bcn, x_bcn, self.mel)),
            "sisnr_sum": jnp.sum(w_b * losses.si_snr(y_bcn, x_bcn)),
            "l1_sum": jnp.sum(w_b * losses.l1(y_bcn, x_bcn)),
            "flatness_sum": jnp.sum(w_b * losses.spectral_flatness(y_bcn, n_fft, n_fft // 4)),
            "flatness_real_sum": jnp.sum(w_b * losses.spectral_flatness(x_bcn, n_fft, n_fft // 4)),
            "count": jnp.sum(w_b)}

  @staticmethod
  def summarize_eval(sums: dict) -> dict[str, Any]:
    n = max(float(sums["count"]), 1.0)
    mel = float(sums["msspec_sum"]) / n
    return {"loss": mel, "mel_distance": mel, "sisnr": float(sums["sisnr_sum"]) / n,
            "l1": float(sums["l1_sum"]) / n, "flatness": float(sums["flatness_sum"]) / n,
            "flatness_real": float(sums["flatness_real_sum"]) / n, "examples": float(sums["count"])}

  def write_model_files(self, workdir: str) -> None:
    """Nothing besides the config (which holds codec.encodec) and the checkpoints: no tokenizer."""
    del workdir

  def export_params(self, state: CodecTrainState) -> Any:
    """{'codec': ...}: the parameters a codec directory holds (EMA weights, current codebooks)."""
    return state.params

  def flops_per_step(self, batch_size: int) -> float:
    """Approximate matmul / conv FLOPs of one train step (2 per multiply-add).

    Generator: forward + backward = 3x its forward. Discriminator: its update (forward + backward on
    real and fake: 6x), the generator-side forward on real and fake (2x) and one backward per
    adversarial loss (2x each). STFTs, mel filters and the quantizer are left out.
    """
    gen = _seanet_macs(self.codec_cfg, self.samples)
    disc = _disc_macs(self.disc_cfg, self.samples) if self.adversarial else 0.0
    adv_losses = len({"adv", "feat"} & set(self.weights))
    return 2.0 * batch_size * (3.0 * gen + (8.0 + 2.0 * adv_losses) * disc)


def _usage(qout: quantization.QuantizeOutput, codebook_size: int) -> jax.Array:
  """Mean over active codebooks of the fraction of codes used in this batch."""
  codes_kn = jnp.transpose(qout.codes_bkt, (1, 0, 2)).reshape(qout.codes_bkt.shape[1], -1)
  w_kn = jnp.repeat(qout.mask_bk.T, qout.codes_bkt.shape[-1], axis=1).astype(jnp.float32)
  counts = jax.vmap(lambda c, w: jax.ops.segment_sum(w, c, codebook_size))(codes_kn, w_kn)
  active = jnp.any(qout.mask_bk, axis=0)
  frac = jnp.mean((counts > 0).astype(jnp.float32), axis=1)
  return jnp.sum(jnp.where(active, frac, 0.0)) / jnp.maximum(jnp.sum(active), 1)


def _seanet_macs(cfg: EncodecConfig, samples: int) -> float:
  """Multiply-adds of the SEANet encoder + decoder on one example of `samples` samples."""
  frames = math.ceil(samples / cfg.hop_length)

  def conv(spec, length):
    return length * spec.kernel * spec.c_in * spec.c_out

  total, length = 0.0, samples
  for spec in seanet.encoder_layout(cfg):
    if spec.kind == "conv":
      length = math.ceil(length / spec.stride)
      total += conv(spec, length)
    elif spec.kind == "resblock":
      total += sum(conv(s, length) for _, s in seanet.resblock_convs(cfg, spec))
    elif spec.kind == "lstm":
      total += length * cfg.num_lstm_layers * 8 * spec.c_in**2
  length = frames
  for spec in seanet.decoder_layout(cfg):
    if spec.kind == "convtr":
      total += length * spec.kernel * spec.c_in * spec.c_out
      length *= spec.stride
    elif spec.kind == "conv":
      total += conv(spec, length)
    elif spec.kind == "resblock":
      total += sum(conv(s, length) for _, s in seanet.resblock_convs(cfg, spec))
    elif spec.kind == "lstm":
      total += length * cfg.num_lstm_layers * 8 * spec.c_in**2
  return total


def _disc_macs(cfg: disc_lib.DiscriminatorConfig, samples: int) -> float:
  """Multiply-adds of one MS-STFT discriminator forward on one example."""
  total = 0.0
  kt, kf = cfg.kernel_size
  for n_fft, hop in zip(cfg.n_ffts, cfg.hop_lengths):
    t, f = 1 + (samples - n_fft) // hop, n_fft // 2 + 1
    c_in, c = 2 * cfg.channels, cfg.filters
    total += t * f * kt * kf * c_in * c
    for i in range(len(cfg.dilations)):
      f = math.ceil(f / cfg.stride[1])
      c_out = min(cfg.filters_scale**(i + 1) * cfg.filters, cfg.max_filters)
      total += t * f * kt * kf * c * c_out
      c = c_out
    c_out = min(cfg.filters_scale**(len(cfg.dilations) + 1) * cfg.filters, cfg.max_filters)
    total += t * f * kt * kt * c * c_out + t * f * kt * kt * c_out * cfg.out_channels
  return total

"""audiocraft's multi-scale STFT discriminator (MS-STFT-D) and its adversarial losses, in Flax.

Each sub-discriminator looks at the complex STFT of the waveform at one resolution (n_fft, hop,
window), real and imaginary parts as 2C channels of a [B, frames, freqs, 2C] image, through 2-D
convolutions with weight norm (the first one without) and leaky ReLU:

    conv (3, 9)                                            -> fmap 0
    conv (3, 9), stride (1, 2), time dilation d, d in dilations   -> fmaps 1..len(dilations)
    conv (3, 3)                                            -> last fmap
    conv_post (3, 3) -> logits [B, frames, freqs', out_channels]     (no activation)

Losses (audiocraft's `hinge` adversarial loss, L1 feature matching, each normalised by the number of
sub-discriminators):
  discriminator_loss: mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))
  generator_loss:     -mean(D(fake))
  feature_loss:       mean over fmaps of mean |f_fake - f_real| (relative=True: divided by
                      mean |f_real|, the EnCodec paper's form; audiocraft computes that scale but
                      does not apply it)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from musicgen_jax.codec import losses, weight_norm

Output = tuple[list[jax.Array], list[list[jax.Array]]]   # (logits per scale, fmaps per scale)


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  """MS-STFT-D hyper-parameters; defaults are audiocraft's compression/default.yaml `msstftd`."""
  channels: int = 1
  out_channels: int = 1
  filters: int = 32
  max_filters: int = 1024
  filters_scale: int = 1
  n_ffts: tuple[int, ...] = (1024, 2048, 512, 256, 128)
  hop_lengths: tuple[int, ...] = (256, 512, 128, 64, 32)
  win_lengths: tuple[int, ...] = (1024, 2048, 512, 256, 128)
  kernel_size: tuple[int, int] = (3, 9)
  stride: tuple[int, int] = (1, 2)
  dilations: tuple[int, ...] = (1, 2, 4)
  normalized: bool = True
  negative_slope: float = 0.3

  def __post_init__(self):
    for name in ('n_ffts', 'hop_lengths', 'win_lengths', 'kernel_size', 'stride', 'dilations'):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    if not len(self.n_ffts) == len(self.hop_lengths) == len(self.win_lengths) >= 1:
      raise ValueError(f'discriminator n_ffts {self.n_ffts}, hop_lengths {self.hop_lengths} and '
                       f'win_lengths {self.win_lengths} must be non-empty and of equal length')
    if any(w > n for w, n in zip(self.win_lengths, self.n_ffts)):
      raise ValueError(f'discriminator win_lengths {self.win_lengths} must not exceed n_ffts '
                       f'{self.n_ffts}')
    if len(self.kernel_size) != 2 or len(self.stride) != 2:
      raise ValueError('discriminator kernel_size and stride must be (time, frequency) pairs')

  @classmethod
  def from_dict(cls, d: Any) -> DiscriminatorConfig:
    d = d.to_dict() if hasattr(d, 'to_dict') else dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'unknown discriminator fields {unknown}: use {sorted(names)}')
    return cls(**d)

  @property
  def min_samples(self) -> int:
    """The shortest waveform every scale can frame."""
    return max(self.n_ffts)


def _padding(kernel: Sequence[int], dilation: Sequence[int]) -> list[tuple[int, int]]:
  return [(((k - 1) * d) // 2,) * 2 for k, d in zip(kernel, dilation)]


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv2d(x: jax.Array, kernel: jax.Array, stride: Sequence[int] = (1, 1),
           dilation: Sequence[int] = (1, 1)) -> jax.Array:
  """`lax.conv_general_dilated` of x [B, H, W, C_in] with kernel [kh, kw, C_in, C_out], padded by
  `_padding`, computed as one convolution without stride or dilation, which XLA's CPU backend runs
  several times faster (with its gradients) than a strided or dilated one:

  - an axis dilated by d (odd kernel, stride 1) is split into its d phases, moved into the batch:
    taps d apart in the signal are neighbours within a phase;
  - an axis strided by s (dilation 1) is folded s samples at a time into the channels (space to
    depth) and the kernel's taps zero-padded to a multiple of s and folded alike: output j reads
    input j * s + t, i.e. group j + t // s, channel slot t % s.

  The same sums of the same products as the direct convolution (equal to fp32 rounding, tested).
  An axis both strided and dilated, or dilated with an even kernel, takes the direct convolution.
  """
  stride, dilation = tuple(int(v) for v in stride), tuple(int(v) for v in dilation)
  kernel_hw = kernel.shape[:2]
  if any(d > 1 and (s > 1 or k % 2 == 0) for k, s, d in zip(kernel_hw, stride, dilation)):
    return jax.lax.conv_general_dilated(x, kernel, stride, _padding(kernel_hw, dilation),
                                        rhs_dilation=dilation, dimension_numbers=_NHWC)
  batch = x.shape[0]
  phases = []                                      # (axis, d, length) of each phase split
  padding = []
  for i, (k, s, d) in enumerate(zip(kernel_hw, stride, dilation)):
    axis = i + 1
    if d > 1:
      n = x.shape[axis]
      m = -(-n // d)
      widths = [(0, 0)] * 4
      widths[axis] = (0, m * d - n)
      x = jnp.pad(x, widths)
      shape = x.shape[:axis] + (m, d) + x.shape[axis + 1:]
      x = jnp.moveaxis(x.reshape(shape), axis + 1, 0)         # [d, B', ..., m, ...]
      x = x.reshape((-1,) + x.shape[2:])
      phases.append((axis, d, n))
    if s > 1:
      n, pad = x.shape[axis], (k - 1) // 2
      out = (n + 2 * pad - k) // s + 1
      taps = -(-k // s)
      total = (out - 1 + taps) * s
      widths = [(0, 0)] * 4
      widths[axis] = (pad, max(0, total - n - pad))
      x = jax.lax.slice_in_dim(jnp.pad(x, widths), 0, total, axis=axis)
      x = x.reshape(x.shape[:axis] + (total // s, s) + x.shape[axis + 1:])
      x = jnp.moveaxis(x, axis + 1, -2).reshape(x.shape[:axis] + (total // s,)
                                                + x.shape[axis + 2:-1] + (s * x.shape[-1],))
      kw = [(0, 0)] * 4
      kw[i] = (0, taps * s - k)
      kernel = jnp.pad(kernel, kw)
      kernel = kernel.reshape(kernel.shape[:i] + (taps, s) + kernel.shape[i + 1:])
      kernel = jnp.moveaxis(kernel, i + 1, 2)                  # [.., taps, .., s, C_in, C_out]
      kernel = kernel.reshape(kernel.shape[:2] + (s * kernel.shape[3],) + kernel.shape[4:])
      padding.append((0, 0))
    else:
      padding.append(((k - 1) // 2,) * 2)
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)
  for axis, d, n in reversed(phases):
    y = y.reshape((d, -1) + y.shape[1:])
    y = jnp.moveaxis(y, 0, axis + 1)
    y = y.reshape(y.shape[:axis] + (y.shape[axis] * d,) + y.shape[axis + 2:])
    y = jax.lax.slice_in_dim(y, 0, n, axis=axis)
  assert y.shape[0] == batch
  return y


class Conv2d(nn.Module):
  """2-D convolution over [B, H, W, C_in] with 'same'-style padding, optionally weight-normalised
  (params kernel_g [1, 1, 1, C_out] and kernel_v [kh, kw, C_in, C_out], see codec/weight_norm)."""
  features: int
  kernel: tuple[int, int]
  stride: tuple[int, int] = (1, 1)
  dilation: tuple[int, int] = (1, 1)
  use_weight_norm: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = tuple(self.kernel) + (x.shape[-1], self.features)
    if self.use_weight_norm:
      v = self.param(weight_norm.V, nn.initializers.lecun_normal(), shape)
      g = self.param(weight_norm.G, lambda _: weight_norm.magnitude(v, -1))
      kernel = weight_norm.fold(g, v)
    else:
      kernel = self.param('kernel', nn.initializers.lecun_normal(), shape)
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    # The backend's default precision (TF32 on recent GPUs, as torch's cuDNN default that audiocraft
    # trains with; bf16 passes on TPU): these convs are most of a codec step's FLOPs, and a critic
    # needs no exact fp32 products.
    return conv2d(x, kernel, self.stride, self.dilation) + bias


class STFTDiscriminator(nn.Module):
  """One scale: audio [B, C, N] -> (logits [B, frames, freqs', out_channels], fmaps)."""
  cfg: DiscriminatorConfig
  n_fft: int
  hop: int
  win_length: int

  @nn.compact
  def __call__(self, audio_bcn: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    cfg = self.cfg
    z = losses.stft(audio_bcn, self.n_fft, self.hop, self.win_length, normalized=cfg.normalized)
    z = jnp.concatenate([jnp.real(z), jnp.imag(z)], axis=1)       # [B, 2C, frames, freqs]
    z = jnp.transpose(z, (0, 2, 3, 1))                             # [B, frames, freqs, 2C]
    act = lambda h: jax.nn.leaky_relu(h, cfg.negative_slope)
    width = lambda i: min(cfg.filters_scale**i * cfg.filters, cfg.max_filters)
    fmaps = []
    z = act(Conv2d(cfg.filters, cfg.kernel_size, use_weight_norm=False, name='conv_0')(z))
    fmaps.append(z)
    for i, d in enumerate(cfg.dilations):
      z = act(Conv2d(width(i + 1), cfg.kernel_size, cfg.stride, (d, 1), name=f'conv_{i + 1}')(z))
      fmaps.append(z)
    square = (cfg.kernel_size[0],) * 2
    z = act(Conv2d(width(len(cfg.dilations) + 1), square, name=f'conv_{len(cfg.dilations) + 1}')(z))
    fmaps.append(z)
    logits = Conv2d(cfg.out_channels, square, name='conv_post')(z)
    return logits, fmaps


class MultiScaleSTFTDiscriminator(nn.Module):
  """audio [B, C, N] -> (logits per scale, fmaps per scale)."""
  cfg: DiscriminatorConfig

  @nn.compact
  def __call__(self, audio_bcn: jax.Array) -> Output:
    if audio_bcn.ndim != 3 or audio_bcn.shape[1] != self.cfg.channels:
      raise ValueError(f'the discriminator takes audio [B, {self.cfg.channels}, N]; got '
                       f'{tuple(audio_bcn.shape)}')
    logits, fmaps = [], []
    for i, (n_fft, hop, win) in enumerate(zip(self.cfg.n_ffts, self.cfg.hop_lengths,
                                              self.cfg.win_lengths)):
      lg, fm = STFTDiscriminator(self.cfg, n_fft, hop, win, name=f'scale_{i}')(audio_bcn)
      logits.append(lg)
      fmaps.append(fm)
    return logits, fmaps


# ------------------------------------------------------------------------------------------ losses


def discriminator_loss(logits_real: Sequence[jax.Array],
                       logits_fake: Sequence[jax.Array]) -> jax.Array:
  """Hinge loss of the discriminator, averaged over the sub-discriminators -> []."""
  total = sum(jnp.mean(jax.nn.relu(1.0 - r)) + jnp.mean(jax.nn.relu(1.0 + f))
              for r, f in zip(logits_real, logits_fake))
  return total / len(logits_real)


def generator_loss(logits_fake: Sequence[jax.Array]) -> jax.Array:
  """Hinge adversarial loss of the generator, averaged over the sub-discriminators -> []."""
  return sum(-jnp.mean(f) for f in logits_fake) / len(logits_fake)


def feature_loss(fmaps_fake: Sequence[Sequence[jax.Array]],
                 fmaps_real: Sequence[Sequence[jax.Array]], relative: bool = False) -> jax.Array:
  """Feature matching: per sub-discriminator the mean over its fmaps of mean |fake - real|
  (divided by mean |real| when `relative`), averaged over sub-discriminators -> []. `fmaps_real`
  should carry no gradient (stop_gradient)."""
  total = 0.0
  for fake, real in zip(fmaps_fake, fmaps_real):
    per = []
    for f, r in zip(fake, real):
      d = jnp.mean(jnp.abs(f - r))
      per.append(d / (jnp.mean(jnp.abs(r)) + 1e-8) if relative else d)
    total = total + sum(per) / len(per)
  return total / len(fmaps_fake)

"""SEANet encoder and decoder (the convolutional halves of EnCodec) in Flax linen.

Layout inside JAX is channels-last: activations are [B, T, C]. The layer list of each network is
described once by `encoder_layout` / `decoder_layout`; the modules and the Hugging Face importer both
read it, so parameter names (`layers_{i}`) carry the index of the matching layer in transformers'
`EncodecEncoder.layers` / `EncodecDecoder.layers` (ELU layers hold no parameters and leave gaps).

Weight norm is not modelled: kernels are plain (the importer folds g * v / ||v||).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# torch F.pad mode -> jnp.pad mode
PAD_MODES = {'reflect': 'reflect', 'constant': 'constant', 'replicate': 'edge', 'circular': 'wrap'}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One entry of a SEANet layer list.

  kind: 'conv' | 'convtr' | 'resblock' | 'lstm' | 'elu'; index: position in the HF ModuleList.
  For convs: c_in, c_out, kernel, stride, dilation. For resblock: dim and dilations (first, second).
  For lstm: dim.
  """
  kind: str
  index: int
  c_in: int = 0
  c_out: int = 0
  kernel: int = 1
  stride: int = 1
  dilation: int = 1
  dilations: tuple[int, ...] = ()


def _layout(items: list[tuple[str, dict[str, Any]]]) -> tuple[LayerSpec, ...]:
  return tuple(LayerSpec(kind, i, **kw) for i, (kind, kw) in enumerate(items))


def _resblocks(cfg: Any, dim: int) -> list[tuple[str, dict[str, Any]]]:
  return [('resblock', dict(c_in=dim, c_out=dim, dilations=(cfg.dilation_growth_rate**j, 1)))
          for j in range(cfg.num_residual_layers)]


def encoder_layout(cfg: Any) -> tuple[LayerSpec, ...]:
  """Layer list of the SEANet encoder (audio [B, N, C_audio] -> latents [B, T, hidden_size])."""
  nf = cfg.num_filters
  items = [('conv', dict(c_in=cfg.audio_channels, c_out=nf, kernel=cfg.kernel_size))]
  scale = 1
  for ratio in reversed(cfg.upsampling_ratios):
    dim = scale * nf
    items += _resblocks(cfg, dim)
    items += [('elu', {}), ('conv', dict(c_in=dim, c_out=2 * dim, kernel=2 * ratio, stride=ratio))]
    scale *= 2
  items += [('lstm', dict(c_in=scale * nf, c_out=scale * nf)), ('elu', {}),
            ('conv', dict(c_in=scale * nf, c_out=cfg.hidden_size, kernel=cfg.last_kernel_size))]
  return _layout(items)


def decoder_layout(cfg: Any) -> tuple[LayerSpec, ...]:
  """Layer list of the SEANet decoder (latents [B, T, hidden_size] -> audio [B, N, C_audio])."""
  nf = cfg.num_filters
  scale = 2**len(cfg.upsampling_ratios)
  items = [('conv', dict(c_in=cfg.hidden_size, c_out=scale * nf, kernel=cfg.kernel_size)),
           ('lstm', dict(c_in=scale * nf, c_out=scale * nf))]
  for ratio in cfg.upsampling_ratios:
    dim = scale * nf
    items += [('elu', {}), ('convtr', dict(c_in=dim, c_out=dim // 2, kernel=2 * ratio, stride=ratio))]
    items += _resblocks(cfg, dim // 2)
    scale //= 2
  items += [('elu', {}), ('conv', dict(c_in=nf, c_out=cfg.audio_channels, kernel=cfg.last_kernel_size))]
  return _layout(items)


def resblock_convs(cfg: Any, spec: LayerSpec) -> tuple[tuple[str, LayerSpec], ...]:
  """(name, conv spec) of the convs in a residual block: block_1, block_3 and the optional shortcut."""
  hidden = spec.c_in // cfg.compress
  convs = [('block_1', LayerSpec('conv', 1, spec.c_in, hidden, cfg.residual_kernel_size,
                                 dilation=spec.dilations[0])),
           ('block_3', LayerSpec('conv', 3, hidden, spec.c_in, 1, dilation=spec.dilations[1]))]
  if cfg.use_conv_shortcut:
    convs.append(('shortcut', LayerSpec('conv', 0, spec.c_in, spec.c_in, 1)))
  return tuple(convs)


def pad1d(x_btc: jax.Array, left: int, right: int, mode: str) -> jax.Array:
  """Pads the time axis of [B, T, C]; reflect on inputs shorter than the pad zero-extends first (as HF)."""
  if mode == 'constant':
    return jnp.pad(x_btc, ((0, 0), (left, right), (0, 0)))
  length = x_btc.shape[1]
  extra = 0
  if mode == 'reflect' and length <= max(left, right):
    extra = max(left, right) - length + 1
    x_btc = jnp.pad(x_btc, ((0, 0), (0, extra), (0, 0)))
  out = jnp.pad(x_btc, ((0, 0), (left, right), (0, 0)), mode=PAD_MODES[mode])
  return out[:, :out.shape[1] - extra]


def conv_padding(length: int, kernel: int, stride: int, dilation: int, causal: bool) -> tuple[int, int]:
  """(left, right) time padding of an EnCodec conv: fixed padding plus extra padding to a full last frame."""
  k_eff = (kernel - 1) * dilation + 1
  total = k_eff - stride
  extra = -(-length // stride) * stride - length  # ceil(length / stride) * stride - length
  if causal:
    return total, extra
  right = total // 2
  return total - right, right + extra


def convtr_trim(kernel: int, stride: int, causal: bool, trim_right_ratio: float) -> tuple[int, int]:
  """(left, right) samples that an EnCodec transposed conv trims from its output."""
  total = kernel - stride
  right = math.ceil(total * trim_right_ratio) if causal else total // 2
  return total - right, right


class Conv1d(nn.Module):
  """Padded 1-D convolution (+ optional GroupNorm(1)): [B, T, C_in] -> [B, ceil(T / stride), C_out]."""
  spec: LayerSpec
  causal: bool
  pad_mode: str
  group_norm: bool

  @nn.compact
  def __call__(self, x_btc: jax.Array) -> jax.Array:
    s = self.spec
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (s.kernel, s.c_in, s.c_out))
    bias = self.param('bias', nn.initializers.zeros, (s.c_out,))
    left, right = conv_padding(x_btc.shape[1], s.kernel, s.stride, s.dilation, self.causal)
    x_btc = pad1d(x_btc, left, right, self.pad_mode)
    y_btc = jax.lax.conv_general_dilated(
        x_btc, kernel, window_strides=(s.stride,), padding='VALID', rhs_dilation=(s.dilation,),
        dimension_numbers=('NWC', 'WIO', 'NWC'), precision=jax.lax.Precision.HIGHEST) + bias
    if self.group_norm:
      y_btc = nn.GroupNorm(num_groups=1, epsilon=1e-5, use_fast_variance=False, name='norm')(y_btc)
    return y_btc


def conv_transpose(x_btc: jax.Array, kernel_kio: jax.Array, stride: int) -> jax.Array:
  """Full transposed convolution: [B, T, C_in] x kernel [K, C_in, C_out] -> [B, (T - 1) * stride + K, C_out].

  y[t * stride + k] += x[t] @ kernel[k]. Computed as one matmul to [B, T, K, C_out] followed by an
  overlap-add of the ceil(K / stride) kernel phases, which avoids convolving over inserted zeros.
  """
  b, t, _ = x_btc.shape
  k, _, c_out = kernel_kio.shape
  m = -(-k // stride)
  kernel_kio = jnp.pad(kernel_kio, ((0, m * stride - k), (0, 0), (0, 0)))
  z = jnp.einsum('btc,kco->btko', x_btc, kernel_kio, precision=jax.lax.Precision.HIGHEST)
  z = z.reshape(b, t, m, stride, c_out)
  out = jnp.zeros((b, t + m - 1, stride, c_out), z.dtype)
  for j in range(m):  # phase j lands one frame of `stride` samples later per step
    out = out.at[:, j:j + t].add(z[:, :, j])
  out = out.reshape(b, (t + m - 1) * stride, c_out)
  return out[:, :(t - 1) * stride + k]


class ConvTranspose1d(nn.Module):
  """Upsampling transposed conv with HF's trimming: [B, T, C_in] -> [B, T * stride, C_out]."""
  spec: LayerSpec
  causal: bool
  trim_right_ratio: float
  group_norm: bool

  @nn.compact
  def __call__(self, x_btc: jax.Array) -> jax.Array:
    s = self.spec
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (s.kernel, s.c_in, s.c_out))
    bias = self.param('bias', nn.initializers.zeros, (s.c_out,))
    y_btc = conv_transpose(x_btc, kernel, s.stride) + bias
    if self.group_norm:
      y_btc = nn.GroupNorm(num_groups=1, epsilon=1e-5, use_fast_variance=False, name='norm')(y_btc)
    left, right = convtr_trim(s.kernel, s.stride, self.causal, self.trim_right_ratio)
    return y_btc[:, left:y_btc.shape[1] - right]


class LSTM(nn.Module):
  """Stacked LSTM (torch.nn.LSTM gate order i, f, g, o; both biases) plus skip: [B, T, D] -> [B, T, D]."""
  dim: int
  num_layers: int

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    d = self.dim
    init = nn.initializers.uniform(scale=2.0 / math.sqrt(d))
    h_btd = x_btd
    for layer in range(self.num_layers):
      w_ih = self.param(f'w_ih_l{layer}', init, (d, 4 * d))
      w_hh = self.param(f'w_hh_l{layer}', init, (d, 4 * d))
      b_ih = self.param(f'b_ih_l{layer}', nn.initializers.zeros, (4 * d,))
      b_hh = self.param(f'b_hh_l{layer}', nn.initializers.zeros, (4 * d,))
      # Input projections for all steps at once; only the recurrent matmul stays in the scan.
      gx_tbg = jnp.einsum('btd,dg->tbg', h_btd, w_ih, precision=jax.lax.Precision.HIGHEST) + (b_ih + b_hh)

      def step(carry, gx_bg, w_hh=w_hh):
        h_bd, c_bd = carry
        g = gx_bg + jnp.dot(h_bd, w_hh, precision=jax.lax.Precision.HIGHEST)
        i, f, cand, o = jnp.split(g, 4, axis=-1)
        c_bd = jax.nn.sigmoid(f) * c_bd + jax.nn.sigmoid(i) * jnp.tanh(cand)
        h_bd = jax.nn.sigmoid(o) * jnp.tanh(c_bd)
        return (h_bd, c_bd), h_bd

      zeros = jnp.zeros((x_btd.shape[0], d), x_btd.dtype)
      _, h_tbd = jax.lax.scan(step, (zeros, zeros), gx_tbg)
      h_btd = jnp.transpose(h_tbd, (1, 0, 2))
    return h_btd + x_btd


class ResBlock(nn.Module):
  """SEANet residual block: x -> shortcut(x) + conv1x1(elu(conv_k(elu(x)))), [B, T, C] -> [B, T, C]."""
  cfg: Any
  spec: LayerSpec

  @nn.compact
  def __call__(self, x_btc: jax.Array) -> jax.Array:
    cfg = self.cfg
    convs = {name: Conv1d(s, cfg.use_causal_conv, cfg.pad_mode, cfg.norm_type == 'time_group_norm',
                          name=name) for name, s in resblock_convs(cfg, self.spec)}
    y_btc = convs['block_3'](jax.nn.elu(convs['block_1'](jax.nn.elu(x_btc))))
    skip = convs['shortcut'](x_btc) if 'shortcut' in convs else x_btc
    return skip + y_btc


def _apply_layers(cfg: Any, layout: Sequence[LayerSpec], x_btc: jax.Array) -> jax.Array:
  group_norm = cfg.norm_type == 'time_group_norm'
  for spec in layout:
    name = f'layers_{spec.index}'
    if spec.kind == 'elu':
      x_btc = jax.nn.elu(x_btc)
    elif spec.kind == 'conv':
      x_btc = Conv1d(spec, cfg.use_causal_conv, cfg.pad_mode, group_norm, name=name)(x_btc)
    elif spec.kind == 'convtr':
      x_btc = ConvTranspose1d(spec, cfg.use_causal_conv, cfg.trim_right_ratio, group_norm,
                              name=name)(x_btc)
    elif spec.kind == 'resblock':
      x_btc = ResBlock(cfg, spec, name=name)(x_btc)
    elif spec.kind == 'lstm':
      x_btc = LSTM(spec.c_in, cfg.num_lstm_layers, name=name)(x_btc)
    else:
      raise ValueError(f'unknown SEANet layer kind {spec.kind!r}')
  return x_btc


class SEANetEncoder(nn.Module):
  """Audio [B, N, C_audio] -> latents [B, ceil(N / hop), hidden_size]."""
  cfg: Any

  @nn.compact
  def __call__(self, audio_bnc: jax.Array) -> jax.Array:
    return _apply_layers(self.cfg, encoder_layout(self.cfg), audio_bnc)


class SEANetDecoder(nn.Module):
  """Latents [B, T, hidden_size] -> audio [B, T * hop, C_audio]."""
  cfg: Any

  @nn.compact
  def __call__(self, latents_btd: jax.Array) -> jax.Array:
    return _apply_layers(self.cfg, decoder_layout(self.cfg), latents_btd)


def overlap_add_weights(frame_lengths: Sequence[int], stride: int) -> tuple[np.ndarray, np.ndarray]:
  """Triangular fade weights of EnCodec's linear overlap-add (static, numpy).

  Returns (weight [L0], sum_weight [total]) for frames of the given lengths placed `stride` apart:
  frame i is added as weight[:L_i] * frame_i at offset i * stride and the sum divided by sum_weight.
  L0 is the first frame's length, total = stride * (F - 1) + last length.
  """
  n0 = frame_lengths[0]
  t = np.linspace(0.0, 1.0, n0 + 2, dtype=np.float32)[1:-1]
  weight = (0.5 - np.abs(t - 0.5)).astype(np.float32)
  total = stride * (len(frame_lengths) - 1) + frame_lengths[-1]
  sum_w = np.zeros((total,), np.float32)
  for i, n in enumerate(frame_lengths):
    sum_w[i * stride:i * stride + n] += weight[:n]
  if sum_w.min() <= 0:
    raise ValueError('overlap-add leaves samples uncovered: chunk stride is larger than a frame; '
                     'check chunk_length_s / overlap')
  return weight, sum_w
